"""Compile settings into a :class:`Policy`: ordered chains of rules per stage.

The table :data:`TABLE` is the whole order of evaluation (settings section 5)
in one place: a row says at which stage, in which chain, under which setting a
rule runs. Adding a check is adding a rule class and a row. Rows whose
setting is off produce no rule at all, so a disabled check costs nothing,
not even a DNS lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

import attrs

from .lookup import DomainTable, NetworkTable
from .model import DnsQuery, Envelope, Session, Stage, Verdict
from .passwords import verify_password
from .rules import Chain, Rule
from .rules.auth import Owners, RejectUnauthenticatedLocalSender, SenderMustMatchLogin
from .rules.connection import RejectUnknownClientHostname, RejectUnknownReverseClientHostname
from .rules.content import DisableAutoForwarding, MaxAttachmentSize
from .rules.context import Shared
from .rules.dnsbl import RejectRblClient
from .rules.helo import RejectInvalidHelo, RejectNonFqdnHelo, RejectUnknownHelo, RequireHelo
from .rules.limits import (
    MaxConnectionRate,
    MaxConnections,
    MaxHops,
    MaxMessageRate,
    MaxMessageSize,
    MaxRecipientRate,
    MaxRecipients,
)
from .rules.lists import BlackList, ListIndex, WhiteList
from .rules.protocol import DisableVrfy, RejectUnauthPipelining
from .rules.recipient import (
    AcceptBarePostmaster,
    RejectNonFqdnRecipient,
    RejectUnknownRecipientDomain,
)
from .rules.relay import PermitAuthenticated, PermitMynetworks, RejectUnauthDestination
from .rules.sender import RejectNonFqdnSender, RejectUnknownSenderDomain
from .settings import (
    AdvancedSettings,
    ConnectionPolicy,
    GeneralSettings,
    SenderPolicy,
    Settings,
)

__all__ = ["TABLE", "Policy", "Row", "compile_policy"]


@attrs.frozen
class _Build:
    """What the rows build rules from: the settings and the compiled tables."""

    settings: Settings
    shared: Shared
    white: ListIndex
    black: ListIndex
    owners: Owners
    exempt: NetworkTable

    @property
    def accounts_on(self) -> bool:
        return self.settings.general.smtp_auth.enabled and bool(self.settings.accounts)


@attrs.frozen
class Row:
    """One line of the evaluation table."""

    stage: Stage
    chain: str
    enabled: Callable[[_Build], bool]
    build: Callable[[_Build], Rule | tuple[Rule, ...]]


def _gen(b: _Build) -> GeneralSettings:
    return b.settings.general


def _cp(b: _Build) -> ConnectionPolicy:
    return b.settings.security.connection_policy


def _adv(b: _Build) -> AdvancedSettings:
    return b.settings.security.advanced


def _sp(b: _Build) -> SenderPolicy:
    return b.settings.security.sender_policy


def _always(b: _Build) -> bool:
    return True


S = Stage
#: The order of evaluation. Chains run in the order they first appear for a
#: stage; rules in a chain in row order.
TABLE: tuple[Row, ...] = (
    # connect: counted per client (421 and the connection ends)
    Row(
        S.CONNECT,
        "limits",
        lambda b: _cp(b).max_connections_per_client > 0,
        lambda b: MaxConnections(_cp(b).max_connections_per_client, b.exempt),
    ),
    Row(
        S.CONNECT,
        "limits",
        lambda b: _cp(b).max_connection_rate_per_client > 0,
        lambda b: MaxConnectionRate(_cp(b).max_connection_rate_per_client, b.exempt),
    ),
    # MAIL
    Row(S.MAIL, "mail", lambda b: _adv(b).require_helo, lambda b: RequireHelo()),
    Row(
        S.MAIL,
        "mail",
        lambda b: _gen(b).max_message_size > 0,
        lambda b: MaxMessageSize(_gen(b).max_message_size),
    ),
    Row(
        S.MAIL,
        "mail",
        lambda b: _cp(b).max_message_rate_per_client > 0,
        lambda b: MaxMessageRate(_cp(b).max_message_rate_per_client, b.exempt),
    ),
    # RCPT: limits first, then Postfix's client/helo/sender, relay and recipient restrictions
    Row(
        S.RCPT,
        "limits",
        lambda b: _gen(b).max_recipients > 0,
        lambda b: MaxRecipients(_gen(b).max_recipients),
    ),
    Row(
        S.RCPT,
        "limits",
        lambda b: _cp(b).max_recipient_rate_per_client > 0,
        lambda b: MaxRecipientRate(_cp(b).max_recipient_rate_per_client, b.exempt),
    ),
    Row(S.RCPT, "postmaster", _always, lambda b: AcceptBarePostmaster()),
    Row(
        S.RCPT,
        "sender_ownership",
        lambda b: b.accounts_on and _gen(b).smtp_auth.sender_must_match_login,
        lambda b: SenderMustMatchLogin(b.owners),
    ),
    Row(
        S.RCPT,
        "sender_ownership",
        lambda b: b.accounts_on and _sp(b).reject_unauthenticated_local_sender,
        lambda b: RejectUnauthenticatedLocalSender(b.owners),
    ),
    Row(S.RCPT, "relay", _always, lambda b: PermitMynetworks()),
    Row(S.RCPT, "relay", lambda b: _gen(b).smtp_auth.enabled, lambda b: PermitAuthenticated()),
    Row(S.RCPT, "relay", _always, lambda b: RejectUnauthDestination(b.shared)),
    Row(S.RCPT, "checks", lambda b: bool(b.white), lambda b: WhiteList(b.white)),
    Row(S.RCPT, "checks", lambda b: bool(b.black), lambda b: BlackList(b.black)),
    Row(S.RCPT, "checks", _always, lambda b: PermitMynetworks()),
    Row(S.RCPT, "checks", lambda b: _gen(b).smtp_auth.enabled, lambda b: PermitAuthenticated()),
    Row(
        S.RCPT,
        "checks",
        lambda b: bool(_adv(b).dnsbl),
        lambda b: tuple(RejectRblClient(z) for z in _adv(b).dnsbl),
    ),
    Row(
        S.RCPT,
        "checks",
        lambda b: _cp(b).reject_unknown_reverse_client_hostname,
        lambda b: RejectUnknownReverseClientHostname(),
    ),
    Row(
        S.RCPT,
        "checks",
        lambda b: _cp(b).reject_unknown_client_hostname,
        lambda b: RejectUnknownClientHostname(),
    ),
    Row(S.RCPT, "checks", lambda b: _adv(b).reject_invalid_helo, lambda b: RejectInvalidHelo()),
    Row(S.RCPT, "checks", lambda b: _adv(b).reject_non_fqdn_helo, lambda b: RejectNonFqdnHelo()),
    Row(S.RCPT, "checks", lambda b: _adv(b).reject_unknown_helo, lambda b: RejectUnknownHelo()),
    Row(S.RCPT, "checks", lambda b: _sp(b).reject_non_fqdn_sender, lambda b: RejectNonFqdnSender()),
    Row(
        S.RCPT,
        "checks",
        lambda b: _sp(b).reject_unknown_sender_domain,
        lambda b: RejectUnknownSenderDomain(),
    ),
    Row(
        S.RCPT,
        "checks",
        lambda b: _adv(b).reject_non_fqdn_recipient,
        lambda b: RejectNonFqdnRecipient(),
    ),
    Row(
        S.RCPT,
        "checks",
        lambda b: _adv(b).reject_unknown_recipient_domain,
        lambda b: RejectUnknownRecipientDomain(),
    ),
    # DATA command
    Row(
        S.DATA,
        "data",
        lambda b: _adv(b).reject_unauth_pipelining,
        lambda b: RejectUnauthPipelining(),
    ),
    # end of DATA
    Row(
        S.END_OF_DATA,
        "message",
        lambda b: _gen(b).max_message_size > 0,
        lambda b: MaxMessageSize(_gen(b).max_message_size),
    ),
    Row(
        S.END_OF_DATA,
        "message",
        lambda b: _gen(b).max_hops > 0,
        lambda b: MaxHops(_gen(b).max_hops),
    ),
    Row(
        S.END_OF_DATA,
        "message",
        lambda b: _gen(b).max_attachment_size > 0,
        lambda b: MaxAttachmentSize(_gen(b).max_attachment_size),
    ),
    Row(
        S.END_OF_DATA,
        "message",
        lambda b: _gen(b).disable_auto_forwarding,
        lambda b: DisableAutoForwarding(),
    ),
    # VRFY
    Row(S.VRFY, "vrfy", lambda b: _adv(b).disable_vrfy, lambda b: DisableVrfy()),
)


def _chains(b: _Build) -> dict[Stage, tuple[Chain, ...]]:
    grouped: dict[Stage, dict[str, list[Rule]]] = {stage: {} for stage in Stage}
    for row in TABLE:
        if not row.enabled(b):
            continue
        built = row.build(b)
        rules = built if isinstance(built, tuple) else (built,)
        grouped[row.stage].setdefault(row.chain, []).extend(rules)
    return {
        stage: tuple(
            Chain(name, tuple(rules), restriction=name not in _NOT_RESTRICTIONS)
            for name, rules in chains.items()
        )
        for stage, chains in grouped.items()
    }


#: chains of checks smtpd makes itself, outside the restriction lists
_NOT_RESTRICTIONS = frozenset({"limits", "mail", "message"})


@attrs.frozen(eq=False)
class Policy:
    """A compiled policy: immutable, shareable between sessions and threads.

    Build one with :func:`compile_policy` (or :func:`mailpolicy.load_policy`
    from a file). :meth:`evaluate` is the one decision entry point.
    """

    settings: Settings
    chains: Mapping[Stage, tuple[Chain, ...]]
    shared: Shared
    _passwords: Mapping[str, str] = attrs.field(repr=False)

    def evaluate(self, session: Session, envelope: Envelope) -> Verdict:
        """Judge ``envelope`` at its stage for ``session``. Never does I/O.

        A DNS answer the rules need but ``session.dns`` lacks gives a
        temporary failure naming the question; ask :meth:`lookups` first.
        """
        from .evaluate import evaluate

        return evaluate(self, session, envelope)

    def lookups(self, session: Session, envelope: Envelope) -> frozenset[DnsQuery]:
        """The DNS questions still needed to judge this stage.

        Call, resolve, add the answers with ``session.with_dns``, and call
        again until the set is empty: a later question can depend on an
        earlier answer (the forward lookup of the client's PTR name).
        """
        from .evaluate import lookups

        return lookups(self, session, envelope)

    def rules(self, stage: Stage) -> Iterator[tuple[str, Rule]]:
        """The rules that run at ``stage``, as ``(chain name, rule)``."""
        for chain in self.chains[stage]:
            for rule in chain.rules:
                yield chain.name, rule

    # -- SMTP AUTH ------------------------------------------------------------

    def auth_offered(self, session: Session) -> bool:
        """Whether AUTH is offered (and accepted) in this session now."""
        auth = self.settings.general.smtp_auth
        if not auth.enabled or not self._passwords:
            return False
        return session.tls or not auth.no_plaintext_without_tls

    def has_account(self, user: str) -> bool:
        """Whether ``[accounts.USER]`` exists."""
        return user in self._passwords

    def check_password(self, user: str, password: str) -> bool:
        """Verify a login. Deliberately slow (scrypt): call it off the event loop."""
        stored = self._passwords.get(user)
        return stored is not None and verify_password(password, stored)


def compile_policy(settings: Settings) -> Policy:
    """Compile ``settings`` into a :class:`Policy` (all tables built once)."""
    g, relay = settings.general, settings.relay
    mynets = list(relay.trusted_networks)
    if g.smtp_auth.skip_for_local_network:
        mynets += g.smtp_auth.local_networks
    shared = Shared(
        settings=settings,
        mynetworks=NetworkTable((net, i) for i, net in enumerate(mynets)),
        local_domains=frozenset(g.local_domains),
        inbound_domains=DomainTable((d, i) for i, d in enumerate(relay.inbound_domains)),
    )
    lists = settings.security.lists
    build = _Build(
        settings=settings,
        shared=shared,
        white=ListIndex(r for r in lists if r.list == "white"),
        black=ListIndex(r for r in lists if r.list == "black"),
        owners=Owners.build(settings.accounts),
        exempt=NetworkTable(
            (net, i) for i, net in enumerate(relay.trusted_networks + g.smtp_auth.local_networks)
        ),
    )
    passwords = MappingProxyType({a.name: a.password_hash for a in settings.accounts})
    return Policy(settings, MappingProxyType(_chains(build)), shared, passwords)
