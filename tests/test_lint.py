"""Policy lint (``mailpolicy check``): what it finds, what it leaves alone, how fast."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from mailpolicy.cli import main
from mailpolicy.config import settings_from_mapping
from mailpolicy.lint import Finding, check_settings
from mailpolicy.passwords import hash_password

ROOT = Path(__file__).parent.parent


def lint(data: dict[str, Any]) -> list[Finding]:
    data.setdefault("general", {}).setdefault("hostname", "mx.example.com")
    return check_settings(settings_from_mapping(data))


def keys(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.severity, f.key) for f in findings]


def rules(*specs: dict[str, Any]) -> dict[str, Any]:
    return {"security": {"lists": list(specs)}}


def test_a_clean_policy_has_no_findings() -> None:
    assert lint({"general": {"local_domains": ["example.com"]}}) == []


def test_the_example_policy_has_only_what_it_shows_off() -> None:
    from mailpolicy.config import load_settings

    # It fills in a relay host in direct mode, and an account with no TLS to log in over.
    found = check_settings(load_settings(ROOT / "examples/policy.toml"))
    assert keys(found) == [
        ("warning", "delivery.relay_host"),
        ("warning", "general.smtp_auth.no_plaintext_without_tls"),
    ]


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0"])
def test_a_trusted_network_of_everyone_is_an_open_relay(net: str) -> None:
    (f,) = lint({"relay": {"trusted_networks": [net]}})
    assert (f.severity, f.key) == ("error", "relay.trusted_networks[0]")
    assert "open relay" in f.message


def test_wide_networks_are_warned_about() -> None:
    found = lint(
        {
            "relay": {"trusted_networks": ["192.0.2.0/24", "10.0.0.0/7", "2001:db8::/16"]},
            "general": {"smtp_auth": {"local_networks": ["127.0.0.0/8", "0.0.0.0/0"]}},
        }
    )
    assert keys(found) == [
        ("error", "general.smtp_auth.local_networks[1]"),
        ("warning", "relay.trusted_networks[1]"),
        ("warning", "relay.trusted_networks[2]"),
    ]
    # local networks that may not relay without AUTH are not a relay problem
    assert lint({"general": {"smtp_auth": {"local_networks": ["0.0.0.0/0"]}}})[0].severity == (
        "error"
    )
    assert (
        lint(
            {
                "general": {
                    "smtp_auth": {"local_networks": ["0.0.0.0/0"], "skip_for_local_network": False}
                }
            }
        )
        == []
    )


def test_black_entries_a_white_rule_overrides() -> None:
    found = lint(
        rules(
            {"name": "ok", "list": "white", "sender": ["partner.example", "boss@"]},
            {"name": "okc", "list": "white", "client": ["192.0.2.0/24"]},
            {
                "name": "bad",
                "sender": ["partner.example", "x@mail.partner.example", "boss@corp.example"],
            },
            {"name": "badc", "client": ["192.0.2.64/26", "198.51.100.0/24"]},
            # a white rule with two criteria matches less: no finding
            {"name": "narrow", "list": "white", "sender": ["v.example"], "client": ["203.0.113.1"]},
            {"name": "bad2", "sender": ["v.example"]},
            # black covering white is the usual "all but" pattern: no finding
            {"name": "all", "sender": ["example.org"]},
            {"name": "but", "list": "white", "sender": ["good.example.org"]},
        )
    )
    assert keys(found) == [
        ("warning", "security.lists[2].sender[0]"),
        ("warning", "security.lists[2].sender[1]"),  # redundant in its own rule
        ("warning", "security.lists[2].sender[1]"),
        ("warning", "security.lists[2].sender[2]"),
        ("warning", "security.lists[3].client[0]"),
    ]
    assert "also allows it" in found[0].message
    assert "redundant" in found[1].message
    assert 'allows "partner.example", which covers it' in found[2].message
    assert 'allows "boss@"' in found[3].message
    assert '"okc"' in found[4].message


def test_shadowed_and_redundant_entries() -> None:
    found = lint(
        rules(
            {"name": "a", "client": ["192.0.2.0/24"], "sender": ["spam.example"]},
            {"name": "nets", "client": ["198.51.100.0/24", "198.51.100.0/25"]},
            {"name": "later", "client": ["198.51.100.7"], "helo": ["h.example"]},
            {"name": "s1", "sender": ["spam.example", "a@spam.example", "spam.example"]},
            {"name": "s2", "sender": ["spam.example", "sub.spam.example"]},
            {"name": "h1", "helo": ["bad.example"]},
            {"name": "h2", "helo": ["x.bad.example", "bad.example"]},
            {"name": "dup", "client": ["192.0.2.0/24"], "sender": ["spam.example"]},
        )
    )
    assert keys(found) == [
        ("warning", "security.lists[1].client[1]"),  # redundant in its rule
        ("warning", "security.lists[2].client[0]"),  # the first rule's network wins
        ("warning", "security.lists[3].sender[1]"),  # redundant
        ("warning", "security.lists[3].sender[2]"),  # twice
        ("warning", "security.lists[4].sender[0]"),  # same entry earlier
        ("warning", "security.lists[4].sender[1]"),  # redundant in its own rule
        ("warning", "security.lists[6].helo[0]"),  # redundant in its own rule
        ("warning", "security.lists[6].helo[1]"),  # same entry earlier
        ("warning", "security.lists[7]"),  # same criteria as rule 0
    ]
    # a more specific name in a later rule is not shadowed: the most specific wins
    assert "redundant" in found[5].message and "never decides" not in found[5].message


def test_settings_with_no_effect() -> None:
    pw = hash_password("x", ln=4)
    found = lint(
        {
            "general": {
                "external_postmasters": ["admin@example.net"],
                "max_message_size_mb": 5,
                "max_attachment_size_mb": 5,
                "smtp_auth": {"sender_must_match_login": True},
            },
            "relay": {"inbound_domains": []},
            "delivery": {
                "mode": "direct",
                "relay_host": {"host": "smarthost.example.net", "security": "starttls"},
            },
            "security": {
                "sender_policy": {"reject_unauthenticated_local_sender": True},
                "lists": [
                    {
                        "name": "w",
                        "list": "white",
                        "recipient": ["x@elsewhere.example"],
                        "text": "t",
                    },
                    {"name": "d", "action": "discard", "sender": ["a.example"], "text": "t"},
                ],
            },
        }
    )
    assert keys(found) == [
        ("warning", "security.lists[0].text"),
        ("warning", "security.lists[0].recipient[0]"),
        ("warning", "security.lists[1].text"),
        ("warning", "delivery.relay_host"),
        ("warning", "general.smtp_auth.sender_must_match_login"),
        ("warning", "security.sender_policy.reject_unauthenticated_local_sender"),
        ("warning", "general.external_postmasters"),
        ("warning", "general.max_attachment_size_mb"),
    ]
    found = lint(
        {
            "general": {"local_domains": ["example.com"], "smtp_auth": {"enabled": False}},
            "relay": {"inbound_domains": ["example.com", "corp.example"]},
            "accounts": {"a": {"password_hash": pw}},
            "delivery": {
                "exceptions": [
                    {
                        "name": "e",
                        "match": "recipient",
                        "targets": ["x@example.com", "other.example"],
                        "host": "relay.example.net",
                    }
                ]
            },
            "security": {
                "lists": [
                    {
                        "name": "w",
                        "list": "white",
                        "recipient": ["a@example.com", "b@x.corp.example", "abuse@"],
                    },
                    {"name": "w2", "list": "white", "recipient": ["com"]},
                ]
            },
        }
    )
    assert keys(found) == [
        ("warning", "delivery.exceptions[0].targets[0]"),
        ("warning", "accounts"),
        ("warning", "relay.inbound_domains[0]"),
    ]
    found = lint(
        {
            "general": {"smtp_auth": {"sender_must_match_login": True}},
            "accounts": {"a": {"password_hash": pw}},
        }
    )
    assert keys(found) == [
        ("warning", "general.smtp_auth.no_plaintext_without_tls"),
        ("warning", "accounts.a.addresses"),
    ]


def test_big_lists_are_checked_in_linear_time() -> None:
    n = 100_000
    data = rules(
        {"name": "w", "list": "white", "sender": [f"u{i}@ok{i % 100}.example" for i in range(n)]},
        {"name": "b", "sender": [f"s{i}.spam.example" for i in range(n)]},
        {"name": "c", "client": [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]},
        {"name": "h", "helo": [f"h{i}.example" for i in range(n)]},
    )
    settings = settings_from_mapping({"general": {"hostname": "mx.example.com"}, **data})
    start = time.perf_counter()
    assert check_settings(settings) == []
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------------
# the command


def test_check_command_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[general]\nhostname = "mx.example.com"\n')
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: no problems found\n"

    warn = tmp_path / "warn.toml"
    warn.write_text(
        '[general]\nhostname = "mx.example.com"\nexternal_postmasters = ["a@example.net"]\n'
    )
    assert main(["check", str(warn)]) == 0
    out = capsys.readouterr().out
    assert "warning: general.external_postmasters" in out and "0 errors, 1 warning" in out

    bad = tmp_path / "bad.toml"
    bad.write_text('[general]\nhostname = "mx.example.com"\n[relay]\ntrusted_networks = ["::/0"]\n')
    assert main(["check", str(bad)]) == 1
    assert "1 error, 0 warnings" in capsys.readouterr().out

    broken = tmp_path / "broken.toml"
    broken.write_text("[general]\nhostname = 3\nbogus = 1\n")
    assert main(["check", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "general.hostname" in err and "general.bogus" in err

    assert main(["check", "--json", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.startswith('{"severity": "error", "key": "relay.trusted_networks[0]"')
