"""What a rule sees: the facts, the compiled policy data, and derived facts.

A :class:`Context` is built once per evaluation. It parses the sender and
recipient once, answers "is the client in mynetworks?" once, and works out the
client's verified host name from the DNS facts the way Postfix does (reverse
lookup, then a forward lookup that must lead back to the client address).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import attrs

from ..addresses import Address, AddressError, is_valid_hostname, parse_address, simple_address
from ..lookup import DomainTable, NetworkTable, ip_key
from ..model import DnsQuery, DnsResult, Envelope, IPAddress, RType, Session
from ..settings import Settings
from . import NeedDns

__all__ = ["ClientName", "Context", "NameStatus", "Shared"]


@attrs.frozen
class Shared:
    """Compiled data that several rules consult (built once per policy)."""

    settings: Settings
    mynetworks: NetworkTable
    local_domains: frozenset[str]
    inbound_domains: DomainTable


#: the memo's key for the verified client name
_CLIENT_NAME = "client_name"


class NameStatus(enum.Enum):
    OK = "ok"
    #: the lookup answered: there is no such name (or it does not match)
    FAIL = "fail"
    #: the lookup failed temporarily
    TEMP = "temp"


@attrs.frozen
class ClientName:
    """Postfix's two client names.

    ``reverse`` is the PTR name (``reverse_status`` says whether there is
    one); ``name`` is that name only when a forward lookup confirms it,
    otherwise ``"unknown"``.
    """

    name: str
    status: NameStatus
    reverse: str
    reverse_status: NameStatus
    #: the DNS answers relied on (PTR, then the forward lookup)
    answers: tuple[tuple[DnsQuery, DnsResult], ...]

    @property
    def evidence(self) -> tuple[tuple[str, str], ...]:
        """The answers as text, for a refusal's evidence (made only then)."""
        return tuple((str(query), str(result)) for query, result in self.answers)


_T = TypeVar("_T")


class _cached(Generic[_T]):
    """``functools.cached_property`` without its lock (a Context belongs to
    one evaluation, on one thread): the first access computes, later ones
    read the instance dict. An exception (``NeedDns``) caches nothing."""

    __slots__ = ("func", "name")

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _cached[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type[Any]) -> _T: ...

    def __get__(self, obj: object | None, owner: type[Any]) -> _cached[_T] | _T:
        if obj is None:
            return self
        value = self.func(obj)
        obj.__dict__[self.name] = value
        return value


