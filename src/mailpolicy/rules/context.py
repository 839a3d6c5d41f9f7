"""What a rule sees: the facts, the compiled policy data, and derived facts.

A :class:`Context` is built once per evaluation. It parses the sender and
recipient once, answers "is the client in mynetworks?" once, and works out the
client's verified host name from the DNS facts the way Postfix does (reverse
lookup, then a forward lookup that must lead back to the client address).
"""

from __future__ import annotations

import enum
import ipaddress
from functools import cached_property

import attrs

from ..addresses import Address, AddressError, is_valid_hostname, parse_address
from ..lookup import DomainTable, NetworkTable
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
    evidence: tuple[tuple[str, str], ...]


class Context:
    """The facts of one evaluation, plus what the rules derive from them."""

    def __init__(self, shared: Shared, session: Session, envelope: Envelope) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.session = session
        self.envelope = envelope

    # -- DNS -----------------------------------------------------------------

    def dns(self, *queries: DnsQuery) -> tuple[DnsResult, ...]:
        """The answers to ``queries``; raises NeedDns for any not known."""
        known = self.session.dns
        missing = [q for q in queries if q not in known]
        if missing:
            raise NeedDns(missing)
        return tuple(known[q] for q in queries)

    # -- the client ------------------------------------------------------------

    @property
    def client_ip(self) -> IPAddress:
        return self.session.client_ip

    @cached_property
    def in_mynetworks(self) -> bool:
        """Trusted networks, plus local networks when they may skip AUTH."""
        return bool(self.shared.mynetworks.matches(self.session.client_ip))

    @property
    def authenticated(self) -> bool:
        return self.session.auth_user is not None

    @cached_property
    def client_name(self) -> ClientName:
        """Reverse, then forward-confirmed, client host name (Postfix's rules)."""
        ip = self.session.client_ip
        (ptr,) = self.dns(DnsQuery(str(ip), RType.PTR))
        ev: list[tuple[str, str]] = [(f"{ip}/PTR", _show(ptr))]
        if ptr.outcome.temporary:
            return ClientName("unknown", NameStatus.TEMP, "unknown", NameStatus.TEMP, tuple(ev))
        if not ptr.found:
            return ClientName("unknown", NameStatus.FAIL, "unknown", NameStatus.FAIL, tuple(ev))
        reverse = ptr.records[0].lower().rstrip(".")
        if not is_valid_hostname(reverse):
            # Postfix's sockaddr_to_hostname() refuses a numeric or malformed
            # PTR name: the client then has no name at all.
            return ClientName("unknown", NameStatus.FAIL, "unknown", NameStatus.FAIL, tuple(ev))
        rtype = RType.A if ip.version == 4 else RType.AAAA
        (fwd,) = self.dns(DnsQuery(reverse, rtype))
        ev.append((f"{reverse}/{rtype.value}", _show(fwd)))
        if fwd.outcome.temporary:
            status = NameStatus.TEMP
        elif fwd.found and any(_same_ip(r, ip) for r in fwd.records):
            return ClientName(reverse, NameStatus.OK, reverse, NameStatus.OK, tuple(ev))
        else:
            status = NameStatus.FAIL
        return ClientName("unknown", status, reverse, NameStatus.OK, tuple(ev))

    # -- the envelope ----------------------------------------------------------

    @cached_property
    def sender(self) -> Address | None:
        """The parsed MAIL FROM address (``None`` before MAIL or if unparsable)."""
        if self.envelope.sender is None:
            return None
        return _parse(self.envelope.sender)

    @cached_property
    def recipient(self) -> Address | None:
        """The parsed RCPT TO address being judged."""
        if self.envelope.recipient is None:
            return None
        return _parse(self.envelope.recipient)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.shared.local_domains


def _parse(text: str) -> Address | None:
    try:
        return parse_address(text)
    except AddressError:
        return None


def _same_ip(text: str, ip: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


def _show(result: DnsResult) -> str:
    if result.records:
        return ",".join(result.records)
    return result.outcome.value
