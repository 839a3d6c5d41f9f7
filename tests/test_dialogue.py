"""The pure SMTP dialogue, fed with bytes: no sockets, no event loop."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailpolicy.config import settings_from_mapping
from mailpolicy.dialogue import (
    NEED_DATA,
    Authenticated,
    CheckPassword,
    Close,
    CommandReceived,
    Connection,
    Decided,
    Deliver,
    DialogueError,
    Event,
    MessageReceived,
    NeedCount,
    NeedDns,
    NeedRecipientCheck,
    NeedStamp,
    Prefetch,
    Send,
    Stamp,
    StartTls,
    TlsStarted,
)
from mailpolicy.dialogue.message import DataReader
from mailpolicy.model import DnsOutcome, DnsQuery, DnsResult, Reply, RType
from mailpolicy.passwords import hash_password
from mailpolicy.policy import Policy, compile_policy

HOST = "mx.example.com"
TRANSACTION = b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n"


def make_policy(extra: Mapping[str, Any] | None = None, *, accounts: bool = False) -> Policy:
    data: dict[str, Any] = {
        "general": {"hostname": HOST, "local_domains": ["example.com"]},
        "security": {"connection_policy": {"max_connections_per_client": 0}},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    if accounts:
        data["accounts"] = {
            "alice": {
                "password_hash": hash_password("wonderland", ln=4),
                "addresses": ["alice@example.com"],
            }
        }
    return compile_policy(settings_from_mapping(data))


class Host:
    """Answers a connection's needs from canned values and records events."""

    def __init__(
        self,
        conn: Connection,
        *,
        dns: Mapping[DnsQuery, DnsResult] | None = None,
        counts: Callable[[NeedCount], int | tuple[int, int]] | None = None,
        password_ok: bool = True,
        tls_ok: bool = True,
        deliver: Reply | None = None,
    ) -> None:
        self.conn = conn
        self.dns = dict(dns or {})
        self.counts = counts or (lambda need: (1, 1) if need.kind == "connection" else 1)
        self.password_ok = password_ok
        self.tls_ok = tls_ok
        self.deliver = deliver or Reply(250, "2.0.0", "Ok: queued as Q1")
        #: recipients the delivery refuses at RCPT, and how
        self.undeliverable: dict[str, Reply] = {}
        self.events: list[Event] = []
        self.delivered: list[Deliver] = []
        self.asked_dns: list[frozenset[DnsQuery]] = []

    def run(self, data: bytes = b"", *, eof: bool = False) -> list[Send]:
        """Feed ``data`` and run until the connection needs more (or closes);
        the replies sent meanwhile."""
        if data:
            self.conn.receive_data(data)
        if eof:
            self.conn.receive_data(b"")
        sent: list[Send] = []
        while True:
            event = self.conn.next_event()
            self.events.append(event)
            if event is NEED_DATA or isinstance(event, Close):
                return sent
            if isinstance(event, Send):
                sent.append(event)
            elif isinstance(event, NeedDns):
                self.asked_dns.append(event.queries)
                nx = DnsResult(DnsOutcome.NXDOMAIN)
                self.conn.dns_answers({q: self.dns.get(q, nx) for q in event.queries})
            elif isinstance(event, NeedCount):
                self.conn.counted(self.counts(event))
            elif isinstance(event, NeedRecipientCheck):
                self.conn.recipient_checked(self.undeliverable.get(event.recipient))
            elif isinstance(event, CheckPassword):
                self.conn.password_checked(self.password_ok)
            elif isinstance(event, StartTls):
                self.conn.tls_started(self.tls_ok)
            elif isinstance(event, NeedStamp):
                self.conn.stamped(Stamp(1_700_000_000.0, "Q1"))
            elif isinstance(event, Deliver):
                self.delivered.append(event)
                self.conn.delivered(self.deliver)

    def codes(self, data: bytes = b"", **kw: Any) -> list[tuple[int, str | None]]:
        return [(s.reply.code, s.reply.enhanced) for s in self.run(data, **kw)]


def connect(policy: Policy | None = None, **kw: Any) -> Host:
    conn = Connection(
        policy or make_policy(),
        "192.0.2.10",
        **{k: kw.pop(k) for k in ("tls", "starttls") if k in kw},
    )
    host = Host(conn, **kw)
    [greeting] = host.run()
    assert greeting.data == f"220 {HOST} ESMTP\r\n".encode()
    return host


