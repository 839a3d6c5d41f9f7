# ruff: noqa: F811  (the server fixtures are imported from test_serve_e2e)
"""Regression tests for attacks on ``mailpolicy serve``, each against a real
server on loopback (the bounded, larger versions are in benchmarks/stress.py)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_serve_e2e import (  # noqa: F401  (fixtures)
    MESSAGE,
    Client,
    LoopThread,
    ServerStarter,
    loop,
    make_settings,
    proxy_line,
    serve,
)

from mailpolicy.adapters.driver import AcceptAllDelivery

if TYPE_CHECKING:
    from conftest import Certificate

ROOT = Path(__file__).resolve().parent.parent


def _open(port: int, *, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.timeout(60)
def test_half_close_after_the_dot_and_quit_gets_250_and_221(serve: ServerStarter) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings(), delivery=delivery)
    for _ in range(20):
        sock = _open(server.port())
        assert _read_reply(sock).startswith(b"220 ")
        sock.sendall(
            b"EHLO c.example.org\r\nMAIL FROM:<carol@example.org>\r\n"
            b"RCPT TO:<alice@example.com>\r\nDATA\r\n"
        )
        sock.sendall(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)  # half-close: no more from us, replies still come
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        lines = received.split(b"\r\n")
        assert any(ln.startswith(b"250 2.0.0 Ok: queued as") for ln in lines), received
        assert b"221 2.0.0 Bye" in lines, received
    assert len(delivery.messages) == 20


@pytest.mark.timeout(30)
def test_overlong_auth_login_answer_is_refused_and_not_read_as_commands(
    serve: ServerStarter,
) -> None:
    server = serve(make_settings({"general": {"smtp_auth": {"no_plaintext_without_tls": False}}}))
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO c.example.org")
        assert c.cmd("AUTH LOGIN").code == 334
        # 20 kB of base64 whose tail looks like a command: it must not run
        junk = base64.b64encode(b"x" * 15_000) + b"QUIT\r\n"
        answer = c.cmd(junk)
        assert (answer.code, answer.enhanced) == (500, "5.5.6"), answer
        assert c.cmd("NOOP").code == 250


@pytest.mark.timeout(30)
def test_server_wide_cap_queues_connections_until_one_ends(serve: ServerStarter) -> None:
    server = serve(make_settings({"server": {"max_connections": 2}}))
    first, second = Client(server.port()), Client(server.port())
    assert first.expect().code == 220 and second.expect().code == 220
    third = _open(server.port(), timeout=1)
    with pytest.raises(TimeoutError):
        third.recv(100)  # accepted by the kernel, not greeted: it waits its turn
    first.cmd("QUIT")
    first.close()
    third.settimeout(10)
    assert _read_reply(third).startswith(b"220 ")
    second.close()
    third.close()


@pytest.mark.timeout(30)
def test_session_time_limit(serve: ServerStarter) -> None:
    server = serve(make_settings({"server": {"max_session_seconds": 1}}))
    with Client(server.port()) as c:
        c.expect()
        started = time.monotonic()
        answers = []
        while (answer := c.cmd("NOOP")).code == 250:
            answers.append(answer)
            time.sleep(0.2)
            assert time.monotonic() - started < 5, "the session outlived its limit"
        assert (answer.code, answer.enhanced) == (421, "4.4.2")
        assert answers, "commands were answered before the limit"
        assert c.at_eof()


@pytest.mark.timeout(30)
def test_a_client_trickling_data_is_cut_off(serve: ServerStarter) -> None:
    delivery = AcceptAllDelivery()
    settings = make_settings({"server": {"timeout_seconds": 1, "min_data_rate": 1000}})
    server = serve(settings, delivery=delivery)
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO c.example.org")
        c.cmd("MAIL FROM:<carol@example.org>")
        c.cmd("RCPT TO:<alice@example.com>")
        assert c.cmd("DATA").code == 354
        started = time.monotonic()
        got = b""
        # ten bytes every 0.3 s never trip a 1 s idle timeout, but the
        # message's deadline grows by only 10 ms per send: it ends the session
        c.sock.settimeout(0.3)
        while time.monotonic() - started < 10 and not got:
            try:
                c.sock.sendall(b"x" * 10)
                got = c.sock.recv(1000)
            except TimeoutError:
                continue
            except OSError:
                break
        assert got.startswith(b"421 4.4.2"), got
        assert time.monotonic() - started < 4
    assert delivery.messages == []


@pytest.mark.timeout(60)
def test_a_big_message_is_spooled_and_delivered_intact(serve: ServerStarter) -> None:
    delivery = AcceptAllDelivery()
    settings = make_settings({"server": {"max_message_memory_kb": 64}})
    server = serve(settings, delivery=delivery)
    body = b"".join(b"line %06d " % i + b"y" * 60 + b"\r\n" for i in range(40_000))
    body += b".dot line\r\n"
    message = b"Subject: big\r\n\r\n" + body
    with Client(server.port(), timeout=30) as c:
        c.expect()
        c.cmd("EHLO c.example.org")
        assert c.transaction("carol@example.org", ["alice@example.com"], message).code == 250
    [sub] = delivery.messages
    assert sub.content == message
    assert len(message) > 2_000_000


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("data", "delivered"),
    [
        (b"MAIL FROM:<carol@example.org>\n", 0),
        (
            b"MAIL FROM:<carol@example.org>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nsmuggled\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n",
            0,
        ),
    ],
)
def test_bare_newline_is_refused_when_asked(
    serve: ServerStarter, data: bytes, delivered: int
) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings({"server": {"reject_bare_newline": True}}), delivery=delivery)
    sock = _open(server.port())
    _read_reply(sock)
    sock.sendall(b"EHLO c.example.org\r\n")
    _read_reply(sock)
    sock.sendall(data)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    assert received.endswith(b"521 5.5.2 mx.example.com Error: bare <LF> received\r\n"), received
    assert len(delivery.messages) == delivered


@pytest.mark.timeout(30)
def test_bare_newline_is_data_by_default_and_never_ends_the_message(
    serve: ServerStarter,
) -> None:
    delivery = AcceptAllDelivery()
    server = serve(make_settings(), delivery=delivery)
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO c.example.org")
        c.cmd("MAIL FROM:<carol@example.org>")
        c.cmd("RCPT TO:<alice@example.com>")
        assert c.cmd("DATA").code == 354
        # "\n.\n" is no end of data: the smuggled MAIL stays message text
        answer = c.cmd(b"Subject: x\r\n\r\nsmuggled\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n")
        assert answer.code == 250
    [sub] = delivery.messages
    assert b"MAIL FROM:<evil@example.org>" in sub.content


@pytest.mark.timeout(30)
def test_proxy_line_only_from_allowed_peers(serve: ServerStarter) -> None:
    settings = make_settings({"server": {"proxy_networks": ["192.0.2.0/24"]}})
    server = serve(settings, proxy_protocol=True)
    with Client(server.port(), proxy="127.0.0.1") as c:
        answer = c.expect()
        assert (answer.code, answer.enhanced) == (421, "4.7.0")
        assert c.at_eof()
    allowed = serve(make_settings(), proxy_protocol=True)  # default: loopback may
    with Client(allowed.port(), proxy="203.0.113.9") as c:
        assert c.expect().code == 220


def _serve_command(tmp_path: Path, policy: str, *extra: str) -> list[str]:
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    return [sys.executable, "-m", "mailpolicy", "serve", "--policy", str(path), *extra]


POLICY = """
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
[server]
smtp = "127.0.0.1:2599"
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("problem", ["missing", "garbage", "mismatch"])
def test_a_bad_certificate_is_one_line_and_exit_2(
    tmp_path: Path, tls_certificate: Certificate, problem: str
) -> None:
    cert, key = tls_certificate.cert, tls_certificate.key
    if problem == "missing":
        cert = tmp_path / "nope.pem"
    elif problem == "garbage":
        cert = tmp_path / "garbage.pem"
        cert.write_text("not a certificate\n")
    else:
        other = tmp_path / "other.key"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            check=True,
            stdout=other.open("wb"),
            stderr=subprocess.DEVNULL,
        )
        key = other
    policy = POLICY + f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    done = subprocess.run(
        _serve_command(tmp_path, policy, "--maildir", str(tmp_path / "md")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "server.tls_cert" in lines[0]
    expected = {
        "missing": f"no such file: {cert}",
        "garbage": f"tls_cert {cert} is not a PEM certificate",
        "mismatch": "the key does not match the certificate",
    }[problem]
    assert expected in lines[0]


@pytest.mark.timeout(60)
def test_a_second_signal_stops_without_waiting_out_the_grace(
    tmp_path: Path, free_port: Any
) -> None:
    port = free_port()
    policy = POLICY.replace("127.0.0.1:2599", f"127.0.0.1:{port}")
    proc = subprocess.Popen(
        _serve_command(tmp_path, policy, "--maildir", str(tmp_path / "md"), "--grace", "60"),
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = _open(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert _read_reply(sock).startswith(b"220")
        # a session in DATA is busy: a graceful stop would wait for it
        sock.sendall(
            b"EHLO c.example.org\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<a@example.com>\r\n"
            b"DATA\r\n"
        )
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the first signal waits for the busy session"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_out_of_descriptors_backs_off_quietly(tmp_path: Path, free_port: Any) -> None:
    port = free_port()
    policy = POLICY.replace("127.0.0.1:2599", f"127.0.0.1:{port}") + "max_connections = 0\n"
    policy = policy.replace(
        "[server]", "[security.connection_policy]\nmax_connections_per_client = 0\n[server]"
    )
    log = tmp_path / "serve.log"
    cmd = [
        "prlimit",
        "--nofile=64",
        *_serve_command(tmp_path, policy, "--maildir", str(tmp_path / "md")),
    ]
    proc = subprocess.Popen(
        cmd, stderr=log.open("wb"), env={**os.environ, "PYTHONPATH": str(ROOT / "src")}
    )
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socks.append(_open(port, timeout=2))
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        # far more connections than descriptors: the kernel queues them
        for _ in range(120):
            socks.append(_open(port, timeout=2))
        time.sleep(3)
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(1.5)  # the back-off is at most a second
        sock = _open(port)
        assert _read_reply(sock).startswith(b"220"), "a new client is greeted again"
        sock.close()
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text
    backoffs = text.count("out of resources accepting")
    assert 1 <= backoffs <= 3, text[-2000:]
    assert log.stat().st_size < 20_000


def test_replay_into_a_closed_pipe_is_quiet() -> None:
    # `mailpolicy replay DIR | head -1`: the reader leaves after one line
    cmd = f"{sys.executable} -m mailpolicy replay {ROOT / 'tests' / 'conformance'} | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("{")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141  # as if killed by SIGPIPE, as other tools report it


def test_hash_password_from_a_pipe_without_stdin_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailpolicy", "hash-password"],
        input="wonderland\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 0, done.stderr
    from mailpolicy.passwords import verify_password

    assert verify_password("wonderland", done.stdout.strip())


def test_no_doc_help_or_docstring_sends_a_user_to_files_they_do_not_have() -> None:
    texts = [*ROOT.joinpath("docs").glob("*.md"), ROOT / "README.md"]
    texts += ROOT.joinpath("src").rglob("*.py")
    offenders = [
        str(p.relative_to(ROOT))
        for p in texts
        if any(
            ref in p.read_text(encoding="utf-8") for ref in ("shared/", "REPLAY.md", "SETTINGS.md")
        )
    ]
    assert offenders == []
    assert ROOT.joinpath("docs", "replay-format.md").is_file()


@pytest.mark.timeout(30)
def test_a_local_address_too_long_for_a_mailbox_is_refused_at_rcpt(
    serve: ServerStarter, tmp_path: Path
) -> None:
    from mailpolicy.adapters.dns import StaticZone
    from mailpolicy.adapters.gateway import GatewayDelivery

    settings = make_settings()
    delivery = GatewayDelivery(settings, StaticZone.from_mapping({}), maildir_root=tmp_path / "md")
    server = serve(settings, delivery=delivery)
    with Client(server.port()) as c:
        c.expect()
        c.cmd("EHLO c.example.org")
        c.cmd("MAIL FROM:<carol@example.org>")
        answer = c.cmd("RCPT TO:<" + "a" * 300 + "@example.com>")
        assert (answer.code, answer.enhanced) == (550, "5.1.1"), answer
        assert "too long for a mailbox name" in answer.text
        assert c.cmd("RCPT TO:<alice@example.com>").code == 250  # the session goes on
    delivery.ledger.close()


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        policy = POLICY.replace("127.0.0.1:2599", f"127.0.0.1:{port}")
        done = subprocess.run(
            _serve_command(tmp_path, policy, "--maildir", str(tmp_path / "md")),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("mailpolicy:")]
    assert errors == [f"mailpolicy: cannot listen: smtp 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--state", "bogus://x"], "unknown state store URL 'bogus://x'"),
        (["--dns", "{tmp}/missing-zone.json"], "{tmp}/missing-zone.json: "),
        (["--dns", "{tmp}/bad-zone.json"], "{tmp}/bad-zone.json: "),
    ],
)
def test_start_up_errors_are_one_line_naming_the_value(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "bad-zone.json").write_text('{"example.com": {"A": ["not an address"]}}')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run(
        _serve_command(tmp_path, POLICY, "--maildir", str(tmp_path / "md"), *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("mailpolicy:")]
    assert len(errors) == 1 and expected.replace("{tmp}", str(tmp_path)) in errors[0], errors
