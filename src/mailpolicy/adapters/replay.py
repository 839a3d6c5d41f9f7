"""Replay of captured SMTP sessions (JSON cases, docs/replay.md).

A case is one session, the world it happens in (a static DNS zone, the
client's address and HELO name, a clock) and the policy that judges it.
:func:`run_case` runs the server's own dialogue
(:class:`~mailpolicy.dialogue.Connection`, driven by the same
:func:`~.driver.run_connection` loop as ``mailpolicy serve``) over an
in-memory pipe, plays the case's steps with a small SMTP client, and returns
every reply in order, each with the rule that decided it. No socket and no
network are used: DNS answers come from the case's zone, so a replay runs
even where no network interface is up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..config import PolicyError, machine_hostname, settings_from_mapping
from ..dialogue import Connection, ReplyRecord
from ..model import Reply
from ..passwords import hash_password
from ..policy import Policy, compile_policy
from ..settings import Account, Settings
from .dns import Resolver, StaticZone, ZoneError
from .driver import AcceptAllDelivery, Services, _Shutdown, run_connection
from .state import MemoryStore

__all__ = [
    "Case",
    "CaseError",
    "ReplayReply",
    "compare",
    "load_case",
    "load_cases",
    "run_case",
    "run_case_sync",
]

_CASE_KEYS = frozenset(
    {
        "description",
        "policy",
        "accounts",
        "dns",
        "client",
        "session",
        "variants",
        "now",
        "step_seconds",
        "name",
    }
)
_CLIENT_KEYS = frozenset({"ip", "helo", "tls"})
DEFAULT_CLIENT = {"ip": "192.0.2.10", "helo": "client.example.com", "tls": False}
#: A fixed start time, so a case without ``now`` replays the same every time.
DEFAULT_NOW = 1_700_000_000.0
#: Case passwords are throw-away: hash them cheaply (the scheme is unchanged).
_CASE_HASH_COST = 4
DEFAULT_BODY = (
    "From: <sender@example.com>\r\nTo: <rcpt@example.net>\r\n"
    "Subject: oracle test\r\nMessage-ID: <oracle-test@example.com>\r\n\r\nHello.\r\n"
)


class CaseError(Exception):
    """A case that cannot be read: the file and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@attrs.frozen
class Case:
    """A replay case, variants already expanded."""

    name: str
    source: str
    data: Mapping[str, Any] = attrs.field(repr=False)

    @property
    def client(self) -> dict[str, Any]:
        return {**DEFAULT_CLIENT, **self.data.get("client", {})}

    @property
    def steps(self) -> list[Any]:
        return list(self.data.get("session", []))


@attrs.frozen
class ReplayReply:
    """One reply of a replayed session (a line of replay's output)."""

    cmd: str
    code: int | None
    enhanced: str | None
    text: str
    rule: str | None = None
    #: refusals that rules in observe mode would have made here, each as
    #: ``"RULE: REPLY"`` (the client saw ``code`` and ``text`` instead)
    observed: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cmd": self.cmd,
            "code": self.code,
            "enhanced": self.enhanced,
            "text": self.text,
        }
        if self.rule is not None:
            out["rule"] = self.rule
        if self.observed:
            out["observed"] = list(self.observed)
        return out


