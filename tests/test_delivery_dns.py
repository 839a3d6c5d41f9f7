"""Delivery through the configured DNS, against real servers on loopback.

A real DNS server (ZoneServer) answers the MX and address questions; next
hops are aiosmtpd servers on 127.0.0.2 and 127.0.0.3 (Linux routes all of
127.0.0.0/8 to the loopback interface), names that only the zone knows, so
the operating system's resolver could not have found them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller

from mailpolicy.adapters.dns import LiveResolver, StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer
from mailpolicy.adapters.gateway import MAX_REPLY_LINE, GatewayDelivery, fit_reply
from mailpolicy.config import settings_from_mapping
from mailpolicy.dialogue import Submission
from mailpolicy.model import Reply, Session
from mailpolicy.settings import Settings

if TYPE_CHECKING:
    from conftest import Certificate

MESSAGE = b"From: <a@example.com>\r\nSubject: hop\r\n\r\nHello.\r\n"


class Recorder:
    def __init__(self, reply: str = "250 2.0.0 Ok: queued") -> None:
        self.messages: list[tuple[str, tuple[str, ...]]] = []
        self.reply = reply
        self.rcpt_reply: str | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, tuple(envelope.rcpt_tos)))
        return self.reply


def _free_port_on(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (MX hosts share one port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for host in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise AssertionError("no common free port")


@pytest.fixture
def port() -> int:
    return _free_port_on("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture
def next_hop() -> Iterator[Callable[..., Recorder]]:
    """``next_hop(host, port, tls=None)``: an aiosmtpd server, stopped at teardown."""
    started: list[Controller] = []

    def start(host: str, port: int, tls: ssl.SSLContext | None = None) -> Recorder:
        recorder = Recorder()
        controller = Controller(
            recorder,
            hostname=host,
            port=port,
            tls_context=tls,
            require_starttls=False,
        )
        controller.start()
        started.append(controller)
        return recorder

    try:
        yield start
    finally:
        for controller in started:
            controller.stop()


def _settings(port: int, extra: dict[str, Any] | None = None) -> Settings:
    data: dict[str, Any] = {
        "general": {"hostname": "gw.example.com", "local_domains": ["example.com"]},
        "delivery": {"mx_port": port, "reply_timeout_seconds": 5},
    }
    for table, values in (extra or {}).items():
        data.setdefault(table, {}).update(values)
    return settings_from_mapping(data, source="<test>")


def _deliver(
    settings: Settings, resolver: Any, tmp_path: Path, rcpts: tuple[str, ...], **kw: Any
) -> Reply:
    async def go() -> Reply:
        gateway = GatewayDelivery(settings, resolver, maildir_root=tmp_path / "md", **kw)
        try:
            sub = Submission("a@example.com", rcpts, MESSAGE, MESSAGE, "Q1", Session("192.0.2.1"))
            return await gateway.deliver(sub)
        finally:
            gateway.ledger.close()

    return asyncio.run(go())


def _asked(server: ZoneServer) -> set[tuple[str, str]]:
    return {(q.name, q.rtype) for q in server.queries}


ZONE = {
    "dest.example": {"MX": ["10 mx1.dest.example", "20 mx2.dest.example"]},
    "mx1.dest.example": {"A": ["127.0.0.2"]},
    "mx2.dest.example": {"A": ["127.0.0.3"]},
}


@pytest.mark.timeout(30)
def test_mx_hosts_are_resolved_by_the_configured_nameserver(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    first = next_hop("127.0.0.2", port)
    second = next_hop("127.0.0.3", port)
    with ZoneServer(StaticZone.from_mapping(ZONE)).run_in_thread() as dns_server:
        resolver = LiveResolver([dns_server.nameserver], timeout=1)
        reply = _deliver(_settings(port), resolver, tmp_path, ("bob@dest.example",))
        asked = _asked(dns_server)
    assert reply.code == 250, reply
    assert first.messages == [("a@example.com", ("bob@dest.example",))]
    assert second.messages == []
    # MX, then A and AAAA of the MX hosts: all from the configured nameserver
    assert ("dest.example", "MX") in asked
    assert {("mx1.dest.example", "A"), ("mx1.dest.example", "AAAA")} <= asked


@pytest.mark.timeout(30)
def test_failover_to_the_second_mx_and_to_the_next_address(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    # mx1 has two addresses, neither listening; mx2 takes the message
    zone = dict(ZONE, **{"mx1.dest.example": {"A": ["127.0.0.4", "127.0.0.2"]}})
    second = next_hop("127.0.0.3", port)
    with ZoneServer(StaticZone.from_mapping(zone)).run_in_thread() as dns_server:
        resolver = LiveResolver([dns_server.nameserver], timeout=1)
        reply = _deliver(_settings(port), resolver, tmp_path, ("bob@dest.example",))
    assert reply.code == 250, reply
    assert second.messages == [("a@example.com", ("bob@dest.example",))]


@pytest.mark.timeout(30)
def test_every_address_of_an_mx_is_tried_in_order(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    zone = {
        "dest.example": {"MX": ["10 mx1.dest.example"]},
        "mx1.dest.example": {"A": ["127.0.0.4", "127.0.0.2"]},
    }
    first = next_hop("127.0.0.2", port)
    reply = _deliver(
        _settings(port), StaticZone.from_mapping(zone), tmp_path, ("bob@dest.example",)
    )
    assert reply.code == 250, reply
    assert first.messages == [("a@example.com", ("bob@dest.example",))]


@pytest.mark.timeout(30)
def test_implicit_mx_uses_the_address_already_known(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    hop = next_hop("127.0.0.3", port)
    zone = StaticZone.from_mapping({"dest.example": {"A": ["127.0.0.3"]}})
    with ZoneServer(zone).run_in_thread() as dns_server:
        resolver = LiveResolver([dns_server.nameserver], timeout=1)
        reply = _deliver(_settings(port), resolver, tmp_path, ("bob@dest.example",))
        queries = [(q.name, q.rtype) for q in dns_server.queries]
    assert reply.code == 250, reply
    assert hop.messages == [("a@example.com", ("bob@dest.example",))]
    assert queries.count(("dest.example", "A")) == 1  # asked once, for the route


@pytest.mark.timeout(30)
def test_split_dns_internal_nameserver_first_delivers_inside(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    internal = StaticZone.from_mapping(
        {
            "corp.example": {"MX": ["10 exchange.corp.example"]},
            "exchange.corp.example": {"A": ["127.0.0.3"]},
        }
    )
    public = StaticZone.from_mapping(
        {
            "corp.example": {"MX": ["10 mx.public.example"]},
            "mx.public.example": {"A": ["127.0.0.2"]},
        }
    )
    outside = next_hop("127.0.0.2", port)
    inside = next_hop("127.0.0.3", port)
    settings = _settings(
        port,
        {
            "delivery": {"mode": "relay", "relay_host": {"host": "127.0.0.2", "port": port}},
            "relay": {"inbound_domains": ["corp.example"]},
        },
    )
    with (
        ZoneServer(internal).run_in_thread() as first,
        ZoneServer(public).run_in_thread() as second,
    ):
        resolver = LiveResolver([first.nameserver, second.nameserver], timeout=1)
        reply = _deliver(settings, resolver, tmp_path, ("eve@corp.example",))
        assert second.queries == ()
    assert reply.code == 250, reply
    assert inside.messages == [("a@example.com", ("eve@corp.example",))]
    assert outside.messages == []


@pytest.mark.timeout(30)
def test_unresolvable_relay_host_defers(tmp_path: Path, port: int) -> None:
    settings = _settings(
        port,
        {"delivery": {"mode": "relay", "relay_host": {"host": "relay.nowhere.example"}}},
    )
    reply = _deliver(settings, StaticZone.from_mapping({}), tmp_path, ("bob@dest.example",))
    assert (reply.code, reply.enhanced) == (451, "4.4.0")
    assert "relay.nowhere.example has no A or AAAA record" in reply.text


# ---------------------------------------------------------------------------
# TLS levels


def _mx_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for mx1.dest.example."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "mx.pem", tmp_path / "mx.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
            "-out", str(cert), "-days", "2", "-subj", "/CN=mx1.dest.example",
            "-addext", "subjectAltName=DNS:mx1.dest.example",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("level", "trusted", "delivered"),
    [
        ("verify", False, False),
        ("secure", False, False),
        ("encrypt", False, True),
        ("may", False, True),
        ("verify", True, True),
    ],
)
def test_tls_levels_with_a_self_signed_next_hop(
    tmp_path: Path,
    port: int,
    next_hop: Callable[..., Recorder],
    level: str,
    trusted: bool,
    delivered: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="mailpolicy.adapters.relay")
    cert, key = _mx_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    hop = next_hop("127.0.0.2", port, tls=context)
    zone = {
        "dest.example": {"MX": ["10 mx1.dest.example"]},
        "mx1.dest.example": {"A": ["127.0.0.2"]},
    }
    delivery: dict[str, Any] = {"mx_security": level}
    if trusted:
        delivery["tls_ca_file"] = str(cert)
    reply = _deliver(
        _settings(port, {"delivery": delivery}),
        StaticZone.from_mapping(zone),
        tmp_path,
        ("bob@dest.example",),
    )
    if delivered:
        assert reply.code == 250, reply
        assert hop.messages == [("a@example.com", ("bob@dest.example",))]
    else:
        assert reply.code == 451, reply
        assert f"(security {level}): certificate verify failed: self-signed" in reply.text
        assert hop.messages == []
        # the log names the host, its address, the level and the reason
        assert f"relay via mx1.dest.example[127.0.0.2]:{port} (security {level})" in caplog.text
        assert "self-signed certificate" in caplog.text


@pytest.mark.timeout(30)
def test_verify_names_a_host_name_mismatch(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder], tls_certificate: Certificate
) -> None:
    # trusted, but issued to localhost, not to mx1.dest.example
    hop = next_hop("127.0.0.2", port, tls=tls_certificate.server_context())
    zone = {
        "dest.example": {"MX": ["10 mx1.dest.example"]},
        "mx1.dest.example": {"A": ["127.0.0.2"]},
    }
    settings = _settings(
        port, {"delivery": {"mx_security": "verify", "tls_ca_file": str(tls_certificate.cert)}}
    )
    reply = _deliver(settings, StaticZone.from_mapping(zone), tmp_path, ("bob@dest.example",))
    assert reply.code == 451, reply
    assert "Hostname mismatch" in reply.text
    assert "mx1.dest.example" in reply.text
    assert hop.messages == []


@pytest.mark.timeout(30)
def test_required_tls_not_offered_defers(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    next_hop("127.0.0.2", port)
    zone = {"dest.example": {"A": ["127.0.0.2"]}}
    settings = _settings(port, {"delivery": {"mx_security": "encrypt"}})
    reply = _deliver(settings, StaticZone.from_mapping(zone), tmp_path, ("bob@dest.example",))
    assert reply.code == 451, reply
    assert "TLS is required (security encrypt), but was not offered" in reply.text


# ---------------------------------------------------------------------------
# Time limits and reply length


class _Mute:
    """Accepts connections and never says a word."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, port))
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(30)
def test_the_whole_attempt_is_bounded(tmp_path: Path, port: int) -> None:
    mutes = [_Mute(h, port) for h in ("127.0.0.2", "127.0.0.3")]
    try:
        settings = _settings(
            port, {"delivery": {"reply_timeout_seconds": 30, "attempt_timeout_seconds": 1}}
        )
        start = time.monotonic()
        reply = _deliver(settings, StaticZone.from_mapping(ZONE), tmp_path, ("bob@dest.example",))
        took = time.monotonic() - start
    finally:
        for mute in mutes:
            mute.close()
    assert reply.code == 451, reply
    assert "delivery attempt reached its time limit" in reply.text
    assert took < 5


