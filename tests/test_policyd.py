"""``mailpolicy policyd``: Postfix's policy delegation protocol.

The request blocks in ``tests/data/postfix_policy/`` were recorded from a real
Postfix 3.7 (``python tests/postfix_instance.py CASE --requests FILE``, as
root), byte for byte, with the action that made Postfix answer as the native
recording of the case; here ``mailpolicy policyd`` is started as a user starts
it and must give each of them the same action.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpolicy import Action, Reply, Verdict, settings_from_mapping
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.postfix.export import export_postfix, write_export
from mailpolicy.adapters.postfix.policyd import (
    MAX_LINE,
    PolicyServer,
    PolicyService,
    envelope_of,
    parse_request,
    postfix_action,
)
from mailpolicy.adapters.replay import load_case
from mailpolicy.adapters.state import MemoryStore
from mailpolicy.model import Stage

sys.path.insert(0, str(Path(__file__).parent))
from postfix_instance import to_toml

from mailpolicy.adapters.replay import build_policy
from mailpolicy.config import settings_to_mapping

HERE = Path(__file__).parent
RECORDED = HERE / "data" / "postfix_policy"
RECORDINGS = sorted(RECORDED.glob("*.requests.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exchange(sock: socket.socket, block: bytes) -> bytes:
    sock.sendall(block)
    answer = b""
    while not answer.endswith(b"\n\n"):
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    return answer


@pytest.fixture
def policyd_for(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(case_file: Path) -> int:
        case = load_case(case_file)[0]
        policy = build_policy(case)
        toml = tmp_path / f"{case_file.stem}.toml"
        toml.write_text(to_toml(settings_to_mapping(policy.settings, accounts=True)))
        zone = tmp_path / f"{case_file.stem}.zone.json"
        zone.write_text(json.dumps(case.data.get("dns", {})))
        port = _free_port()
        cmd = [sys.executable, "-m", "mailpolicy", "policyd", "--policy", str(toml)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--dns", str(zone)]
        procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE))
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("policyd did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.name.split(".")[0])
def test_the_requests_postfix_sends_get_the_recorded_actions(
    recording: Path, policyd_for: object
) -> None:
    exchanges = json.loads(recording.read_text())
    assert len(exchanges) >= 2
    case_file = HERE / "conformance" / (recording.name.split(".")[0] + ".json")
    port = policyd_for(case_file)  # type: ignore[operator]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = [_exchange(sock, x["request"].encode()).decode() for x in exchanges]
    assert got == [x["answer"] for x in exchanges]


# -- in process -----------------------------------------------------------------

POLICY = settings_from_mapping(
    {
        "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
        "security": {
            "lists": [{"name": "spammers", "list": "black", "sender": ["spam.example"]}],
            "sender_policy": {"reject_unknown_sender_domain": True},
        },
    }
)
ZONE = StaticZone.from_mapping(
    {"example.org": {"MX": ["10 mx.example.org"]}, "broken.example": {"servfail": True}}
)


def _request(**kw: str) -> bytes:
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "203.0.113.5",
        "client_name": "unknown",
        "helo_name": "client.example.org",
        "sender": "a@example.org",
        "recipient": "r@example.com",
        "instance": "1.2.3.0",
        "size": "0",
    }
    attrs.update(kw)
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


async def _served(*clients: list[bytes]) -> list[list[bytes]]:
    from mailpolicy.policy import compile_policy

    service = PolicyService(compile_policy(POLICY), ZONE, MemoryStore())
    server = PolicyServer(service)
    host, port = await server.listen_tcp("127.0.0.1", 0)

    async def one(blocks: list[bytes]) -> list[bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        out = []
        for block in blocks:
            writer.write(block)
            try:
                out.append(await reader.readuntil(b"\n\n"))
            except asyncio.IncompleteReadError as e:
                out.append(b"<closed>" + e.partial)
                break
        writer.close()
        return out

    try:
        return list(await asyncio.gather(*(one(c) for c in clients)))
    finally:
        await server.stop()


def test_actions_for_refusal_discard_and_acceptance() -> None:
    [answers] = asyncio.run(
        _served(
            [
                _request(sender="a@spam.example", policy_context="sender", instance="1"),
                _request(sender="a@example.org", instance="2"),
                _request(sender="a@broken.example", policy_context="sender", instance="3"),
            ]
        )
    )
    assert answers == [
        b"action=554 5.7.1 Access denied\n\n",
        b"action=DUNNO\n\n",
        b"action=DEFER_IF_PERMIT 4.1.8 Domain not found\n\n",
    ]


def test_a_sender_refusal_is_left_to_the_sender_context_a_relay_one_to_the_recipient() -> None:
    [answers] = asyncio.run(
        _served(
            [
                _request(recipient="r@elsewhere.example", policy_context="sender"),
                _request(recipient="r@elsewhere.example", policy_context="recipient"),
            ]
        )
    )
    assert answers[0] == b"action=DUNNO\n\n"
    assert answers[1].startswith(b"action=554 5.7.1 <r@elsewhere.example>: Relay access denied")


def test_malformed_requests_are_deferred_and_garbage_disconnects_only_its_sender() -> None:
    good = _request()
    garbage = b"x" * (MAX_LINE + 10)
    malformed, flood, steady = asyncio.run(
        _served(
            [b"no equals sign\n\n", _request(client_address="nonsense"), good],
            [garbage, good],
            [good, good, good],
        )
    )
    assert malformed[0] == b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy request\n\n"
    assert malformed[1] == b"action=DEFER_IF_PERMIT 4.3.0 Malformed policy request\n\n"
    assert malformed[2] == b"action=DUNNO\n\n"
    assert flood == [b"<closed>"]
    assert steady == [b"action=DUNNO\n\n"] * 3


def test_the_request_parser_and_the_envelope() -> None:
    attrs = parse_request(_request(sender="", size="123").rstrip(b"\n"))
    env = envelope_of(attrs, ("x@example.com",))
    assert env is not None
    assert (env.stage, env.sender, env.recipient, env.declared_size, env.recipients) == (
        Stage.RCPT,
        "",
        "r@example.com",
        123,
        ("x@example.com",),
    )
    assert envelope_of({**attrs, "protocol_state": "ETRN"}) is None
    with pytest.raises(ValueError, match="protocol_state='BOGUS' is unknown"):
        envelope_of({**attrs, "protocol_state": "BOGUS"})


def test_postfix_action_mapping() -> None:
    reject = Verdict(
        Action.REJECT, Reply(554, "5.7.1", "<a@x.example>: Sender address rejected: no")
    )
    assert postfix_action(reject, "a@x.example", "Sender address") == "554 5.7.1 no"
    assert postfix_action(reject) == "554 5.7.1 <a@x.example>: Sender address rejected: no"
    defer = Verdict(Action.DEFER, Reply(451, "4.3.0", "Temporary lookup failure"))
    assert postfix_action(defer) == "451 4.3.0 Temporary lookup failure"
    dip = Verdict(Action.DEFER_IF_PERMIT, Reply(450, "4.7.25", "Client host rejected: x"))
    assert postfix_action(dip) == "DEFER_IF_PERMIT 4.7.25 Client host rejected: x"
    discard = Verdict(Action.DISCARD, Reply(250, "2.0.0", "Ok"), "security.lists.drop")
    assert postfix_action(discard) == "DISCARD Ok"
    assert postfix_action(Verdict(Action.ACCEPT)) == "DUNNO"


def test_export_writes_main_cf_and_tables(tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {
            "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
            "relay": {"trusted_networks": ["192.0.2.0/24", "2001:db8::/32"]},
            "delivery": {
                "exceptions": [
                    {
                        "name": "partner",
                        "match": "recipient",
                        "targets": ["partner.example"],
                        "host": "mx.partner.example",
                        "port": 2525,
                    }
                ]
            },
        }
    )
    export = export_postfix(settings, "inet:127.0.0.1:10040", str(tmp_path))
    written = write_export(export, str(tmp_path))
    main = (tmp_path / "main.cf").read_text()
    assert "mynetworks = 192.0.2.0/24 [2001:db8::]/32 127.0.0.0/8 [::1]/128\n" in main
    assert f"transport_maps = texthash:{tmp_path}/transport\n" in main
    assert (
        "smtpd_recipient_restrictions = check_policy_service "
        "{ inet:127.0.0.1:10040, policy_context=recipient }\n" in main
    )
    assert (tmp_path / "transport").read_text() == (
        "partner.example smtp:[mx.partner.example]:2525\n"
        ".partner.example smtp:[mx.partner.example]:2525\n"
    )
    assert sorted(written) == sorted([str(tmp_path / "main.cf"), str(tmp_path / "transport")])
    with pytest.raises(ValueError, match="inet:HOST:PORT or unix:PATH"):
        export_postfix(settings, "127.0.0.1:10040", str(tmp_path))


def test_rates_are_counted_per_transaction_and_recipient_in_the_store() -> None:
    from mailpolicy.policy import compile_policy

    settings = settings_from_mapping(
        {
            "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
            "security": {
                "connection_policy": {
                    "max_message_rate_per_client": 2,
                    "max_recipient_rate_per_client": 3,
                }
            },
        }
    )
    store = MemoryStore()
    service = PolicyService(compile_policy(settings), ZONE, store, clock=lambda: 1000.0)

    async def ask(instance: str, recipient: str) -> str:
        block = _request(instance=instance, recipient=recipient).rstrip(b"\n")
        return await service.answer(parse_request(block))

    async def run() -> list[str]:
        return [
            await ask("1", "a@example.com"),
            await ask("1", "b@example.com"),  # the same message: counted once
            await ask("2", "c@example.com"),
            await ask("2", "d@example.com"),  # the 4th recipient in the window
            await ask("3", "e@example.com"),  # the 3rd message in the window
        ]

    answers = asyncio.run(run())
    assert answers == [
        "DUNNO",
        "DUNNO",
        "DUNNO",
        "450 4.7.1 Error: too many recipients from 203.0.113.5",
        "450 4.7.1 Error: too much mail from 203.0.113.5",
    ]
    assert asyncio.run(store.peek("message", "203.0.113.5", 1000.0, 60)) == 3


def test_a_deferral_given_in_the_sender_context_is_not_repeated() -> None:
    [answers] = asyncio.run(
        _served(
            [
                _request(sender="a@broken.example", policy_context="sender"),
                _request(sender="a@broken.example", policy_context="recipient"),
            ]
        )
    )
    assert answers == [
        b"action=DEFER_IF_PERMIT 4.1.8 Domain not found\n\n",
        b"action=DUNNO\n\n",
    ]


def test_answer_now_answers_what_needs_no_dns_and_leaves_the_rest_to_answer() -> None:
    from mailpolicy.policy import compile_policy

    service = PolicyService(compile_policy(POLICY), ZONE, MemoryStore())
    listed = parse_request(_request(sender="a@spam.example", instance="1").rstrip(b"\n"))
    needs_dns = parse_request(_request(sender="a@broken.example", instance="2").rstrip(b"\n"))
    assert service.answer_now(listed) == (
        "554 5.7.1 <a@spam.example>: Sender address rejected: Access denied"
    )
    assert service.answer_now(needs_dns) is None
    assert asyncio.run(service.answer(needs_dns)) == (
        "DEFER_IF_PERMIT 4.1.8 <a@broken.example>: Sender address rejected: Domain not found"
    )
