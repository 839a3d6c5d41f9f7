"""Generate realistic mbox files for the mbox replay tests.

    python tests/mbox_gen.py OUT.mbox [--count 60] [--seed 7]
        [--policy-out POLICY.toml] [--zone-out ZONE.json]

Messages are written as mx.example.com (the receiving server) delivered
them: its ``Received:`` header on top in the style of Postfix, Exim,
Sendmail, Exchange or qmail, with IPv4 and IPv6 clients, sometimes a local
content-filter hop above it, sender-side hops below it (one of them forged to
look like ours), and the local delivery agent's ``Return-Path:``,
``X-Original-To:`` and ``Delivered-To:``. Some are spam that :data:`POLICY`'s
black lists refuse; some have no usable trace at all (no Received:, only a
local pickup, another server's, no client address, no sender, no recipient).

Each message comes with what a correct reader must find in it
(:class:`Generated`), so the tests check the parser, not only that it runs.
Nothing is random but the seeded generator: the same seed gives the same file.
"""

from __future__ import annotations

import argparse
import json
import mailbox
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

RECEIVER = "mx.example.com"

#: The policy the expectations are for (TOML).
POLICY = """\
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]

[security.sender_policy]
reject_unknown_sender_domain = true

[[security.lists]]
name = "spammers"
sender = ["spam.example"]

[[security.lists]]
name = "bad-nets"
client = ["198.51.100.0/24", "2001:db8:bad::/48"]

[[security.lists]]
name = "dynamic-hosts"
client_hostname = ["dyn.badisp.example"]
"""

GOOD_DOMAINS = ["sender.example", "partner.example", "news.example.org", "shop.example.net"]

#: The DNS the expectations are for (REPLAY.md zone).
ZONE: dict[str, dict[str, object]] = {
    **{d: {"MX": [f"10 mx.{d}"]} for d in GOOD_DOMAINS},
    **{f"mx.{d}": {"A": ["192.0.2.200"]} for d in GOOD_DOMAINS},
    "spam.example": {"A": ["198.51.100.200"]},
    "gone.example": {"nxdomain": True},
}


@dataclass
class Generated:
    """One message and what a correct reader finds in it."""

    raw: str
    from_line: str | None
    kind: str
    readable: bool = True
    reason: str = ""  # a word the unreadable reason must contain
    client_ip: str = ""
    helo: str | None = None
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    #: verdict under POLICY with ZONE: accept, reject, defer or mixed
    verdict: str = "accept"
    rule: str | None = None


def _date(i: int) -> str:
    base = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    return format_datetime(base + timedelta(minutes=7 * i))


def _ip_literal(ip: str, style: str) -> str:
    if ":" in ip and style == "postfix":
        return f"[IPv6:{ip}]"
    return f"[{ip}]"


def _received(
    style: str,
    i: int,
    ip: str,
    helo: str,
    rdns: str | None,
    rcpt: str,
    sender: str,
    tls: bool,
    forged: bool = False,
) -> str:
    date = _date(i)
    qid = f"4T{i:04d}Q{(i * 7919) % 10000:04d}"
    if style == "postfix":
        name = rdns or "unknown"
        proto = "ESMTPS" if tls else "ESMTP"
        using = (
            "\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
            "\n\t key-exchange X25519 server-signature RSA-PSS (2048 bits))"
            if tls
            else ""
        )
        return (
            f"from {helo} ({name} {_ip_literal(ip, style)}){using}"
            f"\n\tby {RECEIVER} (Postfix) with {proto} id {qid}"
            f"\n\tfor <{rcpt}>; {date}"
        )
    if style == "exim":
        proto = "esmtps (TLS1.3) tls TLS_AES_256_GCM_SHA384" if tls else "esmtp"
        if rdns:
            extra = "" if helo == rdns else f" helo={helo}"
            head = f"from {rdns} ([{ip}]:{40000 + i}{extra})"
        else:
            head = f"from [{ip}] (port={40000 + i} helo={helo})"
        return (
            f"{head}\n\tby {RECEIVER} with {proto}\n\t(Exim 4.96)"
            f"\n\t(envelope-from <{sender}>)\n\tid 1r{i:03d}X-000{i:03d}-Ab\n\tfor {rcpt}; {date}"
        )
    if style == "sendmail":
        inner = f"{rdns} [{ip}]" + (" (may be forged)" if forged else "") if rdns else f"[{ip}]"
        proto = "ESMTPS" if tls else "ESMTP"
        version = (
            "\n\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256 verify=NOT)" if tls else ""
        )
        return (
            f"from {helo} ({inner})\n\tby {RECEIVER} (8.17.1/8.17.1) with {proto} id "
            f"42{qid}{version}\n\tfor <{rcpt}>; {date}"
        )
    if style == "exchange":
        return (
            f"from {helo} ({ip}) by {RECEIVER}\n (192.0.2.1) with Microsoft SMTP Server"
            f" (version=TLS1_2,\n cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id"
            f" 15.2.1118.40; {date}"
        )
    if style == "qmail":
        return f"from {rdns or 'unknown'} (HELO {helo}) ({ip})\n  by {RECEIVER} with SMTP; {date}"
    raise ValueError(style)


