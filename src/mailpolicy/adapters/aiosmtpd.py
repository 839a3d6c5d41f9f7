"""mailpolicy inside someone else's aiosmtpd server, through handler hooks.

:class:`PolicyHandler` wraps the application's own aiosmtpd handler::

    from aiosmtpd.controller import Controller
    from mailpolicy.adapters.aiosmtpd import PolicyHandler

    controller = Controller(PolicyHandler(policy, handler=MyHandler(), resolver=resolver))

Only aiosmtpd's documented hooks are used (``handle_EHLO``, ``handle_HELO``,
``handle_MAIL``, ``handle_RCPT``, ``handle_DATA``, ``handle_VRFY``,
``handle_QUIT``). At each of them the policy judges the stage; a refusal is
the policy's reply (Postfix's code, enhanced code and text), an acceptance
goes on to the wrapped handler's hook of the same name, or to aiosmtpd's
default behaviour when it has none. Any other ``handle_*`` or ``auth_*``
attribute of the wrapped handler (``handle_NOOP``, ``handle_RSET``,
``handle_AUTH``, ``handle_exception``, ...) is passed through untouched.

aiosmtpd parses the commands and sends its own replies for everything the
hooks do not see (syntax errors, sequencing, EHLO keywords, AUTH), so this is
a policy, not Postfix's dialogue: ``mailpolicy serve`` is that.
docs/aiosmtpd.md lists the differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession

from ..counting import rates_to_count
from ..dialogue import Decided, Observed
from ..dialogue.message import message_facts
from ..evaluate import Memo
from ..model import (
    Action,
    Counters,
    Envelope,
    Reply,
    Session,
    Stage,
    Verdict,
)
from ..policy import Policy
from .dns import Resolver
from .driver import log_decision, log_observed
from .judge import TEMP_FAILURE, judge
from .state import StateStore

__all__ = ["PolicyHandler"]

log = logging.getLogger("mailpolicy.aiosmtpd")
decisions = logging.getLogger("mailpolicy.decisions")


#: aiosmtpd's own replies when a hook is absent (smtp.py), kept when we accept
_OK = "250 OK"
_VRFY_DEFAULT = "252 Cannot VRFY user, but will accept message and attempt delivery"
_BYE = "221 Bye"


@attrs.define
class _Connection:
    """What outlives a STARTTLS on one aiosmtpd connection (its SMTP instance)."""

    client: str
    counters: Counters = attrs.field(factory=Counters)
    #: the connect-stage refusal, repeated to every later command
    refusal: Verdict | None = None
    #: releases the concurrent-connection count (once)
    release: weakref.finalize[Any, Any] | None = None


def _client_ip(session: AioSession) -> str:
    """The client's address: the PROXY header's source, else the socket peer."""
    proxy = session.proxy_data
    if proxy is not None and proxy.valid and proxy.src_addr is not None:
        return str(proxy.src_addr)
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "127.0.0.1"  # a Unix socket: a local client


def _auth_user(session: AioSession) -> str | None:
    """The AUTH login, for an aiosmtpd ``authenticator`` that succeeded."""
    if not session.authenticated:
        return None
    login = getattr(session.auth_data, "login", None)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return "" if login is None else str(login)


def _sender(envelope: AioEnvelope) -> str | None:
    """aiosmtpd's MAIL FROM address as the core wants it (``""`` for ``<>``)."""
    sender = envelope.mail_from
    return "" if sender == "<>" else sender


