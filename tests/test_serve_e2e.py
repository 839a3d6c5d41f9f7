"""The live server of issue 4, in process, over real sockets.

Every server here is a :class:`MailServer` on a free port of 127.0.0.1, run by
an event loop in a background thread, while the test talks to it from the
main thread with ``smtplib`` or a small raw socket client. Next hops are
aiosmtpd servers (or raw asyncio servers for misbehaviour aiosmtpd will not
produce) on 127.0.0.1; routes come from the policy (``delivery.mode =
"relay"``), DNS from a :class:`StaticZone` or a :class:`ZoneServer`. Nothing
is mocked and nothing leaves the loopback interface.

The subprocess tests of ``mailpolicy serve`` are in test_serve_cli.py.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import json
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from aiosmtpd.controller import Controller

from mailpolicy.adapters.dns import LiveResolver, Resolver, StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer
from mailpolicy.adapters.driver import AcceptAllDelivery
from mailpolicy.adapters.gateway import GatewayDelivery
from mailpolicy.adapters.replay import (
    DEFAULT_NOW,
    Case,
    ReplayReply,
    build_message,
    build_policy,
    build_zone,
    compare,
    load_cases,
)
from mailpolicy.adapters.server import Listener, MailServer
from mailpolicy.adapters.state import MemoryStore
from mailpolicy.cli.serve import write_inline_when_alone
from mailpolicy.config import settings_from_mapping
from mailpolicy.passwords import hash_password
from mailpolicy.policy import Policy, compile_policy
from mailpolicy.settings import Settings

if TYPE_CHECKING:
    from conftest import Certificate

_T = TypeVar("_T")

PASSWORD = "wonderland"
#: cheap to verify, same scheme as a real hash
ALICE_HASH = hash_password(PASSWORD, ln=4)
CONFORMANCE = Path(__file__).parent / "conformance"
#: the address clients are judged as, through the PROXY protocol
OUTSIDER = "203.0.113.9"

MESSAGE = (
    b"From: <alice@example.com>\r\n"
    b"To: <bob@remote.example>\r\n"
    b"Subject: end to end\r\n"
    b"Message-ID: <e2e-1@example.com>\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".A line that starts with a dot.\r\n"
)


# ---------------------------------------------------------------------------
# Policies


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(a))
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BASE_POLICY: dict[str, Any] = {
    "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
    "accounts": {
        "alice": {"password_hash": ALICE_HASH, "addresses": ["alice@example.com"]},
    },
}


def make_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    return settings_from_mapping(_merge(BASE_POLICY, overrides or {}), source="<test policy>")


def relay_to(port: int) -> dict[str, Any]:
    """The policy part that sends every non-local recipient to 127.0.0.1:port."""
    return {
        "delivery": {
            "mode": "relay",
            "relay_host": {"host": "127.0.0.1", "port": port, "security": "none"},
        }
    }


#: no local networks: 127.0.0.1 is judged as any outsider
NO_LOCAL: dict[str, Any] = {"general": {"smtp_auth": {"local_networks": []}}}


# ---------------------------------------------------------------------------
# An event loop in a thread, and servers on it


class LoopThread:
    """An asyncio loop running in a daemon thread; the test thread submits to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop")
        self._thread.daemon = True
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


ServerStarter = Callable[..., MailServer]


@pytest.fixture
def serve(loop: LoopThread) -> Iterator[ServerStarter]:
    """``serve(settings_or_policy, resolver=None, **MailServer kwargs)``: a
    started server (one plain listener on a free port unless ``listeners``
    says otherwise); every one is stopped at teardown."""
    started: list[MailServer] = []

    def start(
        policy: Settings | Policy, resolver: Resolver | None = None, **kwargs: Any
    ) -> MailServer:
        if isinstance(policy, Settings):
            policy = compile_policy(policy)
        kwargs.setdefault("listeners", [Listener("smtp", "127.0.0.1", 0)])
        server = MailServer(
            policy, resolver if resolver is not None else StaticZone.from_mapping({}), **kwargs
        )
        loop.run(server.start())
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                loop.run(server.stop(grace=0), timeout=10)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayDelivery]]:
    """``gateway(settings, resolver=None)``: real Maildir + ledger + relay under tmp_path."""
    made: list[GatewayDelivery] = []

    def make(settings: Settings, resolver: Resolver | None = None) -> GatewayDelivery:
        delivery = GatewayDelivery(
            settings,
            resolver if resolver is not None else StaticZone.from_mapping({}),
            maildir_root=tmp_path / "maildir",
            relay_timeout=5,
        )
        made.append(delivery)
        return delivery

    try:
        yield make
    finally:
        for delivery in made:
            delivery.ledger.close()


def maildir_messages(root: Path, address: str) -> list[bytes]:
    new = root / address / "new"
    if not new.is_dir():
        return []
    # Maildir files hold LF line ends; compare them in wire form (CRLF).
    return [_wire(p.read_bytes()) for p in sorted(new.iterdir())]


