"""mbox replay on real messages written by many MTAs (tests/data/README.md).

The Received: parser is checked against SpamAssassin's reading of the same
real lines, recorded in tests/data/received_spamassassin.jsonl by
benchmarks/received_vs_spamassassin.py (SpamAssassin is not needed here).
"""

from __future__ import annotations

import email
import gzip
import ipaddress
import json
import mailbox
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailpolicy.adapters.mbox import (
    Receiver,
    TraceError,
    judge_mbox,
    parse_received,
    read_messages,
    read_trace,
)
from mailpolicy.cli import main
from mailpolicy.config import settings_from_mapping
from mailpolicy.model import DnsOutcome, DnsQuery, RType
from mailpolicy.policy import compile_policy

DATA = Path(__file__).parent / "data"
MAIL = DATA / "mail"
FILES = sorted(MAIL.glob("*.eml"))
RECORD = [json.loads(x) for x in (DATA / "received_spamassassin.jsonl").read_text().splitlines()]
EXPECTED = {
    row["file"]: row
    for row in map(json.loads, (DATA / "mail_expected.jsonl").read_text().splitlines())
}


def load(name: str) -> email.message.Message:
    return email.message_from_bytes((MAIL / name).read_bytes())


def policy_for(**general: Any) -> Any:
    text = "[general]\nhostname = 'mx.example.com'\n"
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in general.items())
    return compile_policy(settings_from_mapping(tomllib.loads(text)))


# ---------------------------------------------------------------------------
# The parser against SpamAssassin's, on real lines


def _bang(text: str | None) -> str:
    # SpamAssassin writes [ ] ( ) < > | # and spaces as "!"
    out = (text or "").lower().rstrip(".")
    for ch in "[]()<>|# ":
        out = out.replace(ch, "!")
    return out


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def test_the_real_lines_are_many_and_varied() -> None:
    assert len(RECORD) >= 100
    parsed = [r for r in RECORD if r["spamassassin"]["status"] == "parsed"]
    assert len(parsed) >= 100
    by_words = " ".join(r["line"] for r in RECORD)
    for mta in ("Postfix", "Exim", "qmail", "Microsoft SMTP", "8.11.6", "fetchmail", "amavisd"):
        assert mta in by_words, mta


def test_the_parser_agrees_with_spamassassin_wherever_both_read_an_address() -> None:
    both = ours_only = theirs_only = 0
    for row in RECORD:
        sa, line = row["spamassassin"], row["line"]
        r = parse_received(line)
        theirs = sa["status"] == "parsed" and bool(sa.get("ip"))
        if r.ip is None:
            theirs_only += theirs
            continue
        if not theirs:
            ours_only += 1
            continue
        both += 1
        assert str(r.ip) == sa["ip"], line
        assert _bang(r.helo) == _bang(sa.get("helo")), line
        rdns = "" if _is_address(sa.get("rdns") or "") else sa.get("rdns")
        assert _bang(r.reverse) == _bang(rdns), line
    assert both >= 200
    assert theirs_only == 0  # we read every line SpamAssassin reads
    assert ours_only > 0


