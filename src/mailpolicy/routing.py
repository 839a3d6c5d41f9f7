"""Where accepted mail goes next: a pure routing decision per recipient.

Theory of operation
-------------------
This module is part of the core: it imports only the standard library, attrs
and the model and settings modules, does no I/O and owns no randomness. Like
:class:`~mailpolicy.policy.Policy` it is sans-I/O and works in two calls:

* :func:`routing_lookups` names the DNS questions the decision still needs,
  given the answers already known;
* :func:`route` makes the decision from the answers. A question whose answer
  is missing is never guessed: that recipient gets a temporary error route
  naming the question.

An adapter loops "lookups, resolve, lookups..." until nothing is missing
(:func:`mailpolicy.adapters.routing.resolve_routes` does exactly that), then
calls :func:`route` once. The first round asks the MX questions; a second
round asks A/AAAA questions only where they are needed: for the implicit MX
of a domain without MX records, and for the MX hosts that might be ourselves
when ``our_addresses`` is given.

The rules, for each recipient, first match wins (docs/settings.md: general, delivery, relay):

1. **Local.** A domain in ``general.local_domains`` (exactly, not its
   subdomains) is delivered here: ``LOCAL`` with ``mailbox`` = the address,
   domain in lower case. ``postmaster@`` and ``mailer-daemon@`` of a local
   domain, and the bare ``postmaster``, go to ``general.external_postmasters``
   instead when that is set (below). A bare address other than
   ``postmaster`` is qualified with ``general.hostname``, as Postfix's
   ``append_at_myorigin`` does.
2. **Exceptions.** The first ``[[delivery.exceptions]]`` whose ``targets``
   match (by ``sender`` or by ``recipient``: an address exactly, a domain
   with its subdomains; never the null sender) sends the mail through its
   relay host, whatever ``delivery.mode`` says, inbound domains included.
3. **Inbound domains.** A domain in ``relay.inbound_domains`` or below one
   goes to its MX, exactly as in direct mode, even in relay mode: these are
   the internal servers we are the gateway for.
4. **Relay mode.** ``delivery.mode = "relay"``: through ``delivery.relay_host``.
5. **Direct mode.** RFC 5321 section 5 (below).

Direct delivery (RFC 5321 section 5.1, RFC 7505):

* MX records in preference order; hosts of equal preference shuffled with the
  caller's ``random.Random`` (sorted first, so the order depends only on the
  records and the seed, not on the order the DNS listed them). Recipients of
  one call in the same domain share one order. A host listed twice keeps its
  best preference; an MX host that is an IP address or the root is ignored,
  as Postfix does.
* A null MX (a single ``0 .`` record) is a permanent error, ``556 5.1.10``.
* ``NXDOMAIN`` for the MX question: the domain does not exist, a permanent
  ``550 5.4.4`` (Postfix's "Host or domain name not found").
* ``NODATA`` for MX: the implicit MX, the domain itself, if it has an A or
  AAAA record; without either, a permanent ``550 5.4.4``.
* An MX host that is ourselves (its name is ``general.hostname``, or one of
  its addresses is in ``our_addresses``) is dropped with every MX of equal or
  worse (higher) preference; when nothing is left the error is ``554 5.4.6
  mail for DOMAIN loops back to myself``, as Postfix says. An MX host whose
  address lookup failed is not known to be us and is kept (Postfix drops it
  for delivery; the delivery adapter will find it unreachable and move on).
* ``SERVFAIL`` or ``TIMEOUT`` where an answer matters: a temporary error,
  ``451 4.4.3``, never a bounce.

Next hops for MX hosts (and the implicit MX, and address literals) get
``delivery.mx_port`` (25) and ``delivery.mx_security`` (``"may"``). Their
addresses are not part of the decision: the delivery adapter resolves each
host through the same resolver (:mod:`mailpolicy.adapters.nexthops`).
Relay hosts (mode or exception) are copied as configured: host, port,
security and the credentials *reference* (user name and the name of the
environment variable holding the password).

External postmasters are an alias expansion (Postfix's
``virtual_alias_maps``): each external address is routed by the same rules
(it is not rewritten again, so a list that names a local postmaster cannot
loop) and gives one :class:`~mailpolicy.model.Route` whose ``recipient`` is
the original recipient and whose ``mailbox`` is the external address, the
envelope recipient to deliver to, whatever the route's kind. So :func:`route`
returns one route per recipient, except that a rewritten recipient gives one
route per external postmaster; routes come in recipient order.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from .model import (
    DnsOutcome,
    DnsQuery,
    DnsResult,
    IPAddress,
    NextHop,
    Reply,
    Route,
    RouteKind,
    RType,
)
from .settings import DeliveryException, RelayHost, Settings

__all__ = ["route", "routing_lookups"]

#: local parts that ``general.external_postmasters`` takes over
POSTMASTER_NAMES: Final = frozenset({"postmaster", "mailer-daemon"})


def routing_lookups(
    settings: Settings,
    sender: str,
    recipients: Iterable[str],
    dns: Mapping[DnsQuery, DnsResult],
    *,
    our_addresses: Iterable[str | IPAddress] = frozenset(),
) -> frozenset[DnsQuery]:
    """The DNS questions :func:`route` still needs, given the answers in ``dns``.

    Empty when the decision can be made. ``our_addresses`` must be the same
    as the one given to :func:`route`: it decides which A/AAAA questions
    about MX hosts are needed.
    """
    router = _Router(settings, sender, dns, None, our_addresses)
    needed: set[DnsQuery] = set()
    for recipient in recipients:
        router.routes_for(recipient)
        needed |= router.missing
    return frozenset(needed)


def route(
    settings: Settings,
    sender: str,
    recipients: Iterable[str],
    dns: Mapping[DnsQuery, DnsResult],
    *,
    rng: random.Random,
    our_addresses: Iterable[str | IPAddress] = frozenset(),
) -> tuple[Route, ...]:
    """Decide where each recipient's copy goes (see the module doc for the rules).

    ``sender`` is the MAIL FROM address without angle brackets (``""`` for
    the null sender); it matters only to sender exceptions. ``rng`` orders
    MX hosts of equal preference; pass a seeded ``random.Random`` for a
    repeatable order. ``our_addresses`` are this server's IP addresses, for
    spotting ourselves among MX hosts. A needed DNS answer missing from
    ``dns`` gives that recipient a temporary error naming the question.
    """
    router = _Router(settings, sender, dns, rng, our_addresses)
    out: list[Route] = []
    for recipient in recipients:
        out.extend(router.routes_for(recipient))
    return tuple(out)


# ---------------------------------------------------------------------------
# Replies. Codes and enhanced codes are Postfix's for the same situations.


def _temp_dns(name: str, rtype: RType) -> Reply:
    return Reply(
        451,
        "4.4.3",
        f"Host or domain name not found. Name service error for name={name} "
        f"type={rtype.value}: Host not found, try again",
    )


def _not_found(name: str, rtype: RType) -> Reply:
    return Reply(
        550,
        "5.4.4",
        f"Host or domain name not found. Name service error for name={name} "
        f"type={rtype.value}: Host not found",
    )


def _no_address(domain: str) -> Reply:
    return Reply(
        550,
        "5.4.4",
        f"Host or domain name not found. {domain} has no MX, A or AAAA record",
    )


def _null_mx(domain: str) -> Reply:
    return Reply(556, "5.1.10", f"Domain {domain} does not accept mail (nullMX)")


def _loop(domain: str) -> Reply:
    return Reply(554, "5.4.6", f"mail for {domain} loops back to myself")


def _missing(queries: Iterable[DnsQuery]) -> Reply:
    names = ", ".join(sorted(str(q) for q in queries))
    return Reply(451, "4.4.3", f"DNS answer not available for {names}")


# ---------------------------------------------------------------------------
# The decision


@attrs.frozen
class _Hops:
    """A finished decision about a destination: hops, or an error."""

    reason: str
    hops: tuple[NextHop, ...] = ()
    error: Reply | None = None


def _hop(relay: RelayHost) -> NextHop:
    return NextHop(
        host=relay.host,
        port=relay.port,
        security=relay.security,
        username=relay.username,
        password_env=relay.password_env,
    )


def _describe(relay: RelayHost) -> str:
    return f"{relay.host}:{relay.port} ({relay.security})"


def _in_domain(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


def _target_matches(target: str, address: str) -> bool:
    """An exception target: an address matches exactly (without case), a
    domain matches its addresses and those of its subdomains."""
    if not address:
        return False  # the null sender matches nothing
    if "@" in target:
        local, _, domain = target.rpartition("@")
        a_local, _, a_domain = address.rpartition("@")
        return local == a_local.lower() and domain == a_domain.lower().rstrip(".")
    _, at, domain = address.rpartition("@")
    return bool(at) and _in_domain(domain.lower().rstrip("."), target)


def _as_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _literal_ip(domain: str) -> IPAddress | None:
    """The address of an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        ip = _as_ip(inner[5:])
        return ip if isinstance(ip, ipaddress.IPv6Address) else None
    ip = _as_ip(inner)
    return ip if isinstance(ip, ipaddress.IPv4Address) else None


