"""Listeners for ``mailpolicy serve``: plain + STARTTLS, submission, implicit TLS.

:class:`MailServer` binds every listener the policy's ``[server]`` table
names (or one ``--listen`` address), runs a pure
:class:`~mailpolicy.dialogue.Connection` per connection through
:class:`~.transport.SmtpProtocol`, and shuts down gracefully: it stops accepting, tells idle clients
``421`` and lets sessions that are receiving or delivering a message finish
(within a grace period), so a message is never cut off between our ``250``
and the disk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Literal

import attrs

from ..lookup import NetworkTable
from ..policy import Policy
from ..settings import Settings
from .dns import Resolver
from .driver import AcceptAllDelivery, Delivery, Services, SessionObserver
from .interfaces import listening_addresses
from .state import MemoryStore, StateStore
from .transport import SmtpProtocol
from .wire import SocketWire

__all__ = ["Listener", "MailServer", "listeners_from_settings", "parse_hostport", "tls_context"]

log = logging.getLogger("mailpolicy.server")

TlsMode = Literal["starttls", "implicit"]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


@attrs.frozen
class Listener:
    """One listening address and how it does TLS."""

    name: str
    host: str
    port: int
    tls: TlsMode = "starttls"


def listeners_from_settings(settings: Settings, listen: str | None = None) -> list[Listener]:
    """The listeners ``[server]`` asks for; ``listen`` replaces them with one
    plain listener (STARTTLS still offered when a certificate is set)."""
    if listen is not None:
        host, port = parse_hostport(listen)
        return [Listener("smtp", host, port)]
    out = []
    srv = settings.server
    for name, value, mode in (
        ("smtp", srv.smtp, "starttls"),
        ("submission", srv.submission, "starttls"),
        ("smtps", srv.smtps, "implicit"),
    ):
        if value:
            host, port = parse_hostport(value)
            out.append(Listener(name, host, port, mode))  # type: ignore[arg-type]
    return out


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context from ``tls_cert``/``tls_key`` (or None)."""
    srv = settings.server
    if not srv.tls_cert or not srv.tls_key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(srv.tls_cert, srv.tls_key)
    return ctx


#: accept() errors that mean "no descriptor or memory now": back off, retry
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def _listening_sockets(
    host: str, port: int, backlog: int, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of ``host``
    (as ``loop.create_server`` would make, with our backlog). ``reuse_port``:
    with ``SO_REUSEPORT``, so that several such sets share the port and the
    kernel spreads connections over them (``serve --workers``)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    out: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
            if port == 0:
                # one free port for every address of the name
                port = sock.getsockname()[1]
                break
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class MailServer:
    """Every listener of one policy, with graceful shutdown."""

    def __init__(
        self,
        policy: Policy,
        resolver: Resolver,
        *,
        delivery: Delivery | None = None,
        store: StateStore | None = None,
        listeners: list[Listener] | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float | None = None,
        proxy_protocol: bool = False,
        observer: Callable[[], SessionObserver] | None = None,
        sockets: Sequence[tuple[Listener, socket.socket]] | None = None,
    ) -> None:
        self.policy = policy
        self.listeners = (
            listeners if listeners is not None else listeners_from_settings(policy.settings)
        )
        self.tls = tls if tls is not None else tls_context(policy.settings)
        # Counted in memory unless told otherwise: a server without a store
        # would silently drop every connection, rate and AUTH limit.
        self.services = Services.for_settings(
            policy.settings.server,
            resolver=resolver,
            delivery=delivery if delivery is not None else AcceptAllDelivery(),
            store=store if store is not None else MemoryStore(),
            clock=clock,
            **({} if timeout is None else {"timeout": timeout}),
        )
        self.proxy_protocol = proxy_protocol
        #: makes a per-connection observer (``serve --capture``), or None
        self.observer = observer
        self.sessions: set[SmtpProtocol] = set()
        self._sockets: list[socket.socket] = []
        #: listening sockets made elsewhere (a worker's, inherited from its parent)
        self._inherited = list(sockets) if sockets is not None else None
        self._acceptors: list[_Acceptor] = []
        #: (listener, the address actually bound: port 0 becomes a real port)
        self.bound: list[tuple[Listener, tuple[str, int]]] = []

    @property
    def store(self) -> StateStore:
        return self.services.store

    @property
    def delivery(self) -> Delivery:
        return self.services.delivery

    def _factory(self, listener: Listener) -> Callable[[], SmtpProtocol]:
        implicit = listener.tls == "implicit"
        proxy_from = NetworkTable(
            (net, i) for i, net in enumerate(self.policy.settings.server.proxy_networks)
        )

        def make() -> SmtpProtocol:
            proto = SmtpProtocol(
                lambda: self.policy,
                self.services,
                tls_context=self.tls,
                implicit_tls=implicit,
                proxy_protocol=self.proxy_protocol,
                proxy_from=proxy_from,
                observer=self.observer,
                on_close=self._closed,
            )
            self.sessions.add(proto)
            return proto

        return make

    def _closed(self, session: SmtpProtocol) -> None:
        self.sessions.discard(session)
        for acceptor in self._acceptors:
            acceptor.room()  # under max_connections again

    async def start(self) -> None:
        """Bind every listener; ``bound`` then holds the real addresses."""
        loop = asyncio.get_running_loop()
        backlog = self.policy.settings.server.listen_backlog
        bound = self._inherited if self._inherited is not None else await self.bind(backlog)
        for listener, sock in bound:
            sock.setblocking(False)
            addr = sock.getsockname()
            self.bound.append((listener, (str(addr[0]), int(addr[1]))))
            self._sockets.append(sock)
            self._acceptors.append(_Acceptor(self, loop, sock, listener))
            log.info(
                "listening on %s:%s (%s, %s)",
                addr[0],
                addr[1],
                listener.name,
                "implicit TLS"
                if listener.tls == "implicit"
                else "STARTTLS"
                if self.tls
                else "plain",
            )
        # A delivery that routes mail must know where we listen: an MX that
        # points at one of these addresses is a loop (554 5.4.6).
        add = getattr(self.delivery, "add_our_addresses", None)
        if add is not None:
            add(listening_addresses(addr for _, addr in self.bound))

    async def bind(self, backlog: int) -> list[tuple[Listener, socket.socket]]:
        """Listening sockets for every listener (what a parent hands to workers)."""
        out: list[tuple[Listener, socket.socket]] = []
        for listener in self.listeners:
            if listener.tls == "implicit" and self.tls is None:
                raise ValueError(f"{listener.name}: implicit TLS needs server.tls_cert and tls_key")
            try:
                socks = await _listening_sockets(listener.host, listener.port, backlog)
            except OSError as e:
                for _, sock in out:
                    sock.close()
                raise OSError(
                    e.errno, f"{listener.name} {listener.host}:{listener.port}: {e.strerror or e}"
                ) from None
            out += [(listener, sock) for sock in socks]
        return out

    def port(self, name: str = "smtp") -> int:
        """The bound port of the listener called ``name``."""
        for listener, (_, port) in self.bound:
            if listener.name == name:
                return port
        raise KeyError(name)

    async def stop(self, grace: float = 30) -> None:
        """Stop accepting; send idle clients 421; let busy sessions finish."""
        for acceptor in self._acceptors:
            acceptor.stop()
        self._acceptors.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for session in list(self.sessions):
            if not session.busy:
                session.request_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(s.busy for s in self.sessions):
            if loop.time() > deadline:
                log.warning(
                    "shutdown grace period over; closing %d busy sessions",
                    sum(1 for s in self.sessions if s.busy),
                )
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.request_stop()
        # a session stuck in delivery or DNS gets a moment, then is cut off
        waits = [asyncio.ensure_future(s.wait_closed()) for s in list(self.sessions)]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=1.0)
            for session in list(self.sessions):
                session.abort()
            for w in pending:
                w.cancel()


