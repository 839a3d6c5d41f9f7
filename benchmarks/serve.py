"""Messages per second through ``mailpolicy serve`` on loopback, side by side
with a bare aiosmtpd server and a real Postfix (not a test).

Run from the repository root, after ``pip install -e .``, on a machine with
Postfix installed (Debian: ``apt-get install postfix``; no Postfix instance
needs to be configured or running: this script starts its own, private one,
and stops it)::

    python benchmarks/serve.py                     # 20 sessions, 2000 messages
    python benchmarks/serve.py --messages 5000 --sessions 50

Postfix's ``smtp-source`` drives every server the same way, on 127.0.0.1::

    smtp-source -s 20 -m 2000 -l 1000 -M client.example.net \\
        -f a@known.example -t r@example.com 127.0.0.1:PORT

The servers, each on a free port, one after the other:

* ``aiosmtpd``: a bare aiosmtpd ``Controller`` whose handler accepts every
  message and drops it: the floor for an asyncio SMTP server in Python;
* ``mailpolicy serve``: the real command, with the policy below, ``--dns``
  with a static zone (no real DNS), and delivery to Maildirs in a temporary
  folder;
* ``mailpolicy (no delivery)``: the same policy in a ``MailServer`` with
  ``AcceptAllDelivery``: the SMTP and policy path without the disk;
* ``mailpolicy serve, every check``: the serve command with every check of
  docs/settings.md on, DNS answered from the static zone;
* ``postfix``: a private Postfix instance (its own config_directory,
  queue_directory and data_directory in a temporary folder, ``inet_interfaces
  = 127.0.0.1``, a free port in master.cf, every transport ``discard:``)
  with the equivalent restrictions: the same lists as cidr and hash access
  maps, the same HELO, sender and recipient syntax checks, relay control,
  pipelining, size and recipient limits. Postfix's DNS-based checks are left
  out, and so they are in the policy compared with it: this machine's
  resolver is not on loopback, and Postfix cannot be given a static zone.

The policy has black/white lists of 10,000 entries (client networks of both
families, senders, HELO names, recipients); the test traffic matches none, so
every message goes through every check and is accepted.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload
from evaluate import machine

HELO = "client.example.net"
SENDER = "a@known.example"
RECIPIENT = f"r@{workload.DOMAIN}"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Something LISTENs on 127.0.0.1:port (read from /proc: no probe
    connection, which would count as a session)."""
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                    return True
    except OSError:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    return False


def wait_listening(port: int, proc: subprocess.Popen[Any] | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port}")
        time.sleep(0.05)


