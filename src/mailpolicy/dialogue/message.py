"""The message at the end of DATA: reading it, our ``Received:`` header, and
the facts the policy judges (pure functions of bytes)."""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import functools
import ipaddress
import math
import re
from email.utils import formatdate

import attrs

from ..addresses import is_valid_hostname
from ..model import DnsQuery, MessageFacts, RType, Session, ip_text
from ..settings import GeneralSettings

__all__ = [
    "DataReader",
    "header_safe",
    "message_facts",
    "received_header",
    "verified_client_name",
]

_END = b"\r\n.\r\n"


@attrs.define
class DataReader:
    """Reads a message up to the lone dot, in bulk (not line by line),
    dot-unstuffed (RFC 5321 4.5.2). Past ``limit`` bytes (0: none) the rest
    is counted but not kept, so a huge message cannot exhaust memory; what is
    kept can be taken out as it grows (:meth:`spill`) to be spooled."""

    limit: int
    kept: list[bytes] = attrs.field(factory=list)
    #: bytes kept so far, spilled ones included
    kept_size: int = 0
    #: bytes kept and not spilled (in memory)
    in_memory: int = 0
    spilled: int = 0
    size: int = 0
    #: the next byte starts a line
    line_start: bool = True
    #: a line ended in LF without CR (an SMTP smuggling ingredient)
    bare_lf: bool = False
    #: the last byte taken was CR (a CRLF may straddle two pieces)
    _cr: bool = False

    def feed(self, buf: bytearray) -> bool:
        """Consume what ``buf`` holds of the message; True once the end was seen."""
        while True:
            if self.line_start:
                if buf[:3] == b".\r\n":
                    del buf[:3]
                    return True
                if len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                    return False  # maybe the end: wait for more
            found = buf.find(_END)
            if found >= 0:
                self._take(bytes(buf[: found + 2]))
                del buf[: found + len(_END)]
                return True
            # Keep a tail that might begin the end marker; cut after a line
            # end when there is one, so "\r\n" and a following "." are never
            # split across two pieces.
            cut = len(buf) - 4
            if cut <= 0:
                return False
            nl = buf.rfind(b"\n", 0, cut)
            if nl >= 0:
                cut = nl + 1
            elif buf[cut - 1] == 0x0D:
                cut -= 1
            if cut <= 0:
                return False
            self._take(bytes(buf[:cut]))
            del buf[:cut]

    def _take(self, raw: bytes) -> None:
        if not self.bare_lf:
            self.bare_lf = has_bare_lf(raw, after_cr=self._cr)
        self._cr = raw.endswith(b"\r")
        piece = raw[1:] if self.line_start and raw[:1] == b"." else raw
        piece = piece.replace(b"\r\n.", b"\r\n")
        self.line_start = raw.endswith(b"\r\n")
        self.size += len(piece)
        if not self.limit or self.kept_size < self.limit:
            room = len(piece) if not self.limit else self.limit - self.kept_size
            part = piece[:room]
            self.kept.append(part)
            self.kept_size += len(part)
            self.in_memory += len(part)

    def spill(self) -> bytes:
        """Take out what is held in memory (to append to a spool)."""
        out = b"".join(self.kept)
        self.kept.clear()
        self.spilled += len(out)
        self.in_memory = 0
        return out

    def content(self) -> bytes:
        """The message, when nothing was spilled."""
        assert not self.spilled, "part of the message is in the spool"
        return b"".join(self.kept)


def has_bare_lf(data: bytes, *, after_cr: bool = False) -> bool:
    """Whether ``data`` holds an LF not preceded by CR (``after_cr``: the
    byte before ``data`` was a CR)."""
    at = data.find(b"\n")
    while at >= 0:
        before = data[at - 1 : at] if at else (b"\r" if after_cr else b"")
        if before != b"\r":
            return True
        at = data.find(b"\n", at + 1)
    return False


