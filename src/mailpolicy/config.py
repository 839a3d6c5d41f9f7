"""The policy file: TOML in, :class:`~mailpolicy.settings.Settings` out.

Theory of operation
-------------------
The loader walks the data once, table by table. Each table is read against
the attrs class it becomes (a :class:`_Table`): the class's fields are the
table's allowed keys, and every field has a node that reads one value (checks
and converts it) and writes it back. A node that refuses a value raises
:class:`_Refused`; the walker records the refusal with its key path
(``security.lists[2].client[0]``) and carries on with the next key, so one pass
reports every problem in the file. An object is built only from a subtree
without problems, and the whole ``Settings`` only when there were none at all:
nothing half-loaded escapes.

Rules that tie several keys together (relay mode needs a relay host, a TLS
listener needs a certificate, a white rule cannot reject) are each table's
``check``; they look at what the file *wrote*, so a bad value is reported once,
not again as "missing" by the rule that depends on it.

The file differs from the classes in three places only: ``[accounts.NAME]``
puts an account's name in the table name, ``[[delivery.exceptions]]`` holds its
relay host's keys inline, and ``security.advanced.dnsbl`` entries are strings
(``zone`` or ``zone=127.0.0.2``).

These tables are the one statement of the file's schema: the loader reads with
them, :func:`settings_to_mapping` writes with them (captures, round trips), and
:func:`setting_keys` lists the file's keys from them (the reference in
docs/settings.md is tested against that list).

cattrs is not used. Tried as the loader: its default hooks coerce (``"x"`` to
int fails with Python's message, ``3`` is a bool, a string is a tuple of
characters), a non-table is an ``AttributeError``, non-string keys break its
own error formatting, and unknown keys come as a set after all fields, so file
order is lost. Every value, table and cross-key rule needed a hook of ours,
leaving cattrs only the loop over fields.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from .model import Networks
from .passwords import is_password_hash
from .settings import (
    Account,
    AdvancedSettings,
    ConnectionPolicy,
    DeliveryException,
    DeliverySettings,
    DnsblZone,
    DnsSettings,
    GeneralSettings,
    ListRule,
    Normalized,
    RelayHost,
    RelaySettings,
    Replies,
    Security,
    SecuritySettings,
    SenderPolicy,
    ServerSettings,
    Settings,
    SmtpAuthSettings,
    normalize_domain,
)

__all__ = [
    "PolicyError",
    "PolicyIssue",
    "SettingKey",
    "load_settings",
    "machine_hostname",
    "setting_keys",
    "settings_from_mapping",
    "settings_to_mapping",
]


# ---------------------------------------------------------------------------
# Errors


@attrs.frozen
class PolicyIssue:
    """One problem in a policy: where (file and key path) and why."""

    source: str
    key: str
    reason: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.source}: {self.key}: {self.reason}"
        return f"{self.source}: {self.reason}"


class PolicyError(Exception):
    """A policy that cannot be loaded.

    ``source``, ``key`` and ``reason`` describe the first problem (``key`` is
    ``""`` for a whole-file problem such as bad TOML); ``errors`` holds every
    problem found in the file, the first included, so a user can fix them all
    in one go. ``str(err)`` and :meth:`report` give all of them, one a line.
    """

    def __init__(
        self, source: str, key: str, reason: str, errors: Iterable[PolicyIssue] = ()
    ) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        self.errors: tuple[PolicyIssue, ...] = tuple(errors) or (PolicyIssue(source, key, reason),)
        super().__init__(str(PolicyIssue(source, key, reason)))

    @classmethod
    def from_issues(cls, issues: Sequence[PolicyIssue]) -> PolicyError:
        """The error for a non-empty list of problems, the first one leading."""
        first = issues[0]
        return cls(first.source, first.key, first.reason, issues)

    def report(self) -> str:
        """Every problem, one per line, in the order they appear in the file."""
        return "\n".join(str(e) for e in self.errors)

    def __str__(self) -> str:
        return self.report()

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle by their args; ours are keyword-rich.
        return (PolicyError, (self.source, self.key, self.reason, self.errors))


# ---------------------------------------------------------------------------
# Entry points


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read the TOML policy file at ``path`` and return its settings.

    Raises :class:`PolicyError` naming the file for an unreadable file, bad
    TOML (with line and column) or any invalid setting (with its key path).
    Without ``general.hostname`` the hostname is :func:`machine_hostname`.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            # tomllib.load(f) is tomllib.loads(f.read().decode()): the same
            # errors, but big arrays of plain strings are read much faster.
            data = _toml_loads(f.read().decode())
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(source, "", f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise PolicyError(source, "", f"not valid UTF-8: {e}") from None
    except OSError as e:
        raise PolicyError(source, "", f"cannot read the file: {e.strerror or e}") from None
    # Only a file stands for this machine: its default hostname is the machine's.
    return settings_from_mapping(data, source, default_hostname=machine_hostname)


# ---------------------------------------------------------------------------
# Reading big lists fast
#
# tomllib reads a million-entry array of strings in about two seconds, one
# value at a time in Python. _toml_loads reads such an array with two regular
# expressions instead, and gives tomllib a stand-in for it: a one-element
# array with the same number of lines, whose closing bracket is in the same
# column. tomllib then checks the whole document as always (tables, keys,
# every other value), the result is the same, and every error it reports has
# the same line and column: the text before a stand-in is unchanged, and the
# text after it is at the same (line, column). Only arrays that are, exactly,
# "[", plain strings (no escapes, no control characters) separated by commas,
# blanks, newlines and comments, an optional trailing comma and "]", in the
# value of a "key = [" line at the top level, are read this way; a document
# with multi-line strings is left to tomllib whole.

_COMMENT: Final = r"#[^\x00-\x08\x0a-\x1f\x7f]*"
_PLAIN_STR: Final = r'"[^"\\\x00-\x08\x0a-\x1f\x7f]*"'
_ARRAY_WS: Final = rf"(?:[ \t\n]|{_COMMENT})*+"
_PLAIN_ARRAY: Final = re.compile(
    rf"\[{_ARRAY_WS}(?:{_PLAIN_STR}{_ARRAY_WS},{_ARRAY_WS})*+(?:{_PLAIN_STR}{_ARRAY_WS})?+\]"
)
_ARRAY_KEY: Final = re.compile(
    r"[ \t]*[A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*[ \t]*=[ \t]*(?=\[)"
)
#: what can change the nesting depth or hide brackets on a line
_TOKEN: Final = re.compile(r"""["'#\[\]{}\n]""")
_STRING_REST: Final = {'"': re.compile(r'(?:[^"\\\n]|\\.)*"'), "'": re.compile(r"[^'\n]*'")}
_PLAIN_VALUE: Final = re.compile(r'"([^"]*)"')
_VALUE_OR_COMMENT: Final = re.compile(rf'"([^"]*)"|({_COMMENT})')
#: smaller arrays are not worth it
_MIN_FAST_ARRAY: Final = 2048