@pytest.mark.timeout(30)
def test_the_reply_timeout_moves_on_to_the_next_mx(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    mute = _Mute("127.0.0.2", port)
    try:
        second = next_hop("127.0.0.3", port)
        settings = _settings(port, {"delivery": {"reply_timeout_seconds": 0.5}})
        reply = _deliver(settings, StaticZone.from_mapping(ZONE), tmp_path, ("bob@dest.example",))
    finally:
        mute.close()
    assert reply.code == 250, reply
    assert second.messages == [("a@example.com", ("bob@dest.example",))]


@pytest.mark.timeout(30)
def test_a_long_refusal_is_quoted_once_within_512_octets(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder]
) -> None:
    hop = next_hop("127.0.0.2", port)
    hop.rcpt_reply = "550-5.1.1 <bob@dest.example>: " + "x" * 400 + "\r\n550 5.1.1 " + "y" * 300
    zone = {"dest.example": {"A": ["127.0.0.2"]}}
    reply = _deliver(
        _settings(port), StaticZone.from_mapping(zone), tmp_path, ("bob@dest.example",)
    )
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    line = f"{reply.code} {reply.enhanced} {reply.text}\r\n".encode()
    assert len(line) <= MAX_REPLY_LINE
    assert reply.text.count("<bob@dest.example>") == 1


