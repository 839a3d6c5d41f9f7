"""DNS adapters: StaticZone semantics, LiveResolver against a real ZoneServer
on the loopback interface, and ``mailpolicy route`` end to end.

Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailpolicy.adapters.dns import (
    LiveResolver,
    Resolver,
    StaticZone,
    ZoneError,
    parse_nameserver,
)
from mailpolicy.adapters.dnsserver import ZoneServer
from mailpolicy.cli import main as cli_main
from mailpolicy.model import DnsOutcome, DnsQuery, DnsResult, RType
from mailpolicy.settings import DnsSettings

T = TypeVar("T")

ZONE: dict[str, Any] = {
    "example.net": {"MX": ["10 mx.example.net"], "A": ["192.0.2.1"]},
    "mx.example.net": {"A": ["192.0.2.2"], "AAAA": ["2001:DB8:0::2"]},
    "192.0.2.10": {"PTR": ["client.example.com"]},
    "2001:db8::10": {"PTR": ["client6.example.com."]},
    "gone.example": {"nxdomain": True},
    "broken.example": {"servfail": True},
    "half.example": {"A": ["192.0.2.3"], "servfail": ["MX"]},
    "slow.example": {"timeout": True},
    "slowmx.example": {"A": ["192.0.2.4"], "timeout": ["mx"]},
    "nullmx.example": {"MX": ["0 ."]},
    "txt.example": {"TXT": ["v=spf1 -all", 'with "quotes"']},
    "Alias.Example.": {"CNAME": "example.net"},
    "dangling.example": {"CNAME": ["nowhere.example"]},
    "loop1.example": {"CNAME": "loop2.example"},
    "loop2.example": {"CNAME": "loop1.example"},
    "a.b.deep.example": {"A": ["192.0.2.5"]},
}


def q(name: str, rtype: str) -> DnsQuery:
    return DnsQuery(name, RType(rtype))


def run(coro: Awaitable[T]) -> T:
    async def wrap() -> T:
        return await coro

    return asyncio.run(wrap())


@pytest.fixture(scope="module")
def zone() -> StaticZone:
    return StaticZone.from_mapping(ZONE)


# ---------------------------------------------------------------------------
# StaticZone


@pytest.mark.parametrize(
    ("name", "rtype", "outcome", "records"),
    [
        ("example.net", "MX", DnsOutcome.ANSWER, ("10 mx.example.net",)),
        ("EXAMPLE.NET.", "A", DnsOutcome.ANSWER, ("192.0.2.1",)),  # case, trailing dot
        ("mx.example.net", "AAAA", DnsOutcome.ANSWER, ("2001:db8::2",)),  # normalised
        ("192.0.2.10", "PTR", DnsOutcome.ANSWER, ("client.example.com",)),
        ("2001:db8::10", "PTR", DnsOutcome.ANSWER, ("client6.example.com",)),
        ("192.0.2.99", "PTR", DnsOutcome.NXDOMAIN, ()),
        ("gone.example", "A", DnsOutcome.NXDOMAIN, ()),
        ("gone.example", "MX", DnsOutcome.NXDOMAIN, ()),
        ("unlisted.example", "A", DnsOutcome.NXDOMAIN, ()),
        ("example.net", "AAAA", DnsOutcome.NODATA, ()),  # listed, no such type
        ("example.net", "TXT", DnsOutcome.NODATA, ()),
        ("deep.example", "A", DnsOutcome.NODATA, ()),  # empty non-terminal
        ("b.deep.example", "MX", DnsOutcome.NODATA, ()),
        ("example", "A", DnsOutcome.NODATA, ()),  # ancestor up to the top
        ("broken.example", "A", DnsOutcome.SERVFAIL, ()),
        ("broken.example", "MX", DnsOutcome.SERVFAIL, ()),
        ("half.example", "MX", DnsOutcome.SERVFAIL, ()),
        ("half.example", "A", DnsOutcome.ANSWER, ("192.0.2.3",)),
        ("slow.example", "TXT", DnsOutcome.TIMEOUT, ()),
        ("slowmx.example", "MX", DnsOutcome.TIMEOUT, ()),  # type names without case
        ("slowmx.example", "A", DnsOutcome.ANSWER, ("192.0.2.4",)),
        ("nullmx.example", "MX", DnsOutcome.ANSWER, ("0 .",)),
        ("txt.example", "TXT", DnsOutcome.ANSWER, ("v=spf1 -all", 'with "quotes"')),
        ("alias.example", "MX", DnsOutcome.ANSWER, ("10 mx.example.net",)),  # CNAME chased
        ("alias.example", "AAAA", DnsOutcome.NODATA, ()),
        ("dangling.example", "A", DnsOutcome.NXDOMAIN, ()),
        ("loop1.example", "A", DnsOutcome.SERVFAIL, ()),
    ],
)
def test_static_zone_lookup(
    zone: StaticZone, name: str, rtype: str, outcome: DnsOutcome, records: tuple[str, ...]
) -> None:
    result = zone.lookup(q(name, rtype))
    assert (result.outcome, result.records) == (outcome, records)
    assert run(zone.resolve(q(name, rtype))) == result


def test_static_zone_is_a_resolver(zone: StaticZone) -> None:
    assert isinstance(zone, Resolver)
    queries = [q("example.net", "MX"), q("gone.example", "A")]
    assert run(zone.resolve_all(queries)) == {x: zone.lookup(x) for x in queries}


def test_static_zone_trace_reports_cname_chain(zone: StaticZone) -> None:
    found = zone.trace("alias.example", "MX")
    assert found.cnames == (("alias.example", "example.net"),)
    assert found.owner == "example.net"


def test_null_mx_is_recognised(zone: StaticZone) -> None:
    assert zone.lookup(q("nullmx.example", "MX")).null_mx


def test_nxdomain_name_gives_its_ancestors_no_existence() -> None:
    z = StaticZone.from_mapping({"gone.example": {"nxdomain": True}})
    assert z.lookup(q("example", "A")).outcome is DnsOutcome.NXDOMAIN


def test_bare_string_entry_and_single_string_values() -> None:
    z = StaticZone.from_mapping({"gone.example": "nxdomain", "x.example": {"A": "192.0.2.1"}})
    assert z.lookup(q("gone.example", "A")).outcome is DnsOutcome.NXDOMAIN
    assert z.lookup(q("x.example", "A")).records == ("192.0.2.1",)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"x.example": {"A": ["300.1.2.3"]}}, '"x.example".A', "IPv4"),
        ({"x.example": {"A": ["2001:db8::1"]}}, '"x.example".A', "IPv4"),
        ({"x.example": {"AAAA": ["192.0.2.1"]}}, '"x.example".AAAA', "IPv6"),
        ({"x.example": {"MX": ["mx.example"]}}, '"x.example".MX', "PREFERENCE HOST"),
        ({"x.example": {"MX": ["ten mx.example"]}}, '"x.example".MX', "preference"),
        ({"x.example": {"MX": ["70000 mx.example"]}}, '"x.example".MX', "preference"),
        ({"x.example": {"MX": ["10 bad..name"]}}, '"x.example".MX', "host name"),
        ({"x.example": {"PTR": [""]}}, '"x.example".PTR', "empty"),
        ({"x.example": {"SRV": ["0 0 25 a.example"]}}, '"x.example".SRV', "unknown key"),
        ({"x.example": {"servfail": ["SRV"]}}, '"x.example".servfail', "SRV"),
        ({"x.example": {"timeout": "yes please"}}, '"x.example".timeout', "unknown record type"),
        ({"x.example": {"A": [1]}}, '"x.example".A', "string"),
        ({"x.example": ["A"]}, '"x.example"', "object"),
        ({"bad..name": {}}, '"bad..name"', "domain name"),
        ({"x.example": {}, "X.Example.": {}}, '"X.Example."', "same name"),
        ({"x.example": {"CNAME": ["a.example", "b.example"]}}, '"x.example".CNAME', "one CNAME"),
        ({"x.example": {"CNAME": "a.example", "A": ["192.0.2.1"]}}, '"x.example".CNAME', "beside"),
        ({"x.example": {"nxdomain": True, "A": ["192.0.2.1"]}}, '"x.example".nxdomain', "A"),
    ],
)
def test_zone_errors_name_key_and_reason(data: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ZoneError) as info:
        StaticZone.from_mapping(data, source="case.json: dns")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.source == "case.json: dns"
    assert err.key == key
    assert words in err.reason
    assert str(err) == f"case.json: dns: {key}: {err.reason}"


def test_zone_must_be_an_object() -> None:
    with pytest.raises(ZoneError, match="object of names"):
        StaticZone.from_mapping([], source="z.json")  # type: ignore[arg-type]


def test_to_mapping_round_trips(zone: StaticZone) -> None:
    data = zone.to_mapping()
    json.dumps(data)  # JSON-ready
    assert StaticZone.from_mapping(data) == zone
    assert data["192.0.2.10"] == {"PTR": ["client.example.com"]}  # IP keys stay IP keys
    assert data["alias.example"] == {"CNAME": "example.net"}
    assert data["half.example"] == {"A": ["192.0.2.3"], "servfail": ["MX"]}
    assert data["gone.example"] == {"nxdomain": True}


def test_from_results_answers_exactly_those_results() -> None:
    results = {
        q("example.net", "MX"): DnsResult.answer("10 mx.example.net"),
        q("example.net", "AAAA"): DnsResult(DnsOutcome.NODATA),
        q("example.net", "TXT"): DnsResult(DnsOutcome.TIMEOUT),
        q("mx.example.net", "A"): DnsResult.answer("192.0.2.2"),
        q("mx.example.net", "AAAA"): DnsResult(DnsOutcome.SERVFAIL),
        q("gone.example", "MX"): DnsResult(DnsOutcome.NXDOMAIN),
        q("gone.example", "A"): DnsResult(DnsOutcome.NXDOMAIN),
        q("odd.example", "MX"): DnsResult(DnsOutcome.NXDOMAIN),  # NXDOMAIN for one type
        q("odd.example", "A"): DnsResult.answer("192.0.2.9"),  # but an answer for another
        q("nodata.example", "A"): DnsResult(DnsOutcome.NODATA),
        q("192.0.2.10", "PTR"): DnsResult.answer("client.example.com"),
        q("2001:db8::10", "PTR"): DnsResult(DnsOutcome.NXDOMAIN),
    }
    captured = StaticZone.from_results(results)
    for query, result in results.items():
        assert captured.lookup(query) == result, query
    # and it survives the trip through JSON, as a replay case's dns object
    again = StaticZone.from_mapping(json.loads(json.dumps(captured.to_mapping())))
    for query, result in results.items():
        assert again.lookup(query) == result, query
    assert captured.to_mapping()["gone.example"] == {"nxdomain": True}
    assert captured.to_mapping()["odd.example"] == {"A": ["192.0.2.9"], "nxdomain": ["MX"]}


def test_from_results_refuses_what_a_zone_cannot_say() -> None:
    with pytest.raises(ZoneError):
        StaticZone.from_results({q("192.0.2.1", "A"): DnsResult(DnsOutcome.NXDOMAIN)})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ns.example", "not an IP address"),
        ("192.0.2.1:0", "bad port '0'"),
        ("192.0.2.1:x", "bad port 'x'"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':PORT' after ']'"),
    ],
)
def test_parse_nameserver_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_nameserver(text)


# ---------------------------------------------------------------------------
# LiveResolver against a real server on 127.0.0.1

#: for questions that are meant to time out; others get a generous one so a
#: busy machine cannot turn an answer into a timeout
TIMEOUT = 0.3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(zone: StaticZone) -> Iterator[ZoneServer]:
    with ZoneServer(zone).run_in_thread() as srv:
        yield srv


def asked(server: ZoneServer) -> list[tuple[str, str]]:
    """The (name, type) questions the server received, in order."""
    return [(x.name, x.rtype) for x in server.queries]


def live(*servers: ZoneServer | str, **kw: Any) -> LiveResolver:
    names = [s.nameserver if isinstance(s, ZoneServer) else s for s in servers]
    kw.setdefault("timeout", 2.0)
    return LiveResolver(names, **kw)


def test_live_answers_match_the_static_zone(zone: StaticZone, server: ZoneServer) -> None:
    resolver = live(server)
    assert isinstance(resolver, Resolver)
    queries = [
        q("example.net", "MX"),
        q("Example.Net", "A"),
        q("mx.example.net", "AAAA"),
        q("192.0.2.10", "PTR"),
        q("2001:db8::10", "PTR"),
        q("gone.example", "A"),
        q("unlisted.example", "MX"),
        q("example.net", "TXT"),
        q("deep.example", "A"),
        q("broken.example", "A"),
        q("half.example", "MX"),
        q("half.example", "A"),
        q("nullmx.example", "MX"),
        q("txt.example", "TXT"),
        q("alias.example", "MX"),
        q("dangling.example", "A"),
    ]
    results = run(resolver.resolve_all(queries))
    for query in queries:
        expected = zone.lookup(query)
        got = results[query]
        assert got.outcome is expected.outcome, query
        assert sorted(got.records) == sorted(expected.records), query


def test_live_timeout_is_temporary(server: ZoneServer) -> None:
    resolver = live(server, timeout=TIMEOUT)
    started = time.monotonic()
    result = run(resolver.resolve(q("slow.example", "A")))
    assert result.outcome is DnsOutcome.TIMEOUT and result.outcome.temporary
    assert time.monotonic() - started < 5 * TIMEOUT


def test_live_asks_ptr_with_the_reverse_name(server: ZoneServer) -> None:
    run(live(server).resolve(q("192.0.2.10", "PTR")))
    assert asked(server) == [("10.2.0.192.in-addr.arpa", "PTR")]


def test_live_falls_back_to_tcp_for_large_answers() -> None:
    big = StaticZone.from_mapping({"big.example": {"TXT": [f"{'x' * 200}{i}" for i in range(20)]}})
    with ZoneServer(big).run_in_thread() as srv:
        result = run(live(srv).resolve(q("big.example", "TXT")))
        assert result.outcome is DnsOutcome.ANSWER and len(result.records) == 20
        assert [x.transport for x in srv.queries] == ["udp", "tcp"]


def test_nameservers_are_tried_in_order_first_answer_wins() -> None:
    internal = StaticZone.from_mapping({"corp.example": {"MX": ["10 internal.corp.example"]}})
    public = StaticZone.from_mapping({"corp.example": {"MX": ["10 public.corp.example"]}})
    with (
        ZoneServer(internal).run_in_thread() as first,
        ZoneServer(public).run_in_thread() as second,
    ):
        result = run(live(first, second).resolve(q("corp.example", "MX")))
        assert result.records == ("10 internal.corp.example",)
        assert second.queries == ()
        # a negative answer from the first is an answer too: no fall-through
        result = run(live(first, second).resolve(q("other.example", "MX")))
        assert result.outcome is DnsOutcome.NXDOMAIN
        assert second.queries == ()


@pytest.mark.parametrize("failure", ["servfail", "timeout"])
def test_falls_through_when_the_first_fails(failure: str) -> None:
    bad = StaticZone.from_mapping({"example.net": {failure: True}})
    good = StaticZone.from_mapping({"example.net": {"MX": ["10 mx.example.net"]}})
    with ZoneServer(bad).run_in_thread() as first, ZoneServer(good).run_in_thread() as second:
        result = run(live(first, second, timeout=TIMEOUT).resolve(q("example.net", "MX")))
        assert result.records == ("10 mx.example.net",)
        assert len(first.queries) == 1 and len(second.queries) == 1


def test_falls_through_an_unreachable_server(server: ZoneServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, never answers
        result = run(live(dead, server, timeout=TIMEOUT).resolve(q("example.net", "MX")))
    assert result.records == ("10 mx.example.net",)


def test_all_servers_timing_out_is_timeout_any_servfail_is_servfail() -> None:
    slow = StaticZone.from_mapping({"example.net": {"timeout": True}})
    broken = StaticZone.from_mapping({"example.net": {"servfail": True}})
    with (
        ZoneServer(slow).run_in_thread() as s1,
        ZoneServer(slow).run_in_thread() as s2,
        ZoneServer(broken).run_in_thread() as s3,
    ):
        fast = {"timeout": TIMEOUT}
        assert (
            run(live(s1, s2, **fast).resolve(q("example.net", "A"))).outcome is DnsOutcome.TIMEOUT
        )
        assert (
            run(live(s1, s3, **fast).resolve(q("example.net", "A"))).outcome is DnsOutcome.SERVFAIL
        )
        assert run(live(s3).resolve(q("example.net", "A"))).outcome is DnsOutcome.SERVFAIL


def test_cache_hits_do_not_ask_again(server: ZoneServer) -> None:
    clock = FakeClock()
    resolver = live(server, clock=clock)
    first = run(resolver.resolve(q("example.net", "MX")))
    again = run(resolver.resolve(q("EXAMPLE.net.", "MX")))
    assert first == again
    assert len(server.queries) == 1
    clock.now += 299  # the server's TTL is 300
    run(resolver.resolve(q("example.net", "MX")))
    assert len(server.queries) == 1
    clock.now += 2
    run(resolver.resolve(q("example.net", "MX")))
    assert len(server.queries) == 2


def test_resolve_all_mixes_cached_answers_and_new_questions_in_order(
    server: ZoneServer,
) -> None:
    resolver = live(server)
    cached = [q("example.net", "MX"), q("example.net", "A")]
    run(resolver.resolve_all(cached))
    assert len(server.queries) == 2
    asked = [q("mx.example.net", "AAAA"), *cached, q("192.0.2.10", "PTR"), q("example.net", "A")]
    results = run(resolver.resolve_all(asked))
    assert list(results) == asked[:4]  # each once, in the order asked
    assert len(server.queries) == 4  # only the two not cached went out
    assert results == {x: run(resolver.resolve(x)) for x in asked}
    assert len(server.queries) == 4
    run(resolver.resolve_all([q("gone.example", "A")]))  # one miss alone
    assert len(server.queries) == 5


def test_concurrent_questions_share_one_request(server: ZoneServer) -> None:
    resolver = live(server)

    async def both() -> list[DnsResult]:
        return list(
            await asyncio.gather(*(resolver.resolve(q("example.net", "A")) for _ in range(5)))
        )

    results = run(both())
    assert len({r.records for r in results}) == 1
    assert len(server.queries) == 1


def test_negative_answers_are_cached_for_the_soa_minimum(zone: StaticZone) -> None:
    clock = FakeClock()
    with ZoneServer(zone, negative_ttl=30).run_in_thread() as srv:
        resolver = live(srv, clock=clock)
        for query in (q("gone.example", "MX"), q("example.net", "AAAA")):
            assert run(resolver.resolve(query)).outcome.not_found
            run(resolver.resolve(query))
        assert len(srv.queries) == 2
        clock.now += 31
        run(resolver.resolve(q("gone.example", "MX")))
        assert len(srv.queries) == 3


def test_failures_are_not_cached(server: ZoneServer) -> None:
    resolver = live(server)
    for _ in range(2):
        assert run(resolver.resolve(q("broken.example", "A"))).outcome is DnsOutcome.SERVFAIL
    assert len(server.queries) == 2
    assert len(resolver) == 0


def test_failures_may_be_cached_briefly(server: ZoneServer) -> None:
    clock = FakeClock()
    resolver = live(server, clock=clock, failure_ttl=5)
    for _ in range(2):
        run(resolver.resolve(q("broken.example", "A")))
    assert len(server.queries) == 1
    clock.now += 6
    run(resolver.resolve(q("broken.example", "A")))
    assert len(server.queries) == 2


def test_cache_is_bounded_least_recently_used_first(server: ZoneServer) -> None:
    resolver = live(server, max_entries=2)
    a, b, c = q("example.net", "A"), q("example.net", "MX"), q("mx.example.net", "A")
    run(resolver.resolve(a))
    run(resolver.resolve(b))
    run(resolver.resolve(a))  # a is now the most recently used
    run(resolver.resolve(c))  # evicts b
    assert len(resolver) == 2
    server.clear()
    run(resolver.resolve(a))
    assert asked(server) == []
    run(resolver.resolve(b))
    assert asked(server) == [("example.net", "MX")]


def test_malformed_names_are_nxdomain_without_asking(server: ZoneServer) -> None:
    resolver = live(server)
    for name in ("a..example", "x" * 64 + ".example"):
        assert run(resolver.resolve(q(name, "A"))).outcome is DnsOutcome.NXDOMAIN
    assert server.queries == ()


@pytest.mark.parametrize("path", ["fast", "dnspython"])
def test_unexpected_errors_are_servfail_never_permanent(
    server: ZoneServer, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    import dns.message

    from mailpolicy.adapters import dnswire

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    # reading the reply fails (the server, in this process, uses neither)
    if path == "fast":
        monkeypatch.setattr(dnswire, "read", broken)
    else:
        monkeypatch.setattr(dnswire, "read", lambda data, question: None)
        monkeypatch.setattr(dns.message.QueryMessage, "resolve_chaining", broken)
    result = run(live(server).resolve(q("example.net", "MX")))
    assert result.outcome is DnsOutcome.SERVFAIL


def test_no_nameservers_at_all_is_servfail() -> None:
    resolver = LiveResolver(timeout=TIMEOUT)
    resolver._servers = ()  # as if resolv.conf listed none
    assert run(resolver.resolve(q("example.net", "MX"))).outcome is DnsOutcome.SERVFAIL


def test_from_settings(server: ZoneServer) -> None:
    resolver = LiveResolver.from_settings(
        DnsSettings(nameservers=(server.nameserver,), timeout_seconds=2)
    )
    assert resolver.nameservers == (("127.0.0.1", server.port),)
    assert resolver.timeout == 2.0
    assert run(resolver.resolve(q("example.net", "A"))).records == ("192.0.2.1",)
    with pytest.raises(ValueError, match="not an IP address"):
        LiveResolver.from_settings(DnsSettings(nameservers=("not an ip",)))


def test_zone_server_async_context_and_silence_for_garbage(zone: StaticZone) -> None:
    async def go() -> None:
        async with ZoneServer(zone) as srv:
            assert srv.port > 0
            assert srv.reply(b"not dns") is None
            result = await live(srv).resolve(q("example.net", "A"))
            assert result.records == ("192.0.2.1",)

    run(go())


# ---------------------------------------------------------------------------
# mailpolicy route, end to end

POLICY = """\
[general]
hostname = "mx.example.com"
local_domains = ["example.com"]
external_postmasters = ["admin@example.org"]

