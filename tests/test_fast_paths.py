"""The fast paths added for speed give exactly what the slow paths give.

Each fast path (reading big TOML arrays, parsing networks, parsing common
addresses, the compact network tuple) is compared with the code it stands in
for, on fixed examples and on random data. No timing here: figures come from
benchmarks/.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import pickle
import random
import string
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mailpolicy.config as config
from mailpolicy.addresses import (
    AddressError,
    _mail_from_tokens,
    _rcpt_to_tokens,
    _simple_path,
    _valid_hostname,
    parse_address,
    parse_mail_from,
    parse_rcpt_to,
)
from mailpolicy.model import Networks
from mailpolicy.rules.context import _parse


def _toml(loads, text):  # type: ignore[no-untyped-def]
    try:
        return ("ok", loads(text))
    except tomllib.TOMLDecodeError as e:
        return ("error", str(e))


def _document(rng: random.Random) -> str:
    parts = ['[general]\nhostname = "mx.example.com"\n']
    for r in range(rng.randrange(1, 4)):
        parts.append(f'\n[[security.lists]]\nname = "r{r}"\n')
        for key in ("client", "sender", "helo"):
            values = [
                json.dumps(f"v{rng.randrange(100)}.example") for _ in range(rng.randrange(12))
            ]
            sep = rng.choice([", ", ",\n  ", ' ,\n# a "comment" ]\n', ",\t"])
            body = sep.join(values) + ("," if rng.random() < 0.3 else "")
            head = rng.choice(["", "\n  ", " "])
            tail = rng.choice(["", "\n", " # x\n"])
            after = rng.choice(["", " # end", "  "])
            parts.append(f"{key} = [{head}{body}{tail}]{after}\n")
    parts.append('\n[relay]\ninbound_domains = ["a.example"]\n')
    return "".join(parts)


def _corrupt(rng: random.Random, text: str) -> str:
    i = rng.randrange(len(text) + 1)
    choice = rng.randrange(4)
    if choice == 0:
        return text[:i] + text[i + 1 :]
    if choice == 1:
        return text[:i] + rng.choice("[]{}\"'#,=\n\r\x01x.") + text[i:]
    if choice == 2:
        return text + '\nclient = ["dup"]\n'
    return text + '\n[[security.lists]]\nname="z"\nname="y"\n'


def test_toml_fast_path_gives_tomllib_results_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_MIN_FAST_ARRAY", 8)  # use it on small documents
    rng = random.Random(5)
    for n in range(3000):
        text = _document(rng)
        if n % 2:
            text = _corrupt(rng, text)
        if n % 5 == 0:
            text = _corrupt(rng, text)
        assert _toml(config._toml_loads, text) == _toml(tomllib.loads, text), text


def test_toml_fast_path_on_a_big_array_keeps_error_positions() -> None:
    values = ",\n".join(json.dumps(f"host{i}.example") for i in range(5000))
    good = f'[[security.lists]]\nname = "x"\nhelo = [\n{values}\n]\n'
    assert config._toml_loads(good) == tomllib.loads(good)
    for bad in (good + "helo = []\n", good + "x = \n", good.replace("]\n", "] y\n")):
        assert _toml(config._toml_loads, bad) == _toml(tomllib.loads, bad)
        assert _toml(tomllib.loads, bad)[0] == "error"


NETWORKS = [
    "192.0.2.1",
    "192.0.2.1/24",
    "0.0.0.0/0",
    "1.2.3.4/33",
    "01.2.3.4",
    "1.2.3",
    "256.1.1.1",
    "1.2.3.4/08",
    "1.2.3.4/0032",
    "1.2.3.4/255.255.0.0",
    "1.2.3.4/0.0.255.255",
    "1.2.3.4/",
    "1.2.3.4/-1",
    "2001:db8::/32",
    "2001:DB8::/32",
    "2001:db8:0:0::1/64",
    "::/0",
    "::1",
    "::ffff:1.2.3.4",
    "::1.2.3.4",
    "1::2:3:4:5:6:7",
    "1:2:3:4:5:6:7::",
    "1:2:3:4:5:6:7:8::",
    ":::",
    "::/129",
    "example.com",
    "",
    "1.2.3.4\x00",
]


def _slow_network(text: str) -> object:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return "refused"
    return (net.version, int(net.network_address), net.prefixlen)


def _fast_network(text: str) -> object:
    try:
        return config.parse_network(text)
    except ValueError:
        return "refused"


@pytest.mark.parametrize("text", NETWORKS)
def test_parse_network_is_ip_network(text: str) -> None:
    assert _fast_network(text) == _slow_network(text)


@given(st.ip_addresses(), st.integers(0, 128), st.booleans())
def test_parse_network_is_ip_network_on_random_networks(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int, exploded: bool
) -> None:
    text = f"{ip.exploded if exploded else ip}/{length % (ip.max_prefixlen + 1)}"
    assert _fast_network(text) == _slow_network(text)


ADDRESSES = [
    "a@b.example",
    "A.B@Example.COM",
    "a..b@x.example",
    ".a@x.example",
    "a@x-.example",
    "a@-x.example",
    "a@1.2.3.4",
    "a@1-2.3",
    "a@_x.example",
    "a@" + "x" * 64 + ".example",
    "a@" + "x" * 63 + ".example",
    "a@" + ".".join(["abcdefgh"] * 30),
    "a@b.example.",
    "Mixed.Case@Sub.EXAMPLE.com",
    "a@B.Example.",
    "a@b",
    "a@[192.0.2.1]",
    "<a@b.example>",
    '"a b"@x.example',
    "a@b@c.example",
    "",
    "postmaster",
]


def _slow_address(text: str) -> tuple[object, str] | None:
    try:
        address = parse_address(text)
    except AddressError:
        return None
    return address, address.given


def _fast_address(text: str) -> tuple[object, str] | None:
    address = _parse(text)
    # ``given`` takes no part in equality: compare it too, as replies show it
    return None if address is None else (address, address.given)


@pytest.mark.parametrize("text", ADDRESSES)
def test_address_fast_path_is_parse_address(text: str) -> None:
    assert _fast_address(text) == _slow_address(text)


@given(st.from_regex(r"[a-zA-Z0-9._%+!-]{1,12}@[a-zA-Z0-9._-]{1,20}", fullmatch=True))
def test_address_fast_path_on_random_addresses(text: str) -> None:
    assert _fast_address(text) == _slow_address(text)


def _outcome(parse: Callable[[], tuple[object, dict[str, str | None]]]) -> object:
    try:
        address, params = parse()
    except AddressError as e:
        return str(e)
    return address, getattr(address, "given", None), params


COMMANDS = [
    *(f"<{text}>" for text in ADDRESSES),
    "<a@b.example> SIZE=10",
    "<>",
    "<a@b.example",
    "a@b.example>",
    "<<a@b.example>>",
    "<@r.example:a@b.example>",
    "<a b@c.example>",
    "<" + "a" * 990 + "@b.example>",
    "<" + "a" * 989 + "@b.example>",
    "<" + "a" * 988 + "@b.example>",
]


@pytest.mark.parametrize("path", COMMANDS)
@pytest.mark.parametrize(("verb", "fast", "slow"), [
    ("FROM:", parse_mail_from, lambda arg: _mail_from_tokens(arg, None)),
    ("from:", parse_mail_from, lambda arg: _mail_from_tokens(arg, None)),
    ("TO:", parse_rcpt_to, lambda arg: _rcpt_to_tokens(arg, False)),
])  # fmt: skip
def test_mail_and_rcpt_fast_paths_are_the_tokenizer(
    path: str, verb: str, fast: Callable[[str], Any], slow: Callable[[str], Any]
) -> None:
    arg = verb + path
    assert _outcome(lambda: fast(arg)) == _outcome(lambda: slow(arg))


@given(
    st.from_regex(
        r"(FROM|To|to|from):<[a-zA-Z0-9._%+!-]{0,12}@?[a-zA-Z0-9._-]{0,20}>", fullmatch=True
    )
)
def test_mail_and_rcpt_fast_paths_on_random_commands(arg: str) -> None:
    if arg[:2].lower() == "to":
        assert _outcome(lambda: parse_rcpt_to(arg)) == _outcome(lambda: _rcpt_to_tokens(arg, False))
    else:
        assert _outcome(lambda: parse_mail_from(arg)) == _outcome(
            lambda: _mail_from_tokens(arg, None)
        )


def test_the_fast_path_takes_the_common_command_and_nothing_more() -> None:
    taken = _simple_path("FROM:<A.B@Example.COM>", 5)
    assert taken is not None and (taken.local, taken.domain, taken.given) == (
        "A.B",
        "example.com",
        "A.B@Example.COM",
    )
    for arg in ("FROM:<a@b.example> SIZE=1", "FROM: <a@b.example>", "FROM:<>", "FROM:<a@1.2>"):
        assert _simple_path(arg, 5) is None


def test_networks_behave_like_the_tuple_of_their_networks() -> None:
    texts = ["192.0.2.0/24", "2001:db8::/32", "10.0.0.1"]
    plain = tuple(ipaddress.ip_network(t) for t in texts)
    compact = Networks.of(texts)
    assert isinstance(compact, tuple)
    assert compact == plain and plain == compact
    assert not compact != plain  # noqa: SIM202 (the operator is what is tested)
    assert hash(compact) == hash(plain)
    assert len(compact) == 3 and bool(compact) and not Networks()
    assert list(compact) == list(plain) and tuple(compact) == plain
    assert compact[1] == plain[1] and compact[-1] == plain[-1]
    assert compact[1:] == plain[1:]
    assert list(reversed(compact)) == list(reversed(plain))
    assert plain[0] in compact and ipaddress.ip_network("192.0.2.0/25") not in compact
    assert compact.index(plain[2]) == 2 and compact.count(plain[0]) == 1
    assert () + compact == plain  # noqa: RUF005 (the operator is what is tested)
    assert compact + () == plain  # noqa: RUF005
    assert repr(compact) == repr(plain)
    assert json.dumps(compact, default=str) == json.dumps(plain, default=str)
    assert pickle.loads(pickle.dumps(compact)) == compact
    assert copy.deepcopy(compact) == compact
    assert Networks.from_entries(compact.entries()) == compact


def _hostname_by_characters(name: str) -> bool:
    """Postfix's valid_hostname() as it was written here before the regular
    expression, one character at a time (the reference)."""
    if not name:
        return False
    label_length = 0
    non_numeric = False
    last = len(name) - 1
    for i, ch in enumerate(name):
        if ch in string.ascii_letters or ch in string.digits or ch == "_":
            label_length += 1
            if label_length > 63:
                return False
            if ch not in string.digits:
                non_numeric = True
        elif ch == ".":
            if label_length == 0 or i == last:
                return False
            label_length = 0
        elif ch == "-":
            label_length += 1
            if label_length == 1 or i == last or name[i + 1] == ".":
                return False
        else:
            return False
    return non_numeric and len(name) <= 255


HOSTNAME_EXAMPLES = [
    "",
    ".",
    "a",
    "a.",
    ".a",
    "a..b",
    "mail.example.com",
    "192.0.2.10",
    "1-2.3",
    "_dmarc.example",
    "a-b.c",
    "-a.b",
    "a-.b",
    "a.b-",
    "x" * 63 + ".example",
    "x" * 64 + ".example",
    ".".join(["abcdefg"] * 32),  # 255 characters
    ".".join(["abcdefg"] * 32) + "x",
    "exa mple.com",
    "bücher.example",
    "a\n",
    "a.b\n",
    "\uff11\uff12.example",  # non-ASCII digits are no digits
]


@pytest.mark.parametrize("name", HOSTNAME_EXAMPLES)
def test_hostname_pattern_agrees_with_the_character_loop(name: str) -> None:
    assert _valid_hostname(name) is _hostname_by_characters(name)


@given(st.text(alphabet="ab09_-.Zé\n ", max_size=80) | st.text(max_size=40))
def test_hostname_pattern_agrees_on_random_names(name: str) -> None:
    assert _valid_hostname(name) is _hostname_by_characters(name)


@given(
    st.lists(st.from_regex(r"[a-z0-9_-]{1,70}", fullmatch=True), min_size=1, max_size=6).map(
        ".".join
    )
)
def test_hostname_pattern_agrees_on_random_labels(name: str) -> None:
    assert _valid_hostname(name) is _hostname_by_characters(name)


@given(st.text(max_size=300) | st.from_regex(r"[!-~]{0,300}", fullmatch=True))
def test_header_safe_fast_path_is_the_character_loop(text: str) -> None:
    from mailpolicy.dialogue.message import _NEUTER, header_safe

    expected = "".join(c if " " < c < "\x7f" else "?" for c in text[:255]).translate(_NEUTER)
    assert header_safe(text) == expected
