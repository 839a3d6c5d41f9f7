"""Capture live SMTP sessions as replay cases (``mailpolicy serve --capture DIR``).

Theory of operation
-------------------
:class:`CaptureStore` gives every connection of a running server a
:class:`SessionRecorder` (through :attr:`ServerOptions.observer
<mailpolicy.adapters.smtp.ServerOptions.observer>`). The recorder keeps the
session's events: each command line as received and whether the client had
already sent more (pipelining), each reply, the AUTH user and outcome, the
message, STARTTLS. When the connection ends, the store turns the events into
a replay case (docs/replay-format.md, see docs/capture.md) and
writes it, with the replies the client really got beside it as
``NAME.expected.jsonl``, so that ``mailpolicy replay --check DIR`` later says
whether the policy still answers the same.

What makes the case replay *exactly*:

* the ``policy`` is the server's settings as a JSON mapping
  (:func:`settings_to_mapping`), account hashes left out;
* the ``dns`` zone is every answer the session's verdicts used, failures
  included: the session object accumulates them
  (:attr:`Session.dns <mailpolicy.model.Session.dns>`), and
  :meth:`StaticZone.from_results` turns them into a zone;
* AUTH never stores a password. Every account of the policy is written to
  the case's ``accounts`` with its addresses and a random placeholder
  password made at capture time; a login that succeeded is replayed with its
  account's placeholder, one that failed with a different random token, so
  the outcome is the same and the real password is never known to the file.
  The server itself redacts AUTH arguments before the recorder sees them.
* the message keeps its exact size: the bytes that are not valid UTF-8
  become ``?`` one for one, and a body left out (``headers_only``, or beyond
  the size limit) is replaced by filler of the same length, written compactly
  with the case's ``size`` key.

What a case cannot reproduce is listed in its ``description`` and in
docs/capture.md (rate counters shared with other sessions, the delivery
outcome, a STARTTLS session's replies before the handshake).

Files are written by one worker thread, each atomically (a temporary file,
then a rename), the ``.expected.jsonl`` first so a reader that globs
``*.json`` never sees a case without its replies. The directory is bounded by
a number of sessions and a number of bytes; the oldest sessions go first.
"""

from __future__ import annotations

import base64
import codecs
import collections
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..config import settings_to_mapping
from ..dialogue import ReplyRecord
from ..model import DnsQuery, DnsResult, Reply, RType, Session
from ..settings import Settings
from .dns import StaticZone, ZoneError
from .driver import SessionObserver
from .replay import build_message

__all__ = [
    "CaptureStore",
    "CapturedSession",
    "SessionRecorder",
    "build_case",
    "settings_to_mapping",
]

log = logging.getLogger("mailpolicy.capture")

#: ``--capture-max-files`` and ``--capture-max-bytes`` defaults
DEFAULT_MAX_FILES = 1000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024

#: our file names: UTC time of writing, a sequence number, the client address
_NAME = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z-\d{6}-[0-9A-Za-z._]+)\.json$")
_FILLER_LINE = 78  # the case format's size filler: 76 "X" and CRLF


def _question_marks(error: UnicodeError) -> tuple[str, int]:
    # One "?" per undecodable byte keeps the message's size exact.
    assert isinstance(error, UnicodeDecodeError)
    return "?" * (error.end - error.start), error.end


codecs.register_error("mailpolicy-capture", _question_marks)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "mailpolicy-capture")


# ---------------------------------------------------------------------------
# Recording one session


@attrs.define
class _Exchange:
    """One command line and what followed it."""

    line: str | None  # None: the connection itself (the greeting)
    pending: bool = False
    replies: list[ReplyRecord] = attrs.field(factory=list)
    auth: tuple[str, bool] | None = None
    message: tuple[bytes, int] | None = None
    done: bool = False


@attrs.frozen
class CapturedSession:
    """Everything a :class:`SessionRecorder` saw, once the connection ended."""

    session: Session
    started: float
    exchanges: tuple[_Exchange, ...]
    tls_after: int | None
    unsolicited: tuple[Reply, ...]