class Context:
    """The facts of one evaluation, plus what the rules derive from them.

    Built once per evaluation; every derived fact (parsed addresses, the
    client's address as text and as a table key, its verified host name) is
    computed on first use and kept for the other rules.
    """

    def __init__(
        self,
        shared: Shared,
        session: Session,
        envelope: Envelope,
        memo: dict[object, object] | None = None,
    ) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.session = session
        self.envelope = envelope
        #: what the engine's memo holds for this session's facts (see
        #: mailpolicy.evaluate.Memo): valid as long as they do not change
        self.memo: dict[object, object] = {} if memo is None else memo
        #: what rules derive for this evaluation only, by who derived it
        #: (the lists' hits, which the white and the black list both read)
        self.derived: dict[object, object] = {}

    # -- DNS -----------------------------------------------------------------

    def dns(self, *queries: DnsQuery) -> tuple[DnsResult, ...]:
        """The answers to ``queries``; raises NeedDns for any not known."""
        known = self.session.dns
        try:
            return tuple([known[q] for q in queries])
        except KeyError:
            raise NeedDns([q for q in queries if q not in known]) from None

    def dns1(self, query: DnsQuery) -> DnsResult:
        """The answer to one query; raises NeedDns if it is not known."""
        found = self.session.dns.get(query)
        if found is None:
            raise NeedDns((query,))
        return found

    # -- the client ------------------------------------------------------------

    @property
    def client_ip(self) -> IPAddress:
        return self.session.client_ip

    @_cached
    def client_text(self) -> str:
        """``str(client_ip)``, computed once (an IPv4 address without
        ``ipaddress``'s slower formatting)."""
        ip = self.session.client_ip
        if ip.version == 4:
            return _v4_text(int(ip))
        return str(ip)

    @_cached
    def client_key(self) -> tuple[int, int]:
        """The client address as a table key: (IP version, address as an int),
        an IPv4-mapped IPv6 address as its IPv4 address."""
        return ip_key(self.session.client_ip)

    @_cached
    def in_mynetworks(self) -> bool:
        """Trusted networks, plus local networks when they may skip AUTH."""
        return self.shared.mynetworks.contains_key(self.client_key)

    @property
    def authenticated(self) -> bool:
        return self.session.auth_user is not None

    @_cached
    def reversed_client(self) -> str:
        """The client address as a DNSBL query prefix (RFC 5782): ``10.2.0.192``
        for 192.0.2.10, nibbles in reverse for IPv6; an IPv4-mapped client is
        its IPv4 address."""
        version, value = self.client_key
        if version == 4:
            return ".".join(reversed(_v4_text(value).split(".")))
        return ".".join(reversed(f"{value:032x}"))

    @_cached
    def client_name(self) -> ClientName:
        """Reverse, then forward-confirmed, client host name (Postfix's rules).

        Kept in the memo: it depends on the session's facts only.
        """
        memo = self.memo
        found = memo.get(_CLIENT_NAME)
        if isinstance(found, ClientName):
            return found
        name = self._client_name()
        memo[_CLIENT_NAME] = name
        return name

    def _client_name(self) -> ClientName:
        ip = self.session.client_ip
        text = self.client_text
        ptr_query = DnsQuery.of(text, RType.PTR)
        ptr = self.dns1(ptr_query)
        answers: tuple[tuple[DnsQuery, DnsResult], ...] = ((ptr_query, ptr),)
        if ptr.outcome.temporary:
            return ClientName("unknown", NameStatus.TEMP, "unknown", NameStatus.TEMP, answers)
        if not ptr.found:
            return ClientName("unknown", NameStatus.FAIL, "unknown", NameStatus.FAIL, answers)
        reverse = ptr.records[0].lower().rstrip(".")
        if not is_valid_hostname(reverse):
            # Postfix's sockaddr_to_hostname() refuses a numeric or malformed
            # PTR name: the client then has no name at all.
            return ClientName("unknown", NameStatus.FAIL, "unknown", NameStatus.FAIL, answers)
        fwd_query = DnsQuery.of(reverse, RType.A if ip.version == 4 else RType.AAAA)
        fwd = self.dns1(fwd_query)
        answers = ((ptr_query, ptr), (fwd_query, fwd))
        if fwd.outcome.temporary:
            status = NameStatus.TEMP
        elif fwd.found and any(r == text or _same_ip(r, ip) for r in fwd.records):
            return ClientName(reverse, NameStatus.OK, reverse, NameStatus.OK, answers)
        else:
            status = NameStatus.FAIL
        return ClientName("unknown", status, reverse, NameStatus.OK, answers)

    # -- the envelope ----------------------------------------------------------

    @_cached
    def sender(self) -> Address | None:
        """The parsed MAIL FROM address (``None`` before MAIL or if unparsable)."""
        if self.envelope.sender is None:
            return None
        return _parse(self.envelope.sender)

    @_cached
    def recipient(self) -> Address | None:
        """The parsed RCPT TO address being judged."""
        if self.envelope.recipient is None:
            return None
        return _parse(self.envelope.recipient)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.shared.local_domains


def _v4_text(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def _parse(text: str) -> Address | None:
    """``parse_address`` (``None`` if it refuses), with a fast path for the
    common shape."""
    simple = simple_address(text)
    if simple is not None:
        return simple
    return _parse_slow(text)


def _parse_slow(text: str) -> Address | None:
    try:
        return parse_address(text)
    except AddressError:
        return None


def _same_ip(text: str, ip: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False
