"""What the console shows and changes, without the web framework.

The policy file is edited as its parsed mapping (a *draft*): a form sets the
keys of one section, and the draft is kept only if the loader
(:func:`~mailpolicy.config.settings_from_mapping`) accepts the whole of it,
so a bad value never reaches the file. Labels, Postfix equivalents and help
come from ``docs/settings.md`` (one source for the reference and the console).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families

from ..adapters.diff import Change, diff_cases, replay_case_async
from ..adapters.dns import LiveResolver
from ..adapters.replay import (
    Case,
    CaseError,
    ReplayReply,
    build_policy,
    cases_from_mapping,
    load_cases,
    run_case,
)
from ..config import (
    PolicyError,
    PolicyIssue,
    load_settings,
    machine_hostname,
    setting_keys,
    settings_from_mapping,
)
from ..settings import Settings

__all__ = [
    "SECTIONS",
    "Draft",
    "Field",
    "Section",
    "apply_file",
    "dump_toml",
    "help_rows",
    "preview",
    "reload_server",
    "scrape_metrics",
    "try_session",
]


# ---------------------------------------------------------------------------
# Help text from docs/settings.md

#: the reference: a link to docs/settings.md in the source tree, which a
#: wheel carries as a copy (one source for the reference and the console)
DOC = Path(__file__).with_name("settings.md")

_HEADING_TABLE = re.compile(r"`(\[\[?)([A-Za-z0-9_.]+)\]\]?`")
_ROW_KEY = re.compile(r"^\|\s*`([A-Za-z0-9_]+)`\s*\|")
_CODE = re.compile(r"`([^`]*)`")


@attrs.frozen
class Help:
    """One key's row of the reference."""

    type: str
    default: str
    meaning: str
    stage: str
    postfix: str


def help_rows(doc: Path = DOC) -> dict[str, Help]:
    """Every documented key path (``general.max_recipients``,
    ``security.lists[].sender``) to its row; empty when the doc is absent."""
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError:
        return {}
    rows: dict[str, Help] = {}
    table = ""
    in_key_table = False
    for line in text.splitlines():
        if line.startswith("#"):
            m = _HEADING_TABLE.search(line)
            if m:
                table = m.group(2) + ("[]" if m.group(1) == "[[" else "")
            in_key_table = False
            continue
        if line.startswith("| key |"):
            in_key_table = True
            continue
        m = _ROW_KEY.match(line)
        if not (in_key_table and m):
            in_key_table = in_key_table and line.startswith("|")
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6:
            plain = [_CODE.sub(r"\1", c) for c in cells]
            rows[f"{table}.{m.group(1)}"] = Help(*plain[1:6])
    return rows


# ---------------------------------------------------------------------------
# Sections and fields


@attrs.frozen
class Group:
    title: str
    prefix: str  # the table whose direct keys are the group's fields


@attrs.frozen
class Section:
    slug: str
    title: str
    groups: tuple[Group, ...]


#: the panel's sections; the lists have a page of their own (searchable, paged)
SECTIONS: tuple[Section, ...] = (
    Section(
        "general",
        "General",
        (Group("SMTP profile", "general"), Group("SMTP authentication", "general.smtp_auth")),
    ),
    Section(
        "delivery",
        "Delivery",
        (Group("MX or relay host", "delivery"), Group("Relay host", "delivery.relay_host")),
    ),
    Section("relay", "Relay control", (Group("Relay control", "relay"),)),
    Section("lists", "Security: lists", ()),
    Section(
        "sender", "Security: sender policy", (Group("Sender policy", "security.sender_policy"),)
    ),
    Section(
        "connection",
        "Security: connection policy",
        (Group("Connection policy", "security.connection_policy"),),
    ),
    Section("advanced", "Security: advanced", (Group("Advanced", "security.advanced"),)),
)