class _Acceptor:
    """Takes the connections of one listening socket, in the loop's read
    callback: a session starts with a plain call, no task or future per
    connection (public asyncio API only: ``add_reader``).

    It stops taking connections at ``server.max_connections`` (they wait in
    the listen queue) until a session ends, and when the process runs out of
    file descriptors it backs off quietly, with one log line a minute,
    instead of spinning."""

    #: connections taken per callback, so that a flood cannot starve the rest
    BATCH = 16

    def __init__(
        self,
        server: MailServer,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        listener: Listener,
    ) -> None:
        self.server = server
        self.loop = loop
        self.sock = sock
        self.listener = listener
        self.make = server._factory(listener)
        self.cap = server.policy.settings.server.max_connections
        self.listening = False
        self.stopped = False
        #: the out-of-resources back-off, doubled each time, 0 once a connection is taken
        self.delay = 0.0
        self.backing_off = False
        self.warned = -math.inf
        self.resume()

    def resume(self) -> None:
        if not self.listening and not self.stopped:
            self.listening = True
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def pause(self) -> None:
        if self.listening:
            self.listening = False
            self.loop.remove_reader(self.sock.fileno())

    def room(self) -> None:
        if not self.listening and not self.backing_off:
            self.resume()

    def stop(self) -> None:
        self.pause()
        self.stopped = True

    def _ready(self) -> None:
        for _ in range(self.BATCH):
            if self.cap and len(self.server.sessions) >= self.cap:
                self.pause()  # room() resumes when a session ends
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._failed(e)
                return
            self.delay = 0.0
            try:
                SocketWire(self.loop, conn, self.make(), peer)
            except OSError as e:
                log.warning("connection from a client failed at once: %s", e)
                conn.close()

    def _failed(self, e: OSError) -> None:
        self.pause()
        if e.errno not in _OUT_OF_RESOURCES:
            log.warning("accept on %s failed: %s", self.listener.name, e)
            wait = 0.1
        else:
            self.delay = min(max(self.delay * 2, 0.05), 1.0)
            wait = self.delay
            if self.loop.time() - self.warned > 60:
                self.warned = self.loop.time()
                log.warning(
                    "out of resources accepting on %s (%s, %d sessions open); backing off",
                    self.listener.name,
                    e.strerror,
                    len(self.server.sessions),
                )
        self.backing_off = True  # room() must not cut the wait short
        self.loop.call_later(wait, self._retry)

    def _retry(self) -> None:
        self.backing_off = False
        self.resume()