def _upstream(rng: random.Random, i: int, domain: str) -> list[str]:
    """Hops on the sender's side, below ours."""
    hops = []
    for n in range(rng.randint(0, 2)):
        hops.append(
            f"from workstation{n}.internal.{domain} (workstation{n}.internal.{domain}"
            f" [10.{n}.{i % 250}.{rng.randint(2, 250)}])\n\tby mx.{domain} (Postfix) with ESMTPSA"
            f" id UP{i}{n}; {_date(i)}"
        )
    return hops


def _message(
    received: list[str],
    headers: list[tuple[str, str]],
    subject: str,
    body: str = "Hello,\n\nsee you soon.\n",
) -> str:
    lines = [f"{name}: {value}" for name, value in headers if name in ("Return-Path",)]
    lines += [f"{name}: {value}" for name, value in headers if name in ("X-Original-To",)]
    lines += [f"{name}: {value}" for name, value in headers if name in ("Delivered-To",)]
    lines += [f"Received: {r}" for r in received]
    lines += [
        f"{name}: {value}"
        for name, value in headers
        if name not in ("Return-Path", "X-Original-To", "Delivered-To")
    ]
    lines.append(f"Subject: {subject}")
    lines.append("MIME-Version: 1.0")
    lines.append("Content-Type: text/plain; charset=utf-8")
    return "\n".join(lines) + "\n\n" + body


STYLES = ["postfix", "exim", "sendmail", "exchange", "qmail"]


def generate(count: int = 60, seed: int = 7) -> list[Generated]:
    """``count`` messages (at least 20), deterministic for a ``seed``."""
    if count < 55:
        raise ValueError("count must be at least 55 (every kind of message once)")
    rng = random.Random(seed)
    out: list[Generated] = []
    special = _specials(rng)
    for i in range(count):
        if i % 5 == 2 and special:
            g = special.pop(0)
            g.raw = g.raw.replace("DATE", _date(i))
            out.append(g)
            continue
        out.append(_good(rng, i))
    return out


def _client(rng: random.Random, i: int, v6: bool) -> str:
    if v6:
        # 2001:db8:bad::/48 is black-listed: stay below it
        return f"2001:db8:{rng.randint(1, 0xAFF):x}::{rng.randint(1, 0xFFFF):x}"
    return f"203.0.113.{rng.randint(1, 254)}" if i % 2 else f"192.0.2.{rng.randint(10, 99)}"


def _good(rng: random.Random, i: int) -> Generated:
    style = STYLES[i % len(STYLES)]
    domain = rng.choice(GOOD_DOMAINS)
    v6 = i % 4 == 3
    ip = _client(rng, i, v6)
    host = f"mail{i}.{domain}"
    rdns = host if style != "exchange" and rng.random() < 0.8 else None
    helo = host if rng.random() < 0.7 else f"smtp-out-{i}.{domain}"
    sender = f"user{i}@{domain}"
    user = rng.choice(["alice", "bob", "carol", "dave"])
    rcpt = f"{user}@example.com"
    tls = rng.random() < 0.7 or style == "exchange"
    ours = _received(style, i, ip, helo, rdns, rcpt, sender, tls)
    received = [ours, *_upstream(rng, i, domain)]
    if i % 7 == 0:  # a content filter hop on top of ours
        received.insert(
            0,
            f"from localhost (localhost [127.0.0.1])\n\tby {RECEIVER} (Postfix) with ESMTP id "
            f"F{i}; {_date(i)}",
        )
    headers: list[tuple[str, str]] = [("Return-Path", f"<{sender}>")]
    recipients = [rcpt]
    if i % 5 != 4:
        headers += [("X-Original-To", rcpt), ("Delivered-To", rcpt)]
    elif i % 10 == 4:
        headers += [("Delivered-To", rcpt)]
    # else: only To/Cc (and for Exim/Postfix/Sendmail the "for" clause)
    to_list = [rcpt]
    verdict = "accept"
    readable = True
    if i % 5 == 4 and i % 10 == 9 and style in ("exchange", "qmail"):
        # no envelope recipient anywhere (Exchange and qmail write no "for"):
        # To: and Cc: are the author's, not the envelope, so no session
        to_list = [rcpt, "friend@elsewhere.example"]
        readable = False
    headers += [
        ("From", f"User {i} <{sender}>"),
        ("To", ", ".join(f"<{r}>" for r in to_list[:1])),
        *([("Cc", to_list[1])] if len(to_list) > 1 else []),
        ("Date", _date(i)),
        ("Message-ID", f"<msg{i}.{rng.randint(1000, 9999)}@{domain}>"),
    ]
    if style == "exim" and i % 3 == 0:
        # Exim's envelope-from stands in for a missing Return-Path
        headers = [h for h in headers if h[0] != "Return-Path"]
    return Generated(
        raw=_message(received, headers, f"Message {i} ({style})"),
        from_line=sender,
        kind=style + ("-v6" if v6 else ""),
        client_ip=ip,
        helo=helo,
        sender=sender,
        recipients=recipients,
        verdict=verdict,
        readable=readable,
        reason="" if readable else "recipient",
    )