#: what Postfix's smtpd neuters in a HELO name before it reaches a header
_NEUTER = str.maketrans(dict.fromkeys('<>()\\";:@', "?"))


_PRINTABLE = re.compile(r"[!-~]*")


def header_safe(text: str) -> str:
    """A client-supplied name fit for our Received: header: printable ASCII
    only (no CR/LF header injection, no NUL), Postfix's specials neutered."""
    cleaned = text[:255]
    if not _PRINTABLE.fullmatch(cleaned):
        cleaned = "".join(c if " " < c < "\x7f" else "?" for c in cleaned)
    return cleaned.translate(_NEUTER)


def verified_client_name(session: Session) -> str:
    """The client's forward-confirmed name from the DNS answers the session
    already gathered (PTR, then A/AAAA of that name listing the address), as
    Postfix puts it in ``Received:``; ``unknown`` when there is none or it
    was never looked up (no DNS question is asked for a header)."""
    ip = session.client_ip
    text = ip_text(ip)
    ptr = session.dns.get(DnsQuery.of(text, RType.PTR))
    if ptr is None or not ptr.found:
        return "unknown"
    name = ptr.records[0].lower().rstrip(".")
    if not is_valid_hostname(name):
        return "unknown"
    fwd = session.dns.get(DnsQuery.of(name, RType.A if ip.version == 4 else RType.AAAA))
    if fwd is None or not fwd.found:
        return "unknown"
    if text in fwd.records:  # the usual case, without parsing each record
        return header_safe(name)
    for record in fwd.records:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(record.strip()) == ip:
                return header_safe(name)
    return "unknown"


@functools.lru_cache(maxsize=2)
def _date_text(second: int) -> str:
    # the same for every message of a second; formatdate is slow
    return formatdate(second, localtime=False, usegmt=False).replace("-0000", "+0000") + " (UTC)"


def received_header(
    session: Session, hostname: str, rcpts: tuple[str, ...], queue_id: str, now: float
) -> bytes:
    """Our ``Received:`` header, as Postfix words it: ``from HELO (NAME
    [IP])`` with the verified client name or ``unknown``, and a numeric zone
    (``+0000 (UTC)``)."""
    helo = header_safe(session.helo or "unknown")
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"
    if session.auth_user is not None:
        proto += "A"
    date = _date_text(math.floor(now))
    for_part = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    name = verified_client_name(session)
    text = (
        f"Received: from {helo} ({name} [{ip_text(session.client_ip)}])\r\n"
        f"\tby {hostname} (mailpolicy) with {proto} id {queue_id}{for_part};"
        f" {date}\r\n"
    )
    return text.encode("utf-8", "surrogateescape")


def message_facts(content: bytes, size: int, general: GeneralSettings) -> MessageFacts:
    """The facts the end-of-DATA rules judge. The MIME parse is made only
    when a rule needs it (attachment size, auto-forwarding)."""
    header_end = content.find(b"\r\n\r\n")
    head = content if header_end < 0 else content[: header_end + 2]
    received = sum(1 for ln in head.split(b"\r\n") if ln[:9].lower() == b"received:")
    largest = 0
    forwarded = False
    if general.max_attachment_size > 0 or general.disable_auto_forwarding:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
        if general.max_attachment_size > 0:
            for part in msg.walk():
                if part.is_multipart():
                    continue
                if part.get_content_disposition() == "attachment" or part.get_filename():
                    payload = part.get_payload(decode=True)
                    if isinstance(payload, bytes):
                        largest = max(largest, len(payload))
        if general.disable_auto_forwarding:
            auto = str(msg.get("Auto-Submitted", "")).strip().lower()
            forwarded = (
                auto.startswith("auto-forwarded") or "Resent-From" in msg or "Resent-Sender" in msg
            )
    return MessageFacts(
        size=size,
        received_headers=received,
        largest_attachment=largest,
        auto_forwarded=forwarded,
    )
