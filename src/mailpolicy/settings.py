"""Typed settings: one attrs class per table of the policy file.

Every class mirrors a section of the settings reference (docs/settings.md),
field for field, with the same names and defaults. Values are already
validated and normalised here (networks parsed, domains lower-cased without a
trailing dot), so a ``Settings`` object that exists is usable: the loader in
:mod:`mailpolicy.config` turns a TOML file into one, or refuses it with the
file, the key path and the reason, and writes one back as a mapping.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal

import attrs

from .model import IPAddress, IPNetwork, Networks

__all__ = [
    "VERIFIED_SECURITY",
    "Account",
    "AdvancedSettings",
    "ConnectionPolicy",
    "DeliveryException",
    "DeliverySettings",
    "DnsSettings",
    "DnsblZone",
    "GeneralSettings",
    "ListRule",
    "Normalized",
    "RelayHost",
    "RelaySettings",
    "Replies",
    "Security",
    "SecuritySettings",
    "SenderPolicy",
    "ServerSettings",
    "Settings",
    "SmtpAuthSettings",
    "normalize_domain",
    "reply_text",
]

MIB = 1_048_576


def normalize_domain(name: str) -> str:
    """Domains compare without case and without a trailing dot."""
    return name.strip().lower().rstrip(".")


class Normalized(tuple[str, ...]):
    """Strings the loader has already normalized exactly as a field's
    converter would: the converter then only copies the tuple. (A million
    list entries need not be lower-cased twice.)"""

    __slots__ = ()


def _same(value: str, original: str) -> str:
    # keep the caller's string when normalizing changed nothing: a million
    # entries then exist once, not twice
    return original if value == original else value


def _domains(values: Iterable[str]) -> tuple[str, ...]:
    if type(values) is Normalized:
        return tuple(values)
    return tuple(_same(normalize_domain(v), v) for v in values)


def _lower(values: Iterable[str]) -> tuple[str, ...]:
    if type(values) is Normalized:
        return tuple(values)
    return tuple(_same(v.strip().lower(), v) for v in values)


def _networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(
        v if not isinstance(v, str) else ipaddress.ip_network(v.strip(), strict=False)
        for v in values
    )


def _ip_tuple(values: Iterable[str | IPAddress]) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(v.strip()) if isinstance(v, str) else v for v in values)


def _texts(values: Iterable[tuple[str, str]] | dict[str, str]) -> tuple[tuple[str, str], ...]:
    # a mapping, kept as pairs so that settings stay hashable
    return tuple(values.items()) if isinstance(values, dict) else tuple(values)


def reply_text(original: str, override: str) -> str:
    """A refusal's text with a table's ``text`` override: Postfix's
    ``<address>: Sender address rejected:`` (any ``... rejected:``) prefix
    is kept, as for an access map's REJECT text, and so is a leading
    ``<address>:``; the rest is replaced."""
    head, sep, _ = original.partition(" rejected: ")
    if sep:
        return f"{head}{sep}{override}"
    if original.startswith("<"):
        address, sep, _ = original.partition(">: ")
        if sep:
            return f"{address}{sep}{override}"
    return override


def _network_list(values: Iterable[str | IPNetwork]) -> Networks:
    return Networks.of(values)


@attrs.frozen
class SmtpAuthSettings:
    """``[general.smtp_auth]``."""

    enabled: bool = True
    skip_for_local_network: bool = True
    local_networks: tuple[IPNetwork, ...] = attrs.field(
        default=("127.0.0.0/8", "::1/128"), converter=_networks
    )
    sender_must_match_login: bool = False
    no_plaintext_without_tls: bool = True
    #: reply texts instead of Postfix's, by the key of the check that refuses
    #: (``{"KEY": "text"}``); see :func:`reply_text`
    text: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_texts)


@attrs.frozen
class GeneralSettings:
    """``[general]``. A policy *file* without ``hostname`` gets the machine's
    FQDN (``config.load_settings``); the static default here is what a mapping
    gets, so that settings never depend on the machine they are built on."""

    hostname: str = attrs.field(default="localhost.localdomain", converter=normalize_domain)
    banner: str = "$hostname ESMTP"
    local_domains: tuple[str, ...] = attrs.field(default=(), converter=_domains)
    max_recipients: int = 1000
    max_hops: int = 50
    max_message_size_mb: float = 10
    max_attachment_size_mb: float = 0
    disable_auto_forwarding: bool = False
    external_postmasters: tuple[str, ...] = attrs.field(default=(), converter=_lower)
    smtp_auth: SmtpAuthSettings = SmtpAuthSettings()
    #: reply texts instead of Postfix's, by the key of the check that refuses
    #: (``{"KEY": "text"}``); see :func:`reply_text`
    text: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_texts)
    #: observe every observable rule: log and count what it would refuse,
    #: refuse nothing (relay control and the protocol are never observed)
    observe: bool = False

    @property
    def max_message_size(self) -> int:
        """In bytes; 0 is unlimited."""
        return int(self.max_message_size_mb * MIB)

    @property
    def max_attachment_size(self) -> int:
        """In bytes; 0 is unlimited."""
        return int(self.max_attachment_size_mb * MIB)

    @property
    def banner_text(self) -> str:
        return self.banner.replace("$hostname", self.hostname)


#: how a next hop's connection is protected: Postfix's TLS security levels
#: (``none``, ``may``, ``encrypt``, ``verify``, ``secure``), ``starttls`` (the
#: older name here for ``verify``) and ``tls`` (implicit TLS from the first
#: byte, verified: Postfix's ``smtp_tls_wrappermode``)
Security = Literal["none", "may", "encrypt", "verify", "secure", "starttls", "tls"]

#: the levels that check the certificate against the trust store and the name
VERIFIED_SECURITY: frozenset[str] = frozenset({"verify", "secure", "starttls", "tls"})


@attrs.frozen
class RelayHost:
    """A next hop: ``delivery.relay_host`` or an exception's host."""

    host: str = attrs.field(converter=normalize_domain)
    port: int = 25
    security: Security = "none"
    username: str | None = None
    password_env: str | None = None


