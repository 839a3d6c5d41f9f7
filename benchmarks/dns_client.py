"""CPU per question of ``LiveResolver`` (not a test).

A ``ZoneServer`` runs in a process of its own (so its CPU is not counted);
this process asks it the questions a message costs (the sender domain's MX,
the client's PTR, the PTR name's A), one after another, with the cache off,
and prints the CPU time and wall time per question::

    python benchmarks/dns_client.py                    # this checkout
    PYTHONPATH=/tmp/old/src python benchmarks/dns_client.py   # another one
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from mailpolicy.adapters.dns import LiveResolver
from mailpolicy.model import DnsQuery, RType

_SERVER = """
import sys, time
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer
zone = StaticZone.from_mapping({
    "known.example": {"MX": ["10 mx.known.example"]},
    "127.0.0.1": {"PTR": ["client.example.net"]},
    "client.example.net": {"A": ["127.0.0.1"]},
})
with ZoneServer(zone).run_in_thread() as server:
    print(server.nameserver, flush=True)
    time.sleep(3600)
"""


@contextlib.contextmanager
def zone_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ZoneServer with the questions' answers, in a process of its own:
    the process and its ``IP:PORT``."""
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        yield server, server.stdout.readline().strip()
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with zone_server() as (_, nameserver):
        resolver = LiveResolver([nameserver], max_entries=0, timeout=2.0)
        questions = [
            DnsQuery.of("known.example", RType.MX),
            DnsQuery.of("127.0.0.1", RType.PTR),
            DnsQuery.of("client.example.net", RType.A),
        ]

        async def ask(n: int) -> None:
            for i in range(n):
                result = await resolver.resolve(questions[i % 3])
                assert result.found, result

        asyncio.run(ask(100))  # warm-up
        for _ in range(args.rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            asyncio.run(ask(args.questions))
            cpu = (time.process_time() - cpu) / args.questions * 1e6
            wall = (time.perf_counter() - wall) / args.questions * 1e6
            print(f"per question: {cpu:4.0f} us CPU, {wall:5.0f} us wall", flush=True)


if __name__ == "__main__":
    main()
