"""What no log line may show, and the one formatter that blanks it out of every line.

The secrets (the API key, the token, a database URL's credentials) are registered once, when
the configuration has been read; every handler of the service, gunicorn's access and error logs
included, formats through ``RedactingFormatter``, which asks for them at each line.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import quote, unquote

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def url_credentials(url: str | None) -> tuple[str, ...]:
    """The credentials of a URL found by their shape alone, whether or not the URL parses: everything
    between ``://`` and the last ``@``, the part after its first ``:`` (the password), each also
    percent-decoded."""
    if not url or "://" not in url:
        return ()
    rest = url.split("://", 1)[1]
    if "@" not in rest:
        return ()
    userinfo = rest.rsplit("@", 1)[0]
    found = [userinfo]
    if ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    found += [unquote(part) for part in found]
    return tuple(part for part in found if part)


def url_without_password(url: str) -> str:
    """``url`` with the password of its credentials (found by shape, as ``url_credentials`` does) blanked."""
    if "://" not in url or "@" not in url.split("://", 1)[1]:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


def register(secrets: tuple[str, ...]) -> None:
    """Keep ``secrets`` (and their percent-encoded forms, as a URL would carry them) out of every line."""
    global _secrets
    forms = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""))}
    with _lock:
        _secrets = tuple(sorted(forms, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats as ``inner`` does (or with ``fmt``), then blanks out every secret, tracebacks included."""

    def __init__(self, fmt: str = LOG_FORMAT, inner: logging.Formatter | None = None) -> None:
        super().__init__(fmt)
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record) if self._inner is not None else super().format(record))
