"""Where a session's time goes, seen on the wire (not a test: it prints figures).

Runs ``smtp-source`` against a server that is already listening, captures
loopback with ``tcpdump`` meanwhile, and reads the capture: for each SMTP
step, how long the server took from the client's packet to its reply and
the client from a reply to its next packet; for each DNS question type, how
long the nameserver took to answer and when, after the client's SYN, the
question left. Medians over the sessions. It needs root (``tcpdump``) and
sees only loopback traffic.

    python benchmarks/latency.py --port 2526 --dns-port 5353 --sessions 1

Nothing is assumed about the server: run it against ``mailpolicy serve`` and
Postfix alike (``benchmarks/serve.py`` shows how to start both with the
same restrictions and a static DNS server).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import itertools
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_Event = tuple[float, str, object, object]


def read_pcap(path: Path, smtp_port: int, dns_port: int) -> list[_Event]:
    """``(time, kind, key, detail)`` for the packets of interest: kinds
    ``syn``, ``c`` (client data), ``s`` (server data), ``cfin``, ``q`` (DNS
    question), ``a`` (DNS answer)."""
    data = path.read_bytes()
    nano = struct.unpack("<I", data[:4])[0] == 0xA1B23C4D
    link = struct.unpack("<I", data[20:24])[0]
    skip = {1: 14, 113: 16, 276: 20}.get(link, 0)  # Ethernet, Linux cooked v1, v2
    events: list[_Event] = []
    off = 24
    while off + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack("<IIII", data[off : off + 16])
        off += 16
        packet = data[off : off + incl]
        off += incl
        ts = sec + frac / (1e9 if nano else 1e6)
        ip = packet[skip:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        ihl, proto = (ip[0] & 15) * 4, ip[9]
        l4 = ip[ihl : struct.unpack(">H", ip[2:4])[0]]
        sport, dport = struct.unpack(">HH", l4[:4])
        if proto == 6:
            flags, payload = l4[13], l4[(l4[12] >> 4) * 4 :]
            if dport == smtp_port:
                if flags & 2 and not flags & 16:
                    events.append((ts, "syn", sport, ""))
                elif payload:
                    events.append((ts, "c", sport, payload[:4].decode("latin-1").upper()))
                elif flags & 1:
                    events.append((ts, "cfin", sport, ""))
            elif sport == smtp_port and payload:
                events.append((ts, "s", dport, payload[:3].decode("latin-1")))
        elif proto == 17 and dns_port in (sport, dport):
            payload = l4[8:]
            i = 12
            while i < len(payload) and payload[i]:
                i += payload[i] + 1
            qtype = struct.unpack(">H", payload[i + 1 : i + 3])[0]
            qid = struct.unpack(">H", payload[:2])[0]
            key = (sport if dport == dns_port else dport, qid)
            events.append((ts, "q" if dport == dns_port else "a", key, qtype))
    events.sort(key=lambda e: e[0])
    return events


_TYPES = {1: "A", 12: "PTR", 15: "MX", 28: "AAAA", 16: "TXT"}


def report(events: list[_Event]) -> bool:
    """Print the medians; ``False`` when fewer than two whole sessions were seen."""
    sessions: dict[object, list[_Event]] = collections.defaultdict(list)
    for e in events:
        if e[1] in ("syn", "c", "s", "cfin"):
            sessions[e[2]].append(e)
    server: dict[str, list[float]] = collections.defaultdict(list)
    client: dict[str, list[float]] = collections.defaultdict(list)
    starts: list[float] = []
    for seq in sessions.values():
        if seq[0][1] != "syn":
            continue  # began before the capture
        starts.append(seq[0][0])
        previous, step = seq[0], "connect"
        for e in seq[1:]:
            if e[1] == "s":
                server[step].append(e[0] - previous[0])
                previous = e
            else:
                if previous[1] == "s":
                    client[f"after the reply to {step}"].append(e[0] - previous[0])
                text = str(e[3])
                if e[1] == "cfin":
                    step = "close"
                elif previous[1] == "s" and previous[3] == "354":
                    step = "message"  # whatever its first line says
                else:
                    step = text
                previous = e
    starts.sort()
    asked: dict[object, _Event] = {}
    waits: dict[object, list[float]] = collections.defaultdict(list)
    sent: dict[object, list[float]] = collections.defaultdict(list)
    for e in events:
        if e[1] == "q":
            asked[e[2]] = e
            i = bisect.bisect_right(starts, e[0]) - 1
            if i >= 0:
                sent[e[3]].append(e[0] - starts[i])
        elif e[1] == "a" and e[2] in asked:
            waits[e[3]].append(e[0] - asked[e[2]][0])

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:7.3f}"

    if len(starts) < 2:
        print(f"{len(starts)} whole sessions in the capture: nothing to report", file=sys.stderr)
        return False
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(f"{len(starts)} sessions, one every {ms(gaps).strip()} ms (median)")
    print("server, from the client's packet to the reply (ms, median):")
    for step, values in server.items():
        print(f"  {step:<10} {ms(values)}   ({len(values)})")
    print("client, from a reply to its next packet (ms, median):")
    for step, values in client.items():
        print(f"  {step:<30} {ms(values)}")
    print("DNS (ms, median): question sent after the SYN, answered after")
    for qtype, values in sent.items():
        name = _TYPES.get(int(str(qtype)), str(qtype))
        print(f"  {name:<5} {ms(values)} {ms(waits.get(qtype, [0.0]))}   ({len(values)} questions)")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the SMTP server's port")
    parser.add_argument("--dns-port", type=int, default=53, help="the nameserver's UDP port")
    parser.add_argument("--sessions", type=int, default=1, help="smtp-source -s")
    parser.add_argument("--messages", type=int, default=800, help="smtp-source -m")
    parser.add_argument("--helo", default="client.example.net")
    parser.add_argument("--sender", default="a@known.example")
    parser.add_argument("--recipient", default="r@example.com")
    parser.add_argument("--interface", default="lo")
    args = parser.parse_args()
    for tool in ("tcpdump", "smtp-source"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"latency.py needs {tool} (apt-get install tcpdump postfix)", file=sys.stderr)
            return 2
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    command = [
        source, "-s", str(args.sessions), "-l", "1000", "-M", args.helo,
        "-f", args.sender, "-t", args.recipient, f"{args.host}:{args.port}",
    ]  # fmt: skip
    subprocess.run([*command[:-1], "-m", "100", command[-1]], check=True)  # warm up
    with tempfile.TemporaryDirectory() as folder:
        capture = Path(folder) / "capture.pcap"
        tcpdump = subprocess.Popen(
            [
                "tcpdump", "-i", args.interface, "-n", "--immediate-mode", "-U", "-s", "200",
                "-w", str(capture), f"tcp port {args.port} or udp port {args.dns_port}",
            ],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1)
        subprocess.run([*command[:-1], "-m", str(args.messages), command[-1]], check=True)
        time.sleep(0.5)
        tcpdump.send_signal(signal.SIGINT)
        tcpdump.wait(10)
        return 0 if report(read_pcap(capture, args.port, args.dns_port)) else 1


if __name__ == "__main__":
    sys.exit(main())
