"""The socket side of ``mailpolicy serve``: a protocol per connection.

It owns its layers, all through public APIs: the bytes (``BufferedProtocol``
callbacks, from the server's own socket layer :class:`~.wire.SocketWire`,
or from any asyncio transport), TLS (``ssl.SSLObject`` over memory BIOs, so STARTTLS, implicit
TLS and implicit TLS behind a PROXY line are one code path and bytes read
ahead are never lost or misread), the PROXY v1 line, flow control and the
idle timer. The dialogue itself runs in :func:`.driver.run_connection`.

A client that half-closes (sends its last command, then shuts its side) still
gets every reply: end of input is passed to the dialogue after what came
before it, and the socket stays open for writing until the dialogue closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import ssl
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..dialogue import Connection
from ..lookup import NetworkTable, ip_key
from ..policy import Policy
from .driver import (
    HANDLED,
    SHUTDOWN,
    Services,
    SessionObserver,
    _Handled,
    _Shutdown,
    run_connection,
)

__all__ = ["SmtpProtocol"]

log = logging.getLogger("mailpolicy.server")

#: stop reading from a client that has this much unprocessed input
_HIGH_WATER = 1 << 20
#: a PROXY v1 line is at most 107 bytes
_PROXY_LIMIT = 107
_PROXY_TIMEOUT = 10.0
_HANDSHAKE_TIMEOUT = 30.0


#: what a read's waiter holds when its time ran out
_TIMED_OUT = object()


class _Tls:
    """A server-side TLS session over memory buffers."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False
        self.eof = False

    def handshake(self) -> bool | None:
        """Go on with the handshake: True done, None needs more, False failed."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLError, OSError):
            return False
        self.ready = True
        return True

    def decrypt(self) -> bytes:
        out: list[bytes] = []
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = True
                break
            except (ssl.SSLError, OSError):
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            out.append(chunk)
        return b"".join(out)

    def encrypt(self, data: bytes) -> None:
        self.obj.write(data)

    def pending_output(self) -> bytes:
        return self.outgoing.read()


class _ReadBuffer(threading.local):
    """The buffer every connection of a thread's event loop reads into.

    A buffered protocol (``recv_into``) instead of ``data_received``: asyncio
    otherwise allocates 256 KiB per read and shrinks it (an mmap, mremap
    and munmap for every SMTP command). One buffer per thread is enough:
    the transport calls get_buffer, recv_into and buffer_updated in one go,
    and buffer_updated copies the bytes out before anything else runs."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(_READ_SIZE))


_READ_SIZE = 1 << 16
_read_buffer = _ReadBuffer()