def _wire(stored: bytes) -> bytes:
    return stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Clock:
    """An injectable clock: tests move ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# A raw SMTP client


@dataclass(frozen=True)
class Answer:
    code: int
    enhanced: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced or ''} {self.text}"


def _is_enhanced(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and parts[0] in "245" and all(p.isdigit() for p in parts)


def proxy_line(ip: str) -> bytes:
    if ":" in ip:
        return f"PROXY TCP6 {ip} ::1 5000 25\r\n".encode()
    return f"PROXY TCP4 {ip} 127.0.0.1 5000 25\r\n".encode()


class Client:
    """A blocking SMTP client that shows every reply as it is."""

    def __init__(
        self,
        port: int,
        *,
        proxy: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10,
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.file = sock.makefile("rb")
        if proxy is not None:
            self.send(proxy_line(proxy))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8") + b"\r\n"
        self.sock.sendall(data)

    def reply(self) -> Answer | None:
        """The next reply, or None when the server closed the connection."""
        lines: list[str] = []
        while True:
            try:
                raw = self.file.readline()
            except ConnectionResetError:
                raw = b""
            if not raw:
                return None
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        code = int(lines[0][:3])
        enhanced: str | None = None
        texts = []
        for ln in lines:
            text = ln[4:]
            head, _, rest = text.partition(" ")
            if _is_enhanced(head):
                enhanced = enhanced or head
                text = rest
            texts.append(text)
        return Answer(code, enhanced, "\n".join(texts))

    def expect(self) -> Answer:
        answer = self.reply()
        assert answer is not None, "the server closed the connection"
        return answer

    def cmd(self, line: bytes | str) -> Answer:
        self.send(line)
        return self.expect()

    def at_eof(self) -> bool:
        """True when the server has closed the connection (nothing more to read)."""
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True

    def transaction(self, sender: str, recipients: list[str], message: bytes) -> Answer:
        """MAIL, RCPT..., DATA and the message; the reply to the end of DATA."""
        assert self.cmd(f"MAIL FROM:<{sender}>").code == 250
        for rcpt in recipients:
            answer = self.cmd(f"RCPT TO:<{rcpt}>")
            assert answer.code == 250, answer
        assert self.cmd("DATA").code == 354
        return self.cmd(_stuff(message))


def _stuff(message: bytes) -> bytes:
    lines = message.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def auth_plain(user: str, password: str) -> str:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"AUTH PLAIN {token}"


# ---------------------------------------------------------------------------
# Next hops


@dataclass
class HopHandler:
    """An aiosmtpd handler that records what it accepts.

    ``mode``: ``"ok"``; ``"drop"`` closes the connection once the whole
    message is in, before any reply (the hop keeps nothing).
    ``hold``: when set, the reply to the end of DATA waits until it is set.
    """

    mode: str = "ok"
    messages: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)
    hold: threading.Event | None = None
    waiting: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.mode == "drop":
            server.transport.close()
            return "451 4.3.0 never sent"
        self.messages.append(
            (envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        if self.hold is not None:
            self.waiting.set()
            while not self.hold.is_set():
                await asyncio.sleep(0.01)
        return "250 2.0.0 Ok: queued at the next hop"


class Hop:
    """An aiosmtpd next hop on a fixed 127.0.0.1 port that can go down and come back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = HopHandler()
        self._controller: Controller | None = None

    def start(self) -> Hop:
        controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def messages(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        return self.handler.messages


@pytest.fixture
def hops(free_port: Callable[[], int]) -> Iterator[Callable[[], Hop]]:
    made: list[Hop] = []

    def make() -> Hop:
        hop = Hop(free_port())
        made.append(hop)
        return hop.start()

    try:
        yield make
    finally:
        for hop in made:
            hop.stop()


class SilentHop:
    """A raw next hop that takes the whole message and then never answers."""

    def __init__(self) -> None:
        self.port = 0
        self.received = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(b"220 silent.example ESMTP\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-silent.example\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.received += 1
                    await asyncio.sleep(3600)  # and never a reply
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()


# ===========================================================================
# 2. TLS listeners and SMTP AUTH


@pytest.fixture
def tls_server(
    serve: ServerStarter,
    gateway: Callable[..., GatewayDelivery],
    hops: Callable[[], Hop],
    tls_certificate: Certificate,
) -> tuple[MailServer, Hop]:
    """smtp (STARTTLS), submission (STARTTLS) and smtps (implicit TLS), with a
    certificate from the policy, a state store, and every non-local recipient
    relayed to an aiosmtpd next hop. 127.0.0.1 is not a local network here."""
    hop = hops()
    settings = make_settings(
        _merge(
            _merge(NO_LOCAL, relay_to(hop.port)),
            {
                "server": {
                    "tls_cert": str(tls_certificate.cert),
                    "tls_key": str(tls_certificate.key),
                    "max_auth_failures_per_client": 3,
                }
            },
        )
    )
    server = serve(
        settings,
        delivery=gateway(settings),
        store=MemoryStore(),
        listeners=[
            Listener("smtp", "127.0.0.1", 0, "starttls"),
            Listener("submission", "127.0.0.1", 0, "starttls"),
            Listener("smtps", "127.0.0.1", 0, "implicit"),
        ],
    )
    return server, hop


def _features(client: smtplib.SMTP) -> dict[str, str]:
    return dict(client.esmtp_features)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_auth_is_offered_only_after_starttls(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate, listener: str
) -> None:
    server, _ = tls_server
    with smtplib.SMTP("127.0.0.1", server.port(listener), timeout=10) as client:
        client.ehlo("client.example.org")
        features = _features(client)
        assert "starttls" in features
        assert "auth" not in features  # no_plaintext_without_tls (default true)
        # and not accepted either, even when the client tries
        code, text = client.docmd(auth_plain("alice", PASSWORD))
        assert (code, text[:5]) == (503, b"5.5.1")

        client.starttls(context=tls_certificate.client_context())
        client.ehlo("client.example.org")
        features = _features(client)
        assert "starttls" not in features
        assert features["auth"].split() == ["PLAIN", "LOGIN"]
        code, text = client.login("alice", PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0")


@pytest.mark.timeout(30)
def test_auth_login_mechanism_after_starttls(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate
) -> None:
    server, _ = tls_server
    with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10) as client:
        client.starttls(context=tls_certificate.client_context())
        client.ehlo("client.example.org")
        client.user, client.password = "alice", PASSWORD
        # LOGIN without an initial response: 334 Username, 334 Password, 235
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235


@pytest.mark.timeout(30)
def test_implicit_tls_offers_auth_at_once(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate
) -> None:
    server, _ = tls_server
    context = tls_certificate.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), context=context, timeout=10) as c:
        c.ehlo("client.example.org")
        features = _features(c)
        assert features["auth"].split() == ["PLAIN", "LOGIN"]
        assert "starttls" not in features  # already under TLS
        assert c.login("alice", PASSWORD)[0] == 235


@pytest.mark.timeout(30)
def test_wrong_password_gets_535_then_421_after_the_limit(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate
) -> None:
    server, _ = tls_server
    with Client(server.port("smtps"), tls=tls_certificate.client_context()) as c:
        assert c.expect().code == 220
        assert c.cmd("EHLO client.example.org").code == 250
        for _ in range(3):  # max_auth_failures_per_client = 3
            answer = c.cmd(auth_plain("alice", "not-the-password"))
            assert (answer.code, answer.enhanced) == (535, "5.7.8")
        answer = c.cmd(auth_plain("alice", "still-not-it"))
        assert (answer.code, answer.enhanced) == (421, "4.7.0")
        assert c.at_eof()


@pytest.mark.timeout(30)
def test_auth_failure_limit_stops_further_guesses(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate
) -> None:
    server, _ = tls_server
    context = tls_certificate.client_context()
    with Client(server.port("smtps"), tls=context) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        for _ in range(3):
            assert c.cmd(auth_plain("alice", "guess")).code == 535
        assert c.cmd(auth_plain("alice", "guess")).code == 421
    # Same client, same rate window, a new connection: still locked out, even
    # with the right password (else the lock-out is one guess per connection).
    with Client(server.port("smtps"), tls=context) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        answer = c.cmd(auth_plain("alice", PASSWORD))
        assert 400 <= answer.code < 500, answer


