"""Compile settings into a :class:`Policy`: ordered chains of rules per stage.

The table :data:`TABLE` is the whole order of evaluation (settings section 5)
in one place, and the single source of what each rule is: a row says at which
stage, in which chain, under which settings key (its name) a rule runs, when
that setting turns it on, what its decision depends on (the memo's scope),
which counter it reads and whether it is the white list. Adding a check is
adding a rule class and a row. Rows whose setting is off produce no rule at
all, so a disabled check costs nothing, not even a DNS lookup.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from .lookup import DomainTable, NetworkTable
from .model import DnsQuery, Envelope, Session, Stage
from .passwords import dummy_hash_like, verify_password
from .rules import Chain, Rule, Scope, Step
from .rules.auth import Owners, RejectUnauthenticatedLocalSender, SenderMustMatchLogin
from .rules.connection import RejectUnknownClientHostname, RejectUnknownReverseClientHostname
from .rules.content import DisableAutoForwarding, MaxAttachmentSize
from .rules.context import Context, Shared
from .rules.dnsbl import RejectRblClient
from .rules.helo import RejectInvalidHelo, RejectNonFqdnHelo, RejectUnknownHelo, RequireHelo
from .rules.limits import (
    MaxConnectionRate,
    MaxConnections,
    MaxGlobalMessageRate,
    MaxGlobalRecipientRate,
    MaxHops,
    MaxMessageRate,
    MaxMessageSize,
    MaxRecipientDomainRate,
    MaxRecipientRate,
    MaxRecipients,
    MaxSenderDomainRate,
    MaxUserMessageRate,
    MaxUserRecipientRate,
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
    Settings,
)
from .stages import CompiledChain, compile_stages

__all__ = ["TABLE", "Policy", "Row", "compile_policy", "observable"]


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


#: A row's setting when its key names none (``rfc5321.postmaster``).
_NO_SETTING: Any = object()


def _setting(settings: Settings, key: str) -> Any:
    """The value at the dotted ``key`` in ``settings``, or ``_NO_SETTING``."""
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part, _NO_SETTING)
        if value is _NO_SETTING:
            break
    return value


def _set(b: _Build, value: Any) -> bool:
    """The usual switch: the setting at the row's key is true."""
    return value is True


def _positive(b: _Build, value: Any) -> bool:
    """A limit: 0 means none."""
    return bool(value > 0)


def _listed(b: _Build, value: Any) -> bool:
    return bool(value)


def _always(b: _Build, value: Any) -> bool:
    return True


def _with_accounts(b: _Build, value: Any) -> bool:
    """Sender ownership needs accounts, and AUTH to log in to them."""
    return b.accounts_on and value is True


SESSION, SENDER = Scope.SESSION, Scope.SENDER


@attrs.frozen
class Row:
    """One line of the evaluation table: the single source of what a rule is.

    ``key`` is the settings key path that turns the rule on and names it (in
    its decisions, the verdict, the logs); ``enabled`` says from the
    setting's value (and the compiled tables) whether the row is on: by
    default when the setting is true. ``build`` makes the rule from the
    tables and the key. ``scope`` is what its decision depends on (the
    memo reuses session and sender decisions); ``counter`` the
    :class:`~mailpolicy.model.Counters` field it reads, which the adapter
    must count (:meth:`Policy.counters`); ``white`` marks the white list,
    whose permit names the accepting rule; ``restriction`` is false for the
    chains of checks smtpd makes itself, which a discarded transaction still
    faces (all rows of one chain agree).
    """

    stage: Stage
    chain: str
    key: str
    build: Callable[[_Build, str], Rule | tuple[Rule, ...]]
    enabled: Callable[[_Build, Any], bool] = _set
    scope: Scope = Scope.ENVELOPE
    counter: str | None = None
    white: bool = False
    restriction: bool = True


def _gen(b: _Build) -> GeneralSettings:
    return b.settings.general


def _cp(b: _Build) -> ConnectionPolicy:
    return b.settings.security.connection_policy


