"""User-space instructions per SMTP session of ``mailpolicy serve`` (not a
test: it prints figures).

Runs ``serve --workers 1`` under ``valgrind --tool=callgrind`` with
``serve.py``'s policy (every check on, 10,000 sender entries, 1,000 client
networks) and its zone, served by a ``ZoneServer`` on loopback (TTL 0 by
default: every session asks its three questions, as in ``serve.py``). It
drives the server with ``smtp-source -s 1`` from 127.0.0.1, zeroes the
counters after the warm-up sessions, and dumps them after the measured ones.

CPU time on a shared machine moves by a third from run to run; this count
does not (two runs of the same code agree within about 0.3 %), so it is the
way to compare two checkouts::

    python benchmarks/instructions.py                        # this checkout
    PYTHONPATH=/tmp/old/src python benchmarks/instructions.py

Needs valgrind (``callgrind_control``) and Postfix's ``smtp-source``.
Under valgrind the server runs about 50 times slower: 300 sessions take
about half a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as bench
import workload

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer

CLIENT = "127.0.0.1"


def zone() -> dict[str, object]:
    """``serve.py``'s zone, for a client on 127.0.0.1."""
    out = dict(bench.ZONE)
    del out[bench.ADDRESS]
    out[CLIENT] = {"PTR": [bench.HELO]}
    out[bench.HELO] = {"A": [CLIENT]}
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((CLIENT, 0))
        return int(sock.getsockname()[1])


def callgrind(command: str, pid: int) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)


def total(dump: Path) -> int:
    """The instruction count of a callgrind dump."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {dump}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=300, help="measured (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="before (default 50)")
    parser.add_argument("--length", type=int, default=1000, help="smtp-source -l")
    parser.add_argument("--dns-ttl", type=int, default=0, help="TTL of every answer")
    parser.add_argument("--log-level", default="error", help="serve's (default error)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"instructions.py: {tool} is not installed", file=sys.stderr)
            return 2
    with (
        tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as where,
        ZoneServer(StaticZone.from_mapping(zone()), ttl=args.dns_ttl).run_in_thread() as dns,
    ):
        folder = Path(where)
        policy = bench.serve_policy(bench.restriction_lists())
        policy["dns"] = {"nameservers": [dns.nameserver]}
        (folder / "policy.toml").write_text(workload.to_toml(policy))
        port = free_port()
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={folder}/callgrind.%p",
            sys.executable,
            *("-m", "mailpolicy", "serve", "--workers", "1", "--log-level", args.log_level),
            *("--policy", str(folder / "policy.toml"), "--listen", f"{CLIENT}:{port}"),
            *("--maildir", str(folder / "maildir")),
        ]
        with open(folder / "serve.log", "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300  # loading the policy is slow under valgrind
            while not bench.listening(port):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not listen: {folder / 'serve.log'}")
                time.sleep(0.2)
            bench.smtp_source(port, 1, args.warmup, args.length, address=CLIENT)
            subprocess.run(
                ["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True
            )
            took = bench.smtp_source(port, 1, args.sessions, args.length, address=CLIENT)
            subprocess.run(
                ["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True
            )
            dumps = sorted(folder.glob(f"callgrind.{server.pid}.*"))
            if not dumps:
                raise RuntimeError("callgrind wrote no dump")
            count = total(dumps[-1])
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(
        f"mailpolicy serve --workers 1, {args.sessions} sessions after {args.warmup} "
        f"(DNS TTL {args.dns_ttl}, --log-level {args.log_level}, {took:.0f} s under valgrind)"
    )
    print(f"user-space instructions a session: {count / args.sessions:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
