"""Settings written as a policy mapping read back the same.

``settings_to_mapping`` writes with the loader's own schema; whatever valid
settings it is given (lists, exceptions, relay hosts, DNSBL answer filters,
networks, listeners switched off...), ``settings_from_mapping`` must read the
JSON of its output back to equal settings: without accounts by default, with
them when asked.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailpolicy.adapters import capture, replay
from mailpolicy.config import settings_from_mapping, settings_to_mapping
from mailpolicy.model import Networks
from mailpolicy.settings import (
    Account,
    AdvancedSettings,
    ConnectionPolicy,
    DeliveryException,
    DeliverySettings,
    DnsblZone,
    DnsSettings,
    GeneralSettings,
    ListRule,
    RelayHost,
    RelaySettings,
    Replies,
    SecuritySettings,
    SenderPolicy,
    ServerSettings,
    Settings,
    SmtpAuthSettings,
)

HASH = "$scrypt$ln=14,r=8,p=1$cIWhMoydMXIaOhvGcZtMMw$ohojQH3yFBWUo9eVdEGmrCGRf6SFiXCwV9Dxi4e01dU"

NETWORKS = st.sampled_from(
    ["192.0.2.0/24", "198.51.100.7", "10.1.2.3/8", "2001:db8::/32", "::1/128", "0.0.0.0/0"]
)
DOMAINS = st.sampled_from(["example.com", "mail.example.org", "xn--bcher-kva.example", "a.b.c"])
ADDRESSES = st.sampled_from(["postmaster@example.com", "a.b+c@mail.example.org", "x@a.b.c"])
HOSTNAMES = st.sampled_from(["mx.example.com", "localhost.localdomain", "mail.example.org"])
COUNTS = st.integers(0, 10**6)
SIZES = st.integers(0, 500) | st.floats(0, 500, allow_nan=False, allow_infinity=False)


def tuples(elements: st.SearchStrategy[Any], **kw: Any) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(elements, max_size=4, **kw).map(tuple)


def flags(cls: type) -> dict[str, st.SearchStrategy[bool]]:
    """Every field of ``cls`` (all booleans, but the ``text`` table) varied."""
    return {f.name: st.booleans() for f in attrs.fields(cls) if f.name != "text"}


@st.composite
def relay_hosts(draw: st.DrawFn) -> RelayHost:
    login = draw(st.booleans())
    return RelayHost(
        draw(st.sampled_from(["smarthost.example.net", "relay", "192.0.2.25", "2001:db8::25"])),
        draw(st.integers(1, 65535)),
        draw(st.sampled_from(["none", "starttls", "tls"])),
        "user" if login else None,
        "RELAY_PASSWORD" if login else None,
    )


def exception(name: str) -> st.SearchStrategy[DeliveryException]:
    return st.builds(
        DeliveryException,
        name=st.just(name),
        match=st.sampled_from(["recipient", "sender"]),
        targets=tuples(DOMAINS | ADDRESSES, min_size=1),
        relay_host=relay_hosts(),
    )


@st.composite
def deliveries(draw: st.DrawFn) -> DeliverySettings:
    relay_host = draw(st.none() | relay_hosts())
    names = draw(st.lists(st.sampled_from(["a", "b", "partner"]), unique=True, max_size=3))
    return DeliverySettings(
        mode=draw(st.sampled_from(["direct", "relay"] if relay_host else ["direct"])),
        relay_host=relay_host,
        exceptions=tuple(draw(exception(n)) for n in names),
        maildir=draw(st.sampled_from(["maildir", "/var/mail/x"])),
    )


@st.composite
def list_rule(draw: st.DrawFn, name: str) -> ListRule:
    kind = draw(st.sampled_from(["black", "white"]))
    criteria = {
        "client": tuples(NETWORKS).map(Networks.of),
        "client_hostname": tuples(DOMAINS),
        "helo": tuples(DOMAINS),
        "sender": tuples(ADDRESSES | DOMAINS | st.sampled_from(["<>", "user@"])),
        "recipient": tuples(ADDRESSES | DOMAINS | st.just("abuse@")),
    }
    values = {k: draw(v) for k, v in criteria.items()}
    if not any(values.values()):
        values["helo"] = ("fallback.example",)
    return ListRule(
        name=name,
        list=kind,
        action="allow" if kind == "white" else draw(st.sampled_from(["reject", "discard"])),
        text=draw(st.none() | st.just("go away")),
        **values,
    )


@st.composite
def securities(draw: st.DrawFn) -> SecuritySettings:
    names = draw(st.lists(st.sampled_from(["r1", "r2", "r3"]), unique=True, max_size=3))
    dnsbl = st.builds(
        DnsblZone,
        zone=st.sampled_from(["zen.example", "bl.example.org"]),
        answer=st.none() | st.sampled_from(["127.0.0.2", "127.0.0.10"]).map(ipaddress.IPv4Address),
    )
    return SecuritySettings(
        lists=tuple(draw(list_rule(n)) for n in names),
        sender_policy=draw(
            st.builds(
                SenderPolicy,
                text=st.sampled_from([(), (("reject_non_fqdn_sender", "write it all"),)]),
                **flags(SenderPolicy),
            )
        ),
        connection_policy=draw(
            st.builds(
                ConnectionPolicy,
                reject_unknown_reverse_client_hostname=st.booleans(),
                reject_unknown_client_hostname=st.booleans(),
                max_connections_per_client=COUNTS,
                max_connection_rate_per_client=COUNTS,
                max_message_rate_per_client=COUNTS,
                max_recipient_rate_per_client=COUNTS,
                rate_window_seconds=st.integers(1, 86400),
                max_message_rate_per_user=COUNTS,
                max_recipient_rate_global=COUNTS,
                observe=st.booleans(),
                text=st.sampled_from([(), (("max_message_rate_per_user", "quota"),)]),
            )
        ),
        advanced=draw(
            st.builds(
                AdvancedSettings,
                dnsbl=tuples(dnsbl),
                **{k: v for k, v in flags(AdvancedSettings).items() if k != "dnsbl"},
            )
        ),
    )


@st.composite
def servers(draw: st.DrawFn) -> ServerSettings:
    listeners = st.none() | st.sampled_from(["127.0.0.1:2525", "[::1]:25", "mx.example.com:587"])
    tls = draw(st.booleans())
    return ServerSettings(
        smtp=draw(listeners),
        submission=draw(listeners) if tls else None,
        smtps=draw(listeners) if tls else None,
        tls_cert="cert.pem" if tls else None,
        tls_key="key.pem" if tls else None,
        max_auth_failures_per_client=draw(COUNTS),
    )


SETTINGS = st.builds(
    Settings,
    general=st.builds(
        GeneralSettings,
        hostname=HOSTNAMES,
        banner=st.sampled_from(["$hostname ESMTP", "welcome to $hostname"]),
        local_domains=tuples(DOMAINS),
        max_recipients=COUNTS,
        max_hops=st.integers(1, 1000),
        max_message_size_mb=SIZES,
        max_attachment_size_mb=SIZES,
        disable_auto_forwarding=st.booleans(),
        external_postmasters=tuples(ADDRESSES),
        smtp_auth=st.builds(
            SmtpAuthSettings,
            local_networks=tuples(NETWORKS),
            **{k: v for k, v in flags(SmtpAuthSettings).items() if k != "local_networks"},
        ),
    ),
    delivery=deliveries(),
    relay=st.builds(
        RelaySettings, trusted_networks=tuples(NETWORKS), inbound_domains=tuples(DOMAINS)
    ),
    security=securities(),
    replies=st.builds(Replies, **{f.name: st.integers(400, 599) for f in attrs.fields(Replies)}),
    server=servers(),
    dns=st.builds(
        DnsSettings,
        nameservers=tuples(st.sampled_from(["192.0.2.53", "192.0.2.53:5353", "[2001:db8::53]:53"])),
        timeout_seconds=st.integers(1, 60) | st.floats(0.001, 60),
    ),
    accounts=st.lists(st.sampled_from(["alice", "bob"]), unique=True).map(
        lambda names: tuple(Account(n, HASH, ("@example.com", f"{n}@example.org")) for n in names)
    ),
)


def as_json(mapping: dict[str, Any]) -> Any:
    # what a capture file holds: only JSON types survive
    return json.loads(json.dumps(mapping))


@hsettings(max_examples=200, deadline=None)
@given(SETTINGS)
def test_settings_read_back_equal_without_accounts(settings: Settings) -> None:
    mapping = as_json(settings_to_mapping(settings))
    assert "accounts" not in mapping
    assert settings_from_mapping(mapping) == attrs.evolve(settings, accounts=())


@hsettings(max_examples=100, deadline=None)
@given(SETTINGS)
def test_settings_read_back_equal_with_accounts(settings: Settings) -> None:
    mapping = as_json(settings_to_mapping(settings, accounts=True))
    assert settings_from_mapping(mapping) == settings


@given(SETTINGS)
def test_hostname_is_always_written(settings: Settings) -> None:
    mapping = settings_to_mapping(settings)
    assert mapping["general"]["hostname"] == settings.general.hostname
    # so a reader's own default hostname never applies
    never = settings_from_mapping(as_json(mapping), default_hostname=lambda: "other.example")
    assert never.general.hostname == settings.general.hostname


def test_defaults_are_left_out() -> None:
    assert settings_to_mapping(Settings()) == {"general": {"hostname": "localhost.localdomain"}}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # "" switches a listener off; absent would mean the default one
        (Settings(server=ServerSettings(smtp=None)), {"server": {"smtp": ""}}),
        (
            Settings(
                delivery=DeliverySettings(
                    exceptions=(
                        DeliveryException(
                            "p", "recipient", ("partner.example",), RelayHost("mx.partner.example")
                        ),
                    )
                )
            ),
            # the relay host's keys sit in the exception itself
            {
                "delivery": {
                    "exceptions": [
                        {
                            "name": "p",
                            "match": "recipient",
                            "targets": ["partner.example"],
                            "host": "mx.partner.example",
                        }
                    ]
                }
            },
        ),
        (
            Settings(
                security=SecuritySettings(
                    advanced=AdvancedSettings(
                        dnsbl=(
                            DnsblZone.parse("zen.example"),
                            DnsblZone.parse("bl.example=127.0.0.2"),
                        )
                    )
                )
            ),
            {"security": {"advanced": {"dnsbl": ["zen.example", "bl.example=127.0.0.2"]}}},
        ),
        (
            Settings(
                security=SecuritySettings(
                    lists=(ListRule("w", list="white", action="allow", client=("192.0.2.0/24",)),)
                )
            ),
            {
                "security": {
                    "lists": [
                        {
                            "name": "w",
                            "list": "white",
                            "action": "allow",
                            "client": ["192.0.2.0/24"],
                        }
                    ]
                }
            },
        ),
    ],
    ids=["listener-off", "exception-inline", "dnsbl", "list-rule"],
)
def test_written_shapes(settings: Settings, expected: dict[str, Any]) -> None:
    mapping = settings_to_mapping(settings)
    assert mapping.pop("general") == {"hostname": "localhost.localdomain"}
    assert mapping == expected


def test_capture_writes_with_the_same_function() -> None:
    assert capture.settings_to_mapping is settings_to_mapping


# ---------------------------------------------------------------------------
# The machine's hostname: files and replay cases, never a written mapping


def test_a_replay_case_without_hostname_gets_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "Box.LAN.Example")
    case = replay.Case("c", "c.json", {"policy": {"general": {"max_hops": 3}}})
    assert replay.build_policy(case).settings.general.hostname == "box.lan.example"


def test_a_captured_policy_keeps_its_hostname_on_another_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "other.example")
    written = as_json(settings_to_mapping(Settings(general=GeneralSettings("mx.example.com"))))
    case = replay.Case("c", "c.json", {"policy": written})
    assert replay.build_policy(case).settings.general.hostname == "mx.example.com"