def _adv(b: _Build) -> AdvancedSettings:
    return b.settings.security.advanced


def _keyed(rule: Callable[[str, int], Rule]) -> Callable[[_Build, str], Rule]:
    """The builder of a keyed rate limit: its limit is its own setting."""

    def build(b: _Build, key: str) -> Rule:
        return rule(key, _setting(b.settings, key))

    return build


_CP = "security.connection_policy"
_ADV = "security.advanced"
_SP = "security.sender_policy"

S = Stage
#: The order of evaluation. Chains run in the order they first appear for a
#: stage; rules in a chain in row order.
TABLE: tuple[Row, ...] = (
    # connect: counted per client (421 and the connection ends)
    Row(
        S.CONNECT,
        "limits",
        f"{_CP}.max_connections_per_client",
        lambda b, k: MaxConnections(k, _cp(b).max_connections_per_client, b.exempt),
        _positive,
        counter=MaxConnections.counter,
        restriction=False,
    ),
    Row(
        S.CONNECT,
        "limits",
        f"{_CP}.max_connection_rate_per_client",
        lambda b, k: MaxConnectionRate(k, _cp(b).max_connection_rate_per_client, b.exempt),
        _positive,
        counter=MaxConnectionRate.counter,
        restriction=False,
    ),
    # MAIL
    Row(S.MAIL, "mail", f"{_ADV}.require_helo", lambda b, k: RequireHelo(k), restriction=False),
    Row(
        S.MAIL,
        "mail",
        "general.max_message_size_mb",
        lambda b, k: MaxMessageSize(k, _gen(b).max_message_size),
        _positive,
        restriction=False,
    ),
    Row(
        S.MAIL,
        "mail",
        f"{_CP}.max_message_rate_per_client",
        lambda b, k: MaxMessageRate(k, _cp(b).max_message_rate_per_client, b.exempt),
        _positive,
        counter=MaxMessageRate.counter,
        restriction=False,
    ),
    *(
        Row(
            S.MAIL,
            "mail",
            f"{_CP}.{setting}",
            _keyed(rule),
            _positive,
            counter=rule.counter,
            restriction=False,
        )
        for setting, rule in (
            ("max_message_rate_per_user", MaxUserMessageRate),
            ("max_message_rate_per_sender_domain", MaxSenderDomainRate),
            ("max_message_rate_global", MaxGlobalMessageRate),
        )
    ),
    # RCPT: limits first, then Postfix's client/helo/sender, relay and recipient restrictions
    Row(
        S.RCPT,
        "limits",
        "general.max_recipients",
        lambda b, k: MaxRecipients(k, _gen(b).max_recipients),
        _positive,
        restriction=False,
    ),
    Row(
        S.RCPT,
        "limits",
        f"{_CP}.max_recipient_rate_per_client",
        lambda b, k: MaxRecipientRate(k, _cp(b).max_recipient_rate_per_client, b.exempt),
        _positive,
        counter=MaxRecipientRate.counter,
        restriction=False,
    ),
    *(
        Row(
            S.RCPT,
            "limits",
            f"{_CP}.{setting}",
            _keyed(rule),
            _positive,
            counter=rule.counter,
            restriction=False,
        )
        for setting, rule in (
            ("max_recipient_rate_per_user", MaxUserRecipientRate),
            ("max_recipient_rate_per_recipient_domain", MaxRecipientDomainRate),
            ("max_recipient_rate_global", MaxGlobalRecipientRate),
        )
    ),
    Row(S.RCPT, "postmaster", "rfc5321.postmaster", lambda b, k: AcceptBarePostmaster(k), _always),
    Row(
        S.RCPT,
        "sender_ownership",
        "general.smtp_auth.sender_must_match_login",
        lambda b, k: SenderMustMatchLogin(k, b.owners),
        _with_accounts,
        scope=SENDER,
    ),
    Row(
        S.RCPT,
        "sender_ownership",
        f"{_SP}.reject_unauthenticated_local_sender",
        lambda b, k: RejectUnauthenticatedLocalSender(k, b.owners),
        _with_accounts,
        scope=SENDER,
    ),
    Row(
        S.RCPT,
        "relay",
        "relay.trusted_networks",
        lambda b, k: PermitMynetworks(k),
        _always,
        scope=SESSION,
    ),
    Row(S.RCPT, "relay", "general.smtp_auth.enabled", lambda b, k: PermitAuthenticated(k)),
    Row(
        S.RCPT,
        "relay",
        "relay.reject_unauth_destination",
        lambda b, k: RejectUnauthDestination(k, b.shared),
        _always,
    ),
    Row(
        S.RCPT,
        "checks",
        "security.lists",
        lambda b, k: WhiteList(k, b.white),
        lambda b, v: bool(b.white),
        white=True,
    ),
    Row(
        S.RCPT,
        "checks",
        "security.lists",
        lambda b, k: BlackList(k, b.black),
        lambda b, v: bool(b.black),
    ),
    Row(
        S.RCPT,
        "checks",
        "relay.trusted_networks",
        lambda b, k: PermitMynetworks(k),
        _always,
        scope=SESSION,
    ),
    Row(S.RCPT, "checks", "general.smtp_auth.enabled", lambda b, k: PermitAuthenticated(k)),
    Row(
        S.RCPT,
        "checks",
        f"{_ADV}.dnsbl",
        lambda b, k: tuple(RejectRblClient(f"{k}.{z.zone}", z) for z in _adv(b).dnsbl),
        _listed,
        scope=SESSION,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_CP}.reject_unknown_reverse_client_hostname",
        lambda b, k: RejectUnknownReverseClientHostname(k),
        scope=SESSION,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_CP}.reject_unknown_client_hostname",
        lambda b, k: RejectUnknownClientHostname(k),
        scope=SESSION,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_ADV}.reject_invalid_helo",
        lambda b, k: RejectInvalidHelo(k),
        scope=SESSION,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_ADV}.reject_non_fqdn_helo",
        lambda b, k: RejectNonFqdnHelo(k),
        scope=SESSION,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_ADV}.reject_unknown_helo",
        lambda b, k: RejectUnknownHelo(k),
        scope=SESSION,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_SP}.reject_non_fqdn_sender",
        lambda b, k: RejectNonFqdnSender(k),
        scope=SENDER,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_SP}.reject_unknown_sender_domain",
        lambda b, k: RejectUnknownSenderDomain(k),
        scope=SENDER,
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_ADV}.reject_non_fqdn_recipient",
        lambda b, k: RejectNonFqdnRecipient(k),
    ),
    Row(
        S.RCPT,
        "checks",
        f"{_ADV}.reject_unknown_recipient_domain",
        lambda b, k: RejectUnknownRecipientDomain(k),
    ),
    # DATA command
    Row(S.DATA, "data", f"{_ADV}.reject_unauth_pipelining", lambda b, k: RejectUnauthPipelining(k)),
    # end of DATA
    Row(
        S.END_OF_DATA,
        "message",
        "general.max_message_size_mb",
        lambda b, k: MaxMessageSize(k, _gen(b).max_message_size),
        _positive,
        restriction=False,
    ),
    Row(
        S.END_OF_DATA,
        "message",
        "general.max_hops",
        lambda b, k: MaxHops(k, _gen(b).max_hops),
        _positive,
        restriction=False,
    ),
    Row(
        S.END_OF_DATA,
        "message",
        "general.max_attachment_size_mb",
        lambda b, k: MaxAttachmentSize(k, _gen(b).max_attachment_size),
        _positive,
        restriction=False,
    ),
    Row(
        S.END_OF_DATA,
        "message",
        "general.disable_auto_forwarding",
        lambda b, k: DisableAutoForwarding(k),
        restriction=False,
    ),
    # VRFY
    Row(S.VRFY, "vrfy", f"{_ADV}.disable_vrfy", lambda b, k: DisableVrfy(k)),
)


