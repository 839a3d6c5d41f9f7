"""Replaying cases under chosen policies: one case for a test, a corpus under two.

* :func:`replay_case` plays one case (a :class:`~.replay.Case`, a path or a
  mapping) under its own policy or another one and returns :class:`Replies`,
  a list of :class:`~.replay.ReplayReply` with questions a test asks
  (``replies.refused_by("security.lists.spammers")``). The pytest fixture
  ``mailpolicy_replay`` (:mod:`mailpolicy.pytest_plugin`) wraps it.
* :func:`diff_cases` replays every case under an old and a new policy and
  yields the replies that differ (:class:`Change`), aligned command by
  command, so that a reply that disappears (a message no longer sent because
  its recipient is now refused) shows as such rather than shifting every
  later pair. ``mailpolicy diff`` prints them.

What counts as a change: the code, the enhanced code, the text (queue ids
masked, they differ on every run) or the deciding rule.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..config import load_settings
from ..policy import Policy, compile_policy
from ..settings import Settings
from .replay import Case, CaseError, ReplayReply, build_policy, cases_from_mapping, load_case
from .replay import run_case as _run_case

__all__ = [
    "CaseResult",
    "Change",
    "PolicyLike",
    "Replies",
    "diff_cases",
    "diff_replies",
    "replay_case",
    "replay_case_async",
]

#: a policy for :func:`replay_case`: a TOML path, settings, or a compiled policy
PolicyLike = str | os.PathLike[str] | Settings | Policy

_QUEUE_ID = re.compile(r"queued as [0-9A-Za-z]+")


class Replies(list[ReplayReply]):
    """The replies of one replayed session, in order, with questions tests ask."""

    def refused_by(self, rule: str) -> bool:
        """Some reply refused (4xx or 5xx) and ``rule`` decided it.

        ``rule`` is the settings key (``"security.lists.spammers"``,
        ``"relay.reject_unauth_destination"``).
        """
        return any(r.rule == rule and r.code is not None and r.code >= 400 for r in self)

    def decided_by(self, rule: str) -> bool:
        """Some reply, refusal or acceptance (a white list, a discard), was ``rule``'s."""
        return any(r.rule == rule for r in self)

    @property
    def refused(self) -> Replies:
        """The refusals (4xx and 5xx)."""
        return Replies(r for r in self if r.code is not None and r.code >= 400)

    @property
    def rules(self) -> list[str]:
        """The rules that decided a reply, in order, each once."""
        return list(dict.fromkeys(r.rule for r in self if r.rule is not None))

    @property
    def codes(self) -> list[int | None]:
        return [r.code for r in self]

    def to(self, command: str) -> ReplayReply:
        """The first reply to a command starting with ``command`` (case-insensitive),
        e.g. ``replies.to("RCPT TO:<bob@example.com>")`` or ``replies.to("DATA")``."""
        for r in self:
            if r.cmd.upper().startswith(command.upper()):
                return r
        raise KeyError(f"no reply to {command!r}; commands: {[r.cmd for r in self]}")

    def __str__(self) -> str:
        """Every reply, one per line: command, reply, deciding rule."""
        return "\n".join(
            f"{r.cmd} -> {r.code} {r.enhanced + ' ' if r.enhanced else ''}"
            + r.text.replace("\n", " / ")
            + (f"  [{r.rule}]" if r.rule else "")
            + "".join(f"  (observed: {o})" for o in r.observed)
            for r in self
        )

    def __repr__(self) -> str:
        # Short, because pytest shows it (cut at 240 characters) when an
        # assertion about the replies fails: the refusals and their rules.
        refusals = "; ".join(
            f"{r.cmd} -> {r.code} {r.enhanced or ''} [{r.rule or 'no rule'}]".replace("  ", " ")
            for r in self.refused
        )
        return f"<Replies: {len(self)} replies, refused: {refusals or 'none'}>"


def _case_of(case: Case | str | os.PathLike[str] | Mapping[str, Any], variant: str | None) -> Case:
    if isinstance(case, Case):
        return case
    if isinstance(case, Mapping):
        cases = cases_from_mapping(dict(case), "<case>", str(case.get("name", "case")))
    else:
        cases = load_case(case)
    if variant is None:
        if len(cases) > 1:
            names = ", ".join(c.name for c in cases)
            raise CaseError(cases[0].source, f"has variants; pass variant= one of: {names}")
        return cases[0]
    for c in cases:
        if c.name == variant or c.name.endswith(f"[{variant}]"):
            return c
    raise CaseError(cases[0].source, f"no variant {variant!r}")


def _policy_for(case: Case, policy: PolicyLike | None) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if policy is None:
        return build_policy(case)
    settings = policy if isinstance(policy, Settings) else load_settings(policy)
    return build_policy(case, settings)


async def replay_case_async(
    case: Case | str | os.PathLike[str] | Mapping[str, Any],
    policy: PolicyLike | None = None,
    *,
    variant: str | None = None,
) -> Replies:
    """:func:`replay_case` inside a running event loop."""
    c = _case_of(case, variant)
    return Replies(await _run_case(c, policy=_policy_for(c, policy)))


def replay_case(
    case: Case | str | os.PathLike[str] | Mapping[str, Any],
    policy: PolicyLike | None = None,
    *,
    variant: str | None = None,
) -> Replies:
    """Replay one case through the real SMTP server code, offline; every reply.

    ``case`` is a case file (docs/replay-format.md), its parsed mapping, or a
    :class:`~.replay.Case`. ``policy`` is ``None`` (the case's own
    ``policy``), a TOML policy file, :class:`~mailpolicy.settings.Settings`,
    or a compiled :class:`~mailpolicy.policy.Policy`; the case's ``accounts``
    are added to a file or settings (not to a compiled policy). A case with
    ``variants`` needs ``variant=`` naming one.

    Raises :class:`~.replay.CaseError` for a case that cannot be read and
    :class:`~mailpolicy.config.PolicyError` for a policy that cannot. For use
    from synchronous code (a test); inside an event loop use
    :func:`replay_case_async`.
    """
    return asyncio.run(replay_case_async(case, policy, variant=variant))


