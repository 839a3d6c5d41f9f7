"""LiveResolver's UDP questions share a socket per nameserver (adapters/dnsudp).

Each test runs a real UDP nameserver on loopback (a thread with a socket)
that sees the client's source port and message id, and answers as the test
needs: in order, in reverse, late, with a forged reply first, or not at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from mailpolicy.adapters import dnsudp
from mailpolicy.adapters.dns import LiveResolver
from mailpolicy.model import DnsOutcome, DnsQuery, RType

Reply = Callable[[dns.message.Message], list[bytes]]


def address_of(name: str) -> str:
    """The A record the test server gives ``nNNN.example``: 10.0.x.y from NNN."""
    number = int(name.split(".")[0][1:])
    return f"10.0.{number // 256}.{number % 256}"


def answer(query: dns.message.Message, name: str | None = None) -> bytes:
    response = dns.message.make_response(query)
    owner = name or query.question[0].name.to_text(omit_final_dot=True)
    response.answer.append(dns.rrset.from_text(owner + ".", 0, "IN", "A", address_of(owner)))
    if name is not None:
        # a reply to another question: its question section names ``name``
        response.question = [
            dns.rrset.RRset(dns.name.from_text(name), dns.rdataclass.IN, dns.rdatatype.A)
        ]
    return response.to_wire()


def answer_slowly(query: dns.message.Message) -> list[bytes]:
    """A reply 0.2 s late: long enough for a second caller to join."""
    time.sleep(0.2)
    return [answer(query)]


class Server:
    """A UDP nameserver on loopback: ``batch`` questions are collected, then
    ``respond`` gives the datagrams to send for each, in the order of ``order``."""

    def __init__(self, batch: int = 1, reverse: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.batch = batch
        self.reverse = reverse
        self.respond: Reply = lambda query: [answer(query)]
        self.seen: list[tuple[int, int, str]] = []  # (source port, id, name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def nameserver(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def _serve(self) -> None:
        pending: list[tuple[dns.message.Message, tuple[str, int]]] = []
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text(omit_final_dot=True)
            self.seen.append((peer[1], query.id, name))
            pending.append((query, peer))
            if len(pending) < self.batch:
                continue
            for query, peer in reversed(pending) if self.reverse else pending:
                for datagram in self.respond(query):
                    self.sock.sendto(datagram, peer)
            pending.clear()

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def a(name: str) -> DnsQuery:
    return DnsQuery(name, RType.A)


def udp_sockets() -> int:
    """This process's open UDP sockets (from /proc: fds that are sockets,
    matched against the kernel's UDP table by inode)."""
    inodes: set[str] = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as lines:
            next(lines)
            inodes.update(line.split()[9] for line in lines)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as running:
        yield running


def test_questions_share_a_socket_whose_port_changes_every_64(server: Server) -> None:
    resolver = LiveResolver([server.nameserver], timeout=2)
    total = 2 * dnsudp.ROTATE_AFTER + 5

    async def ask_all() -> list[tuple[DnsOutcome, tuple[str, ...]]]:
        out = []
        for number in range(total):
            result = await resolver.resolve(a(f"n{number}.example"))
            out.append((result.outcome, result.records))
        return out

    results = asyncio.run(ask_all())
    assert results == [(DnsOutcome.ANSWER, (address_of(f"n{number}"),)) for number in range(total)]
    ports = [port for port, _, _ in server.seen]
    per_port = list(collections.Counter(ports).values())
    assert per_port == [dnsudp.ROTATE_AFTER, dnsudp.ROTATE_AFTER, 5]
    # each port's questions came one after the other: a port never comes back
    assert ports == sorted(ports, key=ports.index)
    ids = [qid for _, qid, _ in server.seen]
    assert len(set(ids)) > total - 5  # random ids, not a counter from 0
    assert ids != sorted(ids)


def test_concurrent_questions_get_their_own_answers_in_any_order() -> None:
    with Server(batch=20, reverse=True) as server:
        resolver = LiveResolver([server.nameserver], timeout=2)
        queries = [a(f"n{number}.example") for number in range(20)]
        results = asyncio.run(resolver.resolve_all(queries))
    assert {q.name: r.records for q, r in results.items()} == {
        q.name: (address_of(q.name),) for q in queries
    }
    assert len({port for port, _, _ in server.seen}) == 1
    assert len({qid for _, qid, _ in server.seen}) == 20  # no id twice on one socket