#: Observe mode (``observe = true``) covers the policy's own restrictions:
#: the rows under ``security.*`` and the content checks. Relay control, the
#: protocol itself (pipelining, VRFY, sizes, hops, recipients per message)
#: and the bare postmaster are never observed: an open relay cannot be
#: "observed".
_OBSERVABLE_ROOTS: tuple[str, ...] = (
    "security.",
    "general.smtp_auth.sender_must_match_login",
    "general.max_attachment_size_mb",
    "general.disable_auto_forwarding",
)
_NEVER_OBSERVED: frozenset[str] = frozenset(
    {f"{_ADV}.reject_unauth_pipelining", f"{_ADV}.disable_vrfy"}
)


def observable(key: str) -> bool:
    """Whether the rule of settings key ``key`` can be put in observe mode."""
    return key.startswith(_OBSERVABLE_ROOTS) and key not in _NEVER_OBSERVED


def _observed_names(b: _Build, row: Row, rules: tuple[Rule, ...]) -> frozenset[str]:
    """The decision names of ``rules`` (one row's) that are only observed."""
    if not observable(row.key) or row.white:
        return frozenset()
    every = b.settings.general.observe
    if row.key == "security.lists":
        # one switch per entry; the black list decides as security.lists.NAME
        return frozenset(
            f"{row.key}.{r.name}"
            for r in b.settings.security.lists
            if r.list == "black" and (every or r.observe)
        )
    parent = _setting(b.settings, row.key.rpartition(".")[0])
    if every or getattr(parent, "observe", False) is True:
        return frozenset(rule.name for rule in rules)
    return frozenset()