# ---------------------------------------------------------------------------
# Diffing two policies


def _same(a: ReplayReply, b: ReplayReply) -> bool:
    return (
        a.code == b.code
        and a.enhanced == b.enhanced
        and a.rule == b.rule
        and a.observed == b.observed
        and _QUEUE_ID.sub("queued as ID", a.text) == _QUEUE_ID.sub("queued as ID", b.text)
    )


def _command(r: ReplayReply) -> str:
    # "<message 126 bytes>" is the same message whatever its size under each policy
    return "<message>" if r.cmd.startswith("<message ") else r.cmd


@attrs.frozen
class Change:
    """One reply that differs: ``before`` or ``after`` is ``None`` when the
    command was not sent (or got no reply) under that policy."""

    case: str
    index: int
    cmd: str
    before: ReplayReply | None
    after: ReplayReply | None

    @property
    def rules(self) -> list[str]:
        """The rules involved, before then after, each once."""
        found = [r.rule for r in (self.before, self.after) if r is not None and r.rule]
        for r in (self.before, self.after):
            if r is not None:
                found.extend(o.partition(":")[0] for o in r.observed)
        return list(dict.fromkeys(found))

    def to_json(self) -> dict[str, Any]:
        def side(r: ReplayReply | None) -> dict[str, Any] | None:
            if r is None:
                return None
            out = r.to_json()
            del out["cmd"]
            return out

        return {
            "case": self.case,
            "index": self.index,
            "cmd": self.cmd,
            "before": side(self.before),
            "after": side(self.after),
            "rules": self.rules,
        }


def diff_replies(
    name: str, before: Sequence[ReplayReply], after: Sequence[ReplayReply]
) -> list[Change]:
    """The replies that differ between two replays of one session, aligned
    on the commands sent (so a command sent under one policy only is a
    :class:`Change` with one side ``None``)."""
    changes: list[Change] = []
    matcher = difflib.SequenceMatcher(
        None, [_command(r) for r in before], [_command(r) for r in after], autojunk=False
    )
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for k in range(i2 - i1):
                if not _same(before[i1 + k], after[j1 + k]):
                    old = before[i1 + k]
                    changes.append(Change(name, i1 + k, old.cmd, old, after[j1 + k]))
            continue
        olds, news = list(before[i1:i2]), list(after[j1:j2])
        for k in range(max(len(olds), len(news))):
            b = olds[k] if k < len(olds) else None
            a = news[k] if k < len(news) else None
            cmd = b.cmd if b is not None else a.cmd if a is not None else "?"
            changes.append(Change(name, i1 + k if b is not None else j1 + k, cmd, b, a))
    return changes


@attrs.frozen
class CaseResult:
    """The outcome for one case: its changes, or the error that stopped it."""

    case: str
    changes: tuple[Change, ...] = ()
    error: str | None = None


class _Policies:
    """Compiled policies for one side, shared by the cases without accounts
    (compiling big lists once, not once per case)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shared = compile_policy(settings)

    def for_case(self, case: Case) -> Policy:
        if case.data.get("accounts"):
            return build_policy(case, self.settings)
        return self.shared


#: seconds one replay may take: a case written for another policy can leave
#: the server waiting (DATA pipelined and accepted, then "QUIT" read as text)
DEFAULT_TIMEOUT = 10.0


async def _replay(case: Case, policy: Policy, timeout: float) -> list[ReplayReply] | None:
    """The replies, or None when the session stalls (replay reports a server
    that waits for input the case does not send as a ``<timeout>`` row)."""
    try:
        replies = await asyncio.wait_for(_run_case(case, policy=policy), timeout)
    except TimeoutError:
        return None
    return None if any(r.cmd == "<timeout>" for r in replies) else replies


async def diff_cases(
    old: Settings,
    new: Settings,
    cases: Iterable[Case],
    *,
    on_case: Callable[[CaseResult], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[CaseResult]:
    """Replay every case under ``old`` and ``new``; yield each case's result.

    ``on_case`` (optional) is called with each result as well, e.g. to
    advance a progress bar. A replay that takes longer than ``timeout``
    seconds (the session stalls: the server waits for input the case does
    not send under that policy) makes the case's result an error.
    """
    olds, news = _Policies(old), _Policies(new)
    for case in cases:
        try:
            before = await _replay(case, olds.for_case(case), timeout)
            after = await _replay(case, news.for_case(case), timeout)
            if before is None or after is None:
                sides = " and ".join(
                    side for side, r in (("old", before), ("new", after)) if r is None
                )
                result = CaseResult(
                    case.name,
                    error=f"{case.source}: the session stalls under the {sides} "
                    f"polic{'ies' if ' and ' in sides else 'y'} (the server waits for input "
                    "the case does not send)",
                )
            else:
                result = CaseResult(case.name, tuple(diff_replies(case.name, before, after)))
        except CaseError as e:
            result = CaseResult(case.name, error=str(e))
        if on_case is not None:
            on_case(result)
        yield result


def case_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The case files under ``paths`` (files, or directories of ``*.json``)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        out.extend(sorted(path.glob("*.json")) if path.is_dir() else [path])
    return out