def _toml_loads(text: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, faster for big arrays of plain strings."""
    text = text.replace("\r\n", "\n")  # as tomllib does first
    if len(text) < 4 * _MIN_FAST_ARRAY or '"""' in text or "'''" in text:
        return tomllib.loads(text)
    token = "mailpolicy-array-" + os.urandom(8).hex()
    while token in text:
        token = "mailpolicy-array-" + os.urandom(8).hex()
    arrays: dict[str, list[str]] = {}
    pieces: list[str] = []
    done = 0  # text[:done] is in pieces
    pos, depth, line_start = 0, 0, True
    n = len(text)
    while pos < n:
        if line_start and depth == 0:
            key = _ARRAY_KEY.match(text, pos)
            if key is not None:
                start = key.end()
                array = _PLAIN_ARRAY.match(text, start)
                if array is not None and array.end() - start >= _MIN_FAST_ARRAY:
                    region = text[start : array.end()]
                    name = f"{token}:{len(arrays)}"
                    lines = region.count("\n")
                    column = len(region) - 1 - region.rfind("\n") if lines else 0
                    stand_in = f'["{name}"' + "\n" * lines + " " * (column - 1) + "]"
                    if lines or len(stand_in) <= len(region):
                        if not lines:
                            stand_in = f'["{name}"' + " " * (len(region) - len(name) - 4) + "]"
                        arrays[name] = _array_values(region)
                        pieces.append(text[done:start])
                        pieces.append(stand_in)
                        done = pos = array.end()
        line_start = False
        m = _TOKEN.search(text, pos)
        if m is None:
            break
        ch = m.group()
        pos = m.end()
        if ch == "\n":
            line_start = True
        elif ch == "#":
            end = text.find("\n", pos)
            pos = n if end < 0 else end
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(depth - 1, 0)
        else:  # a string: skip it (an unterminated one is tomllib's to report)
            rest = _STRING_REST[ch].match(text, pos)
            if rest is not None:
                pos = rest.end()
    if not arrays:
        return tomllib.loads(text)
    pieces.append(text[done:])
    data = tomllib.loads("".join(pieces))
    _put_back(data, token, arrays)
    return data


def _array_values(region: str) -> list[str]:
    """The strings of an array that _PLAIN_ARRAY matched."""
    if "#" not in region:
        return _PLAIN_VALUE.findall(region)
    # Comments may hold quotes: take the tokens in order, values only.
    return [value for value, comment in _VALUE_OR_COMMENT.findall(region) if not comment]


def _put_back(node: Any, token: str, arrays: dict[str, list[str]]) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str) and value[0].startswith(token):
                node[key] = arrays[value[0]]
            else:
                _put_back(value, token, arrays)
        elif isinstance(value, dict):
            _put_back(value, token, arrays)


def settings_from_mapping(
    data: Mapping[str, Any],
    source: str = "<policy>",
    *,
    default_hostname: Callable[[], str] | None = None,
) -> Settings:
    """Convert parsed policy data (TOML or JSON: tables as mappings) to settings.

    ``source`` names the data in errors. When ``general.hostname`` is absent it
    is ``default_hostname()`` if given (:func:`load_settings` gives
    :func:`machine_hostname`), else ``GeneralSettings``' static default: this
    function never consults the machine. Raises :class:`PolicyError` with
    every problem.
    """
    walk = _Walk(source)
    try:
        settings: Settings = walk.read(_read_settings, "", data)
    except _Reported:
        raise PolicyError.from_issues(walk.issues) from None
    if default_hostname is not None and "hostname" not in data.get("general", {}):
        general = attrs.evolve(settings.general, hostname=default_hostname())
        settings = attrs.evolve(settings, general=general)
    return settings


def settings_to_mapping(settings: Settings, *, accounts: bool = False) -> dict[str, Any]:
    """``settings`` as a policy mapping: the file's keys, JSON-ready.

    Written by the same schema that reads the file, so
    :func:`settings_from_mapping` reads it back to equal settings. Keys at their
    default are left out (the mapping stays readable), except
    ``general.hostname``, always written: read back without it, the hostname
    would be whatever the reader's default is. ``accounts`` (password hashes)
    are left out unless asked for: a capture must not carry them.
    """
    out: dict[str, Any] = _SETTINGS.write(settings)
    if not accounts:
        out.pop("accounts", None)
    return out


