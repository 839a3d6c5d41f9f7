"""The addresses of next hops, from the configured resolver.

A route names its next hops by host name (an MX host, a relay host) or by
address. Before connecting, each name is resolved through the *same*
resolver that gave the MX records (``[dns] nameservers`` or ``serve --dns``),
never through the operating system's ``/etc/resolv.conf`` and ``/etc/hosts``:
with split DNS, an internal nameserver listed first must decide where the
organisation's mail goes, and an address only the configured nameserver
knows must still be reachable. This is what Postfix does (A and AAAA through
the resolver that answered the MX question; every address of every MX host
is tried in order).

Answers already known (the A/AAAA of an implicit MX, asked by the routing
decision) are reused, not asked again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, MutableMapping

import attrs

from ..model import DnsOutcome, DnsQuery, DnsResult, NextHop, Reply, RType
from .dns import Resolver

__all__ = ["HopAddresses", "resolve_hops"]


@attrs.frozen
class HopAddresses:
    """A next hop and the addresses to try for it, in order.

    ``addresses`` is empty exactly when ``error`` says why (a temporary
    reply: a host that cannot be found now may be found later, and another
    hop may take the mail meanwhile).
    """

    hop: NextHop
    addresses: tuple[str, ...]
    error: Reply | None = None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def resolve_hops(
    hops: Iterable[NextHop],
    resolver: Resolver,
    known: MutableMapping[DnsQuery, DnsResult] | None = None,
) -> tuple[HopAddresses, ...]:
    """Each hop with its addresses: IPv4 (A) first, then IPv6 (AAAA), each in
    the order the nameserver gave. ``known`` seeds the answers and receives
    the new ones. One round of questions for all the hops."""
    answers: MutableMapping[DnsQuery, DnsResult] = known if known is not None else {}
    hops = tuple(hops)
    needed = {
        DnsQuery(hop.host, rtype)
        for hop in hops
        if not _is_ip(hop.host)
        for rtype in (RType.A, RType.AAAA)
    }
    missing = [q for q in needed if q not in answers]
    if missing:
        answers.update(await resolver.resolve_all(missing))
    return tuple(_addresses(hop, answers) for hop in hops)


def _addresses(hop: NextHop, answers: MutableMapping[DnsQuery, DnsResult]) -> HopAddresses:
    if _is_ip(hop.host):
        return HopAddresses(hop, (hop.host,))
    found: list[str] = []
    failed: list[tuple[RType, DnsResult]] = []
    for rtype in (RType.A, RType.AAAA):
        result = answers.get(DnsQuery(hop.host, rtype), DnsResult(DnsOutcome.SERVFAIL))
        if result.outcome is DnsOutcome.ANSWER:
            found.extend(r.strip() for r in result.records if _is_ip(r.strip()))
        else:
            failed.append((rtype, result))
    if found:
        return HopAddresses(hop, tuple(dict.fromkeys(found)))
    temporary = [(t, r) for t, r in failed if r.outcome.temporary]
    if temporary:
        rtype = temporary[0][0]
        text = (
            f"Host or domain name not found. Name service error for name={hop.host} "
            f"type={rtype.value}: Host not found, try again"
        )
        return HopAddresses(hop, (), Reply(451, "4.4.3", text))
    text = f"Host or domain name not found. {hop.host} has no A or AAAA record"
    return HopAddresses(hop, (), Reply(451, "4.4.4", text))
