"""The engine's entry points: decide (one walk: a verdict or the questions),
evaluate, the drivers decide_with and adapters.judge.judge, the table rows as
the single source of a rule's name, scope and counter, and Session equality."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import attrs
import pytest
from helpers_core import (
    OUTSIDER,
    OUTSIDER_HELO,
    SERVFAIL,
    Zone,
    answer,
    make_policy,
    q,
    rcpt,
    session,
    standard_zone,
)

import mailpolicy
from mailpolicy import (
    Action,
    DnsQuery,
    DnsResult,
    Envelope,
    Lookups,
    Reply,
    Session,
    Stage,
    Verdict,
    decide,
    decide_with,
    evaluate,
)
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.judge import judge
from mailpolicy.policy import _NO_SETTING, TABLE, _always, _setting
from mailpolicy.rules import Scope
from mailpolicy.rules.context import Context
from mailpolicy.rules.sender import RejectUnknownSenderDomain
from mailpolicy.settings import Settings

CHECKS = {
    "security": {
        "sender_policy": {"reject_unknown_sender_domain": True},
        "advanced": {"reject_unknown_helo": True, "dnsbl": ["bl.example"]},
        "connection_policy": {"reject_unknown_client_hostname": True},
    }
}
#: a client whose PTR name is not its HELO name: its forward lookup is a
#: second round
CLIENT, CLIENT_NAME = "192.0.2.10", "client.example.com"
BL = "10.2.0.192.bl.example"


def client() -> Session:
    return session(CLIENT)


class Counting:
    """Counts the calls of a rule class's check (patched on the class)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.calls = 0
        original = cls.check

        def check(rule: object, ctx: Context) -> object:
            self.calls += 1
            return original(rule, ctx)

        monkeypatch.setattr(cls, "check", check)


# ---------------------------------------------------------------------------
# decide


def test_decide_names_every_independent_question_at_once() -> None:
    found = decide(make_policy(CHECKS), client(), rcpt("r@example.com"))
    assert found == Lookups(
        frozenset(
            {
                q(BL, "A"),
                q(CLIENT, "PTR"),
                # a domain's A and AAAA only once its MX is known missing
                q(OUTSIDER_HELO, "MX"),
                q("known.example", "MX"),
            }
        )
    )


def test_decide_gives_the_verdict_once_every_answer_is_known() -> None:
    policy = make_policy(CHECKS)
    sess = client().with_dns(standard_zone()(decide_queries(policy, client())))
    found = decide(policy, sess, rcpt("r@example.com"))
    # the PTR name's forward lookup comes next, with A and AAAA of the
    # domains whose MX the zone does not have
    second = frozenset(
        {q(CLIENT_NAME, "A")}
        | {q(d, t) for d in (OUTSIDER_HELO, "known.example") for t in ("A", "AAAA")}
    )
    assert found == Lookups(second)
    sess = sess.with_dns(standard_zone()(second))
    assert decide(policy, sess, rcpt("r@example.com")) == Verdict(Action.ACCEPT)


def decide_queries(policy: mailpolicy.Policy, sess: Session) -> frozenset[DnsQuery]:
    found = decide(policy, sess, rcpt("r@example.com"))
    assert isinstance(found, Lookups)
    return found.queries


def test_a_decision_before_any_dns_question_needs_no_answer() -> None:
    # relay denied comes before the checks that need DNS
    found = decide(make_policy(CHECKS), session(), rcpt("r@elsewhere.example"))
    assert isinstance(found, Verdict)
    assert found.rule == "relay.reject_unauth_destination"


