"""The workload the benchmarks share: a policy with every check on, big lists,
a deterministic DNS world and a stream of realistic SMTP transactions.

Not a test and not part of the package: ``benchmarks/*.py`` import it from
their own folder. Everything is generated from fixed seeds, so two runs (and
two machines) judge exactly the same sessions.

The lists (``list_rules(n)``) hold ``n`` entries in all, spread over the kinds
a real black/white list has:

* client networks, 40 %: IPv4 addresses and /16../28 networks, and one in five
  IPv6 (/48, /56, /64 and single addresses);
* sender addresses, 20 %, and sender domains, 10 %;
* HELO names, 10 % (a white list);
* recipient addresses, 10 % (a discard list: spam traps);
* client host names, 5 %, and a few two-criterion rules (client + sender), 5 %.

A session hits a list with a fixed probability whatever ``n`` is, and a hit is
drawn from anywhere in the list, so the 1,000,000-entry run touches memory all
over its tables, as real traffic would.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from mailpolicy import (
    DnsOutcome,
    DnsQuery,
    DnsResult,
    Envelope,
    Policy,
    RType,
    Session,
    Stage,
    decide_with,
)
from mailpolicy.model import Counters, MessageFacts
from mailpolicy.passwords import hash_password

#: our domain and host name
DOMAIN = "example.com"
HOSTNAME = "mx.example.com"


def _v4_net(rng: random.Random) -> str:
    length = rng.choice((16, 24, 24, 28, 32, 32, 32))
    # listed networks are in 32/8 to 95/8, the clients that miss in 100/8 to
    # 125/8: a miss is a miss at every list size
    value = rng.randrange(32 << 24, 96 << 24)
    value = value >> (32 - length) << (32 - length)
    if length == 32:
        return str(ipaddress.IPv4Address(value))
    return f"{ipaddress.IPv4Address(value)}/{length}"


def _v6_net(rng: random.Random) -> str:
    length = rng.choice((48, 56, 64, 128))
    value = (0x2001_0DB8 << 96) | rng.getrandbits(95)  # 2001:db8:0-7fff::, see above
    value = value >> (128 - length) << (128 - length)
    if length == 128:
        return str(ipaddress.IPv6Address(value))
    return f"{ipaddress.IPv6Address(value)}/{length}"


def _split(n: int) -> dict[str, int]:
    shares = {
        "client": 0.40,
        "sender": 0.20,
        "sender_domain": 0.10,
        "helo": 0.10,
        "recipient": 0.10,
        "client_hostname": 0.05,
        "pair": 0.05,
    }
    out = {k: max(1, int(n * v)) for k, v in shares.items()}
    out["client"] += n - sum(out.values())  # exactly n entries
    return out


def list_entries(n: int, seed: int = 1) -> dict[str, list[str]]:
    """``n`` list values by kind (see the module docstring)."""
    rng = random.Random(seed)
    k = _split(n)
    clients = [_v6_net(rng) if i % 5 == 4 else _v4_net(rng) for i in range(k["client"])]
    return {
        "client": clients,
        "sender": [f"user{i}@shop{i % 5000}.example.net" for i in range(k["sender"])],
        "sender_domain": [f"bulk{i}.example.org" for i in range(k["sender_domain"])],
        "helo": [f"mail{i}.partner{i % 2000}.example" for i in range(k["helo"])],
        "recipient": [f"trap{i}@{DOMAIN}" for i in range(k["recipient"])],
        "client_hostname": [f"dyn{i}.isp{i % 300}.example" for i in range(k["client_hostname"])],
        "pair_client": [_v4_net(rng) for _ in range(k["pair"] // 2)],
        "pair_sender": [f"news{i}@list.example.net" for i in range(k["pair"] - k["pair"] // 2)],
    }


def list_rules(entries: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The ``[[security.lists]]`` tables holding ``entries``."""
    return [
        {"name": "good-helo", "list": "white", "helo": list(entries["helo"])},
        {
            "name": "bad-clients",
            "list": "black",
            "text": "Blocked",
            "client": list(entries["client"]),
        },
        {
            "name": "bad-senders",
            "list": "black",
            "sender": list(entries["sender"]) + list(entries["sender_domain"]),
        },
        {"name": "dynamic", "list": "black", "client_hostname": list(entries["client_hostname"])},
        {
            "name": "list-from-there",
            "list": "black",
            "client": list(entries["pair_client"]),
            "sender": list(entries["pair_sender"]),
        },
        {
            "name": "spamtrap",
            "list": "black",
            "action": "discard",
            "recipient": list(entries["recipient"]),
        },
    ]