class _Transport(Protocol):
    """What SmtpProtocol uses of its transport: a :class:`~.wire.SocketWire`
    (what the server gives it) or any ``asyncio.Transport``."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class SmtpProtocol(asyncio.BufferedProtocol):
    """One client connection of a listener."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        services: Services,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        proxy_protocol: bool = False,
        proxy_from: NetworkTable | None = None,
        observer: Callable[[], SessionObserver] | None = None,
        on_close: Callable[[SmtpProtocol], None] | None = None,
    ) -> None:
        self._policy = policy
        self.services = services
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.proxy_protocol = proxy_protocol
        #: peers whose PROXY line is believed (None: any)
        self.proxy_from = proxy_from
        self._observer = observer
        self._on_close = on_close
        self.transport: _Transport | None = None
        self.conn: Connection | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._stopping = False
        self._paused = False
        self._waiter: asyncio.Future[object] | None = None
        self._tls: _Tls | None = None
        self._handshake: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        #: the waiting read's deadline (loop time) and the connection's one timer
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        #: the driver's receiver (driver.Receiving), while it runs
        self._receiver: Callable[[bytes], float | None] | None = None

    # -- asyncio callbacks -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = cast(_Transport, transport)
        self._task = asyncio.get_running_loop().create_task(self._main())

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self._received(_read_buffer.view[:nbytes].tobytes())

    def _received(self, data: bytes) -> None:
        if self._tls is None:
            self._push(data)
            return
        tls = self._tls
        tls.incoming.write(data)
        if not tls.ready:
            done = tls.handshake()
            self._flush_tls()
            if done is None:
                return
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_result(done)
            if not done:
                return
        plain = tls.decrypt()
        self._flush_tls()
        if plain:
            self._push(plain)
        if tls.eof:
            self.eof_received()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(False)
        return True  # keep the socket open: replies to what came first still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self.transport = None
        self._wake()
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(False)

    # -- the Channel the driver uses ------------------------------------------------

    def receive_with(self, receiver: Callable[[bytes], float | None] | None) -> None:
        """driver.Receiving: bytes that come while a read waits go to
        ``receiver``, in this protocol's read callback."""
        self._receiver = receiver

    async def read(self, timeout: float | None) -> bytes | _Shutdown | _Handled | None:
        while not self._chunks and not self._eof:
            if self._stopping:
                return SHUTDOWN
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            self._arm(loop, math.inf if timeout is None else loop.time() + timeout)
            try:
                woken: object = await waiter
            finally:
                self._waiter = None
            if woken is _TIMED_OUT:
                return None
            if woken is HANDLED:
                return HANDLED
        if not self._chunks:
            return b""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._tls is not None:
            try:
                self._tls.encrypt(data)
            except (ssl.SSLError, OSError):
                return
            self._flush_tls()
        else:
            self.transport.write(data)

    async def start_tls(self, *, carry_over: bool = False) -> bool:
        """Begin TLS. ``carry_over``: bytes already received belong to the
        handshake (implicit TLS after a PROXY line); otherwise they are
        plaintext sent ahead of it and are dropped (RFC 3207)."""
        if self.tls_context is None or self.transport is None:
            return False
        ahead = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._tls = _Tls(self.tls_context)
        self._handshake = asyncio.get_running_loop().create_future()
        if carry_over and ahead:
            self._received(ahead)
        else:
            done = self._tls.handshake()  # a no-op until the client speaks
            if done is False:
                return False
        try:
            ok = await asyncio.wait_for(self._handshake, _HANDSHAKE_TIMEOUT)
        except TimeoutError:
            ok = False
        if not ok:
            log.info("TLS handshake failed with %s", self._peer())
        return ok

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._tls is not None and self._tls.ready:
                with contextlib.suppress(ssl.SSLError, OSError):
                    self._tls.obj.unwrap()
                self._flush_tls()
            self.transport.close()

    # -- the server's controls ------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.conn is not None and self.conn.busy

    def request_stop(self) -> None:
        """Ask the session to end at its next read (421 for an idle client)."""
        self._stopping = True
        self._wake()

    def abort(self) -> None:
        """End now (the grace period is over)."""
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- inside ------------------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        waiter, receiver = self._waiter, self._receiver
        if receiver is not None and waiter is not None and not waiter.done() and not self._chunks:
            # The dialogue waits for exactly these bytes: handled here, and
            # the task wakes only if the dialogue must wait for something else.
            timeout = receiver(data)
            if timeout is None:
                waiter.set_result(HANDLED)
            else:
                loop = waiter.get_loop()
                self._arm(loop, loop.time() + timeout)
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Time out the waiting read at ``deadline``. One timer per
        connection, moved only when a deadline comes earlier: a read usually
        ends long before its deadline, and a timer made and cancelled per
        read cost 3 % of serve's samples. When the timer fires early (the
        deadline moved later meanwhile), it sets itself again."""
        self._deadline = deadline
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return
        if timer is not None:
            timer.cancel()
        self._timer = loop.call_at(deadline, self._tick) if deadline != math.inf else None

    def _tick(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not reading now: the next read sets a timer of its own
        loop = waiter.get_loop()
        if loop.time() >= self._deadline:
            waiter.set_result(_TIMED_OUT)
        elif self._deadline != math.inf:
            self._timer = loop.call_at(self._deadline, self._tick)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _flush_tls(self) -> None:
        assert self._tls is not None
        out = self._tls.pending_output()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _peer(self) -> str:
        peer: Any = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return "127.0.0.1"

    async def _proxy_line(self) -> str | None:
        """The client address from a PROXY v1 line (``None`` if bad or missing);
        what follows it stays buffered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PROXY_TIMEOUT
        buf = b""
        while b"\r\n" not in buf:
            if len(buf) > _PROXY_LIMIT:
                return None
            data = await self.read(max(0.0, deadline - loop.time()))
            if not isinstance(data, bytes) or not data:
                return None
            buf += data
        line, _, rest = buf.partition(b"\r\n")
        if rest:
            self._chunks.insert(0, rest)
            self._size += len(rest)
        parts = line.decode("ascii", "replace").split()
        if len(parts) == 6 and parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6"):
            try:
                return str(ipaddress.ip_address(parts[2]))
            except ValueError:
                return None
        return None

    async def _main(self) -> None:
        try:
            client = self._peer()
            if self.proxy_protocol:
                if self.proxy_from is not None and not self.proxy_from.contains_key(ip_key(client)):
                    # Anyone who can reach the port could claim any address.
                    log.warning(
                        "PROXY protocol from %s refused: not in server.proxy_networks", client
                    )
                    self.write(b"421 4.7.0 Error: PROXY protocol not allowed from your address\r\n")
                    return
                proxied = await self._proxy_line()
                if proxied is None:
                    log.warning("bad or missing PROXY header from %s", self._peer())
                    return
                client = proxied
            if self.implicit_tls and not await self.start_tls(carry_over=True):
                return
            conn = Connection(
                self._policy(),
                client,
                tls=self.implicit_tls,
                starttls=self.tls_context is not None and not self.implicit_tls,
            )
            self.conn = conn
            observer = self._observer() if self._observer is not None else None
            await run_connection(conn, self, self.services, observer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("SMTP session error with %s", self._peer())
        finally:
            self._disarm()
            self.close()
            if self._on_close is not None:
                self._on_close(self)
