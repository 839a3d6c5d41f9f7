"""``mailpolicy reload``: tell a running ``mailpolicy serve`` to re-read its policy."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reload",
        help="make a running `mailpolicy serve` re-read its policy file (SIGHUP)",
        description="Send SIGHUP to the server whose process id is in FILE (serve "
        "--pid-file FILE). The server loads and compiles the file, then swaps it in; a "
        "file that does not load is logged and the running policy stays (docs/operations.md).",
    )
    p.add_argument("--pid-file", required=True, metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.pid_file, encoding="ascii") as f:
            text = f.read().strip()
    except OSError as e:
        print(f"mailpolicy: {args.pid_file}: {e.strerror}", file=sys.stderr)
        return 2
    if not text.isdigit():
        print(f"mailpolicy: {args.pid_file}: no process id in it", file=sys.stderr)
        return 2
    pid = int(text)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"mailpolicy: no process {pid} (from {args.pid_file})", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"mailpolicy: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}; the server logs the outcome")
    return 0