# -- loading ------------------------------------------------------------------


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_case(path: str | os.PathLike[str]) -> list[Case]:
    """Read one case file; each variant becomes its own :class:`Case`."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise CaseError(source, f"cannot read: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaseError(source, f"bad JSON: {e}") from e
    return cases_from_mapping(data, source, Path(source).stem)


def cases_from_mapping(data: Any, source: str, name: str) -> list[Case]:
    """Validate a case object and expand its variants."""
    if not isinstance(data, dict):
        raise CaseError(source, "a case must be a JSON object")
    unknown = sorted(set(data) - _CASE_KEYS)
    if unknown:
        raise CaseError(
            source, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_CASE_KEYS))})"
        )
    client = data.get("client", {})
    if not isinstance(client, dict) or set(client) - _CLIENT_KEYS:
        raise CaseError(source, f"client: must be an object with keys {sorted(_CLIENT_KEYS)}")
    if not isinstance(data.get("session", []), list):
        raise CaseError(source, "session: must be a list of steps")
    base = {k: v for k, v in data.items() if k != "variants"}
    out = [Case(str(data.get("name", name)), source, base)]
    variants = data.get("variants", {})
    if not isinstance(variants, dict):
        raise CaseError(source, "variants: must be an object of named overrides")
    for vname, override in variants.items():
        if not isinstance(override, dict):
            raise CaseError(source, f"variants.{vname}: must be an object")
        out.append(Case(f"{out[0].name}[{vname}]", source, _deep_merge(base, override)))
    return out


def load_cases(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Case], list[CaseError]]:
    """All cases under ``paths`` (files, or directories of ``*.json``), and
    the errors of those that could not be read; a bad case never stops the rest."""
    cases: list[Case] = []
    errors: list[CaseError] = []
    for p in paths:
        path = Path(p)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            try:
                cases.extend(load_case(f))
            except CaseError as e:
                errors.append(e)
    return cases, errors


def build_policy(case: Case, base: Settings | None = None) -> Policy:
    """The case's policy (or ``base``, e.g. from ``--policy``), plus its
    accounts with their clear passwords hashed."""
    try:
        settings = (
            base
            if base is not None
            # a case's policy is a policy file as JSON: the same default hostname
            else settings_from_mapping(
                case.data.get("policy", {}),
                source=f"{case.source}: policy",
                default_hostname=machine_hostname,
            )
        )
    except PolicyError as e:
        raise CaseError(case.source, str(e)) from e
    accounts = case.data.get("accounts", {})
    if not isinstance(accounts, dict):
        raise CaseError(case.source, "accounts: must be an object")
    extra = []
    for login, spec in accounts.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("password"), str):
            raise CaseError(case.source, f"accounts.{login}: needs a password string")
        extra.append(
            Account(
                login,
                hash_password(spec["password"], ln=_CASE_HASH_COST),
                tuple(spec.get("addresses", ())),
            )
        )
    if extra:
        settings = attrs.evolve(settings, accounts=settings.accounts + tuple(extra))
    return compile_policy(settings)


def build_zone(case: Case) -> StaticZone:
    try:
        return StaticZone.from_mapping(case.data.get("dns", {}), source=f"{case.source}: dns")
    except ZoneError as e:
        raise CaseError(case.source, str(e)) from e


# -- the client ---------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build_message(step: Mapping[str, Any]) -> bytes:
    """The DATA payload of a ``data`` step, dot-stuffed, ending in CRLF.CRLF."""
    body = step.get("data")
    if body is True or body is None or body == "":
        body = DEFAULT_BODY
    body = str(body).replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    hops = int(step.get("received", 0))
    if hops:
        body = (
            "".join(
                f"Received: from hop{i}.example.net"
                f" (hop{i}.example.net [198.51.100.{i % 250 + 1}])\r\n"
                f"\tby relay{i}.example.net with ESMTP id HOP{i};"
                f" Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                for i in range(hops)
            )
            + body
        )
    size = int(step.get("size", 0))
    if size and len(body) < size:
        filler = "X" * 76 + "\r\n"
        body += filler * ((size - len(body)) // len(filler) + 1)
    lines = body.split("\r\n")[:-1]
    stuffed = "\r\n".join("." + ln if ln.startswith(".") else ln for ln in lines)
    return (stuffed + "\r\n.\r\n").encode("utf-8")


class _Pipe:
    """Both ends of an in-memory SMTP connection, on one event loop."""

    def __init__(self) -> None:
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.client_closed = False
        self.server_closed = False
        #: the server is waiting for input
        self.server_waiting = False
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait(self, timeout: float | None = None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await asyncio.wait_for(waiter, timeout)


class _ServerEnd:
    """The server's side of the pipe (a :class:`~.driver.Channel`)."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    async def read(self, timeout: float | None) -> bytes | _Shutdown | None:
        pipe = self.pipe
        while not pipe.to_server and not pipe.client_closed:
            pipe.server_waiting = True
            pipe.notify()
            try:
                await pipe.wait()
            finally:
                pipe.server_waiting = False
        data = bytes(pipe.to_server)
        pipe.to_server.clear()
        return data

    def write(self, data: bytes) -> None:
        self.pipe.to_client += data
        self.pipe.notify()

    async def start_tls(self) -> bool:
        return False  # replay has no TLS: a case says "tls": true instead

    def close(self) -> None:
        self.pipe.server_closed = True
        self.pipe.notify()


