"""Recipient checks (settings section 4.4) and the bare ``postmaster``."""

from __future__ import annotations

import attrs

from ..addresses import is_fqdn
from ..model import Evidence
from . import Decision, Outcome, reply
from .context import Context
from .dnscheck import reject_unknown_address

__all__ = ["AcceptBarePostmaster", "RejectNonFqdnRecipient", "RejectUnknownRecipientDomain"]


@attrs.frozen
class AcceptBarePostmaster:
    """RFC 5321 4.5.1: ``RCPT TO:<postmaster>`` is always accepted (Postfix
    does so before any restriction)."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        rcpt = ctx.envelope.recipient
        if rcpt is not None and rcpt.lower() == "postmaster":
            return Decision(Outcome.ACCEPT, self.name, evidence=(Evidence("recipient", rcpt),))
        return None


@attrs.frozen
class RejectNonFqdnRecipient:
    name: str

    def check(self, ctx: Context) -> Decision | None:
        r = ctx.recipient
        if r is None or r.is_literal or is_fqdn(r.domain, smtputf8=ctx.envelope.smtputf8):
            return None
        text = f"<{r.given}>: Recipient address rejected: need fully-qualified address"
        return Decision(
            Outcome.REJECT, self.name, reply(504, "5.2", text), (Evidence("recipient", r.given),)
        )


@attrs.frozen
class RejectUnknownRecipientDomain:
    """As for senders; our own domains are never looked up."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        return reject_unknown_address(
            ctx, self.name, ctx.recipient, "recipient", "1.2", (556, "1.10")
        )
