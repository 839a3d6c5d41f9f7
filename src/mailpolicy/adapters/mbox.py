"""Judge delivered messages from their trace fields (``replay --mbox``).

Theory of operation
-------------------
A delivered message carries a trace of the SMTP sessions that brought it:
each server puts a ``Received:`` header on top, naming its client's address,
HELO name and, for most servers, the client's verified reverse name; the final
delivery agent adds ``Return-Path:`` (the envelope sender) and
``Delivered-To:``/``X-Original-To:`` (the envelope recipient) on top too.
:func:`read_trace` chooses one hop, rebuilds that hop's session and envelope
and notes where each fact came from; :func:`judge_message` asks the pure core
(:func:`mailpolicy.decide_with`) for the MAIL
verdict and then one RCPT verdict per recipient, as that server would have.

**Which hop.** From the top, the first header that records an SMTP session
from another host: local hops are walked past (a loopback client, ``by
localhost``, ``with local``, a pickup, no ``from``: content filters such as
amavisd-new and their reinjection), and so are mailbox fetches (``with
POP3``/``IMAP``, fetchmail) and headers without a client address (Gmail's
``by 10.x with SMTP``). With ``receiver`` (:class:`Receiver`: our host names
and networks), the walk starts at the first header added by one of ours and
also passes hops whose client is in our networks (our own relays); it stops
at a header added by anyone else, so a header forged further down to look
like ours is never reached.

**The hop's envelope, from that hop only.** Headers are prepended: those
written by the chosen hop's server (or by its delivery agent) sit between
its ``Received:`` and the next one above it that another server added.
Recipients: ``X-Original-To:`` there, else the hop's own ``for <...>``, else
``Delivered-To:`` there; never ``To:``/``Cc:`` (the author's words, not the
envelope). Sender: ``Return-Path:`` there (a mailbox fetch passes the sender
on, so one above a fetch counts), else the hop's ``envelope-from``, else the
mbox ``From_`` line when no later server's hop is above. ``<>``,
``<MAILER-DAEMON>`` and ``<MAILER-DAEMON@host>`` are the null sender.

**Formats** (as SpamAssassin's Received parser reads them, checked against it
on real lines by ``benchmarks/received_vs_spamassassin.py``):
``from HELO (NAME [IP])`` (Postfix, Sendmail, most others; ``unknown`` when
there is no verified name, Sendmail's ``(may be forged)``, ``user@`` and
``IDENT:user@`` before NAME), ``from NAME ([IP]:port helo=HELO)`` and ``from
[IP] (helo=HELO)`` (Exim, whose first name is the verified host name), ``from
HELO [IP] by`` (Exim 3, MDaemon, GMX), ``from HELO (IP)`` and ``(IP:port)``
(Exchange and others: NAME shown, not said to be verified), ``from NAME (HELO
x) (IP)`` and ``(user@IP)`` (qmail), ``[IP:port]``, ``[IPv6:...]``,
IPv4-mapped ``[::ffff:a.b.c.d]`` (read as the IPv4 client). ``with ESMTPS``
or a TLS comment means TLS; ``ESMTPSA`` and the like, ``(Authenticated
sender: x)``, Sendmail's ``(authenticated bits=0)``, Courier's ``(AUTH: LOGIN
x)``, CommuniGate's ``(account x)`` and qmail's ``(user@IP with login)`` an
authenticated client.

**DNS.** The answers the verdicts need come first from the trace itself: a
confirmed reverse name in the header gives the client's PTR and forward
records (the facts the receiving server saw), a name marked as forged a PTR
whose forward lookup does not lead back, ``unknown [IP]`` "no name" (the
PTR question answered NXDOMAIN: the server found no verified name). Other
questions are answered by ``zone`` (``--dns ZONE.json``). Without a zone they
stay unanswered, on purpose: a rule that needs one gives the core's ``451
4.3.0`` verdict, naming the rule (``security.lists.NAME`` for a list), and
the line lists the questions under ``missing_dns``, so nothing is judged on a
guess (every-name-is-NXDOMAIN would refuse good mail under
``reject_unknown_*``; today's live DNS is not what the server saw then).
"""

from __future__ import annotations

import email.message
import email.utils
import gzip
import ipaddress
import json
import mailbox
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from ..evaluate import Memo, decide_with, evaluate
from ..model import (
    Action,
    DnsOutcome,
    DnsQuery,
    DnsResult,
    Envelope,
    IPAddress,
    RType,
    Session,
    Stage,
    Verdict,
)
from ..policy import Policy
from .dns import StaticZone, ZoneError