class _Router:
    """One routing pass. Records the questions it missed in ``missing``
    (reset for each recipient) and caches finished MX decisions per domain,
    so that recipients in one domain share one shuffled order."""

    def __init__(
        self,
        settings: Settings,
        sender: str,
        dns: Mapping[DnsQuery, DnsResult],
        rng: random.Random | None,
        our_addresses: Iterable[str | IPAddress],
    ) -> None:
        self.settings = settings
        self.sender = sender.strip()
        self.dns = dns
        self.rng = rng
        self.ours: frozenset[IPAddress] = frozenset(
            ipaddress.ip_address(a) if isinstance(a, str) else a for a in our_addresses
        ) | frozenset(settings.delivery.our_addresses)
        self.hostname = settings.general.hostname
        self.local_domains = frozenset(settings.general.local_domains)
        self.missing: set[DnsQuery] = set()
        self._destinations: dict[str, _Hops] = {}

    def _mx_hop(self, host: str) -> NextHop:
        delivery = self.settings.delivery
        return NextHop(host, delivery.mx_port, delivery.mx_security)

    # -- DNS access ------------------------------------------------------------

    def _answers(self, *queries: DnsQuery) -> tuple[DnsResult, ...] | None:
        """All the answers, or ``None`` (and the gaps noted) if any is missing."""
        found = [self.dns.get(q) for q in queries]
        gaps = [q for q, r in zip(queries, found, strict=True) if r is None]
        if gaps:
            self.missing.update(gaps)
            return None
        return tuple(r for r in found if r is not None)

    # -- per recipient -------------------------------------------------------

    def routes_for(self, recipient: str) -> list[Route]:
        self.missing = set()
        local, at, domain = recipient.strip().rpartition("@")
        if not at:
            # a bare address: "postmaster" is always ours, others get our hostname
            local, domain = domain, "" if domain.lower() == "postmaster" else self.hostname
        domain = domain.lower().rstrip(".")
        ours = domain in self.local_domains or not domain
        externals = self.settings.general.external_postmasters
        if externals and ours and local.lower() in POSTMASTER_NAMES:
            routes = []
            for external in externals:
                inner = self._route_address(recipient, external)
                reason = (
                    f"general.external_postmasters: {recipient} goes to {external}; {inner.reason}"
                )
                routes.append(attrs.evolve(inner, mailbox=external, reason=reason))
            return routes
        return [self._route_address(recipient, recipient.strip())]

    def _route_address(self, recipient: str, address: str) -> Route:
        """Route ``address`` (the recipient, or what it was rewritten to);
        the Route names ``recipient``."""
        local, at, domain = address.rpartition("@")
        prefix = ""
        if not at:
            local = domain
            if local.lower() == "postmaster":
                # RFC 5321 4.5.1: the bare postmaster is always ours
                return Route(
                    recipient,
                    RouteKind.LOCAL,
                    "bare postmaster is delivered locally (RFC 5321 section 4.5.1)",
                    mailbox=f"{local}@{self.hostname}",
                )
            domain = self.hostname
            prefix = f"qualified with general.hostname as {local}@{domain}; "
        domain = domain.lower().rstrip(".")
        address = f"{local}@{domain}"
        if not domain:
            return self._error(recipient, Reply(550, "5.1.2", "empty domain"), "no domain")
        if domain in self.local_domains:
            return Route(
                recipient,
                RouteKind.LOCAL,
                f"{prefix}general.local_domains: {domain} is a local domain",
                mailbox=address,
            )
        found = self._exception(address)
        if found is not None:
            exception, what, target = found
            reason = (
                f"{prefix}delivery.exceptions.{exception.name}: {what} matches {target}, "
                f"through {_describe(exception.relay_host)}"
            )
            return Route(recipient, RouteKind.SMTP, reason, next_hops=(_hop(exception.relay_host),))
        inbound = next(
            (d for d in self.settings.relay.inbound_domains if _in_domain(domain, d)), None
        )
        if inbound is not None:
            rule = f"relay.inbound_domains: {domain} is in {inbound}, to its MX"
            return self._destination_route(recipient, domain, prefix + rule)
        delivery = self.settings.delivery
        if delivery.mode == "relay":
            if delivery.relay_host is None:
                error = Reply(451, "4.3.5", "mail system configuration error: no relay host")
                return self._error(recipient, error, f"{prefix}delivery.mode = relay")
            reason = f"{prefix}delivery.mode = relay: through {_describe(delivery.relay_host)}"
            return Route(recipient, RouteKind.SMTP, reason, next_hops=(_hop(delivery.relay_host),))
        return self._destination_route(recipient, domain, f"{prefix}delivery.mode = direct")

    def _exception(self, address: str) -> tuple[DeliveryException, str, str] | None:
        for exception in self.settings.delivery.exceptions:
            judged = self.sender if exception.match == "sender" else address
            for target in exception.targets:
                if _target_matches(target, judged):
                    return exception, f"{exception.match} {judged}", target
        return None

    def _error(self, recipient: str, error: Reply, reason: str) -> Route:
        return Route(recipient, RouteKind.ERROR, f"{reason}: {error.text}", error=error)

    def _destination_route(self, recipient: str, domain: str, rule: str) -> Route:
        before = set(self.missing)
        hops = self._destination(domain)
        if hops is None:
            error = _missing(self.missing - before or self.missing)
            return Route(
                recipient, RouteKind.ERROR, f"{rule}: {error.text} (not looked up)", error=error
            )
        reason = f"{rule}: {hops.reason}"
        if hops.error is not None:
            return Route(recipient, RouteKind.ERROR, reason, error=hops.error)
        return Route(recipient, RouteKind.SMTP, reason, next_hops=hops.hops)

    # -- per destination domain ------------------------------------------------

    def _destination(self, domain: str) -> _Hops | None:
        cached = self._destinations.get(domain)
        if cached is not None:
            return cached
        if domain.startswith("[") and domain.endswith("]"):
            decided: _Hops | None = self._literal(domain)
        else:
            decided = self._mx(domain)
        if decided is not None:
            self._destinations[domain] = decided
        return decided

    def _literal(self, domain: str) -> _Hops:
        ip = _literal_ip(domain)
        if ip is None:
            return _Hops(
                "bad address literal", error=Reply(550, "5.1.2", f"bad address literal {domain}")
            )
        if ip in self.ours:
            return _Hops(f"address literal {domain} is ours", error=_loop(domain))
        return _Hops(f"address literal {domain}, no MX lookup", hops=(self._mx_hop(str(ip)),))

    def _mx(self, domain: str) -> _Hops | None:
        found = self._answers(DnsQuery(domain, RType.MX))
        if found is None:
            return None
        (mx,) = found
        if mx.outcome.temporary:
            return _Hops(f"MX lookup {mx.outcome.name}", error=_temp_dns(domain, RType.MX))
        if mx.outcome is DnsOutcome.NXDOMAIN:
            return _Hops("MX lookup NXDOMAIN", error=_not_found(domain, RType.MX))
        if mx.outcome is DnsOutcome.NODATA or not mx.records:
            return self._implicit_mx(domain)
        records, ignored = _parse_mx(mx.records)
        if _is_null_mx(mx.records):
            return _Hops("null MX (RFC 7505)", error=_null_mx(domain))
        if not records:
            listed = ", ".join(mx.records)
            return _Hops(
                f"no usable MX host in {listed}",
                error=Reply(451, "4.4.3", f"no usable MX host for {domain}: {listed}"),
            )
        return self._order_mx(domain, records, ignored)

    def _order_mx(
        self, domain: str, records: list[tuple[int, str]], ignored: list[str]
    ) -> _Hops | None:
        listed = ", ".join(f"{p} {h}" for p, h in sorted(records))
        notes: list[str] = [f"MX of {domain}: {listed}"]
        if ignored:
            notes.append("ignored " + ", ".join(ignored))
        # RFC 5321 5.1: if we are an MX host, only strictly better ones remain
        cutoff: int | None = None
        me: str | None = None
        for pref, host in records:
            if host == self.hostname and (cutoff is None or pref < cutoff):
                cutoff, me = pref, f"{host} is general.hostname"
        candidates = [(p, h) for p, h in records if cutoff is None or p < cutoff]
        if self.ours and candidates:
            checked = self._self_by_address(candidates)
            if checked is None:
                return None
            for pref, _host, why in checked:
                if cutoff is None or pref < cutoff:
                    cutoff, me = pref, why
            candidates = [(p, h) for p, h in candidates if cutoff is None or p < cutoff]
        if cutoff is not None:
            notes.append(f"skipped ourselves ({me}) and every MX of preference >= {cutoff}")
            if not candidates:
                return _Hops("; ".join(notes), error=_loop(domain))
        ordered: list[str] = []
        shuffled = False
        for pref in sorted({p for p, _ in candidates}):
            group = sorted(h for p, h in candidates if p == pref)
            if len(group) > 1:
                shuffled = True
                if self.rng is not None:
                    self.rng.shuffle(group)
            ordered.extend(group)
        if shuffled:
            notes.append("equal preferences in random order")
        return _Hops("; ".join(notes), hops=tuple(self._mx_hop(h) for h in ordered))

    def _self_by_address(
        self, candidates: list[tuple[int, str]]
    ) -> list[tuple[int, str, str]] | None:
        """The candidates whose A/AAAA include one of our addresses."""
        types = [
            rtype
            for rtype, version in ((RType.A, 4), (RType.AAAA, 6))
            if any(ip.version == version for ip in self.ours)
        ]
        queries = [DnsQuery(h, t) for _, h in candidates for t in types]
        found = self._answers(*queries)
        if found is None:
            return None
        answers = dict(zip(queries, found, strict=True))
        out: list[tuple[int, str, str]] = []
        for pref, host in candidates:
            for rtype in types:
                mine = self._ours_in(answers[DnsQuery(host, rtype)])
                if mine is not None:
                    out.append((pref, host, f"{host} has our address {mine}"))
                    break
        return out

    def _ours_in(self, result: DnsResult) -> IPAddress | None:
        if result.outcome is not DnsOutcome.ANSWER:
            return None
        for record in result.records:
            ip = _as_ip(record.strip())
            if ip is not None and ip in self.ours:
                return ip
        return None

    def _implicit_mx(self, domain: str) -> _Hops | None:
        found = self._answers(DnsQuery(domain, RType.A), DnsQuery(domain, RType.AAAA))
        if found is None:
            return None
        a, aaaa = found
        addresses = [
            r for res in (a, aaaa) if res.outcome is DnsOutcome.ANSWER for r in res.records
        ]
        if addresses:
            why = f"no MX for {domain}: implicit MX, its own address {', '.join(addresses)}"
            if domain == self.hostname:
                return _Hops(f"{why}; {domain} is general.hostname", error=_loop(domain))
            mine = self._ours_in(a) or self._ours_in(aaaa)
            if mine is not None:
                return _Hops(f"{why}; {mine} is our address", error=_loop(domain))
            return _Hops(why, hops=(self._mx_hop(domain),))
        for rtype, res in ((RType.A, a), (RType.AAAA, aaaa)):
            if res.outcome.temporary:
                return _Hops(
                    f"no MX for {domain}, {rtype.value} lookup {res.outcome.name}",
                    error=_temp_dns(domain, rtype),
                )
        return _Hops(f"no MX for {domain} and no A or AAAA", error=_no_address(domain))


def _parse_mx(records: Iterable[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """Usable ``(preference, host)`` pairs (each host once, at its best
    preference, in the order given) and the records ignored."""
    best: dict[str, int] = {}
    ignored: list[str] = []
    for record in records:
        parts = record.split()
        if len(parts) != 2 or not parts[0].isdigit():
            ignored.append(record)
            continue
        pref, host = int(parts[0]), parts[1].lower().rstrip(".")
        # Postfix ignores an MX host that is an address ("numeric domain
        # name in resource data of MX record"); the root cannot take mail
        if not host or _as_ip(host) is not None:
            ignored.append(record)
            continue
        if host not in best or pref < best[host]:
            best[host] = pref
    return [(p, h) for h, p in best.items()], ignored


def _is_null_mx(records: tuple[str, ...]) -> bool:
    """RFC 7505: exactly one MX, whose host is the root."""
    if len(records) != 1:
        return False
    parts = records[0].split()
    return len(parts) == 2 and parts[1] == "."
