"""``mailpolicy check``: lint a policy file (docs/check.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="load a policy and report problems: list conflicts, shadowed rules, "
        "open relays, settings with no effect",
        description="Load POLICY.toml and report what a person would want to know: black "
        "entries that white rules override, entries shadowed by earlier rules, trusted "
        "networks wide enough to be an open relay, settings that have no effect. Exit "
        "status: 0 (warnings are printed), 1 when there are errors, 2 when the file does "
        "not load.",
    )
    p.add_argument("policy", metavar="POLICY.toml")
    p.add_argument("--json", action="store_true", help="one JSON object per finding")
    p.add_argument(
        "--limit",
        type=int,
        default=200,
        metavar="N",
        help="print at most N findings (0: all); the summary counts them all",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import PolicyError, load_settings
    from ..lint import check_settings

    try:
        settings = load_settings(args.policy)
    except PolicyError as e:
        print(e.report(), file=sys.stderr)
        return 2
    findings = check_settings(settings)
    shown = findings if args.limit <= 0 else findings[: args.limit]
    for f in shown:
        if args.json:
            print(json.dumps(f.to_json()))
        else:
            print(f"{args.policy}: {f}")
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    if len(shown) < len(findings):
        print(f"... {len(findings) - len(shown)} more (--limit 0 shows them all)", file=sys.stderr)
    summary = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    print(
        f"{args.policy}: {summary}" if findings else f"{args.policy}: no problems found",
        file=sys.stderr if args.json else sys.stdout,
    )
    return 1 if errors else 0
