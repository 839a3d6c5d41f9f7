"""DNS resolvers: the one small protocol the core's callers use, and two implementations.

Theory of operation
-------------------
The policy core and the routing decision never ask the DNS themselves: they
name the questions they need (:class:`~mailpolicy.model.DnsQuery`) and judge
the answers (:class:`~mailpolicy.model.DnsResult`). An adapter answers the
questions with a :class:`Resolver`:

* :class:`StaticZone` answers from a fixed zone, the ``dns`` object of a
  replay case (docs/replay-format.md). It is what tests and ``mailpolicy replay`` use, and
  :meth:`StaticZone.from_results` turns the answers of a live session into a
  zone, so the session can be replayed offline.
* :class:`LiveResolver` asks real recursive nameservers with dnspython, in the
  configured order (split DNS), with a per-query timeout and a bounded,
  TTL-respecting cache.

A resolver never raises for a DNS problem. Every failure is an outcome:
``NXDOMAIN`` and ``NODATA`` are authoritative "no such data", ``SERVFAIL`` and
``TIMEOUT`` are temporary (they defer, never bounce), and anything unexpected
(a bug, a malformed reply, a network error) is ``SERVFAIL``: an error on our
side must never turn into a permanent answer about someone else's domain.

``PTR`` questions carry the IP address itself as ``name``; the resolver turns
it into the ``in-addr.arpa``/``ip6.arpa`` name with :mod:`dns.reversename`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import attrs
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset

from ..model import DnsOutcome, DnsQuery, DnsResult, RType
from ..settings import DnsSettings
from . import dnsudp, dnswire

__all__ = [
    "ZONE_TYPES",
    "LiveResolver",
    "Resolver",
    "StaticZone",
    "ZoneAnswer",
    "ZoneError",
    "gather",
    "parse_nameserver",
    "query_name",
]


@runtime_checkable
class Resolver(Protocol):
    """Answers DNS questions. Never raises for DNS failures: see the module doc."""

    async def resolve(self, query: DnsQuery) -> DnsResult:
        """The answer to one question."""
        ...

    async def resolve_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        """The answers to several questions, asked concurrently."""
        ...


async def gather(resolver: Resolver, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
    """Ask ``queries`` (duplicates once) concurrently with ``resolver.resolve``.

    The usual body of :meth:`Resolver.resolve_all`.
    """
    unique = list(dict.fromkeys(queries))
    results = await asyncio.gather(*(resolver.resolve(q) for q in unique))
    return dict(zip(unique, results, strict=True))


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def query_name(query: DnsQuery) -> str:
    """The DNS name actually asked for ``query`` (lower case, no trailing dot).

    For a ``PTR`` question whose name is an IP address this is the reverse
    name (``10.2.0.192.in-addr.arpa``); otherwise the name itself.
    """
    if query.rtype is RType.PTR:
        return _reverse_name(query.name)
    return query.name


@functools.lru_cache(maxsize=4096)
def _reverse_name(name: str) -> str:
    ip = _ip_or_none(name)
    if ip is None:
        return name
    # the same name as dns.reversename.from_address (which asks an
    # IPv4-mapped address under in-addr.arpa), without its objects
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.reverse_pointer
    return ip.reverse_pointer


# ---------------------------------------------------------------------------
# Static zones


#: Record types a static zone may hold.
ZONE_TYPES: Final[tuple[str, ...]] = ("A", "AAAA", "MX", "PTR", "TXT", "CNAME")
_FLAGS: Final[tuple[str, ...]] = ("nxdomain", "servfail", "timeout")
#: a type set that holds every type (``true`` in the zone file)
_ALL: Final[frozenset[str]] = frozenset({"*"})
_NONE: Final[frozenset[str]] = frozenset()
#: longest CNAME chain followed inside a zone (as the oracle's server)
_MAX_CHAIN: Final = 8


class ZoneError(ValueError):
    """A static zone that cannot be built: names the source, the key and the reason.

    The key is the entry's name, quoted, then the field: ``"mx.example.net".A``.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


def _hit(selection: frozenset[str], rtype: str) -> bool:
    return "*" in selection or rtype in selection