def test_a_whole_transaction_as_bytes() -> None:
    host = connect()
    sent = host.run(b"EHLO client.example.org\r\n")
    assert sent[0].data.startswith(b"250-mx.example.com\r\n250-PIPELINING\r\n")
    assert sent[0].data.endswith(b"250 SMTPUTF8\r\n")
    assert host.run(b"MAIL FROM:<Friend@Example.org>\r\n")[0].data == b"250 2.1.0 Ok\r\n"
    assert host.run(b"RCPT TO:<alice@example.com>\r\n")[0].data == b"250 2.1.5 Ok\r\n"
    assert host.run(b"DATA\r\n")[0].data == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert host.conn.busy and host.conn.in_data
    body = b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
    assert host.run(body)[0].data == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert not host.conn.busy
    [delivery] = host.delivered
    sub = delivery.submission
    assert (sub.sender, sub.recipients, sub.queue_id) == (
        "Friend@Example.org",  # as the client wrote it
        ("alice@example.com",),
        "Q1",
    )
    assert sub.content == b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
    assert sub.message.startswith(b"Received: from client.example.org (unknown [192.0.2.10])\r\n")
    assert sub.message.endswith(sub.content)
    assert host.run(b"QUIT\r\n")[0].data == b"221 2.0.0 Bye\r\n"
    assert isinstance(host.events[-1], Close)
    assert host.conn.next_event() == host.events[-1]  # final


def test_pipelined_commands_get_replies_in_order_and_are_marked() -> None:
    host = connect(make_policy({"security": {"advanced": {"reject_unauth_pipelining": True}}}))
    host.run(b"EHLO c.example.org\r\n")
    codes = host.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    assert codes == [(250, "2.1.0"), (250, "2.1.5"), (354, None)]
    received = [e for e in host.events if isinstance(e, CommandReceived)]
    assert [(c.line.split()[0], c.pending) for c in received[-3:]] == [
        ("MAIL", True),
        ("RCPT", True),
        ("DATA", False),
    ]
    # pipelining after EHLO is allowed: nothing was improper
    assert not host.conn.session.improper_pipelining


def test_sending_ahead_of_helo_is_improper_pipelining_and_refused_at_data() -> None:
    host = connect(make_policy({"security": {"advanced": {"reject_unauth_pipelining": True}}}))
    codes = host.codes(
        b"HELO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
    )
    assert codes == [(250, None), (250, "2.1.0"), (250, "2.1.5")]
    assert host.conn.session.improper_pipelining
    [refusal] = host.run(b"DATA\r\n")
    assert (
        refusal.data
        == b"503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining\r\n"
    )
    assert refusal.record.verdict is not None
    assert refusal.record.verdict.rule == "security.advanced.reject_unauth_pipelining"


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (b"RCPT TO:<a@example.com>\r\n", [(503, "5.5.1")]),
        (b"DATA\r\n", [(503, "5.5.1")]),
        (
            b"MAIL FROM:<a@example.org>\r\nMAIL FROM:<b@example.org>\r\n",
            [(250, "2.1.0"), (503, "5.5.1")],
        ),
        (b"MAIL FROM:<a@example.org>\r\nDATA\r\n", [(250, "2.1.0"), (554, "5.5.1")]),
        (
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n",
            [(250, "2.1.0"), (554, "5.7.1"), (554, "5.5.1")],
        ),
    ],
)
def test_the_sequence_table(commands: bytes, expected: list[tuple[int, str | None]]) -> None:
    host = connect()
    host.run(b"EHLO c.example.org\r\n")
    assert host.codes(commands) == expected


def test_twenty_errors_then_421_before_reading_more() -> None:
    host = connect()
    for _ in range(19):
        assert host.codes(b"BOGUS\r\n") == [(500, "5.5.2")]
    sent = host.run(b"BOGUS\r\n")
    assert [s.data for s in sent] == [
        b"500 5.5.2 Error: command not recognized\r\n",
        b"421 4.7.0 mx.example.com Error: too many errors\r\n",
    ]
    assert isinstance(host.events[-1], Close)