def test_a_refusal_after_a_rule_waiting_for_dns_is_not_final() -> None:
    # the black list refuses, but the DNSBL before it might have refused
    # first with its own reply: the answer is needed
    policy = make_policy(
        {
            "security": {
                "advanced": {"dnsbl": ["bl.example"]},
                "lists": [{"name": "late", "list": "black", "recipient": ["r@example.com"]}],
            }
        }
    )
    # the black list runs before the DNSBL in the table: its refusal is final
    found = decide(policy, session(), rcpt("r@example.com"))
    assert isinstance(found, Verdict)
    assert found.rule == "security.lists.late"
    # the HELO check (after the DNSBL) refuses only once the DNSBL could decide
    policy = make_policy(
        {"security": {"advanced": {"dnsbl": ["bl.example"], "reject_non_fqdn_helo": True}}}
    )
    short = session(CLIENT, helo="localhost")
    found = decide(policy, short, rcpt("r@example.com"))
    assert found == Lookups(frozenset({q(BL, "A")}))
    v = decide(policy, short.with_dns({q(BL, "A"): SERVFAIL}), rcpt("r@example.com"))
    assert isinstance(v, Verdict)
    assert v.rule == "security.advanced.reject_non_fqdn_helo"
    listed = short.with_dns({q(BL, "A"): answer("127.0.0.2")})
    v = decide(policy, listed, rcpt("r@example.com"))
    assert isinstance(v, Verdict)
    assert v.rule == "security.advanced.dnsbl.bl.example"


def test_decide_walks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counting(monkeypatch, RejectUnknownSenderDomain)
    policy = make_policy(CHECKS)
    zone = standard_zone()
    sess, _ = decide_with(policy, session(), rcpt("r@example.com"), zone)
    counted.calls = 0
    assert decide(policy, sess, rcpt("r@example.com")) == Verdict(Action.ACCEPT)
    assert counted.calls == 1
    assert isinstance(decide(policy, session(), rcpt("r@example.com")), Lookups)
    assert counted.calls == 2


def test_evaluate_turns_a_missing_answer_into_a_temporary_failure_naming_the_first_rule() -> None:
    v = evaluate(make_policy(CHECKS), client(), rcpt("r@example.com"))
    assert v == Verdict(
        Action.DEFER,
        Reply(451, "4.3.0", "Temporary lookup failure"),
        "security.advanced.dnsbl.bl.example",
        (mailpolicy.Evidence("dns", f"{BL}/A", matched="not supplied"),),
    )


def test_a_discarded_transaction_skips_restrictions_but_not_limits() -> None:
    policy = make_policy({**CHECKS, "general": {"max_recipients": 1}})
    env = rcpt("r2@example.com", recipients=["r1@example.com"], discard="security.lists.trap")
    v = decide(policy, session(), env)
    assert isinstance(v, Verdict)
    assert v.rule == "general.max_recipients"
    env = rcpt("r2@example.com", discard="security.lists.trap")
    v = decide(policy, session(), env)
    assert isinstance(v, Verdict)
    assert (v.action, v.rule) == (Action.DISCARD, "security.lists.trap")


# ---------------------------------------------------------------------------
# decide_with


def test_decide_with_asks_round_by_round_and_returns_the_full_session() -> None:
    policy = make_policy(CHECKS)
    zone = standard_zone()
    sess, v = decide_with(policy, client(), rcpt("r@example.com"), zone)
    assert v == Verdict(Action.ACCEPT)
    assert len(zone.rounds) == 2
    assert zone.rounds[1] == {q(CLIENT_NAME, "A")} | {
        q(d, t) for d in (OUTSIDER_HELO, "known.example") for t in ("A", "AAAA")
    }
    assert set(sess.dns) == zone.rounds[0] | zone.rounds[1]
    assert evaluate(policy, sess, rcpt("r@example.com")) == v


def test_decide_with_gives_up_after_its_rounds() -> None:
    zone = standard_zone()
    sess, v = decide_with(make_policy(CHECKS), client(), rcpt("r@example.com"), zone, rounds=1)
    assert len(zone.rounds) == 1
    assert (v.action, v.reply) == (Action.DEFER, Reply(451, "4.3.0", "Temporary lookup failure"))
    assert v.evidence[0].value == f"{CLIENT_NAME}/A"
    assert set(sess.dns) == zone.rounds[0]


def test_decide_with_and_no_rounds_is_evaluate() -> None:
    policy = make_policy(CHECKS)
    sess, v = decide_with(policy, session(), rcpt("r@example.com"), Zone(), rounds=0)
    assert (sess, v) == (session(), evaluate(policy, session(), rcpt("r@example.com")))


# ---------------------------------------------------------------------------
# adapters.judge.judge


ZONE = StaticZone.from_mapping(
    {
        CLIENT: {"PTR": [CLIENT_NAME]},
        CLIENT_NAME: {"A": [CLIENT]},
        OUTSIDER_HELO: {"A": [OUTSIDER], "MX": ["10 mx.example.org"]},
        "known.example": {"A": ["192.0.2.60"]},
        "listed.example": {"A": ["192.0.2.66"]},
        "66.2.0.192.bl.example": {"A": ["127.0.0.2"]},
    }
)