[[delivery.exceptions]]
name = "partners"
match = "recipient"
targets = ["partner.example"]
host = "gw.partner.example"
port = 587
security = "starttls"

[relay]
inbound_domains = ["corp.example"]
"""

CLI_ZONE = {
    "example.net": {"MX": ["10 mx1.example.net", "10 mx2.example.net", "20 backup.example.net"]},
    "example.org": {"MX": ["10 mail.example.org"]},
    "corp.example": {"MX": ["10 exchange.corp.example"]},
    "nullmx.example": {"MX": ["0 ."]},
    "broken.example": {"servfail": True},
}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps(CLI_ZONE))
    return policy, zone


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main(list(argv))
        except SystemExit as exc:  # argparse
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def test_cli_route_json(files: tuple[Path, Path]) -> None:
    policy, zone = files
    status, out, err = cli(
        "route", "--policy", str(policy), "--dns", str(zone), "--seed", "3", "--json",
        "--from", "alice@example.com",
        "bob@example.com", "carol@example.net", "dave@partner.example", "eve@corp.example",
        "postmaster@example.com",
    )  # fmt: skip
    assert (status, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["recipient"] for x in lines] == [
        "bob@example.com",
        "carol@example.net",
        "dave@partner.example",
        "eve@corp.example",
        "postmaster@example.com",
    ]
    assert lines[0] == {
        "recipient": "bob@example.com",
        "kind": "local",
        "mailbox": "bob@example.com",
        "reason": lines[0]["reason"],
    }
    carol = lines[1]
    assert carol["kind"] == "smtp"
    assert {h["host"] for h in carol["next_hops"][:2]} == {"mx1.example.net", "mx2.example.net"}
    assert carol["next_hops"][2] == {"host": "backup.example.net", "port": 25, "security": "may"}
    assert lines[2]["next_hops"] == [
        {"host": "gw.partner.example", "port": 587, "security": "starttls"}
    ]
    assert lines[3]["next_hops"][0]["host"] == "exchange.corp.example"
    assert lines[4]["mailbox"] == "admin@example.org"
    assert all(x["reason"] for x in lines)
    # the seed makes the order repeatable
    assert cli(
        "route", "--policy", str(policy), "--dns", str(zone), "--seed", "3", "--json",
        "--from", "alice@example.com", "bob@example.com", "carol@example.net",
        "dave@partner.example", "eve@corp.example", "postmaster@example.com",
    )[1] == out  # fmt: skip


def test_cli_route_errors_exit_1(files: tuple[Path, Path]) -> None:
    policy, zone = files
    status, out, _ = cli(
        "route", "--policy", str(policy), "--dns", str(zone), "--json", "--from", "",
        "x@nullmx.example", "y@broken.example",
    )  # fmt: skip
    assert status == 1
    null, broken = (json.loads(line) for line in out.splitlines())
    assert null["kind"] == "error"
    assert null["error"] == {
        "code": 556,
        "enhanced": "5.1.10",
        "text": null["error"]["text"],
        "temporary": False,
    }
    assert broken["error"]["temporary"] is True and broken["error"]["code"] == 451
    assert "next_hops" not in null and "mailbox" not in null


def test_cli_route_text(files: tuple[Path, Path]) -> None:
    policy, zone = files
    status, out, _ = cli(
        "route", "--policy", str(policy), "--dns", str(zone), "--from", "a@example.com",
        "bob@example.com", "eve@corp.example",
    )  # fmt: skip
    assert status == 0
    assert out.splitlines()[0] == "bob@example.com: local bob@example.com"
    assert out.splitlines()[2] == "eve@corp.example: smtp exchange.corp.example:25 (may)"


def test_cli_route_live_resolver_from_policy(tmp_path: Path) -> None:
    with ZoneServer(StaticZone.from_mapping(CLI_ZONE)).run_in_thread() as srv:
        live_policy = tmp_path / "live.toml"
        live_policy.write_text(
            POLICY + f'\n[dns]\nnameservers = ["{srv.nameserver}"]\ntimeout_seconds = 1\n'
        )
        status, out, _ = cli(
            "route", "--policy", str(live_policy), "--json", "--from", "a@example.com",
            "eve@corp.example",
        )  # fmt: skip
        assert status == 0
        assert json.loads(out)["next_hops"][0]["host"] == "exchange.corp.example"
        assert asked(srv) == [("corp.example", "MX")]


def test_cli_route_policy_and_zone_errors_exit_2(files: tuple[Path, Path], tmp_path: Path) -> None:
    policy, _ = files
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text('[delivery]\nmode = "sideways"\n')
    status, _, err = cli("route", "--policy", str(bad_policy), "--from", "", "a@example.net")
    assert status == 2 and str(bad_policy) in err and "delivery.mode" in err

    bad_zone = tmp_path / "bad.json"
    bad_zone.write_text(json.dumps({"x.example": {"A": ["999.0.0.1"]}}))
    status, _, err = cli(
        "route", "--policy", str(policy), "--dns", str(bad_zone), "--from", "", "a@x.example"
    )
    assert status == 2
    assert err.strip().startswith(f'{bad_zone}: "x.example".A:')

    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    status, _, err = cli(
        "route", "--policy", str(policy), "--dns", str(not_json), "--from", "", "a@x.example"
    )
    assert status == 2 and str(not_json) in err

    status, _, _ = cli("route", "--policy", str(policy), "a@x.example")  # no --from
    assert status == 2


def test_cli_route_accepts_a_whole_replay_case_as_zone(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    policy, _ = files
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"dns": CLI_ZONE, "session": []}))
    status, out, _ = cli(
        "route", "--policy", str(policy), "--dns", str(case), "--json", "--from", "",
        "eve@corp.example",
    )  # fmt: skip
    assert status == 0 and json.loads(out)["kind"] == "smtp"


def test_live_ignores_strays_until_its_own_answer_comes() -> None:
    import socket
    import threading

    import dns.message
    import dns.rrset

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(5)

    def serve() -> None:
        data, peer = udp.recvfrom(2048)
        query = dns.message.from_wire(data)
        answer = dns.message.make_response(query)
        answer.answer.append(
            dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "192.0.2.9")
        )
        udp.sendto(b"not a DNS message", peer)
        wrong = dns.message.make_response(query)
        wrong.id = (query.id + 1) % 65536  # an answer to another question
        wrong.answer.append(
            dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "203.0.113.66")
        )
        udp.sendto(wrong.to_wire(), peer)
        udp.sendto(answer.to_wire(), peer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        host, port = udp.getsockname()
        result = run(live(f"{host}:{port}").resolve(q("stray.example", "A")))
    finally:
        thread.join()
        udp.close()
    assert (result.outcome, result.records) == (DnsOutcome.ANSWER, ("192.0.2.9",))


def test_a_question_answered_as_resolve_all_begins_is_not_asked_again(
    server: ZoneServer,
) -> None:
    # Nothing is kept (TTL 0), as in serve.py's benchmark: the answer to a
    # question in flight must reach whoever joined it, or they ask again.
    resolver = live(server, max_ttl=0)
    ptr, mx = q("192.0.2.10", "PTR"), q("example.net", "MX")

    async def main() -> tuple[DnsResult, dict[DnsQuery, DnsResult]]:
        ahead = resolver.start(ptr)  # sent now, as serve asks it on connect
        time.sleep(0.3)  # its answer waits in the socket, not read yet
        both = asyncio.ensure_future(resolver.resolve_all([ptr, mx]))
        # one loop iteration: resolve_all begins, then the answer is read
        return await ahead, await both

    first, results = run(main())
    assert first.found
    assert results == {ptr: first, mx: results[mx]}
    assert results[mx].found
    assert sorted(rtype for _, rtype in asked(server)) == ["MX", "PTR"]


def test_cancelling_resolve_all_stops_its_own_waiting_only(server: ZoneServer) -> None:
    resolver = live(server, max_ttl=0)
    mx, a = q("example.net", "MX"), q("example.net", "A")

    async def main() -> tuple[bool, DnsResult, DnsResult]:
        other = asyncio.ensure_future(resolver.resolve(mx))
        await asyncio.sleep(0)  # the other caller asks first
        mine = asyncio.ensure_future(resolver.resolve_all([mx, a]))
        await asyncio.sleep(0)  # mine joins the MX and sends the A
        mine.cancel()
        await asyncio.wait([mine])
        # the questions still settle for whoever shares them
        return mine.cancelled(), await other, await resolver.resolve(a)

    cancelled, shared, later = run(main())
    assert cancelled
    assert shared.found
    assert later.found
    assert sorted(rtype for _, rtype in asked(server)).count("MX") == 1
