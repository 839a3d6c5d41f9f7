"""The facts the policy core judges, and the verdict it returns.

Theory of operation
-------------------
The core never does I/O. An adapter (the aiosmtpd server, replay, the Postfix
policy protocol, a benchmark) describes the world as plain values:

* :class:`Session` holds what is known about the connection: the client's
  address, its HELO name, TLS and AUTH state, the rate counters the adapter's
  state store keeps, and every DNS answer gathered so far (``dns``).
* :class:`Envelope` holds the transaction: which SMTP stage is being judged,
  the sender, the recipient being judged, those already accepted, the declared
  size, and at the end of DATA the facts about the message.

``mailpolicy.decide(policy, session, envelope)`` returns a :class:`Verdict`,
or the DNS questions the enabled rules still need for this stage; the adapter
asks them (or reads a static zone), adds the answers with
:meth:`Session.with_dns`, and decides again (``mailpolicy.decide_with`` is
that loop). A fact that is missing is never guessed: ``mailpolicy.evaluate``
gives a temporary failure that names the missing question.

Everything here is a frozen, slotted attrs class: cheap to build, safe to
share, usable as a dictionary key, and equal when the facts are equal (a
session's DNS answers included). What the engine derives and remembers
between decisions lives apart, in the connection's ``mailpolicy.Memo``.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import operator
import sys
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final, SupportsIndex, overload

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "Action",
    "Counters",
    "DnsOutcome",
    "DnsQuery",
    "DnsResult",
    "Envelope",
    "Evidence",
    "IPAddress",
    "IPNetwork",
    "MessageFacts",
    "Networks",
    "NextHop",
    "RType",
    "Reply",
    "Route",
    "RouteKind",
    "Session",
    "Stage",
    "Verdict",
    "ip_text",
]


class Networks(tuple[IPNetwork, ...]):
    """A tuple of networks, stored compactly.

    A list of a million client networks as ``ipaddress`` objects takes some
    300 MB; here each entry is one int (shared with the lookup table built
    from it) and one byte, and a network object is made only when an entry is
    read (``networks[i]``, iteration).

    It is a ``tuple`` (``isinstance`` says so) that behaves like the tuple of
    its networks: ``len``, indexing, slicing, iteration, ``in``, ``+``,
    comparisons, hashing, ``repr`` and pickling all go through the methods
    below. (The tuple's own storage is empty: C code that reads a tuple's
    items directly instead of iterating would see nothing; the standard
    library's consumers, ``tuple()``, ``list()``, ``json``, unpacking, all
    iterate.) :meth:`entries` gives the raw ``(version, prefix length,
    address)`` triples without making objects.

    Build one with :meth:`of` (network objects, or texts as
    ``ip_network(text.strip(), strict=False)`` reads them) or
    :meth:`from_entries` (the policy loader parses texts faster, see
    ``config.parse_network``).
    """

    #: a code byte is the prefix length for IPv6, and 129 + the length for IPv4
    _V4: Final = 129

    _addresses: tuple[int, ...]
    _codes: bytes
    _hash: int | None

    def __new__(cls, addresses: Iterable[int] = (), codes: bytes = b"") -> Networks:
        self = super().__new__(cls)
        self._addresses = tuple(addresses)
        self._codes = bytes(codes)
        self._hash = None
        if len(self._addresses) != len(self._codes):
            raise ValueError("one code per address")
        return self

    @classmethod
    def of(cls, values: Iterable[str | IPNetwork]) -> Networks:
        """From network objects or texts (stripped, host bits allowed)."""
        if isinstance(values, Networks):
            return values
        addresses: list[int] = []
        codes = bytearray()
        for value in values:
            if isinstance(value, str):
                value = ipaddress.ip_network(value.strip(), strict=False)
            addresses.append(int(value.network_address))
            codes.append(value.prefixlen + cls._V4 if value.version == 4 else value.prefixlen)
        return cls(addresses, bytes(codes))

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[int, int, int]]) -> Networks:
        """From ``(version, prefix length, network address)`` triples."""
        addresses: list[int] = []
        codes = bytearray()
        for version, length, address in entries:
            addresses.append(address)
            codes.append(length + cls._V4 if version == 4 else length)
        return cls(addresses, bytes(codes))

    def entries(self) -> Iterator[tuple[int, int, int]]:
        """``(version, prefix length, network address)`` for each network."""
        v4 = self._V4
        for code, address in zip(self._codes, self._addresses, strict=True):
            if code >= v4:
                yield 4, code - v4, address
            else:
                yield 6, code, address

    def _network(self, i: int) -> IPNetwork:
        code, address = self._codes[i], self._addresses[i]
        if code >= self._V4:
            return ipaddress.IPv4Network((address, code - self._V4))
        return ipaddress.IPv6Network((address, code))

    # -- the tuple protocol, over the compact storage ---------------------------

    def __len__(self) -> int:
        return len(self._codes)

    def __bool__(self) -> bool:
        return bool(self._codes)

    @overload
    def __getitem__(self, index: SupportsIndex) -> IPNetwork: ...

    @overload
    def __getitem__(self, index: slice) -> Networks: ...

    def __getitem__(self, index: SupportsIndex | slice) -> IPNetwork | Networks:
        if isinstance(index, slice):
            return Networks(self._addresses[index], self._codes[index])
        i = operator.index(index)
        n = len(self._codes)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("tuple index out of range")
        return self._network(i)

    def __iter__(self) -> Iterator[IPNetwork]:
        for i in range(len(self._codes)):
            yield self._network(i)

    def __reversed__(self) -> Iterator[IPNetwork]:
        for i in range(len(self._codes) - 1, -1, -1):
            yield self._network(i)

    def __contains__(self, value: object) -> bool:
        return any(value == net for net in self)

    def index(self, value: Any, start: SupportsIndex = 0, stop: SupportsIndex = sys.maxsize) -> int:
        return tuple(self).index(value, start, stop)

    def count(self, value: Any) -> int:
        return tuple(self).count(value)

    def __add__(self, other: tuple[Any, ...]) -> tuple[Any, ...]:
        if not isinstance(other, tuple):
            return NotImplemented
        return tuple(self) + tuple(other)

    def __radd__(self, other: tuple[Any, ...]) -> tuple[Any, ...]:
        if not isinstance(other, tuple):
            return NotImplemented
        return tuple(other) + tuple(self)

    def __mul__(self, n: SupportsIndex) -> tuple[IPNetwork, ...]:
        return tuple(self) * n

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Networks):
            return self._codes == other._codes and self._addresses == other._addresses
        if isinstance(other, tuple):
            return len(other) == len(self) and tuple(self) == tuple(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __lt__(self, other: tuple[Any, ...]) -> bool:
        return tuple(self) < tuple(other)

    def __le__(self, other: tuple[Any, ...]) -> bool:
        return tuple(self) <= tuple(other)

    def __gt__(self, other: tuple[Any, ...]) -> bool:
        return tuple(self) > tuple(other)

    def __ge__(self, other: tuple[Any, ...]) -> bool:
        return tuple(self) >= tuple(other)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))
        return self._hash

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Networks, (self._addresses, self._codes))

    def __copy__(self) -> Networks:
        return self

    def __deepcopy__(self, memo: object) -> Networks:
        return self


class Stage(enum.Enum):
    """The SMTP moment a decision is made at."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END_OF_DATA = "end_of_data"
    VRFY = "vrfy"


