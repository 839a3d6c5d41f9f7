"""mbox replay: sessions rebuilt from trace fields, judged by the pure core."""

from __future__ import annotations

import ipaddress
import json
import mailbox
import tomllib
from pathlib import Path

import mbox_gen
import pytest

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.mbox import (
    diff_verdicts,
    judge_mbox,
    open_mbox,
    parse_received,
)
from mailpolicy.cli import main
from mailpolicy.config import settings_from_mapping
from mailpolicy.policy import compile_policy

POLICY = compile_policy(settings_from_mapping(tomllib.loads(mbox_gen.POLICY)))
ZONE = StaticZone.from_mapping(mbox_gen.ZONE)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[mbox_gen.Generated]]:
    messages = mbox_gen.generate(60, seed=7)
    path = tmp_path_factory.mktemp("mbox") / "inbox.mbox"
    mbox_gen.write_mbox(path, messages)
    return path, messages


def test_the_generator_makes_a_varied_mailbox(
    generated: tuple[Path, list[mbox_gen.Generated]],
) -> None:
    _, messages = generated
    assert len(messages) >= 50
    kinds = {g.kind.removesuffix("-v6") for g in messages}
    assert {"postfix", "exim", "sendmail", "exchange", "qmail"} <= kinds
    assert any(g.kind.endswith("-v6") for g in messages)
    assert sum(not g.readable for g in messages) >= 5
    assert {g.rule for g in messages if g.verdict == "reject"} == {
        "security.lists.spammers",
        "security.lists.bad-nets",
        "security.lists.dynamic-hosts",
    }
    assert mbox_gen.generate(60, seed=7)[10].raw == messages[10].raw  # repeatable


def test_every_message_gets_its_verdict_or_its_reason(
    generated: tuple[Path, list[mbox_gen.Generated]],
) -> None:
    path, expected = generated
    verdicts = list(judge_mbox(open_mbox(path), POLICY, zone=ZONE, receiver="mx.example.com"))
    assert len(verdicts) == len(expected)
    for v, g in zip(verdicts, expected, strict=True):
        where = f"message {v.index} ({g.kind})"
        if not g.readable:
            assert v.verdict == "unreadable", where
            assert v.reason is not None and g.reason in v.reason, (where, v.reason)
            continue
        assert v.reason is None, (where, v.reason)
        t = v.trace
        assert t is not None
        assert t.client_ip == ipaddress.ip_address(g.client_ip), where
        assert t.helo == g.helo, where
        assert t.sender == g.sender, where
        assert list(t.recipients) == g.recipients, where
        assert v.verdict == g.verdict, (where, v.to_json())
        if g.rule is not None:
            assert g.rule in [r.verdict.rule for r in v.recipients], where
        else:
            assert all(r.verdict.rule is None for r in v.recipients), (where, v.to_json())
        assert v.to_json()["derived"]["client_ip"]["from"].startswith("Received[")


def test_without_a_zone_dns_questions_are_reported_not_guessed(
    generated: tuple[Path, list[mbox_gen.Generated]],
) -> None:
    path, expected = generated
    verdicts = list(judge_mbox(open_mbox(path), POLICY, receiver="mx.example.com"))
    spam_by_name = next(
        v for v, g in zip(verdicts, expected, strict=True) if g.kind == "spam-hostname"
    )
    # the confirmed reverse name comes from the Received: header itself
    assert spam_by_name.recipients[0].verdict.rule == "security.lists.dynamic-hosts"
    assert "192.0.2.150/PTR" in spam_by_name.to_json()["dns_from_trace"]
    unknown = [
        v
        for v, g in zip(verdicts, expected, strict=True)
        if g.readable and g.verdict == "accept" and not v.trace.dns  # type: ignore[union-attr]
    ]
    assert unknown
    for v in unknown:
        (r,) = [r for r in v.recipients]
        assert (r.verdict.action.value, r.verdict.reply and r.verdict.reply.code) == ("defer", 451)
        assert r.missing_dns, v.to_json()


