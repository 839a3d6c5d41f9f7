"""Counted limits: recipients, sizes, hops (general) and the per-client
connection, message and recipient rates (connection policy).

The counts arrive as facts (``Session.counters``, ``Envelope.recipients``,
``MessageFacts``): the store that counts them is the adapter's business.
Trusted and local networks are exempt from the per-client limits.
"""

from __future__ import annotations

import attrs

from ..lookup import NetworkTable
from ..model import Evidence, Reply
from . import Decision, Outcome
from .context import Context

__all__ = [
    "MaxConnectionRate",
    "MaxConnections",
    "MaxHops",
    "MaxMessageRate",
    "MaxMessageSize",
    "MaxRecipientRate",
    "MaxRecipients",
]


def _limit(
    rule: str, code: int, enhanced: str, text: str, kind: str, value: int, limit: int
) -> Decision:
    return Decision(
        Outcome.REJECT,
        rule,
        Reply(code, enhanced, text),
        (Evidence(kind, str(value), matched=f"limit {limit}"),),
    )


@attrs.frozen
class MaxRecipients:
    limit: int
    name: str = "general.max_recipients"

    def check(self, ctx: Context) -> Decision | None:
        count = len(ctx.envelope.recipients)
        if count < self.limit:
            return None
        return _limit(
            self.name,
            452,
            "4.5.3",
            "Error: too many recipients",
            "recipients",
            count + 1,
            self.limit,
        )


@attrs.frozen
class MaxMessageSize:
    """``SIZE=`` at MAIL, and the real size at the end of DATA."""

    limit: int
    name: str = "general.max_message_size_mb"

    def check(self, ctx: Context) -> Decision | None:
        msg = ctx.envelope.message
        if msg is not None:
            if msg.size > self.limit:
                return _limit(
                    self.name,
                    552,
                    "5.3.4",
                    "Error: message file too big",
                    "size",
                    msg.size,
                    self.limit,
                )
            return None
        declared = ctx.envelope.declared_size
        if declared is not None and declared > self.limit:
            return _limit(
                self.name,
                552,
                "5.3.4",
                "Message size exceeds fixed limit",
                "declared_size",
                declared,
                self.limit,
            )
        return None


@attrs.frozen
class MaxHops:
    """Postfix counts the ``Received:`` header it adds itself."""

    limit: int
    name: str = "general.max_hops"

    def check(self, ctx: Context) -> Decision | None:
        msg = ctx.envelope.message
        if msg is None or msg.received_headers + 1 < self.limit:
            return None
        return _limit(
            self.name,
            554,
            "5.4.0",
            "Error: too many hops",
            "hops",
            msg.received_headers + 1,
            self.limit,
        )


@attrs.frozen
class _PerClient:
    limit: int
    exempt: NetworkTable

    def exempted(self, ctx: Context) -> bool:
        return bool(self.exempt.matches(ctx.client_ip))


@attrs.frozen
class MaxConnections(_PerClient):
    name: str = "security.connection_policy.max_connections_per_client"

    def check(self, ctx: Context) -> Decision | None:
        n = ctx.session.counters.connections
        if n <= self.limit or self.exempted(ctx):
            return None
        host = ctx.settings.general.hostname
        return _limit(
            self.name,
            421,
            "4.7.0",
            f"{host} Error: too many connections from {ctx.client_ip}",
            "connections",
            n,
            self.limit,
        )


@attrs.frozen
class MaxConnectionRate(_PerClient):
    name: str = "security.connection_policy.max_connection_rate_per_client"

    def check(self, ctx: Context) -> Decision | None:
        n = ctx.session.counters.connection_rate
        if n <= self.limit or self.exempted(ctx):
            return None
        host = ctx.settings.general.hostname
        return _limit(
            self.name,
            421,
            "4.7.0",
            f"{host} Error: too many connections from {ctx.client_ip}",
            "connection_rate",
            n,
            self.limit,
        )


@attrs.frozen
class MaxMessageRate(_PerClient):
    name: str = "security.connection_policy.max_message_rate_per_client"

    def check(self, ctx: Context) -> Decision | None:
        n = ctx.session.counters.message_rate
        if n <= self.limit or self.exempted(ctx):
            return None
        return _limit(
            self.name,
            450,
            "4.7.1",
            f"Error: too much mail from {ctx.client_ip}",
            "message_rate",
            n,
            self.limit,
        )


@attrs.frozen
class MaxRecipientRate(_PerClient):
    name: str = "security.connection_policy.max_recipient_rate_per_client"

    def check(self, ctx: Context) -> Decision | None:
        n = ctx.session.counters.recipient_rate
        if n <= self.limit or self.exempted(ctx):
            return None
        return _limit(
            self.name,
            450,
            "4.7.1",
            f"Error: too many recipients from {ctx.client_ip}",
            "recipient_rate",
            n,
            self.limit,
        )