class SessionRecorder(SessionObserver):
    """Records one connection (a :class:`~.smtp.SessionObserver`).

    ``on_close`` receives the :class:`CapturedSession` when the connection
    ends (never for a connection that ended before it had a client address,
    such as a bad PROXY header).
    """

    def __init__(self, on_close: Callable[[CapturedSession], None]) -> None:
        self._on_close = on_close
        self._exchanges: list[_Exchange] = []
        self._started = 0.0
        self._tls_after: int | None = None
        self._unsolicited: list[Reply] = []

    def connected(self, session: Session, now: float) -> None:
        self._started = now
        self._exchanges.append(_Exchange(None))

    def command(self, line: str, pending: bool) -> None:
        self._exchanges.append(_Exchange(line, pending))

    def reply(self, record: ReplyRecord) -> None:
        current = self._exchanges[-1] if self._exchanges else None
        if current is None or current.done:
            # e.g. "421 shutting down", or a reply to a line too long to be a command
            self._unsolicited.append(record.reply)
            return
        current.replies.append(record)
        # 334 (AUTH) and 354 (DATA) wait for more from the client
        current.done = record.reply.code not in (334, 354)

    def authenticated(self, user: str, ok: bool) -> None:
        if self._exchanges:
            self._exchanges[-1].auth = (user, ok)

    def message(self, content: bytes, size: int) -> None:
        if self._exchanges:
            self._exchanges[-1].message = (content, size)

    def tls_started(self) -> None:
        self._tls_after = len(self._exchanges)

    def closed(self, session: Session | None) -> None:
        if session is None or not self._exchanges:
            return
        try:
            self._on_close(
                CapturedSession(
                    session,
                    self._started,
                    tuple(self._exchanges),
                    self._tls_after,
                    tuple(self._unsolicited),
                )
            )
        except Exception:  # a capture problem must never disturb the server
            log.exception("capture failed for a session from %s", session.client_ip)


# ---------------------------------------------------------------------------
# Turning a recorded session into a case


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class _Passwords:
    """Placeholder passwords: one random token per account, one wrong token."""

    def __init__(self, accounts: Iterable[str]) -> None:
        self.good = {name: secrets.token_urlsafe(12) for name in accounts}
        self.wrong = "wrong-" + secrets.token_urlsafe(12)

    def for_login(self, user: str, ok: bool) -> str:
        return self.good.get(user, self.wrong) if ok else self.wrong


