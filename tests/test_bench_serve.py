"""``benchmarks/serve.py``: the two servers it compares hold the same
restrictions, and (as root, with Postfix, swaks and unshare) a quick run goes
through: the DNS checks are live on both sides, every message is delivered."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailpolicy.config import load_settings
from mailpolicy.settings import AdvancedSettings, ConnectionPolicy, SenderPolicy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "serve.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()

#: each on/off check of the policy and what says the same in Postfix's main.cf:
#: a restriction in smtpd_recipient_restrictions, or ``(parameter, value)``
COUNTERPART: dict[tuple[str, str], str | tuple[str, str]] = {
    ("sender_policy", "reject_non_fqdn_sender"): "reject_non_fqdn_sender",
    ("sender_policy", "reject_unknown_sender_domain"): "reject_unknown_sender_domain",
    ("sender_policy", "reject_unauthenticated_local_sender"): (
        "smtpd_sender_login_maps",
        "(set)",
    ),
    ("connection_policy", "reject_unknown_reverse_client_hostname"): (
        "reject_unknown_reverse_client_hostname"
    ),
    ("connection_policy", "reject_unknown_client_hostname"): "reject_unknown_client_hostname",
    ("advanced", "require_helo"): ("smtpd_helo_required", "yes"),
    ("advanced", "reject_invalid_helo"): "reject_invalid_helo_hostname",
    ("advanced", "reject_non_fqdn_helo"): "reject_non_fqdn_helo_hostname",
    ("advanced", "reject_unknown_helo"): "reject_unknown_helo_hostname",
    ("advanced", "reject_unauth_pipelining"): (
        "smtpd_data_restrictions",
        "reject_unauth_pipelining",
    ),
    ("advanced", "reject_non_fqdn_recipient"): "reject_non_fqdn_recipient",
    ("advanced", "reject_unknown_recipient_domain"): "reject_unknown_recipient_domain",
    ("advanced", "disable_vrfy"): ("disable_vrfy_command", "yes"),
}

TABLES = {
    "sender_policy": SenderPolicy,
    "connection_policy": ConnectionPolicy,
    "advanced": AdvancedSettings,
}


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, str], dict[str, Path]]:
    folder = tmp_path_factory.mktemp("bench")
    lists = bench.restriction_lists()
    policy = folder / "policy.toml"
    policy.write_text(bench.workload.to_toml(bench.serve_policy(lists)))
    maps = bench.postfix_maps(folder, lists)
    return load_settings(policy), bench.postfix_main_cf(folder, maps), maps


def test_the_lists_have_the_issues_sizes_on_both_sides(
    both: tuple[Any, dict[str, str], dict[str, Path]],
) -> None:
    settings, main, maps = both
    rules = {rule.name: rule for rule in settings.security.lists}
    assert sorted(rules) == ["bad-clients", "bad-senders"]
    assert len(rules["bad-clients"].client) == 1_000
    assert len(rules["bad-senders"].sender) == 10_000
    cidr = maps["clients"].read_text().splitlines()
    senders = maps["senders"].read_text().splitlines()
    networks = [ipaddress.ip_network(line.split()[0]) for line in cidr]
    assert networks == list(rules["bad-clients"].client)
    assert [line.split()[0] for line in senders] == list(rules["bad-senders"].sender)
    assert {" ".join(line.split()[1:2]) for line in cidr + senders} == {"REJECT"}
    restrictions = main["smtpd_recipient_restrictions"]
    assert f"check_client_access cidr:{maps['clients']}" in restrictions
    assert f"check_sender_access hash:{maps['senders']}" in restrictions


@pytest.mark.parametrize(("table", "field"), sorted(COUNTERPART))
def test_a_check_is_on_in_the_policy_exactly_when_postfix_has_it(
    both: tuple[Any, dict[str, str], dict[str, Path]], table: str, field: str
) -> None:
    settings, main, _ = both
    on = getattr(getattr(settings.security, table), field)
    counterpart = COUNTERPART[(table, field)]
    if isinstance(counterpart, str):
        names = [r.strip() for r in main["smtpd_recipient_restrictions"].split(",")]
        in_postfix = counterpart in names
    else:
        parameter, value = counterpart
        in_postfix = main.get(parameter) == value or (value == "(set)" and parameter in main)
    assert on == in_postfix


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_check_of_the_policy_has_a_counterpart(table: str) -> None:
    checks = {
        f.name
        for f in attrs.fields(TABLES[table])
        if f.type in (bool, "bool") and f.name != "observe"
    }
    assert checks == {field for t, field in COUNTERPART if t == table}


def test_the_dns_checks_are_both_on(
    both: tuple[Any, dict[str, str], dict[str, Path]],
) -> None:
    settings, main, _ = both
    assert settings.security.connection_policy.reject_unknown_reverse_client_hostname
    assert settings.security.sender_policy.reject_unknown_sender_domain
    names = [r.strip() for r in main["smtpd_recipient_restrictions"].split(",")]
    assert "reject_unknown_reverse_client_hostname" in names
    assert "reject_unknown_sender_domain" in names


def test_the_limits_and_relay_control_agree(
    both: tuple[Any, dict[str, str], dict[str, Path]],
) -> None:
    settings, main, _ = both
    general = settings.general
    assert int(main["smtpd_recipient_limit"]) == general.max_recipients
    assert int(main["message_size_limit"]) == general.max_message_size_mb * 1024 * 1024
    assert int(main["hopcount_limit"]) == general.max_hops
    limit = settings.security.connection_policy.max_connections_per_client
    assert int(main["smtpd_client_connection_count_limit"]) == limit
    assert main["mynetworks"] == ", ".join(str(n) for n in settings.relay.trusted_networks)
    assert main["relay_domains"] == ", ".join(settings.relay.inbound_domains)
    assert not general.smtp_auth.enabled
    assert "permit_sasl_authenticated" not in main["smtpd_relay_restrictions"]


def _why_not() -> str | None:
    why: str | None = bench.can_run()
    for tool in ("swaks", "smtp-source"):
        if why is None and shutil.which(tool) is None:
            why = f"{tool} is not installed"
    return why


@pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))
def test_a_quick_run_shows_live_checks_and_delivers_every_message() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    live = re.findall(
        r"^checks are live, (.+?): <a@unknown-domain\.example> -> (\d{3})", done.stdout, re.M
    )
    assert [name for name, _ in live] == [
        "postfix 3.7 (discard)",
        "mailpolicy serve --workers 1",
        "mailpolicy serve --workers 2",
    ]
    assert {code[0] for _, code in live} <= {"4", "5"}
    delivered = re.findall(r"^(.+): ([\d,]+) of ([\d,]+) messages delivered$", done.stdout, re.M)
    assert len(delivered) == 3
    for _, got, sent in delivered:
        assert got == sent
    ratios = re.findall(r"^\| mailpolicy serve --workers \d / postfix \| \*\*\d", done.stdout, re.M)
    assert len(ratios) == 2
    spread = re.search(
        r"^each server's files (in a block group of their own|beside the others')",
        done.stdout,
        re.M,
    )
    assert spread is not None, done.stdout[:2000]
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", tempfile.gettempdir()], capture_output=True, text=True
    ).stdout.strip()
    if kind == "ext2/ext3":  # ext4 too: there chattr +T takes
        assert spread[1] == "in a block group of their own"


@pytest.mark.skipif(
    shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists(),
    reason="needs Postfix's smtp-source",
)
def test_compare_versions_runs_this_checkout_against_itself() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compare_versions.py"),
            *("--old", str(ROOT / "src"), "--rounds", "1", "--messages", "40", "--sessions", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"new / old: [0-9.]+x messages/s, [0-9.]+x CPU per message", done.stdout)
    assert len(re.findall(r"round 1 (?:old|new): +[0-9,]+ messages/s", done.stdout)) == 2
