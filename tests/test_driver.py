"""The host loop (adapters/driver.run_connection) over a channel that
records what it is given: replies to pipelined commands leave together."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable, Mapping

import dns.message
import dns.rdatatype
import pytest

from mailpolicy.adapters.dns import LiveResolver, StaticZone
from mailpolicy.adapters.driver import AcceptAllDelivery, Services, _Shutdown, run_connection
from mailpolicy.config import settings_from_mapping
from mailpolicy.dialogue import Connection
from mailpolicy.model import DnsQuery, DnsResult
from mailpolicy.policy import Policy, compile_policy

POLICY = compile_policy(
    settings_from_mapping(
        {
            "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
            "security": {"connection_policy": {"max_connections_per_client": 0}},
        }
    )
)


class Recorder:
    """A Channel: hands out ``chunks`` one read at a time, keeps every write."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.writes: list[bytes] = []
        self.closed = False

    async def read(self, timeout: float | None) -> bytes | _Shutdown | None:
        return self.chunks.pop(0) if self.chunks else b""

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def start_tls(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def play(*chunks: bytes) -> tuple[Recorder, AcceptAllDelivery]:
    channel = Recorder(*chunks)
    delivery = AcceptAllDelivery()
    services = Services(StaticZone.from_mapping({}), delivery=delivery, queue_id=lambda: "Q1")
    asyncio.run(run_connection(Connection(POLICY, "192.0.2.1"), channel, services))
    return channel, delivery


def test_replies_to_pipelined_commands_are_written_at_once() -> None:
    channel, delivery = play(
        b"EHLO c.example.org\r\n",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<bob@example.com>\r\nDATA\r\n",
        b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    )
    assert channel.writes[0] == b"220 mx.example.com ESMTP\r\n"
    assert channel.writes[1].startswith(b"250-mx.example.com\r\n")
    assert channel.writes[1].count(b"\r\n250 ") == 1  # the whole EHLO reply, once
    assert channel.writes[2] == (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    assert channel.writes[3:] == [b"250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"]
    assert channel.closed
    assert [m.recipients for m in delivery.messages] == [("alice@example.com", "bob@example.com")]


def test_a_client_that_waits_for_each_reply_gets_each_at_once() -> None:
    channel, _ = play(
        b"HELO c.example.org\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<alice@example.com>\r\n",
        b"QUIT\r\n",
    )
    assert channel.writes == [
        b"220 mx.example.com ESMTP\r\n",
        b"250 mx.example.com\r\n",
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"221 2.0.0 Bye\r\n",
    ]


class Asked:
    """A resolver (a static zone) that records every question it gets."""

    def __init__(self, zone: StaticZone) -> None:
        self.zone = zone
        self.questions: list[str] = []

    async def resolve(self, query: DnsQuery) -> DnsResult:
        self.questions.append(str(query))
        await asyncio.sleep(0)  # an answer comes back later, as over UDP
        return self.zone.lookup(query)

    async def resolve_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        return {q: await self.resolve(q) for q in queries}


ZONE = StaticZone.from_mapping(
    {
        "192.0.2.1": {"PTR": ["client.example.org"]},
        "client.example.org": {"A": ["192.0.2.1"]},
    }
)


class Watching(Recorder):
    """A Recorder that notes, at each read, which questions were asked."""

    def __init__(self, resolver: Asked, *chunks: bytes) -> None:
        super().__init__(*chunks)
        self.resolver = resolver
        self.asked_at_read: list[list[str]] = []

    async def read(self, timeout: float | None) -> bytes | _Shutdown | None:
        await asyncio.sleep(0.01)  # the client takes a moment to answer
        self.asked_at_read.append(list(self.resolver.questions))
        return await super().read(timeout)


def checking(**sections: dict[str, bool]) -> Policy:
    """The test policy with these ``security`` checks on (or off)."""
    security: dict[str, dict[str, object]] = {
        "connection_policy": {"max_connections_per_client": 0}
    }
    for name, checks in sections.items():
        security.setdefault(name, {}).update(checks)
    return compile_policy(
        settings_from_mapping(
            {
                "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
                "security": security,
            }
        )
    )


def transaction(resolver: Asked, sender: bytes = b"") -> Watching:
    """HELO, MAIL from ``sender``, RCPT to a local user, QUIT: one a read."""
    return Watching(
        resolver,
        b"HELO c.example.org\r\n",
        b"MAIL FROM:<%s>\r\n" % sender,
        b"RCPT TO:<alice@example.com>\r\n",
        b"QUIT\r\n",
    )


@pytest.mark.parametrize("check", [True, False])
def test_the_client_name_is_asked_at_connect_once(check: bool) -> None:
    policy = checking(connection_policy={"reject_unknown_reverse_client_hostname": check})
    resolver = Asked(ZONE)
    channel = transaction(resolver)
    services = Services(resolver, delivery=AcceptAllDelivery())
    asyncio.run(run_connection(Connection(policy, "192.0.2.1"), channel, services))
    assert channel.writes[3] == b"250 2.1.5 Ok\r\n"
    if check:
        both = ["192.0.2.1/PTR", "client.example.org/A"]
        # asked while the client was still at HELO, and never again
        assert channel.asked_at_read[1] == both
        assert resolver.questions == both
    else:
        assert resolver.questions == []


class Rounds(Connection):
    """A Connection that notes the answers the host gives it, round by round."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.rounds: list[list[str]] = []

    def dns_answers(self, answers: Mapping[DnsQuery, DnsResult]) -> None:
        self.rounds.append(sorted(str(q) for q in answers))
        super().dns_answers(answers)


def test_the_name_asked_at_connect_comes_with_its_address_in_one_round() -> None:
    policy = checking(connection_policy={"reject_unknown_client_hostname": True})
    resolver = Asked(ZONE)
    channel = transaction(resolver)
    conn = Rounds(policy, "192.0.2.1")
    asyncio.run(run_connection(conn, channel, Services(resolver, delivery=AcceptAllDelivery())))
    assert channel.writes[3] == b"250 2.1.5 Ok\r\n"
    # the rule asked for the PTR; the name's A, asked at connect, came with it:
    # no second round to ask for it
    assert conn.rounds == [["192.0.2.1/PTR", "client.example.org/A"]]
    assert resolver.questions == ["192.0.2.1/PTR", "client.example.org/A"]


def test_the_sender_domain_is_asked_while_the_client_sends_rcpt() -> None:
    policy = checking(sender_policy={"reject_unknown_sender_domain": True})
    zone = StaticZone.from_mapping({"sender.example": {"MX": ["10 mx.sender.example"]}})
    resolver = Asked(zone)
    channel = transaction(resolver, b"a@sender.example")
    conn = Rounds(policy, "192.0.2.1")
    asyncio.run(run_connection(conn, channel, Services(resolver, delivery=AcceptAllDelivery())))
    assert channel.writes[2:4] == [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"]
    # asked when MAIL was accepted, before the RCPT was read; asked once
    assert channel.asked_at_read[:3] == [[], [], ["sender.example/MX"]]  # HELO, MAIL, RCPT
    assert resolver.questions == ["sender.example/MX"]
    assert conn.rounds == [["sender.example/MX"]]


class Nameserver:
    """A UDP socket on loopback that only collects questions (never answers)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.questions: list[str] = []

    def arrived(self) -> list[str]:
        """Every question received so far, as ``name/TYPE``."""
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                return self.questions
            question = dns.message.from_wire(data).question[0]
            name = question.name.to_text(omit_final_dot=True)
            self.questions.append(f"{name}/{dns.rdatatype.to_text(question.rdtype)}")


class Seeing(Recorder):
    """A Recorder that notes, at each write, what the nameserver has received."""

    def __init__(self, nameserver: Nameserver, *chunks: bytes) -> None:
        super().__init__(*chunks)
        self.nameserver = nameserver
        self.arrived_at_write: list[list[str]] = []

    def write(self, data: bytes) -> None:
        self.arrived_at_write.append(list(self.nameserver.arrived()))
        super().write(data)


def test_questions_asked_ahead_leave_before_the_reply_the_client_waits_for() -> None:
    policy = checking(
        connection_policy={"reject_unknown_reverse_client_hostname": True},
        sender_policy={"reject_unknown_sender_domain": True},
    )
    nameserver = Nameserver()
    host, port = nameserver.sock.getsockname()
    resolver = LiveResolver([f"{host}:{port}"], timeout=5)
    channel = Seeing(
        nameserver, b"HELO c.example.org\r\n", b"MAIL FROM:<a@sender.example>\r\n", b"QUIT\r\n"
    )
    services = Services(resolver, delivery=AcceptAllDelivery())
    with nameserver.sock:
        asyncio.run(run_connection(Connection(policy, "192.0.2.1"), channel, services))
    assert channel.writes[:3] == [
        b"220 mx.example.com ESMTP\r\n",
        b"250 mx.example.com\r\n",
        b"250 2.1.0 Ok\r\n",
    ]
    ptr = "1.2.0.192.in-addr.arpa/PTR"
    # the PTR was on its way before the banner, the MX before MAIL's 250
    assert channel.arrived_at_write[:3] == [[ptr], [ptr], [ptr, "sender.example/MX"]]


def test_a_decision_is_logged_after_its_reply_is_written() -> None:
    channel = Recorder(
        b"HELO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nbody\r\n.\r\n",
        b"QUIT\r\n",
    )
    writes_at_log: list[int] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("message "):
                writes_at_log.append(len(channel.writes))

    decisions = logging.getLogger("mailpolicy.decisions")
    handler, level = Watch(), decisions.level
    decisions.addHandler(handler)
    decisions.setLevel(logging.INFO)
    try:
        services = Services(
            StaticZone.from_mapping({}), delivery=AcceptAllDelivery(), queue_id=lambda: "Q1"
        )
        asyncio.run(run_connection(Connection(POLICY, "192.0.2.1"), channel, services))
    finally:
        decisions.removeHandler(handler)
        decisions.setLevel(level)
    queued = next(i for i, w in enumerate(channel.writes) if b"queued as Q1" in w)
    assert writes_at_log == [queued + 1]  # logged once the 250 was written, not before
