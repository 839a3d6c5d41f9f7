"""The live resolver's fast path: a question's bytes, and the answers the
checks need read straight from the reply.

dnspython builds and parses every other message; here only the common case
is handled: plain host names, and replies whose answer section holds A,
AAAA, MX, PTR, TXT and CNAME records in class IN. Anything else (an escaped
or internationalised name, another record type, a malformed or unusual
reply) makes :func:`query` or :func:`read` return ``None``, and the caller
hands that message to dnspython, so what is read here is never a guess.
dnspython took about 1,900 Python calls per question (objects for every
name, record and set); this takes a few dozen. ``tests/test_dnswire.py``
checks, on generated replies, that it answers as dnspython does.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct

import attrs

__all__ = ["NOT_OURS", "Question", "Reading", "query", "read"]

#: record type codes
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, OPT = 1, 2, 5, 6, 12, 15, 16, 28, 41
CODES = {"A": A, "AAAA": AAAA, "MX": MX, "PTR": PTR, "TXT": TXT}

_NOERROR, _NXDOMAIN = 0, 3
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
#: the bytes of a plain label: a name is checked in one pass
#: (``bytes.translate`` deletes them; anything left is not plain)
_PLAIN = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_PLAIN_OR_DOT = _PLAIN + b"."
#: dnspython's limit on a CNAME chain
MAX_CHAIN = 16


class _Unusual(Exception):
    """Leave this reply to dnspython."""


@attrs.frozen
class Question:
    """A question as sent: its id, its bytes, and its question section
    (a reply must echo it)."""

    qid: int
    wire: bytes
    section: bytes
    rtype: int


@attrs.frozen
class Reading:
    """What a reply to our question says.

    ``truncated``: ask again over TCP. Otherwise ``rcode``; for NOERROR,
    ``records`` (``None``: no answer, i.e. NODATA) as the resolver writes
    them, ``ttl`` the smallest TTL of the answer and its CNAME chain, or
    ``broken`` for a CNAME chain too long; ``negative_ttl`` from the first
    SOA of the authority section (``min(TTL, MINIMUM)``, 0.0 without one).
    """

    rcode: int
    truncated: bool = False
    records: tuple[str, ...] | None = None
    ttl: float = 0.0
    negative_ttl: float = 0.0
    broken: bool = False


#: a datagram that is not a reply to our question (another id, another question)
NOT_OURS = Reading(-1)


def query(name: str, rtype: str, qid: int | None = None, *, edns: bool = False) -> Question | None:
    """The bytes of a recursive query for ``name``, or ``None`` when the
    name is not plain ASCII host-name labels. ``qid``: the message id, random
    unless given. ``edns``: with an OPT record offering a 1232-byte payload
    (as dnspython's ``make_query(..., use_edns=0, payload=1232)``); without
    it, a plain query as glibc's stub resolver (and so Postfix) sends."""
    code = CODES.get(rtype)
    if code is None or not name.isascii():
        return None
    text = name.rstrip(".").encode("ascii")
    out = bytearray()
    if text:
        if text.translate(None, _PLAIN_OR_DOT):
            return None
        for label in text.split(b"."):
            if not 0 < len(label) < 64:
                return None
            out.append(len(label))
            out += label
    out.append(0)
    if len(out) > 255:
        return None
    section = bytes(out) + struct.pack("!HH", code, 1)
    if qid is None:
        qid = secrets.randbits(16)
    if edns:
        # RD set; one question; one additional record: the OPT pseudo-record
        wire = _HEADER.pack(qid, 0x0100, 1, 0, 0, 1) + section + b"\x00" + _RR.pack(OPT, 1232, 0, 0)
    else:
        wire = _HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + section  # RD set; one question
    return Question(qid, wire, section, code)


def read(data: bytes, question: Question) -> Reading | None:
    """Read a datagram received for ``question``: :data:`NOT_OURS`, a
    :class:`Reading`, or ``None`` for dnspython to read."""
    if len(data) < 12:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if qid != question.qid:
        return NOT_OURS
    if not flags & 0x8000 or flags & 0x7800 or qdcount != 1:
        return None  # not a reply, another opcode, or no question: dnspython decides
    end = 12 + len(question.section)
    if data[12:end].lower() != question.section.lower():
        # usually another question; a name in another spelling is dnspython's
        return None
    try:
        reading = _read(data, end, flags, ancount, nscount, arcount, question.rtype)
    except (_Unusual, IndexError, struct.error, ValueError):
        return None
    return reading


def _read(
    data: bytes, off: int, flags: int, ancount: int, nscount: int, arcount: int, rtype: int
) -> Reading:
    rcode = flags & 0x000F
    # answer section: records by (owner, type), duplicates once, TTLs merged
    rrsets: dict[tuple[str, int], tuple[int, list[str]]] = {}
    seen: set[tuple[str, int, str | bytes]] = set()
    for _ in range(ancount):
        owner, kind, klass, ttl, off, stop = _record(data, off)
        if klass != 1:
            raise _Unusual
        text = _rdata(data, off, stop, kind)
        key = (owner, kind)
        # a record twice is once, as in dnspython's sets: equal when their
        # canonical forms are (names in any case; TXT strings as they are split)
        same = (owner, kind, data[off:stop] if kind == TXT else text)
        old = rrsets.get(key)
        if old is None:
            rrsets[key] = (ttl, [text])
        else:
            if same not in seen:
                old[1].append(text)
            rrsets[key] = (min(old[0], ttl), old[1])
        seen.add(same)
        off = stop
    negative: float | None = None
    soa_owner = None
    for _ in range(nscount):
        owner, kind, klass, ttl, off, stop = _record(data, off)
        if klass != 1 or kind not in (SOA, NS):
            raise _Unusual
        _check_names(data, off, stop, kind)
        if kind == SOA and soa_owner in (None, owner):
            # the first SOA's owner: its TTL (smallest of its records) and
            # the MINIMUM of its first record
            minimum = struct.unpack_from("!I", data, stop - 4)[0]
            if soa_owner is None:
                soa_owner, negative = owner, float(min(ttl, minimum))
            else:
                assert negative is not None
                negative = float(min(negative, ttl))
        off = stop
    opt = False
    for _ in range(arcount):
        owner, kind, klass, ttl, off, stop = _record(data, off)
        if kind == OPT:
            # one, at the root, no extended rcode (dnspython would combine it)
            if opt or owner or ttl >> 24:
                raise _Unusual
            opt = True
        elif klass != 1 or (kind, stop - off) not in ((A, 4), (AAAA, 16)):
            raise _Unusual
        off = stop
    if off != len(data):
        raise _Unusual  # trailing bytes: dnspython refuses the message
    neg = negative if negative is not None else 0.0
    if flags & 0x0200:
        return Reading(rcode, truncated=True, negative_ttl=neg)
    if rcode != _NOERROR:
        return Reading(rcode, negative_ttl=neg)
    return _chain(rrsets, data, rtype, neg)


def _record(data: bytes, off: int) -> tuple[str, int, int, int, int, int]:
    """A resource record's owner, type, class and TTL, and where its data
    starts and ends."""
    owner, off = _name(data, off)
    kind, klass, ttl, length = _RR.unpack_from(data, off)
    stop = off + 10 + length
    if stop > len(data):
        raise _Unusual
    return owner, kind, klass, ttl, off + 10, stop


def _chain(
    rrsets: dict[tuple[str, int], tuple[int, list[str]]], data: bytes, rtype: int, neg: float
) -> Reading:
    """dnspython's ``resolve_chaining``: from the question's name through
    CNAMEs to the records of the question's type."""
    name = _question_name(data)
    ttl = 0x7FFFFFFF
    count = 0
    while count < MAX_CHAIN:
        found = rrsets.get((name, rtype))
        if found is not None:
            return Reading(_NOERROR, records=tuple(found[1]), ttl=float(min(ttl, found[0])))
        alias = rrsets.get((name, CNAME))
        if alias is None:
            return Reading(_NOERROR, negative_ttl=neg)
        ttl = min(ttl, alias[0])
        name = alias[1][0]
        count += 1
    return Reading(_NOERROR, broken=True)


def _question_name(data: bytes) -> str:
    name, _ = _name(data, 12)
    return name


def _rdata(data: bytes, off: int, stop: int, kind: int) -> str:
    """A record's data as the resolver writes it (see dns._records)."""
    if kind == A and stop - off == 4:
        return f"{data[off]}.{data[off + 1]}.{data[off + 2]}.{data[off + 3]}"
    if kind == AAAA and stop - off == 16:
        return str(ipaddress.IPv6Address(data[off:stop]))
    if kind == MX and stop - off >= 3:
        preference = struct.unpack_from("!H", data, off)[0]
        host, end = _name(data, off + 2)
        if end != stop:
            raise _Unusual
        return f"{preference} {host or '.'}"
    if kind in (PTR, CNAME):
        host, end = _name(data, off)
        if end != stop:
            raise _Unusual
        if kind == PTR and not host:
            return "."  # dnspython's text for the root
        return host
    if kind == TXT and stop > off:
        parts = []
        at = off
        while at < stop:
            size = data[at]
            if at + 1 + size > stop:
                raise _Unusual
            parts.append(data[at + 1 : at + 1 + size])
            at += 1 + size
        return b"".join(parts).decode("utf-8", "replace")
    raise _Unusual


def _check_names(data: bytes, off: int, stop: int, kind: int) -> None:
    """The names in an authority record we do not read still have to be
    well formed, as dnspython would insist."""
    if kind == MX:
        off += 2
    _, end = _name(data, off)
    if kind == SOA:
        _, end = _name(data, end)
        end += 20
    if end != stop:
        raise _Unusual


def _name(data: bytes, off: int) -> tuple[str, int]:
    """A domain name at ``off``: lower-case text without the final dot
    (``""`` for the root), and the offset after it. Compression pointers
    must point backwards; labels must be plain, or dnspython reads it."""
    labels: list[bytes] = []
    after = -1
    length = 0
    while True:
        size = data[off]
        if size == 0:
            off += 1
            break
        if size >= 0xC0:
            target = ((size & 0x3F) << 8) | data[off + 1]
            if after < 0:
                after = off + 2
            if target >= off or target < 12:
                raise _Unusual  # forward, looping, or into the header
            off = target
            continue
        if size > 63:
            raise _Unusual
        end = off + 1 + size
        if end > len(data):
            raise _Unusual
        length += size + 1
        if length > 255:
            raise _Unusual
        labels.append(data[off + 1 : end])
        off = end
    if not labels:
        return "", (after if after >= 0 else off)
    name = b".".join(labels)
    # plain bytes only, and no dot inside a label (one between each two)
    if name.translate(None, _PLAIN_OR_DOT) or name.count(b".") != len(labels) - 1:
        raise _Unusual
    return name.decode("ascii").lower(), (after if after >= 0 else off)
