"""A small real DNS server that serves a :class:`~mailpolicy.adapters.dns.StaticZone`.

It exists so that :class:`~mailpolicy.adapters.dns.LiveResolver` (and users'
own code) can be tested against real UDP and TCP traffic on the loopback
interface, timeouts and SERVFAIL included, without touching the network::

    zone = StaticZone.from_mapping({"example.net": {"MX": ["10 mx.example.net"]}})
    async with ZoneServer(zone) as server:
        resolver = LiveResolver([server.nameserver], timeout=0.5)
        ...
    with ZoneServer(zone).run_in_thread() as server:   # from synchronous code
        ...

It behaves as a recursive resolver would for the zone: it sets RA and AA,
follows CNAMEs inside the zone and puts the chain in the answer, puts an SOA
(TTL and MINIMUM = ``negative_ttl``) in the authority section of NXDOMAIN and
NODATA replies, answers rcode SERVFAIL for ``servfail`` entries and never
answers ``timeout`` entries. A UDP reply too large for the client's buffer is
sent truncated (TC), so clients retry over TCP. Every question received is
kept in :attr:`ZoneServer.queries`, so tests can assert what was (not) asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import cast

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ..model import DnsOutcome
from .dns import StaticZone

__all__ = ["ReceivedQuery", "ZoneServer"]

_SOA_NAME = "zone.invalid."


@attrs.frozen
class ReceivedQuery:
    """One question the server received: the DNS name asked (lower case, no
    final dot; reversed for PTR), the type name, and ``"udp"`` or ``"tcp"``."""

    name: str
    rtype: str
    transport: str


def _rdata_text(rtype: str, record: str) -> str:
    """A StaticZone record (names without final dot) as zone-file text."""
    if rtype == "MX":
        pref, _, host = record.partition(" ")
        return f"{pref} {host if host == '.' else host + '.'}"
    if rtype in ("PTR", "CNAME"):
        return record + "."
    if rtype == "TXT":
        chunks = [record[i : i + 255] for i in range(0, len(record), 255)] or [""]
        escaped = (c.replace("\\", "\\\\").replace('"', '\\"') for c in chunks)
        return " ".join(f'"{c}"' for c in escaped)
    return record


class ZoneServer:
    """Serves ``zone`` on ``host`` (127.0.0.1) over UDP and TCP, on a free port.

    Use ``async with`` (or :meth:`start` / :meth:`stop`) inside an event loop,
    or :meth:`run_in_thread` from synchronous code. ``ttl`` is the TTL of
    every record; ``negative_ttl`` is the SOA's TTL and MINIMUM.
    """

    def __init__(
        self,
        zone: StaticZone,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: int = 300,
        negative_ttl: int = 60,
    ) -> None:
        self.zone = zone
        self.host = host
        self.port = port
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._queries: list[ReceivedQuery] = []
        self._lock = threading.Lock()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._client_streams: set[asyncio.StreamWriter] = set()

    # -- what was asked --------------------------------------------------------

    @property
    def queries(self) -> tuple[ReceivedQuery, ...]:
        """Every question received so far, in order (safe from any thread)."""
        with self._lock:
            return tuple(self._queries)

    def clear(self) -> None:
        """Forget the questions received so far."""
        with self._lock:
            self._queries.clear()

    @property
    def nameserver(self) -> str:
        """This server as a ``[dns] nameservers`` entry: ``IP:PORT`` / ``[IPv6]:PORT``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # -- the protocol ------------------------------------------------------------

    def reply(self, wire: bytes, transport: str = "udp") -> bytes | None:
        """The reply to the query ``wire``, or ``None`` when the server stays silent
        (a ``timeout`` entry, or a packet that is not a DNS query)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        name = "" if name == "@" else name
        rtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries.append(ReceivedQuery(name, rtype, transport))
        found = self.zone.trace(name, rtype)
        outcome = found.result.outcome
        if outcome is DnsOutcome.TIMEOUT:
            return None
        if outcome is DnsOutcome.SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        # the chain starts at the name as asked (its case), as a real server does
        owner: dns.name.Name = question.name
        for _alias, target in found.cnames:
            response.answer.append(self._rrset(owner, "CNAME", [target + "."]))
            owner = dns.name.from_text(target + ".")
        if outcome is DnsOutcome.ANSWER:
            texts = [_rdata_text(rtype, r) for r in found.result.records]
            response.answer.append(self._rrset(owner, rtype, texts))
        else:
            if outcome is DnsOutcome.NXDOMAIN:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        max_size = 65535 if transport == "tcp" else (query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.RA | dns.flags.TC
            return truncated.to_wire()

    def _rrset(self, owner: dns.name.Name, rtype: str, texts: list[str]) -> dns.rrset.RRset:
        rdtype = dns.rdatatype.from_text(rtype)
        rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, rdtype)
        for text in texts:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text), self.ttl)
        return rrset

    def _soa(self) -> dns.rrset.RRset:
        n = self.negative_ttl
        text = f"ns.{_SOA_NAME} hostmaster.{_SOA_NAME} 1 3600 600 86400 {n}"
        return dns.rrset.from_text(_SOA_NAME, n, "IN", "SOA", text)

    # -- running in an event loop ------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on the same port (a free one when ``port`` is 0)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        last_error: OSError | None = None
        # a free UDP port may be taken for TCP: try a few before giving up
        for _ in range(20):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self.port), family=family
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:
                udp.close()
                last_error = exc
                if self.port:
                    break
                continue
            self._udp = udp
            self.port = port
            return
        raise OSError(f"cannot bind UDP and TCP on {self.host}: {last_error}")

    async def stop(self) -> None:
        """Close the sockets and any open TCP connection."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._client_streams):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> ZoneServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._client_streams.add(writer)
        try:
            while True:
                header = await reader.readexactly(2)
                (length,) = struct.unpack("!H", header)
                wire = await reader.readexactly(length)
                out = self.reply(wire, "tcp")
                if out is None:
                    continue  # a timeout entry: stay silent, the client gives up
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._client_streams.discard(writer)
            writer.close()

    # -- running from synchronous code ------------------------------------------

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[ZoneServer]:
        """Serve from a daemon thread with its own event loop while the block runs."""
        ready = threading.Event()
        state: dict[str, object] = {}

        async def serve() -> None:
            stop = asyncio.Event()
            state["loop"] = asyncio.get_running_loop()
            state["stop"] = stop
            try:
                await self.start()
            except BaseException as exc:
                state["error"] = exc
                ready.set()
                return
            ready.set()
            try:
                await stop.wait()
            finally:
                await self.stop()

        thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        thread.name = "ZoneServer"
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("ZoneServer did not start")
        error = state.get("error")
        if isinstance(error, BaseException):
            thread.join()
            raise error
        try:
            yield self
        finally:
            loop = state["loop"]
            stop = state["stop"]
            assert isinstance(loop, asyncio.AbstractEventLoop)
            assert isinstance(stop, asyncio.Event)
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ZoneServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's datagram transports do not all subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        out = self.server.reply(data, "udp")
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)
