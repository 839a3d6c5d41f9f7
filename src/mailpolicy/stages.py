"""The stages of a :class:`~mailpolicy.policy.Policy`, compiled for the walk.

:mod:`mailpolicy.policy` builds, from :data:`~mailpolicy.policy.TABLE`, the
chains of the rules that are on (a row whose setting is off builds no rule).
This module turns each stage's chains into the shortest form the engine can
walk: one tuple per chain, one tuple per rule holding what the walk reads
(the rule, how its decision is memoised, its memo slot,
whether it is the white list, whether it may be observed). The walk then
does no attribute lookups, no enum comparisons per rule per decision: a
rule that is on costs one tuple unpacking and a call;
a rule that is off is not there at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeAlias

from .model import Stage
from .rules import Chain, Rule, Scope, Step

__all__ = ["ENVELOPE", "SENDER", "SESSION", "CompiledChain", "CompiledStep", "compile_stages"]

#: how a step's decision is kept (ints: compared with ``is`` and cheap to
#: unpack): made anew each time, kept per session, kept per sender
ENVELOPE, SESSION, SENDER = 0, 1, 2

_MEMO = {Scope.ENVELOPE: ENVELOPE, Scope.SESSION: SESSION, Scope.SENDER: SENDER}

#: ``(rule, memo, slot, white, observe)``: a rule as the walk reads it
CompiledStep: TypeAlias = tuple[Rule, int, int, bool, bool]
#: ``(restriction, steps)``: a chain as the walk reads it
CompiledChain: TypeAlias = tuple[bool, tuple[CompiledStep, ...]]


def _step(step: Step) -> CompiledStep:
    return (step.rule, _MEMO[step.scope], step.slot, step.white, step.observe)


def _chain(chain: Chain) -> CompiledChain:
    return (chain.restriction, tuple(_step(s) for s in chain.steps))


def compile_stages(
    chains: Mapping[Stage, Iterable[Chain]],
) -> dict[Stage, tuple[CompiledChain, ...]]:
    """Each stage's chains in the engine's form, in order."""
    return {stage: tuple(_chain(c) for c in chains.get(stage, ())) for stage in Stage}
