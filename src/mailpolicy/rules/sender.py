"""Sender policy (settings section 4.2): what the MAIL FROM address must be.

Skipped for the null sender ``<>``, as in Postfix.
"""

from __future__ import annotations

import attrs

from ..addresses import is_fqdn
from ..model import DnsQuery, Evidence
from . import Decision, Outcome, reply
from .context import Context
from .dnscheck import existence_ahead, reject_unknown_address

__all__ = ["RejectNonFqdnSender", "RejectUnknownSenderDomain"]


@attrs.frozen
class RejectNonFqdnSender:
    name: str

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
            reply(
                504, "5.2", f"<{s.given}>: Sender address rejected: need fully-qualified address"
            ),
            (Evidence("sender", s.given),),
        )


@attrs.frozen
class RejectUnknownSenderDomain:
    """No MX and no A/AAAA: refused; null MX: refused; DNS trouble: deferred
    unless something else refuses. Our own domains are never looked up."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        return reject_unknown_address(ctx, self.name, ctx.sender, "sender", "1.8", (550, "7.27"))

    def ahead(self, ctx: Context) -> tuple[DnsQuery, ...]:
        """What :meth:`check` will ask whatever the recipient (see
        :meth:`mailpolicy.policy.Policy.questions_ahead`)."""
        return existence_ahead(ctx, ctx.sender)