@pytest.mark.parametrize(
    ("line", "ip", "helo", "reverse", "auth"),
    [
        # real lines quoted in SpamAssassin's Received parser (tests/data/README.md)
        (
            "from bushinternet.com (softdnserr [::ffff:61.99.99.67]) by mail.cs.helsinki.fi "
            "with esmtp; Fri, 22 Aug 2003 12:25:41 +0300",
            "61.99.99.67",
            "bushinternet.com",
            "softdnserr",
            False,
        ),
        (
            "from gandalf ([4.37.75.131]) (authenticated bits=0) by herald.cc.purdue.edu "
            "(8.12.5/8.12.5/herald) with ESMTP id g9JLefrm028228 for "
            "<spamassassin-talk@lists.sourceforge.net>; Sat, 19 Oct 2002 16:40:41 -0500 (EST)",
            "4.37.75.131",
            "gandalf",
            None,
            True,
        ),
        (
            "from [212.87.144.30] (account seiz [212.87.144.30] verified) by x.imd.net "
            "(CommuniGate Pro SMTP 4.0.3) with ESMTP-TLS id 5026665 for "
            "spamassassin-talk@lists.sourceforge.net; Wed, 15 Jan 2003 16:27:05 +0100",
            "212.87.144.30",
            "[212.87.144.30]",
            None,
            True,
        ),
        (
            "from ran-out.mx.develooper.com (IDENT:qmailr@one.develooper.com [64.81.84.115]) "
            "by dogma.slashnull.org (8.11.6/8.11.6) with SMTP id h381Vvf19860 for "
            "<jm-cpan@jmason.org>; Tue, 8 Apr 2003 02:31:57 +0100",
            "64.81.84.115",
            "ran-out.mx.develooper.com",
            "one.develooper.com",
            False,
        ),
        (
            "from postfix3-2.free.fr (HELO machine.domain.com) (foobar@213.228.0.169) by "
            "totor.bouissou.net with SMTP; 14 Nov 2003 08:05:50 -0000",
            "213.228.0.169",
            "machine.domain.com",
            "postfix3-2.free.fr",
            False,
        ),
        # from the corpus
        (
            "from murphy.debian.org [65.125.64.134] by master.debian.org with esmtp "
            "(Exim 3.12 1 (Debian)) id 18i3AB-0003La-00; Sun, 09 Feb 2003 19:55:15 -0600",
            "65.125.64.134",
            "murphy.debian.org",
            "murphy.debian.org",
            False,
        ),
        (
            "from mail-fx0-f215.google.com ([209.85.220.215]:39047) by mail.rg.com with esmtp "
            "id 1Mp3wA-0007kA-Ic for <abuser@r.ru>; Sat, 19 Sep 2009 21:41:30 +0400",
            "209.85.220.215",
            "mail-fx0-f215.google.com",
            None,  # "NAME ([IP])" without "Exim" in it: no name recorded
            False,
        ),
        (
            "from unknown (HELO localhost) (youdd5o2o449465@219.133.84.88 with login) by "
            "smtp011.mail.yahoo.com with SMTP; Wed, 14 Nov 2001 03:13:54 -0000",
            "219.133.84.88",
            "localhost",
            None,
            True,
        ),
        (
            "from 172.30.44.41 (172.30.44.57) by survey1usmta.mysurvey.com (PowerMTA(TM) "
            "v3.5r15) id h13ska0ko6cn for <jjffddjkl161@aol.com>; Wed, 15 Dec 2010 12:21:20 "
            "-0500 (envelope-from <carol-jjffddjkl161=aol.com@mysurvey.com>)",
            "172.30.44.57",
            "172.30.44.41",
            None,
            False,
        ),
    ],
)
def test_formats(line: str, ip: str, helo: str | None, reverse: str | None, auth: bool) -> None:
    r = parse_received(line)
    assert str(r.ip) == ip
    assert (r.helo, r.reverse, r.authenticated) == (helo, reverse, auth)


def test_an_ipv4_mapped_address_is_the_ipv4_client() -> None:
    r = parse_received("from x (x [IPv6:::ffff:192.0.2.7]) by mx.example.com; Mon, 1 Jan 2024")
    assert r.ip == ipaddress.ip_address("192.0.2.7")


def test_communigate_and_courier_annotations_are_not_names() -> None:
    r = parse_received(
        "from [212.87.144.30] (account seiz [212.87.144.30] verified) by x.imd.net "
        "(CommuniGate Pro SMTP 4.0.3) with ESMTP id 1; Wed, 15 Jan 2003 16:27:05 +0100"
    )
    assert (r.reverse, r.auth_user) == (None, "seiz")
    r = parse_received(
        "from host.example ([192.0.2.8]) (AUTH: LOGIN alice, TLS: TLSv1/SSLv3,256bits) by "
        "mx.example.com (Courier) with ESMTPA; Mon, 1 Jan 2024 00:00:00 +0000"
    )
    assert (r.reverse, r.auth_user, r.tls) == (None, "alice", True)


# ---------------------------------------------------------------------------
# Whole real messages: the hop, its envelope


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_each_real_message_reads_as_recorded(path: Path) -> None:
    want = EXPECTED[path.name]
    try:
        t = read_trace(load(path.name))
    except TraceError as e:
        assert want.get("reason") == e.reason, path.name
        return
    assert "reason" not in want, want
    got = {
        "file": path.name,
        "hop": t.facts["client_ip"].source,
        "client_ip": str(t.client_ip),
        "helo": t.helo,
        "sender": t.sender,
        "recipients": list(t.recipients),
        "recipients_from": t.facts["recipients"].source,
    }
    assert got == want


def test_most_real_messages_are_judged() -> None:
    readable = [r for r in EXPECTED.values() if "reason" not in r]
    assert len(readable) >= 75
    # the envelope recipient never comes from To:/Cc:
    assert all(r["recipients_from"].split()[0] != "To/Cc" for r in readable)
    assert {r["recipients_from"].split()[0] for r in readable} >= {
        "X-Original-To",
        "Delivered-To",
        "Received[1]",
    }


