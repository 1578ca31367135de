"""The rules of a coin ID, written once for the web side and every store.

An entry of a submission is normalised (trimmed, lower-cased); an ID that can never be a
CoinGecko ID is malformed (too long, white space, a control character, ``/ \\ ? # %``) and never
goes upstream; a malformed ID is shown shortened, and stored under a key every database can hold.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

MAX_ID_LENGTH = 200
FORBIDDEN_ID_CHARACTERS = frozenset("/\\?#%")
ASCII_FORBIDDEN = re.compile(r"[\x00-\x20\x7f/\\?#%]")
SHOWN_ID_LENGTH = 210


def normalized_ids(entries: list[str]) -> list[str]:
    """Each entry as ``normalized_id`` makes it, the empty ones dropped. A list with no white space,
    upper case or empty entry (nearly every POST) is checked in a few passes in C and kept as it is."""
    joined = "".join(entries)
    if all(entries) and plain_ascii(joined) and joined.lower() == joined:
        return entries
    return [coin_id for entry in entries if (coin_id := normalized_id(entry))]


def normalized_id(entry: str) -> str:
    """``entry`` without surrounding white space, in lower case: the same string when it already is
    (a POST of 50,000 IDs then makes no second copy of each)."""
    stripped = entry.strip()
    return stripped if stripped.islower() or not stripped else stripped.lower()


def all_plain(coin_ids: Sequence[str], longest: int) -> bool:
    """Whether every ID is ``plain_ascii`` and none is longer than ``longest``: two passes in C."""
    return plain_ascii("".join(coin_ids)) and max(map(len, coin_ids), default=0) <= longest


def plain_ascii(text: str) -> bool:
    """Whether ``text`` is ASCII without white space, a control character or one of ``/ \\ ? # %``:
    one compiled expression, the check nearly every ID passes (alone or all joined)."""
    return text.isascii() and ASCII_FORBIDDEN.search(text) is None


def malformed_reason(coin_id: str) -> str | None:
    """Why ``coin_id`` can never be a CoinGecko ID (and so must never go upstream), or None.

    An ASCII ID (nearly all of them) is checked by one compiled expression; others
    character by character, for Unicode's white space and control categories.
    """
    if len(coin_id) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters"
    if plain_ascii(coin_id):
        return None
    for char in coin_id:
        if char.isspace():
            return "contains white space"
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return f"contains the control character U+{ord(char):04X}"
        if char in FORBIDDEN_ID_CHARACTERS:
            return f"contains {char!r}"
    return None


def shown_id(coin_id: str) -> str:
    """An ID as it may be echoed back: a malformed one can be megabytes long."""
    return coin_id if len(coin_id) <= SHOWN_ID_LENGTH else coin_id[:SHOWN_ID_LENGTH] + "…"


def stored_id(coin_id: str) -> str:
    """The key a malformed ID is recorded under: shortened, with lone surrogates and NUL escaped.

    Neither a lone surrogate (JSON allows ``"\\ud800"``) nor NUL can be written to every
    database (UTF-8 has no surrogates; PostgreSQL's text has no NUL), so every store keeps
    them as their escapes; a valid ID is returned unchanged.
    """
    shown = shown_id(coin_id)
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:
        shown = shown.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown.replace("\x00", "\\x00") if "\x00" in shown else shown


def stored_ids(coin_ids: Sequence[str]) -> set[str]:
    """The distinct ``stored_id`` of ``coin_ids``: the IDs themselves when all are plain ASCII no longer
    than an ID is shown (nearly every POST), which one pass in C tells."""
    if all_plain(coin_ids, SHOWN_ID_LENGTH):
        return set(coin_ids)
    return {stored_id(coin_id) for coin_id in coin_ids}