@attrs.frozen
class DeliveryException:
    """``[[delivery.exceptions]]``: mail matching ``targets`` (by recipient or
    by sender; addresses, or domains with their subdomains) goes through
    ``relay_host``. In the file the relay host's keys sit in the exception
    itself (``host``, ``port``, ``security``, ``username``, ``password_env``)."""

    name: str
    match: Literal["recipient", "sender"]
    targets: tuple[str, ...] = attrs.field(converter=_lower)
    relay_host: RelayHost


@attrs.frozen
class DeliverySettings:
    """``[delivery]``."""

    mode: Literal["direct", "relay"] = "direct"
    relay_host: RelayHost | None = None
    exceptions: tuple[DeliveryException, ...] = ()
    maildir: str = "maildir"
    #: TLS for MX delivery (Postfix's smtp_tls_security_level)
    mx_security: Security = "may"
    #: the port MX hosts are reached on (Postfix: a transport next hop ``domain:port``)
    mx_port: int = 25
    #: the trust store for verified levels instead of the system's (smtp_tls_CAfile)
    tls_ca_file: str | None = None
    #: seconds to set up a TCP connection to one address (smtp_connect_timeout)
    connect_timeout_seconds: float = 30
    #: seconds to wait for each reply of a next hop (smtp_helo_timeout, smtp_*_timeout)
    reply_timeout_seconds: float = 60
    #: seconds for a whole delivery attempt of one message, every hop
    #: included; kept below the client's patience at the end of DATA
    attempt_timeout_seconds: float = 240
    #: more addresses that are this server (behind NAT or a load balancer), for
    #: spotting an MX that points back at us (Postfix's proxy_interfaces)
    our_addresses: tuple[IPAddress, ...] = attrs.field(default=(), converter=_ip_tuple)


@attrs.frozen
class RelaySettings:
    """``[relay]``."""

    trusted_networks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    inbound_domains: tuple[str, ...] = attrs.field(default=(), converter=_domains)
    #: reply texts instead of Postfix's, by the key of the check that refuses
    #: (``{"KEY": "text"}``); see :func:`reply_text`
    text: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_texts)


@attrs.frozen
class ListRule:
    """``[[security.lists]]``: one black or white rule.

    A rule matches when, for each criterion it has, any of its values matches.
    """

    name: str
    list: Literal["black", "white"] = "black"
    action: Literal["reject", "discard", "allow"] = "reject"
    text: str | None = None
    #: a compact tuple (:class:`~mailpolicy.model.Networks`): a million
    #: entries fit in a few tens of MB
    client: tuple[IPNetwork, ...] = attrs.field(default=Networks(), converter=_network_list)
    client_hostname: tuple[str, ...] = attrs.field(default=(), converter=_domains)
    helo: tuple[str, ...] = attrs.field(default=(), converter=_domains)
    sender: tuple[str, ...] = attrs.field(default=(), converter=_lower)
    recipient: tuple[str, ...] = attrs.field(default=(), converter=_lower)
    #: log and count what this rule would refuse, without refusing
    observe: bool = False

    def criteria(self) -> tuple[str, ...]:
        """The names of the criteria this rule uses, in Postfix's order."""
        return tuple(k for k in CRITERIA if getattr(self, k))


#: Criteria in the order Postfix consults the access maps.
CRITERIA: tuple[str, ...] = ("client", "client_hostname", "helo", "sender", "recipient")


@attrs.frozen
class SenderPolicy:
    """``[security.sender_policy]``."""

    reject_non_fqdn_sender: bool = False
    reject_unknown_sender_domain: bool = False
    reject_unauthenticated_local_sender: bool = False
    observe: bool = False
    #: reply texts instead of Postfix's, by the key of the check that refuses
    #: (``{"KEY": "text"}``); see :func:`reply_text`
    text: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_texts)


