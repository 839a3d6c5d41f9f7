"""``mailpolicy replay``: play captured sessions against a policy, offline."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="replay JSON cases through the SMTP server code, offline",
        description="Replay each case (a JSON file, or every *.json in a directory) through "
        "the real SMTP server code with the case's DNS zone and no network; print one "
        "JSON object per server reply.",
    )
    p.add_argument("paths", nargs="*", metavar="CASE.json|DIR")
    p.add_argument(
        "--policy",
        metavar="POLICY.toml",
        help="judge every case with this policy file instead of the case's own",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="compare with NAME.expected.jsonl beside each case (codes, enhanced "
        "codes and texts, as docs/replay-format.md says); print PASS/FAIL and a summary",
    )
    p.add_argument(
        "--mbox",
        metavar="PATH",
        help="instead of cases, judge each message of an mbox file, a Maildir folder, a "
        "folder of .eml files or one .eml file (any of them gzipped, .gz) with --policy, "
        "from its trace fields; print one JSON line per message and a summary per rule "
        "(docs/replay.md)",
    )
    p.add_argument(
        "--receiver",
        metavar="NAME|NETWORK",
        action="append",
        help="with --mbox: one of our host names, as in the Received: headers we add, or a "
        "network of our own servers; may be given several times (default: the topmost "
        "Received: header that records an SMTP session from another host)",
    )
    p.add_argument(
        "--dns",
        metavar="ZONE.json",
        help="with --mbox: answer the DNS questions the trace does not from this zone "
        "(without it they stay unanswered and are listed as missing_dns)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapters.replay import CaseError, build_policy, compare, load_cases, run_case
    from ..config import PolicyError, load_settings

    base = None
    if args.policy:
        try:
            base = load_settings(args.policy)
        except PolicyError as e:
            print(f"mailpolicy: {e.report()}", file=sys.stderr)
            return 2
    if args.mbox or not args.paths:
        return run_mbox(args, base)
    cases, errors = load_cases(args.paths)
    for err in errors:
        print(f"mailpolicy: {err}", file=sys.stderr)
    passed = failed = 0

    async def main() -> None:
        nonlocal passed, failed
        for case in cases:
            try:
                replies = await run_case(case, policy=build_policy(case, base))
            except CaseError as e:
                errors.append(e)
                print(f"mailpolicy: {e}", file=sys.stderr)
                continue
            if not args.check:
                for r in replies:
                    print(json.dumps({"case": case.name, **r.to_json()}))
                continue
            # A variant is compared with its own recording, NAME.VARIANT.expected.jsonl.
            source = Path(case.source)
            variant = case.name.partition("[")[2].rstrip("]")
            stem = f"{source.stem}.{variant}" if variant else source.stem
            expected_path = source.with_name(f"{stem}.expected.jsonl")
            if not expected_path.exists():
                print(f"SKIP {case.name}: no {expected_path.name}")
                continue
            expected = [
                json.loads(ln) for ln in expected_path.read_text().splitlines() if ln.strip()
            ]
            diffs = compare(expected, replies)
            if diffs:
                failed += 1
                print(f"FAIL {case.name}")
                for d in diffs:
                    print(f"    {d}")
            else:
                passed += 1
                print(f"PASS {case.name}")

    asyncio.run(main())
    if args.check:
        print(f"{passed} passed, {failed} failed")
    return 1 if errors or failed else 0


def run_mbox(args: argparse.Namespace, base: Any) -> int:
    """``replay --mbox``: one JSON line per message, a summary on stderr."""
    from ..adapters.mbox import MboxError, judge_mbox, read_messages, zone_from_file
    from ..policy import compile_policy

    if not args.mbox or base is None or args.check:
        print(
            "mailpolicy replay: give CASE.json|DIR, or --mbox PATH --policy POLICY.toml "
            "(--check applies to cases only)",
            file=sys.stderr,
        )
        return 2
    try:
        zone = zone_from_file(args.dns) if args.dns else None
        kind, messages = read_messages(args.mbox)
        judged = unreadable = 0
        summary: Counter[tuple[str, str]] = Counter()
        reasons: Counter[str] = Counter()
        policy = compile_policy(base)
        for verdict in judge_mbox(messages, policy, zone=zone, receiver=args.receiver):
            print(json.dumps(verdict.to_json()))
            if verdict.reason is None:
                judged += 1
                for r in verdict.recipients:
                    action = r.to_json()["action"]
                    summary[(r.verdict.rule or "-", action)] += 1
            else:
                unreadable += 1
                # "no envelope sender for Received[2] (by x): ..." -> "no envelope sender"
                reasons[re.sub(r" for Received\[.*", "", verdict.reason.partition(":")[0])] += 1
    except MboxError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that went away or turned unreadable midway
        print(f"mailpolicy: {args.mbox}: cannot read: {e}", file=sys.stderr)
        return 2
    if judged + unreadable == 0:
        print(f"mailpolicy: {args.mbox}: no messages in this {kind}", file=sys.stderr)
        return 2
    print(
        f"mailpolicy: {judged + unreadable} messages: {judged} judged, "
        f"{unreadable} without a usable trace",
        file=sys.stderr,
    )
    print(_summary(summary, reasons), file=sys.stderr)
    return 0


def _summary(summary: Counter[tuple[str, str]], reasons: Counter[str]) -> str:
    """Recipients per deciding rule and action, then the unreadable messages
    per reason: the rules that matter first."""
    lines = [f"{'recipients':>10}  {'action':<10} rule"]
    for (rule, action), n in sorted(summary.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{n:>10}  {action:<10} {rule}")
    for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{n:>10}  {'unread':<10} {reason}")
    return "\n".join(lines)