class _Client:
    """The client's side: sends bytes, reads whole replies."""

    def __init__(self, pipe: _Pipe, timeout: float) -> None:
        self.pipe = pipe
        self.timeout = timeout

    async def send(self, data: bytes) -> None:
        self.pipe.to_server += data
        self.pipe.notify()

    def close(self) -> None:
        self.pipe.client_closed = True
        self.pipe.notify()

    def _take_reply(self) -> list[str] | None:
        buf = self.pipe.to_client
        lines: list[str] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                return None
            line = buf[start:end].decode("utf-8", "replace").rstrip("\r")
            lines.append(line)
            start = end + 1
            if len(line) < 4 or line[3] != "-":
                del buf[:start]
                return lines

    async def reply(self) -> Reply | None:
        """The next reply; None when the server closed; TimeoutError when
        the server waits for input instead of answering (a DATA that got 354
        reads the following commands as message text)."""
        pipe = self.pipe
        while True:
            lines = self._take_reply()
            if lines is not None:
                break
            if pipe.server_closed:
                return None
            if pipe.server_waiting and not pipe.to_server:
                raise TimeoutError("the server waits for more input")
            await pipe.wait(self.timeout)
        code = int(lines[0][:3]) if lines[0][:3].isdigit() else 0
        enhanced: str | None = None
        texts = []
        for ln in lines:
            text = ln[4:]
            head, _, rest = text.partition(" ")
            if _is_enhanced(head):
                enhanced = enhanced or head
                text = rest
            texts.append(text)
        return Reply(code, enhanced, "\n".join(texts))


def _is_enhanced(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() for p in parts)


#: seconds to wait for one reply; a case whose server waits for more input (a
#: pipelined DATA that got 354 reads the next commands as message text) ends
#: with a ``<timeout>`` row instead of hanging
REPLY_TIMEOUT = 10.0


async def run_case(
    case: Case,
    *,
    policy: Policy | None = None,
    timeout: float = REPLY_TIMEOUT,
    resolver: Resolver | None = None,
) -> list[ReplayReply]:
    """Play ``case`` through the server's dialogue and return every reply;
    DNS from ``resolver`` if given (the console's trial on live DNS), else
    from the case's zone."""
    policy = policy if policy is not None else build_policy(case)
    zone = resolver if resolver is not None else build_zone(case)
    client = case.client
    clock = _Clock(float(case.data.get("now", DEFAULT_NOW)))
    step_seconds = float(case.data.get("step_seconds", 0))
    records: list[ReplyRecord] = []
    services = Services(
        resolver=zone,
        delivery=AcceptAllDelivery(),
        store=MemoryStore(),
        clock=clock,
        on_reply=records.append,
    )
    conn = Connection(policy, str(client["ip"]), tls=bool(client.get("tls")))
    pipe = _Pipe()
    server = asyncio.get_running_loop().create_task(
        run_connection(conn, _ServerEnd(pipe), services)
    )
    out: list[ReplayReply] = []
    c = _Client(pipe, timeout)
    try:
        await _play(c, case.steps, client, clock, step_seconds, out)
    finally:
        c.close()
        # on a timeout wait_for cancels it: a server stuck on a service
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server, timeout)
    # Pair the replies the client saw with the verdicts the server recorded.
    return [
        attrs.evolve(r, rule=_rule_of(records, i), observed=_observed_of(records, i))
        for i, r in enumerate(out)
    ]


def _rule_of(records: Sequence[ReplyRecord], i: int) -> str | None:
    verdict = records[i].verdict if i < len(records) else None
    return verdict.rule if verdict is not None else None


def _observed_of(records: Sequence[ReplyRecord], i: int) -> tuple[str, ...]:
    verdict = records[i].verdict if i < len(records) else None
    if verdict is None:
        return ()
    return tuple(f"{o.rule}: {o.reply or o.action.value}" for o in verdict.observed)