def test_recipients_come_from_the_chosen_hop_not_the_mailbox_it_was_fetched_into() -> None:
    # fetchmail (IMAP) brought it to a laptop, whose Postfix wrote Delivered-To:
    # zzz@localhost.jmason.org on top; the SMTP session is dogma.slashnull.org's
    msg = load("spamassassin--nice--cjk--gb2312.2.eml")
    assert msg["Delivered-To"] == "zzz@localhost.jmason.org"
    t = read_trace(msg)
    assert t.received.by == "dogma.slashnull.org"
    assert str(t.client_ip) == "65.125.64.134"
    assert t.recipients == ("zzz@jmason.org",)
    # the envelope sender passes a fetch unchanged
    assert t.sender == "bounce-debian-chinese-gb=zzz=jmason.org@lists.debian.org"


def test_a_delivered_to_below_the_chosen_hop_is_an_earlier_servers() -> None:
    # a mailing list's copy: the list server (softwareliberty.org) wrote
    # Delivered-To: slat-talk@... below our hop; our hop's client gave
    # "for <franklin@hyweb.com.tw>"
    msg = load("spamassassin--nice--cjk--big5-base64.1.eml")
    assert msg["Delivered-To"] == "slat-talk@softwareliberty.org"
    t = read_trace(msg)
    assert t.facts["recipients"].source == "Received[1] (by mail.hyweb.com.tw) for"
    assert t.recipients == ("franklin@hyweb.com.tw",)
    assert t.sender == "slat-talk-admin@softwareliberty.org"


@pytest.mark.parametrize(
    "name",
    [
        "ruby-mail--emails--multipart_report_emails--report_530.eml",
        "ruby-mail--emails--multipart_report_emails--multipart_report_multiple_status.eml",
        "ruby-mail--emails--mime_emails--raw_email_with_mimepart_without_content_type.eml",
    ],
)
def test_bounces_have_the_null_sender(name: str) -> None:
    assert read_trace(load(name)).sender == ""


def test_mailer_daemon_return_paths_are_the_null_sender() -> None:
    raw = (MAIL / "spamassassin--spam--015.eml").read_bytes()
    assert read_trace(email.message_from_bytes(raw)).sender == "Gagnenljl@mindspring.com"
    for value in ("<MAILER-DAEMON>", "<MAILER-DAEMON@mx.example.net>", "<>", "MAILER-DAEMON"):
        msg = email.message_from_bytes(f"Return-Path: {value}\n".encode() + raw)
        assert read_trace(msg).sender == "", value


def test_no_relay_refusal_of_mail_delivered_to_a_local_domain_of_its_hop() -> None:
    judged = 0
    for path in FILES:
        want = EXPECTED[path.name]
        if "reason" in want:
            continue
        domains = sorted({r.rpartition("@")[2].lower() for r in want["recipients"]})
        if not all(d.isascii() for d in domains):
            continue  # a mangled international name, not a domain a policy can hold
        policy = policy_for(local_domains=domains)
        (v,) = judge_mbox([load(path.name)], policy)
        rules = [r.verdict.rule for r in v.recipients]
        assert "relay.reject_unauth_destination" not in rules, (path.name, v.to_json())
        judged += 1
    assert judged >= 75


def test_unknown_ip_means_no_verified_name_not_a_temporary_failure() -> None:
    msg = load("spamassassin--spam--015.eml")
    t = read_trace(msg)
    assert t.dns[DnsQuery(str(t.client_ip), RType.PTR)].outcome is DnsOutcome.NXDOMAIN
    text = (
        "[general]\nhostname = 'mx.example.com'\nlocal_domains = ['example.com']\n"
        "[[security.lists]]\nname = 'dialups'\nclient_hostname = ['cm.vtr.net']\n"
    )
    policy = compile_policy(settings_from_mapping(tomllib.loads(text)))
    (v,) = judge_mbox([msg], policy)
    (r,) = v.recipients
    assert r.verdict.reply is None or r.verdict.reply.code != 451, v.to_json()


def test_a_missing_answer_names_the_list_that_needs_it() -> None:
    msg = load("spamassassin--nice--001.eml")  # Sendmail, a confirmed name
    text = (
        "[general]\nhostname = 'mx.example.com'\nlocal_domains = ['netnoteinc.com']\n"
        "[[security.lists]]\nname = 'dialups'\nclient_hostname = ['dyn.example']\n"
    )
    policy = compile_policy(settings_from_mapping(tomllib.loads(text)))
    (v,) = judge_mbox([msg], policy)
    assert v.verdict == "accept"  # the name came from the trace
    # a client the trace gives no word on: the 451 names the list
    del msg["Received"]
    msg["Received"] = (
        "from x.example (192.0.2.9) by mail.netnoteinc.com with SMTP for <jm@netnoteinc.com>; "
        "Mon, 1 Jan 2024 00:00:00 +0000"
    )
    (v,) = judge_mbox([msg], policy)
    (r,) = v.recipients
    assert r.verdict.reply is not None and r.verdict.reply.code == 451
    assert r.verdict.rule == "security.lists.dialups"