@pytest.mark.timeout(30)
def test_password_never_logged(
    tls_server: tuple[MailServer, Hop],
    tls_certificate: Certificate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server, hop = tls_server
    wrong = "Secret-Wrong-9"
    secrets = {
        PASSWORD,
        wrong,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(wrong.encode()).decode(),
        base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode(),
        base64.b64encode(f"\0alice\0{wrong}".encode()).decode(),
    }
    context = tls_certificate.client_context()
    with Client(server.port("smtps"), tls=context) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        assert c.cmd(auth_plain("alice", wrong)).code == 535
        assert c.cmd("AUTH LOGIN").code == 334
        assert c.cmd(base64.b64encode(b"alice") + b"\r\n").code == 334
        assert c.cmd(base64.b64encode(wrong.encode()) + b"\r\n").code == 535
        assert c.cmd(auth_plain("alice", PASSWORD)).code == 235
        answer = c.transaction("alice@example.com", ["bob@remote.example"], MESSAGE)
        assert answer.code == 250, answer
        c.cmd("QUIT")
    assert len(hop.messages) == 1
    assert caplog.records, "nothing was logged at all: the check would prove nothing"
    everything = caplog.text + "\n".join(repr(vars(r)) for r in caplog.records)
    for secret in secrets:
        assert secret not in everything


@pytest.mark.timeout(30)
def test_authenticated_client_relays_and_unauthenticated_is_denied(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate
) -> None:
    server, hop = tls_server
    port = server.port("submission")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=tls_certificate.client_context())
        client.ehlo("client.example.org")
        client.mail("alice@example.com")
        code, text = client.rcpt("bob@remote.example")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert b"Relay access denied" in text
        client.rset()
    assert hop.messages == []

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=tls_certificate.client_context())
        client.ehlo("client.example.org")
        client.login("alice", PASSWORD)
        client.mail("alice@example.com")
        assert client.rcpt("bob@remote.example")[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
    [(sender, rcpts, content)] = hop.messages
    assert (sender, rcpts) == ("alice@example.com", ("bob@remote.example",))
    head, _, rest = content.partition(b"\r\n\t")
    assert head.startswith(b"Received: from client.example.org (unknown [127.0.0.1])")
    assert b"with ESMTPSA id" in rest  # TLS and AUTH, RFC 3848
    assert content.endswith(MESSAGE)


@pytest.mark.timeout(30)
def test_commands_pipelined_after_starttls_are_not_run_under_tls(
    tls_server: tuple[MailServer, Hop], tls_certificate: Certificate
) -> None:
    # CVE-2011-0411 (Postfix) and CVE-2024-34083 (aiosmtpd): plaintext sent
    # behind STARTTLS must be thrown away, not executed once TLS is up.
    server, _ = tls_server
    with Client(server.port("smtp")) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert c.expect().code == 220
        c.file.close()
        tls = tls_certificate.client_context().wrap_socket(c.sock, server_hostname="localhost")
        c.sock, c.file = tls, tls.makefile("rb")
        answer = c.cmd("EHLO client.example.org")
        assert answer.code == 250 and "AUTH PLAIN LOGIN" in answer.text, answer
        answer = c.cmd("MAIL FROM:<real@example.org>")
        assert answer.code == 250, answer  # not "503 nested MAIL": nothing was injected


@pytest.mark.timeout(30)
def test_proxy_protocol_line_comes_before_implicit_tls(
    serve: ServerStarter, tls_certificate: Certificate
) -> None:
    settings = make_settings(
        {
            "server": {
                "tls_cert": str(tls_certificate.cert),
                "tls_key": str(tls_certificate.key),
            }
        }
    )
    server = serve(
        settings,
        proxy_protocol=True,
        listeners=[Listener("smtps", "127.0.0.1", 0, "implicit")],
    )
    raw = socket.create_connection(("127.0.0.1", server.port("smtps")), timeout=5)
    try:
        raw.sendall(proxy_line(OUTSIDER))  # in clear, as a load balancer sends it
        tls = tls_certificate.client_context().wrap_socket(raw, server_hostname="localhost")
        with tls, tls.makefile("rb") as replies:
            assert replies.readline().startswith(b"220 ")
    finally:
        raw.close()


# ===========================================================================
# 3. Relaying without loss


@pytest.fixture
def relay_server(
    serve: ServerStarter, gateway: Callable[..., GatewayDelivery], hops: Callable[[], Hop]
) -> tuple[MailServer, Hop]:
    """127.0.0.1 is a local network (may relay); non-local mail goes to ``hop``."""
    hop = hops()
    settings = make_settings(relay_to(hop.port))
    return serve(settings, delivery=gateway(settings)), hop


def send(port: int, sender: str, recipients: list[str], message: bytes) -> Answer:
    with Client(port) as c:
        assert c.expect().code == 220
        assert c.cmd("EHLO client.example.org").code == 250
        answer = c.transaction(sender, recipients, message)
        c.cmd("QUIT")
        return answer


@pytest.mark.timeout(30)
def test_relay_answers_250_only_after_the_next_hop_has_it(
    relay_server: tuple[MailServer, Hop],
) -> None:
    server, hop = relay_server
    hop.handler.hold = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(
            send, server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE
        )
        assert hop.handler.waiting.wait(10), "the message never reached the next hop"
        time.sleep(0.3)
        assert not reply.done(), "the client got its answer before the next hop answered"
        hop.handler.hold.set()
        answer = reply.result(10)
    assert (answer.code, answer.enhanced) == (250, "2.0.0")
    [(sender, rcpts, content)] = hop.messages
    assert (sender, rcpts) == ("alice@example.com", ("bob@remote.example",))
    assert content.startswith(b"Received: from client.example.org (unknown [127.0.0.1])\r\n")
    assert content.endswith(MESSAGE)  # dots unstuffed and stuffed again on the way


@pytest.mark.timeout(30)
def test_hop_down_gives_4xx_then_the_retry_delivers_once(
    relay_server: tuple[MailServer, Hop],
) -> None:
    server, hop = relay_server
    hop.stop()
    answer = send(server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE)
    assert 400 <= answer.code < 500, answer
    assert answer.enhanced is not None and answer.enhanced.startswith("4.")
    assert hop.messages == []

    hop.start()
    answer = send(server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE)
    assert answer.code == 250, answer
    assert len(hop.messages) == 1
    assert hop.messages[0][2].endswith(MESSAGE)


@pytest.mark.timeout(30)
def test_mixed_local_and_relayed_recipients_are_each_delivered_once(
    relay_server: tuple[MailServer, Hop], tmp_path: Path
) -> None:
    server, hop = relay_server
    hop.stop()
    rcpts = ["alice@example.com", "bob@remote.example"]
    answer = send(server.port(), "carol@example.org", rcpts, MESSAGE)
    assert (answer.code, answer.enhanced) == (451, "4.4.0"), answer
    assert len(maildir_messages(tmp_path / "maildir", "alice@example.com")) == 1
    assert hop.messages == []

    hop.start()
    answer = send(server.port(), "carol@example.org", rcpts, MESSAGE)  # the client's retry
    assert answer.code == 250, answer
    [local] = maildir_messages(tmp_path / "maildir", "alice@example.com")  # not twice
    assert local.endswith(MESSAGE)
    [(sender, relayed_to, content)] = hop.messages
    assert (sender, relayed_to) == ("carol@example.org", ("bob@remote.example",))
    assert content.endswith(MESSAGE)


@pytest.mark.timeout(30)
def test_hop_dropping_the_connection_mid_data_gives_4xx_then_one_copy(
    relay_server: tuple[MailServer, Hop],
) -> None:
    server, hop = relay_server
    hop.handler.mode = "drop"
    answer = send(server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE)
    assert 400 <= answer.code < 500, answer
    assert hop.messages == []

    hop.handler.mode = "ok"
    answer = send(server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE)
    assert answer.code == 250, answer
    assert len(hop.messages) == 1


@pytest.mark.timeout(30)
def test_hop_silent_after_data_gives_4xx_then_a_healthy_hop_gets_one_copy(
    loop: LoopThread,
    serve: ServerStarter,
    tmp_path: Path,
    hops: Callable[[], Hop],
) -> None:
    silent = SilentHop()
    loop.run(silent.start())
    try:
        healthy = hops()

        # The same route (an exception for remote.example) is first the silent
        # hop, then, after the operator fixed it, the healthy one; one ledger.
        def policy(port: int) -> Settings:
            return make_settings(
                {
                    "delivery": {
                        "exceptions": [
                            {
                                "name": "remote",
                                "match": "recipient",
                                "targets": ["remote.example"],
                                "host": "127.0.0.1",
                                "port": port,
                                "security": "none",
                            }
                        ]
                    }
                }
            )

        # A restart with the fixed route: a new gateway on the same Maildir
        # root, so the same ledger file.
        first, second = policy(silent.port), policy(healthy.port)
        root = tmp_path / "md"
        delivery = GatewayDelivery(
            first, StaticZone.from_mapping({}), maildir_root=root, relay_timeout=1
        )
        server = serve(first, delivery=delivery)
        started = time.monotonic()
        answer = send(server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE)
        assert 400 <= answer.code < 500, answer
        assert time.monotonic() - started < 5
        assert silent.received == 1
        loop.run(server.stop(grace=0))
        delivery.ledger.close()

        delivery = GatewayDelivery(second, StaticZone.from_mapping({}), maildir_root=root)
        server = serve(second, delivery=delivery)
        answer = send(server.port(), "alice@example.com", ["bob@remote.example"], MESSAGE)
        assert answer.code == 250, answer
        assert len(healthy.messages) == 1
        delivery.ledger.close()
    finally:
        loop.run(silent.stop())


@pytest.mark.timeout(30)
def test_hop_refusing_for_good_is_passed_back_or_kept(
    relay_server: tuple[MailServer, Hop], tmp_path: Path
) -> None:
    server, hop = relay_server

    async def refuse_nobody(
        srv: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 <nobody@remote.example>: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    hop.handler.handle_RCPT = refuse_nobody  # type: ignore[attr-defined]
    # Every recipient refused for good: the client gets the hop's 5xx and bounces.
    answer = send(server.port(), "alice@example.com", ["nobody@remote.example"], MESSAGE)
    assert (answer.code, answer.enhanced) == (550, "5.1.1"), answer
    assert hop.messages == []
    # One delivered, one refused: 250 (a bounce would be wrong for bob), and the
    # message is kept for the operator with the reason: never dropped silently.
    rcpts = ["bob@remote.example", "nobody@remote.example"]
    answer = send(server.port(), "carol@example.org", rcpts, MESSAGE)
    assert answer.code == 250, answer
    assert [m[1] for m in hop.messages] == [("bob@remote.example",)]
    [kept] = maildir_messages(tmp_path / "maildir", "undeliverable@mx.example.com")
    assert kept.startswith(
        b"Return-Path: <carol@example.org>\r\nDelivered-To: undeliverable@mx.example.com\r\n"
        b"X-Mailpolicy-Undeliverable: <nobody@remote.example> 550"
    )
    assert kept.endswith(MESSAGE)


@pytest.mark.timeout(30)
def test_a_second_identical_message_after_a_250_is_delivered_again(
    relay_server: tuple[MailServer, Hop], tmp_path: Path
) -> None:
    server, _ = relay_server
    report = b"From: <cron@example.com>\r\nSubject: backup OK\r\n\r\nAll good.\r\n"
    for _ in range(2):
        answer = send(server.port(), "cron@example.com", ["alice@example.com"], report)
        assert answer.code == 250, answer
    assert len(maildir_messages(tmp_path / "maildir", "alice@example.com")) == 2


@pytest.mark.timeout(30)
def test_serve_writes_on_the_loop_only_while_one_session_is_open(
    serve: ServerStarter,
    gateway: Callable[..., GatewayDelivery],
    tmp_path: Path,
    fsyncs_by_thread: list[str],
) -> None:
    settings = make_settings()
    delivery = gateway(settings)
    server = serve(settings, delivery=delivery)
    write_inline_when_alone(server, delivery)
    synced_by = fsyncs_by_thread
    answer = send(server.port(), "carol@example.org", ["alice@example.com"], MESSAGE)
    assert answer.code == 250, answer
    assert len(synced_by) >= 2  # the file and its new/ folder, at least
    assert set(synced_by) == {"server-loop"}
    synced_by.clear()
    with Client(server.port()) as idle:
        assert idle.expect().code == 220  # a second session, open meanwhile
        answer = send(server.port(), "carol@example.org", ["alice@example.com"], MESSAGE)
    assert answer.code == 250, answer
    assert synced_by == ["maildir-writer", "maildir-writer"]
    assert len(maildir_messages(tmp_path / "maildir", "alice@example.com")) == 2


@pytest.mark.timeout(30)
def test_discard_accepts_drops_and_logs(
    serve: ServerStarter,
    gateway: Callable[..., GatewayDelivery],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(
        {
            "security": {
                "lists": [
                    {
                        "name": "spamtrap",
                        "list": "black",
                        "action": "discard",
                        "recipient": ["spamtrap@example.com"],
                    }
                ]
            }
        }
    )
    server = serve(settings, delivery=gateway(settings))
    answer = send(
        server.port(), "x@example.org", ["alice@example.com", "spamtrap@example.com"], MESSAGE
    )
    assert (answer.code, answer.enhanced) == (250, "2.0.0")
    assert not (tmp_path / "maildir" / "alice@example.com").exists()
    assert not (tmp_path / "maildir" / "spamtrap@example.com").exists()
    logged = [
        r.decision  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "decision", {}).get("discarded")
    ]
    assert len(logged) == 1
    assert logged[0]["rule"] == "security.lists.spamtrap"
    assert logged[0]["recipients"] == ["alice@example.com", "spamtrap@example.com"]


ATTACHMENT_POLICY = {"general": {"max_attachment_size_mb": 1}}


def _with_attachment(decoded_size: int) -> bytes:
    import email.message

    msg = email.message.EmailMessage()
    msg["From"] = "carol@example.org"
    msg["To"] = "alice@example.com"
    msg["Subject"] = "attachment"
    msg.set_content("see attached")
    msg.add_attachment(
        b"\x00" * decoded_size, maintype="application", subtype="octet-stream", filename="blob.bin"
    )
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


@pytest.mark.timeout(30)
def test_attachment_limit_counts_decoded_size(serve: ServerStarter) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings(ATTACHMENT_POLICY), delivery=delivery)
    mib = 1024 * 1024
    small = _with_attachment(mib - 1024)  # base64 makes it 1.35 MiB on the wire
    assert len(small) > mib
    assert send(server.port(), "carol@example.org", ["alice@example.com"], small).code == 250
    answer = send(
        server.port(), "carol@example.org", ["alice@example.com"], _with_attachment(mib + 1024)
    )
    assert (answer.code, answer.enhanced) == (552, "5.3.4")
    assert len(delivery.messages) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "header", ["Auto-Submitted: auto-forwarded", "Resent-From: <dave@example.com>"]
)
def test_auto_forwarded_mail_may_not_leave_our_domains(serve: ServerStarter, header: str) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings({"general": {"disable_auto_forwarding": True}}), delivery=delivery)
    message = header.encode() + b"\r\n" + MESSAGE
    answer = send(server.port(), "carol@example.org", ["bob@remote.example"], message)
    assert (answer.code, answer.enhanced) == (550, "5.7.1")
    answer = send(server.port(), "carol@example.org", ["alice@example.com"], message)
    assert answer.code == 250  # staying here is fine
    assert [m.recipients for m in delivery.messages] == [("alice@example.com",)]


