"""Postfix's words: every reply the dialogue itself gives (not the policy's).

The texts are Postfix 3.7 smtpd's, as the recorded corpus shows them; a
``{host}`` is our host name. Kept in one table so that a reader can check
them against Postfix's ``smtpd.c`` in one place.
"""

from __future__ import annotations

from typing import Final

from ..model import Reply

__all__ = ["R", "format_reply"]


class R:
    """Replies by name."""

    OK: Final = Reply(250, "2.0.0", "Ok")
    OK_MAIL: Final = Reply(250, "2.1.0", "Ok")
    OK_RCPT: Final = Reply(250, "2.1.5", "Ok")
    BYE: Final = Reply(221, "2.0.0", "Bye")
    START_DATA: Final = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
    READY_TLS: Final = Reply(220, "2.0.0", "Ready to start TLS")
    AUTH_OK: Final = Reply(235, "2.7.0", "Authentication successful")

    BAD_SYNTAX: Final = Reply(500, "5.5.2", "Error: bad syntax")
    UNKNOWN_COMMAND: Final = Reply(500, "5.5.2", "Error: command not recognized")
    LINE_TOO_LONG: Final = Reply(500, "5.5.0", "Error: line too long")
    SYNTAX_HELO: Final = Reply(501, None, "Syntax: HELO hostname")
    SYNTAX_EHLO: Final = Reply(501, "5.5.4", "Syntax: EHLO hostname")
    SYNTAX_RSET: Final = Reply(501, "5.5.4", "Syntax: RSET")
    SYNTAX_DATA: Final = Reply(501, "5.5.4", "Syntax: DATA")
    SYNTAX_VRFY: Final = Reply(501, "5.5.4", "Syntax: VRFY address [SMTPUTF8]")
    SYNTAX_STARTTLS: Final = Reply(501, "5.5.4", "Syntax: STARTTLS")
    SYNTAX_AUTH: Final = Reply(501, "5.5.4", "Syntax: AUTH mechanism")

    NESTED_MAIL: Final = Reply(503, "5.5.1", "Error: nested MAIL command")
    NEED_MAIL: Final = Reply(503, "5.5.1", "Error: need MAIL command")
    NEED_RCPT: Final = Reply(503, "5.5.1", "Error: need RCPT command")
    NO_VALID_RCPT: Final = Reply(554, "5.5.1", "Error: no valid recipients")
    AUTH_NOT_ENABLED: Final = Reply(503, "5.5.1", "Error: authentication not enabled")
    ALREADY_AUTH: Final = Reply(503, "5.5.1", "Error: already authenticated")
    AUTH_IN_MAIL: Final = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
    TLS_ACTIVE: Final = Reply(554, "5.5.1", "Error: TLS already active")
    NOT_IMPLEMENTED: Final = Reply(502, "5.5.1", "Error: command not implemented")

    AUTH_ABORTED: Final = Reply(501, "5.7.0", "Authentication aborted")
    #: Postfix with a SASL backend that gives no reason
    AUTH_FAILED: Final = Reply(535, "5.7.8", "Error: authentication failed: (reason unavailable)")
    AUTH_BAD_MECH: Final = Reply(
        535, "5.7.8", "Error: authentication failed: Invalid authentication mechanism"
    )
    AUTH_BAD_INITIAL: Final = Reply(
        535, "5.7.8", "Error: authentication failed: Invalid base64 data in initial response"
    )
    AUTH_BAD_CONTINUED: Final = Reply(
        535, "5.7.8", "Error: authentication failed: Invalid base64 data in continued response"
    )
    AUTH_MALFORMED: Final = Reply(535, "5.7.8", "Error: authentication failed: malformed response")
    AUTH_LINE_TOO_LONG: Final = Reply(500, "5.5.6", "Authentication exchange line is too long")
    AUTH_TEMP: Final = Reply(454, "4.7.0", "Temporary authentication failure")

    TEMP_FAILURE: Final = Reply(451, "4.3.0", "Error: temporary failure, please try again later")
    QUEUE_WRITE_ERROR: Final = Reply(451, "4.3.0", "Error: queue file write error")

    # {host} is our host name
    TOO_MANY_ERRORS: Final = Reply(421, "4.7.0", "{host} Error: too many errors")
    TIMEOUT: Final = Reply(421, "4.4.2", "{host} Error: timeout exceeded")
    SHUTTING_DOWN: Final = Reply(421, "4.3.2", "{host} Service shutting down")
    STORE_FAILED: Final = Reply(421, "4.3.0", "{host} Error: temporary failure")
    BARE_LF: Final = Reply(521, "5.5.2", "{host} Error: bare <LF> received")
    AUTH_LOCKOUT: Final = Reply(421, "4.7.0", "{host} Error: too many failed authentications")


def format_reply(reply: Reply) -> bytes:
    """The reply on the wire: every line with its code (``-`` on all but the
    last) and, as Postfix does, the enhanced code repeated on each line."""
    lines = reply.text.split("\n")
    prefix = f"{reply.enhanced} " if reply.enhanced else ""
    out = [f"{reply.code}-{prefix}{ln}" for ln in lines[:-1]]
    out.append(f"{reply.code} {prefix}{lines[-1]}")
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")
