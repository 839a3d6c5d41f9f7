"""The policy-file loader: what it accepts, what it refuses, and how it says so."""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import pickle
import re
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailpolicy import config
from mailpolicy.config import PolicyError, PolicyIssue, load_settings, settings_from_mapping
from mailpolicy.settings import (
    DnsblZone,
    GeneralSettings,
    RelayHost,
    Settings,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policy.toml"
CONFORMANCE = ROOT / "tests" / "conformance"
MACHINE = "host.example.net"
HASH = "$scrypt$ln=14,r=8,p=1$cIWhMoydMXIaOhvGcZtMMw$ohojQH3yFBWUo9eVdEGmrCGRf6SFiXCwV9Dxi4e01dU"


@pytest.fixture(autouse=True)
def _machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # getfqdn() may ask DNS; tests must not depend on the machine.
    monkeypatch.setattr(config, "machine_hostname", lambda: MACHINE)


def refused(data: Any) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        settings_from_mapping(data, "t.toml")
    return info.value


# ---------------------------------------------------------------------------
# Files


def test_example_loads() -> None:
    s = load_settings(EXAMPLE)
    assert s.general.hostname == "mx.example.com"
    assert s.general.local_domains == ("example.com",)
    assert s.server.smtp == "127.0.0.1:2525"
    assert s.server.tls_cert is None
    assert s.delivery.mode == "direct"
    assert s.delivery.maildir == "maildir"
    assert s.dns.nameservers == ()
    (alice,) = s.accounts
    assert alice.name == "alice"
    assert alice.password_hash.startswith("$scrypt$ln=14,r=8,p=1$")
    (exc,) = s.delivery.exceptions
    assert exc.relay_host == RelayHost("mx.partner.example", 25, "starttls")
    assert [r.action for r in s.security.lists] == ["allow", "reject", "reject", "discard"]


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    """Key paths of parsed TOML in the reference's notation."""
    out: set[str] = set()
    for key, item in value.items():
        path = f"{prefix}.{key}" if prefix else key
        if prefix == "accounts":
            path = "accounts.NAME"
        else:
            out.add(path)
        if isinstance(item, dict):
            out |= _key_paths(item, path)
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            for element in item:
                out |= _key_paths(element, f"{path}[]")
    if prefix == "accounts":
        out.add("accounts.NAME")
    return out


def _uncommented_example() -> str:
    # Settings the example shows commented out (TLS files, ...) are "# key = value" lines.
    return re.sub(r"(?m)^# ([a-z_]+ = )", r"\1", EXAMPLE.read_text(encoding="utf-8"))


def test_example_shows_every_key() -> None:
    from test_settings_doc import code_keys

    shown = _key_paths(tomllib.loads(_uncommented_example()))
    assert shown == set(code_keys())


def test_example_with_commented_settings_enabled_loads() -> None:
    s = settings_from_mapping(tomllib.loads(_uncommented_example()))
    assert s.server.smtps == "127.0.0.1:2465"
    assert s.delivery.exceptions[0].relay_host.password_env == "PARTNER_PASSWORD"


def test_example_password_is_wonderland() -> None:
    import base64
    import hashlib

    (alice,) = load_settings(EXAMPLE).accounts
    _, _, params, salt, digest = alice.password_hash.split("$")
    p = dict(kv.split("=") for kv in params.split(","))

    def unb64(x: str) -> bytes:
        return base64.b64decode(x + "=" * (-len(x) % 4))

    dk = hashlib.scrypt(
        b"wonderland",
        salt=unb64(salt),
        n=2 ** int(p["ln"]),
        r=int(p["r"]),
        p=int(p["p"]),
        dklen=32,
    )
    assert dk == unb64(digest)


def test_path_like_and_str(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[general]\nhostname = "mx.example.com"\n')
    assert load_settings(f) == load_settings(str(f))


def test_bad_toml_names_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[general]\nhostname = "mx.example.com"\nmax_hops = = 3\n')
    with pytest.raises(PolicyError) as info:
        load_settings(f)
    err = info.value
    assert err.source == str(f)
    assert err.key == ""
    assert "line 3" in err.reason and "column" in err.reason
    assert str(err) == f"{f}: {err.reason}"


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.toml"
    f.write_bytes(b'[general]\nbanner = "caf\xe9"\n')
    with pytest.raises(PolicyError, match="UTF-8"):
        load_settings(f)


def test_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load_settings(f)
    assert info.value.source == str(f)
    assert "cannot read" in info.value.reason
    assert "No such file" in info.value.reason


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_settings(tmp_path)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[general]\nmax_hops = -1\n")
    with pytest.raises(PolicyError) as info:
        load_settings(f)
    assert str(info.value).startswith(f"{f}: general.max_hops: ")


@pytest.mark.parametrize("case", sorted(CONFORMANCE.glob("*.json")), ids=lambda p: p.stem)
def test_conformance_policies_load(case: Path) -> None:
    data = json.loads(case.read_text())
    settings_from_mapping(data.get("policy", {}), str(case))


# ---------------------------------------------------------------------------
# Defaults


def test_empty_policy_is_the_defaults() -> None:
    assert settings_from_mapping({}) == Settings()


def test_empty_tables_are_the_defaults() -> None:
    tables = ["general", "delivery", "relay", "security", "replies", "server", "dns", "accounts"]
    data: dict[str, Any] = {t: {} for t in tables}
    data["general"] = {"smtp_auth": {}}
    data["security"] = {"sender_policy": {}, "connection_policy": {}, "advanced": {}}
    assert settings_from_mapping(data) == Settings()


def test_hostname_given_is_used() -> None:
    s = settings_from_mapping({"general": {"hostname": "MX.Example.COM."}})
    assert s == Settings(general=GeneralSettings(hostname="mx.example.com"))


def _never() -> str:
    raise AssertionError("the loader asked for a default hostname")


def test_mapping_loader_never_asks_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_hostname", _never)
    monkeypatch.setattr(socket, "getfqdn", _never)
    assert settings_from_mapping({}).general.hostname == "localhost.localdomain"


def test_default_hostname_is_asked_only_when_absent() -> None:
    given = settings_from_mapping(
        {"general": {"hostname": "mx.example.com"}}, default_hostname=_never
    )
    assert given.general.hostname == "mx.example.com"
    absent = settings_from_mapping({"general": {}}, default_hostname=lambda: "Box.Example.")
    assert absent == Settings(general=GeneralSettings(hostname="box.example"))


def test_a_file_without_hostname_gets_the_machines(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[general]\nmax_hops = 3\n")
    assert load_settings(f).general == GeneralSettings(hostname=MACHINE, max_hops=3)
    f.write_text("")
    assert load_settings(f) == Settings(general=GeneralSettings(hostname=MACHINE))


def test_machine_fqdn_is_lower_cased(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.undo()
    monkeypatch.setattr(socket, "getfqdn", lambda: "Box.LAN.Example")
    f = tmp_path / "p.toml"
    f.write_text("")
    assert load_settings(f).general.hostname == "box.lan.example"


# ---------------------------------------------------------------------------
# Accepted values

Check = Callable[[Settings], bool]

ACCEPTED: list[tuple[str, dict[str, Any], Check]] = [
    (
        "single-label domains",
        {"general": {"local_domains": ["localdomain", "Example.COM."]}},
        lambda s: s.general.local_domains == ("localdomain", "example.com"),
    ),
    (
        "sizes take decimals",
        {"general": {"max_message_size_mb": 0.5, "max_attachment_size_mb": 2}},
        lambda s: s.general.max_message_size == 524288,
    ),
    (
        "zero is unlimited",
        {"general": {"max_recipients": 0, "max_message_size_mb": 0}},
        lambda s: s.general.max_recipients == 0,
    ),
    (
        "host bits are cleared",
        {"relay": {"trusted_networks": ["192.0.2.1/24", "2001:db8::1", " 10.0.0.0/8 "]}},
        lambda s: (
            [str(n) for n in s.relay.trusted_networks]
            == ["192.0.2.0/24", "2001:db8::1/128", "10.0.0.0/8"]
        ),
    ),
    (
        "banner kept as written",
        {"general": {"banner": "$hostname ready"}},
        lambda s: s.general.banner == "$hostname ready",
    ),
    (
        "list value forms",
        {
            "security": {
                "lists": [
                    {
                        "name": "x",
                        "sender": ["<>", "user@", "A@B.Example", "b.example", "single"],
                        "recipient": ["postmaster@", "r@example.com"],
                    }
                ]
            }
        },
        lambda s: (
            s.security.lists[0].sender == ("<>", "user@", "a@b.example", "b.example", "single")
        ),
    ),
    (
        "white rule allows by default",
        {"security": {"lists": [{"name": "w", "list": "white", "client": ["192.0.2.1"]}]}},
        lambda s: s.security.lists[0].action == "allow",
    ),
    (
        "black rule rejects by default",
        {"security": {"lists": [{"name": "b", "helo": ["bad.example"]}]}},
        lambda s: (s.security.lists[0].list, s.security.lists[0].action) == ("black", "reject"),
    ),
    (
        "black rule may discard",
        {"security": {"lists": [{"name": "b", "action": "discard", "sender": ["x.example"]}]}},
        lambda s: s.security.lists[0].action == "discard",
    ),
    (
        "dnsbl zones",
        {"security": {"advanced": {"dnsbl": ["zen.example", "bl.example=127.0.0.2"]}}},
        lambda s: (
            s.security.advanced.dnsbl
            == (
                DnsblZone("zen.example"),
                DnsblZone("bl.example", ipaddress.IPv4Address("127.0.0.2")),
            )
        ),
    ),
    (
        "relay mode",
        {
            "delivery": {
                "mode": "relay",
                "relay_host": {
                    "host": "smtp.isp.example",
                    "port": 465,
                    "security": "tls",
                    "username": "me",
                    "password_env": "RELAY_PW",
                },
            }
        },
        lambda s: (
            s.delivery.relay_host == RelayHost("smtp.isp.example", 465, "tls", "me", "RELAY_PW")
        ),
    ),
    (
        "relay host by IP",
        {"delivery": {"relay_host": {"host": "2001:db8::25"}}},
        lambda s: s.delivery.relay_host == RelayHost("2001:db8::25"),
    ),
    (
        "exception with inline host",
        {
            "delivery": {
                "exceptions": [
                    {
                        "name": "p",
                        "match": "sender",
                        "targets": ["a@b.example", "c.example"],
                        "host": "relay.example",
                        "port": 2525,
                    }
                ]
            }
        },
        lambda s: s.delivery.exceptions[0].relay_host == RelayHost("relay.example", 2525),
    ),
    (
        "listeners",
        {
            "server": {
                "smtp": "[::1]:2525",
                "submission": "localhost:2587",
                "smtps": "0.0.0.0:2465",
                "tls_cert": "c.pem",
                "tls_key": "k.pem",
            }
        },
        lambda s: s.server.smtp == "[::1]:2525" and s.server.smtps == "0.0.0.0:2465",
    ),
    ("listener off", {"server": {"smtp": ""}}, lambda s: s.server.smtp is None),
    (
        "name servers",
        {"dns": {"nameservers": ["10.0.0.53", "10.0.0.54:5353", "2001:db8::53", "[::1]:53"]}},
        lambda s: s.dns.nameservers == ("10.0.0.53", "10.0.0.54:5353", "2001:db8::53", "[::1]:53"),
    ),
    ("timeout decimals", {"dns": {"timeout_seconds": 0.5}}, lambda s: s.dns.timeout_seconds == 0.5),
    (
        "accounts",
        {
            "accounts": {
                "alice": {
                    "password_hash": HASH,
                    "addresses": ["Alice@Example.com", "@example.org"],
                },
                "bob": {"password_hash": HASH},
            }
        },
        lambda s: (
            [(a.name, a.addresses) for a in s.accounts]
            == [("alice", ("alice@example.com", "@example.org")), ("bob", ())]
        ),
    ),
    (
        "reply codes",
        {"replies": {"unknown_address": 550, "relay_denied": 454}},
        lambda s: (s.replies.unknown_address, s.replies.relay_denied) == (550, 454),
    ),
]


@pytest.mark.parametrize(("data", "check"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(data: dict[str, Any], check: Check) -> None:
    assert check(settings_from_mapping(data))


# ---------------------------------------------------------------------------
# Refused values: (data, key path, part of the reason)


def rule(**kw: Any) -> dict[str, Any]:
    return {"security": {"lists": [{"name": "r", **kw}]}}


def exc(**kw: Any) -> dict[str, Any]:
    base = {"name": "e", "match": "recipient", "targets": ["x.example"], "host": "h.example"}
    return {"delivery": {"exceptions": [{**base, **kw}]}}


def acct(**kw: Any) -> dict[str, Any]:
    return {"accounts": {"alice": {"password_hash": HASH, **kw}}}


CLEAR = "clear passwords are not allowed; store password_hash made by `mailpolicy hash-password`"

REFUSED: list[tuple[Any, str, str]] = [
    # unknown keys
    ({"generl": {}}, "generl", "unknown key 'generl'; allowed keys: general, delivery"),
    ({"general": {"host_name": "x"}}, "general.host_name", "allowed keys: hostname, banner"),
    ({"security": {"advanced": {"vrfy": True}}}, "security.advanced.vrfy", "unknown key"),
    (rule(sender=["a.example"], senders=[]), "security.lists[0].senders", "unknown key"),
    (exc(relay_host={"host": "x"}), "delivery.exceptions[0].relay_host", "unknown key"),
    ({"general": {"Hostname": "x"}}, "general.Hostname", "unknown key"),
    ({"general": {"a b": 1}}, 'general."a b"', "unknown key"),
    # types
    ({"general": {"max_recipients": True}}, "general.max_recipients", "expected an integer"),
    ({"general": {"max_recipients": 10.0}}, "general.max_recipients", "expected an integer"),
    ({"general": {"max_recipients": "10"}}, "general.max_recipients", "expected an integer"),
    (
        {"general": {"disable_auto_forwarding": 1}},
        "general.disable_auto_forwarding",
        "true or false",
    ),
    ({"general": {"smtp_auth": {"enabled": "yes"}}}, "general.smtp_auth.enabled", "true or false"),
    (
        {"general": {"max_message_size_mb": True}},
        "general.max_message_size_mb",
        "expected a number",
    ),
    ({"general": {"max_message_size_mb": math.nan}}, "general.max_message_size_mb", "finite"),
    ({"general": {"max_message_size_mb": math.inf}}, "general.max_message_size_mb", "finite"),
    ({"general": {"banner": None}}, "general.banner", "got null"),
    ({"general": {"banner": 5}}, "general.banner", "expected a string"),
    ({"general": []}, "general", "expected a table"),
    ({"general": {"smtp_auth": "on"}}, "general.smtp_auth", "expected a table"),
    ({"general": {"local_domains": "example.com"}}, "general.local_domains", "expected an array"),
    ({"security": {"lists": {"name": "x"}}}, "security.lists", "expected an array"),
    ({"security": {"lists": ["x"]}}, "security.lists[0]", "expected a table"),
    ({"dns": {"timeout_seconds": True}}, "dns.timeout_seconds", "expected a number"),
    # limits
    ({"general": {"max_recipients": -1}}, "general.max_recipients", "must not be negative"),
    ({"general": {"max_hops": 0}}, "general.max_hops", "at least 1"),
    ({"general": {"max_message_size_mb": -0.5}}, "general.max_message_size_mb", "negative"),
    ({"general": {"max_attachment_size_mb": -1}}, "general.max_attachment_size_mb", "negative"),
    (
        {"security": {"connection_policy": {"max_connections_per_client": -1}}},
        "security.connection_policy.max_connections_per_client",
        "negative",
    ),
    (
        {"security": {"connection_policy": {"max_recipient_rate_per_client": -5}}},
        "security.connection_policy.max_recipient_rate_per_client",
        "negative",
    ),
    (
        {"security": {"connection_policy": {"rate_window_seconds": 0}}},
        "security.connection_policy.rate_window_seconds",
        "at least 1",
    ),
    ({"dns": {"timeout_seconds": 0}}, "dns.timeout_seconds", "greater than 0"),
    ({"dns": {"timeout_seconds": -1.5}}, "dns.timeout_seconds", "greater than 0"),
    # hostname
    ({"general": {"hostname": "localhost"}}, "general.hostname", "not fully qualified"),
    ({"general": {"hostname": "-mx.example.com"}}, "general.hostname", "not a valid domain"),
    ({"general": {"hostname": "mx-.example.com"}}, "general.hostname", "not a valid domain"),
    ({"general": {"hostname": "mx..example.com"}}, "general.hostname", "not a valid domain"),
    ({"general": {"hostname": "mx_1.example.com"}}, "general.hostname", "not a valid domain"),
    ({"general": {"hostname": "a" * 64 + ".example"}}, "general.hostname", "1-63"),
    ({"general": {"hostname": ("a" * 60 + ".") * 5 + "com"}}, "general.hostname", "253"),
    ({"general": {"hostname": "192.0.2.1"}}, "general.hostname", "IP address"),
    ({"general": {"hostname": "mx.example.123"}}, "general.hostname", "all digits"),
    ({"general": {"hostname": "mx.exämple.com"}}, "general.hostname", "xn--"),
    ({"general": {"hostname": ""}}, "general.hostname", "empty"),
    # domain lists and addresses
    (
        {"general": {"local_domains": ["ok.example", "bad domain"]}},
        "general.local_domains[1]",
        "domain",
    ),
    ({"relay": {"inbound_domains": ["-x.example"]}}, "relay.inbound_domains[0]", "domain"),
    (
        {"general": {"external_postmasters": ["postmaster"]}},
        "general.external_postmasters[0]",
        "not an address",
    ),
    (
        {"general": {"external_postmasters": ["a@b@c.example"]}},
        "general.external_postmasters[0]",
        "local part",
    ),
    # networks
    ({"relay": {"trusted_networks": ["192.0.2.300"]}}, "relay.trusted_networks[0]", "CIDR"),
    ({"relay": {"trusted_networks": ["192.0.2.0/33"]}}, "relay.trusted_networks[0]", "CIDR"),
    (
        {"general": {"smtp_auth": {"local_networks": ["127.0.0.0/8", "lan"]}}},
        "general.smtp_auth.local_networks[1]",
        "CIDR",
    ),
    (rule(client=["example.com"]), "security.lists[0].client[0]", "CIDR"),
    # list rules
    ({"security": {"lists": [{"sender": ["x.example"]}]}}, "security.lists[0].name", "required"),
    (rule(name="", sender=["x.example"]), "security.lists[0].name", "empty"),
    (rule(list="grey", sender=["x.example"]), "security.lists[0].list", '"black", "white"'),
    (rule(action="bounce", sender=["x.example"]), "security.lists[0].action", "expected one of"),
    (
        rule(action="allow", sender=["x.example"]),
        "security.lists[0].action",
        '"reject" or "discard"',
    ),
    (
        rule(list="white", action="reject", sender=["x.example"]),
        "security.lists[0].action",
        "white",
    ),
    (
        rule(list="white", action="discard", sender=["x.example"]),
        "security.lists[0].action",
        "white",
    ),
    (rule(), "security.lists[0]", "at least one non-empty criterion"),
    (rule(client=[], sender=[]), "security.lists[0]", "at least one non-empty criterion"),
    (rule(text="a\r\nb", sender=["x.example"]), "security.lists[0].text", "one line"),
    (rule(client_hostname=["bad host"]), "security.lists[0].client_hostname[0]", "domain"),
    (rule(helo=["x..y"]), "security.lists[0].helo[0]", "domain"),
    (rule(sender=["@x.example"]), "security.lists[0].sender[0]", "<> (the null sender)"),
    (rule(sender=["a@b@c.example"]), "security.lists[0].sender[0]", "not an address"),
    (rule(sender=["a b@c.example"]), "security.lists[0].sender[0]", "not an address"),
    (rule(sender=["a@"], recipient=["b@c@"]), "security.lists[0].recipient[0]", "not an address"),
    (rule(sender=[""]), "security.lists[0].sender[0]", "empty"),
    (rule(sender=["<x>"]), "security.lists[0].sender[0]", "domain"),
    (rule(recipient=["<>"]), "security.lists[0].recipient[0]", "domain"),
    (rule(sender=["(a)@b.example"]), "security.lists[0].sender[0]", "local part"),
    # dnsbl
    ({"security": {"advanced": {"dnsbl": ["bad..zone"]}}}, "security.advanced.dnsbl[0]", "zone"),
    ({"security": {"advanced": {"dnsbl": ["=127.0.0.2"]}}}, "security.advanced.dnsbl[0]", "zone"),
    (
        {"security": {"advanced": {"dnsbl": ["ok.example", "bl.example=127.0.0.300"]}}},
        "security.advanced.dnsbl[1]",
        "IPv4",
    ),
    (
        {"security": {"advanced": {"dnsbl": ["bl.example=::1"]}}},
        "security.advanced.dnsbl[0]",
        "IPv4",
    ),
    ({"security": {"advanced": {"dnsbl": [5]}}}, "security.advanced.dnsbl[0]", "expected a string"),
    # replies
    ({"replies": {"unknown_address": 399}}, "replies.unknown_address", "at least 400"),
    ({"replies": {"access_denied": 600}}, "replies.access_denied", "at most 599"),
    ({"replies": {"relay_denied": 250}}, "replies.relay_denied", "at least 400"),
    ({"replies": {"unknown_client": True}}, "replies.unknown_client", "expected an integer"),
    ({"replies": {"unknown_hostname": "450"}}, "replies.unknown_hostname", "expected an integer"),
    # delivery
    ({"delivery": {"mode": "smart"}}, "delivery.mode", '"direct", "relay"'),
    ({"delivery": {"mode": "relay"}}, "delivery.relay_host", 'required when mode is "relay"'),
    ({"delivery": {"relay_host": {}}}, "delivery.relay_host.host", "required"),
    ({"delivery": {"relay_host": "smtp.example"}}, "delivery.relay_host", "expected a table"),
    ({"delivery": {"relay_host": {"host": "bad host"}}}, "delivery.relay_host.host", "domain"),
    ({"delivery": {"relay_host": {"host": "[192.0.2.1]"}}}, "delivery.relay_host.host", "brackets"),
    (
        {"delivery": {"relay_host": {"host": "h.example", "port": 0}}},
        "delivery.relay_host.port",
        "at least 1",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "port": 65536}}},
        "delivery.relay_host.port",
        "65535",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "port": True}}},
        "delivery.relay_host.port",
        "integer",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "security": "ssl"}}},
        "delivery.relay_host.security",
        '"none", "may", "encrypt", "verify", "secure", "starttls", "tls"',
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "username": "u"}}},
        "delivery.relay_host.password_env",
        "required with username",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "password_env": "PW"}}},
        "delivery.relay_host.username",
        "required with password_env",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "username": "u", "password_env": "1PW"}}},
        "delivery.relay_host.password_env",
        "environment variable",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "username": "u", "password_env": "A-B"}}},
        "delivery.relay_host.password_env",
        "environment variable",
    ),
    (
        {"delivery": {"relay_host": {"host": "h.example", "password": "x"}}},
        "delivery.relay_host.password",
        "unknown key",
    ),
    ({"delivery": {"maildir": ""}}, "delivery.maildir", "empty"),
    (
        {
            "delivery": {
                "exceptions": [
                    {"match": "recipient", "targets": ["x.example"], "host": "h.example"}
                ]
            }
        },
        "delivery.exceptions[0].name",
        "required",
    ),
    (
        {
            "delivery": {
                "exceptions": [{"name": "e", "targets": ["x.example"], "host": "h.example"}]
            }
        },
        "delivery.exceptions[0].match",
        "required",
    ),
    (
        {"delivery": {"exceptions": [{"name": "e", "match": "sender", "host": "h.example"}]}},
        "delivery.exceptions[0].targets",
        "required",
    ),
    (
        {"delivery": {"exceptions": [{"name": "e", "match": "sender", "targets": ["x.example"]}]}},
        "delivery.exceptions[0].host",
        "required",
    ),
    (exc(match="both"), "delivery.exceptions[0].match", '"recipient", "sender"'),
    (exc(targets=[]), "delivery.exceptions[0].targets", "must not be empty"),
    (
        exc(targets=["x.example", "@y.example"]),
        "delivery.exceptions[0].targets[1]",
        "not an address",
    ),
    (exc(port=99999), "delivery.exceptions[0].port", "65535"),
    (exc(username="u"), "delivery.exceptions[0].password_env", "required with username"),
    # server
    ({"server": {"smtp": "localhost"}}, "server.smtp", "HOST:PORT"),
    ({"server": {"smtp": "127.0.0.1:0"}}, "server.smtp", "1 to 65535"),
    ({"server": {"smtp": "127.0.0.1:70000"}}, "server.smtp", "1 to 65535"),
    ({"server": {"smtp": "127.0.0.1:25x"}}, "server.smtp", "1 to 65535"),
    ({"server": {"smtp": "::1:2525"}}, "server.smtp", "brackets"),
    ({"server": {"smtp": "[::1]"}}, "server.smtp", "HOST:PORT"),
    ({"server": {"smtp": "[example.com]:25"}}, "server.smtp", "brackets hold an IPv6"),
    ({"server": {"smtp": "[::1]x25"}}, "server.smtp", "PORT after the brackets"),
    ({"server": {"smtp": "bad host:25"}}, "server.smtp", "domain"),
    ({"server": {"smtp": ":25"}}, "server.smtp", "empty"),
    ({"server": {"smtp": None}}, "server.smtp", "expected a string"),
    ({"server": {"tls_cert": "c.pem"}}, "server.tls_key", "required with tls_cert"),
    ({"server": {"tls_key": "k.pem"}}, "server.tls_cert", "required with tls_key"),
    ({"server": {"smtps": "0.0.0.0:465"}}, "server.smtps", "needs tls_cert and tls_key"),
    ({"server": {"submission": "0.0.0.0:587"}}, "server.submission", "needs tls_cert and tls_key"),
    # dns
    ({"dns": {"nameservers": ["dns.example"]}}, "dns.nameservers[0]", "IP address"),
    ({"dns": {"nameservers": ["10.0.0.1", "10.0.0.2:0"]}}, "dns.nameservers[1]", "1 to 65535"),
    ({"dns": {"nameservers": ["[::1]:53x"]}}, "dns.nameservers[0]", "1 to 65535"),
    ({"dns": {"nameservers": ["[10.0.0.1]:53"]}}, "dns.nameservers[0]", "IPv6"),
    # accounts
    ({"accounts": {"alice": {"password": "x"}}}, "accounts.alice.password", CLEAR),
    ({"accounts": {"alice": {"addresses": []}}}, "accounts.alice.password_hash", "required"),
    (
        acct(password_hash="$2b$12$abcdefghijklmnopqrstuv"),
        "accounts.alice.password_hash",
        "hash-password",
    ),
    (
        acct(password_hash="$scrypt$ln=14$abc$def"),
        "accounts.alice.password_hash",
        "$scrypt$ln=N,r=N,p=N$SALT$HASH",
    ),
    (
        acct(password_hash="$scrypt$ln=14,r=8,p=1$abc"),
        "accounts.alice.password_hash",
        "hash-password",
    ),
    (
        acct(password_hash="$scrypt$ln=14,r=8,p=1$a c$def"),
        "accounts.alice.password_hash",
        "hash-password",
    ),
    (acct(password_hash="wonderland"), "accounts.alice.password_hash", "hash-password"),
    (acct(password_hash=HASH + "$x"), "accounts.alice.password_hash", "hash-password"),
    (acct(password_hash=HASH + "="), "accounts.alice.password_hash", "hash-password"),
    # right shape, but the verifier could never use it
    (acct(password_hash=HASH.replace("ln=14", "ln=0")), "accounts.alice.password_hash", "again"),
    (acct(password_hash=HASH.replace("ln=14", "ln=40")), "accounts.alice.password_hash", "again"),
    (
        acct(password_hash="$scrypt$ln=14,r=8,p=1$c2FsdA$a2V5"),
        "accounts.alice.password_hash",
        "again",
    ),
    (acct(addresses=["alice"]), "accounts.alice.addresses[0]", "not an address"),
    (acct(addresses=["@"]), "accounts.alice.addresses[0]", "empty"),
    (acct(addresses="alice@example.com"), "accounts.alice.addresses", "expected an array"),
    (acct(name="alice"), "accounts.alice.name", "unknown key"),
    ({"accounts": {"alice": "secret"}}, "accounts.alice", "expected a table"),
    ({"accounts": ["alice"]}, "accounts", "expected a table"),
    ({"accounts": {"al ice": {"password_hash": HASH}}}, 'accounts."al ice"', "blanks"),
    # the whole policy
    ({1: {}}, "", "is not a string"),  # replay's JSON is str-keyed; a caller's dict may not be
]


