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

One walk serves both questions an adapter has. :func:`decide` returns the
:class:`~mailpolicy.model.Verdict` when every rule it reached could decide,
or :class:`Lookups`: the DNS questions still needed. A rule waiting for DNS
does not stop the walk: the rules after it are tried too, so that independent
questions are asked together, in one round trip; but no later decision is
final while an earlier rule might still have decided differently.
:func:`evaluate` is the same walk where a missing answer is a temporary
failure; :func:`decide_with` is the loop that asks a resolver in between.

A :class:`Memo`, one per connection, keeps the decisions that depend on the
session only (or on the session and the sender) from one RCPT to the next.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .model import (
    ACCEPT,
    Action,
    DnsQuery,
    DnsResult,
    Envelope,
    Evidence,
    Reply,
    Session,
    Verdict,
)
from .policy import Policy
from .rules import Decision, NeedDns, Outcome
from .rules.context import Context
from .settings import reply_text
from .stages import SESSION

__all__ = ["Lookups", "Memo", "decide", "decide_with", "evaluate", "lookups"]

_FINAL = {Outcome.REJECT: Action.REJECT, Outcome.DISCARD: Action.DISCARD}


@attrs.frozen
class Lookups:
    """The decision needs these DNS answers first.

    Ask every question (they are independent of each other), add the
    answers with :meth:`Session.with_dns <mailpolicy.model.Session.with_dns>`
    and decide again: a later round can ask what an answer led to (the
    forward lookup of the client's PTR name). A value, never raised.
    """

    queries: frozenset[DnsQuery]


#: the Session fields a memoised decision may depend on: all but the
#: counters (no memoised rule reads them) and the DNS answers (compared apart)
_FACT_NAMES = tuple(f.name for f in attrs.fields(Session) if f.name not in ("counters", "dns"))
_facts: Callable[[Session], tuple[Any, ...]] = operator.attrgetter(*_FACT_NAMES)


def _extends(new: Mapping[DnsQuery, DnsResult], old: Mapping[DnsQuery, DnsResult]) -> bool:
    """Whether ``new`` holds every answer of ``old``, unchanged."""
    if new is old:
        return True
    if len(new) < len(old):
        return False
    get = new.get
    for query, result in old.items():
        found = get(query)
        if found is not result and found != result:
            return False
    return True


class Memo:
    """The engine's per-connection memo: create one per connection, pass it
    to every :func:`decide` / :func:`evaluate` of that connection.

    It keeps what depends on the session's facts only (the DNSBL verdict, the
    verified client name, the HELO checks, what the client and HELO hit in
    the lists) and on the session and the sender (the sender checks, the
    sender's list hits), so that the RCPTs of a transaction do not re-judge
    them. It survives the session being rebuilt (``attrs.evolve`` for new
    counters, HELO, AUTH, ``with_dns``) and stays correct: whenever a fact
    such decisions may read changes (client, HELO, ESMTP, TLS, AUTH,
    pipelining, the policy, or a DNS answer replaced by a different one) it
    starts afresh; new counters and added DNS answers keep it. It holds at
    most about :attr:`limit` entries. Not thread-safe: one per connection.

    Within one decision (the rounds of :func:`decide` for the same
    :class:`~mailpolicy.model.Envelope` object, each with more DNS answers)
    it also keeps what the rules judged anew for each envelope (the
    recipient's lists, relay control), so a round after the answers came
    runs only the rules that waited for them.
    """

    __slots__ = (
        "_counters",
        "_dns",
        "_envelope",
        "_facts",
        "_policy",
        "_round",
        "_session",
        "_store",
        "limit",
    )

    def __init__(self, limit: int = 1024) -> None:
        #: entries kept before starting over (a session with thousands of
        #: senders stays bounded)
        self.limit = limit
        self._policy: Policy | None = None
        self._session: Session | None = None
        self._facts: tuple[Any, ...] = ()
        self._dns: Mapping[DnsQuery, DnsResult] = {}
        self._store: dict[object, object] = {}
        #: the envelope (and counters) of the decision under way, and what
        #: its envelope-scoped rules decided
        self._envelope: Envelope | None = None
        self._counters: object = None
        self._round: dict[object, object] = {}

    def __len__(self) -> int:
        """Entries held."""
        return len(self._store)

    def clear(self) -> None:
        """Forget everything."""
        self._store.clear()
        self._policy = self._session = self._envelope = None

    def _for(self, policy: Policy, session: Session) -> dict[object, object]:
        """The entries valid for ``session`` under ``policy``."""
        store = self._store
        if session is not self._session or policy is not self._policy:
            facts = _facts(session)
            if (
                policy is not self._policy
                or facts != self._facts
                or not _extends(session.dns, self._dns)
            ):
                store.clear()
                self._envelope = None
                self._policy, self._facts = policy, facts
            self._session, self._dns = session, session.dns
        if len(store) >= self.limit:
            store.clear()
        return store

    def _this(self, envelope: Envelope, session: Session) -> dict[object, object]:
        """The envelope-scoped decisions of the decision under way (call
        after :meth:`_for`): kept while the same envelope is judged again
        with the same counters and more DNS answers."""
        if envelope is not self._envelope or session.counters is not self._counters:
            self._envelope, self._counters = envelope, session.counters
            self._round = {}
        return self._round