# ===========================================================================
# 4. Connection, message and recipient limits


@pytest.mark.timeout(30)
def test_connection_count_limit_per_client(serve: ServerStarter) -> None:
    settings = make_settings(
        _merge(NO_LOCAL, {"security": {"connection_policy": {"max_connections_per_client": 2}}})
    )
    server = serve(settings, store=MemoryStore(), proxy_protocol=True)
    port = server.port()
    first, second = Client(port, proxy=OUTSIDER), Client(port, proxy=OUTSIDER)
    try:
        assert first.expect().code == 220
        assert second.expect().code == 220
        with Client(port, proxy=OUTSIDER) as third:
            answer = third.expect()
            assert (answer.code, answer.enhanced) == (421, "4.7.0")
            assert third.at_eof()
        with Client(port, proxy="203.0.113.10") as other:  # another client has its own count
            assert other.expect().code == 220
        assert second.cmd("NOOP").code == 250  # the refused one took no slot
        first.cmd("QUIT")
        first.close()
        # the slot is free again as soon as the server saw the close
        deadline = time.monotonic() + 3
        while True:
            with Client(port, proxy=OUTSIDER) as fourth:
                answer = fourth.expect()
                if answer.code == 220 or time.monotonic() > deadline:
                    break
            time.sleep(0.05)
        assert answer.code == 220, answer
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(30)
def test_connection_count_limit_exempts_trusted_networks(serve: ServerStarter) -> None:
    settings = make_settings(
        _merge(
            NO_LOCAL,
            {
                "relay": {"trusted_networks": ["203.0.113.0/24"]},
                "security": {"connection_policy": {"max_connections_per_client": 2}},
            },
        )
    )
    server = serve(settings, store=MemoryStore(), proxy_protocol=True)
    clients = [Client(server.port(), proxy=OUTSIDER) for _ in range(4)]
    try:
        assert [c.expect().code for c in clients] == [220] * 4
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(30)
def test_limits_are_enforced_without_an_explicit_store(serve: ServerStarter) -> None:
    settings = make_settings(
        _merge(NO_LOCAL, {"security": {"connection_policy": {"max_connections_per_client": 1}}})
    )
    server = serve(settings, proxy_protocol=True)  # no store=...: the default
    with Client(server.port(), proxy=OUTSIDER) as first:
        assert first.expect().code == 220
        with Client(server.port(), proxy=OUTSIDER) as second:
            assert second.expect().code == 421


