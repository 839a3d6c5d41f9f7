"""``mailpolicy serve`` beside Postfix 3.7, DNS checks on both sides, in one
interleaved run (not a test: it prints figures).

Run as root from the repository root, after ``pip install -e .``, on a
machine with Postfix installed (Debian: ``apt-get install postfix``; no
Postfix instance needs to be configured or running: this script starts its
own, private one)::

    python benchmarks/serve.py                  # 3 rounds at 1, 10, 50 sessions
    python benchmarks/serve.py --rounds 5 --messages 3000
    python benchmarks/serve.py --quick          # 1 round, few messages: a smoke run

**The namespace.** The script re-executes itself as PID 1 of a new network,
mount and PID namespace (``unshare``), as ``tests/postfix_instance.py`` does.
Inside: loopback up, with 198.51.100.7 (the address every server listens on
and smtp-source connects from) and 198.51.100.8 (a client without a PTR, for
the "checks are live" probe); ``/etc/resolv.conf`` bind-mounted to point at
the project's ``ZoneServer`` on 127.0.0.1:53, a process of its own serving a
static zone over UDP; ``/etc/hosts`` with localhost only and
``hosts: files dns``, so that every name of the test goes through that
server. When PID 1 exits, the kernel ends everything left in the namespace.

**The servers**, all started once and kept running; each gets the same
``smtp-source -s N -m M -l 1024 -M client.example.net -f a@known.example
-t r@example.com 198.51.100.7:PORT`` in turn:

* ``aiosmtpd``: a bare aiosmtpd ``Controller`` that accepts every message
  and drops it, no checks: the floor for an asyncio SMTP server in Python;
* ``postfix``: a throw-away Postfix (own config, queue and data directories,
  chroot off, every transport ``discard:``, logging to a file through
  postlogd);
* ``mailpolicy serve --workers 1`` and ``--workers 2``: the real command,
  DNS from the system resolver (the namespace's, i.e. the same ZoneServer over
  UDP as Postfix's), delivery to a Maildir in a temporary folder (fsync as
  shipped), logging at the default level to a file.

**The same restrictions on both sides**: a black list of 10,000 sender
addresses (Postfix: ``check_sender_access hash:``), a black list of 1,000
client networks of both families (``check_client_access cidr:``),
``reject_unknown_reverse_client_hostname`` (policy: ``connection_policy.
reject_unknown_reverse_client_hostname``), ``reject_unknown_sender_domain``
(``sender_policy.reject_unknown_sender_domain``), the HELO, sender and
recipient syntax checks, relay control, pipelining, size, recipient and
per-client connection limits. The zone answers the client's PTR and forward
A, and the sender domain's MX and its host's A, so every message passes
every check and is accepted. Before measuring, three swaks probes per server
show the checks are live: a sender domain not in the zone and a client
without a PTR must be refused, the benchmark's own envelope accepted.

**What is measured.** For each round, for each concurrency, each server in
turn (the order rotated per round): messages per second (smtp-source's wall
time), and the server's CPU time per message: user + system time of the
whole process tree (``/proc/PID/stat``: utime, stime and the reaped
children's cutime, cstime) from before the run until the server has settled
(Postfix: its queue is empty, every message handed to ``discard``). The DNS
server's CPU during each server's run is printed apart: it serves both.
Every answer has TTL 0 by default (``--dns-ttl``), so both servers ask the
DNS for every message: Postfix has no cache of its own, and mailpolicy's
resolver, which keeps answers for their TTL, keeps none. ``--dns-ttl 300``
shows what that cache saves. The figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import workload  # noqa: E402
from evaluate import machine  # noqa: E402
from postfix_instance import (  # noqa: E402
    BASE_MAIN_CF,
    MASTER_CF,
    can_run,
    use_loopback_resolver,
)

#: the servers listen here and smtp-source connects from here (a connection
#: to a local address leaves from that address)
ADDRESS = "198.51.100.7"
#: a client the zone gives no PTR: the reverse-name check must refuse it
NO_PTR = "198.51.100.8"
HELO = "client.example.net"
SENDER = "a@known.example"
RECIPIENT = f"r@{workload.DOMAIN}"
#: a sender domain the zone does not know: the sender-domain check must refuse it
UNKNOWN_SENDER = "a@unknown-domain.example"
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

ZONE: dict[str, Any] = {
    ADDRESS: {"PTR": [HELO]},
    HELO: {"A": [ADDRESS]},
    "known.example": {"MX": ["10 mx.known.example"]},
    "mx.known.example": {"A": ["192.0.2.25"]},
    workload.DOMAIN: {"MX": [f"10 {workload.HOSTNAME}"]},
    workload.HOSTNAME: {"A": [ADDRESS]},
}

SENDERS = 10_000
CLIENT_NETWORKS = 1_000


def restriction_lists() -> dict[str, list[str]]:
    """The black lists both servers hold: 10,000 senders, 1,000 networks."""
    # workload.list_entries(n) gives 20 % senders; 2,500 entries give 1,000 networks
    senders = workload.list_entries(SENDERS * 5)["sender"][:SENDERS]
    clients = workload.list_entries(2_500)["client"][:CLIENT_NETWORKS]
    return {"sender": senders, "client": clients}


# ---------------------------------------------------------------------------
# The two configurations


def serve_policy(lists: dict[str, list[str]]) -> dict[str, Any]:
    """The mailpolicy side: the lists and the checks of the Postfix side."""
    rules = [
        {"name": "bad-clients", "list": "black", "text": "Blocked", "client": lists["client"]},
        {"name": "bad-senders", "list": "black", "sender": lists["sender"]},
    ]
    policy = workload.policy_mapping(rules, every_check=False)
    general = policy["general"]
    general["smtp_auth"] = {"enabled": False, "skip_for_local_network": False}
    general["max_attachment_size_mb"] = 0
    general["disable_auto_forwarding"] = False
    policy["relay"]["trusted_networks"] = ["192.0.2.0/28"]
    security = policy["security"]
    security["advanced"] = {
        "require_helo": True,
        "reject_invalid_helo": True,
        "reject_non_fqdn_helo": True,
        "reject_non_fqdn_recipient": True,
        "reject_unauth_pipelining": True,
    }
    security["sender_policy"] = {
        "reject_non_fqdn_sender": True,
        "reject_unknown_sender_domain": True,
    }
    security["connection_policy"] = {
        "max_connections_per_client": 100,
        "reject_unknown_reverse_client_hostname": True,
    }
    return policy


def postfix_main_cf(folder: Path, maps: dict[str, Path]) -> dict[str, str]:
    """The Postfix side: ``main.cf`` as a mapping (the test harness's base,
    then this benchmark's restrictions)."""
    main = dict(BASE_MAIN_CF)
    main.update(
        {
            "queue_directory": str(folder / "spool"),
            "data_directory": str(folder / "data"),
            "maillog_file": str(folder / "maillog"),
            "maillog_file_prefixes": str(folder),
            "myhostname": workload.HOSTNAME,
            "mydomain": workload.DOMAIN,
            "myorigin": "$myhostname",
            "mydestination": "$mydomain",
            "mynetworks": "192.0.2.0/28",
            "relay_domains": "branch.example.com",
            "inet_interfaces": ADDRESS,
            "inet_protocols": "ipv4",
            "message_size_limit": "10485760",
            "smtpd_recipient_limit": "50",
            "smtpd_client_connection_count_limit": "100",
            "smtpd_helo_required": "yes",
            "hopcount_limit": "30",
            "disable_vrfy_command": "yes",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": ", ".join(
                [
                    f"check_client_access cidr:{maps['clients']}",
                    f"check_sender_access hash:{maps['senders']}",
                    "permit_mynetworks",
                    "reject_invalid_helo_hostname",
                    "reject_non_fqdn_helo_hostname",
                    "reject_non_fqdn_sender",
                    "reject_non_fqdn_recipient",
                    "reject_unknown_reverse_client_hostname",
                    "reject_unknown_sender_domain",
                ]
            ),
            "smtpd_data_restrictions": "reject_unauth_pipelining",
            "smtpd_tls_security_level": "none",
        }
    )
    return main


