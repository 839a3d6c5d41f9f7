"""The console without a browser: its help text, its TOML writer, its draft,
and its safety over real HTTP to a ``mailpolicy console`` process (password
and token required when set, CSRF and Origin checks, read-only, loopback)."""

from __future__ import annotations

import http.client
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import attrs
import pytest

pytest.importorskip("starlette", reason="the console extra is not installed")

from console_helpers import ConsoleProcess, run_console
from test_operations import policy_text

from mailpolicy.config import settings_from_mapping
from mailpolicy.console import model
from mailpolicy.passwords import hash_password

ROOT = Path(__file__).resolve().parent.parent


def test_every_field_of_every_section_has_its_help_and_postfix_name() -> None:
    seen = 0
    no_postfix = set()
    for section in model.SECTIONS:
        for group in section.groups:
            for f in model.fields(group, {}):
                seen += 1
                assert f.help is not None, f.path
                assert f.help.meaning, f.path
                if not f.help.postfix:
                    no_postfix.add(f.path)
    assert seen > 40
    # the limits per login, domain and server: postfwd or policyd territory
    limits = "security.connection_policy.max_"
    assert no_postfix == {
        f"{limits}{k}"
        for k in (
            "message_rate_per_user", "recipient_rate_per_user",
            "message_rate_per_sender_domain", "recipient_rate_per_recipient_domain",
            "message_rate_global", "recipient_rate_global",
        )
    }  # fmt: skip
    rows = model.help_rows()
    assert rows["general.max_recipients"].postfix == "smtpd_recipient_limit"
    assert rows["security.lists[].sender"].postfix == "check_sender_access"


def test_choice_keys_offer_their_values() -> None:
    (group,) = [g for s in model.SECTIONS for g in s.groups if g.prefix == "delivery"]
    mode = {f.name: f for f in model.fields(group, {})}["mode"]
    assert mode.choices == ["direct", "relay"]
    assert {f.name: f for f in model.fields(group, {})}["maildir"].choices == []


def test_the_toml_writer_reads_back_equal_on_the_example_policy() -> None:
    with open(ROOT / "examples" / "policy.toml", "rb") as f:
        data = tomllib.load(f)
    text = model.dump_toml(data)
    assert tomllib.loads(text) == data
    assert settings_from_mapping(tomllib.loads(text)) == settings_from_mapping(data)


def test_form_values_become_file_values() -> None:
    assert model.parse_field("bool", None) is False
    assert model.parse_field("bool", "on") is True
    assert model.parse_field("int", " 12 ") == 12
    assert model.parse_field("int", "twelve") == "twelve"  # the loader names it
    assert model.parse_field("number", "2.5") == 2.5
    assert model.parse_field("number", "nan") == "nan"
    assert model.parse_field("list", "a.example\n\n b.example \n") == ["a.example", "b.example"]
    assert model.parse_field("string", "  ") is None


def test_a_draft_refuses_a_bad_value_and_keeps_the_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text())
    draft = model.Draft(path)
    issues = draft.update({"general.max_recipients": -5, "relay.trusted_networks": ["300.1.1.1"]})
    assert {(i.key, i.reason) for i in issues} == {
        ("general.max_recipients", "must not be negative, got -5"),
        ("relay.trusted_networks[0]", '"300.1.1.1" is not an IP address or CIDR network'),
    }
    assert not draft.pending
    assert draft.update({"general.max_recipients": 5}) == ()
    assert draft.pending
    backup = model.apply_file(path, draft.data)
    assert backup.read_text() == policy_text()
    assert tomllib.loads(path.read_text())["general"]["max_recipients"] == 5