def test_overlong_lines_get_500_and_memory_stays_bounded() -> None:
    host = connect()
    host.conn.receive_data(b"NOOP " + b"x" * 5000)
    assert host.run() == []
    assert host.conn.buffered == 0  # dropped as it came
    assert host.codes(b"x" * 70_000 + b"\r\nNOOP\r\n") == [(500, "5.5.0"), (250, "2.0.0")]
    assert host.codes(b"MAIL FROM:<" + b"a" * 1500 + b"@example.org>\r\n") == [(500, "5.5.0")]


def test_non_ascii_verb_and_empty_line_are_bad_syntax() -> None:
    host = connect()
    assert host.codes(b"\xff\xfe\r\n\r\n") == [(500, "5.5.2"), (500, "5.5.2")]


def test_half_close_after_the_dot_and_quit_still_gets_every_reply() -> None:
    host = connect()
    data = (
        b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
        b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    codes = host.codes(data, eof=True)
    assert codes[-2:] == [(250, "2.0.0"), (221, "2.0.0")]
    assert len(host.delivered) == 1


def test_client_vanishing_mid_data_delivers_nothing() -> None:
    host = connect()
    host.run(TRANSACTION + b"DATA\r\n")
    assert host.codes(b"Subject: x\r\n\r\nunfinished\r\n", eof=True) == []
    assert host.delivered == []
    assert isinstance(host.events[-1], Close)
    assert not host.conn.busy


def test_timeout_and_shutdown_say_421() -> None:
    host = connect()
    host.conn.timed_out()
    assert [s.data for s in host.run()] == [b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"]
    assert isinstance(host.events[-1], Close)
    host = connect()
    host.conn.shut_down()
    assert host.codes() == [(421, "4.3.2")]


def test_starttls_drops_what_was_sent_ahead_and_forgets_the_session() -> None:
    host = connect(starttls=True)
    caps = host.run(b"EHLO c.example.org\r\n")[0].reply.text.split("\n")
    assert "STARTTLS" in caps
    # RSET pipelined behind STARTTLS must never run, as if it came under TLS
    sent = host.run(b"STARTTLS\r\nRSET\r\n")
    assert [s.data for s in sent] == [b"220 2.0.0 Ready to start TLS\r\n"]
    assert any(isinstance(e, StartTls) for e in host.events)
    assert isinstance(host.events[-2], TlsStarted)
    assert host.conn.session.tls and host.conn.session.helo is None
    caps = host.run(b"EHLO c.example.org\r\n")[0].reply.text.split("\n")
    assert "STARTTLS" not in caps
    assert host.codes(b"STARTTLS\r\n") == [(554, "5.5.1")]


def test_starttls_without_a_certificate_is_not_implemented() -> None:
    host = connect()
    assert host.codes(b"STARTTLS\r\n") == [(502, "5.5.1")]


def test_failed_handshake_closes() -> None:
    host = connect(starttls=True, tls_ok=False)
    host.run(b"EHLO c.example.org\r\nSTARTTLS\r\n")
    assert isinstance(host.events[-1], Close)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def test_auth_login_exchange_line_by_line() -> None:
    host = connect(make_policy(accounts=True), tls=True)
    host.run(b"EHLO c.example.org\r\n")
    assert [s.data for s in host.run(b"AUTH LOGIN\r\n")] == [b"334 VXNlcm5hbWU6\r\n"]
    assert [s.data for s in host.run(b64("alice") + b"\r\n")] == [b"334 UGFzc3dvcmQ6\r\n"]
    assert host.codes(b64("wonderland") + b"\r\n") == [(235, "2.7.0")]
    asked = [e for e in host.events if isinstance(e, CheckPassword)]
    assert [(c.user, c.password) for c in asked] == [("alice", "wonderland")]
    assert Authenticated("alice", True) in host.events
    assert host.conn.session.auth_user == "alice"
    assert host.codes(b"AUTH PLAIN\r\n") == [(503, "5.5.1")]  # already authenticated


def test_auth_plain_failure_names_the_account_and_never_the_password() -> None:
    host = connect(make_policy(accounts=True), tls=True, password_ok=False)
    token = base64.b64encode(b"\0alice\0guess")
    [reply] = host.run(b"AUTH PLAIN " + token + b"\r\n")
    assert reply.data == b"535 5.7.8 Error: authentication failed: (reason unavailable)\r\n"
    assert reply.record.verdict is not None and reply.record.verdict.rule == "accounts.alice"
    notes = [e for e in host.events if isinstance(e, CommandReceived | Decided)]
    assert "guess" not in repr(notes) and token.decode() not in repr(notes)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"AUTH PLAIN !!!"], [(535, "5.7.8")]),
        ([b"AUTH PLAIN", b"*"], [(334, None), (501, "5.7.0")]),
        ([b"AUTH PLAIN", b"not base64!"], [(334, None), (535, "5.7.8")]),
        ([b"AUTH PLAIN " + base64.b64encode(b"no-nuls")], [(535, "5.7.8")]),
        ([b"AUTH LOGIN", b"A" * 20_000], [(334, None), (500, "5.5.6")]),
        ([b"AUTH CRAM-MD5"], [(535, "5.7.8")]),
        ([b"AUTH"], [(501, "5.5.4")]),
    ],
)
def test_auth_exchanges_that_go_wrong(
    lines: list[bytes], expected: list[tuple[int, str | None]]
) -> None:
    host = connect(make_policy(accounts=True), tls=True)
    host.run(b"EHLO c.example.org\r\n")
    got: list[tuple[int, str | None]] = []
    for line in lines:
        got += host.codes(line + b"\r\n")
    assert got == expected
    assert host.codes(b"NOOP\r\n") == [(250, "2.0.0")]  # the session goes on


