"""Does a domain exist in DNS? Shared by the sender, recipient and HELO checks.

Postfix asks for MX, then A, then AAAA and stops at the first answer; a
temporary failure of one type does not hide an answer of another (a domain
whose MX lookup fails but which has an A record exists). We ask as Postfix
does: MX alone first, and A and AAAA together only when there is no usable MX
answer. Most domains have an MX, so most checks cost one question where three
at once cost three (measured in docs/performance.md); a domain without one
costs a second round trip.
"""

from __future__ import annotations

import enum

from ..addresses import Address
from ..model import DnsQuery, Evidence, RType
from . import Decision, Outcome, reply
from .context import Context
from .relay import real_destination

__all__ = ["Existence", "domain_existence", "existence_ahead", "reject_unknown_address"]


class Existence(enum.Enum):
    FOUND = "found"
    NULL_MX = "null_mx"
    NOT_FOUND = "not_found"
    TEMPORARY = "temporary"


def domain_existence(
    ctx: Context, domain: str, types: tuple[RType, ...] = (RType.MX, RType.A, RType.AAAA)
) -> tuple[Existence, tuple[tuple[str, str], ...]]:
    """Whether ``domain`` has any of ``types``, with the answers relied on
    (none for ``FOUND``: nothing refuses then, so no evidence is built)."""
    # plain loops: this runs for every HELO and sender domain, and a
    # generator costs a frame per call
    queries: tuple[DnsQuery, ...] = ()
    for rtype in types:
        queries += (DnsQuery.of(domain, rtype),)
    if len(types) > 1 and types[0] is RType.MX:
        mx = ctx.dns1(queries[0])
        if mx.null_mx:
            return Existence.NULL_MX, ((str(queries[0]), str(mx)),)
        if mx.found:
            return Existence.FOUND, ()
    results = ctx.dns(*queries)
    if RType.MX in types and results[types.index(RType.MX)].null_mx:
        found = Existence.NULL_MX
    else:
        found = Existence.NOT_FOUND
        for result in results:
            if result.found:
                return Existence.FOUND, ()
            if result.outcome.temporary:
                found = Existence.TEMPORARY
    return found, tuple((str(q), str(r)) for q, r in zip(queries, results, strict=True))


def reject_unknown_address(
    ctx: Context,
    rule: str,
    address: Address | None,
    kind: str,
    detail: str,
    null_mx: tuple[int, str],
) -> Decision | None:
    """Postfix's ``reject_unknown_address`` for a sender or a recipient.

    No MX and no A/AAAA: refused with ``replies.unknown_address``; a null MX:
    refused with ``null_mx``; DNS trouble: deferred unless something else
    refuses. The address is judged by where it really leads (``a%b@us`` is
    ``b``'s) and not at all when that is one of our own domains.
    """
    domain = _domain_to_check(ctx, address)
    if address is None or domain is None:
        return None
    found, dns = domain_existence(ctx, _dns_name(domain))
    if found is Existence.FOUND:
        return None
    ev = (Evidence(kind, address.given, dns=dns),)
    subject = f"<{address.given}>: {kind.capitalize()} address rejected"
    if found is Existence.NULL_MX:
        text = f"{subject}: Domain {domain} does not accept mail (nullMX)"
        return Decision(Outcome.REJECT, rule, reply(null_mx[0], null_mx[1], text), ev)
    text = f"{subject}: Domain not found"
    if found is Existence.TEMPORARY:
        return Decision(Outcome.DEFER_IF_PERMIT, rule, reply(450, detail, text), ev)
    code = ctx.settings.replies.unknown_address
    return Decision(Outcome.REJECT, rule, reply(code, detail, text), ev)


def existence_ahead(ctx: Context, address: Address | None) -> tuple[DnsQuery, ...]:
    """The question :func:`reject_unknown_address` asks first about
    ``address`` (its domain's MX), or none when it asks nothing: what a host
    may ask as soon as the address is known."""
    domain = _domain_to_check(ctx, address)
    if domain is None:
        return ()
    return (DnsQuery.of(_dns_name(domain), RType.MX),)


def _domain_to_check(ctx: Context, address: Address | None) -> str | None:
    """The domain whose existence is judged: where ``address`` really leads
    (``a%b@us`` is ``b``'s), or ``None`` for no check (no address, the null
    sender, an address literal, one of our own domains)."""
    if address is None or address.is_null or not address.domain or address.is_literal:
        return None
    domain, _ = real_destination(address, ctx.shared)
    if ctx.is_local_domain(domain) or domain.startswith("["):
        return None
    return domain


def _dns_name(domain: str) -> str:
    """The name DNS is asked about: a UTF-8 domain (an SMTPUTF8 address) by
    its A-label form, as Postfix converts it before the lookup."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
