"""Relay control (settings section 3): who may send mail to foreign domains.

Postfix's ``smtpd_relay_restrictions = permit_mynetworks,
permit_sasl_authenticated, reject_unauth_destination``. The recipient is
judged by where the mail would really go: ``user%other@us``,
``"user@other"@us`` and ``other!user@us`` are unwrapped while the domain is
ours, an address literal is never ours, and a routing operator left in the
local part of an inbound-relay address keeps the relay closed (Postfix's
``allow_untrusted_routing = no``).
"""

from __future__ import annotations

import attrs

from ..addresses import Address
from ..model import Evidence
from . import Decision, Outcome, reply
from .context import Context, Shared

__all__ = [
    "PermitAuthenticated",
    "PermitMynetworks",
    "RejectUnauthDestination",
    "real_destination",
]

_ROUTING_OPERATORS = ("@", "%", "!")


@attrs.frozen
class PermitMynetworks:
    """Trusted networks (and local networks when they skip AUTH) pass."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        if ctx.in_mynetworks:
            return Decision(
                Outcome.PERMIT, self.name, evidence=(Evidence("client", str(ctx.client_ip)),)
            )
        return None


@attrs.frozen
class PermitAuthenticated:
    """A client that logged in with SMTP AUTH passes."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        user = ctx.session.auth_user
        if user is not None:
            return Decision(Outcome.PERMIT, self.name, evidence=(Evidence("auth_user", user),))
        return None


def real_destination(address: Address, shared: Shared) -> tuple[str, bool]:
    """The domain the mail would really go to, and whether it is still routed.

    An unqualified address gets our host name, as Postfix's ``myorigin``.
    A source route was already stripped by the parser (Postfix judges
    ``<@a:u@b>`` as ``u@b``).
    """
    local, domain = address.local, address.domain or shared.settings.general.hostname
    # Every step shortens the local part, so this ends; no cap is needed
    # (a cap would let a deep enough a%b%...@us through as "ours").
    while domain in shared.local_domains:
        if "@" in local:
            local, domain = local.rsplit("@", 1)
        elif "%" in local:
            local, domain = local.rsplit("%", 1)
        elif "!" in local:
            domain, local = local.split("!", 1)
        else:
            break
        domain = domain.lower().rstrip(".")
    # Like trivial-rewrite's RESOLVE_FLAG_ROUTED: what counts is a routing
    # operator still in the local part once our own domains are peeled off
    # (r%partner@us is plain mail to partner; r%other@partner is routed).
    routed = any(op in local for op in _ROUTING_OPERATORS)
    return domain, routed


@attrs.frozen
class RejectUnauthDestination:
    """Everything else may only send to our domains and inbound domains."""

    name: str
    shared: Shared

    def check(self, ctx: Context) -> Decision | None:
        raw = ctx.envelope.recipient
        if raw is None:
            return None
        rcpt = ctx.recipient
        if rcpt is None:
            # Unparsable: we cannot tell where it goes, so it may not go anywhere.
            return self._deny(ctx, raw, "unparsable address")
        domain, routed = real_destination(rcpt, self.shared)
        # As Postfix's permit_auth_destination: a routed address is refused
        # before asking whether the destination is ours.
        if not routed and not domain.startswith("["):
            if domain in self.shared.local_domains:
                return None
            if self.shared.inbound_domains.matches(domain):
                return None
        return self._deny(
            ctx, rcpt.given, f"destination {domain}" + (" (routed)" if routed else "")
        )

    def _deny(self, ctx: Context, shown: str, why: str) -> Decision:
        code = ctx.settings.replies.relay_denied
        return Decision(
            Outcome.REJECT,
            self.name,
            reply(code, "7.1", f"<{shown}>: Relay access denied"),
            (Evidence("recipient", shown, matched=why),),
        )
