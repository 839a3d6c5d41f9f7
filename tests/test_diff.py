"""Policy diff: every case under two policies, only the replies that change."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from mailpolicy.adapters.diff import Replies, diff_replies, replay_case
from mailpolicy.adapters.replay import CaseError, ReplayReply
from mailpolicy.cli import main

HERE = Path(__file__).parent
OLD = HERE / "data" / "diff_old.toml"
NEW = HERE / "data" / "diff_new.toml"
CONFORMANCE = HERE / "conformance"

SPAM = "security.lists.spammers"
UNKNOWN = "security.sender_policy.reject_unknown_sender_domain"

#: NEW black-lists spam.example and refuses unknown sender domains. Every
#: session whose sender is at spam.example (or below), or at a domain that
#: does not resolve, and whose recipient is ours, changes at RCPT; where that
#: was the only recipient, DATA then fails and the message is not sent.
#: Sessions that are refused as relaying first, and the null sender, do not.
EXPECTED = [
    # (case, reply index, code before, code after, rule after)
    ("black_sender_discard", 3, 250, 554, SPAM),  # a@spam.example
    ("black_sender_discard", 4, 250, 554, SPAM),
    ("black_sender_discard", 5, 354, 554, None),  # DATA: no valid recipients
    ("black_sender_discard", 6, 250, None, None),  # the message is not sent
    ("black_sender_reject", 3, 250, 554, SPAM),  # a@spam.example
    ("black_sender_reject", 6, 250, 554, SPAM),  # a@sub.spam.example
    ("black_text", 3, 250, 554, SPAM),
    ("postmaster_exempt", 4, 250, 450, UNKNOWN),  # a@gone.example (NXDOMAIN)
    ("reply_codes", 3, 250, 450, UNKNOWN),  # a@gone.example
    ("reply_codes", 6, 250, 554, SPAM),
    ("sender_non_fqdn", 3, 250, 450, UNKNOWN),  # a@localhost
    ("sender_unknown_domain", 12, 250, 450, UNKNOWN),  # nodata.example
    ("sender_unknown_domain", 15, 250, 450, UNKNOWN),  # gone.example
    ("sender_unknown_domain", 18, 250, 450, UNKNOWN),  # notlisted.example
    ("sender_unknown_domain", 21, 250, 450, UNKNOWN),  # broken.example (SERVFAIL)
    ("sender_unknown_domain", 27, 250, 550, UNKNOWN),  # nullmx.example: 5.7.27
    ("white_sender_bypasses_checks", 3, 250, 450, UNKNOWN),  # not the white-listed one
]


def test_diff_over_the_conformance_corpus(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["diff", "--json", "--timeout", "1", str(OLD), str(NEW), str(CONFORMANCE)]
    status = main(args)
    out, err = capsys.readouterr()
    lines = [json.loads(ln) for ln in out.splitlines()]
    summary = lines.pop()["summary"]
    got = [
        (
            c["case"],
            c["index"],
            c["before"] and c["before"]["code"],
            c["after"] and c["after"]["code"],
            c["after"] and c["after"].get("rule"),
        )
        for c in lines
    ]
    assert got == EXPECTED
    assert all(
        c["rules"] == ([r] if (r := e[4]) else []) for c, e in zip(lines, EXPECTED, strict=True)
    )
    n_cases = len(list(CONFORMANCE.glob("*.json")))
    assert summary == {
        "cases": n_cases,
        "changed_cases": 8,
        "changed_replies": 17,
        "errors": 1,
    }
    # A case written for reject_unauth_pipelining stalls under policies without
    # it (DATA is accepted and the rest is read as the message): said, not hung.
    assert "unauth_pipelining.json: the session stalls under the old and new policies" in err
    assert status == 1


def test_diff_prints_before_after_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [CONFORMANCE / "black_text.json", CONFORMANCE / "vrfy.json"]
    assert main(["diff", str(OLD), str(NEW), *map(str, cases)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "black_text  #3 RCPT TO:<r@example.com>",
        "    before: 250 2.1.5 Ok",
        f"    after:  554 5.7.1 <a@spam.example>: Sender address rejected: Access denied  [{SPAM}]",
        "1 reply changed in 1 of 2 cases",
    ]
    # the same policy twice: nothing changes (queue ids are not changes)
    assert main(["diff", str(OLD), str(OLD), str(CONFORMANCE / "black_sender_discard.json")]) == 0
    assert capsys.readouterr().out == "0 replies changed in 0 of 1 cases\n"


def test_diff_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[general]\nmax_hops = -1\n")
    assert main(["diff", str(bad), str(NEW), str(CONFORMANCE)]) == 2
    assert "general.max_hops" in capsys.readouterr().err
    assert main(["diff", str(OLD), str(NEW)]) == 2  # neither cases nor --mbox
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert main(["diff", str(OLD), str(NEW), str(broken)]) == 1
    captured = capsys.readouterr()
    assert "bad JSON" in captured.err
    assert "0 replies changed in 0 of 0 cases; 1 could not be replayed" in captured.out


def test_diff_mbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(HERE))
    import mbox_gen

    box = tmp_path / "in.mbox"
    messages = mbox_gen.generate(60)
    mbox_gen.write_mbox(box, messages)
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps(mbox_gen.ZONE))
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text(mbox_gen.POLICY)
    new.write_text(
        mbox_gen.POLICY + '\n[[security.lists]]\nname = "no-news"\nsender = ["news.example.org"]\n'
    )
    args = ["diff", str(old), str(new), "--mbox", str(box), "--dns", str(zone)]
    assert main([*args, "--receiver", "mx.example.com", "--json"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    summary = lines.pop()["summary"]
    news = [g for g in messages if g.readable and g.sender.endswith("@news.example.org")]
    assert summary == {
        "messages": len(messages),
        "changed_messages": len(news),
        "unreadable": sum(not g.readable for g in messages),
    }
    assert {(ln["before"]["action"], ln["after"]["action"]) for ln in lines} == {
        ("accept", "reject")
    }


def test_no_progress_bar_when_piped_one_on_a_terminal() -> None:
    cmd = [
        sys.executable,
        "-m",
        "mailpolicy",
        "diff",
        str(OLD),
        str(NEW),
        str(CONFORMANCE / "black_text.json"),
        str(CONFORMANCE / "vrfy.json"),
    ]
    piped = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    assert "\x1b" not in piped.stdout + piped.stderr  # plain text, no bar
    # On a terminal, rich draws the bar (and erases it when done).
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen(cmd, stdout=child_fd, stderr=child_fd, env=env)
    os.close(child_fd)
    raw = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=60) == 0
    os.close(main_fd)
    text = raw.decode("utf-8", "replace")
    assert "replaying" in text and "\x1b[" in text
    assert "1 reply changed in 1 of 2 cases" in text


# ---------------------------------------------------------------------------
# diff_replies and replay_case


def r(cmd: str, code: int, rule: str | None = None, text: str = "Ok") -> ReplayReply:
    return ReplayReply(cmd, code, None, text, rule)


def test_diff_replies_aligns_on_commands() -> None:
    before = [r("RCPT", 250), r("DATA", 354), r("<message 10 bytes>", 250), r("QUIT", 221)]
    after = [r("RCPT", 554, "x"), r("DATA", 554), r("QUIT", 221)]
    changes = diff_replies("c", before, after)
    assert [(c.cmd, c.before and c.before.code, c.after and c.after.code) for c in changes] == [
        ("RCPT", 250, 554),
        ("DATA", 354, 554),
        ("<message 10 bytes>", 250, None),
    ]
    assert changes[0].rules == ["x"]
    # a queue id is not a change; a rule is
    assert (
        diff_replies(
            "c",
            [r("<message 1 bytes>", 250, text="Ok: queued as ABC1")],
            [r("<message 2 bytes>", 250, text="Ok: queued as DEF2")],
        )
        == []
    )
    assert len(diff_replies("c", [r("RCPT", 250, "w")], [r("RCPT", 250)])) == 1


def test_replay_case_under_its_own_policy_or_another() -> None:
    replies = replay_case(CONFORMANCE / "black_sender_reject.json")
    assert isinstance(replies, Replies)
    assert replies.refused_by("security.lists.spammers")
    assert replies.rules == ["security.lists.spammers"]
    assert not replies.refused_by("relay.reject_unauth_destination")
    assert replay_case(CONFORMANCE / "black_text.json", policy=NEW).refused_by(SPAM)
    assert not replay_case(CONFORMANCE / "black_text.json", policy=OLD).refused
    reply = replay_case(CONFORMANCE / "black_text.json", policy=NEW).to("RCPT TO:<r@example.com>")
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    data = json.loads((CONFORMANCE / "vrfy.json").read_text())
    assert replay_case(data).codes[0] == 220
    with pytest.raises(CaseError):
        replay_case(HERE / "data" / "no-such-case.json")
    replies = replay_case(CONFORMANCE / "black_text.json", policy=NEW)
    assert repr(replies) == (
        f"<Replies: 5 replies, refused: RCPT TO:<r@example.com> -> 554 5.7.1 [{SPAM}]>"
    )
    assert str(replies).splitlines()[3] == (
        "RCPT TO:<r@example.com> -> 554 5.7.1 <a@spam.example>: Sender address rejected: "
        f"Access denied  [{SPAM}]"
    )
