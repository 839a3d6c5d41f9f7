"""Tests that kill the mutants the first mutation run of the core let live
(issue 17; docs/testing.md): list rules that combine a client host name with
another criterion, overlapping client networks, a temporary MX failure next
to an A record, malformed MX texts, relay unwrapping shapes and the
1,000-octet address limit of the fast path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from typing import Any

import pytest
from helpers_core import (
    OUTSIDER,
    OUTSIDER_HELO,
    SERVFAIL,
    Zone,
    account,
    answer,
    eod,
    judge,
    make_policy,
    q,
    rcpt,
    session,
    standard_zone,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpolicy import (
    Action,
    Counters,
    Envelope,
    MessageFacts,
    Policy,
    Stage,
    Verdict,
    evaluate,
)
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.routing import resolve_routes
from mailpolicy.addresses import Address, parse_address
from mailpolicy.evaluate import lookups
from mailpolicy.lookup import AccessTable, DomainTable, NetworkTable
from mailpolicy.model import DnsOutcome, DnsQuery, DnsResult, Evidence, Route, RType
from mailpolicy.routing import route
from mailpolicy.rules import Decision, NeedDns, Outcome
from mailpolicy.rules.context import Context, _parse
from mailpolicy.rules.limits import (
    MaxRecipientDomainRate,
    MaxSenderDomainRate,
    MaxUserMessageRate,
    MaxUserRecipientRate,
)
from mailpolicy.rules.recipient import AcceptBarePostmaster
from mailpolicy.rules.relay import PermitAuthenticated, PermitMynetworks, real_destination
from mailpolicy.settings import MIB, GeneralSettings, Settings

RELAY_DENIED = "relay.reject_unauth_destination"


def lists_policy(*rules: dict[str, Any], **extra: Any) -> Policy:
    return make_policy({"security": {"lists": list(rules), **extra}})


# ===========================================================================
# List rules that combine client_hostname with another criterion


SPAM_FROM_ORG = {
    "name": "combo",
    "list": "black",
    "sender": ["spam.example"],
    "client_hostname": ["example.org"],
}


class TestHostNameWithAnotherCriterion:
    def test_both_match_refuses(self) -> None:
        v = judge(lists_policy(SPAM_FROM_ORG), rcpt("r@example.com", sender="a@spam.example"))
        assert v.action is Action.REJECT, v.explain()
        assert v.rule == "security.lists.combo"
        assert v.reply is not None
        assert v.reply.text == (
            f"<{OUTSIDER_HELO}[{OUTSIDER}]>: Client host rejected: Access denied"
        )
        assert v.evidence[0].kind == "client_hostname"
        assert v.evidence[0].value == OUTSIDER_HELO
        assert v.evidence[0].matched == "example.org"

    def test_other_sender_accepted_without_asking_for_the_name(self) -> None:
        policy = lists_policy(SPAM_FROM_ORG)
        env = rcpt("r@example.com", sender="a@known.example")
        # the sender already fails the rule: its host name is not worth a lookup
        assert lookups(policy, session(), env) == frozenset()
        assert judge(policy, env).action is Action.ACCEPT

    def test_other_host_name_accepted(self) -> None:
        # 198.51.100.7 has no PTR in the standard zone: "unknown"
        v = judge(
            lists_policy(SPAM_FROM_ORG),
            rcpt("r@example.com", sender="a@spam.example"),
            session("198.51.100.7"),
        )
        assert v.action is Action.ACCEPT, v.explain()

    def test_sender_match_asks_for_the_host_name(self) -> None:
        policy = lists_policy(SPAM_FROM_ORG)
        asked = lookups(policy, session(), rcpt("r@example.com", sender="a@spam.example"))
        assert {(q.name, q.rtype.value) for q in asked} == {(OUTSIDER, "PTR")}

    def test_missing_name_names_the_rule_that_waits(self) -> None:
        # Two host-name rules; only the second one's sender matches: a
        # missing answer names that one, not the first of the list.
        other = {**SPAM_FROM_ORG, "name": "other", "sender": ["other.example"]}
        policy = lists_policy(other, SPAM_FROM_ORG)
        v = evaluate(policy, session(), rcpt("r@example.com", sender="a@spam.example"))
        assert v.action is Action.DEFER
        assert v.rule == "security.lists.combo"
        v = evaluate(policy, session(), rcpt("r@example.com", sender="a@other.example"))
        assert v.rule == "security.lists.other"

    def test_missing_name_skips_rules_whose_other_criterion_has_no_hit(self) -> None:
        # The first host-name rule's other criterion (recipient) matches
        # nothing at all: the rule that waits is the second one.
        by_rcpt = {**SPAM_FROM_ORG, "name": "ceo", "sender": [], "recipient": ["ceo@example.com"]}
        policy = lists_policy(by_rcpt, SPAM_FROM_ORG)
        v = evaluate(policy, session(), rcpt("r@example.com", sender="a@spam.example"))
        assert (v.action, v.rule) == (Action.DEFER, "security.lists.combo")

    def test_a_hit_on_a_rule_without_host_name_asks_no_dns(self) -> None:
        # known.example hits a rule that names no host: the host-name rule
        # cannot match, so its name is not looked up.
        plain = {
            "name": "plain",
            "list": "black",
            "sender": ["known.example"],
            "recipient": ["ceo@example.com"],
        }
        policy = lists_policy(plain, SPAM_FROM_ORG)
        env = rcpt("r@example.com", sender="a@known.example")
        assert lookups(policy, session(), env) == frozenset()
        assert judge(policy, env).action is Action.ACCEPT

    def test_a_rule_with_a_criterion_without_hits_asks_no_dns(self) -> None:
        # sender hits, recipient hits nothing: the rule cannot match
        three = {**SPAM_FROM_ORG, "name": "three", "recipient": ["ceo@example.com"]}
        policy = lists_policy(three)
        env = rcpt("r@example.com", sender="a@spam.example")
        assert lookups(policy, session(), env) == frozenset()
        assert judge(policy, env).action is Action.ACCEPT
        assert judge(policy, rcpt("ceo@example.com", sender="a@spam.example")).rule == (
            "security.lists.three"
        )

    def test_an_unverified_client_matches_no_host_name_entry(self) -> None:
        # no verified name is "unknown", which is no key to look up
        policy = lists_policy({"name": "unk", "list": "black", "client_hostname": ["unknown"]})
        v = judge(policy, rcpt("r@example.com"), session("198.51.100.7"))
        assert v.action is Action.ACCEPT, v.explain()

    def test_white_rule_with_host_name_and_sender(self) -> None:
        white = {**SPAM_FROM_ORG, "name": "friends", "list": "white"}
        black = {"name": "all", "list": "black", "sender": ["spam.example"]}
        policy = lists_policy(white, black)
        v = judge(policy, rcpt("r@example.com", sender="a@spam.example"))
        assert (v.action, v.rule) == (Action.ACCEPT, "security.lists.friends")
        v = judge(policy, rcpt("r@example.com", sender="a@spam.example"), session("198.51.100.7"))
        assert v.rule == "security.lists.all"

    def test_host_name_alone_and_combined(self) -> None:
        # A rule on the name alone makes the name needed whatever the sender.
        by_name = {"name": "byname", "list": "black", "client_hostname": ["nowhere.example"]}
        policy = lists_policy(by_name, SPAM_FROM_ORG)
        asked = lookups(policy, session(), rcpt("r@example.com", sender="a@known.example"))
        assert {(q.name, q.rtype.value) for q in asked} == {(OUTSIDER, "PTR")}
        v = judge(policy, rcpt("r@example.com", sender="a@spam.example"))
        assert v.rule == "security.lists.combo"


# ===========================================================================
# Several list rules whose networks contain the client


class TestOverlappingNetworks:
    def test_first_rule_in_file_order_wins(self) -> None:
        wide = {"name": "wide", "list": "black", "client": ["203.0.113.0/24"]}
        narrow = {"name": "narrow", "list": "black", "client": ["203.0.113.5/32"], "text": "n"}
        v = judge(lists_policy(wide, narrow), rcpt("r@example.com"))
        assert v.rule == "security.lists.wide"
        assert (v.evidence[0].kind, v.evidence[0].value) == ("client", OUTSIDER)
        assert v.evidence[0].matched == "203.0.113.0/24"
        v = judge(lists_policy(narrow, wide), rcpt("r@example.com"))
        assert v.rule == "security.lists.narrow"
        assert v.evidence[0].matched == "203.0.113.5/32"

    def test_winning_rule_shows_its_longest_prefix(self) -> None:
        a = {"name": "a", "list": "black", "client": ["203.0.0.0/16", "203.0.113.0/28"]}
        b = {"name": "b", "list": "black", "client": ["203.0.113.5/32"]}
        v = judge(lists_policy(a, b), rcpt("r@example.com"))
        assert v.rule == "security.lists.a"
        assert v.evidence[0].matched == "203.0.113.0/28"

    def test_three_rules_the_first_containing_wins(self) -> None:
        miss = {"name": "miss", "list": "black", "client": ["198.51.100.0/24"]}
        one = {"name": "one", "list": "black", "client": ["203.0.113.4/30"]}
        two = {"name": "two", "list": "black", "client": ["0.0.0.0/0"]}
        v = judge(lists_policy(miss, two, one), rcpt("r@example.com"))
        assert v.rule == "security.lists.two"
        assert v.evidence[0].matched == "0.0.0.0/0"


@st.composite
def overlapping_lists(draw: st.DrawFn) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """Black-list rules, several of whose networks contain the client: the
    rules, the rule that must win (the first in file order that contains it)
    and the network it must show (its longest prefix containing the client)."""
    client = ipaddress.ip_address(OUTSIDER)
    rules: list[dict[str, Any]] = []
    winner: tuple[str, str] | None = None
    for n in range(draw(st.integers(1, 5))):
        networks: list[str] = []
        for _ in range(draw(st.integers(1, 3))):
            length = draw(st.integers(0, 32))
            net = ipaddress.ip_network(f"{client}/{length}", strict=False)
            if draw(st.booleans()):
                # a neighbour of that network: never contains the client
                if length == 0:
                    continue
                neighbour = int(net.network_address) ^ (1 << (32 - length))
                net = ipaddress.ip_network(f"{ipaddress.ip_address(neighbour)}/{length}")
            networks.append(str(net))
        if not networks:
            continue
        name = f"r{n}"
        rules.append({"name": name, "list": "black", "client": networks})
        containing = [
            ipaddress.ip_network(x) for x in networks if client in ipaddress.ip_network(x)
        ]
        if winner is None and containing:
            winner = (name, str(max(containing, key=lambda x: x.prefixlen)))
    if not rules:
        rules.append({"name": "r9", "list": "black", "client": ["198.51.100.0/24"]})
    return rules, *(winner if winner is not None else (None, None))


@settings(max_examples=60, deadline=None)
@given(overlapping_lists())
def test_overlapping_networks_first_rule_wins(
    drawn: tuple[list[dict[str, Any]], str | None, str | None],
) -> None:
    rules, winner, network = drawn
    v = judge(lists_policy(*rules), rcpt("r@example.com"))
    if winner is None:
        assert v.action is Action.ACCEPT, v.explain()
        return
    assert v.rule == f"security.lists.{winner}", v.explain()
    assert v.evidence[0].matched == network


# ===========================================================================
# Relay unwrapping


def _relay_policy() -> Policy:
    return make_policy(
        {
            "general": {"local_domains": ["example.com", "example.net"]},
            "relay": {"inbound_domains": ["partner.example"]},
        }
    )


class TestRelayUnwrapping:
    @pytest.mark.timeout(10)
    @pytest.mark.parametrize(
        ("recipient", "domain", "routed"),
        [
            ('"a@b@elsewhere.example"@example.com', "elsewhere.example", True),
            ('"a@elsewhere.example"@example.com', "elsewhere.example", False),
            ('"a@b@example.net"@example.com', "b", False),
            ('"a@example.net@example.net"@example.com', "example.net", False),
            ("x%Example.COM@example.com", "example.com", False),
            ("x%Example.COM.@example.com", "example.com", False),
            ("x%example.net%elsewhere.example@example.com", "elsewhere.example", True),
            ("Example.NET!x@example.com", "example.net", False),
            ("elsewhere.example!x@Example.COM", "elsewhere.example", False),
            ("a!b!x@example.com", "a", True),
            ('"x%example.net@Example.NET."@example.com', "example.net", False),
            ("u@partner.example", "partner.example", False),
            ("u%v@partner.example", "partner.example", True),
            ("u", "mx.example.com", False),
        ],
    )
    def test_real_destination(self, recipient: str, domain: str, routed: bool) -> None:
        policy = _relay_policy()
        address = parse_address(recipient)
        assert real_destination(address, policy.shared) == (domain, routed)

    @pytest.mark.timeout(10)
    @pytest.mark.parametrize(
        "recipient",
        [
            "x%Example.COM@example.com",
            "x%EXAMPLE.NET.@example.com",
            '"x@Example.NET"@example.com',
            "Example.NET!x@example.com",
            '"a@example.net@example.com"@example.com',
        ],
    )
    def test_unwrapped_to_our_domains_is_accepted(self, recipient: str) -> None:
        v = judge(_relay_policy(), rcpt(recipient))
        assert v.action is Action.ACCEPT, v.explain()

    @pytest.mark.timeout(10)
    @pytest.mark.parametrize(
        "recipient",
        [
            '"a@b@elsewhere.example"@example.com',
            '"a@b@example.net"@example.com',
            "a!b!x@example.com",
            "x%y%example.com@example.com",
        ],
    )
    def test_left_routed_or_foreign_is_refused(self, recipient: str) -> None:
        v = judge(_relay_policy(), rcpt(recipient))
        assert v.rule == RELAY_DENIED, v.explain()


@pytest.mark.parametrize(
    ("recipient", "why"),
    [
        ("a b@elsewhere.example", "unparsable address"),
        ("u%x@elsewhere.example", "destination elsewhere.example (routed)"),
        ("u@elsewhere.example", "destination elsewhere.example"),
    ],
)
def test_relay_denied_evidence(recipient: str, why: str) -> None:
    v = judge(make_policy(), rcpt(recipient))
    assert v.rule == RELAY_DENIED
    assert v.reply is not None and v.reply.text == f"<{recipient}>: Relay access denied"
    assert [(e.kind, e.value, e.matched) for e in v.evidence] == [("recipient", recipient, why)]


def test_relay_permits_name_themselves_and_their_evidence() -> None:
    # A PERMIT only ends the relay chain, so the verdict never shows it:
    # the rules' own decisions are checked here.
    policy = make_policy({"relay": {"trusted_networks": ["203.0.113.0/24"]}})
    env = rcpt("u@elsewhere.example")
    ctx = Context(policy.shared, session(auth_user="alice"), env)
    assert PermitAuthenticated("auth").check(ctx) == Decision(
        Outcome.PERMIT, "auth", evidence=(Evidence("auth_user", "alice"),)
    )
    assert PermitMynetworks("nets").check(ctx) == Decision(
        Outcome.PERMIT, "nets", evidence=(Evidence("client", OUTSIDER),)
    )
    outside = Context(policy.shared, session("198.51.100.7"), env)
    assert PermitAuthenticated("auth").check(outside) is None
    assert PermitMynetworks("nets").check(outside) is None


OURS = ("example.com", "example.net", "Example.NET", "example.com.")
FOREIGN = ("elsewhere.example", "b", "partner.example", "x.org")


@st.composite
def nested_quoted(draw: st.DrawFn) -> tuple[str, str, bool]:
    """``"u@d1@d2...@dn"@example.com``, some of whose domains are ours, and
    where the mail really goes: peel ``@dk`` from the right while the domain
    is ours; it is still routed if an ``@`` is left."""
    user = draw(st.sampled_from(("u", "a.b", "x+y")))
    hops = draw(st.lists(st.sampled_from(OURS + FOREIGN), min_size=1, max_size=6))
    address = '"' + "@".join((user, *hops)) + '"@example.com'
    parts = [user, *hops]
    domain = "example.com"
    while domain in {"example.com", "example.net"} and len(parts) > 1:
        domain = parts.pop().lower().rstrip(".")
    return address, domain, len(parts) > 1


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None)
@given(nested_quoted())
def test_nested_quoted_local_parts(drawn: tuple[str, str, bool]) -> None:
    address, domain, routed = drawn
    policy = _relay_policy()
    assert real_destination(parse_address(address), policy.shared) == (domain, routed)


# ===========================================================================
# The 1,000-octet limit of an address in the fast path


@pytest.mark.parametrize(("length", "parses"), [(999, True), (1000, True), (1001, False)])
def test_fast_path_address_limit(length: int, parses: bool) -> None:
    text = "a" * (length - len("@example.com")) + "@example.com"
    assert len(text) == length
    assert (_parse(text) is not None) is parses


def test_an_over_long_recipient_is_never_accepted() -> None:
    text = "a" * (1001 - len("@example.com")) + "@example.com"
    v = judge(make_policy(), rcpt(text))
    assert not v.accepted, v.explain()
    ok = "a" * (1000 - len("@example.com")) + "@example.com"
    assert judge(make_policy(), rcpt(ok)).action is Action.ACCEPT


# ===========================================================================
# Routing: a temporary MX failure next to an A record; malformed MX texts


HOSTNAME = "mx.example.com"


def _route(recipient: str, zone: dict[str, Any]) -> Route:
    settings_ = Settings(general=GeneralSettings(hostname=HOSTNAME, local_domains=("example.com",)))
    resolver = StaticZone.from_mapping(zone)
    found = asyncio.run(
        resolve_routes(settings_, "s@example.com", [recipient], resolver, random.Random(0))
    )
    (only,) = found
    return only


@pytest.mark.parametrize("failure", ["servfail", "timeout"])
def test_temporary_mx_failure_with_an_a_record_is_451(failure: str) -> None:
    zone = {"tempmx.example": {failure: ["MX"], "A": ["192.0.2.50"]}}
    r = _route("u@tempmx.example", zone)
    assert r.error is not None, r
    assert (r.error.code, r.error.enhanced) == (451, "4.4.3")
    assert r.next_hops == ()


def _route_pure(recipient: str, answers: dict[DnsQuery, DnsResult]) -> Route:
    # pure route(): the zone file refuses such texts, live DNS can send them
    settings_ = Settings(general=GeneralSettings(hostname=HOSTNAME, local_domains=("example.com",)))
    (only,) = route(settings_, "", [recipient], answers, rng=random.Random(0))
    return only


def test_malformed_mx_texts_are_ignored() -> None:
    answers = {
        DnsQuery("odd.example", RType.MX): DnsResult.answer(
            "10", "ten mx1.odd.example", "10 a b", "20 mx2.odd.example"
        ),
    }
    r = _route_pure("u@odd.example", answers)
    assert r.error is None, r
    assert [h.host for h in r.next_hops] == ["mx2.odd.example"]
    assert "ignored 10, ten mx1.odd.example, 10 a b" in r.reason


def test_only_malformed_mx_texts_is_temporary() -> None:
    answers = {DnsQuery("odd.example", RType.MX): DnsResult.answer("10", "ten mx1.odd.example")}
    r = _route_pure("u@odd.example", answers)
    assert r.error is not None, r
    assert (r.error.code, r.error.enhanced) == (451, "4.4.3")
    assert "no usable MX host" in r.error.text


def test_mx_host_loses_only_its_trailing_dot() -> None:
    answers = {DnsQuery("odd.example", RType.MX): DnsResult.answer("20 MX2.Odd.Example.")}
    r = _route_pure("u@odd.example", answers)
    assert [h.host for h in r.next_hops] == ["mx2.odd.example"]


def test_no_usable_mx_names_the_records() -> None:
    answers = {DnsQuery("odd.example", RType.MX): DnsResult.answer("10", "ten mx1.odd.example")}
    r = _route_pure("u@odd.example", answers)
    assert r.error is not None
    assert r.error.text == "no usable MX host for odd.example: 10, ten mx1.odd.example"


def test_empty_domain_is_a_bounce_naming_the_recipient() -> None:
    r = _route_pure("u@", {})
    assert r.recipient == "u@"
    assert r.error is not None
    assert (r.error.code, r.error.enhanced, r.error.text) == (550, "5.1.2", "empty domain")


def test_implicit_mx_to_our_own_hostname_loops() -> None:
    answers = {
        DnsQuery(HOSTNAME, RType.MX): DnsResult(DnsOutcome.NODATA),
        DnsQuery(HOSTNAME, RType.A): DnsResult.answer("192.0.2.1"),
        DnsQuery(HOSTNAME, RType.AAAA): DnsResult(DnsOutcome.NODATA),
    }
    r = _route_pure(f"u@{HOSTNAME}", answers)
    assert r.error is not None
    assert r.error.text == f"mail for {HOSTNAME} loops back to myself"


def test_missing_answers_name_only_this_recipients_questions() -> None:
    settings_ = Settings(general=GeneralSettings(hostname=HOSTNAME, local_domains=("example.com",)))
    first, second = route(settings_, "", ["a@x.example", "b@y.example"], {}, rng=random.Random(0))
    assert first.error is not None and second.error is not None
    assert first.error.text == "DNS answer not available for x.example/MX"
    assert second.error.text == "DNS answer not available for y.example/MX"


# ===========================================================================
# Small contracts the first run found untested


def test_not_a_policy_message() -> None:
    with pytest.raises(TypeError, match=r"^expected a compiled Policy, got str$"):
        evaluate("policy", session(), rcpt("r@example.com"))  # type: ignore[arg-type]
    settings_ = Settings(general=GeneralSettings(hostname=HOSTNAME, local_domains=("example.com",)))
    with pytest.raises(TypeError, match=r"got Settings \(compile it: mailpolicy.compile_policy"):
        evaluate(settings_, session(), rcpt("r@example.com"))  # type: ignore[arg-type]


def test_tables_are_true_when_not_empty() -> None:
    assert DomainTable([("a.example", 1)])
    assert not DomainTable()
    assert NetworkTable([(ipaddress.ip_network("192.0.2.0/24"), 1)])
    assert NetworkTable([(ipaddress.ip_network("2001:db8::/32"), 1)])
    assert not NetworkTable()


def _ctx(policy: Policy, env: Envelope, **counts: int) -> Context:
    return Context(policy.shared, session(auth_user=None, counters=Counters(**counts)), env)


def test_keyed_limits_name_their_key_and_count() -> None:
    policy = make_policy()
    env = rcpt("Bob@Example.COM.", sender="a@Spam.Example.")
    d = MaxSenderDomainRate("s", 1).check(_ctx(policy, env, sender_domain_message_rate=2))
    assert d is not None and d.reply is not None
    assert d.reply.text == "Error: too much mail from domain spam.example"
    assert d.evidence == (
        Evidence("sender_domain_message_rate", "2", matched="limit 1 for spam.example"),
    )
    d = MaxRecipientDomainRate("r", 1).check(_ctx(policy, env, recipient_domain_recipient_rate=2))
    assert d is not None and d.reply is not None
    assert d.reply.text == "Error: too many recipients for domain example.com"
    assert (
        MaxSenderDomainRate("s", 2).check(_ctx(policy, env, sender_domain_message_rate=2)) is None
    )


def test_user_limits_name_the_login() -> None:
    policy = make_policy()
    env = rcpt("r@example.com")
    ctx = Context(policy.shared, session(auth_user="alice"), env)
    assert MaxUserRecipientRate("u", 1).key(ctx) == "alice"
    assert MaxUserMessageRate("u", 1).key(ctx) == "alice"
    anonymous = Context(policy.shared, session(), env)
    assert MaxUserRecipientRate("u", 1).key(anonymous) == ""
    assert MaxUserMessageRate("u", 1).key(anonymous) == ""


def test_non_fqdn_recipient_shows_the_address() -> None:
    policy = make_policy(
        {
            "relay": {"inbound_domains": ["partner"]},
            "security": {"advanced": {"reject_non_fqdn_recipient": True}},
        }
    )
    v = judge(policy, rcpt("u@Partner."))
    assert v.rule == "security.advanced.reject_non_fqdn_recipient", v.explain()
    assert [(e.kind, e.value) for e in v.evidence] == [("recipient", "u@Partner.")]


# ===========================================================================
# Evidence: what a refusal shows besides its reply (kind and value)


def _evidence(v: Verdict) -> list[tuple[str, str]]:
    return [(e.kind, e.value) for e in v.evidence]


def test_evidence_of_unauth_pipelining() -> None:
    policy = make_policy({"security": {"advanced": {"reject_unauth_pipelining": True}}})
    env = Envelope(Stage.DATA, sender="a@known.example", recipients=("r@example.com",))
    v = evaluate(policy, session(improper_pipelining=True), env)
    assert v.rule == "security.advanced.reject_unauth_pipelining", v.explain()
    assert _evidence(v) == [("pipelining", "improper")]


def test_evidence_of_invalid_and_unknown_helo() -> None:
    policy = make_policy({"security": {"advanced": {"reject_invalid_helo": True}}})
    v = judge(policy, rcpt("r@example.com"), session(helo="bad_helo!"))
    assert v.rule == "security.advanced.reject_invalid_helo", v.explain()
    assert _evidence(v) == [("helo", "bad_helo!")]
    policy = make_policy({"security": {"advanced": {"reject_unknown_helo": True}}})
    v = judge(policy, rcpt("r@example.com"), session(helo="nowhere.example"))
    assert v.rule == "security.advanced.reject_unknown_helo", v.explain()
    assert _evidence(v) == [("helo", "nowhere.example")]


def test_evidence_of_message_size() -> None:
    policy = make_policy({"general": {"max_message_size_mb": 1}})
    env = Envelope(
        Stage.END_OF_DATA,
        sender="a@known.example",
        recipients=("r@example.com",),
        message=MessageFacts(size=MIB + 1),
    )
    v = evaluate(policy, session(), env)
    assert v.rule == "general.max_message_size_mb", v.explain()
    assert [e.kind for e in v.evidence] == ["size"]


def test_evidence_of_a_listed_client() -> None:
    client, query = "198.51.100.66", "66.100.51.198.bl.example"
    policy = make_policy({"security": {"advanced": {"dnsbl": ["bl.example"]}}})
    zone = Zone({q(query, "A"): answer("127.0.0.2")})
    v = judge(policy, rcpt("r@example.com"), session(client), zone)
    assert v.rule == "security.advanced.dnsbl.bl.example", v.explain()
    assert _evidence(v) == [("client", client)]


def test_need_dns_message_lists_the_questions() -> None:
    need = NeedDns((DnsQuery("a.example", RType.MX), DnsQuery("b.example", RType.A)))
    assert str(need) == "a.example/MX, b.example/A"


def test_evidence_of_content_checks() -> None:
    policy = make_policy(
        {"general": {"max_attachment_size_mb": 1, "disable_auto_forwarding": True}}
    )
    v = evaluate(policy, session(), eod(MessageFacts(size=100, largest_attachment=MIB + 1)))
    assert [(e.kind, e.value, e.matched) for e in v.evidence] == [
        ("attachment", str(MIB + 1), "limit 1048576")
    ]
    fwd = MessageFacts(size=100, auto_forwarded=True)
    v = evaluate(policy, session(), eod(fwd, recipients=["b@elsewhere.example"]))
    assert [(e.kind, e.value, e.matched) for e in v.evidence] == [
        ("recipient", "b@elsewhere.example", "auto-forwarded")
    ]


def test_evidence_of_an_unknown_client() -> None:
    policy = make_policy(
        {"security": {"connection_policy": {"reject_unknown_client_hostname": True}}}
    )
    v = judge(policy, rcpt("r@example.com"), session("198.51.100.7"))
    assert v.rule == "security.connection_policy.reject_unknown_client_hostname", v.explain()
    assert _evidence(v) == [("client", "198.51.100.7")]


def test_a_white_match_keeps_what_was_observed_before_it() -> None:
    policy = make_policy(
        {
            "general": {"observe": True},
            "security": {
                "connection_policy": {"max_recipient_rate_global": 1},
                "lists": [{"name": "vip", "list": "white", "sender": ["vip.example"]}],
            },
        }
    )
    busy = session(counters=Counters(global_recipient_rate=5))
    v = judge(policy, rcpt("r@example.com", sender="a@vip.example"), busy)
    assert (v.action, v.rule) == (Action.ACCEPT, "security.lists.vip")
    assert [o.rule for o in v.observed] == ["security.connection_policy.max_recipient_rate_global"]


def test_access_table_drops_the_domains_trailing_dot() -> None:
    table = AccessTable([("spam.example", 1)])
    assert table.matches(Address("a", "Sub.Spam.Example.")) == [("spam.example", 1)]


# ===========================================================================
# Third batch: observe mode beside defer_if_permit, sender ownership evidence


TEMP_ZONE = (
    standard_zone()
    .set("temp.example", "MX", SERVFAIL)
    .set("temp.example", "A", SERVFAIL)
    .set("temp.example", "AAAA", SERVFAIL)
)
UNKNOWN_SENDER = "security.sender_policy.reject_unknown_sender_domain"


def test_observed_defer_if_permit_keeps_its_action() -> None:
    policy = make_policy(
        {
            "general": {"observe": True},
            "security": {"sender_policy": {"reject_unknown_sender_domain": True}},
        }
    )
    v = judge(policy, rcpt("r@example.com", sender="a@temp.example"), zone=TEMP_ZONE)
    assert v.action is Action.ACCEPT
    assert [(o.action, o.rule) for o in v.observed] == [(Action.DEFER_IF_PERMIT, UNKNOWN_SENDER)]


def test_defer_if_permit_keeps_observed_rules_and_its_own_text() -> None:
    spam = {"name": "spam", "list": "black", "sender": ["temp.example"], "observe": True}
    policy = make_policy(
        {
            "security": {
                "sender_policy": {
                    "reject_unknown_sender_domain": True,
                    "text": {"reject_unknown_sender_domain": "try later"},
                },
                "lists": [spam],
            },
        }
    )
    v = judge(policy, rcpt("r@example.com", sender="a@temp.example"), zone=TEMP_ZONE)
    assert (v.action, v.rule) == (Action.DEFER_IF_PERMIT, UNKNOWN_SENDER), v.explain()
    assert v.reply is not None and "try later" in v.reply.text
    assert [o.rule for o in v.observed] == ["security.lists.spam"]


OWNERS = [
    account("alice", "alice@example.com"),
    account("bob", "bob@example.com", "alice@example.com"),
]


def test_evidence_of_sender_ownership_refusals() -> None:
    policy = make_policy(
        {
            "general": {"smtp_auth": {"sender_must_match_login": True}},
            "security": {"sender_policy": {"reject_unauthenticated_local_sender": True}},
        },
        accounts=OWNERS,
    )
    v = judge(policy, rcpt("r@example.com", sender="Alice@example.com"))
    assert [(e.kind, e.value, e.matched) for e in v.evidence] == [
        ("sender", "Alice@example.com", "alice,bob")
    ]
    v = judge(policy, rcpt("r@example.com", sender="alice@example.com"), session(auth_user="carol"))
    assert [(e.kind, e.value, e.matched) for e in v.evidence] == [
        ("sender", "alice@example.com", "alice,bob")
    ]


def test_network_table_with_only_v6_answers_v4() -> None:
    table = NetworkTable([(ipaddress.ip_network("2001:db8::/32"), 1)])
    assert table.matches("192.0.2.1") == []
    table = NetworkTable([(ipaddress.ip_network("192.0.2.0/24"), 1)])
    assert table.matches("2001:db8::1") == []


def test_private_use_characters_are_allowed_in_a_utf8_local_part() -> None:
    # only controls, DEL and lone surrogates are refused
    assert parse_address("\ue000x@example.com", smtputf8=True).local == "\ue000x"


def test_each_external_postmaster_names_its_own_missing_answer() -> None:
    settings_ = Settings(
        general=GeneralSettings(
            hostname=HOSTNAME,
            local_domains=("example.com",),
            external_postmasters=("a@x.example", "b@y.example"),
        )
    )
    routes = route(settings_, "", ["postmaster@example.com"], {}, rng=random.Random(0))
    texts = [r.error.text for r in routes if r.error is not None]
    assert texts == [
        "DNS answer not available for x.example/MX",
        "DNS answer not available for y.example/MX",
    ]


def test_bare_postmaster_decision_shows_the_recipient() -> None:
    # an ACCEPT ends the walk without showing its evidence: checked here
    policy = make_policy()
    ctx = Context(policy.shared, session(), rcpt("Postmaster"))
    d = AcceptBarePostmaster("rfc5321.postmaster").check(ctx)
    assert d == Decision(
        Outcome.ACCEPT, "rfc5321.postmaster", evidence=(Evidence("recipient", "Postmaster"),)
    )


def test_a_discarded_transaction_keeps_what_was_observed_before() -> None:
    policy = make_policy(
        {
            "general": {"observe": True},
            "security": {"connection_policy": {"max_recipient_rate_global": 1}},
        }
    )
    busy = session(counters=Counters(global_recipient_rate=5))
    v = judge(policy, rcpt("r@example.com", discard="security.lists.drop"), busy)
    assert (v.action, v.rule) == (Action.DISCARD, "security.lists.drop")
    assert [o.rule for o in v.observed] == ["security.connection_policy.max_recipient_rate_global"]