@attrs.frozen
class _Compiled:
    chains: dict[Stage, tuple[Chain, ...]]
    counters: dict[Stage, frozenset[str]]
    observed: frozenset[str]
    texts: dict[str, str]


def _texts(b: _Build, row: Row) -> str | None:
    """The ``text`` override for ``row`` in its table, if any."""
    table, _, name = row.key.rpartition(".")
    pairs = getattr(_setting(b.settings, table), "text", ())
    for key, text in pairs if isinstance(pairs, tuple) else ():
        if key == name:
            return str(text)
    return None


def _compile(b: _Build) -> _Compiled:
    grouped: dict[Stage, dict[str, list[Step]]] = {stage: {} for stage in Stage}
    restriction: dict[tuple[Stage, str], bool] = {}
    counters: dict[Stage, set[str]] = {stage: set() for stage in Stage}
    observed: set[str] = set()
    texts: dict[str, str] = {}
    slot = 0
    for row in TABLE:
        if restriction.setdefault((row.stage, row.chain), row.restriction) != row.restriction:
            raise ValueError(f"rows of chain {row.chain!r} disagree on restriction")
        if not row.enabled(b, _setting(b.settings, row.key)):
            continue
        built = row.build(b, row.key)
        rules = built if isinstance(built, tuple) else (built,)
        names = _observed_names(b, row, rules)
        observed |= names
        text = _texts(b, row)
        if text is not None:
            texts.update((rule.name, text) for rule in rules)
        steps = grouped[row.stage].setdefault(row.chain, [])
        for rule in rules:
            steps.append(Step(rule, row.scope, row.white, slot, observe=bool(names)))
            slot += 1
        if row.counter is not None:
            counters[row.stage].add(row.counter)
    return _Compiled(
        {
            stage: tuple(
                Chain(name, tuple(steps), restriction[stage, name])
                for name, steps in chains.items()
            )
            for stage, chains in grouped.items()
        },
        {stage: frozenset(names) for stage, names in counters.items()},
        frozenset(observed),
        texts,
    )


