"""The per-session memo: the same verdicts as without it, never a stale one."""

from __future__ import annotations

import attrs
from helpers_core import (
    OUTSIDER,
    OUTSIDER_HELO,
    SERVFAIL,
    answer,
    make_policy,
    q,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpolicy import Action, Envelope, Session, Stage

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


def test_a_second_rcpt_reuses_session_decisions_and_agrees_with_a_fresh_session() -> None:
    s = session()
    first = POLICY.evaluate(s, rcpt("r1@example.com"))
    assert s.memo, "session-level decisions are kept"
    second = POLICY.evaluate(s, rcpt("r2@example.com"))
    fresh = POLICY.evaluate(attrs.evolve(s), rcpt("r2@example.com"))
    assert first.action is second.action is fresh.action is Action.ACCEPT
    assert second == fresh


def test_a_replaced_answer_drops_the_memo() -> None:
    s = session()
    assert POLICY.evaluate(s, rcpt("r@example.com")).action is Action.ACCEPT
    # The same question now answered differently: nothing derived from the
    # old answer may be reused.
    broken = s.with_dns({q(OUTSIDER, "PTR"): SERVFAIL})
    assert not broken.memo
    v = POLICY.evaluate(broken, rcpt("r@example.com"))
    assert (v.action, v.rule) == (
        Action.DEFER,
        "security.connection_policy.reject_unknown_reverse_client_hostname",
    )


def test_added_answers_keep_the_memo_and_a_new_helo_starts_afresh() -> None:
    s = session()
    POLICY.evaluate(s, rcpt("r@example.com"))
    more = s.with_dns({q("other.example", "A"): answer("192.0.2.9")})
    assert more.memo == s.memo
    assert not attrs.evolve(s, helo="bad.example").memo


def test_a_new_sender_is_judged_anew() -> None:
    s = session().with_dns({q("gone.example", t): SERVFAIL for t in ("MX", "A", "AAAA")})
    assert POLICY.evaluate(s, rcpt("r@example.com")).action is Action.ACCEPT
    v = POLICY.evaluate(s, rcpt("r@example.com", sender="a@gone.example"))
    assert v.rule == "security.sender_policy.reject_unknown_sender_domain"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@known.example", "b@known.example", "", "x@gone.example"]),
            st.sampled_from(["r@example.com", "r@elsewhere.example", "postmaster"]),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_memoised_verdicts_equal_fresh_ones(steps: list[tuple[str, str]]) -> None:
    s = session()
    for sender, recipient in steps:
        env = rcpt(recipient, sender)
        assert POLICY.evaluate(s, env) == POLICY.evaluate(attrs.evolve(s), env)