def _specials(rng: random.Random) -> list[Generated]:
    """Spam the black lists refuse, and messages without a usable trace."""
    mk = _received
    out: list[Generated] = []
    # spam by sender domain (Postfix, IPv4)
    ip = "203.0.113.77"
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "postfix",
                        1,
                        ip,
                        "spammer.example",
                        None,
                        "bob@example.com",
                        "promo@spam.example",
                        False,
                    )
                ],
                [
                    ("Return-Path", "<promo@spam.example>"),
                    ("X-Original-To", "bob@example.com"),
                    ("From", "<promo@spam.example>"),
                    ("To", "<bob@example.com>"),
                ],
                "CHEAP WATCHES",
            ),
            from_line="promo@spam.example",
            kind="spam-sender",
            client_ip=ip,
            helo="spammer.example",
            sender="promo@spam.example",
            recipients=["bob@example.com"],
            verdict="reject",
            rule="security.lists.spammers",
        )
    )
    # spam from a listed network (Exim, IPv6), and a forged hop below ours
    ip = "2001:db8:bad::25"
    forged = (
        f"from trusted.example.com ([192.0.2.5])\n\tby {RECEIVER} with esmtp (Exim 4.96)"
        "\n\tid forged-1; DATE"
    )
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "exim",
                        2,
                        ip,
                        "bulk.example.net",
                        None,
                        "carol@example.com",
                        "news@shop.example.net",
                        True,
                    ),
                    forged,
                ],
                [
                    ("Return-Path", "<news@shop.example.net>"),
                    ("Delivered-To", "carol@example.com"),
                    ("From", "<news@shop.example.net>"),
                    ("To", "<carol@example.com>"),
                ],
                "Win a prize",
            ),
            from_line="news@shop.example.net",
            kind="spam-net-v6",
            client_ip=ip,
            helo="bulk.example.net",
            sender="news@shop.example.net",
            recipients=["carol@example.com"],
            verdict="reject",
            rule="security.lists.bad-nets",
        )
    )
    # spam from a dynamic host: its verified name, from the header, is black-listed
    ip = "192.0.2.150"
    name = "host-192-0-2-150.dyn.badisp.example"
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "postfix",
                        3,
                        ip,
                        "[192.0.2.150]",
                        name,
                        "dave@example.com",
                        "user3@partner.example",
                        False,
                    )
                ],
                [
                    ("Return-Path", "<user3@partner.example>"),
                    ("X-Original-To", "dave@example.com"),
                    ("From", "<user3@partner.example>"),
                    ("To", "<dave@example.com>"),
                ],
                "hi",
            ),
            from_line="user3@partner.example",
            kind="spam-hostname",
            client_ip=ip,
            helo="[192.0.2.150]",
            sender="user3@partner.example",
            recipients=["dave@example.com"],
            verdict="reject",
            rule="security.lists.dynamic-hosts",
        )
    )
    # a sender domain that does not exist (Sendmail, forged reverse name)
    ip = "203.0.113.99"
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "sendmail",
                        4,
                        ip,
                        "mail.gone.example",
                        "mail.gone.example",
                        "alice@example.com",
                        "x@gone.example",
                        False,
                        forged=True,
                    )
                ],
                [
                    ("Return-Path", "<x@gone.example>"),
                    ("X-Original-To", "alice@example.com"),
                    ("From", "<x@gone.example>"),
                    ("To", "<alice@example.com>"),
                ],
                "invoice",
            ),
            from_line="x@gone.example",
            kind="unknown-sender-domain",
            client_ip=ip,
            helo="mail.gone.example",
            sender="x@gone.example",
            recipients=["alice@example.com"],
            verdict="defer",
            rule="security.sender_policy.reject_unknown_sender_domain",
        )
    )
    # a bounce: the null sender
    ip = "192.0.2.44"
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "postfix",
                        5,
                        ip,
                        "mx.partner.example",
                        "mx.partner.example",
                        "bob@example.com",
                        "",
                        True,
                    )
                ],
                [
                    ("Return-Path", "<>"),
                    ("X-Original-To", "bob@example.com"),
                    ("From", "Mail Delivery System <MAILER-DAEMON@mx.partner.example>"),
                    ("To", "<bob@example.com>"),
                ],
                "Undelivered Mail Returned to Sender",
            ),
            from_line=None,
            kind="bounce",
            client_ip=ip,
            helo="mx.partner.example",
            sender="",
            recipients=["bob@example.com"],
        )
    )
    # -- no usable trace ------------------------------------------------------
    plain = [("From", "<a@sender.example>"), ("To", "<bob@example.com>")]
    out.append(
        Generated(
            raw=_message([], [("Return-Path", "<a@sender.example>"), *plain], "no trace"),
            from_line="a@sender.example",
            kind="no-received",
            readable=False,
            reason="no Received",
        )
    )
    out.append(
        Generated(
            raw=_message(
                [f"by {RECEIVER} (Postfix, from userid 1000)\n\tid 4TLOCAL; DATE"],
                [("Return-Path", "<bob@example.com>"), *plain],
                "cron output",
            ),
            from_line="bob@example.com",
            kind="local-pickup",
            readable=False,
            reason="no client",
        )
    )
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "postfix",
                        8,
                        "192.0.2.9",
                        "a.example",
                        None,
                        "bob@example.com",
                        "a@sender.example",
                        False,
                    ).replace(RECEIVER, "mx.elsewhere.example")
                ],
                [("Return-Path", "<a@sender.example>"), *plain],
                "forwarded copy",
            ),
            from_line="a@sender.example",
            kind="other-receiver",
            readable=False,
            reason=RECEIVER,
        )
    )
    out.append(
        Generated(
            raw=_message(
                [f"from localhost by {RECEIVER} with SMTP; DATE"],
                [("Return-Path", "<a@sender.example>"), *plain],
                "garbled",
            ),
            from_line="a@sender.example",
            kind="no-address",
            readable=False,
            reason="no client",
        )
    )
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "postfix",
                        10,
                        "192.0.2.10",
                        "a.example",
                        None,
                        "bob@example.com",
                        "a@sender.example",
                        False,
                    )
                ],
                plain,
                "no sender",
            ),
            from_line=None,
            kind="no-sender",
            readable=False,
            reason="sender",
        )
    )
    out.append(
        Generated(
            raw=_message(
                [
                    mk(
                        "qmail",
                        11,
                        "192.0.2.11",
                        "a.example",
                        None,
                        "bob@example.com",
                        "a@sender.example",
                        False,
                    )
                ],
                [("Return-Path", "<a@sender.example>"), ("From", "<a@sender.example>")],
                "bcc only",
            ),
            from_line="a@sender.example",
            kind="no-recipient",
            readable=False,
            reason="recipient",
        )
    )
    rng.shuffle(out)
    return out


def write_mbox(path: str | Path, messages: list[Generated]) -> None:
    """Write ``messages`` to a new mbox file at ``path``."""
    box = mailbox.mbox(path, create=True)
    try:
        box.lock()
        for g in messages:
            msg = mailbox.mboxMessage(g.raw)
            msg.set_from(g.from_line or "MAILER-DAEMON", True)
            box.add(msg)
        box.flush()
    finally:
        box.unlock()
        box.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT.mbox")
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policy-out", metavar="POLICY.toml", help="also write POLICY here")
    parser.add_argument("--zone-out", metavar="ZONE.json", help="also write ZONE here")
    args = parser.parse_args()
    write_mbox(args.out, generate(args.count, args.seed))
    if args.policy_out:
        Path(args.policy_out).write_text(POLICY)
    if args.zone_out:
        Path(args.zone_out).write_text(json.dumps(ZONE, indent=1) + "\n")


if __name__ == "__main__":
    main()
