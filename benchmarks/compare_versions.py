"""``mailpolicy serve`` of this checkout against another one, interleaved (not a test).

Did a change make the server slower? Give the ``src`` folder of another
checkout (``git worktree add /tmp/old REV``); both versions serve the same
policy (``benchmarks/serve.py``'s, 10,000-entry lists), the same static zone
and Maildir delivery, one after the other in alternating rounds, driven by
Postfix's ``smtp-source``. Prints messages per second and the server's CPU
time per message for each round, the medians, and the ratio new / old::

    git worktree add /tmp/old 7bea4c8
    python benchmarks/compare_versions.py --old /tmp/old/src --rounds 5

The old checkout must be importable with this environment's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload
from serve import ZONE, Server, free_port, machine, serve_policy, smtp_source

NEW_SRC = Path(__file__).resolve().parent.parent / "src"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def one_round(
    src: Path, policy: Path, zone: Path, folder: Path, args: argparse.Namespace
) -> tuple[float, float]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mailpolicy",
        "serve",
        "--log-level",
        "error",
        "--policy",
        str(policy),
        "--listen",
        f"127.0.0.1:{port}",
        "--dns",
        str(zone),
        "--maildir",
        str(folder / f"maildir-{port}"),
        *(shlex.split(args.new_args) if src == NEW_SRC else ()),
    ]
    server = Server(command, port, env={**os.environ, "PYTHONPATH": str(src)})
    try:
        smtp_source(port, args.sessions, max(50, args.messages // 10), args.length)  # warm-up
        before = cpu_seconds(server.proc.pid)
        rate = smtp_source(port, args.sessions, args.messages, args.length)
        cpu = cpu_seconds(server.proc.pid) - before
    finally:
        server.stop()
    return rate, cpu / args.messages * 1000


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, type=Path, help="the other checkout's src folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=10, help="smtp-source -s")
    parser.add_argument("--messages", type=int, default=1000, help="smtp-source -m")
    parser.add_argument("--length", type=int, default=1000, help="smtp-source -l")
    parser.add_argument("--every-check", action="store_true", help="the policy with every check on")
    parser.add_argument(
        "--new-args",
        default="",
        help='extra serve arguments for this checkout only, e.g. "--metrics 127.0.0.1:0"',
    )
    args = parser.parse_args(argv)
    print(machine())
    print(f"old: {args.old}  new: {NEW_SRC}")
    print(
        f"smtp-source -s {args.sessions} -m {args.messages} -l {args.length}, {args.rounds} rounds"
    )
    results: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="mailpolicy-versions-") as tmp:
        folder = Path(tmp)
        policy = folder / "policy.toml"
        policy.write_text(workload.to_toml(serve_policy(args.every_check)))
        zone = folder / "zone.json"
        zone.write_text(json.dumps(ZONE))
        for i in range(args.rounds):
            # alternate which goes first, so drift does not favour one side
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            for name in order:
                src = args.old if name == "old" else NEW_SRC
                rate, cpu_ms = one_round(src, policy, zone, folder, args)
                results[name].append((rate, cpu_ms))
                print(
                    f"round {i + 1} {name}: {rate:8,.0f} messages/s, {cpu_ms:.2f} ms CPU/message",
                    flush=True,
                )
    med = {
        name: (statistics.median(r for r, _ in rows), statistics.median(c for _, c in rows))
        for name, rows in results.items()
    }
    for name, (rate, cpu) in med.items():
        print(f"median {name}: {rate:8,.0f} messages/s, {cpu:.2f} ms CPU/message")
    print(
        f"new / old: {med['new'][0] / med['old'][0]:.2f}x messages/s, "
        f"{med['new'][1] / med['old'][1]:.2f}x CPU per message"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