class RType(enum.Enum):
    """DNS record types the core asks about."""

    # Members are singletons: identity hashing equals Enum's name hashing in
    # effect, without a Python-level call in every DnsQuery hash.
    __hash__ = object.__hash__

    A = "A"
    AAAA = "AAAA"
    MX = "MX"
    PTR = "PTR"
    TXT = "TXT"


class DnsOutcome(enum.Enum):
    """How a DNS question ended. Only ``ANSWER`` carries records."""

    ANSWER = "answer"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"

    @property
    def temporary(self) -> bool:
        """A failure that may go away: it defers, it never bounces."""
        return self in (DnsOutcome.SERVFAIL, DnsOutcome.TIMEOUT)

    @property
    def not_found(self) -> bool:
        """An authoritative "there is no such data"."""
        return self in (DnsOutcome.NXDOMAIN, DnsOutcome.NODATA)


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _addresses(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(
            f"recipients is a sequence of addresses, not one string: ({values!r},), not {values!r}"
        )
    return tuple(values)


def _stage(value: Stage | str) -> Stage:
    if type(value) is Stage:
        return value
    try:
        return Stage(value.lower() if isinstance(value, str) else value)
    except ValueError:
        names = ", ".join(s.value for s in Stage)
        raise ValueError(f"unknown stage {value!r}; one of: {names}") from None


def _lower_name(name: str) -> str:
    return name.lower().rstrip(".")


@attrs.frozen(cache_hash=True)
class DnsQuery:
    """One DNS question.

    ``name`` is a domain name (compared without case or trailing dot); for a
    ``PTR`` question it is the IP address itself (``"192.0.2.10"``), and the
    resolver turns it into the ``in-addr.arpa``/``ip6.arpa`` name.
    """

    name: str = attrs.field(converter=_lower_name)
    rtype: RType

    def __str__(self) -> str:
        return f"{self.name}/{self.rtype.value}"

    @staticmethod
    @functools.lru_cache(maxsize=16384)
    def of(name: str, rtype: RType) -> DnsQuery:
        """A shared instance: rules ask the same questions at every RCPT, and
        a shared query is normalised and hashed once (the hash is cached)."""
        return DnsQuery(name, rtype)


@attrs.frozen
class DnsResult:
    """The answer to a :class:`DnsQuery`.

    ``records`` are presentation-format strings: addresses for A/AAAA, host
    names for PTR, ``"PREF HOST"`` for MX (``"0 ."`` is a null MX), text for
    TXT.
    """

    outcome: DnsOutcome
    records: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def __str__(self) -> str:
        """The records, or the outcome when there are none (for evidence and logs)."""
        return ",".join(self.records) if self.records else self.outcome.value

    @classmethod
    def answer(cls, *records: str) -> DnsResult:
        return cls(DnsOutcome.ANSWER, records)

    @property
    def found(self) -> bool:
        return self.outcome is DnsOutcome.ANSWER and bool(self.records)

    def mx(self) -> tuple[tuple[int, str], ...]:
        """MX records as ``(preference, host)``, hosts without trailing dot."""
        out: list[tuple[int, str]] = []
        for rec in self.records:
            pref, _, host = rec.strip().partition(" ")
            if pref.isdigit():  # a malformed record is no MX, never a crash
                out.append((int(pref), host.strip().lower().rstrip(".")))
        return tuple(out)

    @property
    def null_mx(self) -> bool:
        """RFC 7505: a single MX whose host is the root (``"0 ."``)."""
        mx = self.mx() if self.outcome is DnsOutcome.ANSWER else ()
        return len(mx) == 1 and mx[0][1] == ""


def _freeze_dns(value: Mapping[DnsQuery, DnsResult] | None) -> Mapping[DnsQuery, DnsResult]:
    if value is None:
        return _EMPTY_DNS
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(dict(value))


_EMPTY_DNS: Final[Mapping[DnsQuery, DnsResult]] = MappingProxyType({})


@attrs.frozen
class Counters:
    """Rate and concurrency facts from the adapter's state store.

    Each count includes the event being judged: ``connections`` counts this
    session among the concurrent ones, ``message_rate`` this MAIL FROM among
    those in the current window, and so on. Zero means "not counted".
    """

    connections: int = 0
    connection_rate: int = 0
    message_rate: int = 0
    recipient_rate: int = 0
    #: messages and recipients in the window of the SASL login, the
    #: sender's domain, the recipient's domain, and the whole server
    user_message_rate: int = 0
    user_recipient_rate: int = 0
    sender_domain_message_rate: int = 0
    recipient_domain_recipient_rate: int = 0
    global_message_rate: int = 0
    global_recipient_rate: int = 0


@functools.lru_cache(maxsize=4096)
def ip_text(ip: IPAddress) -> str:
    """``str(ip)``, remembered: a session writes its client's address in
    several places (the PTR question, logs, the Received header), and
    ``ipaddress`` formats slowly."""
    return str(ip)


#: ``ipaddress.ip_address``, remembered (clients come back)
_parse_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


def _ip(value: str | IPAddress) -> IPAddress:
    ip = _parse_ip(value) if isinstance(value, str) else value
    # Postfix treats an IPv4-mapped IPv6 peer as the IPv4 address "for
    # logging, hostname verification and access checks" (smtpd_peer.c).
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@attrs.frozen
class Session:
    """What is known about one SMTP connection.

    ``helo`` is the argument of the last HELO/EHLO (``None`` before one).
    ``auth_user`` is the account name after a successful AUTH.
    ``improper_pipelining`` is set by the adapter when the client sent a
    command ahead of a reply where RFC 2920 does not allow it (or without
    having seen PIPELINING in an EHLO reply).
    """

    client_ip: IPAddress = attrs.field(converter=_ip)
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    auth_user: str | None = None
    improper_pipelining: bool = False
    counters: Counters = Counters()
    #: every DNS answer gathered so far: a fact like the others (two sessions
    #: that know different answers differ), left out of the hash only
    #: (equal sessions still hash equal: the hash reads a subset)
    dns: Mapping[DnsQuery, DnsResult] = attrs.field(
        default=None, converter=_freeze_dns, hash=False, repr=False
    )

    def with_dns(
        self, answers: Mapping[DnsQuery, DnsResult] | Iterable[tuple[DnsQuery, DnsResult]]
    ) -> Session:
        """A copy that also knows ``answers`` (a new answer to a question
        already answered replaces the old one)."""
        merged = dict(self.dns)
        merged.update(answers)
        return attrs.evolve(self, dns=merged)


@attrs.frozen
class MessageFacts:
    """Facts about a received message, known at the end of DATA.

    ``size`` is the message as it will be stored: after dot-unstuffing, with
    the ``Received:`` header we add (Postfix's ``message_size_limit`` counts
    its queue file, its own header included). ``received_headers`` counts
    ``Received:`` fields already in it. ``largest_attachment`` is the decoded
    size of the largest MIME part that is an attachment. ``auto_forwarded`` is true for
    ``Auto-Submitted: auto-forwarded`` or any ``Resent-From``/``Resent-Sender``.
    """

    size: int
    received_headers: int = 0
    largest_attachment: int = 0
    auto_forwarded: bool = False


@attrs.frozen
class Envelope:
    """The transaction being judged, at one :class:`Stage`.

    ``sender`` is the MAIL FROM address as the client gave it, without angle
    brackets (``""`` is the null sender, ``None`` before MAIL). ``recipient``
    is the RCPT TO address being judged (RCPT stage); ``recipients`` are those
    accepted so far. ``declared_size`` is the MAIL FROM ``SIZE=`` value.
    ``discard`` names the rule that already marked this transaction for
    discarding: Postfix then skips every restriction for the rest of it.
    ``smtputf8`` is true when MAIL FROM asked for SMTPUTF8: UTF-8 domains
    are then judged by their IDNA form.
    """

    stage: Stage = attrs.field(converter=_stage)
    sender: str | None = None
    recipient: str | None = None
    recipients: tuple[str, ...] = attrs.field(default=(), converter=_addresses)
    declared_size: int | None = None
    message: MessageFacts | None = None
    discard: str | None = None
    smtputf8: bool = False

    def __attrs_post_init__(self) -> None:
        # An envelope that lacks what its stage is about would pass every
        # rule that looks for it: refuse it instead of accepting by accident.
        missing = _NEEDED.get(self.stage)
        if missing is not None and getattr(self, missing) is None:
            raise ValueError(
                f"an Envelope at stage {self.stage.value!r} needs {missing!r} "
                f"(Envelope(Stage.{self.stage.name}, {missing}=...))"
            )


#: what an envelope at each stage is about (see Envelope.__attrs_post_init__)
_NEEDED: Final[Mapping[Stage, str]] = {
    Stage.MAIL: "sender",
    Stage.RCPT: "recipient",
    Stage.END_OF_DATA: "message",
}


class Action(enum.Enum):
    """What the server does with the request."""

    ACCEPT = "accept"
    REJECT = "reject"
    DEFER = "defer"
    #: accept unless something else refuses; when nothing does, defer
    #: (Postfix's ``defer_if_permit``: a temporary DNS failure).
    DEFER_IF_PERMIT = "defer_if_permit"
    #: accept, then drop the whole message for every recipient.
    DISCARD = "discard"

    @property
    def refuses(self) -> bool:
        return self in (Action.REJECT, Action.DEFER, Action.DEFER_IF_PERMIT)


@attrs.frozen
class Reply:
    """An SMTP reply: ``code``, enhanced status code (or ``None``), text."""

    code: int
    enhanced: str | None
    text: str

    def __str__(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


@attrs.frozen
class Evidence:
    """Why a rule decided: what it looked at and what it found.

    ``kind`` names the fact (``"client"``, ``"sender"``, ``"dns"``,
    ``"counter"``...), ``value`` the value judged, ``matched`` the list entry
    or limit it matched, ``dns`` the DNS answer relied on.
    """

    kind: str
    value: str
    matched: str | None = None
    dns: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        parts = [f"{self.kind}={self.value}"]
        if self.matched is not None:
            parts.append(f"matched={self.matched}")
        parts.extend(f"{q}={o}" for q, o in self.dns)
        return " ".join(parts)


@attrs.frozen
class Verdict:
    """The policy's answer for one stage.

    ``rule`` is the settings key of the rule that decided (for example
    ``"relay.reject_unauth_destination"`` or ``"security.lists.spammers"``),
    or ``None`` when nothing in the policy decided and the request passes.
    ``reply`` is what the client should be told; ``None`` for a plain
    acceptance, where the adapter sends its usual positive reply.
    ``observed`` holds the refusals that observed rules (``observe = true``)
    would have made on the way, each as the verdict it would have been: the
    request went on as if they had passed.
    """

    action: Action
    reply: Reply | None = None
    rule: str | None = None
    evidence: tuple[Evidence, ...] = ()
    observed: tuple[Verdict, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.action in (Action.ACCEPT, Action.DISCARD)

    def explain(self) -> str:
        """One line a person can read: action, rule, reply and evidence."""
        out = [self.action.value]
        if self.rule:
            out.append(f"rule={self.rule}")
        if self.reply is not None:
            out.append(f'reply="{self.reply}"')
        out.extend(str(e) for e in self.evidence)
        out.extend(f"observed=[{o.explain()}]" for o in self.observed)
        return " ".join(out)


ACCEPT: Final = Verdict(Action.ACCEPT)


# ---------------------------------------------------------------------------
# Routing: where accepted mail goes next (see mailpolicy.routing)


class RouteKind(enum.Enum):
    LOCAL = "local"
    SMTP = "smtp"
    ERROR = "error"


@attrs.frozen
class NextHop:
    """One SMTP server to hand a message to. ``security`` is ``"none"``,
    ``"starttls"`` or ``"tls"``; credentials are a reference (the user name
    and the *name* of the environment variable that holds the password), so
    a route can be logged, compared and captured without a secret in it."""

    host: str
    port: int = 25
    security: str = "none"
    username: str | None = None
    password_env: str | None = None


@attrs.frozen
class Route:
    """The routing decision for one recipient.

    ``LOCAL``: deliver to ``mailbox`` (after external-postmaster rewriting).
    ``SMTP``: try ``next_hops`` in order. ``ERROR``: ``error`` says why not
    (``error.temporary`` for DNS failures). ``reason`` explains the choice.
    """

    recipient: str
    kind: RouteKind
    reason: str
    mailbox: str | None = None
    next_hops: tuple[NextHop, ...] = ()
    error: Reply | None = None
