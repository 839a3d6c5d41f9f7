"""PolicyHandler in a plain aiosmtpd Controller, driven with smtplib.

Every server here is aiosmtpd's own ``Controller`` on a free port of
127.0.0.1 (its own thread and loop), with the policy plugged in through
handler hooks only; DNS comes from a :class:`StaticZone`. 127.0.0.1 is not in
the policy's local networks, so the test client is judged as an outsider.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailpolicy.adapters.aiosmtpd import PolicyHandler
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.state import MemoryStore
from mailpolicy.config import settings_from_mapping
from mailpolicy.passwords import hash_password
from mailpolicy.policy import Policy, compile_policy

PASSWORD = "wonderland"
#: cheap to verify: the handler never checks it (aiosmtpd's authenticator does)
ALICE_HASH = hash_password(PASSWORD, ln=4)

MESSAGE = (
    b"From: <friend@friend.example>\r\n"
    b"To: <alice@example.com>\r\n"
    b"Subject: through the hooks\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".A line that starts with a dot.\r\n"
)

ZONE = StaticZone.from_mapping(
    {
        "friend.example": {"MX": ["10 mx.friend.example"]},
        "mx.friend.example": {"A": ["192.0.2.10"]},
        "bad.example": {"A": ["192.0.2.1"]},
        "junk.example": {"A": ["192.0.2.2"]},
        "gone.example": {"nxdomain": True},
        "broken.example": {"servfail": True},
    }
)


def make_policy(
    *,
    smtp_auth: dict[str, Any] | None = None,
    general: dict[str, Any] | None = None,
    **security: Any,
) -> Policy:
    """example.com is ours; 127.0.0.1 is an outsider (no local, no trusted networks)."""
    return compile_policy(
        settings_from_mapping(
            {
                "general": {
                    "hostname": "mx.example.com",
                    "local_domains": ["example.com"],
                    "smtp_auth": {"local_networks": [], **(smtp_auth or {})},
                    **(general or {}),
                },
                "accounts": {
                    "alice": {"password_hash": ALICE_HASH, "addresses": ["alice@example.com"]}
                },
                "security": {
                    "lists": [
                        {"name": "spammers", "sender": ["spammer@bad.example"]},
                        {"name": "junk", "sender": ["junk.example"], "action": "discard"},
                    ],
                    "sender_policy": {"reject_unknown_sender_domain": True},
                    **security,
                },
            },
            source="<test policy>",
        )
    )


class Recorder:
    """The application's own handler: keeps what reaches it, refuses one user."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address == "nobody@example.com":
            return "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return "250 2.0.0 Ok: stored"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250 2.0.0 recorder noop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


Start = Callable[..., Controller]


@pytest.fixture
def start() -> Iterator[Start]:
    """``start(policy, handler, smtp={SMTP kwargs}, **PolicyHandler kwargs)``:
    a running Controller."""
    started: list[Controller] = []

    def run(
        policy: Policy, handler: object | None, *, smtp: dict[str, Any] | None = None, **kwargs: Any
    ) -> Controller:
        kwargs.setdefault("resolver", ZONE)
        controller = Controller(
            PolicyHandler(policy, handler=handler, **kwargs),
            hostname="127.0.0.1",
            port=_free_port(),
            **(smtp or {}),
        )
        controller.start()
        started.append(controller)
        return controller

    try:
        yield run
    finally:
        for controller in started:
            with contextlib.suppress(Exception):
                controller.stop()


@contextlib.contextmanager
def client(controller: Controller) -> Iterator[smtplib.SMTP]:
    with smtplib.SMTP(
        controller.hostname, controller.port, local_hostname="client.example", timeout=10
    ) as smtp:
        yield smtp


def test_black_listed_sender_is_refused_at_rcpt_with_the_policy_reply(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailpolicy.decisions")
    recorder = Recorder()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.mail("spammer@bad.example")[0] == 250  # refused later, as Postfix
        assert smtp.rcpt("alice@example.com") == (
            554,
            b"5.7.1 <spammer@bad.example>: Sender address rejected: Access denied",
        )
        smtp.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused, match="Access denied") as info:
            smtp.sendmail("spammer@bad.example", ["alice@example.com"], MESSAGE)
    assert info.value.recipients == {
        "alice@example.com": (
            554,
            b"5.7.1 <spammer@bad.example>: Sender address rejected: Access denied",
        )
    }
    assert recorder.messages == []
    rules = [getattr(r, "decision", {}).get("rule") for r in caplog.records]
    assert rules.count("security.lists.spammers") == 2


