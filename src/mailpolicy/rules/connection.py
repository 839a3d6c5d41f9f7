"""Connection policy (settings section 4.3): the client's DNS names.

The rate and count limits of the same settings table live in
:mod:`.limits`, with the other counted limits.
"""

from __future__ import annotations

import attrs

from ..model import Evidence
from . import Decision, Outcome, reply
from .context import ClientName, Context, NameStatus

__all__ = ["RejectUnknownClientHostname", "RejectUnknownReverseClientHostname"]


def _decide(
    ctx: Context, rule: str, status: NameStatus, name: ClientName, detail: str, what: str
) -> Decision | None:
    if status is NameStatus.OK:
        return None
    text = f"Client host rejected: cannot find your {what}, [{ctx.client_ip}]"
    ev = (Evidence("client", str(ctx.client_ip), dns=name.evidence),)
    if status is NameStatus.TEMP:
        # Not defer_if_permit: Postfix defers at once here ("deferrals must
        # not be postponed after client hostname lookup failure").
        return Decision(Outcome.REJECT, rule, reply(450, detail, text), ev)
    code = ctx.settings.replies.unknown_client
    return Decision(Outcome.REJECT, rule, reply(code, detail, text), ev)


@attrs.frozen
class RejectUnknownReverseClientHostname:
    """The client address has no PTR record."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        n = ctx.client_name
        return _decide(ctx, self.name, n.reverse_status, n, "7.1", "reverse hostname")


@attrs.frozen
class RejectUnknownClientHostname:
    """No PTR, or its name does not lead back to the client address."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        n = ctx.client_name
        return _decide(ctx, self.name, n.status, n, "7.25", "hostname")