def machine_hostname() -> str:
    """This machine's FQDN, lower-cased: the file's default ``general.hostname``."""
    return socket.getfqdn().lower()


@attrs.frozen
class SettingKey:
    """One key of the policy file, as the loader's schema knows it.

    ``path`` is in the reference's notation: ``security.lists[].client``,
    ``accounts.NAME.password_hash``. ``default`` is as the file would write it
    (``None`` when the key has none or is ``required``).
    """

    path: str
    required: bool
    default: Any


def setting_keys() -> tuple[SettingKey, ...]:
    """Every key of the policy file, in the order of the settings classes."""
    out: list[SettingKey] = []
    _table_keys(_SETTINGS, "", out)
    return tuple(out)


def _table_keys(table: _Table, prefix: str, out: list[SettingKey]) -> None:
    for name in table.fields:
        inline = table.inline.get(name)
        if inline is not None:
            _table_keys(inline, prefix, out)
            continue
        node = table.readers[name]
        path = f"{prefix}.{name}" if prefix else name
        default = table.defaults[name]
        required = default is attrs.NOTHING
        written = None if required or default is None else node.write(default)
        out.append(SettingKey(path, required, written))
        if isinstance(node, _Table):
            _table_keys(node, path, out)
        elif isinstance(node, _List) and isinstance(node.item, _Table):
            _table_keys(node.item, f"{path}[]", out)
        elif isinstance(node, _Accounts):
            out.append(SettingKey(f"{path}.NAME", False, None))
            _table_keys(node.table, f"{path}.NAME", out)


# ---------------------------------------------------------------------------
# The walker


class _Refused(Exception):
    """A reader refuses its value; the walker records ``reason`` at the key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Reported(Exception):
    """A subtree had problems, already recorded: build nothing from it."""


class _Node:
    """One value of the file: how it is read (checked and converted to what
    the settings class holds) and written back (to what the file holds)."""

    def __call__(self, walk: _Walk, path: str, value: object) -> Any:
        raise NotImplementedError

    def write(self, value: Any) -> Any:
        raise NotImplementedError


Check = Callable[["_Walk", str, Mapping[object, object], dict[str, Any]], None]
Make = Callable[[dict[str, Any]], Any]


@attrs.define
class _Walk:
    """The state of one load: the source name and the problems found so far."""

    source: str
    issues: list[PolicyIssue] = attrs.Factory(list)

    def refuse(self, key: str, reason: str) -> None:
        self.issues.append(PolicyIssue(self.source, key, reason))

    def read(self, reader: Callable[[_Walk, str, object], Any], path: str, value: object) -> Any:
        """``reader``'s result, or :class:`_Reported` if it found any problem."""
        before = len(self.issues)
        try:
            result = reader(self, path, value)
        except _Refused as e:
            self.refuse(path, e.reason)
            raise _Reported from None
        if len(self.issues) > before:
            raise _Reported
        return result


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    # Key paths use TOML's notation, so a user can search the file for them.
    if not _BARE_KEY.fullmatch(key):
        key = json.dumps(key)
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    """A value as a TOML user would name it, for "expected X, got Y"."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})" if abs(value) < 10**18 else "an integer"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({json.dumps(shown)})"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _as_is(value: Any) -> Any:
    return value


@attrs.frozen
class _Table(_Node):
    """How one table of the file becomes an instance of ``cls``, and back.

    ``fields`` are the attributes of ``cls`` the file holds, in class order;
    ``readers`` maps every key of the table to its node, the keys of an
    ``inline`` field's table included (they sit in this table, not in one of
    their own). ``refused`` keys are known only to be refused with a reason;
    ``required`` keys must be present; ``check`` enforces rules across keys;
    ``make`` builds the object from the converted values (``cls(**values)``
    by default). ``defaults`` are the fields' converted defaults: a field at
    its default is not written, unless it is ``always`` written.
    """

    cls: type[Any]
    fields: tuple[str, ...]
    readers: Mapping[str, _Node]
    defaults: Mapping[str, Any]
    required: tuple[str, ...]
    inline: Mapping[str, _Table]
    refused: Mapping[str, str]
    check: Check | None
    make: Make | None
    always: frozenset[str]

    def __call__(self, walk: _Walk, path: str, value: object) -> Any:
        data = _table_data(value)
        before = len(walk.issues)
        values: dict[str, Any] = {}
        for key, item in data.items():
            if not isinstance(key, str):
                walk.refuse(path, f"key {key!r} is not a string")
                continue
            sub = _join(path, key)
            if key in self.refused:
                walk.refuse(sub, self.refused[key])
                continue
            reader = self.readers.get(key)
            if reader is None:
                allowed = ", ".join([*self.readers, *self.refused])
                walk.refuse(sub, f"unknown key {key!r}; allowed keys: {allowed}")
                continue
            with contextlib.suppress(_Reported):
                values[key] = walk.read(reader, sub, item)
        for key in self.required:
            if key not in data:
                walk.refuse(_join(path, key), "required key is missing")
        for check in (self.check, *(t.check for t in self.inline.values())):
            if check is not None:
                check(walk, path, data, values)
        # The caller's walk.read() notices any problem and skips the result.
        if len(walk.issues) > before:
            return None
        return self.build(values)

    def build(self, values: dict[str, Any]) -> Any:
        for name, table in self.inline.items():
            values[name] = table.build({k: values.pop(k) for k in table.readers if k in values})
        return self.make(values) if self.make is not None else self.cls(**values)

    def write(self, value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.fields:
            item = getattr(value, name)
            inline = self.inline.get(name)
            if inline is not None:
                out.update(inline.write(item))
            elif name in self.always or item != self.defaults[name]:
                out[name] = self.readers[name].write(item)
        return out


def _table_data(value: object) -> Mapping[object, object]:
    if not isinstance(value, Mapping):
        raise _Refused(f"expected a table, got {_describe(value)}")
    return value


def _table(
    cls: type[Any],
    readers: Mapping[str, _Node] | None = None,
    *,
    omit: Iterable[str] = (),
    inline: Mapping[str, _Table] | None = None,
    refused: Mapping[str, str] | None = None,
    check: Check | None = None,
    make: Make | None = None,
    always: Iterable[str] = (),
) -> _Table:
    """A :class:`_Table` for ``cls``: its fields less ``omit``.

    Fields without a node in ``readers`` get one from their type (bool,
    int >= 0, number >= 0). A field of any other type without a node is a
    programming error, raised at import so a new setting cannot go unchecked.
    """
    readers = dict(readers or {})
    inline = dict(inline or {})
    hints = typing.get_type_hints(cls)
    skip = set(omit)
    fields: list[str] = []
    table: dict[str, _Node] = {}
    defaults: dict[str, Any] = {}
    needed: list[str] = []
    for field in attrs.fields(cls):
        if field.name in skip:
            continue
        fields.append(field.name)
        if field.name in inline:
            table.update(inline[field.name].readers)
            needed.extend(inline[field.name].required)
            continue
        reader = readers.pop(field.name, None) or _TYPE_READERS.get(hints[field.name])
        if reader is None:
            raise TypeError(f"no reader for {cls.__name__}.{field.name}")
        table[field.name] = reader
        defaults[field.name] = _converted_default(field)
        if field.default is attrs.NOTHING:
            needed.append(field.name)
    if readers:
        raise TypeError(f"readers for unknown fields of {cls.__name__}: {sorted(readers)}")
    return _Table(
        cls,
        tuple(fields),
        table,
        defaults,
        tuple(needed),
        inline,
        dict(refused or {}),
        check,
        make,
        frozenset(always),
    )


def _converted_default(field: attrs.Attribute[Any]) -> Any:
    """The field's default as an instance holds it (networks parsed, ...)."""
    default = field.default
    if default is attrs.NOTHING or field.converter is None:
        return default
    convert: Callable[[Any], Any] = field.converter  # type: ignore[assignment]
    return convert(default)


