"""The pure policy core, rule by rule (SETTINGS.md sections 1-5, Postfix 3.7).

Every test builds a policy from policy-file keys, a session and an envelope,
answers the DNS questions ``decide`` asks from a fake zone and checks
the verdict: action, reply (code, enhanced code, text) and the deciding rule
(its settings key path). Tests marked ``xfail(strict=True)`` document
disagreements with Postfix found while reviewing the core; each names the
Postfix source that decides.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import attrs
import pytest
from helpers_core import (
    HOSTNAME,
    NODATA,
    NXDOMAIN,
    OUTSIDER,
    OUTSIDER_HELO,
    SERVFAIL,
    TIMEOUT,
    Zone,
    account,
    answer,
    eod,
    judge,
    make_policy,
    q,
    rcpt,
    resolve,
    session,
    standard_zone,
)

import mailpolicy.rules
from mailpolicy import (
    Action,
    Counters,
    DnsResult,
    Envelope,
    MessageFacts,
    Policy,
    Reply,
    Settings,
    Stage,
    Verdict,
    evaluate,
)
from mailpolicy.evaluate import lookups
from mailpolicy.policy import TABLE
from mailpolicy.settings import MIB

ACCEPTED = Verdict(Action.ACCEPT)


def expect(
    v: Verdict,
    code: int,
    enhanced: str,
    text: str,
    rule: str,
    action: Action | None = None,
) -> None:
    """The verdict refuses with exactly this reply, decided by ``rule``.

    A refusal with a 4xx code is a DEFER, with a 5xx code a REJECT, unless
    ``action`` says otherwise (DEFER_IF_PERMIT).
    """
    if action is None:
        action = Action.DEFER if code < 500 else Action.REJECT
    assert v.reply == Reply(code, enhanced, text), v.explain()
    assert v.rule == rule, v.explain()
    assert v.action is action, v.explain()
    assert v.action.refuses and not v.accepted


def accepted(v: Verdict) -> None:
    """A plain acceptance that no rule decided."""
    assert v == ACCEPTED, v.explain()


# ===========================================================================
# The table: which rules a policy runs, in which order


ALL_ON: dict[str, Any] = {
    "general": {
        "max_recipients": 3,
        "max_hops": 10,
        "max_message_size_mb": 1,
        "max_attachment_size_mb": 1,
        "disable_auto_forwarding": True,
        "smtp_auth": {"enabled": True, "sender_must_match_login": True},
    },
    "relay": {"trusted_networks": ["198.18.0.0/15"]},
    "security": {
        "lists": [
            {"name": "vip", "list": "white", "sender": ["vip.example"]},
            {"name": "spammers", "list": "black", "sender": ["spam.example"]},
        ],
        "sender_policy": {
            "reject_non_fqdn_sender": True,
            "reject_unknown_sender_domain": True,
            "reject_unauthenticated_local_sender": True,
        },
        "connection_policy": {
            "reject_unknown_reverse_client_hostname": True,
            "reject_unknown_client_hostname": True,
            "max_connections_per_client": 5,
            "max_connection_rate_per_client": 10,
            "max_message_rate_per_client": 10,
            "max_recipient_rate_per_client": 10,
            "max_message_rate_per_user": 10,
            "max_recipient_rate_per_user": 10,
            "max_message_rate_per_sender_domain": 10,
            "max_recipient_rate_per_recipient_domain": 10,
            "max_message_rate_global": 10,
            "max_recipient_rate_global": 10,
        },
        "advanced": {
            "require_helo": True,
            "reject_invalid_helo": True,
            "reject_non_fqdn_helo": True,
            "reject_unknown_helo": True,
            "reject_unauth_pipelining": True,
            "reject_non_fqdn_recipient": True,
            "reject_unknown_recipient_domain": True,
            "disable_vrfy": True,
            "dnsbl": ["bl.example"],
        },
    },
}

ALL_OFF: dict[str, Any] = {
    "general": {
        "max_recipients": 0,
        "max_message_size_mb": 0,
        "smtp_auth": {"enabled": False},
    },
    "security": {
        "connection_policy": {"max_connections_per_client": 0},
        "advanced": {"disable_vrfy": False},
    },
}

#: SETTINGS.md section 5, and the stage of every other check, as (chain, class, key).
ALL_ON_ORDER: dict[Stage, list[tuple[str, str, str]]] = {
    Stage.CONNECT: [
        ("limits", "MaxConnections", "security.connection_policy.max_connections_per_client"),
        (
            "limits",
            "MaxConnectionRate",
            "security.connection_policy.max_connection_rate_per_client",
        ),
    ],
    Stage.HELO: [],
    Stage.MAIL: [
        ("mail", "RequireHelo", "security.advanced.require_helo"),
        ("mail", "MaxMessageSize", "general.max_message_size_mb"),
        ("mail", "MaxMessageRate", "security.connection_policy.max_message_rate_per_client"),
        ("mail", "MaxUserMessageRate", "security.connection_policy.max_message_rate_per_user"),
        (
            "mail",
            "MaxSenderDomainRate",
            "security.connection_policy.max_message_rate_per_sender_domain",
        ),
        ("mail", "MaxGlobalMessageRate", "security.connection_policy.max_message_rate_global"),
    ],
    Stage.RCPT: [
        ("limits", "MaxRecipients", "general.max_recipients"),
        (
            "limits",
            "MaxRecipientRate",
            "security.connection_policy.max_recipient_rate_per_client",
        ),
        (
            "limits",
            "MaxUserRecipientRate",
            "security.connection_policy.max_recipient_rate_per_user",
        ),
        (
            "limits",
            "MaxRecipientDomainRate",
            "security.connection_policy.max_recipient_rate_per_recipient_domain",
        ),
        (
            "limits",
            "MaxGlobalRecipientRate",
            "security.connection_policy.max_recipient_rate_global",
        ),
        ("postmaster", "AcceptBarePostmaster", "rfc5321.postmaster"),
        (
            "sender_ownership",
            "SenderMustMatchLogin",
            "general.smtp_auth.sender_must_match_login",
        ),
        (
            "sender_ownership",
            "RejectUnauthenticatedLocalSender",
            "security.sender_policy.reject_unauthenticated_local_sender",
        ),
        ("relay", "PermitMynetworks", "relay.trusted_networks"),
        ("relay", "PermitAuthenticated", "general.smtp_auth.enabled"),
        ("relay", "RejectUnauthDestination", "relay.reject_unauth_destination"),
        ("checks", "WhiteList", "security.lists"),
        ("checks", "BlackList", "security.lists"),
        ("checks", "PermitMynetworks", "relay.trusted_networks"),
        ("checks", "PermitAuthenticated", "general.smtp_auth.enabled"),
        ("checks", "RejectRblClient", "security.advanced.dnsbl.bl.example"),
        (
            "checks",
            "RejectUnknownReverseClientHostname",
            "security.connection_policy.reject_unknown_reverse_client_hostname",
        ),
        (
            "checks",
            "RejectUnknownClientHostname",
            "security.connection_policy.reject_unknown_client_hostname",
        ),
        ("checks", "RejectInvalidHelo", "security.advanced.reject_invalid_helo"),
        ("checks", "RejectNonFqdnHelo", "security.advanced.reject_non_fqdn_helo"),
        ("checks", "RejectUnknownHelo", "security.advanced.reject_unknown_helo"),
        ("checks", "RejectNonFqdnSender", "security.sender_policy.reject_non_fqdn_sender"),
        (
            "checks",
            "RejectUnknownSenderDomain",
            "security.sender_policy.reject_unknown_sender_domain",
        ),
        ("checks", "RejectNonFqdnRecipient", "security.advanced.reject_non_fqdn_recipient"),
        (
            "checks",
            "RejectUnknownRecipientDomain",
            "security.advanced.reject_unknown_recipient_domain",
        ),
    ],
    Stage.DATA: [
        ("data", "RejectUnauthPipelining", "security.advanced.reject_unauth_pipelining"),
    ],
    Stage.END_OF_DATA: [
        ("message", "MaxMessageSize", "general.max_message_size_mb"),
        ("message", "MaxHops", "general.max_hops"),
        ("message", "MaxAttachmentSize", "general.max_attachment_size_mb"),
        ("message", "DisableAutoForwarding", "general.disable_auto_forwarding"),
    ],
    Stage.VRFY: [("vrfy", "DisableVrfy", "security.advanced.disable_vrfy")],
}


def _rules(policy: Policy, stage: Stage) -> list[tuple[str, str, str]]:
    return [(chain, type(rule).__name__, rule.name) for chain, rule in policy.rules(stage)]


def all_on_policy() -> Policy:
    return make_policy(ALL_ON, accounts=[account("alice", "alice@example.com")])


class TestTable:
    @pytest.mark.parametrize("stage", list(Stage))
    def test_every_setting_on_gives_the_documented_order(self, stage: Stage) -> None:
        assert _rules(all_on_policy(), stage) == ALL_ON_ORDER[stage]

    def test_every_row_of_the_table_is_covered(self) -> None:
        # With every setting on, each row of TABLE yields exactly one rule
        # (one DNSBL zone), so the snapshot above covers the whole table.
        policy = all_on_policy()
        assert sum(len(list(policy.rules(s))) for s in Stage) == len(TABLE)

    def test_every_setting_off_leaves_only_the_unconditional_rules(self) -> None:
        policy = make_policy(ALL_OFF)
        by_stage = {s: _rules(policy, s) for s in Stage}
        assert by_stage[Stage.RCPT] == [
            ("postmaster", "AcceptBarePostmaster", "rfc5321.postmaster"),
            ("relay", "PermitMynetworks", "relay.trusted_networks"),
            ("relay", "RejectUnauthDestination", "relay.reject_unauth_destination"),
            ("checks", "PermitMynetworks", "relay.trusted_networks"),
        ]
        # max_hops has no "unlimited" value in the policy file
        assert by_stage[Stage.END_OF_DATA] == [("message", "MaxHops", "general.max_hops")]
        others = (Stage.RCPT, Stage.END_OF_DATA)
        assert all(not rules for s, rules in by_stage.items() if s not in others)

    def test_sender_ownership_needs_accounts_and_auth(self) -> None:
        on = {
            "general": {"smtp_auth": {"sender_must_match_login": True}},
            "security": {"sender_policy": {"reject_unauthenticated_local_sender": True}},
        }
        without_accounts = _rules(make_policy(on), Stage.RCPT)
        assert not [r for r in without_accounts if r[0] == "sender_ownership"]
        auth_off = {
            "general": {"smtp_auth": {"enabled": False, "sender_must_match_login": True}},
            "security": on["security"],
        }
        policy = make_policy(auth_off, accounts=[account("a", "a@example.com")])
        assert not [r for r in _rules(policy, Stage.RCPT) if r[0] == "sender_ownership"]
        policy = make_policy(on, accounts=[account("a", "a@example.com")])
        assert [r[2] for r in _rules(policy, Stage.RCPT) if r[0] == "sender_ownership"] == [
            "general.smtp_auth.sender_must_match_login",
            "security.sender_policy.reject_unauthenticated_local_sender",
        ]

    def test_every_rule_class_is_in_the_snapshot(self) -> None:
        """A new rule class must be added to the table and to these tests."""
        classes: set[str] = set()
        for info in pkgutil.iter_modules(mailpolicy.rules.__path__):
            module = importlib.import_module(f"mailpolicy.rules.{info.name}")
            for name, obj in inspect.getmembers(module, inspect.isclass):
                # private bases (shared logic of a family of rules) are not rules
                if (
                    obj.__module__ == module.__name__
                    and callable(getattr(obj, "check", None))
                    and not name.startswith("_")
                ):
                    classes.add(name)
        snapshot = {cls for rows in ALL_ON_ORDER.values() for _, cls, _ in rows}
        assert classes == snapshot

    def test_rule_names_are_settings_key_paths(self) -> None:
        settings = Settings()
        for stage in Stage:
            for _, _, name in ALL_ON_ORDER[stage]:
                # the two rules that no setting turns on or off
                if name in ("rfc5321.postmaster", "relay.reject_unauth_destination"):
                    continue
                # a blocklist rule is named by its setting plus its zone
                if name.startswith("security.advanced.dnsbl."):
                    name = "security.advanced.dnsbl"
                obj: Any = settings
                for part in name.split("."):
                    assert hasattr(obj, part), f"{name}: no setting {part!r}"
                    obj = getattr(obj, part)


# ===========================================================================
# Relay control (settings section 3)


RELAY_DENIED = "relay.reject_unauth_destination"


class TestRelay:
    def test_foreign_recipient_is_refused(self) -> None:
        v = judge(make_policy(), rcpt("r@elsewhere.example"))
        expect(v, 554, "5.7.1", "<r@elsewhere.example>: Relay access denied", RELAY_DENIED)
        assert v.evidence[0].kind == "recipient"
        assert v.evidence[0].matched == "destination elsewhere.example"

    @pytest.mark.parametrize(
        "recipient",
        [
            "r@example.com",
            "R@EXAMPLE.COM",
            "r@example.com.",
            "r@partner.example",
            "r@mx.partner.example",  # inbound domains cover their subdomains
            "r@PARTNER.EXAMPLE.",
            # recorded against Postfix (conformance_extra/relay_tricks): the
            # operator is peeled off with our domain, nothing routed is left
            "r%partner.example@example.com",
            "@elsewhere.example:r@example.com",
            '"r x"@example.com',
        ],
    )
    def test_local_and_inbound_domains_are_accepted(self, recipient: str) -> None:
        policy = make_policy({"relay": {"inbound_domains": ["partner.example"]}})
        accepted(judge(policy, rcpt(recipient)))

    @pytest.mark.parametrize(
        "recipient", ["r@sub.example.com", "r@example.com.evil.example", "r@xpartner.example"]
    )
    def test_local_domains_are_exact_and_suffixes_do_not_match(self, recipient: str) -> None:
        policy = make_policy({"relay": {"inbound_domains": ["partner.example"]}})
        assert judge(policy, rcpt(recipient)).rule == RELAY_DENIED

    @pytest.mark.parametrize(
        ("code", "enhanced", "action"),
        [(450, "4.7.1", Action.DEFER), (550, "5.7.1", Action.REJECT)],
    )
    def test_relay_denied_code_follows_replies(
        self, code: int, enhanced: str, action: Action
    ) -> None:
        policy = make_policy({"replies": {"relay_denied": code}})
        v = judge(policy, rcpt("r@elsewhere.example"))
        expect(
            v, code, enhanced, "<r@elsewhere.example>: Relay access denied", RELAY_DENIED, action
        )

    def test_trusted_network_relays(self) -> None:
        policy = make_policy({"relay": {"trusted_networks": ["203.0.113.0/24"]}})
        accepted(judge(policy, rcpt("r@elsewhere.example")))

    def test_trusted_ipv6_network_relays(self) -> None:
        policy = make_policy({"relay": {"trusted_networks": ["2001:db8::/32"]}})
        accepted(judge(policy, rcpt("r@elsewhere.example"), session("2001:db8::10")))

    def test_local_network_relays_when_it_skips_auth(self) -> None:
        policy = make_policy({"general": {"smtp_auth": {"local_networks": ["192.0.2.0/28"]}}})
        accepted(judge(policy, rcpt("r@elsewhere.example"), session("192.0.2.10")))

    def test_local_network_must_authenticate_when_it_does_not_skip(self) -> None:
        policy = make_policy(
            {
                "general": {
                    "smtp_auth": {
                        "skip_for_local_network": False,
                        "local_networks": ["192.0.2.0/28"],
                    }
                }
            }
        )
        lan = session("192.0.2.10")
        assert judge(policy, rcpt("r@elsewhere.example"), lan).rule == RELAY_DENIED
        accepted(judge(policy, rcpt("r@example.com"), lan))
        accepted(judge(policy, rcpt("r@elsewhere.example"), session("192.0.2.10", auth_user="u")))

    def test_default_local_networks_are_loopback(self) -> None:
        accepted(judge(make_policy(), rcpt("r@elsewhere.example"), session("127.0.0.1")))
        accepted(judge(make_policy(), rcpt("r@elsewhere.example"), session("::1")))

    def test_authenticated_client_relays(self) -> None:
        v = judge(make_policy(), rcpt("r@elsewhere.example"), session(auth_user="alice"))
        accepted(v)

    def test_auth_disabled_means_no_authenticated_relay(self) -> None:
        policy = make_policy({"general": {"smtp_auth": {"enabled": False}}})
        v = judge(policy, rcpt("r@elsewhere.example"), session(auth_user="alice"))
        assert v.rule == RELAY_DENIED

    @pytest.mark.parametrize(
        "recipient",
        [
            "u%elsewhere.example@example.com",
            "u%elsewhere.example%example.com@example.com",
            "U%ELSEWHERE.EXAMPLE.@EXAMPLE.COM.",
            '"u@elsewhere.example"@example.com',
            '"u%elsewhere.example"@example.com',
            "elsewhere.example!u@example.com",
            "@example.com:u@elsewhere.example",
            "@example.com,@partner.example:u@elsewhere.example",
            "u@[192.0.2.1]",
            "u@[IPv6:2001:db8::1]",
            '"u@[192.0.2.1]"@example.com',
            # routing operators left in an inbound-relay address keep the
            # relay closed (Postfix's allow_untrusted_routing = no)
            "u%elsewhere.example@partner.example",
            '"u@elsewhere.example"@partner.example',
            "elsewhere.example!u@partner.example",
            "u%example.com@partner.example",
        ],
    )
    def test_relay_tricks_never_open_the_relay(self, recipient: str) -> None:
        policy = make_policy({"relay": {"inbound_domains": ["partner.example"]}})
        v = judge(policy, rcpt(recipient))
        assert v.rule == RELAY_DENIED, v.explain()
        assert v.reply is not None and v.reply.code == 554

    def test_routing_through_our_own_domains_is_followed(self) -> None:
        policy = make_policy({"general": {"local_domains": ["example.com", "example.net"]}})
        accepted(judge(policy, rcpt("u%example.net@example.com")))
        accepted(judge(policy, rcpt('"u@example.net"@example.com')))
        accepted(judge(policy, rcpt("example.net!u@example.com")))

    def test_unqualified_recipient_is_ours_only_when_our_hostname_is_local(self) -> None:
        refused = judge(make_policy(), rcpt("u"))
        expect(refused, 554, "5.7.1", "<u>: Relay access denied", RELAY_DENIED)
        policy = make_policy({"general": {"local_domains": ["example.com", HOSTNAME]}})
        accepted(judge(policy, rcpt("u")))
        assert judge(policy, rcpt("u%elsewhere.example")).rule == RELAY_DENIED

    def test_deeply_nested_percent_hack_is_refused(self) -> None:
        # u%elsewhere.example%example.com...(16 times)@example.com: after 16
        # unwraps the domain is still example.com and "u%elsewhere.example" is
        # left. Postfix's resolve_addr() loops up to strlen(addr)+100 times and
        # ends at elsewhere.example; permit_auth_destination() then refuses.
        recipient = "u%elsewhere.example" + "%example.com" * 16 + "@example.com"
        v = judge(make_policy(), rcpt(recipient))
        assert v.rule == RELAY_DENIED, v.explain()

    @pytest.mark.parametrize(
        "recipient",
        [
            "a b@elsewhere.example",  # Postfix's internal (unquoted) form of "a b"@...
            "u@elsewhere.example>",
            "<u@elsewhere.example",
        ],
    )
    def test_unparsable_recipient_is_never_accepted(self, recipient: str) -> None:
        v = judge(make_policy(), rcpt(recipient))
        assert not v.accepted, v.explain()


# ===========================================================================
# Black and white lists (settings section 4.1)


def lists_policy(*rules: dict[str, Any], **extra: Any) -> Policy:
    return make_policy({"security": {"lists": list(rules), **extra}})


SPAMMERS = {
    "name": "spammers",
    "list": "black",
    "sender": ["spam.example", "bob@known.example", "baduser@"],
}


class TestBlackList:
    @pytest.mark.parametrize(
        ("sender", "key"),
        [
            ("a@spam.example", "spam.example"),
            ("a@sub.spam.example", "spam.example"),  # subdomains match
            ("a@deep.sub.spam.example", "spam.example"),
            ("bob@known.example", "bob@known.example"),
            ("baduser@vip.example", "baduser@"),  # user@ at any domain
        ],
    )
    def test_sender(self, sender: str, key: str) -> None:
        v = judge(lists_policy(SPAMMERS), rcpt("r@example.com", sender=sender))
        text = f"<{sender}>: Sender address rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.spammers")
        assert v.evidence[0].kind == "sender"
        assert v.evidence[0].value == sender
        assert v.evidence[0].matched == key

    @pytest.mark.parametrize(
        "sender",
        [
            "alice@known.example",
            "a@notspam.example",  # a suffix that is not a parent domain
            "a@spam.example.org",
            "gooduser@vip.example",
            "baduser2@vip.example",
            "",  # null sender: only <> matches it
        ],
    )
    def test_sender_silent(self, sender: str) -> None:
        accepted(judge(lists_policy(SPAMMERS), rcpt("r@example.com", sender=sender)))

    def test_lookups_ignore_case(self) -> None:
        v = judge(lists_policy(SPAMMERS), rcpt("r@example.com", sender="BadUser@Sub.SPAM.Example."))
        assert v.rule == "security.lists.spammers"
        assert v.evidence[0].matched == "spam.example"

    def test_null_sender_key(self) -> None:
        policy = lists_policy({"name": "bounces", "list": "black", "sender": ["<>"]})
        v = judge(policy, rcpt("r@example.com", sender=""))
        expect(
            v, 554, "5.7.1", "<>: Sender address rejected: Access denied", "security.lists.bounces"
        )
        accepted(judge(policy, rcpt("r@example.com", sender="a@known.example")))

    def test_recipient(self) -> None:
        policy = lists_policy({"name": "r", "list": "black", "recipient": ["ceo@example.com"]})
        v = judge(policy, rcpt("ceo@example.com"))
        text = "<ceo@example.com>: Recipient address rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.r")
        accepted(judge(policy, rcpt("r@example.com")))

    def test_helo_matches_parent_domains(self) -> None:
        policy = lists_policy({"name": "h", "list": "black", "helo": ["example.org"]})
        v = judge(policy, rcpt("r@example.com"))
        text = "<outside.example.org>: Helo command rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.h")
        accepted(judge(policy, rcpt("r@example.com"), session(helo="mail.example.net")))
        accepted(judge(policy, rcpt("r@example.com"), session(helo=None)))

    def test_helo_is_looked_up_as_sent(self) -> None:
        policy = lists_policy({"name": "h", "list": "black", "helo": ["outside.example.org"]})
        v = judge(policy, rcpt("r@example.com"), session(helo="Outside.Example.ORG"))
        text = "<Outside.Example.ORG>: Helo command rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.h")
        # unlike an address's domain, a HELO name keeps its trailing dot in
        # Postfix's lookup, and then matches no entry
        accepted(judge(policy, rcpt("r@example.com"), session(helo="outside.example.org.")))

    def test_addresses_are_echoed_as_written(self) -> None:
        policy = lists_policy(
            {"name": "s", "list": "black", "sender": ["spam.example"]},
            {"name": "r", "list": "black", "recipient": ["ceo@example.com"]},
        )
        v = judge(policy, rcpt("r@example.com", sender='"John Doe"@Spam.Example.'))
        text = "<John Doe@Spam.Example.>: Sender address rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.s")
        v = judge(policy, rcpt("CEO@Example.COM."))
        text = "<CEO@Example.COM.>: Recipient address rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.r")

    def test_client_cidr_v4_names_the_verified_client(self) -> None:
        policy = lists_policy({"name": "net", "list": "black", "client": ["203.0.113.0/24"]})
        v = judge(policy, rcpt("r@example.com"))
        text = "<outside.example.org[203.0.113.5]>: Client host rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.net")
        assert v.evidence[0].matched == "203.0.113.0/24"
        accepted(judge(policy, rcpt("r@example.com"), session("198.51.100.7")))

    def test_client_cidr_v6(self) -> None:
        policy = lists_policy({"name": "v6", "list": "black", "client": ["2001:db8::/32"]})
        v = judge(policy, rcpt("r@example.com"), session("2001:db8::10"))
        text = "<v6.example.com[2001:db8::10]>: Client host rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.v6")
        accepted(judge(policy, rcpt("r@example.com"), session("2001:db9::10")))

    def test_client_without_verified_name_is_unknown(self) -> None:
        policy = lists_policy({"name": "net", "list": "black", "client": ["198.51.100.0/24"]})
        v = judge(policy, rcpt("r@example.com"), session("198.51.100.7"))
        text = "<unknown[198.51.100.7]>: Client host rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.net")

    def test_client_hostname_needs_a_verified_name(self) -> None:
        policy = lists_policy({"name": "hn", "list": "black", "client_hostname": ["example.org"]})
        v = judge(policy, rcpt("r@example.com"))
        text = "<outside.example.org[203.0.113.5]>: Client host rejected: Access denied"
        expect(v, 554, "5.7.1", text, "security.lists.hn")
        # the PTR name exists but does not lead back to the client: unverified
        forged = standard_zone().set(OUTSIDER_HELO, "A", answer("198.51.100.99"))
        accepted(judge(policy, rcpt("r@example.com"), zone=forged))

    def test_own_text(self) -> None:
        rule = {"name": "t", "list": "black", "sender": ["spam.example"], "text": "go away"}
        v = judge(lists_policy(rule), rcpt("r@example.com", sender="a@spam.example"))
        expect(
            v,
            554,
            "5.7.1",
            "<a@spam.example>: Sender address rejected: go away",
            "security.lists.t",
        )

    @pytest.mark.parametrize(("code", "enhanced"), [(550, "5.7.1"), (450, "4.7.1"), (521, "5.7.1")])
    def test_access_denied_code_follows_replies(self, code: int, enhanced: str) -> None:
        policy = make_policy(
            {"security": {"lists": [SPAMMERS]}, "replies": {"access_denied": code}}
        )
        v = judge(policy, rcpt("r@example.com", sender="a@spam.example"))
        text = "<a@spam.example>: Sender address rejected: Access denied"
        expect(v, code, enhanced, text, "security.lists.spammers")

    def test_discard_accepts_and_names_the_rule(self) -> None:
        rule = {"name": "drop", "list": "black", "action": "discard", "sender": ["spam.example"]}
        v = judge(lists_policy(rule), rcpt("r@example.com", sender="a@spam.example"))
        assert v.action is Action.DISCARD
        assert v.accepted and not v.action.refuses
        assert v.reply is None
        assert v.rule == "security.lists.drop"
        assert v.evidence[0].matched == "spam.example"

    def test_discard_never_opens_the_relay(self) -> None:
        rule = {"name": "drop", "list": "black", "action": "discard", "sender": ["spam.example"]}
        v = judge(lists_policy(rule), rcpt("r@elsewhere.example", sender="a@spam.example"))
        assert v.rule == RELAY_DENIED

    def test_multi_criteria_rule_needs_every_criterion(self) -> None:
        rule = {
            "name": "combo",
            "list": "black",
            "sender": ["spam.example"],
            "recipient": ["ceo@example.com"],
        }
        policy = lists_policy(rule)
        assert judge(policy, rcpt("ceo@example.com", sender="a@spam.example")).rule == (
            "security.lists.combo"
        )
        accepted(judge(policy, rcpt("ceo@example.com", sender="a@known.example")))
        accepted(judge(policy, rcpt("r@example.com", sender="a@spam.example")))

    def test_multi_criteria_with_client_and_helo(self) -> None:
        rule = {"name": "c", "list": "black", "client": ["203.0.113.0/24"], "helo": ["bad.example"]}
        policy = lists_policy(rule)
        accepted(judge(policy, rcpt("r@example.com")))
        v = judge(policy, rcpt("r@example.com"), session(helo="x.bad.example"))
        assert v.rule == "security.lists.c"

    def test_first_matching_rule_wins_for_one_key(self) -> None:
        first = {"name": "first", "list": "black", "sender": ["spam.example"], "text": "one"}
        second = {"name": "second", "list": "black", "sender": ["spam.example"], "text": "two"}
        v = judge(lists_policy(first, second), rcpt("r@example.com", sender="a@spam.example"))
        assert v.rule == "security.lists.first"
        v = judge(lists_policy(second, first), rcpt("r@example.com", sender="a@spam.example"))
        assert v.rule == "security.lists.second"

    def test_most_specific_key_wins_within_a_criterion(self) -> None:
        # Postfix's access-map lookup order: full address, domain, parents, user@
        by_domain = {"name": "domain", "list": "black", "sender": ["spam.example"]}
        by_user = {"name": "user", "list": "black", "sender": ["bob@"]}
        by_address = {"name": "address", "list": "black", "sender": ["bob@spam.example"]}
        policy = lists_policy(by_user, by_domain, by_address)
        assert judge(policy, rcpt("r@example.com", sender="bob@spam.example")).rule == (
            "security.lists.address"
        )
        assert judge(policy, rcpt("r@example.com", sender="bob@sub.spam.example")).rule == (
            "security.lists.domain"
        )
        assert judge(policy, rcpt("r@example.com", sender="bob@known.example")).rule == (
            "security.lists.user"
        )

    def test_helo_access_is_consulted_before_sender_access(self) -> None:
        by_sender = {"name": "s", "list": "black", "sender": ["spam.example"]}
        by_helo = {"name": "h", "list": "black", "helo": ["outside.example.org"]}
        v = judge(lists_policy(by_sender, by_helo), rcpt("r@example.com", sender="a@spam.example"))
        assert v.rule == "security.lists.h"
        assert v.reply is not None and "Helo command rejected" in v.reply.text

    def test_sender_access_is_consulted_before_recipient_access(self) -> None:
        by_rcpt = {"name": "r", "list": "black", "recipient": ["example.com"]}
        by_sender = {"name": "s", "list": "black", "sender": ["spam.example"]}
        v = judge(lists_policy(by_rcpt, by_sender), rcpt("r@example.com", sender="a@spam.example"))
        assert v.rule == "security.lists.s"

    def test_client_network_is_consulted_before_client_hostname(self) -> None:
        # The panel's client lists are two Postfix maps, the cidr map first
        # (shared/oracle/translate.py, which recorded the corpus): a network
        # rule wins over a host-name rule.
        by_net = {"name": "net", "list": "black", "action": "discard", "client": ["203.0.113.0/24"]}
        by_name = {"name": "name", "list": "black", "client_hostname": ["example.org"]}
        v = judge(lists_policy(by_net, by_name), rcpt("r@example.com"))
        assert v.rule == "security.lists.net", v.explain()
        assert v.action is Action.DISCARD

    def test_black_lists_apply_to_trusted_and_authenticated_clients(self) -> None:
        policy = make_policy(
            {
                "relay": {"trusted_networks": ["203.0.113.0/24"]},
                "security": {"lists": [SPAMMERS]},
            }
        )
        env = rcpt("r@elsewhere.example", sender="a@spam.example")
        assert judge(policy, env).rule == "security.lists.spammers"
        env2 = rcpt("r@elsewhere.example", sender="a@spam.example")
        v = judge(lists_policy(SPAMMERS), env2, session(auth_user="alice"))
        assert v.rule == "security.lists.spammers"


class TestWhiteList:
    VIP = {"name": "vip", "list": "white", "sender": ["vip.example", "a@gone.example"]}

    def test_white_skips_black_lists(self) -> None:
        black = {"name": "all", "list": "black", "sender": ["example"]}
        v = judge(lists_policy(self.VIP, black), rcpt("r@example.com", sender="a@vip.example"))
        assert v.action is Action.ACCEPT
        assert v.reply is None
        assert v.rule == "security.lists.vip"
        assert v.evidence[0].matched == "vip.example"
        # not white: the black rule applies
        v = judge(lists_policy(self.VIP, black), rcpt("r@example.com", sender="a@known.example"))
        assert v.rule == "security.lists.all"

    def test_black_listed_before_white_in_the_file_still_loses(self) -> None:
        black = {"name": "all", "list": "black", "sender": ["vip.example"]}
        v = judge(lists_policy(black, self.VIP), rcpt("r@example.com", sender="a@vip.example"))
        assert v.rule == "security.lists.vip" and v.action is Action.ACCEPT

    def test_white_skips_later_checks(self) -> None:
        policy = lists_policy(
            self.VIP,
            sender_policy={"reject_unknown_sender_domain": True},
            connection_policy={"reject_unknown_reverse_client_hostname": True},
        )
        no_ptr = session("192.0.2.12", helo="noptr.example.com")
        v = judge(policy, rcpt("r@example.com", sender="a@gone.example"), no_ptr)
        assert v.action is Action.ACCEPT and v.rule == "security.lists.vip"
        # the same facts without the white entry are refused
        v = judge(policy, rcpt("r@example.com", sender="b@gone.example"), no_ptr)
        assert v.action.refuses

    def test_white_match_needs_no_dns_for_later_checks(self) -> None:
        policy = lists_policy(
            self.VIP,
            advanced={"dnsbl": ["bl.example"], "reject_unknown_helo": True},
            sender_policy={"reject_unknown_sender_domain": True},
        )
        env = rcpt("r@example.com", sender="a@vip.example")
        assert lookups(policy, session(), env) == frozenset()

    def test_white_client_skips_connection_policy(self) -> None:
        policy = lists_policy(
            {"name": "ok", "list": "white", "client": ["192.0.2.12"]},
            connection_policy={"reject_unknown_reverse_client_hostname": True},
        )
        v = judge(policy, rcpt("r@example.com"), session("192.0.2.12"))
        assert v.action is Action.ACCEPT and v.rule == "security.lists.ok"
        assert judge(policy, rcpt("r@example.com"), session("192.0.2.13")).action.refuses

    def test_white_never_opens_the_relay(self) -> None:
        everything = {
            "name": "all",
            "list": "white",
            "client": ["0.0.0.0/0", "::/0"],
            "sender": ["<>", "example", "com", "org"],
        }
        for sender in ("a@vip.example", ""):
            v = judge(lists_policy(everything), rcpt("r@elsewhere.example", sender=sender))
            expect(v, 554, "5.7.1", "<r@elsewhere.example>: Relay access denied", RELAY_DENIED)

    def test_white_recipient(self) -> None:
        policy = lists_policy(
            {"name": "abuse", "list": "white", "recipient": ["abuse@"]},
            {"name": "net", "list": "black", "client": ["203.0.113.0/24"]},
        )
        v = judge(policy, rcpt("abuse@example.com"))
        assert v.action is Action.ACCEPT and v.rule == "security.lists.abuse"
        assert judge(policy, rcpt("r@example.com")).rule == "security.lists.net"


class TestDiscardedTransaction:
    """Once a rule marked the transaction DISCARD, Postfix skips every
    restriction for the rest of it (generic_checks: ``if (state->discard)
    break``), relay control included; smtpd's own checks still apply.
    Recorded in conformance_extra/discard_then_reject."""

    DROP = "security.lists.drop"

    def test_later_recipients_are_discarded_without_any_restriction(self) -> None:
        policy = make_policy(CASCADE_POLICY)
        sess = session(BL_CLIENT, helo="bad_name!")
        env = rcpt("r@elsewhere.example", sender="a@localhost", discard=self.DROP)
        assert lookups(policy, sess, env) == frozenset()
        v = evaluate(policy, sess, env)
        assert v.action is Action.DISCARD and v.accepted
        assert v.reply is None
        assert v.rule == self.DROP
        assert v.evidence[0].matched == self.DROP

    def test_recipient_limit_still_applies(self) -> None:
        policy = make_policy({"general": {"max_recipients": 1}})
        env = rcpt("b@example.com", recipients=["a@example.com"], discard=self.DROP)
        v = evaluate(policy, session(), env)
        expect(v, 452, "4.5.3", "Error: too many recipients", "general.max_recipients")

    def test_data_restrictions_are_skipped(self) -> None:
        policy = make_policy({"security": {"advanced": {"reject_unauth_pipelining": True}}})
        env = Envelope(
            Stage.DATA, sender="a@known.example", recipients=("r@example.com",), discard=self.DROP
        )
        v = evaluate(policy, session(improper_pipelining=True), env)
        assert v.action is Action.DISCARD and v.rule == self.DROP

    def test_message_checks_still_apply(self) -> None:
        policy = make_policy({"general": {"max_message_size_mb": 1}})
        env = Envelope(
            Stage.END_OF_DATA,
            sender="a@known.example",
            recipients=("r@example.com",),
            message=MessageFacts(size=MIB + 1),
            discard=self.DROP,
        )
        assert evaluate(policy, session(), env).rule == SIZE

    def test_first_discard_comes_from_a_black_rule(self) -> None:
        rule = {"name": "drop", "list": "black", "action": "discard", "recipient": ["trap@"]}
        v = judge(lists_policy(rule), rcpt("trap@example.com"))
        assert v.action is Action.DISCARD and v.rule == self.DROP


# ===========================================================================
# Sender ownership (settings 1.1 and 4.2)


ACCOUNTS = [
    account("alice", "alice@example.com", "a.liddell@example.com"),
    account("bob", "bob@example.com"),
    account("carol", "@corp.example"),
]
MUST_MATCH = "general.smtp_auth.sender_must_match_login"
NOT_LOGGED_IN = "security.sender_policy.reject_unauthenticated_local_sender"


def ownership_policy(**extra: Any) -> Policy:
    mapping: dict[str, Any] = {
        "general": {"smtp_auth": {"sender_must_match_login": True}},
        "security": {"sender_policy": {"reject_unauthenticated_local_sender": True}},
    }
    for key, value in extra.items():
        mapping.setdefault(key, {}).update(value)
    return make_policy(mapping, accounts=ACCOUNTS)


class TestSenderMustMatchLogin:
    @pytest.mark.parametrize(
        ("user", "sender"),
        [
            ("bob", "alice@example.com"),
            ("bob", "nobody@example.com"),  # owned by no one: refused too
            ("carol", "x@example.com"),
            ("alice", "a@sub.corp.example"),
        ],
    )
    def test_refused(self, user: str, sender: str) -> None:
        v = judge(ownership_policy(), rcpt("r@example.com", sender=sender), session(auth_user=user))
        text = f"<{sender}>: Sender address rejected: not owned by user {user}"
        expect(v, 553, "5.7.1", text, MUST_MATCH)

    @pytest.mark.parametrize(
        ("user", "sender"),
        [
            ("bob", "bob@example.com"),
            ("bob", "BOB@Example.COM"),
            ("alice", "a.liddell@example.com"),
            ("carol", "anyone@corp.example"),  # @domain owns the domain
            ("bob", ""),  # the null sender is skipped
        ],
    )
    def test_allowed(self, user: str, sender: str) -> None:
        v = judge(ownership_policy(), rcpt("r@example.com", sender=sender), session(auth_user=user))
        accepted(v)

    def test_silent_without_login(self) -> None:
        policy = make_policy(
            {"general": {"smtp_auth": {"sender_must_match_login": True}}}, accounts=ACCOUNTS
        )
        accepted(judge(policy, rcpt("r@example.com", sender="alice@example.com")))

    def test_judged_before_relay(self) -> None:
        v = judge(
            ownership_policy(),
            rcpt("r@elsewhere.example", sender="alice@example.com"),
            session(auth_user="bob"),
        )
        assert v.rule == MUST_MATCH


class TestRejectUnauthenticatedLocalSender:
    @pytest.mark.parametrize("sender", ["alice@example.com", "x@corp.example", "Bob@EXAMPLE.com"])
    def test_refused_for_outsiders(self, sender: str) -> None:
        v = judge(ownership_policy(), rcpt("r@example.com", sender=sender))
        # matched case-insensitively, echoed as the client wrote it
        text = f"<{sender}>: Sender address rejected: not logged in"
        expect(v, 553, "5.7.1", text, NOT_LOGGED_IN)

    @pytest.mark.parametrize("sender", ["carol@example.com", "", "a@known.example"])
    def test_unowned_senders_pass(self, sender: str) -> None:
        accepted(judge(ownership_policy(), rcpt("r@example.com", sender=sender)))

    def test_authenticated_and_trusted_clients_pass(self) -> None:
        env = rcpt("r@example.com", sender="alice@example.com")
        accepted(judge(ownership_policy(), env, session(auth_user="alice")))
        trusted = ownership_policy(relay={"trusted_networks": ["203.0.113.0/24"]})
        accepted(judge(trusted, env))

    def test_local_network_passes_only_when_it_skips_auth(self) -> None:
        env = rcpt("r@example.com", sender="alice@example.com")
        lan = session("192.0.2.10")
        skips = make_policy(
            {
                "general": {"smtp_auth": {"local_networks": ["192.0.2.0/28"]}},
                "security": {"sender_policy": {"reject_unauthenticated_local_sender": True}},
            },
            accounts=ACCOUNTS,
        )
        accepted(judge(skips, env, lan))
        needs_auth = make_policy(
            {
                "general": {
                    "smtp_auth": {
                        "local_networks": ["192.0.2.0/28"],
                        "skip_for_local_network": False,
                    }
                },
                "security": {"sender_policy": {"reject_unauthenticated_local_sender": True}},
            },
            accounts=ACCOUNTS,
        )
        assert judge(needs_auth, env, lan).rule == NOT_LOGGED_IN

    def test_judged_before_relay(self) -> None:
        v = judge(ownership_policy(), rcpt("r@elsewhere.example", sender="alice@example.com"))
        assert v.rule == NOT_LOGGED_IN


# ===========================================================================
# DNS blocklists


BL_CLIENT = "198.51.100.66"
BL_QUERY = "66.100.51.198.bl.example"


def dnsbl_policy(*zones: str) -> Policy:
    return make_policy({"security": {"advanced": {"dnsbl": list(zones) or ["bl.example"]}}})


class TestDnsbl:
    def test_listed_client_is_refused(self) -> None:
        zone = Zone({q(BL_QUERY, "A"): answer("127.0.0.2")})
        v = judge(dnsbl_policy(), rcpt("r@example.com"), session(BL_CLIENT), zone)
        text = f"Service unavailable; Client host [{BL_CLIENT}] blocked using bl.example"
        expect(v, 554, "5.7.1", text, "security.advanced.dnsbl.bl.example")
        assert v.evidence[0].dns == ((f"{BL_QUERY}/A", "127.0.0.2"),)

    @pytest.mark.parametrize("result", [NXDOMAIN, NODATA, SERVFAIL, TIMEOUT])
    def test_not_listed_or_broken_blocklist_passes(self, result: DnsResult) -> None:
        zone = Zone({q(BL_QUERY, "A"): result})
        accepted(judge(dnsbl_policy(), rcpt("r@example.com"), session(BL_CLIENT), zone))

    def test_answer_filter(self) -> None:
        zone = Zone({q(BL_QUERY, "A"): answer("127.0.0.4")})
        env, sess = rcpt("r@example.com"), session(BL_CLIENT)
        accepted(judge(dnsbl_policy("bl.example=127.0.0.2"), env, sess, zone))
        v = judge(dnsbl_policy("bl.example=127.0.0.4"), env, sess, zone)
        assert v.rule == "security.advanced.dnsbl.bl.example"
        assert v.evidence[0].matched == "bl.example=127.0.0.4"

    def test_query_names(self) -> None:
        policy = dnsbl_policy()
        assert lookups(policy, session(BL_CLIENT), rcpt("r@example.com")) == {q(BL_QUERY, "A")}
        v6 = lookups(policy, session("2001:db8::10"), rcpt("r@example.com"))
        nibbles = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        assert v6 == {q(f"{nibbles}.bl.example", "A")}

    def test_zones_in_order(self) -> None:
        zone = Zone(
            {
                q(f"{BL_QUERY.removesuffix('bl.example')}one.example", "A"): NXDOMAIN,
                q(f"{BL_QUERY.removesuffix('bl.example')}two.example", "A"): answer("127.0.0.2"),
                q(f"{BL_QUERY.removesuffix('bl.example')}three.example", "A"): answer("127.0.0.2"),
            }
        )
        policy = dnsbl_policy("one.example", "two.example", "three.example")
        v = judge(policy, rcpt("r@example.com"), session(BL_CLIENT), zone)
        assert v.rule == "security.advanced.dnsbl.two.example"

    def test_trusted_and_authenticated_clients_skip_it(self) -> None:
        zone = Zone({q(BL_QUERY, "A"): answer("127.0.0.2")})
        policy = make_policy(
            {
                "relay": {"trusted_networks": ["198.51.100.0/24"]},
                "security": {"advanced": {"dnsbl": ["bl.example"]}},
            }
        )
        accepted(judge(policy, rcpt("r@example.com"), session(BL_CLIENT), zone))
        assert lookups(policy, session(BL_CLIENT), rcpt("r@example.com")) == frozenset()
        authed = session(BL_CLIENT, auth_user="alice")
        accepted(judge(dnsbl_policy(), rcpt("r@example.com"), authed, zone))


# ===========================================================================
# Connection policy: the client's DNS names


REVERSE = "security.connection_policy.reject_unknown_reverse_client_hostname"
FORWARD = "security.connection_policy.reject_unknown_client_hostname"


def client_policy(reverse: bool = False, forward: bool = False, **replies: int) -> Policy:
    return make_policy(
        {
            "security": {
                "connection_policy": {
                    "reject_unknown_reverse_client_hostname": reverse,
                    "reject_unknown_client_hostname": forward,
                }
            },
            "replies": replies,
        }
    )


def reverse_text(ip: str) -> str:
    return f"Client host rejected: cannot find your reverse hostname, [{ip}]"


def forward_text(ip: str) -> str:
    return f"Client host rejected: cannot find your hostname, [{ip}]"


class TestReverseClientHostname:
    def test_ptr_passes_even_without_forward_match(self) -> None:
        zone = standard_zone().set(OUTSIDER_HELO, "A", answer("198.51.100.99"))
        accepted(judge(client_policy(reverse=True), rcpt("r@example.com"), zone=zone))

    @pytest.mark.parametrize("result", [NXDOMAIN, NODATA])
    def test_no_ptr_is_refused(self, result: DnsResult) -> None:
        zone = Zone({q("192.0.2.12", "PTR"): result})
        v = judge(client_policy(reverse=True), rcpt("r@example.com"), session("192.0.2.12"), zone)
        expect(v, 450, "4.7.1", reverse_text("192.0.2.12"), REVERSE)
        assert v.evidence[0].dns == (("192.0.2.12/PTR", result.outcome.value),)

    @pytest.mark.parametrize("result", [SERVFAIL, TIMEOUT])
    def test_temporary_failure_refuses_with_450(self, result: DnsResult) -> None:
        zone = Zone({q("192.0.2.12", "PTR"): result})
        v = judge(client_policy(reverse=True), rcpt("r@example.com"), session("192.0.2.12"), zone)
        assert v.reply == Reply(450, "4.7.1", reverse_text("192.0.2.12"))
        assert v.rule == REVERSE and v.action.refuses

    def test_unknown_client_code(self) -> None:
        policy = client_policy(reverse=True, unknown_client=550)
        sess = session("192.0.2.12")
        v = judge(policy, rcpt("r@example.com"), sess, Zone())
        expect(v, 550, "5.7.1", reverse_text("192.0.2.12"), REVERSE)
        # a temporary failure stays 450, whatever the configured code
        v = judge(policy, rcpt("r@example.com"), sess, Zone(default=SERVFAIL))
        assert v.reply == Reply(450, "4.7.1", reverse_text("192.0.2.12"))

    def test_temporary_failure_is_not_postponed(self) -> None:
        policy = make_policy(
            {
                "security": {
                    "connection_policy": {"reject_unknown_reverse_client_hostname": True},
                    "sender_policy": {"reject_non_fqdn_sender": True},
                }
            }
        )
        zone = Zone({q("192.0.2.12", "PTR"): SERVFAIL})
        env = rcpt("r@example.com", sender="a@localhost")
        v = judge(policy, env, session("192.0.2.12"), zone)
        expect(v, 450, "4.7.1", reverse_text("192.0.2.12"), REVERSE)

    @pytest.mark.parametrize("ptr", ["192.0.2.12", "bad_name!.example"])
    def test_numeric_or_invalid_ptr_name_is_no_name(self, ptr: str) -> None:
        zone = Zone({q("192.0.2.12", "PTR"): answer(ptr)})
        v = judge(client_policy(reverse=True), rcpt("r@example.com"), session("192.0.2.12"), zone)
        expect(v, 450, "4.7.1", reverse_text("192.0.2.12"), REVERSE)


class TestClientHostname:
    def test_forward_confirmed_passes(self) -> None:
        accepted(judge(client_policy(forward=True), rcpt("r@example.com")))
        accepted(judge(client_policy(forward=True), rcpt("r@example.com"), session("2001:db8::10")))

    @pytest.mark.parametrize(
        ("ptr", "forward"),
        [
            (NXDOMAIN, None),
            (NODATA, None),
            (answer("mismatch.example.com"), answer("198.51.100.99")),
            (answer("mismatch.example.com"), NXDOMAIN),
            (answer("mismatch.example.com"), NODATA),
        ],
    )
    def test_unverified_name_is_refused(self, ptr: DnsResult, forward: DnsResult | None) -> None:
        zone = Zone({q("192.0.2.11", "PTR"): ptr})
        if forward is not None:
            zone.set("mismatch.example.com", "A", forward)
        v = judge(client_policy(forward=True), rcpt("r@example.com"), session("192.0.2.11"), zone)
        expect(v, 450, "4.7.25", forward_text("192.0.2.11"), FORWARD)

    @pytest.mark.parametrize("result", [SERVFAIL, TIMEOUT])
    def test_temporary_forward_failure(self, result: DnsResult) -> None:
        zone = Zone(
            {
                q("192.0.2.11", "PTR"): answer("slow.example.com"),
                q("slow.example.com", "A"): result,
            }
        )
        v = judge(client_policy(forward=True), rcpt("r@example.com"), session("192.0.2.11"), zone)
        assert v.reply == Reply(450, "4.7.25", forward_text("192.0.2.11"))
        assert v.rule == FORWARD and v.action.refuses

    def test_ipv6_forward_lookup_is_aaaa(self) -> None:
        zone = standard_zone().set("v6.example.com", "AAAA", answer("2001:db8::99"))
        v = judge(client_policy(forward=True), rcpt("r@example.com"), session("2001:db8::10"), zone)
        expect(v, 450, "4.7.25", forward_text("2001:db8::10"), FORWARD)

    def test_unknown_client_code(self) -> None:
        policy = client_policy(forward=True, unknown_client=550)
        v = judge(policy, rcpt("r@example.com"), session("192.0.2.11"), Zone())
        expect(v, 550, "5.7.25", forward_text("192.0.2.11"), FORWARD)

    def test_ipv4_mapped_client_is_judged_as_ipv4(self) -> None:
        mapped = session("::ffff:203.0.113.5")
        assert lookups(client_policy(forward=True), mapped, rcpt("r@example.com")) == {
            q(OUTSIDER, "PTR")
        }
        accepted(judge(client_policy(forward=True), rcpt("r@example.com"), mapped))

    def test_temporary_failure_is_not_postponed(self) -> None:
        policy = make_policy(
            {
                "security": {
                    "connection_policy": {"reject_unknown_client_hostname": True},
                    "advanced": {"reject_non_fqdn_helo": True},
                }
            }
        )
        zone = Zone(
            {
                q("192.0.2.11", "PTR"): answer("slow.example.com"),
                q("slow.example.com", "A"): TIMEOUT,
            }
        )
        v = judge(policy, rcpt("r@example.com"), session("192.0.2.11", helo="localhost"), zone)
        expect(v, 450, "4.7.25", forward_text("192.0.2.11"), FORWARD)


# ===========================================================================
# HELO checks


INVALID_HELO = "security.advanced.reject_invalid_helo"
NON_FQDN_HELO = "security.advanced.reject_non_fqdn_helo"
UNKNOWN_HELO = "security.advanced.reject_unknown_helo"


def helo_policy(*flags: str, **replies: int) -> Policy:
    return make_policy({"security": {"advanced": dict.fromkeys(flags, True)}, "replies": replies})


class TestHelo:
    @pytest.mark.parametrize(
        ("helo", "why"),
        [
            ("bad_name!", "Invalid name"),
            ("-bad.example.com", "Invalid name"),
            ("a..b.example", "Invalid name"),
            ("[bogus]", "invalid ip address"),
            ("[2001:db8::1]", "invalid ip address"),  # IPv6 literal needs "IPv6:"
            ("[192.0.2.1", "invalid ip address"),
        ],
    )
    def test_invalid(self, helo: str, why: str) -> None:
        v = judge(helo_policy("reject_invalid_helo"), rcpt("r@example.com"), session(helo=helo))
        expect(v, 501, "5.5.2", f"<{helo}>: Helo command rejected: {why}", INVALID_HELO)

    @pytest.mark.parametrize(
        "helo",
        [
            "mail.example.com",
            "mail.example.com.",
            "localhost",
            "under_score.example",
            "192.0.2.10",
            "2001:db8::10",
            "[192.0.2.10]",
            "[IPv6:2001:db8::10]",
        ],
    )
    def test_valid(self, helo: str) -> None:
        accepted(
            judge(helo_policy("reject_invalid_helo"), rcpt("r@example.com"), session(helo=helo))
        )

    @pytest.mark.parametrize(
        ("helo", "valid"), [("0.1.2.3", False), ("010.1.1.1", True), ("192.0.2.10.", True)]
    )
    def test_bare_addresses_as_postfix_judges_them(self, helo: str, valid: bool) -> None:
        # valid_hostaddr() after dup_if_truncate(): a zero first octet is
        # refused, leading zeros and one trailing dot are not
        v = judge(helo_policy("reject_invalid_helo"), rcpt("r@example.com"), session(helo=helo))
        assert v.accepted is valid, v.explain()
        if not valid:
            expect(v, 501, "5.5.2", f"<{helo}>: Helo command rejected: Invalid name", INVALID_HELO)

    @pytest.mark.parametrize("helo", ["localhost", "mail", "192.0.2.10", "bad_name!.example"])
    def test_non_fqdn(self, helo: str) -> None:
        v = judge(helo_policy("reject_non_fqdn_helo"), rcpt("r@example.com"), session(helo=helo))
        text = f"<{helo}>: Helo command rejected: need fully-qualified hostname"
        expect(v, 504, "5.5.2", text, NON_FQDN_HELO)

    @pytest.mark.parametrize("helo", ["mail.example.com", "mail.example.com.", "[192.0.2.10]"])
    def test_fqdn(self, helo: str) -> None:
        policy = helo_policy("reject_non_fqdn_helo")
        accepted(judge(policy, rcpt("r@example.com"), session(helo=helo)))

    @pytest.mark.parametrize("flag", ["reject_non_fqdn_helo", "reject_unknown_helo"])
    def test_address_literal_under_fqdn_and_unknown_checks(self, flag: str) -> None:
        # Postfix calls reject_invalid_hostaddr() for a "[" HELO in both
        rule = f"security.advanced.{flag}"
        policy = helo_policy(flag)
        v = judge(policy, rcpt("r@example.com"), session(helo="[bogus]"))
        expect(v, 501, "5.5.2", "<[bogus]>: Helo command rejected: invalid ip address", rule)
        accepted(judge(policy, rcpt("r@example.com"), session(helo="[IPv6:2001:db8::10]")))

    @pytest.mark.parametrize(
        "records",
        [
            {"A": answer("192.0.2.60")},
            {"AAAA": answer("2001:db8::60")},
            {"MX": answer("10 mail.known.example")},
            {"MX": answer("0 .")},  # Postfix: "Allow MTA names to have nullMX records"
            {"MX": SERVFAIL, "A": answer("192.0.2.60")},
        ],
    )
    def test_known_helo(self, records: dict[str, DnsResult]) -> None:
        zone = Zone()
        for rtype, result in records.items():
            zone.set("known.example", rtype, result)
        v = judge(
            helo_policy("reject_unknown_helo"),
            rcpt("r@example.com"),
            session(helo="known.example"),
            zone,
        )
        accepted(v)

    @pytest.mark.parametrize("result", [NXDOMAIN, NODATA])
    def test_unknown_helo(self, result: DnsResult) -> None:
        zone = Zone(default=result)
        sess = session(helo="unknown-host.example")
        v = judge(helo_policy("reject_unknown_helo"), rcpt("r@example.com"), sess, zone)
        text = "<unknown-host.example>: Helo command rejected: Host not found"
        expect(v, 450, "4.7.1", text, UNKNOWN_HELO)
        assert {d[0] for d in v.evidence[0].dns} == {
            "unknown-host.example/MX",
            "unknown-host.example/A",
            "unknown-host.example/AAAA",
        }

    @pytest.mark.parametrize("result", [SERVFAIL, TIMEOUT])
    def test_temporary_failure_defers_if_permit(self, result: DnsResult) -> None:
        sess = session(helo="slow.example")
        v = judge(
            helo_policy("reject_unknown_helo"), rcpt("r@example.com"), sess, Zone(default=result)
        )
        text = "<slow.example>: Helo command rejected: Host not found"
        expect(v, 450, "4.7.1", text, UNKNOWN_HELO, Action.DEFER_IF_PERMIT)

    def test_unknown_hostname_code(self) -> None:
        policy = helo_policy("reject_unknown_helo", unknown_hostname=550)
        v = judge(policy, rcpt("r@example.com"), session(helo="gone.example"), Zone())
        expect(
            v, 550, "5.7.1", "<gone.example>: Helo command rejected: Host not found", UNKNOWN_HELO
        )

    def test_address_literal_is_not_looked_up(self) -> None:
        policy = helo_policy("reject_unknown_helo")
        assert lookups(policy, session(helo="[192.0.2.10]"), rcpt("r@example.com")) == frozenset()

    @pytest.mark.parametrize(
        "helo", ["Known.Example.", "192.0.2.10", "192.0.2.10.", "a..b.example", "bücher.example"]
    )
    def test_names_postfix_will_not_look_up_are_not_found(self, helo: str) -> None:
        # Postfix's resolver refuses an IP address or an invalid host name
        # (a trailing dot included) without a query, even when it exists
        policy = helo_policy("reject_unknown_helo")
        sess = session(helo=helo)
        assert lookups(policy, sess, rcpt("r@example.com")) == frozenset()
        zone = Zone(default=answer("192.0.2.60"))
        v = judge(policy, rcpt("r@example.com"), sess, zone)
        expect(v, 450, "4.7.1", f"<{helo}>: Helo command rejected: Host not found", UNKNOWN_HELO)

    def test_helo_checks_are_silent_without_helo(self) -> None:
        policy = helo_policy("reject_invalid_helo", "reject_non_fqdn_helo", "reject_unknown_helo")
        sess = session(helo=None)
        assert lookups(policy, sess, rcpt("r@example.com")) == frozenset()
        accepted(evaluate(policy, sess, rcpt("r@example.com")))


class TestRequireHelo:
    def test_mail_before_helo(self) -> None:
        policy = helo_policy("require_helo")
        env = Envelope(Stage.MAIL, sender="a@known.example")
        v = evaluate(policy, session(helo=None), env)
        expect(v, 503, "5.5.1", "Error: send HELO/EHLO first", "security.advanced.require_helo")
        accepted(evaluate(policy, session(), env))
        accepted(evaluate(make_policy(), session(helo=None), env))


# ===========================================================================
# Sender policy


NON_FQDN_SENDER = "security.sender_policy.reject_non_fqdn_sender"
UNKNOWN_SENDER = "security.sender_policy.reject_unknown_sender_domain"


def sender_policy(*flags: str, **replies: int) -> Policy:
    return make_policy(
        {"security": {"sender_policy": dict.fromkeys(flags, True)}, "replies": replies}
    )


class TestNonFqdnSender:
    @pytest.mark.parametrize(
        ("sender", "shown"),
        [("a@localhost", "a@localhost"), ("a@mail.", "a@mail."), ("A@Mail", "A@Mail"), ("a", "a")],
    )
    def test_refused(self, sender: str, shown: str) -> None:
        v = judge(sender_policy("reject_non_fqdn_sender"), rcpt("r@example.com", sender=sender))
        text = f"<{shown}>: Sender address rejected: need fully-qualified address"
        expect(v, 504, "5.5.2", text, NON_FQDN_SENDER)

    @pytest.mark.parametrize("sender", ["a@known.example", "a@known.example.", "", "a@[192.0.2.1]"])
    def test_passes(self, sender: str) -> None:
        accepted(
            judge(sender_policy("reject_non_fqdn_sender"), rcpt("r@example.com", sender=sender))
        )

    def test_utf8_fqdn_sender(self) -> None:
        env = attrs.evolve(rcpt("r@example.com", sender="a@bücher.example"), smtputf8=True)
        accepted(judge(sender_policy("reject_non_fqdn_sender"), env))


def sender_zone(domain: str, records: dict[str, DnsResult]) -> Zone:
    zone = Zone(default=NODATA)
    for rtype, result in records.items():
        zone.set(domain, rtype, result)
    return zone


class TestUnknownSenderDomain:
    @pytest.mark.parametrize(
        "records",
        [
            {"MX": answer("10 mail.d.example")},
            {"A": answer("192.0.2.60")},
            {"AAAA": answer("2001:db8::60")},
            {"MX": SERVFAIL, "A": answer("192.0.2.62")},
            {"MX": TIMEOUT, "AAAA": answer("2001:db8::62")},
        ],
    )
    def test_existing_domain(self, records: dict[str, DnsResult]) -> None:
        zone = sender_zone("d.example", records)
        accepted(
            judge(
                sender_policy("reject_unknown_sender_domain"),
                rcpt("r@example.com", sender="a@d.example"),
                zone=zone,
            )
        )

    def test_utf8_domain_is_looked_up_by_its_a_label(self) -> None:
        zone = sender_zone("xn--bcher-kva.example", {"A": answer("192.0.2.90")})
        env = attrs.evolve(rcpt("r@example.com", sender="Jörg@Bücher.Example"), smtputf8=True)
        accepted(judge(sender_policy("reject_unknown_sender_domain"), env, zone=zone))
        v = judge(sender_policy("reject_unknown_sender_domain"), env, zone=Zone(default=NXDOMAIN))
        text = "<Jörg@Bücher.Example>: Sender address rejected: Domain not found"
        expect(v, 450, "4.1.8", text, "security.sender_policy.reject_unknown_sender_domain")

    @pytest.mark.parametrize(
        "records",
        [
            {},  # NODATA for every type
            {"MX": NXDOMAIN, "A": NXDOMAIN, "AAAA": NXDOMAIN},
            {"MX": NODATA, "A": NXDOMAIN, "AAAA": NODATA},
            {"MX": answer()},  # an empty answer is no data
        ],
    )
    def test_missing_domain(self, records: dict[str, DnsResult]) -> None:
        zone = sender_zone("d.example", records)
        env = rcpt("r@example.com", sender="a@d.example")
        v = judge(sender_policy("reject_unknown_sender_domain"), env, zone=zone)
        expect(
            v,
            450,
            "4.1.8",
            "<a@d.example>: Sender address rejected: Domain not found",
            UNKNOWN_SENDER,
        )
        assert v.evidence[0].kind == "sender"
        assert len(v.evidence[0].dns) == 3

    @pytest.mark.parametrize(
        "records",
        [
            {"MX": SERVFAIL, "A": SERVFAIL, "AAAA": SERVFAIL},
            {"MX": TIMEOUT, "A": TIMEOUT, "AAAA": TIMEOUT},
            {"MX": SERVFAIL, "A": NXDOMAIN, "AAAA": NODATA},
        ],
    )
    def test_temporary_failure_defers_if_permit(self, records: dict[str, DnsResult]) -> None:
        zone = sender_zone("d.example", records)
        env = rcpt("r@example.com", sender="a@d.example")
        v = judge(sender_policy("reject_unknown_sender_domain"), env, zone=zone)
        text = "<a@d.example>: Sender address rejected: Domain not found"
        expect(v, 450, "4.1.8", text, UNKNOWN_SENDER, Action.DEFER_IF_PERMIT)

    def test_null_mx(self) -> None:
        zone = sender_zone("nullmx.example", {"MX": answer("0 ."), "A": answer("192.0.2.1")})
        env = rcpt("r@example.com", sender="a@nullmx.example")
        v = judge(sender_policy("reject_unknown_sender_domain"), env, zone=zone)
        text = (
            "<a@nullmx.example>: Sender address rejected: "
            "Domain nullmx.example does not accept mail (nullMX)"
        )
        expect(v, 550, "5.7.27", text, UNKNOWN_SENDER)

    @pytest.mark.parametrize(("code", "enhanced"), [(550, "5.1.8"), (451, "4.1.8")])
    def test_unknown_address_code(self, code: int, enhanced: str) -> None:
        policy = sender_policy("reject_unknown_sender_domain", unknown_address=code)
        v = judge(policy, rcpt("r@example.com", sender="a@gone.example"), zone=Zone())
        text = "<a@gone.example>: Sender address rejected: Domain not found"
        expect(v, code, enhanced, text, UNKNOWN_SENDER)

    @pytest.mark.parametrize("sender", ["", "a@example.com", "a@EXAMPLE.COM", "a", "a@[192.0.2.1]"])
    def test_not_looked_up(self, sender: str) -> None:
        # the null sender, our own domains, unqualified and literal senders
        policy = sender_policy("reject_unknown_sender_domain")
        env = rcpt("r@example.com", sender=sender)
        assert lookups(policy, session(), env) == frozenset()
        accepted(evaluate(policy, session(), env))


# ===========================================================================
# Recipient checks


NON_FQDN_RCPT = "security.advanced.reject_non_fqdn_recipient"
UNKNOWN_RCPT = "security.advanced.reject_unknown_recipient_domain"


def recipient_policy(*flags: str, **replies: int) -> Policy:
    return make_policy(
        {
            "relay": {"inbound_domains": ["partner", "gone.example", "partner.example"]},
            "security": {"advanced": dict.fromkeys(flags, True)},
            "replies": replies,
        }
    )


class TestRecipientChecks:
    def test_non_fqdn(self) -> None:
        v = judge(recipient_policy("reject_non_fqdn_recipient"), rcpt("r@partner"))
        text = "<r@partner>: Recipient address rejected: need fully-qualified address"
        expect(v, 504, "5.5.2", text, NON_FQDN_RCPT)
        accepted(judge(recipient_policy("reject_non_fqdn_recipient"), rcpt("r@partner.example")))

    @pytest.mark.parametrize("result", [NXDOMAIN, NODATA])
    def test_unknown_domain(self, result: DnsResult) -> None:
        v = judge(
            recipient_policy("reject_unknown_recipient_domain"),
            rcpt("r@gone.example"),
            zone=Zone(default=result),
        )
        text = "<r@gone.example>: Recipient address rejected: Domain not found"
        expect(v, 450, "4.1.2", text, UNKNOWN_RCPT)

    def test_null_mx(self) -> None:
        zone = Zone().set("gone.example", "MX", answer("0 ."))
        v = judge(
            recipient_policy("reject_unknown_recipient_domain"), rcpt("r@gone.example"), zone=zone
        )
        text = (
            "<r@gone.example>: Recipient address rejected: "
            "Domain gone.example does not accept mail (nullMX)"
        )
        expect(v, 556, "5.1.10", text, UNKNOWN_RCPT)

    @pytest.mark.parametrize("result", [SERVFAIL, TIMEOUT])
    def test_temporary_failure_defers_if_permit(self, result: DnsResult) -> None:
        zone = Zone(default=result)
        v = judge(
            recipient_policy("reject_unknown_recipient_domain"), rcpt("r@gone.example"), zone=zone
        )
        text = "<r@gone.example>: Recipient address rejected: Domain not found"
        expect(v, 450, "4.1.2", text, UNKNOWN_RCPT, Action.DEFER_IF_PERMIT)

    def test_existing_domain(self) -> None:
        accepted(
            judge(recipient_policy("reject_unknown_recipient_domain"), rcpt("r@partner.example"))
        )

    def test_unknown_address_code(self) -> None:
        policy = recipient_policy("reject_unknown_recipient_domain", unknown_address=550)
        v = judge(policy, rcpt("r@gone.example"), zone=Zone())
        text = "<r@gone.example>: Recipient address rejected: Domain not found"
        expect(v, 550, "5.1.2", text, UNKNOWN_RCPT)

    def test_the_resolved_domain_is_looked_up(self) -> None:
        v = judge(
            recipient_policy("reject_unknown_recipient_domain"),
            rcpt("r%gone.example@example.com"),
            zone=Zone(),
        )
        text = "<r%gone.example@example.com>: Recipient address rejected: Domain not found"
        expect(v, 450, "4.1.2", text, UNKNOWN_RCPT)

    def test_our_domains_are_not_looked_up(self) -> None:
        policy = recipient_policy("reject_unknown_recipient_domain")
        assert lookups(policy, session(), rcpt("r@example.com")) == frozenset()


# ===========================================================================
# Temporary failures: Postfix's defer_if_permit


def temp_policy() -> Policy:
    return make_policy(
        {
            "relay": {"inbound_domains": ["partner"]},
            "security": {
                "advanced": {"reject_unknown_helo": True, "reject_non_fqdn_recipient": True},
                "sender_policy": {"reject_unknown_sender_domain": True},
            },
        }
    )


class TestDeferIfPermit:
    def test_alone_it_defers(self) -> None:
        zone = standard_zone().set("slow.example", "MX", TIMEOUT)
        zone.set("slow.example", "A", TIMEOUT).set("slow.example", "AAAA", TIMEOUT)
        v = judge(temp_policy(), rcpt("r@example.com", sender="a@slow.example"), zone=zone)
        assert v.action is Action.DEFER_IF_PERMIT
        assert v.rule == UNKNOWN_SENDER
        assert v.action.refuses and not v.accepted

    def test_a_later_refusal_wins(self) -> None:
        zone = standard_zone().set("slow.example", "MX", TIMEOUT)
        zone.set("slow.example", "A", TIMEOUT).set("slow.example", "AAAA", TIMEOUT)
        v = judge(temp_policy(), rcpt("r@partner", sender="a@slow.example"), zone=zone)
        text = "<r@partner>: Recipient address rejected: need fully-qualified address"
        expect(v, 504, "5.5.2", text, NON_FQDN_RCPT)

    def test_a_later_4xx_refusal_wins_too(self) -> None:
        zone = Zone(
            {
                q("slow.example", "MX"): SERVFAIL,
                q("slow.example", "A"): SERVFAIL,
                q("slow.example", "AAAA"): SERVFAIL,
            }
        )
        sess = session(helo="slow.example")
        v = judge(temp_policy(), rcpt("r@example.com", sender="a@gone.example"), sess, zone)
        text = "<a@gone.example>: Sender address rejected: Domain not found"
        expect(v, 450, "4.1.8", text, UNKNOWN_SENDER)

    def test_the_first_of_two_is_kept(self) -> None:
        zone = Zone(default=SERVFAIL)
        sess = session(helo="slow.example")
        v = judge(temp_policy(), rcpt("r@example.com", sender="a@slow.example"), sess, zone)
        text = "<slow.example>: Helo command rejected: Host not found"
        expect(v, 450, "4.7.1", text, UNKNOWN_HELO, Action.DEFER_IF_PERMIT)


# ===========================================================================
# The order of evaluation (settings section 5)


CASCADE_POLICY: dict[str, Any] = {
    "relay": {"inbound_domains": ["partner", "gone.example", "partner.example"]},
    "security": {
        "connection_policy": {
            "reject_unknown_reverse_client_hostname": True,
            "reject_unknown_client_hostname": True,
        },
        "advanced": {
            "dnsbl": ["bl.example"],
            "reject_invalid_helo": True,
            "reject_non_fqdn_helo": True,
            "reject_unknown_helo": True,
            "reject_non_fqdn_recipient": True,
            "reject_unknown_recipient_domain": True,
        },
        "sender_policy": {"reject_non_fqdn_sender": True, "reject_unknown_sender_domain": True},
    },
}


def test_checks_run_in_postfix_order() -> None:
    """Start with facts that fail every check, then mend them one at a time:
    each step is decided by the next check of section 5 step 6."""
    policy = make_policy(CASCADE_POLICY)
    zone = standard_zone()
    zone.set(BL_QUERY, "A", answer("127.0.0.2"))
    zone.set("mismatch.example.com", "A", answer("192.0.2.99"))
    facts: dict[str, Any] = {
        "ip": BL_CLIENT,
        "helo": "bad_name!",
        "sender": "a@localhost",
        "recipient": "r@partner",
    }
    steps: list[tuple[str, tuple[int, str], dict[str, Any]]] = [
        ("security.advanced.dnsbl.bl.example", (554, "5.7.1"), {"dnsbl": NXDOMAIN}),
        (REVERSE, (450, "4.7.1"), {"ptr": answer("mismatch.example.com")}),
        (FORWARD, (450, "4.7.25"), {"forward": answer(BL_CLIENT)}),
        (INVALID_HELO, (501, "5.5.2"), {"helo": "localhost"}),
        (NON_FQDN_HELO, (504, "5.5.2"), {"helo": "unknown-host.example"}),
        (UNKNOWN_HELO, (450, "4.7.1"), {"helo": "known.example"}),
        (NON_FQDN_SENDER, (504, "5.5.2"), {"sender": "a@gone.example"}),
        (UNKNOWN_SENDER, (450, "4.1.8"), {"sender": "a@known.example"}),
        (NON_FQDN_RCPT, (504, "5.5.2"), {"recipient": "r@gone.example"}),
        (UNKNOWN_RCPT, (450, "4.1.2"), {"recipient": "r@partner.example"}),
    ]
    for rule, (code, enhanced), mend in steps:
        env = rcpt(facts["recipient"], sender=facts["sender"])
        v = judge(policy, env, session(facts["ip"], helo=facts["helo"]), zone)
        assert v.rule == rule, v.explain()
        assert v.reply is not None and (v.reply.code, v.reply.enhanced) == (code, enhanced)
        for key, value in mend.items():
            if key == "dnsbl":
                zone.set(BL_QUERY, "A", value)
            elif key == "ptr":
                zone.set(BL_CLIENT, "PTR", value)
            elif key == "forward":
                zone.set("mismatch.example.com", "A", value)
            else:
                facts[key] = value
    env = rcpt(facts["recipient"], sender=facts["sender"])
    accepted(judge(policy, env, session(facts["ip"], helo=facts["helo"]), zone))


class TestOrder:
    def test_relay_before_lists(self) -> None:
        black = {"name": "s", "list": "black", "sender": ["spam.example"]}
        v = judge(lists_policy(black), rcpt("r@elsewhere.example", sender="a@spam.example"))
        assert v.rule == RELAY_DENIED

    def test_sender_ownership_before_relay_and_lists(self) -> None:
        policy = make_policy(
            {
                "security": {
                    "sender_policy": {"reject_unauthenticated_local_sender": True},
                    "lists": [{"name": "b", "list": "black", "client": ["0.0.0.0/0"]}],
                }
            },
            accounts=ACCOUNTS,
        )
        v = judge(policy, rcpt("r@elsewhere.example", sender="alice@example.com"))
        assert v.rule == NOT_LOGGED_IN

    def test_lists_before_mynetworks_permit_before_dnsbl(self) -> None:
        policy = make_policy(
            {
                "relay": {"trusted_networks": ["198.51.100.0/24"]},
                "security": {
                    "advanced": {"dnsbl": ["bl.example"]},
                    "lists": [{"name": "s", "list": "black", "sender": ["spam.example"]}],
                },
            }
        )
        zone = Zone({q(BL_QUERY, "A"): answer("127.0.0.2")})
        sess = session(BL_CLIENT)
        v = judge(policy, rcpt("r@elsewhere.example", sender="a@spam.example"), sess, zone)
        assert v.rule == "security.lists.s"
        accepted(judge(policy, rcpt("r@elsewhere.example", sender="a@known.example"), sess, zone))

    def test_authenticated_clients_skip_the_checks(self) -> None:
        policy = make_policy(CASCADE_POLICY)
        sess = session(BL_CLIENT, helo="bad_name!", auth_user="alice")
        env = rcpt("r@elsewhere.example", sender="a@localhost")
        assert lookups(policy, sess, env) == frozenset()
        accepted(evaluate(policy, sess, env))


# ===========================================================================
# The bare postmaster


class TestPostmaster:
    @pytest.mark.parametrize("recipient", ["postmaster", "Postmaster", "POSTMASTER"])
    def test_bare_postmaster_passes_every_check(self, recipient: str) -> None:
        policy = make_policy(CASCADE_POLICY, accounts=ACCOUNTS)
        sess = session(BL_CLIENT, helo="bad_name!")
        env = rcpt(recipient, sender="a@localhost")
        assert lookups(policy, sess, env) == frozenset()
        v = evaluate(policy, sess, env)
        assert v.action is Action.ACCEPT and v.reply is None

    def test_postmaster_at_a_domain_is_an_ordinary_recipient(self) -> None:
        assert judge(make_policy(), rcpt("postmaster@elsewhere.example")).rule == RELAY_DENIED
        policy = client_policy(reverse=True)
        v = judge(policy, rcpt("postmaster@example.com"), session("192.0.2.12"), Zone())
        assert v.rule == REVERSE

    def test_postmaster_still_counts_against_max_recipients(self) -> None:
        policy = make_policy({"general": {"max_recipients": 2}})
        v = evaluate(
            policy, session(), rcpt("postmaster", recipients=["a@example.com", "b@example.com"])
        )
        expect(v, 452, "4.5.3", "Error: too many recipients", "general.max_recipients")


# ===========================================================================
# Counted limits


def counters(**kw: int) -> Counters:
    return Counters(**kw)


class TestMaxRecipients:
    def test_limit(self) -> None:
        policy = make_policy({"general": {"max_recipients": 3}})
        two = ["r0@example.com", "r1@example.com"]
        accepted(evaluate(policy, session(), rcpt("r2@example.com", recipients=two)))
        v = evaluate(policy, session(), rcpt("r3@example.com", recipients=[*two, "r2@example.com"]))
        expect(v, 452, "4.5.3", "Error: too many recipients", "general.max_recipients")
        assert v.evidence[0].value == "4" and v.evidence[0].matched == "limit 3"

    def test_zero_is_unlimited(self) -> None:
        policy = make_policy({"general": {"max_recipients": 0}})
        many = [f"r{i}@example.com" for i in range(5000)]
        accepted(evaluate(policy, session(), rcpt("x@example.com", recipients=many)))

    def test_default_is_1000(self) -> None:
        many = [f"r{i}@example.com" for i in range(1000)]
        v = evaluate(make_policy(), session(), rcpt("x@example.com", recipients=many))
        assert v.rule == "general.max_recipients"
        accepted(evaluate(make_policy(), session(), rcpt("x@example.com", recipients=many[:-1])))

    def test_trusted_clients_are_limited_too(self) -> None:
        policy = make_policy(
            {"general": {"max_recipients": 1}, "relay": {"trusted_networks": ["203.0.113.0/24"]}}
        )
        v = evaluate(policy, session(), rcpt("b@example.com", recipients=["a@example.com"]))
        assert v.rule == "general.max_recipients"


SIZE = "general.max_message_size_mb"


class TestMessageSize:
    def test_declared_size_at_mail(self) -> None:
        policy = make_policy({"general": {"max_message_size_mb": 1}})
        mail = Envelope(Stage.MAIL, sender="a@known.example", declared_size=MIB + 1)
        v = evaluate(policy, session(), mail)
        expect(v, 552, "5.3.4", "Message size exceeds fixed limit", SIZE)
        for ok in (MIB, 1000, None):
            accepted(
                evaluate(
                    policy, session(), Envelope(Stage.MAIL, sender="a@b.example", declared_size=ok)
                )
            )

    def test_fractional_megabytes(self) -> None:
        policy = make_policy({"general": {"max_message_size_mb": 0.5}})
        too_big = Envelope(Stage.MAIL, sender="a@b.example", declared_size=MIB // 2 + 1)
        assert evaluate(policy, session(), too_big).rule == SIZE

    def test_real_size_at_end_of_data(self) -> None:
        policy = make_policy({"general": {"max_message_size_mb": 1}})
        v = evaluate(policy, session(), eod(MessageFacts(size=MIB + 1)))
        expect(v, 552, "5.3.4", "Error: message file too big", SIZE)
        accepted(evaluate(policy, session(), eod(MessageFacts(size=MIB))))

    def test_default_is_10_mib_and_zero_unlimited(self) -> None:
        v = evaluate(make_policy(), session(), eod(MessageFacts(size=10 * MIB + 1)))
        assert v.rule == SIZE
        unlimited = make_policy({"general": {"max_message_size_mb": 0}})
        accepted(evaluate(unlimited, session(), eod(MessageFacts(size=10**10))))
        big_mail = Envelope(Stage.MAIL, sender="a@b.example", declared_size=10**10)
        accepted(evaluate(unlimited, session(), big_mail))


class TestMaxHops:
    def test_our_received_header_counts(self) -> None:
        policy = make_policy({"general": {"max_hops": 10}})
        v = evaluate(policy, session(), eod(MessageFacts(size=100, received_headers=9)))
        expect(v, 554, "5.4.0", "Error: too many hops", "general.max_hops")
        assert v.evidence[0].value == "10"
        accepted(evaluate(policy, session(), eod(MessageFacts(size=100, received_headers=8))))


TRUSTED_AND_LAN = {
    "relay": {"trusted_networks": ["198.51.100.0/24"]},
    "general": {"smtp_auth": {"local_networks": ["192.0.2.0/28"], "skip_for_local_network": False}},
}


def rate_policy(key: str, limit: int) -> Policy:
    mapping = {**TRUSTED_AND_LAN, "security": {"connection_policy": {key: limit}}}
    return make_policy(mapping)


class TestRates:
    @pytest.mark.parametrize(
        ("key", "stage", "counter", "code", "enhanced", "text"),
        [
            (
                "max_connections_per_client",
                Stage.CONNECT,
                "connections",
                421,
                "4.7.0",
                f"{HOSTNAME} Error: too many connections from {{ip}}",
            ),
            (
                "max_connection_rate_per_client",
                Stage.CONNECT,
                "connection_rate",
                421,
                "4.7.0",
                f"{HOSTNAME} Error: too many connections from {{ip}}",
            ),
            (
                "max_message_rate_per_client",
                Stage.MAIL,
                "message_rate",
                450,
                "4.7.1",
                "Error: too much mail from {ip}",
            ),
            (
                "max_recipient_rate_per_client",
                Stage.RCPT,
                "recipient_rate",
                450,
                "4.7.1",
                "Error: too many recipients from {ip}",
            ),
        ],
    )
    def test_limit_and_exemptions(
        self, key: str, stage: Stage, counter: str, code: int, enhanced: str, text: str
    ) -> None:
        policy = rate_policy(key, 5)
        env = Envelope(
            stage,
            sender="a@known.example" if stage in (Stage.MAIL, Stage.RCPT) else None,
            recipient="r@example.com" if stage is Stage.RCPT else None,
        )
        rule = f"security.connection_policy.{key}"
        over, at = Counters(**{counter: 6}), Counters(**{counter: 5})
        v = evaluate(policy, session(counters=over), env)
        expect(v, code, enhanced, text.format(ip=OUTSIDER), rule)
        assert v.evidence[0].matched == "limit 5"
        accepted(evaluate(policy, session(counters=at), env))
        # trusted networks and local networks (even when they must
        # authenticate) are exempt
        accepted(evaluate(policy, session("198.51.100.7", counters=over), env))
        accepted(evaluate(policy, session("192.0.2.10", counters=over), env))

    def test_connection_count_default_is_50(self) -> None:
        env = Envelope(Stage.CONNECT)
        assert evaluate(make_policy(), session(counters=counters(connections=51)), env).rule == (
            "security.connection_policy.max_connections_per_client"
        )
        accepted(evaluate(make_policy(), session(counters=counters(connections=50)), env))

    def test_rates_off_by_default(self) -> None:
        busy = session(
            counters=counters(connection_rate=10**6, message_rate=10**6, recipient_rate=10**6)
        )
        policy = make_policy()
        accepted(evaluate(policy, busy, Envelope(Stage.CONNECT)))
        accepted(evaluate(policy, busy, Envelope(Stage.MAIL, sender="a@known.example")))
        accepted(evaluate(policy, busy, rcpt("r@example.com")))


# ===========================================================================
# Content checks at the end of DATA


class TestContent:
    def test_attachment_size(self) -> None:
        policy = make_policy({"general": {"max_attachment_size_mb": 1}})
        v = evaluate(policy, session(), eod(MessageFacts(size=100, largest_attachment=MIB + 1)))
        expect(v, 552, "5.3.4", "Error: attachment too big", "general.max_attachment_size_mb")
        accepted(evaluate(policy, session(), eod(MessageFacts(size=100, largest_attachment=MIB))))
        accepted(
            evaluate(
                make_policy(), session(), eod(MessageFacts(size=100, largest_attachment=10**9))
            )
        )

    def test_auto_forwarded_mail_may_not_leave(self) -> None:
        policy = make_policy({"general": {"disable_auto_forwarding": True}})
        fwd = MessageFacts(size=100, auto_forwarded=True)
        v = evaluate(
            policy, session(), eod(fwd, recipients=["a@example.com", "b@elsewhere.example"])
        )
        text = "Error: auto-forwarded mail may not leave our domains"
        expect(v, 550, "5.7.1", text, "general.disable_auto_forwarding")
        assert v.evidence[0].value == "b@elsewhere.example"

    @pytest.mark.parametrize(
        ("auto", "recipients", "on"),
        [
            (True, ["a@example.com", "B@EXAMPLE.COM."], True),
            (False, ["b@elsewhere.example"], True),
            (True, ["b@elsewhere.example"], False),
        ],
    )
    def test_auto_forwarding_silent(self, auto: bool, recipients: list[str], on: bool) -> None:
        policy = make_policy({"general": {"disable_auto_forwarding": on}})
        facts = MessageFacts(size=100, auto_forwarded=auto)
        accepted(evaluate(policy, session(), eod(facts, recipients=recipients)))

    def test_auto_forwarding_judges_the_real_destination(self) -> None:
        policy = make_policy({"general": {"disable_auto_forwarding": True}})
        facts = MessageFacts(size=100, auto_forwarded=True)
        v = evaluate(policy, session(), eod(facts, recipients=["u%elsewhere.example@example.com"]))
        assert v.rule == "general.disable_auto_forwarding"


# ===========================================================================
# Protocol checks: pipelining (DATA) and VRFY


class TestProtocol:
    def test_unauth_pipelining(self) -> None:
        policy = make_policy({"security": {"advanced": {"reject_unauth_pipelining": True}}})
        env = Envelope(Stage.DATA, sender="a@known.example", recipients=("r@example.com",))
        v = evaluate(policy, session(improper_pipelining=True), env)
        text = "<DATA>: Data command rejected: Improper use of SMTP command pipelining"
        expect(v, 503, "5.5.0", text, "security.advanced.reject_unauth_pipelining")
        accepted(evaluate(policy, session(), env))
        accepted(evaluate(make_policy(), session(improper_pipelining=True), env))

    def test_vrfy(self) -> None:
        env = Envelope(Stage.VRFY, recipient="r@example.com")
        v = evaluate(make_policy(), session(), env)
        expect(v, 502, "5.5.1", "VRFY command is disabled", "security.advanced.disable_vrfy")
        on = make_policy({"security": {"advanced": {"disable_vrfy": False}}})
        accepted(evaluate(on, session(), env))


# ===========================================================================
# DNS questions: lookups() and missing facts


EVERY_DNS_CHECK = CASCADE_POLICY


class TestLookups:
    def test_ptr_then_forward_in_two_rounds(self) -> None:
        policy = client_policy(forward=True)
        zone = standard_zone()
        _, rounds = resolve(policy, session(), rcpt("r@example.com"), zone)
        assert rounds == [{q(OUTSIDER, "PTR")}, {q(OUTSIDER_HELO, "A")}]
        _, rounds = resolve(policy, session("2001:db8::10"), rcpt("r@example.com"), zone)
        assert rounds == [{q("2001:db8::10", "PTR")}, {q("v6.example.com", "AAAA")}]

    def test_no_ptr_means_no_forward_question(self) -> None:
        _, rounds = resolve(
            client_policy(forward=True), session("192.0.2.12"), rcpt("r@example.com"), Zone()
        )
        assert rounds == [{q("192.0.2.12", "PTR")}]

    def test_independent_questions_are_asked_together(self) -> None:
        policy = make_policy(EVERY_DNS_CHECK)
        sess = session(BL_CLIENT, helo="mail.example.org")
        env = rcpt("r@partner.example", sender="a@known.example")
        zone = Zone(default=NODATA)
        zone.set(BL_CLIENT, "PTR", answer("ptr.example.net"))
        zone.set("mail.example.org", "A", answer("192.0.2.1"))
        zone.set("known.example", "A", answer("192.0.2.60"))
        zone.set("partner.example", "MX", answer("10 mx.partner.example"))
        _, rounds = resolve(policy, sess, env, zone)
        first = {
            q(BL_QUERY, "A"),
            q(BL_CLIENT, "PTR"),
            # a domain's MX first, as Postfix asks
            *(q(d, "MX") for d in ("mail.example.org", "known.example", "partner.example")),
        }
        assert rounds[0] == first
        # then, together: the PTR name forward, and A and AAAA where no MX was
        # found (partner.example has one: nothing more is asked about it)
        second = {
            q("ptr.example.net", "A"),
            *(q(d, t) for d in ("mail.example.org", "known.example") for t in ("A", "AAAA")),
        }
        assert rounds[1:] == [second]

    def test_a_final_decision_needs_nothing_after_it(self) -> None:
        policy = make_policy(EVERY_DNS_CHECK)
        # the relay refuses before any DNS check runs
        assert lookups(policy, session(), rcpt("r@elsewhere.example")) == frozenset()
        # a listed client: the later questions are not asked in the next round
        zone = Zone({q(BL_QUERY, "A"): answer("127.0.0.2")}, default=NXDOMAIN)
        sess, rounds = resolve(policy, session(BL_CLIENT), rcpt("r@partner.example"), zone)
        assert len(rounds) == 1
        assert evaluate(policy, sess, rcpt("r@partner.example")).rule == (
            "security.advanced.dnsbl.bl.example"
        )

    def test_disabled_checks_ask_nothing(self) -> None:
        policy = make_policy()
        sess = session("198.51.100.7", helo="bad_name!")
        env = rcpt("r@example.com", sender="a@gone.example")
        assert lookups(policy, sess, env) == frozenset()
        accepted(evaluate(policy, sess, env))

    def test_trusted_clients_ask_nothing(self) -> None:
        policy = make_policy(
            {**EVERY_DNS_CHECK, "relay": {"trusted_networks": ["198.51.100.0/24"]}}
        )
        assert lookups(policy, session(BL_CLIENT), rcpt("r@elsewhere.example")) == frozenset()

    def test_other_stages_ask_nothing(self) -> None:
        policy = all_on_policy()
        for env in (
            Envelope(Stage.CONNECT),
            Envelope(Stage.MAIL, sender="a@gone.example"),
            Envelope(Stage.DATA, sender="a@gone.example", recipients=("r@example.com",)),
            eod(MessageFacts(size=1)),
            Envelope(Stage.VRFY, recipient="r@example.com"),
        ):
            assert lookups(policy, session(), env) == frozenset()


class TestMissingDns:
    @pytest.mark.parametrize(
        ("mapping", "rule", "question"),
        [
            (
                {"advanced": {"dnsbl": ["bl.example"]}},
                "security.advanced.dnsbl.bl.example",
                f"{BL_QUERY}/A",
            ),
            (
                {"connection_policy": {"reject_unknown_reverse_client_hostname": True}},
                REVERSE,
                f"{BL_CLIENT}/PTR",
            ),
            (
                {"connection_policy": {"reject_unknown_client_hostname": True}},
                FORWARD,
                f"{BL_CLIENT}/PTR",
            ),
            ({"advanced": {"reject_unknown_helo": True}}, UNKNOWN_HELO, "mail.example.org/MX"),
            (
                {"sender_policy": {"reject_unknown_sender_domain": True}},
                UNKNOWN_SENDER,
                "known.example/MX",
            ),
            (
                {"advanced": {"reject_unknown_recipient_domain": True}},
                UNKNOWN_RCPT,
                "partner.example/MX",
            ),
            (
                {"lists": [{"name": "hn", "list": "black", "client_hostname": ["example.org"]}]},
                "security.lists.hn",
                f"{BL_CLIENT}/PTR",
            ),
        ],
    )
    def test_missing_answer_is_a_temporary_failure_naming_the_rule(
        self, mapping: dict[str, Any], rule: str, question: str
    ) -> None:
        policy = make_policy(
            {"relay": {"inbound_domains": ["partner.example"]}, "security": mapping}
        )
        sess = session(BL_CLIENT, helo="mail.example.org")
        env = rcpt("r@partner.example", sender="a@known.example")
        v = evaluate(policy, sess, env)
        assert v.action is Action.DEFER
        assert v.reply == Reply(451, "4.3.0", "Temporary lookup failure")
        assert v.rule == rule
        assert question in {e.value for e in v.evidence}
        assert all(e.kind == "dns" and e.matched == "not supplied" for e in v.evidence)

    def test_forward_answer_missing(self) -> None:
        policy = client_policy(forward=True)
        sess = session().with_dns({q(OUTSIDER, "PTR"): answer(OUTSIDER_HELO)})
        v = evaluate(policy, sess, rcpt("r@example.com"))
        assert v.reply == Reply(451, "4.3.0", "Temporary lookup failure")
        assert v.rule == FORWARD
        assert [e.value for e in v.evidence] == [f"{OUTSIDER_HELO}/A"]

    def test_missing_answer_never_accepts_even_when_earlier_temp_pending(self) -> None:
        policy = temp_policy()
        sess = session(helo="slow.example").with_dns(
            {q("slow.example", t): SERVFAIL for t in ("MX", "A", "AAAA")}
        )
        v = evaluate(policy, sess, rcpt("r@example.com", sender="a@known.example"))
        assert v.reply is not None and v.reply.code == 451
        assert v.rule == UNKNOWN_SENDER


# ===========================================================================
# Verdicts explain themselves


class TestExplain:
    def test_refusal(self) -> None:
        v = judge(lists_policy(SPAMMERS), rcpt("r@example.com", sender="a@sub.spam.example"))
        line = v.explain()
        assert line.startswith("reject ")
        assert "rule=security.lists.spammers" in line
        assert '"554 5.7.1 <a@sub.spam.example>: Sender address rejected: Access denied"' in line
        assert "sender=a@sub.spam.example matched=spam.example" in line

    def test_dns_evidence(self) -> None:
        zone = Zone({q(BL_QUERY, "A"): answer("127.0.0.2")})
        line = judge(dnsbl_policy(), rcpt("r@example.com"), session(BL_CLIENT), zone).explain()
        assert "rule=security.advanced.dnsbl.bl.example" in line
        assert f"{BL_QUERY}/A=127.0.0.2" in line

    def test_plain_acceptance(self) -> None:
        assert judge(make_policy(), rcpt("r@example.com")).explain() == "accept"