@attrs.frozen(eq=False)
class Policy:
    """A compiled policy: immutable, shareable between sessions and threads.

    Build one with :func:`compile_policy` (or :func:`mailpolicy.load_policy`
    from a file); judge with :func:`mailpolicy.decide` or
    :func:`mailpolicy.evaluate`.
    """

    settings: Settings
    chains: Mapping[Stage, tuple[Chain, ...]]
    shared: Shared
    _passwords: Mapping[str, str] = attrs.field(repr=False)
    _counters: Mapping[Stage, frozenset[str]] = attrs.field(repr=False, factory=dict)
    #: the rules (decision names: settings keys, ``security.lists.NAME``)
    #: in observe mode: what they would refuse is logged, counted and let by
    observed: frozenset[str] = frozenset()
    #: reply texts by rule name (the tables' ``text`` overrides)
    texts: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: ``chains`` in the form the engine walks (:mod:`mailpolicy.stages`)
    compiled: dict[Stage, tuple[CompiledChain, ...]] = attrs.field(init=False, repr=False)

    #: the RCPT rules that can name their questions once the sender is known
    _ahead: tuple[Callable[[Context], tuple[DnsQuery, ...]], ...] = attrs.field(
        init=False, repr=False
    )

    @compiled.default
    def _compile_stages(self) -> dict[Stage, tuple[CompiledChain, ...]]:
        return compile_stages(self.chains)

    @_ahead.default
    def _rules_ahead(self) -> tuple[Callable[[Context], tuple[DnsQuery, ...]], ...]:
        found = (getattr(rule, "ahead", None) for _, rule in self.rules(Stage.RCPT))
        return tuple(ahead for ahead in found if ahead is not None)

    def questions_ahead(self, session: Session, sender: str) -> frozenset[DnsQuery]:
        """The DNS questions the RCPT stage will ask about ``sender`` whatever
        the recipient (``reject_unknown_sender_domain``: the domain's MX), and
        that ``session`` has no answer to yet. A host may ask them as soon as
        MAIL is accepted, so that the answers are in, or on the way, when the
        first RCPT needs them (``mailpolicy serve`` does)."""
        if not self._ahead:
            return frozenset()
        ctx = Context(self.shared, session, Envelope(Stage.MAIL, sender=sender))
        wanted = {query for ahead in self._ahead for query in ahead(ctx)}
        return frozenset(query for query in wanted if query not in session.dns)

    def counters(self, stage: Stage) -> frozenset[str]:
        """The :class:`~mailpolicy.model.Counters` fields the enabled rules of
        ``stage`` read: what the adapter must count before judging it
        (``connections`` and ``connection_rate`` at CONNECT, ``message_rate``
        at MAIL, ``recipient_rate`` at RCPT, when their limits are on)."""
        return self._counters.get(stage, frozenset())

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
        """Verify a login. Deliberately slow (scrypt): call it off the event
        loop. An unknown user costs as much as a known one (a dummy hash of
        the accounts' cost is checked), so timing does not tell who exists."""
        stored = self._passwords.get(user)
        if stored is None:
            dummy = _DUMMY_HASHES.get(self)
            if dummy is None:
                dummy = _DUMMY_HASHES[self] = dummy_hash_like(self._passwords.values())
            verify_password(password, dummy)
            return False
        return verify_password(password, stored)


#: each policy's dummy hash (made on the first login of an unknown user)
_DUMMY_HASHES: weakref.WeakKeyDictionary[Policy, str] = weakref.WeakKeyDictionary()


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
    # one table per criterion for both colours: one probe answers both
    white, black = ListIndex.pair(
        (r for r in lists if r.list == "white"), (r for r in lists if r.list == "black")
    )
    build = _Build(
        settings=settings,
        shared=shared,
        white=white,
        black=black,
        owners=Owners.build(settings.accounts),
        exempt=NetworkTable(
            (net, i) for i, net in enumerate(relay.trusted_networks + g.smtp_auth.local_networks)
        ),
    )
    passwords = MappingProxyType({a.name: a.password_hash for a in settings.accounts})
    compiled = _compile(build)
    return Policy(
        settings,
        MappingProxyType(compiled.chains),
        shared,
        passwords,
        MappingProxyType(compiled.counters),
        compiled.observed,
        MappingProxyType(compiled.texts),
    )
