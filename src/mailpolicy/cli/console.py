"""``mailpolicy console``: the policy's settings in a browser (docs/console.md)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from ..config import PolicyError, load_settings
from ..passwords import is_password_hash


def register(sub: Any) -> None:
    p = sub.add_parser(
        "console",
        help="the policy's settings in a browser: edit, preview over captures, apply",
        description="Serve a web console for POLICY.toml: its settings by section with "
        "their Postfix equivalents and help, edits checked by the loader, a preview of "
        "the replies that would change over captured sessions, apply (atomic write and "
        "reload), live metrics and a session trial. Needs `pip install 'mailpolicy[console]'`.",
    )
    p.add_argument("--policy", required=True, metavar="POLICY.toml")
    p.add_argument("--listen", default="127.0.0.1:8025", metavar="HOST:PORT")
    p.add_argument("--captures", metavar="DIR", help="sessions from `serve --capture DIR`")
    p.add_argument("--pid-file", metavar="FILE", help="the running server's (serve --pid-file)")
    p.add_argument(
        "--metrics",
        metavar="URL",
        help="the running server's metrics, e.g. http://127.0.0.1:9100/metrics",
    )
    p.add_argument(
        "--decision-log",
        metavar="FILE",
        help="the running server's log (serve --log-format json 2>FILE): the last refusals",
    )
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--password-hash",
        metavar="HASH",
        help="require this password (a `mailpolicy hash-password` hash)",
    )
    auth.add_argument(
        "--token",
        metavar="TOKEN",
        help="require this token (or MAILPOLICY_CONSOLE_TOKEN from the environment)",
    )
    p.add_argument("--read-only", action="store_true", help="show, preview, never change")
    p.set_defaults(func=run)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..console.app import ConsoleConfig, create_app
    except ImportError as e:
        print(
            f"mailpolicy: the console needs its extra: pip install 'mailpolicy[console]' ({e})",
            file=sys.stderr,
        )
        return 2
    host, _, port_text = args.listen.rpartition(":")
    if not host or not port_text.isdigit():
        print(f"mailpolicy: --listen {args.listen}: expected HOST:PORT", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("MAILPOLICY_CONSOLE_TOKEN") or None
    if args.password_hash and not is_password_hash(args.password_hash):
        print("mailpolicy: --password-hash: not a `mailpolicy hash-password` hash", file=sys.stderr)
        return 2
    if not _loopback(host) and not (args.password_hash or token):
        print(
            f"mailpolicy: --listen {args.listen}: not a loopback address; "
            "set --password-hash or --token first",
            file=sys.stderr,
        )
        return 2
    try:
        load_settings(args.policy)
    except PolicyError as e:
        print(e.report(), file=sys.stderr)
        return 2
    config = ConsoleConfig(
        policy=Path(args.policy).resolve(),
        captures=Path(args.captures) if args.captures else None,
        pid_file=Path(args.pid_file) if args.pid_file else None,
        metrics_url=args.metrics,
        decision_log=Path(args.decision_log) if args.decision_log else None,
        password_hash=args.password_hash,
        token=token,
        read_only=args.read_only,
    )
    print(f"mailpolicy console on http://{args.listen}/", file=sys.stderr, flush=True)
    uvicorn.run(create_app(config), host=host.strip("[]"), port=int(port_text), log_level="warning")
    return 0