def test_relay_is_denied_for_a_foreign_recipient(start: Start) -> None:
    recorder = Recorder()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        smtp.ehlo()
        smtp.mail("friend@friend.example")
        assert smtp.rcpt("bob@remote.example") == (
            554,
            b"5.7.1 <bob@remote.example>: Relay access denied",
        )
        # the refused recipient is not in the envelope: DATA has none
        assert smtp.docmd("DATA")[0] == 503
    assert recorder.messages == []


def test_accepted_mail_reaches_the_user_handler(start: Start) -> None:
    recorder = Recorder()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        refused = smtp.sendmail(
            "friend@friend.example", ["alice@example.com", "bob@example.com"], MESSAGE
        )
        # a hook of the wrapped handler the policy does not judge still runs
        assert smtp.noop() == (250, b"2.0.0 recorder noop")
    assert refused == {}
    assert recorder.messages == [
        ("friend@friend.example", ["alice@example.com", "bob@example.com"], MESSAGE)
    ]


def test_null_sender_and_no_user_handler_get_aiosmtpd_defaults(start: Start) -> None:
    controller = start(make_policy(), None)
    with client(controller) as smtp:
        smtp.ehlo()
        assert smtp.mail("<>") == (250, b"OK")
        assert smtp.rcpt("alice@example.com") == (250, b"OK")
        assert smtp.data(MESSAGE) == (250, b"OK")


def test_vrfy_is_judged_then_left_to_aiosmtpd(start: Start) -> None:
    disabled = start(make_policy(), None)
    with client(disabled) as smtp:
        assert smtp.docmd("VRFY", "<alice@example.com>") == (
            502,
            b"5.5.1 VRFY command is disabled",
        )
    allowed = start(make_policy(advanced={"disable_vrfy": False}), None)
    with client(allowed) as smtp:
        assert smtp.docmd("VRFY", "<alice@example.com>") == (
            252,
            b"Cannot VRFY user, but will accept message and attempt delivery",
        )


def test_the_user_handlers_own_rcpt_refusal_still_works(start: Start) -> None:
    recorder = Recorder()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        refused = smtp.sendmail(
            "friend@friend.example", ["nobody@example.com", "alice@example.com"], MESSAGE
        )
    assert refused == {
        "nobody@example.com": (
            550,
            b"5.1.1 <nobody@example.com>: Recipient address rejected: User unknown",
        )
    }
    assert recorder.messages == [("friend@friend.example", ["alice@example.com"], MESSAGE)]


def test_unknown_sender_domain_is_deferred_and_servfail_never_accepts(start: Start) -> None:
    recorder = Recorder()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        smtp.ehlo()
        smtp.mail("someone@gone.example")
        assert smtp.rcpt("alice@example.com") == (
            450,
            b"4.1.8 <someone@gone.example>: Sender address rejected: Domain not found",
        )
        smtp.rset()
        smtp.mail("someone@broken.example")
        code, text = smtp.rcpt("alice@example.com")
    assert 400 <= code < 500, (code, text)
    assert b"someone@broken.example" in text
    assert recorder.messages == []


def test_a_resolver_that_fails_defers(start: Start) -> None:
    class Broken:
        async def resolve(self, query: Any) -> Any:
            raise OSError("resolver down")

        async def resolve_all(self, queries: Any) -> Any:
            raise OSError("resolver down")

    controller = start(make_policy(), Recorder(), resolver=Broken())
    with client(controller) as smtp:
        smtp.ehlo()
        smtp.mail("friend@friend.example")
        assert smtp.rcpt("alice@example.com") == (
            451,
            b"4.3.0 Error: temporary failure, please try again later",
        )