def test_auth_is_not_offered_before_tls_and_names_the_setting() -> None:
    host = connect(make_policy(accounts=True))
    caps = host.run(b"EHLO c.example.org\r\n")[0].reply.text
    assert "AUTH" not in caps
    [reply] = host.run(b"AUTH PLAIN\r\n")
    assert (reply.reply.code, reply.record.verdict and reply.record.verdict.rule) == (
        503,
        "general.smtp_auth.no_plaintext_without_tls",
    )


def test_auth_lockout_stops_guessing_before_a_password_check() -> None:
    policy = make_policy({"server": {"max_auth_failures_per_client": 2}}, accounts=True)
    host = connect(policy, tls=True, counts=lambda need: 2)
    token = base64.b64encode(b"\0alice\0guess")
    sent = host.run(b"AUTH PLAIN " + token + b"\r\n")
    assert [s.data for s in sent] == [
        b"421 4.7.0 mx.example.com Error: too many failed authentications\r\n"
    ]
    assert not any(isinstance(e, CheckPassword) for e in host.events)
    assert isinstance(host.events[-1], Close)


def test_connection_limits_ask_for_a_count_and_refuse_at_connect() -> None:
    policy = make_policy({"security": {"connection_policy": {"max_connections_per_client": 3}}})
    conn = Connection(policy, "192.0.2.10")
    host = Host(conn, counts=lambda need: (4, 4))
    assert host.codes() == [(421, "4.7.0")]
    asked = [e for e in host.events if isinstance(e, NeedCount)]
    assert asked == [NeedCount("connection", "192.0.2.10", 60)]
    assert conn.connection_counted  # the host must give the slot back
    assert isinstance(host.events[-1], Close)