def _rate_server(serve: ServerStarter, clock: Clock, **limits: int) -> MailServer:
    settings = make_settings(
        {
            "general": {"smtp_auth": {"local_networks": ["192.0.2.0/24"]}},
            "relay": {"trusted_networks": ["198.51.100.0/24"]},
            "security": {"connection_policy": {"rate_window_seconds": 60, **limits}},
        }
    )
    return serve(settings, store=MemoryStore(), clock=clock, proxy_protocol=True)


#: a trusted network and a local network: both exempt from the limits
EXEMPT = ["198.51.100.7", "192.0.2.5"]


#: a multiple of 60: the window of these tests starts here
T0 = 1_700_000_040.0


@pytest.mark.timeout(30)
def test_message_rate_limit(serve: ServerStarter) -> None:
    clock = Clock(T0)
    server = _rate_server(serve, clock, max_message_rate_per_client=2)
    with Client(server.port(), proxy=OUTSIDER) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        for _ in range(2):
            assert c.cmd("MAIL FROM:<a@example.org>").code == 250
            assert c.cmd("RSET").code == 250
        answer = c.cmd("MAIL FROM:<a@example.org>")
        assert (answer.code, answer.enhanced) == (450, "4.7.1")
        clock.now += 30  # same window
        assert c.cmd("MAIL FROM:<a@example.org>").code == 450
        clock.now += 30  # the next window
        assert c.cmd("MAIL FROM:<a@example.org>").code == 250
    for exempt in EXEMPT:
        with Client(server.port(), proxy=exempt) as c:
            c.expect()
            c.cmd("EHLO trusted.example.org")
            for _ in range(5):
                assert c.cmd("MAIL FROM:<a@example.org>").code == 250
                assert c.cmd("RSET").code == 250


