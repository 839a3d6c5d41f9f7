"""Attacks on ``mailpolicy serve``, as bounded, repeatable scripts (not tests).

Each attack runs against a real ``mailpolicy serve`` process on loopback
(started and stopped here, with its own policy and Maildir in a temporary
folder) and prints its figures. Run from the repository root after
``pip install -e .``::

    python benchmarks/stress.py                 # every attack
    python benchmarks/stress.py concurrency slow_clients

Attacks:

* ``concurrency``: 1,000 clients connect at once and each sends a message:
  how many were greeted, how many got 250, and whether every 250 has its file.
* ``slow_clients``: 300 clients trickle a byte every few seconds; meanwhile a
  normal client's whole transaction is timed (target: under a second).
* ``unfinished_data``: 40 clients each send 10 MiB of a message and never
  end it: the server's resident memory (target: under 150 MB).
* ``smuggling``: end-of-data look-alikes (``\\n.\\n``, ``\\r.\\r``,
  ``\\n.\\r\\n``...) followed by commands: no smuggled command may run.
* ``relay_tricks``: routed and quoted recipients from an outsider: every one
  must be refused as relaying.
* ``next_hop_killed``: 200 messages relayed through a next hop that is
  killed -9 halfway and restarted; the client retries every 4xx: none may be
  missing at the next hop, and how many arrived twice is counted.

Every loop is bounded in count and time; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

POLICY = """
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]

[security.connection_policy]
max_connections_per_client = 0

[server]
smtp = "127.0.0.1:{port}"
max_connections = 2000
timeout_seconds = {timeout}
"""

OUTSIDER = "203.0.113.5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``mailpolicy serve`` process with a PROXY-protocol listener."""

    def __init__(self, folder: Path, *, timeout: int = 300, extra: str = "") -> None:
        self.folder = folder
        self.port = free_port()
        self.maildir = folder / "maildir"
        policy = folder / "policy.toml"
        policy.write_text(POLICY.format(port=self.port, timeout=timeout) + extra)
        self.log = (folder / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailpolicy",
                "serve",
                "--policy",
                str(policy),
                "--maildir",
                str(self.maildir),
                "--proxy-protocol",
                "--log-level",
                "warning",
            ],
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("mailpolicy serve did not start") from None
                time.sleep(0.1)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def files(self, address: str = "alice@example.com") -> int:
        new = self.maildir / address / "new"
        return len(list(new.iterdir())) if new.is_dir() else 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ip: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(f"PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n".encode())
        return cls(reader, writer)

    async def reply(self) -> str:
        while True:
            line = (await self.reader.readline()).decode("ascii", "replace")
            if not line or line[3:4] != "-":
                return line.rstrip("\r\n")

    async def cmd(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    async def send_message(self, sender: str = "carol@example.org") -> str:
        await self.cmd("EHLO client.example.org")
        await self.cmd(f"MAIL FROM:<{sender}>")
        await self.cmd("RCPT TO:<alice@example.com>")
        if not (await self.cmd("DATA")).startswith("354"):
            return "no 354"
        return await self.cmd(b"Subject: stress\r\n\r\nhello\r\n.\r\n")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# ---------------------------------------------------------------------------


async def concurrency(folder: Path, n: int = 1000) -> None:
    server = Server(folder)
    greeted = accepted = failed = 0

    async def one() -> None:
        nonlocal greeted, accepted, failed
        try:
            c = await Client.open(server.port)
            if (await asyncio.wait_for(c.reply(), 60)).startswith("220"):
                greeted += 1
            if (await asyncio.wait_for(c.send_message(), 60)).startswith("250"):
                accepted += 1
            await c.cmd("QUIT")
            await c.close()
        except (OSError, TimeoutError):
            failed += 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    took = time.monotonic() - started
    files = server.files()
    server.stop()
    print(
        f"concurrency: {n} clients at once: {greeted} greeted, {accepted} got 250, "
        f"{failed} failed, {files} files for {accepted} 250s, {took:.1f} s"
    )


async def slow_clients(folder: Path, n: int = 300) -> None:
    server = Server(folder)
    slow: list[Client] = []
    for _ in range(n):
        c = await Client.open(server.port)
        await c.reply()
        slow.append(c)

    async def trickle(c: Client) -> None:
        for ch in b"EHLO slow.example.org\r\n":
            c.writer.write(bytes([ch]))
            await asyncio.sleep(2)

    tricklers = [asyncio.create_task(trickle(c)) for c in slow]
    await asyncio.sleep(1)
    times = []
    for _ in range(5):
        started = time.monotonic()
        c = await Client.open(server.port)
        await c.reply()
        answer = await c.send_message()
        await c.cmd("QUIT")
        await c.close()
        times.append(time.monotonic() - started)
        assert answer.startswith("250"), answer
        await asyncio.sleep(0.5)
    for t in tricklers:
        t.cancel()
    for c in slow:
        await c.close()
    server.stop()
    print(
        f"slow_clients: {n} trickling clients; a normal transaction took "
        f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms (5 runs)"
    )


async def unfinished_data(folder: Path, n: int = 40, size: int = 10 * 2**20) -> None:
    server = Server(folder)
    before = server.rss_mb()
    clients = []
    chunk = (b"x" * 998 + b"\r\n") * 64
    for _ in range(n):
        c = await Client.open(server.port)
        await c.reply()
        await c.cmd("EHLO big.example.org")
        await c.cmd("MAIL FROM:<carol@example.org>")
        await c.cmd("RCPT TO:<alice@example.com>")
        await c.cmd("DATA")
        clients.append(c)

    async def feed(c: Client) -> None:
        sent = 0
        while sent < size:
            c.writer.write(chunk)
            await c.writer.drain()
            sent += len(chunk)

    await asyncio.gather(*(feed(c) for c in clients))
    await asyncio.sleep(2)
    peak = server.rss_mb()
    for c in clients:
        await c.close()
    await asyncio.sleep(1)
    after = server.rss_mb()
    server.stop()
    print(
        f"unfinished_data: {n} sessions x {size / 2**20:.1f} MiB never ended: server RSS "
        f"{before:.0f} MB before, {peak:.0f} MB holding them, {after:.0f} MB after"
    )


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
]