@attrs.frozen
class Field:
    """One editable key: ``kind`` is bool, int, number, list or string."""

    path: str
    name: str
    kind: str
    value: Any
    help: Help | None
    errors: tuple[str, ...] = ()

    @property
    def choices(self) -> list[str]:
        """The values a choice key allows, from its type in the reference
        (``"direct" or "relay"``); empty for free text."""
        if self.kind != "string" or self.help is None or '" or "' not in self.help.type:
            return []
        return re.findall(r'"([^"]+)"', self.help.type)

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()

    @property
    def text(self) -> str:
        """The value as the form shows it."""
        if self.value is None:
            return ""
        if self.kind == "list":
            return "\n".join(str(v) for v in self.value)
        if isinstance(self.value, float) and self.value.is_integer():
            return str(int(self.value))
        return str(self.value)


def _kind(default: Any, doc_type: str) -> str | None:
    if doc_type.startswith(("table", "array of tables")):
        return None
    if isinstance(default, bool) or doc_type == "boolean":
        return "bool"
    if doc_type.startswith("array"):
        return "list"
    if doc_type.startswith("number"):
        return "number"
    if doc_type.startswith("integer") or isinstance(default, int):
        return "int"
    return "string"


def get_path(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _errors_for(path: str, issues: Iterable[PolicyIssue]) -> tuple[str, ...]:
    return tuple(
        i.reason for i in issues if i.key == path or i.key.startswith((path + "[", path + "."))
    )


def fields(
    group: Group, data: Mapping[str, Any], issues: Iterable[PolicyIssue] = ()
) -> list[Field]:
    """The editable keys directly in ``group``'s table, with their values in
    ``data`` (or their defaults) and the loader's errors for each."""
    docs = help_rows()
    issues = tuple(issues)
    out: list[Field] = []
    for key in setting_keys():
        head, _, name = key.path.rpartition(".")
        if head != group.prefix or name == "text":
            continue
        h = docs.get(key.path)
        kind = _kind(key.default, h.type if h else "")
        if kind is None or isinstance(key.default, Mapping):
            continue
        value = get_path(data, key.path)
        out.append(
            Field(
                key.path,
                name,
                kind,
                key.default if value is None else value,
                h,
                _errors_for(key.path, issues),
            )
        )
    return out


def parse_field(kind: str, raw: str | None) -> Any:
    """A form's text as the file's value; text that is not a number is kept
    as text so the loader names the key and the reason."""
    if kind == "bool":
        return raw is not None
    text = (raw or "").strip()
    if kind == "list":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if kind in ("int", "number"):
        try:
            return int(text)
        except ValueError:
            pass
        if kind == "number":
            try:
                value = float(text)
            except ValueError:
                return text
            return value if math.isfinite(value) else text
        return text
    return text or None


# ---------------------------------------------------------------------------
# The draft


class Draft:
    """The policy file as the console edits it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reset()

    def reset(self) -> None:
        with open(self.path, "rb") as f:
            self.saved: dict[str, Any] = tomllib.load(f)
        self.data = copy.deepcopy(self.saved)

    @property
    def pending(self) -> bool:
        return self.data != self.saved

    def check(self, data: Mapping[str, Any]) -> Settings:
        """``data`` through the loader; raises :class:`PolicyError`."""
        return settings_from_mapping(data, source=str(self.path), default_hostname=machine_hostname)

    def update(self, changes: Mapping[str, Any]) -> tuple[PolicyIssue, ...]:
        """Set the keys of ``changes`` (key path -> value, ``None`` removes) in
        the draft, if the loader accepts the result; else the draft stays and
        the loader's problems are returned."""
        data = copy.deepcopy(self.data)
        for path, value in changes.items():
            _set_path(data, path, value)
        _prune(data)
        try:
            self.check(data)
        except PolicyError as e:
            return e.errors
        self.data = data
        return ()

    def replace_lists(self, lists: list[dict[str, Any]]) -> tuple[PolicyIssue, ...]:
        data = copy.deepcopy(self.data)
        security = data.setdefault("security", {})
        security["lists"] = lists
        _prune(data)
        try:
            self.check(data)
        except PolicyError as e:
            return e.errors
        self.data = data
        return ()


def _prune(data: dict[str, Any]) -> None:
    """Drop tables left empty (a key removed from them)."""
    for key in list(data):
        value = data[key]
        if isinstance(value, dict):
            _prune(value)
            if not value:
                del data[key]


# ---------------------------------------------------------------------------
# Writing TOML

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _dump_table(data: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    for k, v in data.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            out.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, dict):
            out.extend(["", f"[{name}]"])
            _dump_table(v, name, out)
        elif _is_table_array(v):
            for item in v:
                out.extend(["", f"[[{name}]]"])
                _dump_table(item, name, out)


def dump_toml(data: Mapping[str, Any]) -> str:
    """``data`` (a parsed policy) as TOML that :mod:`tomllib` reads back equal."""
    out: list[str] = ["# written by mailpolicy console"]
    _dump_table(data, "", out)
    return "\n".join(out).strip() + "\n"


# ---------------------------------------------------------------------------
# Apply and reload


def apply_file(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` to ``path`` atomically, the previous file kept as
    ``PATH.bak``; returns the backup's path."""
    text = dump_toml(data)
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return backup


def reload_server(pid_file: Path) -> int:
    """SIGHUP to the process in ``pid_file`` (as ``mailpolicy reload``); its pid."""
    text = pid_file.read_text(encoding="ascii").strip()
    if not text.isdigit():
        raise ValueError(f"{pid_file}: no process id in it")
    pid = int(text)
    os.kill(pid, signal.SIGHUP)
    return pid


# ---------------------------------------------------------------------------
# Metrics


@attrs.frozen
class Snapshot:
    generation: float | None
    sessions_open: float | None
    last_reload_ok: float | None
    verdicts: tuple[tuple[str, str, str, str, float], ...]  # stage, action, rule, mode, n


def scrape_metrics(url: str, timeout: float = 5.0) -> Snapshot:
    """The numbers the console shows, from a ``serve --metrics`` endpoint."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    generation = sessions = ok = None
    verdicts: list[tuple[str, str, str, str, float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mailpolicy_policy_generation":
                generation = s.value
            elif s.name == "mailpolicy_sessions_open":
                sessions = s.value
            elif s.name == "mailpolicy_policy_last_reload_success":
                ok = s.value
            elif s.name == "mailpolicy_verdicts_total":
                lb = s.labels
                verdicts.append((lb["stage"], lb["action"], lb["rule"], lb["mode"], float(s.value)))
    return Snapshot(generation, sessions, ok, tuple(verdicts))


def wait_generation(url: str, above: float, timeout: float = 10.0) -> Snapshot | None:
    """Poll the metrics until the generation passes ``above`` (a reload took)."""
    deadline = time.monotonic() + timeout
    last: Snapshot | None = None
    while time.monotonic() < deadline:
        try:
            last = scrape_metrics(url)
        except OSError:
            last = None
        if last is not None and last.generation is not None and last.generation > above:
            return last
        time.sleep(0.1)
    return last


def last_refusals(log: Path, count: int = 20, tail: int = 256 * 1024) -> list[dict[str, Any]]:
    """The last ``count`` refusals (and observed would-be refusals) in a
    ``serve --log-format json`` log, newest first, with their explanation."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail))
            data = f.read()
    except OSError:
        return []
    out: list[dict[str, Any]] = []
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the first line of the tail, cut in two
        if not isinstance(entry, dict) or entry.get("logger") != "mailpolicy.decisions":
            continue
        if entry.get("action") not in ("reject", "defer", "discard"):
            continue
        out.append(
            {k: entry.get(k) for k in ("ts", "client", "stage", "rule", "reply", "msg", "observed")}
        )
        if len(out) >= count:
            break
    return out


# ---------------------------------------------------------------------------
# Preview


@attrs.frozen
class SessionChange:
    case: str
    client: str
    changes: tuple[Change, ...]


@attrs.frozen
class Summary:
    count: int
    client: str
    code: str
    stage: str
    rule: str

    def __str__(self) -> str:
        s = "session" if self.count == 1 else "sessions"
        rule = f", rule {self.rule}" if self.rule else ""
        return (
            f"{self.count} {s} from {self.client} would now get {self.code} at {self.stage}{rule}"
        )


@attrs.frozen
class Preview:
    cases: int
    sessions: tuple[SessionChange, ...]
    summaries: tuple[Summary, ...]
    errors: tuple[str, ...]


def _stage(cmd: str) -> str:
    word = cmd.split(" ", 1)[0].split(":", 1)[0].upper()
    return "DATA" if word.startswith("<MESSAGE") else word


def _reply(r: ReplayReply | None) -> str:
    return "no reply" if r is None or r.code is None else str(r.code)


async def preview(old: Settings, new: Settings, captures: Path | None) -> Preview:
    """Every captured session replayed under ``old`` and ``new``: the
    replies that change, and one line per (client, new reply, stage, rule)."""
    if captures is None:
        return Preview(0, (), (), ())
    cases, bad = load_cases([captures])
    by_name: dict[str, Case] = {c.name: c for c in cases}
    sessions: list[SessionChange] = []
    errors = [str(e) for e in bad]
    counts: dict[tuple[str, str, str, str], int] = {}
    async for result in diff_cases(old, new, cases):
        if result.error is not None:
            errors.append(result.error)
            continue
        if not result.changes:
            continue
        client = str(by_name[result.case].client.get("ip", "?"))
        sessions.append(SessionChange(result.case, client, result.changes))
        first = result.changes[0]
        after = first.after
        key = (
            client,
            _reply(after),
            _stage(first.cmd),
            (after.rule if after is not None else None) or ",".join(first.rules),
        )
        counts[key] = counts.get(key, 0) + 1
    summaries = tuple(Summary(n, *k) for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return Preview(len(cases), tuple(sessions), summaries, tuple(errors))


# ---------------------------------------------------------------------------
# Try a session


async def try_session(
    settings: Settings,
    *,
    ip: str,
    helo: str,
    sender: str,
    recipients: list[str],
    user: str = "",
    zone: Mapping[str, Any] | None = None,
    live: bool = False,
) -> list[ReplayReply]:
    """The replies one session would get under ``settings``, DNS answered
    from ``zone`` or, ``live``, by the policy's resolvers; ``user`` logs in
    first (with a password made up for the trial: the account's own is never
    needed)."""
    steps: list[Any] = ["EHLO {helo}"]
    case: dict[str, Any] = {
        # a logged-in trial is under TLS: AUTH is usually refused before STARTTLS
        "client": {
            "ip": ip or "192.0.2.10",
            "helo": helo or "client.example.com",
            "tls": bool(user),
        },
        "dns": dict(zone or {}),
    }
    if user:
        owned: tuple[str, ...] = ()
        for account in settings.accounts:
            if account.name == user:
                owned = account.addresses
        settings = attrs.evolve(
            settings, accounts=tuple(a for a in settings.accounts if a.name != user)
        )
        case["accounts"] = {user: {"password": "console-trial", "addresses": list(owned)}}
        steps.append({"auth_plain": [user, "console-trial"]})
    steps.append(f"MAIL FROM:<{sender}>")
    steps.extend(f"RCPT TO:<{r}>" for r in recipients)
    steps.append("QUIT")
    case["session"] = steps
    try:
        if live:
            # the policy's [dns] resolvers, as serve would ask them
            (trial,) = cases_from_mapping(case, "<trial>", "trial")
            return await run_case(
                trial,
                policy=build_policy(trial, settings),
                resolver=LiveResolver.from_settings(settings.dns),
            )
        return list(await replay_case_async(case, settings))
    except CaseError as e:
        raise ValueError(e.reason) from e


def current_settings(path: Path) -> Settings:
    return load_settings(path)
