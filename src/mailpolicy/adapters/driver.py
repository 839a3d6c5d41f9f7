"""The host loop: drives a pure :class:`~mailpolicy.dialogue.Connection` with
real services (a resolver, a counter store, password checks, delivery).

One loop serves every way in: ``mailpolicy serve`` runs it over a socket
(:mod:`.transport`), replay over an in-memory pipe (:mod:`.replay`), so what
replay prints is what a client of the server would see. The loop answers each
need of the dialogue, writes each reply, logs each decision and tells an
optional :class:`SessionObserver` (``serve --capture``) what happened.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, Protocol

import attrs

from ..dialogue import (
    NEED_DATA,
    Authenticated,
    CheckPassword,
    Close,
    CommandReceived,
    Connection,
    Decided,
    Deliver,
    Event,
    MessageReceived,
    NeedCount,
    NeedDns,
    NeedRecipientCheck,
    NeedSpooled,
    NeedStamp,
    Observed,
    Prefetch,
    ReplyRecord,
    Send,
    Spool,
    Stamp,
    StartTls,
    Submission,
    TlsStarted,
)
from ..model import Action, DnsQuery, DnsResult, Reply, RType, Session, Stage, ip_text
from ..policy import Policy
from ..settings import ServerSettings
from .dns import Resolver
from .state import MemoryStore, StateStore

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "HANDLED",
    "SHUTDOWN",
    "AcceptAllDelivery",
    "Channel",
    "Delivery",
    "Receiving",
    "ReplyRecord",
    "Services",
    "SessionObserver",
    "Submission",
    "new_queue_id",
    "run_connection",
]

log = logging.getLogger("mailpolicy.smtp")
decisions = logging.getLogger("mailpolicy.decisions")


class Delivery(Protocol):
    """Where accepted messages go. Return the reply for the end of DATA:
    250 only once the message is safe; 4xx makes the client retry.

    A delivery may also have ``check_recipient(address) -> Reply | None``
    (or an ``async`` one):
    called at RCPT once the policy accepts, it refuses at once an address it
    can never deliver (see :class:`~.gateway.GatewayDelivery`).
    """

    async def deliver(self, submission: Submission) -> Reply: ...


class AcceptAllDelivery:
    """Accept and drop (Postfix's ``discard`` transport): for replay and tests.

    Keeps what it was given in ``messages`` so tests can look at it.
    """

    def __init__(self) -> None:
        self.messages: list[Submission] = []

    async def deliver(self, submission: Submission) -> Reply:
        self.messages.append(submission)
        return Reply(250, "2.0.0", f"Ok: queued as {submission.queue_id}")


class SessionObserver(Protocol):
    """Sees one connection as it happens (:mod:`.capture` records sessions).

    It is told each command line as received (``pending``: more input had
    already arrived, i.e. the client pipelined), each reply, the AUTH user and
    outcome, the message, STARTTLS and the session's end. A password never
    reaches it: AUTH arguments are redacted and SASL responses not passed.
    """

    def connected(self, session: Session, now: float) -> None: ...

    def command(self, line: str, pending: bool) -> None: ...

    def reply(self, record: ReplyRecord) -> None: ...

    def authenticated(self, user: str, ok: bool) -> None: ...

    def message(self, content: bytes, size: int) -> None: ...

    def tls_started(self) -> None: ...

    def closed(self, session: Session | None) -> None: ...


class _Shutdown:
    def __repr__(self) -> str:
        return "SHUTDOWN"


#: what :meth:`Channel.read` returns when the server asks the session to end
SHUTDOWN = _Shutdown()


class Channel(Protocol):
    """The byte stream to the client, as the loop needs it."""

    async def read(self, timeout: float | None) -> bytes | _Shutdown | _Handled | None:
        """Bytes from the client, ``b""`` at its end of input, ``None`` when
        ``timeout`` seconds passed without any, :data:`SHUTDOWN` when the
        server is stopping (:data:`HANDLED` for a :class:`Receiving` channel
        whose receiver took the bytes)."""
        ...

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the client (never blocks)."""
        ...

    async def start_tls(self) -> bool:
        """The server side of a TLS handshake; False when it failed."""
        ...

    def close(self) -> None: ...


_queue_ids = itertools.count(1)


def new_queue_id() -> str:
    """A queue id: random, unique in this process."""
    return f"{secrets.token_hex(4).upper()}{next(_queue_ids):X}"


@attrs.define
class Services:
    """What the loop answers a connection's needs with."""

    resolver: Resolver
    delivery: Delivery = attrs.field(factory=AcceptAllDelivery)
    store: StateStore = attrs.field(factory=MemoryStore)
    clock: Callable[[], float] = time.time
    queue_id: Callable[[], str] = new_queue_id
    #: seconds a client may stay silent (Postfix's smtpd_timeout)
    timeout: float = 300
    #: seconds a whole session may last (0: no limit)
    max_session: float = 0
    #: bytes per second a client must keep up in DATA once ``timeout``
    #: seconds have passed (Postfix's smtpd_min_data_rate; 0: off)
    min_data_rate: float = 0
    #: where messages bigger than the dialogue keeps in memory are spooled
    #: (None: the system's temporary folder)
    spool_dir: str | None = None
    #: called with each reply record (tests)
    on_reply: Callable[[ReplyRecord], None] | None = None
    #: Prometheus numbers (``serve --metrics``), or None
    metrics: Metrics | None = None

    @classmethod
    def for_settings(cls, settings: ServerSettings, **kw: Any) -> Services:
        """Services with the time limits of ``[server]``."""
        return cls(
            **{
                "timeout": settings.timeout_seconds,
                "max_session": settings.max_session_seconds,
                "min_data_rate": settings.min_data_rate,
                **kw,
            }
        )


class _Deadlines:
    """How long the next read may wait: the idle timeout, the session's
    time limit, and in DATA a deadline that grows with the bytes received
    (so a client trickling one byte a minute cannot hold a session)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.started = time.monotonic()
        self.data_started: float | None = None
        self.data_bytes = 0

    def wait(self, conn: Connection) -> float:
        s, now = self.services, time.monotonic()
        limit = s.timeout
        if s.max_session:
            limit = min(limit, self.started + s.max_session - now)
        if conn.in_data and s.min_data_rate:
            if self.data_started is None:
                self.data_started, self.data_bytes = now, 0
            deadline = self.data_started + s.timeout + self.data_bytes / s.min_data_rate
            limit = min(limit, deadline - now)
        else:
            self.data_started = None
        return max(0.0, limit)

    def received(self, conn: Connection, n: int) -> None:
        if conn.in_data:
            self.data_bytes += n


class _Spool:
    """One connection's message spool: a temporary file, made on first use.
    A write that fails (a full disk) is remembered and reported when the
    message is taken, so the client gets a 451, never a 250."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self.file: IO[bytes] | None = None
        self.error: OSError | None = None

    def append(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self.file is None:
                # closed in close(), when the message is taken or the session ends
                self.file = tempfile.TemporaryFile(dir=self.folder)  # noqa: SIM115
            self.file.write(data)
        except OSError as e:
            self.error = e
            self.close()

    def take(self) -> bytes:
        error, self.error = self.error, None
        if error is not None:
            raise error
        if self.file is None:
            return b""
        try:
            self.file.seek(0)
            return self.file.read()
        finally:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _Prefetch:
    """DNS questions asked before the rule that needs them runs, their
    answers kept for the session's next rounds.

    - The client's name as soon as it connects, as Postfix's smtpd does
      before its banner: the PTR, then its name's address (when the policy
      judges the client's name).
    - What the RCPT rules will ask about the sender, as soon as MAIL is
      accepted (:meth:`~mailpolicy.policy.Policy.questions_ahead`: the
      sender domain's MX). The client's RCPT then crosses the question.

    A rule that needs them finds them answered or on the way (the live
    resolver shares a question in flight): one session waits for the DNS
    less often. Every answer in hand goes with the next round asked, so a
    rule that asked for the PTR finds its name's address given too.
    """

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.answers: dict[DnsQuery, DnsResult] = {}
        self.pending: list[asyncio.Future[Any]] = []
        # A resolver that can send at once (LiveResolver.start) asks before
        # the banner or the 250 goes out; another one asks from a task.
        self._start: Callable[[DnsQuery, Callable[[DnsResult], None]], asyncio.Future[Any]] = (
            getattr(resolver, "start", None) or self._start_task
        )

    @staticmethod
    def client_name_wanted(policy: Policy) -> bool:
        security = policy.settings.security
        cp = security.connection_policy
        return (
            cp.reject_unknown_reverse_client_hostname
            or cp.reject_unknown_client_hostname
            or any(rule.client_hostname for rule in security.lists)
        )

    def client_name(self, session: Session) -> None:
        ip = session.client_ip
        ptr = DnsQuery.of(ip_text(ip), RType.PTR)
        self._begin(ptr, RType.A if ip.version == 4 else RType.AAAA)

    def ask(self, queries: Iterable[DnsQuery]) -> None:
        for query in queries:
            if query not in self.answers:
                self._begin(query, None)

    def _begin(self, query: DnsQuery, then: RType | None) -> None:
        """Ask ``query`` now; with ``then``, its first record's name's
        address of that type as soon as it is answered (the PTR, then A)."""

        def answered(found: DnsResult) -> None:
            self.answers[query] = found
            if then is not None and found.found:
                name = found.records[0].lower().rstrip(".")
                self._begin(DnsQuery.of(name, then), None)

        # with LiveResolver.start, answered is called where the answer is
        # read, not a loop iteration later
        future = self._start(query, answered)
        # the ones answered are dropped here, not by a done-callback each
        # (a handle on the loop per question)
        self.pending = [f for f in self.pending if not f.done()]
        if not future.done():
            self.pending.append(future)

    def _start_task(
        self, query: DnsQuery, answered: Callable[[DnsResult], None]
    ) -> asyncio.Future[None]:
        """``start`` for a resolver without one: a task that asks."""

        async def ask() -> None:
            try:
                found = await self.resolver.resolve(query)
            except Exception:  # the session asks again, and reports it then
                log.debug("prefetch of %s failed", query, exc_info=True)
            else:
                answered(found)

        return asyncio.get_running_loop().create_task(ask())

    async def resolve_all(self, queries: frozenset[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        """The answers to ``queries``, and every other answer already in hand."""
        missing = [q for q in queries if q not in self.answers]
        asked = await self.resolver.resolve_all(missing) if missing else {}
        known = dict(self.answers)  # after the wait: the prefetch may have gone on
        known.update(asked)
        return known

    def cancel(self) -> None:
        for future in self.pending:
            future.cancel()


class _Handled:
    def __repr__(self) -> str:
        return "HANDLED"


#: what :meth:`Channel.read` returns when the bytes that came went to the
#: channel's receiver (see :class:`Receiving`) and were handled there
HANDLED = _Handled()


class Receiving(Protocol):
    """A :class:`Channel` that can hand the bytes it receives straight to
    the loop, while the loop waits in :meth:`Channel.read`.

    The receiver handles them at once, in the channel's own callback: the
    dialogue's replies that need no waiting (HELO, MAIL, DATA and the like)
    go out without a task wake-up and a loop iteration each. It returns the
    next read's timeout in seconds when the dialogue wants more bytes (the
    read goes on waiting), or ``None`` when the loop must go on: the read
    then returns :data:`HANDLED`.
    """

    def receive_with(self, receiver: Callable[[bytes], float | None] | None) -> None:
        """Give received bytes to ``receiver`` while a read waits (None: stop)."""
        ...


#: what the loop waits for only once the replies so far are written (the
#: client reads them meanwhile): a count or a recipient check is quick and
#: may hold them; STARTTLS writes its 220 itself, just before TLS is set up,
#: so that no byte of the handshake can come before it
_WRITE_FIRST = (NeedDns, CheckPassword, Deliver, Close)


class _Failed:
    """What the receiver met: raised again in the loop's task."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def run_connection(
    conn: Connection,
    channel: Channel,
    services: Services,
    observer: SessionObserver | None = None,
) -> None:
    """Run ``conn`` to its end over ``channel``. Never raises for the
    client's or a service's faults; gives back a counted connection slot."""
    await _Loop(conn, channel, services, observer).run()


class _Loop:
    """One connection's loop: :meth:`pump` answers every event of the
    dialogue that needs no waiting; :meth:`run` (the task) waits for the
    rest. A :class:`Receiving` channel runs :meth:`received` in its read
    callback, so the task only wakes when something must be waited for."""

    def __init__(
        self,
        conn: Connection,
        channel: Channel,
        services: Services,
        observer: SessionObserver | None,
    ) -> None:
        self.conn = conn
        self.channel = channel
        self.services = services
        self.observer = observer
        self.metrics = services.metrics
        self.deadlines = _Deadlines(services)
        self.spool = _Spool(services.spool_dir)
        self.prefetch = _Prefetch(services.resolver)
        # Replies to commands that came together (pipelining) leave together:
        # they are written out when the dialogue next waits for anything, as
        # Postfix flushes when no more pipelined input is there.
        self.out: list[bytes] = []
        # Decisions are logged once their replies are written: the client does
        # not wait for our log line (the session, its facts, are as decided).
        self.decided: list[tuple[Session, Decided]] = []
        #: the event the receiver stopped at, for the task to go on with
        self.pending: Event | _Failed | None = None

    def flush(self) -> None:
        out = self.out
        if out:
            self.channel.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.decided:
            for session, note in self.decided:
                log_decision(session, note)
            self.decided.clear()

    def pump(self) -> Event:
        """Answer the dialogue's events until one needs waiting (or ends it)."""
        conn, observer, metrics = self.conn, self.observer, self.metrics
        while True:
            event = conn.next_event()
            if isinstance(event, Send):
                self.out.append(event.data)
                if metrics is not None:
                    metrics.reply(event.record.reply.code)
                if self.services.on_reply is not None:
                    self.services.on_reply(event.record)
                if observer is not None:
                    observer.reply(event.record)
            elif isinstance(event, CommandReceived):
                if observer is not None:
                    observer.command(event.line, event.pending)
            elif isinstance(event, Decided):
                self.decided.append((conn.session, event))
                if metrics is not None and event.stage != "delivery":
                    stage = event.stage.value if isinstance(event.stage, Stage) else event.stage
                    metrics.verdict(stage, event.verdict)
            elif isinstance(event, Prefetch):
                self.prefetch.ask(event.queries)
            elif isinstance(event, Observed):
                log_observed(conn.session, event)
                if metrics is not None:
                    metrics.observed(event.stage.value, event.verdict)
            elif isinstance(event, Spool):
                self.spool.append(event.data)
            elif isinstance(event, NeedSpooled):
                try:
                    conn.spooled(self.spool.take())
                except OSError as e:
                    log.error("message spool failed: %s", e)
                    conn.failed(f"spool: {e}")
            elif isinstance(event, NeedStamp):
                conn.stamped(Stamp(self.services.clock(), self.services.queue_id()))
            elif isinstance(event, Authenticated):
                if observer is not None:
                    observer.authenticated(event.user, event.ok)
            elif isinstance(event, MessageReceived):
                if observer is not None:
                    observer.message(event.content, event.size)
            elif isinstance(event, TlsStarted):
                if observer is not None:
                    observer.tls_started()
            else:
                return event

    def received(self, data: bytes) -> float | None:
        """The receiver (:class:`Receiving`): ``data`` came while the task
        waits for it. Handled here up to the next wait: the next read's
        timeout when that is for more bytes, else ``None`` and the task
        goes on with :attr:`pending`."""
        try:
            conn = self.conn
            self.deadlines.received(conn, len(data))
            conn.receive_data(data)
            event = self.pump()
            if event is NEED_DATA:
                self.flush()
                return self.deadlines.wait(conn)
            if isinstance(event, _WRITE_FIRST):
                self.flush()  # a loop turn before the task would
            self.pending = event
        except Exception as e:  # raised again in the task, which logs it
            self.pending = _Failed(e)
        return None

    async def run(self) -> None:
        conn, channel, services, observer = self.conn, self.channel, self.services, self.observer
        metrics, prefetch, deadlines, flush = (
            self.metrics,
            self.prefetch,
            self.deadlines,
            self.flush,
        )
        policy = conn.policy
        client = ip_text(conn.session.client_ip)
        if _Prefetch.client_name_wanted(policy):
            prefetch.client_name(conn.session)
        if observer is not None:
            observer.connected(conn.session, services.clock())
        if metrics is not None:
            metrics.session_opened()
        receiving = getattr(channel, "receive_with", None)
        if receiving is not None:
            receiving(self.received)
        try:
            while True:
                event = self.pending
                if event is None:
                    event = self.pump()
                else:
                    self.pending = None
                    if isinstance(event, _Failed):
                        raise event.error
                if isinstance(event, _WRITE_FIRST):
                    flush()
                if event is NEED_DATA:
                    flush()
                    data = await channel.read(deadlines.wait(conn))
                    if data is HANDLED:
                        continue  # the receiver went on up to self.pending
                    if data is None:
                        conn.timed_out()
                    elif isinstance(data, _Shutdown):
                        conn.shut_down()
                    else:
                        assert isinstance(data, bytes)
                        deadlines.received(conn, len(data))
                        conn.receive_data(data)
                elif isinstance(event, NeedDns):
                    started = time.perf_counter()
                    try:
                        answers = await prefetch.resolve_all(event.queries)
                    except Exception as e:
                        if metrics is not None:
                            metrics.dns_failed(time.perf_counter() - started)
                        log.exception("resolver failed")
                        conn.failed(f"{type(e).__name__}: {e}")
                    else:
                        if metrics is not None:
                            metrics.dns(time.perf_counter() - started, answers.values())
                        conn.dns_answers(answers)
                elif isinstance(event, NeedCount):
                    # a counter is quick (memory, Redis): replies may wait for it
                    await _count(conn, event, services)
                elif isinstance(event, NeedRecipientCheck):
                    check = getattr(services.delivery, "check_recipient", None)
                    refusal = None if check is None else check(event.recipient)
                    if inspect.isawaitable(refusal):  # it may ask the DNS
                        refusal = await refusal
                    conn.recipient_checked(refusal)
                elif isinstance(event, CheckPassword):
                    try:
                        ok = await asyncio.to_thread(
                            policy.check_password, event.user, event.password
                        )
                    except Exception as e:
                        log.exception("password check failed")
                        conn.failed(str(e))
                    else:
                        conn.password_checked(ok)
                elif isinstance(event, StartTls):
                    flush()  # the 220 goes out in clear before the handshake
                    conn.tls_started(await channel.start_tls())
                elif isinstance(event, Deliver):
                    try:
                        delivered = await services.delivery.deliver(event.submission)
                    except Exception as e:
                        if metrics is not None:
                            metrics.delivery(None)
                        log.exception("delivery failed for queue id %s", event.submission.queue_id)
                        conn.failed(f"{type(e).__name__}: {e}")
                    else:
                        if metrics is not None:
                            metrics.delivery(delivered.code)
                        conn.delivered(delivered)
                elif isinstance(event, Close):
                    break
        finally:
            if receiving is not None:
                receiving(None)
            flush()
            prefetch.cancel()
            if metrics is not None:
                metrics.session_closed()
            self.spool.close()
            channel.close()
            if observer is not None:
                observer.closed(conn.session)
            if conn.connection_counted:
                try:
                    await services.store.connection_closed(client)
                except Exception as e:
                    log.error("state store update failed: %s", e)


async def _count(conn: Connection, need: NeedCount, services: Services) -> None:
    store, now, metrics = services.store, services.clock(), services.metrics
    started = time.perf_counter()
    value: Any
    try:
        if need.kind == "connection":
            value = tuple(await store.connection_opened(need.client, now, need.window))
        elif need.peek:
            value = await store.peek(need.kind, need.subject, now, need.window)
        else:
            value = await store.hit(need.kind, need.subject, now, need.window)
    except Exception as e:
        if metrics is not None:
            metrics.store(need.kind, time.perf_counter() - started, False)
        log.error("state store failed counting %s for %s: %s", need.kind, need.client, e)
        conn.failed(f"state store: {e}")
        return
    if metrics is not None:
        metrics.store(need.kind, time.perf_counter() - started, True)
    conn.counted(value)


def log_observed(session: Session, event: Observed) -> None:
    """One log line per refusal a rule in observe mode would have made."""
    for seen in event.verdict.observed:
        fields: dict[str, object] = {
            "client": ip_text(session.client_ip),
            "stage": event.stage.value,
            "observed": True,
            "action": seen.action.value,
            "rule": seen.rule,
            "reply": str(seen.reply) if seen.reply else None,
            "evidence": [str(e) for e in seen.evidence],
        }
        decisions.info("observed: would %s", seen.explain(), extra={"decision": fields})


def log_decision(session: Session, event: Decided) -> None:
    """One log line per decision, with its facts as structured fields."""
    verdict = event.verdict
    stage = event.stage.value if isinstance(event.stage, Stage) else event.stage
    accepted = verdict.action is Action.ACCEPT
    if stage == "delivery":
        level = logging.INFO if accepted else logging.WARNING
    elif verdict.rule == "internal.error":
        level = logging.ERROR
    else:
        level = logging.DEBUG if accepted else logging.INFO
    # build nothing for a line that is not shown (a plain acceptance is a
    # debug line; serve --log-level warning shows no delivery either)
    if not decisions.isEnabledFor(level):
        return
    fields: dict[str, object] = {"client": ip_text(session.client_ip), "stage": stage}
    if stage == "delivery":
        reply = str(verdict.reply)
        fields.update(event.facts)
        fields["reply"] = reply
        message = "message {} from <{}> to {}: {}".format(
            event.facts.get("queue_id"),
            event.facts.get("sender"),
            ",".join(str(r) for r in event.facts.get("recipients", ()) or ()),  # type: ignore[attr-defined]
            reply,
        )
        decisions.log(level, "%s", message, extra={"decision": fields})
        return
    fields.update(
        {
            "helo": session.helo,
            "action": verdict.action.value,
            "rule": verdict.rule,
            "reply": str(verdict.reply) if verdict.reply else None,
            "evidence": [str(e) for e in verdict.evidence],
        }
    )
    fields.update(event.facts)
    decisions.log(level, "%s", verdict.explain(), extra={"decision": fields})
