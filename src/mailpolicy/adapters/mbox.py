"""Judge the messages of an mbox file from their trace fields (``replay --mbox``).

Theory of operation
-------------------
A delivered message carries a trace of the SMTP session that brought it:
the ``Received:`` header our server added names the client's address, its
HELO name and, for most servers, its verified reverse name; ``Return-Path:``
holds the envelope sender; ``X-Original-To:`` or ``Delivered-To:`` hold the
envelope recipients (``To:``/``Cc:`` are a last resort: they are what the
author wrote, not the envelope). :func:`read_trace` rebuilds those facts and
notes where each came from; :func:`judge_message` asks the pure core
(:meth:`Policy.lookups <mailpolicy.policy.Policy.lookups>` and
:meth:`Policy.evaluate <mailpolicy.policy.Policy.evaluate>`) for the MAIL
verdict and then one RCPT verdict per recipient, as the server would have.

**Which Received: header.** Headers are added on top, so the receiving
server's is found from the top: the first header whose ``by`` host is
``receiver`` (without ``receiver``: the ``by`` host of the topmost header
that has one), then, while the next one down is also by the receiver, that
one: a message that went through a local content filter and back is judged
as it first came in.

**Formats.** ``from HELO (NAME [IP])`` (Postfix, Sendmail, most others;
``NAME`` is ``unknown`` without one, Sendmail adds ``(may be forged)``
when it is not confirmed), ``from NAME ([IP] helo=HELO)`` and
``from [IP] (helo=HELO)`` (Exim, whose first name is the verified host
name), ``from HELO (IP)`` (Exchange), ``from NAME (HELO HELO) (IP)``
(qmail), with ``[IPv6:...]`` or bare IPv6 addresses. ``with ESMTPS`` or
a TLS comment means TLS, ``...A`` (``ESMTPSA``) an authenticated client.

**DNS.** The answers the verdicts need come first from the trace itself: a
confirmed reverse name in the header gives the client's PTR and forward
records (the facts the receiving server saw), a name marked as forged a PTR
whose forward lookup does not lead back. Other questions are answered by
``zone`` (``--dns ZONE.json``). Without a zone they stay unanswered, on
purpose: a rule that needs one gives the core's ``451 4.3.0`` verdict and
the line lists the questions under ``missing_dns``, so nothing is judged on
a guess (every-name-is-NXDOMAIN would refuse good mail under
``reject_unknown_*``; today's live DNS is not what the server saw then).
"""

from __future__ import annotations

import email.message
import email.utils
import ipaddress
import json
import mailbox
import os
import re
from collections.abc import Iterator, Mapping, Sequence
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
    "RecipientVerdict",
    "Trace",
    "TraceError",
    "diff_verdicts",
    "judge_mbox",
    "judge_message",
    "open_mbox",
    "parse_received",
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


_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")
_BRACKET_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\](?::\d+)?", re.IGNORECASE)
_ENVELOPE_FROM = re.compile(r"envelope-from\s+<([^>]*)>", re.IGNORECASE)
_AUTH_SENDER = re.compile(r"Authenticated sender:\s*([^\s)]+)", re.IGNORECASE)
_KEYWORDS = frozenset({"from", "by", "via", "with", "id", "for"})


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip().rstrip("."))
    except ValueError:
        return None


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


