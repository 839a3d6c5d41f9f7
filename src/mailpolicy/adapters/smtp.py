"""The aiosmtpd binding: an SMTP server that asks the policy and answers like Postfix.

aiosmtpd gives us the asyncio protocol, the transport, STARTTLS and the idle
timeout. Nearly every reply must be Postfix's, with enhanced status codes, so
the command loop and the command handlers are ours: each handler parses the
command, builds the :class:`~mailpolicy.model.Envelope` for its stage, asks
the resolver for what :meth:`Policy.lookups` says is missing, and turns the
:class:`~mailpolicy.model.Verdict` into a reply.

Replay (:mod:`mailpolicy.adapters.replay`) runs this same class on a loopback
socket, so what replay prints is what a client would see.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email.parser
import email.policy
import ipaddress
import itertools
import logging
import secrets
import ssl
import time
from asyncio import sslproto
from base64 import b64decode, b64encode
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from aiosmtpd.smtp import SMTP as _AioSMTP

from ..addresses import AddressError, parse_mail_from, parse_rcpt_to
from ..evaluate import Memo
from ..model import (
    Action,
    Counters,
    Envelope,
    MessageFacts,
    Reply,
    Session,
    Stage,
    Verdict,
)
from ..policy import Policy
from .dns import Resolver
from .judge import TEMP_FAILURE, judge
from .state import HitKind, StateStore

__all__ = [
    "AcceptAllDelivery",
    "Delivery",
    "PolicySMTP",
    "ReplyRecord",
    "ServerOptions",
    "SessionObserver",
    "Submission",
]

log = logging.getLogger("mailpolicy.smtp")
decisions = logging.getLogger("mailpolicy.decisions")

#: Postfix's smtpd_hard_error_limit: after this many error replies, 421 and close.
HARD_ERROR_LIMIT = 20
#: rounds of DNS questions for one decision (the PTR, then its forward name)
MAX_DNS_ROUNDS = 4
#: commands after which RFC 2920 forbids sending more before the reply
_LAST_IN_GROUP = frozenset(
    {"EHLO", "HELO", "DATA", "VRFY", "EXPN", "TURN", "QUIT", "NOOP", "AUTH", "STARTTLS"}
)

#: Postfix's words for undecodable SASL data (recorded: 535 5.7.8)
_BAD_INITIAL = "Invalid base64 data in initial response"
_BAD_CONTINUED = "Invalid base64 data in continued response"

OK_MAIL = Reply(250, "2.1.0", "Ok")
OK_RCPT = Reply(250, "2.1.5", "Ok")


@attrs.frozen
class Submission:
    """An accepted message, handed to a :class:`Delivery`.

    ``message`` is what to deliver (our ``Received:`` header first);
    ``content`` is the message exactly as the client sent it, which stays the
    same when the client retries (see :mod:`.ledger`).
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes = attrs.field(repr=False)
    content: bytes = attrs.field(repr=False)
    queue_id: str
    session: Session


class Delivery(Protocol):
    """Where accepted messages go. Return the reply for the end of DATA:
    250 only once the message is safe; 4xx makes the client retry."""

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


@attrs.frozen
class ReplyRecord:
    """A reply as sent, and the verdict behind it (for replay and logs)."""

    reply: Reply
    verdict: Verdict | None


class SessionObserver(Protocol):
    """Sees one connection as it happens (:mod:`.capture` records sessions).

    It is told each command line as received (``pending``: more input had
    already arrived, i.e. the client pipelined), each reply, the AUTH user and
    outcome, the message and the session's end. A password never reaches it:
    an AUTH command line is passed with every argument after the mechanism
    replaced by ``<redacted>``, and SASL responses are not passed at all.
    """

    def connected(self, session: Session, now: float) -> None: ...

    def command(self, line: str, pending: bool) -> None: ...

    def reply(self, record: ReplyRecord) -> None: ...

    def authenticated(self, user: str, ok: bool) -> None: ...

    def message(self, content: bytes, size: int) -> None: ...

    def tls_started(self) -> None: ...

    def closed(self, session: Session | None) -> None: ...


