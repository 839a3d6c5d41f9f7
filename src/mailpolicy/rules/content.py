"""Message content checks at the end of DATA: attachments, auto-forwarding."""

from __future__ import annotations

import attrs

from ..model import Evidence, Reply
from . import Decision, Outcome
from .context import Context
from .relay import real_destination

__all__ = ["DisableAutoForwarding", "MaxAttachmentSize"]


@attrs.frozen
class MaxAttachmentSize:
    """The largest single attachment, decoded."""

    name: str
    limit: int

    def check(self, ctx: Context) -> Decision | None:
        msg = ctx.envelope.message
        if msg is None or msg.largest_attachment <= self.limit:
            return None
        return Decision(
            Outcome.REJECT,
            self.name,
            Reply(552, "5.3.4", "Error: attachment too big"),
            (Evidence("attachment", str(msg.largest_attachment), matched=f"limit {self.limit}"),),
        )


@attrs.frozen
class DisableAutoForwarding:
    """An auto-forwarded message may not leave our domains."""

    name: str

    def check(self, ctx: Context) -> Decision | None:
        msg = ctx.envelope.message
        if msg is None or not msg.auto_forwarded:
            return None
        from ..addresses import AddressError, parse_address

        for rcpt in ctx.envelope.recipients:
            try:
                domain, _ = real_destination(parse_address(rcpt), ctx.shared)
            except AddressError:
                domain = ""
            if domain not in ctx.shared.local_domains:
                return Decision(
                    Outcome.REJECT,
                    self.name,
                    Reply(550, "5.7.1", "Error: auto-forwarded mail may not leave our domains"),
                    (Evidence("recipient", rcpt, matched="auto-forwarded"),),
                )
        return None