def test_try_a_session_on_a_zone_and_on_live_dns(tmp_path: Path) -> None:
    import asyncio

    from mailpolicy.adapters.dns import StaticZone
    from mailpolicy.adapters.dnsserver import ZoneServer

    path = tmp_path / "policy.toml"
    path.write_text(policy_text())
    draft = model.Draft(path)
    assert draft.update({"security.sender_policy.reject_unknown_sender_domain": True}) == ()
    settings = draft.check(draft.data)
    zone = {"known.example": {"A": ["192.0.2.1"]}, "gone.example": {"nxdomain": True}}

    def trial(sender: str, **kw: object) -> list[tuple[str, int | None, str | None]]:
        replies = asyncio.run(
            model.try_session(
                settings, ip="192.0.2.10", helo="c.example", sender=sender,
                recipients=["alice@example.com"], **kw,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        return [(r.cmd.split(":")[0], r.code, r.rule) for r in replies if r.cmd.startswith("RCPT")]

    expected = [("RCPT TO", 450, "security.sender_policy.reject_unknown_sender_domain")]
    assert trial("a@gone.example", zone=zone) == expected
    assert trial("a@known.example", zone=zone) == [("RCPT TO", 250, None)]
    with ZoneServer(StaticZone.from_mapping(zone)).run_in_thread() as server:
        settings = attrs.evolve(
            settings, dns=attrs.evolve(settings.dns, nameservers=(server.nameserver,))
        )
        assert trial("a@gone.example", live=True) == expected
        assert trial("a@known.example", live=True) == [("RCPT TO", 250, None)]
        assert any(q.name == "gone.example" for q in server.queries)


# ---------------------------------------------------------------------------
# Over HTTP


def request(
    console: ConsoleProcess,
    method: str,
    path: str,
    *,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    body = urlencode(form).encode() if form is not None else None
    h = dict(headers or {})
    if body is not None:
        h["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=h)
    response = conn.getresponse()
    response.read()
    return response


def cookies(response: http.client.HTTPResponse) -> dict[str, str]:
    out = {}
    for header in response.headers.get_all("set-cookie") or []:
        name, _, rest = header.partition("=")
        out[name] = rest.split(";", 1)[0]
    return out


@pytest.fixture
def started(
    tmp_path: Path, free_port: Callable[[], int]
) -> Iterator[Callable[..., ConsoleProcess]]:
    running: list[ConsoleProcess] = []
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text())

    def start(*args: str) -> ConsoleProcess:
        port = free_port()
        c = ConsoleProcess(
            ["--policy", str(policy), "--listen", f"127.0.0.1:{port}", *args], tmp_path, port
        )
        running.append(c)
        c.wait_listening()
        return c

    try:
        yield start
    finally:
        for c in running:
            c.stop()


def csrf_for(console: ConsoleProcess, **headers: str) -> tuple[str, dict[str, str]]:
    """A page's CSRF cookie, and headers that send it back with a same-origin Origin."""
    page = request(console, "GET", "/login", headers=headers)
    token = cookies(page)["mpc_csrf"]
    return token, {
        **headers,
        "Cookie": "; ".join(f"{k}={v}" for k, v in {"mpc_csrf": token}.items())
        + (f"; {headers['Cookie']}" if "Cookie" in headers else ""),
        "Origin": console.url,
    }


def test_a_token_is_required_when_set(started: Callable[..., ConsoleProcess]) -> None:
    console = started("--token", "s3cret-token")
    page = request(console, "GET", "/section/general")
    assert page.status == 303
    assert page.headers["location"] == "/login"
    assert request(console, "GET", "/live.json").status == 401
    csrf, headers = csrf_for(console)
    post = request(
        console, "POST", "/section/general",
        form={"csrf": csrf, "general.max_recipients": "1"}, headers=headers,
    )  # fmt: skip
    assert post.status == 401
    bad = request(console, "POST", "/login", form={"csrf": csrf, "secret": "no"}, headers=headers)
    assert bad.status == 401
    ok = request(
        console, "POST", "/login", form={"csrf": csrf, "secret": "s3cret-token"}, headers=headers
    )
    assert ok.status == 303
    session = cookies(ok)["mpc_session"]
    assert (
        request(
            console, "GET", "/section/general", headers={"Cookie": f"mpc_session={session}"}
        ).status
        == 200
    )
    bearer = {"Authorization": "Bearer s3cret-token"}
    assert request(console, "GET", "/section/general", headers=bearer).status == 200
    wrong = {"Authorization": "Bearer s3cret-tokem"}
    assert request(console, "GET", "/live.json", headers=wrong).status == 401


def test_a_password_hash_is_required_when_set(started: Callable[..., ConsoleProcess]) -> None:
    console = started("--password-hash", hash_password("open sesame", ln=10))
    assert request(console, "GET", "/section/relay").status == 303
    csrf, headers = csrf_for(console)
    ok = request(
        console, "POST", "/login", form={"csrf": csrf, "secret": "open sesame"}, headers=headers
    )
    assert ok.status == 303
    session = cookies(ok)["mpc_session"]
    page = request(console, "GET", "/section/relay", headers={"Cookie": f"mpc_session={session}"})
    assert page.status == 200


def test_posts_need_the_csrf_token_and_a_same_origin(
    started: Callable[..., ConsoleProcess], tmp_path: Path
) -> None:
    console = started()
    before = (tmp_path / "policy.toml").read_bytes()
    csrf, headers = csrf_for(console)
    form = {"general.max_recipients": "3"}
    no_token = request(console, "POST", "/section/general", form=form, headers=headers)
    assert no_token.status == 403
    other = {**headers, "Origin": "http://evil.example"}
    cross = request(console, "POST", "/section/general", form={**form, "csrf": csrf}, headers=other)
    assert cross.status == 403
    wrong = request(
        console, "POST", "/section/general", form={**form, "csrf": csrf + "x"}, headers=headers
    )
    assert wrong.status == 403
    good = request(
        console, "POST", "/section/general", form={**form, "csrf": csrf}, headers=headers
    )
    assert good.status == 200
    assert (tmp_path / "policy.toml").read_bytes() == before  # a draft until applied


def test_read_only_refuses_changes(started: Callable[..., ConsoleProcess]) -> None:
    console = started("--read-only")
    csrf, headers = csrf_for(console)
    post = request(
        console, "POST", "/section/general",
        form={"csrf": csrf, "general.max_recipients": "3"}, headers=headers,
    )  # fmt: skip
    assert post.status == 403
    assert request(console, "GET", "/section/general").status == 200


def test_what_the_page_shows_is_escaped(started: Callable[..., ConsoleProcess]) -> None:
    console = started()
    csrf, headers = csrf_for(console)
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=30)
    body = urlencode({"csrf": csrf, "general.banner": "<script>alert(1)</script>"})
    conn.request(
        "POST", "/section/general", body=body,
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    html = conn.getresponse().read().decode()
    assert "<script>alert(1)</script>" not in html
    assert re.search(r"&lt;script&gt;alert\(1\)&lt;/script&gt;", html)


def test_the_library_and_its_cli_do_not_import_the_console() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mailpolicy, mailpolicy.cli; mailpolicy.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'jinja2', 'uvicorn') or m.startswith('mailpolicy.console')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_a_non_loopback_listener_needs_a_password_or_token(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text())
    done = run_console("--policy", str(policy), "--listen", "0.0.0.0:8025")
    assert done.returncode == 2
    assert "not a loopback address; set --password-hash or --token first" in done.stderr
