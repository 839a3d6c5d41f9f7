"""SmtpProtocol (adapters/transport.py) driving the dialogue from its read
callback: a reply that needs no waiting is written there, before the
session's task runs again; anything that must wait goes back to the task."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

import pytest

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.driver import AcceptAllDelivery, Services
from mailpolicy.adapters.transport import SmtpProtocol
from mailpolicy.config import settings_from_mapping
from mailpolicy.model import Session
from mailpolicy.policy import compile_policy

if TYPE_CHECKING:
    from conftest import Certificate

POLICY = compile_policy(
    settings_from_mapping(
        {
            "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
            "security": {"sender_policy": {"reject_unknown_sender_domain": True}},
        }
    )
)


class Transport:
    """What SmtpProtocol writes to, kept in a list."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 40000) if name == "peername" else default


def feed(protocol: SmtpProtocol, data: bytes) -> None:
    """Bytes arriving, as the socket layer hands them over."""
    buffer = protocol.get_buffer(len(data))
    buffer[: len(data)] = data
    protocol.buffer_updated(len(data))


async def started(zone: StaticZone, observer: Any = None) -> tuple[SmtpProtocol, Transport]:
    """A session whose banner is out and whose task waits for the client."""
    services = Services(zone, delivery=AcceptAllDelivery())
    protocol = SmtpProtocol(
        lambda: POLICY, services, observer=None if observer is None else lambda: observer
    )
    transport = Transport()
    protocol.connection_made(transport)
    for _ in range(100):
        await asyncio.sleep(0)
        if transport.writes:
            break
    assert transport.writes == [b"220 mx.example.com ESMTP\r\n"]
    return protocol, transport


def test_replies_that_need_no_waiting_are_written_in_the_read_callback() -> None:
    async def main() -> None:
        zone = StaticZone.from_mapping({"sender.example": {"MX": ["10 mx.sender.example"]}})
        protocol, transport = await started(zone)
        # no loop iteration between the bytes and the reply: the task never ran
        feed(protocol, b"HELO client.example.org\r\n")
        assert transport.writes[1:] == [b"250 mx.example.com\r\n"]
        feed(protocol, b"MAIL FROM:<a@sender.example>\r\n")
        assert transport.writes[2:] == [b"250 2.1.0 Ok\r\n"]
        # RCPT needs the sender domain's MX: the task asks, then replies
        feed(protocol, b"RCPT TO:<alice@example.com>\r\n")
        assert transport.writes[3:] == []
        for _ in range(100):
            await asyncio.sleep(0)
            if len(transport.writes) > 3:
                break
        assert transport.writes[3:] == [b"250 2.1.5 Ok\r\n"]
        feed(protocol, b"QUIT\r\n")
        assert transport.writes[4:] == [b"221 2.0.0 Bye\r\n"]
        await asyncio.wait_for(protocol.wait_closed(), 5)
        assert transport.closed

    asyncio.run(main())


def test_commands_that_came_while_the_task_worked_are_read_by_the_task() -> None:
    async def main() -> None:
        zone = StaticZone.from_mapping({"sender.example": {"MX": ["10 mx.sender.example"]}})
        protocol, transport = await started(zone)
        feed(protocol, b"HELO client.example.org\r\nMAIL FROM:<a@sender.example>\r\n")
        feed(protocol, b"RCPT TO:<alice@example.com>\r\n")
        # pipelined: HELO and MAIL answered together at once; the RCPT, which
        # came while the task was to ask the DNS, waits for it
        assert transport.writes[1:] == [b"250 mx.example.com\r\n250 2.1.0 Ok\r\n"]
        feed(protocol, b"QUIT\r\n")
        await asyncio.wait_for(protocol.wait_closed(), 5)
        assert transport.writes[2:] == [b"250 2.1.5 Ok\r\n", b"221 2.0.0 Bye\r\n"]

    asyncio.run(main())


class Failing:
    """An observer that fails on the first command it is told about."""

    def connected(self, session: Session, now: float) -> None:
        pass

    def reply(self, record: object) -> None:
        pass

    def command(self, line: str, pending: bool) -> None:
        raise RuntimeError("observer broke")

    def closed(self, session: Session | None) -> None:
        pass


def test_a_failure_in_the_read_callback_ends_the_session_in_its_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        protocol, transport = await started(StaticZone.from_mapping({}), Failing())
        with caplog.at_level(logging.ERROR, logger="mailpolicy.server"):
            feed(protocol, b"HELO client.example.org\r\n")  # does not raise here
            await asyncio.wait_for(protocol.wait_closed(), 5)
        assert transport.closed
        [record] = [r for r in caplog.records if r.name == "mailpolicy.server"]
        assert record.getMessage() == "SMTP session error with 192.0.2.1"
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "observer broke"

    asyncio.run(main())


class QuickClient(Transport):
    """A TLS client that sends its ClientHello the moment the server's 220
    to STARTTLS is written: it arrives on the loop's next turn."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.protocol: SmtpProtocol | None = None
        self.secured = False

    def write(self, data: bytes) -> None:
        if self.secured:
            self.incoming.write(data)
            return
        super().write(data)
        if data == b"220 2.0.0 Ready to start TLS\r\n":
            self.secured = True
            self.step()

    def step(self) -> bool:
        """Go on with the handshake; send what it has (on the next turn)."""
        try:
            self.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        hello = self.outgoing.read()
        if hello:
            assert self.protocol is not None
            asyncio.get_running_loop().call_soon(feed, self.protocol, hello)
        return done


def test_starttls_is_set_up_before_the_clients_handshake_can_arrive(
    tls_certificate: Certificate,
) -> None:
    async def main() -> None:
        services = Services(StaticZone.from_mapping({}), delivery=AcceptAllDelivery())
        protocol = SmtpProtocol(
            lambda: POLICY, services, tls_context=tls_certificate.server_context()
        )
        client = QuickClient(tls_certificate.client_context())
        client.protocol = protocol
        protocol.connection_made(client)
        for _ in range(100):
            await asyncio.sleep(0)
            if client.writes:
                break
        feed(protocol, b"EHLO client.example.org\r\n")
        feed(protocol, b"STARTTLS\r\n")
        for _ in range(200):  # the client answers each flight on the next turn
            await asyncio.sleep(0)
            if client.step():
                break
        else:
            raise AssertionError("the TLS handshake did not finish")
        assert client.writes[-1] == b"220 2.0.0 Ready to start TLS\r\n"
        protocol.abort()

    asyncio.run(main())