def test_no_limit_no_count() -> None:
    host = connect()
    host.run(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
    assert not any(isinstance(e, NeedCount) for e in host.events)
    assert not host.conn.connection_counted


@pytest.mark.parametrize(
    ("command", "need_kind", "expected"),
    [
        (b"MAIL FROM:<a@example.org>\r\n", "message", (451, "4.3.0")),
        (b"RCPT TO:<alice@example.com>\r\n", "recipient", (451, "4.3.0")),
    ],
)
def test_a_failing_store_defers(command: bytes, need_kind: str, expected: tuple[int, str]) -> None:
    policy = make_policy(
        {
            "security": {
                "connection_policy": {
                    "max_connections_per_client": 0,
                    "max_message_rate_per_client": 5,
                    "max_recipient_rate_per_client": 5,
                }
            }
        }
    )
    conn = Connection(policy, "192.0.2.10")
    host = Host(conn)
    host.run()
    host.run(b"EHLO c.example.org\r\n")
    if need_kind == "recipient":
        host.run(b"MAIL FROM:<a@example.org>\r\n")
    conn.receive_data(command)
    while not isinstance(event := conn.next_event(), NeedCount):
        assert event is not NEED_DATA
    assert event.kind == need_kind
    conn.failed("redis down")
    assert host.codes() == [expected]


def test_a_failing_resolver_defers_and_never_accepts() -> None:
    policy = make_policy({"security": {"sender_policy": {"reject_unknown_sender_domain": True}}})
    conn = Connection(policy, "192.0.2.10")
    host = Host(conn)
    host.run()
    host.run(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n")
    conn.receive_data(b"RCPT TO:<alice@example.com>\r\n")
    while not isinstance(event := conn.next_event(), NeedDns):
        assert event is not NEED_DATA
    conn.failed("resolver crashed")
    [reply] = host.run()
    assert (reply.reply.code, reply.reply.enhanced) == (451, "4.3.0")
    assert reply.record.verdict is not None and reply.record.verdict.rule == "internal.error"


def test_dns_answers_decide_and_are_kept_for_the_session() -> None:
    policy = make_policy({"security": {"sender_policy": {"reject_unknown_sender_domain": True}}})
    host = connect(policy)
    host.run(b"EHLO c.example.org\r\nMAIL FROM:<a@gone.example>\r\n")
    [reply] = host.run(b"RCPT TO:<alice@example.com>\r\n")
    assert (
        reply.data == b"450 4.1.8 <a@gone.example>: Sender address rejected: Domain not found\r\n"
    )
    questions = set().union(*host.asked_dns)
    assert DnsQuery("gone.example", RType.MX) in questions
    assert all(q in host.conn.session.dns for q in questions)


def test_a_failed_delivery_is_a_temporary_error() -> None:
    host = connect()
    conn = host.conn
    conn.receive_data(
        b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
        b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    )
    while not isinstance(event := conn.next_event(), Deliver):
        if isinstance(event, NeedStamp):
            conn.stamped(Stamp(0.0, "Q9"))
        elif isinstance(event, NeedRecipientCheck):
            conn.recipient_checked(None)
    conn.failed("disk full")
    [reply] = host.run()
    assert reply.data == b"451 4.3.0 Error: queue file write error\r\n"
    assert host.codes(b"NOOP\r\n") == [(250, "2.0.0")]


def test_the_delivery_may_refuse_a_recipient_at_rcpt() -> None:
    host = connect()
    host.undeliverable["x@example.com"] = Reply(550, "5.1.1", "<x@example.com>: no mailbox")
    host.run(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n")
    [refused] = host.run(b"RCPT TO:<x@example.com>\r\n")
    assert refused.data == b"550 5.1.1 <x@example.com>: no mailbox\r\n"
    assert refused.record.verdict is not None and refused.record.verdict.rule == "delivery"
    assert host.codes(b"RCPT TO:<alice@example.com>\r\nDATA\r\n") == [(250, "2.1.5"), (354, None)]
    asked = [e.recipient for e in host.events if isinstance(e, NeedRecipientCheck)]
    assert asked == ["x@example.com", "alice@example.com"]


def test_answering_out_of_turn_is_an_error() -> None:
    conn = Connection(make_policy(), "192.0.2.10")
    with pytest.raises(DialogueError, match="pending need is None"):
        conn.dns_answers({})
    with pytest.raises(DialogueError, match="without a pending need"):
        conn.failed("x")
    policy = make_policy({"security": {"connection_policy": {"max_connections_per_client": 3}}})
    conn = Connection(policy, "192.0.2.10")
    assert isinstance(conn.next_event(), NeedCount)
    with pytest.raises(DialogueError, match="before asking for the next event"):
        conn.next_event()
    with pytest.raises(DialogueError, match="CheckPassword answered"):
        conn.password_checked(True)


def test_message_facts_count_our_received_header() -> None:
    # max_hops 3: two Received: in the message plus ours reach the limit
    host = connect(make_policy({"general": {"max_hops": 3}}))
    host.run(TRANSACTION + b"DATA\r\n")
    msg = b"Received: from a\r\nReceived: from b\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    [reply] = host.run(msg)
    assert (reply.reply.code, reply.reply.enhanced) == (554, "5.4.0")
    [seen] = [e for e in host.events if isinstance(e, MessageReceived)]
    assert seen.size == len(msg) - 3


# -- the message reader ------------------------------------------------------------


def unstuff(wire: bytes) -> bytes:
    """RFC 5321 4.5.2, line by line: the reference the bulk reader must match."""
    lines = wire.split(b"\r\n")
    out = []
    for line in lines[:-1]:
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(ln + b"\r\n" for ln in out)


@given(
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=20),
)
def test_data_reader_matches_line_by_line_unstuffing_for_any_chunking(
    lines: list[bytes], cuts: list[int]
) -> None:
    body = b"".join(
        (b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines if ln != b"."
    )
    wire = body + b".\r\nNEXT\r\n"
    reader = DataReader(limit=0)
    buf = bytearray()
    pos, i, done = 0, 0, False
    while not done:
        step = cuts[i % len(cuts)]
        i += 1
        buf += wire[pos : pos + step]
        pos += step
        done = reader.feed(buf)
        assert pos <= len(wire) + step
    assert reader.content() == unstuff(wire)
    assert reader.size == len(reader.content())
    rest = bytes(buf) + wire[pos:]
    assert rest == b"NEXT\r\n"


def test_data_reader_keeps_at_most_the_limit_but_counts_everything() -> None:
    reader = DataReader(limit=10)
    buf = bytearray(b"0123456789" * 5 + b"\r\n.\r\n")
    assert reader.feed(buf)
    assert reader.content() == b"0123456789"
    assert reader.size == 52


def test_the_example_host_runs() -> None:
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "dialogue_host.py"
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "S: 554 5.7.1 <someone@elsewhere.example>: Relay access denied" in lines
    assert "S: 250 2.0.0 Ok: queued as EXAMPLE1" in lines
    assert lines[-1].startswith("1 message stored")


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("a@Example.ORG", {DnsQuery("example.org", RType.MX)}),
        ("a%b.example@example.com", {DnsQuery("b.example", RType.MX)}),  # where it leads
        ("a@[192.0.2.1]", set()),  # an address literal is never looked up
        ("", set()),  # the null sender
        ("bob@example.com", set()),  # our own domain
    ],
)
def test_the_sender_domain_is_named_ahead_once_mail_is_accepted(
    sender: str, expected: set[DnsQuery]
) -> None:
    policy = make_policy({"security": {"sender_policy": {"reject_unknown_sender_domain": True}}})
    host = connect(policy)
    host.run(b"EHLO c.example.org\r\n")
    [reply] = host.run(b"MAIL FROM:<%s>\r\n" % sender.encode())
    assert reply.reply.code == 250
    notes = [e for e in host.events if isinstance(e, Prefetch)]
    assert [set(n.queries) for n in notes] == ([expected] if expected else [])
    if expected:  # named before the 250 leaves: the host asks while the client sends RCPT
        assert host.events.index(notes[0]) < host.events.index(reply)
    assert policy.questions_ahead(host.conn.session, sender) == frozenset(expected)
    # what was named ahead is what the RCPT check then asks first
    assert host.asked_dns == []
    host.run(b"RCPT TO:<alice@example.com>\r\n")
    assert (host.asked_dns[0] if host.asked_dns else set()) == expected


def test_nothing_is_named_ahead_without_the_check_or_for_a_refused_sender() -> None:
    plain = connect()
    plain.run(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n")
    assert not [e for e in plain.events if isinstance(e, Prefetch)]
    policy = make_policy({"security": {"sender_policy": {"reject_unknown_sender_domain": True}}})
    refused = connect(policy)
    codes = refused.codes(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org> SIZE=999999999\r\n")
    assert codes[-1] == (552, "5.3.4")
    assert not [e for e in refused.events if isinstance(e, Prefetch)]


def test_an_answer_given_ahead_is_not_named_again() -> None:
    policy = make_policy({"security": {"sender_policy": {"reject_unknown_sender_domain": True}}})
    host = connect(policy)
    mx = DnsQuery("example.org", RType.MX)
    session = host.conn.session.with_dns({mx: DnsResult.answer("10 mx.example.org")})
    assert policy.questions_ahead(session, "a@example.org") == frozenset()
    assert policy.questions_ahead(host.conn.session, "a@example.org") == {mx}