@attrs.frozen
class _List(_Node):
    """An array whose elements ``item`` reads; ``unique`` names a key that
    must differ between the array's tables (rule names)."""

    item: _Node
    nonempty: bool = False
    unique: str | None = None

    def __call__(self, walk: _Walk, path: str, value: object) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _Refused(f"expected an array, got {_describe(value)}")
        if self.nonempty and not value:
            raise _Refused("must not be empty")
        out: list[Any] = []
        seen: dict[str, str] = {}
        unique = self.unique
        for i, element in enumerate(value):
            sub = f"{path}[{i}]"
            if unique is not None and isinstance(element, Mapping):
                name = element.get(unique)
                if isinstance(name, str) and name in seen:
                    walk.refuse(
                        _join(sub, unique), f"duplicate name {name!r}, already used by {seen[name]}"
                    )
                elif isinstance(name, str):
                    seen[name] = sub
            with contextlib.suppress(_Reported):
                out.append(walk.read(self.item, sub, element))
        return tuple(out)

    def write(self, value: Any) -> list[Any]:
        return [self.item.write(v) for v in value]


@attrs.frozen
class _Scalar(_Node):
    """One value: ``convert`` checks it (raising :class:`_Refused`) and
    converts it; ``unconvert`` writes it back."""

    convert: Callable[[object], Any]
    unconvert: Callable[[Any], Any] = _as_is

    def __call__(self, walk: _Walk, path: str, value: object) -> Any:
        return self.convert(value)

    def write(self, value: Any) -> Any:
        return self.unconvert(value)


def _scalar(convert: Callable[[object], Any], unconvert: Callable[[Any], Any] = _as_is) -> _Scalar:
    return _Scalar(convert, unconvert)


def _list(item: _Node, *, nonempty: bool = False, unique: str | None = None) -> _List:
    return _List(item, nonempty, unique)


@attrs.frozen
class _Values(_Node):
    """``_list(_scalar(convert))`` for arrays that may hold a million values:
    one tight loop, the key path made only for a value that is refused (the
    same problems, in the same order); ``finish`` builds the result."""

    convert: Callable[[object], Any]
    finish: Callable[[list[Any]], tuple[Any, ...]] = tuple
    unconvert: Callable[[Any], Any] = _as_is

    def __call__(self, walk: _Walk, path: str, value: object) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _Refused(f"expected an array, got {_describe(value)}")
        out: list[Any] = []
        append = out.append
        convert = self.convert
        for i, element in enumerate(value):
            try:
                append(convert(element))
            except _Refused as e:
                walk.refuse(f"{path}[{i}]", e.reason)
        return self.finish(out)

    def write(self, value: Any) -> list[Any]:
        return [self.unconvert(v) for v in value]


# ---------------------------------------------------------------------------
# Scalar values


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Refused(f"expected true or false, got {_describe(value)}")
    return value


def _int(minimum: int = 0, maximum: int | None = None) -> _Scalar:
    def convert(value: object) -> int:
        # bool is an int in Python; in the file `true` is not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Refused(f"expected an integer, got {_describe(value)}")
        _within(value, minimum, maximum)
        return value

    return _scalar(convert)


