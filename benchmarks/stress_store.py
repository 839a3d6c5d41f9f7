"""Attacks on the state and delivery side of ``mailpolicy serve``, as bounded,
repeatable scripts against real processes on loopback (not a test: it prints
figures and exits 1 when a promise was broken).

Run from the repository root after ``pip install -e '.[dev]'``; needs
``redis-server`` and, for ``full-disk``, root (to mount a small tmpfs)::

    python benchmarks/stress_store.py                 # every scenario, about 40 s
    python benchmarks/stress_store.py slots kill9     # some of them
    python benchmarks/stress_store.py kill9 --rounds 10 --seed 7

Scenarios:

* ``slots``: 50 sessions from one address with ``--state redis://``, then the
  server is stopped (SIGTERM) or killed (``kill -9``) and started again; a
  client then connects every 0.2 s. Figures: slots left in Redis, and how
  long until the client is greeted (``connection_ttl`` after a kill, 3 s
  here, 30 s by default; at once after SIGTERM).
* ``redis``: Redis killed, then hung (SIGSTOP), under 20 connections each.
  Figures: replies (all 421 4.3.0), seconds per refusal, log lines per
  refused connection (one), tracebacks (none), whether the server lives.
* ``kill9``: 4 clients send messages to two local recipients; the server is
  killed with SIGKILL at a random moment, restarted, and every message that
  got no 250 is sent again. Figures: messages, kills, copies missing (must
  be 0), half-delivered messages duplicated by the retry (must be 0), and
  whole messages delivered again because the kill fell between their last
  copy and the 250 reaching the client (RFC 1047's window, a few per
  thousand here; Postfix has it too).
* ``full-disk``: the Maildirs on a 1 MiB tmpfs with room for one copy of a
  message to two recipients; the client retries after room is made.
  Figures: the replies, and copies per recipient (one each).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
MAILPOLICY = (
    [str(BIN / "mailpolicy")]
    if (BIN / "mailpolicy").exists()
    else [
        sys.executable,
        "-m",
        "mailpolicy",
    ]
)

POLICY = """
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
smtp_auth.local_networks = []

