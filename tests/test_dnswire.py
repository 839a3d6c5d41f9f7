"""The live resolver's fast path reads replies as dnspython does.

Replies are built by dnspython (its writer, with name compression) from
generated records; whatever :func:`dnswire.read` says must be what the
dnspython path (``dns._interpret``) says, and the common replies must not
fall back to dnspython at all.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpolicy.adapters import dnswire
from mailpolicy.adapters.dns import _from_reading, _interpret, _Reply, _ServerFailed

LABEL = st.one_of(
    st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True),
    st.sampled_from(["with space", "dot.ted", "caf\u00e9"]),  # dnspython's cases
)
PLAIN_LABEL = st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(lambda labels: dns.name.Name([*labels, ""]))


def rdata_text(rtype: str, draw: st.DrawFn, names: list[dns.name.Name]) -> str:
    target = draw(st.sampled_from(names)).to_text()
    if rtype == "A":
        return ".".join(str(draw(st.integers(0, 255))) for _ in range(4))
    if rtype == "AAAA":
        return draw(
            st.sampled_from(["2001:db8::1", "::1", "2001:db8:0:0:1:0:0:1", "::ffff:1.2.3.4"])
        )
    if rtype == "MX":
        return f"{draw(st.integers(0, 65535))} {draw(st.sampled_from([target, '.']))}"
    if rtype in ("PTR", "CNAME", "NS"):
        return target
    if rtype == "TXT":
        chars = st.characters(min_codepoint=32, max_codepoint=126) | st.just("\u00e9")
        parts = draw(st.lists(st.text(chars, max_size=8), min_size=1, max_size=3))
        return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    return f"{target} hostmaster.{target} 1 2 3 4 {draw(st.integers(0, 1000))}"  # SOA


def add(
    response: dns.message.Message,
    section: list[dns.rrset.RRset],
    owner: dns.name.Name,
    rtype: str,
    text: str,
    ttl: int,
) -> None:
    kind = dns.rdatatype.from_text(rtype)
    rrset = response.find_rrset(section, owner, dns.rdataclass.IN, kind, create=True)
    rrset.add(dns.rdata.from_text(dns.rdataclass.IN, kind, text), ttl)


@st.composite
def replies(draw: st.DrawFn) -> tuple[dnswire.Question, bytes]:
    qname = dns.name.Name([*draw(st.lists(PLAIN_LABEL, min_size=1, max_size=3)), ""])
    qtype = draw(st.sampled_from(["A", "AAAA", "MX", "PTR", "TXT"]))
    question = dnswire.query(
        qname.to_text(), qtype, draw(st.integers(0, 65535)), edns=draw(st.booleans())
    )
    assert question is not None
    request = dns.message.from_wire(question.wire)
    response = dns.message.make_response(request)
    response.set_rcode(
        draw(st.sampled_from([dns.rcode.NOERROR] * 6 + [dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL]))
    )
    if draw(st.integers(0, 19)) == 0:
        response.flags |= dns.flags.TC
    plain = [dns.name.Name([*draw(st.lists(PLAIN_LABEL, min_size=1, max_size=3)), ""])]
    odd = draw(st.lists(NAME, max_size=2)) if draw(st.integers(0, 4)) == 0 else []
    # upper-case spellings of the question's name must match too
    names = [qname, dns.name.from_text(qname.to_text().upper()), *plain, *odd]
    ttl = st.integers(0, 100_000)
    # the answer: direct, through a CNAME chain (maybe a loop), or none
    owner = draw(st.sampled_from(names[:2]))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 17]))):
        target = draw(st.sampled_from(names))
        add(response, response.answer, owner, "CNAME", target.to_text(), draw(ttl))
        owner = target
    for _ in range(draw(st.integers(0, 3))):
        add(response, response.answer, owner, qtype, rdata_text(qtype, draw, names), draw(ttl))
    sections = (
        (response.answer, ["A", "AAAA", "MX", "PTR", "TXT", "CNAME"] * 3 + ["NS"]),
        (response.authority, ["SOA", "SOA", "NS", "A"]),
        (response.additional, ["A", "AAAA", "A", "AAAA", "TXT"]),
    )
    for section, types in sections:
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
            rtype = draw(st.sampled_from(types))
            text = rdata_text(rtype, draw, names)
            add(response, section, draw(st.sampled_from(names)), rtype, text, draw(ttl))
    # no shuffle: dnspython would shuffle an rrset's records with the global
    # random module; the order drawn is order enough
    return question, response.to_wire(want_shuffle=False)


def dnspython_says(data: bytes) -> _Reply | str:
    try:
        return _interpret(dns.message.from_wire(data))
    except _ServerFailed:
        return "server failed"


def fast_says(reading: dnswire.Reading) -> _Reply | str:
    try:
        return _from_reading(reading)
    except _ServerFailed:
        return "server failed"


@settings(max_examples=400, deadline=None)
@given(replies())
def test_the_fast_path_reads_what_dnspython_reads(reply: tuple[dnswire.Question, bytes]) -> None:
    question, data = reply
    reading = dnswire.read(data, question)
    if reading is None:  # left to dnspython, which is then the answer
        return
    assert reading is not dnswire.NOT_OURS
    truncated = bool(dns.message.from_wire(data).flags & dns.flags.TC)
    assert reading.truncated is truncated
    if not truncated:
        assert fast_says(reading) == dnspython_says(data)


def reply_to(
    name: str, rtype: str, *records: str, ttl: int = 300
) -> tuple[dnswire.Question, bytes]:
    question = dnswire.query(name, rtype)
    assert question is not None
    response = dns.message.make_response(dns.message.from_wire(question.wire))
    for text in records:
        owner, kind, rdata = text.split(" ", 2)
        rrset = response.find_rrset(
            response.answer,
            dns.name.from_text(owner),
            dns.rdataclass.IN,
            dns.rdatatype.from_text(kind),
            create=True,
        )
        rrset.add(dns.rdata.from_text("IN", kind, rdata), ttl)
    return question, response.to_wire()


@pytest.mark.parametrize(
    ("name", "rtype", "records", "expected"),
    [
        ("example.com", "MX", ["example.com MX 10 mx.Example.com."], ("10 mx.example.com",)),
        ("mx.example.com", "A", ["mx.example.com A 192.0.2.1"], ("192.0.2.1",)),
        ("mx.example.com", "AAAA", ["mx.example.com AAAA 2001:db8::1"], ("2001:db8::1",)),
        (
            "1.2.0.192.in-addr.arpa",
            "PTR",
            ["1.2.0.192.in-addr.arpa PTR host.example.net."],
            ("host.example.net",),
        ),
        (
            "www.example.com",
            "A",
            ["www.example.com CNAME web.example.com.", "web.example.com A 192.0.2.7"],
            ("192.0.2.7",),
        ),
        ("example.com", "TXT", ['example.com TXT "v=spf1 " "-all"'], ("v=spf1 -all",)),
        ("example.com", "A", [], None),
    ],
)
def test_common_replies_take_the_fast_path(
    name: str, rtype: str, records: list[str], expected: tuple[str, ...] | None
) -> None:
    question, data = reply_to(name, rtype, *records)
    reading = dnswire.read(data, question)
    assert reading is not None
    assert reading.records == expected
    assert fast_says(reading) == dnspython_says(data)


def test_another_id_is_not_ours_and_odd_names_go_to_dnspython() -> None:
    question, data = reply_to("example.com", "A", "example.com A 192.0.2.1")
    other = bytes([data[0] ^ 0xFF]) + data[1:]
    assert dnswire.read(other, question) is dnswire.NOT_OURS
    assert dnswire.read(data[:20], question) is None  # cut short: dnspython refuses it
    assert dnswire.query("caf\u00e9.example", "A") is None
    assert dnswire.query("with space.example", "A") is None
    assert dnswire.query("example.com", "SPF") is None


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
def test_reverse_names_are_dnspythons(ip: object) -> None:
    import dns.reversename

    from mailpolicy.adapters.dns import query_name
    from mailpolicy.model import DnsQuery, RType

    expected = dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True)
    assert query_name(DnsQuery.of(str(ip), RType.PTR)) == expected


@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize("rtype", ["A", "AAAA", "MX", "PTR", "TXT"])
def test_queries_are_the_bytes_dnspython_writes(rtype: str, edns: bool) -> None:
    question = dnswire.query("Mail.Example.com.", rtype, 4660, edns=edns)
    assert question is not None
    expected = dns.message.make_query(
        "Mail.Example.com.", rtype, use_edns=0 if edns else False, payload=1232, id=4660
    )
    assert question.wire == expected.to_wire()
    # plain, as glibc's stub resolver sends: no additional record at all
    assert (question.wire[10:12] == b"\x00\x01") is edns