def smtp_source(port: int, sessions: int, messages: int, length: int) -> float:
    """Messages per second: smtp-source's wall time."""
    command = [
        shutil.which("smtp-source") or "/usr/sbin/smtp-source",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(length),
        "-M",
        HELO,
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"127.0.0.1:{port}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return messages / elapsed


# ---------------------------------------------------------------------------
# The policies and the DNS zone


def serve_policy(every_check: bool) -> dict[str, Any]:
    entries = workload.list_entries(10_000)
    rules = [
        {"name": "good-helo", "list": "white", "helo": entries["helo"]},
        {"name": "bad-clients", "list": "black", "client": entries["client"]},
        {
            "name": "bad-senders",
            "list": "black",
            "sender": entries["sender"] + entries["sender_domain"],
        },
        {
            "name": "spamtrap",
            "list": "black",
            "action": "discard",
            "recipient": entries["recipient"],
        },
    ]
    policy = workload.policy_mapping(rules, every_check=every_check)
    # 127.0.0.1 must go through the checks, not around them
    policy["general"]["smtp_auth"] = {"enabled": False, "skip_for_local_network": False}
    policy["general"]["max_attachment_size_mb"] = 0
    policy["general"]["disable_auto_forwarding"] = False
    policy["relay"]["trusted_networks"] = ["192.0.2.0/28"]
    policy.pop("accounts", None)
    if every_check:
        policy["security"]["sender_policy"]["reject_unauthenticated_local_sender"] = False
        cp = policy["security"]["connection_policy"]
        cp.update(max_connection_rate_per_client=0, max_message_rate_per_client=0)
        cp.update(max_recipient_rate_per_client=0, max_connections_per_client=100)
    else:
        policy["security"]["advanced"] = {
            "require_helo": True,
            "reject_invalid_helo": True,
            "reject_non_fqdn_helo": True,
            "reject_non_fqdn_recipient": True,
            "reject_unauth_pipelining": True,
        }
        policy["security"]["sender_policy"] = {"reject_non_fqdn_sender": True}
        policy["security"]["connection_policy"] = {"max_connections_per_client": 100}
    return policy


ZONE = {
    "127.0.0.1": {"PTR": [HELO]},
    HELO: {"A": ["127.0.0.1"]},
    "known.example": {"MX": ["10 mx.known.example"]},
    "mx.known.example": {"A": ["192.0.2.25"]},
    workload.DOMAIN: {"MX": [f"10 {workload.HOSTNAME}"]},
    workload.HOSTNAME: {"A": ["127.0.0.1"]},
}


# ---------------------------------------------------------------------------
# The servers

_AIOSMTPD = """
import signal, sys, threading
from aiosmtpd.controller import Controller
class Accept:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: queued"
controller = Controller(Accept(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
controller.stop()
"""

_IN_PROCESS = """
import asyncio, json, signal, sys
from mailpolicy import load_policy
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.server import Listener, MailServer
from mailpolicy.adapters.driver import AcceptAllDelivery

class Drop(AcceptAllDelivery):
    async def deliver(self, submission):
        return await super().deliver(submission) if False else self.ok(submission)
    def ok(self, submission):
        from mailpolicy import Reply
        return Reply(250, "2.0.0", f"Ok: queued as {submission.queue_id}")

async def main():
    policy = load_policy(sys.argv[1])
    with open(sys.argv[2]) as f:
        zone = StaticZone.from_mapping(json.load(f))
    server = MailServer(policy, zone, delivery=Drop(),
                        listeners=[Listener("smtp", "127.0.0.1", int(sys.argv[3]))])
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=1)

asyncio.run(main())
"""


class Server:
    """A server process on a free port; stopped on exit."""

    def __init__(self, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            wait_listening(port, self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def postfix_config(folder: Path, port: int, entries: dict[str, list[str]]) -> Path:
    """A throw-away Postfix instance: main.cf, master.cf and access maps."""
    conf, maps = folder / "conf", folder / "maps"
    conf.mkdir()
    maps.mkdir()
    (folder / "spool").mkdir()
    (folder / "data").mkdir()
    pw = pwd.getpwnam("postfix")
    os.chown(folder / "data", pw.pw_uid, pw.pw_gid)
    os.chmod(folder, 0o755)

    def table(name: str, lines: Sequence[str]) -> Path:
        path = maps / name
        path.write_text("".join(f"{line}\n" for line in lines))
        return path

    clients = table("clients.cidr", [f"{net} REJECT Blocked" for net in entries["client"]])
    senders = table(
        "senders", [f"{v} REJECT" for v in entries["sender"] + entries["sender_domain"]]
    )
    helos = table("helos", [f"{v} OK" for v in entries["helo"]])
    rcpts = table("recipients", [f"{v} DISCARD" for v in entries["recipient"]])
    main_cf = f"""\
        compatibility_level = 3.7
        queue_directory = {folder}/spool
        data_directory = {folder}/data
        maillog_file = {folder}/maillog
        maillog_file_prefixes = {folder}
        myhostname = {workload.HOSTNAME}
        mydomain = {workload.DOMAIN}
        myorigin = $myhostname
        mydestination = $mydomain
        mynetworks = 192.0.2.0/28
        relay_domains = branch.example.com
        inet_interfaces = 127.0.0.1
        inet_protocols = ipv4
        alias_maps =
        alias_database =
        local_recipient_maps =
        biff = no
        smtpd_peername_lookup = no
        smtpd_error_sleep_time = 0s
        message_size_limit = 10485760
        smtpd_recipient_limit = 50
        smtpd_client_connection_count_limit = 100
        smtpd_helo_required = yes
        smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
        smtpd_recipient_restrictions =
            check_helo_access hash:{helos},
            check_client_access cidr:{clients},
            check_sender_access hash:{senders},
            check_recipient_access hash:{rcpts},
            permit_mynetworks,
            reject_invalid_helo_hostname,
            reject_non_fqdn_helo_hostname,
            reject_non_fqdn_sender,
            reject_non_fqdn_recipient
        smtpd_data_restrictions = reject_unauth_pipelining
        default_transport = discard:benchmark
        relay_transport = discard:benchmark
        local_transport = discard:benchmark
        virtual_transport = discard:benchmark
        smtpd_tls_security_level = none
        smtp_tls_security_level = none
        """
    (conf / "main.cf").write_text(textwrap.dedent(main_cf))
    services = [
        f"127.0.0.1:{port} inet n - n - - smtpd",
        "pickup unix n - n 60 1 pickup",
        "cleanup unix n - n - 0 cleanup",
        "qmgr unix n - n 300 1 qmgr",
        "rewrite unix - - n - - trivial-rewrite",
        "bounce unix - - n - 0 bounce",
        "defer unix - - n - 0 bounce",
        "trace unix - - n - 0 bounce",
        "verify unix - - n - 1 verify",
        "flush unix n - n 1000? 0 flush",
        "proxymap unix - - n - - proxymap",
        "showq unix n - n - - showq",
        "error unix - - n - - error",
        "retry unix - - n - - error",
        "discard unix - - n - - discard",
        "anvil unix - - n - 1 anvil",
        "scache unix - - n - 1 scache",
        "postlog unix-dgram n - n - 1 postlogd",
    ]
    (conf / "master.cf").write_text("\n".join(services) + "\n")
    for path in (helos, senders, rcpts):
        subprocess.run(["postmap", "-c", str(conf), f"hash:{path}"], check=True)
    return conf


class Postfix:
    def __init__(self, folder: Path, port: int, entries: dict[str, list[str]]) -> None:
        self.conf = postfix_config(folder, port, entries)
        self.port = port
        done = subprocess.run(
            ["postfix", "-c", str(self.conf), "start"], capture_output=True, text=True
        )
        if done.returncode != 0:
            log = folder / "maillog"
            tail = log.read_text()[-800:] if log.exists() else ""
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}{tail}")
        try:
            wait_listening(port, None)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)


def measure(server: Any, args: argparse.Namespace) -> float:
    try:
        smtp_source(server.port, args.sessions, max(50, args.messages // 20), args.length)
        return max(
            smtp_source(server.port, args.sessions, args.messages, args.length)
            for _ in range(args.repeats)
        )
    finally:
        server.stop()


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--messages", type=int, default=2000, help="smtp-source -m")
    parser.add_argument("--length", type=int, default=1000, help="smtp-source -l")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best is kept)")
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix run")
    args = parser.parse_args(argv)
    import json

    from mailpolicy.config import load_settings

    print(machine())
    print(
        f"smtp-source -s {args.sessions} -m {args.messages} -l {args.length} -M {HELO} "
        f"-f {SENDER} -t {RECIPIENT} 127.0.0.1:PORT (a warm-up run, then best of {args.repeats})"
    )
    print()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mailpolicy-serve-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # Postfix's daemons run as the postfix user
        policies = {}
        for every in (False, True):
            path = folder / ("every.toml" if every else "policy.toml")
            path.write_text(workload.to_toml(serve_policy(every)))
            load_settings(path)  # refuse to measure a policy that does not load
            policies[every] = path
        zone = folder / "zone.json"
        zone.write_text(json.dumps(ZONE))
        mailpolicy = [str(BIN / "mailpolicy"), "serve", "--log-level", "error"]

        def run(name: str, make: Any) -> None:
            try:
                server = make()
            except Exception as e:  # report and go on with the others
                print(f"{name:<34} failed: {e}")
                return
            results[name] = measure(server, args)
            print(f"{name:<34} {results[name]:>8,.0f} messages/s", flush=True)

        port = free_port()
        run(
            "aiosmtpd (accepts everything)",
            lambda: Server([sys.executable, "-c", _AIOSMTPD, str(port)], port),
        )
        for every, name in ((False, "mailpolicy serve"), (True, "mailpolicy serve, every check")):
            port = free_port()
            maildir = folder / f"maildir-{int(every)}"
            command = [
                *mailpolicy,
                "--policy",
                str(policies[every]),
                "--listen",
                f"127.0.0.1:{port}",
                "--dns",
                str(zone),
                "--maildir",
                str(maildir),
            ]
            run(name, lambda c=command, p=port: Server(c, p))
        port = free_port()
        run(
            "mailpolicy (no delivery)",
            lambda: Server(
                [sys.executable, "-c", _IN_PROCESS, str(policies[False]), str(zone), str(port)],
                port,
            ),
        )
        if not args.no_postfix:
            if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
                print("postfix: not installed (apt-get install postfix)")
            else:
                port = free_port()
                entries = workload.list_entries(10_000)
                pf = folder / "postfix"
                pf.mkdir()
                run("postfix (discard transport)", lambda: Postfix(pf, port, entries))
    print()
    base = results.get("aiosmtpd (accepts everything)")
    postfix = results.get("postfix (discard transport)")
    for name in ("mailpolicy serve", "mailpolicy (no delivery)", "mailpolicy serve, every check"):
        if name not in results:
            continue
        ratios = []
        if base:
            ratios.append(f"/ aiosmtpd {results[name] / base:.2f}")
        if postfix:
            ratios.append(f"/ postfix {results[name] / postfix:.2f}")
        print(f"{name:<34} {'  '.join(ratios)}")
    print("target: mailpolicy serve / aiosmtpd >= 0.80")


if __name__ == "__main__":
    main(sys.argv[1:])
