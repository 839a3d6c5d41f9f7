"""Relaying against real SMTP servers on 127.0.0.1 (aiosmtpd, and small raw
asyncio servers for misbehaviour aiosmtpd will not produce)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailpolicy.adapters.relay import RelayResult, relay
from mailpolicy.model import NextHop

if TYPE_CHECKING:
    from conftest import Certificate

MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: rcpt@example.net\r\n"
    b"Subject: relay test\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".A line starting with a dot.\r\n"
    b"caf\xc3\xa9\r\n"
)

PASSWORD = "s3cret-Pa55"

# The AUTH tests over plain text do it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@dataclass
class Received:
    sender: str
    recipients: tuple[str, ...]
    content: bytes
    tls: bool
    authenticated: bool


@dataclass
class Hop:
    """What an aiosmtpd next hop records, and how it answers."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str = "250 2.0.0 Ok: queued as 42"
    messages: list[Received] = field(default_factory=list)
    sessions: int = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        for local_part, reply in self.rcpt_replies.items():
            if address.startswith(local_part + "@"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply.startswith("250"):
            self.messages.append(
                Received(
                    envelope.mail_from,
                    tuple(envelope.rcpt_tos),
                    envelope.original_content,
                    server.transport.get_extra_info("ssl_object") is not None,
                    bool(session.authenticated),
                )
            )
        return self.data_reply


HopStarter = Callable[..., tuple[NextHop, Hop]]


@pytest.fixture
def start_hop(free_port: Callable[[], int]) -> Iterator[HopStarter]:
    """Start an aiosmtpd next hop: ``start_hop(handler, security=..., **smtp_kwargs)``."""
    controllers: list[Controller] = []

    def start(
        handler: Hop | None = None, *, security: str = "none", **kwargs: Any
    ) -> tuple[NextHop, Hop]:
        handler = handler if handler is not None else Hop()
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return NextHop("127.0.0.1", port, security), handler

    try:
        yield start
    finally:
        for controller in controllers:
            controller.stop()


def send(
    hops: list[NextHop],
    recipients: list[str],
    *,
    sender: str = "sender@example.org",
    message: bytes = MESSAGE,
    **kwargs: Any,
) -> RelayResult:
    kwargs.setdefault("timeout", 10)
    kwargs.setdefault("local_hostname", "relay.test")
    return asyncio.run(relay(message, sender, recipients, hops, **kwargs))


# ---------------------------------------------------------------------------
# Delivery and fallback


def test_delivered(start_hop: HopStarter) -> None:
    hop, server = start_hop()
    result = send([hop], ["a@example.net", "b@example.net"])

    assert result.all_delivered and not result.any_temporary
    assert result.delivered == ("a@example.net", "b@example.net")
    for outcome in result:
        assert outcome.hop == hop
        assert outcome.reply is not None
        assert (outcome.reply.code, outcome.reply.enhanced) == (250, "2.0.0")
        assert outcome.reply.text == "Ok: queued as 42"
    assert len(server.messages) == 1
    received = server.messages[0]
    assert received.sender == "sender@example.org"
    assert received.recipients == ("a@example.net", "b@example.net")
    assert received.content == MESSAGE
    assert not received.tls


def test_null_sender_and_duplicate_recipients(start_hop: HopStarter) -> None:
    hop, server = start_hop()
    result = send([hop], ["a@example.net", "a@example.net"], sender="")
    assert len(result) == 1 and result.all_delivered
    assert server.messages[0].sender == "<>"  # aiosmtpd spells the null sender so
    assert server.messages[0].recipients == ("a@example.net",)


def test_first_hop_down_second_hop_used(
    start_hop: HopStarter, free_port: Callable[[], int]
) -> None:
    down = NextHop("127.0.0.1", free_port())
    hop, server = start_hop()
    result = send([down, hop], ["a@example.net"])

    assert result.all_delivered
    assert result["a@example.net"].hop == hop
    assert len(server.messages) == 1


def test_all_hops_down_is_temporary(free_port: Callable[[], int]) -> None:
    hops = [NextHop("127.0.0.1", free_port()), NextHop("127.0.0.1", free_port())]
    result = send(hops, ["a@example.net"])

    outcome = result["a@example.net"]
    assert outcome.temporary and result.any_temporary and not result.all_delivered
    assert outcome.hop == hops[1]  # the last one tried
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.1")
    assert f"127.0.0.1:{hops[1].port}" in outcome.reply.text


def test_no_next_hop_is_temporary() -> None:
    result = send([], ["a@example.net"])
    assert result.any_temporary
    assert result["a@example.net"].reply is not None
    assert result["a@example.net"].reply.enhanced == "4.3.5"


def test_no_recipients_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        send([NextHop("127.0.0.1", 1)], [])


# ---------------------------------------------------------------------------
# Replies from the hop


def test_4xx_at_data_is_temporary_and_nothing_delivered(start_hop: HopStarter) -> None:
    hop, server = start_hop(Hop(data_reply="451 4.3.0 Try again later"))
    result = send([hop], ["a@example.net", "b@example.net"])

    assert result.temporary == ("a@example.net", "b@example.net")
    reply = result["a@example.net"].reply
    assert reply is not None and (reply.code, reply.enhanced) == (451, "4.3.0")
    assert server.messages == []


def test_4xx_at_data_then_next_hop(start_hop: HopStarter) -> None:
    first, first_server = start_hop(Hop(data_reply="452 4.3.1 Insufficient storage"))
    second, second_server = start_hop()
    result = send([first, second], ["a@example.net", "b@example.net"])

    assert result.all_delivered
    assert first_server.messages == []
    assert [m.recipients for m in second_server.messages] == [("a@example.net", "b@example.net")]


def test_4xx_at_mail_from_is_temporary(start_hop: HopStarter) -> None:
    hop, _ = start_hop(Hop(mail_reply="421 4.3.2 Shutting down"))
    result = send([hop], ["a@example.net"])
    reply = result["a@example.net"].reply
    assert result.any_temporary and reply is not None and reply.code == 421


def test_5xx_at_mail_from_is_permanent_for_all(start_hop: HopStarter) -> None:
    first, _ = start_hop(Hop(mail_reply="553 5.7.1 Sender rejected"))
    second, second_server = start_hop()
    result = send([first, second], ["a@example.net", "b@example.net"])

    assert result.permanent == ("a@example.net", "b@example.net")
    assert second_server.sessions == 0  # a refusal is final: no other hop


def test_5xx_for_one_recipient(start_hop: HopStarter) -> None:
    first, first_server = start_hop(Hop(rcpt_replies={"nobody": "550 5.1.1 No such user"}))
    second, second_server = start_hop()
    result = send([first, second], ["a@example.net", "nobody@example.net", "b@example.net"])

    assert result.delivered == ("a@example.net", "b@example.net")
    assert result.permanent == ("nobody@example.net",)
    refused = result["nobody@example.net"]
    assert refused.hop == first
    assert refused.reply is not None
    assert (refused.reply.code, refused.reply.enhanced, refused.reply.text) == (
        550,
        "5.1.1",
        "No such user",
    )
    assert [m.recipients for m in first_server.messages] == [("a@example.net", "b@example.net")]
    assert second_server.sessions == 0


def test_4xx_for_one_recipient_goes_to_the_next_hop_alone(start_hop: HopStarter) -> None:
    # Each recipient is delivered exactly once: the next hop only sees the
    # one the first hop deferred.
    first, first_server = start_hop(Hop(rcpt_replies={"later": "450 4.2.0 Greylisted"}))
    second, second_server = start_hop()
    result = send([first, second], ["a@example.net", "later@example.net"])

    assert result.all_delivered
    assert result["a@example.net"].hop == first
    assert result["later@example.net"].hop == second
    assert [m.recipients for m in first_server.messages] == [("a@example.net",)]
    assert [m.recipients for m in second_server.messages] == [("later@example.net",)]


def test_5xx_at_data_is_permanent_for_the_transaction_only(start_hop: HopStarter) -> None:
    first, _ = start_hop(
        Hop(
            rcpt_replies={"later": "451 4.3.0 Not now"},
            data_reply="554 5.6.0 Content rejected",
        )
    )
    second, second_server = start_hop()
    result = send([first, second], ["a@example.net", "later@example.net"])

    assert result.permanent == ("a@example.net",)
    assert result.delivered == ("later@example.net",)
    assert [m.recipients for m in second_server.messages] == [("later@example.net",)]


def test_no_recipient_accepted_sends_no_data(start_hop: HopStarter) -> None:
    hop, server = start_hop(Hop(rcpt_replies={"x": "550 5.1.1 Unknown", "y": "450 4.1.1 Later"}))
    result = send([hop], ["x@example.net", "y@example.net"])
    assert result.permanent == ("x@example.net",)
    assert result.temporary == ("y@example.net",)
    assert server.messages == []


def test_smtputf8(start_hop: HopStarter) -> None:
    with_utf8, server = start_hop(enable_SMTPUTF8=True)
    result = send([with_utf8], ["ünï@example.net"], sender="sénder@example.org")
    assert result.all_delivered
    assert server.messages[0].recipients == ("ünï@example.net",)

    without, _ = start_hop(enable_SMTPUTF8=False)  # aiosmtpd's Controller enables it
    result = send([without], ["ünï@example.net"])
    reply = result["ünï@example.net"].reply
    assert result.permanent and reply is not None and reply.enhanced == "5.6.7"


# ---------------------------------------------------------------------------
# Misbehaving hops: raw asyncio servers


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A bare asyncio TCP server in the test's own loop, for behaviour a real
    SMTP server library will not produce. Closes its connections on exit, so
    nothing outlives the loop."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> NextHop:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            await self.handler(reader, writer)

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return NextHop("127.0.0.1", port)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self.server.wait_closed()


def cutting_handler(received: list[bytes]) -> Handler:
    """Speaks SMTP until DATA, reads part of the message, then resets the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 cut.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-cut.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                received.append(await reader.read(65536))
                writer.transport.abort()  # killed mid-transfer, before the final dot
                return
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()

    return handle


def scripted_handler(greeting: bytes | None) -> Handler:
    """Sends ``greeting`` (or nothing at all), then only listens."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeting is not None:
            writer.write(greeting)
            await writer.drain()
        while await reader.read(4096):
            pass

    return handle


def test_disconnect_mid_data_is_temporary_and_next_hop_delivers_once(
    start_hop: HopStarter,
) -> None:
    big = MESSAGE + b"x" * 998 + b"\r\n" * 1000  # far more than the cutter reads
    second, second_server = start_hop()
    received: list[bytes] = []

    async def main() -> tuple[RelayResult, RelayResult]:
        async with RawServer(cutting_handler(received)) as first:
            alone = await relay(big, "s@example.org", ["a@example.net"], [first], timeout=10)
            fallback = await relay(
                big, "s@example.org", ["a@example.net"], [first, second], timeout=10
            )
        return alone, fallback

    alone, fallback = asyncio.run(main())

    assert len(received) == 2 and all(received)  # the cutter did get part of it
    outcome = alone["a@example.net"]
    assert outcome.temporary
    assert outcome.reply is not None and outcome.reply.enhanced == "4.4.2"
    assert "while sending message body" in outcome.reply.text

    assert fallback.all_delivered
    assert fallback["a@example.net"].hop == second
    assert len(second_server.messages) == 1
    assert second_server.messages[0].content == big


def test_silent_hop_times_out_temporarily() -> None:
    async def main() -> RelayResult:
        async with RawServer(scripted_handler(None)) as hop:
            return await relay(MESSAGE, "s@example.org", ["a@example.net"], [hop], timeout=0.5)

    result = asyncio.run(main())
    outcome = result["a@example.net"]
    assert outcome.temporary and outcome.reply is not None
    assert outcome.reply.enhanced == "4.4.1" and "Timed out" in outcome.reply.text


def test_5xx_greeting_is_skipped(start_hop: HopStarter) -> None:
    second, second_server = start_hop()

    async def main() -> RelayResult:
        async with RawServer(scripted_handler(b"554 5.3.2 Go away\r\n")) as first:
            return await relay(MESSAGE, "s@example.org", ["a@example.net"], [first, second])

    result = asyncio.run(main())
    assert result.all_delivered and len(second_server.messages) == 1


# ---------------------------------------------------------------------------
# AUTH


def authenticator_for(user: str, password: str) -> Callable[..., AuthResult]:
    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok, handled=False)

    return authenticate