@pytest.mark.parametrize(("data", "key", "reason"), REFUSED, ids=[r[1] or "<top>" for r in REFUSED])
def test_refused(data: Any, key: str, reason: str) -> None:
    err = refused(data)
    assert [(e.key, reason in e.reason) for e in err.errors][:1] == [(key, True)], err.report()
    assert err.key == key
    assert err.source == "t.toml"
    first = f"t.toml: {key}: {err.reason}" if key else f"t.toml: {err.reason}"
    assert str(err).splitlines()[0] == first
    # every problem, not only the first (a user fixes them all in one go)
    assert str(err) == err.report() and len(str(err).splitlines()) == len(err.errors)


def test_not_a_table_at_all() -> None:
    err = refused([])
    assert err.key == ""
    assert "table of settings" in err.reason


def test_clear_password_reason_is_exact() -> None:
    err = refused({"accounts": {"bob": {"password": "builder", "password_hash": HASH}}})
    assert err.errors == (PolicyIssue("t.toml", "accounts.bob.password", CLEAR),)


def test_duplicate_rule_names() -> None:
    lists = [{"name": n, "sender": ["x.example"]} for n in ("a", "b", "a")]
    err = refused({"security": {"lists": lists}})
    assert err.key == "security.lists[2].name"
    assert "security.lists[0]" in err.reason


