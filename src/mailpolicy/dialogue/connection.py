"""The server side of one SMTP connection, as a pure state machine.

Theory of operation
-------------------
A :class:`Connection` never reads a socket, resolves a name, looks at a clock
or writes a file. The host (``mailpolicy serve``, replay, a test) feeds it
the bytes the client sent with :meth:`~Connection.receive_data` and asks
:meth:`~Connection.next_event` what to do next, until the answer is
:data:`~.events.NEED_DATA` (read more) or :class:`~.events.Close`:

* :class:`~.events.Send`: write these bytes (one reply);
* a *need* (DNS answers, a counter, a password check, a TLS handshake, a time
  stamp and queue id, storing the message): do it and hand the result back
  with the matching method (:meth:`dns_answers`, :meth:`counted`,
  :meth:`password_checked`, :meth:`tls_started`, :meth:`stamped`,
  :meth:`delivered`) or :meth:`failed`; each failure has a defined temporary
  answer, never an accept;
* a *note* (:class:`~.events.Decided`, :class:`~.events.CommandReceived` ...):
  log or observe it, then ask again.

Everything about the dialogue lives here: which command may come when (the
:data:`SEQUENCE` table), pipelining (a command with more input already
buffered behind it), the error counter and its limit, the transaction, the
AUTH exchanges, Postfix's reply wording (:mod:`.replies`), the message, our
``Received:`` header and the facts the end-of-DATA rules judge. The policy
decides every stage through :func:`~mailpolicy.evaluate.decide`; when it
needs DNS answers the connection asks the host for them and decides again.

Inside, the dialogue is written as generators (``yield`` an event, receive
its answer), which keeps each command's logic in one readable function while
the host sees nothing but values.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator, Mapping
from typing import Any, Final

import attrs

from ..addresses import AddressError, parse_mail_from, parse_rcpt_to
from ..counting import rates_to_count
from ..evaluate import Memo, decide, evaluate
from ..model import (
    Action,
    Counters,
    DnsQuery,
    DnsResult,
    Envelope,
    Evidence,
    IPAddress,
    Reply,
    Session,
    Stage,
    Verdict,
)
from ..policy import Policy
from . import sasl
from .events import (
    NEED_DATA,
    Authenticated,
    CheckPassword,
    Close,
    CommandReceived,
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
from .message import DataReader, message_facts, received_header
from .params import check_mail_params, check_rcpt_params
from .replies import R, format_reply

__all__ = [
    "COMMAND_LINE_LIMIT",
    "HARD_ERROR_LIMIT",
    "SEQUENCE",
    "Connection",
    "DialogueError",
    "Phase",
]

#: Postfix's smtpd_hard_error_limit: after this many error replies, 421 and close.
HARD_ERROR_LIMIT: Final = 20
#: the longest command line, CRLF included; longer ones get 500 5.5.0
COMMAND_LINE_LIMIT: Final = 1001
#: the longest SASL response line (Postfix's line_length_limit)
SASL_LINE_LIMIT: Final = 12288
#: rounds of DNS questions for one decision (the PTR, then its forward name)
MAX_DNS_ROUNDS: Final = 4
#: commands after which RFC 2920 forbids sending more before the reply
LAST_IN_GROUP: Final = frozenset(
    {"EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "QUIT", "NOOP", "AUTH", "STARTTLS"}
)


class Phase(enum.Enum):
    """Where the mail transaction stands."""

    #: no transaction: MAIL may come
    IDLE = "idle"
    #: after MAIL: RCPT may come
    MAIL = "mail"
    #: at least one recipient accepted: DATA may come
    RCPT = "rcpt"
    #: reading or delivering the message
    DATA = "data"


#: Which command may come in which phase: (verb, phase) -> the reply that
#: refuses it. Anything not listed may come. Postfix checks the sequence
#: before the command's syntax for MAIL and RCPT, after it for DATA, and
#: after "is AUTH offered at all" for AUTH; each handler asks at that point.
SEQUENCE: Final[Mapping[tuple[str, Phase], Reply]] = {
    ("MAIL", Phase.MAIL): R.NESTED_MAIL,
    ("MAIL", Phase.RCPT): R.NESTED_MAIL,
    ("RCPT", Phase.IDLE): R.NEED_MAIL,
    ("DATA", Phase.IDLE): R.NEED_RCPT,
    # Postfix: in a transaction, whether or not RCPT was tried
    ("DATA", Phase.MAIL): R.NO_VALID_RCPT,
    ("AUTH", Phase.MAIL): R.AUTH_IN_MAIL,
    ("AUTH", Phase.RCPT): R.AUTH_IN_MAIL,
}


class DialogueError(RuntimeError):
    """The host called the connection out of turn (answered a need it was
    not asked, or asked for the next event before answering)."""


class HostFailure(Exception):
    """What :meth:`Connection.failed` sends into the dialogue."""


class _Hangup(Exception):
    """End the session: say ``reply`` (if any), then close."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class _TooLong:
    """A line over its limit (discarded)."""