__all__ = [
    "Fact",
    "MboxError",
    "MessageVerdict",
    "Received",
    "Receiver",
    "RecipientVerdict",
    "Trace",
    "TraceError",
    "diff_verdicts",
    "judge_mbox",
    "judge_message",
    "open_mbox",
    "parse_received",
    "read_messages",
    "read_trace",
    "zone_from_file",
]

#: rounds of DNS questions for one decision (the PTR, then its forward name)
_DNS_ROUNDS = 4


class MboxError(Exception):
    """An mbox or zone file that cannot be read at all."""


class TraceError(Exception):
    """A message whose trace fields do not give a session: ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------
# Received: headers


@attrs.frozen
class Received:
    """The parts of one ``Received:`` header that describe the session."""

    by: str | None
    from_name: str | None
    helo: str | None
    ip: IPAddress | None
    reverse: str | None
    #: ``True`` confirmed, ``False`` shown as not confirmed, ``None`` unknown
    reverse_verified: bool | None
    protocol: str | None
    tls: bool
    authenticated: bool
    auth_user: str | None
    recipient: str | None
    envelope_from: str | None
    style: str
    #: the header says the server found no verified name (``unknown [IP]``)
    no_name: bool = False
    #: the receiving host's own address, when the ``by`` clause shows it
    by_ip: IPAddress | None = None
    #: not an SMTP session from another host: a loopback client, ``by
    #: localhost``, ``with local``, a pickup (``from userid``), no ``from``
    local: bool = False
    #: the message was fetched from a mailbox (POP3, IMAP, fetchmail)
    fetched: bool = False


_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")
_ENVELOPE_FROM = re.compile(
    r"(?:envelope-(?:from|sender)[ =]|return-path:? )<?([^\s<>;,)]*)>?", re.IGNORECASE
)
_AUTH_SENDER = re.compile(r"Authenticated sender:\s*([^\s)]+)", re.IGNORECASE)
_HELO_NOTE = re.compile(r"\b(?:HELO|EHLO|LHLO)\s+([^\s()]+)")
_HELO_EQ = re.compile(r"\bhelo=([^\s()]+)")
_HOSTNAME = re.compile(r"[^\s\[\]()<>=:;,\"'@]+")
_PORT4 = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):\d+")
_BRACKET = re.compile(r"\[(?:IPv6:)?([^\]]+)\](?::\d+)?", re.IGNORECASE)
_KEYWORDS = frozenset({"from", "by", "via", "with", "id", "for"})
#: ``with`` values of a mailbox fetch, not an SMTP session
_FETCH = frozenset({"POP", "POP3", "POP3S", "IMAP", "IMAP4", "IMAPS", "IMAP4REV1"})
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost6"})
#: a logged-in client in the from clause's comments, and its name: Courier
#: "(AUTH: LOGIN user)", CommuniGate "(account user)", "(authenticated as
#: user)", qmail (Yahoo) "(user@IP with login)"
_AUTH_NOTES = (
    re.compile(r"\bAUTH: \S+ ([^\s,)]+)"),
    re.compile(r"\baccount (\S+)"),
    re.compile(r"\bauthenticated as (\S+)"),
    re.compile(r"^([^\s@]+)@\S+ with login\b"),
)
#: ``with`` values RFC 3848 and its successors give an authenticated client
_AUTH_PROTO = re.compile(r"(?:ES|L|UTF8S|UTF8L)MTPS?A|ASMTP", re.IGNORECASE)


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip().rstrip(".").partition("%")[0])
    except ValueError:
        return None
    # ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket: its PTR and
    # its list entries are those of the IPv4 address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _address(token: str) -> IPAddress | None:
    """The address in ``[IP]``, ``[IP]:port``, ``[IP:port]``, ``[IPv6:...]``,
    ``IP``, ``IP:port`` or qmail's ``user@IP``; ``None`` for anything else."""
    t = token.strip().rstrip(",;").rpartition("@")[2]
    m = _BRACKET.fullmatch(t)
    if m:
        t = m.group(1)
    ip = _ip(t)
    if ip is None and (m4 := _PORT4.fullmatch(t)) is not None:
        ip = _ip(m4.group(1))
    return ip


def _items(text: str) -> list[tuple[str, str]]:
    """Top-level words and comments (the text inside balanced parentheses)."""
    items: list[tuple[str, str]] = []
    depth, start = 0, 0
    for m in _TOKEN.finditer(text):
        tok = m.group(1)
        if tok == "(":
            if depth == 0:
                start = m.end()
            depth += 1
        elif tok == ")":
            if depth > 0:
                depth -= 1
                if depth == 0:
                    items.append(("comment", text[start : m.start()].strip()))
        elif depth == 0:
            items.append(("word", tok))
    if depth > 0:  # an unclosed comment: keep what is there
        items.append(("comment", text[start:].strip()))
    return items


