"""The ``mailpolicy`` command: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed arguments and
returning the exit status. Adding a command is adding a module and a line in
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: sub-command modules, in the order ``--help`` lists them
COMMANDS: tuple[str, ...] = ("serve", "replay", "diff", "check", "route", "hash_password")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailpolicy",
        description="SMTP policy decisions that answer like Postfix.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