[security.connection_policy]
max_connections_per_client = {limit}
"""

RCPTS = ("alice@example.com", "bob@example.com")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"process exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


@contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, process)
        yield process, port
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait()


class Serve:
    def __init__(self, workdir: Path, port: int, *args: str) -> None:
        self.log = workdir / f"serve-{port}-{time.monotonic_ns()}.log"
        self.args = args
        with self.log.open("wb") as err:
            self.process = subprocess.Popen(
                [*MAILPOLICY, "serve", "--listen", f"127.0.0.1:{port}", *args],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_port(port, self.process)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(30)

    @property
    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    line = sock.makefile("rb").readline()
    return sock, line


def redis_call(port: int, *words: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(f"{w}\r\n".encode() for w in [" ".join(words)]))
        return sock.recv(4096)


# ---------------------------------------------------------------------------


def scenario_slots(work: Path, args: argparse.Namespace) -> bool:
    ok = True
    policy = work / "limited.toml"
    policy.write_text(POLICY.format(limit=50))
    zone = work / "zone.json"
    zone.write_text("{}")
    with redis_server() as (_redis, rport):
        url = f"redis://127.0.0.1:{rport}/0?connection_ttl={args.connection_ttl}"
        for how, sig in (("SIGTERM", signal.SIGTERM), ("kill -9", signal.SIGKILL)):
            port = free_port()
            common = ["--policy", str(policy), "--state", url, "--dns", str(zone)]
            common += ["--maildir", str(work / "md")]
            server = Serve(work, port, *common)
            time.sleep(0.3)
            held = [greeting(port) for _ in range(50)]
            greeted = sum(line.startswith(b"220") for _, line in held)
            extra, over = greeting(port)
            extra.close()
            time.sleep(0.3)
            server.stop(sig)
            for sock, _ in held:
                sock.close()
            left = int(redis_call(rport, "ZCARD", "mailpolicy:conn:127.0.0.1")[1:].strip())
            started = time.monotonic()
            server = Serve(work, port, *common)
            while True:
                sock, line = greeting(port)
                sock.close()
                if line.startswith(b"220") or time.monotonic() - started > 120:
                    break
                time.sleep(0.2)
            waited = time.monotonic() - started
            server.stop()
            good = greeted == 50 and over.startswith(b"421 4.7.0") and line.startswith(b"220")
            good = good and (
                left == 0 if sig == signal.SIGTERM else waited < args.connection_ttl + 5
            )
            ok &= good
            print(
                f"slots  {how:8s}: 50 held ({greeted} greeted, "
                f"the 51st got {over[:9].decode()!r}), "
                f"slots left in Redis after the stop: {left}, "
                f"greeted again after {waited:.1f}s (connection_ttl {args.connection_ttl}s)"
                f"  {'ok' if good else 'FAILED'}"
            )
    return ok


def scenario_redis(work: Path, args: argparse.Namespace) -> bool:
    ok = True
    policy = work / "limited.toml"
    policy.write_text(POLICY.format(limit=50))
    zone = work / "zone.json"
    zone.write_text("{}")
    for how in ("killed", "hung"):
        with redis_server() as (redis, rport):
            port = free_port()
            server = Serve(
                work, port,
                "--policy", str(policy), "--state", f"redis://127.0.0.1:{rport}/0",
                "--dns", str(zone), "--maildir", str(work / "md"),
            )  # fmt: skip
            time.sleep(0.3)
            before = len(server.lines)
            if how == "killed":
                redis.kill()
                redis.wait()
            else:
                os.kill(redis.pid, signal.SIGSTOP)
            replies: list[bytes] = []
            started = time.monotonic()

            def one(port: int, replies: list[bytes]) -> None:
                sock, line = greeting(port)
                sock.close()
                replies.append(line)

            threads = [threading.Thread(target=one, args=(port, replies)) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.monotonic() - started
            time.sleep(0.5)
            alive = server.process.poll() is None
            lines = server.lines[before:]
            store_lines = [ln for ln in lines if "state store" in ln]
            tracebacks = sum("Traceback" in ln for ln in lines)
            server.stop()
            refused = sum(r.startswith(b"421 4.3.0") for r in replies)
            good = refused == 20 and alive and tracebacks == 0 and len(store_lines) == 20
            ok &= good
            print(
                f"redis  {how:8s}: 20 connections -> {refused} x 421 4.3.0 in {took:.1f}s, "
                f"{len(store_lines)} log lines ({len(lines)} in all), {tracebacks} tracebacks, "
                f"server {'alive' if alive else 'DEAD'}  {'ok' if good else 'FAILED'}"
            )
            if store_lines:
                print(f"         e.g. {store_lines[0][:160]}")
    return ok


def _message(n: int) -> bytes:
    return (
        f"From: <stress@example.org>\r\nMessage-ID: <stress-{n}@example.org>\r\n"
        f"Subject: stress {n}\r\n\r\n" + "body line\r\n" * 40
    ).encode()


_ID = re.compile(rb"Message-ID: <stress-(\d+)@example\.org>")


def _copies(maildir: Path, rcpt: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for sub in ("new", "cur"):
        folder = maildir / rcpt / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _ID.search(path.read_bytes())
            if match:
                out[int(match[1])] = out.get(int(match[1]), 0) + 1
    return out


def scenario_kill9(work: Path, args: argparse.Namespace) -> bool:
    rng = random.Random(args.seed)
    policy = work / "open.toml"
    policy.write_text(POLICY.format(limit=0))
    zone = work / "zone.json"
    zone.write_text("{}")
    maildir = work / "kill9-md"
    port = free_port()
    common = ["--policy", str(policy), "--dns", str(zone), "--maildir", str(maildir)]
    total = args.messages
    acked: set[int] = set()
    pending = list(range(total))
    lock = threading.Lock()
    kills = 0

    def client(todo: list[int], stop: threading.Event) -> None:
        while todo and not stop.is_set():
            n = todo[0]
            c = smtplib.SMTP(timeout=10)
            try:
                c.connect("127.0.0.1", port)
                c.sendmail("carol@example.org", list(RCPTS), _message(n))
            except (OSError, smtplib.SMTPException):
                c.close()
                return  # no 250: sent again after the restart
            # The 250 is what counts: a QUIT lost to the kill changes nothing.
            with lock:
                acked.add(n)
            todo.pop(0)
            try:
                c.quit()
            except (OSError, smtplib.SMTPException):
                c.close()

    server = Serve(work, port, *common)
    for _round in range(args.rounds + 1):
        with lock:
            todo = [n for n in pending if n not in acked]
        if not todo:
            break
        parts = [todo[i::4] for i in range(4)]
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(p, stop)) for p in parts]
        for t in threads:
            t.start()
        if _round < args.rounds:
            time.sleep(rng.uniform(0.2, 1.0))
            server.stop(signal.SIGKILL)
            kills += 1
        for t in threads:
            t.join()
        stop.set()
        if server.process.poll() is not None:
            server = Serve(work, port, *common)
    server.stop()
    copies = {rcpt: _copies(maildir, rcpt) for rcpt in RCPTS}
    missing = sum(1 for n in acked for rcpt in RCPTS if copies[rcpt].get(n, 0) == 0)
    # A message copied twice to one recipient and once to the other: the
    # ledger failed its promise. Copied twice to both: the whole message was
    # delivered, and the kill fell between the last copy and the 250 reaching
    # the client (RFC 1047's window, which every SMTP server has).
    twice = {n for rcpt in RCPTS for n, c in copies[rcpt].items() if c > 1}
    partial = sorted(n for n in twice if len({copies[r].get(n, 0) for r in RCPTS}) > 1)
    whole = sorted(twice - set(partial))
    unacked = total - len(acked)
    good = missing == 0 and not partial and unacked == 0
    print(
        f"kill9          : {total} messages to 2 recipients, {kills} x kill -9 at random moments, "
        f"{len(acked)} got 250 (after retries), {missing} copies missing, "
        f"{len(partial)} half-delivered messages duplicated, {len(whole)} whole messages "
        f"delivered again (250 lost with the kill)  {'ok' if good else 'FAILED'}"
    )
    return good


def scenario_full_disk(work: Path, args: argparse.Namespace) -> bool:
    point = work / "small"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        print(f"full-disk      : skipped, cannot mount a tmpfs: {mounted.stderr.strip()}")
        return True
    try:
        policy = work / "open.toml"
        policy.write_text(POLICY.format(limit=0))
        zone = work / "zone.json"
        zone.write_text("{}")
        port = free_port()
        maildir = point / "maildir"
        server = Serve(
            work, port, "--policy", str(policy), "--dns", str(zone), "--maildir", str(maildir)
        )
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("carol@example.org", list(RCPTS), _message(0))  # mailboxes exist
        results = []
        # Room for exactly one copy (tmpfs counts whole pages), then room for
        # one copy and the ledger's plan; a new message each time.
        for n, extra in ((1, 0), (2, 64 * 1024)):
            big = _message(n) + (b"y" * 76 + b"\r\n") * 1300
            stat = os.statvfs(point)
            free = stat.f_bavail * stat.f_frsize
            room = -(-(len(big) + 200) // 4096) * 4096 + extra
            (point / "filler").write_bytes(b"\0" * max(0, free - room))
            replies = []
            for attempt in range(2):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                    c.ehlo("client.example.org")
                    c.mail("carol@example.org")
                    for rcpt in RCPTS:
                        c.rcpt(rcpt)
                    code, text = c.data(big)
                    replies.append(f"{code} {text.decode()[:40]}")
                if attempt == 0:
                    first = [_copies(maildir, r).get(n, 0) for r in RCPTS]
                    (point / "filler").unlink()
            after = [_copies(maildir, r).get(n, 0) for r in RCPTS]
            results.append((extra, replies, first, after))
        server.stop()
        start_ok = _starts_on_full_disk(work, point, policy, zone)
        good = start_ok and all(after == [1, 1] for *_, after in results)
        for extra, replies, first, after in results:
            what = "one copy" if not extra else "one copy and the plan"
            print(
                f"full-disk      : two recipients, room for {what}: {replies[0]!r}, copies "
                f"{first}; the retry after room was made: {replies[1]!r}, copies {after}"
                f"  {'ok' if after == [1, 1] else 'FAILED'}"
            )
        print(
            f"full-disk      : serve on a full disk {'starts' if start_ok else 'DOES NOT START'}"
            f"  {'ok' if start_ok else 'FAILED'}"
        )
        return good
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _starts_on_full_disk(work: Path, point: Path, policy: Path, zone: Path) -> bool:
    shutil.rmtree(point / "maildir")
    stat = os.statvfs(point)
    (point / "filler").write_bytes(b"\0" * stat.f_bavail * stat.f_frsize)
    port = free_port()
    try:
        server = Serve(
            work, port, "--policy", str(policy), "--dns", str(zone), "--maildir",
            str(point / "maildir"),
        )  # fmt: skip
    except SystemExit:
        return False
    sock, line = greeting(port)
    sock.close()
    server.stop()
    (point / "filler").unlink()
    return line.startswith(b"220")


SCENARIOS: dict[str, Callable[[Path, argparse.Namespace], bool]] = {
    "slots": scenario_slots,
    "redis": scenario_redis,
    "kill9": scenario_kill9,
    "full-disk": scenario_full_disk,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], default=[])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="kill -9 rounds (kill9)")
    parser.add_argument("--messages", type=int, default=1000, help="messages (kill9)")
    parser.add_argument("--connection-ttl", type=float, default=3, help="seconds (slots)")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="mailpolicy-stress-") as tmp:
        for name in args.scenarios or list(SCENARIOS):
            ok &= SCENARIOS[name](Path(tmp), args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
