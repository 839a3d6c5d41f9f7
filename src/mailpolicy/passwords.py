"""Account password hashes: salted, deliberately slow scrypt.

A stored hash reads ``$scrypt$ln=14,r=8,p=1$<salt>$<key>``: the scrypt cost
parameters (``N = 2**ln``), a random 16-byte salt and the 32-byte derived key,
both in standard base64 without padding. Only the standard library is used
(``hashlib.scrypt``, which needs OpenSSL).

Verification compares in constant time and never raises: a malformed or
unreasonable stored hash (one that would need more than
:data:`MAX_MEMORY` bytes to check, say) simply does not verify. Passwords are
encoded as UTF-8 without normalization, as SASL PLAIN sends them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_MEMORY", "hash_password", "is_password_hash", "verify_password"]

#: The most memory one hash may need (ln=17 with r=8 needs 128 MiB).
MAX_MEMORY: Final = 256 * 1024 * 1024

_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
_PREFIX: Final = "$scrypt$"
_FORMAT: Final = re.compile(
    r"\$scrypt\$ln=([1-9][0-9]?),r=([1-9][0-9]{0,2}),p=([1-9][0-9]{0,2})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


def _memory(ln: int, r: int, p: int) -> int:
    """What OpenSSL's scrypt allocates: the V array plus the B blocks."""
    return 128 * r * ((1 << ln) + 2 + p)


def _check_cost(ln: int, r: int, p: int) -> bool:
    return 1 <= ln <= 31 and 1 <= r <= 255 and 1 <= p <= 255 and _memory(ln, r, p) <= MAX_MEMORY


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    # Only the canonical spelling: no stray bits in the last character.
    if _b64(data) != text:
        raise ValueError("non-canonical base64")
    return data


def _derive(password: str, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
    # surrogatepass: a password that came in as undecodable bytes still
    # hashes (and verifies) instead of raising.
    secret = password.encode("utf-8", "surrogatepass")
    # maxmem: OpenSSL's default limit (32 MiB) would refuse ln >= 15.
    maxmem = _memory(ln, r, p) + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=1 << ln, r=r, p=p, maxmem=maxmem, dklen=length)


def hash_password(password: str, *, ln: int = 14, r: int = 8, p: int = 1) -> str:
    """Hash ``password`` with a fresh random salt.

    ``ln`` is log2 of scrypt's cost ``N``; the default (14, 16 MiB, tens of
    milliseconds) suits a mail server. Raises ValueError for parameters that
    are out of range or need more than :data:`MAX_MEMORY`.
    """
    if not _check_cost(ln, r, p):
        raise ValueError(f"unsupported scrypt parameters ln={ln}, r={r}, p={p}")
    salt = os.urandom(_SALT_BYTES)
    key = _derive(password, salt, ln, r, p, _KEY_BYTES)
    return f"{_PREFIX}ln={ln},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    match = _FORMAT.fullmatch(stored)
    if match is None:
        return None
    ln, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not _check_cost(ln, r, p):
        return None
    try:
        salt = _unb64(match.group(4))
        key = _unb64(match.group(5))
    except (binascii.Error, ValueError):
        return None
    # Exactly the key length we write: scrypt's output is prefix-stable, so
    # accepting a shorter key would let a truncated hash verify.
    if not 8 <= len(salt) <= 64 or len(key) != _KEY_BYTES:
        return None
    return ln, r, p, salt, key


def is_password_hash(text: str) -> bool:
    """Whether ``text`` is a well-formed hash this module can verify (it
    says nothing about which password it holds)."""
    return isinstance(text, str) and _parse(text) is not None


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the ``stored`` hash.

    Constant-time comparison; a malformed stored hash gives False, never an
    exception.
    """
    if not isinstance(password, str) or not isinstance(stored, str):
        return False
    parsed = _parse(stored)
    if parsed is None:
        return False
    ln, r, p, salt, key = parsed
    try:
        candidate = _derive(password, salt, ln, r, p, _KEY_BYTES)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, key)


@functools.lru_cache(maxsize=8)
def _dummy(ln: int, r: int, p: int) -> str:
    return hash_password(secrets.token_urlsafe(16), ln=ln, r=r, p=p)


def dummy_hash_like(stored: Iterable[str]) -> str:
    """A hash of a random password that costs as much as the costliest of
    ``stored``: verify an unknown user's password against it, so that a
    failed login takes as long for a user that does not exist as for one
    that does."""
    costs = [parsed[:3] for text in stored if (parsed := _parse(text)) is not None]
    ln, r, p = max(costs, key=lambda c: _memory(*c) * c[2], default=(14, 8, 1))
    return _dummy(ln, r, p)
