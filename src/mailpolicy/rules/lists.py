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
from ..lookup import AccessTable, DomainTable, NetworkTable, network_of
from ..model import Evidence, Networks, Reply
from ..settings import CRITERIA, ListRule
from . import Decision, NeedDns, Outcome, reply
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


#: one hit: (ordinal, key); a client hit's key is (address, prefix length),
#: made into text only for the winning match
_Hit = tuple[int, object]


class _Tables:
    """The hash tables of one or more list colours, built once: a rule's
    ordinal is its place in all of them (white rules first, then black), so
    one probe per criterion answers every colour at once. What a session
    (client, HELO, host name) and a sender hit is kept in the connection's
    memo; what one evaluation hit, for the lists that ask after each other."""

    __slots__ = (
        "_session_kinds",
        "client",
        "client_hostname",
        "helo",
        "recipient",
        "sender",
    )

    def __init__(self, rules: tuple[ListRule, ...]) -> None:
        self.client = NetworkTable()
        for i, r in enumerate(rules):
            if r.client:
                self.client.add_networks(Networks.of(r.client), i)
        self.client_hostname = DomainTable(
            (d, i) for i, r in enumerate(rules) for d in r.client_hostname
        )
        self.helo = DomainTable((d, i) for i, r in enumerate(rules) for d in r.helo)
        self.sender = AccessTable((v, i) for i, r in enumerate(rules) for v in r.sender)
        self.recipient = AccessTable((v, i) for i, r in enumerate(rules) for v in r.recipient)
        #: the criteria of the session's facts that some rule uses (no DNS)
        self._session_kinds = tuple(k for k in ("client", "helo") if getattr(self, k))

    def plain(self, ctx: Context) -> dict[str, list[_Hit]]:
        """Every criterion but the client's host name (which costs DNS) that
        hit, with its hits (see :meth:`hits`); empty when none did."""
        derived = ctx.derived
        found: dict[str, list[_Hit]] | None = derived.get(self)  # type: ignore[assignment]
        if found is not None:
            return found
        memo = ctx.memo
        session: dict[str, list[_Hit]] | None = memo.get(self)  # type: ignore[assignment]
        if session is None:
            session = {}
            memo[self] = session
            for kind in self._session_kinds:
                hit = self._probe(ctx, kind)
                if hit:
                    session[kind] = hit
        found = session
        if self.sender:
            key = (self, ctx.envelope.sender)
            sender: list[_Hit] | None = memo.get(key)  # type: ignore[assignment]
            if sender is None:
                sender = memo[key] = self._probe(ctx, "sender")
            if sender:
                found = {**found, "sender": sender}
        if self.recipient:
            recipient = self._probe(ctx, "recipient")
            if recipient:
                found = {**found, "recipient": recipient}
        derived[self] = found
        return found

    def hits(self, ctx: Context, kind: str) -> list[_Hit]:
        """``(ordinal, key)`` for each entry of ``kind`` that matches, in
        the order that decides (client: by ordinal; names: most specific
        first)."""
        if kind == "client_hostname":
            key = (self, kind)
            memo = ctx.memo
            found: list[_Hit] | None = memo.get(key)  # type: ignore[assignment]
            if found is None:
                found = memo[key] = self._probe(ctx, kind)
            return found
        return self.plain(ctx).get(kind, [])

    def _probe(self, ctx: Context, kind: str) -> list[_Hit]:
        # Most probes hit nothing: no list is built for them.
        if kind == "client":
            raw = self.client.hits(ctx.client_key)
            if not raw:
                return []
            if len(raw) > 1:
                raw.sort(key=_first)  # stable: longest prefix first per rule
            return [(i, (address, length)) for i, address, length in raw]
        if kind == "client_hostname":
            name = ctx.client_name.name
            if name == "unknown":
                return []
            return _swapped(self.client_hostname.matches(name))
        if kind == "helo":
            helo = ctx.session.helo
            # Postfix looks a HELO name up as sent: with a trailing dot it
            # matches no entry (an address's domain loses its dot first).
            if not helo or helo.endswith("."):
                return []
            return _swapped(self.helo.matches(helo))
        address: Address | None = ctx.sender if kind == "sender" else ctx.recipient
        if address is None:
            return []
        return _swapped((self.sender if kind == "sender" else self.recipient).matches(address))


def _swapped(matches: list[tuple[str, int]]) -> list[_Hit]:
    """A table's ``(key, ordinal)`` matches as hits, ``(ordinal, key)``."""
    return [(i, key) for key, i in matches] if matches else []


