"""Compare mailpolicy's Received: parser with SpamAssassin's on real headers.

    python benchmarks/received_vs_spamassassin.py [--record] [--show]

The lines are every distinct ``Received:`` header of the real messages in
``tests/data/mail/`` (see tests/data/README.md). SpamAssassin's reading of
each one (``Mail::SpamAssassin::Message::Metadata::parse_received_line``,
the parser behind its trust path) is kept in
``tests/data/received_spamassassin.jsonl``, so the test suite checks the
agreement without SpamAssassin installed. ``--record`` runs SpamAssassin
(``apt-get install spamassassin``) and rewrites that file; without it the
recorded readings are used.

Prints, for the client address, the HELO name and the reverse name: on how
many lines both parsers read an address, on how many they agree, and how
many lines each one alone reads. ``--show`` lists every disagreement.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mailpolicy.adapters.mbox import parse_received

ROOT = Path(__file__).resolve().parent.parent
MAIL = ROOT / "tests" / "data" / "mail"
RECORD = ROOT / "tests" / "data" / "received_spamassassin.jsonl"

# Each line goes through parse_received_line as parse_received_headers
# gives it (folding already undone); the relay's fields are printed as JSON.
PERL = r"""
use strict; use warnings;
use JSON::PP;
use Mail::SpamAssassin::Message::Metadata;
use Mail::SpamAssassin::Message::Metadata::Received;
my $md = bless {}, 'Mail::SpamAssassin::Message::Metadata';
my $json = JSON::PP->new->canonical;
while (my $line = <STDIN>) {
  chomp $line;
  my $r = $md->parse_received_line($line);
  my $out;
  if (!defined $r) { $out = {status => 'unparsed'} }
  elsif (!ref $r) { $out = {status => 'skipped'} }
  else {
    my @keys = grep { defined $r->{$_} } qw(ip helo rdns by ident envfrom auth);
    $out = {status => 'parsed', map { $_ => $r->{$_} } @keys};
  }
  print $json->encode($out), "\n";
}
"""


def real_lines() -> list[str]:
    """Every distinct Received: value of the corpus, unfolded, in file order."""
    seen: dict[str, None] = {}
    for path in sorted(MAIL.glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        for value in msg.get_all("Received") or []:
            seen.setdefault(" ".join(str(value).split()), None)
    return list(seen)


def record(lines: list[str]) -> None:
    done = subprocess.run(
        ["perl", "-e", PERL],
        input="".join(f"{ln}\n" for ln in lines),
        capture_output=True,
        text=True,
        check=True,
    )
    results = [json.loads(x) for x in done.stdout.splitlines()]
    assert len(results) == len(lines), (len(results), len(lines))
    with RECORD.open("w") as f:
        for line, sa in zip(lines, results, strict=True):
            f.write(json.dumps({"line": line, "spamassassin": sa}, sort_keys=True) + "\n")


def _bang(text: str | None) -> str:
    # SpamAssassin replaces [ ] ( ) < > | # and spaces with "!" (an address
    # literal HELO "[1.2.3.4]" reads "!1.2.3.4!"); compare in its terms.
    out = (text or "").lower().rstrip(".")
    return _bangs(out)


def _bangs(out: str) -> str:
    for ch in "[]()<>|# ":
        out = out.replace(ch, "!")
    return out


def ours(line: str) -> dict[str, str] | None:
    """Our reading in SpamAssassin's terms, or None when we read no address."""
    r = parse_received(line)
    if r.ip is None:
        return None
    return {"ip": str(r.ip), "helo": _bang(r.helo), "rdns": _bang(r.reverse)}


def theirs(sa: dict[str, Any]) -> dict[str, str] | None:
    if sa["status"] != "parsed" or not sa.get("ip"):
        return None
    rdns = sa.get("rdns") or ""
    if _is_address(rdns):
        # "from 192.0.2.1 (HELO x) (192.0.2.1)": SpamAssassin files the first
        # word as the reverse name even when it is an address; no name
        rdns = ""
    return {"ip": sa["ip"], "helo": _bang(sa.get("helo")), "rdns": _bang(rdns)}


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    both = only_ours = only_theirs = 0
    agree = dict.fromkeys(("ip", "helo", "rdns"), 0)
    differ: list[tuple[str, str, str, str]] = []
    for row in rows:
        a, b = ours(row["line"]), theirs(row["spamassassin"])
        if a is None and b is None:
            continue
        if b is None:
            only_ours += 1
            continue
        if a is None:
            only_theirs += 1
            differ.append((row["line"], "ip", "", b["ip"]))
            continue
        both += 1
        for field in agree:
            if a[field] == b[field]:
                agree[field] += 1
            else:
                differ.append((row["line"], field, a[field], b[field]))
    return {
        "lines": len(rows),
        "both": both,
        "agree": agree,
        "only_ours": only_ours,
        "only_spamassassin": only_theirs,
        "differences": differ,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="run SpamAssassin and rewrite the record")
    ap.add_argument("--show", action="store_true", help="list every disagreement")
    args = ap.parse_args()
    if args.record:
        record(real_lines())
    rows = [json.loads(x) for x in RECORD.read_text().splitlines() if x.strip()]
    out = compare(rows)
    print(f"{out['lines']} distinct real Received: lines")
    print(f"both read a client address: {out['both']}")
    for field, n in out["agree"].items():
        print(f"  agree on {field}: {n}/{out['both']}")
    print(f"only mailpolicy reads an address: {out['only_ours']}")
    print(f"only SpamAssassin reads an address: {out['only_spamassassin']}")
    if args.show:
        for line, field, a, b in out["differences"]:
            print(f"\n{field}: ours={a!r} spamassassin={b!r}\n  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