_UNSEEN: Any = object()
_PERMIT, _ACCEPT, _DEFER_IF_PERMIT = Outcome.PERMIT, Outcome.ACCEPT, Outcome.DEFER_IF_PERMIT


class _Need:
    """What a walk could not decide without: every question, and the first
    rule that waits (the one a temporary failure names)."""

    __slots__ = ("first", "queries", "rule")

    def __init__(self, rule: str, queries: tuple[DnsQuery, ...]) -> None:
        self.rule = rule
        self.first = queries
        self.queries = set(queries)

    def failure(self) -> Verdict:
        return Verdict(
            Action.DEFER,
            Reply(451, "4.3.0", "Temporary lookup failure"),
            self.rule,
            tuple(Evidence("dns", str(q), matched="not supplied") for q in self.first),
        )


def _not_a_policy(value: object) -> str:
    what = type(value).__name__
    hint = " (compile it: mailpolicy.compile_policy(settings))" if what == "Settings" else ""
    return f"expected a compiled Policy, got {what}{hint}"


def _walk(
    policy: Policy, session: Session, envelope: Envelope, memo: Memo | None
) -> Verdict | _Need:
    if type(policy) is not Policy:
        raise TypeError(_not_a_policy(policy))
    if memo is None:
        store: dict[object, object] = {}
        this: dict[object, object] = {}
    else:
        store = memo._for(policy, session)
        this = memo._this(envelope, session)
    ctx = Context(policy.shared, session, envelope, store)
    need: _Need | None = None
    pending: Decision | None = None
    white: Decision | None = None
    seen: list[Decision] | None = None
    #: the decisions kept for this sender (made on first use)
    senders: dict[object, object] | None = None
    d: Decision | None
    observed, texts = policy.observed, policy.texts
    discard = envelope.discard
    for restriction, runs in policy.compiled[envelope.stage]:
        if discard is not None and restriction:
            if need is not None:
                return need
            # Postfix: once a transaction is marked for discarding, every
            # restriction is skipped for the rest of it.
            return Verdict(
                Action.DISCARD,
                None,
                discard,
                (Evidence("transaction", "discarding", matched=discard),),
                _observed(seen),
            )
        for quiet, kept, steps in runs:
            kept_in: dict[object, object]
            if not kept:
                # ENVELOPE: decided anew for each envelope; kept only for the
                # next rounds of this decision
                kept_in = this
            else:
                # SESSION or SENDER: decisions made earlier for the same facts
                if kept == SESSION:
                    kept_in = store
                elif senders is None:
                    key = ("sender", envelope.sender, envelope.smtputf8)
                    found: Any = store.get(key)
                    if found is None:
                        found = store[key] = {}
                    kept_in = senders = found
                else:
                    kept_in = senders
                if quiet is not None and quiet in kept_in:
                    continue  # none of these rules had anything to say
            calm = quiet is not None
            for rule, slot, is_white, observe in steps:
                try:
                    # a rule waiting for DNS raises and nothing is kept
                    d = kept_in.get(slot, _UNSEEN)  # type: ignore[assignment]
                    if d is _UNSEEN:
                        d = kept_in[slot] = rule.check(ctx)
                except NeedDns as missing:
                    calm = False
                    # Go on: later rules' questions are asked in the same round.
                    if need is None:
                        need = _Need(missing.rule or rule.name, missing.queries)
                    else:
                        need.queries.update(missing.queries)
                    continue
                if d is None:
                    continue
                calm = False
                outcome = d.outcome
                if outcome is _PERMIT:
                    if is_white:
                        white = d
                    break  # ends the chain
                if observe and outcome is not _ACCEPT and d.rule in observed:
                    # observe mode: remembered, and the walk goes on as if it passed
                    if d.rule in texts:
                        d = _reworded(d, texts[d.rule])
                    if seen is None:
                        seen = [d]
                    else:
                        seen.append(d)
                    continue
                if outcome is _DEFER_IF_PERMIT:
                    if pending is None and d.rule in texts:
                        d = _reworded(d, texts[d.rule])
                    pending = pending or d
                    continue
                if need is not None:
                    # A final decision, but an earlier rule still waiting for
                    # DNS might have decided differently.
                    return need
                if outcome is _ACCEPT:
                    return _accept(pending, None, seen)
                if d.rule in texts:
                    d = _reworded(d, texts[d.rule])
                return _verdict(_FINAL[outcome], d, seen)
            else:
                if calm:
                    kept_in[quiet] = True
                continue
            break  # a PERMIT ended the chain
    if need is not None:
        return need
    return _accept(pending, white, seen)


