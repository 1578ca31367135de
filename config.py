"""The service's configuration: read from the environment once, checked, and turned into its parts.

``Config.from_env`` reads and checks every setting (a setting that cannot work is a
``ConfigError`` naming it); ``check_config`` is what a start does with it: one line and exit 2
for a setting or a store that cannot work, never a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import redaction
from coingecko_client import PLANS, CoinGeckoClient
from redaction import LOG_FORMAT, RedactingFormatter, url_credentials, url_without_password
from store import Store, StoreError
from stores import is_postgres_url, open_store

log = logging.getLogger(__name__)

RELOAD_LOCK_WAIT = 15.0
# At start, a moment for a service that was just killed to let go of the store.
START_LOCK_WAIT = 2.0


class ConfigError(ValueError):
    """The environment holds a value the service cannot run with."""


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment, read once."""

    host: str = "127.0.0.1"
    port: int = 5000
    plan: str = "keyless"
    api_url: str = PLANS["keyless"].base_url
    api_key: str | None = field(default=None, repr=False)
    rate_limit: float = PLANS["keyless"].rate_limit
    timeout: float = 15.0
    concurrency: int = 1
    db_path: str | None = None
    api_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    max_attempts: int = 5
    pause_seconds: float = 15.0
    cache_seconds: float = 120.0
    monthly_credits: int | None = None
    rate_limit_given: bool = False
    refresh_after: float | None = None
    lease_seconds: float = 30.0
    sweep_at: int | None = None
    sweep_verify: int = 20
    plan_given: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read and check every setting; raise ConfigError naming the first one that cannot work."""
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        api_key = _header_safe("COINGECKO_API_KEY", text("COINGECKO_API_KEY"))
        plan_name = (text("COINGECKO_PLAN") or ("demo" if api_key else "keyless")).lower()
        if plan_name not in PLANS:
            raise ConfigError(f"COINGECKO_PLAN must be one of {', '.join(PLANS)}, not {plan_name[:40]!r}")
        plan = PLANS[plan_name]
        if plan_name == "pro" and not api_key:
            raise ConfigError("COINGECKO_PLAN=pro needs COINGECKO_API_KEY (a pro key): set the key, or leave "
                              "COINGECKO_PLAN unset for the keyless public API")
        if api_key and plan.key_header is None:
            log.warning("COINGECKO_PLAN=keyless: the API key is not sent; set COINGECKO_PLAN=demo or pro to use it")
        level = (text("LOG_LEVEL") or "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level[:40]!r}")
        port = _number(env, "PORT", int, cls.port, 0, 65535)
        return cls(
            host=_address("HOST", text("HOST") or cls.host, port),
            port=port,
            plan=plan_name,
            api_url=_http_url("COINGECKO_API_URL", text("COINGECKO_API_URL") or plan.base_url),
            api_key=api_key,
            rate_limit=_number(env, "COINGECKO_RATE_LIMIT", float, plan.rate_limit, 0.001, 1e9),
            timeout=_number(env, "COINGECKO_TIMEOUT", float, cls.timeout, 0.001, 3600),
            concurrency=_number(env, "WORKER_CONCURRENCY", int, plan.concurrency, 1, 64),
            db_path=_store_location(text("COINS_DB")),
            api_token=_header_safe("COINS_API_TOKEN", text("COINS_API_TOKEN")),
            log_level=level,
            max_attempts=_number(env, "COINGECKO_MAX_ATTEMPTS", int, cls.max_attempts, 1, 100),
            pause_seconds=_number(env, "WORKER_PAUSE_SECONDS", float, cls.pause_seconds, 0.001, 3600),
            cache_seconds=_number(env, "COINGECKO_CACHE_SECONDS", float, cls.cache_seconds, 0, 86400),
            monthly_credits=_number(env, "COINGECKO_MONTHLY_CREDITS", int, None, 0, 10**12),
            rate_limit_given=text("COINGECKO_RATE_LIMIT") is not None,
            refresh_after=_duration("REFRESH_AFTER", text("REFRESH_AFTER")),
            lease_seconds=_number(env, "COINS_LEASE_SECONDS", float, cls.lease_seconds, 1, 3600),
            sweep_at=_number(env, "COINS_SWEEP_AT", int, None, 0, 10**9),
            sweep_verify=_number(env, "COINS_SWEEP_VERIFY", int, cls.sweep_verify, 0, 10**6),
            plan_given=text("COINGECKO_PLAN") is not None,
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """What no log line may show: the key, the token and a database URL's credentials (by their shape,
        whether the URL parses or not)."""
        return tuple(secret for secret in (self.api_key, self.api_token, *url_credentials(self.db_path)) if secret)

    @property
    def plan_said(self) -> str:
        """The plan as the start line names it, and what was assumed when COINGECKO_PLAN was not set."""
        if self.plan_given:
            return self.plan
        if self.api_key:
            return (f"{self.plan} (assumed from the key, COINGECKO_PLAN being unset; "
                    "set COINGECKO_PLAN=pro for a pro key)")
        return f"{self.plan} (no COINGECKO_API_KEY; set one, with COINGECKO_PLAN=demo or pro, for more calls)"

    @property
    def store_name(self) -> str:
        """The store as a log line may name it: a database URL without its password."""
        return url_without_password(self.db_path) if self.db_path else "in memory"

    def open_store(self, lock_wait: float = 0.0, load: bool = True) -> Store:
        return open_store(self.db_path, lock_wait=lock_wait, lease_seconds=self.lease_seconds, load=load)

    def make_client(self, store: Store | None = None) -> CoinGeckoClient:
        """The upstream client; its credits (and, on a shared store, its call slots) are kept in ``store``."""
        store = store or open_store(None)
        return CoinGeckoClient(
            self.api_url,
            api_key=self.api_key,
            key_header=PLANS[self.plan].key_header,
            rate_limit=self.rate_limit,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            concurrency=self.concurrency,
            credits=store.credits(self.monthly_credits),
            slots=store.call_slots(),
        )

    def adopt_key(self, client: CoinGeckoClient) -> None:
        """On pro, keep to what ``GET /key`` reports, unless the environment set the rate or the credits."""
        if self.plan != "pro" or (self.rate_limit_given and self.monthly_credits is not None):
            return
        account = client.read_key()
        if account is None:
            return
        rate = account.get("rate_limit_request_per_minute")
        if not self.rate_limit_given and isinstance(rate, int | float) and rate > 0:
            client.limiter.set_rate(rate)
            log.info("GET /key: keeping to %s calls a minute", f"{rate:g}")
        remaining = account.get("current_remaining_monthly_calls")
        if self.monthly_credits is None and isinstance(remaining, int) and remaining >= 0:
            client.credits.allow(remaining)
            log.info("GET /key: %d credits left this month", remaining)


def _number(env: Mapping[str, str], name: str, kind: type, default, low, high):
    """A number from ``env``, finite and within [low, high]; ``default`` when unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw[:40]!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a finite number from {low:g} to {high:g}, not {raw[:40]!r}")
    return value


DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
SECONDS_IN = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(name: str, value: str | None) -> float | None:
    """``90s``, ``30m``, ``24h``, ``7d`` (or plain seconds) in seconds; None when unset."""
    if value is None:
        return None
    found = DURATION.fullmatch(value.lower())
    seconds = float(found.group(1)) * SECONDS_IN[found.group(2)] if found else 0.0
    if not 1 <= seconds <= 10 * 365 * 86400:
        raise ConfigError(f"{name} must be a duration such as 90s, 30m, 24h or 7d (1 s to 10 years), "
                          f"not {value[:40]!r}")
    return seconds


def _header_safe(name: str, value: str | None) -> str | None:
    """A secret that can be sent as an HTTP header value; the message never quotes it."""
    if value is not None and not all(" " <= char <= "~" for char in value):
        raise ConfigError(
            f"{name} holds a character that cannot be sent in an HTTP header (a control character, "
            "a line break or a non-ASCII letter): set it to the key or token alone"
        )
    return value


def _http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL ending in /api/v3, not {value[:80]!r}")
    return value.rstrip("/")


def _address(name: str, host: str, port: int) -> str:
    """``host`` if it is an IP address or a name this machine resolves."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ConfigError(
            f"{name} must be an address to listen on (127.0.0.1, 0.0.0.0, ::), not {host[:80]!r}"
        ) from None
    return host


def _store_location(value: str | None) -> str | None:
    """``COINS_DB``: a file path (``sqlite:///path`` names one too) or a ``postgresql://`` URL."""
    if value is None or is_postgres_url(value):
        return value
    if value.lower().startswith("sqlite:"):
        path = value[len("sqlite:"):]
        path = path[2:] if path.startswith("//") else path
        if not path or path == "/":
            raise ConfigError("COINS_DB must be a file path, sqlite:///path or a postgresql:// URL")
        return path
    return value


def require_free_port(config: Config) -> None:
    """Exit 2 with one line when ``PORT`` is taken (``python app.py``: gunicorn would retry for seconds)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host.strip("[]"), config.port))
        except OSError as exc:
            log.error("cannot start: PORT %d is already in use on %s (%s): stop what holds it, or set PORT "
                      "to a free port", config.port, config.host, exc.strerror)
            sys.exit(2)


def configure_logging(config: Config) -> None:
    """One stderr handler on the root logger (added if there is none); no secret ever printed."""
    redaction.register(config.secrets)
    root = logging.getLogger()
    root.setLevel(config.log_level)
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(RedactingFormatter())


def check_config(env: Mapping[str, str] | None = None) -> Config:
    """The configuration, and proof that its store opens; exit 2 with one line if either fails."""
    try:
        config = Config.from_env(env)
        configure_logging(config)
        config.open_store(lock_wait=START_LOCK_WAIT, load=False).close()
    except (ConfigError, StoreError) as exc:
        logging.basicConfig(format=LOG_FORMAT)
        log.error("cannot start: %s", exc)
        sys.exit(2)
    return config