def _observed_line(line: bytes) -> str:
    """A command line as an observer may see it: AUTH arguments redacted."""
    text = line.decode("utf-8", errors="surrogateescape")
    words = text.split()
    if words and words[0].upper() == "AUTH":
        return " ".join(words[:2] + ["<redacted>"] * len(words[2:]))
    return text


@attrs.define
class ServerOptions:
    """Everything a :class:`PolicySMTP` connection needs besides the policy."""

    resolver: Resolver
    delivery: Delivery = attrs.field(factory=AcceptAllDelivery)
    store: StateStore | None = None
    clock: Callable[[], float] = time.time
    tls_context: ssl.SSLContext | None = None
    #: the listener is implicit TLS (port 465): AUTH may be offered at once
    implicit_tls: bool = False
    timeout: float = 300
    #: replay and tests: judge this address instead of the socket's peer
    client_address: str | None = None
    #: called with each reply record (replay collects them)
    on_reply: Callable[[ReplyRecord], None] | None = None
    #: expect a HAProxy PROXY v1 line first (behind a load balancer, and in
    #: tests that replay sessions from other addresses over real sockets)
    proxy_protocol: bool = False
    #: implicit TLS that starts after the PROXY line (smtps behind a proxy)
    tls_after_proxy: bool = False
    #: makes an observer for each connection (``serve --capture``)
    observer: Callable[[], SessionObserver] | None = None


_queue_ids = itertools.count(1)


def _queue_id() -> str:
    return f"{secrets.token_hex(4).upper()}{next(_queue_ids):X}"


