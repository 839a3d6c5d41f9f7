"""Recipient checks (settings section 4.4) and the bare ``postmaster``."""

from __future__ import annotations

import attrs

from ..addresses import is_fqdn
from ..model import Evidence
from . import Decision, Outcome, reply
from .context import Context
from .dnscheck import Existence, domain_existence
from .relay import real_destination

__all__ = ["AcceptBarePostmaster", "RejectNonFqdnRecipient", "RejectUnknownRecipientDomain"]


@attrs.frozen
class AcceptBarePostmaster:
    """RFC 5321 4.5.1: ``RCPT TO:<postmaster>`` is always accepted (Postfix
    does so before any restriction)."""

    name: str = "rfc5321.postmaster"

    def check(self, ctx: Context) -> Decision | None:
        rcpt = ctx.envelope.recipient
        if rcpt is not None and rcpt.lower() == "postmaster":
            return Decision(Outcome.ACCEPT, self.name, evidence=(Evidence("recipient", rcpt),))
        return None


@attrs.frozen
class RejectNonFqdnRecipient:
    name: str = "security.advanced.reject_non_fqdn_recipient"

    def check(self, ctx: Context) -> Decision | None:
        r = ctx.recipient
        if r is None or r.is_literal or is_fqdn(r.domain, smtputf8=ctx.envelope.smtputf8):
            return None
        text = f"<{r.text}>: Recipient address rejected: need fully-qualified address"
        return Decision(
            Outcome.REJECT, self.name, reply(504, "5.2", text), (Evidence("recipient", r.text),)
        )


@attrs.frozen
class RejectUnknownRecipientDomain:
    """As for senders; our own domains are never looked up."""

    name: str = "security.advanced.reject_unknown_recipient_domain"

    def check(self, ctx: Context) -> Decision | None:
        r = ctx.recipient
        if r is None or not r.domain or r.is_literal:
            return None
        # Judged by where the address really leads, as Postfix resolves it.
        domain, _ = real_destination(r, ctx.shared)
        if ctx.is_local_domain(domain) or domain.startswith("["):
            return None
        found, dns = domain_existence(ctx, domain)
        ev = (Evidence("recipient", r.text, dns=dns),)
        subject = f"<{r.text}>: Recipient address rejected"
        if found is Existence.FOUND:
            return None
        if found is Existence.NULL_MX:
            text = f"{subject}: Domain {domain} does not accept mail (nullMX)"
            return Decision(Outcome.REJECT, self.name, reply(556, "1.10", text), ev)
        if found is Existence.TEMPORARY:
            text = f"{subject}: Domain not found"
            return Decision(Outcome.DEFER_IF_PERMIT, self.name, reply(450, "1.2", text), ev)
        code = ctx.settings.replies.unknown_address
        return Decision(
            Outcome.REJECT, self.name, reply(code, "1.2", f"{subject}: Domain not found"), ev
        )