#: a password hash for the one account (computed once; its cost is low on
#: purpose, AUTH is not what is measured)
PASSWORD_HASH = hash_password("secret", ln=10)


def policy_mapping(
    rules: Sequence[Mapping[str, Any]], *, every_check: bool = True
) -> dict[str, Any]:
    """A policy with every check of docs/settings.md on (or only the lists)."""
    policy: dict[str, Any] = {
        "general": {
            "hostname": HOSTNAME,
            "local_domains": [DOMAIN],
            "max_recipients": 50,
            "max_hops": 30,
            "max_message_size_mb": 10,
        },
        "relay": {"trusted_networks": ["10.0.0.0/8"], "inbound_domains": ["branch.example.com"]},
        "security": {"lists": [dict(r) for r in rules]},
    }
    if every_check:
        policy["general"].update(
            {
                "max_attachment_size_mb": 5,
                "disable_auto_forwarding": True,
                "smtp_auth": {"enabled": True, "sender_must_match_login": True},
            }
        )
        policy["security"].update(
            {
                "sender_policy": {
                    "reject_non_fqdn_sender": True,
                    "reject_unknown_sender_domain": True,
                    "reject_unauthenticated_local_sender": True,
                },
                "connection_policy": {
                    "reject_unknown_reverse_client_hostname": True,
                    "reject_unknown_client_hostname": True,
                    "max_connections_per_client": 20,
                    "max_connection_rate_per_client": 60,
                    "max_message_rate_per_client": 100,
                    "max_recipient_rate_per_client": 500,
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
                    "dnsbl": ["zen.dnsbl.example", "bl.dnsbl.example=127.0.0.2"],
                },
            }
        )
        policy["accounts"] = {
            "alice": {"password_hash": PASSWORD_HASH, "addresses": [f"alice@{DOMAIN}"]},
        }
    return policy


# ---------------------------------------------------------------------------
# TOML output (only what policy_mapping produces: tables, arrays of tables,
# strings, numbers, booleans and arrays of strings)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        if len(value) > 8:
            return "[\n" + "".join(f"  {_toml_value(v)},\n" for v in value) + "]"
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def _toml_table(out: list[str], path: str, table: Mapping[str, Any]) -> None:
    subs: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, Mapping) or (
            isinstance(value, list) and value and isinstance(value[0], Mapping)
        ):
            subs.append((key, value))
        else:
            out.append(f"{key} = {_toml_value(value)}\n")
    for key, value in subs:
        sub = f"{path}.{key}" if path else key
        if isinstance(value, list):
            for item in value:
                out.append(f"\n[[{sub}]]\n")
                _toml_table(out, sub, item)
        else:
            out.append(f"\n[{sub}]\n")
            _toml_table(out, sub, value)


def to_toml(policy: Mapping[str, Any]) -> str:
    out: list[str] = []
    _toml_table(out, "", policy)
    return "".join(out).lstrip("\n")


# ---------------------------------------------------------------------------
# The DNS world: deterministic answers from the name alone


def _h(text: str) -> int:
    """A stable small hash (Python's hash() is salted per process)."""
    value = 0
    for ch in text.encode():
        value = (value * 131 + ch) & 0xFFFFFFFF
    return value