class ListIndex:
    """Every rule of one list colour, indexed by criterion.

    :meth:`pair` builds the white and the black index over shared tables
    (one probe per criterion for both); ``ListIndex(rules)`` builds its own.
    """

    __slots__ = (
        "_by_name",
        "_criteria",
        "_end",
        "_name_only",
        "_plain_kinds",
        "_start",
        "_tables",
        "kinds",
        "rules",
    )

    def __init__(
        self, rules: Iterable[ListRule], *, tables: _Tables | None = None, start: int = 0
    ) -> None:
        self.rules = tuple(rules)
        #: this colour's ordinals in the shared tables: [start, end)
        self._start, self._end = start, start + len(self.rules)
        self._tables = _Tables(self.rules) if tables is None else tables
        #: the criteria any rule uses: the others cost nothing, not even DNS
        self.kinds = tuple(k for k in CRITERIA if any(getattr(r, k) for r in self.rules))
        #: those that need no DNS, in order
        self._plain_kinds = tuple(k for k in self.kinds if k != "client_hostname")
        #: each rule's criteria, computed once
        self._criteria = tuple(r.criteria() for r in self.rules)
        #: rules that name client host names (few: these need DNS to judge)
        self._by_name = frozenset(i for i, r in enumerate(self.rules) if r.client_hostname)
        #: some rule judges by host name alone: the name is always needed
        self._name_only = any(c == ("client_hostname",) for c in self._criteria)

    @classmethod
    def pair(
        cls, white: Iterable[ListRule], black: Iterable[ListRule]
    ) -> tuple[ListIndex, ListIndex]:
        """The white and the black index, sharing one table per criterion."""
        whites, blacks = tuple(white), tuple(black)
        tables = _Tables(whites + blacks)
        return cls(whites, tables=tables), cls(blacks, tables=tables, start=len(whites))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _hits(self, ctx: Context, kind: str) -> list[_Hit]:
        """This colour's hits of ``kind``, with its own ordinals."""
        found = self._tables.hits(ctx, kind)
        if not found:
            return found
        start, end = self._start, self._end
        return [(i - start, key) for i, key in found if start <= i < end]

    def match(self, ctx: Context) -> ListMatch | None:
        """The winning rule, or ``None``."""
        hits: dict[str, list[_Hit]] = {}
        plain = self._tables.plain(ctx)
        if plain:
            start, end = self._start, self._end
            for kind in self._plain_kinds:
                found = plain.get(kind)
                if found:
                    mine = [(i - start, key) for i, key in found if start <= i < end]
                    if mine:
                        hits[kind] = mine
        # The client's host name costs DNS lookups: ask for it only when a
        # rule could still match through it (every other criterion of the
        # rule already matched), never just because the list mentions it.
        if self._by_name and (self._name_only or (hits and self._name_could_decide(hits))):
            try:
                found = self._hits(ctx, "client_hostname")
            except NeedDns as need:
                # name the list that asked, not just the family
                i = self._first_by_name(hits)
                raise NeedDns(need.queries, f"security.lists.{self.rules[i].name}") from None
            if found:
                hits["client_hostname"] = found
        if not hits:
            return None
        ordinals = {kind: {i for i, _ in found} for kind, found in hits.items()}
        for kind in self.kinds:
            for i, key in hits.get(kind, ()):
                if all(i in ordinals.get(k, ()) for k in self._criteria[i] if k != kind):
                    return ListMatch(self.rules[i], kind, _value(ctx, kind), _key_text(ctx, key))
        return None

    def _first_by_name(self, hits: dict[str, list[_Hit]]) -> int:
        """The first rule that the client's host name could still decide."""
        ordinals = {kind: {i for i, _ in found} for kind, found in hits.items()}
        for i in sorted(self._by_name):
            others = [k for k in self._criteria[i] if k != "client_hostname"]
            if all(i in ordinals.get(k, ()) for k in others):
                return i
        return min(self._by_name)

    def _name_could_decide(self, hits: dict[str, list[_Hit]]) -> bool:
        # Only rules already hit by another criterion can still match: look
        # at those (a few), never at the whole list.
        ordinals = {kind: {i for i, _ in found} for kind, found in hits.items()}
        candidates = set().union(*ordinals.values()) & self._by_name
        for i in candidates:
            others = [k for k in self._criteria[i] if k != "client_hostname"]
            if all(i in ordinals.get(k, ()) for k in others):
                return True
        return False


def _first(hit: tuple[int, int, int]) -> int:
    return hit[0]


def _key_text(ctx: Context, key: object) -> str:
    if isinstance(key, str):
        return key
    assert isinstance(key, tuple)
    address, length = key
    return str(network_of(ctx.client_key[0], address, length))


def _value(ctx: Context, kind: str) -> str:
    if kind == "client":
        return ctx.client_text
    if kind == "client_hostname":
        return ctx.client_name.name
    if kind == "helo":
        return ctx.session.helo or ""
    address = ctx.sender if kind == "sender" else ctx.recipient
    return address.given if address is not None else ""


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

    name: str
    index: ListIndex

    def check(self, ctx: Context) -> Decision | None:
        m = self.index.match(ctx)
        if m is None:
            return None
        return Decision(Outcome.PERMIT, f"{self.name}.{m.rule.name}", evidence=_evidence(m))


@attrs.frozen
class BlackList:
    """A black match refuses (``reject``) or accepts and drops (``discard``)."""

    name: str
    index: ListIndex

    def check(self, ctx: Context) -> Decision | None:
        m = self.index.match(ctx)
        if m is None:
            return None
        rule_name = f"{self.name}.{m.rule.name}"
        if m.rule.action == "discard":
            return Decision(Outcome.DISCARD, rule_name, evidence=_evidence(m))
        code = ctx.settings.replies.access_denied
        text = f"{_subject_text(ctx, m)}: {m.rule.text or 'Access denied'}"
        out: Reply = reply(code, "7.1", text)
        return Decision(Outcome.REJECT, rule_name, out, _evidence(m))