@pytest.mark.timeout(30)
def test_recipient_rate_limit(serve: ServerStarter) -> None:
    clock = Clock(T0)
    server = _rate_server(serve, clock, max_recipient_rate_per_client=3)
    with Client(server.port(), proxy=OUTSIDER) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        assert c.cmd("MAIL FROM:<a@example.org>").code == 250
        for i in range(3):
            assert c.cmd(f"RCPT TO:<r{i}@example.com>").code == 250
        answer = c.cmd("RCPT TO:<r3@example.com>")
        assert (answer.code, answer.enhanced) == (450, "4.7.1")
        clock.now += 60
        assert c.cmd("RCPT TO:<r4@example.com>").code == 250
    for exempt in EXEMPT:
        with Client(server.port(), proxy=exempt) as c:
            c.expect()
            c.cmd("EHLO trusted.example.org")
            assert c.cmd("MAIL FROM:<a@example.org>").code == 250
            for i in range(6):
                assert c.cmd(f"RCPT TO:<r{i}@example.com>").code == 250


@pytest.mark.timeout(30)
def test_connection_rate_limit(serve: ServerStarter) -> None:
    clock = Clock(T0)
    server = _rate_server(serve, clock, max_connection_rate_per_client=2)
    for _ in range(2):
        with Client(server.port(), proxy=OUTSIDER) as c:
            assert c.expect().code == 220
    with Client(server.port(), proxy=OUTSIDER) as c:
        answer = c.expect()
        assert (answer.code, answer.enhanced) == (421, "4.7.0")
        assert c.at_eof()
    clock.now += 60
    with Client(server.port(), proxy=OUTSIDER) as c:
        assert c.expect().code == 220


# ===========================================================================
# 5. The conformance corpus through the live server


#: the shipped corpus and the extra cases recorded against Postfix 3.7.11
CASES, CASE_ERRORS = load_cases([CONFORMANCE, CONFORMANCE.with_name("conformance_extra")])


def _expected_path(case: Case) -> Path:
    # A variant has its own recording, NAME.VARIANT.expected.jsonl (as replay --check).
    source = Path(case.source)
    variant = case.name.partition("[")[2].rstrip("]")
    stem = f"{source.stem}.{variant}" if variant else source.stem
    return source.with_name(f"{stem}.expected.jsonl")


def test_conformance_corpus_loads() -> None:
    assert CASE_ERRORS == []
    assert len([c for c in CASES if Path(c.source).parent == CONFORMANCE]) >= 30
    assert all(_expected_path(c).exists() for c in CASES if Path(c.source).parent == CONFORMANCE)


def _expected(case: Case) -> list[dict[str, Any]]:
    path = _expected_path(case)
    if not path.exists():
        pytest.skip(f"no {path.name}")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def play(c: Client, case: Case, clock: Clock) -> list[ReplayReply]:
    """The steps of ``case``, exactly as adapters/replay.py's ``_play`` sends them."""
    client = case.client
    step_seconds = float(case.data.get("step_seconds", 0))
    out: list[ReplayReply] = []

    def fmt(s: str) -> str:
        return s.replace("{helo}", str(client.get("helo", ""))).replace("{ip}", str(client["ip"]))

    def rec(cmd: str) -> Answer | None:
        answer = c.reply()
        if answer is None:
            out.append(ReplayReply("<eof>", None, None, "connection closed by server"))
            return None
        out.append(ReplayReply(cmd, answer.code, answer.enhanced, answer.text))
        return answer

    if rec("<connect>") is None:
        return out
    for step in case.steps:
        clock.now += step_seconds
        if isinstance(step, str):
            c.send(fmt(step))
            if rec(fmt(step)) is None:
                return out
        elif "pipeline" in step:
            cmds = [fmt(x) for x in step["pipeline"]]
            c.send(b"".join(x.encode() + b"\r\n" for x in cmds))
            for cmd in cmds:
                if rec(cmd) is None:
                    return out
        elif "auth_plain" in step:
            user, pw = step["auth_plain"][:2]
            c.send(auth_plain(user, pw))
            if rec(f"AUTH PLAIN <{user}>") is None:
                return out
        elif "auth_login" in step:
            user, pw = step["auth_login"][:2]
            c.send("AUTH LOGIN")
            answer = rec("AUTH LOGIN")
            if answer is not None and answer.code == 334:
                c.send(base64.b64encode(user.encode()) + b"\r\n")
                answer = rec(f"<login user {user}>")
            if answer is not None and answer.code == 334:
                c.send(base64.b64encode(pw.encode()) + b"\r\n")
                answer = rec("<login password>")
            if answer is None:
                return out
        elif "data" in step:
            c.send("DATA")
            answer = rec("DATA")
            if answer is None:
                return out
            if answer.code == 354:
                message = build_message(step)
                c.send(message)
                if rec(f"<message {len(message)} bytes>") is None:
                    return out
        else:
            raise AssertionError(f"unknown step {step!r}")
    return out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_conformance_case_through_the_live_server(case: Case, serve: ServerStarter) -> None:
    if case.client.get("tls"):
        # Replay marks such a session as TLS from the first byte; over a real
        # socket that is an implicit-TLS listener, which cannot take a PROXY
        # line yet (test_proxy_protocol_line_comes_before_implicit_tls).
        pytest.skip("implicit-TLS case: needs PROXY before TLS")
    expected = _expected(case)
    clock = Clock(float(case.data.get("now", DEFAULT_NOW)))
    server = serve(
        build_policy(case),
        build_zone(case),
        delivery=AcceptAllDelivery(),
        store=MemoryStore(),
        clock=clock,
        proxy_protocol=True,
        listeners=[Listener("smtp", "127.0.0.1", 0)],
    )
    with Client(server.port(), proxy=str(case.client["ip"])) as c:
        got = play(c, case, clock)
    assert compare(expected, got) == []


