"""List lookups that never scan.

Theory of operation
-------------------
Black and white lists may hold millions of entries, so a lookup is a handful
of hash probes whatever the size of the list:

* :class:`DomainTable` probes the name and each parent domain (``a.b.c``,
  ``b.c``, ``c``): as many probes as the name has labels.
* :class:`AccessTable` probes as a Postfix access map does for
  ``check_sender_access``/``check_recipient_access``: the full address, the
  domain and its parents, then ``user@``; the null sender probes only ``<>``.
* :class:`NetworkTable` keeps one dict per (address family, prefix length),
  keyed by the network's address as an int, and probes only the prefix
  lengths that occur in the table: at most 33 probes for IPv4, 129 for IPv6,
  usually a few.

Values are small ints (rule ordinals), so one table serves every rule of a
list and the caller maps ordinals back to rules. To keep a million entries
small, a table stores plain ``str``/``int`` keys and, per key, either one
``int`` or (rarely) a tuple of them; no per-entry objects.

Keys and probes compare without case and without trailing dots. Keys are in
Postfix's internal (unquoted) form: the local part ``a b`` is written
``a b@example.com``, not ``"a b"@example.com``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, TypeAlias

from .addresses import Address
from .model import IPAddress, IPNetwork, Networks

__all__ = [
    "NULL_SENDER_KEY",
    "AccessTable",
    "DomainTable",
    "NetworkTable",
    "ip_key",
    "network_of",
]

#: The key that matches the null sender (Postfix's ``smtpd_null_access_lookup_key``).
NULL_SENDER_KEY: Final = "<>"

#: One ordinal, or several in insertion order (a key listed by several rules).
_Ordinals: TypeAlias = int | tuple[int, ...]


def _merge(old: _Ordinals | None, ordinal: int) -> _Ordinals:
    """The value stored for a key after adding ``ordinal``.

    One int per key keeps a million entries small; tuples are rare.
    """
    if old is None:
        return ordinal
    if isinstance(old, int):
        return (old, ordinal)
    return (*old, ordinal)


def _hits(table: dict[str, _Ordinals], key: str, out: list[tuple[str, int]]) -> None:
    found = table.get(key)
    if found is None:
        return
    if isinstance(found, int):
        out.append((key, found))
    else:
        out.extend((key, o) for o in found)


def _walk(table: dict[str, _Ordinals], name: str, out: list[tuple[str, int]]) -> None:
    """Probe ``name`` (lower case, no trailing dot) and each parent domain,
    as :func:`~mailpolicy.addresses.parent_domains` lists them, without
    building the list: one slice and one probe per label."""
    if not name:
        return
    found = table.get(name)
    if found is not None:
        _emit_key(out, name, found)
    if name[0] == "[":
        return  # an address literal has no parents
    dot = name.find(".")
    while dot >= 0:
        parent = name[dot + 1 :]
        found = table.get(parent)
        if found is not None:
            _emit_key(out, parent, found)
        dot = name.find(".", dot + 1)


def _emit_key(out: list[tuple[str, int]], key: str, found: _Ordinals) -> None:
    if type(found) is int:
        out.append((key, found))
    else:
        out.extend((key, o) for o in found)  # type: ignore[union-attr]


def _same_if_equal(value: str, original: str) -> str:
    """``value``, or ``original`` itself when they are equal: a million keys
    that are already normal then share the caller's strings."""
    return original if value == original else value


def _domain_key(domain: str) -> str:
    return _same_if_equal(domain.lower().rstrip("."), domain)


class DomainTable:
    """Domains, each matching itself and its subdomains.

    Built from ``(domain, ordinal)`` pairs; :meth:`matches` answers which
    entries cover a name.
    """

    __slots__ = ("_table",)

    def __init__(self, entries: Iterable[tuple[str, int]] = ()) -> None:
        self._table: dict[str, _Ordinals] = {}
        table = self._table
        for domain, ordinal in entries:
            key = _domain_key(domain)
            table[key] = _merge(table.get(key), ordinal)

    def add(self, domain: str, ordinal: int) -> None:
        """Add one entry."""
        key = _domain_key(domain)
        self._table[key] = _merge(self._table.get(key), ordinal)

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._table)

    def __bool__(self) -> bool:
        return bool(self._table)

    def matches(self, domain: str) -> list[tuple[str, int]]:
        """Every ``(key, ordinal)`` whose key is ``domain`` or one of its
        parent domains: most specific key first, and for one key the
        ordinals in insertion order."""
        out: list[tuple[str, int]] = []
        table = self._table
        if not table:
            return out
        _walk(table, domain.lower().rstrip("."), out)
        return out


