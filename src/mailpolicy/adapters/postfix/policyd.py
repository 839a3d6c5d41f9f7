"""A server for Postfix's policy delegation protocol (``check_policy_service``).

Theory of operation
-------------------
Postfix's smtpd sends a request: ``name=value`` lines, an empty line ends it.
We answer ``action=...`` and an empty line. One connection carries many
requests, one after the other; Postfix keeps a few connections open.

Each request becomes the core's :class:`~mailpolicy.model.Session` and
:class:`~mailpolicy.model.Envelope` (:func:`session_of`, :func:`envelope_of`)
and is judged by :func:`mailpolicy.adapters.judge.judge`, the driver that
``mailpolicy serve`` uses. The verdict becomes the action that makes Postfix
give the reply the native configuration gives (:func:`postfix_action`):

* accept: ``DUNNO`` (Postfix goes on with its own restrictions);
* refusal: ``NNN X.Y.Z text``, the verdict's code and enhanced code;
  ``DEFER_IF_PERMIT X.Y.Z text`` for a deferral that only holds if nothing
  refuses (Postfix answers it with ``access_map_defer_code``, 450);
* discard: ``DISCARD text``.

Postfix decorates an access result's text as ``<NAME>: CLASS rejected: TEXT``
and maps an address-specific enhanced code (``X.1.Y``) to the class it was
returned in (``smtpd_dsn_fix``: a sender's ``4.1.8`` becomes ``4.1.2`` in the
recipient restrictions). So ``mailpolicy export postfix`` asks the server from
two places at RCPT, with ``policy_context=sender`` in
``smtpd_sender_restrictions`` and ``policy_context=recipient`` in
``smtpd_recipient_restrictions``: the RCPT is judged once, at the first of the
two requests, and a refusal of the sender is given in the sender context, any
other in the recipient context. With the decoration's prefix taken off our text
Postfix then gives the native reply, code, enhanced code and text.

State per transaction (Postfix's ``instance`` attribute, with the client
address): the connection's :class:`~mailpolicy.Memo`, the recipients accepted
so far, and whether the message was counted. Counters
(:meth:`~mailpolicy.Policy.counters`) go to a
:class:`~mailpolicy.adapters.state.StateStore` as ``mailpolicy serve`` counts
them: a message once per instance, a recipient per RCPT.

A malformed request (no ``request=smtpd_access_policy``, a bad client
address, an unknown state, a line without ``=``) is logged in one line and
answered ``DEFER_IF_PERMIT``: never a crash, never an acceptance. A line
longer than :data:`MAX_LINE` or a request with more than :data:`MAX_ATTRIBUTES`
lines closes that connection only.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from ...evaluate import Memo, decide
from ...model import Action, Counters, Envelope, MessageFacts, Session, Stage, Verdict
from ...policy import Policy
from ..dns import Resolver
from ..judge import TEMP_FAILURE, judge
from ..state import StateStore, StateStoreError

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_LINE",
    "MalformedRequest",
    "PolicyServer",
    "PolicyService",
    "envelope_of",
    "postfix_action",
    "session_of",
]

log = logging.getLogger("mailpolicy.policyd")

#: the longest attribute line accepted (Postfix's own lines are far shorter;
#: a certificate subject is the longest); a longer one closes the connection
MAX_LINE: Final = 8192
#: attribute lines in one request before the connection is closed (Postfix
#: 3.7 sends about 30)
MAX_ATTRIBUTES: Final = 256
#: transactions remembered (memo, recipients, counted message), oldest dropped
MAX_INSTANCES: Final = 10_000

#: Postfix's ``protocol_state`` -> the stage judged
STATES: Final[Mapping[str, Stage]] = {
    "CONNECT": Stage.CONNECT,
    "EHLO": Stage.HELO,
    "HELO": Stage.HELO,
    "MAIL": Stage.MAIL,
    "RCPT": Stage.RCPT,
    "DATA": Stage.DATA,
    "END-OF-MESSAGE": Stage.END_OF_DATA,
    "VRFY": Stage.VRFY,
}
#: states Postfix may ask about that no rule of ours judges
PASS_STATES: Final = frozenset(("ETRN", "BDAT"))

#: ``policy_context`` -> the restriction class Postfix names in its replies
CLASSES: Final[Mapping[str, str]] = {
    "client": "Client host",
    "helo": "Helo command",
    "sender": "Sender address",
    "recipient": "Recipient address",
}

_DEFER_IF_PERMIT_CODE: Final = 450
#: the action for a request that cannot be judged
MALFORMED: Final = "DEFER_IF_PERMIT 4.3.0 Malformed policy request"


class _NeedsAsync(Exception):
    """Raised in a synchronous attempt that would have to wait (DNS, a store)."""


class MalformedRequest(ValueError):
    """A request that cannot be judged; the message says why."""


_NO_COUNTERS: Final = Counters()


def session_of(attributes: Mapping[str, str], counters: Counters = _NO_COUNTERS) -> Session:
    """The core's session from a request's attributes."""
    if attributes.get("request") != "smtpd_access_policy":
        raise MalformedRequest(
            f"request={attributes.get('request', '')!r}, not smtpd_access_policy"
        )
    address = attributes.get("client_address", "")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise MalformedRequest(f"client_address={address!r} is no IP address") from None
    return Session(
        ip,
        helo=attributes.get("helo_name") or None,
        esmtp=attributes.get("protocol_name", "").upper() == "ESMTP",
        tls=bool(attributes.get("encryption_protocol")),
        auth_user=attributes.get("sasl_username") or None,
        counters=counters,
    )


def _size(attributes: Mapping[str, str]) -> int:
    text = attributes.get("size", "0") or "0"
    if not text.isdigit():
        raise MalformedRequest(f"size={text!r} is no number")
    return int(text)


def envelope_of(attributes: Mapping[str, str], recipients: tuple[str, ...] = ()) -> Envelope | None:
    """The core's envelope from a request's attributes, or ``None`` for a
    state no rule judges (ETRN). ``recipients`` are those accepted so far."""
    state = attributes.get("protocol_state", "").upper()
    if state in PASS_STATES:
        return None
    stage = STATES.get(state)
    if stage is None:
        raise MalformedRequest(f"protocol_state={state!r} is unknown")
    sender = attributes.get("sender")
    if stage in (Stage.CONNECT, Stage.HELO, Stage.VRFY):
        sender = None
    elif sender is None:
        raise MalformedRequest(f"protocol_state={state} without a sender attribute")
    size = _size(attributes)
    if stage is Stage.RCPT:
        recipient = attributes.get("recipient")
        if not recipient:
            raise MalformedRequest("protocol_state=RCPT without a recipient")
        return Envelope(stage, sender, recipient, recipients, declared_size=size or None)
    if stage is Stage.END_OF_DATA:
        return Envelope(stage, sender, recipients=recipients, message=MessageFacts(size))
    if stage is Stage.VRFY:
        return Envelope(stage, recipient=attributes.get("recipient") or None)
    return Envelope(stage, sender, recipients=recipients, declared_size=size or None)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def postfix_action(verdict: Verdict, reply_name: str = "", reply_class: str = "") -> str:
    """The action that makes Postfix answer as ``verdict`` says.

    ``reply_name``/``reply_class`` are what Postfix will put before the text
    (``<NAME>: CLASS rejected: ``); when our text starts with exactly that,
    it is left out so that the reply is not said twice.
    """
    if verdict.action is Action.ACCEPT:
        return "DUNNO"
    reply = verdict.reply
    if verdict.action is Action.DISCARD:
        return _one_line(f"DISCARD {reply.text if reply else verdict.rule or ''}")
    if reply is None:  # a refusal always has a reply; never accept by accident
        reply = TEMP_FAILURE
    text = reply.text
    if reply_class:
        prefix = f"<{reply_name}>: {reply_class} rejected: "
        if text.startswith(prefix):
            text = text[len(prefix) :]
    dsn = f"{reply.enhanced} " if reply.enhanced else ""
    if verdict.action is Action.DEFER_IF_PERMIT and reply.code == _DEFER_IF_PERMIT_CODE:
        return _one_line(f"DEFER_IF_PERMIT {dsn}{text}")
    return _one_line(f"{reply.code} {dsn}{text}")


@attrs.define
class _Transaction:
    """What a transaction (one ``instance``) carries between requests."""

    memo: Memo = attrs.Factory(Memo)
    recipients: list[str] = attrs.Factory(list)
    #: the MAIL stage's verdict, judged with the message counted, once
    mail: Verdict | None = None
    #: the last RCPT judged, and the contexts that have seen it
    last: tuple[str, Verdict] | None = None
    seen: set[str] = attrs.Factory(set)
    #: an earlier context already gave the last RCPT's verdict to Postfix
    given: bool = False


class PolicyService:
    """Answers requests: attributes in, the action out (no sockets here)."""

    def __init__(
        self,
        policy: Policy,
        resolver: Resolver,
        store: StateStore,
        *,
        clock: Callable[[], float] = time.time,
        log_decisions: bool = True,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.store = store
        self._clock = clock
        self.log_decisions = log_decisions
        self._transactions: collections.OrderedDict[tuple[str, str], _Transaction] = (
            collections.OrderedDict()
        )
        self._window = policy.settings.security.connection_policy.rate_window_seconds

    def _now(self) -> float:
        return float(self._clock())

    def _transaction(self, attributes: Mapping[str, str]) -> _Transaction:
        key = (attributes.get("instance", ""), attributes.get("client_address", ""))
        found = self._transactions.get(key)
        if found is None:
            found = self._transactions[key] = _Transaction()
            if len(self._transactions) > MAX_INSTANCES:
                self._transactions.popitem(last=False)
        return found

    async def _counters(self, stage: Stage, client: str, tx: _Transaction) -> Counters:
        wanted = self.policy.counters(stage)
        if not wanted:
            return Counters()
        now, window = self._now(), self._window
        values: dict[str, int] = {}
        if "connection_rate" in wanted or "connections" in wanted:
            # Postfix tells no disconnect: the concurrency limit is anvil's
            # (the export sets smtpd_client_connection_count_limit)
            counts = await self.store.connection_opened(client, now, window)
            await self.store.connection_closed(client)
            values["connection_rate"] = counts.rate
            values["connections"] = 1
        if "message_rate" in wanted:
            values["message_rate"] = await self.store.hit("message", client, now, window)
        if "recipient_rate" in wanted:
            values["recipient_rate"] = await self.store.hit("recipient", client, now, window)
        return Counters(**values)

    async def _judge(
        self, session: Session, envelope: Envelope, tx: _Transaction, sync: bool = False
    ) -> Verdict:
        # most requests need no DNS and no counter: no coroutine round trip
        if not self.policy.counters(envelope.stage):
            found = decide(self.policy, session, envelope, tx.memo)
            if isinstance(found, Verdict):
                return found
        if sync:
            raise _NeedsAsync
        client = str(session.client_ip)
        try:
            counters = await self._counters(envelope.stage, client, tx)
        except StateStoreError as e:
            log.warning("state store: %s", e)
            return Verdict(Action.DEFER, TEMP_FAILURE, "internal.state")
        if counters != Counters():
            session = attrs.evolve(session, counters=counters)
        return (await judge(self.policy, session, envelope, self.resolver, tx.memo))[1]

    async def _rcpt(
        self, session: Session, envelope: Envelope, tx: _Transaction, context: str, sync: bool
    ) -> Verdict:
        recipient = envelope.recipient or ""
        if tx.last is not None and tx.last[0] == recipient and context not in tx.seen:
            tx.seen.add(context)
            return tx.last[1]
        if tx.mail is None:
            # The message is counted (and MAIL-stage rules judged) once per
            # transaction, at its first request: with smtpd_delay_reject the
            # first request Postfix sends is at RCPT.
            mail = Envelope(Stage.MAIL, envelope.sender, declared_size=envelope.declared_size)
            tx.mail = await self._judge(session, mail, tx, sync)
        if tx.mail.action.refuses:
            verdict = tx.mail
        else:
            verdict = await self._judge(session, envelope, tx, sync)
        if verdict.accepted:
            tx.recipients.append(recipient)
        tx.last = (recipient, verdict)
        tx.seen = {context}
        tx.given = False
        return verdict

    async def answer(self, attributes: Mapping[str, str]) -> str:
        """The action for one request (without ``action=``)."""
        return await self._answer(attributes, False)

    def answer_now(self, attributes: Mapping[str, str]) -> str | None:
        """The action, when it needs no DNS answer and no counter (most
        requests); ``None`` when it does: then ``await answer()``. Nothing
        is changed by an attempt that gives ``None``."""
        coro = self._answer(attributes, True)
        try:
            coro.send(None)
        except StopIteration as done:
            return str(done.value)
        except _NeedsAsync:
            return None
        coro.close()  # unreachable: nothing on the synchronous path waits
        return None

    async def _answer(self, attributes: Mapping[str, str], sync: bool) -> str:
        try:
            session = session_of(attributes)
            tx = self._transaction(attributes)
            envelope = envelope_of(attributes, tuple(tx.recipients))
        except (MalformedRequest, ValueError) as e:
            log.warning("malformed request: %s", e)
            return MALFORMED
        if envelope is None:
            return "DUNNO"
        context = attributes.get("policy_context", "")
        if envelope.stage is Stage.RCPT:
            verdict = await self._rcpt(session, envelope, tx, context, sync)
        elif envelope.stage is Stage.MAIL:
            if tx.mail is None:
                tx.mail = await self._judge(session, envelope, tx, sync)
            verdict = tx.mail
        else:
            verdict = await self._judge(session, envelope, tx, sync)
        reply_class = CLASSES.get(context, "")
        if envelope.stage is Stage.RCPT and tx.given:
            action = "DUNNO"  # said once (a DEFER_IF_PERMIT Postfix carries on with)
        else:
            action = self._action(verdict, attributes, context, reply_class)
            if envelope.stage is Stage.RCPT and action != "DUNNO":
                tx.given = True
        if self.log_decisions and log.isEnabledFor(logging.INFO):
            self._log(attributes, envelope, verdict, action)
        return action

    @staticmethod
    def _action(
        verdict: Verdict, attributes: Mapping[str, str], context: str, reply_class: str
    ) -> str:
        if context in ("client", "helo", "sender"):
            # an early context answers only its own class's refusals; the
            # recipient context (asked last) gives everything else
            reply = verdict.reply
            if not verdict.action.refuses or reply is None:
                return "DUNNO"
            if f"{reply_class} rejected:" not in reply.text:
                return "DUNNO"
        if context == "sender":
            name = attributes.get("sender", "")
        elif context == "client":
            name = f"{attributes.get('client_name', 'unknown')}[{attributes.get('client_address')}]"
        elif context == "helo":
            name = attributes.get("helo_name", "")
        else:
            name = attributes.get("recipient", "")
            reply_class = reply_class or CLASSES["recipient"] if name else ""
        return postfix_action(verdict, name, reply_class)

    def _log(
        self, attributes: Mapping[str, str], envelope: Envelope, verdict: Verdict, action: str
    ) -> None:
        decision = {
            "instance": attributes.get("instance", ""),
            "client": attributes.get("client_address", ""),
            "stage": envelope.stage.value,
            "context": attributes.get("policy_context", ""),
            "sender": envelope.sender,
            "recipient": envelope.recipient,
            "verdict": verdict.action.value,
            "rule": verdict.rule,
            "reply": str(verdict.reply) if verdict.reply else None,
            "evidence": [str(e) for e in verdict.evidence],
            "postfix_action": action,
        }
        log.info(
            "%s %s %s action=%s %s",
            decision["instance"],
            decision["client"],
            envelope.stage.value,
            action,
            verdict.explain(),
            extra={"decision": decision},
        )


def parse_request(block: bytes) -> dict[str, str]:
    """Attributes of one request (its lines without the empty one).

    Raises :class:`MalformedRequest` for a line without ``=``. Values are
    UTF-8 (Postfix passes SMTPUTF8 addresses as they came); bytes that are
    not become U+FFFD, never an error.
    """
    out: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise MalformedRequest(f"line without name=value: {line[:80]!r}")
        if value.endswith("\r"):
            value = value[:-1]
        out[name] = value
    return out


class _Connection(asyncio.Protocol):
    """One client (a Postfix smtpd process): requests answered in order."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.pending: collections.deque[bytes] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.worker: asyncio.Task[None] | None = None
        self.peer = "?"
        self.paused = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else str(peer or "unix")
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.pending.clear()
        self.transport = None

    def _drop(self, reason: str) -> None:
        log.warning("policy client %s: %s; disconnected", self.peer, reason)
        self.pending.clear()
        if self.transport is not None:
            self.transport.abort()

    def _answer_now(self, block: bytes) -> bytes | None:
        try:
            attributes = parse_request(block)
        except MalformedRequest as e:
            log.warning("policy client %s: malformed request: %s", self.peer, e)
            return b"action=" + MALFORMED.encode() + b"\n\n"
        action = self.server.service.answer_now(attributes)
        return None if action is None else b"action=" + action.encode("utf-8") + b"\n\n"

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        answers: list[bytes] = []
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            block = bytes(buffer[start:end])
            start = end + 2
            if block.count(b"\n") >= MAX_ATTRIBUTES:
                return self._drop(f"a request of more than {MAX_ATTRIBUTES} lines")
            if len(block) > MAX_LINE and max(map(len, block.split(b"\n"))) > MAX_LINE:
                return self._drop(f"a line longer than {MAX_LINE} bytes")
            if self.worker is None and not self.pending:
                # answered at once when no DNS and no counter is needed
                action = self._answer_now(block)
                if action is not None:
                    answers.append(action)
                    continue
            self.pending.append(block)
        if answers and self.transport is not None:
            self.transport.write(b"".join(answers))
        del buffer[:start]
        if buffer:
            last = buffer.rfind(b"\n")
            if len(buffer) - last - 1 > MAX_LINE:
                return self._drop(f"a line longer than {MAX_LINE} bytes")
            if buffer.count(b"\n") >= MAX_ATTRIBUTES:
                return self._drop(f"a request of more than {MAX_ATTRIBUTES} lines")
        if self.pending and self.worker is None:
            self.worker = asyncio.ensure_future(self._work())
        if len(self.pending) > 64 and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.worker is None and self.transport is not None:
            self.transport.close()
        return True  # keep the socket open for the answers still in flight

    async def _work(self) -> None:
        service = self.server.service
        try:
            while self.pending and self.transport is not None:
                out: list[bytes] = []
                while self.pending:
                    block = self.pending.popleft()
                    try:
                        attributes = parse_request(block)
                    except MalformedRequest as e:
                        log.warning("policy client %s: malformed request: %s", self.peer, e)
                        action = MALFORMED
                    else:
                        action = await service.answer(attributes)
                    out.append(b"action=" + action.encode("utf-8") + b"\n\n")
                if self.transport is None:
                    return
                self.transport.write(b"".join(out))
                if self.paused and len(self.pending) < 16:
                    self.paused = False
                    self.transport.resume_reading()
        finally:
            self.worker = None
            if self.eof and self.transport is not None:
                self.transport.close()


class PolicyServer:
    """Listens on TCP or a UNIX socket and answers every connection."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.Server] = []

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free one); returns the address."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port)
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def listen_unix(self, path: str) -> None:
        """Listen on the UNIX socket ``path``."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self), path)
        self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
