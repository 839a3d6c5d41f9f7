"""DNS blocklists (``security.advanced.dnsbl``), Postfix's ``reject_rbl_client``.

A temporary DNS failure of a blocklist is ignored, as in Postfix: a broken
blocklist must not stop mail.
"""

from __future__ import annotations

import attrs

from ..model import DnsQuery, Evidence, Reply, RType
from ..settings import DnsblZone
from . import Decision, Outcome
from .context import Context

__all__ = ["RejectRblClient"]


@attrs.frozen
class RejectRblClient:
    """One zone: its row's key plus the zone is the rule's name."""

    name: str
    zone: DnsblZone

    def check(self, ctx: Context) -> Decision | None:
        # 192.0.2.10 in bl.example is 10.2.0.192.bl.example; IPv6 nibble by
        # nibble (RFC 5782). The reversed address is computed once per evaluation.
        query = DnsQuery.of(f"{ctx.reversed_client}.{self.zone.zone}", RType.A)
        result = ctx.dns1(query)
        if not result.found:
            return None
        if self.zone.answer is not None and str(self.zone.answer) not in result.records:
            return None
        text = f"Service unavailable; Client host [{ctx.client_ip}] blocked using {self.zone.zone}"
        ev = (
            Evidence(
                "client",
                str(ctx.client_ip),
                matched=str(self.zone),
                dns=((str(query), str(result)),),
            ),
        )
        return Decision(Outcome.REJECT, self.name, Reply(554, "5.7.1", text), ev)