def _clauses(items: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for kind, text in items:
        if kind == "word" and text.lower() in _KEYWORDS and text.lower() not in out:
            current = out.setdefault(text.lower(), [])
        elif current is not None:
            current.append((kind, text))
    return out


def _name(text: str | None) -> str | None:
    if text is None:
        return None
    name = text.strip().lower().rstrip(".")
    return name or None


def _host(token: str | None) -> str | None:
    """A host name as a header shows it: ``user@`` and ``IDENT:`` dropped;
    ``None`` for ``unknown``, address literals and annotations."""
    if not token:
        return None
    name = token.rpartition("@")[2]
    if not _HOSTNAME.fullmatch(name) or name.lower() == "unknown" or _ip(name) is not None:
        return None
    return name


def _client(
    first: str | None, rest: Sequence[str], notes: Sequence[str]
) -> tuple[IPAddress | None, str | None, str]:
    """The client's address, the name written just before it, and the form
    that gave it (see the module doc for the formats)."""
    # "(NAME [IP])", "([IP]:port helo=X)", "(IDENT:user@NAME [IP])": a
    # bracketed address inside a comment, and the name when it opens the
    # comment (CommuniGate's "(account USER [IP] verified)" names no host)
    for note in notes:
        tokens = note.split()
        for j, tok in enumerate(tokens):
            if tok.startswith("[") and (ip := _address(tok)) is not None:
                return ip, tokens[0] if j == 1 else None, "comment"
    # "from HELO [IP] by" (Exim 3, MDaemon, GMX)
    for tok in rest:
        if tok.startswith("[") and (ip := _address(tok)) is not None:
            return ip, None, "word"
    if first is not None and first.startswith("[") and (ip := _address(first)) is not None:
        return ip, None, "literal"
    # "(IP)", "(IP:port)", qmail's "(user@IP)" and "(user@IP with login)"
    for note in notes:
        tokens = note.split()
        if tokens and (ip := _address(tokens[0])) is not None:
            return ip, None, "bare"
    if first is not None and (ip := _address(first)) is not None:
        return ip, None, "first"
    return None, None, "none"


#: writers whose "from NAME ([IP])" names the client, not its HELO
_NAME_FIRST = re.compile(r"Microsoft Exchange Internet Mail Service|\bwith E?SMTP via TCP\b")


def parse_received(value: str) -> Received:
    """Parse one ``Received:`` header value (folded or not)."""
    text = " ".join(value.split())
    head, _, _date = text.rpartition(";")
    if not head:  # no date: the whole value is clauses
        head = text
    head = head.replace(")by ", ") by ")
    items = _items(head)
    clauses = _clauses(items)
    comments = [t for k, t in items if k == "comment"]
    everything = " ".join(t for _, t in items)
    frm = clauses.get("from", [])
    words = [t for k, t in frm if k == "word"]
    notes = [t for k, t in frm if k == "comment"]
    first = words[0] if words else None
    by_items = clauses.get("by", [])
    by_words = [t for k, t in by_items if k == "word"]
    by_notes = [t for k, t in by_items if k == "comment"]
    with_words = [t for k, t in clauses.get("with", []) if k == "word"]
    for_words = [t for k, t in clauses.get("for", []) if k == "word"]

    ip, shown, form = _client(first, words[1:], notes)
    helo_m = next((m for n in notes if (m := _HELO_EQ.search(n))), None) or next(
        (m for n in notes if (m := _HELO_NOTE.search(n))), None
    )
    exim = "Exim" in everything or any("helo=" in n for n in notes)
    helo: str | None
    reverse: str | None = None
    verified: bool | None = None
    no_name = False
    if helo_m is not None:
        helo = helo_m.group(1)
    elif form == "literal" and not notes:
        helo = None  # "from [IP] by": the server wrote the address, no HELO
    elif form == "first":
        helo = None  # "from IP (...) by": webmail and other non-SMTP writers
    else:
        helo = first
    if form == "comment" and shown is not None:
        # Postfix, Sendmail and their kind: "(NAME [IP])", NAME "unknown"
        # when the server found no verified one; Sendmail marks a name that
        # does not lead back "(may be forged)"
        style = "rfc5321"
        reverse = _host(shown)
        if reverse is not None:
            verified = not any("may be forged" in n for n in notes)
        elif shown.lower() == "unknown":
            no_name = True
    elif exim and form in ("comment", "literal", "word"):
        # Exim: the first name is the verified host name; HELO is written
        # (helo=) only when it differs
        style = "exim"
        reverse = _host(first)
        verified = True if reverse is not None else None
    elif form in ("bare", "first"):
        # Exchange "from HELO (IP)", qmail "from NAME (HELO x) (IP)": the
        # first name is shown, nothing says whether it was verified
        style = "qmail" if helo_m is not None and form == "bare" else "plain"
        reverse = _host(first)
        if first is not None and first.lower() == "unknown":
            no_name = True
    elif form == "comment" and _NAME_FIRST.search(everything):
        # Exchange 5.5 ("Microsoft Exchange Internet Mail Service") and the
        # "with SMTP via TCP" writer put the client's name before "([IP])",
        # as SpamAssassin reads them
        style = "plain"
        reverse = _host(first)
    else:  # "from HELO ([IP])", "from HELO [IP] by" (MDaemon, GMX): no name
        style = "plain"
    protocol = with_words[0] if with_words else None
    proto = (protocol or "").upper()
    tls = (proto.endswith(("S", "SA")) and proto.startswith(("ESMTP", "SMTP", "LMTP"))) or any(
        re.search(r"\bTLS|version=TLS|using TLS|\bSSL", c) for c in comments
    )
    auth_user: str | None = None
    authenticated = _AUTH_PROTO.fullmatch(proto) is not None
    from_text = " ".join(notes)
    found = _AUTH_SENDER.search(everything) or next(
        (m for p in _AUTH_NOTES for n in notes if (m := p.search(n)) is not None), None
    )
    if found is not None:
        authenticated, auth_user = True, found.group(1)
    elif re.search(r"\bauthenticated\b", from_text):  # Sendmail "(authenticated bits=0)"
        authenticated = True
    env_m = _ENVELOPE_FROM.search(everything)
    recipient = for_words[0].strip("<>;,") if for_words else None
    by = _name(by_words[0]) if by_words else None
    by_ip = next(
        (a for n in by_notes if (a := _address(n.split()[0] if n else "")) is not None), None
    )
    if by is not None and by_ip is None:
        by_ip = _address(by)
    loopback = ip is not None and ip.is_loopback
    local = (
        not frm
        or loopback
        or by in _LOCAL_NAMES
        or (by_ip is not None and by_ip.is_loopback)
        or proto == "LOCAL"
        or any(n.lower().startswith("from userid") for n in by_notes)
    )
    fetched = proto in _FETCH or bool(re.search(r"\b(?:fetchmail|getmail)", everything, re.I))
    return Received(
        by=by,
        from_name=first,
        helo=helo,
        ip=ip,
        reverse=_name(reverse),
        reverse_verified=verified if reverse is not None else None,
        protocol=protocol,
        tls=bool(tls),
        authenticated=authenticated,
        auth_user=auth_user,
        recipient=recipient or None,
        envelope_from=env_m.group(1) if env_m else None,
        style=style,
        no_name=no_name,
        by_ip=by_ip,
        local=local,
        fetched=fetched,
    )


# ---------------------------------------------------------------------------
# The trace of one message


@attrs.frozen
class Fact:
    """A fact about the session and the header it was read from."""

    value: Any
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "from": self.source}