async def smuggling(folder: Path) -> None:
    server = Server(folder)
    ran = 0
    for marker in SMUGGLING:
        c = await Client.open(server.port)
        await c.reply()
        await c.cmd("EHLO client.example.org")
        await c.cmd("MAIL FROM:<carol@example.org>")
        await c.cmd("RCPT TO:<alice@example.com>")
        await c.cmd("DATA")
        payload = (
            b"Subject: smuggle\r\n\r\nbody"
            + marker
            + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
        )
        first = await c.cmd(payload)
        # one reply for one message: anything more means a smuggled command ran
        try:
            extra = await asyncio.wait_for(c.reply(), 1)
        except TimeoutError:
            extra = ""
        if extra:
            ran += 1
        assert first.startswith("250"), first
        await c.close()
    await asyncio.sleep(0.5)
    files, bob = server.files(), server.files("bob@example.com")
    server.stop()
    print(
        f"smuggling: {len(SMUGGLING)} end-of-data look-alikes: {ran} smuggled commands ran, "
        f"{files} messages for alice, {bob} for bob"
    )


RELAY_TRICKS = [
    "user%elsewhere.example@example.com",
    '"user@elsewhere.example"@example.com',
    "@example.com:user@elsewhere.example",
    "elsewhere.example!user@example.com",
    "user@[192.0.2.1]",
    "user@elsewhere.example",
    "user@example.com.elsewhere.example",
    '"a@b@elsewhere.example"@example.com',
    "user%elsewhere.example%example.com@example.com",
]