def postfix_maps(folder: Path, lists: dict[str, list[str]]) -> dict[str, Path]:
    maps = folder / "maps"
    maps.mkdir()
    clients = maps / "clients.cidr"
    clients.write_text("".join(f"{net} REJECT Blocked\n" for net in lists["client"]))
    senders = maps / "senders"
    senders.write_text("".join(f"{address} REJECT\n" for address in lists["sender"]))
    return {"clients": clients, "senders": senders}


# ---------------------------------------------------------------------------
# Processes and their CPU time


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, utime + stime + cutime + cstime)`` in clock ticks."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every descendant, the reaped ones included
    (their time is in their parent's cutime/cstime, so a child that ends
    between two readings moves its time, it does not lose it)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (row := _stat(int(entry))) is not None:
            table[int(entry)] = row
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
            todo.extend(children.get(pid, ()))
    return total / CLOCK_TICKS


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stdout}{done.stderr}")
    return done.stdout


def listening(port: int) -> bool:
    """Something LISTENs on the port (read from /proc: a probe connection
    would count as a session)."""
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        return any(
            parts[3] == "0A" and parts[1].endswith(f":{port:04X}")
            for parts in (line.split() for line in f)
        )


def wait_listening(port: int, proc: subprocess.Popen[Any] | None, what: str) -> None:
    deadline = time.monotonic() + 60
    while not listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: nothing listens on port {port}")
        time.sleep(0.05)


