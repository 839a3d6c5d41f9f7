"""The one asynchronous driver of the core: decide, resolve, decide again.

:func:`judge` is :func:`mailpolicy.decide_with` for a
:class:`~mailpolicy.adapters.dns.Resolver`: each round's questions go out
together (``resolve_all``), and nothing it meets escapes: a resolver that
fails or a bug in a rule gives a temporary failure, never an acceptance.
"""

from __future__ import annotations

import logging

from ..dialogue.replies import R
from ..evaluate import Memo, decide, evaluate
from ..model import Action, Envelope, Session, Verdict
from ..policy import Policy
from .dns import Resolver

__all__ = ["TEMP_FAILURE", "judge"]

log = logging.getLogger("mailpolicy.judge")

#: the reply when judging failed (Postfix's wording for a temporary error)
TEMP_FAILURE = R.TEMP_FAILURE


async def judge(
    policy: Policy,
    session: Session,
    envelope: Envelope,
    resolver: Resolver,
    memo: Memo | None = None,
    *,
    rounds: int = 4,
) -> tuple[Session, Verdict]:
    """Judge ``envelope``, asking ``resolver`` for the DNS answers the
    policy needs (at most ``rounds`` rounds, then a question still open is
    a temporary failure). Returns the session with the answers gathered and
    the verdict. Never raises: any error is logged and gives
    ``451 4.3.0`` with rule ``internal.error``.
    """
    if memo is None:
        memo = Memo()  # the rounds of this one decision share it
    try:
        for _ in range(rounds):
            found = decide(policy, session, envelope, memo)
            if isinstance(found, Verdict):
                return session, found
            session = session.with_dns(await resolver.resolve_all(found.queries))
        return session, evaluate(policy, session, envelope, memo)
    except Exception:  # a bug must defer, never accept by accident
        log.exception("policy evaluation failed at %s", envelope.stage.value)
        return session, Verdict(Action.DEFER, TEMP_FAILURE, "internal.error")