def test_fit_reply_cuts_on_a_character_boundary() -> None:
    reply = fit_reply(Reply(451, "4.4.0", "é" * 600))
    line = f"451 4.4.0 {reply.text}\r\n".encode()
    assert len(line) <= MAX_REPLY_LINE
    assert reply.text.endswith("...")


# ---------------------------------------------------------------------------
# At RCPT: null MX and loops, through serve


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    import subprocess
    import sys

    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        script = Path(sys.executable).with_name("mailpolicy")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "mailpolicy"]
        process = subprocess.Popen(
            [*command, "serve", *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "serve.stderr").open("wb"),
        )
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.reply()

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def cmd(self, text: str) -> list[bytes]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.mark.timeout(60)
def test_serve_dns_delivers_to_an_mx_only_the_zone_knows_and_refuses_loops_and_null_mx(
    tmp_path: Path,
    port: int,
    next_hop: Callable[..., Recorder],
    serve_process: Callable[..., Any],
) -> None:
    listen = _free_port_on("127.0.0.1")
    hop = next_hop("127.0.0.2", port)
    zone = dict(
        ZONE,
        **{
            "nullmx.example": {"MX": ["0 ."]},
            "loop.example": {"MX": ["10 mx.loop.example"]},
            "mx.loop.example": {"A": ["127.0.0.1"]},
        },
    )
    (tmp_path / "zone.json").write_text(json.dumps(zone))
    (tmp_path / "policy.toml").write_text(
        "[general]\n"
        'hostname = "gw.example.com"\n'
        'local_domains = ["example.com"]\n'
        "[relay]\n"
        'trusted_networks = ["127.0.0.0/8"]\n'
        "[delivery]\n"
        f"mx_port = {port}\n"
    )
    serve_process(
        "--policy", str(tmp_path / "policy.toml"), "--listen", f"127.0.0.1:{listen}",
        "--dns", str(tmp_path / "zone.json"), "--maildir", str(tmp_path / "md"),
    )  # fmt: skip
    _wait_listening(listen)
    c = _Client(listen)
    try:
        c.cmd("EHLO client.example.org")
        assert c.cmd("MAIL FROM:<a@example.com>")[0].startswith(b"250")
        loop_reply = c.cmd("RCPT TO:<x@loop.example>")[0]
        assert loop_reply.startswith(b"554 5.4.6"), loop_reply
        assert b"loops back to myself" in loop_reply
        null_reply = c.cmd("RCPT TO:<x@nullmx.example>")[0]
        assert null_reply.startswith(b"556 5.1.10"), null_reply
        assert c.cmd("RCPT TO:<bob@dest.example>")[0].startswith(b"250")
        assert c.cmd("DATA")[0].startswith(b"354")
        done = c.cmd(MESSAGE.decode() + ".")
        assert done[0].startswith(b"250"), done
        for line in (loop_reply, null_reply, *done):
            assert len(line) <= MAX_REPLY_LINE
    finally:
        c.close()
    assert hop.messages == [("a@example.com", ("bob@dest.example",))]


