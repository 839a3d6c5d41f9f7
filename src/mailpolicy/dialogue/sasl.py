"""SMTP AUTH PLAIN and LOGIN (RFC 4954, 4616): decoding what the client sends."""

from __future__ import annotations

import binascii
from base64 import b64decode, b64encode

__all__ = ["challenge", "decode", "split_plain"]


def challenge(prompt: bytes) -> str:
    """A 334 challenge's text: the prompt in base64."""
    return b64encode(prompt).decode("ascii")


def decode(text: str | bytes) -> bytes | None:
    """Strict base64 (``None`` when it is not)."""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def split_plain(blob: bytes) -> tuple[str, str] | None:
    """PLAIN's ``authzid NUL authcid NUL password`` as ``(user, password)``."""
    parts = blob.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