def _name_text(name: str) -> str:
    """Validate a host name and return it normalised (lower case, no final dot)."""
    text = name.strip()
    if not text or text == ".":
        raise ValueError("empty host name")
    try:
        dns.name.from_text(text)  # label and length checks
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ValueError(f"not a valid host name ({exc})") from None
    return text.lower().rstrip(".")


@attrs.frozen
class ZoneAnswer:
    """What a :class:`StaticZone` found for one name and type.

    ``cnames`` are the ``(alias, target)`` steps followed inside the zone and
    ``owner`` the name that holds ``result.records`` (the last target, or the
    name asked). A DNS server needs these to build a real reply; everyone
    else wants only ``result``.
    """

    result: DnsResult
    owner: str
    cnames: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class _Entry:
    """One listed name: its records by type and its failure flags."""

    records: Mapping[str, tuple[str, ...]]
    nxdomain: frozenset[str] = _NONE
    servfail: frozenset[str] = _NONE
    timeout: frozenset[str] = _NONE


class StaticZone:
    """A fixed DNS world, as in a replay case's ``dns`` object (docs/replay-format.md).

    Build one with :meth:`from_mapping` (or :meth:`from_results`). Rules:

    * a key that is an IP address stands for its reverse (PTR) name; names
      compare without case and a trailing dot is optional;
    * record types ``A``, ``AAAA``, ``MX`` (``"10 mx.example.net"``, ``"0 ."``
      for a null MX), ``PTR``, ``TXT`` and ``CNAME`` (followed inside the
      zone, up to 8 steps; a longer chain or a loop is ``SERVFAIL``);
    * ``"nxdomain": true``: the name does not exist;
    * ``"servfail"`` / ``"timeout"``: ``true`` (every type) or a list of types;
    * a name that is not listed and is not an ancestor of a listed name is
      ``NXDOMAIN``; a listed name, or an ancestor of one (an "empty
      non-terminal"), without the asked type is ``NODATA``.

    As an extension (so that :meth:`from_results` can reproduce any capture),
    ``"nxdomain"`` also takes a list of types. A value may be a single string
    instead of a list, and an entry may be the bare string ``"nxdomain"``,
    ``"servfail"`` or ``"timeout"``, as the oracle's server accepts.
    """

    __slots__ = ("_entries", "_existing", "_keys")

    def __init__(self, entries: Mapping[str, _Entry], keys: Mapping[str, str]) -> None:
        """Use :meth:`from_mapping` or :meth:`from_results`."""
        self._entries: dict[str, _Entry] = dict(entries)
        self._keys: dict[str, str] = dict(keys)
        existing: set[str] = set()
        for name, entry in self._entries.items():
            if entry.nxdomain == _ALL:
                continue  # a name that does not exist gives its ancestors no existence
            labels = name.split(".") if name else []
            for i in range(len(labels) + 1):
                existing.add(".".join(labels[i:]))
        self._existing: frozenset[str] = frozenset(existing)

    # -- building ----------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<zone>") -> StaticZone:
        """Build a zone from a replay case's ``dns`` object (docs/replay-format.md).

        Raises :class:`ZoneError` (naming ``source``, the key and the reason)
        for a bad name, an unknown key or type, a bad address in A/AAAA, a bad
        MX, PTR or CNAME, a CNAME beside other records, or records on a name
        that does not exist.
        """
        if not isinstance(data, Mapping):
            raise ZoneError(source, "", "the zone must be an object of names")
        entries: dict[str, _Entry] = {}
        keys: dict[str, str] = {}
        for key, raw in data.items():
            if not isinstance(key, str):
                raise ZoneError(source, "", f"name {key!r} is not a string")
            where = json.dumps(key)  # quoted: names are full of dots
            name, display = cls._key_name(key, source, where)
            if name in entries:
                raise ZoneError(source, where, f"the same name as {keys[name]!r}")
            entries[name] = cls._entry(raw, source, where)
            keys[name] = display
        return cls(entries, keys)

    @staticmethod
    def _key_name(key: str, source: str, where: str) -> tuple[str, str]:
        ip = _ip_or_none(key)
        if ip is not None:
            rev = dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)
            return rev, str(ip)
        text = key.strip()
        if not text:
            raise ZoneError(source, where, "empty name")
        try:
            dns.name.from_text(text)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise ZoneError(source, where, f"not a valid domain name ({exc})") from None
        name = text.lower().rstrip(".")
        return name, name

    @classmethod
    def _entry(cls, raw: object, source: str, where: str) -> _Entry:
        if isinstance(raw, str):
            raw = {raw: True}
        if not isinstance(raw, Mapping):
            raise ZoneError(source, where, "must be an object of record types")
        records: dict[str, tuple[str, ...]] = {}
        flags: dict[str, frozenset[str]] = {}
        for field, value in raw.items():
            if not isinstance(field, str):
                raise ZoneError(source, where, f"key {field!r} is not a string")
            here = f"{where}.{field}"
            if field.lower() in _FLAGS:
                flags[field.lower()] = cls._type_set(value, source, here)
            elif field.upper() in ZONE_TYPES:
                rtype = field.upper()
                records[rtype] = cls._records(rtype, value, source, here)
            else:
                known = ", ".join((*ZONE_TYPES, *_FLAGS))
                raise ZoneError(source, here, f"unknown key (expected one of {known})")
        if "CNAME" in records:
            if len(records["CNAME"]) != 1:
                raise ZoneError(source, f"{where}.CNAME", "a name has at most one CNAME")
            others = sorted(t for t, v in records.items() if t != "CNAME" and v)
            if others:
                raise ZoneError(
                    source, f"{where}.CNAME", f"a CNAME cannot sit beside {', '.join(others)}"
                )
        nxdomain = flags.get("nxdomain", _NONE)
        clash = [t for t, v in records.items() if v and _hit(nxdomain, t)]
        if clash:
            raise ZoneError(source, f"{where}.nxdomain", f"the name has {', '.join(clash)} records")
        return _Entry(
            records=records,
            nxdomain=nxdomain,
            servfail=flags.get("servfail", _NONE),
            timeout=flags.get("timeout", _NONE),
        )

    @staticmethod
    def _type_set(value: object, source: str, where: str) -> frozenset[str]:
        if value is True:
            return _ALL
        if value is False or value is None:
            return _NONE
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ZoneError(source, where, "must be true, false or a list of record types")
        types = frozenset(t.upper() for t in items)
        unknown = sorted(types - set(ZONE_TYPES))
        if unknown:
            raise ZoneError(source, where, f"unknown record type {', '.join(unknown)}")
        return types

    @staticmethod
    def _records(rtype: str, value: object, source: str, where: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ZoneError(source, where, "must be a string or a list of strings")
        out: list[str] = []
        for item in items:
            try:
                out.append(_normalise_record(rtype, item))
            except ValueError as exc:
                raise ZoneError(source, where, f"{item!r}: {exc}") from None
        return tuple(out)

    @classmethod
    def from_results(cls, results: Mapping[DnsQuery, DnsResult]) -> StaticZone:
        """A zone that answers each of ``results``' questions with its result.

        This is how a live session is captured for offline replay: record
        what the resolver answered, then :meth:`to_mapping` the zone into the
        case's ``dns`` object. An ``ANSWER`` without records becomes
        ``NODATA``; a name with ``NXDOMAIN`` for some types and other answers
        for others uses the list form of ``nxdomain``. A question that no zone
        can express (a non-PTR question about a name that is an IP address)
        raises :class:`ZoneError`.
        """
        grouped: dict[str, dict[str, Any]] = {}
        nx: dict[str, set[str]] = {}
        listed: set[str] = set()  # names with some answer other than NXDOMAIN
        for query, result in results.items():
            if query.rtype is RType.PTR:
                ip = _ip_or_none(query.name)
                key = str(ip) if ip is not None else query.name
            elif _ip_or_none(query.name) is not None:
                raise ZoneError(
                    "<capture>", str(query), "a zone key that is an IP address means its PTR name"
                )
            else:
                key = query.name
            entry = grouped.setdefault(key, {})
            rtype = query.rtype.value
            if result.outcome is DnsOutcome.NXDOMAIN:
                nx.setdefault(key, set()).add(rtype)
                continue
            listed.add(key)
            if result.outcome is DnsOutcome.ANSWER and result.records:
                entry[rtype] = list(result.records)
            elif result.outcome is DnsOutcome.SERVFAIL:
                entry.setdefault("servfail", []).append(rtype)
            elif result.outcome is DnsOutcome.TIMEOUT:
                entry.setdefault("timeout", []).append(rtype)
            # NODATA (or an empty answer): the listed name without that type says it all
        for key, types in nx.items():
            # a name that is NXDOMAIN for every question asked about it simply
            # does not exist; only a mixed capture needs the list form
            grouped[key]["nxdomain"] = True if key not in listed else sorted(types)
        for entry in grouped.values():
            for flag in ("servfail", "timeout"):
                if flag in entry:
                    entry[flag] = sorted(entry[flag])
        return cls.from_mapping(grouped, source="<capture>")

    # -- reading back --------------------------------------------------------

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        """The zone as a replay case's ``dns`` object (JSON-ready); the inverse of
        :meth:`from_mapping` up to spelling (names lower case, records normalised)."""
        out: dict[str, dict[str, Any]] = {}
        for name, entry in self._entries.items():
            item: dict[str, Any] = {}
            for rtype in ZONE_TYPES:
                if rtype in entry.records:
                    recs = entry.records[rtype]
                    item[rtype] = recs[0] if rtype == "CNAME" else list(recs)
            for flag in _FLAGS:
                value: frozenset[str] = getattr(entry, flag)
                if value == _ALL:
                    item[flag] = True
                elif value:
                    item[flag] = [t for t in ZONE_TYPES if t in value]
            out[self._keys[name]] = item
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StaticZone):
            return NotImplemented
        return self._entries == other._entries

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: no hashing

    def __repr__(self) -> str:
        return f"StaticZone({len(self._entries)} names)"

    def __len__(self) -> int:
        return len(self._entries)

    # -- answering -----------------------------------------------------------

    def trace(self, name: str, rtype: str) -> ZoneAnswer:
        """Answer ``rtype`` (any type name, e.g. ``"MX"``, ``"NS"``) for the DNS
        ``name`` (already reversed for PTR), with the CNAME steps taken."""
        current = name.strip().lower().rstrip(".")
        rtype = rtype.upper()
        chain: list[tuple[str, str]] = []
        for _ in range(_MAX_CHAIN + 1):
            entry = self._entries.get(current)
            if entry is not None and _hit(entry.timeout, rtype):
                return ZoneAnswer(DnsResult(DnsOutcome.TIMEOUT), current, tuple(chain))
            if entry is not None and _hit(entry.servfail, rtype):
                return ZoneAnswer(DnsResult(DnsOutcome.SERVFAIL), current, tuple(chain))
            if current not in self._existing or (entry is not None and _hit(entry.nxdomain, rtype)):
                return ZoneAnswer(DnsResult(DnsOutcome.NXDOMAIN), current, tuple(chain))
            records = entry.records if entry is not None else {}
            if records.get(rtype):
                return ZoneAnswer(DnsResult.answer(*records[rtype]), current, tuple(chain))
            if rtype != "CNAME" and records.get("CNAME"):
                target = records["CNAME"][0]
                chain.append((current, target))
                current = target
                continue
            return ZoneAnswer(DnsResult(DnsOutcome.NODATA), current, tuple(chain))
        # a CNAME loop or an over-long chain: a recursive server gives up with SERVFAIL
        return ZoneAnswer(DnsResult(DnsOutcome.SERVFAIL), current, tuple(chain))

    def lookup(self, query: DnsQuery) -> DnsResult:
        """The answer to ``query``, synchronously."""
        return self.trace(query_name(query), query.rtype.value).result

    def lookup_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        """:meth:`lookup` for each question (``mailpolicy.decide_with``'s
        ``answer``)."""
        return {q: self.lookup(q) for q in queries}

    async def resolve(self, query: DnsQuery) -> DnsResult:
        """:class:`Resolver` protocol: :meth:`lookup`."""
        return self.lookup(query)

    async def resolve_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        """:class:`Resolver` protocol: :meth:`lookup` for each question."""
        return self.lookup_all(queries)


