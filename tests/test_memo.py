"""The per-connection memo: the same verdicts as without it, never a stale one,
and each session-level decision made once per connection."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from helpers_core import (
    OUTSIDER,
    OUTSIDER_HELO,
    SERVFAIL,
    Counting,
    Zone,
    answer,
    make_policy,
    q,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpolicy import (
    Action,
    Counters,
    Envelope,
    Memo,
    Session,
    Stage,
    Verdict,
    decide,
    decide_with,
    evaluate,
)
from mailpolicy.rules.context import Context
from mailpolicy.rules.dnsbl import RejectRblClient
from mailpolicy.rules.helo import RejectNonFqdnHelo
from mailpolicy.rules.relay import RejectUnauthDestination

POLICY = make_policy(
    {
        "security": {
            "sender_policy": {"reject_unknown_sender_domain": True},
            "advanced": {"reject_unknown_helo": True, "dnsbl": ["bl.example"]},
            "connection_policy": {"reject_unknown_reverse_client_hostname": True},
        }
    }
)
GOOD = {
    q(OUTSIDER, "PTR"): answer(OUTSIDER_HELO),
    q(OUTSIDER_HELO, "A"): answer(OUTSIDER),
    q(OUTSIDER_HELO, "MX"): answer("10 mx.example.org"),
    q(OUTSIDER_HELO, "AAAA"): answer(),
    q("5.113.0.203.bl.example", "A"): answer(),
    q("known.example", "MX"): answer("10 mx.known.example"),
    q("known.example", "A"): answer("192.0.2.60"),
    q("known.example", "AAAA"): answer(),
}


def rcpt(recipient: str, sender: str = "a@known.example") -> Envelope:
    return Envelope(Stage.RCPT, sender=sender, recipient=recipient)


def session() -> Session:
    return Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns(GOOD)


def test_a_second_rcpt_reuses_session_decisions_and_agrees_without_a_memo() -> None:
    s, memo = session(), Memo()
    first = evaluate(POLICY, s, rcpt("r1@example.com"), memo)
    assert len(memo) > 0, "session-level decisions are kept"
    second = evaluate(POLICY, s, rcpt("r2@example.com"), memo)
    fresh = evaluate(POLICY, s, rcpt("r2@example.com"))
    assert first.action is second.action is fresh.action is Action.ACCEPT
    assert second == fresh


def test_a_replaced_answer_is_not_answered_from_the_memo() -> None:
    s, memo = session(), Memo()
    assert evaluate(POLICY, s, rcpt("r@example.com"), memo).action is Action.ACCEPT
    # The same question now answered differently: nothing derived from the
    # old answer may be reused.
    broken = s.with_dns({q(OUTSIDER, "PTR"): SERVFAIL})
    v = evaluate(POLICY, broken, rcpt("r@example.com"), memo)
    assert (v.action, v.rule) == (
        Action.DEFER,
        "security.connection_policy.reject_unknown_reverse_client_hostname",
    )


def test_a_new_sender_is_judged_anew() -> None:
    s = session().with_dns({q("gone.example", t): SERVFAIL for t in ("MX", "A", "AAAA")})
    memo = Memo()
    assert evaluate(POLICY, s, rcpt("r@example.com"), memo).action is Action.ACCEPT
    v = evaluate(POLICY, s, rcpt("r@example.com", sender="a@gone.example"), memo)
    assert v.rule == "security.sender_policy.reject_unknown_sender_domain"


def test_the_memo_is_bounded() -> None:
    memo = Memo(limit=8)
    s = session()
    for i in range(50):
        sender = f"a{i}@known.example"
        assert evaluate(POLICY, s, rcpt("r@example.com", sender), memo).action is Action.ACCEPT
        assert len(memo) <= 8 + 10  # the limit, plus one walk's worth


def test_a_memo_used_with_another_policy_starts_afresh() -> None:
    memo, s = Memo(), session()
    evaluate(POLICY, s, rcpt("r@example.com"), memo)
    strict = make_policy({"security": {"advanced": {"reject_non_fqdn_helo": True}}})
    short = attrs.evolve(s, helo="localhost")
    v = evaluate(strict, short, rcpt("r@example.com"), memo)
    assert v.rule == "security.advanced.reject_non_fqdn_helo"


# ---------------------------------------------------------------------------
# One computation per connection, whatever else changes between RCPTs


RATE_POLICY = make_policy(
    {
        "security": {
            "advanced": {"dnsbl": ["bl.example"], "reject_non_fqdn_helo": True},
            "connection_policy": {
                "reject_unknown_client_hostname": True,
                "max_recipient_rate_per_client": 100,
            },
        }
    }
)


def test_session_decisions_are_made_once_across_rcpts_with_new_counters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dnsbl = Counting(monkeypatch, RejectRblClient)
    names = Counting(monkeypatch, Context, "_client_name")
    zone = Zone(GOOD)
    memo = Memo()
    s = Session(OUTSIDER, helo=OUTSIDER_HELO)
    for n in range(1, 6):
        # the adapter counts each RCPT: a new session value every time
        s = attrs.evolve(s, counters=attrs.evolve(s.counters, recipient_rate=n))
        s, verdict = decide_with(RATE_POLICY, s, rcpt(f"r{n}@example.com"), zone, memo)
        assert verdict.action is Action.ACCEPT, verdict.explain()
    assert dnsbl.calls == 2  # round one waits for the answer, round two decides
    # the same for the verified client name: PTR, then its forward name, then
    # the name is known (three tries over the rounds of RCPT 1), never again
    assert names.calls == 3
    # the client's name (PTR, then its forward lookup) was asked for once,
    # the blocklist once: nothing again at RCPTs 2 to 5
    asked = [query for round_ in zone.rounds for query in round_]
    assert sorted(map(str, asked)) == sorted(
        [f"{OUTSIDER}/PTR", f"{OUTSIDER_HELO}/A", "5.113.0.203.bl.example/A"]
    )
    assert len(asked) == len(set(asked))


def test_a_new_helo_is_judged_again(monkeypatch: pytest.MonkeyPatch) -> None:
    helo = Counting(monkeypatch, RejectNonFqdnHelo)
    memo = Memo()
    s = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns(GOOD)
    first = evaluate(RATE_POLICY, s, rcpt("r1@example.com"), memo)
    again = evaluate(
        RATE_POLICY,
        attrs.evolve(s, counters=Counters(recipient_rate=2)),
        rcpt("r2@example.com"),
        memo,
    )
    assert first == again == Verdict(Action.ACCEPT)
    assert helo.calls == 1
    renamed = attrs.evolve(s, helo="localhost")
    v = evaluate(RATE_POLICY, renamed, rcpt("r3@example.com"), memo)
    assert helo.calls == 2
    assert v.rule == "security.advanced.reject_non_fqdn_helo"


@pytest.mark.parametrize(
    "change",
    [
        {"auth_user": "alice"},
        {"tls": True},
        {"client_ip": "198.51.100.9"},
        {"esmtp": True},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_changed_fact_drops_session_decisions(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    # without AUTH, so that a logged-in client still reaches the HELO check
    policy = make_policy(
        {
            "general": {"smtp_auth": {"enabled": False}},
            "security": {"advanced": {"reject_non_fqdn_helo": True}},
        }
    )
    helo = Counting(monkeypatch, RejectNonFqdnHelo)
    memo = Memo()
    s = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns(GOOD)
    evaluate(policy, s, rcpt("r1@example.com"), memo)
    evaluate(policy, s, rcpt("r2@example.com"), memo)
    assert helo.calls == 1
    evaluate(policy, attrs.evolve(s, **change), rcpt("r3@example.com"), memo)
    assert helo.calls == 2


def test_added_answers_keep_session_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    helo = Counting(monkeypatch, RejectNonFqdnHelo)
    memo = Memo()
    s = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns(GOOD)
    evaluate(RATE_POLICY, s, rcpt("r1@example.com"), memo)
    more = s.with_dns({q("other.example", "A"): answer("192.0.2.9")})
    evaluate(RATE_POLICY, more, rcpt("r2@example.com"), memo)
    assert helo.calls == 1
    # the same answer given again is no change either
    evaluate(RATE_POLICY, more.with_dns(GOOD), rcpt("r3@example.com"), memo)
    assert helo.calls == 1


def test_decide_with_a_memo_asks_what_a_new_answer_needs() -> None:
    # A replaced PTR answer leads to a new forward question.
    memo = Memo()
    s = Session(OUTSIDER, helo=OUTSIDER_HELO).with_dns(GOOD)
    assert isinstance(decide(RATE_POLICY, s, rcpt("r@example.com"), memo), Verdict)
    moved = s.with_dns({q(OUTSIDER, "PTR"): answer("elsewhere.example")})
    found = decide(RATE_POLICY, moved, rcpt("r@example.com"), memo)
    assert not isinstance(found, Verdict)
    assert found.queries == {q("elsewhere.example", "A")}


def test_the_rounds_of_one_decision_judge_the_envelope_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = Counting(monkeypatch, RejectUnauthDestination)
    zone, memo = Zone(GOOD), Memo()
    s = Session(OUTSIDER, helo=OUTSIDER_HELO)
    s, verdict = decide_with(POLICY, s, rcpt("r1@example.com"), zone, memo)
    assert len(zone.rounds) == 2  # the PTR, the MX and the DNSBL; then the name's A
    assert relay.calls == 1  # not once a round
    assert (
        verdict
        == decide_with(
            POLICY, Session(OUTSIDER, helo=OUTSIDER_HELO), rcpt("r1@example.com"), Zone(GOOD)
        )[1]
    )


def test_another_envelope_or_new_counters_judge_the_envelope_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = Counting(monkeypatch, RejectUnauthDestination)
    memo, s = Memo(), session()
    env = rcpt("r1@example.com")
    evaluate(RATE_POLICY, s, env, memo)
    evaluate(RATE_POLICY, s, env, memo)
    assert relay.calls == 1  # the same envelope, the same facts: a round of one decision
    evaluate(RATE_POLICY, s, rcpt("r1@example.com"), memo)
    assert relay.calls == 2  # an equal envelope, but another decision
    counted = attrs.evolve(s, counters=Counters(recipient_rate=5))
    evaluate(RATE_POLICY, counted, env, memo)
    assert relay.calls == 3
    evaluate(RATE_POLICY, attrs.evolve(counted, helo="other.example.org"), env, memo)
    assert relay.calls == 4  # a changed fact starts the memo afresh


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@known.example", "", "x@gone.example"]),
            st.sampled_from(["r@example.com", "r@elsewhere.example", "postmaster"]),
            st.sampled_from([OUTSIDER_HELO, "localhost"]),
            st.sets(st.sampled_from(sorted(GOOD, key=str)), max_size=len(GOOD)),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_decisions_in_rounds_equal_fresh_ones(
    steps: list[tuple[str, str, str, set[Any]]],
) -> None:
    # one envelope judged again as answers arrive, in any order, as the
    # dialogue does: the memo never answers from a round that knew less
    memo = Memo()
    for sender, recipient, helo, known in steps:
        env = rcpt(recipient, sender)
        s = Session(OUTSIDER, helo=helo)
        for query in sorted(known, key=str):
            s = s.with_dns({query: GOOD[query]})
            assert decide(POLICY, s, env, memo) == decide(POLICY, s, env)
        assert evaluate(POLICY, s, env, memo) == evaluate(POLICY, s, env)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@known.example", "b@known.example", "", "x@gone.example"]),
            st.sampled_from(["r@example.com", "r@elsewhere.example", "postmaster"]),
            st.sampled_from([OUTSIDER_HELO, "localhost", "[192.0.2.1]"]),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_memoised_verdicts_equal_fresh_ones(steps: list[tuple[str, str, str, int]]) -> None:
    s, memo = session(), Memo()
    for sender, recipient, helo, rate in steps:
        s = attrs.evolve(s, helo=helo, counters=Counters(recipient_rate=rate))
        env = rcpt(recipient, sender)
        assert evaluate(POLICY, s, env, memo) == evaluate(POLICY, s, env)
        assert decide(RATE_POLICY, s, env, memo) == decide(RATE_POLICY, s, env)
