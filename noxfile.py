"""Developer sessions: ``nox -s tests``, ``nox -s typecheck``, ``nox -s lint``."""

import nox

nox.options.sessions = ["tests", "typecheck", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def conformance(session: nox.Session) -> None:
    """Replay the Postfix-recorded corpus and print PASS/FAIL per case."""
    session.install("-e", ".")
    session.run("mailpolicy", "replay", "--check", "tests/conformance")
