"""List lookups: Postfix access-map order, and agreement with a naive scan."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailpolicy.addresses import Address, parse_address
from mailpolicy.lookup import AccessTable, DomainTable, NetworkTable
from mailpolicy.model import IPAddress, IPNetwork


class _CountingDict(dict[Any, Any]):
    """A dict that counts probes and refuses to be scanned."""

    probes = 0

    def get(self, key: Any, default: Any = None) -> Any:
        type(self).probes += 1
        return super().get(key, default)

    def __iter__(self) -> Any:
        raise AssertionError("a lookup scanned the table")

    def keys(self) -> Any:
        raise AssertionError("a lookup scanned the table")

    def values(self) -> Any:
        raise AssertionError("a lookup scanned the table")

    def items(self) -> Any:
        raise AssertionError("a lookup scanned the table")


# ---------------------------------------------------------------------------
# DomainTable


def test_domain_table_parents_most_specific_first() -> None:
    table = DomainTable([("example.com", 1), ("mail.example.com", 2), ("com", 3), ("other.org", 4)])
    assert table.matches("a.mail.example.com") == [
        ("mail.example.com", 2),
        ("example.com", 1),
        ("com", 3),
    ]
    assert table.matches("example.com") == [("example.com", 1), ("com", 3)]
    assert table.matches("example.org") == []
    assert table.matches("notexample.com") == [("com", 3)]  # whole labels only
    assert table.matches("") == []


def test_domain_table_case_and_trailing_dot() -> None:
    table = DomainTable([("Example.COM.", 7)])
    assert table.matches("MAIL.example.com.") == [("example.com", 7)]
    assert table.matches("example.com") == [("example.com", 7)]


def test_domain_table_several_ordinals_keep_insertion_order() -> None:
    table = DomainTable([("spam.example", 5), ("spam.example", 2), ("x.spam.example", 9)])
    table.add("spam.example", 7)
    assert table.matches("x.spam.example") == [
        ("x.spam.example", 9),
        ("spam.example", 5),
        ("spam.example", 2),
        ("spam.example", 7),
    ]
    assert len(table) == 2


def test_domain_table_literals_and_single_labels() -> None:
    table = DomainTable([("[192.0.2.1]", 1), ("localhost", 2), ("1", 3)])
    assert table.matches("[192.0.2.1]") == [("[192.0.2.1]", 1)]
    assert table.matches("localhost") == [("localhost", 2)]
    assert table.matches("[10.0.0.1]") == []  # a literal has no parents


def test_domain_table_empty() -> None:
    table = DomainTable()
    assert not table and len(table) == 0
    assert table.matches("example.com") == []


def test_domain_table_never_scans() -> None:
    table = DomainTable((f"host{i}.example.com", i) for i in range(1000))
    counting = _CountingDict(table._table)
    table._table = counting
    _CountingDict.probes = 0
    assert table.matches("a.b.host5.example.com") == [("host5.example.com", 5)]
    assert _CountingDict.probes == 5  # one probe per label


# ---------------------------------------------------------------------------
# AccessTable


def test_access_table_postfix_order() -> None:
    table = AccessTable(
        [
            ("user@", 1),
            ("example.com", 2),
            ("user@mail.example.com", 3),
            ("mail.example.com", 4),
            ("com", 5),
            ("other@", 6),
            ("<>", 7),
        ]
    )
    assert table.matches(Address("user", "mail.example.com")) == [
        ("user@mail.example.com", 3),
        ("mail.example.com", 4),
        ("example.com", 2),
        ("com", 5),
        ("user@", 1),
    ]
    assert table.matches(Address("other", "example.org")) == [("other@", 6)]
    assert table.matches(Address("x", "example.org")) == []


def test_access_table_null_sender_looks_up_only_the_null_key() -> None:
    table = AccessTable([("<>", 1), ("@", 2), ("", 3)])
    assert table.matches(Address("")) == [("<>", 1)]
    assert AccessTable([("example.com", 1)]).matches(Address("")) == []


def test_access_table_case_insensitive() -> None:
    table = AccessTable([("Bob@Example.COM", 1), ("ALICE@", 2), ("Spam.Example.", 3)])
    assert table.matches(Address("bob", "example.com")) == [("bob@example.com", 1)]
    assert table.matches(Address("BOB", "EXAMPLE.COM")) == [("bob@example.com", 1)]
    assert table.matches(Address("Alice", "x.example")) == [("alice@", 2)]
    assert table.matches(Address("u", "SUB.SPAM.example")) == [("spam.example", 3)]


def test_access_table_domain_matches_subdomains_but_not_lookalikes() -> None:
    table = AccessTable([("spam.example", 1)])
    assert table.matches(parse_address("a@sub.spam.example")) == [("spam.example", 1)]
    assert table.matches(parse_address("a@notspam.example")) == []


def test_access_table_addresses_without_domain() -> None:
    table = AccessTable([("postmaster@", 1), ("postmaster", 2)])
    # only the local-part key: a bare name is never taken for a domain
    assert table.matches(Address("postmaster")) == [("postmaster@", 1)]


def test_access_table_unquoted_keys() -> None:
    # keys are in Postfix's internal, unquoted form
    table = AccessTable([("a b@x.example", 1), ("user@other@", 2)])
    assert table.matches(parse_address('"a b"@x.example')) == [("a b@x.example", 1)]
    assert table.matches(parse_address('"user@other"@x.example')) == [("user@other@", 2)]


def test_access_table_literal_domain() -> None:
    table = AccessTable([("[192.0.2.1]", 1), ("u@[192.0.2.1]", 2)])
    assert table.matches(Address("u", "[192.0.2.1]")) == [("u@[192.0.2.1]", 2), ("[192.0.2.1]", 1)]


def test_access_table_never_scans() -> None:
    table = AccessTable((f"user{i}@example.com", i) for i in range(1000))
    table._table = _CountingDict(table._table)
    _CountingDict.probes = 0
    assert table.matches(Address("user7", "a.example.com")) == []
    # full address, three domains, local part
    assert _CountingDict.probes == 5


# ---------------------------------------------------------------------------
# NetworkTable


def _nets(*texts: str) -> list[IPNetwork]:
    return [ipaddress.ip_network(t) for t in texts]


def test_network_table_ipv4() -> None:
    n1, n2, n3, n4 = _nets("192.0.2.0/24", "192.0.2.128/25", "192.0.2.10/32", "10.0.0.0/8")
    table = NetworkTable([(n1, 1), (n2, 2), (n3, 3), (n4, 4)])
    assert table.matches(ipaddress.ip_address("192.0.2.10")) == [(n3, 3), (n1, 1)]
    assert table.matches("192.0.2.200") == [(n2, 2), (n1, 1)]
    assert table.matches("10.255.0.1") == [(n4, 4)]
    assert table.matches("198.51.100.1") == []
    assert len(table) == 4


def test_network_table_ipv6_and_families_apart() -> None:
    v6, v4, host = _nets("2001:db8::/32", "0.0.0.0/0", "2001:db8::10/128")
    table = NetworkTable([(v6, 1), (v4, 2), (host, 3)])
    assert table.matches("2001:db8::10") == [(host, 3), (v6, 1)]
    assert table.matches("2001:db9::1") == []  # 0.0.0.0/0 is IPv4 only
    assert table.matches("203.0.113.9") == [(v4, 2)]


def test_network_table_ipv4_mapped_client() -> None:
    v4, mapped = _nets("192.0.2.0/24", "::ffff:0:0/96")
    table = NetworkTable([(v4, 1), (mapped, 2)])
    # Postfix turns ::ffff:192.0.2.1 into 192.0.2.1 before any lookup
    assert table.matches("::ffff:192.0.2.1") == [(v4, 1)]


def test_network_table_duplicates_and_add() -> None:
    (net,) = _nets("192.0.2.0/24")
    table = NetworkTable([(net, 3), (net, 1)])
    table.add(ipaddress.ip_network("192.0.2.0/28"), 2)
    table.add(net, 0)
    assert table.matches("192.0.2.1") == [
        (ipaddress.ip_network("192.0.2.0/28"), 2),
        (net, 3),
        (net, 1),
        (net, 0),
    ]


def test_network_table_empty() -> None:
    table = NetworkTable()
    assert not table and len(table) == 0
    assert table.matches("192.0.2.1") == []
    assert table.matches("::1") == []


def test_network_table_probes_only_lengths_in_use() -> None:
    table = NetworkTable(
        (ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24"), i) for i in range(5000)
    )
    table.add(ipaddress.ip_network("10.0.0.0/8"), 99999)
    table._v4 = {length: _CountingDict(t) for length, t in table._v4.items()}
    _CountingDict.probes = 0
    assert [o for _, o in table.matches("10.0.7.1")] == [7, 99999]
    assert _CountingDict.probes == 2


# ---------------------------------------------------------------------------
# Agreement with naive scans on random data

_labels = st.sampled_from(["a", "b", "c", "example", "com", "mail", "x-y", "1"])
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join)


def _is_parent_or_self(key: str, domain: str) -> bool:
    return domain == key or domain.endswith("." + key)


@given(st.lists(st.tuples(_domains, st.integers(0, 20)), max_size=30), _domains)
def test_domain_table_agrees_with_scan(entries: list[tuple[str, int]], probe: str) -> None:
    table = DomainTable(entries)
    found = table.matches(probe)
    expected = [(k, o) for k, o in entries if _is_parent_or_self(k, probe)]
    # the same hits...
    assert sorted(found) == sorted(expected)
    # ...most specific key first, insertion order within a key
    keys = [k for k, _ in found]
    assert keys == sorted(keys, key=lambda k: -k.count("."))
    for key in set(keys):
        assert [o for k, o in found if k == key] == [o for k, o in entries if k == key]


_locals = st.sampled_from(["u", "bob", "a.b", "x+y"])
_keys = st.one_of(
    _domains,
    st.builds(lambda local, domain: f"{local}@{domain}", _locals, _domains),
    _locals.map(lambda local: local + "@"),
    st.just("<>"),
)
_probes = st.one_of(st.builds(Address, _locals, _domains), st.just(Address("")))


def _access_reference(entries: list[tuple[str, int]], address: Address) -> list[tuple[str, int]]:
    """Postfix's order, by brute force over every entry."""
    if address.is_null:
        return [(k, o) for k, o in entries if k == "<>"]
    full = [(k, o) for k, o in entries if k == f"{address.local}@{address.domain}"]
    domains = sorted(
        (
            (k, o)
            for k, o in entries
            if "@" not in k and k != "<>" and _is_parent_or_self(k, address.domain)
        ),
        key=lambda hit: -hit[0].count("."),
    )
    local = [(k, o) for k, o in entries if k == address.local + "@"]
    return full + domains + local


