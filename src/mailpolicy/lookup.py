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

from .addresses import Address, parent_domains
from .model import IPAddress, IPNetwork

__all__ = ["NULL_SENDER_KEY", "AccessTable", "DomainTable", "NetworkTable"]

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


def _domain_key(domain: str) -> str:
    return domain.lower().rstrip(".")


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
        for name in parent_domains(domain):
            _hits(table, name, out)
        return out


def _access_key(key: str) -> str:
    """Normalize an access-map key: ``<>``, ``user@``, ``a@b`` or ``b``.

    Lower-casing the whole key is enough (Postfix folds case for the whole
    lookup); only a trailing dot on the domain needs dropping.
    """
    key = key.strip().lower()
    if key.endswith("."):
        stripped = key.rstrip(".")
        # "a@." is no domain key: keep it as it is rather than make it "a@".
        if not stripped.endswith("@"):
            key = stripped
    return key


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

    def add(self, key: str, ordinal: int) -> None:
        """Add one entry."""
        norm = _access_key(key)
        self._table[norm] = _merge(self._table.get(norm), ordinal)

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._table)

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
            for name in parent_domains(address.domain):
                _hits(table, name, out)
        _hits(table, local + "@", out)
        return out


class NetworkTable:
    """Client networks (IPv4 and IPv6) with per-prefix-length hash probes.

    Built from ``(network, ordinal)`` pairs. For each address family there is
    one dict per prefix length in use, keyed by the network address as an
    int; a lookup masks the client address once per prefix length present.
    """

    __slots__ = ("_v4", "_v4_lengths", "_v6", "_v6_lengths")

    def __init__(self, entries: Iterable[tuple[IPNetwork, int]] = ()) -> None:
        self._v4: dict[int, dict[int, _Ordinals]] = {}
        self._v6: dict[int, dict[int, _Ordinals]] = {}
        self._v4_lengths: tuple[int, ...] = ()
        self._v6_lengths: tuple[int, ...] = ()
        v4, v6 = self._v4, self._v6
        for network, ordinal in entries:
            by_length = v4 if network.version == 4 else v6
            table = by_length.get(network.prefixlen)
            if table is None:
                table = by_length[network.prefixlen] = {}
            address = int(network.network_address)
            table[address] = _merge(table.get(address), ordinal)
        self._refresh()

    def _refresh(self) -> None:
        # Longest prefix first: the most specific networks come out first.
        self._v4_lengths = tuple(sorted(self._v4, reverse=True))
        self._v6_lengths = tuple(sorted(self._v6, reverse=True))

    def add(self, network: IPNetwork, ordinal: int) -> None:
        """Add one entry."""
        by_length = self._v4 if network.version == 4 else self._v6
        table = by_length.setdefault(network.prefixlen, {})
        address = int(network.network_address)
        table[address] = _merge(table.get(address), ordinal)
        self._refresh()

    def __len__(self) -> int:
        """The number of distinct networks."""
        return sum(len(t) for t in self._v4.values()) + sum(len(t) for t in self._v6.values())

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def matches(self, ip: IPAddress | str) -> list[tuple[IPNetwork, int]]:
        """Every ``(network, ordinal)`` whose network contains ``ip``.

        Longest prefix first (callers that care sort by ordinal). An
        IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is looked up as the
        IPv4 address, as Postfix does with such a client.
        """
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        out: list[tuple[IPNetwork, int]] = []
        value = int(ip)
        if ip.version == 4:
            for length in self._v4_lengths:
                masked = value & _V4_MASKS[length]
                found = self._v4[length].get(masked)
                if found is not None:
                    _emit(out, ipaddress.IPv4Network((masked, length)), found)
        else:
            for length in self._v6_lengths:
                masked = value & _V6_MASKS[length]
                found = self._v6[length].get(masked)
                if found is not None:
                    _emit(out, ipaddress.IPv6Network((masked, length)), found)
        return out


def _prefix_masks(bits: int) -> tuple[int, ...]:
    full = (1 << bits) - 1
    return tuple(full ^ ((1 << (bits - n)) - 1) for n in range(bits + 1))


_V4_MASKS: Final = _prefix_masks(32)
_V6_MASKS: Final = _prefix_masks(128)


def _emit(out: list[tuple[IPNetwork, int]], network: IPNetwork, found: _Ordinals) -> None:
    if isinstance(found, int):
        out.append((network, found))
    else:
        out.extend((network, o) for o in found)