# ---------------------------------------------------------------------------
# Local delivery leaves a trace that replay --mbox can read back


def test_delivered_mail_carries_its_trace_and_can_be_judged_again(tmp_path: Path) -> None:
    import email

    from mailpolicy.adapters.mbox import judge_message, read_trace
    from mailpolicy.dialogue.message import received_header
    from mailpolicy.policy import compile_policy

    settings = _settings(25)
    session = Session("192.0.2.10", helo="client.example.org", esmtp=True)
    received = received_header(session, "gw.example.com", ("bob@example.com",), "Q1", 0)
    assert received.startswith(b"Received: from client.example.org (unknown [192.0.2.10])")
    assert b"+0000 (UTC)" in received

    async def go() -> None:
        gateway = GatewayDelivery(settings, StaticZone.from_mapping({}), maildir_root=tmp_path)
        try:
            sub = Submission(
                "carol@example.org",
                ("bob@example.com",),
                received + MESSAGE,
                MESSAGE,
                "Q1",
                session,
            )
            assert (await gateway.deliver(sub)).code == 250
        finally:
            gateway.ledger.close()

    asyncio.run(go())
    (path,) = (tmp_path / "bob@example.com" / "new").iterdir()
    stored = path.read_bytes()
    assert stored.startswith(b"Return-Path: <carol@example.org>\nDelivered-To: bob@example.com\n")
    trace = read_trace(email.message_from_bytes(stored), "gw.example.com")
    assert (trace.sender, trace.recipients) == ("carol@example.org", ("bob@example.com",))
    assert str(trace.client_ip) == "192.0.2.10"
    (verdict,) = judge_message(compile_policy(settings), trace)
    assert not verdict.verdict.action.refuses