class Asking:
    """A resolver over ``ZONE`` that records its rounds."""

    def __init__(self) -> None:
        self.rounds: list[frozenset[DnsQuery]] = []

    async def resolve(self, query: DnsQuery) -> DnsResult:
        return ZONE.lookup(query)

    async def resolve_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        asked = frozenset(queries)
        self.rounds.append(asked)
        return await ZONE.resolve_all(asked)


class Broken:
    async def resolve(self, query: DnsQuery) -> DnsResult:
        raise OSError("network unreachable")

    async def resolve_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        raise OSError("network unreachable")


def test_judge_resolves_and_decides() -> None:
    policy = make_policy(CHECKS)
    resolver = Asking()
    sess, v = asyncio.run(judge(policy, client(), rcpt("r@example.com"), resolver))
    assert v == Verdict(Action.ACCEPT)
    assert len(resolver.rounds) == 2
    assert sess.dns[q(BL, "A")].outcome is mailpolicy.DnsOutcome.NXDOMAIN
    # the same as the synchronous driver over the same zone
    assert decide_with(policy, client(), rcpt("r@example.com"), ZONE.lookup_all) == (sess, v)


def test_judge_refuses_a_listed_client_with_one_round() -> None:
    policy = make_policy(CHECKS)
    resolver = Asking()
    _, v = asyncio.run(judge(policy, Session("192.0.2.66"), rcpt("r@example.com"), resolver))
    assert v.rule == "security.advanced.dnsbl.bl.example"
    assert v.action is Action.REJECT
    # the DNSBL answered in round one refuses: the client name, still
    # waiting for its forward lookup after it, is never needed
    assert len(resolver.rounds) == 1


def test_judge_turns_a_resolver_error_into_a_temporary_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="mailpolicy.judge"):
        sess, v = asyncio.run(
            judge(make_policy(CHECKS), session(), rcpt("r@example.com"), Broken())
        )
    assert v == Verdict(
        Action.DEFER,
        Reply(451, "4.3.0", "Error: temporary failure, please try again later"),
        "internal.error",
    )
    assert sess == session()
    assert [r.getMessage() for r in caplog.records] == ["policy evaluation failed at rcpt"]


def test_judge_needs_no_resolver_when_nothing_is_missing() -> None:
    sess, v = asyncio.run(judge(make_policy(), session(), rcpt("r@elsewhere.example"), Broken()))
    assert v.rule == "relay.reject_unauth_destination"
    assert sess == session()


# ---------------------------------------------------------------------------
# Policy.counters


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            {"max_connections_per_client": 0},
            {Stage.CONNECT: set(), Stage.MAIL: set(), Stage.RCPT: set()},
        ),
        (
            {"max_connections_per_client": 5},
            {Stage.CONNECT: {"connections"}, Stage.MAIL: set(), Stage.RCPT: set()},
        ),
        (
            {"max_connections_per_client": 0, "max_connection_rate_per_client": 10},
            {Stage.CONNECT: {"connection_rate"}, Stage.MAIL: set(), Stage.RCPT: set()},
        ),
        (
            {
                "max_connections_per_client": 5,
                "max_connection_rate_per_client": 10,
                "max_message_rate_per_client": 3,
                "max_recipient_rate_per_client": 30,
            },
            {
                Stage.CONNECT: {"connections", "connection_rate"},
                Stage.MAIL: {"message_rate"},
                Stage.RCPT: {"recipient_rate"},
            },
        ),
        (
            {"max_connections_per_client": 0, "max_recipient_rate_per_client": 30},
            {Stage.CONNECT: set(), Stage.MAIL: set(), Stage.RCPT: {"recipient_rate"}},
        ),
    ],
)
def test_the_policy_says_which_counters_each_stage_reads(
    limits: dict[str, int], expected: dict[Stage, set[str]]
) -> None:
    policy = make_policy({"security": {"connection_policy": limits}})
    for stage in Stage:
        assert policy.counters(stage) == expected.get(stage, set()), stage
    fields = {f.name for f in attrs.fields(mailpolicy.Counters)}
    assert set().union(*(policy.counters(s) for s in Stage)) <= fields


