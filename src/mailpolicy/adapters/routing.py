"""Routing with a resolver: the I/O loop around the pure :mod:`mailpolicy.routing`.

:func:`resolve_routes` asks :func:`~mailpolicy.routing.routing_lookups` what
is missing, asks the resolver all of it at once, and repeats until nothing is
missing (two rounds at most in practice: MX, then A/AAAA), then calls
:func:`~mailpolicy.routing.route`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, MutableMapping, Sequence

from ..model import DnsQuery, DnsResult, IPAddress, Route
from ..routing import route, routing_lookups
from ..settings import Settings
from .dns import Resolver

__all__ = ["MAX_ROUNDS", "resolve_routes"]

#: rounds of questions before giving up; the decision needs two (MX, then
#: addresses), so more means a bug, and the routes then name what is missing
MAX_ROUNDS = 4


async def resolve_routes(
    settings: Settings,
    sender: str,
    recipients: Sequence[str],
    resolver: Resolver,
    rng: random.Random,
    our_addresses: Iterable[str | IPAddress] = frozenset(),
    *,
    answers: MutableMapping[DnsQuery, DnsResult] | None = None,
) -> tuple[Route, ...]:
    """The routes for ``recipients``, with DNS answers from ``resolver``.

    ``answers``, when given, seeds the known answers and receives every
    answer the decision used: pass a dict and build
    :meth:`~mailpolicy.adapters.dns.StaticZone.from_results` from it to
    capture the decision for offline replay.
    """
    known: MutableMapping[DnsQuery, DnsResult] = answers if answers is not None else {}
    ours = frozenset(our_addresses)
    for _ in range(MAX_ROUNDS):
        needed = routing_lookups(settings, sender, recipients, known, our_addresses=ours)
        needed = frozenset(q for q in needed if q not in known)
        if not needed:
            break
        known.update(await resolver.resolve_all(needed))
    return route(settings, sender, recipients, known, rng=rng, our_addresses=ours)