def _number(minimum: float = 0, *, above: bool = False) -> _Scalar:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Refused(f"expected a number, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _Refused(f"expected a finite number, got {value!r}")
        if above and value <= minimum:
            raise _Refused(f"must be greater than {minimum:g}, got {value!r}")
        _within(value, minimum, None)
        return value

    return _scalar(convert)


def _within(value: float, minimum: float, maximum: float | None) -> None:
    if value < minimum:
        what = "must not be negative" if minimum == 0 else f"must be at least {minimum:g}"
        raise _Refused(f"{what}, got {value!r}")
    if maximum is not None and value > maximum:
        raise _Refused(f"must be at most {maximum:g}, got {value!r}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Refused(f"expected a string, got {_describe(value)}")
    return value


def _word(value: object) -> str:
    """A non-empty string without surrounding blanks: names, paths."""
    text = _string(value).strip()
    if not text:
        raise _Refused("must not be empty")
    return text


def _text_line(value: object) -> str:
    """Text sent in an SMTP reply: a line break would end the reply early."""
    text = _string(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _Refused("must be one line without control characters")
    return text


def _choice(*allowed: str) -> _Scalar:
    def convert(value: object) -> str:
        text = _string(value)
        if text not in allowed:
            options = ", ".join(json.dumps(a) for a in allowed)
            raise _Refused(f"expected one of {options}, got {json.dumps(text)}")
        return text

    return _scalar(convert)


_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: object) -> str:
    text = _string(value)
    if not _ENV_NAME.fullmatch(text):
        raise _Refused(
            f"{json.dumps(text)} is not an environment variable name "
            "(letters, digits and _, not starting with a digit)"
        )
    return text


# ---------------------------------------------------------------------------
# Names, addresses and networks

_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _domain_text(text: str) -> str:
    """``text`` as a normalised domain name, or :class:`_Refused`."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _Refused("empty domain name")
    if not name.isascii():
        raise _Refused(f"{json.dumps(text)}: write an international name in its ASCII (xn--) form")
    if len(name) > 253:
        raise _Refused(f"{json.dumps(text[:40] + '...')}: a domain name has at most 253 characters")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise _Refused(
                f"{json.dumps(text)} is not a valid domain name: label {json.dumps(label)} must "
                "be 1-63 letters, digits or hyphens, not starting or ending with a hyphen"
            )
    return name


def _domain(value: object) -> str:
    return _domain_text(_string(value))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _fqdn(value: object) -> str:
    text = _string(value)
    if _is_ip(text.strip()):
        raise _Refused(f"{json.dumps(text)} is an IP address, not a host name")
    name = _domain_text(text)
    if "." not in name:
        raise _Refused(f"{json.dumps(text)} is not fully qualified (e.g. mx.example.com)")
    if name.rpartition(".")[2].isdigit():
        raise _Refused(f"{json.dumps(text)}: the last label of a host name is not all digits")
    return name


def _host(value: object) -> str:
    """A host to connect to: a host name (single label allowed) or an IP."""
    text = _string(value).strip()
    if _is_ip(text):
        return text
    if text.startswith("["):
        raise _Refused(f"{json.dumps(text)}: write the host without brackets")
    return _domain_text(text)


# RFC 5322 specials, blanks and controls cannot appear unquoted in a local
# part; quoted local parts are not supported in a policy.
_LOCAL_PART: Final = re.compile(r"[^\x00-\x20\x7f()<>\[\]:;@\\,\"]{1,64}")


def _local_part(text: str, whole: str) -> str:
    if not _LOCAL_PART.fullmatch(text) or text.startswith(".") or text.endswith("."):
        raise _Refused(f"{json.dumps(whole)}: {json.dumps(text)} is not a valid local part")
    return text


def _address_text(text: str) -> str:
    local, at, domain = text.strip().rpartition("@")
    if not at or not local:
        raise _Refused(f"{json.dumps(text)} is not an address (user@example.com)")
    _local_part(local, text)
    try:
        return f"{local}@{_domain_text(domain)}"
    except _Refused as e:
        raise _Refused(f"{json.dumps(text)}: {e.reason}") from None


def _address(value: object) -> str:
    return _address_text(_string(value))


def _target(value: object) -> str:
    """An exception target: an address or a domain."""
    text = _string(value).strip()
    return _address_text(text) if "@" in text else _domain_text(text)


def _owned_address(value: object) -> str:
    """An account's address: ``user@example.com``, or ``@example.com`` for
    the whole domain (as in Postfix's ``smtpd_sender_login_maps``)."""
    text = _string(value).strip()
    if text.startswith("@"):
        return "@" + _domain_text(text[1:])
    return _address_text(text)


def _list_value(*, null_sender: bool) -> _Scalar:
    """A sender or recipient list value: ``a@b.example``, ``b.example``,
    ``user@`` or (senders only) ``<>``, the null sender."""

    forms = (
        "an address (a@b.example), a domain (b.example), a local part (user@) "
        "or <> (the null sender)"
        if null_sender
        else "an address (a@b.example), a domain (b.example) or a local part (user@)"
    )

    def convert(value: object) -> str:
        text = _string(value).strip()
        if null_sender and text == "<>":
            return text
        if text.count("@") > 1 or text.startswith("@") or " " in text:
            raise _Refused(f"{json.dumps(text)} is not {forms}")
        if text.endswith("@"):
            return _local_part(text[:-1], text) + "@"
        try:
            return _address_text(text) if "@" in text else _domain_text(text)
        except _Refused as e:
            raise _Refused(f"{e.reason}; expected {forms}") from None

    return _scalar(convert)


def parse_network(text: str) -> tuple[int, int, int]:
    """``ipaddress.ip_network(text, strict=False)`` as ``(version, network
    address as an int, prefix length)``; raises ``ValueError`` for exactly the
    texts ``ip_network`` refuses.

    The canonical forms (``192.0.2.0/24``, ``2001:db8::/32``: what
    ``inet_ntop`` prints, and what lists are made of) are read with
    ``inet_pton`` and integer arithmetic, several times faster than
    ``ipaddress``; any other form goes through ``ipaddress`` itself.
    """
    address, slash, prefix = text.partition("/")
    if not slash or (prefix.isascii() and prefix.isdigit() and len(prefix) <= 3):
        family, bits = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
        try:
            packed = socket.inet_pton(family, address)
        except (OSError, ValueError):
            packed = b""
        length = int(prefix) if slash else bits
        if packed and length <= bits and socket.inet_ntop(family, packed) == address:
            value = int.from_bytes(packed, "big")
            if length < bits:
                value &= ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
            return (4 if bits == 32 else 6), value, length
    network = ipaddress.ip_network(text, strict=False)
    return network.version, int(network.network_address), network.prefixlen


def _network_entry(value: object) -> tuple[int, int, int]:
    """A list rule's client network as ``(version, prefix length, address)``:
    what :func:`_network` accepts, without making an ``ipaddress`` object."""
    text = _string(value).strip()
    try:
        version, address, length = parse_network(text)
    except ValueError:
        raise _Refused(f"{json.dumps(text)} is not an IP address or CIDR network") from None
    return version, length, address


#: a domain that _domain_text() returns unchanged (lower case, valid labels)
_CLEAN_DOMAIN: Final = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)
#: a list value that _list_value() returns unchanged and ListRule's
#: converter does not change either: a lower-case dot-atom address or domain
_CLEAN_LIST_VALUE: Final = re.compile(
    r"(?:([a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*)@)?"
    r"((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
)


def _list_domain(value: object) -> str:
    """:func:`_domain`, as ``ListRule`` normalizes it (the same text)."""
    if type(value) is str and len(value) <= 253 and _CLEAN_DOMAIN.fullmatch(value):
        return value
    return normalize_domain(_domain(value))


def _list_address(convert: Callable[[object], str]) -> Callable[[object], str]:
    """A ``_list_value`` converter, as ``ListRule`` normalizes its result."""

    def fast(value: object) -> str:
        if type(value) is str:
            m = _CLEAN_LIST_VALUE.fullmatch(value)
            if m is not None and len(m.group(2)) <= 253 and len(m.group(1) or "") <= 64:
                return value
        return convert(value).strip().lower()

    return fast


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _string(value).strip()
    try:
        # strict=False: like Postfix, 192.0.2.1/24 means 192.0.2.0/24.
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Refused(f"{json.dumps(text)} is not an IP address or CIDR network") from None


def _ip_address(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = _string(value).strip()
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Refused(f"{json.dumps(text)} is not an IP address") from None


_PORT: Final = re.compile(r"[0-9]{1,5}")


def _host_port(text: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split ``HOST:PORT`` / ``[IPv6]:PORT`` (``:PORT`` optional if allowed)."""
    if text.startswith("["):
        inside, close, rest = text[1:].partition("]")
        if not close or not _is_ip(inside) or ":" not in inside:
            raise _Refused(f"{json.dumps(text)}: brackets hold an IPv6 address, as [::1]:2525")
        host = inside
        if rest and not rest.startswith(":"):
            raise _Refused(f"{json.dumps(text)}: expected :PORT after the brackets")
        port_text: str | None = rest[1:] if rest else None
    elif text.count(":") > 1:
        if not port_required and _is_ip(text):
            return text, None
        raise _Refused(f"{json.dumps(text)}: write an IPv6 address in brackets, as [::1]:2525")
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
    if port_text is None:
        if port_required:
            raise _Refused(f"{json.dumps(text)}: expected HOST:PORT, as 127.0.0.1:2525")
        return host, None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _Refused(f"{json.dumps(text)}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _listener(value: object) -> str | None:
    """``HOST:PORT``; ``""`` turns the listener off."""
    text = _string(value).strip()
    if not text:
        return None
    host, _ = _host_port(text, port_required=True)
    try:
        _host(host)
    except _Refused as e:
        raise _Refused(f"{json.dumps(text)}: {e.reason}") from None
    return text


def _unlistener(value: str | None) -> str:
    return "" if value is None else value


def _nameserver(value: object) -> str:
    """An IP address, optionally with a port: ``IP:PORT`` or ``[IPv6]:PORT``."""
    text = _string(value).strip()
    host, _ = _host_port(text, port_required=False)
    if not _is_ip(host):
        raise _Refused(f"{json.dumps(text)}: a name server is an IP address (optionally :PORT)")
    return text


def _dnsbl(value: object) -> DnsblZone:
    text = _string(value).strip()
    zone, sep, answer = text.partition("=")
    try:
        _domain_text(zone)
    except _Refused as e:
        raise _Refused(f"bad DNSBL zone: {e.reason}") from None
    if sep:
        try:
            ipaddress.IPv4Address(answer.strip())
        except ValueError:
            raise _Refused(
                f"{json.dumps(text)}: the answer after = must be an IPv4 address, as 127.0.0.2"
            ) from None
    return DnsblZone.parse(text)


# $scrypt$ln=14,r=8,p=1$SALT$HASH, as `mailpolicy hash-password` writes it
# (unpadded base64).
_SCRYPT_SHAPE: Final = re.compile(
    r"\$scrypt\$ln=[0-9]+,r=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
)


def _password_hash(value: object) -> str:
    text = _string(value)
    if not _SCRYPT_SHAPE.fullmatch(text):
        raise _Refused(
            "not a hash made by `mailpolicy hash-password` "
            "(expected $scrypt$ln=N,r=N,p=N$SALT$HASH)"
        )
    # The shape is right; the verifier must also accept its cost and lengths,
    # or every AUTH for this account would fail without a word.
    if not is_password_hash(text):
        raise _Refused(
            "a $scrypt$ hash whose cost, salt or key length `mailpolicy hash-password` "
            "never makes; hash the password again"
        )
    return text


_CLEAR_PASSWORD: Final = (
    "clear passwords are not allowed; store password_hash made by `mailpolicy hash-password`"
)


def _account_name(name: str) -> str:
    if not name or any(c.isspace() or ord(c) < 32 for c in name):
        raise _Refused("an account name must be non-empty, without blanks or control characters")
    return name


# ---------------------------------------------------------------------------
# Rules that tie keys together


def _present(data: Mapping[object, object], key: str) -> bool:
    return key in data


def _check_credentials(
    walk: _Walk, path: str, data: Mapping[object, object], _: dict[str, Any]
) -> None:
    # A user name without a password (or the reverse) cannot log in.
    if _present(data, "username") and not _present(data, "password_env"):
        walk.refuse(_join(path, "password_env"), "required with username")
    if _present(data, "password_env") and not _present(data, "username"):
        walk.refuse(_join(path, "username"), "required with password_env")


def _check_delivery(
    walk: _Walk, path: str, data: Mapping[object, object], values: dict[str, Any]
) -> None:
    if values.get("mode") == "relay" and not _present(data, "relay_host"):
        walk.refuse(_join(path, "relay_host"), 'required when mode is "relay"')


def _check_rule(
    walk: _Walk, path: str, data: Mapping[object, object], values: dict[str, Any]
) -> None:
    kind = values.get("list", "black")
    action = values.get("action")
    if kind == "white" and action in ("reject", "discard"):
        walk.refuse(
            _join(path, "action"), 'a white rule always allows; write "allow" or leave it out'
        )
    if kind == "black" and action == "allow":
        walk.refuse(_join(path, "action"), 'a black rule\'s action is "reject" or "discard"')
    criteria = ("client", "client_hostname", "helo", "sender", "recipient")
    if not any(data.get(c) for c in criteria):
        walk.refuse(path, f"a rule needs at least one non-empty criterion: {', '.join(criteria)}")


def _make_rule(values: dict[str, Any]) -> ListRule:
    if values.get("list") == "white":
        values.setdefault("action", "allow")
    return ListRule(**values)


def _check_server(
    walk: _Walk, path: str, data: Mapping[object, object], values: dict[str, Any]
) -> None:
    has_cert, has_key = _present(data, "tls_cert"), _present(data, "tls_key")
    if has_cert and not has_key:
        walk.refuse(_join(path, "tls_key"), "required with tls_cert")
    if has_key and not has_cert:
        walk.refuse(_join(path, "tls_cert"), "required with tls_key")
    for listener in ("submission", "smtps"):
        if values.get(listener) and not (has_cert and has_key):
            walk.refuse(_join(path, listener), "needs tls_cert and tls_key")


#: the longest ``text`` override: with the code, the enhanced code and
#: Postfix's ``<address>: Recipient address rejected:`` prefix, the reply
#: line stays within SMTP's 512 octets
_MAX_REPLY_TEXT: Final = 200
#: rows that only permit: nothing to reword
_PERMIT_ONLY: Final = frozenset(
    {"relay.trusted_networks", "general.smtp_auth.enabled", "rfc5321.postmaster"}
)


@attrs.frozen
class _Texts(_Node):
    """A table's ``text``: reply texts by the key of one of its checks."""

    table: str

    def keys(self) -> list[str]:
        from .policy import TABLE  # the rows say which checks a table has

        found = {
            row.key.rpartition(".")[2]
            for row in TABLE
            if row.key.rpartition(".")[0] == self.table and row.key not in _PERMIT_ONLY
        }
        return sorted(found)

    def __call__(self, walk: _Walk, path: str, value: object) -> tuple[tuple[str, str], ...]:
        data = _table_data(value)
        allowed = self.keys()
        out: list[tuple[str, str]] = []
        for key, text in data.items():
            sub = _join(path, str(key))
            if key not in allowed:
                walk.refuse(sub, f"not a check of [{self.table}]; one of: {', '.join(allowed)}")
                continue
            if not isinstance(text, str) or not text.strip():
                walk.refuse(sub, f"expected a reply text, got {_describe(text)}")
                continue
            if not text.isascii() or not text.isprintable():
                walk.refuse(sub, "a reply text is printable ASCII on one line")
                continue
            if len(text) > _MAX_REPLY_TEXT:
                walk.refuse(sub, f"at most {_MAX_REPLY_TEXT} characters (SMTP's line limit)")
                continue
            out.append((str(key), text.strip()))
        return tuple(out)

    def write(self, value: Any) -> dict[str, str]:
        return dict(value)


@attrs.frozen
class _Accounts(_Node):
    """``[accounts.NAME]``: tables named after their account, read by ``table``
    (an account less its name)."""

    table: _Table

    def __call__(self, walk: _Walk, path: str, value: object) -> tuple[Account, ...]:
        accounts: list[Account] = []
        for name, table in _table_data(value).items():
            if not isinstance(name, str):
                walk.refuse(path, f"key {name!r} is not a string")
                continue
            sub = _join(path, name)
            try:
                _account_name(name)
            except _Refused as e:
                walk.refuse(sub, e.reason)
            try:
                fields = walk.read(self.table, sub, table)
            except _Reported:
                continue
            accounts.append(Account(name=name, **fields))
        return tuple(accounts)

    def write(self, value: Any) -> dict[str, Any]:
        return {account.name: self.table.write(account) for account in value}


# ---------------------------------------------------------------------------
# The schema: one table per settings class. Reading and writing the file,
# and the list of its keys (setting_keys), all come from these tables.

_TYPE_READERS: Final[Mapping[object, _Node]] = {
    bool: _scalar(_bool),
    int: _int(0),
    float: _number(0),
}

_NETWORK: Final = _scalar(_network, str)

_SMTP_AUTH: Final = _table(
    SmtpAuthSettings,
    {"local_networks": _list(_NETWORK), "text": _Texts("general.smtp_auth")},
)

_GENERAL: Final = _table(
    GeneralSettings,
    {
        "hostname": _scalar(_fqdn),
        "banner": _scalar(_text_line),
        "local_domains": _list(_scalar(_domain)),
        # Postfix's hopcount_limit has a minimum of 1: 0 would refuse everything.
        "max_hops": _int(1),
        "external_postmasters": _list(_scalar(_address)),
        "smtp_auth": _SMTP_AUTH,
        "text": _Texts("general"),
    },
    # The default hostname is the reader's (see settings_from_mapping):
    # written down, the settings read back the same anywhere.
    always=["hostname"],
)

_SECURITY_LEVEL: Final = _choice(*typing.get_args(Security))

_RELAY_HOST: Final = _table(
    RelayHost,
    {
        "host": _scalar(_host),
        "port": _int(1, 65535),
        "security": _SECURITY_LEVEL,
        "username": _scalar(_word),
        "password_env": _scalar(_env_name),
    },
    check=_check_credentials,
)

_EXCEPTION: Final = _table(
    DeliveryException,
    {
        "name": _scalar(_word),
        "match": _choice("recipient", "sender"),
        "targets": _list(_scalar(_target), nonempty=True),
    },
    inline={"relay_host": _RELAY_HOST},
)

_DELIVERY: Final = _table(
    DeliverySettings,
    {
        "mode": _choice("direct", "relay"),
        "relay_host": _RELAY_HOST,
        "exceptions": _list(_EXCEPTION, unique="name"),
        "maildir": _scalar(_word),
        "mx_security": _SECURITY_LEVEL,
        "mx_port": _int(1, 65535),
        "tls_ca_file": _scalar(_word),
        "connect_timeout_seconds": _number(0, above=True),
        "reply_timeout_seconds": _number(0, above=True),
        "attempt_timeout_seconds": _number(0, above=True),
        "our_addresses": _list(_scalar(_ip_address, str)),
    },
    check=_check_delivery,
)

_RELAY: Final = _table(
    RelaySettings,
    {
        "trusted_networks": _list(_NETWORK),
        "inbound_domains": _list(_scalar(_domain)),
        "text": _Texts("relay"),
    },
)

_LIST_RULE: Final = _table(
    ListRule,
    {
        "name": _scalar(_word),
        "list": _choice("black", "white"),
        "action": _choice("reject", "discard", "allow"),
        "text": _scalar(_text_line),
        # (what these readers return is already as ListRule's converters
        # would make it: a compact Networks, Normalized strings)
        "client": _Values(_network_entry, Networks.from_entries, str),
        "client_hostname": _Values(_list_domain, Normalized),
        "helo": _Values(_list_domain, Normalized),
        "sender": _Values(_list_address(_list_value(null_sender=True).convert), Normalized),
        "recipient": _Values(_list_address(_list_value(null_sender=False).convert), Normalized),
    },
    check=_check_rule,
    make=_make_rule,
)

_SECURITY: Final = _table(
    SecuritySettings,
    {
        "lists": _list(_LIST_RULE, unique="name"),
        "sender_policy": _table(SenderPolicy, {"text": _Texts("security.sender_policy")}),
        "connection_policy": _table(
            ConnectionPolicy,
            {"rate_window_seconds": _int(1), "text": _Texts("security.connection_policy")},
        ),
        "advanced": _table(
            AdvancedSettings,
            {"dnsbl": _list(_scalar(_dnsbl, str)), "text": _Texts("security.advanced")},
        ),
    },
)

_REPLIES: Final = _table(Replies, {f.name: _int(400, 599) for f in attrs.fields(Replies)})

_LISTENER: Final = _scalar(_listener, _unlistener)

_SERVER: Final = _table(
    ServerSettings,
    {
        "smtp": _LISTENER,
        "submission": _LISTENER,
        "smtps": _LISTENER,
        "tls_cert": _scalar(_word),
        "tls_key": _scalar(_word),
        "proxy_networks": _list(_NETWORK),
    },
    check=_check_server,
)

_DNS: Final = _table(
    DnsSettings,
    {
        "nameservers": _list(_scalar(_nameserver)),
        "timeout_seconds": _number(0, above=True),
    },
)

_ACCOUNT: Final = _table(
    Account,
    {"password_hash": _scalar(_password_hash), "addresses": _list(_scalar(_owned_address))},
    omit=["name"],
    refused={"password": _CLEAR_PASSWORD},
    make=dict,
)

_SETTINGS: Final = _table(
    Settings,
    {
        "general": _GENERAL,
        "delivery": _DELIVERY,
        "relay": _RELAY,
        "security": _SECURITY,
        "replies": _REPLIES,
        "server": _SERVER,
        "dns": _DNS,
        "accounts": _Accounts(_ACCOUNT),
    },
    # general.hostname is always written, so [general] is too
    always=["general"],
)


def _read_settings(walk: _Walk, path: str, value: object) -> Settings:
    if not isinstance(value, Mapping):
        raise _Refused(f"a policy is a table of settings, got {_describe(value)}")
    settings: Settings = _SETTINGS(walk, path, value)
    return settings
