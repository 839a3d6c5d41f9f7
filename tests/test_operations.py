"""Running it for real: observe mode, hot reload (SIGHUP, ``mailpolicy reload``),
``--metrics`` and the limits per login, each against ``mailpolicy serve``
subprocesses on loopback (a real redis-server where counts are shared).
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import test_serve_cli
from prometheus_client.parser import text_string_to_metric_families
from test_serve_cli import Serve, ServeStarter, _command

if TYPE_CHECKING:
    from conftest import RedisServer

#: the fixture that starts ``mailpolicy serve`` processes (killed at teardown)
serve_cli = test_serve_cli.serve_cli

ALICE_HASH = (
    "$scrypt$ln=14,r=8,p=1$cIWhMoydMXIaOhvGcZtMMw$ohojQH3yFBWUo9eVdEGmrCGRf6SFiXCwV9Dxi4e01dU"
)
PASSWORD = "wonderland"

MESSAGE = b"From: bob@example.org\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


def policy_text(
    *, black: bool = True, observe: bool = False, extra: str = "", user_rate: int = 0
) -> str:
    """A policy: example.com is local, 127.0.0.1 is not trusted (relaying
    elsewhere is refused), alice may log in without TLS."""
    text = f"""
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]

[general.smtp_auth]
skip_for_local_network = false
no_plaintext_without_tls = false

[security.connection_policy]
max_message_rate_per_user = {user_rate}

[accounts.alice]
password_hash = "{ALICE_HASH}"
addresses = ["alice@example.com"]
{extra}
"""
    if black:
        text += f"""
