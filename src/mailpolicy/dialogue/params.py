"""MAIL FROM and RCPT TO parameters, as Postfix's smtpd takes them."""

from __future__ import annotations

from collections.abc import Mapping

from ..model import Reply

__all__ = ["check_mail_params", "check_rcpt_params"]


def check_mail_params(
    arg: str, params: Mapping[str, str | None]
) -> tuple[int | None, Reply | None]:
    """``(SIZE=, None)``, or ``(None, the refusal)`` (Postfix's mail_cmd())."""
    size: int | None = None
    for key, value in params.items():
        if key == "SIZE" and value is not None:
            if not value.isdigit():
                return None, Reply(501, "5.5.4", "Bad message size syntax")
            size = int(value)
        elif key == "RET" and value is not None and value.upper() not in ("FULL", "HDRS"):
            return None, Reply(501, "5.5.4", "Bad RET parameter syntax")
        elif not _mail_option_ok(key, value):
            return None, Reply(555, "5.5.4", f"Unsupported option: {_as_written(arg, key)}")
    return size, None


def check_rcpt_params(arg: str, params: Mapping[str, str | None]) -> Reply | None:
    """The refusal of a RCPT parameter, if any (Postfix's rcpt_cmd(): the
    DSN parameters, nothing else)."""
    for key, value in params.items():
        if key == "NOTIFY" and value is not None and not _notify_ok(value):
            return Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
        if key not in ("NOTIFY", "ORCPT") or value is None:
            return Reply(555, "5.5.4", f"Unsupported option: {_as_written(arg, key)}")
    return None


def _mail_option_ok(key: str, value: str | None) -> bool:
    """A MAIL parameter Postfix takes (SIZE and RET values are checked apart)."""
    if key == "BODY":
        return value is not None and value.upper() in ("8BITMIME", "7BIT")
    if key == "SMTPUTF8":
        return value is None
    return key in ("SIZE", "AUTH", "RET", "ENVID") and value is not None


def _notify_ok(value: str) -> bool:
    """RFC 3461 NOTIFY: NEVER alone, or SUCCESS, FAILURE and DELAY."""
    words = value.upper().split(",")
    return words == ["NEVER"] or all(w in ("SUCCESS", "FAILURE", "DELAY") for w in words)


def _as_written(arg: str, key: str) -> str:
    """The parameter ``key`` of a MAIL or RCPT argument as the client wrote
    it (``foo=bar``): Postfix echoes it whole in "Unsupported option"."""
    for word in arg.split():
        if word.partition("=")[0].upper() == key:
            return word
    return key
