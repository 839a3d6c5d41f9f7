"""A private, real Postfix in front of ``mailpolicy policyd``, for the tests.

    python tests/postfix_instance.py CASE.json [--variant NAME] [--requests FILE]

plays one replay case (``tests/conformance``) through Debian's Postfix 3.7,
configured with ``mailpolicy export postfix`` and pointed at a running
``mailpolicy policyd`` with the case's policy, and prints one JSON line per
SMTP reply (``cmd``, ``code``, ``enhanced``, ``text``). ``--requests FILE``
writes every policy request Postfix sent, byte for byte, and the answers.

It needs root: it re-executes itself as PID 1 of a new network, mount and
PID namespace (``unshare``). Inside, loopback carries the case's client
addresses, ``/etc/resolv.conf`` (bind-mounted, in the namespace only) points
at the project's ZoneServer on 127.0.0.1:53 with the case's zone, and a
throw-away Postfix (own config, queue and data directories, chroot off, every
transport ``discard:``) listens on port 25. SMTP AUTH goes to a small
Dovecot-auth-protocol stub (:class:`DovecotAuthStub`) with the case's
accounts. When PID 1 exits, the kernel ends everything left in the namespace.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import pwd
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.dnsserver import ZoneServer
from mailpolicy.adapters.replay import Case, build_message, build_policy, load_case
from mailpolicy.config import settings_to_mapping

POSTFIX_PORT = 25
POLICYD_PORT = 10040
PROXY_PORT = 10041

#: what every instance needs, before the export's lines (which win)
BASE_MAIN_CF: dict[str, str] = {
    "compatibility_level": "3.7",
    "inet_interfaces": "all",
    "inet_protocols": "all",
    "smtpd_banner": "$myhostname ESMTP $mail_name (Debian/GNU)",
    "biff": "no",
    "append_dot_mydomain": "no",
    "alias_maps": "",
    "alias_database": "",
    "local_recipient_maps": "",
    "default_transport": "discard:test",
    "relay_transport": "discard:test",
    "local_transport": "discard:test",
    "virtual_transport": "discard:test",
    "smtp_tls_security_level": "none",
    "readme_directory": "no",
    "html_directory": "no",
    "smtpd_error_sleep_time": "0s",
    "maillog_file_prefixes": "/tmp",
    "sendmail_path": "/usr/sbin/sendmail",
    "newaliases_path": "/usr/bin/newaliases",
    "mailq_path": "/usr/bin/mailq",
    "setgid_group": "postdrop",
}

#: Debian's services smtpd needs, chroot off, delivery only ever discards
MASTER_CF = """\
smtp      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def can_run() -> str | None:
    """Why this machine cannot run an instance, or ``None``."""
    if os.geteuid() != 0:
        return "needs root (unshare, a private network namespace, port 25)"
    for tool in ("unshare", "ip", "postfix", "mount"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed"
    return None


# -- a TOML writer for the case's policy (the policy file format) ----------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(mapping: Mapping[str, Any], prefix: str = "") -> str:
    """``mapping`` as TOML: scalars first, then tables and arrays of tables."""
    lines: list[str] = []
    nested: list[str] = []
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            nested.append(f"\n[{name}]\n" + to_toml(value, name))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                nested.append(f"\n[[{name}]]\n" + to_toml(item, name))
        else:
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n" + "".join(nested)


# -- SMTP AUTH: a Dovecot authentication protocol stub ----------------------------


class DovecotAuthStub:
    """Enough of Dovecot's auth protocol (1.x) for Postfix's
    ``smtpd_sasl_type = dovecot``: PLAIN and LOGIN against ``users``."""

    def __init__(self, users: Mapping[str, str], path: str) -> None:
        self.users = dict(users)
        self.path = path
        stub = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                stub.serve(self.rfile, self.wfile)

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self.server = Server(path, Handler)
        os.chmod(path, 0o666)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, rfile: Any, wfile: Any) -> None:
        def say(line: str) -> None:
            wfile.write(line.encode() + b"\n")
            wfile.flush()

        say(
            f"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
            f"SPID\t{os.getpid()}\nCUID\t1\nCOOKIE\t{'0' * 32}\nDONE"
        )
        login_users: dict[str, str | None] = {}
        for raw in rfile:
            fields = raw.decode("utf-8", "replace").rstrip("\n").split("\t")
            if fields[0] == "AUTH" and len(fields) >= 3:
                rid, mech = fields[1], fields[2].upper()
                params = dict(f.split("=", 1) for f in fields[3:] if "=" in f)
                resp = params.get("resp")
                if mech == "PLAIN" and resp is not None:
                    say(self._plain(rid, resp))
                elif mech == "PLAIN":
                    login_users[rid] = "\0plain"
                    say(f"CONT\t{rid}\t")
                elif mech == "LOGIN":
                    login_users[rid] = base64.b64decode(resp).decode() if resp else None
                    prompt = b"Password:" if resp else b"Username:"
                    say(f"CONT\t{rid}\t{base64.b64encode(prompt).decode()}")
                else:
                    say(f"FAIL\t{rid}")
            elif fields[0] == "CONT" and len(fields) >= 2:
                rid, data = fields[1], fields[2] if len(fields) > 2 else ""
                if rid not in login_users:
                    say(f"FAIL\t{rid}")
                    continue
                user = login_users.pop(rid)
                if user == "\0plain":
                    say(self._plain(rid, data))
                elif user is None:
                    login_users[rid] = base64.b64decode(data).decode("utf-8", "replace")
                    say(f"CONT\t{rid}\t{base64.b64encode(b'Password:').decode()}")
                else:
                    password = base64.b64decode(data).decode("utf-8", "replace")
                    say(self._verdict(rid, user, password))

    def _plain(self, rid: str, data: str) -> str:
        try:
            _, user, password = base64.b64decode(data, validate=True).decode().split("\0")
        except ValueError:
            return f"FAIL\t{rid}"
        return self._verdict(rid, user, password)

    def _verdict(self, rid: str, user: str, password: str) -> str:
        if self.users.get(user) == password:
            return f"OK\t{rid}\tuser={user}"
        return f"FAIL\t{rid}\tuser={user}"