def _declared_size(options: list[str]) -> int | None:
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class PolicyHandler:
    """An aiosmtpd handler that judges each stage with ``policy`` first.

    ``handler`` is the application's own handler (or ``None``): its hooks
    run after the policy accepted, so they can still refuse. ``resolver``
    answers the policy's DNS questions (:class:`~mailpolicy.adapters.dns.LiveResolver`,
    or a :class:`~mailpolicy.adapters.dns.StaticZone` in tests). With a
    ``store`` (:class:`~mailpolicy.adapters.state.MemoryStore`, Redis) the
    connection, message and recipient limits count per client. ``clock``
    gives the time for those counts. ``implicit_tls``: the listener is TLS
    from the start (aiosmtpd only fills ``session.ssl`` after STARTTLS).
    """

    def __init__(
        self,
        policy: Policy,
        handler: object | None = None,
        *,
        resolver: Resolver,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.time,
        implicit_tls: bool = False,
    ) -> None:
        self.policy = policy
        self.handler = handler
        self.resolver = resolver
        self.store = store
        self.clock = clock
        self.implicit_tls = implicit_tls
        # aiosmtpd makes a new Session (and Envelope) after STARTTLS, RSET,
        # HELO and each message; its SMTP instance lives as long as the
        # connection. Our state hangs off those objects and dies with them.
        self._connections: weakref.WeakKeyDictionary[SMTP, _Connection] = (
            weakref.WeakKeyDictionary()
        )
        self._sessions: weakref.WeakKeyDictionary[AioSession, Session] = weakref.WeakKeyDictionary()
        #: what the policy derived for each connection (see mailpolicy.Memo)
        self._memos: weakref.WeakKeyDictionary[AioSession, Memo] = weakref.WeakKeyDictionary()
        self._discards: weakref.WeakKeyDictionary[AioEnvelope, Verdict] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    # -- passing the rest through -------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # aiosmtpd looks hooks and AUTH mechanisms up by name (dir + getattr):
        # those we do not judge are the wrapped handler's.
        if name.startswith(("handle_", "auth_")) and self.handler is not None:
            return getattr(self.handler, name)
        raise AttributeError(name)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        if self.handler is not None:
            names.update(n for n in dir(self.handler) if n.startswith(("handle_", "auth_")))
        return sorted(names)

    def _hook(self, name: str) -> Callable[..., Awaitable[Any]] | None:
        hook = getattr(self.handler, name, None) if self.handler is not None else None
        return hook if callable(hook) else None

    # -- state -------------------------------------------------------------------

    async def _connection(self, server: SMTP, session: AioSession) -> _Connection:
        """The connection's state; the connect stage is judged on first use."""
        conn = self._connections.get(server)
        if conn is not None:
            return conn
        conn = _Connection(_client_ip(session))
        self._connections[server] = conn
        cp = self.policy.settings.security.connection_policy
        store = self.store
        if store is not None and self.policy.counters(Stage.CONNECT):
            try:
                count, rate = await store.connection_opened(
                    conn.client, self.clock(), cp.rate_window_seconds
                )
            except Exception:
                log.exception("state store failed at connect")
                hostname = self.policy.settings.general.hostname
                reply = Reply(421, "4.3.0", f"{hostname} Error: temporary failure")
                conn.refusal = Verdict(Action.DEFER, reply, "internal.error")
                return conn
            conn.counters = Counters(connections=count, connection_rate=rate)
            loop = asyncio.get_running_loop()
            release = weakref.finalize(server, _release, loop, self._closed, conn.client)
            conn.release = release
            self._keep(loop.create_task(_watch(weakref.ref(server), release)))
        core = Session(conn.client, tls=self.implicit_tls, counters=conn.counters)
        _, verdict = await judge(self.policy, core, Envelope(Stage.CONNECT), self.resolver)
        if verdict.action.refuses:
            conn.refusal = verdict
            self._log(Stage.CONNECT, core, verdict)
        return conn

    def _closed(self, client: str) -> None:
        """The connection is gone: count it out (on the event loop)."""
        store = self.store
        if store is None:
            return
        self._keep(asyncio.get_running_loop().create_task(store.connection_closed(client)))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("state store update failed: %s", task.exception())

    def _session(self, conn: _Connection, session: AioSession) -> Session:
        """The core's view of ``session``, with the DNS answers gathered so far."""
        core = self._sessions.get(session)
        if core is None:
            core = Session(conn.client, counters=conn.counters)
        helo = session.host_name or None
        esmtp = bool(session.extended_smtp)
        tls = self.implicit_tls or session.ssl is not None
        user = _auth_user(session)
        if (core.helo, core.esmtp, core.tls, core.auth_user) != (helo, esmtp, tls, user):
            core = attrs.evolve(core, helo=helo, esmtp=esmtp, tls=tls, auth_user=user)
        self._sessions[session] = core
        return core

    async def _count(self, core: Session, stage: Stage, address: str) -> Session:
        """Count a MAIL or RCPT when the policy judges its rates (per
        client, login, domain, server: :func:`~mailpolicy.counting.rates_to_count`);
        raises if the store fails."""
        todo = rates_to_count(self.policy, stage, core, address)
        if self.store is None or not todo:
            return core
        window = self.policy.settings.security.connection_policy.rate_window_seconds
        counts: dict[str, int] = {}
        for rate in todo:
            counts[rate.field] = (
                0
                if rate.key is None
                else await self.store.hit(rate.kind, rate.key, self.clock(), window)  # type: ignore[arg-type]
            )
        return attrs.evolve(core, counters=attrs.evolve(core.counters, **counts))

    async def _decide(self, session: AioSession, core: Session, envelope: Envelope) -> Verdict:
        memo = self._memos.get(session)
        if memo is None:
            memo = self._memos[session] = Memo()
        core, verdict = await judge(self.policy, core, envelope, self.resolver, memo)
        self._sessions[session] = core
        if verdict.observed:
            log_observed(core, Observed(envelope.stage, verdict))
        return verdict

    def _log(self, stage: Stage, core: Session, verdict: Verdict, **facts: object) -> None:
        log_decision(core, Decided(stage, verdict, facts))

    def _refusal(self, stage: Stage, core: Session, verdict: Verdict, **facts: object) -> str:
        self._log(stage, core, verdict, **facts)
        reply = verdict.reply or TEMP_FAILURE
        return str(reply)

    # -- the hooks -----------------------------------------------------------

    async def handle_EHLO(
        self,
        server: SMTP,
        session: AioSession,
        envelope: AioEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        conn = await self._connection(server, session)
        if conn.refusal is not None:
            # EHLO is nearly always the first command: send the refusal and
            # hang up, as Postfix does at connect (an empty list: aiosmtpd
            # sends nothing more). Other first commands see it repeated.
            await server.push(self._refused_connection(conn))
            if server.transport is not None:
                server.transport.close()
            if conn.release is not None:
                conn.release()  # gone now, not at the next check
            return []
        hook = self._hook("handle_EHLO")
        if hook is None:
            session.host_name = hostname
            return responses
        if len(inspect.signature(hook).parameters) == 4:
            # aiosmtpd's deprecated form: it gives the last line only
            last = await hook(server, session, envelope, hostname)
            return [*responses[:-1], str(last)]
        result: list[str] = await hook(server, session, envelope, hostname, responses)
        return result

    async def handle_HELO(
        self, server: SMTP, session: AioSession, envelope: AioEnvelope, hostname: str
    ) -> str:
        conn = await self._connection(server, session)
        if conn.refusal is not None:
            return self._refused_connection(conn)
        hook = self._hook("handle_HELO")
        if hook is None:
            session.host_name = hostname
            return f"250 {server.hostname}"
        return str(await hook(server, session, envelope, hostname))

    def _refused_connection(self, conn: _Connection) -> str:
        # aiosmtpd gives hooks no documented way to hang up: the refusal is
        # repeated to each command instead (see docs/aiosmtpd.md).
        assert conn.refusal is not None and conn.refusal.reply is not None
        return str(conn.refusal.reply)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: AioSession,
        envelope: AioEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        conn = await self._connection(server, session)
        if conn.refusal is not None:
            return self._refused_connection(conn)
        core = self._session(conn, session)
        try:
            core = await self._count(core, Stage.MAIL, address)
        except Exception:
            log.exception("state store failed at MAIL")
            return str(TEMP_FAILURE)
        sender = "" if address == "<>" else address
        stage = Envelope(
            Stage.MAIL,
            sender=sender,
            declared_size=_declared_size(mail_options),
            smtputf8=bool(envelope.smtp_utf8),
        )
        verdict = await self._decide(session, core, stage)
        if verdict.action.refuses:
            return self._refusal(Stage.MAIL, core, verdict, sender=sender)
        hook = self._hook("handle_MAIL")
        if hook is None:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return _OK
        return str(await hook(server, session, envelope, address, mail_options))

    async def handle_RCPT(
        self,
        server: SMTP,
        session: AioSession,
        envelope: AioEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        conn = await self._connection(server, session)
        if conn.refusal is not None:
            return self._refused_connection(conn)
        core = self._session(conn, session)
        try:
            core = await self._count(core, Stage.RCPT, address)
        except Exception:
            log.exception("state store failed at RCPT")
            return str(TEMP_FAILURE)
        discard = self._discards.get(envelope)
        sender = _sender(envelope)
        stage = Envelope(
            Stage.RCPT,
            sender=sender,
            recipient=address,
            recipients=tuple(envelope.rcpt_tos),
            declared_size=_declared_size(envelope.mail_options),
            discard=discard.rule if discard else None,
            smtputf8=bool(envelope.smtp_utf8),
        )
        verdict = await self._decide(session, core, stage)
        self._log(Stage.RCPT, core, verdict, sender=sender, recipient=address)
        if verdict.action.refuses:
            return str(verdict.reply or TEMP_FAILURE)
        hook = self._hook("handle_RCPT")
        if hook is None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            reply = _OK
        else:
            reply = str(await hook(server, session, envelope, address, rcpt_options))
        if verdict.action is Action.DISCARD and discard is None and reply.startswith("2"):
            self._discards[envelope] = verdict
        return reply

    async def handle_DATA(self, server: SMTP, session: AioSession, envelope: AioEnvelope) -> Any:
        conn = await self._connection(server, session)
        if conn.refusal is not None:
            return self._refused_connection(conn)
        core = self._session(conn, session)
        sender = _sender(envelope)
        rcpts = tuple(envelope.rcpt_tos)
        discard = self._discards.get(envelope)
        # aiosmtpd has no hook at the DATA command itself: its checks run
        # here, after the message was read (the reply is the same).
        verdict = await self._decide(
            session,
            core,
            Envelope(
                Stage.DATA,
                sender=sender,
                recipients=rcpts,
                discard=discard.rule if discard else None,
            ),
        )
        if verdict.action.refuses:
            return self._refusal(Stage.DATA, core, verdict, sender=sender)
        content = envelope.original_content or b""
        facts = message_facts(content, len(content), self.policy.settings.general)
        verdict = await self._decide(
            session,
            core,
            Envelope(Stage.END_OF_DATA, sender=sender, recipients=rcpts, message=facts),
        )
        if verdict.action.refuses:
            return self._refusal(Stage.END_OF_DATA, core, verdict, sender=sender, size=facts.size)
        if discard is not None:
            self._log(
                Stage.END_OF_DATA,
                core,
                discard,
                sender=sender,
                size=facts.size,
                recipients=list(rcpts),
                discarded=True,
            )
            return _OK
        hook = self._hook("handle_DATA")
        if hook is None:
            return _OK
        # LMTP handlers may return a list of replies: passed on as they are.
        return await hook(server, session, envelope)

    async def handle_VRFY(
        self, server: SMTP, session: AioSession, envelope: AioEnvelope, address: str
    ) -> str:
        conn = await self._connection(server, session)
        if conn.refusal is not None:
            return self._refused_connection(conn)
        core = self._session(conn, session)
        verdict = await self._decide(session, core, Envelope(Stage.VRFY, recipient=address))
        if verdict.action.refuses:
            return self._refusal(Stage.VRFY, core, verdict, recipient=address)
        hook = self._hook("handle_VRFY")
        if hook is None:
            return _VRFY_DEFAULT
        return str(await hook(server, session, envelope, address))

    async def handle_QUIT(self, server: SMTP, session: AioSession, envelope: AioEnvelope) -> str:
        conn = self._connections.get(server)
        if conn is not None and conn.release is not None:
            conn.release()  # runs once: the finalizer will not count it out again
        hook = self._hook("handle_QUIT")
        if hook is None:
            return _BYE
        return str(await hook(server, session, envelope))


#: how often a counted connection is checked for having gone away
WATCH_INTERVAL = 1.0


async def _watch(server: weakref.ref[SMTP], release: weakref.finalize[Any, Any]) -> None:
    """Count a connection out soon after it is gone: aiosmtpd has no hook for
    that, but its documented ``transport`` attribute turns ``None`` then."""
    while release.alive:
        smtp = server()
        if smtp is None or smtp.transport is None:
            release()
            return
        del smtp
        await asyncio.sleep(WATCH_INTERVAL)


def _release(loop: asyncio.AbstractEventLoop, closed: Callable[[str], None], client: str) -> None:
    """Called once per counted connection: at QUIT, by :func:`_watch`, or
    when the connection's SMTP instance is garbage (the last resort)."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to count
        loop.call_soon_threadsafe(closed, client)