[[security.lists]]
name = "spammers"
sender = ["junk.example"]
observe = {"true" if observe else "false"}
"""
    return text


def start(
    serve_cli: ServeStarter,
    tmp_path: Path,
    port: int,
    policy: Path,
    *extra: str,
) -> Serve:
    zone = tmp_path / "zone.json"
    zone.write_text("{}")
    server = serve_cli(
        "--policy", str(policy), "--listen", f"127.0.0.1:{port}",
        "--maildir", str(tmp_path / "maildir"), "--dns", str(zone),
        "--log-format", "json", *extra,
    )  # fmt: skip
    server.wait_listening(port)
    return server


def wait_log(
    server: Serve, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.json_lines():
            if predicate(line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no such log line:\n{server.stderr}")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def maildir_count(tmp_path: Path, address: str) -> int:
    new = tmp_path / "maildir" / address / "new"
    return len(list(new.iterdir())) if new.is_dir() else 0


def reload_via_cli(pid_file: Path) -> None:
    done = subprocess.run(
        [*_command(), "reload", "--pid-file", str(pid_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent SIGHUP to "), done.stdout


# ---------------------------------------------------------------------------
# Observe mode and metrics


@pytest.mark.timeout(60)
def test_an_observed_entry_logs_and_counts_and_metrics_count_what_clients_saw(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(observe=True))
    port, mport = free_port(), free_port()
    server = start(serve_cli, tmp_path, port, policy, "--metrics", f"127.0.0.1:{mport}")

    refusals = 0
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=10) as c:
        c.ehlo()
        # the observed black-list entry lets the message through
        assert c.mail("deals@junk.example")[0] == 250
        assert c.rcpt("alice@example.com")[0] == 250
        assert c.data(MESSAGE)[0] == 250
        # relaying is refused (never observable): a refusal the client sees
        c.rset()
        assert c.mail("bob@example.org")[0] == 250
        for rcpt in ("someone@example.net", "other@example.net"):
            code, _ = c.rcpt(rcpt)
            assert code == 554
            refusals += 1
    assert maildir_count(tmp_path, "alice@example.com") == 1

    line = wait_log(server, lambda ln: bool(ln.get("observed")))
    assert line["rule"] == "security.lists.spammers"
    assert line["action"] == "reject"
    assert str(line["reply"]).startswith("554 5.7.1 <deals@junk.example>: Sender address rejected")

    m = scrape(mport)
    observed = (
        ("action", "reject"),
        ("mode", "observed"),
        ("rule", "security.lists.spammers"),
        ("stage", "rcpt"),
    )
    assert m["mailpolicy_verdicts_total", observed] == 1
    enforced_refusals = sum(
        v
        for (name, labels), v in m.items()
        if name == "mailpolicy_verdicts_total"
        and ("mode", "enforced") in labels
        and dict(labels)["action"] in ("reject", "defer", "defer_if_permit")
    )
    assert enforced_refusals == refusals == 2
    assert m["mailpolicy_replies_total", (("class", "5xx"),)] == 2
    assert m["mailpolicy_sessions_total", ()] >= 1
    assert m["mailpolicy_deliveries_total", (("outcome", "delivered"),)] == 1
    assert m["mailpolicy_policy_generation", ()] == 1


# ---------------------------------------------------------------------------
# Hot reload


@pytest.mark.timeout(60)
def test_a_reload_that_removes_an_entry_lets_new_sessions_through_while_one_in_data_completes(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy, pid_file = tmp_path / "policy.toml", tmp_path / "serve.pid"
    policy.write_text(policy_text(black=True))
    port, mport = free_port(), free_port()
    server = start(
        serve_cli, tmp_path, port, policy,
        "--pid-file", str(pid_file), "--metrics", f"127.0.0.1:{mport}",
    )  # fmt: skip
    assert pid_file.read_text().strip() == str(server.process.pid)

    # a session in DATA, and an idle one, both started under generation 1
    in_data = smtplib.SMTP("127.0.0.1", port, local_hostname="a.example.org", timeout=10)
    in_data.ehlo()
    assert in_data.mail("bob@example.org")[0] == 250
    assert in_data.rcpt("alice@example.com")[0] == 250
    assert in_data.docmd("DATA")[0] == 354
    in_data.send(b"Subject: started before the reload\r\n\r\nfirst half\r\n")
    older = smtplib.SMTP("127.0.0.1", port, local_hostname="b.example.org", timeout=10)
    older.ehlo()

    policy.write_text(policy_text(black=False))
    reload_via_cli(pid_file)
    line = wait_log(server, lambda ln: "reloaded: generation 2" in str(ln.get("msg")))
    assert str(policy) in str(line["msg"])

    # a new session: the entry is gone
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.example.org", timeout=10) as c:
        assert c.mail("deals@junk.example")[0] == 250
        assert c.rcpt("alice@example.com")[0] == 250
    # the session that started before keeps its policy to its end
    assert older.mail("deals@junk.example")[0] == 250
    assert older.rcpt("alice@example.com")[0] == 554
    older.quit()
    # the message in DATA completes
    in_data.send(b"second half\r\n.\r\n")
    code, _text = in_data.getreply()
    assert code == 250
    in_data.quit()
    assert maildir_count(tmp_path, "alice@example.com") == 1
    m = scrape(mport)
    assert m["mailpolicy_policy_generation", ()] == 2
    assert m["mailpolicy_policy_last_reload_success", ()] == 1


@pytest.mark.timeout(60)
def test_a_broken_file_on_sighup_keeps_the_running_policy(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(black=True))
    port, mport = free_port(), free_port()
    server = start(serve_cli, tmp_path, port, policy, "--metrics", f"127.0.0.1:{mport}")

    policy.write_text(policy_text(black=False, extra="[relay]\ntrusted_networks = ['nonsense']\n"))
    server.process.send_signal(signal.SIGHUP)
    line = wait_log(server, lambda ln: "reload failed" in str(ln.get("msg")))
    message = str(line["msg"])
    assert f"{policy}: relay.trusted_networks[0]: " in message
    assert "not an IP address or CIDR network" in message
    assert line["level"] == "error"
    assert "\n" not in message
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.example.org", timeout=10) as c:
        assert c.mail("deals@junk.example")[0] == 250
        assert c.rcpt("alice@example.com")[0] == 554  # the old policy's entry
    m = scrape(mport)
    assert m["mailpolicy_policy_generation", ()] == 1
    assert m["mailpolicy_policy_last_reload_success", ()] == 0
    assert m["mailpolicy_policy_reloads_total", (("result", "failure"),)] == 1


@pytest.mark.timeout(60)
def test_a_listener_change_is_reported_as_needing_a_restart(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text())
    port = free_port()
    server = start(serve_cli, tmp_path, port, policy)
    policy.write_text(policy_text(extra='[server]\nsmtp = "127.0.0.1:2626"\n'))
    server.process.send_signal(signal.SIGHUP)
    line = wait_log(server, lambda ln: "after a restart" in str(ln.get("msg")))
    assert str(line["msg"]).startswith("reload: server changed in ")
    wait_log(server, lambda ln: "reloaded: generation 2" in str(ln.get("msg")))
    # still on the port it started with
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        assert c.noop()[0] == 250


async def _session(port: int, n: int) -> int:
    """One client session sending one message; the end-of-DATA reply code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> int:
        while True:
            line = await reader.readline()
            if not line:
                return 0
            if line[3:4] != b"-":
                return int(line[:3])

    try:
        assert await reply() == 220
        for command, want in (
            (b"EHLO load.example.org", 250),
            (b"MAIL FROM:<bob@example.org>", 250),
            (b"RCPT TO:<alice@example.com>", 250),
            (b"DATA", 354),
        ):
            writer.write(command + b"\r\n")
            code = await reply()
            if code != want:
                return code
        await asyncio.sleep(0.01 * (n % 7))  # let reloads land mid-message
        writer.write(f"Subject: load {n}\r\n\r\nmessage {n}\r\n.\r\n".encode())
        code = await reply()
        writer.write(b"QUIT\r\n")
        await reply()
        return code
    finally:
        writer.close()


