"""``mailpolicy serve --workers N``: one parent, N worker processes.

The parent binds every listener and hands the listening sockets to N
workers (fresh interpreters, ``pass_fds``), each a complete ``mailpolicy
serve``. On Linux every worker waits on the same sockets with
``EPOLLEXCLUSIVE`` (:mod:`mailpolicy.adapters.selector`): a connection
wakes one waiting worker, the first that registered if it is waiting, so
a quiet server's sessions stay on one warm process and a busy one's
spread over all. (A plain shared socket woke every worker; with a socket
each, ``SO_REUSEPORT``, the kernel hashes every connection to either
process, and at one session at a time the one woken had often not run
for two sessions: see docs/performance.md.) Without ``EPOLLEXCLUSIVE``,
each worker gets a socket set of its own (``SO_REUSEPORT``), or they share
one. The parent keeps every set open, so a worker that dies loses no
waiting client: its replacement takes over the same sockets. Per-client
limits hold as
with one process: with ``--state redis://`` the workers share Redis; without
it they count in one table in shared memory that the parent creates
(:mod:`mailpolicy.adapters.sharedstore`), each worker in a column of its own
that the parent zeroes when the worker dies.

The parent forwards SIGTERM and SIGINT (graceful stop: every worker finishes
its messages in flight; a second signal stops them at once) and SIGHUP
(reload the policy) to every worker, and replaces a worker that dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from ..adapters.selector import EXCLUSIVE_WAKEUP
from ..adapters.server import Listener, _listening_sockets
from ..adapters.sharedstore import SharedTable

__all__ = ["supervise", "worker_argv"]

log = logging.getLogger("mailpolicy.serve")

#: options of `serve` a worker takes over from the parent's command line
_PASSED = (
    ("policy", "--policy"),
    ("dns", "--dns"),
    ("maildir", "--maildir"),
    ("state_dir", "--state-dir"),
    ("log_format", "--log-format"),
    ("log_level", "--log-level"),
    ("timeout", "--timeout"),
    ("grace", "--grace"),
)


def worker_argv(
    args: argparse.Namespace, state: str, inherited: Sequence[tuple[Listener, int]]
) -> list[str]:
    argv = [sys.executable, "-m", "mailpolicy", "serve"]
    for attr, flag in _PASSED:
        value = getattr(args, attr, None)
        if value is not None:
            argv += [flag, str(value)]
    if args.proxy_protocol:
        argv.append("--proxy-protocol")
    argv += ["--state", state]
    for listener, fd in inherited:
        argv += ["--inherit", f"{listener.name}:{listener.tls}:{fd}"]
    return argv


def inherited_sockets(specs: Sequence[str]) -> list[tuple[Listener, socket.socket]]:
    """The listening sockets a parent handed to this worker."""
    out = []
    for spec in specs:
        name, mode, fd = spec.split(":")
        sock = socket.socket(fileno=int(fd))
        host, port = sock.getsockname()[:2]
        out.append((Listener(name, str(host), int(port), mode), sock))  # type: ignore[arg-type]
    return out


def supervise(args: argparse.Namespace, listeners: list[Listener], backlog: int) -> int:
    """Run the parent: bind, start the workers, forward signals, replace
    the dead. Returns the exit status."""
    return asyncio.run(_supervise(args, listeners, backlog))


async def _bind(
    listeners: list[Listener], backlog: int, sets: int
) -> list[list[tuple[Listener, socket.socket]]]:
    """One socket set every worker shares, woken one worker at a time
    (``EPOLLEXCLUSIVE``, see adapters/selector.py); where the system lacks
    that, ``sets`` sets on the listeners' ports (``SO_REUSEPORT``), or one
    shared set where it lacks both."""
    reuse = not EXCLUSIVE_WAKEUP and hasattr(socket, "SO_REUSEPORT")
    out: list[list[tuple[Listener, socket.socket]]] = []
    try:
        for _ in range(sets if reuse else 1):
            bound: list[tuple[Listener, socket.socket]] = []
            out.append(bound)
            for listener in listeners:
                port = listener.port
                if out[0] is not bound and port == 0:
                    # the port the first set got
                    port = next(s for lst, s in out[0] if lst is listener).getsockname()[1]
                socks = await _listening_sockets(listener.host, port, backlog, reuse_port=reuse)
                bound += [(listener, sock) for sock in socks]
    except OSError:
        _close(out)
        raise
    return out


def _close(sets: Sequence[Sequence[tuple[Listener, socket.socket]]]) -> None:
    for bound in sets:
        for _, sock in bound:
            sock.close()


async def _supervise(args: argparse.Namespace, listeners: list[Listener], backlog: int) -> int:
    try:
        sets = await _bind(listeners, backlog, args.workers)
    except OSError as e:
        print(f"mailpolicy: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 2
    for listener, sock in sets[0]:
        host, port = sock.getsockname()[:2]
        log.info(
            "listening on %s:%s (%s), %d workers%s",
            host,
            port,
            listener.name,
            args.workers,
            ", a socket each" if len(sets) > 1 else ", one socket shared",
        )
    table: SharedTable | None = None
    if args.state is None or args.state.startswith("memory"):
        try:
            table = SharedTable.create(workers=args.workers)
        except OSError as e:
            print(f"mailpolicy: cannot create the shared state store: {e}", file=sys.stderr)
            _close(sets)
            return 2

    def argv_of(slot: int) -> tuple[list[str], list[int]]:
        bound = sets[slot % len(sets)]
        fds = [sock.fileno() for _, sock in bound]
        state = args.state if table is None else f"shared://{table.path}?worker={slot}"
        return worker_argv(args, state, [(lst, sock.fileno()) for lst, sock in bound]), fds

    stopping = asyncio.Event()
    workers: dict[int, asyncio.subprocess.Process] = {}

    async def start(slot: int) -> None:
        argv, fds = argv_of(slot)
        proc = await asyncio.create_subprocess_exec(*argv, pass_fds=fds)
        workers[slot] = proc
        log.info("worker %d started (pid %d)", slot, proc.pid)

    async def watch(slot: int) -> None:
        while True:
            status = await workers[slot].wait()
            if stopping.is_set():
                return
            pid = workers[slot].pid
            log.error("worker %d (pid %d) ended with %s; starting another", slot, pid, status)
            if table is not None:
                # its sessions are gone: their slots with them
                released = table.release_worker(slot)
                if released:
                    log.info("worker %d: %d connection slots given back", slot, released)
            await asyncio.sleep(0.2)  # a worker that cannot start must not spin
            await start(slot)

    def forward(sig: signal.Signals) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        for proc in workers.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)
    if args.pid_file:
        with open(args.pid_file, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    try:
        for slot in range(args.workers):
            await start(slot)
        await asyncio.gather(*(watch(slot) for slot in range(args.workers)))
        await asyncio.gather(*(proc.wait() for proc in workers.values()))
    finally:
        _close(sets)
        if table is not None:
            table.close()
            with contextlib.suppress(OSError):
                os.unlink(table.path)
        if args.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.pid_file)
    log.info("all workers stopped")
    return 0
