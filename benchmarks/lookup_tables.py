"""Build time, memory and lookup rate of the list tables (not a test).

Run: PYTHONPATH=src .venv/bin/python benchmarks/lookup_tables.py [SIZE ...]

For each size, the entries are generated first; then the table is built once
for time and once under tracemalloc, which reports the peak during the build
and what the table keeps (the inputs are not counted). Lookups mix hits and
misses.
"""

from __future__ import annotations

import gc
import ipaddress
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

from mailpolicy.addresses import Address
from mailpolicy.lookup import AccessTable, DomainTable, NetworkTable

MiB = 1024 * 1024
ORDINALS = 50  # entries are spread over this many rules


def _domains(n: int) -> list[tuple[str, int]]:
    return [(f"host{i}.zone{i % 1000}.example.com", i % ORDINALS) for i in range(n)]


def _addresses(n: int) -> list[tuple[str, int]]:
    return [(f"user{i}@zone{i % 1000}.example.net", i % ORDINALS) for i in range(n)]


def _networks(n: int) -> list[tuple[Any, int]]:
    rng = random.Random(1)
    out: list[tuple[Any, int]] = []
    for i in range(n):
        if i % 10 == 0:
            value, length = rng.getrandbits(128), rng.choice((48, 56, 64, 128))
            net: Any = ipaddress.IPv6Network((value >> (128 - length) << (128 - length), length))
        else:
            value, length = rng.getrandbits(32), rng.choice((16, 24, 28, 32))
            net = ipaddress.IPv4Network((value >> (32 - length) << (32 - length), length))
        out.append((net, i % ORDINALS))
    return out


def _measure(build: Callable[[Any], Any], entries: Any) -> tuple[Any, float, int, int]:
    """Build twice: once timed (tracemalloc slows allocation a lot), once
    traced for memory."""
    gc.collect()
    start = time.perf_counter()
    table = build(entries)
    elapsed = time.perf_counter() - start
    del table
    gc.collect()
    tracemalloc.start()
    table = build(entries)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return table, elapsed, current, peak


def _rate(lookup: Callable[[Any], Any], probes: Sequence[Any]) -> float:
    start = time.perf_counter()
    for probe in probes:
        lookup(probe)
    return len(probes) / (time.perf_counter() - start)


def run(size: int) -> None:
    rng = random.Random(size)
    probes = 20_000

    entries = _domains(size)
    table, secs, kept, peak = _measure(DomainTable, entries)
    names = [
        f"mx.host{rng.randrange(size * 2)}.zone{rng.randrange(1000)}.example.com"
        for _ in range(probes)
    ]
    _report("DomainTable", size, secs, kept, peak, _rate(table.matches, names))
    del table, entries

    entries = _addresses(size)
    table, secs, kept, peak = _measure(AccessTable, entries)
    addrs = [
        Address(f"user{rng.randrange(size * 2)}", f"zone{rng.randrange(1000)}.example.net")
        for _ in range(probes)
    ]
    _report("AccessTable", size, secs, kept, peak, _rate(table.matches, addrs))
    del table, entries

    nets = _networks(size)
    table, secs, kept, peak = _measure(NetworkTable, nets)
    ips: list[Any] = [
        ipaddress.IPv4Address(rng.getrandbits(32))
        if i % 10
        else ipaddress.IPv6Address(rng.getrandbits(128))
        for i in range(probes)
    ]
    for i in range(0, probes, 7):  # some hits
        ips[i] = nets[i % size][0].network_address
    _report("NetworkTable", size, secs, kept, peak, _rate(table.matches, ips))


def _report(name: str, size: int, secs: float, kept: int, peak: int, rate: float) -> None:
    print(
        f"{name:<13} {size:>9,} entries  build {secs:6.3f} s  "
        f"kept {kept / MiB:7.1f} MiB  peak {peak / MiB:7.1f} MiB  {rate:>10,.0f} lookups/s"
    )


def main(argv: Sequence[str]) -> None:
    sizes = [int(a) for a in argv] or [100, 10_000, 1_000_000]
    print(f"Python {sys.version.split()[0]}")
    for size in sizes:
        run(size)


if __name__ == "__main__":
    main(sys.argv[1:])