async def _play(
    c: _Client,
    steps: Sequence[Any],
    client: Mapping[str, Any],
    clock: _Clock,
    step_seconds: float,
    out: list[ReplayReply],
) -> None:
    def fmt(s: str) -> str:
        return s.replace("{helo}", str(client.get("helo", ""))).replace("{ip}", str(client["ip"]))

    async def rec(cmd: str) -> Reply | None:
        try:
            r = await c.reply()
        except TimeoutError:
            out.append(ReplayReply("<timeout>", None, None, f"no reply within {c.timeout:g} s"))
            return None
        if r is None:
            out.append(ReplayReply("<eof>", None, None, "connection closed by server"))
            return None
        out.append(ReplayReply(cmd, r.code, r.enhanced, r.text))
        return r

    if await rec("<connect>") is None:
        return
    for step in steps:
        clock.now += step_seconds
        if isinstance(step, str):
            cmd = fmt(step)
            await c.send(cmd.encode("utf-8") + b"\r\n")
            if await rec(cmd) is None:
                return
        elif isinstance(step, dict) and "pipeline" in step:
            cmds = [fmt(x) for x in step["pipeline"]]
            await c.send(b"".join(x.encode("utf-8") + b"\r\n" for x in cmds))
            for cmd in cmds:
                if await rec(cmd) is None:
                    return
        elif isinstance(step, dict) and "auth_plain" in step:
            user, pw = step["auth_plain"][:2]
            tok = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode()).decode()
            await c.send(f"AUTH PLAIN {tok}\r\n".encode())
            if await rec(f"AUTH PLAIN <{user}>") is None:
                return
        elif isinstance(step, dict) and "auth_login" in step:
            user, pw = step["auth_login"][:2]
            await c.send(b"AUTH LOGIN\r\n")
            r = await rec("AUTH LOGIN")
            if r is not None and r.code == 334:
                await c.send(base64.b64encode(user.encode()) + b"\r\n")
                r = await rec(f"<login user {user}>")
            if r is not None and r.code == 334:
                await c.send(base64.b64encode(pw.encode()) + b"\r\n")
                r = await rec("<login password>")
            if r is None:
                return
        elif isinstance(step, dict) and "data" in step:
            await c.send(b"DATA\r\n")
            r = await rec("DATA")
            if r is None:
                return
            if r.code == 354:
                msg = build_message(step)
                await c.send(msg)
                if await rec(f"<message {len(msg)} bytes>") is None:
                    return
        else:
            raise CaseError("<case>", f"bad session step {step!r}")


def run_case_sync(case: Case, *, policy: Policy | None = None) -> list[ReplayReply]:
    """:func:`run_case` for synchronous callers (tests, the CLI)."""
    return asyncio.run(run_case(case, policy=policy))


# -- comparing with Postfix ------------------------------------------------------


def _auth_offered(text: str) -> bool:
    return any(ln.upper().startswith("AUTH") for ln in text.split("\n")[1:])


#: a queue id differs on every run, in Postfix and here alike
_QUEUE_ID = re.compile(r"queued as [0-9A-Za-z]+")


def _mask_queue_id(text: str) -> str:
    """``text`` with its queue id replaced by ``QUEUEID``, as compared."""
    return _QUEUE_ID.sub("queued as QUEUEID", text)


def compare(expected: Sequence[Mapping[str, Any]], got: Sequence[ReplayReply]) -> list[str]:
    """Differences by docs/replay-format.md's rules: reply by reply, the same code, the
    same enhanced code where the expected reply has one, and the same text
    with queue ids masked. The greeting and the EHLO capability list are the
    server's own: for EHLO only AUTH must be offered exactly when expected.
    Empty when they conform."""
    diffs: list[str] = []
    for i in range(max(len(expected), len(got))):
        e = expected[i] if i < len(expected) else None
        g = got[i] if i < len(got) else None
        if e is None or g is None:
            diffs.append(f"#{i}: expected {e and e.get('cmd')!r}, got {g and g.cmd!r}")
            continue
        cmd = str(e.get("cmd", ""))
        where = f"#{i} {cmd}"
        e_text = str(e.get("text", ""))
        if e.get("code") != g.code:
            diffs.append(f"{where}: code {g.code} {g.text!r}, expected {e.get('code')} {e_text!r}")
        elif e.get("enhanced") and e.get("enhanced") != g.enhanced:
            diffs.append(f"{where}: enhanced {g.enhanced}, expected {e.get('enhanced')}")
        elif cmd == "<connect>":
            continue
        elif cmd.upper().startswith("EHLO") and g.code == 250:
            if _auth_offered(e_text) != _auth_offered(g.text):
                diffs.append(
                    f"{where}: AUTH offered {_auth_offered(g.text)}, expected the opposite"
                )
        elif _mask_queue_id(e_text) != _mask_queue_id(g.text):
            diffs.append(f"{where}: text {g.text!r}, expected {e_text!r}")
    return diffs
