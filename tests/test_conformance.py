"""Replay the Postfix-recorded corpus and compare, as REPLAY.md says.

Every case in ``tests/conformance`` (and ``tests/conformance_extra`` when it is
there) is played through the real SMTP server code with its own DNS zone;
reply by reply, the code, the enhanced code where Postfix sent one, and the
text (queue ids masked; not the greeting, and of the EHLO keywords only
whether AUTH is offered) must match ``NAME.expected.jsonl``
(``NAME.VARIANT.expected.jsonl`` for a variant).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailpolicy.adapters.replay import Case, ReplayReply, compare, load_cases, run_case_sync

HERE = Path(__file__).parent
CORPORA = [d for d in (HERE / "conformance", HERE / "conformance_extra") if d.is_dir()]

_CASES, _ERRORS = load_cases(CORPORA)
CASES: dict[str, Case] = {f"{Path(c.source).parent.name}/{c.name}": c for c in _CASES}


def expected_path(case: Case) -> Path:
    source = Path(case.source)
    variant = case.name.partition("[")[2].rstrip("]")
    stem = f"{source.stem}.{variant}" if variant else source.stem
    return source.with_name(f"{stem}.expected.jsonl")


def expected(case: Case) -> list[dict[str, Any]]:
    text = expected_path(case).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@functools.cache
def replayed(case_id: str) -> tuple[ReplayReply, ...]:
    """Each case is played once, whichever test asks first."""
    return tuple(run_case_sync(CASES[case_id]))


def test_the_corpus_loads() -> None:
    assert not _ERRORS, [str(e) for e in _ERRORS]
    assert len([c for c in CASES if c.startswith("conformance/")]) >= 37
    missing = [cid for cid, case in CASES.items() if not expected_path(case).exists()]
    assert not missing, f"cases without a recording: {missing}"


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_replay_matches_postfix(case_id: str) -> None:
    got = replayed(case_id)
    diffs = compare(expected(CASES[case_id]), got)
    assert not diffs, f"{case_id} differs from Postfix:\n" + "\n".join(diffs)


def _row(cmd: str, code: int, enhanced: str | None, text: str) -> dict[str, Any]:
    return {"cmd": cmd, "code": code, "enhanced": enhanced, "text": text}


EXPECTED = [
    _row("<connect>", 220, None, "mx.example.com ESMTP Postfix (Debian/GNU)"),
    _row("EHLO c.example", 250, None, "mx.example.com\nPIPELINING\nAUTH PLAIN LOGIN\nDSN"),
    _row(
        "RCPT TO:<R@Elsewhere.Example>", 554, "5.7.1", "<R@Elsewhere.Example>: Relay access denied"
    ),
    _row("<message 126 bytes>", 250, "2.0.0", "Ok: queued as C5EFF20D09D"),
]


def _replies(rows: list[dict[str, Any]]) -> list[ReplayReply]:
    return [ReplayReply(r["cmd"], r["code"], r["enhanced"], r["text"]) for r in rows]


def test_compare_accepts_the_same_replies() -> None:
    got = _replies(EXPECTED)
    got[0] = attrs.evolve(got[0], text="mx.example.com ESMTP")  # the banner is ours
    got[1] = attrs.evolve(got[1], text="mx.example.com\nSIZE 10485760\nAUTH PLAIN LOGIN")
    got[3] = attrs.evolve(got[3], text="Ok: queued as 4F2A1")  # queue ids differ every run
    assert compare(EXPECTED, got) == []


def test_compare_reports_a_different_text() -> None:
    got = _replies(EXPECTED)
    got[2] = attrs.evolve(got[2], text="<r@elsewhere.example>: Relay access denied")
    assert compare(EXPECTED, got) == [
        "#2 RCPT TO:<R@Elsewhere.Example>: text '<r@elsewhere.example>: Relay access denied', "
        "expected '<R@Elsewhere.Example>: Relay access denied'"
    ]
    got = _replies(EXPECTED)
    got[3] = attrs.evolve(got[3], text="Ok: queued as 4F2A1 (discarded)")
    assert len(compare(EXPECTED, got)) == 1


def test_compare_reports_codes_enhanced_codes_auth_and_length() -> None:
    got = _replies(EXPECTED)
    got[1] = attrs.evolve(got[1], text="mx.example.com\nPIPELINING")
    got[2] = attrs.evolve(got[2], enhanced="5.7.0")
    got[3] = attrs.evolve(got[3], code=451)
    assert [d.split(":")[0] for d in compare(EXPECTED, got)] == [
        "#1 EHLO c.example",
        "#2 RCPT TO",
        "#3 <message 126 bytes>",
    ]
    assert compare(EXPECTED, _replies(EXPECTED)[:3]) == [
        "#3: expected '<message 126 bytes>', got None"
    ]


def is_policy_refusal(reply: ReplayReply) -> bool:
    """A refusal that a policy rule makes, as opposed to smtpd's own protocol
    replies (syntax errors, commands out of sequence, AUTH, unknown commands),
    which REPLAY.md says carry no rule."""
    if reply.code is None or reply.code < 400:
        return False
    cmd = reply.cmd.upper()
    if cmd == "<CONNECT>" or cmd.startswith("<MESSAGE"):
        return True
    if reply.enhanced in ("5.5.4", "5.1.7", "5.1.3"):  # command or address syntax
        return False
    if "(reason unavailable)" in reply.text:
        return True  # a failed login (an account), also after a bare continuation line
    if cmd.startswith(("AUTH", "<LOGIN")):
        # AUTH not offered (a setting), the lock-out; "already
        # authenticated" or a bad mechanism are protocol
        return "not enabled" in reply.text or reply.code == 421
    if cmd.startswith("RCPT"):
        return reply.code != 503  # "need MAIL command"
    if cmd.startswith("MAIL"):
        # 503 is "nested MAIL" unless it is require_helo's "send HELO/EHLO first"
        return reply.code != 503 or "HELO" in reply.text
    if cmd == "DATA":
        return reply.enhanced == "5.5.0"  # reject_unauth_pipelining
    return cmd.startswith("VRFY")


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_every_policy_refusal_names_its_rule(case_id: str) -> None:
    got = replayed(case_id)
    for reply in got:
        if is_policy_refusal(reply):
            assert reply.rule, f"{case_id}: {reply.cmd!r} -> {reply.code} without a rule"
            assert reply.rule.split(".")[0] in (
                "general",
                "relay",
                "security",
                "rfc5321",
                "accounts",
                "server",
            )
        elif reply.code is not None and reply.code >= 400:
            assert reply.rule is None, f"{case_id}: protocol reply {reply} names a rule"


def test_the_corpus_has_policy_refusals() -> None:
    """The rule check above is not vacuous: the corpus refuses for many rules."""
    rules = {r.rule for cid in CASES for r in replayed(cid) if is_policy_refusal(r)}
    assert {
        "relay.reject_unauth_destination",
        "security.lists.spammers",
        "security.advanced.disable_vrfy",
        "general.max_hops",
        "general.max_message_size_mb",
        "general.max_recipients",
        "security.sender_policy.reject_unknown_sender_domain",
        "security.connection_policy.reject_unknown_client_hostname",
    } <= rules
