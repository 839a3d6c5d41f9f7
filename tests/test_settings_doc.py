"""docs/settings.md against the code, so the reference cannot drift.

The doc names tables in headings (`[general.smtp_auth]`, `[[security.lists]]`,
`[accounts.NAME]`) and keys in the first column of tables whose header starts
with "key". The code's keys are the loader's own schema
(:func:`mailpolicy.config.setting_keys`): the tables that read the file, with
its departures from the attrs classes (accounts named by their table, a
delivery exception's relay host keys inline, DNSBL zones as strings).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mailpolicy.config import SettingKey, setting_keys

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def code_keys() -> dict[str, SettingKey]:
    """Every key path of the file, mapped to what the schema knows of it."""
    return {key.path: key for key in setting_keys()}


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
    setting = code_keys()[key]
    assert not setting.required, f"{key} is required in the code"
    assert setting.default == documented


def test_the_walk_sees_the_file_shapes() -> None:
    keys = code_keys()
    assert "delivery.exceptions[].host" in keys
    assert "delivery.exceptions[].relay_host" not in keys
    assert "accounts.NAME.password_hash" in keys
    assert "accounts.NAME.name" not in keys
    assert "security.advanced.dnsbl" in keys
    assert "security.advanced.dnsbl[].zone" not in keys
    assert "general.smtp_auth.local_networks" in keys
    assert "accounts.NAME.password" not in keys  # known only to be refused
    assert keys["delivery.exceptions[].host"].required
    assert keys["general.smtp_auth.local_networks"].default == ["127.0.0.0/8", "::1/128"]
