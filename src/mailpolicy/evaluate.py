"""The engine: walk a stage's chains and turn the rules' opinions into a verdict.

Semantics (Postfix's restriction lists with ``smtpd_delay_reject = yes``):

* a rule that returns ``None`` has no opinion: the next rule runs;
* ``PERMIT`` ends its chain; the next chain runs;
* ``ACCEPT`` ends every chain: the request is accepted;
* ``REJECT`` ends every chain with the rule's reply;
* ``DISCARD`` ends every chain: accepted, and the message will be dropped;
* ``DEFER_IF_PERMIT`` is remembered (the first one wins) and evaluation
  goes on; a later refusal wins over it, and if the request would be
  accepted it is deferred instead;
* a transaction already marked for discarding (``Envelope.discard``) skips
  every restriction chain, as Postfix does.

:func:`lookups` runs the same walk but collects the DNS questions that rules
could not answer, going on past them so that independent questions are asked
together, in one round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import ACCEPT, Action, DnsQuery, Envelope, Evidence, Reply, Session, Verdict
from .rules import SESSION, Decision, NeedDns, Outcome, Rule
from .rules.context import Context

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["evaluate", "lookups"]

_FINAL = {Outcome.REJECT: Action.REJECT, Outcome.DISCARD: Action.DISCARD}


_UNSEEN = object()
#: entries a session's memo may hold (rules x distinct senders in a session)
_MEMO_LIMIT = 1024


def _check(rule: Rule, ctx: Context) -> Decision | None:
    """``rule.check(ctx)``, reusing a session- or sender-scoped decision made
    earlier in this session (the facts it read are the same: the session's
    memo is dropped whenever they change). A rule still waiting for DNS
    raises NeedDns and nothing is remembered."""
    scope = getattr(rule, "scope", None)
    if scope is None:
        return rule.check(ctx)
    env = ctx.envelope
    key: tuple[object, ...] = (
        (id(rule),) if scope == SESSION else (id(rule), env.sender, env.smtputf8)
    )
    memo = ctx.session.memo
    seen = memo.get(key, _UNSEEN)
    # the rule object rides along: an id is only unique while its object lives
    if isinstance(seen, tuple) and seen[0] is rule:
        decision: Decision | None = seen[1]
        return decision
    decision = rule.check(ctx)
    if len(memo) >= _MEMO_LIMIT:
        # a session with thousands of transactions: start over, stay bounded
        memo.clear()
    memo[key] = (rule, decision)
    return decision


def _verdict(action: Action, d: Decision) -> Verdict:
    if action is Action.REJECT and d.reply is not None and d.reply.temporary:
        action = Action.DEFER
    return Verdict(action, d.reply, d.rule, d.evidence)


def evaluate(policy: Policy, session: Session, envelope: Envelope) -> Verdict:
    """Judge ``envelope`` at its stage for ``session`` under ``policy``.

    Pure and deterministic: no I/O, no clock; the same facts always give the
    same verdict. The DNS answers the enabled rules need must already be in
    ``session.dns`` (ask :meth:`Policy.lookups` first); a missing one gives a
    temporary failure (``451 4.3.0``) naming the rule and the question, never
    an acceptance. The :class:`~mailpolicy.model.Verdict` carries the action,
    the reply for the client, the deciding rule (its settings key) and the
    evidence (matched list entry, DNS answers, counters).
    """
    ctx = Context(policy.shared, session, envelope)
    pending: Decision | None = None
    white: Decision | None = None
    for chain in policy.chains[envelope.stage]:
        if envelope.discard is not None and chain.restriction:
            # Postfix: once a transaction is marked for discarding, every
            # restriction is skipped for the rest of it.
            return Verdict(
                Action.DISCARD,
                None,
                envelope.discard,
                (Evidence("transaction", "discarding", matched=envelope.discard),),
            )
        for rule in chain.rules:
            try:
                d = _check(rule, ctx)
            except NeedDns as need:
                return Verdict(
                    Action.DEFER,
                    Reply(451, "4.3.0", "Temporary lookup failure"),
                    need.rule or rule.name,
                    tuple(Evidence("dns", str(q), matched="not supplied") for q in need.queries),
                )
            if d is None:
                continue
            outcome = d.outcome
            if outcome is Outcome.DEFER_IF_PERMIT:
                pending = pending or d
                continue
            if outcome is Outcome.PERMIT:
                if d.rule.startswith("security.lists."):
                    white = d
                break
            if outcome is Outcome.ACCEPT:
                return _accept(pending, None)
            return _verdict(_FINAL[outcome], d)
    return _accept(pending, white)


def _accept(pending: Decision | None, white: Decision | None) -> Verdict:
    if pending is not None:
        return Verdict(Action.DEFER_IF_PERMIT, pending.reply, pending.rule, pending.evidence)
    if white is not None:
        return Verdict(Action.ACCEPT, None, white.rule, white.evidence)
    return ACCEPT


def lookups(policy: Policy, session: Session, envelope: Envelope) -> frozenset[DnsQuery]:
    """The DNS questions the walk for this stage still needs answered."""
    ctx = Context(policy.shared, session, envelope)
    needed: set[DnsQuery] = set()
    for chain in policy.chains[envelope.stage]:
        if envelope.discard is not None and chain.restriction:
            break
        for rule in chain.rules:
            try:
                d = _check(rule, ctx)
            except NeedDns as need:
                # Go on: later rules' questions are asked in the same round.
                needed.update(need.queries)
                continue
            if d is None or d.outcome is Outcome.DEFER_IF_PERMIT:
                continue
            if d.outcome is Outcome.PERMIT:
                break
            # A final decision: nothing after it is needed, unless an earlier
            # rule, still waiting for DNS, might have decided differently.
            return frozenset(needed)
    return frozenset(needed)