@attrs.define
class _Builder:
    passwords: _Passwords
    headers_only: bool
    steps: list[Any] = attrs.field(factory=list)
    expected: list[dict[str, Any]] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    group: list[tuple[str, ReplyRecord | None]] = attrs.field(factory=list)
    group_open: bool = False

    # -- expected replies ----------------------------------------------------

    def expect(self, cmd: str, record: ReplyRecord | None) -> None:
        if record is None:
            return
        r = record.reply
        item: dict[str, Any] = {"cmd": cmd, "code": r.code, "enhanced": r.enhanced, "text": r.text}
        rule = record.verdict.rule if record.verdict is not None else None
        if rule is not None:
            item["rule"] = rule
        self.expected.append(item)

    # -- plain command lines, grouped as the client pipelined them ---------

    def line(self, text: str, record: ReplyRecord | None, pending: bool) -> None:
        self.group.append((text, record))
        self.group_open = pending
        if not pending:
            self.flush()

    def flush(self) -> None:
        if not self.group:
            return
        lines = [text for text, _ in self.group]
        self.steps.append(lines[0] if len(lines) == 1 else {"pipeline": lines})
        for text, record in self.group:
            self.expect(text, record)
        self.group = []
        self.group_open = False

    def alone(self, step: Any, expected: list[tuple[str, ReplyRecord | None]]) -> None:
        """A step the client sent on its own (after reading every reply)."""
        self.flush()
        self.steps.append(step)
        for cmd, record in expected:
            self.expect(cmd, record)

    # -- exchanges -------------------------------------------------------------

    def exchange(self, ex: _Exchange) -> None:
        assert ex.line is not None
        verb = ex.line.split(" ", 1)[0].upper()
        first = ex.replies[0] if ex.replies else None
        if verb == "AUTH":
            self.auth(ex)
        elif verb == "DATA" and first is not None and first.reply.code == 354:
            if ex.message is None:  # the client went away during DATA
                self.alone(ex.line, [(ex.line, first)])
                return
            step = self.data_step(*ex.message)
            second = ex.replies[1] if len(ex.replies) > 1 else None
            size = len(build_message(step))
            self.alone(step, [("DATA", first), (f"<message {size} bytes>", second)])
        else:
            self.line(ex.line, first, ex.pending)

    def data_step(self, content: bytes, size: int) -> dict[str, Any]:
        kept = content
        if self.headers_only:
            end = content.find(b"\r\n\r\n")
            kept = content if end < 0 else content[: end + 4]
        elif len(content) < size:
            self.notes.append(
                f"the message was {size} bytes, over the size limit: "
                f"its first {len(content)} bytes are kept, the rest is filler"
            )
        text = _text(kept).replace("\r\n", "\n").replace("\n", "\r\n")
        if not text.endswith("\r\n"):
            text += "\r\n"
        step: dict[str, Any] = {"data": text}
        rest = size - len(text.encode("utf-8"))
        if rest < 0 or rest == 1:
            # bare LFs made it longer, or one byte is missing that no CRLF line can fill
            how = f"{-rest} bytes longer" if rest < 0 else "1 byte shorter"
            self.notes.append(f"the replayed message is {how} than the original")
            return step
        if rest:
            # A filler line of p bytes, then whole 78-byte lines written as the
            # case's "size" key (the case format appends lines until it is reached).
            p = rest % _FILLER_LINE
            if p < 2:
                p += _FILLER_LINE
            text += "X" * (p - 2) + "\r\n"
            step["data"] = text
            lines = (rest - p) // _FILLER_LINE
            if lines:
                step["size"] = len(text.encode("utf-8")) + _FILLER_LINE * lines - 77
        return step

    def auth(self, ex: _Exchange) -> None:
        assert ex.line is not None
        words = ex.line.split()
        mech = words[1].upper() if len(words) > 1 else ""
        args = len(words) - 2
        user, ok = ex.auth if ex.auth is not None else ("unknown", False)
        replies = ex.replies
        codes = [r.reply.code for r in replies]
        pw = self.passwords.for_login(user, ok)
        # The common shapes read best as the case format's auth steps.
        if ex.auth is not None and not self.group_open and not ex.pending:
            if mech == "PLAIN" and args == 1 and len(replies) == 1:
                self.alone({"auth_plain": [user, pw]}, [(f"AUTH PLAIN <{user}>", replies[0])])
                return
            if mech == "LOGIN" and args == 0 and codes[:2] == [334, 334] and len(codes) == 3:
                self.alone(
                    {"auth_login": [user, pw]},
                    [
                        ("AUTH LOGIN", replies[0]),
                        (f"<login user {user}>", replies[1]),
                        ("<login password>", replies[2]),
                    ],
                )
                return
        # Otherwise the exchange line by line: the AUTH command, then one
        # client line for each 334 challenge, each rebuilt from the reply it got.
        if mech in ("PLAIN", "LOGIN") and args == 1:
            kind = "plain" if mech == "PLAIN" else "login_user"
            head = f"AUTH {mech} {self.sasl_line(kind, replies[0] if replies else None, ex)}"
        else:
            head = " ".join(words[:2] + ["x"] * max(args, 0))
        self.line(head, replies[0] if replies else None, ex.pending)
        kinds = (
            ["plain"]
            if mech == "PLAIN"
            else ["login_user", "login_password"]
            if mech == "LOGIN"
            else []
        )
        if args == 1 and kinds:
            kinds = kinds[1:]
        for i, record in enumerate(replies[:-1]):
            if record.reply.code != 334 or not kinds:
                break
            answer = replies[i + 1]
            # The server does not say whether a SASL response was pipelined:
            # it joins the AUTH line's group only if that one was.
            self.line(self.sasl_line(kinds.pop(0), answer, ex), answer, False)

    def sasl_line(self, kind: str, answer: ReplyRecord | None, ex: _Exchange) -> str:
        """The client line that got ``answer``, with placeholders for secrets."""
        user, ok = ex.auth if ex.auth is not None else ("unknown", False)
        r = answer.reply if answer is not None else None
        if r is not None and r.code == 501:
            return "*"  # an aborted exchange (501 5.7.0)
        if r is not None and r.code == 535 and "Invalid base64" in r.text:
            return "!"  # data that is not base64
        if kind == "login_user":
            return _b64(user)
        if kind == "login_password":
            return _b64(self.passwords.for_login(user, ok))
        if r is not None and r.code == 535 and "malformed" in r.text:
            return _b64("malformed")
        return _b64(f"\0{user}\0{self.passwords.for_login(user, ok)}")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _zone(dns: Mapping[DnsQuery, DnsResult], notes: list[str]) -> dict[str, Any]:
    answers = dict(dns)
    for query in list(answers):
        if query.rtype is not RType.PTR and _is_ip(query.name):
            # A zone key that is an IP address means its PTR name: no zone
            # can hold another question about it.
            notes.append(f"DNS answer {query} = {answers.pop(query).outcome.value} left out")
    try:
        return StaticZone.from_results(answers).to_mapping()
    except ZoneError as e:
        notes.append(f"DNS answers left out: {e}")
        return {}


