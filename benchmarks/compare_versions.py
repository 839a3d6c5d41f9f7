"""``mailpolicy serve`` of this checkout against another one, interleaved (not a test).

Did a change make the server slower? Give the ``src`` folder of another
checkout (``git worktree add /tmp/old REV``); both versions serve the same
policy (``benchmarks/serve.py``'s: 10,000 sender entries, 1,000 client
networks, the reverse-name and sender-domain checks), answered from the same
static zone (``--dns``, in process: no DNS server to share the CPU with),
with Maildir delivery, one after the other in alternating rounds, driven by
Postfix's ``smtp-source`` on 127.0.0.1. Prints messages per second and the
server's CPU time per message (the whole process tree) for each round, the
medians, and the ratio new / old::

    git worktree add /tmp/old 7bea4c8
    python benchmarks/compare_versions.py --old /tmp/old/src --rounds 5

The old checkout must be importable with this environment's packages and
read this checkout's policy file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload
from evaluate import machine
from serve import HELO, Process, restriction_lists, serve_policy, smtp_source, tree_cpu

NEW_SRC = Path(__file__).resolve().parent.parent / "src"
CLIENT = "127.0.0.1"
#: the client's name and the sender's domain, as serve.py's zone has them
ZONE = {
    CLIENT: {"PTR": [HELO]},
    HELO: {"A": [CLIENT]},
    "known.example": {"MX": ["10 mx.known.example"]},
    "mx.known.example": {"A": ["192.0.2.25"]},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((CLIENT, 0))
        return int(sock.getsockname()[1])


def one_round(
    src: Path, policy: Path, zone: Path, folder: Path, args: argparse.Namespace
) -> tuple[float, float]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mailpolicy",
        "serve",
        *("--log-level", "error", "--policy", str(policy), "--listen", f"{CLIENT}:{port}"),
        *("--dns", str(zone), "--maildir", str(folder / f"maildir-{port}")),
        *(shlex.split(args.new_args) if src == NEW_SRC else ()),
    ]
    env = {**os.environ, "PYTHONPATH": str(src)}
    server = Process(f"serve {src}", port, command, folder / f"serve-{port}.log", env=env)
    try:
        server.wait()
        warm_up = max(50, args.messages // 10)
        smtp_source(port, args.sessions, warm_up, args.length, CLIENT)
        before = tree_cpu(server.root)
        rate = args.messages / smtp_source(port, args.sessions, args.messages, args.length, CLIENT)
        cpu = tree_cpu(server.root) - before
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
        policy.write_text(workload.to_toml(serve_policy(restriction_lists())))
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
