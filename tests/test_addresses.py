"""Address and host-name syntax: Postfix's rules, case by case, plus properties."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailpolicy.addresses import (
    MAX_PATH_LENGTH,
    NULL_ADDRESS,
    Address,
    AddressError,
    is_fqdn,
    is_valid_helo,
    is_valid_hostaddr,
    is_valid_hostname,
    is_valid_ip_literal,
    parent_domains,
    parse_address,
    parse_mail_from,
    parse_rcpt_to,
)
from mailpolicy.model import Reply

# ---------------------------------------------------------------------------
# Host names (util/valid_hostname.c), including the oracle-recorded cases


@pytest.mark.parametrize(
    ("name", "valid", "fqdn"),
    [
        # recorded against real Postfix 3.7
        ("localhost", True, False),
        ("bad!host", False, False),
        ("bad_name!", False, False),
        ("-bad.example.com", False, False),
        ("under_score.example.com", True, True),
        ("host.example.123", True, True),
        ("192.0.2.10", False, False),
        ("mail.example.com.", True, True),
        # the rest of valid_hostname()
        ("mail.example.com", True, True),
        ("MAIL.Example.COM", True, True),
        ("a", True, False),
        ("a-b.example", True, True),
        ("a--b.example", True, True),
        ("a-.example", False, False),
        ("a.-b.example", False, False),
        ("example.com-", False, False),
        ("_dmarc.example.com", True, True),
        ("123", False, False),
        ("1.2.3", False, False),
        ("1.2.3.4.5", False, False),
        ("1a.2.3", True, True),
        ("0-0", False, False),  # a hyphen does not make a name non-numeric
        ("1-800.2", False, False),
        ("1_800.2", True, True),
        ("0x10.example", True, True),
        ("a..b", False, False),
        (".example.com", False, False),
        ("example.com..", False, False),
        (".", False, False),
        ("", False, False),
        ("exa mple.com", False, False),
        ("exam:ple.com", False, False),
        ("bücher.example", False, False),
        ("[192.0.2.1]", False, False),
    ],
)
def test_hostnames(name: str, valid: bool, fqdn: bool) -> None:
    assert is_valid_hostname(name) is valid
    assert is_fqdn(name) is fqdn


def test_label_and_name_lengths() -> None:
    assert is_valid_hostname("a" * 63 + ".example")
    assert not is_valid_hostname("a" * 64 + ".example")
    # 63 + 1 + 63 + 1 + 63 + 1 + 63 = 255 characters: the limit
    name255 = ".".join(["a" * 63] * 4)
    assert len(name255) == 255
    assert is_valid_hostname(name255)
    assert is_valid_hostname(name255 + ".")  # the trailing dot does not count
    assert not is_valid_hostname(name255 + "b")
    assert not is_valid_hostname("b." + name255)


def test_fqdn_with_utf8_only_when_asked() -> None:
    assert not is_fqdn("bücher.example")
    assert is_fqdn("bücher.example", smtputf8=True)
    assert is_fqdn("BÜCHER.example.", smtputf8=True)
    assert not is_fqdn("bücher", smtputf8=True)
    assert not is_fqdn("bü cher.example", smtputf8=True)
    assert is_fqdn("plain.example", smtputf8=True)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("192.0.2.1", True),
        ("0.0.0.0", True),
        ("255.255.255.255", True),
        ("010.1.1.1", True),  # Postfix reads leading zeros as decimal
        ("0.1.2.3", False),  # but refuses a zero first octet
        ("256.1.1.1", False),
        ("1.2.3", False),
        ("1.2.3.4.5", False),
        ("1.2.3.", False),
        (".1.2.3", False),
        ("1..2.3", False),
        ("a.b.c.d", False),
        ("2001:db8::1", True),
        ("::", True),
        ("::1", True),
        ("1::", True),
        ("1:2:3:4:5:6:7:8", True),
        ("::ffff:192.0.2.1", True),
        ("1:2:3:4:5:6:1.2.3.4", True),
        ("1:2:3:4:5:6:7:8:9", False),
        # valid_ipv6_hostaddr() does not count fields: Postfix accepts these
        ("0:0:0", True),
        ("1:2:3:4:5:6:7::", False),  # but does count colons
        (":1:2::", False),
        ("1::2::3", False),
        (":::", False),
        ("1:", False),
        ("1:2:", False),
        ("12345::", False),
        ("g::1", False),
        ("IPv6:2001:db8::1", False),  # the prefix belongs to literals only
        ("", False),
    ],
)
def test_hostaddr(text: str, valid: bool) -> None:
    assert is_valid_hostaddr(text) is valid


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("[ipv6:2001:DB8::1]", True),
        ("[IPV6:::1]", True),
        # valid_mailhost_addr(): without "IPv6:" the text must be IPv4
        ("[2001:db8::1]", False),
        ("[IPv6:192.0.2.1]", False),
        ("[192.0.2.256]", False),
        ("[0.1.2.3]", False),
        ("[]", False),
        ("[", False),
        ("192.0.2.1", False),
        ("[192.0.2.1", False),
        ("192.0.2.1]", False),
        ("[192.0.2.1]x", False),
        ("[host.example]", False),
        ("[IPv6:" + "0000:" * 7 + "0000]", True),  # 44 characters inside: fits
        ("[IPv6:" + "0000:" * 6 + "000.000.000.000]", False),  # 46: too long for Postfix
    ],
)
def test_ip_literal(text: str, valid: bool) -> None:
    assert is_valid_ip_literal(text) is valid


@pytest.mark.parametrize(
    ("helo", "valid"),
    [
        ("mail.example.com", True),
        ("localhost", True),
        ("mail.example.com.", True),
        ("192.0.2.10", True),  # bare IPv4 passes reject_invalid_helo_hostname
        ("192.0.2.10.", True),
        ("2001:db8::10", True),  # so does a bare IPv6 address
        ("[192.0.2.10]", True),
        ("[IPv6:2001:db8::10]", True),
        ("[2001:db8::10]", False),
        ("[garbage]", False),
        ("[192.0.2.10", False),
        ("bad_name!", False),
        ("bad!host", False),
        ("-bad.example.com", False),
        ("0.1.2.3", False),
    ],
)
def test_helo(helo: str, valid: bool) -> None:
    assert is_valid_helo(helo) is valid


def test_bare_ipv4_helo_is_valid_but_not_fqdn() -> None:
    assert is_valid_helo("192.0.2.10")
    assert not is_valid_hostname("192.0.2.10")
    assert not is_fqdn("192.0.2.10")


def test_parent_domains() -> None:
    assert parent_domains("a.b.c") == ("a.b.c", "b.c", "c")
    assert parent_domains("A.B.C.") == ("a.b.c", "b.c", "c")
    assert parent_domains("example") == ("example",)
    assert parent_domains("") == ()
    assert parent_domains("[192.0.2.1]") == ("[192.0.2.1]",)
    assert parent_domains("[IPv6:2001:db8::1]") == ("[ipv6:2001:db8::1]",)


# ---------------------------------------------------------------------------
# The Address value


def test_address_value() -> None:
    a = Address("User", "Example.COM.")
    assert a.domain == "example.com"
    assert a.text == str(a) == "User@example.com"
    assert not a.is_null and not a.is_literal
    assert Address("u", "[192.0.2.1]").is_literal
    assert Address("postmaster").text == "postmaster"
    assert NULL_ADDRESS.is_null and NULL_ADDRESS.text == ""
    assert Address("", "").is_null
    assert Address("a", "b", route=["X.example."]).route == ("x.example",)


@pytest.mark.parametrize(
    ("local", "text"),
    [
        ("a b", '"a b"@x.example'),
        ('a"b', '"a\\"b"@x.example'),
        ("a\\b", '"a\\\\b"@x.example'),
        ("a..b", '"a..b"@x.example'),
        (".a", '".a"@x.example'),
        ("a.", '"a."@x.example'),
        ("a@b", '"a@b"@x.example'),
        ("a,b", '"a,b"@x.example'),
        ("", '""@x.example'),
        ("first.last", "first.last@x.example"),
        ("u+tag", "u+tag@x.example"),
        ("a%b!c", "a%b!c@x.example"),
        ("jörg", "jörg@x.example"),
    ],
)
def test_text_quotes_only_when_needed(local: str, text: str) -> None:
    assert Address(local, "x.example").text == text


def test_quoted_is_presentation_only() -> None:
    quoted = parse_address('"abc"@x.example')
    assert quoted.quoted
    assert quoted == Address("abc", "x.example")
    assert hash(quoted) == hash(Address("abc", "x.example"))
    assert quoted.text == "abc@x.example"


@pytest.mark.parametrize(
    ("path", "given", "written"),
    [
        # Postfix's echo: case and a trailing dot kept, quotes and escapes
        # removed, the source route dropped
        ("<SPAM@Bad.Example>", "SPAM@Bad.Example", "SPAM@Bad.Example"),
        ("<r@elsewhere.example.>", "r@elsewhere.example.", "r@elsewhere.example."),
        ('<"john doe"@Example.COM>', "john doe@Example.COM", '"john doe"@Example.COM'),
        ('<"a@b"@example.com>', "a@b@example.com", '"a@b"@example.com'),
        ('<"a\\"b"@X.example>', 'a"b@X.example', '"a\\"b"@X.example'),
        ('<"abc"@X.example>', "abc@X.example", "abc@X.example"),
        ("<@Relay.Example:Route@Spam.Example>", "Route@Spam.Example", "Route@Spam.Example"),
        ("<r@[IPv6:2001:DB8::1]>", "r@[IPv6:2001:DB8::1]", "r@[IPv6:2001:DB8::1]"),
        ("<Postmaster>", "Postmaster", "Postmaster"),
        ("<>", "", ""),
    ],
)
def test_given_is_the_address_as_written(path: str, given: str, written: str) -> None:
    address = parse_address(path)
    assert (address.given, address.written) == (given, written)
    # the envelope form reads back the same (a source route is not kept)
    again = parse_address(written)
    assert (again.local, again.domain, again.given) == (address.local, address.domain, given)


def test_given_is_presentation_only() -> None:
    mixed = parse_address("<A@Example.COM.>")
    assert mixed == Address("A", "example.com")
    assert hash(mixed) == hash(Address("A", "example.com"))
    assert mixed.text == "A@example.com"
    # made from the normalised parts when not given
    assert Address("a b", "Example.COM.").given == "a b@example.com"
    assert Address("postmaster").given == "postmaster"
    assert NULL_ADDRESS.given == ""


# ---------------------------------------------------------------------------
# MAIL FROM and RCPT TO


def _mail(arg: str) -> Address:
    return parse_mail_from(arg)[0]


def _rcpt(arg: str) -> Address:
    return parse_rcpt_to(arg)[0]


def test_mail_from_basic_and_parameters() -> None:
    addr, params = parse_mail_from("FROM:<a@b.example> SIZE=5000 BODY=8BITMIME")
    assert addr == Address("a", "b.example")
    assert params == {"SIZE": "5000", "BODY": "8BITMIME"}
    _, params = parse_mail_from("FROM:<a@b.example> size=1 smtputf8 ret=HDRS Envid=x=y")
    assert params == {"SIZE": "1", "SMTPUTF8": None, "RET": "HDRS", "ENVID": "x=y"}


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a@b.example>",
        "from:<a@b.example>",
        "From:<a@b.example>",
        "FROM: <a@b.example>",  # Postfix tolerates space after the colon
        "FROM:   <a@b.example>",
        "FROM:\t<a@b.example>",
        "FROM:a@b.example",  # and a bare address
        "FROM:<a@B.EXAMPLE.>",
        "FROM:<<a@b.example>>",  # nested brackets are ignored
    ],
)
def test_mail_from_forms(arg: str) -> None:
    assert _mail(arg) == Address("a", "b.example")


def test_null_sender() -> None:
    addr, params = parse_mail_from("FROM:<>")
    assert addr.is_null and addr == NULL_ADDRESS
    assert params == {}
    assert _mail("FROM:<> BODY=7BIT").is_null
    assert _mail('FROM:<"">').is_null


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "FROM",
        "FROM:",
        "FROM :<a@b.example>",
        "TO:<a@b.example>",
        "FROMX:<a@b.example>",
        "<a@b.example>",
        "FROM<a@b.example>",
    ],
)
def test_mail_from_syntax_error(arg: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mail_from(arg)
    err = info.value
    assert (err.reply_code, err.enhanced, err.text) == (501, "5.5.4", "Syntax: MAIL FROM:<address>")
    assert err.reply == Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")


@pytest.mark.parametrize("arg", ["", "TO", "TO:", "TO :<a@b.example>", "FROM:<a@b.example>"])
def test_rcpt_to_syntax_error(arg: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_rcpt_to(arg)
    assert str(info.value) == "501 5.5.4 Syntax: RCPT TO:<address>"


BAD_PATHS = [
    "<a@b.example",  # unbalanced <
    '<"a@b.example>',  # unbalanced quote
    "<a b@c.example>",  # space outside quotes
    "<a\tb@c.example>",
    "<a\x01b@c.example>",  # control character
    '<"a\x01b"@c.example>',  # even quoted
    "<a\x7fb@c.example>",
    "<a(b)@c.example>",
    "<a,b@c.example>",
    "<a;b@c.example>",
    "<a:b@c.example>",
    "<a\\b@c.example>",  # a backslash outside quotes
    "<a[b@c.example>",
    "<a@>",  # empty domain
    "<a@.>",
    "<a@b..example>",
    "<a@b.example..>",
    "<a@.b.example>",
    "<a@-bad.example>",
    "<a@bad!host.example>",
    "<a@bad_name!>",
    '<a@"b.example">',
    "<a@b@>",
    "<a@192.0.2.1>",  # bare IPv4 domain (resolve_numeric_domain = no)
    "<a@[192.0.2.256]>",
    "<a@[2001:db8::1]>",  # IPv6 literal without the IPv6: prefix
    "<a@[192.0.2.1>",
    "<a@[192.0.2.1]x>",
    "<a@x[192.0.2.1]>",
    "<a@b.example>x",
    "<a@b.example>SIZE=1",
    "Name<a@b.example>",  # RFC 822 phrase forms are not modelled
    "<a@bücher.example>",  # UTF-8 domain without SMTPUTF8
    "<a@\udcff.example>",
    "<" + "a" * (MAX_PATH_LENGTH - 11) + "@b.example>",  # 1001 characters
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_sender_path(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mail_from("FROM:" + path)
    assert str(info.value) == "501 5.1.7 Bad sender address syntax"


@pytest.mark.parametrize("path", [*BAD_PATHS, "<>", '<"">'])
def test_bad_recipient_path(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_rcpt_to("TO:" + path)
    assert str(info.value) == "501 5.1.3 Bad recipient address syntax"


def test_path_length_limit() -> None:
    path = "<" + "a" * (MAX_PATH_LENGTH - 12) + "@b.example>"
    assert len(path) == MAX_PATH_LENGTH
    assert _mail("FROM:" + path).domain == "b.example"


def test_quoted_local_parts() -> None:
    a = _mail('FROM:<"a b"@x.example>')
    assert (a.local, a.domain, a.quoted) == ("a b", "x.example", True)
    assert a.text == '"a b"@x.example'
    a = _mail('FROM:<"a\\"b\\\\c"@x.example>')
    assert a.local == 'a"b\\c'
    a = _mail('FROM:<"user@other"@x.example>')
    assert a.local == "user@other" and a.domain == "x.example"
    a = _mail('FROM:<"a>b"@x.example>')  # ">" inside quotes does not end the path
    assert a.local == "a>b"
    a = _mail('FROM:<"a\tb"@x.example>')  # a tab inside quotes is text
    assert a.local == "a\tb"
    a = _mail('FROM:<first."middle name".last@x.example>')
    assert a.local == "first.middle name.last" and a.quoted


def test_routing_operators_are_kept() -> None:
    assert _rcpt("TO:<user%other.example@x.example>").local == "user%other.example"
    assert _rcpt("TO:<other.example!user@x.example>").local == "other.example!user"
    # an extra unquoted "@": the last one separates the domain, as in Postfix
    a = _rcpt("TO:<user@other.example@x.example>")
    assert (a.local, a.domain) == ("user@other.example", "x.example")


def test_source_routes() -> None:
    a = _rcpt("TO:<@a.example,@B.example:u@c.example>")
    assert (a.local, a.domain, a.route) == ("u", "c.example", ("a.example", "b.example"))
    assert a.text == "u@c.example"
    assert _rcpt("TO:<@a.example:u@c.example>").route == ("a.example",)
    # Postfix never looks inside the route
    assert _rcpt("TO:<@:u@c.example>") == Address("u", "c.example")
    # no colon: not a route, and "@x" alone is a domain with an empty local part
    assert _rcpt("TO:<@c.example>") == Address("", "c.example")
    with pytest.raises(AddressError):
        parse_rcpt_to("TO:<@a.example,@b.example>")
    with pytest.raises(AddressError):
        parse_rcpt_to("TO:<@a example:u@c.example>")


def test_address_literals() -> None:
    assert _rcpt("TO:<u@[192.0.2.1]>") == Address("u", "[192.0.2.1]")
    a = _rcpt("TO:<u@[IPv6:2001:DB8::1]>")
    assert a.domain == "[ipv6:2001:db8::1]" and a.is_literal
    assert _rcpt("TO:<u@[192.0.2.1].>").domain == "[192.0.2.1]"


def test_domain_forms() -> None:
    assert _rcpt("TO:<u@Example.COM.>").domain == "example.com"
    assert _rcpt("TO:<u@under_score.example.com>").domain == "under_score.example.com"
    assert _rcpt("TO:<u@host.example.123>").domain == "host.example.123"
    assert _rcpt("TO:<u@localhost>").domain == "localhost"


def test_local_only() -> None:
    assert _rcpt("TO:<postmaster>") == Address("postmaster")
    assert _rcpt("TO:<Postmaster>").text == "Postmaster"
    assert _rcpt("TO:postmaster") == Address("postmaster")


def test_lenient_local_parts() -> None:
    # Postfix does not enforce RFC 5321 dot-strings or lengths
    assert _rcpt("TO:<a..b@x.example>").local == "a..b"
    assert _rcpt("TO:<.a@x.example>").local == ".a"
    assert _rcpt("TO:<a.@x.example>").local == "a."
    long_local = "a" * 200
    assert _rcpt(f"TO:<{long_local}@x.example>").local == long_local


def test_utf8() -> None:
    # UTF-8 local parts are always accepted
    assert _mail("FROM:<jörg@x.example>").local == "jörg"
    assert _rcpt("TO:<用户@x.example>").local == "用户"
    # a UTF-8 domain only in an SMTPUTF8 transaction
    with pytest.raises(AddressError):
        parse_mail_from("FROM:<a@bücher.example>")
    assert _mail("FROM:<a@Bücher.example> SMTPUTF8").domain == "bücher.example"
    assert parse_mail_from("FROM:<a@bücher.example>", smtputf8=True)[0].domain == "bücher.example"
    with pytest.raises(AddressError):
        parse_mail_from("FROM:<a@bücher.example> SMTPUTF8", smtputf8=False)
    with pytest.raises(AddressError):
        parse_rcpt_to("TO:<a@bücher.example>")
    assert parse_rcpt_to("TO:<a@bücher.example>", smtputf8=True)[0].domain == "bücher.example"
    with pytest.raises(AddressError):
        parse_rcpt_to("TO:<a@bü..example>", smtputf8=True)


def test_rcpt_parameters() -> None:
    addr, params = parse_rcpt_to(
        "TO:<r@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r@example.com"
    )
    assert addr == Address("r", "example.com")
    assert params == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;r@example.com"}


def test_bare_path_with_space_becomes_a_parameter() -> None:
    # The SMTP tokenizer splits on white space; Postfix then refuses the
    # unknown option, which is the caller's business.
    addr, params = parse_mail_from("FROM:a b@c.example")
    assert addr == Address("a")
    assert params == {"B@C.EXAMPLE": None}


def test_parse_address() -> None:
    assert parse_address("a@b.example") == Address("a", "b.example")
    assert parse_address("<a@b.example>") == Address("a", "b.example")
    assert parse_address("") is NULL_ADDRESS
    assert parse_address("<>").is_null
    assert parse_address("postmaster") == Address("postmaster")
    assert parse_address("@a.example:u@c.example").route == ("a.example",)
    assert parse_address('"a b"@c.example').local == "a b"
    assert parse_address("a@bücher.example").domain == "bücher.example"
    with pytest.raises(AddressError) as info:
        parse_address("a b@c.example")
    assert str(info.value) == "501 5.1.3 Bad address syntax"
    with pytest.raises(AddressError):
        parse_address("a@bücher.example", smtputf8=False)


# ---------------------------------------------------------------------------
# Properties

_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"

_label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9_])?", fullmatch=True)
_hostnames = (
    st.lists(_label, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda name: not set(name) <= set("0123456789.-"))
)
_literals = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]").filter(is_valid_ip_literal),
    st.ip_addresses(v=6).map(lambda ip: f"[ipv6:{ip}]"),
)
# Any text without ASCII control characters or surrogates.
_local_chars = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters="".join(map(chr, [*range(9), *range(10, 32), 127])),
)
_locals = st.one_of(
    st.text(alphabet=_ATEXT, min_size=1, max_size=20),
    st.text(alphabet=_local_chars, max_size=20),
)
_addresses = st.builds(Address, _locals, st.one_of(st.just(""), _hostnames, _literals))


@given(_addresses)
@example(Address("a b", "x.example"))
@example(Address('"\\', "x.example"))
@example(Address("@", ""))
@example(Address("", "x.example"))
@example(Address("", ""))
def test_round_trip(address: Address) -> None:
    assert parse_address(address.text) == address
    written = parse_address(address.written)
    assert (written, written.given) == (address, address.given)
    if address.is_null:
        assert parse_mail_from("FROM:<>")[0] == address
        return
    assert parse_mail_from(f"FROM:<{address.text}>")[0] == address
    assert parse_rcpt_to(f"TO:<{address.text}> NOTIFY=NEVER")[0] == address
    assert parse_mail_from(f"FROM: <{address.text}> SIZE=1")[0] == address


@given(
    _addresses,
    st.lists(st.from_regex(r"[a-z]{1,8}\.example", fullmatch=True), min_size=1, max_size=3),
)
def test_round_trip_with_route(address: Address, route: list[str]) -> None:
    if address.is_null:
        return
    routed = ",".join("@" + d for d in route) + ":" + address.text
    parsed = parse_rcpt_to(f"TO:<{routed}>")[0]
    assert parsed == Address(address.local, address.domain, tuple(route))


@given(st.text())
@example("FROM:<")
@example('FROM:"')
@example("FROM:<\\")
@example("FROM:<@:")
@example("FROM:<a@[")
@example("FROM:\\")
def test_parsers_raise_only_address_error(text: str) -> None:
    for call in (
        lambda: parse_mail_from(text),
        lambda: parse_mail_from("FROM:" + text),
        lambda: parse_mail_from("FROM:<" + text + ">"),
        lambda: parse_rcpt_to(text),
        lambda: parse_rcpt_to("TO:" + text),
        lambda: parse_rcpt_to("TO:<" + text + ">", smtputf8=True),
        lambda: parse_address(text),
    ):
        try:
            address = call()
        except AddressError as err:
            assert err.reply_code == 501
            assert err.enhanced in ("5.5.4", "5.1.7", "5.1.3")
        else:
            parsed = address if isinstance(address, Address) else address[0]
            assert isinstance(parsed, Address)
            # whatever parses has a canonical form that parses back the same
            assert parse_address(parsed.text) == Address(parsed.local, parsed.domain)


_HOSTNAME_REFERENCE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def _reference_valid_hostname(name: str) -> bool:
    """An independent reading of valid_hostname(), for comparison."""
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if not name or len(name) > 255:
        return False
    labels = name.split(".")
    if not all(len(label) <= 63 and _HOSTNAME_REFERENCE.fullmatch(label) for label in labels):
        return False
    # Only a letter or "_" makes a name non-numeric: "0-0" is numeric.
    return any(ch.isalpha() or ch == "_" for ch in name)


@given(st.text(alphabet="ab09_-.!:", max_size=24))
@example("a" * 64)
@example(".".join(["a" * 63] * 4) + "x")
def test_hostname_matches_reference(name: str) -> None:
    assert is_valid_hostname(name) == _reference_valid_hostname(name)


@given(st.ip_addresses(v=4))
def test_ipv4_addresses_are_hostaddrs(ip: ipaddress.IPv4Address) -> None:
    expected = not str(ip).startswith("0.") or str(ip) == "0.0.0.0"
    assert is_valid_hostaddr(str(ip)) is expected
    assert is_valid_helo(f"[{ip}]") is expected
    assert not is_valid_hostname(str(ip))


@given(st.ip_addresses(v=6))
def test_ipv6_addresses_are_hostaddrs(ip: ipaddress.IPv6Address) -> None:
    assert is_valid_hostaddr(ip.compressed)
    assert is_valid_hostaddr(ip.exploded)
    assert is_valid_ip_literal(f"[IPv6:{ip.compressed}]")
    assert not is_valid_ip_literal(f"[{ip.compressed}]")
