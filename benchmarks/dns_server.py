"""What a nameserver spends on our questions, with and without EDNS (not a test).

A ``ZoneServer`` runs in a process of its own; this process sends it the
three questions a message costs (the client's PTR, its name's A, the sender
domain's MX), plain and with an OPT record (1232-byte payload), and prints
the server process's CPU time per question, interleaved::

    python benchmarks/dns_server.py

``LiveResolver`` sends plain queries, as glibc's stub resolver (and so
Postfix) does; this shows what the other choice would cost the server.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import dns.message

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dns_client import zone_server

QUESTIONS = [
    ("1.0.0.127.in-addr.arpa", "PTR"),
    ("client.example.net", "A"),
    ("known.example", "MX"),
]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with zone_server() as (server, nameserver):
        host, port = nameserver.rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, int(port)))
            sock.settimeout(5)
            for number in range(args.rounds):
                for edns in (False, True):
                    wires = [
                        dns.message.make_query(
                            name, rtype, use_edns=0 if edns else False, payload=1232
                        ).to_wire()
                        for name, rtype in QUESTIONS
                    ]
                    before = cpu_seconds(server.pid)
                    for i in range(args.questions):
                        sock.send(wires[i % len(wires)])
                        sock.recv(4096)
                    spent = cpu_seconds(server.pid) - before
                    kind = "EDNS (OPT, 1232)" if edns else "plain"
                    print(
                        f"round {number + 1}, {kind:<16}: "
                        f"{1e6 * spent / args.questions:5.0f} us of server CPU a question"
                    )


if __name__ == "__main__":
    main()
