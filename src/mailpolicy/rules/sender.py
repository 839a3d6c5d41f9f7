"""Sender policy (settings section 4.2): what the MAIL FROM address must be.

Skipped for the null sender ``<>``, as in Postfix.
"""

from __future__ import annotations

import attrs

from ..addresses import is_fqdn
from ..model import Evidence
from . import Decision, Outcome, reply
from .context import Context
from .dnscheck import Existence, domain_existence
from .relay import real_destination

__all__ = ["RejectNonFqdnSender", "RejectUnknownSenderDomain"]


@attrs.frozen
class RejectNonFqdnSender:
    name: str = "security.sender_policy.reject_non_fqdn_sender"

    def check(self, ctx: Context) -> Decision | None:
        s = ctx.sender
        if (
            s is None
            or s.is_null
            or s.is_literal
            or is_fqdn(s.domain, smtputf8=ctx.envelope.smtputf8)
        ):
            return None
        return Decision(
            Outcome.REJECT,
            self.name,
            reply(504, "5.2", f"<{s.text}>: Sender address rejected: need fully-qualified address"),
            (Evidence("sender", s.text),),
        )


@attrs.frozen
class RejectUnknownSenderDomain:
    """No MX and no A/AAAA: refused; null MX: refused; DNS trouble: deferred
    unless something else refuses. Our own domains are never looked up."""

    name: str = "security.sender_policy.reject_unknown_sender_domain"

    def check(self, ctx: Context) -> Decision | None:
        s = ctx.sender
        if s is None or s.is_null or not s.domain or s.is_literal:
            return None
        # Judged by where the address really leads (a%b@us is b's), and not
        # at all when that is one of our own domains (Postfix resolves first).
        domain, _ = real_destination(s, ctx.shared)
        if ctx.is_local_domain(domain) or domain.startswith("["):
            return None
        found, dns = domain_existence(ctx, domain)
        ev = (Evidence("sender", s.text, dns=dns),)
        subject = f"<{s.text}>: Sender address rejected"
        if found is Existence.FOUND:
            return None
        if found is Existence.NULL_MX:
            text = f"{subject}: Domain {domain} does not accept mail (nullMX)"
            return Decision(Outcome.REJECT, self.name, reply(550, "7.27", text), ev)
        if found is Existence.TEMPORARY:
            text = f"{subject}: Domain not found"
            return Decision(Outcome.DEFER_IF_PERMIT, self.name, reply(450, "1.8", text), ev)
        code = ctx.settings.replies.unknown_address
        return Decision(
            Outcome.REJECT, self.name, reply(code, "1.8", f"{subject}: Domain not found"), ev
        )