# -- recording what Postfix asks ------------------------------------------------


class RequestRecorder:
    """A TCP relay from Postfix to policyd that keeps every byte each way."""

    def __init__(self, listen_port: int, target: tuple[str, int], out: str) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.log: list[dict[str, str]] = []
        recorder = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(target)
                buffer = b""
                while True:
                    data = self.request.recv(65536)
                    if not data:
                        break
                    buffer += data
                    while b"\n\n" in buffer:
                        block, buffer = buffer.split(b"\n\n", 1)
                        upstream.sendall(block + b"\n\n")
                        answer = b""
                        while not answer.endswith(b"\n\n"):
                            chunk = upstream.recv(65536)
                            if not chunk:
                                return
                            answer += chunk
                        recorder.add(block.decode() + "\n\n", answer.decode())
                        self.request.sendall(answer)
                upstream.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", listen_port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: str, answer: str) -> None:
        with self.lock:
            self.log.append({"request": request, "answer": answer})
            with open(self.out, "w", encoding="utf-8") as f:
                json.dump(self.log, f, indent=1)


# -- the SMTP client ----------------------------------------------------------------


@attrs.frozen
class Row:
    cmd: str
    code: int | None
    enhanced: str | None
    text: str


class SmtpClient:
    """Plays a case's steps from the client's address, reply by reply."""

    def __init__(self, source: str, timeout: float = 15) -> None:
        ip = ipaddress.ip_address(source)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(("::1" if ip.version == 6 else "127.0.0.1", POSTFIX_PORT))
        self.buffer = b""

    def _line(self) -> str | None:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def reply(self, cmd: str) -> Row:
        lines: list[str] = []
        try:
            while True:
                line = self._line()
                if line is None:
                    return Row("<eof>", None, None, "connection closed by server")
                lines.append(line)
                if len(line) < 4 or line[3] != "-":
                    break
        except TimeoutError:
            return Row("<timeout>", None, None, "no reply")
        code = int(lines[0][:3])
        enhanced = None
        texts = []
        for line in lines:
            text = line[4:]
            head, _, rest = text.partition(" ")
            parts = head.split(".")
            if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "245":
                enhanced = enhanced or head
                text = rest
            texts.append(text)
        return Row(cmd, code, enhanced, "\n".join(texts))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def play(self, steps: list[Any], client: Mapping[str, Any]) -> Iterator[Row]:
        def fmt(text: str) -> str:
            return text.replace("{helo}", str(client.get("helo", ""))).replace(
                "{ip}", str(client["ip"])
            )

        row = self.reply("<connect>")
        yield row
        if row.code is None:
            return
        for step in steps:
            if isinstance(step, str):
                batch = [fmt(step)]
            elif "pipeline" in step:
                batch = [fmt(s) for s in step["pipeline"]]
            elif "auth_plain" in step:
                user, password = step["auth_plain"][:2]
                token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                self.send(f"AUTH PLAIN {token}\r\n".encode())
                yield (row := self.reply(f"AUTH PLAIN <{user}>"))
                if row.code is None:
                    return
                continue
            elif "auth_login" in step:
                user, password = step["auth_login"][:2]
                self.send(b"AUTH LOGIN\r\n")
                yield (row := self.reply("AUTH LOGIN"))
                for value, label in (
                    (user, f"<login user {user}>"),
                    (password, "<login password>"),
                ):
                    if row.code != 334:
                        break
                    self.send(base64.b64encode(value.encode()) + b"\r\n")
                    yield (row := self.reply(label))
                if row.code is None:
                    return
                continue
            elif "data" in step:
                self.send(b"DATA\r\n")
                yield (row := self.reply("DATA"))
                if row.code == 354:
                    message = build_message(step)
                    self.send(message)
                    yield (row := self.reply(f"<message {len(message)} bytes>"))
                if row.code is None:
                    return
                continue
            else:
                raise ValueError(f"bad step {step!r}")
            self.send(b"".join(c.encode() + b"\r\n" for c in batch))
            for cmd in batch:
                yield (row := self.reply(cmd))
                if row.code is None:
                    return