def auth_hop(start_hop: HopStarter, **kwargs: Any) -> tuple[NextHop, Hop]:
    hop, server = start_hop(
        authenticator=authenticator_for("relayuser", PASSWORD),
        auth_required=True,
        auth_require_tls=False,
        **kwargs,
    )
    return NextHop(hop.host, hop.port, hop.security, "relayuser", "RELAY_PASSWORD"), server


def assert_no_password(result: RelayResult, caplog: pytest.LogCaptureFixture) -> None:
    assert PASSWORD not in repr(result)
    for record in caplog.records:
        if record.name.startswith(("mailpolicy", "aiosmtplib")):
            assert PASSWORD not in record.getMessage()
            assert PASSWORD not in (record.exc_text or "")


def test_auth_with_password_from_env(
    start_hop: HopStarter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hop, server = auth_hop(start_hop)
    result = send([hop], ["a@example.net"], env={"RELAY_PASSWORD": PASSWORD})

    assert result.all_delivered
    assert server.messages[0].authenticated
    assert_no_password(result, caplog)


def test_wrong_password_is_temporary_and_not_repeated(
    start_hop: HopStarter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hop, server = auth_hop(start_hop)
    wrong = PASSWORD + "-wrong"
    result = send([hop], ["a@example.net"], env={"RELAY_PASSWORD": wrong})

    outcome = result["a@example.net"]
    assert outcome.temporary and outcome.reply is not None
    assert outcome.reply.enhanced == "4.7.0"
    assert "authentication failed" in outcome.reply.text
    assert wrong not in repr(result)
    assert_no_password(result, caplog)
    assert server.messages == []


def test_missing_password_variable_is_temporary_and_says_which(start_hop: HopStarter) -> None:
    hop, server = auth_hop(start_hop)
    result = send([hop], ["a@example.net"], env={})

    outcome = result["a@example.net"]
    assert outcome.temporary and outcome.reply is not None
    assert "RELAY_PASSWORD" in outcome.reply.text and "not set" in outcome.reply.text
    assert server.sessions == 0  # no connection was even attempted


def test_missing_password_on_first_hop_falls_back(start_hop: HopStarter) -> None:
    needs_password, _ = auth_hop(start_hop)
    open_hop, server = start_hop()
    result = send([needs_password, open_hop], ["a@example.net"], env={})
    assert result.all_delivered and len(server.messages) == 1


def test_hop_without_auth_while_we_have_credentials_is_temporary(start_hop: HopStarter) -> None:
    plain, server = start_hop()
    hop = NextHop(plain.host, plain.port, "none", "relayuser", "RELAY_PASSWORD")
    result = send([hop], ["a@example.net"], env={"RELAY_PASSWORD": PASSWORD})
    assert result.any_temporary
    assert server.messages == []


# ---------------------------------------------------------------------------
# TLS


def test_starttls_required(start_hop: HopStarter, tls_certificate: Certificate) -> None:
    hop, server = start_hop(
        security="starttls", tls_context=tls_certificate.server_context(), require_starttls=True
    )
    result = send([hop], ["a@example.net"], tls_context=tls_certificate.client_context())
    assert result.all_delivered
    assert server.messages[0].tls


def test_starttls_with_auth(start_hop: HopStarter, tls_certificate: Certificate) -> None:
    hop, server = start_hop(
        security="starttls",
        tls_context=tls_certificate.server_context(),
        require_starttls=True,
        authenticator=authenticator_for("relayuser", PASSWORD),
        auth_required=True,
    )
    hop = NextHop(hop.host, hop.port, "starttls", "relayuser", "RELAY_PASSWORD")
    result = send(
        [hop],
        ["a@example.net"],
        tls_context=tls_certificate.client_context(),
        env={"RELAY_PASSWORD": PASSWORD},
    )
    assert result.all_delivered
    assert server.messages[0].tls and server.messages[0].authenticated


def test_starttls_not_offered_is_temporary(start_hop: HopStarter) -> None:
    plain, server = start_hop()
    hop = NextHop(plain.host, plain.port, "starttls")
    result = send([hop], ["a@example.net"])
    outcome = result["a@example.net"]
    assert outcome.temporary and outcome.reply is not None
    assert outcome.reply.enhanced == "4.7.4"
    assert server.messages == []


def test_starttls_certificate_is_verified_by_default(
    start_hop: HopStarter, tls_certificate: Certificate
) -> None:
    hop, server = start_hop(security="starttls", tls_context=tls_certificate.server_context())
    result = send([hop], ["a@example.net"])  # system trust store: self-signed is refused
    outcome = result["a@example.net"]
    assert outcome.temporary and outcome.reply is not None
    assert outcome.reply.enhanced == "4.7.5"
    assert server.messages == []


def test_security_none_never_uses_tls(start_hop: HopStarter, tls_certificate: Certificate) -> None:
    # The hop offers STARTTLS; "none" means we do not take it.
    hop, server = start_hop(tls_context=tls_certificate.server_context())
    result = send([hop], ["a@example.net"])
    assert result.all_delivered
    assert not server.messages[0].tls


def test_implicit_tls(start_hop: HopStarter, tls_certificate: Certificate) -> None:
    hop, server = start_hop(security="tls", ssl_context=tls_certificate.server_context())
    result = send([hop], ["a@example.net"], tls_context=tls_certificate.client_context())
    assert result.all_delivered
    assert server.messages[0].tls


def test_implicit_tls_certificate_is_verified_by_default(
    start_hop: HopStarter, tls_certificate: Certificate
) -> None:
    hop, server = start_hop(security="tls", ssl_context=tls_certificate.server_context())
    result = send([hop], ["a@example.net"])
    outcome = result["a@example.net"]
    assert outcome.temporary and outcome.reply is not None
    assert outcome.reply.enhanced == "4.7.5"
    assert server.messages == []


def test_implicit_tls_against_a_plain_hop_fails_temporarily(start_hop: HopStarter) -> None:
    plain, _ = start_hop()
    context = ssl.create_default_context()
    result = send([NextHop(plain.host, plain.port, "tls")], ["a@example.net"], tls_context=context)
    assert result.any_temporary
