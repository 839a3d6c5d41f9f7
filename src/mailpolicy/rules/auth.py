"""Sender ownership (settings 1.1 and 4.2): who may use which MAIL FROM.

``[accounts.NAME].addresses`` say which addresses a login owns (an entry
``@example.com`` owns the whole domain, as in Postfix's
``smtpd_sender_login_maps``). The owners table is a hash map.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

from ..addresses import Address
from ..model import Evidence
from ..settings import Account
from . import Decision, Outcome, reply
from .context import Context

__all__ = ["Owners", "RejectUnauthenticatedLocalSender", "SenderMustMatchLogin"]


@attrs.frozen
class Owners:
    """Address (or ``@domain``) -> the logins that own it."""

    table: Mapping[str, frozenset[str]]
    #: the domains any key names: an address elsewhere has no owner, known
    #: without quoting its local part to look it up
    domains: frozenset[str] = attrs.field(init=False, eq=False, repr=False)

    @domains.default
    def _domains(self) -> frozenset[str]:
        return frozenset(key.rpartition("@")[2] for key in self.table)

    @classmethod
    def build(cls, accounts: Iterable[Account]) -> Owners:
        table: dict[str, set[str]] = {}
        for account in accounts:
            for address in account.addresses:
                table.setdefault(address.lower(), set()).add(account.name)
        return cls(MappingProxyType({k: frozenset(v) for k, v in table.items()}))

    def owners(self, address: Address) -> frozenset[str] | None:
        """The owners of ``address``, or ``None`` when nobody owns it."""
        if address.domain and address.domain not in self.domains:
            return None
        found = self.table.get(address.text.lower())
        if found is None and address.domain:
            found = self.table.get("@" + address.domain)
        return found


@attrs.frozen
class SenderMustMatchLogin:
    """An authenticated client may only use an address its login owns."""

    name: str
    owners: Owners

    def check(self, ctx: Context) -> Decision | None:
        user, s = ctx.session.auth_user, ctx.sender
        if user is None or s is None or s.is_null:
            return None
        owners = self.owners.owners(s)
        if owners is not None and user in owners:
            return None
        text = f"<{s.given}>: Sender address rejected: not owned by user {user}"
        return Decision(
            Outcome.REJECT,
            self.name,
            reply(553, "7.1", text),
            (Evidence("sender", s.given, matched=",".join(sorted(owners or ())) or None),),
        )


@attrs.frozen
class RejectUnauthenticatedLocalSender:
    """A client that is neither authenticated nor trusted may not use an
    address an account owns."""

    name: str
    owners: Owners

    def check(self, ctx: Context) -> Decision | None:
        s = ctx.sender
        if ctx.authenticated or ctx.in_mynetworks or s is None or s.is_null:
            return None
        owners = self.owners.owners(s)
        if owners is None:
            return None
        text = f"<{s.given}>: Sender address rejected: not logged in"
        return Decision(
            Outcome.REJECT,
            self.name,
            reply(553, "7.1", text),
            (Evidence("sender", s.given, matched=",".join(sorted(owners))),),
        )
