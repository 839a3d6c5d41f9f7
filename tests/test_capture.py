"""Capture: live sessions written as replay cases that replay offline, identically.

The server runs in-process with a LiveResolver asking a ZoneServer on a
loopback port, behind PROXY so clients can come from any address. Each
captured case is then replayed with ``run_case`` after the DNS server is gone,
and must give the replies the client really got.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from mailpolicy.adapters.capture import (
    CapturedSession,
    CaptureStore,
    SessionRecorder,
    build_case,
    settings_to_mapping,
)
from mailpolicy.adapters.dns import LiveResolver, StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer
from mailpolicy.adapters.replay import load_case, run_case
from mailpolicy.adapters.server import Listener, MailServer
from mailpolicy.config import load_settings, settings_from_mapping
from mailpolicy.dialogue import ReplyRecord
from mailpolicy.model import Reply, Session
from mailpolicy.passwords import hash_password
from mailpolicy.policy import compile_policy
from mailpolicy.settings import Settings

if TYPE_CHECKING:
    from conftest import Certificate

PASSWORD = "correct horse battery"

ZONE = {
    "203.0.113.5": {"PTR": ["mail.sender.example"]},
    "mail.sender.example": {"A": ["203.0.113.5"]},
    "sender.example": {"MX": ["10 mail.sender.example"]},
    "198.51.100.66": {"PTR": ["bad.example.org"]},
    "bad.example.org": {"A": ["198.51.100.66"]},
    "66.100.51.198.bl.example": {"A": ["127.0.0.2"]},
    "gone.example": {"nxdomain": True},
    "broken.example": {"servfail": True},
    "example.com": {"MX": ["10 mx.example.com"]},
    "2001:db8::7": {"PTR": ["v6.sender.example"]},
    "v6.sender.example": {"AAAA": ["2001:db8::7"]},
}


def policy_settings(**general: Any) -> Settings:
    return settings_from_mapping(
        {
            "general": {
                "hostname": "mx.example.com",
                "local_domains": ["example.com"],
                "smtp_auth": {"no_plaintext_without_tls": False, "sender_must_match_login": True},
                **general,
            },
            "security": {
                "sender_policy": {"reject_unknown_sender_domain": True},
                "advanced": {"dnsbl": ["bl.example"]},
                "lists": [{"name": "spammers", "sender": ["spam.example"]}],
            },
            "accounts": {
                "alice": {
                    "password_hash": hash_password(PASSWORD, ln=4),
                    "addresses": ["alice@example.com"],
                }
            },
        },
        source="<test>",
    )


# ---------------------------------------------------------------------------
# a small SMTP client that keeps every reply


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seen: list[Reply] = []

    @classmethod
    async def connect(cls, port: int, ip: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        family = "TCP6" if ":" in ip else "TCP4"
        here = "::1" if ":" in ip else "127.0.0.1"
        writer.write(f"PROXY {family} {ip} {here} 40000 25\r\n".encode())
        client = cls(reader, writer)
        await client.read()
        return client

    async def read(self) -> Reply:
        lines = []
        while True:
            line = (await self.reader.readline()).decode().rstrip("\r\n")
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] != "-":
                break
        code = int(lines[0][:3])
        texts, enhanced = [], None
        for ln in lines:
            text = ln[4:]
            head, _, rest = text.partition(" ")
            if re.fullmatch(r"[245]\.\d+\.\d+", head):
                enhanced = enhanced or head
                text = rest
            texts.append(text)
        reply = Reply(code, enhanced, "\n".join(texts))
        self.seen.append(reply)
        return reply

    async def cmd(self, line: str) -> Reply:
        self.writer.write(line.encode() + b"\r\n")
        return await self.read()

    async def pipeline(self, *lines: str) -> list[Reply]:
        self.writer.write(b"".join(x.encode() + b"\r\n" for x in lines))
        return [await self.read() for _ in lines]

    async def message(self, text: str) -> Reply:
        body = text.replace("\n", "\r\n")
        if not body.endswith("\r\n"):
            body += "\r\n"
        self.writer.write(body.encode() + b".\r\n")
        return await self.read()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


MESSAGE = "From: <a@sender.example>\nTo: <bob@example.com>\nSubject: hello\n\nHi Bob.\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def play_sessions(port: int) -> list[list[Reply]]:
    """Accepted mail, DNS-based refusals, AUTH successes and failures, pipelining."""
    out = []

    c = await Client.connect(port, "203.0.113.5")
    await c.cmd("EHLO mail.sender.example")
    assert (await c.cmd("MAIL FROM:<a@sender.example>")).code == 250
    assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    assert (await c.message(MESSAGE)).code == 250
    await c.cmd("QUIT")
    await c.close()
    out.append(c.seen)

    # refused by DNS: an unknown sender domain, a DNS failure, a DNS black list
    c = await Client.connect(port, "203.0.113.5")
    await c.cmd("EHLO mail.sender.example")
    await c.cmd("MAIL FROM:<x@gone.example>")
    assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 450
    await c.cmd("RSET")
    await c.cmd("MAIL FROM:<x@broken.example>")
    assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 450
    await c.cmd("RSET")
    await c.cmd("MAIL FROM:<x@spam.example>")
    assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 554
    await c.cmd("QUIT")
    await c.close()
    out.append(c.seen)

    c = await Client.connect(port, "198.51.100.66")
    await c.cmd("HELO bad.example.org")
    await c.cmd("MAIL FROM:<a@sender.example>")
    r = await c.cmd("RCPT TO:<bob@example.com>")
    assert (r.code, r.enhanced) == (554, "5.7.1") and "bl.example" in r.text
    await c.cmd("QUIT")
    await c.close()
    out.append(c.seen)

    # AUTH that succeeds, then relays
    c = await Client.connect(port, "192.0.2.99")
    await c.cmd("EHLO laptop.example.net")
    assert (await c.cmd("AUTH PLAIN " + b64(f"\0alice\0{PASSWORD}"))).code == 235
    await c.cmd("MAIL FROM:<alice@example.com>")
    assert (await c.cmd("RCPT TO:<friend@elsewhere.example>")).code == 250
    await c.cmd("DATA")
    await c.message("Subject: out\n\nbye\n")
    await c.cmd("QUIT")
    await c.close()
    out.append(c.seen)

    # AUTH that fails in every way, then succeeds; then a sender it does not own
    c = await Client.connect(port, "2001:db8::7")
    await c.cmd("EHLO v6.sender.example")
    assert (await c.cmd("AUTH LOGIN")).code == 334
    assert (await c.cmd(b64("alice"))).code == 334
    assert (await c.cmd(b64("not the password"))).code == 535
    assert (await c.cmd("AUTH PLAIN")).code == 334
    assert (await c.cmd(b64("\0alice\0guess"))).code == 535
    assert (await c.cmd("AUTH PLAIN")).code == 334
    assert (await c.cmd("*")).code == 501
    assert (await c.cmd("AUTH PLAIN not-base64!")).code == 535  # as Postfix: Invalid base64 data
    assert (await c.cmd("AUTH PLAIN " + b64("no-nuls"))).code == 535
    assert (await c.cmd("AUTH CRAM-MD5")).code == 535
    assert (await c.cmd("AUTH LOGIN " + b64("alice"))).code == 334
    assert (await c.cmd(b64(PASSWORD))).code == 235
    await c.cmd("MAIL FROM:<bob@example.com>")
    assert (await c.cmd("RCPT TO:<friend@elsewhere.example>")).code == 553
    await c.cmd("QUIT")
    await c.close()
    out.append(c.seen)

    # pipelining, as a client does after EHLO
    c = await Client.connect(port, "203.0.113.5")
    await c.cmd("EHLO mail.sender.example")
    replies = await c.pipeline(
        "MAIL FROM:<a@sender.example>",
        "RCPT TO:<bob@example.com>",
        "RCPT TO:<nobody@elsewhere.example>",
        "DATA",
    )
    assert [r.code for r in replies] == [250, 250, 554, 354]
    await c.message(MESSAGE)
    await c.cmd("QUIT")
    await c.close()
    out.append(c.seen)
    return out


async def capture_and_replay(
    tmp_path: Path,
    settings: Settings,
    play: Any,
    tls: ssl.SSLContext | None = None,
    **store_options: Any,
) -> tuple[list[list[Reply]], list[Path]]:
    zone = StaticZone.from_mapping(ZONE)
    store = CaptureStore(tmp_path / "captures", settings, **store_options)
    async with ZoneServer(zone) as dns:
        resolver = LiveResolver([dns.nameserver], timeout=2)
        server = MailServer(
            compile_policy(settings),
            resolver,
            listeners=[Listener("smtp", "127.0.0.1", 0)],
            proxy_protocol=True,
            observer=store.observer,
            tls=tls,
        )
        await server.start()
        try:
            seen = await play(server.port())
        finally:
            await server.stop(grace=1)
        assert dns.queries, "the sessions asked the DNS server"
    await asyncio.to_thread(store.close)
    return seen, store.cases


QUEUE_ID = re.compile(r"queued as [0-9A-F]+")


def same(reply: dict[str, Any]) -> tuple[Any, ...]:
    """What must be identical: everything except the queue id."""
    return (reply["code"], reply["enhanced"], QUEUE_ID.sub("queued as ID", reply["text"]))


def as_dict(r: Reply) -> dict[str, Any]:
    return {"code": r.code, "enhanced": r.enhanced, "text": r.text}


def expected_of(case: Path) -> list[dict[str, Any]]:
    lines = case.with_suffix(".expected.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines]


async def check_replays(cases: Sequence[Path], seen: Sequence[list[Reply]]) -> None:
    assert len(cases) == len(seen)
    for path, live in zip(cases, seen, strict=True):
        expected = expected_of(path)
        # the expected file is what the client really got
        assert [same(e) for e in expected] == [same(as_dict(r)) for r in live], path.name
        (case,) = load_case(path)
        replayed = await run_case(case)
        got = [r.to_json() for r in replayed]
        assert [same(g) for g in got] == [same(e) for e in expected], path.name
        assert [g["cmd"] for g in got] == [e["cmd"] for e in expected]
        assert [g.get("rule") for g in got] == [e.get("rule") for e in expected]


def test_captured_sessions_replay_offline_identically(tmp_path: Path) -> None:
    asyncio.run(_captured_sessions_replay_offline_identically(tmp_path))


async def _captured_sessions_replay_offline_identically(tmp_path: Path) -> None:
    settings = policy_settings()
    seen, cases = await capture_and_replay(tmp_path, settings, play_sessions)
    await check_replays(cases, seen)

    refused = load_case(cases[2])[0].data
    assert refused["client"] == {"ip": "198.51.100.66", "helo": "bad.example.org", "tls": False}
    # the DNS answers the session used, failures included
    assert refused["dns"]["66.100.51.198.bl.example"] == {"A": ["127.0.0.2"]}
    dns_failures = load_case(cases[1])[0].data["dns"]
    assert dns_failures["gone.example"] == {"nxdomain": True}
    # only the questions the session asked: the sender domain's MX and
    # addresses, for reject_unknown_sender_domain
    assert sorted(dns_failures["broken.example"]["servfail"]) == ["A", "AAAA", "MX"]
    # the policy, without account hashes
    assert "accounts" not in refused["policy"]
    assert settings_from_mapping(refused["policy"]) == attrs.evolve(settings, accounts=())
    pipelined = load_case(cases[5])[0].data["session"]
    assert pipelined[1] == {
        "pipeline": [
            "MAIL FROM:<a@sender.example>",
            "RCPT TO:<bob@example.com>",
            "RCPT TO:<nobody@elsewhere.example>",
        ]
    }


def test_a_starttls_session_is_captured_and_replays_identically(
    tmp_path: Path, tls_certificate: Certificate
) -> None:
    asyncio.run(_starttls_session_replays(tmp_path, tls_certificate))


async def _starttls_session_replays(tmp_path: Path, cert: Certificate) -> None:
    async def play(port: int) -> list[list[Reply]]:
        c = await Client.connect(port, "203.0.113.5")
        assert "STARTTLS" in (await c.cmd("EHLO mail.sender.example")).text
        assert (await c.cmd("STARTTLS")).code == 220
        await c.writer.start_tls(cert.client_context(), server_hostname="localhost")
        assert "STARTTLS" not in (await c.cmd("EHLO mail.sender.example")).text
        await c.cmd("MAIL FROM:<x@gone.example>")
        assert (await c.cmd("RCPT TO:<bob@example.com>")).code == 450
        await c.cmd("RSET")
        assert (await c.cmd("AUTH PLAIN " + b64(f"\0alice\0{PASSWORD}"))).code == 235
        await c.cmd("MAIL FROM:<alice@example.com>")
        assert (await c.cmd("RCPT TO:<friend@elsewhere.example>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.message(MESSAGE)).code == 250
        await c.cmd("QUIT")
        await c.close()
        return [c.seen]

    settings = policy_settings()
    [seen], cases = await capture_and_replay(tmp_path, settings, play, tls=cert.server_context())
    [path] = cases
    (case,) = load_case(path)
    assert case.data["client"]["tls"] is True
    assert case.data["session"][0] == "EHLO mail.sender.example"
    # what the client saw under TLS (and the greeting) is what replay says
    under_tls = [seen[0], *seen[3:]]
    expected = expected_of(path)
    assert [same(e) for e in expected] == [same(as_dict(r)) for r in under_tls]
    replayed = [r.to_json() for r in await run_case(case)]
    assert [same(g) for g in replayed] == [same(e) for e in expected]
    assert [g["cmd"] for g in replayed] == [e["cmd"] for e in expected]
    assert "STARTTLS" in case.data["description"]


def test_passwords_never_reach_a_capture(tmp_path: Path) -> None:
    asyncio.run(_passwords_never_reach_a_capture(tmp_path))


async def _passwords_never_reach_a_capture(tmp_path: Path) -> None:
    _, cases = await capture_and_replay(tmp_path, policy_settings(), play_sessions)
    text = "".join(p.read_text() + p.with_suffix(".expected.jsonl").read_text() for p in cases)
    for secret in ("not the password", "guess", PASSWORD):
        assert secret not in text
        assert b64(secret) not in text
    assert b64(f"\0alice\0{PASSWORD}") not in text
    assert b64("\0alice\0guess") not in text
    assert "$scrypt$" not in text
    auth_ok = load_case(cases[3])[0].data
    (step,) = [s for s in auth_ok["session"] if isinstance(s, dict) and "auth_plain" in s]
    user, placeholder = step["auth_plain"]
    assert user == "alice" and placeholder == auth_ok["accounts"]["alice"]["password"]
    failures = load_case(cases[4])[0].data
    login = [s for s in failures["session"] if isinstance(s, dict) and "auth_login" in s]
    assert login[0]["auth_login"][0] == "alice"
    assert login[0]["auth_login"][1] != failures["accounts"]["alice"]["password"]


def test_headers_only_keeps_the_size_not_the_body(tmp_path: Path) -> None:
    asyncio.run(_headers_only_keeps_the_size_not_the_body(tmp_path))


async def _headers_only_keeps_the_size_not_the_body(tmp_path: Path) -> None:
    settings = policy_settings(max_message_size_mb=0.03)  # 31,457 bytes
    body_line = "secret body line " * 4 + "\n"

    async def play(port: int) -> list[list[Reply]]:
        out = []
        for lines in (100, 700):  # about 7 KB (accepted), about 48 KB (too big)
            c = await Client.connect(port, "203.0.113.5")
            await c.cmd("EHLO mail.sender.example")
            await c.cmd("MAIL FROM:<a@sender.example>")
            await c.cmd("RCPT TO:<bob@example.com>")
            await c.cmd("DATA")
            await c.message("Subject: big\nX-Latin1: caf\xe9\n\n" + body_line * lines)
            await c.cmd("QUIT")
            await c.close()
            out.append(c.seen)
        return out

    seen, cases = await capture_and_replay(tmp_path, settings, play, headers_only=True)
    assert [s[5].code for s in seen] == [250, 552]
    await check_replays(cases, seen)
    for path in cases:
        text = path.read_text()
        assert "secret body line" not in text
        assert "Subject: big" in text


def test_message_over_the_limit_keeps_its_size(tmp_path: Path) -> None:
    asyncio.run(_message_over_the_limit_keeps_its_size(tmp_path))


async def _message_over_the_limit_keeps_its_size(tmp_path: Path) -> None:
    settings = policy_settings(max_message_size_mb=0.01)

    async def play(port: int) -> list[list[Reply]]:
        c = await Client.connect(port, "203.0.113.5")
        await c.cmd("EHLO mail.sender.example")
        await c.cmd("MAIL FROM:<a@sender.example>")
        await c.cmd("RCPT TO:<bob@example.com>")
        await c.cmd("DATA")
        await c.message("Subject: big\n\n" + "y" * 30 + "\n" * 1 + ("z" * 99 + "\n") * 200)
        await c.cmd("QUIT")
        await c.close()
        return [c.seen]

    seen, cases = await capture_and_replay(tmp_path, settings, play)
    assert seen[0][5].code == 552
    await check_replays(cases, seen)


# ---------------------------------------------------------------------------
# the directory: bounds, atomic names, other files untouched


def _captured(ip: str, n_commands: int = 1) -> CapturedSession:
    recorder_out: list[CapturedSession] = []
    rec = SessionRecorder(recorder_out.append)
    session = Session(ip, helo="h.example")
    rec.connected(session, 1_700_000_000.0)
    rec.reply(ReplyRecord(Reply(220, None, "mx ESMTP"), None))
    for _ in range(n_commands):
        rec.command("NOOP", False)
        rec.reply(ReplyRecord(Reply(250, "2.0.0", "Ok"), None))
    rec.closed(session)
    return recorder_out[0]


def test_oldest_sessions_are_dropped_first(tmp_path: Path) -> None:
    settings = policy_settings()
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "notes.json").write_text("{}")  # not a capture: never touched
    store = CaptureStore(directory, settings, max_files=2)
    for i in range(4):
        store._submit(_captured(f"192.0.2.{i + 1}"))
    store.flush()
    kept = [json.loads(p.read_text())["client"]["ip"] for p in store.cases]
    assert kept == ["192.0.2.3", "192.0.2.4"]
    store.close()
    assert (directory / "notes.json").exists()
    assert sorted(p.name for p in directory.iterdir() if p.name.endswith(".json")) == sorted(
        [p.name for p in store.cases] + ["notes.json"]
    )
    assert not list(directory.glob(".*.tmp"))

    # a new store counts what is there, and bytes bound it too
    one = sum(
        p.stat().st_size + p.with_suffix(".expected.jsonl").stat().st_size for p in store.cases
    )
    again = CaptureStore(directory, settings, max_files=10, max_bytes=one // 2 + 10)
    assert len(again.cases) == 1
    again._submit(_captured("192.0.2.9"))
    again.close()
    assert [json.loads(p.read_text())["client"]["ip"] for p in again.cases] == ["192.0.2.9"]
    assert sum(1 for p in directory.iterdir() if p.suffix == ".json") == 2  # + notes.json


def test_a_session_over_the_byte_limit_is_not_written(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path, policy_settings(), max_bytes=100)
    store._submit(_captured("192.0.2.1"))
    store.close()
    assert store.cases == []
    assert not list(tmp_path.iterdir())


def test_limits_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capture limits must be positive"):
        CaptureStore(tmp_path, policy_settings(), max_files=0)


def test_starttls_session_becomes_an_implicit_tls_case() -> None:
    out: list[CapturedSession] = []
    rec = SessionRecorder(out.append)
    session = Session("192.0.2.1")
    rec.connected(session, 0.0)
    rec.reply(ReplyRecord(Reply(220, None, "mx ESMTP"), None))
    rec.command("EHLO a.example", False)
    rec.reply(ReplyRecord(Reply(250, None, "mx\nSTARTTLS"), None))
    rec.command("STARTTLS", False)
    rec.reply(ReplyRecord(Reply(220, "2.0.0", "Ready to start TLS"), None))
    rec.tls_started()
    rec.command("EHLO a.example", False)
    rec.reply(ReplyRecord(Reply(250, None, "mx"), None))
    rec.command("QUIT", False)
    rec.reply(ReplyRecord(Reply(221, "2.0.0", "Bye"), None))
    rec.reply(ReplyRecord(Reply(421, "4.3.2", "shutting down"), None))  # unsolicited
    rec.closed(attrs.evolve(session, tls=True, helo="a.example"))
    case, expected = build_case(out[0], {}, {})
    assert case["client"]["tls"] is True
    assert case["session"] == ["EHLO a.example", "QUIT"]
    assert [e["cmd"] for e in expected] == ["<connect>", "EHLO a.example", "QUIT"]
    assert "STARTTLS" in case["description"] and "421" in case["description"]


# ---------------------------------------------------------------------------
# settings_to_mapping


@pytest.mark.parametrize(
    "path",
    ["examples/policy.toml", *sorted(str(p) for p in Path("tests/conformance").glob("*.json"))],
)
def test_settings_round_trip_through_a_mapping(path: str) -> None:
    root = Path(__file__).parent.parent
    if path.endswith(".toml"):
        settings = load_settings(root / path)
    else:
        data = json.loads((root / path).read_text())
        settings = settings_from_mapping(data.get("policy", {}))
    mapping = json.loads(json.dumps(settings_to_mapping(settings)))
    assert settings_from_mapping(mapping) == attrs.evolve(settings, accounts=())


def test_settings_round_trip_with_everything_set() -> None:
    settings = settings_from_mapping(
        {
            "general": {"hostname": "mx.example.com", "max_message_size_mb": 2.5},
            "delivery": {
                "mode": "relay",
                "relay_host": {"host": "smarthost.example.net", "port": 587, "security": "tls"},
                "exceptions": [
                    {
                        "name": "partner",
                        "match": "sender",
                        "targets": ["partner.example"],
                        "host": "mx.partner.example",
                        "username": "u",
                        "password_env": "PARTNER_PW",
                    }
                ],
            },
            "relay": {"trusted_networks": ["192.0.2.0/24", "2001:db8::/32"]},
            "security": {
                "advanced": {"dnsbl": ["bl.example=127.0.0.2", "zen.example"]},
                "lists": [
                    {"name": "w", "list": "white", "client_hostname": ["good.example"]},
                    {"name": "b", "action": "discard", "text": "no", "recipient": ["x@"]},
                ],
            },
            "server": {"smtp": "", "submission": "127.0.0.1:587", "tls_cert": "c", "tls_key": "k"},
            "dns": {"nameservers": ["192.0.2.53:5353"], "timeout_seconds": 1.5},
        }
    )
    mapping = json.loads(json.dumps(settings_to_mapping(settings)))
    assert settings_from_mapping(mapping) == settings


# ---------------------------------------------------------------------------
# the command line


def test_serve_capture_command(tmp_path: Path, free_port: Any) -> None:
    import signal
    import smtplib
    import subprocess
    import sys
    import time

    from mailpolicy.cli import main

    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[general]\nhostname = "mx.example.com"\nlocal_domains = ["example.com"]\n'
        "[general.smtp_auth]\nlocal_networks = []\n"
        "[security.sender_policy]\nreject_unknown_sender_domain = true\n"
    )
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps(ZONE))
    port = free_port()
    captures = tmp_path / "captures"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailpolicy",
            "serve",
            "--policy",
            str(policy),
            "--listen",
            f"127.0.0.1:{port}",
            "--dns",
            str(zone),
            "--maildir",
            str(tmp_path / "maildir"),
            "--capture",
            str(captures),
            "--capture-max-files",
            "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                smtp = smtplib.SMTP("127.0.0.1", port, timeout=5)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)
        with smtp:
            smtp.ehlo("mail.sender.example")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("x@gone.example", ["bob@example.com"], "Subject: x\r\n\r\nhi\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    (case,) = sorted(captures.glob("*.json"))
    assert main(["replay", "--check", str(captures)]) == 0
    assert load_case(case)[0].data["dns"]["gone.example"] == {"nxdomain": True}
    assert (
        main(
            [
                "serve",
                "--policy",
                str(policy),
                "--capture",
                str(captures),
                "--capture-max-files",
                "0",
            ]
        )
        == 2
    )
