"""docs/settings.md against the code, so the reference cannot drift.

The doc names tables in headings (`[general.smtp_auth]`, `[[security.lists]]`,
`[accounts.NAME]`) and keys in the first column of tables whose header starts
with "key". The code's keys come from walking the attrs classes down from
``Settings``, with the file's three departures from the classes: accounts are
tables named after the account, a delivery exception holds its relay host's
keys inline, and DNSBL zones are written as strings.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailpolicy.settings import Account, DeliveryException, DnsblZone, Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"

#: Written as a string in the file, not as a table.
LEAVES: frozenset[type] = frozenset({DnsblZone})
#: (class, field) whose class's fields sit directly in the enclosing table.
INLINE: frozenset[tuple[type, str]] = frozenset({(DeliveryException, "relay_host")})
#: Classes whose ``name`` field is the table's name, not a key.
NAMED: frozenset[type] = frozenset({Account})


def _attrs_class(tp: Any) -> type | None:
    """The attrs class a field holds (directly, in ``X | None`` or ``tuple[X, ...]``)."""
    candidates = [tp, *typing.get_args(tp)]
    for c in candidates:
        if isinstance(c, type) and attrs.has(c) and c not in LEAVES:
            return c
    return None


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def code_keys() -> dict[str, Any]:
    """Every key path of the file, mapped to its attrs field."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            if cls in NAMED and field.name == "name":
                continue
            tp = hints[field.name]
            inner = _attrs_class(tp)
            if (cls, field.name) in INLINE and inner is not None:
                walk(inner, prefix)
                continue
            key = f"{prefix}.{field.name}" if prefix else field.name
            out[key] = field
            if inner is None:
                continue
            if inner in NAMED:
                out[f"{key}.NAME"] = field
                walk(inner, f"{key}.NAME")
            elif _is_tuple(tp):
                walk(inner, f"{key}[]")
            else:
                walk(inner, key)

    walk(Settings, "")
    return out


_HEADING_TABLE = re.compile(r"`(\[\[?)([A-Za-z0-9_.]+)\]\]?`")
_ROW_KEY = re.compile(r"^\|\s*`([A-Za-z0-9_]+)`\s*\|")


def doc_rows() -> dict[str, list[str]]:
    """Every key the doc documents, mapped to its table row's cells."""
    rows: dict[str, list[str]] = {}
    table = ""
    in_key_table = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            m = _HEADING_TABLE.search(line)
            if m:
                parts = m.group(2).split(".")
                # A heading names its table and, implicitly, its parents.
                for i in range(1, len(parts) + 1):
                    rows.setdefault(".".join(parts[:i]), [])
                table = m.group(2) + ("[]" if m.group(1) == "[[" else "")
            in_key_table = False
            continue
        if line.startswith("| key |"):
            in_key_table = True
            continue
        if not line.startswith("|"):
            in_key_table = False
            continue
        m = _ROW_KEY.match(line)
        if in_key_table and m:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[f"{table}.{m.group(1)}"] = cells
    return rows


def test_every_setting_is_documented() -> None:
    missing = sorted(set(code_keys()) - set(doc_rows()))
    assert not missing, f"docs/settings.md does not document: {missing}"


def test_every_documented_key_exists() -> None:
    unknown = sorted(set(doc_rows()) - set(code_keys()))
    assert not unknown, f"docs/settings.md documents keys the code lacks: {unknown}"


def _plain(value: Any) -> Any:
    """A default as TOML would write it (networks and tuples as string lists)."""
    if isinstance(value, tuple):
        return [str(v) for v in value]
    return value


def documented_defaults() -> dict[str, str]:
    """Keys whose doc default is one TOML literal (not words), with it."""
    out: dict[str, str] = {}
    for key, cells in doc_rows().items():
        m = re.fullmatch(r"`([^`]*)`", cells[2]) if len(cells) > 2 else None
        if m:
            out[key] = m.group(1)
    return out


def test_most_defaults_are_checked() -> None:
    # Guards the next test against passing vacuously if the table layout changes.
    assert len(documented_defaults()) > 40


@pytest.mark.parametrize(("key", "literal"), sorted(documented_defaults().items()))
def test_documented_default_matches_code(key: str, literal: str) -> None:
    documented = tomllib.loads(f"v = {literal}")["v"]
    field = code_keys()[key]
    assert field.default is not attrs.NOTHING, f"{key} is required in the code"
    assert _plain(field.default) == documented


def test_the_walk_sees_the_file_shapes() -> None:
    keys = code_keys()
    assert "delivery.exceptions[].host" in keys
    assert "delivery.exceptions[].relay_host" not in keys
    assert "accounts.NAME.password_hash" in keys
    assert "accounts.NAME.name" not in keys
    assert "security.advanced.dnsbl" in keys
    assert "security.advanced.dnsbl[].zone" not in keys
    assert "general.smtp_auth.local_networks" in keys
