"""``mailpolicy serve`` as a user runs it: a subprocess on free 127.0.0.1 ports.

Clients are Python's ``smtplib`` and ``swaks`` (Debian package ``swaks``);
next hops are aiosmtpd servers on 127.0.0.1; DNS comes from ``--dns`` (a
static zone file), so nothing leaves the machine. The in-process tests of the
same server are in test_serve_e2e.py.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller

if TYPE_CHECKING:
    from conftest import Certificate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = ROOT / "examples" / "policy.toml"
PASSWORD = "wonderland"  # alice's, in examples/policy.toml


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mailpolicy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mailpolicy"]


class Serve:
    """One ``mailpolicy serve`` process; stderr goes to a file."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self.stderr_path = workdir / f"serve-{time.monotonic_ns()}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [*_command(), "serve", *args],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def wait_listening(self, *ports: int, timeout: float = 15) -> None:
        """Until every port accepts a connection (closed again at once)."""
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"serve exited with {self.process.returncode}:\n{self.stderr}"
                    )
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"port {port} never listened:\n{self.stderr}"
                        ) from None
                    time.sleep(0.05)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._stderr.close()

    @property
    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """The log lines (``--log-format json``), parsed."""
        return [json.loads(ln) for ln in self.stderr.splitlines() if ln.startswith("{")]


ServeStarter = Callable[..., Serve]


@pytest.fixture
def serve_cli(tmp_path: Path) -> Iterator[ServeStarter]:
    """``serve_cli(*args)``: a started process, killed at teardown if still running."""
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        process = Serve(list(args), tmp_path)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


@pytest.fixture(scope="module")
def swaks() -> str:
    binary = shutil.which("swaks")
    if binary is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    return binary


def run_swaks(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def empty_zone(tmp_path: Path) -> Path:
    """A static zone for ``--dns``: every name is NXDOMAIN, nothing asks the network."""
    path = tmp_path / "zone.json"
    path.write_text("{}")
    return path


def maildir_files(root: Path, address: str) -> list[bytes]:
    new = root / address / "new"
    # Maildir files hold LF line ends; compare them in wire form (CRLF).
    return [_wire(p.read_bytes()) for p in sorted(new.iterdir())] if new.is_dir() else []


def _wire(stored: bytes) -> bytes:
    return stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# ---------------------------------------------------------------------------
# Plain SMTP, local delivery, logs, SIGTERM


MESSAGE = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.com>\r\n"
    b"Subject: through mailpolicy serve\r\n"
    b"Message-ID: <cli-1@example.org>\r\n"
    b"\r\n"
    b"Hello Alice.\r\n"
    b".this line starts with a dot\r\n"
)

RECEIVED = re.compile(
    rb"\AReturn-Path: <(?P<sender>[^>\r\n]*)>\r\nDelivered-To: alice@example\.com\r\n"
    rb"Received: from (?P<helo>\S+) \(unknown \[127\.0\.0\.1\]\)\r\n"
    rb"\tby mx\.example\.com \(mailpolicy\) with (?P<proto>E?SMTPS?A?) id (?P<id>[0-9A-F]+)\r\n"
    rb"\tfor <alice@example\.com>; [^\r\n]+ \+0000 \(UTC\)\r\n"
)