def _normalise_record(rtype: str, text: str) -> str:
    """Check one record's presentation text and return it in canonical form."""
    if rtype in ("A", "AAAA"):
        ip = _ip_or_none(text)
        want = 4 if rtype == "A" else 6
        if ip is None or ip.version != want:
            raise ValueError(f"not an IPv{want} address")
        return str(ip)
    if rtype == "MX":
        parts = text.split()
        if len(parts) != 2:
            raise ValueError('an MX record is "PREFERENCE HOST"')
        pref_text, host = parts
        if not pref_text.isdigit() or not 0 <= int(pref_text) <= 65535:
            raise ValueError("the MX preference must be a number from 0 to 65535")
        if host == ".":
            return f"{int(pref_text)} ."
        return f"{int(pref_text)} {_name_text(host)}"
    if rtype in ("PTR", "CNAME"):
        return _name_text(text)
    return text  # TXT: any text


# ---------------------------------------------------------------------------
# The live resolver


def parse_nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> ``(ip, port)``.

    Raises :class:`ValueError` with the reason for anything else.
    """
    spec = text.strip()
    port = 53
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = _port(port_text, text)
    else:
        host = spec
    ip = _ip_or_none(host)
    if ip is None:
        raise ValueError(f"{text!r}: not an IP address")
    return str(ip), port


def _port(value: str, text: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{text!r}: bad port {value!r}")
    return int(value)


@attrs.frozen
class _Reply:
    """One server's usable reply, before it becomes a DnsResult."""

    result: DnsResult
    ttl: float


