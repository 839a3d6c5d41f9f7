"""Observe mode, reply texts per check and the keyed limits, in the core, the
dialogue (through replay) and the stores (a real redis-server)."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from helpers_core import account, judge, make_policy, rcpt, session

from mailpolicy import Envelope, Session, compile_policy, evaluate
from mailpolicy.adapters.diff import replay_case
from mailpolicy.adapters.state import RedisStore
from mailpolicy.config import PolicyError, settings_from_mapping
from mailpolicy.model import Action, Counters, Stage

if TYPE_CHECKING:
    from conftest import RedisServer

SPAMMERS = {"name": "spammers", "list": "black", "sender": ["spam.example"]}


# ---------------------------------------------------------------------------
# Observe mode in the engine


def test_an_observed_entry_is_recorded_and_the_request_goes_on() -> None:
    policy = make_policy({"security": {"lists": [{**SPAMMERS, "observe": True}]}})
    verdict = judge(policy, rcpt("r@example.com", sender="x@spam.example"))
    assert verdict.action is Action.ACCEPT
    (seen,) = verdict.observed
    assert seen.action is Action.REJECT
    assert seen.rule == "security.lists.spammers"
    assert str(seen.reply) == ("554 5.7.1 <x@spam.example>: Sender address rejected: Access denied")
    assert [str(e) for e in seen.evidence] == ["sender=x@spam.example matched=spam.example"]
    assert "observed=[reject rule=security.lists.spammers" in verdict.explain()


def test_an_entry_not_observed_still_refuses_beside_an_observed_one() -> None:
    lists = [
        {**SPAMMERS, "observe": True},
        {"name": "junk", "list": "black", "recipient": ["r@example.com"]},
    ]
    verdict = judge(make_policy({"security": {"lists": lists}}), rcpt("r@example.com"))
    assert verdict.action is Action.REJECT
    assert verdict.rule == "security.lists.junk"
    assert verdict.observed == ()


def test_a_later_refusal_carries_what_was_observed_before_it() -> None:
    observed = {"name": "watch", "list": "black", "recipient": ["r@example.com"], "observe": True}
    policy = make_policy(
        {
            "security": {
                "lists": [observed],
                "sender_policy": {"reject_non_fqdn_sender": True},
            }
        }
    )
    verdict = judge(policy, rcpt("r@example.com", sender="x@localhost"))
    assert verdict.rule == "security.sender_policy.reject_non_fqdn_sender"
    assert [o.rule for o in verdict.observed] == ["security.lists.watch"]


def test_general_observe_never_covers_relay_control() -> None:
    policy = make_policy({"general": {"observe": True}})
    verdict = judge(policy, rcpt("someone@elsewhere.example"))
    assert verdict.action is Action.REJECT
    assert verdict.rule == "relay.reject_unauth_destination"
    assert "relay.reject_unauth_destination" not in policy.observed


def test_general_observe_covers_the_sections_but_not_the_protocol() -> None:
    policy = make_policy(
        {
            "general": {"observe": True},
            "security": {
                "lists": [SPAMMERS],
                "sender_policy": {"reject_non_fqdn_sender": True},
                "advanced": {"reject_unauth_pipelining": True},
            },
        }
    )
    assert "security.lists.spammers" in policy.observed
    assert "security.sender_policy.reject_non_fqdn_sender" in policy.observed
    assert "security.advanced.reject_unauth_pipelining" not in policy.observed
    assert "security.advanced.disable_vrfy" not in policy.observed
    assert "general.max_recipients" not in policy.observed


def test_a_section_switch_observes_only_its_checks() -> None:
    policy = make_policy(
        {
            "security": {
                "advanced": {"reject_non_fqdn_helo": True, "observe": True},
                "sender_policy": {"reject_non_fqdn_sender": True},
            }
        }
    )
    verdict = judge(policy, rcpt("r@example.com", sender="x@localhost"), session(helo="box"))
    assert verdict.rule == "security.sender_policy.reject_non_fqdn_sender"
    assert [o.rule for o in verdict.observed] == ["security.advanced.reject_non_fqdn_helo"]


# ---------------------------------------------------------------------------
# Reply texts per check


def test_a_text_override_keeps_the_prefix_and_the_codes() -> None:
    policy = make_policy(
        {
            "security": {
                "sender_policy": {
                    "reject_non_fqdn_sender": True,
                    "text": {"reject_non_fqdn_sender": "write your whole address"},
                }
            }
        }
    )
    verdict = judge(policy, rcpt("r@example.com", sender="x@localhost"))
    assert str(verdict.reply) == (
        "504 5.5.2 <x@localhost>: Sender address rejected: write your whole address"
    )


def test_a_text_override_replaces_a_text_without_a_prefix() -> None:
    policy = make_policy({"relay": {"text": {"reject_unauth_destination": "not here"}}})
    verdict = judge(policy, rcpt("someone@elsewhere.example"))
    assert str(verdict.reply) == "554 5.7.1 <someone@elsewhere.example>: not here"
    policy = make_policy({"general": {"max_recipients": 1, "text": {"max_recipients": "one only"}}})
    verdict = judge(policy, rcpt("r@example.com", recipients=["q@example.com"]))
    assert str(verdict.reply) == "452 4.5.3 one only"


@pytest.mark.parametrize(
    ("mapping", "key", "reason"),
    [
        (
            {"relay": {"text": {"trusted_networks": "x"}}},
            "relay.text.trusted_networks",
            "not a check",
        ),
        (
            {"security": {"advanced": {"text": {"dnsbl": "a\nb"}}}},
            "security.advanced.text.dnsbl",
            "printable ASCII on one line",
        ),
        (
            {"general": {"text": {"max_hops": "x" * 201}}},
            "general.text.max_hops",
            "at most 200 characters",
        ),
    ],
)
def test_a_bad_text_override_is_refused_with_its_key(
    mapping: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(PolicyError, match=reason) as caught:
        settings_from_mapping(mapping, source="<test>")
    assert caught.value.key == key


# ---------------------------------------------------------------------------
# Keyed limits in the engine


def _limits(**values: int) -> dict[str, Any]:
    return {"security": {"connection_policy": values}}


def test_the_per_user_message_limit_defers_past_the_limit_and_names_the_login() -> None:
    policy = make_policy(_limits(max_message_rate_per_user=2))
    mail = Envelope(Stage.MAIL, sender="alice@example.com")
    ip = session().client_ip
    within = Session(ip, auth_user="alice", counters=Counters(user_message_rate=2))
    assert evaluate(policy, within, mail).action is Action.ACCEPT
    over = Session(ip, auth_user="alice", counters=Counters(user_message_rate=3))
    verdict = evaluate(policy, over, mail)
    assert verdict.action is Action.DEFER
    assert str(verdict.reply) == "450 4.7.1 Error: too much mail from user alice"
    assert verdict.rule == "security.connection_policy.max_message_rate_per_user"
    assert [str(e) for e in verdict.evidence] == ["user_message_rate=3 matched=limit 2 for alice"]


def test_the_keyed_limits_are_counted_only_when_on() -> None:
    policy = make_policy(
        _limits(
            max_message_rate_per_user=1,
            max_message_rate_per_sender_domain=1,
            max_message_rate_global=1,
            max_recipient_rate_per_user=1,
            max_recipient_rate_per_recipient_domain=1,
            max_recipient_rate_global=1,
        )
    )
    assert policy.counters(Stage.MAIL) >= {
        "user_message_rate",
        "sender_domain_message_rate",
        "global_message_rate",
    }
    assert policy.counters(Stage.RCPT) >= {
        "user_recipient_rate",
        "recipient_domain_recipient_rate",
        "global_recipient_rate",
    }
    assert not (make_policy().counters(Stage.MAIL) & {"user_message_rate"})


# ---------------------------------------------------------------------------
# Keyed limits through the dialogue (replay: the same host loop as serve)


def _case(session_steps: list[Any]) -> dict[str, Any]:
    return {"client": {"ip": "203.0.113.9", "helo": "c.example.net"}, "session": session_steps}


def test_the_recipient_domain_and_global_limits_through_the_dialogue() -> None:
    settings = settings_from_mapping(
        {
            "general": {
                "hostname": "mx.example.com",
                "local_domains": ["example.com", "example.org"],
            },
            **_limits(max_recipient_rate_per_recipient_domain=2, max_message_rate_global=2),
        },
        source="<test>",
    )
    policy = compile_policy(settings)
    steps: list[Any] = [
        "EHLO c.example.net",
        "MAIL FROM:<a@example.net>",
        "RCPT TO:<one@example.com>",
        "RCPT TO:<two@example.com>",
        "RCPT TO:<three@example.com>",
        "RCPT TO:<one@example.org>",
        "RSET",
        "MAIL FROM:<b@example.net>",
        "RSET",
        "MAIL FROM:<c@example.net>",
        "QUIT",
    ]
    replies = replay_case(_case(steps), policy)
    got = [(r.cmd, r.code, r.text) for r in replies if r.cmd.startswith(("RCPT", "MAIL"))]
    assert got == [
        ("MAIL FROM:<a@example.net>", 250, "Ok"),
        ("RCPT TO:<one@example.com>", 250, "Ok"),
        ("RCPT TO:<two@example.com>", 250, "Ok"),
        ("RCPT TO:<three@example.com>", 450, "Error: too many recipients for domain example.com"),
        ("RCPT TO:<one@example.org>", 250, "Ok"),
        ("MAIL FROM:<b@example.net>", 250, "Ok"),
        ("MAIL FROM:<c@example.net>", 450, "Error: too much mail, try again later"),
    ]
    refused = [r for r in replies if r.code == 450]
    assert [r.rule for r in refused] == [
        "security.connection_policy.max_recipient_rate_per_recipient_domain",
        "security.connection_policy.max_message_rate_global",
    ]


def test_observed_refusals_show_in_replay_output() -> None:
    policy = make_policy({"security": {"lists": [{**SPAMMERS, "observe": True}]}})
    steps: list[Any] = [
        "EHLO c.example.net",
        "MAIL FROM:<x@spam.example>",
        "RCPT TO:<r@example.com>",
    ]
    replies = replay_case(_case(steps), policy)
    rcpt_reply = replies.to("RCPT")
    assert rcpt_reply.code == 250
    assert rcpt_reply.to_json()["observed"] == [
        "security.lists.spammers: 554 5.7.1 <x@spam.example>: "
        "Sender address rejected: Access denied"
    ]
    assert "(observed: security.lists.spammers: 554 5.7.1" in str(replies)


# ---------------------------------------------------------------------------
# The stores: keyed kinds, and never a key without an expiry


def test_redis_counts_keyed_kinds_with_an_expiry_in_the_same_transaction(
    redis_server: RedisServer,
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"

    async def test() -> None:
        store = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        try:
            assert await store.hit("user_message", "alice", 1_000_000.0, 60) == 1
            assert await store.hit("user_message", "alice", 1_000_001.0, 60) == 2
            assert await store.hit("user_message", "bob", 1_000_001.0, 60) == 1
            assert await store.hit("global_recipient", "*", 1_000_001.0, 60) == 1
            raw = await store.client.keys(prefix + "*")
            keys = sorted(k.decode() if isinstance(k, bytes) else k for k in raw)
            assert keys == [
                f"{prefix}rate:global_recipient:60:999960:*",
                f"{prefix}rate:user_message:60:999960:alice",
                f"{prefix}rate:user_message:60:999960:bob",
            ]
            ttls = [await store.client.ttl(key) for key in keys]
            assert [0 < t <= 120 for t in ttls] == [True, True, True]
        finally:
            await store.close()

    asyncio.run(test())


def test_accounts_helper_still_builds_a_policy() -> None:
    # the per-user limit with accounts defined: the row is on, nothing else changes
    policy = make_policy(_limits(max_recipient_rate_per_user=5), accounts=[account("alice")])
    assert "user_recipient_rate" in policy.counters(Stage.RCPT)
    verdict = judge(policy, rcpt("r@example.com"))
    assert verdict.action is Action.ACCEPT


def test_rates_to_count_keys_each_count_on_what_it_limits() -> None:
    from mailpolicy import RateCount, rates_to_count

    policy = make_policy(
        _limits(
            max_message_rate_per_client=5,
            max_message_rate_per_user=5,
            max_message_rate_per_sender_domain=5,
            max_message_rate_global=5,
        )
    )
    sess = session(auth_user="alice")
    assert rates_to_count(policy, Stage.MAIL, sess, "a@Mail.Example.") == [
        RateCount("message", str(sess.client_ip), "message_rate"),
        RateCount("user_message", "alice", "user_message_rate"),
        RateCount("sender_domain_message", "mail.example", "sender_domain_message_rate"),
        RateCount("global_message", "*", "global_message_rate"),
    ]
    # no login, the null sender: nothing to count them for
    assert [r.key for r in rates_to_count(policy, Stage.MAIL, session(), "")][1:3] == [None, None]
    assert rates_to_count(policy, Stage.RCPT, sess, "r@example.com") == []


def test_mailpolicy_version() -> None:
    import subprocess
    import sys

    import mailpolicy

    done = subprocess.run(
        [sys.executable, "-m", "mailpolicy", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == f"mailpolicy {mailpolicy.__version__}\n"