# -- inside the namespace ------------------------------------------------------------


def _sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stdout}{done.stderr}")
    return done.stdout


def _listening(port: int, deadline: float) -> bool:
    while time.time() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table, encoding="ascii") as f:
                for line in list(f)[1:]:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                        return True
        time.sleep(0.05)
    return False


def _namespace(run: Path, case: Case) -> None:
    _sh("ip", "link", "set", "lo", "up")
    ip = ipaddress.ip_address(case.client["ip"])
    if not ip.is_loopback:
        if ip.version == 4:
            _sh("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        else:
            _sh("ip", "-6", "addr", "add", f"{ip}/128", "dev", "lo", "nodad")
    use_loopback_resolver(run)


def use_loopback_resolver(folder: Path) -> None:
    """Inside a private mount namespace: the resolver is 127.0.0.1:53 (one
    try, a second's timeout), names come from files then DNS. The files are
    written in ``folder`` and bound over ``/etc``."""
    files = {
        "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\nservices: files\n",
    }
    for name, text in files.items():
        path = folder / name
        path.write_text(text, encoding="ascii")
        path.chmod(0o644)
        _sh("mount", "--bind", str(path), f"/etc/{name}")


def inside(case: Case, requests: str | None) -> list[Row]:
    run = Path(tempfile.mkdtemp(prefix="mailpolicy-postfix-"))
    run.chmod(0o755)
    _namespace(run, case)
    zone = StaticZone.from_mapping(case.data.get("dns", {}))
    (run / "zone.json").write_text(json.dumps(case.data.get("dns", {})), encoding="utf-8")
    policy = build_policy(case)
    (run / "policy.toml").write_text(
        to_toml(settings_to_mapping(policy.settings, accounts=True)), encoding="utf-8"
    )
    mailpolicy = [sys.executable, "-m", "mailpolicy"]
    with ZoneServer(zone, port=53, ttl=0, negative_ttl=0).run_in_thread():
        log = open(run / "policyd.log", "w")  # noqa: SIM115 - lives as long as the process
        policyd = subprocess.Popen(
            [
                *mailpolicy,
                *("policyd", "--policy", str(run / "policy.toml")),
                *("--listen", f"127.0.0.1:{POLICYD_PORT}", "--dns", str(run / "zone.json")),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if not _listening(POLICYD_PORT, time.time() + 30):
            raise RuntimeError("policyd did not start: " + (run / "policyd.log").read_text())
        port = POLICYD_PORT
        if requests:
            RequestRecorder(PROXY_PORT, ("127.0.0.1", POLICYD_PORT), requests)
            port = PROXY_PORT
        export = run / "export"
        _sh(
            *mailpolicy,
            "export",
            "postfix",
            "--policy",
            str(run / "policy.toml"),
            "--policyd",
            f"inet:127.0.0.1:{port}",
            "--out",
            str(export),
        )
        main = dict(BASE_MAIN_CF)
        for line in (export / "main.cf").read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                main[key.strip()] = value.strip()
        accounts = case.data.get("accounts", {})
        if "smtpd_sasl_path" in main:
            users = {name: spec["password"] for name, spec in accounts.items()}
            DovecotAuthStub(users, str(run / "auth"))
            main["smtpd_sasl_path"] = str(run / "auth")
        conf = run / "conf"
        for name in ("conf", "spool", "data"):
            (run / name).mkdir()
        owner = pwd.getpwnam("postfix")
        os.chown(run / "data", owner.pw_uid, owner.pw_gid)
        main.update(
            {
                "queue_directory": str(run / "spool"),
                "data_directory": str(run / "data"),
                "maillog_file": str(run / "maillog"),
            }
        )
        (conf / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in main.items()), encoding="utf-8"
        )
        (conf / "master.cf").write_text(MASTER_CF, encoding="ascii")
        _sh("postfix", "-c", str(conf), "start")
        try:
            if not _listening(POSTFIX_PORT, time.time() + 30):
                raise RuntimeError("postfix did not listen")
            client = SmtpClient(str(case.client["ip"]))
            rows = list(client.play(case.steps, case.client))
        finally:
            subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True, check=False)
            policyd.terminate()
            for name in ("maillog", "policyd.log"):
                if os.environ.get("MAILPOLICY_POSTFIX_LOGS") and (run / name).exists():
                    print((run / name).read_text(errors="replace"), file=sys.stderr)
    if os.environ.get("MAILPOLICY_KEEP_POSTFIX"):
        print(f"kept {run}", file=sys.stderr)
    else:
        shutil.rmtree(run, ignore_errors=True)
    return rows


def run_case(
    path: str | os.PathLike[str], variant: str | None = None, requests: str | None = None
) -> list[Row]:
    """Play the case at ``path`` through a private Postfix; the replies."""
    cmd = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
    cmd += [sys.executable, __file__, "--inside", str(path)]
    if variant:
        cmd += ["--variant", variant]
    if requests:
        cmd += ["--requests", requests]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"postfix instance failed ({done.returncode}): {done.stderr[-3000:]}")
    if os.environ.get("MAILPOLICY_POSTFIX_LOGS"):
        sys.stderr.write(done.stderr)
    return [Row(**json.loads(line)) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("--variant")
    parser.add_argument("--requests")
    parser.add_argument("--inside", action="store_true")
    args = parser.parse_args()
    if not args.inside:
        for row in run_case(args.case, args.variant, args.requests):
            print(json.dumps(attrs.asdict(row)))
        return 0
    cases = load_case(args.case)
    wanted = [c for c in cases if (c.name.partition("[")[2].rstrip("]") or None) == args.variant]
    for row in inside(wanted[0], args.requests):
        print(json.dumps(attrs.asdict(row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
