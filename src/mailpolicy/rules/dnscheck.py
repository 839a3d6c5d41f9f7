"""Does a domain exist in DNS? Shared by the sender, recipient and HELO checks.

Postfix asks for MX, then A, then AAAA and stops at the first answer; a
temporary failure of one type does not hide an answer of another (a domain
whose MX lookup fails but which has an A record exists). We ask the three
questions at once, so an adapter resolves them in one round trip.
"""

from __future__ import annotations

import enum

from ..model import DnsQuery, DnsResult, RType
from .context import Context

__all__ = ["Existence", "domain_existence"]


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
    queries = tuple(DnsQuery.of(domain, t) for t in types)
    results = ctx.dns(*queries)
    if RType.MX in types and results[types.index(RType.MX)].null_mx:
        found = Existence.NULL_MX
    elif any(r.found for r in results):
        return Existence.FOUND, ()
    elif any(r.outcome.temporary for r in results):
        found = Existence.TEMPORARY
    else:
        found = Existence.NOT_FOUND
    return found, tuple((str(q), _show(r)) for q, r in zip(queries, results, strict=True))


def _show(result: DnsResult) -> str:
    return ",".join(result.records) if result.records else result.outcome.value
