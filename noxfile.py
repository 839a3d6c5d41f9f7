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


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation testing of the pure core on a random sample (docs/testing.md).

    Not part of CI: a few minutes on two CPUs. Arguments go to
    tools/mutation.py: ``nox -s mutation -- --sample 50 --only rules/lists``.
    """
    session.install("-e", ".[test]", "mutmut==3.8.1")
    session.run("python", "tools/mutation.py", *session.posargs)