@given(st.lists(st.tuples(_keys, st.integers(0, 20)), max_size=30), _probes)
def test_access_table_agrees_with_scan(entries: list[tuple[str, int]], probe: Address) -> None:
    assert AccessTable(entries).matches(probe) == _access_reference(entries, probe)


_v4_networks = st.builds(
    lambda ip, length: ipaddress.IPv4Network((int(ip) & ~((1 << (32 - length)) - 1), length)),
    st.ip_addresses(v=4, network="192.0.0.0/14"),
    st.integers(8, 32),
)
_v6_networks = st.builds(
    lambda ip, length: ipaddress.IPv6Network((int(ip) & ~((1 << (128 - length)) - 1), length)),
    st.ip_addresses(v=6, network="2001:db8::/120"),
    st.integers(96, 128),
)
_networks: st.SearchStrategy[IPNetwork] = st.one_of(_v4_networks, _v6_networks)
_ips: st.SearchStrategy[IPAddress] = st.one_of(
    st.ip_addresses(v=4, network="192.0.0.0/14"), st.ip_addresses(v=6, network="2001:db8::/120")
)


@given(st.lists(st.tuples(_networks, st.integers(0, 50)), max_size=40), _ips)
def test_network_table_agrees_with_ipaddress(
    entries: list[tuple[IPNetwork, int]], ip: IPAddress
) -> None:
    found = NetworkTable(entries).matches(ip)
    expected = [(n, o) for n, o in entries if n.version == ip.version and ip in n]
    assert sorted(found, key=repr) == sorted(expected, key=repr)
    lengths = [n.prefixlen for n, _ in found]
    assert lengths == sorted(lengths, reverse=True)


@given(
    st.lists(st.tuples(_v4_networks, st.integers(0, 50)), max_size=20),
    st.ip_addresses(v=4, network="192.0.0.0/14"),
)
def test_network_table_mapped_agrees_with_ipv4(
    entries: list[tuple[IPNetwork, int]], ip: ipaddress.IPv4Address
) -> None:
    table = NetworkTable(entries)
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert table.matches(mapped) == table.matches(ip)


@pytest.mark.parametrize("size", [100_000])
def test_big_tables_build_and_answer(size: int) -> None:
    domains = DomainTable((f"host{i}.example{i % 97}.com", i % 200) for i in range(size))
    assert domains.matches(f"x.host{size - 1}.example{(size - 1) % 97}.com") == [
        (f"host{size - 1}.example{(size - 1) % 97}.com", (size - 1) % 200)
    ]
    nets = NetworkTable((ipaddress.IPv4Network((i << 8, 24)), i % 200) for i in range(size))
    assert [o for _, o in nets.matches(ipaddress.IPv4Address(((size - 1) << 8) + 5))] == [
        (size - 1) % 200
    ]
