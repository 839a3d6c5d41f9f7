"""What to count before judging a MAIL or a RCPT: pure, shared by every host.

The rate limits read :class:`~mailpolicy.model.Counters`; the host counts
them in its state store first. :func:`rates_to_count` says which counts the
policy needs at a stage and under which key each is kept: the client
address for the per-client rates, the SASL login, the sender's or the
recipient's domain, or ``"*"`` for the whole server. ``mailpolicy serve``
(the dialogue), the aiosmtpd handler and a policy-delegation host all count
through it, so they count the same things.
"""

from __future__ import annotations

from typing import Final

import attrs

from .model import Session, Stage
from .policy import Policy

__all__ = ["RateCount", "rates_to_count"]


@attrs.frozen
class RateCount:
    """One count to take: the store's ``kind``, the ``key`` it is kept
    under (``None``: nothing to count for, e.g. no login; the counter is 0)
    and the :class:`~mailpolicy.model.Counters` field it fills."""

    kind: str
    key: str | None
    field: str

    @property
    def per_client(self) -> bool:
        """Counted per client address (the store's historical kinds)."""
        return self.kind in ("message", "recipient")


#: (store kind, what it is keyed on) per stage, in the order they are counted
_KINDS: Final = {
    Stage.MAIL: (
        ("message", "client"),
        ("user_message", "user"),
        ("sender_domain_message", "domain"),
        ("global_message", "global"),
    ),
    Stage.RCPT: (
        ("recipient", "client"),
        ("user_recipient", "user"),
        ("recipient_domain_recipient", "domain"),
        ("global_recipient", "global"),
    ),
}


def _domain(address: str | None) -> str | None:
    """The domain of ``address``; None for the null sender or a bare local part."""
    _, at, domain = (address or "").rpartition("@")
    domain = domain.strip().strip(">").lower().rstrip(".")
    return domain if at and domain else None


def rates_to_count(
    policy: Policy, stage: Stage, session: Session, address: str | None
) -> list[RateCount]:
    """The counts ``policy`` judges at ``stage`` (MAIL or RCPT; other
    stages count nothing here). ``address`` is the MAIL FROM address at
    MAIL, the RCPT TO address at RCPT."""
    wanted = policy.counters(stage)
    if not wanted:
        return []
    out: list[RateCount] = []
    for kind, on in _KINDS.get(stage, ()):
        field = f"{kind}_rate"
        if field not in wanted:
            continue
        if on == "client":
            key: str | None = str(session.client_ip)
        elif on == "user":
            key = session.auth_user
        elif on == "domain":
            key = _domain(address)
        else:
            key = "*"
        out.append(RateCount(kind, key, field))
    return out
