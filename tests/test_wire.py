"""The socket layer of serve (adapters/wire.SocketWire) over real sockets:
a Unix socketpair, and TCP on loopback, with a protocol that records what
it is called with."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from mailpolicy.adapters import wire
from mailpolicy.adapters.wire import SocketWire


class Recorder:
    def __init__(self) -> None:
        self.transport: Any = None
        self.received = bytearray()
        self.buffer = memoryview(bytearray(4096))
        self.eof = 0
        self.lost: list[Exception | None] = []
        self.inside = False  # set while the protocol is calling the wire

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]

    def eof_received(self) -> bool:
        self.eof += 1
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.inside, "connection_lost called from inside a protocol call"
        self.lost.append(exc)


def drain(peer: socket.socket) -> bytes:
    """Everything the peer receives up to end of input (a blocking read in a
    thread, so the loop can go on sending)."""
    out = bytearray()
    while chunk := peer.recv(65536):
        out += chunk
    return bytes(out)


def test_a_large_write_goes_out_whole_and_in_order_and_close_waits_for_it() -> None:
    async def main() -> tuple[bytes, bytes, list[Exception | None]]:
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proto = Recorder()
        SocketWire(asyncio.get_running_loop(), ours, proto)
        sent = b"".join(bytes([i % 251]) * 1000 for i in range(900))  # 900 kB, not all at once
        proto.inside = True
        for start in range(0, len(sent), 90_000):
            proto.transport.write(sent[start : start + 90_000])
        proto.transport.close()
        proto.inside = False
        got = await asyncio.to_thread(drain, peer)
        await asyncio.sleep(0.01)
        peer.close()
        return sent, got, proto.lost

    sent, got, lost = asyncio.run(main())
    assert got == sent
    assert lost == [None]


def test_reading_stops_while_the_client_leaves_our_output_unread() -> None:
    async def main() -> list[bytes]:
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proto = Recorder()
        SocketWire(asyncio.get_running_loop(), ours, proto)
        proto.transport.write(b"r" * (wire._WRITE_HIGH + 100_000))
        peer.sendall(b"MAIL FROM:<a@b.example>\r\n")
        await asyncio.sleep(0.1)
        stalled = bytes(proto.received)
        reader = asyncio.create_task(asyncio.to_thread(drain, peer))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if proto.received:
                break
        resumed = bytes(proto.received)
        proto.transport.close()
        await reader
        peer.close()
        return [stalled, resumed]

    stalled, resumed = asyncio.run(main())
    assert stalled == b""
    assert resumed == b"MAIL FROM:<a@b.example>\r\n"


def test_end_of_input_keeps_the_socket_open_for_replies() -> None:
    async def main() -> tuple[int, bytes, list[Exception | None]]:
        loop = asyncio.get_running_loop()
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
        server.close()
        proto = Recorder()
        SocketWire(loop, ours, proto)
        client.sendall(b"QUIT\r\n")
        client.shutdown(socket.SHUT_WR)  # the client's last word
        for _ in range(200):
            await asyncio.sleep(0.01)
            if proto.eof:
                break
        proto.transport.write(b"221 2.0.0 Bye\r\n")
        proto.transport.close()
        got = await asyncio.to_thread(drain, client)
        client.close()
        await asyncio.sleep(0.01)
        return proto.eof, got, proto.lost

    eof, got, lost = asyncio.run(main())
    assert eof == 1
    assert got == b"221 2.0.0 Bye\r\n"
    assert lost == [None]


def test_a_client_gone_is_an_end_without_error_told_once_from_the_loop() -> None:
    async def main() -> tuple[list[Exception | None], list[Exception | None]]:
        ours, peer = socket.socketpair()
        proto = Recorder()
        SocketWire(asyncio.get_running_loop(), ours, proto)
        peer.close()
        proto.inside = True
        proto.transport.write(b"250 2.0.0 Ok\r\n")  # EPIPE: the client is gone
        proto.transport.write(b"more\r\n")  # ignored: the wire is closing
        proto.inside = False
        at_once = list(proto.lost)
        await asyncio.sleep(0.01)
        proto.transport.abort()  # and again: still one call
        await asyncio.sleep(0.01)
        return at_once, proto.lost

    at_once, lost = asyncio.run(main())
    assert at_once == []
    assert lost == [None]


def test_abort_drops_what_is_kept_and_closes_at_once() -> None:
    async def main() -> tuple[int, list[Exception | None]]:
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proto = Recorder()
        SocketWire(asyncio.get_running_loop(), ours, proto)
        proto.transport.write(b"x" * 2_000_000)
        proto.transport.abort()
        await asyncio.sleep(0.01)
        got = len(await asyncio.to_thread(drain, peer))
        peer.close()
        return got, proto.lost

    got, lost = asyncio.run(main())
    assert 0 < got < 2_000_000  # what the kernel had taken, not the rest
    assert lost == [None]


def test_the_peer_address_is_the_client() -> None:
    async def main() -> tuple[Any, Any]:
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
        server.close()
        proto = Recorder()
        SocketWire(asyncio.get_running_loop(), ours, proto)
        name = client.getsockname()
        peer = proto.transport.get_extra_info("peername")
        proto.transport.close()
        client.close()
        await asyncio.sleep(0.01)
        return name, peer

    name, peer = asyncio.run(main())
    assert peer == name


def test_a_wire_is_usable_from_a_thread_of_its_own() -> None:
    # the per-thread read buffer of SmtpProtocol and the wire do not mix
    # loops: a second loop in another thread works the same
    result: list[bytes] = []

    def other() -> None:
        async def main() -> None:
            ours, peer = socket.socketpair()
            proto = Recorder()
            SocketWire(asyncio.get_running_loop(), ours, proto)
            peer.sendall(b"EHLO x\r\n")
            for _ in range(200):
                await asyncio.sleep(0.01)
                if proto.received:
                    break
            result.append(bytes(proto.received))
            proto.transport.close()
            await asyncio.sleep(0.01)
            peer.close()

        asyncio.run(main())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert result == [b"EHLO x\r\n"]


def test_the_peer_address_is_the_one_accept_gave_or_getpeername() -> None:
    async def main() -> tuple[Any, Any]:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            client = socket.create_connection(listening.getsockname())
            conn, accepted = listening.accept()
            given = Recorder()
            SocketWire(asyncio.get_running_loop(), conn, given, accepted)
            asked = Recorder()
            ours, peer = socket.socketpair()
            SocketWire(asyncio.get_running_loop(), ours, asked)
            try:
                return (
                    (given.transport.get_extra_info("peername"), accepted, client.getsockname()),
                    asked.transport.get_extra_info("peername"),
                )
            finally:
                for s in (client, conn, ours, peer):
                    s.close()

    (from_accept, accepted, client_side), unix_peer = asyncio.run(main())
    assert from_accept == accepted == client_side
    assert unix_peer == ""  # a socketpair's unnamed peer, from getpeername
