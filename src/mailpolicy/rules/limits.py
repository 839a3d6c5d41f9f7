"""Counted limits: recipients, sizes, hops (general), the per-client
connection, message and recipient rates, and the message and recipient
rates per SASL login, per sender domain, per recipient domain and for the
whole server (connection policy).

The counts arrive as facts (``Session.counters``, ``Envelope.recipients``,
``MessageFacts``): the store that counts them is the adapter's business.
Trusted and local networks are exempt from the per-client limits.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from ..lookup import NetworkTable
from ..model import Evidence, Reply
from . import Decision, Outcome
from .context import Context

__all__ = [
    "MaxConnectionRate",
    "MaxConnections",
    "MaxGlobalMessageRate",
    "MaxGlobalRecipientRate",
    "MaxHops",
    "MaxMessageRate",
    "MaxMessageSize",
    "MaxRecipientDomainRate",
    "MaxRecipientRate",
    "MaxRecipients",
    "MaxSenderDomainRate",
    "MaxUserMessageRate",
    "MaxUserRecipientRate",
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
    name: str
    limit: int

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

    name: str
    limit: int

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

    name: str
    limit: int

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
    """A per-client count over its limit: one check, the subclasses are data
    (which counter, which reply). Trusted and local networks are exempt."""

    name: str
    limit: int
    exempt: NetworkTable
    #: the field of Session.counters judged
    counter: ClassVar[str]
    code: ClassVar[int]
    enhanced: ClassVar[str]
    #: reply text; {host} is our host name, {client} the client address
    text: ClassVar[str]

    def check(self, ctx: Context) -> Decision | None:
        n: int = getattr(ctx.session.counters, self.counter)
        if n <= self.limit or self.exempt.contains_key(ctx.client_key):
            return None
        text = self.text.format(host=ctx.settings.general.hostname, client=ctx.client_text)
        return _limit(self.name, self.code, self.enhanced, text, self.counter, n, self.limit)


@attrs.frozen
class MaxConnections(_PerClient):
    counter = "connections"
    code, enhanced = 421, "4.7.0"
    text = "{host} Error: too many connections from {client}"


@attrs.frozen
class MaxConnectionRate(_PerClient):
    counter = "connection_rate"
    code, enhanced = 421, "4.7.0"
    text = "{host} Error: too many connections from {client}"


@attrs.frozen
class MaxMessageRate(_PerClient):
    counter = "message_rate"
    code, enhanced = 450, "4.7.1"
    text = "Error: too much mail from {client}"


@attrs.frozen
class MaxRecipientRate(_PerClient):
    counter = "recipient_rate"
    code, enhanced = 450, "4.7.1"
    text = "Error: too many recipients from {client}"


@attrs.frozen
class _Keyed:
    """A count keyed on something other than the client (the SASL login, a
    domain, the whole server) over its limit: a temporary refusal, Postfix's
    rate-limit reply. No network is exempt: the point of a per-login quota
    is to contain a stolen password wherever it is used from. A count of 0
    was not counted (no login, the null sender): nothing to judge."""

    name: str
    limit: int
    counter: ClassVar[str]
    code: ClassVar[int] = 450
    enhanced: ClassVar[str] = "4.7.1"
    #: reply text; {key} is what was counted
    text: ClassVar[str]

    def key(self, ctx: Context) -> str:
        return "*"

    def check(self, ctx: Context) -> Decision | None:
        n: int = getattr(ctx.session.counters, self.counter)
        if n <= self.limit:
            return None
        key = self.key(ctx)
        return Decision(
            Outcome.REJECT,
            self.name,
            Reply(self.code, self.enhanced, self.text.format(key=key)),
            (Evidence(self.counter, str(n), matched=f"limit {self.limit} for {key}"),),
        )


def _domain(address: str | None) -> str:
    return (address or "").rpartition("@")[2].lower().rstrip(".")


@attrs.frozen
class MaxUserMessageRate(_Keyed):
    counter = "user_message_rate"
    text = "Error: too much mail from user {key}"

    def key(self, ctx: Context) -> str:
        return ctx.session.auth_user or ""


@attrs.frozen
class MaxUserRecipientRate(_Keyed):
    counter = "user_recipient_rate"
    text = "Error: too many recipients from user {key}"

    def key(self, ctx: Context) -> str:
        return ctx.session.auth_user or ""


@attrs.frozen
class MaxSenderDomainRate(_Keyed):
    counter = "sender_domain_message_rate"
    text = "Error: too much mail from domain {key}"

    def key(self, ctx: Context) -> str:
        return _domain(ctx.envelope.sender)


@attrs.frozen
class MaxRecipientDomainRate(_Keyed):
    counter = "recipient_domain_recipient_rate"
    text = "Error: too many recipients for domain {key}"

    def key(self, ctx: Context) -> str:
        return _domain(ctx.envelope.recipient)


@attrs.frozen
class MaxGlobalMessageRate(_Keyed):
    counter = "global_message_rate"
    text = "Error: too much mail, try again later"


@attrs.frozen
class MaxGlobalRecipientRate(_Keyed):
    counter = "global_recipient_rate"
    text = "Error: too many recipients, try again later"