@attrs.frozen
class Trace:
    """The session a message's trace fields describe."""

    client_ip: IPAddress
    helo: str | None
    sender: str
    recipients: tuple[str, ...]
    tls: bool
    esmtp: bool
    auth_user: str | None
    received: Received
    facts: Mapping[str, Fact]
    #: DNS answers the trace itself gives (the client's reverse name)
    dns: Mapping[DnsQuery, DnsResult]

    def session(self) -> Session:
        """The :class:`~mailpolicy.model.Session` the receiving server had."""
        return Session(
            self.client_ip,
            helo=self.helo,
            esmtp=self.esmtp,
            tls=self.tls,
            auth_user=self.auth_user,
            dns=self.dns,
        )


def _addresses(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for _, addr in email.utils.getaddresses(list(values)):
        addr = addr.strip()
        if addr and "@" in addr and addr.lower() not in (a.lower() for a in out):
            out.append(addr)
    return out


def _null_sender(text: str) -> bool:
    """``<>``, and the names MTAs write for it: ``<MAILER-DAEMON>``,
    ``<MAILER-DAEMON@host>`` (a bounce's envelope sender is null)."""
    inner = text.strip().strip("<>").strip()
    return inner == "" or inner.partition("@")[0].upper() == "MAILER-DAEMON"


@attrs.frozen
class Receiver:
    """Our servers: host names as they appear after ``by`` in the headers
    they add, and networks they receive from (our own relays)."""

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, values: str | Sequence[str] | Receiver | None) -> Receiver | None:
        """From ``--receiver`` values: each a host name or a network
        (``192.0.2.0/24``, ``2001:db8::1``); ``None`` for none."""
        if values is None or isinstance(values, Receiver):
            return values
        items = [values] if isinstance(values, str) else list(values)
        names: set[str] = set()
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for v in items:
            try:
                nets.append(ipaddress.ip_network(v.strip(), strict=False))
            except ValueError:
                if (name := _name(v)) is not None:
                    names.add(name)
        return cls(frozenset(names), tuple(nets)) if names or nets else None

    def inside(self, ip: IPAddress | None) -> bool:
        """``ip`` is one of our networks."""
        return ip is not None and any(ip in net for net in self.networks)

    def added(self, h: Received) -> bool:
        """``h`` was added by one of our servers."""
        return h.by in self.names or self.inside(h.by_ip)

    def __str__(self) -> str:
        return ", ".join([*sorted(self.names), *(str(n) for n in self.networks)])