# ===========================================================================
# 6. Graceful shutdown and timeouts


@pytest.mark.timeout(30)
def test_stop_lets_a_message_in_flight_finish_and_sends_idle_clients_421(
    loop: LoopThread, serve: ServerStarter, gateway: Callable[..., GatewayDelivery], tmp_path: Path
) -> None:
    settings = make_settings()
    server = serve(settings, delivery=gateway(settings))
    port = server.port()
    busy, idle = Client(port), Client(port)
    try:
        busy.expect()
        idle.expect()
        busy.cmd("EHLO client.example.org")
        idle.cmd("EHLO idle.example.org")
        assert busy.cmd("MAIL FROM:<carol@example.org>").code == 250
        assert busy.cmd("RCPT TO:<alice@example.com>").code == 250
        assert busy.cmd("DATA").code == 354
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        time.sleep(0.2)  # the server has read it and is waiting for more

        stopping = loop.submit(server.stop(grace=5))
        answer = idle.expect()
        assert (answer.code, answer.enhanced) == (421, "4.3.2")
        assert idle.at_eof()
        with pytest.raises(OSError):  # no new sessions
            Client(port, timeout=2).close()
        assert not stopping.done()

        answer = busy.cmd(b"second half\r\n.\r\n")
        assert (answer.code, answer.enhanced) == (250, "2.0.0"), answer
        stopping.result(10)
        after = busy.reply()  # then the busy client is told too, and let go
        assert after is None or (after.code, after.enhanced) == (421, "4.3.2")
    finally:
        busy.close()
        idle.close()
    [message] = maildir_messages(tmp_path / "maildir", "alice@example.com")
    assert message.endswith(b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")


@pytest.mark.timeout(30)
def test_idle_client_times_out_with_421(serve: ServerStarter) -> None:
    server = serve(make_settings(), timeout=0.5)
    with Client(server.port()) as c:
        assert c.expect().code == 220
        assert c.cmd("EHLO client.example.org").code == 250
        started = time.monotonic()
        answer = c.expect()
        assert (answer.code, answer.enhanced) == (421, "4.4.2")
        assert 0.3 < time.monotonic() - started < 5
        assert c.at_eof()


@pytest.mark.timeout(30)
def test_the_idle_timeout_counts_from_the_last_command(serve: ServerStarter) -> None:
    # one timer per connection, moved later as commands come: a client that
    # speaks every 0.3 s outlives many 0.5 s timeouts, then times out once silent
    server = serve(make_settings(), timeout=0.5)
    with Client(server.port()) as c:
        assert c.expect().code == 220
        started = time.monotonic()
        while True:
            assert c.cmd("NOOP").code == 250
            last = time.monotonic()
            if last - started > 2.5:
                break
            time.sleep(0.3)
        answer = c.expect()
        assert (answer.code, answer.enhanced) == (421, "4.4.2")
        assert 0.4 < time.monotonic() - last < 2
        assert c.at_eof()


@pytest.mark.timeout(30)
def test_client_stalling_in_data_times_out_and_nothing_is_delivered(
    serve: ServerStarter,
) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings(), timeout=0.5, delivery=delivery)
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        c.cmd("MAIL FROM:<carol@example.org>")
        c.cmd("RCPT TO:<alice@example.com>")
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: stalled\r\n\r\nand then nothing")
        answer = c.expect()
        assert (answer.code, answer.enhanced) == (421, "4.4.2")
        assert c.at_eof()
    assert delivery.messages == []


@pytest.mark.timeout(30)
def test_delivery_slower_than_the_idle_timeout_still_gets_its_reply(
    serve: ServerStarter, gateway: Callable[..., GatewayDelivery], hops: Callable[[], Hop]
) -> None:
    hop = hops()
    hop.handler.hold = threading.Event()
    settings = make_settings(relay_to(hop.port))
    server = serve(settings, delivery=gateway(settings), timeout=0.5)
    releaser = threading.Timer(1.5, hop.handler.hold.set)
    releaser.start()
    try:
        with Client(server.port()) as c:
            c.expect()
            c.cmd("EHLO client.example.org")
            answer = c.transaction("alice@example.com", ["bob@remote.example"], MESSAGE)
    finally:
        releaser.cancel()
        hop.handler.hold.set()
    assert len(hop.messages) == 1
    assert answer.code == 250, answer


# ===========================================================================
# 7. Robustness


@pytest.mark.timeout(30)
def test_malformed_commands_get_5xx_and_the_session_goes_on(serve: ServerStarter) -> None:
    server = serve(make_settings())
    with Client(server.port()) as c:
        c.expect()
        assert c.cmd("EHLO client.example.org").code == 250
        checks = [
            ("FROB the widget", 500, "5.5.2"),  # as Postfix 3.7 (conformance_extra)
            ("RCPT TO:<alice@example.com>", 503, "5.5.1"),
            ("MAIL FROM:<bad", 501, "5.1.7"),
            ("DATA", 503, "5.5.1"),
        ]
        for line, code, enhanced in checks:
            answer = c.cmd(line)
            assert (answer.code, answer.enhanced) == (code, enhanced), (line, answer)
            assert c.cmd("NOOP").code == 250
        assert c.cmd("MAIL FROM:<carol@example.org>").code == 250
        answer = c.cmd("DATA")  # MAIL but no RCPT yet: as Postfix (dialogue_texts_params)
        assert (answer.code, answer.enhanced, answer.text) == (
            554,
            "5.5.1",
            "Error: no valid recipients",
        )
        assert c.cmd("RCPT TO:<alice@example.com>").code == 250
        assert c.cmd("DATA").code == 354
        assert c.cmd(b"Subject: ok\r\n\r\nstill fine\r\n.\r\n").code == 250


@pytest.mark.timeout(30)
def test_client_vanishing_mid_data_delivers_nothing(
    serve: ServerStarter, gateway: Callable[..., GatewayDelivery], tmp_path: Path
) -> None:
    settings = make_settings()
    server = serve(settings, delivery=gateway(settings))
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        c.cmd("MAIL FROM:<carol@example.org>")
        c.cmd("RCPT TO:<alice@example.com>")
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: cut off\r\n\r\nhalf a message\r\n")
    # the server is fine, and has nothing to deliver
    assert send(server.port(), "carol@example.org", ["alice@example.com"], MESSAGE).code == 250
    [stored] = maildir_messages(tmp_path / "maildir", "alice@example.com")
    assert stored.endswith(MESSAGE)


