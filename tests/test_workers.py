"""``mailpolicy serve --workers 2``: limits hold across processes, SIGTERM
finishes every worker's messages, a dead worker is replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

POLICY = """
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
[general.smtp_auth]
local_networks = []
[security.connection_policy]
max_connections_per_client = 4
max_message_rate_per_client = 5
"""


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which process holds the server side of a loopback connection."""
    want_local = f"0100007F:{server_port:04X}"
    want_remote = f"0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == want_local and f[2] == want_remote:
            inode = f[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class Workers:
    def __init__(
        self,
        tmp: Path,
        port: int,
        workers: tuple[str, ...] = ("--workers", "2"),
        expect: int = 2,
        cpus: set[int] | None = None,
    ) -> None:
        policy = tmp / "policy.toml"
        policy.write_text(POLICY)
        self.port = port
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailpolicy",
                "serve",
                "--policy",
                str(policy),
                "--listen",
                f"127.0.0.1:{port}",
                "--maildir",
                str(tmp / "md"),
                *workers,
                "--grace",
                "20",
            ],
            stderr=self.log.open("wb"),
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        deadline = time.monotonic() + 30
        while len(self.workers()) < expect or not self._greets():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                return s.recv(100).startswith(b"220")
        except OSError:
            return False

    def workers(self) -> list[int]:
        try:
            return _children(self.proc.pid)
        except OSError:
            return []

    def connect(self) -> tuple[socket.socket, int | None]:
        """A greeted connection, and the worker that serves it."""
        return self.burst(1)[0]

    def burst(self, count: int) -> list[tuple[socket.socket, int | None]]:
        """``count`` connections opened at once (the kernel completes each
        before a worker accepts it), then greeted: the way to reach both
        workers, since a worker that is waiting takes the next connection
        and a quiet server's are all the first worker's."""
        opened = [
            socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(count)
        ]
        out: list[tuple[socket.socket, int | None]] = []
        for s in opened:
            greeting = s.recv(200)
            out.append(
                (
                    s,
                    _owner(self.port, s.getsockname()[1], self.workers())
                    if greeting.startswith(b"220")
                    else None,
                )
            )
        return out