@pytest.mark.timeout(60)
def test_serve_delivers_logs_and_stops_cleanly(
    serve_cli: ServeStarter,
    free_port: Callable[[], int],
    tmp_path: Path,
    empty_zone: Path,
    swaks: str,
) -> None:
    port, maildir = free_port(), tmp_path / "maildir"
    server = serve_cli(
        "--policy", str(EXAMPLE_POLICY), "--listen", f"127.0.0.1:{port}",
        "--maildir", str(maildir), "--dns", str(empty_zone), "--log-format", "json",
    )  # fmt: skip
    server.wait_listening(port)

    # smtplib: accepted, and the Maildir holds the trace headers of local
    # delivery, our Received: header, then the message exactly as sent.
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=10) as c:
        c.ehlo()
        assert c.mail("bob@example.org")[0] == 250
        assert c.rcpt("alice@example.com")[0] == 250
        code, text = c.data(MESSAGE)
        assert code == 250, text
        queue_id = text.decode().rsplit(" ", 1)[-1]
        # A black-listed sender ("spammers": junk.example) is refused at RCPT.
        c.rset()
        c.mail("deals@junk.example")
        code, text = c.rcpt("alice@example.com")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert b"Mail from you is not welcome here" in text
    [stored] = maildir_files(maildir, "alice@example.com")
    match = RECEIVED.match(stored)
    assert match is not None, stored[:300]
    assert match["sender"] == b"bob@example.org"
    assert match["helo"] == b"client.example.org"
    assert match["proto"] == b"ESMTP"
    assert match["id"].decode() == queue_id
    assert stored[match.end() :] == MESSAGE

    # swaks
    result = run_swaks(
        swaks, "--server", f"127.0.0.1:{port}", "--ehlo", "swaks.example.org",
        "--from", "carol@example.org", "--to", "alice@example.com",
        "--header", "Subject: sent with swaks", "--body", "Hello from swaks.",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<[-~]\s+250 2\.0\.0 Ok: queued as", result.stdout)
    first, second = maildir_files(maildir, "alice@example.com")
    swaks_copy = second if first == stored else first
    match = RECEIVED.match(swaks_copy)
    assert match is not None and match["helo"] == b"swaks.example.org"
    body = swaks_copy[match.end() :]
    assert b"X-Mailer: swaks" in body and b"Subject: sent with swaks\r\n" in body
    assert b"\r\n\r\nHello from swaks.\r\n" in body  # swaks adds blank lines after it

    # swaks is refused too; exit status 24 is "no recipient accepted"
    result = run_swaks(
        swaks, "--server", f"127.0.0.1:{port}", "--from", "offers@shop.example",
        "--to", "alice@example.com",
    )  # fmt: skip
    assert result.returncode == 24, result.stdout
    assert "554 5.7.1" in result.stdout

    assert server.terminate() == 0
    logs = server.json_lines()
    delivered = [ln for ln in logs if ln.get("stage") == "delivery"]
    assert delivered[0]["queue_id"] == queue_id
    assert delivered[0]["sender"] == "bob@example.org"
    assert delivered[0]["recipients"] == ["alice@example.com"]
    assert delivered[0]["reply"].startswith("250 2.0.0")
    assert len(delivered) == 2
    refusals = [ln for ln in logs if ln.get("action") == "reject"]
    assert [(r["rule"], r["sender"]) for r in refusals] == [
        ("security.lists.spammers", "deals@junk.example"),
        ("security.lists.spammers", "offers@shop.example"),
    ]
    assert refusals[0]["client"] == "127.0.0.1"
    assert refusals[0]["helo"] == "client.example.org"
    assert refusals[0]["stage"] == "rcpt"
    assert refusals[0]["recipient"] == "alice@example.com"
    assert refusals[0]["reply"].startswith("554 5.7.1")
    assert refusals[0]["evidence"]
    assert any(ln["msg"] == "shutting down" for ln in logs)
    assert not [ln for ln in logs if ln["level"] in ("error", "critical")]


@pytest.mark.timeout(30)
def test_json_log_format_writes_only_json(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path, empty_zone: Path
) -> None:
    port = free_port()
    server = serve_cli(
        "--policy", str(EXAMPLE_POLICY), "--listen", f"127.0.0.1:{port}",
        "--maildir", str(tmp_path / "maildir"), "--dns", str(empty_zone),
        "--log-format", "json",
    )  # fmt: skip
    server.wait_listening(port)
    assert server.terminate() == 0
    lines = [ln for ln in server.stderr.splitlines() if ln.strip()]
    assert lines
    for line in lines:
        json.loads(line)


@pytest.mark.timeout(30)
def test_sigterm_finishes_the_message_in_flight(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path, empty_zone: Path
) -> None:
    port, maildir = free_port(), tmp_path / "maildir"
    server = serve_cli(
        "--policy", str(EXAMPLE_POLICY), "--listen", f"127.0.0.1:{port}",
        "--maildir", str(maildir), "--dns", str(empty_zone), "--grace", "10",
    )  # fmt: skip
    server.wait_listening(port)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        sock.makefile("rb") as replies,
    ):

        def say(line: bytes) -> bytes:
            sock.sendall(line)
            return replies.readline()

        assert replies.readline().startswith(b"220 ")
        say(b"HELO client.example.org\r\n")
        assert say(b"MAIL FROM:<bob@example.org>\r\n").startswith(b"250 ")
        assert say(b"RCPT TO:<alice@example.com>\r\n").startswith(b"250 ")
        assert say(b"DATA\r\n").startswith(b"354 ")
        sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None  # waiting for us
        assert say(b"second half\r\n.\r\n").startswith(b"250 2.0.0 ")
        rest = replies.readline()
        assert rest == b"" or rest.startswith(b"421 4.3.2 ")
    assert server.process.wait(15) == 0
    [stored] = maildir_files(maildir, "alice@example.com")
    assert stored.endswith(b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")


# ---------------------------------------------------------------------------
# A bad policy


@pytest.mark.timeout(30)
def test_bad_policy_exits_2_naming_file_key_and_reason(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text(
        '[general]\nmax_recipients = -1\n\n[relay]\ntrusted_networks = ["10.0.0.0/33"]\n'
    )
    port = free_port()
    server = serve_cli("--policy", str(policy), "--listen", f"127.0.0.1:{port}")
    assert server.process.wait(15) == 2
    stderr = server.stderr
    assert f"{policy}: general.max_recipients: must not be negative" in stderr
    assert f"{policy}: relay.trusted_networks" in stderr
    with pytest.raises(OSError):  # nothing started
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ---------------------------------------------------------------------------
# TLS listeners from the policy, AUTH, relaying, with swaks


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[str, tuple[str, ...], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 2.0.0 Ok: next hop has it"


@pytest.fixture
def next_hop(free_port: Callable[[], int]) -> Iterator[tuple[int, Recorder]]:
    recorder, port = Recorder(), free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, recorder
    finally:
        controller.stop()


@pytest.mark.timeout(60)
def test_tls_listeners_auth_and_relay_with_swaks(
    serve_cli: ServeStarter,
    free_port: Callable[[], int],
    tmp_path: Path,
    empty_zone: Path,
    tls_certificate: Certificate,
    next_hop: tuple[int, Recorder],
    swaks: str,
) -> None:
    hop_port, hop = next_hop
    smtp, submission, smtps = free_port(), free_port(), free_port()
    alice = tomllib.loads(EXAMPLE_POLICY.read_text())["accounts"]["alice"]
    # 127.0.0.1 must log in to relay; everything non-local goes to the hop.
    text = f"""
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
smtp_auth.local_networks = []

[delivery]
mode = "relay"
relay_host = {{host = "127.0.0.1", port = {hop_port}, security = "none"}}

[server]
smtp = "127.0.0.1:{smtp}"
submission = "127.0.0.1:{submission}"
smtps = "127.0.0.1:{smtps}"
tls_cert = "{tls_certificate.cert}"
tls_key = "{tls_certificate.key}"

[accounts.alice]
password_hash = "{alice["password_hash"]}"
addresses = ["alice@example.com"]
"""
    policy = tmp_path / "tls.toml"
    policy.write_text(text)
    server = serve_cli(
        "--policy", str(policy), "--maildir", str(tmp_path / "maildir"),
        "--dns", str(empty_zone), "--log-format", "json", "--log-level", "debug",
    )  # fmt: skip
    server.wait_listening(smtp, submission, smtps)

    common = [
        "--from",
        "alice@example.com",
        "--to",
        "bob@remote.example",
        "--ehlo",
        "c.example.org",
    ]
    auth = ["--auth-user", "alice", "--auth-password", PASSWORD]
    # STARTTLS on the submission port, AUTH PLAIN
    result = run_swaks(
        swaks, "--server", f"127.0.0.1:{submission}", "--tls", "--auth", "PLAIN", *auth, *common
    )
    assert result.returncode == 0, result.stdout
    assert "250-AUTH PLAIN LOGIN" in result.stdout  # after STARTTLS only
    before_tls = result.stdout.split(" -> STARTTLS\n", 1)[0]
    assert "AUTH" not in before_tls
    # implicit TLS, AUTH LOGIN
    result = run_swaks(
        swaks, "--server", f"127.0.0.1:{smtps}", "--tls-on-connect", "--auth", "LOGIN",
        *auth, *common,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    # STARTTLS on the smtp port, AUTH PLAIN
    result = run_swaks(
        swaks, "--server", f"127.0.0.1:{smtp}", "--tls", "--auth", "PLAIN", *auth, *common
    )
    assert result.returncode == 0, result.stdout
    assert len(hop.messages) == 3
    for sender, rcpts, content in hop.messages:
        assert (sender, rcpts) == ("alice@example.com", ("bob@remote.example",))
        assert content.startswith(b"Received: from c.example.org (unknown [127.0.0.1])\r\n")
        assert b"with ESMTPSA id" in content.split(b"\r\n", 2)[1]

    # no AUTH, no relay (swaks: 24, no recipient accepted)
    result = run_swaks(swaks, "--server", f"127.0.0.1:{submission}", "--tls", *common)
    assert result.returncode == 24, result.stdout
    assert "554 5.7.1" in result.stdout
    # a wrong password (swaks: 28, AUTH failed)
    result = run_swaks(
        swaks, "--server", f"127.0.0.1:{smtps}", "--tls-on-connect", "--auth", "PLAIN",
        "--auth-user", "alice", "--auth-password", "not-" + PASSWORD, *common,
    )  # fmt: skip
    assert result.returncode == 28, result.stdout
    assert "535 5.7.8" in result.stdout
    # plain text: AUTH is neither offered nor accepted
    result = run_swaks(swaks, "--server", f"127.0.0.1:{smtp}", "--auth", "PLAIN", *auth, *common)
    assert result.returncode != 0
    assert "AUTH" not in result.stdout.split("EHLO", 1)[1].split("\n -> ", 1)[0]
    assert len(hop.messages) == 3

    assert server.terminate() == 0
    stderr = server.stderr
    assert "debug" in stderr  # the debug level was on: the check below means something
    for secret in (
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode(),
        base64.b64encode(f"alice\0alice\0{PASSWORD}".encode()).decode(),
    ):
        assert secret not in stderr


# ---------------------------------------------------------------------------
# --proxy-protocol


@pytest.mark.timeout(30)
def test_proxy_protocol_flag_judges_the_proxied_client(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path, empty_zone: Path
) -> None:
    port = free_port()
    server = serve_cli(
        "--policy", str(EXAMPLE_POLICY), "--listen", f"127.0.0.1:{port}",
        "--maildir", str(tmp_path / "maildir"), "--dns", str(empty_zone), "--proxy-protocol",
    )  # fmt: skip
    server.wait_listening(port)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        sock.makefile("rb") as replies,
    ):
        sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 5000 25\r\n")
        assert replies.readline().startswith(b"220 ")
        sock.sendall(b"HELO client.example.org\r\n")
        assert replies.readline().startswith(b"250 ")
        sock.sendall(b"MAIL FROM:<bob@example.org>\r\n")
        assert replies.readline().startswith(b"250 ")
        # 203.0.113.9 is not a local network: relaying is denied
        sock.sendall(b"RCPT TO:<someone@remote.example>\r\n")
        assert replies.readline().startswith(b"554 5.7.1 ")


# ---------------------------------------------------------------------------
# Two gateways sharing one Redis state store


LIMITED_POLICY = """
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
smtp_auth.local_networks = []

[security.connection_policy]
max_connections_per_client = 2
"""


def _greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with sock.makefile("rb") as replies:
        return sock, replies.readline()


@pytest.mark.timeout(60)
def test_two_gateways_share_connection_counts_in_redis(
    serve_cli: ServeStarter,
    free_port: Callable[[], int],
    tmp_path: Path,
    empty_zone: Path,
    start_redis_server: Callable[[], Any],
) -> None:
    redis = start_redis_server()
    policy = tmp_path / "limited.toml"
    policy.write_text(LIMITED_POLICY)
    ports = free_port(), free_port()
    common = ["--policy", str(policy), "--state", redis.url, "--dns", str(empty_zone)]
    servers = [
        serve_cli(*common, "--listen", f"127.0.0.1:{port}", "--maildir", str(tmp_path / f"md{i}"))
        for i, port in enumerate(ports)
    ]
    for server, port in zip(servers, ports, strict=True):
        server.wait_listening(port)
    time.sleep(0.3)  # the readiness probes have given their slots back

    held: list[socket.socket] = []
    try:
        for port in ports:  # one session on each gateway
            sock, greeting = _greeting(port)
            held.append(sock)
            assert greeting.startswith(b"220 "), greeting
        sock, greeting = _greeting(ports[0])  # the third, counted across both
        held.append(sock)
        assert greeting.startswith(b"421 4.7.0 "), greeting

        held.pop(0).close()  # a slot comes free on the first gateway ...
        deadline = time.monotonic() + 5
        while True:  # ... and the second one sees it
            sock, greeting = _greeting(ports[1])
            held.append(sock)
            if greeting.startswith(b"220 ") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert greeting.startswith(b"220 "), greeting

        # Redis gone: a limit that cannot be checked is not waived.
        redis.stop()
        sock, greeting = _greeting(ports[0])
        held.append(sock)
        assert greeting.startswith(b"421 4.3.0 "), greeting
    finally:
        for sock in held:
            sock.close()
    assert [server.terminate() for server in servers] == [0, 0]


@pytest.mark.timeout(60)
def test_serve_exits_2_naming_the_url_when_redis_does_not_answer(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path, empty_zone: Path
) -> None:
    redis_port, port = free_port(), free_port()
    url = f"redis://:secret@127.0.0.1:{redis_port}/0"
    server = serve_cli(
        *("--policy", str(EXAMPLE_POLICY), "--listen", f"127.0.0.1:{port}"),
        *("--state", url, "--dns", str(empty_zone), "--maildir", str(tmp_path / "md")),
    )
    assert server.process.wait(15) == 2
    lines = server.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"mailpolicy: --state: state store redis://:***@127.0.0.1:{redis_port}/0 failed during PING"
    )
    assert "secret" not in lines[0]
    with pytest.raises(OSError):  # nothing started
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_gateway_leaves_no_connection_slot_in_redis(
    stop: str,
    serve_cli: ServeStarter,
    free_port: Callable[[], int],
    tmp_path: Path,
    empty_zone: Path,
    start_redis_server: Callable[[], Any],
) -> None:
    import redis as redis_sync

    redis = start_redis_server()
    policy = tmp_path / "limited.toml"
    policy.write_text(LIMITED_POLICY)
    port = free_port()
    # A short slot TTL so that the killed server's slots expire within the test.
    args = [
        *("--policy", str(policy), "--listen", f"127.0.0.1:{port}", "--dns", str(empty_zone)),
        *("--state", redis.url + "?connection_ttl=1", "--maildir", str(tmp_path / "md")),
    ]
    first = serve_cli(*args)
    first.wait_listening(port)
    time.sleep(0.3)  # the readiness probe has given its slot back
    held = [_greeting(port) for _ in range(2)]
    try:
        assert [greeting[:4] for _, greeting in held] == [b"220 ", b"220 "]
        sock, greeting = _greeting(port)
        sock.close()
        assert greeting.startswith(b"421 4.7.0 "), greeting
        time.sleep(0.3)  # the refused session has given its slot back
        if stop == "SIGTERM":
            assert first.terminate() == 0
        else:
            first.kill()
    finally:
        for sock, _ in held:
            sock.close()
    with redis_sync.Redis.from_url(redis.url) as inspect:
        left = inspect.zcard("mailpolicy:conn:127.0.0.1")
        if stop == "SIGTERM":
            assert left == 0  # given back at shutdown
        else:
            assert left == 2  # the dead server's slots, about to expire
            assert 0 < inspect.pttl("mailpolicy:conn:127.0.0.1") <= 1000
            time.sleep(1.2)
    second = serve_cli(*args)
    second.wait_listening(port)
    sock, greeting = _greeting(port)
    sock.close()
    assert greeting.startswith(b"220 "), greeting
    assert second.terminate() == 0


@pytest.mark.timeout(60)
def test_serve_starts_on_a_full_disk_and_warns_once(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path, empty_zone: Path
) -> None:
    point = tmp_path / "full"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (point / "filler").write_bytes(b"\0" * 60 * 1024)
        with pytest.raises(OSError, match="No space left"):
            (point / "more").write_bytes(b"\0" * 8192)
        port = free_port()
        server = serve_cli(
            *("--policy", str(EXAMPLE_POLICY), "--listen", f"127.0.0.1:{port}"),
            *("--maildir", str(point / "maildir"), "--dns", str(empty_zone)),
        )
        server.wait_listening(port)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("client.example.org")
            assert c.mail("bob@example.org")[0] == 250
            assert c.rcpt("alice@example.com")[0] == 250
            # the disk is full: a temporary failure, and the client retries
            code, text = c.data(MESSAGE)
            assert code == 451, text
        assert server.terminate() == 0
        ledger_lines = [ln for ln in server.stderr.splitlines() if "delivery ledger" in ln]
        assert len(ledger_lines) == 1, server.stderr
        assert "WARNING" in ledger_lines[0]
        assert "Traceback" not in server.stderr
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
