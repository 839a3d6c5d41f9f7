"""Black and white lists (settings section 4.1).

All rules of one colour are compiled into one :class:`ListIndex`: one hash
table per criterion (a prefix table for client networks), whose values are
rule ordinals. A lookup costs a handful of hash probes whatever the size of
the lists; nothing is scanned.

Which rule wins mirrors Postfix's access maps as the panel configures them
(``check_client_access``, ``check_helo_access``, ``check_sender_access``,
``check_recipient_access``, in that order): criteria are consulted in that
order; within one criterion the most specific key wins (full address, then
domain and parent domains, then ``user@``; for networks, the first rule); a
rule with several criteria matches only when each of them matches.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ..addresses import Address
from ..lookup import AccessTable, DomainTable, NetworkTable
from ..model import Evidence, Reply
from ..settings import CRITERIA, ListRule
from . import Decision, Outcome, reply
from .context import Context

__all__ = ["BlackList", "ListIndex", "ListMatch", "WhiteList"]

#: the reply text's subject for each criterion, as Postfix words it
_SUBJECT = {
    "client": "Client host",
    "client_hostname": "Client host",
    "helo": "Helo command",
    "sender": "Sender address",
    "recipient": "Recipient address",
}


@attrs.frozen
class ListMatch:
    rule: ListRule
    criterion: str
    value: str
    key: str


class ListIndex:
    """Every rule of one list colour, indexed by criterion."""

    __slots__ = (
        "_by_name",
        "_name_only",
        "client",
        "client_hostname",
        "helo",
        "kinds",
        "recipient",
        "rules",
        "sender",
    )

    def __init__(self, rules: Iterable[ListRule]) -> None:
        self.rules = tuple(rules)
        self.client = NetworkTable((net, i) for i, r in enumerate(self.rules) for net in r.client)
        self.client_hostname = DomainTable(
            (d, i) for i, r in enumerate(self.rules) for d in r.client_hostname
        )
        self.helo = DomainTable((d, i) for i, r in enumerate(self.rules) for d in r.helo)
        self.sender = AccessTable((v, i) for i, r in enumerate(self.rules) for v in r.sender)
        self.recipient = AccessTable((v, i) for i, r in enumerate(self.rules) for v in r.recipient)
        #: the criteria any rule uses: the others cost nothing, not even DNS
        self.kinds = tuple(k for k in CRITERIA if any(getattr(r, k) for r in self.rules))
        #: rules that name client host names (few: these need DNS to judge)
        self._by_name = frozenset(i for i, r in enumerate(self.rules) if r.client_hostname)
        #: some rule judges by host name alone: the name is always needed
        self._name_only = any(r.criteria() == ("client_hostname",) for r in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _hits(self, ctx: Context, kind: str) -> list[tuple[str, int]]:
        if kind == "client":
            found = self.client.matches(ctx.client_ip)
            return sorted(((str(net), i) for net, i in found), key=lambda h: h[1])
        if kind == "client_hostname":
            name = ctx.client_name
            return self.client_hostname.matches(name.name) if name.name != "unknown" else []
        if kind == "helo":
            helo = ctx.session.helo
            return self.helo.matches(helo) if helo else []
        address: Address | None = ctx.sender if kind == "sender" else ctx.recipient
        if address is None:
            return []
        table = self.sender if kind == "sender" else self.recipient
        return table.matches(address)

    def match(self, ctx: Context) -> ListMatch | None:
        """The winning rule, or ``None``."""
        # The client's host name costs DNS lookups: ask for it only when a
        # rule could still match through it (every other criterion of the
        # rule already matched), never just because the list mentions it.
        hits = {k: self._hits(ctx, k) for k in self.kinds if k != "client_hostname"}
        ordinals = {kind: {i for _, i in found} for kind, found in hits.items()}
        if "client_hostname" in self.kinds and self._name_could_decide(ordinals):
            hits["client_hostname"] = self._hits(ctx, "client_hostname")
            ordinals["client_hostname"] = {i for _, i in hits["client_hostname"]}
        for kind in self.kinds:
            for key, i in hits.get(kind, ()):
                rule = self.rules[i]
                if all(i in ordinals.get(k, ()) for k in rule.criteria() if k != kind):
                    return ListMatch(rule, kind, _value(ctx, kind), key)
        return None

    def _name_could_decide(self, ordinals: dict[str, set[int]]) -> bool:
        if self._name_only:
            return True
        # Only rules already hit by another criterion can still match: look
        # at those (a few), never at the whole list.
        candidates = set().union(*ordinals.values()) & self._by_name
        for i in candidates:
            others = [k for k in self.rules[i].criteria() if k != "client_hostname"]
            if all(i in ordinals[k] for k in others):
                return True
        return False


def _value(ctx: Context, kind: str) -> str:
    if kind == "client":
        return str(ctx.client_ip)
    if kind == "client_hostname":
        return ctx.client_name.name
    if kind == "helo":
        return ctx.session.helo or ""
    address = ctx.sender if kind == "sender" else ctx.recipient
    return address.text if address is not None else ""


def _subject_text(ctx: Context, m: ListMatch) -> str:
    """``<x>: Subject rejected`` as Postfix words it for this criterion."""
    if m.criterion in ("client", "client_hostname"):
        # Postfix names the verified client (or "unknown"): the lookup is
        # asked for only here, when a client rule is about to refuse.
        return f"<{ctx.client_name.name}[{ctx.client_ip}]>: Client host rejected"
    return f"<{m.value}>: {_SUBJECT[m.criterion]} rejected"


def _evidence(m: ListMatch) -> tuple[Evidence, ...]:
    return (Evidence(m.criterion, m.value, matched=m.key),)


@attrs.frozen
class WhiteList:
    """A white match skips the black lists and every later check."""

    index: ListIndex
    name: str = "security.lists"

    def check(self, ctx: Context) -> Decision | None:
        m = self.index.match(ctx)
        if m is None:
            return None
        return Decision(Outcome.PERMIT, f"security.lists.{m.rule.name}", evidence=_evidence(m))


@attrs.frozen
class BlackList:
    """A black match refuses (``reject``) or accepts and drops (``discard``)."""

    index: ListIndex
    name: str = "security.lists"

    def check(self, ctx: Context) -> Decision | None:
        m = self.index.match(ctx)
        if m is None:
            return None
        rule_name = f"security.lists.{m.rule.name}"
        if m.rule.action == "discard":
            return Decision(Outcome.DISCARD, rule_name, evidence=_evidence(m))
        code = ctx.settings.replies.access_denied
        text = f"{_subject_text(ctx, m)}: {m.rule.text or 'Access denied'}"
        out: Reply = reply(code, "7.1", text)
        return Decision(Outcome.REJECT, rule_name, out, _evidence(m))