def _handover(h: Received) -> bool:
    """An SMTP session from another host: not a local, filter or fetch hop."""
    return h.ip is not None and not h.local and not h.fetched


def _choose(headers: Sequence[Received], receiver: Receiver | None) -> int:
    """Index of the Received: header of the session to judge (module doc)."""
    if receiver is None:
        for i, h in enumerate(headers):
            if _handover(h):
                return i
        raise TraceError(
            "no client: no Received: header records an SMTP session from another host "
            "(only local, content-filter or mailbox-fetch hops, or none with an address)"
        )
    hits = [i for i, h in enumerate(headers) if receiver.added(h)]
    if not hits:
        raise TraceError(f"no Received: header was added by {receiver}")
    for h_i in range(hits[0], len(headers)):
        h = headers[h_i]
        if _handover(h) and not receiver.inside(h.ip):
            return h_i
        # walk past our own hops (filters, relays between our servers);
        # a hop by anyone else is the sender's side: stop there, so a header
        # forged further down to look like ours is never reached
        if not (receiver.added(h) or h.local or h.fetched or receiver.inside(h.ip)):
            break
    raise TraceError(
        f"no client: no Received: header by {receiver} records a session from another host"
    )


def _window(
    items: Sequence[tuple[str, str]],
    positions: Sequence[int],
    headers: Sequence[Received],
    i: int,
    receiver: Receiver | None,
    through_fetch: bool = False,
) -> tuple[list[tuple[str, str]], bool]:
    """The trace fields the chosen hop's server wrote: those between its
    Received: header and the first one above it added by another server
    (headers are prepended: a later server's sit higher, an earlier
    server's lower). ``True`` when no later server's hop is above it.
    ``through_fetch``: a mailbox fetch does not end it (fetchmail and its
    kind pass the envelope sender on as it was)."""
    chosen = headers[i]
    top = 0
    final = True
    for j in range(i - 1, -1, -1):
        h = headers[j]
        same = (
            h.local
            or (h.by is not None and h.by == chosen.by)
            or (receiver is not None and (receiver.added(h) or receiver.inside(h.ip)))
        )
        if (h.fetched and not through_fetch) or not (same or (h.fetched and through_fetch)):
            top, final = positions[j] + 1, False
            break
    return [(k, v) for k, v in items[top : positions[i]]], final