_TOO_LONG: Final = _TooLong()

_NEEDS = (
    NeedDns,
    NeedRecipientCheck,
    NeedCount,
    CheckPassword,
    StartTls,
    NeedStamp,
    NeedSpooled,
    Deliver,
)

Steps = Generator[Event, Any, None]


@attrs.define
class _Transaction:
    sender: str | None = None
    smtputf8: bool = False
    declared_size: int | None = None
    rcpts: list[str] = attrs.field(factory=list)
    discard: Verdict | None = None

    @property
    def phase(self) -> Phase:
        if self.sender is None:
            return Phase.IDLE
        return Phase.RCPT if self.rcpts else Phase.MAIL


def _redacted(line: bytes) -> str:
    """A command line as a host may log or record it: AUTH arguments hidden."""
    text = line.decode("utf-8", errors="surrogateescape")
    words = text.split()
    if words and words[0].upper() == "AUTH":
        return " ".join(words[:2] + ["<redacted>"] * len(words[2:]))
    return text


class Connection:
    """One SMTP connection, server side, judged by ``policy``.

    ``client`` is the client's address; ``tls`` says the connection is under
    TLS from the start (port 465), ``starttls`` that the host can do a TLS
    handshake when asked (a certificate is configured). ``memo`` keeps what
    the policy derived for this connection (create one per connection).
    """

    def __init__(
        self,
        policy: Policy,
        client: str | IPAddress,
        *,
        tls: bool = False,
        starttls: bool = False,
        memo: Memo | None = None,
    ) -> None:
        self.policy = policy
        self.session = Session(client, tls=tls)
        self.starttls = starttls
        self.memo = memo if memo is not None else Memo()
        self.hostname = policy.settings.general.hostname
        #: error replies so far (4xx and 5xx)
        self.errors = 0
        #: the host counted this connection ("connection" need answered):
        #: it must give the slot back when the connection ends
        self.connection_counted = False
        self._tx = _Transaction()
        self._buf = bytearray()
        self._eof = False
        self._skipping = False
        self._busy = False
        self._in_data = False
        self._interrupt: Reply | None = None
        self._pending: Event | None = None
        self._answer: object = None
        self._throw: HostFailure | None = None
        self._closed: Close | None = None
        server = policy.settings.server
        self._forbid_bare_lf = server.reject_bare_newline
        self._memory_limit = server.max_message_memory_kb * 1024
        self._steps: Steps = self._run()

    # -- the host's side ---------------------------------------------------------

    def next_event(self) -> Event:
        """What the host must do next (see the module's theory of operation)."""
        if self._closed is not None:
            return self._closed
        if self._pending is not None:
            raise DialogueError(f"answer {self._pending!r} before asking for the next event")
        try:
            if self._throw is not None:
                error, self._throw = self._throw, None
                event = self._steps.throw(error)
            else:
                answer, self._answer = self._answer, None
                event = self._steps.send(answer)
        except StopIteration:
            event = Close("session over")
        if isinstance(event, Close):
            self._closed = event
        elif isinstance(event, _NEEDS):
            self._pending = event
        return event

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means the client sent its last."""
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet processed (for the host's flow control)."""
        return len(self._buf)

    @property
    def busy(self) -> bool:
        """Receiving or delivering a message: a graceful shutdown waits for it."""
        return self._busy

    @property
    def in_data(self) -> bool:
        """Reading the message: the client is the one who must keep talking."""
        return self._in_data

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def timed_out(self) -> None:
        """The client said nothing for too long (call while waiting for data)."""
        self._interrupt = self._host(R.TIMEOUT)

    def shut_down(self) -> None:
        """The server is stopping (call while waiting for data)."""
        self._interrupt = self._host(R.SHUTTING_DOWN)

    def dns_answers(self, answers: Mapping[DnsQuery, DnsResult]) -> None:
        self._give(NeedDns, dict(answers))

    def counted(self, value: int | tuple[int, int]) -> None:
        """A :class:`NeedCount`'s answer: the count, or ``(open, rate)`` for a connection."""
        if isinstance(self._pending, NeedCount) and self._pending.kind == "connection":
            self.connection_counted = True
        self._give(NeedCount, value)

    def recipient_checked(self, refusal: Reply | None) -> None:
        """A :class:`NeedRecipientCheck`'s answer: ``None``, or the refusal."""
        self._give(NeedRecipientCheck, refusal)

    def password_checked(self, ok: bool) -> None:
        self._give(CheckPassword, ok)

    def tls_started(self, ok: bool = True) -> None:
        self._give(StartTls, ok)

    def stamped(self, stamp: Stamp) -> None:
        self._give(NeedStamp, stamp)

    def spooled(self, data: bytes) -> None:
        """Everything :class:`Spool` events handed out for this message."""
        self._give(NeedSpooled, data)

    def delivered(self, reply: Reply) -> None:
        self._give(Deliver, reply)

    def failed(self, reason: str) -> None:
        """The host could not do what the pending need asked (a store, a
        resolver or a delivery failed): the dialogue answers temporarily."""
        if self._pending is None:
            raise DialogueError("failed() without a pending need")
        self._pending = None
        self._throw = HostFailure(reason)

    def _give(self, kind: type, value: object) -> None:
        if not isinstance(self._pending, kind):
            raise DialogueError(
                f"{kind.__name__} answered, but the pending need is {self._pending!r}"
            )
        self._pending = None
        self._answer = value

    # -- plumbing ------------------------------------------------------------------

    def _host(self, reply: Reply) -> Reply:
        return Reply(reply.code, reply.enhanced, reply.text.format(host=self.hostname))

    def _say(self, reply: Reply, verdict: Verdict | None = None) -> Steps:
        if reply.code >= 400:
            self.errors += 1
        yield Send(format_reply(reply), ReplyRecord(reply, verdict))

    def _wait(self) -> Steps:
        """Ask for more input; a timeout or shutdown ends the session."""
        yield NEED_DATA
        if self._interrupt is not None:
            raise _Hangup("interrupted", self._interrupt)

    def _line(self, limit: int) -> Generator[Event, Any, bytes | _TooLong | None]:
        """The next line without its line end; ``None`` at end of input."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                if self._skipping or end + 1 > limit:
                    del self._buf[: end + 1]
                    self._skipping = False
                    return _TOO_LONG
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                if self._forbid_bare_lf and not line.endswith(b"\r"):
                    raise _Hangup("bare LF", self._host(R.BARE_LF))
                return line.rstrip(b"\r\n")
            if len(self._buf) > limit:
                # Keep memory bounded: drop the line as it comes.
                self._buf.clear()
                self._skipping = True
            if self._eof:
                return None
            yield from self._wait()

    def _judge(self, envelope: Envelope) -> Generator[Event, Any, Verdict]:
        """Decide ``envelope``, asking the host for DNS answers as needed.
        A failure defers: it never accepts by accident."""
        try:
            for _ in range(MAX_DNS_ROUNDS):
                result = decide(self.policy, self.session, envelope, self.memo)
                if isinstance(result, Verdict):
                    break
                answers = yield NeedDns(result.queries)
                self.session = self.session.with_dns(answers)
            else:
                result = evaluate(self.policy, self.session, envelope, self.memo)
            if result.observed:
                yield Observed(envelope.stage, result)
            return result
        except HostFailure as e:
            why = Evidence("dns", "resolver failed", matched=str(e))
        except Exception as e:  # a bug must defer, never accept
            why = Evidence("error", f"{type(e).__name__}: {e}")
        return Verdict(Action.DEFER, R.TEMP_FAILURE, "internal.error", (why,))

    def _count(self, stage: Stage, address: str | None) -> Generator[Event, Any, None]:
        """Count what the policy judges at ``stage`` (``address``: the
        sender at MAIL, the recipient at RCPT) and put the counts in the
        session's counters. Raises HostFailure when the store fails."""
        todo = rates_to_count(self.policy, stage, self.session, address)
        if not todo:
            return
        window = self.policy.settings.security.connection_policy.rate_window_seconds
        client = str(self.session.client_ip)
        counts: dict[str, int] = {}
        for rate in todo:
            if rate.key is None:  # nothing to count for (no login, the null sender)
                counts[rate.field] = 0
                continue
            key = None if rate.per_client else rate.key
            need = NeedCount(rate.kind, client, window, key=key)  # type: ignore[arg-type]
            counts[rate.field] = int((yield need))
        counters = attrs.evolve(self.session.counters, **counts)
        self.session = attrs.evolve(self.session, counters=counters)

    def _refuse(self, stage: Stage, verdict: Verdict, **facts: object) -> Steps:
        yield Decided(stage, verdict, facts)
        assert verdict.reply is not None
        yield from self._say(verdict.reply, verdict)

    # -- the session -----------------------------------------------------------------

    def _run(self) -> Steps:
        try:
            if not (yield from self._connect()):
                yield Close("refused at connect")
                return
            while True:
                if self.errors >= HARD_ERROR_LIMIT:
                    # As Postfix's smtpd: checked before reading another command.
                    raise _Hangup("too many errors", self._host(R.TOO_MANY_ERRORS))
                line = yield from self._line(COMMAND_LINE_LIMIT)
                if line is None:
                    yield Close("client closed the connection")
                    return
                if isinstance(line, _TooLong):
                    yield from self._say(R.LINE_TOO_LONG)
                    continue
                yield CommandReceived(_redacted(line), bool(self._buf))
                yield from self._dispatch(line, pending=bool(self._buf))
        except _Hangup as end:
            self._busy = self._in_data = False
            if end.reply is not None:
                yield from self._say(end.reply)
            yield Close(end.reason)

    def _connect(self) -> Generator[Event, Any, bool]:
        if self.policy.counters(Stage.CONNECT):
            cp = self.policy.settings.security.connection_policy
            client = str(self.session.client_ip)
            try:
                count, rate = yield NeedCount("connection", client, cp.rate_window_seconds)
            except HostFailure:
                yield from self._say(self._host(R.STORE_FAILED))
                return False
            counters = Counters(connections=count, connection_rate=rate)
            self.session = attrs.evolve(self.session, counters=counters)
        verdict = yield from self._judge(Envelope(Stage.CONNECT))
        if verdict.action.refuses:
            yield from self._refuse(Stage.CONNECT, verdict)
            return False
        yield from self._say(Reply(220, None, self.policy.settings.general.banner_text))
        return True

    def _dispatch(self, line: bytes, *, pending: bool) -> Steps:
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            verb = ""
        if not verb:
            yield from self._say(R.BAD_SYNTAX)
            return
        arg = arg_bytes.decode("utf-8", errors="surrogateescape").strip()
        # RFC 2920: a client may send ahead only after EHLO, and never past a
        # command that ends a group (Postfix's reject_unauth_pipelining test).
        if (
            pending
            and not self.session.improper_pipelining
            and (not self.session.esmtp or verb in LAST_IN_GROUP)
        ):
            self.session = attrs.evolve(self.session, improper_pipelining=True)
        handler = _COMMANDS.get(verb)
        if handler is None:
            yield from self._say(R.UNKNOWN_COMMAND)
            return
        yield from handler(self, arg)

    def _out_of_sequence(self, verb: str) -> Reply | None:
        return SEQUENCE.get((verb, self._tx.phase))

    def _reset(self) -> None:
        self._tx = _Transaction()

    # -- commands ----------------------------------------------------------------------

    def cmd_helo(self, arg: str) -> Steps:
        if not arg:
            yield from self._say(R.SYNTAX_HELO)
            return
        self._reset()
        self.session = attrs.evolve(self.session, helo=arg, esmtp=False)
        yield from self._say(Reply(250, None, self.hostname))

    def cmd_ehlo(self, arg: str) -> Steps:
        if not arg:
            yield from self._say(R.SYNTAX_EHLO)
            return
        self._reset()
        self.session = attrs.evolve(self.session, helo=arg, esmtp=True)
        size = self.policy.settings.general.max_message_size
        caps = [self.hostname, "PIPELINING", f"SIZE {size}" if size else "SIZE"]
        if self.starttls and not self.session.tls:
            caps.append("STARTTLS")
        if self.policy.auth_offered(self.session):
            caps.append("AUTH PLAIN LOGIN")
        caps += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        yield from self._say(Reply(250, None, "\n".join(caps)))

    def cmd_noop(self, arg: str) -> Steps:
        yield from self._say(R.OK)

    def cmd_rset(self, arg: str) -> Steps:
        if arg:
            yield from self._say(R.SYNTAX_RSET)
            return
        self._reset()
        yield from self._say(R.OK)

    def cmd_quit(self, arg: str) -> Steps:
        yield from self._say(R.BYE)
        raise _Hangup("QUIT")

    def cmd_vrfy(self, arg: str) -> Steps:
        verdict = yield from self._judge(Envelope(Stage.VRFY, recipient=arg or None))
        if verdict.action.refuses:
            assert verdict.reply is not None
            yield from self._say(verdict.reply, verdict)
            return
        if not arg:
            yield from self._say(R.SYNTAX_VRFY)
            return
        yield from self._say(Reply(252, "2.0.0", arg))

    def cmd_starttls(self, arg: str) -> Steps:
        if arg:
            yield from self._say(R.SYNTAX_STARTTLS)
            return
        if self.session.tls:
            yield from self._say(R.TLS_ACTIVE)
            return
        if not self.starttls:
            yield from self._say(R.NOT_IMPLEMENTED)
            return
        # RFC 3207: plaintext sent ahead of the handshake must never run as
        # if it came under TLS.
        self._buf.clear()
        yield from self._say(R.READY_TLS)
        if not (yield StartTls()):
            raise _Hangup("TLS handshake failed")
        # RFC 3207 4.2: forget everything the client said before TLS.
        self._reset()
        self.session = attrs.evolve(self.session, tls=True, helo=None, esmtp=False, auth_user=None)
        yield TlsStarted()

    def cmd_auth(self, arg: str) -> Steps:
        policy = self.policy
        if not policy.auth_offered(self.session):
            auth = policy.settings.general.smtp_auth
            why = (
                "general.smtp_auth.no_plaintext_without_tls"
                if auth.enabled and policy.settings.accounts and not self.session.tls
                else "general.smtp_auth.enabled"
            )
            r = R.AUTH_NOT_ENABLED
            yield from self._say(r, Verdict(Action.REJECT, r, why))
            return
        if self.session.auth_user is not None:
            yield from self._say(R.ALREADY_AUTH)
            return
        refused = self._out_of_sequence("AUTH")
        if refused is not None:
            yield from self._say(refused)
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            yield from self._say(R.SYNTAX_AUTH)
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech == "PLAIN":
            creds = yield from self._auth_plain(initial)
        elif mech == "LOGIN":
            creds = yield from self._auth_login(initial)
        else:
            yield from self._say(R.AUTH_BAD_MECH)
            return
        if creds is None:
            return
        user, password = creds
        yield from self._auth_lockout(failed=False)
        try:
            ok = bool((yield CheckPassword(user, password)))
        except HostFailure:
            yield from self._say(R.AUTH_TEMP)
            return
        yield Authenticated(user, ok)
        if not ok:
            yield from self._auth_lockout(failed=True)
            rule = f"accounts.{user}" if policy.has_account(user) else "accounts"
            verdict = Verdict(Action.REJECT, R.AUTH_FAILED, rule)
            # The password never reaches a log: only the user name does.
            yield Decided("auth", verdict, {"auth_user": user})
            yield from self._say(R.AUTH_FAILED, verdict)
            return
        self.session = attrs.evolve(self.session, auth_user=user)
        yield from self._say(R.AUTH_OK)

    def _auth_lockout(self, *, failed: bool) -> Steps:
        """The AUTH failure limit, per client and rate window, on any connection.

        Before a password is checked (``failed=False``) the failures so far
        are only read: once ``limit`` of them are counted, no password is
        checked any more (no more guesses). After a failure it is counted
        first. Past the limit: 421 and hang up. A store outage fails closed.
        """
        limit = self.policy.settings.server.max_auth_failures_per_client
        if limit <= 0:
            return
        window = self.policy.settings.security.connection_policy.rate_window_seconds
        client = str(self.session.client_ip)
        try:
            count = yield NeedCount("auth_failure", client, window, peek=not failed)
            over = count > limit if failed else count >= limit
        except HostFailure:
            over = True  # a store outage must not open guessing
        if not over:
            return
        reply = self._host(R.AUTH_LOCKOUT)
        verdict = Verdict(Action.DEFER, reply, "server.max_auth_failures_per_client")
        yield Decided("auth", verdict)
        yield from self._say(reply, verdict)
        raise _Hangup("too many failed authentications")

    def _challenge(self, prompt: bytes) -> Generator[Event, Any, bytes | None]:
        """One SASL round: a 334, then the client's base64 answer."""
        yield from self._say(Reply(334, None, sasl.challenge(prompt)))
        line = yield from self._line(SASL_LINE_LIMIT)
        if line is None:
            raise _Hangup("client closed the connection")
        if isinstance(line, _TooLong):
            yield from self._say(R.AUTH_LINE_TOO_LONG)
            return None
        line = line.strip()
        if line == b"*":
            yield from self._say(R.AUTH_ABORTED)
            return None
        decoded = sasl.decode(line)
        if decoded is None:
            yield from self._say(R.AUTH_BAD_CONTINUED)
        return decoded

    def _initial(self, initial: str) -> Generator[Event, Any, bytes | None]:
        decoded = sasl.decode(initial)
        if decoded is None:
            yield from self._say(R.AUTH_BAD_INITIAL)
        return decoded

    def _auth_plain(self, initial: str | None) -> Generator[Event, Any, tuple[str, str] | None]:
        if initial is None:
            blob = yield from self._challenge(b"")
        else:
            blob = yield from self._initial(initial)
        if blob is None:
            return None
        creds = sasl.split_plain(blob)
        if creds is None:
            yield from self._say(R.AUTH_MALFORMED)
        return creds

    def _auth_login(self, initial: str | None) -> Generator[Event, Any, tuple[str, str] | None]:
        if initial is None:
            user = yield from self._challenge(b"Username:")
        else:
            user = yield from self._initial(initial)
        if user is None:
            return None
        password = yield from self._challenge(b"Password:")
        if password is None:
            return None
        return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    def cmd_mail(self, arg: str) -> Steps:
        refused = self._out_of_sequence("MAIL")
        if refused is not None:
            yield from self._say(refused)
            return
        try:
            address, params = parse_mail_from(arg)
        except AddressError as e:
            yield from self._say(e.reply)
            return
        size, refused = check_mail_params(arg, params)
        if refused is not None:
            yield from self._say(refused)
            return
        try:
            yield from self._count(Stage.MAIL, address.written)
        except HostFailure:
            yield from self._say(R.TEMP_FAILURE)
            return
        sender = address.written
        verdict = yield from self._judge(Envelope(Stage.MAIL, sender=sender, declared_size=size))
        if verdict.action.refuses:
            yield from self._refuse(Stage.MAIL, verdict, sender=sender)
            return
        self._tx = _Transaction(sender, "SMTPUTF8" in params, size)
        ahead = self.policy.questions_ahead(self.session, sender)
        if ahead:
            yield Prefetch(ahead)
        yield from self._say(R.OK_MAIL, verdict if verdict.rule or verdict.observed else None)

    def cmd_rcpt(self, arg: str) -> Steps:
        refused = self._out_of_sequence("RCPT")
        if refused is not None:
            yield from self._say(refused)
            return
        tx = self._tx
        try:
            address, params = parse_rcpt_to(arg, smtputf8=tx.smtputf8)
        except AddressError as e:
            yield from self._say(e.reply)
            return
        refused = check_rcpt_params(arg, params)
        if refused is not None:
            yield from self._say(refused)
            return
        try:
            yield from self._count(Stage.RCPT, address.written)
        except HostFailure:
            yield from self._say(R.TEMP_FAILURE)
            return
        rcpt = address.written
        envelope = Envelope(
            Stage.RCPT,
            sender=tx.sender,
            recipient=rcpt,
            recipients=tuple(tx.rcpts),
            declared_size=tx.declared_size,
            discard=tx.discard.rule if tx.discard else None,
            smtputf8=tx.smtputf8,
        )
        verdict = yield from self._judge(envelope)
        yield Decided(Stage.RCPT, verdict, {"sender": tx.sender, "recipient": rcpt})
        if verdict.action.refuses:
            assert verdict.reply is not None
            yield from self._say(verdict.reply, verdict)
            return
        if verdict.action is Action.DISCARD and tx.discard is None:
            tx.discard = verdict
        if tx.discard is None:
            # a permanent reason the delivery already knows: refuse it now,
            # not after the client sent the whole message
            try:
                refusal: Reply | None = yield NeedRecipientCheck(rcpt)
            except HostFailure:
                refusal = None  # the delivery will say at the end of DATA
            if refusal is not None:
                refused_by = Verdict(
                    Action.DEFER if refusal.temporary else Action.REJECT,
                    refusal,
                    "delivery",
                    (Evidence("recipient", rcpt),),
                )
                yield from self._refuse(Stage.RCPT, refused_by, sender=tx.sender, recipient=rcpt)
                return
        tx.rcpts.append(rcpt)
        yield from self._say(R.OK_RCPT, verdict if verdict.rule or verdict.observed else None)

    def cmd_data(self, arg: str) -> Steps:
        if arg:
            yield from self._say(R.SYNTAX_DATA)
            return
        tx = self._tx
        refused = self._out_of_sequence("DATA")
        if refused is not None:
            yield from self._say(refused)
            return
        assert tx.sender is not None
        envelope = Envelope(
            Stage.DATA,
            sender=tx.sender,
            recipients=tuple(tx.rcpts),
            discard=tx.discard.rule if tx.discard else None,
        )
        verdict = yield from self._judge(envelope)
        if verdict.action.refuses:
            yield from self._refuse(Stage.DATA, verdict, sender=tx.sender)
            return
        yield from self._say(R.START_DATA)
        self._busy = self._in_data = True
        reader = DataReader(self.policy.settings.general.max_message_size)
        while not reader.feed(self._buf):
            if self._eof:
                # The client went away mid-message: nothing is delivered.
                self._busy = self._in_data = False
                raise _Hangup("client closed the connection during DATA")
            if reader.in_memory > self._memory_limit:
                yield Spool(reader.spill())
            yield from self._wait()
        self._in_data = False
        if reader.bare_lf and self._forbid_bare_lf:
            self._reset()
            raise _Hangup("bare LF", self._host(R.BARE_LF))
        if reader.spilled:
            yield Spool(reader.spill())
            try:
                content: bytes = yield NeedSpooled()
            except HostFailure as e:
                self._reset()
                self._busy = False
                yield Decided(
                    "delivery",
                    Verdict(Action.DEFER, R.QUEUE_WRITE_ERROR, None, (Evidence("error", str(e)),)),
                )
                yield from self._say(R.QUEUE_WRITE_ERROR)
                return
        else:
            content = reader.content()
        yield MessageReceived(content, reader.size)
        try:
            yield from self._end_of_data(content, reader.size)
        finally:
            self._busy = False

    def _end_of_data(self, content: bytes, size: int) -> Steps:
        tx = self._tx
        assert tx.sender is not None
        sender, rcpts, discard = tx.sender, tuple(tx.rcpts), tx.discard
        stamp: Stamp = yield NeedStamp()
        received = received_header(self.session, self.hostname, rcpts, stamp.queue_id, stamp.now)
        # The size judged is the message as we store it, our Received: header
        # included: Postfix's message_size_limit counts its queue file too.
        facts = message_facts(content, size + len(received), self.policy.settings.general)
        envelope = Envelope(Stage.END_OF_DATA, sender=sender, recipients=rcpts, message=facts)
        verdict = yield from self._judge(envelope)
        self._reset()
        if verdict.action.refuses:
            yield from self._refuse(Stage.END_OF_DATA, verdict, sender=sender, size=size)
            return
        queued = Reply(250, "2.0.0", f"Ok: queued as {stamp.queue_id}")
        if discard is not None:
            yield Decided(
                Stage.END_OF_DATA,
                discard,
                {
                    "sender": sender,
                    "size": size,
                    "recipients": list(rcpts),
                    "queue_id": stamp.queue_id,
                    "discarded": True,
                },
            )
            yield from self._say(queued, discard)
            return
        submission = Submission(
            sender, rcpts, received + content, content, stamp.queue_id, self.session
        )
        try:
            result: Reply = yield Deliver(submission)
        except HostFailure as e:
            result = R.QUEUE_WRITE_ERROR
            failure: tuple[Evidence, ...] = (Evidence("error", str(e)),)
        else:
            failure = ()
        action = (
            Action.ACCEPT
            if result.code < 400
            else Action.DEFER
            if result.temporary
            else Action.REJECT
        )
        yield Decided(
            "delivery",
            Verdict(action, result, None, failure),
            {"queue_id": stamp.queue_id, "sender": sender, "recipients": list(rcpts)},
        )
        yield from self._say(result)


_COMMANDS: Final[Mapping[str, Callable[[Connection, str], Steps]]] = {
    "HELO": Connection.cmd_helo,
    "EHLO": Connection.cmd_ehlo,
    "NOOP": Connection.cmd_noop,
    "RSET": Connection.cmd_rset,
    "QUIT": Connection.cmd_quit,
    "VRFY": Connection.cmd_vrfy,
    "STARTTLS": Connection.cmd_starttls,
    "AUTH": Connection.cmd_auth,
    "MAIL": Connection.cmd_mail,
    "RCPT": Connection.cmd_rcpt,
    "DATA": Connection.cmd_data,
}