def _access_key(key: str) -> str:
    """Normalize an access-map key: ``<>``, ``user@``, ``a@b`` or ``b``.

    Lower-casing the whole key is enough (Postfix folds case for the whole
    lookup); only a trailing dot on the domain needs dropping.
    """
    original = key
    key = key.strip().lower()
    if key.endswith("."):
        stripped = key.rstrip(".")
        # "a@." is no domain key: keep it as it is rather than make it "a@".
        if not stripped.endswith("@"):
            key = stripped
    return _same_if_equal(key, original)


class AccessTable:
    """Sender or recipient criteria with Postfix access-map semantics.

    A key is a full address ``a@b.example``, a domain ``b.example`` (which
    also matches its subdomains, as with Postfix's default
    ``parent_domain_matches_subdomains``), a local part ``user@`` (that local
    part at any domain) or ``<>`` (the null sender). One dict holds all four
    kinds: their forms cannot collide (only full addresses contain an ``@``
    before their last character, only local-part keys end with one).
    """

    __slots__ = ("_table",)

    def __init__(self, entries: Iterable[tuple[str, int]] = ()) -> None:
        self._table: dict[str, _Ordinals] = {}
        table = self._table
        for key, ordinal in entries:
            norm = _access_key(key)
            table[norm] = _merge(table.get(norm), ordinal)

    # No add() or __len__: the lists build each table once from all their
    # rules, and nothing counts keys (both were dead code, issue 17).

    def __bool__(self) -> bool:
        return bool(self._table)

    def matches(self, address: Address) -> list[tuple[str, int]]:
        """Every ``(key, ordinal)`` that matches ``address``, in Postfix's
        lookup order: the full address, the domain and its parents (most
        specific first), then ``user@``; for one key, insertion order.

        The null address looks up only ``<>``. An address without a domain
        looks up only ``user@`` (Postfix would first qualify it with
        ``$myorigin``; pass it qualified to get that).
        """
        out: list[tuple[str, int]] = []
        table = self._table
        if not table:
            return out
        if address.is_null:
            _hits(table, NULL_SENDER_KEY, out)
            return out
        local = address.local.lower()
        if address.domain:
            _hits(table, f"{local}@{address.domain}", out)
            _walk(table, address.domain.lower().rstrip("."), out)
        _hits(table, local + "@", out)
        return out


