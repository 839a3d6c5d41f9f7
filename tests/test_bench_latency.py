"""``benchmarks/latency.py`` against a real ``mailpolicy serve`` whose DNS
checks ask a ZoneServer on loopback: it sees every session, every SMTP step
and every DNS question on the wire (root: tcpdump; Postfix's smtp-source)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer

ROOT = Path(__file__).resolve().parent.parent
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tcpdump needs root"),
    pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed"),
    pytest.mark.skipif(not Path(SMTP_SOURCE).exists(), reason="smtp-source is not installed"),
]

ZONE = StaticZone.from_mapping(
    {
        "127.0.0.1": {"PTR": ["client.example.net"]},
        "client.example.net": {"A": ["127.0.0.1"]},
        "known.example": {"MX": ["10 mx.known.example"]},
    }
)


@pytest.mark.timeout(120)
def test_latency_sees_each_step_and_question(tmp_path: Path, free_port: Callable[[], int]) -> None:
    port = free_port()
    # TTL 0: no answer is kept, every session asks
    with ZoneServer(ZONE, ttl=0).run_in_thread() as dns:
        dns_port = int(dns.nameserver.rsplit(":", 1)[1])
        policy = tmp_path / "policy.toml"
        policy.write_text(
            f"""
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
[general.smtp_auth]
local_networks = []
[security.connection_policy]
reject_unknown_reverse_client_hostname = true
[security.sender_policy]
reject_unknown_sender_domain = true
[dns]
nameservers = ["{dns.nameserver}"]
"""
        )
        serve = subprocess.Popen(
            [
                sys.executable, "-m", "mailpolicy", "serve", "--policy", str(policy),
                "--listen", f"127.0.0.1:{port}", "--maildir", str(tmp_path / "md"),
            ],
            stderr=(tmp_path / "serve.log").open("wb"),
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                    time.sleep(0.1)
            done = subprocess.run(
                [
                    sys.executable, str(ROOT / "benchmarks" / "latency.py"),
                    "--port", str(port), "--dns-port", str(dns_port), "--messages", "20",
                ],
                capture_output=True, text=True, timeout=90,
            )  # fmt: skip
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("20 sessions, one every "), done.stdout
    steps = {line.split()[0] for line in lines if line.startswith("  ")}
    assert {"connect", "HELO", "MAIL", "RCPT", "DATA", "message", "QUIT"} <= steps, done.stdout
    questions = {line.split()[0]: line.split("(")[1] for line in lines if "questions)" in line}
    # the checks are live: three questions a session, the PTR, its name's A, the MX
    assert questions == {
        "PTR": "20 questions)",
        "A": "20 questions)",
        "MX": "20 questions)",
    }, done.stdout
    delivered = list((tmp_path / "md" / "r@example.com" / "new").iterdir())
    assert len(delivered) == 100 + 20  # the warm-up and the measured run
