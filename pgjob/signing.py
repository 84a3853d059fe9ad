"""The home's key for signing what pgjob must trust but keeps in the database: journal
snapshots (pickles, which run code when loaded; see journal.py).

The key lives in the home's secrets, readable by its owner only, never in the database:
whoever has only the database password cannot sign.
"""
from __future__ import annotations

import hashlib
import hmac
from secrets import token_hex

from .home import Home

KEY_BYTES = 32


def key(home: Home) -> bytes | None:
    """The home's key, or None when it is missing or unreadable (`pgjob init` makes it)."""
    try:
        return bytes.fromhex(home.journal_key.read_text().strip()) or None
    except (OSError, ValueError):
        return None


def ensure_key(home: Home) -> None:
    """Make the key if the home has none: every home has one, since a home may become a
    journal home later and its workers must find the key there."""
    if key(home) is None:
        home.write(home.journal_key, token_hex(KEY_BYTES) + "\n")


def sign(secret: bytes, *parts: str | int | bytes) -> bytes:
    """HMAC-SHA256 of `parts`, each length-prefixed, so no two part lists sign alike."""
    signed = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        signed.update(len(data).to_bytes(8, "big"))
        signed.update(data)
    return signed.digest()


def verify(secret: bytes, mac: bytes, *parts: str | int | bytes) -> bool:
    return hmac.compare_digest(mac, sign(secret, *parts))