def test_hop_choice_walks_past_filters_and_fetches_and_takes_several_receivers() -> None:
    # qmail's local hop, fetchmail (POP3), then prodigy's internal hop with no
    # address ("by vm4"): the session is Received[4], vm4-ext.prodigy.net's.
    # Return-Path: added on top as a delivery agent would (this copy lost its own)
    raw = (MAIL / "spamassassin--nice--mailman_message.txt.eml").read_bytes()
    msg = email.message_from_bytes(b"Return-Path: <a@winehq.com>\n" + raw)
    hops = [parse_received(str(v)) for v in msg.get_all("Received") or []]
    assert (hops[0].local, hops[1].fetched, hops[2].ip) == (True, True, None)
    # "by vm4" is another host unless we say it is ours: then its server's
    # Return-Path: above it is this hop's envelope sender too
    with pytest.raises(TraceError, match="no envelope sender for Received\\[4\\]"):
        read_trace(msg)
    t = read_trace(msg, ["vm4", "vm4-ext.prodigy.net"])
    assert t.facts["client_ip"].source == "Received[4] (by vm4-ext.prodigy.net)"
    assert str(t.client_ip) == "64.49.198.145"
    assert t.recipients == ("matt_relay@sbcglobal.net",)
    assert t.sender == "a@winehq.com"
    # a network of ours: hops from it are our relays, walked past down to the
    # first client outside it (Yahoo's, received by the filtering gateway)
    inner = load("ruby-mail--emails--error_emails--empty_group_lists.eml")
    assert str(read_trace(inner).client_ip) == "10.1.1.254"
    t = read_trace(inner, ["i.aaa.net", "10.0.0.0/8"])
    assert str(t.client_ip) == "209.191.84.220"
    assert t.facts["client_ip"].source == "Received[4] (by imr-f9b5566049f9cb01.prolexic.com)"
    assert (t.sender, t.recipients) == ("ceciledwards@sbcglobal.net", ("ccc@aaa.net",))
    # an amavisd-new hop ("by localhost", from 127.0.0.1) is walked past too
    amavis = load("ruby-mail--emails--error_emails--content_transfer_encoding_text-html.eml")
    t = read_trace(amavis)
    assert not t.client_ip.is_loopback
    assert t.facts["client_ip"].source == "Received[5] (by zak.futurequest.net)"
    assert read_trace(amavis, ["mx.unrelated.example", "zak.futurequest.net"]).client_ip == (
        t.client_ip
    )
    assert Receiver.of(["192.0.2.0/24", "MX.Example.COM."]) == Receiver(
        frozenset({"mx.example.com"}), (ipaddress.ip_network("192.0.2.0/24"),)
    )


# ---------------------------------------------------------------------------
# Inputs


def _write_mbox(path: Path, names: list[str]) -> None:
    box = mailbox.mbox(path, create=True)
    for n in names:
        box.add(mailbox.mboxMessage((MAIL / n).read_bytes()))
    box.flush()
    box.close()


def test_every_input_form_gives_the_same_messages(tmp_path: Path) -> None:
    names = [p.name for p in FILES[:12]]
    mbox_path = tmp_path / "in.mbox"
    _write_mbox(mbox_path, names)
    gz = tmp_path / "in.mbox.gz"
    gz.write_bytes(gzip.compress(mbox_path.read_bytes()))
    md = mailbox.Maildir(tmp_path / "Maildir", create=True)
    for n in names:
        md.add(mailbox.MaildirMessage((MAIL / n).read_bytes()))
    folder = tmp_path / "eml"
    folder.mkdir()
    for n in names:
        shutil.copy(MAIL / n, folder / n)
    one = tmp_path / "one.eml.gz"
    one.write_bytes(gzip.compress((MAIL / names[0]).read_bytes()))

    def ids(path: Path) -> list[str]:
        kind, messages = read_messages(path)
        assert kind
        return sorted(str(m.get("Message-ID", "")) + str(m.get("Subject", "")) for m in messages)

    want = ids(folder)
    assert len(want) == len(names)
    assert ids(mbox_path) == want
    assert ids(gz) == want
    assert ids(tmp_path / "Maildir") == want
    assert len(ids(one)) == 1
    assert ids(MAIL / names[0]) == ids(one)


def test_replay_mbox_on_the_real_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[general]\nhostname = 'mx.example.com'\nlocal_domains = ['example.com']\n")
    assert main(["replay", "--mbox", str(MAIL), "--policy", str(policy)]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == len(FILES)
    readable = sum("reason" not in r for r in EXPECTED.values())
    assert err.splitlines()[0] == (
        f"mailpolicy: {len(FILES)} messages: {readable} judged, "
        f"{len(FILES) - readable} without a usable trace"
    )
    assert "relay.reject_unauth_destination" in err  # the summary names the rules