def test_duplicate_exception_names() -> None:
    one = {"name": "e", "match": "recipient", "targets": ["x.example"], "host": "h.example"}
    err = refused({"delivery": {"exceptions": [one, one]}})
    assert err.key == "delivery.exceptions[1].name"


def test_unknown_key_lists_every_allowed_key() -> None:
    err = refused({"dns": {"servers": []}})
    assert err.reason == "unknown key 'servers'; allowed keys: nameservers, timeout_seconds"


# ---------------------------------------------------------------------------
# All problems at once


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    f = tmp_path / "many.toml"
    f.write_text(
        """
[general]
hostname = "nodot"
max_recipients = true
colour = "blue"

[[security.lists]]
name = "a"
sender = ["@x"]

[[security.lists]]
name = "a"
list = "white"
action = "reject"
client = ["1.2.3.4/33"]

[server]
smtps = "0.0.0.0:465"

[accounts.bob]
password = "builder"
"""
    )
    with pytest.raises(PolicyError) as info:
        load_settings(f)
    err = info.value
    assert [e.key for e in err.errors] == [
        "general.hostname",
        "general.max_recipients",
        "general.colour",
        "security.lists[0].sender[0]",
        "security.lists[1].name",
        "security.lists[1].client[0]",
        "security.lists[1].action",
        "server.smtps",
        "accounts.bob.password",
        "accounts.bob.password_hash",
    ]
    assert all(e.source == str(f) for e in err.errors)
    assert (err.key, err.reason) == (err.errors[0].key, err.errors[0].reason)
    assert str(err) == "\n".join(str(e) for e in err.errors)
    assert err.report().splitlines() == [str(e) for e in err.errors]


