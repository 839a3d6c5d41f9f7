"""Protocol checks: command pipelining (at DATA) and VRFY."""

from __future__ import annotations

import attrs

from ..model import Evidence, Reply
from . import Decision, Outcome
from .context import Context

__all__ = ["DisableVrfy", "RejectUnauthPipelining"]


@attrs.frozen
class RejectUnauthPipelining:
    name: str

    def check(self, ctx: Context) -> Decision | None:
        if not ctx.session.improper_pipelining:
            return None
        text = "<DATA>: Data command rejected: Improper use of SMTP command pipelining"
        return Decision(
            Outcome.REJECT,
            self.name,
            Reply(503, "5.5.0", text),
            (Evidence("pipelining", "improper"),),
        )


@attrs.frozen
class DisableVrfy:
    name: str

    def check(self, ctx: Context) -> Decision | None:
        return Decision(Outcome.REJECT, self.name, Reply(502, "5.5.1", "VRFY command is disabled"))