def parse_received(value: str) -> Received:
    """Parse one ``Received:`` header value (folded or not)."""
    text = " ".join(value.split())
    head, _, _date = text.rpartition(";")
    if not head:  # no date: the whole value is clauses
        head = text
    items = _items(head)
    clauses = _clauses(items)
    comments = [t for k, t in items if k == "comment"]
    everything = " ".join(t for _, t in items)
    frm = clauses.get("from", [])
    words = [t for k, t in frm if k == "word"]
    notes = [t for k, t in frm if k == "comment"]
    first = words[0] if words else None
    by_words = [t for k, t in clauses.get("by", []) if k == "word"]
    with_words = [t for k, t in clauses.get("with", []) if k == "word"]
    for_words = [t for k, t in clauses.get("for", []) if k == "word"]

    # the client address: [IP] anywhere in the from clause, else a bare IP comment
    ip: IPAddress | None = None
    reverse: str | None = None
    verified: bool | None = None
    # "(NAME [IP])" first: "from [IP] (NAME [IP])" has the reverse name in the comment
    for n, note in enumerate([*notes, first or ""]):
        m = _BRACKET_IP.search(note)
        if m and _ip(m.group(1)) is not None:
            ip = _ip(m.group(1))
            before = note[: m.start()].split()
            if n < len(notes) and before:
                reverse = before[-1]
            break
    if ip is None:
        for note in notes:
            token = note.split()[0] if note.split() else ""
            if _ip(token) is not None:
                ip = _ip(token)
                break
    exim = "Exim" in everything or any("helo=" in n for n in notes)
    helo_m = next((re.search(r"helo=(\S+)", n) for n in notes if "helo=" in n), None)
    qmail_m = next((re.match(r"HELO\s+(\S+)", n) for n in notes if n.startswith("HELO ")), None)
    first_is_ip = first is not None and _BRACKET_IP.fullmatch(first) is not None
    style = "rfc5321"
    if qmail_m is not None:
        # qmail: from NAME (HELO helo) (IP): NAME is the reverse name or "unknown"
        style, helo, reverse = "qmail", qmail_m.group(1), first
        verified = None
    elif exim:
        # Exim: the first name is the verified host name, HELO given only if different
        style = "exim"
        helo = helo_m.group(1) if helo_m else first
        if first is not None and not first_is_ip:
            reverse, verified = first, True
        else:
            reverse = None
    else:
        helo = first
        if reverse is not None:
            if reverse.lower() == "unknown":
                reverse = None
            else:
                forged = any("may be forged" in n for n in notes)
                verified = not forged
    if reverse is not None and reverse.lower() == "unknown":
        reverse, verified = None, None
    protocol = with_words[0] if with_words else None
    proto = (protocol or "").upper()
    tls = (proto.endswith(("S", "SA")) and proto.startswith(("ESMTP", "SMTP", "LMTP"))) or any(
        re.search(r"\bTLS|version=TLS|using TLS", c) for c in comments
    )
    authenticated = proto.startswith(("ESMTP", "SMTP", "LMTP")) and proto.endswith("A")
    auth_m = _AUTH_SENDER.search(everything)
    if auth_m:
        authenticated = True
    env_m = _ENVELOPE_FROM.search(everything)
    recipient = for_words[0].strip("<>;") if for_words else None
    return Received(
        by=_name(by_words[0]) if by_words else None,
        from_name=first,
        helo=helo,
        ip=ip,
        reverse=_name(reverse),
        reverse_verified=verified,
        protocol=protocol,
        tls=bool(tls),
        authenticated=authenticated,
        auth_user=auth_m.group(1) if auth_m else None,
        recipient=recipient or None,
        envelope_from=env_m.group(1) if env_m else None,
        style=style,
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


def _header_values(msg: email.message.Message, name: str) -> list[str]:
    return [str(v) for v in (msg.get_all(name) or [])]


def _choose(headers: Sequence[Received], receiver: str | None) -> int:
    """Index of the Received: header our server added (see the module doc)."""
    want = _name(receiver)
    if want is None:
        tops = [i for i, h in enumerate(headers) if h.by]
        if not tops:
            raise TraceError("no Received: header names the receiving server (by ...)")
        want = headers[tops[0]].by
    hits = [i for i, h in enumerate(headers) if h.by == want]
    if not hits:
        raise TraceError(f"no Received: header was added by {want}")
    run = [hits[0]]
    while run[-1] + 1 < len(headers) and headers[run[-1] + 1].by == want:
        run.append(run[-1] + 1)
    # Within the receiver's own hops, the first (from the top) with a client
    # address that is not loopback: local hops ("from userid 0", a content
    # filter reinjecting from 127.0.0.1) are skipped, and a header forged
    # further down to look like ours is never reached.
    for i in run:
        ip = headers[i].ip
        if ip is not None and not ip.is_loopback:
            return i
    return next((i for i in run if headers[i].ip is not None), run[0])


def read_trace(msg: email.message.Message, receiver: str | None = None) -> Trace:
    """The session ``msg``'s trace fields describe; :class:`TraceError` says
    why when they do not give one (no Received: by the receiver, no client
    address, no sender, no recipient)."""
    raw = _header_values(msg, "Received")
    if not raw:
        raise TraceError("no Received: header")
    headers = [parse_received(v) for v in raw]
    i = _choose(headers, receiver)
    rec = headers[i]
    where = f"Received[{i + 1}] (by {rec.by})"
    if rec.ip is None:
        raise TraceError(f"{where} names no client address")
    facts: dict[str, Fact] = {"client_ip": Fact(str(rec.ip), where)}
    if rec.helo:
        facts["helo"] = Fact(rec.helo, where)
    if rec.reverse:
        facts["reverse_name"] = Fact({"name": rec.reverse, "verified": rec.reverse_verified}, where)
    facts["tls"] = Fact(rec.tls, where)
    if rec.authenticated:
        facts["authenticated"] = Fact(rec.auth_user or True, where)

    sender: str | None = None
    return_path = _header_values(msg, "Return-Path")
    if return_path:
        text = return_path[0].strip()
        sender = "" if text in ("<>", "") else (_addresses([text]) or [text.strip("<>")])[0]
        facts["sender"] = Fact(sender, "Return-Path")
    elif rec.envelope_from is not None:
        sender = rec.envelope_from
        facts["sender"] = Fact(sender, f"{where} envelope-from")
    elif isinstance(msg, mailbox.mboxMessage):
        from_line = (msg.get_from() or "").split()
        if from_line and from_line[0] != "MAILER-DAEMON" and "@" in from_line[0]:
            sender = from_line[0]
            facts["sender"] = Fact(sender, "mbox From_ line")
    if sender is None:
        raise TraceError("no envelope sender: no Return-Path:, envelope-from or mbox From_ line")

    recipients: list[str] = []
    for name in ("X-Original-To", "Delivered-To"):
        recipients = _addresses(_header_values(msg, name))
        if recipients:
            facts["recipients"] = Fact(recipients, name)
            break
    if not recipients and rec.recipient and "@" in rec.recipient:
        recipients = [rec.recipient]
        facts["recipients"] = Fact(recipients, f"{where} for")
    if not recipients:
        recipients = _addresses(_header_values(msg, "To") + _header_values(msg, "Cc"))
        if recipients:
            facts["recipients"] = Fact(recipients, "To/Cc")
    if not recipients:
        raise TraceError("no recipient: no X-Original-To:, Delivered-To:, Received for, To: or Cc:")

    # The reverse name the receiver saw, as DNS answers the core can use.
    dns: dict[DnsQuery, DnsResult] = {}
    if rec.reverse and rec.reverse_verified is not None:
        ptr = DnsQuery(str(rec.ip), RType.PTR)
        fwd = DnsQuery(rec.reverse, RType.A if rec.ip.version == 4 else RType.AAAA)
        dns[ptr] = DnsResult.answer(rec.reverse)
        dns[fwd] = (
            DnsResult.answer(str(rec.ip)) if rec.reverse_verified else DnsResult(DnsOutcome.NODATA)
        )
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


def zone_from_file(path: str | os.PathLike[str]) -> StaticZone:
    """A static zone (REPLAY.md's ``dns`` object) from a JSON file."""
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
    box: mailbox.mbox | Sequence[email.message.Message],
    policy: Policy,
    *,
    zone: StaticZone | None = None,
    receiver: str | None = None,
) -> Iterator[MessageVerdict]:
    """A :class:`MessageVerdict` per message, in order (numbered from 1); a
    message whose trace cannot be read has its ``reason`` and the rest go on."""
    messages = box.itervalues() if isinstance(box, mailbox.mbox) else iter(box)
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