@pytest.mark.timeout(120)
def test_reloads_under_load_lose_no_session_and_no_message(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(black=True))
    port = free_port()
    server = start(serve_cli, tmp_path, port, policy)
    sessions = 300

    async def main() -> list[int]:
        async def hups() -> int:
            count = 0
            while not clients.done():
                # as an administrator (or the console) would: write aside,
                # then rename, so a reload never reads a half-written file
                staged = policy.with_suffix(".new")
                staged.write_text(policy_text(black=count % 2 == 0))
                os.replace(staged, policy)
                os.kill(server.process.pid, signal.SIGHUP)
                count += 1
                await asyncio.sleep(0.05)
            return count

        clients = asyncio.ensure_future(
            asyncio.gather(*(_session(port, n) for n in range(sessions)))
        )
        sent = await hups()
        assert sent >= 5
        return list(await clients)

    codes = asyncio.run(main())
    assert codes == [250] * sessions
    assert maildir_count(tmp_path, "alice@example.com") == sessions
    generations = [ln for ln in server.json_lines() if "reloaded: generation" in str(ln.get("msg"))]
    assert len(generations) >= 5
    assert not [ln for ln in server.json_lines() if ln.get("level") == "error"]


# ---------------------------------------------------------------------------
# Limits per login, shared through Redis by two servers


def _send_as_alice(port: int, n: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="laptop.example.org", timeout=10) as c:
        c.ehlo()
        c.login("alice", PASSWORD)
        code, text = c.mail("alice@example.com")
        if code != 250:
            return code, text
        assert c.rcpt("friend@example.net")[0] == 250
        return c.data(MESSAGE.replace(b"Hello.", f"Message {n}.".encode()))


@pytest.mark.timeout(90)
def test_a_per_user_quota_defers_the_next_message_across_two_servers_sharing_redis(
    serve_cli: ServeStarter,
    free_port: Callable[[], int],
    tmp_path: Path,
    start_redis_server: Callable[[], RedisServer],
) -> None:
    policy = tmp_path / "policy.toml"
    redis = start_redis_server()  # a fresh one: no counts from other tests
    # example.net is local too: the messages stay in Maildirs on this machine
    policy.write_text(
        policy_text(user_rate=2).replace(
            'local_domains = ["example.com"]', 'local_domains = ["example.com", "example.net"]'
        )
    )
    state = redis.url
    ports = free_port(), free_port()
    for port in ports:
        start(serve_cli, tmp_path, port, policy, "--state", state)

    assert _send_as_alice(ports[0], 1)[0] == 250
    assert _send_as_alice(ports[1], 2)[0] == 250
    code, text = _send_as_alice(ports[0], 3)
    assert (code, text) == (450, b"4.7.1 Error: too much mail from user alice")
    code, text = _send_as_alice(ports[1], 4)
    assert code == 450
    # without a login nothing is counted per user
    with smtplib.SMTP("127.0.0.1", ports[1], local_hostname="x.example.org", timeout=10) as c:
        assert c.mail("bob@example.org")[0] == 250


@pytest.mark.timeout(60)
def test_captured_cases_record_the_policy_their_session_started_with(
    serve_cli: ServeStarter, free_port: Callable[[], int], tmp_path: Path
) -> None:
    import json

    policy, captures = tmp_path / "policy.toml", tmp_path / "captures"
    policy.write_text(policy_text(black=True))
    port = free_port()
    server = start(serve_cli, tmp_path, port, policy, "--capture", str(captures))
    before = smtplib.SMTP("127.0.0.1", port, local_hostname="before.example.org", timeout=10)
    before.ehlo()
    policy.write_text(policy_text(black=False))
    server.process.send_signal(signal.SIGHUP)
    wait_log(server, lambda ln: "reloaded: generation 2" in str(ln.get("msg")))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="after.example.org", timeout=10) as c:
        c.ehlo()
    before.quit()
    deadline = time.monotonic() + 10
    # three cases: the probe of wait_listening (connect, close), and the two
    while len(list(captures.glob("*.expected.jsonl"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lists = {}
    for case in sorted(captures.glob("*.json")):
        data = json.loads(case.read_text())
        ehlo = [str(step) for step in data["session"] if str(step).upper().startswith("EHLO")]
        if not ehlo:
            continue  # the probe
        lists[ehlo[0].split()[1]] = [
            r["name"] for r in data["policy"].get("security", {}).get("lists", [])
        ]
    assert lists == {"before.example.org": ["spammers"], "after.example.org": []}