class World:
    """The DNS world of the benchmark sessions: answers computed from the
    name, plus the PTR names of the clients that should match the
    client-host-name list (``names``)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.addresses: dict[str, str] = {}

    def name_client(self, ip: str, name: str) -> None:
        self.names[ip] = name
        self.addresses[name] = ip

    def answer(self, query: DnsQuery) -> DnsResult:
        name, rtype = query.name, query.rtype
        if name.endswith(".dnsbl.example"):
            # 3 % of clients are listed in each zone
            if _h(name) % 100 < 3:
                return DnsResult.answer("127.0.0.2")
            return DnsResult(DnsOutcome.NXDOMAIN)
        if rtype is RType.PTR:
            if name in self.names:
                return DnsResult.answer(self.names[name])
            if _h(name) % 20 == 0:
                return DnsResult(DnsOutcome.NXDOMAIN)  # 5 % have no PTR
            return DnsResult.answer(ptr_name(name))
        if name in self.addresses:
            return DnsResult.answer(self.addresses[name])
        if name.startswith("host-") and name.endswith(".isp.example"):
            # forward-confirms the PTR name (1 in 25 does not)
            if _h(name) % 25 == 0:
                return DnsResult(DnsOutcome.NXDOMAIN)
            text = name[5:].removesuffix(".isp.example")
            is_v6 = text.count("-") != 3
            if is_v6 != (rtype is RType.AAAA):
                return DnsResult(DnsOutcome.NODATA)
            return DnsResult.answer(text.replace("-", ":" if is_v6 else "."))
        if name.startswith("nx") or name.endswith(".invalid"):
            return DnsResult(DnsOutcome.NXDOMAIN)
        if rtype is RType.MX:
            return DnsResult.answer(f"10 mx.{name}")
        if rtype is RType.A:
            return DnsResult.answer("192.0.2.25")
        return DnsResult(DnsOutcome.NODATA)

    def answer_all(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        return {q: self.answer(q) for q in queries}

    def complete(self, policy: Policy, session: Session, envelope: Envelope) -> Session:
        """``session`` with every DNS answer the policy needs for ``envelope``."""
        session, _ = decide_with(policy, session, envelope, self.answer_all)
        return session


def ptr_name(ip: str) -> str:
    """The PTR name of a client without a listed name."""
    return "host-" + ip.replace(".", "-").replace(":", "-") + ".isp.example"


# ---------------------------------------------------------------------------
# Sessions


def _pick(rng: random.Random, values: Sequence[str]) -> str:
    return values[rng.randrange(len(values))]


def _host_in(net: str, rng: random.Random) -> str:
    network = ipaddress.ip_network(net)
    if network.num_addresses == 1:
        return str(network.network_address)
    offset = rng.randrange(min(network.num_addresses, 1 << 16))
    return str(network.network_address + offset)


def transactions(
    entries: Mapping[str, Sequence[str]], world: World, count: int, seed: int = 7
) -> Iterator[tuple[Session, list[Envelope]]]:
    """``count`` sessions, each with the envelopes of one transaction:
    CONNECT, MAIL, one to three RCPT, DATA and END_OF_DATA.

    About a third of the sessions hit a list (client, sender, HELO, host name,
    recipient or the two-criterion rule); the rest miss every list and face
    the other checks: DNSBLs, host names, unknown domains, relay denial.
    """
    rng = random.Random(seed)
    for _ in range(count):
        roll = rng.random()
        if rng.random() < 0.15:
            ip = str(ipaddress.IPv6Address((0x2001_0DB8 << 96) | 1 << 95 | rng.getrandbits(95)))
        else:
            ip = str(ipaddress.IPv4Address(rng.randrange(100 << 24, 126 << 24)))
        helo = f"mail.sender{rng.randrange(10**6)}.example"
        sender = f"someone{rng.randrange(10**6)}@sender{rng.randrange(10**5)}.example"
        rcpts = [f"user{rng.randrange(1000)}@{DOMAIN}" for _ in range(rng.choice((1, 1, 2, 3)))]
        if roll < 0.06:
            ip = _host_in(_pick(rng, entries["client"]), rng)
        elif roll < 0.12:
            sender = _pick(rng, entries["sender"])
        elif roll < 0.15:
            sender = f"info@{_pick(rng, entries['sender_domain'])}"
        elif roll < 0.21:
            helo = _pick(rng, entries["helo"])
        elif roll < 0.24:
            rcpts[0] = _pick(rng, entries["recipient"])
        elif roll < 0.27:
            ip = _host_in(_pick(rng, entries["pair_client"]), rng)
            sender = _pick(rng, entries["pair_sender"])
        elif roll < 0.30:
            ip = f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            world.name_client(ip, _pick(rng, entries["client_hostname"]))
        elif roll < 0.33:
            rcpts[0] = f"someone@elsewhere{rng.randrange(1000)}.example"  # relay denied
        elif roll < 0.35:
            sender = f"x@nx{rng.randrange(1000)}.example"  # unknown sender domain
        elif roll < 0.37:
            helo = "localhost"  # not an FQDN
        counters = Counters(connections=1, connection_rate=rng.randrange(1, 5))
        session = Session(ip, helo=helo, esmtp=True, counters=counters)
        envelopes = [
            Envelope(Stage.CONNECT),
            Envelope(Stage.MAIL, sender=sender, declared_size=2000),
        ]
        for i, rcpt in enumerate(rcpts):
            envelopes.append(
                Envelope(Stage.RCPT, sender=sender, recipient=rcpt, recipients=tuple(rcpts[:i]))
            )
        envelopes.append(Envelope(Stage.DATA, sender=sender, recipients=tuple(rcpts)))
        envelopes.append(
            Envelope(
                Stage.END_OF_DATA,
                sender=sender,
                recipients=tuple(rcpts),
                message=MessageFacts(size=2000, received_headers=rng.randrange(4)),
            )
        )
        yield session, envelopes
