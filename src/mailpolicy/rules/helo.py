"""HELO checks (settings section 4.4): the name the client gave.

Judged at RCPT (Postfix's ``smtpd_delay_reject``); ``require_helo`` is judged
at MAIL, where Postfix says "send HELO/EHLO first".
"""

from __future__ import annotations

import attrs

from ..addresses import (
    is_fqdn,
    is_valid_helo,
    is_valid_hostaddr,
    is_valid_hostname,
    is_valid_ip_literal,
)
from ..model import Evidence
from . import Decision, Outcome, reply
from .context import Context
from .dnscheck import Existence, domain_existence

__all__ = ["RejectInvalidHelo", "RejectNonFqdnHelo", "RejectUnknownHelo", "RequireHelo"]


def _bad_literal(rule: str, helo: str) -> Decision | None:
    """Postfix judges a ``[...]`` HELO by the literal alone, in all three
    HELO checks (``reject_invalid_hostaddr``)."""
    if is_valid_ip_literal(helo):
        return None
    text = f"<{helo}>: Helo command rejected: invalid ip address"
    return Decision(Outcome.REJECT, rule, reply(501, "5.2", text), (Evidence("helo", helo),))


@attrs.frozen
class RequireHelo:
    name: str

    def check(self, ctx: Context) -> Decision | None:
        if ctx.session.helo is not None:
            return None
        return Decision(
            Outcome.REJECT,
            self.name,
            reply(503, "5.1", "Error: send HELO/EHLO first"),
            (Evidence("helo", "none"),),
        )


@attrs.frozen
class RejectInvalidHelo:
    name: str

    def check(self, ctx: Context) -> Decision | None:
        helo = ctx.session.helo
        if not helo:
            return None
        if helo.startswith("["):
            return _bad_literal(self.name, helo)
        if is_valid_helo(helo):
            return None
        text = f"<{helo}>: Helo command rejected: Invalid name"
        return Decision(
            Outcome.REJECT, self.name, reply(501, "5.2", text), (Evidence("helo", helo),)
        )


@attrs.frozen
class RejectNonFqdnHelo:
    name: str

    def check(self, ctx: Context) -> Decision | None:
        helo = ctx.session.helo
        if not helo:
            return None
        if helo.startswith("["):
            return _bad_literal(self.name, helo)
        if is_fqdn(helo):
            return None
        text = f"<{helo}>: Helo command rejected: need fully-qualified hostname"
        return Decision(
            Outcome.REJECT, self.name, reply(504, "5.2", text), (Evidence("helo", helo),)
        )


@attrs.frozen
class RejectUnknownHelo:
    """A HELO name with no A, AAAA or MX is refused; DNS trouble defers only
    if nothing else refuses. Address literals are not looked up, only checked."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        helo = ctx.session.helo
        if not helo:
            return None
        if helo.startswith("["):
            return _bad_literal(self.name, helo)
        if helo.endswith(".") or is_valid_hostaddr(helo) or not is_valid_hostname(helo):
            # Postfix's resolver refuses such a name (an IP address, a
            # trailing dot, a bad label) without asking DNS: not found.
            dns: tuple[tuple[str, str], ...] = ()
            found = Existence.NOT_FOUND
        else:
            found, dns = domain_existence(ctx, helo.lower())
        if found in (Existence.FOUND, Existence.NULL_MX):
            return None
        ev = (Evidence("helo", helo, dns=dns),)
        text = f"<{helo}>: Helo command rejected: Host not found"
        if found is Existence.TEMPORARY:
            return Decision(Outcome.DEFER_IF_PERMIT, self.name, reply(450, "7.1", text), ev)
        code = ctx.settings.replies.unknown_hostname
        return Decision(Outcome.REJECT, self.name, reply(code, "7.1", text), ev)
