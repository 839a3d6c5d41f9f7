"""The compiled stages against a straightforward walk, and what compiling saves.

``reference`` below is the engine written the plain way: the policy's chains
(``Policy.chains``, not the compiled ``Policy.compiled``), every rule asked
anew at every decision with no memo, and each list colour with tables of its
own (not the tables the white and black lists share). The property checks
that ``decide`` and ``evaluate`` give exactly what it gives (verdict, reply,
rule, evidence, observed verdicts; the same DNS questions) on generated
policies and connections whose decisions share one :class:`Memo`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from helpers_core import (
    NODATA,
    NXDOMAIN,
    OUTSIDER,
    SERVFAIL,
    TIMEOUT,
    Counting,
    Zone,
    account,
    answer,
    make_policy,
    rcpt,
    session,
    standard_zone,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpolicy import (
    Action,
    DnsQuery,
    DnsResult,
    Envelope,
    Evidence,
    Lookups,
    Memo,
    MessageFacts,
    Policy,
    Reply,
    RType,
    Session,
    Stage,
    Verdict,
    decide,
    decide_with,
    evaluate,
)
from mailpolicy.lookup import AccessTable, NetworkTable
from mailpolicy.policy import TABLE
from mailpolicy.rules import Decision, NeedDns, Outcome, Rule
from mailpolicy.rules.context import Context
from mailpolicy.rules.helo import RejectUnknownHelo
from mailpolicy.rules.lists import BlackList, ListIndex, WhiteList
from mailpolicy.rules.sender import RejectUnknownSenderDomain
from mailpolicy.settings import reply_text
from mailpolicy.stages import compiled_rules

# ---------------------------------------------------------------------------
# The reference walk

_FINAL = {Outcome.REJECT: Action.REJECT, Outcome.DISCARD: Action.DISCARD}


def _unshared(rule: Rule) -> Rule:
    """A list rule over tables of its own colour only; any other rule as is."""
    if isinstance(rule, WhiteList | BlackList):
        return type(rule)(rule.name, ListIndex(rule.index.rules))
    return rule


def _reworded(policy: Policy, d: Decision) -> Decision:
    text = policy.texts.get(d.rule)
    if text is None or d.reply is None:
        return d
    return attrs.evolve(d, reply=attrs.evolve(d.reply, text=reply_text(d.reply.text, text)))


def _as_verdict(d: Decision, action: Action, seen: tuple[Verdict, ...]) -> Verdict:
    if action is Action.REJECT and d.reply is not None and d.reply.temporary:
        action = Action.DEFER
    return Verdict(action, d.reply, d.rule, d.evidence, seen)


def _observed(seen: list[Decision]) -> tuple[Verdict, ...]:
    return tuple(_as_verdict(d, _FINAL.get(d.outcome, Action.DEFER_IF_PERMIT), ()) for d in seen)


@attrs.frozen
class Waiting:
    """The reference's "needs DNS": the first rule that waits, its questions,
    and every question of the walk."""

    rule: str
    first: tuple[DnsQuery, ...]
    queries: frozenset[DnsQuery]

    def failure(self) -> Verdict:
        return Verdict(
            Action.DEFER,
            Reply(451, "4.3.0", "Temporary lookup failure"),
            self.rule,
            tuple(Evidence("dns", str(q), matched="not supplied") for q in self.first),
        )


def reference(
    policy: Policy, sess: Session, env: Envelope, rules: dict[int, Rule]
) -> Verdict | Waiting:
    """Postfix's semantics, the plain way (see the module's docstring)."""
    ctx = Context(policy.shared, sess, env, {})
    waiting: Waiting | None = None
    pending: Decision | None = None
    white: Decision | None = None
    seen: list[Decision] = []
    for chain in policy.chains[env.stage]:
        if env.discard is not None and chain.restriction:
            if waiting is not None:
                return waiting
            evidence = (Evidence("transaction", "discarding", matched=env.discard),)
            return Verdict(Action.DISCARD, None, env.discard, evidence, _observed(seen))
        for step in chain.steps:
            rule = rules.setdefault(id(step.rule), _unshared(step.rule))
            try:
                d = rule.check(ctx)
            except NeedDns as missing:
                if waiting is None:
                    name = missing.rule or step.rule.name
                    waiting = Waiting(name, missing.queries, frozenset(missing.queries))
                else:
                    waiting = attrs.evolve(waiting, queries=waiting.queries | set(missing.queries))
                continue
            if d is None:
                continue
            if d.outcome is Outcome.PERMIT:
                if step.white:
                    white = d
                break
            if step.observe and d.outcome is not Outcome.ACCEPT and d.rule in policy.observed:
                seen.append(_reworded(policy, d))
                continue
            if d.outcome is Outcome.DEFER_IF_PERMIT:
                if pending is None:
                    pending = _reworded(policy, d)
                continue
            if waiting is not None:
                return waiting
            if d.outcome is Outcome.ACCEPT:
                return _accepted(pending, None, seen)
            return _as_verdict(_reworded(policy, d), _FINAL[d.outcome], _observed(seen))
    if waiting is not None:
        return waiting
    return _accepted(pending, white, seen)


def _accepted(pending: Decision | None, white: Decision | None, seen: list[Decision]) -> Verdict:
    if pending is not None:
        return Verdict(
            Action.DEFER_IF_PERMIT, pending.reply, pending.rule, pending.evidence, _observed(seen)
        )
    if white is not None:
        return Verdict(Action.ACCEPT, None, white.rule, white.evidence, _observed(seen))
    return Verdict(Action.ACCEPT, observed=_observed(seen))


# ---------------------------------------------------------------------------
# Generated policies and connections

CLIENTS = ["203.0.113.5", "198.51.100.66", "2001:db8::5", "192.0.2.10", "::ffff:203.0.113.9"]
HELOS = [None, "outside.example.org", "mail.example.net", "localhost", "bad_helo", "a.example."]
SENDERS = ["", "s@known.example", "x@spam.example", "u@example.com", "a@corp.example", "nodomain"]
RECIPIENTS = [
    "r@example.com",
    "postmaster",
    "v@vip.example",
    "w@partner.example",
    "u%elsewhere.example@example.com",
    "z@elsewhere.example",
    "Admin@Example.COM",
]
NETS = ["203.0.113.0/24", "203.0.113.5/32", "198.51.100.0/22", "2001:db8::/32", "0.0.0.0/0"]
NAMES = ["outside.example.org", "example.org", "example.com", "h.x.example"]
ADDRESS_KEYS = ["spam.example", "s@known.example", "known.example", "u@", "example.com", "<>"]

criteria = {
    "client": st.lists(st.sampled_from(NETS), min_size=1, max_size=2, unique=True),
    "client_hostname": st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
    "helo": st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True),
    "sender": st.lists(st.sampled_from(ADDRESS_KEYS), min_size=1, max_size=2, unique=True),
    "recipient": st.lists(
        st.sampled_from([*ADDRESS_KEYS[:-1], "r@example.com", "vip.example"]),
        min_size=1,
        max_size=2,
        unique=True,
    ),
}


@st.composite
def list_rules(draw: st.DrawFn) -> list[dict[str, Any]]:
    """White and black rules of one to three criteria, keys often shared."""
    rules = []
    for n in range(draw(st.integers(0, 5))):
        kinds = draw(st.lists(st.sampled_from(sorted(criteria)), min_size=1, max_size=3))
        rule: dict[str, Any] = {"name": f"l{n}", "list": draw(st.sampled_from(["white", "black"]))}
        for kind in kinds:
            rule[kind] = draw(criteria[kind])
        if rule["list"] == "black":
            rule["action"] = draw(st.sampled_from(["reject", "reject", "discard"]))
            if draw(st.booleans()):
                rule["text"] = "Listed"
            if draw(st.booleans()):
                rule["observe"] = True
        rules.append(rule)
    return rules


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    flag = st.booleans()
    mapping = {
        "general": {
            "local_domains": ["example.com", "corp.example"],
            "max_recipients": draw(st.sampled_from([0, 2, 1000])),
            "observe": draw(st.booleans()) and draw(st.booleans()),
            "smtp_auth": {"enabled": draw(flag), "sender_must_match_login": draw(flag)},
        },
        "relay": {
            "inbound_domains": ["partner.example"],
            "trusted_networks": draw(st.sampled_from([[], ["192.0.2.0/24"]])),
        },
        "security": {
            "lists": draw(list_rules()),
            "sender_policy": {
                "reject_non_fqdn_sender": draw(flag),
                "reject_unknown_sender_domain": draw(flag),
                "reject_unauthenticated_local_sender": draw(flag),
                "observe": draw(flag),
                "text": draw(st.sampled_from([{}, {"reject_unknown_sender_domain": "Go away"}])),
            },
            "connection_policy": {
                "reject_unknown_reverse_client_hostname": draw(flag),
                "reject_unknown_client_hostname": draw(flag),
                "max_recipient_rate_per_client": draw(st.sampled_from([0, 3])),
            },
            "advanced": {
                "require_helo": draw(flag),
                "reject_invalid_helo": draw(flag),
                "reject_non_fqdn_helo": draw(flag),
                "reject_unknown_helo": draw(flag),
                "reject_unauth_pipelining": draw(flag),
                "reject_non_fqdn_recipient": draw(flag),
                "reject_unknown_recipient_domain": draw(flag),
                "dnsbl": draw(st.sampled_from([[], ["bl.example"], ["bl.example", "b2.example"]])),
                "observe": draw(flag),
            },
        },
    }
    return make_policy(mapping, accounts=[account("alice", "a@corp.example")])


OUTCOMES: dict[RType, list[DnsResult]] = {
    RType.A: [NXDOMAIN, NODATA, SERVFAIL, answer("127.0.0.2"), answer("203.0.113.5")],
    RType.AAAA: [NXDOMAIN, NODATA, TIMEOUT, answer("2001:db8::5")],
    RType.MX: [NXDOMAIN, NODATA, SERVFAIL, answer("10 mx.x.example"), answer("0 .")],
    RType.PTR: [NXDOMAIN, SERVFAIL, answer("outside.example.org"), answer("h.x.example")],
    RType.TXT: [NXDOMAIN, NODATA],
}


def drawing_resolver(data: st.DataObject) -> Callable[[frozenset[DnsQuery]], dict[Any, Any]]:
    """Each question answered by a drawn outcome, the same one if asked again."""
    cache: dict[DnsQuery, DnsResult] = {}

    def resolve(queries: frozenset[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        for query in sorted(queries, key=str):
            if query not in cache:
                cache[query] = data.draw(st.sampled_from(OUTCOMES[query.rtype]), label=str(query))
        return {query: cache[query] for query in queries}

    return resolve


@st.composite
def connections(draw: st.DrawFn) -> tuple[Session, list[Envelope]]:
    """A session and the envelopes of one or two transactions, in order."""
    sess = Session(
        draw(st.sampled_from(CLIENTS)),
        helo=draw(st.sampled_from(HELOS)),
        esmtp=True,
        auth_user=draw(st.sampled_from([None, None, "alice"])),
        improper_pipelining=draw(st.booleans()),
    )
    envelopes = [Envelope(Stage.CONNECT)]
    for _ in range(draw(st.integers(1, 2))):
        sender = draw(st.sampled_from(SENDERS))
        envelopes.append(Envelope(Stage.MAIL, sender=sender, declared_size=100))
        done: list[str] = []
        discard = draw(st.sampled_from([None, None, "security.lists.l0"]))
        for recipient in draw(st.lists(st.sampled_from(RECIPIENTS), min_size=1, max_size=4)):
            envelopes.append(
                Envelope(
                    Stage.RCPT,
                    sender=sender,
                    recipient=recipient,
                    recipients=tuple(done),
                    discard=discard if done else None,
                )
            )
            done.append(recipient)
        envelopes.append(Envelope(Stage.DATA, sender=sender, recipients=tuple(done)))
        message = MessageFacts(size=100, received_headers=draw(st.integers(0, 3)))
        envelopes.append(
            Envelope(Stage.END_OF_DATA, sender=sender, recipients=tuple(done), message=message)
        )
    return sess, envelopes


def _same(policy: Policy, sess: Session, env: Envelope, memo: Memo, rules: dict[int, Rule]) -> Any:
    """``decide`` and ``evaluate`` (sharing ``memo``) against the reference."""
    want = reference(policy, sess, env, rules)
    got = decide(policy, sess, env, memo)
    if isinstance(want, Waiting):
        assert got == Lookups(want.queries)
        assert evaluate(policy, sess, env, memo) == want.failure()
    else:
        assert got == want, (got, want)
        assert evaluate(policy, sess, env, memo) == want
    return got


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), connection=connections(), data=st.data())
def test_compiled_decisions_equal_the_reference_walk(
    policy: Policy, connection: tuple[Session, list[Envelope]], data: st.DataObject
) -> None:
    sess, envelopes = connection
    resolver = drawing_resolver(data)
    memo = Memo()  # one per connection, as a server keeps it
    rules: dict[int, Rule] = {}
    for n, env in enumerate(envelopes):
        # as the server does: new counters at every RCPT, answers added round by round
        sess = attrs.evolve(sess, counters=attrs.evolve(sess.counters, recipient_rate=n))
        for _ in range(5):
            found = _same(policy, sess, env, memo, rules)
            if isinstance(found, Verdict):
                break
            sess = sess.with_dns(resolver(found.queries))
        else:
            pytest.fail(f"decide does not converge at {env.stage}")


# ---------------------------------------------------------------------------
# What compiling saves


EVERY_CHECK: dict[str, Any] = {
    "security": {
        "lists": [
            {"name": "w", "list": "white", "sender": ["vip.example"]},
            {"name": "b", "list": "black", "sender": ["spam.example"], "client": [OUTSIDER]},
        ],
        "sender_policy": {"reject_non_fqdn_sender": True, "reject_unknown_sender_domain": True},
        "connection_policy": {"reject_unknown_client_hostname": True},
        "advanced": {
            "reject_non_fqdn_helo": True,
            "reject_unknown_helo": True,
            "dnsbl": ["bl.example"],
        },
    }
}


def _transaction(policy: Policy, zone: Zone) -> Iterator[Verdict]:
    sess, memo = session(), Memo()
    for env in (
        Envelope(Stage.CONNECT),
        Envelope(Stage.MAIL, sender="s@known.example"),
        rcpt("r@example.com"),
        rcpt("t@example.com", recipients=["r@example.com"]),
        Envelope(Stage.DATA, sender="s@known.example", recipients=("r@example.com",)),
    ):
        sess, verdict = decide_with(policy, sess, env, zone, memo)
        yield verdict


@pytest.mark.parametrize(
    ("section", "key", "cls"),
    [
        ("advanced", "reject_unknown_helo", RejectUnknownHelo),
        ("sender_policy", "reject_unknown_sender_domain", RejectUnknownSenderDomain),
    ],
)
def test_a_rule_that_is_off_is_never_called(
    monkeypatch: pytest.MonkeyPatch, section: str, key: str, cls: type
) -> None:
    on = make_policy(EVERY_CHECK)
    off_mapping = {"security": {**EVERY_CHECK["security"]}}
    off_mapping["security"][section] = {**EVERY_CHECK["security"][section], key: False}
    off = make_policy(off_mapping)
    zone = standard_zone()
    counted = Counting(monkeypatch, cls)
    verdicts = list(_transaction(off, zone))
    assert counted.calls == 0
    assert [v.action for v in verdicts] == [Action.ACCEPT] * 5
    # the same transaction with the rule on does call it (the count works)
    assert [v.action for v in _transaction(on, zone)] == [Action.ACCEPT] * 5
    assert counted.calls >= 1
    # and it is not in the compiled RCPT stage at all when off
    assert not [r for r in compiled_rules(off.compiled[Stage.RCPT]) if isinstance(r, cls)]
    assert [r for r in compiled_rules(on.compiled[Stage.RCPT]) if isinstance(r, cls)]


def test_every_rule_that_is_on_is_compiled_once_in_table_order() -> None:
    policy = make_policy(EVERY_CHECK)
    for stage in Stage:
        walked = compiled_rules(policy.compiled[stage])
        assert walked == [rule for _, rule in policy.rules(stage)]
    keys = {row.key for row in TABLE}
    names = {rule.name for rule in compiled_rules(policy.compiled[Stage.RCPT])}
    assert {n for n in names if not n.startswith("security.advanced.dnsbl.")} <= keys


def test_white_and_black_lists_probe_each_criterion_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One probe per criterion answers both colours: the sender table once
    per sender, the client table once per session, whatever the RCPTs."""
    policy = make_policy(EVERY_CHECK)
    senders = Counting(monkeypatch, AccessTable, "matches")
    clients = Counting(monkeypatch, NetworkTable, "hits")
    verdicts = list(_transaction(policy, standard_zone()))
    assert [v.action for v in verdicts] == [Action.ACCEPT] * 5
    assert senders.calls == 1  # one sender, two RCPTs, two colours
    assert clients.calls == 1  # one client