def _reworded(d: Decision, text: str) -> Decision:
    """``d`` with its table's ``text`` override (codes unchanged)."""
    if d.reply is None:
        return d
    return attrs.evolve(d, reply=attrs.evolve(d.reply, text=reply_text(d.reply.text, text)))


def _observed(seen: list[Decision] | None) -> tuple[Verdict, ...]:
    """What the observed rules would have done, each as its own verdict."""
    if not seen:
        return ()
    return tuple(_verdict(_FINAL.get(d.outcome, Action.DEFER_IF_PERMIT), d, None) for d in seen)


def _verdict(action: Action, d: Decision, seen: list[Decision] | None) -> Verdict:
    if action is Action.REJECT and d.reply is not None and d.reply.temporary:
        action = Action.DEFER
    return Verdict(action, d.reply, d.rule, d.evidence, _observed(seen))


def _accept(
    pending: Decision | None, white: Decision | None, seen: list[Decision] | None
) -> Verdict:
    if pending is not None:
        return Verdict(
            Action.DEFER_IF_PERMIT, pending.reply, pending.rule, pending.evidence, _observed(seen)
        )
    if white is not None:
        return Verdict(Action.ACCEPT, None, white.rule, white.evidence, _observed(seen))
    if seen:
        return Verdict(Action.ACCEPT, observed=_observed(seen))
    return ACCEPT


def decide(
    policy: Policy, session: Session, envelope: Envelope, memo: Memo | None = None
) -> Verdict | Lookups:
    """Judge ``envelope`` at its stage for ``session``, or say which DNS
    answers that needs first. Pure: no I/O, no clock.

    One walk of the stage's chains: a :class:`~mailpolicy.model.Verdict`
    when every rule reached could decide with the answers in
    ``session.dns``, else :class:`Lookups` with every question the walk
    still needs (independent ones together). ``memo`` is the connection's
    :class:`Memo`.
    """
    found = _walk(policy, session, envelope, memo)
    if isinstance(found, _Need):
        return Lookups(frozenset(found.queries))
    return found


def evaluate(
    policy: Policy, session: Session, envelope: Envelope, memo: Memo | None = None
) -> Verdict:
    """Judge ``envelope`` at its stage for ``session`` under ``policy``.

    Pure and deterministic: no I/O, no clock; the same facts always give the
    same verdict. The DNS answers the enabled rules need must already be in
    ``session.dns`` (see :func:`decide` and :func:`decide_with`); a missing
    one gives a temporary failure (``451 4.3.0``) naming the rule and the
    question, never an acceptance. The :class:`~mailpolicy.model.Verdict`
    carries the action, the reply for the client, the deciding rule (its
    settings key) and the evidence (matched list entry, DNS answers,
    counters).
    """
    found = _walk(policy, session, envelope, memo)
    if isinstance(found, _Need):
        return found.failure()
    return found


def lookups(
    policy: Policy, session: Session, envelope: Envelope, memo: Memo | None = None
) -> frozenset[DnsQuery]:
    """The DNS questions :func:`decide` still needs (empty: it can decide)."""
    found = _walk(policy, session, envelope, memo)
    return frozenset(found.queries) if isinstance(found, _Need) else frozenset()


def decide_with(
    policy: Policy,
    session: Session,
    envelope: Envelope,
    answer: Callable[[frozenset[DnsQuery]], Mapping[DnsQuery, DnsResult]],
    memo: Memo | None = None,
    *,
    rounds: int = 4,
) -> tuple[Session, Verdict]:
    """:func:`decide`, asking ``answer`` for the missing DNS answers, up to
    ``rounds`` times; then :func:`evaluate` (a question still unanswered is
    a temporary failure). Returns the session with every answer gathered,
    and the verdict. ``answer`` is any synchronous resolver (a static zone,
    a dict lookup); see :func:`mailpolicy.adapters.judge.judge` for an
    asynchronous one.
    """
    if memo is None:
        memo = Memo()  # the rounds of this one decision share it
    for _ in range(rounds):
        found = decide(policy, session, envelope, memo)
        if isinstance(found, Verdict):
            return session, found
        session = session.with_dns(answer(found.queries))
    return session, evaluate(policy, session, envelope, memo)