@pytest.mark.timeout(30)
def test_may_falls_back_to_plain_text_when_the_handshake_fails(
    tmp_path: Path, port: int, next_hop: Callable[..., Recorder], tls_certificate: Certificate
) -> None:
    # the hop demands a client certificate: every handshake fails
    context = tls_certificate.server_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(tls_certificate.cert))
    hop = next_hop("127.0.0.2", port, tls=context)
    zone = {"dest.example": {"A": ["127.0.0.2"]}}
    may = _deliver(_settings(port), StaticZone.from_mapping(zone), tmp_path, ("bob@dest.example",))
    assert may.code == 250, may
    assert hop.messages == [("a@example.com", ("bob@dest.example",))]
    encrypt = _deliver(
        _settings(port, {"delivery": {"mx_security": "encrypt"}}),
        StaticZone.from_mapping(zone),
        tmp_path / "again",
        ("carol@dest.example",),
    )
    assert encrypt.code == 451, encrypt
    assert "(security encrypt)" in encrypt.text


def test_mail_server_tells_the_gateway_its_addresses(tmp_path: Path) -> None:
    import ipaddress

    from mailpolicy.adapters.server import Listener, MailServer
    from mailpolicy.policy import compile_policy

    settings = _settings(25)
    zone = StaticZone.from_mapping(
        {"loop.example": {"MX": ["10 mx.loop.example"]}, "mx.loop.example": {"A": ["127.0.0.1"]}}
    )

    async def go() -> tuple[frozenset[object], Reply | None]:
        gateway = GatewayDelivery(settings, zone, maildir_root=tmp_path)
        server = MailServer(
            compile_policy(settings),
            zone,
            delivery=gateway,
            listeners=[Listener("smtp", "127.0.0.1", 0)],
        )
        await server.start()
        try:
            return frozenset(gateway.our_addresses), await gateway.check_recipient("x@loop.example")
        finally:
            await server.stop(grace=0)
            gateway.ledger.close()

    ours, refusal = asyncio.run(go())
    assert ipaddress.ip_address("127.0.0.1") in ours
    assert refusal is not None
    assert (refusal.code, refusal.enhanced) == (554, "5.4.6")
    assert "loops back to myself" in refusal.text


@pytest.mark.timeout(30)
def test_the_connect_timeout_moves_on_to_the_next_mx(
    tmp_path: Path,
    port: int,
    next_hop: Callable[..., Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="mailpolicy.adapters.relay")
    # a listener whose queue is full: Linux drops further SYNs, the connect hangs
    full = socket.socket()
    full.bind(("127.0.0.2", port))
    full.listen(0)
    queued = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.2", port))
        queued.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.2", port))
    except TimeoutError:
        pass
    else:
        pytest.skip("this kernel does not drop SYNs for a full listen queue")
    finally:
        probe.close()
    try:
        second = next_hop("127.0.0.3", port)
        settings = _settings(
            port, {"delivery": {"connect_timeout_seconds": 0.5, "reply_timeout_seconds": 30}}
        )
        start = time.monotonic()
        reply = _deliver(settings, StaticZone.from_mapping(ZONE), tmp_path, ("bob@dest.example",))
        took = time.monotonic() - start
    finally:
        for s in queued:
            s.close()
        full.close()
    assert reply.code == 250, reply
    assert second.messages == [("a@example.com", ("bob@dest.example",))]
    assert took < 5
    assert "connect to mx1.dest.example[127.0.0.2]" in caplog.text
    assert "timed out after 0.5 s" in caplog.text