def ip_key(ip: IPAddress | str) -> tuple[int, int]:
    """``ip`` as a :class:`NetworkTable` key: ``(version, address as an int)``.

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is the IPv4 address,
    as Postfix looks such a client up.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if ip.version == 6:
        value = int(ip)
        if value >> 32 == 0xFFFF:
            return 4, value & 0xFFFFFFFF
        return 6, value
    return 4, int(ip)


class NetworkTable:
    """Client networks (IPv4 and IPv6) with per-prefix-length hash probes.

    Built from ``(network, ordinal)`` pairs (or, faster, from
    :class:`~mailpolicy.model.Networks` with :meth:`add_networks`). For each
    address family there is one dict per prefix length in use, keyed by the
    network address as an int; a lookup masks the client address once per
    prefix length present, longest first.
    """

    __slots__ = ("_probes4", "_probes6", "_tables4", "_tables6")

    def __init__(self, entries: Iterable[tuple[IPNetwork, int]] = ()) -> None:
        self._tables4: dict[int, dict[int, _Ordinals]] = {}
        self._tables6: dict[int, dict[int, _Ordinals]] = {}
        #: (prefix length, mask, table), longest prefix first
        self._probes4: tuple[tuple[int, int, dict[int, _Ordinals]], ...] = ()
        self._probes6: tuple[tuple[int, int, dict[int, _Ordinals]], ...] = ()
        v4, v6 = self._v4, self._v6
        for network, ordinal in entries:
            by_length = v4 if network.version == 4 else v6
            table = by_length.get(network.prefixlen)
            if table is None:
                table = by_length[network.prefixlen] = {}
            address = int(network.network_address)
            table[address] = _merge(table.get(address), ordinal)
        self._refresh()

    # The tables by prefix length, per family. Replacing one (tests count
    # probes that way) refreshes the probe order.

    @property
    def _v4(self) -> dict[int, dict[int, _Ordinals]]:
        return self._tables4

    @_v4.setter
    def _v4(self, tables: dict[int, dict[int, _Ordinals]]) -> None:
        self._tables4 = tables
        self._refresh()

    @property
    def _v6(self) -> dict[int, dict[int, _Ordinals]]:
        return self._tables6

    @_v6.setter
    def _v6(self, tables: dict[int, dict[int, _Ordinals]]) -> None:
        self._tables6 = tables
        self._refresh()

    def _refresh(self) -> None:
        # Longest prefix first: the most specific networks come out first.
        self._probes4 = tuple(
            (n, _V4_MASKS[n], self._v4[n]) for n in sorted(self._v4, reverse=True)
        )
        self._probes6 = tuple(
            (n, _V6_MASKS[n], self._v6[n]) for n in sorted(self._v6, reverse=True)
        )

    def add(self, network: IPNetwork, ordinal: int) -> None:
        """Add one entry."""
        by_length = self._v4 if network.version == 4 else self._v6
        table = by_length.setdefault(network.prefixlen, {})
        address = int(network.network_address)
        table[address] = _merge(table.get(address), ordinal)
        self._refresh()

    def add_networks(self, networks: Networks, ordinal: int) -> None:
        """Add every network of a compact :class:`~mailpolicy.model.Networks`
        under one ordinal, without making a network object for any."""
        for version, length, address in networks.entries():
            by_length = self._v4 if version == 4 else self._v6
            table = by_length.get(length)
            if table is None:
                table = by_length[length] = {}
            old = table.get(address)
            table[address] = ordinal if old is None else _merge(old, ordinal)
        self._refresh()

    def __len__(self) -> int:
        """The number of distinct networks."""
        return sum(len(t) for t in self._v4.values()) + sum(len(t) for t in self._v6.values())

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def hits(self, key: tuple[int, int]) -> list[tuple[int, int, int]]:
        """Every ``(ordinal, network address, prefix length)`` containing the
        address ``key`` (see :func:`ip_key`), longest prefix first: the raw
        form of :meth:`matches`, which makes no network object."""
        version, value = key
        out: list[tuple[int, int, int]] = []
        for length, mask, table in self._probes4 if version == 4 else self._probes6:
            masked = value & mask
            found = table.get(masked)
            if found is not None:
                if type(found) is int:
                    out.append((found, masked, length))
                else:
                    out.extend((o, masked, length) for o in found)  # type: ignore[union-attr]
        return out

    def contains_key(self, key: tuple[int, int]) -> bool:
        """Whether any network contains the address ``key`` (see :func:`ip_key`)."""
        version, value = key
        for _, mask, table in self._probes4 if version == 4 else self._probes6:
            if value & mask in table:
                return True
        return False

    def matches(self, ip: IPAddress | str) -> list[tuple[IPNetwork, int]]:
        """Every ``(network, ordinal)`` whose network contains ``ip``.

        Longest prefix first (callers that care sort by ordinal). An
        IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is looked up as the
        IPv4 address, as Postfix does with such a client.
        """
        key = ip_key(ip)
        return [(network_of(key[0], a, n), o) for o, a, n in self.hits(key)]


def network_of(version: int, address: int, length: int) -> IPNetwork:
    """The network object for a :meth:`NetworkTable.hits` entry."""
    if version == 4:
        return ipaddress.IPv4Network((address, length))
    return ipaddress.IPv6Network((address, length))


def _prefix_masks(bits: int) -> tuple[int, ...]:
    full = (1 << bits) - 1
    return tuple(full ^ ((1 << (bits - n)) - 1) for n in range(bits + 1))


_V4_MASKS: Final = _prefix_masks(32)
_V6_MASKS: Final = _prefix_masks(128)
