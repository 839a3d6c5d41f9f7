"""``mailpolicy serve``: a real SMTP gateway that enforces the policy."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapters.gateway import GatewayDelivery
    from ..adapters.server import MailServer

_AUTO = 0


def write_inline_when_alone(server: MailServer, delivery: GatewayDelivery) -> None:
    """Write Maildir copies on the event loop's thread while ``server`` has
    one session open (:attr:`~mailpolicy.adapters.maildir.MaildirDelivery.
    write_inline`): with nothing else to serve, a writer thread only adds its
    round trip to the client's wait. With two sessions or more, a thread
    writes, so that one client's ``fsync`` never holds up another's reply."""
    delivery.maildir.write_inline = lambda: len(server.sessions) <= 1


def _workers(text: str) -> int:
    """--workers: a count, or "auto" (resolved once the other flags are known)."""
    if text == "auto":
        return _AUTO
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, not {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return count


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the SMTP gateway: enforce the policy, deliver accepted mail",
        description="Listen as the policy's [server] table says (or --listen), judge every "
        "session with the policy, deliver local mail to Maildirs and relay the rest. "
        "SIGTERM or Ctrl-C stops gracefully: messages in flight are finished; a "
        "second one stops at once. SIGHUP (or `mailpolicy reload`) re-reads the policy "
        "file: new sessions use it, sessions in progress finish on theirs (docs/operations.md).",
    )
    p.add_argument("--policy", required=True, metavar="POLICY.toml")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="one plain listener instead of the policy's [server] listeners",
    )
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
    p.add_argument(
        "--maildir", metavar="DIR", help="local delivery root (default: delivery.maildir)"
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the delivery ledger lives (default: MAILDIR/.mailpolicy); best on "
        "another file system than the Maildirs (docs/delivery.md)",
    )
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="expect a HAProxy PROXY v1 line on every connection (behind a load "
        "balancer): the client address is taken from it",
    )
    p.add_argument(
        "--pid-file",
        metavar="FILE",
        help="write the process id here (for `mailpolicy reload --pid-file FILE`); removed at exit",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (docs/operations.md)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="run N worker processes on the same listeners (default 1; auto: one per "
        "CPU this process may use, or 1 with --capture or --metrics); per-client "
        "limits are shared through --state, or through the parent without it",
    )
    p.add_argument("--inherit", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="idle client timeout, seconds (default: server.timeout_seconds)",
    )
    p.add_argument(
        "--grace", type=float, default=30, help="seconds to let busy sessions finish on shutdown"
    )
    p.add_argument(
        "--capture",
        metavar="DIR",
        help="write every session to DIR as a replay case (docs/capture.md): commands, "
        "replies, the DNS answers used, AUTH as user and outcome (never the password)",
    )
    p.add_argument(
        "--capture-headers-only",
        action="store_true",
        help="capture only each message's headers and size, not its body",
    )
    p.add_argument(
        "--capture-max-files",
        type=int,
        default=1000,
        metavar="N",
        help="keep at most N captured sessions, the oldest dropped first (default 1000)",
    )
    p.add_argument(
        "--capture-max-bytes",
        type=int,
        default=100 * 1024 * 1024,
        metavar="N",
        help="keep at most N bytes of captures, the oldest dropped first (default 100 MiB)",
    )
    p.set_defaults(func=run)


def _tls_reason(error: Exception, cert: str | None, key: str | None) -> str:
    """One line for a certificate or key that cannot be used."""
    for name, path, marker in (
        ("tls_cert", cert, "-----BEGIN CERTIFICATE-----"),
        ("tls_key", key, "PRIVATE KEY-----"),
    ):
        if path is None:
            continue
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return f"no such file: {path}"
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        if marker not in text:
            kind = "certificate" if name == "tls_cert" else "private key"
            return f"{name} {path} is not a PEM {kind}"
    if isinstance(error, ssl.SSLError):
        return f"the key does not match the certificate, or cannot be used ({error.reason})"
    return str(error)


def run(args: argparse.Namespace) -> int:
    import logging

    from ..adapters.gateway import GatewayDelivery
    from ..adapters.logs import configure_logging
    from ..adapters.metrics import Metrics
    from ..adapters.reload import PolicyReloader
    from ..adapters.server import MailServer, listeners_from_settings, parse_hostport, tls_context
    from ..adapters.state import store_from_url
    from ..policy import compile_policy
    from .startup import StartupError, check_store, load_resolver, load_settings_or_fail

    configure_logging(args.log_format, args.log_level)
    log = logging.getLogger("mailpolicy.serve")
    try:
        settings = load_settings_or_fail(args.policy)
        resolver = load_resolver(args.dns, settings)
    except StartupError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    try:
        listeners = listeners_from_settings(settings, args.listen)
        store = store_from_url(args.state)
    except ValueError as e:
        print(f"mailpolicy: {e}", file=sys.stderr)
        return 2
    try:
        tls = tls_context(settings)
    except (OSError, ssl.SSLError, ValueError) as e:
        srv = settings.server
        print(
            f"mailpolicy: {args.policy}: server.tls_cert {srv.tls_cert!r} / server.tls_key "
            f"{srv.tls_key!r}: {_tls_reason(e, srv.tls_cert, srv.tls_key)}",
            file=sys.stderr,
        )
        return 2
    if args.workers == _AUTO:
        # capture files and the metrics page belong to one process
        args.workers = 1 if args.capture or args.metrics else len(os.sched_getaffinity(0))
        if not args.inherit:
            log.info("--workers auto: %d process(es)", args.workers)
    if args.workers < 1:
        print("mailpolicy: --workers: at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and not args.inherit:
        for flag, value in (("--capture", args.capture), ("--metrics", args.metrics)):
            if value:
                why = f"{flag} works with one process only, not with --workers"
                print(f"mailpolicy: {why}", file=sys.stderr)
                return 2
        from .workers import supervise

        return supervise(args, listeners, settings.server.listen_backlog)
    inherited = None
    if args.inherit:
        from .workers import inherited_sockets

        inherited = inherited_sockets(args.inherit)
    policy = compile_policy(settings)
    capture = None
    if args.capture:
        from ..adapters.capture import CaptureStore

        try:
            capture = CaptureStore(
                args.capture,
                settings,
                headers_only=args.capture_headers_only,
                max_files=args.capture_max_files,
                max_bytes=args.capture_max_bytes,
            )
        except (OSError, ValueError) as e:
            print(f"mailpolicy: --capture {args.capture}: {e}", file=sys.stderr)
            return 2
    delivery = GatewayDelivery(
        settings, resolver, maildir_root=args.maildir, state_dir=args.state_dir
    )
    metrics_at = None
    if args.metrics:
        try:
            metrics_at = parse_hostport(args.metrics)
        except ValueError as e:
            print(f"mailpolicy: --metrics: {e}", file=sys.stderr)
            return 2

    async def main() -> int:
        try:
            await check_store(store)
        except StartupError as e:
            print(f"mailpolicy: {e}", file=sys.stderr)
            return 2
        server = MailServer(
            policy,
            resolver,
            delivery=delivery,
            store=store,
            listeners=listeners,
            tls=tls,
            timeout=args.timeout,
            proxy_protocol=args.proxy_protocol,
            observer=capture.observer if capture is not None else None,
            sockets=inherited,
        )
        write_inline_when_alone(server, delivery)
        metrics = Metrics() if metrics_at is not None else None
        server.services.metrics = metrics
        reloader = PolicyReloader(
            server,
            args.policy,
            delivery=delivery,
            metrics=metrics,
            on_reload=[capture.use_settings] if capture is not None else [],
        )
        log.info("policy %s loaded: generation 1", args.policy)
        reloads: set[asyncio.Task[bool]] = set()

        def on_hangup() -> None:
            task = asyncio.ensure_future(reloader.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Future[None]] = []

        def on_signal() -> None:
            if stop.is_set():
                # a second SIGTERM or Ctrl-C: do not wait out the grace period
                log.warning("stopping now")
                for task in stopping:
                    task.cancel()
            stop.set()

        # Before listening: a client (or a supervisor) may act as soon as the
        # port accepts, and a SIGTERM must then already stop us gracefully.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        try:
            if metrics is not None and metrics_at is not None:
                port = metrics.serve(*metrics_at)
                log.info("metrics on http://%s:%d/metrics", metrics_at[0], port)
            await server.start()
        except (OSError, ValueError) as e:
            # one line naming the listener: a port in use, an address not ours
            print(
                f"mailpolicy: cannot listen: {e.strerror if isinstance(e, OSError) else e}",
                file=sys.stderr,
            )
            await server.stop(grace=0)
            return 2
        # MailServer.start has logged each listener (a log record, so that
        # --log-format json stays one object a line).
        if args.pid_file:
            # after listening: a supervisor that sees the file can connect
            with open(args.pid_file, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        await stop.wait()
        log.info("shutting down")
        stopping.append(asyncio.ensure_future(server.stop(grace=args.grace)))
        try:
            await stopping[0]
        except asyncio.CancelledError:
            for session in list(server.sessions):
                session.abort()
        await store.close()
        delivery.ledger.close()
        if metrics is not None:
            metrics.close()
        if args.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(args.pid_file)
        if capture is not None:
            capture.close()
        return 0

    from ..adapters.selector import EXCLUSIVE_WAKEUP, new_event_loop

    if inherited and EXCLUSIVE_WAKEUP:
        # the listening sockets are every worker's: wake one waiting worker
        # a connection, the first one that can take it (adapters/selector.py)
        shared = [sock.fileno() for _, sock in inherited]
        with asyncio.Runner(loop_factory=lambda: new_event_loop(shared)) as runner:
            return runner.run(main())
    return asyncio.run(main())