def test_a_bad_value_is_not_also_reported_as_missing() -> None:
    err = refused({"delivery": {"mode": "relay", "relay_host": {"host": "bad host"}}})
    assert [e.key for e in err.errors] == ["delivery.relay_host.host"]


def test_error_pickles() -> None:
    err = refused({"general": {"max_hops": 0, "max_recipients": -1}})
    back = pickle.loads(pickle.dumps(err))
    assert (back.source, back.key, back.reason, back.errors) == (
        err.source,
        err.key,
        err.reason,
        err.errors,
    )
    assert str(back) == str(err)


def test_single_problem_error() -> None:
    err = PolicyError("f.toml", "", "not valid TOML")
    assert str(err) == "f.toml: not valid TOML"
    assert err.errors == (PolicyIssue("f.toml", "", "not valid TOML"),)


# ---------------------------------------------------------------------------
# Garbage never escapes as anything but PolicyError


def _names() -> list[str]:
    from test_settings_doc import code_keys

    names: set[str] = set()
    for key in code_keys():
        names.update(p.removesuffix("[]") for p in key.split("."))
    names.discard("NAME")
    return sorted(names | {"alice", "password"})


KEYS = st.sampled_from(_names()) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "",
            "<>",
            "@",
            "a@",
            "a@b.example",
            "example.com",
            "192.0.2.1/24",
            "::1",
            "[::1]:25",
            "127.0.0.1:2525",
            "relay",
            "white",
            "discard",
            "starttls",
            "bl.example=127.0.0.2",
            HASH,
        ]
    )
)
GARBAGE = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


def _outcome(data: Any) -> None:
    try:
        result = settings_from_mapping(data)
    except PolicyError as e:
        assert e.errors
        assert all(isinstance(i.reason, str) and i.reason for i in e.errors)
    else:
        assert isinstance(result, Settings)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, GARBAGE, max_size=6))
def test_garbage_mappings_only_raise_policy_error(data: dict[str, Any]) -> None:
    _outcome(data)


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))] or [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))] or [path]
    return [path]


EXAMPLE_DATA = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
EXAMPLE_LEAVES = _leaves(EXAMPLE_DATA)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(EXAMPLE_LEAVES), GARBAGE), min_size=1, max_size=3))
def test_damaged_example_only_raises_policy_error(
    damage: list[tuple[tuple[Any, ...], Any]],
) -> None:
    data = copy.deepcopy(EXAMPLE_DATA)
    for path, value in damage:
        target = data
        for step in path[:-1]:
            target = target[step]
        if path:
            target[path[-1]] = value
    _outcome(data)