@attrs.frozen
class ConnectionPolicy:
    """``[security.connection_policy]``."""

    reject_unknown_reverse_client_hostname: bool = False
    reject_unknown_client_hostname: bool = False
    max_connections_per_client: int = 50
    max_connection_rate_per_client: int = 0
    max_message_rate_per_client: int = 0
    max_recipient_rate_per_client: int = 0
    rate_window_seconds: int = 60
    #: messages (MAIL) / recipients (RCPT) per window per SASL login, per
    #: sender domain, per recipient domain, and for the whole server (0: off)
    max_message_rate_per_user: int = 0
    max_recipient_rate_per_user: int = 0
    max_message_rate_per_sender_domain: int = 0
    max_recipient_rate_per_recipient_domain: int = 0
    max_message_rate_global: int = 0
    max_recipient_rate_global: int = 0
    observe: bool = False
    #: reply texts instead of Postfix's, by the key of the check that refuses
    #: (``{"KEY": "text"}``); see :func:`reply_text`
    text: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_texts)


@attrs.frozen
class DnsblZone:
    """One ``security.advanced.dnsbl`` entry: ``zone`` or ``zone=127.0.0.2``."""

    zone: str = attrs.field(converter=normalize_domain)
    answer: ipaddress.IPv4Address | None = None

    @classmethod
    def parse(cls, text: str) -> DnsblZone:
        zone, sep, want = text.partition("=")
        return cls(zone, ipaddress.IPv4Address(want.strip()) if sep else None)

    def __str__(self) -> str:
        return self.zone if self.answer is None else f"{self.zone}={self.answer}"


@attrs.frozen
class AdvancedSettings:
    """``[security.advanced]``."""

    require_helo: bool = False
    reject_invalid_helo: bool = False
    reject_non_fqdn_helo: bool = False
    reject_unknown_helo: bool = False
    reject_unauth_pipelining: bool = False
    reject_non_fqdn_recipient: bool = False
    reject_unknown_recipient_domain: bool = False
    disable_vrfy: bool = True
    dnsbl: tuple[DnsblZone, ...] = ()
    observe: bool = False
    #: reply texts instead of Postfix's, by the key of the check that refuses
    #: (``{"KEY": "text"}``); see :func:`reply_text`
    text: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_texts)


@attrs.frozen
class SecuritySettings:
    """``[security]``."""

    lists: tuple[ListRule, ...] = ()
    sender_policy: SenderPolicy = SenderPolicy()
    connection_policy: ConnectionPolicy = ConnectionPolicy()
    advanced: AdvancedSettings = AdvancedSettings()


@attrs.frozen
class Replies:
    """``[replies]``: reply codes of the configurable refusals."""

    unknown_address: int = 450
    unknown_client: int = 450
    unknown_hostname: int = 450
    access_denied: int = 554
    relay_denied: int = 554


@attrs.frozen
class ServerSettings:
    """``[server]``: listeners and TLS files (used by ``mailpolicy serve``)."""

    smtp: str | None = "127.0.0.1:2525"
    submission: str | None = None
    smtps: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: failed AUTH attempts per client and rate window before 421 and hang-up
    max_auth_failures_per_client: int = 5
    #: concurrent sessions, all clients together; at the limit new
    #: connections wait in the listen queue (0: no limit)
    max_connections: int = 1000
    #: the kernel's queue of connections not yet accepted (capped by
    #: net.core.somaxconn)
    listen_backlog: int = 4096
    #: seconds a client may stay silent (Postfix's smtpd_timeout)
    timeout_seconds: int = 300
    #: seconds one session may last in all (0: no limit)
    max_session_seconds: int = 3600
    #: bytes per second a client must keep up while sending a message, past
    #: one timeout's worth of time (Postfix's smtpd_min_data_rate; 0: off)
    min_data_rate: int = 500
    #: a message is kept in memory up to this many KiB, the rest is spooled
    #: to a temporary file until the end of DATA
    max_message_memory_kb: int = 1024
    #: refuse a bare LF (a line end without CR) in commands and message text
    #: with 521 and hang up (Postfix's smtpd_forbid_bare_newline = yes)
    reject_bare_newline: bool = False
    #: peers whose PROXY protocol line is believed (with --proxy-protocol);
    #: anyone else is refused
    proxy_networks: tuple[IPNetwork, ...] = attrs.field(
        default=("127.0.0.0/8", "::1/128"), converter=_networks
    )


@attrs.frozen
class DnsSettings:
    """``[dns]``: resolvers in order, and the per-query timeout."""

    nameservers: tuple[str, ...] = ()
    timeout_seconds: float = 5


@attrs.frozen
class Account:
    """``[accounts.NAME]``: a login, its password hash and the addresses it owns.

    An address ``@example.com`` owns the whole domain, as in Postfix's
    ``smtpd_sender_login_maps``.
    """

    name: str
    password_hash: str = attrs.field(repr=False)
    addresses: tuple[str, ...] = attrs.field(default=(), converter=_lower)


@attrs.frozen
class Settings:
    """The whole policy file."""

    general: GeneralSettings = GeneralSettings()
    delivery: DeliverySettings = DeliverySettings()
    relay: RelaySettings = RelaySettings()
    security: SecuritySettings = SecuritySettings()
    replies: Replies = Replies()
    server: ServerSettings = ServerSettings()
    dns: DnsSettings = DnsSettings()
    accounts: tuple[Account, ...] = ()
