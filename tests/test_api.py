"""The public API: one short list, documented, and the core free of adapters."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import mailpolicy

CORE = ["model", "settings", "policy", "evaluate", "rules", "addresses", "lookup", "routing"]
SRC = Path(mailpolicy.__file__).parent


def test_evaluate_is_the_function_even_after_importing_the_module() -> None:
    importlib.import_module("mailpolicy.evaluate")
    assert callable(mailpolicy.evaluate)
    assert inspect.isfunction(mailpolicy.evaluate)


def test_every_public_name_exists_and_is_documented() -> None:
    for name in mailpolicy.__all__:
        obj = getattr(mailpolicy, name)
        assert inspect.getdoc(obj), f"mailpolicy.{name} has no docstring"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.add(base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_core_imports_no_adapter_and_does_no_io() -> None:
    forbidden_modules = {
        "socket",
        "asyncio",
        "dns",
        "aiosmtpd",
        "aiosmtplib",
        "redis",
        "time",
        "os",
        "sqlite3",
        "tomllib",
        "subprocess",
        "mailpolicy.adapters",
        "mailpolicy.config",
        "mailpolicy.cli",
    }
    files: list[Path] = []
    for name in CORE:
        p = SRC / name
        files += sorted(p.glob("*.py")) if p.is_dir() else [SRC / f"{name}.py"]
    for f in files:
        for imp in _imports(f):
            top = imp.lstrip(".")
            assert "adapters" not in top.split("."), f"{f.name} imports {imp}"
            assert not top.startswith(("config", "cli")) or imp.startswith("mailpolicy."), imp
            assert top.split(".")[0] not in forbidden_modules or imp.startswith("."), (
                f"{f.relative_to(SRC)} imports {imp}"
            )


def test_envelopes_that_lack_what_their_stage_is_about_are_refused() -> None:
    import pytest

    from mailpolicy import Envelope, Stage

    with pytest.raises(ValueError, match="stage 'rcpt' needs 'recipient'"):
        Envelope(Stage.RCPT, sender="a@example.org")
    with pytest.raises(ValueError, match="stage 'mail' needs 'sender'"):
        Envelope(Stage.MAIL)
    with pytest.raises(ValueError, match="stage 'end_of_data' needs 'message'"):
        Envelope(Stage.END_OF_DATA, sender="a@example.org")
    with pytest.raises(TypeError, match="not one string"):
        Envelope(Stage.RCPT, sender="", recipient="b@example.com", recipients="abcdef")
    # a stage may be named by its value, as in JSON
    assert Envelope("rcpt", sender="", recipient="b@example.com").stage is Stage.RCPT
    assert Envelope("RCPT", sender="", recipient="b@example.com").stage is Stage.RCPT
    with pytest.raises(ValueError, match="unknown stage 'rcpt_to'; one of: connect"):
        Envelope("rcpt_to", recipient="b@example.com")


def test_evaluate_wants_a_compiled_policy() -> None:
    import pytest

    import mailpolicy
    from mailpolicy import Envelope, Session, Stage

    settings = mailpolicy.settings_from_mapping({})
    env = Envelope(Stage.RCPT, sender="a@example.org", recipient="b@example.com")
    with pytest.raises(TypeError, match=r"got Settings \(compile it: mailpolicy.compile_policy"):
        mailpolicy.evaluate(settings, Session("192.0.2.1"), env)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a compiled Policy"):
        mailpolicy.decide(settings, Session("192.0.2.1"), env)  # type: ignore[arg-type]
