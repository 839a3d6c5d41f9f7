"""``mailpolicy hash-password``: make a ``password_hash`` for ``[accounts]``."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hash-password",
        help="hash a password for [accounts.NAME].password_hash (scrypt, salted)",
        description="Read a password (asked twice on a terminal, or one line from standard "
        "input with --stdin or when standard input is not a terminal) and print its salted "
        "scrypt hash for the policy file.",
    )
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..passwords import hash_password

    if args.stdin or not sys.stdin.isatty():
        # piped in (echo pw | mailpolicy hash-password): one line, asked once
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("mailpolicy: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("mailpolicy: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