def read_trace(
    msg: email.message.Message, receiver: str | Sequence[str] | Receiver | None = None
) -> Trace:
    """The session ``msg``'s trace fields describe; :class:`TraceError` says
    why when they do not give one (no Received: by the receiver, no client
    address, no sender, no recipient). ``receiver``: our host names and
    networks (:class:`Receiver`, or ``--receiver`` values)."""
    items = [(k.lower(), str(v)) for k, v in msg.items()]
    positions = [n for n, (k, _) in enumerate(items) if k == "received"]
    if not positions:
        raise TraceError("no Received: header")
    headers = [parse_received(items[n][1]) for n in positions]
    ours = Receiver.of(receiver)
    i = _choose(headers, ours)
    rec = headers[i]
    where = f"Received[{i + 1}] (by {rec.by})"
    if rec.ip is None:
        raise TraceError(f"{where} names no client address")
    facts: dict[str, Fact] = {"client_ip": Fact(str(rec.ip), where)}
    if rec.helo:
        facts["helo"] = Fact(rec.helo, where)
    if rec.reverse:
        facts["reverse_name"] = Fact({"name": rec.reverse, "verified": rec.reverse_verified}, where)
    elif rec.no_name:
        facts["reverse_name"] = Fact({"name": None, "verified": False}, where)
    facts["tls"] = Fact(rec.tls, where)
    if rec.authenticated:
        facts["authenticated"] = Fact(rec.auth_user or True, where)

    # Only what this hop's server wrote: Return-Path:, Delivered-To: and
    # X-Original-To: are the final delivery agent's, so they describe the
    # envelope of the hop judged only when no later server's hop is above it
    window, final = _window(items, positions, headers, i, ours)
    sender_window, _ = _window(items, positions, headers, i, ours, through_fetch=True)
    above = f"at or above Received[{i + 1}]"

    def fields(name: str) -> list[str]:
        return [v for k, v in window if k == name]

    sender: str | None = None
    if return_path := [v for k, v in sender_window if k == "return-path"]:
        text = return_path[0].strip()
        sender = "" if _null_sender(text) else (_addresses([text]) or [text.strip("<>")])[0]
        facts["sender"] = Fact(sender, f"Return-Path ({above})")
    elif rec.envelope_from is not None:
        sender = "" if _null_sender(rec.envelope_from) else rec.envelope_from
        facts["sender"] = Fact(sender, f"{where} envelope-from")
    elif final and isinstance(msg, mailbox.mboxMessage):
        from_line = (msg.get_from() or "").split()
        # MAILER-DAEMON: what mailbox writers put when they do not know
        if from_line and from_line[0] != "MAILER-DAEMON" and "@" in from_line[0]:
            sender = from_line[0]
            facts["sender"] = Fact(sender, "mbox From_ line")
    if sender is None:
        raise TraceError(
            f"no envelope sender for {where}: no Return-Path: {above}, envelope-from "
            "or mbox From_ line"
        )

    recipients = _addresses(fields("x-original-to"))
    if recipients:
        facts["recipients"] = Fact(recipients, f"X-Original-To ({above})")
    elif rec.recipient and "@" in rec.recipient:
        recipients = [rec.recipient]
        facts["recipients"] = Fact(recipients, f"{where} for")
    elif recipients := _addresses(fields("delivered-to")):
        facts["recipients"] = Fact(recipients, f"Delivered-To ({above})")
    else:
        # To: and Cc: are what the author wrote, not the envelope
        raise TraceError(
            f"no envelope recipient for {where}: no for <...>, and no X-Original-To: or "
            f"Delivered-To: {above}"
        )

    # The reverse name the receiver saw, as DNS answers the core can use.
    dns: dict[DnsQuery, DnsResult] = {}
    ptr = DnsQuery(str(rec.ip), RType.PTR)
    if rec.reverse and rec.reverse_verified is not None:
        fwd = DnsQuery(rec.reverse, RType.A if rec.ip.version == 4 else RType.AAAA)
        dns[ptr] = DnsResult.answer(rec.reverse)
        dns[fwd] = (
            DnsResult.answer(str(rec.ip)) if rec.reverse_verified else DnsResult(DnsOutcome.NODATA)
        )
    elif rec.no_name:
        # "unknown [IP]": the server found no verified name; the checks
        # that need one get "no name", as they did then
        dns[ptr] = DnsResult(DnsOutcome.NXDOMAIN)
    proto = (rec.protocol or "").upper()
    esmtp = not proto.startswith("SMTP")
    auth_user = (rec.auth_user or "unknown") if rec.authenticated else None
    return Trace(
        client_ip=rec.ip,
        helo=rec.helo,
        sender=sender,
        recipients=tuple(recipients),
        tls=rec.tls,
        esmtp=esmtp,
        auth_user=auth_user,
        received=rec,
        facts=facts,
        dns=dns,
    )


# ---------------------------------------------------------------------------
# Judging


@attrs.frozen
class RecipientVerdict:
    """The verdict for one recipient, and the DNS questions nobody answered."""

    recipient: str
    stage: Stage
    verdict: Verdict
    missing_dns: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        reply = v.reply
        out: dict[str, Any] = {"recipient": self.recipient, "action": v.action.value}
        if reply is None:  # a plain acceptance: the server's usual reply
            out.update(code=250, enhanced="2.1.5" if self.stage is Stage.RCPT else "2.1.0")
            out["text"] = "Ok"
        else:
            out.update(code=reply.code, enhanced=reply.enhanced, text=reply.text)
        if v.rule is not None:
            out["rule"] = v.rule
        if self.stage is not Stage.RCPT:
            out["stage"] = self.stage.value
        if v.evidence:
            out["evidence"] = [str(e) for e in v.evidence]
        if self.missing_dns:
            out["missing_dns"] = list(self.missing_dns)
        if v.observed:
            out["observed"] = [f"{o.rule}: {o.reply or o.action.value}" for o in v.observed]
        return out