def test_the_default_policy_counts_connections() -> None:
    # max_connections_per_client is on by default (50)
    assert make_policy().counters(Stage.CONNECT) == {"connections"}


# ---------------------------------------------------------------------------
# The table rows


def test_every_switched_row_names_a_setting() -> None:
    settings = Settings()
    for row in TABLE:
        if row.enabled is not _always:
            assert _setting(settings, row.key) is not _NO_SETTING, row.key
    assert _setting(settings, "general.no_such_key") is _NO_SETTING


def test_rules_are_named_by_their_row() -> None:
    policy = make_policy(
        {
            "security": {
                "advanced": {"dnsbl": ["a.example", "b.example"], "reject_invalid_helo": True},
                "lists": [{"name": "w", "list": "white", "client": ["192.0.2.0/24"]}],
            }
        }
    )
    keys = {row.key for row in TABLE}
    for stage in Stage:
        for _, rule in policy.rules(stage):
            assert rule.name in keys or rule.name.startswith("security.advanced.dnsbl."), rule
    names = [rule.name for _, rule in policy.rules(Stage.RCPT)]
    assert "security.advanced.dnsbl.a.example" in names
    assert "security.advanced.dnsbl.b.example" in names
    v = evaluate(policy, Session("192.0.2.7"), rcpt("r@example.com"))
    assert (v.action, v.rule) == (Action.ACCEPT, "security.lists.w")


def test_rows_of_one_chain_agree_and_give_steps_their_scope() -> None:
    chains: dict[tuple[Stage, str], bool] = {}
    for row in TABLE:
        assert chains.setdefault((row.stage, row.chain), row.restriction) == row.restriction
    policy = make_policy(CHECKS)
    scopes = {
        step.rule.name: step.scope for chain in policy.chains[Stage.RCPT] for step in chain.steps
    }
    assert scopes["security.advanced.dnsbl.bl.example"] is Scope.SESSION
    assert scopes["security.sender_policy.reject_unknown_sender_domain"] is Scope.SENDER
    assert scopes["relay.reject_unauth_destination"] is Scope.ENVELOPE
    restrictions = {c.name: c.restriction for c in policy.chains[Stage.RCPT]}
    assert restrictions["limits"] is False
    assert restrictions["checks"] is True


def test_only_the_white_list_is_marked_white() -> None:
    white = [row for row in TABLE if row.white]
    assert [(r.stage, r.chain, r.key) for r in white] == [(Stage.RCPT, "checks", "security.lists")]


# ---------------------------------------------------------------------------
# Session: facts only, equal when the facts are equal


def test_sessions_with_different_dns_answers_differ() -> None:
    a = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns({q(OUTSIDER, "PTR"): answer("x.example")})
    b = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns({q(OUTSIDER, "PTR"): SERVFAIL})
    c = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns([(q(OUTSIDER, "PTR"), answer("x.example"))])
    assert a != b
    assert a == c
    assert hash(a) == hash(c)
    assert a != Session(OUTSIDER, helo=OUTSIDER_HELO)
    # still usable as a key: equal sessions hash equal
    seen: dict[Session, int] = {a: 1}
    assert seen[c] == 1
    assert b not in seen


def test_a_session_holds_no_cache() -> None:
    names = {f.name for f in attrs.fields(Session)}
    assert names == {
        "client_ip",
        "helo",
        "esmtp",
        "tls",
        "auth_user",
        "improper_pipelining",
        "counters",
        "dns",
    }


def test_a_new_answer_replaces_the_old_one() -> None:
    s = session().with_dns({q(OUTSIDER, "PTR"): SERVFAIL})
    assert s.with_dns({q(OUTSIDER, "PTR"): answer("x.example")}).dns[q(OUTSIDER, "PTR")] == (
        answer("x.example")
    )


def test_public_names() -> None:
    for name in ("decide", "decide_with", "Lookups", "Memo", "evaluate"):
        assert name in mailpolicy.__all__
    assert mailpolicy.decide is decide
    memo: Any = mailpolicy.Memo()
    assert len(memo) == 0
    env = Envelope(Stage.CONNECT)
    assert mailpolicy.decide(make_policy(), session(), env, memo) == Verdict(Action.ACCEPT)