def test_a_forged_reply_with_the_right_id_and_another_question_is_ignored(
    server: Server,
) -> None:
    # first a reply that has the id but names another question and address
    server.respond = lambda query: [answer(query, name="n77.example"), answer(query)]
    resolver = LiveResolver([server.nameserver], timeout=2)
    result = asyncio.run(resolver.resolve(a("n5.example")))
    assert (result.outcome, result.records) == (DnsOutcome.ANSWER, ("10.0.0.5",))


def test_a_late_reply_is_not_the_answer_to_the_next_question(server: Server) -> None:
    held: list[dns.message.Message] = []

    def respond(query: dns.message.Message) -> list[bytes]:
        name = query.question[0].name.to_text(omit_final_dot=True)
        if name == "n1.example":
            held.append(query)  # silent now, answered with the next one
            return []
        return [answer(held[0]), answer(query)] if held else [answer(query)]

    server.respond = respond
    resolver = LiveResolver([server.nameserver], timeout=0.3)

    async def both() -> tuple[DnsOutcome, tuple[str, ...]]:
        first = await resolver.resolve(a("n1.example"))
        assert first.outcome is DnsOutcome.TIMEOUT
        second = await resolver.resolve(a("n2.example"))
        return second.outcome, second.records

    assert asyncio.run(both()) == (DnsOutcome.ANSWER, ("10.0.0.2",))
    assert len({port for port, _, _ in server.seen}) == 1


def test_sockets_are_closed_when_they_retire_and_when_the_loop_ends(server: Server) -> None:
    gc.collect()  # sockets of earlier tests' loops
    before = udp_sockets()
    resolver = LiveResolver([server.nameserver], timeout=2)

    async def ask_many() -> int:
        for number in range(2 * dnsudp.ROTATE_AFTER + 10):
            await resolver.resolve(a(f"n{number}.example"))
        return udp_sockets()

    during = asyncio.run(ask_many())
    assert during - before == 1  # the one in use; the two retired ones are closed
    gc.collect()  # the loop is gone: its socket goes with it
    assert udp_sockets() == before
    assert len({port for port, _, _ in server.seen}) == 3


def test_a_cancelled_asker_leaves_its_question_to_the_other_callers() -> None:
    with Server() as server:
        server.respond = answer_slowly
        resolver = LiveResolver([server.nameserver], timeout=2)

        async def scenario() -> tuple[DnsOutcome, tuple[str, ...]]:
            first = asyncio.create_task(resolver.resolve(a("n9.example")))
            await asyncio.sleep(0.02)
            second = asyncio.create_task(resolver.resolve(a("n9.example")))
            await asyncio.sleep(0.02)
            first.cancel()
            result = await second
            with pytest.raises(asyncio.CancelledError):
                await first
            return result.outcome, result.records

        assert asyncio.run(scenario()) == (DnsOutcome.ANSWER, ("10.0.0.9",))
    # one question: the first caller's went on for the second
    assert [name for _, _, name in server.seen] == ["n9.example"]


def test_a_lone_cancelled_callers_question_still_fills_the_cache() -> None:
    def answer_slowly_to_keep(query: dns.message.Message) -> list[bytes]:
        time.sleep(0.2)
        response = dns.message.make_response(query)
        owner = query.question[0].name.to_text(omit_final_dot=True)
        response.answer.append(dns.rrset.from_text(owner + ".", 300, "IN", "A", address_of(owner)))
        return [response.to_wire()]

    with Server() as server:
        server.respond = answer_slowly_to_keep
        resolver = LiveResolver([server.nameserver], timeout=2)

        async def scenario() -> tuple[str, ...]:
            asker = asyncio.create_task(resolver.resolve(a("n5.example")))
            await asyncio.sleep(0.02)  # its question is out
            asker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asker
            for _ in range(200):  # the reply comes 0.2 s after the question
                await asyncio.sleep(0.01)
                if resolver.cached(a("n5.example")) is not None:
                    break
            return (await resolver.resolve(a("n5.example"))).records

        assert asyncio.run(scenario()) == ("10.0.0.5",)
    assert [name for _, _, name in server.seen] == ["n5.example"]  # not asked again


