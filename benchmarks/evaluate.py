"""Decisions per second of ``mailpolicy.evaluate`` on one core (not a test).

Run from the repository root, after ``pip install -e .``::

    python benchmarks/evaluate.py                 # lists of 100, 10,000 and 1,000,000 entries
    python benchmarks/evaluate.py 100 10000       # other sizes
    python benchmarks/evaluate.py --quick         # fewer sessions and repeats

The policy has every check of docs/settings.md on (lists, DNSBLs, client host
names, HELO/sender/recipient checks, limits, sender ownership, content checks)
and black/white lists of N entries in all: client networks of both families,
sender addresses and domains, HELO names, client host names, recipients and a
two-criterion rule (see workload.py). The DNS answers every session needs are
put in its ``Session`` beforehand, so the figure is the engine's, not a
resolver's.

Three figures per size, each the best of several timed passes over the same
stream of decisions:

* ``rcpt``: RCPT decisions only (the stage where every list and nearly every
  check runs: the worst case);
* ``session``: every decision of each transaction (CONNECT, MAIL, RCPT...,
  DATA, END_OF_DATA), in order;
* ``decide``: the ``session`` stream through ``mailpolicy.decide``, as an
  adapter asks (one walk that would also say which DNS answers are missing;
  here none is).

Each transaction's decisions share one ``mailpolicy.Memo``, as a
connection's do in a server; every timed pass starts with new memos.

The ratio is the time per decision with 1,000,000 entries over the time with
100 (1.00 = the big list costs nothing; 1.20 = 20 % slower).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload

import mailpolicy
from mailpolicy import (
    Envelope,
    Memo,
    Policy,
    Session,
    Stage,
    Verdict,
    compile_policy,
    decide,
    evaluate,
)
from mailpolicy.config import settings_from_mapping

Stream = list[tuple[Session, Envelope]]
#: a stream with the memo of each decision's connection
Run = list[tuple[Session, Envelope, Memo]]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or cpu
    return (
        f"{platform.platform()}; {cpu}, {os.cpu_count()} logical CPUs\n"
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"mailpolicy {mailpolicy.__version__}"
    )


def pin_one_core() -> str:
    """Pin this process to one CPU, so the figure is one core's."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return f"pinned to CPU {cpus[-1]}"
    return "not pinned"


def build(size: int, sessions: int) -> tuple[Policy, Stream, Stream, float]:
    entries = workload.list_entries(size)
    mapping = workload.policy_mapping(workload.list_rules(entries))
    start = time.perf_counter()
    policy = compile_policy(settings_from_mapping(mapping, "<benchmark>"))
    built = time.perf_counter() - start
    world = workload.World()
    rcpt: Stream = []
    every: Stream = []
    for session, envelopes in workload.transactions(entries, world, sessions):
        for envelope in envelopes:
            session = world.complete(policy, session, envelope)
        for envelope in envelopes:
            every.append((session, envelope))
            if envelope.stage is Stage.RCPT:
                rcpt.append((session, envelope))
    return policy, rcpt, every, built


def _evaluate(policy: Policy, stream: Run) -> None:
    for session, envelope, memo in stream:
        evaluate(policy, session, envelope, memo)


def _adapter(policy: Policy, stream: Run) -> None:
    for session, envelope, memo in stream:
        if not isinstance(decide(policy, session, envelope, memo), Verdict):
            raise AssertionError("a DNS answer is missing from the prepared session")


def rate(run: Callable[[Policy, Run], None], policy: Policy, stream: Stream, repeats: int) -> float:
    """Decisions per second: the best of ``repeats`` passes."""
    best = float("inf")
    run(policy, fresh(stream[: len(stream) // 10]))  # warm up
    for _ in range(repeats):
        # Each pass starts with new memos (one per transaction, as one per
        # connection in a server): nothing memoised carries over.
        copies = fresh(stream)
        gc.collect()
        start = time.perf_counter()
        run(policy, copies)
        best = min(best, time.perf_counter() - start)
    return len(stream) / best


def fresh(stream: Stream) -> Run:
    """The stream with a new :class:`Memo` for each session."""
    memos: dict[int, Memo] = {}
    return [(s, e, memos.setdefault(id(s), Memo())) for s, e in stream]


def outcomes(policy: Policy, stream: Stream) -> str:
    """What the stream's decisions were: the share of each deciding rule kind."""
    tally: Counter[str] = Counter()
    for session, envelope in stream:
        verdict = evaluate(policy, session, envelope)
        rule = verdict.rule or "-"
        if rule.startswith("security.advanced.dnsbl"):
            kind = "dnsbl"
        elif rule.startswith("security.lists."):
            kind = "list white" if verdict.action.value == "accept" else "list black"
        else:
            kind = rule.rsplit(".", 1)[-1] if rule != "-" else "accepted"
        tally[f"{kind} ({verdict.action.value})"] += 1
    total = sum(tally.values())
    return ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in tally.most_common(8))


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[100, 10_000, 1_000_000])
    parser.add_argument("--sessions", type=int, default=4000, help="transactions per stream")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (best is kept)")
    parser.add_argument("--quick", action="store_true", help="1000 sessions, 3 passes")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.repeats = 1000, 3
    print(machine())
    print(
        f"one core: {pin_one_core()}; {args.sessions} sessions per stream, best of {args.repeats}"
    )
    print()
    header = f"{'entries':>10} {'build s':>8} {'rcpt/s':>10} {'session/s':>10} {'decide/s':>11}"
    print(header)
    results: dict[int, tuple[float, float, float]] = {}
    notes: list[str] = []
    for size in args.sizes:
        policy, rcpt, every, built = build(size, args.sessions)
        figures = (
            rate(_evaluate, policy, rcpt, args.repeats),
            rate(_evaluate, policy, every, args.repeats),
            rate(_adapter, policy, every, args.repeats),
        )
        results[size] = figures
        print(
            f"{size:>10,} {built:>8.2f} {figures[0]:>10,.0f} {figures[1]:>10,.0f} "
            f"{figures[2]:>11,.0f}",
            flush=True,
        )
        notes.append(f"{size:>10,}: RCPT decisions: {outcomes(policy, rcpt)}")
        del policy, rcpt, every
        gc.collect()
    print()
    print("what the RCPT decisions were (deciding rule, action):")
    print("\n".join(notes))
    small, big = min(results), max(results)
    if small != big:
        print()
        print(f"time per decision, {big:,} entries / {small:,} entries (target <= 1.20):")
        for i, name in enumerate(("rcpt", "session", "decide")):
            print(f"  {name:<9} {results[small][i] / results[big][i]:.2f}")
    print()
    worst = min(min(f) for f in results.values())
    print(f"slowest figure: {worst:,.0f} decisions/s (target >= 100,000)")


if __name__ == "__main__":
    main(sys.argv[1:])
