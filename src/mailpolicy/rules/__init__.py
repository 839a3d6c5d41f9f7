"""Rules: one class per check, grouped in modules by area.

Every rule has a ``name`` (the settings key that enables it, so a refusal can
be traced back to the line of the policy file: the policy's table row gives
it, rules do not hard-code it) and a ``check(ctx)`` method that returns a
:class:`Decision` or ``None`` ("no opinion, go on"). Rules do
no I/O: a rule that needs a DNS answer asks the :class:`~.context.Context`,
which raises :class:`NeedDns` when the adapter has not supplied it yet.

Rules are grouped into :class:`Chain` objects, Postfix's restriction lists;
:mod:`mailpolicy.policy` holds the table that says which chains run at which
stage, in which order. The evaluation semantics (in :mod:`mailpolicy.evaluate`):

* ``PERMIT`` ends the current chain only (Postfix ``OK``/``permit_*``);
* ``ACCEPT`` ends every chain with acceptance (the bare ``postmaster``);
* ``REJECT`` ends everything with the decision's reply (4xx or 5xx);
* ``DEFER_IF_PERMIT`` is remembered (the first one wins) and evaluation goes
  on; if nothing refuses later, the request is deferred with it;
* ``DISCARD`` ends everything: accept, then drop the whole message.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

from ..model import DnsQuery, Evidence, Reply

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Chain", "Decision", "NeedDns", "Outcome", "Rule", "Scope", "Step", "reply"]


class Outcome(enum.Enum):
    PERMIT = "permit"
    ACCEPT = "accept"
    REJECT = "reject"
    DEFER_IF_PERMIT = "defer_if_permit"
    DISCARD = "discard"


@attrs.frozen
class Decision:
    """A rule's opinion: what to do, what to say, and why."""

    outcome: Outcome
    rule: str
    reply: Reply | None = None
    evidence: tuple[Evidence, ...] = ()


class Scope(enum.Enum):
    """What a rule's decision depends on besides the policy (its table row
    says). ``SESSION`` rules read only the session's facts (client, HELO, TLS
    and AUTH state, DNS answers), ``SENDER`` rules also the MAIL FROM address
    and SMTPUTF8, ``ENVELOPE`` rules anything. The engine reuses session and
    sender decisions across the RCPTs of a connection through its
    :class:`~mailpolicy.evaluate.Memo` (Postfix re-judges them at every RCPT
    with smtpd_delay_reject; the answer cannot change)."""

    ENVELOPE = "envelope"
    SENDER = "sender"
    SESSION = "session"


class Rule(Protocol):
    """A check. ``name`` is the settings key path that enables it."""

    @property
    def name(self) -> str: ...

    def check(self, ctx: Context) -> Decision | None: ...


@attrs.frozen(eq=False)
class Step:
    """One rule in a chain, with what its table row says about it.

    ``slot`` numbers the steps of one policy (the memo's key); ``white``
    marks the white list, whose ``PERMIT`` names the accepting rule;
    ``observe``: some refusal of this rule is only observed (its name is in
    ``Policy.observed``).
    """

    rule: Rule
    scope: Scope = Scope.ENVELOPE
    white: bool = False
    slot: int = 0
    observe: bool = False


@attrs.frozen
class Chain:
    """An ordered list of rules (:class:`Step` objects).

    ``restriction`` chains are Postfix's ``smtpd_*_restrictions``: a
    transaction already marked for discarding skips them. The others are the
    checks Postfix's smtpd makes itself (limits, HELO required), which apply
    whatever the restrictions said.
    """

    name: str
    steps: tuple[Step, ...]
    restriction: bool = True

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(step.rule for step in self.steps)


class NeedDns(Exception):
    """Raised inside a rule when a DNS answer it needs is not known yet.

    Never escapes the core: :func:`~mailpolicy.evaluate.decide` turns it into
    the questions to ask (:class:`~mailpolicy.evaluate.Lookups`),
    :func:`~mailpolicy.evaluate.evaluate` into a temporary failure.
    """

    def __init__(self, queries: Sequence[DnsQuery], rule: str | None = None) -> None:
        super().__init__(", ".join(str(q) for q in queries))
        self.queries = tuple(queries)
        #: the settings key that needs the answer, when the raising rule is
        #: a family (``security.lists.NAME`` inside ``security.lists``)
        self.rule = rule


def reply(code: int, detail: str, text: str) -> Reply:
    """A reply whose enhanced code's class digit follows the reply code.

    ``detail`` is the subject and detail part (``"7.1"`` for ``x.7.1``):
    Postfix derives the class from the configured code, so a 450 relay
    refusal says ``4.7.1`` and a 554 one ``5.7.1``.
    """
    return Reply(code, f"{code // 100}.{detail}", text)