@attrs.frozen
class MessageVerdict:
    """One message: its verdicts, or the reason its trace could not be read."""

    index: int
    message_id: str | None
    trace: Trace | None = None
    recipients: tuple[RecipientVerdict, ...] = ()
    reason: str | None = None

    @property
    def verdict(self) -> str:
        """``accept``, ``reject``, ``defer``, ``discard``..., ``mixed`` when the
        recipients differ, ``unreadable`` without a usable trace."""
        if self.reason is not None:
            return "unreadable"
        actions = {r.verdict.action for r in self.recipients}
        if len(actions) == 1:
            (action,) = actions
            return "defer" if action is Action.DEFER_IF_PERMIT else action.value
        return "mixed"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "message": self.index,
            "message_id": self.message_id,
            "verdict": self.verdict,
        }
        if self.reason is not None:
            out["reason"] = self.reason
            return out
        assert self.trace is not None
        t = self.trace
        out["recipients"] = [r.to_json() for r in self.recipients]
        out["session"] = {
            "client_ip": str(t.client_ip),
            "helo": t.helo,
            "sender": t.sender,
            "tls": t.tls,
            "auth_user": t.auth_user,
        }
        out["derived"] = {k: f.to_json() for k, f in t.facts.items()}
        if t.dns:
            out["dns_from_trace"] = {str(q): str(r) for q, r in t.dns.items()}
        return out


def _judge(
    policy: Policy, session: Session, envelope: Envelope, zone: StaticZone | None, memo: Memo
) -> tuple[Session, Verdict, tuple[str, ...]]:
    if zone is None:
        verdict = evaluate(policy, session, envelope, memo)
    else:
        session, verdict = decide_with(
            policy, session, envelope, zone.lookup_all, memo, rounds=_DNS_ROUNDS
        )
    missing = tuple(
        e.value for e in verdict.evidence if e.kind == "dns" and e.matched == "not supplied"
    )
    return session, verdict, missing


def judge_message(
    policy: Policy, trace: Trace, zone: StaticZone | None = None
) -> list[RecipientVerdict]:
    """The MAIL verdict, then one RCPT verdict per recipient, as the
    receiving server would have judged them (each refused recipient is left
    out of the accepted ones, as in a session)."""
    session = trace.session()
    memo = Memo()  # one message is one session
    session, mail, missing = _judge(
        policy, session, Envelope(Stage.MAIL, sender=trace.sender), zone, memo
    )
    if mail.action.refuses:
        return [RecipientVerdict(r, Stage.MAIL, mail, missing) for r in trace.recipients]
    out: list[RecipientVerdict] = []
    accepted: list[str] = []
    for rcpt in trace.recipients:
        envelope = Envelope(
            Stage.RCPT, sender=trace.sender, recipient=rcpt, recipients=tuple(accepted)
        )
        session, verdict, missing = _judge(policy, session, envelope, zone, memo)
        out.append(RecipientVerdict(rcpt, Stage.RCPT, verdict, missing))
        if not verdict.action.refuses:
            accepted.append(rcpt)
    return out


def open_mbox(path: str | os.PathLike[str]) -> mailbox.mbox:
    """Open an mbox file for reading; :class:`MboxError` if it is not one."""
    if not os.path.isfile(path):
        raise MboxError(f"{os.fspath(path)}: no such file")
    try:
        return mailbox.mbox(path, create=False)
    except (OSError, mailbox.Error) as e:
        raise MboxError(f"{os.fspath(path)}: cannot read: {e}") from e


def _is_mbox(head: bytes) -> bool:
    return head.lstrip(b"\r\n").startswith(b"From ")


def _read_file(path: str, head: bytes) -> Iterator[email.message.Message]:
    """The messages of one file, an mbox or one message (.eml); ``head`` is
    the whole content of a gzipped file, the first bytes of another."""
    gz = path.endswith(".gz")
    if not head.strip():
        return
    if not _is_mbox(head[:4096]):
        yield email.message_from_bytes(head if gz else _load(path, whole=True))
        return
    if not gz:
        box = mailbox.mbox(path, create=False)
        yield from box.itervalues()
        box.close()
        return
    # mailbox.mbox reads a path: a decompressed mbox goes through a temporary file
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "mbox")
        with open(plain, "wb") as f:
            f.write(head)
        box = mailbox.mbox(plain, create=False)
        yield from box.itervalues()
        box.close()


