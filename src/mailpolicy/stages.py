"""The stages of a :class:`~mailpolicy.policy.Policy`, compiled for the walk.

:mod:`mailpolicy.policy` builds, from :data:`~mailpolicy.policy.TABLE`, the
chains of the rules that are on (a row whose setting is off builds no rule).
This module turns each stage's chains into the shortest form the engine can
walk: per chain, runs of consecutive rules whose decisions are kept alike
(anew each time, per session, per sender: the rows' scopes), each rule a
tuple of what the walk reads (the rule, its memo slot, whether it is the
white list, whether it may be observed). The walk does no attribute lookup
or enum comparison per rule; a run of session or sender rules none of which
had anything to say is skipped by later decisions with one memo lookup; a
rule that is off is not there at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TypeAlias

from .model import Stage
from .rules import Chain, Rule, Scope

__all__ = [
    "ENVELOPE",
    "SENDER",
    "SESSION",
    "CompiledChain",
    "CompiledRun",
    "CompiledStep",
    "compile_stages",
    "compiled_rules",
]

#: how a run's decisions are kept: made anew each time, kept per session,
#: kept per sender (small ints, cheap to unpack and compare)
ENVELOPE, SESSION, SENDER = 0, 1, 2

_MEMO = {Scope.ENVELOPE: ENVELOPE, Scope.SESSION: SESSION, Scope.SENDER: SENDER}

#: ``(rule, slot, white, observe)``: a rule as the walk reads it
CompiledStep: TypeAlias = tuple[Rule, int, bool, bool]
#: ``(quiet, memo, steps)``: consecutive rules kept alike. ``quiet`` (for two
#: or more session or sender rules) is the memo key that says "none of these
#: had anything to say": later decisions skip them with one lookup
CompiledRun: TypeAlias = tuple[str | None, int, tuple[CompiledStep, ...]]
#: ``(restriction, runs)``: a chain as the walk reads it
CompiledChain: TypeAlias = tuple[bool, tuple[CompiledRun, ...]]


def _chain(chain: Chain) -> CompiledChain:
    runs: list[CompiledRun] = []
    for memo, group in itertools.groupby(chain.steps, key=lambda s: _MEMO[s.scope]):
        steps = tuple((s.rule, s.slot, s.white, s.observe) for s in group)
        quiet = f"quiet {steps[0][1]}" if memo != ENVELOPE and len(steps) > 1 else None
        runs.append((quiet, memo, steps))
    return (chain.restriction, tuple(runs))


def compile_stages(
    chains: Mapping[Stage, Iterable[Chain]],
) -> dict[Stage, tuple[CompiledChain, ...]]:
    """Each stage's chains in the engine's form, in order."""
    return {stage: tuple(_chain(c) for c in chains.get(stage, ())) for stage in Stage}


def compiled_rules(chains: Iterable[CompiledChain]) -> list[Rule]:
    """The rules of compiled chains, in the order the walk asks them."""
    return [step[0] for _, runs in chains for _, _, steps in runs for step in steps]
