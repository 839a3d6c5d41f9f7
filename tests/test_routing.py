"""The pure routing decision (mailpolicy.routing): every rule, and MX order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.routing import resolve_routes
from mailpolicy.model import DnsOutcome, DnsQuery, DnsResult, NextHop, Route, RouteKind, RType
from mailpolicy.routing import route, routing_lookups
from mailpolicy.settings import (
    DeliveryException,
    DeliverySettings,
    GeneralSettings,
    RelayHost,
    RelaySettings,
    Settings,
)

HOSTNAME = "mx.example.com"


def make_settings(
    *,
    local_domains: Iterable[str] = ("example.com",),
    external_postmasters: Iterable[str] = (),
    mode: str = "direct",
    relay_host: RelayHost | None = None,
    exceptions: Iterable[DeliveryException] = (),
    inbound_domains: Iterable[str] = (),
    hostname: str = HOSTNAME,
) -> Settings:
    return Settings(
        general=GeneralSettings(
            hostname=hostname,
            local_domains=tuple(local_domains),
            external_postmasters=tuple(external_postmasters),
        ),
        delivery=DeliverySettings(
            mode=mode,  # type: ignore[arg-type]
            relay_host=relay_host,
            exceptions=tuple(exceptions),
        ),
        relay=RelaySettings(inbound_domains=tuple(inbound_domains)),
    )


ZONE: dict[str, Any] = {
    "example.net": {"MX": ["10 mx1.example.net", "20 mx2.example.net"]},
    "mx1.example.net": {"A": ["192.0.2.11"]},
    "mx2.example.net": {"A": ["192.0.2.12"]},
    "example.org": {"MX": ["10 mail.example.org"]},
    "mail.example.org": {"A": ["192.0.2.20"]},
    "sub.corp.example": {"MX": ["10 exchange.corp.example"]},
    "corp.example": {"MX": ["10 exchange.corp.example"]},
    "exchange.corp.example": {"A": ["10.0.0.5"]},
    "nullmx.example": {"MX": ["0 ."]},
    "nomx.example": {"A": ["192.0.2.7"]},
    "v6only.example": {"AAAA": ["2001:db8::7"]},
    "nothing.example": {"TXT": ["v=spf1 -all"]},
    "gone.example": {"nxdomain": True},
    "broken.example": {"servfail": True},
    "slow.example": {"timeout": True},
    "halfbroken.example": {"servfail": ["A"]},
    "loop.example": {"MX": ["10 mx.example.com"]},
    "backup.example": {"MX": ["10 primary.backup.example", "20 mx.example.com", "30 tertiary.x"]},
    "primary.backup.example": {"A": ["192.0.2.30"]},
    "byaddress.example": {"MX": ["10 alias-of-us.example", "20 other.example"]},
    "alias-of-us.example": {"A": ["198.51.100.1"]},
    "other.example": {"A": ["192.0.2.40"]},
    "weird.example": {"MX": ["10 192.0.2.99", "20 good.example"]},
}
ZONE_OBJ = StaticZone.from_mapping(ZONE)


def decide(
    settings_: Settings,
    recipients: Iterable[str],
    *,
    sender: str = "alice@example.com",
    zone: StaticZone = ZONE_OBJ,
    seed: int = 0,
    our_addresses: frozenset[str] = frozenset(),
) -> tuple[Route, ...]:
    """Loop lookups -> static zone -> route, as an adapter does, checking
    that the loop converges in at most two rounds."""
    rcpts = list(recipients)
    answers: dict[DnsQuery, DnsResult] = {}
    for _ in range(2):
        needed = routing_lookups(settings_, sender, rcpts, answers, our_addresses=our_addresses)
        answers.update({q: zone.lookup(q) for q in needed})
    assert not routing_lookups(settings_, sender, rcpts, answers, our_addresses=our_addresses)
    return route(
        settings_, sender, rcpts, answers, rng=random.Random(seed), our_addresses=our_addresses
    )


def one(settings_: Settings, recipient: str, **kw: Any) -> Route:
    (r,) = decide(settings_, [recipient], **kw)
    return r


def hosts(r: Route) -> list[str]:
    return [h.host for h in r.next_hops]


# ---------------------------------------------------------------------------
# local delivery and postmasters


def test_local_domain_delivers_locally_with_lowercase_domain() -> None:
    r = one(make_settings(), "Bob@Example.COM.")
    assert r.kind is RouteKind.LOCAL
    assert r.mailbox == "Bob@example.com"
    assert r.recipient == "Bob@Example.COM."
    assert "general.local_domains" in r.reason


def test_local_domains_are_exact_not_subdomains() -> None:
    r = one(make_settings(local_domains=["example.net"]), "bob@sub.example.net")
    assert r.kind is RouteKind.ERROR  # sub.example.net is not listed: NXDOMAIN, not local


def test_local_needs_no_dns() -> None:
    assert not routing_lookups(make_settings(), "a@b.example", ["bob@example.com"], {})


@pytest.mark.parametrize("local", ["postmaster", "PostMaster", "mailer-daemon"])
def test_external_postmaster_rewrites_to_smtp_route(local: str) -> None:
    s = make_settings(external_postmasters=["admin@example.org"])
    r = one(s, f"{local}@example.com")
    assert r.kind is RouteKind.SMTP
    assert r.recipient == f"{local}@example.com"
    assert r.mailbox == "admin@example.org"
    assert hosts(r) == ["mail.example.org"]
    assert "general.external_postmasters" in r.reason


def test_external_postmaster_that_is_local_is_delivered_locally_without_loop() -> None:
    s = make_settings(
        local_domains=["example.com", "example.org"],
        external_postmasters=["postmaster@example.org", "ops@example.com"],
    )
    routes = decide(s, ["postmaster@example.com"])
    assert [(r.kind, r.mailbox) for r in routes] == [
        (RouteKind.LOCAL, "postmaster@example.org"),  # not rewritten a second time
        (RouteKind.LOCAL, "ops@example.com"),
    ]
    assert all(r.recipient == "postmaster@example.com" for r in routes)


def test_bare_postmaster() -> None:
    plain = one(make_settings(), "postmaster")
    assert plain.kind is RouteKind.LOCAL
    assert plain.mailbox == f"postmaster@{HOSTNAME}"
    ext = one(make_settings(external_postmasters=["admin@example.org"]), "Postmaster")
    assert ext.kind is RouteKind.SMTP and ext.mailbox == "admin@example.org"


def test_postmaster_of_a_remote_domain_is_not_rewritten() -> None:
    r = one(make_settings(external_postmasters=["admin@example.org"]), "postmaster@example.net")
    assert r.kind is RouteKind.SMTP and r.mailbox is None
    assert hosts(r) == ["mx1.example.net", "mx2.example.net"]


def test_bare_address_is_qualified_with_hostname() -> None:
    r = one(make_settings(local_domains=[HOSTNAME]), "root")
    assert r.kind is RouteKind.LOCAL and r.mailbox == f"root@{HOSTNAME}"


# ---------------------------------------------------------------------------
# relay host, exceptions, inbound domains

RELAY = RelayHost(
    "smtp.provider.example", 587, "starttls", username="me", password_env="RELAY_PASSWORD"
)
PARTNER = RelayHost("gw.partner.example", 25, "tls")


def test_relay_mode_sends_every_non_local_recipient_to_the_relay_host() -> None:
    s = make_settings(mode="relay", relay_host=RELAY)
    routes = decide(s, ["bob@example.net", "carol@gone.example", "dave@example.com"])
    assert [r.kind for r in routes] == [RouteKind.SMTP, RouteKind.SMTP, RouteKind.LOCAL]
    hop = NextHop("smtp.provider.example", 587, "starttls", "me", "RELAY_PASSWORD")
    assert routes[0].next_hops == (hop,)
    assert routes[1].next_hops == (hop,)  # the relay host's business, not ours
    assert "delivery.mode = relay" in routes[0].reason


def test_relay_mode_needs_no_dns() -> None:
    s = make_settings(mode="relay", relay_host=RELAY)
    assert not routing_lookups(s, "a@example.com", ["bob@example.net"], {})


def test_relay_mode_without_relay_host_is_a_temporary_configuration_error() -> None:
    r = one(make_settings(mode="relay"), "bob@example.net")
    assert r.kind is RouteKind.ERROR and r.error is not None
    assert (r.error.code, r.error.enhanced) == (451, "4.3.5")


def exception(match: str, *targets: str, name: str = "ex", host: RelayHost = PARTNER) -> Any:
    return DeliveryException(name, match, targets, host)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "recipient", "matches"),
    [
        ("partner.example", "bob@partner.example", True),
        ("partner.example", "bob@eu.partner.example", True),  # subdomain
        ("partner.example", "bob@notpartner.example", False),
        ("bob@partner.example", "Bob@Partner.Example", True),  # address, without case
        ("bob@partner.example", "carol@partner.example", False),
    ],
)
def test_exception_by_recipient(target: str, recipient: str, matches: bool) -> None:
    zone = StaticZone.from_mapping(
        {d.lower(): {"MX": [f"10 mx.{d.lower()}"]} for d in recipient.rpartition("@")[2:]}
        | {"partner.example": {"MX": ["10 mx.partner.example"]}}
    )
    s = make_settings(exceptions=[exception("recipient", target)])
    r = one(s, recipient, zone=zone)
    assert r.kind is RouteKind.SMTP
    if matches:
        assert r.next_hops == (NextHop("gw.partner.example", 25, "tls"),)
        assert "delivery.exceptions.ex" in r.reason
    else:
        assert r.next_hops[0].host.startswith("mx.")


@pytest.mark.parametrize(
    ("target", "sender", "matches"),
    [
        ("example.com", "alice@example.com", True),
        ("example.com", "alice@dept.example.com", True),
        ("alice@example.com", "ALICE@example.com", True),
        ("alice@example.com", "bob@example.com", False),
        ("example.com", "", False),  # the null sender matches nothing
    ],
)
def test_exception_by_sender_overrides_direct_and_relay(
    target: str, sender: str, matches: bool
) -> None:
    for mode, relay in (("direct", None), ("relay", RELAY)):
        s = make_settings(mode=mode, relay_host=relay, exceptions=[exception("sender", target)])
        r = one(s, "bob@example.net", sender=sender)
        assert r.kind is RouteKind.SMTP
        assert (r.next_hops[0].host == "gw.partner.example") is matches


def test_first_matching_exception_wins() -> None:
    first = exception("recipient", "example.net", name="first", host=RelayHost("one.example"))
    second = exception("sender", "example.com", name="second", host=RelayHost("two.example"))
    r = one(make_settings(exceptions=[first, second]), "bob@example.net")
    assert hosts(r) == ["one.example"] and "delivery.exceptions.first" in r.reason
    r = one(make_settings(exceptions=[second, first]), "bob@example.net")
    assert hosts(r) == ["two.example"] and "delivery.exceptions.second" in r.reason


def test_exceptions_do_not_apply_to_local_domains() -> None:
    s = make_settings(exceptions=[exception("sender", "example.com")])
    assert one(s, "bob@example.com").kind is RouteKind.LOCAL


def test_inbound_domain_goes_to_its_mx_even_in_relay_mode() -> None:
    s = make_settings(mode="relay", relay_host=RELAY, inbound_domains=["corp.example"])
    for rcpt in ("eve@corp.example", "eve@sub.corp.example"):
        r = one(s, rcpt)
        assert r.kind is RouteKind.SMTP
        assert r.next_hops == (NextHop("exchange.corp.example", 25, "may"),)
        assert "relay.inbound_domains" in r.reason


def test_exception_overrides_inbound_domain() -> None:
    s = make_settings(
        inbound_domains=["corp.example"], exceptions=[exception("recipient", "corp.example")]
    )
    assert hosts(one(s, "eve@corp.example")) == ["gw.partner.example"]


def test_mixed_routes_for_one_message() -> None:
    s = make_settings(
        external_postmasters=["admin@example.org"],
        inbound_domains=["corp.example"],
        exceptions=[exception("recipient", "partner.example")],
    )
    routes = decide(
        s,
        [
            "bob@example.com",
            "carol@example.net",
            "dave@partner.example",
            "eve@corp.example",
            "postmaster@example.com",
            "frank@nullmx.example",
            "grace@broken.example",
        ],
    )
    summary = [(r.recipient, r.kind, hosts(r) or r.mailbox or r.error) for r in routes]
    assert [x[1] for x in summary] == [
        RouteKind.LOCAL,
        RouteKind.SMTP,
        RouteKind.SMTP,
        RouteKind.SMTP,
        RouteKind.SMTP,
        RouteKind.ERROR,
        RouteKind.ERROR,
    ]
    assert hosts(routes[1]) == ["mx1.example.net", "mx2.example.net"]
    assert hosts(routes[2]) == ["gw.partner.example"]
    assert hosts(routes[3]) == ["exchange.corp.example"]
    assert routes[4].mailbox == "admin@example.org"
    assert routes[5].error is not None and not routes[5].error.temporary
    assert routes[6].error is not None and routes[6].error.temporary


# ---------------------------------------------------------------------------
# direct delivery, RFC 5321 section 5


def test_direct_mx_in_preference_order_on_port_25_with_opportunistic_tls() -> None:
    r = one(make_settings(), "bob@example.net")
    assert r.next_hops == (
        NextHop("mx1.example.net", 25, "may"),
        NextHop("mx2.example.net", 25, "may"),
    )


def test_mx_hops_take_mx_port_and_mx_security() -> None:
    s = make_settings()
    s = attrs.evolve(s, delivery=attrs.evolve(s.delivery, mx_port=2526, mx_security="verify"))
    r = one(s, "bob@example.net")
    assert [(h.port, h.security) for h in r.next_hops] == [(2526, "verify"), (2526, "verify")]
    assert "MX of example.net" in r.reason


def test_direct_asks_only_mx_when_no_addresses_of_ours() -> None:
    q = routing_lookups(make_settings(), "a@example.com", ["bob@example.net"], {})
    assert q == {DnsQuery("example.net", RType.MX)}
    answers = {
        DnsQuery("example.net", RType.MX): ZONE_OBJ.lookup(DnsQuery("example.net", RType.MX))
    }
    assert not routing_lookups(make_settings(), "a@example.com", ["bob@example.net"], answers)


def test_null_mx_is_permanent_556() -> None:
    r = one(make_settings(), "x@nullmx.example")
    assert r.kind is RouteKind.ERROR and r.error is not None
    assert (r.error.code, r.error.enhanced, r.error.temporary) == (556, "5.1.10", False)
    assert "nullMX" in r.error.text


def test_no_mx_uses_implicit_mx_from_a_or_aaaa() -> None:
    for domain in ("nomx.example", "v6only.example"):
        r = one(make_settings(), f"y@{domain}")
        assert r.kind is RouteKind.SMTP
        assert r.next_hops == (NextHop(domain, 25, "may"),)
        assert "implicit MX" in r.reason


def test_implicit_mx_asks_a_and_aaaa_in_one_round() -> None:
    mx = DnsQuery("nomx.example", RType.MX)
    answers = {mx: DnsResult(DnsOutcome.NODATA)}
    q = routing_lookups(make_settings(), "", ["y@nomx.example"], answers)
    assert q == {DnsQuery("nomx.example", RType.A), DnsQuery("nomx.example", RType.AAAA)}


def test_no_mx_and_no_address_is_permanent() -> None:
    r = one(make_settings(), "y@nothing.example")
    assert r.error is not None and (r.error.code, r.error.enhanced) == (550, "5.4.4")


def test_nxdomain_is_permanent_domain_not_found() -> None:
    r = one(make_settings(), "z@gone.example")
    assert r.error is not None
    assert (r.error.code, r.error.enhanced, r.error.temporary) == (550, "5.4.4", False)
    assert "not found" in r.error.text
    # and no address questions are asked for a domain that does not exist
    q = routing_lookups(
        make_settings(),
        "",
        ["z@gone.example"],
        {DnsQuery("gone.example", RType.MX): DnsResult(DnsOutcome.NXDOMAIN)},
    )
    assert not q


@pytest.mark.parametrize("domain", ["broken.example", "slow.example"])
def test_dns_failure_is_temporary_never_a_bounce(domain: str) -> None:
    r = one(make_settings(), f"w@{domain}")
    assert r.kind is RouteKind.ERROR and r.error is not None
    assert r.error.temporary and (r.error.code, r.error.enhanced) == (451, "4.4.3")


def test_dns_failure_on_implicit_mx_address_is_temporary() -> None:
    zone = StaticZone.from_mapping({"half.example": {"servfail": ["A"]}})
    r = one(make_settings(), "w@half.example", zone=zone)
    assert r.error is not None and r.error.temporary


def test_temporary_failure_of_aaaa_does_not_hide_a_found_a() -> None:
    zone = StaticZone.from_mapping({"half.example": {"A": ["192.0.2.1"], "timeout": ["AAAA"]}})
    r = one(make_settings(), "w@half.example", zone=zone)
    assert r.kind is RouteKind.SMTP


def test_mx_loop_by_hostname() -> None:
    r = one(make_settings(), "v@loop.example")
    assert r.error is not None
    assert (r.error.code, r.error.enhanced) == (554, "5.4.6")
    assert r.error.text == "mail for loop.example loops back to myself"


def test_mx_loop_by_hostname_is_case_insensitive() -> None:
    r = one(make_settings(hostname="MX.Example.COM."), "v@loop.example")
    assert r.error is not None and r.error.enhanced == "5.4.6"


def test_ourselves_and_worse_preferences_are_skipped() -> None:
    # backup.example: 10 primary, 20 us, 30 tertiary -> only primary remains
    r = one(make_settings(), "v@backup.example")
    assert hosts(r) == ["primary.backup.example"]
    assert "skipped ourselves" in r.reason


def test_ourselves_by_address() -> None:
    ours = frozenset({"198.51.100.1"})
    r = one(make_settings(), "v@byaddress.example", our_addresses=ours)
    # we are the best MX (10): everything with preference >= 10 goes: a loop
    assert r.error is not None and r.error.enhanced == "5.4.6"
    assert "198.51.100.1" in r.reason
    # without knowing our addresses it is a normal route
    assert hosts(one(make_settings(), "v@byaddress.example")) == [
        "alias-of-us.example",
        "other.example",
    ]


def test_ourselves_by_address_asks_only_the_families_we_have() -> None:
    mx = DnsQuery("byaddress.example", RType.MX)
    answers = {mx: ZONE_OBJ.lookup(mx)}
    v4 = routing_lookups(
        make_settings(),
        "",
        ["v@byaddress.example"],
        answers,
        our_addresses=frozenset({"198.51.100.1"}),
    )
    assert v4 == {DnsQuery("alias-of-us.example", RType.A), DnsQuery("other.example", RType.A)}
    v6 = routing_lookups(
        make_settings(),
        "",
        ["v@byaddress.example"],
        answers,
        our_addresses=frozenset({"2001:db8::1"}),
    )
    assert {q.rtype for q in v6} == {RType.AAAA}


def test_implicit_mx_that_is_ourselves_loops() -> None:
    r = one(make_settings(), "v@nomx.example", our_addresses=frozenset({"192.0.2.7"}))
    assert r.error is not None and r.error.enhanced == "5.4.6"
    r = one(make_settings(hostname="nomx.example"), "v@nomx.example")
    assert r.error is not None and r.error.enhanced == "5.4.6"


def test_mx_host_address_lookup_failure_is_not_taken_for_us() -> None:
    zone = StaticZone.from_mapping(
        {
            "d.example": {"MX": ["10 a.d.example", "20 b.d.example"]},
            "a.d.example": {"servfail": True},
        }
    )
    r = one(make_settings(), "v@d.example", zone=zone, our_addresses=frozenset({"192.0.2.1"}))
    assert hosts(r) == ["a.d.example", "b.d.example"]


def test_numeric_and_root_mx_hosts_are_ignored() -> None:
    r = one(make_settings(), "v@weird.example")
    assert hosts(r) == ["good.example"]
    assert "ignored" in r.reason


def test_only_unusable_mx_hosts_is_temporary() -> None:
    zone = StaticZone.from_mapping({"d.example": {"MX": ["10 192.0.2.1"]}})
    r = one(make_settings(), "v@d.example", zone=zone)
    assert r.error is not None and r.error.temporary


def test_duplicate_mx_host_keeps_its_best_preference() -> None:
    answers = {
        DnsQuery("d.example", RType.MX): DnsResult.answer(
            "20 a.example", "10 b.example", "5 a.example"
        )
    }
    (r,) = route(make_settings(), "", ["v@d.example"], answers, rng=random.Random(0))
    assert hosts(r) == ["a.example", "b.example"]


def test_address_literal() -> None:
    r = one(make_settings(), "v@[192.0.2.5]")
    assert r.next_hops == (NextHop("192.0.2.5", 25, "may"),)
    r = one(make_settings(), "v@[IPv6:2001:db8::5]")
    assert r.next_hops == (NextHop("2001:db8::5", 25, "may"),)
    r = one(make_settings(), "v@[192.0.2.5]", our_addresses=frozenset({"192.0.2.5"}))
    assert r.error is not None and r.error.enhanced == "5.4.6"
    r = one(make_settings(), "v@[not-an-ip]")
    assert r.error is not None and not r.error.temporary


def test_missing_answer_is_a_temporary_error_naming_the_question() -> None:
    (r,) = route(make_settings(), "", ["bob@example.net"], {}, rng=random.Random(0))
    assert r.kind is RouteKind.ERROR and r.error is not None
    assert r.error.temporary
    assert "example.net/MX" in r.error.text
    mx = DnsQuery("nomx.example", RType.MX)
    (r,) = route(
        make_settings(),
        "",
        ["y@nomx.example"],
        {mx: DnsResult(DnsOutcome.NODATA)},
        rng=random.Random(0),
    )
    assert r.error is not None and "nomx.example/A" in r.error.text


def test_recipients_in_one_domain_share_one_order() -> None:
    zone = StaticZone.from_mapping({"d.example": {"MX": [f"10 mx{i}.d.example" for i in range(6)]}})
    for seed in range(10):
        routes = decide(make_settings(), ["a@d.example", "b@d.example"], zone=zone, seed=seed)
        assert routes[0].next_hops == routes[1].next_hops


def test_order_is_repeatable_and_independent_of_record_order() -> None:
    records = [f"10 mx{i}.d.example" for i in range(5)]
    q = DnsQuery("d.example", RType.MX)
    a = route(
        make_settings(), "", ["v@d.example"], {q: DnsResult.answer(*records)}, rng=random.Random(7)
    )
    b = route(
        make_settings(),
        "",
        ["v@d.example"],
        {q: DnsResult.answer(*reversed(records))},
        rng=random.Random(7),
    )
    assert a == b


# ---------------------------------------------------------------------------
# MX ordering properties

mx_sets = st.dictionaries(
    keys=st.from_regex(r"[a-z]{1,8}\.example", fullmatch=True),
    values=st.integers(min_value=0, max_value=30),
    min_size=1,
    max_size=10,
)


@settings(max_examples=200, deadline=None)
@given(mx=mx_sets, seed=st.integers(min_value=0, max_value=2**32))
def test_preference_order_is_always_respected(mx: Mapping[str, int], seed: int) -> None:
    answers = {
        DnsQuery("d.example", RType.MX): DnsResult.answer(*(f"{p} {h}" for h, p in mx.items()))
    }
    (r,) = route(make_settings(), "", ["v@d.example"], answers, rng=random.Random(seed))
    prefs = [mx[h] for h in hosts(r)]
    assert prefs == sorted(prefs)
    assert sorted(hosts(r)) == sorted(mx)


@settings(max_examples=50, deadline=None)
@given(mx=mx_sets)
def test_every_host_of_equal_preference_is_eventually_first(mx: Mapping[str, int]) -> None:
    answers = {
        DnsQuery("d.example", RType.MX): DnsResult.answer(*(f"{p} {h}" for h, p in mx.items()))
    }
    best = min(mx.values())
    contenders = {h for h, p in mx.items() if p == best}
    seen: set[str] = set()
    # with at most 10 contenders, 400 seeds miss one with chance < 10 * 0.9**400
    for seed in range(400):
        (r,) = route(make_settings(), "", ["v@d.example"], answers, rng=random.Random(seed))
        seen.add(r.next_hops[0].host)
        if seen == contenders:
            break
    assert seen == contenders


# ---------------------------------------------------------------------------
# the adapter loop


def test_resolve_routes_with_a_static_zone_and_capture() -> None:
    answers: dict[DnsQuery, DnsResult] = {}
    routes = asyncio.run(
        resolve_routes(
            make_settings(),
            "alice@example.com",
            ["bob@example.net", "y@nomx.example", "v@byaddress.example"],
            ZONE_OBJ,
            random.Random(0),
            our_addresses=frozenset({"198.51.100.1"}),
            answers=answers,
        )
    )
    assert [r.kind for r in routes] == [RouteKind.SMTP, RouteKind.SMTP, RouteKind.ERROR]
    # the capture replays to the same decision, offline
    replayed = StaticZone.from_results(answers)
    again = asyncio.run(
        resolve_routes(
            make_settings(),
            "alice@example.com",
            ["bob@example.net", "y@nomx.example", "v@byaddress.example"],
            replayed,
            random.Random(0),
            our_addresses=frozenset({"198.51.100.1"}),
        )
    )
    assert again == routes
