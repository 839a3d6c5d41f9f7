"""pytest plugin: replay captured sessions in your own test suite.

Installed with mailpolicy (the ``pytest11`` entry point ``mailpolicy``), it
gives every test the ``mailpolicy_replay`` fixture::

    def test_spam_still_refused(mailpolicy_replay):
        replies = mailpolicy_replay("captures/spam.json", policy="policy.toml")
        assert replies.refused_by("security.lists.spammers")

``mailpolicy_replay(case, policy=None, *, variant=None)`` replays ``case``
(a replay case file, docs/replay-format.md, or its mapping) through the real SMTP server code,
offline, under ``policy`` (a TOML file, ``Settings`` or a compiled
``Policy``; ``None``: the case's own) and returns
:class:`~mailpolicy.adapters.diff.Replies`. A relative path is looked up
beside the test file first, then from pytest's root directory, then from the
current directory. See docs/replay.md.

Nothing is imported from mailpolicy until the fixture is used, so the
plugin costs nothing to test suites that do not use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .adapters.diff import PolicyLike, Replies

__all__ = ["mailpolicy_replay"]


def _resolve(request: pytest.FixtureRequest, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (request.path.parent, request.config.rootpath, Path.cwd()):
        if (base / p).exists():
            return base / p
    return request.path.parent / p  # not found: the error names the likeliest place


@pytest.fixture
def mailpolicy_replay(
    request: pytest.FixtureRequest,
) -> Callable[..., Replies]:
    """Replay a case and return its replies (see the module doc)."""

    def replay(
        case: str | os.PathLike[str] | Mapping[str, Any],
        policy: PolicyLike | None = None,
        *,
        variant: str | None = None,
    ) -> Replies:
        from .adapters.diff import replay_case

        if isinstance(case, str | os.PathLike):
            case = _resolve(request, case)
        if isinstance(policy, str | os.PathLike):
            policy = _resolve(request, policy)
        return replay_case(case, policy, variant=variant)

    return replay