def test_replay_mbox_command(
    generated: tuple[Path, list[mbox_gen.Generated]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, expected = generated
    policy = tmp_path / "policy.toml"
    policy.write_text(mbox_gen.POLICY)
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps(mbox_gen.ZONE))
    args = ["replay", "--mbox", str(path), "--policy", str(policy), "--dns", str(zone)]
    assert main([*args, "--receiver", "mx.example.com"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert [ln["verdict"] for ln in lines] == [
        "unreadable" if not g.readable else g.verdict for g in expected
    ]
    unreadable = sum(not g.readable for g in expected)
    head, *table = err.strip().splitlines()
    assert head == (
        f"mailpolicy: {len(expected)} messages: {len(expected) - unreadable} judged, "
        f"{unreadable} without a usable trace"
    )
    # the summary: recipients per action and deciding rule, then unread messages per reason
    rows = {tuple(r.split()[1:]): int(r.split()[0]) for r in table[1:]}
    rejected = [g.rule for g in expected if g.readable and g.verdict == "reject"]
    for rule in set(rejected):
        assert rows[("reject", rule)] == rejected.count(rule), rows
    assert sum(n for (action, *_), n in rows.items() if action == "unread") == unreadable
    # without --receiver, the topmost Received: header's host is ours: the same here,
    # except for the copy another server received
    assert main(args) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    other = next(i for i, g in enumerate(expected) if g.kind == "other-receiver")
    assert lines[other]["verdict"] != "unreadable"


def test_replay_mbox_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(mbox_gen.POLICY)
    assert main(["replay", "--mbox", str(tmp_path / "none.mbox"), "--policy", str(policy)]) == 2
    assert "no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.mbox"
    empty.write_text("")
    assert main(["replay", "--mbox", str(empty)]) == 2  # no --policy
    bad_zone = tmp_path / "zone.json"
    bad_zone.write_text('{"x.example": {"MX": "nope"}}')
    args = ["replay", "--mbox", str(empty), "--policy", str(policy), "--dns", str(bad_zone)]
    assert main(args) == 2
    assert "zone.json" in capsys.readouterr().err
    # empty, not gzip, unreadable: a message and a non-zero exit
    not_gz = tmp_path / "box.mbox.gz"
    not_gz.write_text("From a@b.example Mon Jan  1 00:00:00 2024\n")
    unreadable = tmp_path / "locked.mbox"
    unreadable.mkdir()  # a folder with neither cur/ nor messages
    for path, words in [
        (empty, "no messages"),
        (not_gz, "cannot read"),
        (unreadable, "no messages"),
    ]:
        assert main(["replay", "--mbox", str(path), "--policy", str(policy)]) == 2
        assert words in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Received: formats


@pytest.mark.parametrize(
    ("header", "ip", "helo", "reverse", "verified", "tls", "auth"),
    [
        (
            "from mail.example.org (mail.example.org [203.0.113.5])\n\tby mx.example.com "
            "(Postfix) with ESMTPS id 4ABC\n\tfor <bob@example.com>; "
            "Mon, 1 Jan 2024 00:00:00 +0000",
            "203.0.113.5",
            "mail.example.org",
            "mail.example.org",
            True,
            True,
            False,
        ),
        (
            "from helo.example (unknown [IPv6:2001:db8::1])\n\t(Authenticated sender: alice)"
            "\n\tby mx.example.com (Postfix) with ESMTPSA id 4X; Mon, 1 Jan 2024 00:00:00 +0000",
            "2001:db8::1",
            "helo.example",
            None,
            None,
            True,
            True,
        ),
        (
            "from host.example.net ([198.51.100.7]:51234 helo=other.example)\n\tby "
            "mx.example.com with esmtp (Exim 4.96)\n\t(envelope-from <a@b.example>)\n\tid 1x; "
            "Mon, 1 Jan 2024 00:00:00 +0000",
            "198.51.100.7",
            "other.example",
            "host.example.net",
            True,
            False,
            False,
        ),
        (
            "from [198.51.100.8] (port=1 helo=x.example) by mx.example.com with esmtpsa "
            "(TLS1.3) (Exim 4.96) id 1y; Mon, 1 Jan 2024 00:00:00 +0000",
            "198.51.100.8",
            "x.example",
            None,
            None,
            True,
            True,
        ),
        (
            "from helo.example (rdns.example [192.0.2.3] (may be forged)) by mx.example.com "
            "(8.17.1/8.17.1) with ESMTP id 42; Mon, 1 Jan 2024 00:00:00 +0000",
            "192.0.2.3",
            "helo.example",
            "rdns.example",
            False,
            False,
            False,
        ),
        (
            "from EXCH01.corp.example (10.1.2.3) by mx.example.com (10.1.2.4) with Microsoft "
            "SMTP Server (version=TLS1_2, cipher=TLS_ECDHE) id 15.2.1; Mon, 1 Jan 2024 00:00:00 "
            "+0000",
            "10.1.2.3",
            "EXCH01.corp.example",
            "exch01.corp.example",  # shown, not said to be verified
            None,
            True,
            False,
        ),
        (
            "from unknown (HELO box.example) (2001:db8::9) by mx.example.com with SMTP; "
            "1 Jan 2024 00:00:00 -0000",
            "2001:db8::9",
            "box.example",
            None,
            None,
            False,
            False,
        ),
        (
            "from mail-sor-f41.google.com (mail-sor-f41.google.com. [209.85.220.41]) by "
            "mx.example.com with SMTPS id x; Mon, 1 Jan 2024 00:00:00 -0800 (PST)",
            "209.85.220.41",
            "mail-sor-f41.google.com",
            "mail-sor-f41.google.com",
            True,
            True,
            False,
        ),
    ],
)
def test_received_formats(
    header: str,
    ip: str,
    helo: str,
    reverse: str | None,
    verified: bool | None,
    tls: bool,
    auth: bool,
) -> None:
    r = parse_received(header)
    assert r.by == "mx.example.com"
    assert r.ip == ipaddress.ip_address(ip)
    assert (r.helo, r.reverse, r.reverse_verified) == (helo, reverse, verified)
    assert (r.tls, r.authenticated) == (tls, auth)


def test_a_header_forged_below_ours_is_not_read() -> None:
    msg = mailbox.mboxMessage(
        "Return-Path: <a@b.example>\n"
        "X-Original-To: bob@example.com\n"
        "Received: from real.example (real.example [203.0.113.1]) by mx.example.com "
        "(Postfix) with ESMTP id 1; Mon, 1 Jan 2024 00:00:00 +0000\n"
        "Received: from trusted (trusted [10.0.0.1]) by mx.example.com (Postfix) with ESMTP "
        "id 0; Mon, 1 Jan 2024 00:00:00 +0000\n"
        "To: <bob@example.com>\n\nhi\n"
    )
    (v,) = judge_mbox([msg], POLICY, zone=ZONE, receiver="mx.example.com")
    assert v.trace is not None and str(v.trace.client_ip) == "203.0.113.1"


def test_diff_verdicts_lists_the_recipients_judged_differently(
    generated: tuple[Path, list[mbox_gen.Generated]],
) -> None:
    path, expected = generated
    data = tomllib.loads(mbox_gen.POLICY)
    data["security"]["lists"].append({"name": "no-news", "sender": ["news.example.org"]})
    stricter = compile_policy(settings_from_mapping(data))
    before = judge_mbox(open_mbox(path), POLICY, zone=ZONE, receiver="mx.example.com")
    after = judge_mbox(open_mbox(path), stricter, zone=ZONE, receiver="mx.example.com")
    changed = [
        d
        for b, a in zip(before, after, strict=True)
        if b.reason is None
        for d in diff_verdicts(b, a)
    ]
    # every recipient of news.example.org that was accepted is now refused; one
    # refused as relaying stays refused as relaying (relay control comes first)
    want = [
        (g.sender, g.recipients[0])
        for g in expected
        if g.readable and g.sender.endswith("@news.example.org")
    ]
    assert want
    assert [(d["before"]["action"], d["after"]["action"]) for d in changed] == [
        ("accept", "reject")
    ] * len(want)
    assert [d["recipient"] for d in changed] == [r for _, r in want]
    assert {tuple(d["rules"]) for d in changed} == {("security.lists.no-news",)}