def build_case(
    captured: CapturedSession,
    policy: Mapping[str, Any],
    accounts: Mapping[str, tuple[str, ...]],
    *,
    headers_only: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The replay case for ``captured`` and the replies it should give.

    ``policy`` is :func:`settings_to_mapping` of the server's settings,
    ``accounts`` maps each account name to the addresses it owns. The second
    value is the replies as the client got them, in replay's output format
    (one ``dict`` per line of ``NAME.expected.jsonl``).
    """
    session = captured.session
    passwords = _Passwords(accounts)
    builder = _Builder(passwords, headers_only)
    exchanges = list(captured.exchanges)
    greeting = exchanges[0].replies[0] if exchanges and exchanges[0].replies else None
    builder.expect("<connect>", greeting)
    tls = session.tls if captured.tls_after is None else True
    start = 1
    if captured.tls_after is not None:
        start = captured.tls_after
        builder.notes.append(
            f"STARTTLS after {captured.tls_after - 1} commands: the case starts in TLS "
            "and the replies before the handshake are not part of it"
        )
    for ex in exchanges[start:]:
        builder.exchange(ex)
    builder.flush()
    for reply in captured.unsolicited:
        builder.notes.append(f"a reply to no command was left out: {reply}")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(captured.started))
    description = f"captured by mailpolicy serve: {session.client_ip} at {started}"
    if headers_only:
        description += "; message headers only (the body is filler of the same size)"
    if builder.notes:
        description += "; " + "; ".join(builder.notes)
    client: dict[str, Any] = {"ip": str(session.client_ip), "tls": tls}
    if session.helo:
        client["helo"] = session.helo
    case: dict[str, Any] = {
        "description": description,
        "now": captured.started,
        "policy": dict(policy),
    }
    if accounts:
        case["accounts"] = {
            name: {"password": passwords.good[name], "addresses": list(addresses)}
            for name, addresses in accounts.items()
        }
    case["dns"] = _zone(session.dns, builder.notes)
    case["client"] = client
    case["session"] = builder.steps
    return case, builder.expected


# ---------------------------------------------------------------------------
# The capture directory


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _name_part(ip: str) -> str:
    return ip.replace(":", "_")


class CaptureStore:
    """A bounded directory of captured sessions.

    Pass :attr:`observer` as the server's observer factory
    (``MailServer(..., observer=store.observer)``) and call :meth:`close`
    after the server stopped, so the last sessions are written. At most
    ``max_files`` sessions and ``max_bytes`` bytes are kept (a session is a
    ``NAME.json`` case and its ``NAME.expected.jsonl``); the oldest go first,
    including those already in the directory from an earlier run. Files in
    the directory that are not captures are never touched.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        settings: Settings,
        *,
        headers_only: bool = False,
        max_files: int = DEFAULT_MAX_FILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_files < 1 or max_bytes < 1:
            raise ValueError("capture limits must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.headers_only = headers_only
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._policy = settings_to_mapping(settings)
        self._accounts = {a.name: a.addresses for a in settings.accounts}
        self._seq = 0
        self._index: collections.deque[tuple[str, int]] = collections.deque()
        self._bytes = 0
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mailpolicy-capture"
        )
        self._scan()

    # -- the directory ---------------------------------------------------------

    def _scan(self) -> None:
        found: list[tuple[str, int]] = []
        for path in self.directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                inner = path.name[1:-4].removesuffix(".expected.jsonl").removesuffix(".json")
                if _NAME.match(inner + ".json"):
                    path.unlink(missing_ok=True)  # left by a crash mid-write
                continue
            m = _NAME.match(path.name)
            if m:
                found.append((m.group(1), self._size(m.group(1))))
        for item in sorted(found):
            self._index.append(item)
            self._bytes += item[1]
        self._enforce()

    def _size(self, name: str) -> int:
        total = 0
        for suffix in (".json", ".expected.jsonl"):
            with contextlib.suppress(OSError):
                total += (self.directory / f"{name}{suffix}").stat().st_size
        return total

    def _enforce(self) -> None:
        while self._index and (len(self._index) > self.max_files or self._bytes > self.max_bytes):
            name, size = self._index.popleft()
            self._bytes -= size
            for suffix in (".json", ".expected.jsonl"):
                (self.directory / f"{name}{suffix}").unlink(missing_ok=True)

    @property
    def cases(self) -> list[Path]:
        """The captured cases now kept, oldest first."""
        return [self.directory / f"{name}.json" for name, _ in self._index]

    # -- sessions --------------------------------------------------------------

    def use_settings(self, settings: Settings) -> None:
        """The policy sessions starting from now run under (a reload): their
        cases record it; sessions already open keep the one they started with."""
        self._policy = settings_to_mapping(settings)
        self._accounts = {a.name: a.addresses for a in settings.accounts}

    def observer(self) -> SessionRecorder:
        """A recorder for one new connection (the server's observer factory).
        Its case records the policy in force now, when the session starts."""
        policy, accounts = self._policy, self._accounts
        return SessionRecorder(lambda captured: self._submit(captured, policy, accounts))

    def _submit(
        self,
        captured: CapturedSession,
        policy: dict[str, Any] | None = None,
        accounts: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._worker.submit(
            self._write,
            captured,
            self._policy if policy is None else policy,
            self._accounts if accounts is None else accounts,
        )

    def _write(
        self,
        captured: CapturedSession,
        policy: dict[str, Any],
        accounts: dict[str, tuple[str, ...]],
    ) -> None:
        try:
            case, expected = build_case(captured, policy, accounts, headers_only=self.headers_only)
            case_bytes = (json.dumps(case, indent=1, ensure_ascii=False) + "\n").encode()
            expected_bytes = "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in expected
            ).encode()
            size = len(case_bytes) + len(expected_bytes)
            if size > self.max_bytes:
                log.warning(
                    "session from %s not captured: %d bytes is over the %d-byte limit",
                    captured.session.client_ip,
                    size,
                    self.max_bytes,
                )
                return
            self._seq += 1
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
            micros = int((now % 1) * 1_000_000)
            ip = _name_part(str(captured.session.client_ip))
            name = f"{stamp}.{micros:06d}Z-{self._seq % 1_000_000:06d}-{ip}"
            _atomic_write(self.directory / f"{name}.expected.jsonl", expected_bytes)
            _atomic_write(self.directory / f"{name}.json", case_bytes)
            self._index.append((name, size))
            self._bytes += size
            self._enforce()
        except Exception:
            log.exception(
                "cannot write the capture of a session from %s", captured.session.client_ip
            )

    def flush(self) -> None:
        """Wait until every session ended so far is written."""
        self._worker.submit(lambda: None).result()

    def close(self) -> None:
        """Write what is pending and stop the writer thread."""
        self._worker.shutdown(wait=True)