def read_messages(
    path: str | os.PathLike[str],
) -> tuple[str, Iterator[email.message.Message]]:
    """The messages at ``path`` and what it is: an mbox file, a Maildir
    folder (``cur/`` and ``new/``), a folder of ``.eml`` files, one message
    file, each possibly gzipped (``.gz``). :class:`MboxError` when it cannot
    be read; the caller says so when it holds no message."""
    name = os.fspath(path)
    if os.path.isdir(name):
        if os.path.isdir(os.path.join(name, "cur")) or os.path.isdir(os.path.join(name, "new")):
            try:
                md = mailbox.Maildir(name, factory=None, create=False)
                keys = sorted(md.keys())  # Maildir order is arbitrary: file names are not
            except OSError as e:
                raise MboxError(f"{name}: cannot read: {e.strerror or e}") from e
            return "Maildir folder", (md[k] for k in keys)
        files = sorted(
            os.path.join(name, f)
            for f in os.listdir(name)
            if f.endswith((".eml", ".eml.gz", ".mbox", ".mbox.gz"))
        )
        return "folder", (m for f in files for m in _read_file(f, _load(f)))
    if not os.path.exists(name):
        raise MboxError(f"{name}: no such file or folder")
    data = _load(name)
    kind = "mbox" if _is_mbox(data[:4096]) else "message file"
    return (f"gzipped {kind}" if name.endswith(".gz") else kind), _read_file(name, data)


def _load(path: str, *, whole: bool = False) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            # the head tells an mbox from a message; mailbox reads the rest
            return f.read() if whole else f.read(4096)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise MboxError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e


def zone_from_file(path: str | os.PathLike[str]) -> StaticZone:
    """A static zone (a replay case's ``dns`` object, docs/replay-format.md) from a JSON file."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return StaticZone.from_mapping(json.load(f), source=source)
    except OSError as e:
        raise MboxError(f"{source}: cannot read: {e.strerror or e}") from e
    except ValueError as e:  # bad JSON, or ZoneError
        if isinstance(e, ZoneError):
            raise MboxError(str(e)) from e
        raise MboxError(f"{source}: bad JSON: {e}") from e


def judge_mbox(
    box: mailbox.mbox | Iterable[email.message.Message],
    policy: Policy,
    *,
    zone: StaticZone | None = None,
    receiver: str | Sequence[str] | Receiver | None = None,
) -> Iterator[MessageVerdict]:
    """A :class:`MessageVerdict` per message, in order (numbered from 1); a
    message whose trace cannot be read has its ``reason`` and the rest go on.
    ``receiver``: our host names and networks (``--receiver``)."""
    messages = box.itervalues() if isinstance(box, mailbox.mbox) else iter(box)
    receiver = Receiver.of(receiver)
    for n, msg in enumerate(messages, 1):
        message_id = msg.get("Message-ID")
        message_id = str(message_id).strip() if message_id is not None else None
        try:
            trace = read_trace(msg, receiver)
        except TraceError as e:
            yield MessageVerdict(n, message_id, reason=e.reason)
            continue
        except Exception as e:  # a header the email package chokes on
            yield MessageVerdict(n, message_id, reason=f"unparsable headers: {e}")
            continue
        yield MessageVerdict(n, message_id, trace, tuple(judge_message(policy, trace, zone)))


def diff_verdicts(before: MessageVerdict, after: MessageVerdict) -> list[dict[str, Any]]:
    """The recipients judged differently (action, code, enhanced code, rule)."""

    def key(r: RecipientVerdict) -> tuple[Any, ...]:
        j = r.to_json()
        return (j["action"], j["code"], j.get("enhanced"), j.get("rule"))

    def text(r: RecipientVerdict) -> str:
        j = r.to_json()
        enhanced = f"{j['enhanced']} " if j.get("enhanced") else ""
        rule = f"  [{j['rule']}]" if j.get("rule") else ""
        return f"{j['code']} {enhanced}{j['text']}{rule}"

    out: list[dict[str, Any]] = []
    for b, a in zip(before.recipients, after.recipients, strict=True):
        if key(b) != key(a):
            out.append(
                {
                    "message": before.index,
                    "message_id": before.message_id,
                    "recipient": b.recipient,
                    "before": b.to_json(),
                    "after": a.to_json(),
                    "before_text": text(b),
                    "after_text": text(a),
                    "rules": list(dict.fromkeys(x for x in (b.verdict.rule, a.verdict.rule) if x)),
                }
            )
    return out