class Process:
    """A server started as one process (its children are its workers)."""

    def __init__(
        self,
        name: str,
        port: int,
        command: list[str],
        log: Path,
        maildir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.maildir = maildir
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait(self) -> None:
        """Until it listens (the servers start side by side: less waiting)."""
        wait_listening(self.port, self.proc, self.name)

    @property
    def root(self) -> int:
        return self.proc.pid

    def settle(self) -> None:
        """Every accepted message is done before the 250 is sent."""

    def delivered(self) -> int | None:
        """Messages in the Maildirs (None: the server keeps nothing)."""
        if self.maildir is None:
            return None
        return sum(1 for p in self.maildir.glob("**/new/*") if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Postfix:
    """The private Postfix: CPU time is the master's tree (smtpd, cleanup,
    qmgr, trivial-rewrite, discard, anvil, postlogd ...)."""

    name = "postfix 3.7 (discard)"

    def __init__(self, folder: Path, port: int, lists: dict[str, list[str]]) -> None:
        self.folder = folder
        self.port = port
        self.conf = folder / "conf"
        folder.mkdir(mode=0o755)
        for name in ("conf", "spool", "data"):
            (folder / name).mkdir()
        owner = pwd.getpwnam("postfix")
        os.chown(folder / "data", owner.pw_uid, owner.pw_gid)
        maps = postfix_maps(folder, lists)
        main = postfix_main_cf(folder, maps)
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        master = MASTER_CF.replace("smtp      inet", f"{ADDRESS}:{port} inet", 1)
        (self.conf / "master.cf").write_text(master)
        run("postmap", "-c", str(self.conf), f"hash:{maps['senders']}")
        run("postfix", "-c", str(self.conf), "start")
        wait_listening(port, None, "postfix")
        pid_file = folder / "spool" / "pid" / "master.pid"
        self.root = int(pid_file.read_text().split()[0])

    def settle(self) -> None:
        """Wait until the queue is empty: discard has had every message."""
        spool = self.folder / "spool"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queued = [
                p
                for d in ("maildrop", "incoming", "active", "deferred")
                for p in spool.glob(f"{d}/**/*")
            ]
            if not any(p.is_file() for p in queued):
                return
            time.sleep(0.1)
        raise RuntimeError("postfix: the queue did not drain in 60 s")

    def delivered(self) -> int:
        """Messages the discard transport has had (its log lines)."""
        log = self.folder / "maillog"
        return sum(" status=sent " in line for line in log.read_text(errors="replace").splitlines())

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, check=False)


_AIOSMTPD = """
import signal, sys, threading
from aiosmtpd.controller import Controller
class Accept:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: queued"
# server_hostname given: without it aiosmtpd asks getfqdn() (the DNS) per connection
controller = Controller(
    Accept(), hostname=sys.argv[1], port=int(sys.argv[2]), server_hostname="mx.example.com"
)
controller.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
controller.stop()
"""

_DNS = """
import json, signal, sys, threading
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer
with open(sys.argv[1]) as f:
    zone = StaticZone.from_mapping(json.load(f))
ttl = int(sys.argv[2])
server = ZoneServer(zone, port=53, ttl=ttl, negative_ttl=ttl)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
# SIGUSR1: how many questions so far, on stdout
signal.signal(signal.SIGUSR1, lambda *a: print(len(server.queries), flush=True))
with server.run_in_thread():
    print("ready", flush=True)
    stop.wait()
"""


def dns_server(folder: Path, ttl: int) -> subprocess.Popen[str]:
    zone = folder / "zone.json"
    zone.write_text(json.dumps(ZONE))
    proc = subprocess.Popen(
        [sys.executable, "-c", _DNS, str(zone), str(ttl)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the DNS server did not start")
    return proc


def dns_questions(proc: subprocess.Popen[str]) -> int:
    """How many questions the DNS server has had so far."""
    assert proc.stdout is not None
    proc.send_signal(signal.SIGUSR1)
    return int(proc.stdout.readline())


def namespace(folder: Path) -> None:
    """Loopback with the test addresses; the resolver at 127.0.0.1:53."""
    run("ip", "link", "set", "lo", "up")
    for address in (ADDRESS, NO_PTR):
        run("ip", "addr", "add", f"{address}/32", "dev", "lo")
    use_loopback_resolver(folder)


# ---------------------------------------------------------------------------
# Driving


def smtp_source(
    port: int, sessions: int, messages: int, length: int, address: str = ADDRESS
) -> float:
    """Seconds smtp-source took for ``messages`` (it fails on any refusal)."""
    command = [
        shutil.which("smtp-source") or "/usr/sbin/smtp-source",
        *("-s", str(sessions), "-m", str(messages), "-l", str(length)),
        *("-M", HELO, "-f", SENDER, "-t", RECIPIENT),
        f"{address}:{port}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return elapsed


def probe(port: int, source: str, sender: str) -> str:
    """The first refusal (or the RCPT answer) swaks got: ``"450 4.7.25 ..."``."""
    done = subprocess.run(
        [
            "swaks",
            *("--server", ADDRESS, "--port", str(port), "--local-interface", source),
            *("--helo", HELO, "--from", sender, "--to", RECIPIENT),
            *("--quit-after", "RCPT", "--timeout", "20"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    replies: list[tuple[str, str]] = []  # (command, reply) from MAIL FROM on
    command = ""
    for line in done.stdout.splitlines():
        if line.startswith(" -> "):
            command = line[4:].split(":", 1)[0]
        elif line.startswith(("<-  ", "<** ")) and command in ("MAIL FROM", "RCPT TO"):
            replies.append((command, line[4:].strip()))
    refused = [r for _, r in replies if not r.startswith("2")]
    if refused:
        return refused[0]
    rcpt = [r for c, r in replies if c == "RCPT TO"]
    return rcpt[0] if rcpt else f"no answer (swaks exit {done.returncode})"


def checks_are_live(server: Any) -> str:
    """Refused: an unknown sender domain, a client without PTR; accepted: the
    benchmark's envelope. Raises when a check is not on."""
    unknown = probe(server.port, ADDRESS, UNKNOWN_SENDER)
    no_ptr = probe(server.port, NO_PTR, SENDER)
    good = probe(server.port, ADDRESS, SENDER)
    if unknown[:1] not in "45" or no_ptr[:1] not in "45" or not good.startswith("250"):
        raise RuntimeError(
            f"{server.name}: the DNS checks are not live: unknown sender domain -> {unknown!r}, "
            f"client without PTR -> {no_ptr!r}, benchmark envelope -> {good!r}"
        )
    return (
        f"checks are live, {server.name}: <{UNKNOWN_SENDER}> -> {unknown}; "
        f"client {NO_PTR} (no PTR) -> {no_ptr}; the benchmark's envelope -> {good[:3]}"
    )


class Sample:
    """One run: messages/s, server CPU ms per message, DNS server CPU ms and
    questions per message."""

    def __init__(self, rate: float, cpu_ms: float, dns_ms: float, questions: float) -> None:
        self.rate, self.cpu_ms, self.dns_ms, self.questions = rate, cpu_ms, dns_ms, questions


def measure(
    server: Any, dns: subprocess.Popen[str], sessions: int, messages: int, length: int
) -> Sample:
    asked = dns_questions(dns)
    before, dns_before = tree_cpu(server.root), tree_cpu(dns.pid)
    elapsed = smtp_source(server.port, sessions, messages, length)
    server.settle()
    time.sleep(0.2)  # the last sessions' close and log lines
    cpu, dns_cpu = tree_cpu(server.root) - before, tree_cpu(dns.pid) - dns_before
    asked = dns_questions(dns) - asked
    return Sample(
        messages / elapsed, 1000 * cpu / messages, 1000 * dns_cpu / messages, asked / messages
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    servers: Sequence[Any],
    concurrencies: Sequence[int],
    samples: dict[tuple[str, int], list[Sample]],
) -> None:
    names = [s.name for s in servers]
    mine = [n for n in names if n.startswith("mailpolicy")]

    def med(name: str, sessions: int, field: str) -> float:
        return median([getattr(s, field) for s in samples.get((name, sessions), [])])

    def ratio(name: str, sessions: int, field: str) -> float:
        return med(name, sessions, field) / med(Postfix.name, sessions, field)

    print()
    print(
        "medians over the rounds: messages/s | server CPU ms per message | "
        "DNS server CPU ms and questions per message"
    )
    width = max(len(n) for n in names) + 2
    for sessions in concurrencies:
        print(f"\n{sessions} concurrent session(s)")
        for name in names:
            rates = [s.rate for s in samples.get((name, sessions), [])]
            print(
                f"  {name:<{width}} {med(name, sessions, 'rate'):>7,.0f} msgs/s  "
                f"{med(name, sessions, 'cpu_ms'):>6.2f} ms CPU  "
                f"{med(name, sessions, 'dns_ms'):>5.2f} ms DNS "
                f"{med(name, sessions, 'questions'):>4.2f} questions  "
                f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)})"
            )
        for name in mine:
            print(
                f"  {name} / postfix: messages/s x{ratio(name, sessions, 'rate'):.2f}, "
                f"CPU per message x{ratio(name, sessions, 'cpu_ms'):.2f}"
            )
    # the table, ready for docs/performance.md
    print("\n| concurrent sessions | " + " | ".join(str(c) for c in concurrencies) + " |")
    print("|---|" + "---|" * len(concurrencies))
    rows: list[tuple[str, list[str]]] = []
    for name in names:
        rows.append((f"{name}, msgs/s", [f"{med(name, c, 'rate'):,.0f}" for c in concurrencies]))
    for name in mine:
        rows.append(
            (f"{name} / postfix", [f"**{ratio(name, c, 'rate'):.2f}**" for c in concurrencies])
        )
    for name in names:
        rows.append(
            (f"{name}, CPU ms/msg", [f"{med(name, c, 'cpu_ms'):.2f}" for c in concurrencies])
        )
    for name in names:
        cells = [
            f"{med(name, c, 'dns_ms'):.2f} ({med(name, c, 'questions'):.1f})" for c in concurrencies
        ]
        rows.append((f"DNS server CPU ms/msg (questions/msg), {name}", cells))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")


def spread(folder: Path) -> str:
    """Give each server's files a block group of their own, and say so.

    On ext4, ``chattr +T`` makes ``folder`` a top of directory hierarchies:
    each folder made in it (Postfix's, each ``serve``'s Maildir) goes to a
    group of its own instead of the group of its parent. Without it they
    shared one, and on a file system without a journal (the project's VM) a
    new file skips every inode of its group deleted in the last minute (five
    while its inode block is dirty): ``recently_deleted()`` in the kernel,
    under a quarter of ``serve``'s CPU at one session in ``perf``. Postfix
    deletes a queue file per message, so the Maildir copies paid for
    Postfix's deletions. Postfix still pays for its own.
    """
    done = subprocess.run(["chattr", "+T", str(folder)], capture_output=True, text=True)
    if done.returncode == 0:
        return f"each server's files in a block group of their own (chattr +T {folder})"
    return f"each server's files beside the others' (chattr +T: {done.stderr.strip()})"


def inside(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="mailpolicy-bench-"))
    folder.chmod(0o755)  # Postfix's daemons run as the postfix user
    namespace(folder)
    folders = spread(folder)
    from mailpolicy.config import load_settings

    lists = restriction_lists()
    policy = folder / "policy.toml"
    policy.write_text(workload.to_toml(serve_policy(lists)))
    load_settings(policy)  # refuse to measure a policy that does not load
    concurrencies = [int(c) for c in args.sessions.split(",")]
    print(machine())
    print(
        f"smtp-source -s N -m {args.messages} -l {args.length} -M {HELO} -f {SENDER} "
        f"-t {RECIPIENT} {ADDRESS}:PORT, N in {concurrencies}; {args.rounds} round(s); "
        f"DNS TTL {args.dns_ttl} s"
    )
    print(
        f"both servers: {len(lists['sender']):,} sender entries, {len(lists['client']):,} "
        "client networks, reverse client name and sender domain checked in the DNS"
    )
    print(folders)
    dns = dns_server(folder, args.dns_ttl)
    servers: list[Any] = []
    try:
        servers.append(
            Process(
                "aiosmtpd (accepts all)",
                2525,
                [sys.executable, "-c", _AIOSMTPD, ADDRESS, "2525"],
                folder / "aiosmtpd.log",
            )
        )
        servers.append(Postfix(folder / "postfix", 25, lists))
        for workers, port in ((1, 2526), (2, 2527)):
            command = [
                str(BIN / "mailpolicy"),
                *("serve", "--policy", str(policy), "--listen", f"{ADDRESS}:{port}"),
                *("--maildir", str(folder / f"maildir-{workers}"), "--workers", str(workers)),
            ]
            name = f"mailpolicy serve --workers {workers}"
            maildir = folder / f"maildir-{workers}"
            servers.append(Process(name, port, command, folder / f"serve-{workers}.log", maildir))
        for server in servers:
            if isinstance(server, Process):
                server.wait()
        for server in servers[1:]:
            print(checks_are_live(server), flush=True)
        for server in servers:  # warm up: processes forked, caches filled
            smtp_source(server.port, 10, max(20, args.messages // 10), args.length)
            server.settle()
        samples: dict[tuple[str, int], list[Sample]] = {}
        for number in range(args.rounds):
            for sessions in concurrencies:
                shift = number % len(servers)
                order = servers[shift:] + servers[:shift]
                for server in order:
                    got = measure(server, dns, sessions, args.messages, args.length)
                    samples.setdefault((server.name, sessions), []).append(got)
                    print(
                        f"round {number + 1}, {sessions:>2} sessions, {server.name:<30} "
                        f"{got.rate:>7,.0f} msgs/s {got.cpu_ms:>6.2f} ms CPU/msg "
                        f"{got.dns_ms:>5.2f} ms DNS/msg ({got.questions:.2f} questions)",
                        flush=True,
                    )
        report(servers, concurrencies, samples)
        sent = max(20, args.messages // 10) + args.rounds * len(concurrencies) * args.messages
        time.sleep(1)  # Postfix's last log lines
        print()
        for server in servers[1:]:
            print(f"{server.name}: {server.delivered():,} of {sent:,} messages delivered")
    finally:
        for server in servers:
            server.stop()
        dns.terminate()
        dns.wait()
        if os.environ.get("MAILPOLICY_KEEP_BENCH"):
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--messages", type=int, default=2500, help="smtp-source -m, per run (default 2500)"
    )
    parser.add_argument("--length", type=int, default=1024, help="smtp-source -l (default 1024)")
    parser.add_argument(
        "--sessions", default="1,10,50", help="concurrencies, comma-separated (default 1,10,50)"
    )
    parser.add_argument(
        "--dns-ttl",
        type=int,
        default=0,
        help="TTL of every DNS answer, seconds (default 0: mailpolicy asks for every "
        "message, as Postfix does)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round, 60 messages, 1 and 10 sessions"
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages, args.sessions = 1, 60, "1,10"
    if args.inside:
        return inside(args)
    why = can_run()
    if why is not None:
        print(f"serve.py: {why}", file=sys.stderr)
        return 2
    if shutil.which("swaks") is None or shutil.which("smtp-source") is None:
        print("serve.py: needs swaks and smtp-source (postfix)", file=sys.stderr)
        return 2
    command = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
    return subprocess.run(
        [*command, sys.executable, __file__, "--inside", *argv], check=False
    ).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