async def relay_tricks(folder: Path) -> None:
    server = Server(folder)
    c = await Client.open(server.port, OUTSIDER)
    await c.reply()
    await c.cmd("EHLO outsider.example.net")
    await c.cmd("MAIL FROM:<x@outsider.example.net>")
    refused = 0
    for rcpt in RELAY_TRICKS:
        answer = await c.cmd(f"RCPT TO:<{rcpt}>")
        if answer.startswith("554") and "Relay access denied" in answer:
            refused += 1
        else:
            print(f"  NOT REFUSED: {rcpt}: {answer}")
    await c.close()
    server.stop()
    print(f"relay_tricks: {refused} of {len(RELAY_TRICKS)} routed recipients refused as relaying")


NEXT_HOP = """
import os, sys, time, uuid
from aiosmtpd.controller import Controller
folder = sys.argv[2]
class Keep:
    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(folder, uuid.uuid4().hex)
        with open(path, "wb") as f:
            f.write(envelope.content)
            f.flush()
            os.fsync(f.fileno())
        return "250 2.0.0 kept"
Controller(Keep(), hostname="127.0.0.1", port=int(sys.argv[1])).start()
while True:
    time.sleep(3600)
"""


async def next_hop_killed(folder: Path, n: int = 200) -> None:
    """Relay through a next hop that is killed -9 halfway and comes back:
    every message must end up there, and the client retries its 4xx."""
    hop_port, kept = free_port(), folder / "kept"
    kept.mkdir()

    def start_hop() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", NEXT_HOP, str(hop_port), str(kept)])
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", hop_port), timeout=1).close()
                return proc
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the next hop did not start") from None
                time.sleep(0.1)

    hop = start_hop()
    extra = (
        '[delivery]\nmode = "relay"\n'
        f'relay_host = {{ host = "127.0.0.1", port = {hop_port}, security = "none" }}\n'
    )
    server = Server(folder, extra=extra)
    pending = list(range(n))
    deferred = 0
    rounds = 0
    while pending and rounds < 20:
        rounds += 1
        still: list[int] = []
        for i in pending:
            if rounds == 1 and i == n // 2:
                hop.kill()  # -9, in the middle of the stream
                hop.wait()
                restart = asyncio.get_running_loop().time() + 2
            c = await Client.open(server.port)
            await c.reply()
            await c.cmd("EHLO client.example.org")
            await c.cmd("MAIL FROM:<carol@example.com>")
            await c.cmd("RCPT TO:<bob@remote.example>")
            await c.cmd("DATA")
            answer = await c.cmd(f"Message-ID: <m{i}@stress>\r\n\r\nmessage {i}\r\n.\r\n".encode())
            await c.close()
            if not answer.startswith("250"):
                deferred += 1
                still.append(i)
            if (
                rounds == 1
                and i >= n // 2
                and hop.poll() is not None
                and asyncio.get_running_loop().time() > restart
            ):
                hop = start_hop()
        pending = still
        if hop.poll() is not None:
            hop = start_hop()
    server.stop()
    hop.kill()
    hop.wait()
    copies: dict[str, int] = {}
    for f in kept.iterdir():
        found = re.search(rb"(?im)^Message-ID: (<[^>]*>)", f.read_bytes())
        mid = found.group(1).decode() if found else f.name
        copies[mid] = copies.get(mid, 0) + 1
    missing = n - len(copies)
    dupes = sum(c - 1 for c in copies.values())
    print(
        f"next_hop_killed: {n} messages relayed, next hop killed -9 at {n // 2}: {deferred} "
        f"4xx answers retried, {missing} missing at the next hop, {dupes} duplicates "
        f"({rounds} rounds)"
    )


ATTACKS: dict[str, Callable[[Path], Awaitable[None]]] = {
    "concurrency": concurrency,
    "slow_clients": slow_clients,
    "unfinished_data": unfinished_data,
    "smuggling": smuggling,
    "relay_tricks": relay_tricks,
    "next_hop_killed": next_hop_killed,
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK", help=", ".join(ATTACKS))
    args = parser.parse_args(argv)
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for name in args.attacks or list(ATTACKS):
        with tempfile.TemporaryDirectory(prefix=f"stress-{name}-") as tmp:
            asyncio.run(ATTACKS[name](Path(tmp)))


if __name__ == "__main__":
    main(sys.argv[1:])