class PolicySMTP(_AioSMTP):
    """One SMTP connection, judged by ``policy``."""

    def __init__(self, policy: Policy, options: ServerOptions) -> None:
        g = policy.settings.general
        super().__init__(
            _NoHandler(),
            hostname=g.hostname,
            data_size_limit=None,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=options.tls_context,
            timeout=options.timeout,
            auth_require_tls=False,
        )
        self.policy = policy
        self.options = options
        self.observer = options.observer() if options.observer is not None else None
        self.mp: Session | None = None
        #: the core's memo for this connection's decisions
        self._memo = Memo()
        self._errors = 0
        #: receiving or delivering a message: a graceful shutdown waits for it
        self.busy = False
        #: reading the message: the client is the one who must keep talking
        self._in_data = False
        #: called with this protocol once the connection is gone
        self.on_close: Callable[[PolicySMTP], None] | None = None
        self._reset_transaction()

    # -- transaction state -------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.smtputf8 = False
        self.declared_size: int | None = None
        self.rcpts: list[str] = []
        self.rcpt_attempted = False
        self.discard: Verdict | None = None

    # -- replies -------------------------------------------------------------

    async def reply(self, r: Reply, verdict: Verdict | None = None) -> None:
        if r.code >= 400:
            self._errors += 1
        if self.options.on_reply is not None:
            self.options.on_reply(ReplyRecord(r, verdict))
        if self.observer is not None:
            self.observer.reply(ReplyRecord(r, verdict))
        lines = r.text.split("\n")
        prefix = f"{r.enhanced} " if r.enhanced else ""
        out = [f"{r.code}-{prefix}{ln}" for ln in lines[:-1]]
        out.append(f"{r.code} {prefix}{lines[-1]}")
        await self.push("\r\n".join(out))

    async def _say(self, code: int, enhanced: str | None, text: str) -> None:
        await self.reply(Reply(code, enhanced, text))

    async def _refuse(self, r: Reply, rule: str) -> None:
        """A refusal the adapter decides from a setting: named like the core's."""
        action = Action.DEFER if r.temporary else Action.REJECT
        await self.reply(r, Verdict(action, r, rule))

    def _log_decision(self, stage: Stage, verdict: Verdict, **facts: object) -> None:
        assert self.mp is not None
        fields: dict[str, object] = {
            "client": str(self.mp.client_ip),
            "helo": self.mp.helo,
            "stage": stage.value,
            "action": verdict.action.value,
            "rule": verdict.rule,
            "reply": str(verdict.reply) if verdict.reply else None,
            "evidence": [str(e) for e in verdict.evidence],
        }
        fields.update(facts)
        level = logging.INFO if verdict.action is not Action.ACCEPT else logging.DEBUG
        decisions.log(level, "%s", verdict.explain(), extra={"decision": fields})

    # -- asking the policy ----------------------------------------------------------

    async def judge(self, envelope: Envelope) -> Verdict:
        """Gather the DNS facts the policy needs, then decide. Never raises."""
        assert self.mp is not None
        self.mp, verdict = await judge(
            self.policy,
            self.mp,
            envelope,
            self.options.resolver,
            self._memo,
            rounds=MAX_DNS_ROUNDS,
        )
        return verdict

    async def _count(self, kind: HitKind, stage: Stage, counter: str) -> int:
        """Count this event in the state store when the policy reads its
        counter at ``stage``."""
        store = self.options.store
        if store is None or counter not in self.policy.counters(stage):
            return 0
        assert self.mp is not None
        window = self.policy.settings.security.connection_policy.rate_window_seconds
        return await store.hit(kind, str(self.mp.client_ip), self.options.clock(), window)

    # -- the connection ------------------------------------------------------------

    def _client_ip(self) -> str:
        if self.options.client_address:
            return self.options.client_address
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return "127.0.0.1"

    def connection_lost(self, error: Exception | None) -> None:
        if self.observer is not None:
            self.observer.closed(self.mp)
            self.observer = None
        if self.on_close is not None:
            self.on_close(self)
        store = self.options.store
        if store is not None and self._counted_connection and self.mp is not None:
            task = self.loop.create_task(store.connection_closed(str(self.mp.client_ip)))
            task.add_done_callback(_log_task_error)
        super().connection_lost(error)

    _counted_connection = False

    async def _read_proxy_header(self) -> str | None:
        """The client address from a PROXY v1 line, or None if it is bad."""
        try:
            line = await asyncio.wait_for(self._reader.readuntil(b"\r\n"), timeout=10)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        parts = line.decode("ascii", "replace").split()
        if len(parts) == 6 and parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6"):
            try:
                return str(ipaddress.ip_address(parts[2]))
            except ValueError:
                return None
        return None

    async def _connect(self) -> bool:
        """Connect-stage checks. False when the client was sent away."""
        client = self._client_ip()
        if self.options.proxy_protocol:
            proxied = await self._read_proxy_header()
            if proxied is None:
                log.warning("bad or missing PROXY header from %s", client)
                return False
            client = proxied
            if self.options.tls_after_proxy and not await self._start_tls(carry_over=True):
                return False
        self.mp = Session(client, tls=self.options.implicit_tls)
        if self.observer is not None:
            self.observer.connected(self.mp, self.options.clock())
        cp = self.policy.settings.security.connection_policy
        store = self.options.store
        if store is not None and self.policy.counters(Stage.CONNECT):
            try:
                count, rate = await store.connection_opened(
                    str(self.mp.client_ip), self.options.clock(), cp.rate_window_seconds
                )
                self._counted_connection = True
            except Exception:
                log.exception("state store failed at connect")
                await self._say(421, "4.3.0", f"{self.hostname} Error: temporary failure")
                return False
            self.mp = attrs.evolve(
                self.mp, counters=Counters(connections=count, connection_rate=rate)
            )
        verdict = await self.judge(Envelope(Stage.CONNECT))
        if verdict.action.refuses:
            self._log_decision(Stage.CONNECT, verdict)
            assert verdict.reply is not None
            await self.reply(verdict.reply, verdict)
            return False
        await self._say(220, None, self.policy.settings.general.banner_text)
        return True

    async def _handle_client(self) -> None:
        if not await self._connect():
            self._close()
            return
        while self.transport is not None:
            try:
                if self._errors >= HARD_ERROR_LIMIT:
                    # As Postfix's smtpd: checked before reading another command.
                    await self._say(421, "4.7.0", f"{self.hostname} Error: too many errors")
                    self._close()
                    return
                line = await self._read_command_line()
                if line is None:
                    continue
                if self.observer is not None:
                    self.observer.command(_observed_line(line), self._more_input_pending())
                await self._dispatch(line)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception:
                log.exception("SMTP session error")
                await self.reply(TEMP_FAILURE)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def shut_down(self) -> None:
        """Server shutdown: tell the client, then close (RFC 5321 3.8)."""
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._say(421, "4.3.2", f"{self.hostname} Service shutting down")
            self._close()

    def _timeout_cb(self) -> None:
        if self.busy and not self._in_data:
            # We are the slow one (delivering): the client is waiting for us.
            self._reset_timeout()
            return
        # Postfix says why it hangs up on an idle client; aiosmtpd just closes.
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        self._close()

    async def _read_command_line(self) -> bytes | None:
        try:
            line: bytes = await self._reader.readuntil()
        except asyncio.LimitOverrunError as error:
            await self._reader.read(error.consumed)
            while True:
                try:
                    await self._reader.readuntil()
                    break
                except asyncio.LimitOverrunError as e:
                    await self._reader.read(e.consumed)
            await self._say(500, "5.5.0", "Error: line too long")
            return None
        except asyncio.IncompleteReadError:
            self._close()
            return None
        return line.rstrip(b"\r\n")

    def _more_input_pending(self) -> bool:
        # asyncio.StreamReader keeps what arrived in _buffer; Postfix does the
        # same check (vstream_peek) to spot a client talking ahead of us.
        return bool(getattr(self._reader, "_buffer", b""))

    async def _dispatch(self, line: bytes) -> None:
        assert self.mp is not None
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            await self._say(500, "5.5.2", "Error: bad syntax")
            return
        if not verb:
            await self._say(500, "5.5.2", "Error: bad syntax")
            return
        arg = arg_bytes.decode("utf-8", errors="surrogateescape").strip()
        # RFC 2920: a client may send ahead only after EHLO, and never past a
        # command that ends a group (Postfix's reject_unauth_pipelining test).
        if (
            not self.mp.improper_pipelining
            and self._more_input_pending()
            and (not self.mp.esmtp or verb in _LAST_IN_GROUP)
        ):
            self.mp = attrs.evolve(self.mp, improper_pipelining=True)
        handler = _COMMANDS.get(verb)
        if handler is None:
            await self._say(500, "5.5.2", "Error: command not recognized")
            return
        self._reset_timeout()
        await handler(self, arg)

    # -- commands --------------------------------------------------------------

    async def cmd_helo(self, arg: str) -> None:
        assert self.mp is not None
        if not arg:
            await self._say(501, None, "Syntax: HELO hostname")
            return
        self._reset_transaction()
        self.mp = attrs.evolve(self.mp, helo=arg, esmtp=False)
        await self._say(250, None, self.hostname)

    async def cmd_ehlo(self, arg: str) -> None:
        assert self.mp is not None
        if not arg:
            await self._say(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self._reset_transaction()
        self.mp = attrs.evolve(self.mp, helo=arg, esmtp=True)
        size = self.policy.settings.general.max_message_size
        caps = [self.hostname, "PIPELINING", f"SIZE {size}" if size else "SIZE"]
        if self.tls_context is not None and not self.mp.tls:
            caps.append("STARTTLS")
        if self.policy.auth_offered(self.mp):
            caps.append("AUTH PLAIN LOGIN")
        caps += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        await self._say(250, None, "\n".join(caps))

    async def cmd_noop(self, arg: str) -> None:
        await self._say(250, "2.0.0", "Ok")

    async def cmd_rset(self, arg: str) -> None:
        if arg:
            await self._say(501, "5.5.4", "Syntax: RSET")
            return
        self._reset_transaction()
        await self._say(250, "2.0.0", "Ok")

    async def cmd_quit(self, arg: str) -> None:
        await self._say(221, "2.0.0", "Bye")
        self._close()

    async def cmd_vrfy(self, arg: str) -> None:
        assert self.mp is not None
        verdict = await self.judge(Envelope(Stage.VRFY, recipient=arg or None))
        if verdict.action.refuses:
            assert verdict.reply is not None
            await self.reply(verdict.reply, verdict)
            return
        if not arg:
            await self._say(501, "5.5.4", "Syntax: VRFY address")
            return
        await self._say(252, "2.0.0", arg)

    async def cmd_starttls(self, arg: str) -> None:
        assert self.mp is not None
        if arg:
            await self._say(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.mp.tls:
            await self._say(554, "5.5.1", "Error: TLS already active")
            return
        if self.tls_context is None:
            await self._say(502, "5.5.1", "Error: command not implemented")
            return
        await self._say(220, "2.0.0", "Ready to start TLS")
        if not await self._start_tls():
            return
        # RFC 3207 4.2: forget everything the client said before TLS.
        self._reset_transaction()
        self.mp = attrs.evolve(self.mp, tls=True, helo=None, esmtp=False, auth_user=None)

    async def _start_tls(self, *, carry_over: bool = False) -> bool:
        """Wrap the connection in TLS (server side). False if the handshake failed.

        ``carry_over``: bytes already read past the last line are the start of
        the handshake (implicit TLS after a PROXY line) and go to TLS. Without
        it they are dropped, as RFC 3207 requires after STARTTLS (plaintext
        sent ahead must never run as if it came under TLS).
        """
        assert self.tls_context is not None
        buffer: bytearray = getattr(self._reader, "_buffer", bytearray())
        leftover = bytes(buffer) if carry_over else b""
        buffer.clear()
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        original = self.transport
        assert original is not None
        self._original_transport = original
        original.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(original)
        if leftover:
            _feed(self._tls_protocol, leftover)
        try:
            await waiter
        except Exception:
            log.info("TLS handshake failed with %s", self._client_ip())
            self._close()
            return False
        return True
        if self.observer is not None:
            self.observer.tls_started()

    async def cmd_auth(self, arg: str) -> None:
        assert self.mp is not None
        if not self.policy.auth_offered(self.mp):
            auth = self.policy.settings.general.smtp_auth
            why = (
                "general.smtp_auth.no_plaintext_without_tls"
                if auth.enabled and self.policy.settings.accounts and not self.mp.tls
                else "general.smtp_auth.enabled"
            )
            await self._refuse(Reply(503, "5.5.1", "Error: authentication not enabled"), why)
            return
        if self.mp.auth_user is not None:
            await self._say(503, "5.5.1", "Error: already authenticated")
            return
        if self.mail_from is not None:
            await self._say(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            await self._say(501, "5.5.4", "Syntax: AUTH mechanism")
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech == "PLAIN":
            creds = await self._auth_plain(initial)
        elif mech == "LOGIN":
            creds = await self._auth_login(initial)
        else:
            await self._say(
                535, "5.7.8", "Error: authentication failed: Invalid authentication mechanism"
            )
            return
        if creds is None:
            return
        user, password = creds
        if await self._auth_lockout(failed=False):
            return
        ok = await asyncio.to_thread(self.policy.check_password, user, password)
        if self.observer is not None:
            self.observer.authenticated(user, ok)
        if not ok:
            if await self._auth_lockout(failed=True):
                return
            # The password never reaches a log: only the user name does.
            decisions.info(
                "AUTH failed for %r from %s",
                user,
                self.mp.client_ip,
                extra={
                    "decision": {
                        "client": str(self.mp.client_ip),
                        "stage": "auth",
                        "action": "reject",
                        "auth_user": user,
                    }
                },
            )
            await self._refuse(
                Reply(535, "5.7.8", "Error: authentication failed: authentication failure"),
                f"accounts.{user}" if self.policy.has_account(user) else "accounts",
            )
            return
        self.mp = attrs.evolve(self.mp, auth_user=user)
        await self._say(235, "2.7.0", "Authentication successful")

    async def _auth_lockout(self, *, failed: bool) -> bool:
        """The AUTH failure limit, per client and rate window, on any connection.

        Before a password is checked (``failed=False``) the failures so far
        are only looked at: once ``limit`` of them are counted, no password
        is checked any more (no more guesses). After a failure it is counted
        first. Past the limit: 421 and hang up. A store outage fails closed.
        """
        assert self.mp is not None
        limit = self.policy.settings.server.max_auth_failures_per_client
        store = self.options.store
        if store is None or limit <= 0:
            return False
        window = self.policy.settings.security.connection_policy.rate_window_seconds
        client, now = str(self.mp.client_ip), self.options.clock()
        try:
            if failed:
                over = await store.hit("auth_failure", client, now, window) > limit
            else:
                over = await store.peek("auth_failure", client, now, window) >= limit
        except Exception:
            log.exception("state store failed with AUTH failures")
            over = True  # fail closed: a store outage must not open guessing
        if not over:
            return False
        decisions.warning(
            "too many AUTH failures from %s",
            client,
            extra={
                "decision": {
                    "client": client,
                    "stage": "auth",
                    "action": "defer",
                    "rule": "server.max_auth_failures_per_client",
                }
            },
        )
        await self._refuse(
            Reply(421, "4.7.0", f"{self.hostname} Error: too many failed authentications"),
            "server.max_auth_failures_per_client",
        )
        self._close()
        return True

    async def _challenge(self, prompt: bytes) -> bytes | None:
        """One SASL round: send a 334, read the client's base64 answer."""
        await self.reply(Reply(334, None, _b64(prompt).decode("ascii")))
        line = (await self._reader.readline()).strip()
        if line == b"*":
            await self._say(501, "5.7.0", "Authentication aborted")
            return None
        try:
            return b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            await self._say(535, "5.7.8", "Error: authentication failed: " + _BAD_CONTINUED)
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[str, str] | None:
        if initial is None:
            blob = await self._challenge(b"")
        else:
            try:
                blob = b64decode(initial, validate=True)
            except (binascii.Error, ValueError):
                await self._say(535, "5.7.8", "Error: authentication failed: " + _BAD_INITIAL)
                return None
        if blob is None:
            return None
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self._say(535, "5.7.8", "Error: authentication failed: malformed response")
            return None
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")

    async def _auth_login(self, initial: str | None) -> tuple[str, str] | None:
        if initial is None:
            user = await self._challenge(b"Username:")
        else:
            try:
                user = b64decode(initial, validate=True)
            except (binascii.Error, ValueError):
                await self._say(535, "5.7.8", "Error: authentication failed: " + _BAD_INITIAL)
                return None
        if user is None:
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    async def cmd_mail(self, arg: str) -> None:
        assert self.mp is not None
        if self.mail_from is not None:
            await self._say(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            address, params = parse_mail_from(arg)
        except AddressError as e:
            await self._say(e.reply_code, e.enhanced, e.text)
            return
        size: int | None = None
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    await self._say(501, "5.5.4", "Bad message size syntax")
                    return
                size = int(value)
            elif key in ("BODY", "SMTPUTF8", "AUTH"):
                continue
            else:
                await self._say(555, "5.5.4", f"Unsupported option: {key}")
                return
        try:
            rate = await self._count("message", Stage.MAIL, "message_rate")
        except Exception:
            log.exception("state store failed at MAIL")
            await self.reply(TEMP_FAILURE)
            return
        if rate:
            self.mp = attrs.evolve(
                self.mp, counters=attrs.evolve(self.mp.counters, message_rate=rate)
            )
        sender = address.text
        verdict = await self.judge(Envelope(Stage.MAIL, sender=sender, declared_size=size))
        if verdict.action.refuses:
            self._log_decision(Stage.MAIL, verdict, sender=sender)
            assert verdict.reply is not None
            await self.reply(verdict.reply, verdict)
            return
        self.mail_from = sender
        self.declared_size = size
        self.smtputf8 = "SMTPUTF8" in params
        await self.reply(OK_MAIL, verdict if verdict.rule else None)

    async def cmd_rcpt(self, arg: str) -> None:
        assert self.mp is not None
        if self.mail_from is None:
            await self._say(503, "5.5.1", "Error: need MAIL command")
            return
        try:
            address, _params = parse_rcpt_to(arg, smtputf8=self.smtputf8)
        except AddressError as e:
            await self._say(e.reply_code, e.enhanced, e.text)
            return
        self.rcpt_attempted = True
        try:
            rate = await self._count("recipient", Stage.RCPT, "recipient_rate")
        except Exception:
            log.exception("state store failed at RCPT")
            await self.reply(TEMP_FAILURE)
            return
        if rate:
            self.mp = attrs.evolve(
                self.mp, counters=attrs.evolve(self.mp.counters, recipient_rate=rate)
            )
        rcpt = address.text
        envelope = Envelope(
            Stage.RCPT,
            sender=self.mail_from,
            recipient=rcpt,
            recipients=tuple(self.rcpts),
            declared_size=self.declared_size,
            discard=self.discard.rule if self.discard else None,
            smtputf8=self.smtputf8,
        )
        verdict = await self.judge(envelope)
        self._log_decision(Stage.RCPT, verdict, sender=self.mail_from, recipient=rcpt)
        if verdict.action.refuses:
            assert verdict.reply is not None
            await self.reply(verdict.reply, verdict)
            return
        if verdict.action is Action.DISCARD and self.discard is None:
            self.discard = verdict
        self.rcpts.append(rcpt)
        await self.reply(OK_RCPT, verdict if verdict.rule else None)

    async def cmd_data(self, arg: str) -> None:
        assert self.mp is not None
        if arg:
            await self._say(501, "5.5.4", "Syntax: DATA")
            return
        if self.mail_from is None:
            await self._say(503, "5.5.1", "Error: need RCPT command")
            return
        if not self.rcpts:
            if self.rcpt_attempted:
                await self._say(554, "5.5.1", "Error: no valid recipients")
            else:
                await self._say(503, "5.5.1", "Error: need RCPT command")
            return
        envelope = Envelope(
            Stage.DATA,
            sender=self.mail_from,
            recipients=tuple(self.rcpts),
            discard=self.discard.rule if self.discard else None,
        )
        verdict = await self.judge(envelope)
        if verdict.action.refuses:
            self._log_decision(Stage.DATA, verdict, sender=self.mail_from)
            assert verdict.reply is not None
            await self.reply(verdict.reply, verdict)
            return
        await self._say(354, None, "End data with <CR><LF>.<CR><LF>")
        self.busy = self._in_data = True
        try:
            content, size = await self._read_data()
            self._in_data = False
            if content is None:
                return
            if self.observer is not None:
                self.observer.message(content, size)
            await self._end_of_data(content, size)
        finally:
            self.busy = self._in_data = False

    async def _read_data(self) -> tuple[bytes | None, int]:
        """Read the message up to the lone dot. Past the size limit the rest is
        counted but not kept, so a huge message cannot exhaust memory."""
        limit = self.policy.settings.general.max_message_size
        keep: list[bytes] = []
        size = 0
        partial = b""
        while self.transport is not None:
            try:
                chunk: bytes = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as e:
                # A long line is not an error for us (Postfix accepts them).
                chunk = await self._reader.read(e.consumed)
            except asyncio.IncompleteReadError:
                self._close()
                return None, 0
            self._reset_timeout()
            if not partial and chunk == b".\r\n":
                return b"".join(keep), size
            if not partial and chunk.startswith(b"."):
                chunk = chunk[1:]
            partial = b"" if chunk.endswith(b"\r\n") else b"x"
            size += len(chunk)
            if not limit or size <= limit:
                keep.append(chunk)
        return None, 0

    async def _end_of_data(self, content: bytes, size: int) -> None:
        assert self.mp is not None and self.mail_from is not None
        queue_id = _queue_id()
        received = self._received_header(tuple(self.rcpts), queue_id)
        # The size judged is the message as we store it, our Received: header
        # included: Postfix's message_size_limit counts its queue file too.
        facts = self._message_facts(content, size + len(received))
        envelope = Envelope(
            Stage.END_OF_DATA, sender=self.mail_from, recipients=tuple(self.rcpts), message=facts
        )
        verdict = await self.judge(envelope)
        sender, rcpts, discard = self.mail_from, tuple(self.rcpts), self.discard
        self._reset_transaction()
        if verdict.action.refuses:
            self._log_decision(Stage.END_OF_DATA, verdict, sender=sender, size=size)
            assert verdict.reply is not None
            await self.reply(verdict.reply, verdict)
            return
        if discard is not None:
            self._log_decision(
                Stage.END_OF_DATA,
                discard,
                sender=sender,
                size=size,
                recipients=list(rcpts),
                queue_id=queue_id,
                discarded=True,
            )
            await self.reply(Reply(250, "2.0.0", f"Ok: queued as {queue_id}"), discard)
            return
        message = received + content
        try:
            submission = Submission(sender, rcpts, message, content, queue_id, self.mp)
            result = await self.options.delivery.deliver(submission)
        except Exception:
            log.exception("delivery failed for queue id %s", queue_id)
            result = Reply(451, "4.3.0", "Error: queue file write error")
        decisions.info(
            "message %s from <%s> to %s: %s",
            queue_id,
            sender,
            ",".join(rcpts),
            result,
            extra={
                "decision": {
                    "client": str(self.mp.client_ip),
                    "stage": "delivery",
                    "queue_id": queue_id,
                    "sender": sender,
                    "recipients": list(rcpts),
                    "reply": str(result),
                }
            },
        )
        await self.reply(result)

    def _message_facts(self, content: bytes, size: int) -> MessageFacts:
        g = self.policy.settings.general
        header_end = content.find(b"\r\n\r\n")
        head = content if header_end < 0 else content[: header_end + 2]
        received = sum(1 for ln in head.split(b"\r\n") if ln[:9].lower() == b"received:")
        largest = 0
        forwarded = False
        if g.max_attachment_size > 0 or g.disable_auto_forwarding:
            msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
            if g.max_attachment_size > 0:
                for part in msg.walk():
                    if part.is_multipart():
                        continue
                    if part.get_content_disposition() == "attachment" or part.get_filename():
                        payload = part.get_payload(decode=True)
                        if isinstance(payload, bytes):
                            largest = max(largest, len(payload))
            if g.disable_auto_forwarding:
                auto = str(msg.get("Auto-Submitted", "")).strip().lower()
                forwarded = (
                    auto.startswith("auto-forwarded")
                    or "Resent-From" in msg
                    or "Resent-Sender" in msg
                )
        return MessageFacts(
            size=size,
            received_headers=received,
            largest_attachment=largest,
            auto_forwarded=forwarded,
        )

    def _received_header(self, rcpts: tuple[str, ...], queue_id: str) -> bytes:
        assert self.mp is not None
        from email.utils import formatdate

        helo = _header_safe(self.mp.helo or "unknown")
        proto = "ESMTP" if self.mp.esmtp else "SMTP"
        if self.mp.tls:
            proto += "S"
        if self.mp.auth_user is not None:
            proto += "A"
        date = formatdate(self.options.clock(), localtime=False)
        for_part = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        text = (
            f"Received: from {helo} ([{self.mp.client_ip}])\r\n"
            f"\tby {self.hostname} (mailpolicy) with {proto} id {queue_id}{for_part};"
            f" {date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")


#: what Postfix's smtpd neuters in a HELO name before it reaches a header
_NEUTER = str.maketrans(dict.fromkeys('<>()\\";:@', "?"))


def _header_safe(text: str) -> str:
    """A client-supplied name fit for our Received: header: printable ASCII
    only (no CR/LF header injection, no NUL), Postfix's specials neutered."""
    cleaned = "".join(c if " " < c < "\x7f" else "?" for c in text[:255])
    return cleaned.translate(_NEUTER)


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand bytes already read to a protocol, buffered or not."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        while data:
            buf = memoryview(protocol.get_buffer(len(data))).cast("B")
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            protocol.buffer_updated(n)
            data = data[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


def _b64(data: bytes) -> bytes:
    return b64encode(data)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("state store update failed: %s", task.exception())


class _NoHandler:
    """aiosmtpd wants a handler object; every command is ours."""


_COMMANDS: dict[str, Callable[[PolicySMTP, str], Any]] = {
    "HELO": PolicySMTP.cmd_helo,
    "EHLO": PolicySMTP.cmd_ehlo,
    "NOOP": PolicySMTP.cmd_noop,
    "RSET": PolicySMTP.cmd_rset,
    "QUIT": PolicySMTP.cmd_quit,
    "VRFY": PolicySMTP.cmd_vrfy,
    "STARTTLS": PolicySMTP.cmd_starttls,
    "AUTH": PolicySMTP.cmd_auth,
    "MAIL": PolicySMTP.cmd_mail,
    "RCPT": PolicySMTP.cmd_rcpt,
    "DATA": PolicySMTP.cmd_data,
}