class CountingZone:
    """The test zone, counting each question it is asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, query: Any) -> Any:
        self.asked.append(str(query))
        return await ZONE.resolve(query)

    async def resolve_all(self, queries: Any) -> Any:
        queries = list(queries)
        self.asked.extend(str(q) for q in queries)
        return await ZONE.resolve_all(queries)


def test_dns_answers_are_kept_for_the_connection(start: Start) -> None:
    zone = CountingZone()
    recorder = Recorder()
    controller = start(make_policy(), recorder, resolver=zone)
    with client(controller) as smtp:
        recipients = ["alice@example.com", "bob@example.com", "carol@example.com"]
        assert smtp.sendmail("friend@friend.example", recipients, MESSAGE) == {}
        smtp.sendmail("friend@friend.example", ["alice@example.com"], MESSAGE)
    assert len(recorder.messages) == 2
    assert zone.asked.count("friend.example/MX") == 1


def test_a_discarded_message_is_accepted_and_never_passed_on(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailpolicy.decisions")
    recorder = Recorder()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        assert smtp.sendmail("bulk@junk.example", ["alice@example.com"], MESSAGE) == {}
        # the discard ends with its transaction: the next message is delivered
        smtp.sendmail("friend@friend.example", ["bob@example.com"], MESSAGE)
    assert recorder.messages == [("friend@friend.example", ["bob@example.com"], MESSAGE)]
    discarded = [r for r in caplog.records if getattr(r, "decision", {}).get("discarded") is True]
    assert len(discarded) == 1
    assert discarded[0].decision["rule"] == "security.lists.junk"  # type: ignore[attr-defined]


def test_message_checks_run_at_the_end_of_data(start: Start) -> None:
    recorder = Recorder()
    controller = start(make_policy(general={"max_message_size_mb": 1, "max_hops": 2}), recorder)
    big = MESSAGE + (b"x" * 998 + b"\r\n") * 1100
    hops = b"Received: from a\r\nReceived: from b\r\nReceived: from c\r\n" + MESSAGE
    too_big = (552, b"5.3.4 Message size exceeds fixed limit")
    with client(controller) as smtp:
        smtp.ehlo()
        assert smtp.mail("friend@friend.example", [f"SIZE={len(big)}"]) == too_big
        for content, reply in (
            (big, (552, b"5.3.4 Error: message file too big")),
            (hops, (554, b"5.4.0 Error: too many hops")),
        ):
            smtp.mail("friend@friend.example")  # no SIZE: judged on what arrives
            smtp.rcpt("alice@example.com")
            assert smtp.data(content) == reply
        smtp.sendmail("friend@friend.example", ["alice@example.com"], MESSAGE)
    assert recorder.messages == [("friend@friend.example", ["alice@example.com"], MESSAGE)]


def test_message_rate_is_counted_per_client_in_the_store(start: Start) -> None:
    policy = make_policy(connection_policy={"max_message_rate_per_client": 2})
    controller = start(policy, Recorder(), store=MemoryStore(), clock=lambda: 1_000_000.0)
    with client(controller) as smtp:
        smtp.ehlo()
        for _ in range(2):
            assert smtp.mail("friend@friend.example")[0] == 250
            smtp.rset()
        assert smtp.mail("friend@friend.example") == (
            450,
            b"4.7.1 Error: too much mail from 127.0.0.1",
        )


def test_sender_domain_and_recipient_domain_rates_are_counted_by_the_handler(
    start: Start,
) -> None:
    policy = make_policy(
        connection_policy={
            "max_message_rate_per_sender_domain": 1,
            "max_recipient_rate_per_recipient_domain": 2,
        }
    )
    controller = start(policy, Recorder(), store=MemoryStore(), clock=lambda: 1_000_000.0)
    with client(controller) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@friend.example")[0] == 250
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.com")[0] == 250
        assert smtp.rcpt("carol@example.com") == (
            450,
            b"4.7.1 Error: too many recipients for domain example.com",
        )
        smtp.rset()
        assert smtp.mail("<>")[0] == 250  # the null sender has no domain to count
        smtp.rset()
        assert smtp.mail("b@friend.example") == (
            450,
            b"4.7.1 Error: too much mail from domain friend.example",
        )


def test_connection_limit_counts_open_connections_until_quit(start: Start) -> None:
    policy = make_policy(connection_policy={"max_connections_per_client": 1})
    controller = start(policy, Recorder(), store=MemoryStore())
    refusal = (421, b"4.7.0 mx.example.com Error: too many connections from 127.0.0.1")
    with client(controller) as first:
        assert first.ehlo()[0] == 250
        with client(controller) as second:
            assert second.ehlo() == refusal
            # then it hangs up, as Postfix does at connect
            with pytest.raises(smtplib.SMTPServerDisconnected, match="closed"):
                second.noop()
        with client(controller) as third:
            # HELO is no different; a hook cannot hang up there: the refusal repeats
            assert third.helo() == refusal
            assert third.docmd("MAIL FROM:<friend@friend.example>")[0] == 503
            assert third.helo() == refusal
        assert first.noop()[0] == 250
    # the first said QUIT: a new connection is welcome again
    with client(controller) as fourth:
        assert fourth.ehlo()[0] == 250


def test_a_connection_that_drops_without_quit_is_counted_out(start: Start) -> None:
    policy = make_policy(connection_policy={"max_connections_per_client": 1})
    controller = start(policy, Recorder(), store=MemoryStore())
    dropped = smtplib.SMTP(controller.hostname, controller.port, timeout=10)
    assert dropped.ehlo()[0] == 250
    codes = []
    # Not left to the garbage collector (aiosmtpd's objects are in cycles):
    # the handler notices the closed transport.
    gc.disable()
    try:
        dropped.close()  # no QUIT: aiosmtpd calls no hook for this
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with client(controller) as smtp:
                codes.append(smtp.ehlo()[0])
            if codes[-1] == 250:
                break
            time.sleep(0.2)
    finally:
        gc.enable()
    assert codes[-1] == 250, codes


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    """The application's own AUTH check (aiosmtpd's authenticator API)."""
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"alice", PASSWORD.encode())
    # auth_data tells the policy who logged in (session.auth_data.login)
    return AuthResult(success=ok, auth_data=auth_data if ok else None)


def test_an_authenticated_client_may_relay_and_is_judged_by_its_login(start: Start) -> None:
    recorder = Recorder()
    policy = make_policy(smtp_auth={"sender_must_match_login": True})
    smtp_options = {"authenticator": _authenticator, "auth_require_tls": False}
    controller = start(policy, recorder, smtp=smtp_options)
    with client(controller) as smtp:
        smtp.ehlo()
        smtp.mail("alice@example.com")
        assert smtp.rcpt("bob@remote.example")[0] == 554  # not yet logged in
        smtp.rset()
        smtp.login("alice", PASSWORD)
        assert smtp.sendmail("alice@example.com", ["bob@remote.example"], MESSAGE) == {}
        smtp.mail("bob@example.com")
        assert smtp.rcpt("carol@remote.example") == (
            553,
            b"5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice",
        )
    assert recorder.messages == [("alice@example.com", ["bob@remote.example"], MESSAGE)]


class OldStyleEhlo(Recorder):
    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        return "250 OLD STYLE"


def test_a_wrapped_four_argument_ehlo_hook_still_works(start: Start) -> None:
    recorder = OldStyleEhlo()
    controller = start(make_policy(), recorder)
    with client(controller) as smtp:
        code, text = smtp.ehlo()
        assert code == 250
        lines = text.splitlines()
        assert b"8BITMIME" in lines  # aiosmtpd's own keywords, then the hook's last line
        assert lines[-1] == b"OLD STYLE"
        smtp.sendmail("friend@friend.example", ["alice@example.com"], MESSAGE)
    assert len(recorder.messages) == 1


class ProxiedRecorder(Recorder):
    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> bool:
        return True  # aiosmtpd's contract: the application accepts the PROXY header


def _talk(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    reply = b""
    while not reply.endswith(b"\r\n") or reply.splitlines()[-1][3:4] == b"-":
        reply += sock.recv(4096)
    return reply


def test_behind_a_proxy_the_client_is_the_proxy_headers_source(start: Start) -> None:
    policy = make_policy(lists=[{"name": "bad-net", "client": ["203.0.113.0/24"]}])
    controller = start(policy, ProxiedRecorder(), smtp={"proxy_protocol_timeout": 5})
    with socket.create_connection((controller.hostname, controller.port), timeout=10) as sock:
        header = b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 25"
        assert _talk(sock, header).startswith(b"220 ")
        assert _talk(sock, b"EHLO client.example").startswith(b"250-")
        assert _talk(sock, b"MAIL FROM:<friend@friend.example>") == b"250 OK\r\n"
        assert _talk(sock, b"RCPT TO:<alice@example.com>") == (
            b"554 5.7.1 <unknown[203.0.113.9]>: Client host rejected: Access denied\r\n"
        )


def test_the_example_runs_and_shows_each_outcome() -> None:
    example = Path(__file__).parent.parent / "examples" / "aiosmtpd_handler.py"
    done = subprocess.run(
        [sys.executable, str(example), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = done.stdout
    assert "handler got a message from <friend@example.org> to ['alice@example.com']" in out
    assert "(550, b'5.1.1 No such user here')" in out
    assert "5.7.1 <someone@elsewhere.example>: Relay access denied" in out
    assert "Mail from you is not welcome here" in out
    assert "discard rule=security.lists.spamtrap" in out
    assert out.count("handler got a message") == 1  # the trapped one never reaches it