def _records(rrset: dns.rrset.RRset) -> tuple[str, ...]:
    out: list[str] = []
    for rd in rrset:
        rdtype = rd.rdtype
        if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.append(str(ipaddress.ip_address(rd.address)))
        elif rdtype == dns.rdatatype.MX:
            host = rd.exchange.to_text(omit_final_dot=True).lower()
            out.append(f"{rd.preference} {'.' if rd.exchange == dns.name.root else host}")
        elif rdtype == dns.rdatatype.PTR:
            out.append(rd.target.to_text(omit_final_dot=True).lower())
        elif rdtype == dns.rdatatype.TXT:
            out.append(b"".join(rd.strings).decode("utf-8", "replace"))
        else:
            out.append(rd.to_text())
    return tuple(out)


def _negative_ttl(response: dns.message.Message) -> float:
    # RFC 2308 section 5: the negative TTL is the SOA's TTL capped by its
    # MINIMUM field; a negative answer without an SOA should not be cached.
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class _Waiting:
    """A question being asked: its loop, and the callers waiting for the same
    answer, told where it settles (``None``: it ended without one, when its
    loop shut down; they ask again)."""

    __slots__ = ("listeners", "loop", "settled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.listeners: list[Callable[[_Reply | None], None]] = []
        self.settled = False


class _ServerFailed(Exception):
    """This nameserver gave no usable answer; try the next one."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("timeout" if timed_out else "failure")
        self.timed_out = timed_out


class LiveResolver:
    """Asks real recursive nameservers with ``dns.asyncquery`` (dnspython).

    **Order.** ``nameservers`` are tried strictly in the order given, one at a
    time, each with ``timeout`` seconds (UDP, TCP when the reply is
    truncated). The next one is asked only when the previous gave no usable
    reply: it timed out, answered SERVFAIL, REFUSED or another error code,
    could not be reached, or sent garbage. ``NXDOMAIN`` and ``NODATA`` *are*
    answers and end the search, as in glibc's stub resolver: that is what
    makes split DNS work, since the internal resolver listed first answers for
    the internal names and recurses for the rest. The outcome is the first
    usable answer, ``TIMEOUT`` when every server timed out, else ``SERVFAIL``.
    A question may therefore take up to ``timeout * len(nameservers)``.
    With no nameservers the system's (``/etc/resolv.conf``, read at the first
    question) are used in their order.

    **Cache.** Up to ``max_entries`` answers (least recently used evicted),
    each kept for its TTL (the smallest in the CNAME chain), at most
    ``max_ttl``; negative answers for the SOA's negative TTL (RFC 2308), not
    at all without an SOA; ``SERVFAIL``/``TIMEOUT`` for ``failure_ttl``
    (default 0: not cached, the next question asks again). Concurrent
    questions for the same query share one request. ``clock`` (monotonic
    seconds) is injectable for tests.

    **Wire.** Plain queries, as glibc's stub resolver (and so Postfix)
    sends them: an answer over 512 bytes comes truncated and is asked again
    over TCP. ``edns=True`` adds an OPT record offering a 1232-byte UDP
    payload instead (a nameserver spends more on such a query: a quarter
    more CPU in the project's ``ZoneServer``).

    **Names.** A name that cannot exist in the DNS (an empty label, a label
    over 63 octets, a name over 255) is ``NXDOMAIN`` without asking, as
    Postfix treats a malformed name as a permanent "not found".
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 5.0,
        max_entries: int = 10_000,
        max_ttl: float = 86_400.0,
        failure_ttl: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        edns: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self._servers: tuple[tuple[str, int], ...] | None = (
            tuple(parse_nameserver(n) for n in nameservers) if nameservers else None
        )
        self.timeout = timeout
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.failure_ttl = failure_ttl
        self.edns = edns
        self._clock = clock
        self._cache: collections.OrderedDict[DnsQuery, tuple[float, DnsResult]] = (
            collections.OrderedDict()
        )
        self._inflight: dict[DnsQuery, _Waiting] = {}
        self._channels = dnsudp.Channels()

    @classmethod
    def from_settings(cls, settings: DnsSettings, **kwargs: Any) -> LiveResolver:
        """A resolver for the policy's ``[dns]`` table (``kwargs`` as in the constructor)."""
        return cls(settings.nameservers, timeout=float(settings.timeout_seconds), **kwargs)

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        """``(ip, port)`` in the order they are tried (the system's once read)."""
        if self._servers is None:
            self._servers = _system_nameservers()
        return self._servers

    def __len__(self) -> int:
        """Entries in the cache (expired ones included until touched)."""
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def cached(self, query: DnsQuery) -> DnsResult | None:
        """The cached answer to ``query``, if there is a fresh one."""
        item = self._cache.get(query)
        if item is None:
            return None
        expires, result = item
        if self._clock() >= expires:
            del self._cache[query]
            return None
        self._cache.move_to_end(query)
        return result

    def _store(self, query: DnsQuery, result: DnsResult, ttl: float) -> None:
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0 or self.max_entries == 0:
            return
        self._cache[query] = (self._clock() + ttl, result)
        self._cache.move_to_end(query)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def resolve(self, query: DnsQuery) -> DnsResult:
        """:class:`Resolver` protocol. Never raises (except on cancellation).

        :meth:`start`, awaited: callers with the same query meanwhile share
        the first caller's question. Cancelling a caller stops its own
        waiting only; the question goes on for the others, and its answer
        is cached as any other.
        """
        try:
            asked = self.start(query)
        except Exception:
            return DnsResult(DnsOutcome.SERVFAIL)
        return await asked

    def start(
        self, query: DnsQuery, on_answer: Callable[[DnsResult], None] | None = None
    ) -> asyncio.Future[DnsResult]:
        """Ask ``query``, begun before this returns: a question neither
        cached nor in flight is sent at once, not when a task first runs;
        one in flight is joined. :meth:`resolve` and :meth:`resolve_all`
        are this, awaited.

        For questions asked ahead (``serve`` asks the client's PTR as it
        connects, before writing its banner). A UDP reply from the first
        nameserver is read in the socket's own callback: the future gets
        its answer there, ``on_answer`` (if given) is called there too, and
        the others sharing the question are told, with no task in between.
        Anything else (a timeout, another nameserver, a truncated reply and
        TCP, a name only dnspython writes) goes on in a task of the
        question's own, not the caller's. The future never fails.
        Cancelling it only stops the waiting: the question is still settled
        for those who share it (and cached), and ``on_answer`` is not
        called.
        """
        loop = asyncio.get_running_loop()
        result: asyncio.Future[DnsResult] = loop.create_future()

        def give(answer: DnsResult) -> None:
            if not result.done():
                result.set_result(answer)
                if on_answer is not None:
                    on_answer(answer)

        def given(done: asyncio.Future[DnsResult]) -> None:
            if not done.cancelled():
                give(done.result())

        hit = self.cached(query)
        if hit is not None:
            give(hit)
            return result
        waiting = self._inflight.get(query)
        if waiting is not None and waiting.loop is loop:
            # told when the question in flight settles, in the same callback
            def joined(reply: _Reply | None) -> None:
                if result.done():
                    return  # cancelled meanwhile
                if reply is not None:
                    give(reply.result)
                else:  # its asker gave up: ask again
                    self.start(query).add_done_callback(given)

            waiting.listeners.append(joined)
            return result
        waiting = self._inflight[query] = _Waiting(loop)
        first: dnsudp.Pending | None = None

        def go_on(first: dnsudp.Pending | None) -> None:
            task = loop.create_task(self._lead(query, waiting, first))
            task.add_done_callback(given)
            # a task cancelled before its first step never runs its body
            task.add_done_callback(lambda _: self._settle(query, waiting, first, None))

        def read() -> None:  # called once the question below is sent
            assert first is not None
            got = first.future
            if not got.cancelled() and got.exception() is None:
                answer = got.result()
                if isinstance(answer, dnswire.Reading) and not answer.truncated:
                    try:
                        reply = _from_reading(answer)
                    except Exception:
                        pass  # a server failure: the next nameserver, in the task
                    else:
                        self._settle(query, waiting, first, reply)
                        give(reply.result)
                        return
            if result.cancelled() and not waiting.listeners:
                self._settle(query, waiting, first, None)  # nobody waits any more
            else:
                go_on(first)

        first = self._send_first(query, loop, read)
        if first is None:
            go_on(None)
        return result

    async def _lead(
        self, query: DnsQuery, waiting: _Waiting, first: dnsudp.Pending | None
    ) -> DnsResult:
        """Ask ``query`` for every caller waiting on it (``first``: its
        question to the first nameserver, already sent). Never raises but
        on cancellation: a failure is a SERVFAIL, and the callers sharing
        the question are told it ended without an answer."""
        reply = None
        try:
            reply = await self._ask(query, first)
        except Exception:
            return DnsResult(DnsOutcome.SERVFAIL)
        finally:
            self._settle(query, waiting, first, reply)
        return reply.result

    def _settle(
        self,
        query: DnsQuery,
        waiting: _Waiting,
        first: dnsudp.Pending | None,
        reply: _Reply | None,
    ) -> None:
        if waiting.settled:
            return
        waiting.settled = True
        if first is not None:
            first.finish()
        if self._inflight.get(query) is waiting:
            del self._inflight[query]
        if reply is not None:
            self._store(query, reply.result, reply.ttl)
        for listener in waiting.listeners:
            listener(reply)

    def _send_first(
        self, query: DnsQuery, loop: asyncio.AbstractEventLoop, notify: Callable[[], None]
    ) -> dnsudp.Pending | None:
        """The question to the first nameserver, sent now; ``None`` when it
        is better left to :meth:`_ask` (an unusual name, a failed send)."""
        servers = self.nameservers
        if not servers:
            return None
        question = dnswire.query(query_name(query), query.rtype.value, edns=self.edns)
        if question is None:
            return None
        host, port = servers[0]
        try:
            return dnsudp.send(
                self._channels, loop, question, None, host, port, loop.time() + self.timeout, notify
            )
        except Exception:
            return None

    async def resolve_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        """:class:`Resolver` protocol: all at once, duplicates asked once.

        Cached answers are given at once. Each other question joins the same
        question in flight, or is sent, before this first waits
        (:meth:`start`). A task per question would only look a loop
        iteration later, and by then a question in flight may have been
        answered and, with a TTL of 0, forgotten: it went out a second time
        (a session asked its client's PTR twice)."""
        unique = list(dict.fromkeys(queries))
        found: dict[DnsQuery, DnsResult] = {}
        waits: list[tuple[DnsQuery, asyncio.Future[DnsResult]]] = []
        for query in unique:
            hit = self.cached(query)
            if hit is None:
                waits.append((query, self.start(query)))
            else:
                found[query] = hit
        try:
            for query, future in waits:
                found[query] = await future
        except asyncio.CancelledError:
            for _, future in waits:
                future.cancel()  # stops the waiting only: others share the question
            raise
        return {query: found[query] for query in unique}

    async def _ask(self, query: DnsQuery, first: dnsudp.Pending | None = None) -> _Reply:
        name = query_name(query)
        question = dnswire.query(name, query.rtype.value, edns=self.edns)
        request = None
        if question is None:  # an unusual name: dnspython writes it
            try:
                qname = dns.name.from_text(name)
            except (dns.exception.DNSException, UnicodeError):
                return _Reply(DnsResult(DnsOutcome.NXDOMAIN), 0.0)
        try:
            if question is None:
                rdtype = dns.rdatatype.from_text(query.rtype.value)
                request = dns.message.make_query(
                    qname, rdtype, use_edns=0 if self.edns else False, payload=1232
                )
            servers = self.nameservers
            all_timed_out = bool(servers)
            for host, port in servers:
                try:
                    return await self._ask_server(question, request, host, port, first)
                except _ServerFailed as failure:
                    all_timed_out = all_timed_out and failure.timed_out
                first = None
            outcome = DnsOutcome.TIMEOUT if all_timed_out else DnsOutcome.SERVFAIL
        except Exception:
            # a bug or an unforeseen library error: temporary, never permanent
            outcome = DnsOutcome.SERVFAIL
        return _Reply(DnsResult(outcome), self.failure_ttl)

    async def _ask_server(
        self,
        question: dnswire.Question | None,
        request: dns.message.Message | None,
        host: str,
        port: int,
        sent: dnsudp.Pending | None = None,
    ) -> _Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            if sent is None:
                sent = dnsudp.send(self._channels, loop, question, request, host, port, deadline)
            else:
                # asked ahead, from when it was sent
                deadline = sent.timer.when()
            got = await dnsudp.wait(sent)
            if isinstance(got, dnswire.Reading) and not got.truncated:
                reading: dnswire.Reading | None = got
            else:
                reading = None
                response = got if isinstance(got, dns.message.Message) else None
                if response is None or response.flags & dns.flags.TC:
                    # truncated: the whole answer over TCP, in the time left
                    if request is None:
                        assert question is not None
                        request = dns.message.from_wire(question.wire)
                    response = await dns.asyncquery.tcp(
                        request, host, timeout=max(deadline - loop.time(), 0.001), port=port
                    )
        except (TimeoutError, dns.exception.Timeout):
            raise _ServerFailed(timed_out=True) from None
        except Exception:
            # unreachable (ICMP refused), malformed reply, TCP reset...
            raise _ServerFailed(timed_out=False) from None
        if reading is not None:
            return _from_reading(reading)
        assert response is not None
        return _interpret(response)


def _from_reading(reading: dnswire.Reading) -> _Reply:
    """:func:`_interpret` for a reply read by the fast path."""
    if reading.rcode == dns.rcode.NXDOMAIN:
        return _Reply(DnsResult(DnsOutcome.NXDOMAIN), reading.negative_ttl)
    if reading.rcode != dns.rcode.NOERROR or reading.broken:
        raise _ServerFailed(timed_out=False)
    if not reading.records:
        return _Reply(DnsResult(DnsOutcome.NODATA), reading.negative_ttl)
    return _Reply(DnsResult.answer(*reading.records), reading.ttl)


def _interpret(response: dns.message.Message) -> _Reply:
    """What a reply (dnspython's reading of it) says, or _ServerFailed."""
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return _Reply(DnsResult(DnsOutcome.NXDOMAIN), _negative_ttl(response))
    if rcode != dns.rcode.NOERROR or not isinstance(response, dns.message.QueryMessage):
        raise _ServerFailed(timed_out=False)
    try:
        chain = response.resolve_chaining()
    except Exception:
        raise _ServerFailed(timed_out=False) from None
    if chain.answer is None or not len(chain.answer):
        return _Reply(DnsResult(DnsOutcome.NODATA), _negative_ttl(response))
    return _Reply(DnsResult.answer(*_records(chain.answer)), float(chain.minimum_ttl))


def _system_nameservers() -> tuple[tuple[str, int], ...]:
    try:
        system = dns.resolver.Resolver(configure=True)
    except Exception:
        return ()  # no resolv.conf: every question is SERVFAIL, never a guess
    out: list[tuple[str, int]] = []
    for server in system.nameservers:
        text = str(server)
        ip = _ip_or_none(text)
        if ip is not None:
            out.append((str(ip), system.port))
    return tuple(out)
