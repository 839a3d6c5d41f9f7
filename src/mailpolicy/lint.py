"""Policy lint: problems a person would want to know about a policy that loads.

:func:`check_settings` reads a :class:`~mailpolicy.settings.Settings` (it is
pure: no DNS, no files) and returns :class:`Finding` values, each naming the
settings key it is about, in the loader's notation
(``security.lists[2].sender[0]``). ``mailpolicy check`` prints them.

Errors make the policy unsafe as written: a trusted network that is the
whole Internet (``0.0.0.0/0``, ``::/0``) is an open relay. Everything else is
a warning: the policy works, but something in it does not do what it says.

* **Black and white lists.** White rules run before black rules, and a white
  match skips every black rule, so a black entry that a single-criterion
  white rule also matches (the same entry, a parent domain, a containing
  network, ``user@`` for an address) never applies. Within one colour the
  first rule wins for a client network that an earlier rule's network
  contains, and for an entry an earlier rule lists too (for names and
  addresses the most specific entry wins, so a parent domain in an earlier
  rule does not hide a more specific one); such an entry is *shadowed*. An
  entry that another entry of its own rule already covers is *redundant*.
* **Networks.** Trusted networks, and local networks when they may relay
  without AUTH, shorter than ``/8`` (IPv4) or ``/32`` (IPv6) are warned
  about; ``/0`` is an error.
* **Settings with no effect**, such as a relay host in direct mode, a sender
  ownership check without accounts, external postmasters without local
  domains, a white rule's reply text (white rules never reply).

Lists may hold millions of entries: each entry is checked with a few hash
probes (its parent domains, its ``user@`` key) or, for networks, one probe
per prefix length in use (:class:`~mailpolicy.lookup.NetworkTable`); nothing
compares entries pairwise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from typing import Literal

import attrs

from .addresses import parent_domains
from .lookup import NetworkTable
from .model import IPNetwork
from .settings import CRITERIA, ListRule, RelayHost, Settings

__all__ = ["Finding", "Severity", "check_settings"]

Severity = Literal["error", "warning"]

#: IPv4 and IPv6 prefixes shorter than these are "too wide" to trust
WIDE_V4 = 8
WIDE_V6 = 32


@attrs.frozen
class Finding:
    """One problem: how bad, which settings key, and what is wrong."""

    severity: Severity
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.key}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "key": self.key, "message": self.message}


def check_settings(settings: Settings) -> list[Finding]:
    """Every problem found in ``settings``: errors first, then warnings,
    each group in the order of the policy file."""
    findings = [
        *_networks(settings),
        *_lists(settings),
        *_no_effect(settings),
    ]
    return [f for f in findings if f.severity == "error"] + [
        f for f in findings if f.severity == "warning"
    ]


# ---------------------------------------------------------------------------
# Networks


def _networks(settings: Settings) -> Iterator[Finding]:
    relay = settings.relay
    auth = settings.general.smtp_auth
    groups: list[tuple[str, Sequence[IPNetwork], str]] = [
        ("relay.trusted_networks", relay.trusted_networks, "may relay through us"),
    ]
    if auth.skip_for_local_network:
        groups.append(
            (
                "general.smtp_auth.local_networks",
                auth.local_networks,
                "may relay without AUTH (skip_for_local_network)",
            )
        )
    for key, networks, what in groups:
        for i, net in enumerate(networks):
            where = f"{key}[{i}]"
            if net.prefixlen == 0:
                yield Finding(
                    "error",
                    where,
                    f"{net} is every address on the Internet: anyone {what}, an open relay",
                )
            elif net.prefixlen < (WIDE_V4 if net.version == 4 else WIDE_V6):
                yield Finding(
                    "warning",
                    where,
                    f"{net} holds {net.num_addresses:,} addresses, all of which {what}; "
                    "is it really that wide?",
                )


# ---------------------------------------------------------------------------
# Black and white lists


def _rule_key(i: int, rule: ListRule) -> str:
    return f'"{rule.name}" (security.lists[{i}])'


def _covering_keys(criterion: str, entry: str) -> tuple[str, ...]:
    """The entries whose matches include every value ``entry`` matches,
    ``entry`` itself first (names and addresses; networks are separate)."""
    if criterion in ("client_hostname", "helo"):
        return parent_domains(entry)
    if entry == "<>" or entry.endswith("@"):
        return (entry,)
    if "@" in entry:
        local, _, domain = entry.rpartition("@")
        return (entry, *parent_domains(domain), local + "@")
    return parent_domains(entry)


@attrs.frozen
class _Entry:
    rule: int
    criterion: str
    index: int
    value: str


class _Index:
    """Entries of one list colour: a dict per criterion (names and
    addresses), a :class:`NetworkTable` for client networks."""

    def __init__(self, rules: Sequence[ListRule], ordinals: Sequence[int]) -> None:
        self.by_key: dict[str, dict[str, list[int]]] = {c: {} for c in CRITERIA}
        for i in ordinals:
            rule = rules[i]
            for c in CRITERIA[1:]:
                table = self.by_key[c]
                for value in getattr(rule, c):
                    table.setdefault(value, []).append(i)
        self.networks = NetworkTable((net, i) for i in ordinals for net in rules[i].client)

    def covering(self, criterion: str, value: str | IPNetwork) -> Iterator[tuple[str, int]]:
        """``(entry, rule)`` for every entry of this colour that covers ``value``."""
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            for net, i in self.networks.matches(value.network_address):
                if net.prefixlen <= value.prefixlen:
                    yield str(net), i
            return
        table = self.by_key[criterion]
        for key in _covering_keys(criterion, value):
            for i in table.get(key, ()):
                yield key, i


def _entries(rules: Sequence[ListRule], i: int) -> Iterator[tuple[str, int, str | IPNetwork]]:
    rule = rules[i]
    for c in rule.criteria():
        for j, value in enumerate(getattr(rule, c)):
            yield c, j, value


def _lists(settings: Settings) -> Iterator[Finding]:
    rules = settings.security.lists
    white_ids = [i for i, r in enumerate(rules) if r.list == "white"]
    black_ids = [i for i, r in enumerate(rules) if r.list == "black"]
    white = _Index(rules, white_ids)
    black = _Index(rules, black_ids)
    single = [len(r.criteria()) == 1 for r in rules]
    local = frozenset(settings.general.local_domains)
    inbound = frozenset(settings.relay.inbound_domains)
    # names that are, or contain, a local or inbound domain
    ours = {p for d in local | inbound for p in parent_domains(d)}

    signatures: dict[tuple[object, ...], int] = {}
    for i, rule in enumerate(rules):
        where_rule = f"security.lists[{i}]"
        own = white if rule.list == "white" else black
        first = rule.criteria()[0] if rule.criteria() else None
        if rule.text is not None and (rule.list == "white" or rule.action == "discard"):
            kind = "a white rule never replies" if rule.list == "white" else "a discard accepts"
            yield Finding(
                "warning", f"{where_rule}.text", f'(rule "{rule.name}") has no effect: {kind}'
            )
        seen: set[tuple[str, str]] = set()
        for c, j, value in _entries(rules, i):
            where = f"security.lists[{i}].{c}[{j}]"
            shown = f'"{value}"'
            if (c, str(value)) in seen:
                yield Finding("warning", where, f"{shown} is listed twice in this rule")
                continue
            seen.add((c, str(value)))
            hits = list(own.covering(c, value))
            # redundant: another entry of this same rule covers it
            inside = [key for key, k in hits if k == i and key != str(value)]
            if inside:
                yield Finding(
                    "warning",
                    where,
                    f'{shown} is redundant: "{inside[0]}" in the same rule already covers it',
                )
            # shadowed: an earlier single-criterion rule of this colour decides first
            if c == first:
                earlier = [
                    (key, k)
                    for key, k in hits
                    if k < i and single[k] and (c == "client" or key == str(value))
                ]
                if earlier:
                    key, k = earlier[0]
                    same = "lists the same entry" if key == str(value) else f'lists "{key}"'
                    yield Finding(
                        "warning",
                        where,
                        f"{shown} never decides: the earlier rule {_rule_key(k, rules[k])} "
                        f"{same} and wins",
                    )
            # black and white: a white match skips every black rule
            if rule.list == "black":
                allowed = [(key, k) for key, k in white.covering(c, value) if single[k]]
                if allowed:
                    key, k = allowed[0]
                    how = (
                        "also allows it"
                        if key == str(value)
                        else f'allows "{key}", which covers it,'
                    )
                    yield Finding(
                        "warning",
                        where,
                        f"{shown} is black, but white rule {_rule_key(k, rules[k])} {how} "
                        "before black rules are consulted: this entry never applies",
                    )
            # a white recipient outside our domains: relay control refuses
            # untrusted clients before any list is consulted
            if rule.list == "white" and c == "recipient" and isinstance(value, str):
                domain = value.rpartition("@")[2]
                under_inbound = any(p in inbound for p in parent_domains(domain))
                # a domain entry also matches the subdomains that are ours
                covers_ours = "@" not in value and domain in ours
                if domain and not (domain in local or under_inbound or covers_ours):
                    yield Finding(
                        "warning",
                        where,
                        f"{shown} is outside general.local_domains and "
                        "relay.inbound_domains: mail to it from untrusted clients is "
                        "refused as relaying before white lists are consulted",
                    )
        if len(rule.criteria()) > 1:
            signature = (rule.list, *(frozenset(map(str, getattr(rule, c))) for c in CRITERIA))
            k = signatures.setdefault(signature, i)
            if k != i:
                yield Finding(
                    "warning",
                    where_rule,
                    f'(rule "{rule.name}") never matches: the earlier rule '
                    f"{_rule_key(k, rules[k])} has the same criteria and entries",
                )


# ---------------------------------------------------------------------------
# Settings with no effect


def _clear_credentials(key: str, host: RelayHost) -> Iterator[Finding]:
    if host.username is not None and host.security in ("none", "may"):
        yield Finding(
            "warning",
            f"{key}.security",
            f'is "{host.security}" with username {host.username!r}: the password could '
            'cross the network in clear; use "verify" or "tls"',
        )


def _no_effect(settings: Settings) -> Iterator[Finding]:
    g = settings.general
    auth = g.smtp_auth
    delivery = settings.delivery
    accounts = settings.accounts
    local = frozenset(g.local_domains)

    if delivery.relay_host is not None:
        if delivery.mode == "direct":
            yield Finding(
                "warning",
                "delivery.relay_host",
                'has no effect: delivery.mode is "direct" (exceptions name their own host)',
            )
        yield from _clear_credentials("delivery.relay_host", delivery.relay_host)
    for i, exc in enumerate(delivery.exceptions):
        key = f"delivery.exceptions[{i}]"
        yield from _clear_credentials(key, exc.relay_host)
        if exc.match != "recipient":
            continue
        for j, target in enumerate(exc.targets):
            domain = target.rpartition("@")[2]
            if domain in local:
                yield Finding(
                    "warning",
                    f"{key}.targets[{j}]",
                    f'"{target}" is in general.local_domains: mail to it is delivered '
                    "here, never through this exception",
                )

    tls = bool(settings.server.tls_cert)
    if accounts and not auth.enabled:
        yield Finding(
            "warning",
            "accounts",
            "have no effect: general.smtp_auth.enabled is false (no AUTH, no sender "
            "ownership checks)",
        )
    elif accounts and auth.no_plaintext_without_tls and not tls:
        yield Finding(
            "warning",
            "general.smtp_auth.no_plaintext_without_tls",
            "AUTH is offered only under TLS, and server.tls_cert is not set: no client "
            "can ever log in",
        )
    accounts_on = auth.enabled and bool(accounts)
    owners = [a for a in accounts if a.addresses]
    if auth.sender_must_match_login:
        if not accounts_on:
            yield Finding(
                "warning",
                "general.smtp_auth.sender_must_match_login",
                "has no effect without accounts (and AUTH enabled)",
            )
        else:
            for a in accounts:
                if not a.addresses:
                    yield Finding(
                        "warning",
                        f"accounts.{a.name}.addresses",
                        "is empty: with sender_must_match_login this account may send "
                        "from no address at all",
                    )
    if settings.security.sender_policy.reject_unauthenticated_local_sender and not owners:
        yield Finding(
            "warning",
            "security.sender_policy.reject_unauthenticated_local_sender",
            "has no effect: no account owns an address"
            if accounts_on
            else "has no effect without accounts (and AUTH enabled)",
        )
    if g.external_postmasters and not local:
        yield Finding(
            "warning",
            "general.external_postmasters",
            "has no effect: there are no general.local_domains to take postmaster mail for",
        )
    for i, domain in enumerate(settings.relay.inbound_domains):
        if domain in local:
            yield Finding(
                "warning",
                f"relay.inbound_domains[{i}]",
                f'"{domain}" is also a local domain: its mail is delivered here; this entry '
                "only covers its subdomains",
            )
    if 0 < g.max_message_size_mb <= g.max_attachment_size_mb:
        yield Finding(
            "warning",
            "general.max_attachment_size_mb",
            f"has no effect: a message over max_message_size_mb ({g.max_message_size_mb}) "
            "is refused before its attachments are looked at",
        )
