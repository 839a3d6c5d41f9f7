"""``mailpolicy policyd``: a Postfix policy delegation server
(``check_policy_service``) that judges with the policy (docs/postfix.md)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "policyd",
        help="answer Postfix's check_policy_service with the policy's verdicts",
        description="Serve Postfix's policy delegation protocol: every request is judged "
        "by the policy and answered with the action that makes Postfix give the same "
        "reply as the native configuration. Pair with `mailpolicy export postfix`.",
    )
    p.add_argument("--policy", required=True, metavar="POLICY.toml")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--listen", metavar="HOST:PORT", default=None, help="TCP (default 127.0.0.1:10040)"
    )
    where.add_argument("--unix", metavar="PATH", help="a UNIX socket instead of TCP")
    p.add_argument(
        "--dns",
        metavar="ZONE.json",
        help="answer DNS from this static zone (docs/replay-format.md) instead of the network",
    )
    p.add_argument(
        "--state",
        metavar="URL",
        default=None,
        help="rate counters: memory:// (default) or redis://HOST:PORT/DB",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {text!r}: HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(args: argparse.Namespace) -> int:
    import logging

    from ..adapters.logs import configure_logging
    from ..adapters.postfix.policyd import PolicyServer, PolicyService
    from ..adapters.state import store_from_url
    from ..policy import compile_policy
    from .startup import StartupError, check_store, load_resolver, load_settings_or_fail

    configure_logging(args.log_format, args.log_level)
    log = logging.getLogger("mailpolicy.policyd")
    try:
        settings = load_settings_or_fail(args.policy)
        resolver = load_resolver(args.dns, settings)
    except StartupError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    try:
        listen = None if args.unix else _host_port(args.listen or "127.0.0.1:10040")
        store = store_from_url(args.state)
    except ValueError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    service = PolicyService(compile_policy(settings), resolver, store)

    async def main() -> int:
        try:
            await check_store(store)
        except StartupError as e:
            print(f"mailpolicy: {e}", file=sys.stderr)
            return 2
        server = PolicyServer(service)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if listen is None:
                await server.listen_unix(args.unix)
                log.info("policy service on unix:%s", args.unix)
            else:
                host, port = await server.listen_tcp(*listen)
                log.info("policy service on inet:%s:%d", host, port)
        except OSError as e:
            print(f"mailpolicy: cannot listen: {e.strerror}", file=sys.stderr)
            return 2
        await stop.wait()
        log.info("shutting down")
        await server.stop()
        await store.close()
        return 0

    return asyncio.run(main())
