"""Properties of the pure core, with hypothesis.

* Relay control: no client that is neither trusted, local-network (when it
  skips AUTH) nor authenticated ever gets an accepting verdict at RCPT for a
  recipient whose real destination is outside ``local_domains`` and
  ``inbound_domains``, whatever relay trick the address uses and whatever the
  rest of the policy says (white lists that match everything included).
* ``evaluate`` is deterministic and never raises, whatever the strings.
* ``decide`` reaches a fixed point within four calls, after which nothing is
  missing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from helpers_core import (
    NODATA,
    NXDOMAIN,
    SERVFAIL,
    TIMEOUT,
    account,
    answer,
    make_policy,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailpolicy import (
    Action,
    Counters,
    DnsQuery,
    DnsResult,
    Envelope,
    Memo,
    MessageFacts,
    Policy,
    RType,
    Session,
    Stage,
    Verdict,
    decide,
    decide_with,
    evaluate,
)
from mailpolicy.addresses import AddressError, parse_address

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Disjoint pools: no foreign name is local, inbound, or under an inbound domain.
LOCAL_POOL = ["example.com", "example.net", "corp.example", "mail.test", "localdomain"]
INBOUND_POOL = ["partner.example", "branch.test", "inbound"]
FOREIGN_POOL = [
    "elsewhere.example",
    "evil.test",
    "attacker.invalid",
    "sub.example.com",  # local domains are exact, not their subdomains
    "example.com.evil.test",
    "xpartner.example",  # a suffix is not a parent domain
    "com",
]
HOSTNAMES = ["mx.example.com", "mx.elsewhere.example"]
LOCAL_PARTS = ["u", "john.doe", "x-y", "a+tag", "Admin"]

TRUSTED_POOL = ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"]
CLIENTS = ["203.0.113.5", "198.51.100.66", "2001:db8::5", "172.16.0.9", "::ffff:203.0.113.9"]
LAN = "172.16.0.0/12"
EVERYTHING_WHITE: dict[str, Any] = {
    "name": "everything",
    "list": "white",
    "client": ["0.0.0.0/0", "::/0"],
}


# ---------------------------------------------------------------------------
# Policies


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    """A policy-file mapping with random domains, lists and toggles."""
    hostname = draw(st.sampled_from(HOSTNAMES))
    local = draw(st.lists(st.sampled_from(LOCAL_POOL), min_size=1, max_size=3, unique=True))
    if hostname == "mx.example.com" and draw(st.booleans()):
        local.append(hostname)  # unqualified recipients are then ours
    inbound = draw(st.lists(st.sampled_from(INBOUND_POOL), max_size=2, unique=True))
    lists: list[dict[str, Any]] = []
    if draw(st.booleans()):
        lists.append(EVERYTHING_WHITE)
    if draw(st.booleans()):
        lists.append(
            {
                "name": "white_senders",
                "list": "white",
                "sender": ["<>", "example", "com", "test", "invalid", "net"],
            }
        )
    if draw(st.booleans()):
        lists.append(
            {
                "name": "white_rcpts",
                "list": "white",
                "recipient": [*FOREIGN_POOL, "u@", "postmaster@"],
            }
        )
    if draw(st.booleans()):
        lists.append({"name": "white_helo", "list": "white", "helo": ["org", "example", "com"]})
    if draw(st.booleans()):
        lists.append(
            {
                "name": "drop",
                "list": "black",
                "action": "discard",
                "client": ["0.0.0.0/0", "::/0"],
            }
        )
    flag = st.booleans()
    reply_code = st.sampled_from([450, 451, 550, 554])
    return {
        "general": {
            "hostname": hostname,
            "local_domains": local,
            # a limit refuses too, but would hide the relay check: rarely hit
            "max_recipients": draw(st.sampled_from([1000, 0, 1000, 3])),
            "smtp_auth": {
                "enabled": draw(flag),
                "skip_for_local_network": draw(flag),
                "local_networks": draw(st.sampled_from([["127.0.0.0/8"], [LAN]])),
                "sender_must_match_login": draw(flag),
            },
        },
        "relay": {
            "inbound_domains": inbound,
            "trusted_networks": draw(st.lists(st.sampled_from(TRUSTED_POOL), unique=True)),
        },
        "security": {
            "lists": lists,
            "sender_policy": {
                "reject_non_fqdn_sender": draw(flag),
                "reject_unknown_sender_domain": draw(flag),
                "reject_unauthenticated_local_sender": draw(flag),
            },
            "connection_policy": {
                "reject_unknown_reverse_client_hostname": draw(flag),
                "reject_unknown_client_hostname": draw(flag),
                "max_recipient_rate_per_client": draw(st.sampled_from([0, 5])),
            },
            "advanced": {
                "reject_invalid_helo": draw(flag),
                "reject_non_fqdn_helo": draw(flag),
                "reject_unknown_helo": draw(flag),
                "reject_non_fqdn_recipient": draw(flag),
                "reject_unknown_recipient_domain": draw(flag),
                "dnsbl": draw(st.sampled_from([[], ["bl.example"], ["bl.example=127.0.0.2"]])),
            },
        },
        "replies": {
            "relay_denied": draw(reply_code),
            "access_denied": draw(reply_code),
            "unknown_address": draw(reply_code),
            "unknown_client": draw(reply_code),
            "unknown_hostname": draw(reply_code),
        },
    }


ACCOUNTS = [
    account("alice", "alice@example.com", "@corp.example"),
    account("bob", "u@elsewhere.example"),
]


def build(mapping: dict[str, Any]) -> Policy:
    return make_policy(mapping, accounts=ACCOUNTS)


# ---------------------------------------------------------------------------
# DNS: every question answered by a drawn outcome (the same one if asked again)

OUTCOMES: dict[RType, list[DnsResult]] = {
    RType.A: [NXDOMAIN, NODATA, SERVFAIL, TIMEOUT, answer("127.0.0.2"), answer("203.0.113.5")],
    RType.AAAA: [NXDOMAIN, NODATA, SERVFAIL, TIMEOUT, answer("2001:db8::5")],
    RType.MX: [NXDOMAIN, NODATA, SERVFAIL, TIMEOUT, answer("10 mx.x.example"), answer("0 .")],
    RType.PTR: [NXDOMAIN, NODATA, SERVFAIL, answer("outside.example.org"), answer("h.x.example")],
    RType.TXT: [NXDOMAIN, NODATA],
}


def drawing_resolver(
    data: st.DataObject,
) -> Callable[[frozenset[DnsQuery]], dict[DnsQuery, DnsResult]]:
    cache: dict[DnsQuery, DnsResult] = {}

    def resolve(queries: frozenset[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        for query in sorted(queries, key=str):  # a stable drawing order
            if query not in cache:
                cache[query] = data.draw(st.sampled_from(OUTCOMES[query.rtype]), label=str(query))
        return {query: cache[query] for query in queries}

    return resolve


def run(
    policy: Policy,
    sess: Session,
    env: Envelope,
    resolver: Callable[[frozenset[DnsQuery]], dict[DnsQuery, DnsResult]],
) -> tuple[Verdict, Session, int]:
    """The adapter's loop; returns the verdict, the final session and how many
    times ``decide`` was called (the last call decided). The verdict is also
    the one ``evaluate`` gives, and ``decide_with`` ends the same way."""
    calls = 0
    start = sess
    while True:
        calls += 1
        found = decide(policy, sess, env)
        if isinstance(found, Verdict):
            break
        assert calls < 10, f"decide does not converge: {found.queries}"
        sess = sess.with_dns(resolver(found.queries))
    assert evaluate(policy, sess, env) == found
    assert decide_with(policy, start, env, resolver, Memo()) == (sess, found)
    return found, sess, calls


# ---------------------------------------------------------------------------
# Recipients whose real destination is foreign


def _dot(draw: st.DrawFn, domain: str) -> str:
    return domain + "." if draw(st.booleans()) else domain


@st.composite
def foreign_recipients(draw: st.DrawFn, mapping: dict[str, Any]) -> str:
    """A recipient address whose mail would really leave for a foreign
    destination (or an address literal), written with one relay trick."""
    local: list[str] = mapping["general"]["local_domains"]
    inbound: list[str] = mapping["relay"]["inbound_domains"]
    hostname: str = mapping["general"]["hostname"]
    u = draw(st.sampled_from(LOCAL_PARTS))
    f = _dot(draw, draw(st.sampled_from(FOREIGN_POOL)))
    ours = st.sampled_from(local)
    lo = _dot(draw, draw(ours))
    forms = [
        "plain",
        "percent",
        "nested_percent",
        "bang",
        "nested_bang",
        "quoted_at",
        "quoted_percent",
        "quoted_bang",
        "source_route_raw",
        "literal4",
        "literal6",
        "quoted_literal",
        "unqualified_percent",
        "local_subdomain",
    ]
    if inbound:
        forms += ["inbound_percent", "inbound_quoted", "inbound_bang"]
    if hostname not in local:
        forms.append("unqualified")
    form = draw(st.sampled_from(forms))
    event(f"form={form}")
    if form == "plain":
        text = f"{u}@{f}"
    elif form == "percent":
        text = f"{u}%{f}@{lo}"
    elif form == "nested_percent":
        hops = draw(st.lists(ours, min_size=1, max_size=10))
        text = f"{u}%{f}" + "".join(f"%{h}" for h in hops) + f"@{lo}"
    elif form == "bang":
        text = f"{f}!{u}@{lo}"
    elif form == "nested_bang":
        text = f"{f}!{draw(ours)}!{u}@{lo}"
    elif form == "quoted_at":
        text = f'"{u}@{f}"@{lo}'
    elif form == "quoted_percent":
        text = f'"{u}%{f}"@{lo}'
    elif form == "quoted_bang":
        text = f'"{f}!{u}"@{lo}'
    elif form == "source_route_raw":
        route = draw(st.lists(st.sampled_from(local + inbound), min_size=1, max_size=3))
        text = ",".join(f"@{d}" for d in route) + f":{u}@{f}"
    elif form == "literal4":
        text = f"{u}@[192.0.2.1]"
    elif form == "literal6":
        text = f"{u}@[{draw(st.sampled_from(['IPv6', 'ipv6', 'IPV6']))}:2001:db8::1]"
    elif form == "quoted_literal":
        text = f'"{u}@[192.0.2.1]"@{lo}'
    elif form == "unqualified_percent":
        text = f"{u}%{f}"
    elif form == "local_subdomain":
        text = f"{u}@sub.{lo}"
    elif form == "inbound_percent":
        text = f"{u}%{f}@{_dot(draw, draw(st.sampled_from(inbound)))}"
    elif form == "inbound_quoted":
        text = f'"{u}@{f}"@{draw(st.sampled_from(inbound))}'
    elif form == "inbound_bang":
        text = f"{f}!{u}@{draw(st.sampled_from(inbound))}"
    else:  # unqualified, our host name being foreign
        text = u
    cases: list[Callable[[str], str]] = [str, str.upper, str.lower, str.swapcase]
    text = draw(st.sampled_from(cases))(text)
    if draw(st.booleans()):
        text = f"<{text}>"
    return text


def in_networks(ip: str, networks: list[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(n) for n in networks)


@st.composite
def outsider_sessions(draw: st.DrawFn, mapping: dict[str, Any]) -> Session | None:
    """A session of a client that may not relay, or None when the drawn client
    happens to be allowed to (then the property does not apply)."""
    ip = draw(st.sampled_from(CLIENTS))
    auth = mapping["general"]["smtp_auth"]
    if in_networks(ip, mapping["relay"]["trusted_networks"]):
        return None
    if auth["skip_for_local_network"] and in_networks(ip, auth["local_networks"]):
        return None
    # a login name the adapter could never have set while AUTH is off
    user = "alice" if not auth["enabled"] and draw(st.booleans()) else None
    return Session(
        ip,
        helo=draw(st.sampled_from(["outside.example.org", "bad_name!", "localhost", None])),
        auth_user=user,
        counters=Counters(recipient_rate=draw(st.sampled_from([0, 1, 0, 99]))),
    )


SENDERS = ["", "s@known.example", "alice@example.com", "u@elsewhere.example", "a@localhost"]


@settings(PROPERTY_SETTINGS, max_examples=600)
@given(data=st.data())
def test_no_relay_for_outsiders(data: st.DataObject) -> None:
    mapping = data.draw(policies(), label="policy")
    sess = data.draw(outsider_sessions(mapping), label="session")
    if sess is None:
        event("client may relay: skipped")
        return
    recipient = data.draw(foreign_recipients(mapping), label="recipient")
    previous = data.draw(st.lists(st.sampled_from(["a@example.com", "b@example.net"]), max_size=2))
    env = Envelope(
        Stage.RCPT,
        sender=data.draw(st.sampled_from(SENDERS), label="sender"),
        recipient=recipient,
        recipients=tuple(previous),
    )
    verdict, _, _ = run(build(mapping), sess, env, drawing_resolver(data))
    event(f"decided by {verdict.rule}")
    assert not verdict.accepted, verdict.explain()
    assert verdict.action.refuses
    assert verdict.reply is not None and verdict.reply.code >= 400


@PROPERTY_SETTINGS
@given(data=st.data())
def test_recipients_in_our_domains_are_not_relay_denied(data: st.DataObject) -> None:
    """The counterpart, so the property above cannot hold by refusing
    everything: a plain address in a local or inbound domain is never
    refused by relay control."""
    mapping = data.draw(policies(), label="policy")
    domains = mapping["general"]["local_domains"] + mapping["relay"]["inbound_domains"]
    domain = data.draw(st.sampled_from(domains))
    if domain in mapping["relay"]["inbound_domains"] and data.draw(st.booleans()):
        domain = f"mx.{domain}"
    u = data.draw(st.sampled_from(LOCAL_PARTS))
    env = Envelope(Stage.RCPT, sender="s@known.example", recipient=f"{u}@{domain}")
    verdict, _, _ = run(build(mapping), Session("203.0.113.5"), env, drawing_resolver(data))
    assert verdict.rule != "relay.reject_unauth_destination", verdict.explain()


# ---------------------------------------------------------------------------
# Determinism, robustness, convergence


EVERYTHING_ON: dict[str, Any] = {
    "general": {
        "max_recipients": 2,
        "max_attachment_size_mb": 1,
        "disable_auto_forwarding": True,
        "smtp_auth": {"sender_must_match_login": True},
    },
    "relay": {"inbound_domains": ["partner.example", "partner"]},
    "security": {
        "lists": [
            {"name": "w", "list": "white", "sender": ["vip.example"], "helo": ["vip.example"]},
            {"name": "b", "list": "black", "client_hostname": ["example.org"]},
            {"name": "d", "list": "black", "action": "discard", "recipient": ["trap@"]},
            {"name": "n", "list": "black", "sender": ["<>"], "client": ["198.51.100.0/24"]},
        ],
        "sender_policy": {
            "reject_non_fqdn_sender": True,
            "reject_unknown_sender_domain": True,
            "reject_unauthenticated_local_sender": True,
        },
        "connection_policy": {
            "reject_unknown_reverse_client_hostname": True,
            "reject_unknown_client_hostname": True,
            "max_connection_rate_per_client": 3,
            "max_message_rate_per_client": 3,
            "max_recipient_rate_per_client": 3,
        },
        "advanced": {
            "require_helo": True,
            "reject_invalid_helo": True,
            "reject_non_fqdn_helo": True,
            "reject_unknown_helo": True,
            "reject_unauth_pipelining": True,
            "reject_non_fqdn_recipient": True,
            "reject_unknown_recipient_domain": True,
            "dnsbl": ["bl.example", "bl2.example=127.0.0.2"],
        },
    },
}

addresses_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet='ab.@%!"<>[]:,\\ -_', max_size=30),
    st.sampled_from(
        ["", "<>", "postmaster", "a@b", "@a:b@c", '"a b"@example.com', "u@[IPv6:::1]", "."]
    ),
)
helo_text = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(alphabet="ab.-_[]:0123456789IPv6", max_size=30),
)


@st.composite
def anything(draw: st.DrawFn) -> tuple[Session, Envelope]:
    ip = draw(st.sampled_from([*CLIENTS, "192.0.2.10", "::1", "198.51.100.7"]))
    sess = Session(
        ip,
        helo=draw(helo_text),
        auth_user=draw(st.sampled_from([None, "alice", "bob", "nobody"])),
        improper_pipelining=draw(st.booleans()),
        counters=Counters(
            connections=draw(st.integers(0, 100)),
            connection_rate=draw(st.integers(0, 5)),
            message_rate=draw(st.integers(0, 5)),
            recipient_rate=draw(st.integers(0, 5)),
        ),
    )
    stage = draw(st.sampled_from(list(Stage)))
    fields = dict(
        sender=draw(st.one_of(st.none(), addresses_text)),
        recipient=draw(st.one_of(st.none(), addresses_text)),
        recipients=tuple(draw(st.lists(addresses_text, max_size=3))),
        declared_size=draw(st.one_of(st.none(), st.integers(0, 2**40))),
        message=draw(
            st.one_of(
                st.none(),
                st.builds(
                    MessageFacts,
                    size=st.integers(0, 2**40),
                    received_headers=st.integers(0, 100),
                    largest_attachment=st.integers(0, 2**30),
                    auto_forwarded=st.booleans(),
                ),
            )
        ),
        discard=draw(st.sampled_from([None, "security.lists.d"])),
    )
    # what each stage is about must be there (Envelope refuses it otherwise)
    for key, stand_in in REQUIRED[stage]:
        if fields[key] is None:
            fields[key] = stand_in
    env = Envelope(stage, **fields)  # type: ignore[arg-type]
    return sess, env


REQUIRED: dict[Stage, list[tuple[str, object]]] = {
    **{stage: [] for stage in Stage},
    Stage.MAIL: [("sender", "")],
    Stage.RCPT: [("recipient", "r@example.com")],
    Stage.END_OF_DATA: [("message", MessageFacts(size=0))],
}


def everything_on() -> Policy:
    return build(EVERYTHING_ON)


@PROPERTY_SETTINGS
@given(facts=anything(), data=st.data())
def test_evaluate_never_raises_and_decide_converges(
    facts: tuple[Session, Envelope], data: st.DataObject
) -> None:
    sess, env = facts
    policy = everything_on()
    verdict, _, calls = run(policy, sess, env, drawing_resolver(data))
    # at most three rounds of questions: the fourth call finds nothing missing
    assert calls <= 4, calls
    assert isinstance(verdict, Verdict)
    # once decide decides, no answer is ever missing
    assert not any(e.matched == "not supplied" for e in verdict.evidence), verdict.explain()
    # a refusal always carries a reply and the rule that decided
    if verdict.action.refuses:
        assert verdict.reply is not None and verdict.rule
        assert str(verdict.reply.code)[0] == (verdict.reply.enhanced or "?")[0]
    assert verdict.explain()


@PROPERTY_SETTINGS
@given(facts=anything(), data=st.data())
def test_evaluate_is_deterministic(facts: tuple[Session, Envelope], data: st.DataObject) -> None:
    sess, env = facts
    first, full, _ = run(everything_on(), sess, env, drawing_resolver(data))
    # the same facts, rebuilt from scratch: a new policy, a new session whose
    # DNS answers were added in another order
    answers = list(full.dns.items())
    rebuilt = Session(
        str(sess.client_ip),
        helo=sess.helo,
        auth_user=sess.auth_user,
        improper_pipelining=sess.improper_pipelining,
        counters=sess.counters,
    ).with_dns(dict(reversed(answers)))
    again = everything_on()
    assert rebuilt == full  # the same facts: equal, DNS answers included
    assert decide(again, rebuilt, env) == first
    assert evaluate(again, rebuilt, env) == first
    assert evaluate(everything_on(), full, env) == first


@PROPERTY_SETTINGS
@given(data=st.data())
def test_random_policies_never_raise(data: st.DataObject) -> None:
    mapping = data.draw(policies(), label="policy")
    sess, env = data.draw(anything(), label="facts")
    verdict, _, calls = run(build(mapping), sess, env, drawing_resolver(data))
    assert calls <= 4
    assert verdict.action in set(Action)


@settings(max_examples=200, deadline=None)
@given(recipient=st.text(max_size=30))
def test_an_unparsable_recipient_never_opens_the_relay(recipient: str) -> None:
    policy = make_policy()
    env = Envelope(Stage.RCPT, sender="s@known.example", recipient=recipient)
    verdict = evaluate(policy, Session("203.0.113.5"), env)
    if verdict.accepted and recipient.lower() != "postmaster":
        try:
            parse_address(recipient)
        except AddressError:
            raise AssertionError(f"unparsable {recipient!r} accepted") from None
