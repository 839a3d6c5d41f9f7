"""Requests per second and latency of ``mailpolicy policyd``, beside postfwd (not a test).

Run: .venv/bin/python benchmarks/policyd.py [--sizes 100,10000,1000000] [--seconds 5]

For each list size N the policy has one black list of N sender addresses and
N client networks (``[[security.lists]]``); postfwd (Debian's ``postfwd``
package) gets the equivalent rules, the same entries in ``file:`` lists. Both
servers run as their own processes; the load is Postfix's: one request at a
time per connection, RCPT requests as smtpd sends them (most senders and
clients not listed, one in ten listed). On 1 and 10 connections for
``--seconds`` each: requests/s and the 50th and 99th percentile latency. The
ratio is mailpolicy's rate over postfwd's. postfwd scans its lists, so it is
measured up to ``--postfwd-max`` entries (default 10,000).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REQUEST = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "client_address={client}\nclient_name=unknown\nreverse_client_name=unknown\n"
    "helo_name=client.example.org\nsender={sender}\nrecipient=r@example.com\n"
    "recipient_count=0\nqueue_id=\ninstance={instance}\nsize=0\nsasl_method=\n"
    "sasl_username=\nencryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
    "policy_context=recipient\n\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entries(n: int) -> tuple[list[str], list[str]]:
    senders = [f"user{i}@zone{i % 1000}.example.net" for i in range(n)]
    networks = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(n)]
    return senders, networks


def _requests(n: int, count: int = 5000) -> list[bytes]:
    rng = random.Random(n)
    out = []
    for i in range(count):
        listed = i % 10 == 0
        k = rng.randrange(n)
        sender = f"user{k}@zone{k % 1000}.example.net" if listed else f"x{i}@ok.example.org"
        client = f"198.51.100.{i % 250 + 1}"
        out.append(REQUEST.format(client=client, sender=sender, instance=f"{i}.0").encode())
    return out


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")


def start_mailpolicy(tmp: Path, n: int) -> tuple[subprocess.Popen[bytes], int]:
    senders, networks = _entries(n)
    policy = tmp / f"policy{n}.toml"
    with open(policy, "w") as f:
        f.write('[general]\nhostname = "mx.example.com"\nlocal_domains = ["example.com"]\n')
        f.write('[[security.lists]]\nname = "senders"\nlist = "black"\nsender = [\n')
        f.writelines(f'"{s}",\n' for s in senders)
        f.write("]\n")
        f.write('[[security.lists]]\nname = "clients"\nlist = "black"\nclient = [\n')
        f.writelines(f'"{c}",\n' for c in networks)
        f.write("]\n")
    port = _free_port()
    cmd = [sys.executable, "-m", "mailpolicy", "policyd", "--policy", str(policy)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    _wait_port(port, proc, 600)
    return proc, port


def start_postfwd(tmp: Path, n: int) -> tuple[list[str], int]:
    senders, networks = _entries(n)
    (tmp / f"senders{n}").write_text("".join(s + "\n" for s in senders))
    (tmp / f"clients{n}").write_text("".join(c + "\n" for c in networks))
    rules = tmp / f"postfwd{n}.cf"
    rules.write_text(
        f"id=SENDERS; sender==file:{tmp}/senders{n}; action=REJECT listed sender\n"
        f"id=CLIENTS; client_address==file:{tmp}/clients{n}; action=REJECT listed client\n"
    )
    port = _free_port()
    exe = shutil.which("postfwd") or shutil.which("postfwd2") or "/usr/sbin/postfwd"
    cmd = [exe, "--file", str(rules), "--interface", "127.0.0.1", "--port", str(port)]
    cmd += ["--nodns", "--perfmon", "--noidlestats", "--cache", "0"]
    cmd += ["-u", "nobody", "-g", "nogroup", "--cache_port", str(_free_port())]
    cmd += ["--pidfile", str(tmp / f"postfwd{n}.pid")]
    # postfwd puts itself in the background: wait for its port, stop it with -k
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    _wait_port(port, None, 600)
    stop = [exe, "--file", str(rules), "--pidfile", str(tmp / f"postfwd{n}.pid"), "-k"]
    return stop, port


def _client(port: int, seconds: float, requests: list[bytes], offset: int, out: Any) -> None:
    """One connection, one request at a time (as smtpd asks): latencies in ms."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    i = offset
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        sock.sendall(requests[i % len(requests)])
        answer = b""
        while not answer.endswith(b"\n\n"):
            answer += sock.recv(4096)
        latencies.append((time.perf_counter() - t0) * 1000)
        i += 1
    sock.close()
    out.put(latencies)


def _load(port: int, connections: int, seconds: float, requests: list[bytes]) -> dict[str, float]:
    queue: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_client, args=(port, seconds, requests, k * 997, queue))
        for k in range(connections)
    ]
    for p in procs:
        p.start()
    latencies: list[float] = []
    for _ in procs:
        latencies += queue.get()
    for p in procs:
        p.join()
    latencies.sort()
    return {
        "rate": len(latencies) / seconds,
        "p50": latencies[len(latencies) // 2] if latencies else 0.0,
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
    }


def measure(port: int, connections: int, seconds: float, n: int) -> dict[str, float]:
    requests = _requests(n)
    _load(port, connections, 0.5, requests)  # warm up
    return _load(port, connections, seconds, requests)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,10000,1000000")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--postfwd-max", type=int, default=10_000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    have_postfwd = any(
        shutil.which(x) or os.path.exists(f"/usr/sbin/{x}") for x in ("postfwd", "postfwd2")
    )
    print(
        f"{'entries':>9} {'conns':>5} | {'mailpolicy req/s':>16} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'postfwd req/s':>13} {'p99 ms':>7} | {'ratio':>7}"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tmp.chmod(0o755)  # postfwd reads its lists as nobody
        for n in sizes:
            t0 = time.perf_counter()
            mp, mp_port = start_mailpolicy(tmp, n)
            load_s = time.perf_counter() - t0
            pf = None
            try:
                if have_postfwd and n <= args.postfwd_max:
                    pf, pf_port = start_postfwd(tmp, n)
                for conns in (1, 10):
                    m = measure(mp_port, conns, args.seconds, n)
                    line = (
                        f"{n:>9,} {conns:>5} | {m['rate']:>16,.0f} {m['p50']:>7.2f} "
                        f"{m['p99']:>7.2f} | "
                    )
                    if pf is not None:
                        p = measure(pf_port, conns, args.seconds, n)
                        ratio = m["rate"] / p["rate"] if p["rate"] else float("inf")
                        line += f"{p['rate']:>13,.0f} {p['p99']:>7.2f} | {ratio:>6.1f}x"
                    else:
                        line += f"{'not run':>13} {'':>7} | {'':>7}"
                    print(line, flush=True)
            finally:
                mp.terminate()
                mp.wait(30)
                if pf is not None:
                    subprocess.run(pf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(2)  # its children go away after the master
            print(f"{'':>9} (policy with {n:,} + {n:,} entries loaded in {load_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
