"""A client's TCP socket on the event loop, without asyncio's transport.

:class:`SocketWire` gives :class:`~.transport.SmtpProtocol` what it used of
an ``asyncio.Transport`` (``write``, ``close``, ``abort``, pausing reads, the
peer's address) over ``loop.add_reader``/``add_writer`` and the socket's own
``recv_into``/``send``, and calls the protocol back as a transport would
(``connection_made``, ``get_buffer``/``buffer_updated``, ``eof_received``,
``connection_lost``). Making one is a plain call, so the accept loop starts
a session without ``connect_accepted_socket``'s coroutine, its three
scheduled callbacks and its ``getsockname``/``getpeername`` calls; that, with
the callbacks on every read, write and close, was 8 % of ``serve``'s
samples (docs/performance.md).

Rules it keeps, as asyncio's transport does: a write that the kernel does not
take at once is kept and sent when the socket is writable, in order; after
end of input the socket stays open for writing (replies to what came before
still go out); ``close`` sends what is kept first, ``abort`` drops it; the
protocol's ``connection_lost`` is called once, from the loop, never from
inside a call the protocol made. Replies kept for a client that does not
read are bounded: past ``_WRITE_HIGH`` bytes reading stops until they drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from typing import Any, Protocol

__all__ = ["SocketWire", "WireProtocol"]

#: stop reading from a client that leaves this much of our output unread
_WRITE_HIGH = 1 << 20

#: how long a closed socket may wait for the client to take what is kept
_LINGER = 30.0

_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED)


class WireProtocol(Protocol):
    """What :class:`SocketWire` calls back (asyncio's BufferedProtocol)."""

    def connection_made(self, transport: Any) -> None: ...

    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class SocketWire:
    """One connected, non-blocking TCP socket and its protocol."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: WireProtocol,
        peer: Any = None,
    ) -> None:
        """``peer``: the client's address when known (``accept`` gave it);
        otherwise ``getpeername`` is asked once, when it is first wanted."""
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._peer: Any = peer
        self._out = bytearray()
        self._closing = False
        self._closed = False
        self._reading = False  # registered with the loop for reading
        self._paused = False  # the protocol asked to stop reading
        self._eof = False
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not TCP (a Unix socketpair): nothing to tune
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.connection_made(self)
        if not self._closing:
            self._want_reading()

    # -- what the protocol calls ---------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            if self._peer is None:
                try:
                    self._peer = self._sock.getpeername()
                except OSError:
                    return default
            return self._peer
        if name == "socket":
            return self._sock
        return default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._out:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._writable)
        self._out += data
        if len(self._out) > _WRITE_HIGH:
            self._stop_reading()

    def pause_reading(self) -> None:
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._want_reading()

    def close(self) -> None:
        """Send what is kept, then close."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._out:
            self._loop.call_soon(self._finish, None)
        else:
            # a client that never reads again must not keep the socket forever
            self._loop.call_later(_LINGER, self.abort)

    def abort(self) -> None:
        """Close now, dropping what is kept."""
        self._closing = True
        self._out.clear()
        self._loop.call_soon(self._finish, None)

    # -- the loop's callbacks --------------------------------------------------

    def _readable(self) -> None:
        buffer = self._protocol.get_buffer(-1)
        try:
            count = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        if count:
            self._protocol.buffer_updated(count)
            return
        # end of input: the client may still read our replies
        self._eof = True
        self._stop_reading()
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        del self._out[:sent]
        if self._out:
            return
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._finish(None)
        else:
            self._want_reading()

    # -- inside ------------------------------------------------------------------

    def _want_reading(self) -> None:
        if (
            self._reading
            or self._paused
            or self._eof
            or self._closing
            or len(self._out) > _WRITE_HIGH
        ):
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _fail(self, exc: OSError) -> None:
        # the client is gone (reset, broken pipe): nothing more can be sent
        self._closing = True
        self._out.clear()
        self._stop_reading()
        self._loop.call_soon(self._finish, None if exc.errno in _GONE else exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._protocol.connection_lost(exc)
