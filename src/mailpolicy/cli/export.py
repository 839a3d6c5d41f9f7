"""``mailpolicy export postfix``: main.cf lines and tables for a Postfix in
front of ``mailpolicy policyd`` (docs/postfix.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a mail server's configuration for the policy (postfix)",
        description="Write DIR/main.cf (lines to merge into Postfix's main.cf) and the "
        "lookup tables it references, with absolute paths: native parameters for what "
        "Postfix enforces itself, check_policy_service for the rest (docs/postfix.md).",
    )
    p.add_argument("target", choices=("postfix",))
    p.add_argument("--policy", required=True, metavar="POLICY.toml")
    p.add_argument(
        "--policyd",
        required=True,
        metavar="inet:HOST:PORT",
        help="where `mailpolicy policyd` listens: inet:HOST:PORT or unix:PATH",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..adapters.postfix.export import export_postfix, write_export
    from ..config import PolicyError, load_settings

    try:
        settings = load_settings(args.policy)
    except PolicyError as e:
        print(f"mailpolicy: {e.report()}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    try:
        export = export_postfix(settings, args.policyd, out)
        written = write_export(export, out)
    except ValueError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mailpolicy: --out {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    for note in export.notes:
        print(f"note: {note}")
    return 0