def test_a_closed_port_fails_at_once_and_a_new_socket_asks_next_time() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: the kernel answers ICMP "port unreachable"
    resolver = LiveResolver([f"127.0.0.1:{port}"], timeout=5)

    async def ask() -> tuple[DnsOutcome, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await resolver.resolve(a("n3.example"))
        return result.outcome, loop.time() - start

    async def scenario() -> list[tuple[DnsOutcome, float]]:
        refused = await ask()
        server = Server()
        server.sock.close()
        server.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.sock.bind(("127.0.0.1", port))
        server.sock.settimeout(0.2)
        with server:
            answered = await ask()
        return [refused, answered]

    (refused, refused_after), (answered, _) = asyncio.run(scenario())
    assert refused is DnsOutcome.SERVFAIL and refused_after < 1.0  # not the 5 s timeout
    assert answered is DnsOutcome.ANSWER


def test_start_sends_before_it_returns_and_resolve_shares_the_question() -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setblocking(False)
    host, port = raw.getsockname()
    resolver = LiveResolver([f"{host}:{port}"], timeout=5)

    async def scenario() -> tuple[list[str], list[str], tuple[str, ...], tuple[str, ...]]:
        started = resolver.start(a("n7.example"))
        # no await yet: the datagram is already at the server
        data, peer = raw.recvfrom(2048)
        query = dns.message.from_wire(data)
        first = [query.question[0].name.to_text(omit_final_dot=True)]
        joined = asyncio.create_task(resolver.resolve(a("n7.example")))
        for _ in range(5):
            await asyncio.sleep(0)
        more: list[str] = []
        with contextlib.suppress(BlockingIOError):
            more.append(raw.recv(2048).hex())
        raw.sendto(answer(query), peer)
        return first, more, (await started).records, (await joined).records

    with raw:
        first, more, records, shared = asyncio.run(scenario())
    assert first == ["n7.example"]
    assert more == []  # the second caller asked nothing: it waited for the first answer
    assert records == shared == ("10.0.0.7",)


def test_a_cancelled_start_still_answers_those_sharing_its_question(server: Server) -> None:
    resolver = LiveResolver([server.nameserver], timeout=2)
    told: list[DnsOutcome] = []

    async def scenario() -> tuple[bool, DnsOutcome, tuple[str, ...]]:
        started = resolver.start(a("n8.example"), lambda found: told.append(found.outcome))
        started.cancel()  # the session that asked has ended
        result = await asyncio.wait_for(resolver.resolve(a("n8.example")), 3)
        return started.cancelled(), result.outcome, result.records

    assert asyncio.run(scenario()) == (True, DnsOutcome.ANSWER, ("10.0.0.8",))
    assert [name for _, _, name in server.seen] == ["n8.example"]  # asked once
    assert told == []  # nobody listens to a cancelled start


def test_start_goes_on_to_the_next_nameserver_in_a_task(server: Server) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    probe.close()  # ICMP "port unreachable" from now on
    resolver = LiveResolver([f"127.0.0.1:{closed}", server.nameserver], timeout=2)
    told: list[tuple[str, ...]] = []

    async def scenario() -> tuple[DnsOutcome, tuple[str, ...]]:
        found = await asyncio.wait_for(
            resolver.start(a("n5.example"), lambda found: told.append(found.records)), 3
        )
        return found.outcome, found.records

    assert asyncio.run(scenario()) == (DnsOutcome.ANSWER, ("10.0.0.5",))
    assert told == [("10.0.0.5",)]
    assert [name for _, _, name in server.seen] == ["n5.example"]


def test_starts_of_one_question_share_it_and_each_hears_once(server: Server) -> None:
    resolver = LiveResolver([server.nameserver], timeout=2)
    told: list[tuple[int, tuple[str, ...]]] = []

    async def scenario() -> list[tuple[str, ...]]:
        started = [
            resolver.start(a("n6.example"), lambda found, n=n: told.append((n, found.records)))
            for n in range(3)
        ]
        return [(await s).records for s in started]

    assert asyncio.run(scenario()) == [("10.0.0.6",)] * 3
    assert sorted(told) == [(n, ("10.0.0.6",)) for n in range(3)]
    assert [name for _, _, name in server.seen] == ["n6.example"]  # one question


def test_a_start_sharing_a_cancelled_askers_question_gets_its_answer() -> None:
    with Server() as server:
        server.respond = answer_slowly
        resolver = LiveResolver([server.nameserver], timeout=2)

        async def scenario() -> tuple[DnsOutcome, tuple[str, ...]]:
            asker = asyncio.create_task(resolver.resolve(a("n4.example")))
            await asyncio.sleep(0.02)  # its question is out
            sharing = resolver.start(a("n4.example"))
            asker.cancel()
            found = await asyncio.wait_for(sharing, 3)
            return found.outcome, found.records

        assert asyncio.run(scenario()) == (DnsOutcome.ANSWER, ("10.0.0.4",))
    assert [name for _, _, name in server.seen] == ["n4.example"]  # asked once