@pytest.fixture
def workers(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[Workers]:
    w = Workers(tmp_path, free_port())
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(30)
            except subprocess.TimeoutExpired:
                w.proc.kill()


def _one_per_worker(w: Workers) -> list[tuple[socket.socket, int]]:
    """A connection served by each worker: two opened at once, until the
    second lands on the other worker while the first one is busy."""
    for _ in range(60):
        pair = w.burst(2)
        pids = [pid for _, pid in pair]
        if None not in pids and pids[0] != pids[1]:
            return [(s, pid) for s, pid in pair if pid is not None]
        for s, _ in pair:
            s.close()
        time.sleep(0.05)  # the slots go back before the next try
    pytest.fail("the kernel never handed a connection to the second worker")


@pytest.mark.timeout(120)
def test_connection_limit_holds_across_both_workers(workers: Workers) -> None:
    # Connections opened at once reach both workers; retry until the 4
    # allowed ones do (a fresh round each time, so the count restarts).
    for _ in range(20):
        opened = workers.burst(4)
        owners = {pid for _, pid in opened}
        if len(owners) == 2 and None not in owners:
            break
        for s, _ in opened:
            s.close()
        time.sleep(0.3)
    else:
        pytest.fail("the kernel never spread 4 connections over both workers")
    assert owners == set(workers.workers())
    # the 5th, whichever worker takes it, sees the 4 of both
    extra = socket.create_connection(("127.0.0.1", workers.port), timeout=10)
    assert extra.recv(200).startswith(b"421 4.7.0"), "over the limit counted across workers"
    extra.close()
    for s, _ in opened:
        s.close()


@pytest.mark.timeout(120)
def test_message_rate_holds_across_both_workers(workers: Workers) -> None:
    pair = _one_per_worker(workers)
    for s, _ in pair:
        s.sendall(b"EHLO c.example.org\r\n")
        s.recv(1000)
    codes = []
    for i in range(8):  # MAIL on each worker in turn
        s, _ = pair[i % 2]
        s.sendall(b"MAIL FROM:<a@example.org>\r\n")
        codes.append(s.recv(200)[:3])
        s.sendall(b"RSET\r\n")
        s.recv(200)
    assert codes == [b"250"] * 5 + [b"450"] * 3
    for s, _ in pair:
        s.close()


@pytest.mark.timeout(120)
def test_sigterm_lets_every_worker_finish_its_message(workers: Workers) -> None:
    opened = _one_per_worker(workers)
    for s, _ in opened:
        s.sendall(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n")
        s.sendall(b"RCPT TO:<alice@example.com>\r\nDATA\r\n")
    time.sleep(0.5)
    workers.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    finals = []
    for s, _ in opened:
        s.sendall(b"Subject: in flight\r\n\r\nhello\r\n.\r\n")
        got = b""
        while b"queued as" not in got and b"\r\n4" not in got:
            chunk = s.recv(1000)
            if not chunk:
                break
            got += chunk
        finals.append(got)
        s.close()
    assert all(b"250 2.0.0 Ok: queued as" in f for f in finals), finals
    assert workers.proc.wait(30) == 0
    mail = Path(workers.log).parent / "md" / "alice@example.com" / "new"
    assert len(list(mail.iterdir())) == len(opened)


def _listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on 127.0.0.1:port."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":
            out.add(f[9])
    return out


def _sockets_of(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


@pytest.mark.timeout(120)
def test_a_worker_that_dies_is_replaced(workers: Workers) -> None:
    first = workers.workers()
    # both workers accept on the one listening socket the parent keeps
    # (EPOLLEXCLUSIVE): the replacement takes it over
    listening = _listening_inodes(workers.port)
    assert len(listening) == 1
    held = {pid: _sockets_of(pid) & listening for pid in first}
    assert held[first[0]] == held[first[1]] == listening
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = workers.workers()
        if len(now) == 2 and first[0] not in now:
            break
        assert time.monotonic() < deadline, workers.log.read_text()
        time.sleep(0.2)
    assert "starting another" in workers.log.read_text()
    (new,) = set(now) - set(first)
    assert _sockets_of(new) & listening == held[first[0]]
    assert _listening_inodes(workers.port) == listening
    s, pid = workers.connect()
    assert pid in now
    s.close()


@pytest.mark.timeout(120)
def test_a_quiet_servers_sessions_stay_on_one_worker(workers: Workers) -> None:
    # One session at a time: the worker woken is the first one waiting, so
    # every session finds the same warm process (with a socket per worker,
    # SO_REUSEPORT, the kernel hashed each connection to either: 12 and 8
    # in one try).
    owners = []
    for _ in range(20):
        s, pid = workers.connect()
        owners.append(pid)
        s.sendall(b"QUIT\r\n")
        assert s.recv(200).startswith(b"221")
        s.close()
        time.sleep(0.2)  # the worker is back waiting, as between real sessions
    counts = Counter(owners)
    assert None not in counts
    # 17 or more of 20 by chance, were each connection hashed to either
    # worker: p = 0.003
    assert max(counts.values()) >= 17, counts
    assert "one socket shared" in workers.log.read_text()


@pytest.mark.timeout(120)
def test_a_killed_workers_connection_slots_are_given_back(workers: Workers) -> None:
    (kept, _), (doomed, doomed_pid) = _one_per_worker(workers)
    more = [workers.connect() for _ in range(2)]  # 4 open: the limit
    extra = socket.create_connection(("127.0.0.1", workers.port), timeout=10)
    assert extra.recv(200).startswith(b"421 4.7.0")
    extra.close()
    on_doomed = 1 + sum(1 for _, pid in more if pid == doomed_pid)
    time.sleep(0.5)  # the connections closed above have given their slots back
    os.kill(doomed_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (
        "connection slots given back" not in workers.log.read_text() or len(workers.workers()) < 2
    ):
        assert time.monotonic() < deadline, workers.log.read_text()
        time.sleep(0.2)
    assert f"{on_doomed} connection slots given back" in workers.log.read_text()
    # the sessions the dead worker held no longer count; the others still do
    again = []
    for _ in range(on_doomed):
        s = socket.create_connection(("127.0.0.1", workers.port), timeout=10)
        assert s.recv(200).startswith(b"220"), "a dead worker's slot still counted"
        again.append(s)
    over = socket.create_connection(("127.0.0.1", workers.port), timeout=10)
    assert over.recv(200).startswith(b"421 4.7.0")
    for s in [over, kept, doomed, *again, *(s for s, _ in more)]:
        s.close()


@pytest.mark.parametrize("extra", [(), ("--metrics", "127.0.0.1:0")])
def test_workers_auto_is_one_per_cpu_unless_one_process_is_needed(
    tmp_path: Path, free_port: Callable[[], int], extra: tuple[str, ...]
) -> None:
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    expect = 0 if extra or len(cpus) == 1 else len(cpus)  # children; 0: no parent
    w = Workers(tmp_path, free_port(), ("--workers", "auto", *extra), expect, cpus)
    try:
        assert len(w.workers()) == expect
    finally:
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0
    processes = 1 if expect == 0 else expect
    assert f"--workers auto: {processes} process(es)" in w.log.read_text()


@pytest.mark.parametrize(("value", "why"), [("0", "at least 1"), ("two", "a number or auto")])
def test_workers_refuses_what_is_not_a_count(value: str, why: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailpolicy", "serve", "--workers", value],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"--workers: {why}" in done.stderr