@pytest.mark.timeout(30)
def test_overlong_command_line_gets_500_and_the_session_goes_on(serve: ServerStarter) -> None:
    server = serve(make_settings())
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        answer = c.cmd("MAIL FROM:<" + "a" * 1500 + "@example.org>")
        assert (answer.code, answer.enhanced) == (500, "5.5.0")
        answer = c.cmd("NOOP " + "x" * 70_000)  # beyond any buffer
        assert (answer.code, answer.enhanced) == (500, "5.5.0")
        assert c.cmd("NOOP").code == 250
        assert c.cmd("MAIL FROM:<carol@example.org>").code == 250


@pytest.mark.timeout(30)
def test_twenty_errors_end_the_session_with_421(serve: ServerStarter) -> None:
    server = serve(make_settings())
    with Client(server.port()) as c:
        c.expect()
        for _ in range(20):
            assert c.cmd("BOGUS").code == 500
        answer = c.cmd("NOOP")
        assert (answer.code, answer.enhanced) == (421, "4.7.0")
        assert c.at_eof()


@pytest.mark.timeout(30)
def test_421_comes_right_after_the_twentieth_error(serve: ServerStarter) -> None:
    server = serve(make_settings())
    with Client(server.port(), timeout=1) as c:
        c.expect()
        for _ in range(20):
            assert c.cmd("BOGUS").code == 500
        try:
            answer = c.reply()  # nothing sent
        except TimeoutError:
            answer = None
        assert answer is not None and answer.code == 421


@pytest.mark.timeout(30)
def test_oversized_message_gets_552(serve: ServerStarter) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings({"general": {"max_message_size_mb": 10}}), delivery=delivery)
    with Client(server.port(), timeout=30) as c:
        c.expect()
        c.cmd("EHLO client.example.org")
        answer = c.cmd(f"MAIL FROM:<carol@example.org> SIZE={12 * 1024 * 1024}")
        assert (answer.code, answer.enhanced) == (552, "5.3.4")
        assert c.cmd("MAIL FROM:<carol@example.org>").code == 250  # no SIZE: find out later
        assert c.cmd("RCPT TO:<alice@example.com>").code == 250
        assert c.cmd("DATA").code == 354
        line = b"X" * 998 + b"\r\n"
        chunk = line * 1024  # 1 MiB
        c.send(b"Subject: big\r\n\r\n")
        for _ in range(12):
            c.send(chunk)
        answer = c.cmd(b".\r\n")
        assert (answer.code, answer.enhanced) == (552, "5.3.4")
        assert c.cmd("NOOP").code == 250  # the session goes on
    assert delivery.messages == []


SERVFAIL_ZONE = {
    "broken.example": {"servfail": True},
    "slow.example": {"timeout": True},
    "fine.example": {"A": ["192.0.2.1"]},
}


@contextlib.contextmanager
def _resolver(kind: str) -> Iterator[Resolver]:
    zone = StaticZone.from_mapping(SERVFAIL_ZONE)
    if kind == "static":
        yield zone
        return
    with ZoneServer(zone).run_in_thread() as dns_server:
        yield LiveResolver([dns_server.nameserver], timeout=0.5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("resolver_kind", ["static", "zone-server"])
@pytest.mark.parametrize("domain", ["broken.example", "slow.example"])
def test_dns_failure_in_a_check_defers_never_accepts(
    serve: ServerStarter, resolver_kind: str, domain: str
) -> None:
    settings = make_settings(
        _merge(NO_LOCAL, {"security": {"sender_policy": {"reject_unknown_sender_domain": True}}})
    )
    delivery = AcceptAllDelivery()
    with _resolver(resolver_kind) as resolver:
        server = serve(settings, resolver, delivery=delivery)
        with Client(server.port()) as c:
            c.expect()
            c.cmd("EHLO client.example.org")
            assert c.cmd("MAIL FROM:<a@fine.example>").code == 250
            assert c.cmd("RCPT TO:<alice@example.com>").code == 250  # DNS works
            c.cmd("RSET")
            assert c.cmd(f"MAIL FROM:<a@{domain}>").code == 250  # judged at RCPT
            answer = c.cmd("RCPT TO:<alice@example.com>")
            assert 400 <= answer.code < 500, answer
            assert (answer.code, answer.enhanced) == (450, "4.1.8")
            assert c.cmd("DATA").code >= 500  # no recipient, no message
    assert delivery.messages == []


@pytest.mark.timeout(30)
def test_dns_failure_while_routing_defers_never_bounces(
    serve: ServerStarter, gateway: Callable[..., GatewayDelivery]
) -> None:
    # delivery.mode = "direct", and the recipient domain's MX lookup fails.
    settings = make_settings()
    zone = StaticZone.from_mapping(SERVFAIL_ZONE)
    server = serve(settings, zone, delivery=gateway(settings, zone))
    answer = send(server.port(), "alice@example.com", ["bob@broken.example"], MESSAGE)
    assert 400 <= answer.code < 500, answer


@pytest.mark.timeout(30)
def test_helo_control_characters_do_not_reach_the_received_header(
    serve: ServerStarter, gateway: Callable[..., GatewayDelivery], tmp_path: Path
) -> None:
    settings = make_settings()
    server = serve(settings, delivery=gateway(settings))
    with Client(server.port()) as c:
        c.expect()
        assert c.cmd(b"EHLO evil.example\rX-Injected: yes\x00\x1b\r\n").code == 250
        assert c.transaction("carol@example.org", ["alice@example.com"], MESSAGE).code == 250
    [stored] = maildir_messages(tmp_path / "maildir", "alice@example.com")
    received = stored[: stored.index(MESSAGE)]
    trace = b"Return-Path: <carol@example.org>\r\nDelivered-To: alice@example.com\r\n"
    assert received.startswith(trace + b"Received: from evil.example")
    assert b"\x00" not in received and b"\x1b" not in received
    assert b"\r" not in received.replace(b"\r\n", b"")


@pytest.mark.timeout(30)
def test_maildir_files_hold_lf_line_ends(
    relay_server: tuple[MailServer, Hop], tmp_path: Path
) -> None:
    # Local delivery agents write LF; a CRLF file confuses some mail readers.
    server, _hop = relay_server
    assert send(server.port(), "carol@example.org", ["alice@example.com"], MESSAGE).code == 250
    (path,) = (tmp_path / "maildir" / "alice@example.com" / "new").iterdir()
    raw = path.read_bytes()
    assert b"\r\n" not in raw
    assert raw.endswith(MESSAGE.replace(b"\r\n", b"\n"))
