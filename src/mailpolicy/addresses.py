"""SMTP address and host-name syntax, judged as Postfix 3.7 judges it.

Theory of operation
-------------------
Everything here is pure: strings in, values or :class:`AddressError` out.

*Host names* follow Postfix's ``valid_hostname()`` and ``valid_hostaddr()``
(``util/valid_hostname.c``) character for character: letters, digits, ``-``
and ``_`` (Postfix allows it: "grr.."); a hyphen may not start or end a label;
no empty labels; labels of at most 63 and names of at most 255 characters; a
name made only of digits and dots is numeric, hence not a host name (it may
still be a valid bare IPv4 address). Every Postfix caller first drops one
trailing dot ("truncate hostnames ending in dot but not dot-dot"), so the
public predicates do too. Address literals follow ``valid_mailhost_literal()``:
``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (prefix in any case); Postfix
refuses a bare IPv6 address in brackets, and so do we.

*Paths* are read the way ``smtpd`` reads them: the command argument is split
into tokens by Postfix's SMTP tokenizer (``smtpd_token.c``: white space
separates, ``<...>`` and ``"..."`` protect, ``FROM:``/``TO:`` end a token), the
path loses its angle brackets and any source route (``@a,@b:``), and what is
left must be ``local@domain`` or a bare ``local``. The domain must then pass the
check ``trivial-rewrite`` makes before it will route an address (a valid host
name or address literal; a bare IPv4 domain is refused, as with the default
``resolve_numeric_domain = no``); a domain that fails makes ``smtpd`` answer
``501 5.1.7 Bad sender address syntax`` (``5.1.3 ... recipient ...``).

Postfix is lenient about local parts, and so are we: dots may repeat or lead,
``%``, ``!`` and even extra ``@`` are kept as they are (relay control judges
them), UTF-8 is accepted. Refused: white space and control characters outside
quotes, RFC 5322 specials (``()<>,;:[]\\``) outside quotes, unbalanced quotes or
brackets, and a path longer than :data:`MAX_PATH_LENGTH`. A non-ASCII *domain*
is accepted only in an SMTPUTF8 transaction, converted with IDNA for the check
(Postfix's ``valid_utf8_hostname()``).

Not modelled: RFC 822 phrase forms such as ``Name <a@b>`` (Postfix's address
parser digs the address out of them; we refuse them) and comments.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterable
from typing import Final

import attrs

from .model import Reply

__all__ = [
    "MAX_PATH_LENGTH",
    "NULL_ADDRESS",
    "Address",
    "AddressError",
    "is_fqdn",
    "is_valid_helo",
    "is_valid_hostaddr",
    "is_valid_hostname",
    "is_valid_ip_literal",
    "normal_address",
    "parent_domains",
    "parse_address",
    "parse_mail_from",
    "parse_rcpt_to",
    "simple_address",
]

#: The longest path (as sent, brackets included) we accept.
MAX_PATH_LENGTH: Final = 1000

_VALID_LABEL_LEN: Final = 63
_VALID_HOSTNAME_LEN: Final = 255
#: INET6_ADDRSTRLEN: valid_mailhost_literal() refuses text that does not fit.
_MAX_LITERAL_TEXT: Final = 45

_LETTERS_DIGITS: Final = frozenset(string.ascii_letters + string.digits)
_DIGITS: Final = frozenset(string.digits)
_HEX: Final = frozenset(string.hexdigits)
#: C's isspace() in the C locale, which the SMTP tokenizer uses.
_SPACE: Final = frozenset(" \t\n\v\f\r")
#: RFC 5322 specials that may not appear unquoted ("@", "." and the quote
#: itself are handled by the parser).
_SPECIALS: Final = frozenset('()<>,;:[]\\"')
#: RFC 5321 atext, plus any non-ASCII character (RFC 6531).
_ATEXT: Final = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")


# ---------------------------------------------------------------------------
# Host names and host addresses


def _truncate_dot(name: str) -> str:
    """Postfix's dup_if_truncate(): drop one trailing dot, but not from "..".

    A lone "." stays, and is then invalid.
    """
    if len(name) > 1 and name[-1] == "." and name[-2] != ".":
        return name[:-1]
    return name


#: Postfix's valid_hostname() as one pattern: labels of letters, digits, "_"
#: and inner "-", 1 to 63 long, joined by single dots (none first or last).
#: One regular-expression match instead of a Python loop per character: the
#: HELO, PTR name, sender and recipient checks ask it at every session.
_HOSTNAME_LABELS = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
)
_NON_NUMERIC = re.compile(r"[A-Za-z_]")


@functools.lru_cache(maxsize=8192)
def _valid_hostname(name: str) -> bool:
    """valid_hostname(), exactly: no trailing dot is allowed here."""
    return (
        len(name) <= _VALID_HOSTNAME_LEN
        and _HOSTNAME_LABELS.fullmatch(name) is not None
        # All digits and dots: an IPv4-looking name is not a host name.
        and _NON_NUMERIC.search(name) is not None
    )


def _valid_utf8_hostname(name: str) -> bool:
    """valid_utf8_hostname(): a non-ASCII name is judged by its A-label form."""
    if name.isascii():
        return _valid_hostname(name)
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _valid_hostname(ascii_name)


def _valid_ipv4(addr: str) -> bool:
    """valid_ipv4_hostaddr(): dotted quad, octets <= 255, no 0.x.y.z."""
    in_byte = False
    byte_count = 0
    byte_val = 0
    last = len(addr) - 1
    for i, ch in enumerate(addr):
        if ch in _DIGITS:
            if not in_byte:
                in_byte = True
                byte_val = 0
                byte_count += 1
            byte_val = byte_val * 10 + ord(ch) - 48
            if byte_val > 255:
                return False
        elif ch == ".":
            if not in_byte or i == last:
                return False
            # Postfix allows 0.0.0.0 but not 0.1.2.3.
            if byte_count == 1 and byte_val == 0 and addr.strip("0."):
                return False
            in_byte = False
        else:
            return False
    return byte_count == 4


def _valid_ipv6(addr: str) -> bool:
    """valid_ipv6_hostaddr(), ported step by step (quirks included)."""
    null_field = 0
    field = 0
    length = 0
    i = 0
    n = len(addr)
    while True:
        ch = addr[i] if i < n else ""
        if ch == "":
            if field < 2:
                return False
            return not (length == 0 and null_field != field - 1)
        if ch == ".":
            if field < 2 or field > 6:
                return False
            return _valid_ipv4(addr[i - length :])
        if ch == ":":
            following = addr[i + 1] if i + 1 < n else ""
            if field == 0 and length == 0 and following in _LETTERS_DIGITS:
                return False  # a lone leading ":"
            field += 1
            if field > 7:
                return False
            i += 1
            length = 0
            if i < n and addr[i] == ":":
                if null_field > 0:
                    return False  # a second "::"
                null_field = field
            continue
        length = 0
        while i + length < n and addr[i + length] in _HEX:
            length += 1
        if length == 0 or length > 4:
            return False
        i += length


def _valid_mailhost_addr(text: str) -> bool:
    """valid_mailhost_addr(): "IPv6:" (any case) + IPv6, or else IPv4."""
    if text[:5].lower() == "ipv6:":
        return _valid_ipv6(text[5:])
    return _valid_ipv4(text)


def is_valid_hostname(name: str) -> bool:
    """Whether ``name`` is a host name by Postfix's ``valid_hostname()``.

    One trailing dot is allowed (Postfix's callers strip it first). ASCII
    only; an all-numeric name such as ``192.0.2.10`` is not a host name.
    """
    return _valid_hostname(_truncate_dot(name))


def is_valid_hostaddr(text: str) -> bool:
    """Whether ``text`` is a bare IP address by Postfix's ``valid_hostaddr()``.

    Dotted-quad IPv4 (``0.x.y.z`` refused), or IPv6 without brackets or
    ``IPv6:`` prefix.
    """
    if not text:
        return False
    if ":" in text:
        return _valid_ipv6(text)
    return _valid_ipv4(text)


def is_valid_ip_literal(text: str) -> bool:
    """Whether ``text`` is an address literal: ``[192.0.2.1]`` or
    ``[IPv6:2001:db8::1]`` (the prefix in any case).

    As Postfix's ``valid_mailhost_literal()``: an IPv6 address without the
    ``IPv6:`` prefix is refused, as is text too long for an address.
    """
    if len(text) < 2 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    if len(inner) > _MAX_LITERAL_TEXT or "]" in inner:
        return False
    return _valid_mailhost_addr(inner)


def is_valid_helo(name: str) -> bool:
    """What ``reject_invalid_helo_hostname`` lets through.

    An argument starting with ``[`` must be a valid address literal;
    anything else, after one trailing dot is dropped, must be a host name or
    a bare IP address (Postfix's "back compat" allowance).
    """
    if name.startswith("["):
        # reject_invalid_hostaddr() strips the brackets only when both exist.
        inner = name[1:-1] if len(name) > 2 and name.endswith("]") else name
        return _valid_mailhost_addr(inner)
    test = _truncate_dot(name)
    return _valid_hostname(test) or is_valid_hostaddr(test)


def is_fqdn(name: str, *, smtputf8: bool = False) -> bool:
    """Whether ``name`` is a fully-qualified host name, as the
    ``reject_non_fqdn_*`` restrictions require.

    One trailing dot is dropped; what is left must be a valid host name that
    contains a dot. With ``smtputf8`` a non-ASCII name is judged by its IDNA
    form, as Postfix does for addresses in an SMTPUTF8 transaction (never for
    HELO names).
    """
    test = _truncate_dot(name)
    if "." not in test:
        return False
    if smtputf8:
        return _valid_utf8_hostname(test)
    return _valid_hostname(test)


def parent_domains(domain: str) -> tuple[str, ...]:
    """``domain`` and each of its parents, most specific first.

    ``"a.b.c"`` gives ``("a.b.c", "b.c", "c")``. The name is lower-cased and
    trailing dots are dropped; an address literal has no parents; ``""``
    gives ``()``.
    """
    name = domain.lower().rstrip(".")
    if not name:
        return ()
    if name.startswith("["):
        return (name,)
    labels = name.split(".")
    return tuple(".".join(labels[i:]) for i in range(len(labels)))


# ---------------------------------------------------------------------------
# Addresses


def _normalize_domain(domain: str) -> str:
    return _truncate_dot(domain.lower())


def _normalize_route(route: Iterable[str]) -> tuple[str, ...]:
    return tuple(_normalize_domain(d) for d in route)


def _is_dot_string(local: str) -> bool:
    """RFC 5321 Dot-string (with RFC 6531 UTF-8): needs no quotes."""
    if not local:
        return False
    for atom in local.split("."):
        if not atom:
            return False
        for ch in atom:
            if ch not in _ATEXT and ch.isascii():
                return False
    return True


def _quote_local(local: str) -> str:
    if _is_dot_string(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _internal_form(address: Address) -> str:
    """Postfix's internal form of a normalised address: no quotes."""
    if address.is_null:
        return ""
    return _given(f"{address.local}@{address.domain}" if address.domain else address.local)


@attrs.frozen
class Address:
    """A parsed envelope address.

    ``local`` is the local part without quotes or escapes (``"a b"@x`` has
    local part ``a b``); ``domain`` is lower-cased without its trailing dot,
    ``""`` when there is none, and an address literal keeps its brackets
    (``[192.0.2.1]``, ``[ipv6:2001:db8::1]``). ``route`` holds the source-route
    domains that were stripped (``<@a,@b:u@c>``). ``quoted`` records that the
    client quoted the local part; it is presentation only and does not take
    part in equality.

    ``given`` is the address as the client wrote it, the way Postfix echoes
    it in replies (its "internal form"): quotes and escapes removed, the case
    and a trailing dot of the domain kept, the source route dropped
    (``<"John Doe"@Example.COM.>`` gives ``John Doe@Example.COM.``). It is
    presentation only, like ``quoted``; matching uses ``local`` and
    ``domain``. Without it, it is made from ``local`` and ``domain``.
    """

    local: str
    domain: str = attrs.field(default="", converter=_normalize_domain)
    route: tuple[str, ...] = attrs.field(default=(), converter=_normalize_route)
    quoted: bool = attrs.field(default=False, eq=False)
    given: str = attrs.field(
        default=attrs.Factory(_internal_form, takes_self=True), eq=False, repr=False
    )

    @property
    def is_null(self) -> bool:
        """The null reverse-path ``<>``."""
        return not self.local and not self.domain

    @property
    def is_literal(self) -> bool:
        """The domain is an address literal such as ``[192.0.2.1]``."""
        return self.domain.startswith("[")

    @property
    def text(self) -> str:
        """Canonical ``local@domain``: the local part quoted only when it
        must be, just ``local`` without a domain, ``""`` for the null path."""
        if self.is_null:
            return ""
        local = _quote_local(self.local)
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def written(self) -> str:
        """:attr:`given` quoted again where it must be: the address as the
        client wrote it, for the envelope (``"John Doe"@Example.COM.``). It
        parses back to this address, ``given`` included."""
        if self.is_null:
            return ""
        local = _quote_local(self.local)
        if not self.domain:
            return local
        return f"{local}@{self.given.rpartition('@')[2]}"

    def __str__(self) -> str:
        return self.text


#: The null reverse-path ``<>``.
NULL_ADDRESS: Final = Address("")

_set_field = object.__setattr__


def normal_address(local: str, domain: str, given: str) -> Address:
    """``Address(local, domain, given=given)`` for parts already in normal
    form (``domain`` lower case, without a trailing dot; no source route),
    without the converters: the common address of every RCPT is built this
    way (see ``rules.context``)."""
    address: Address = object.__new__(Address)
    _set_field(address, "local", local)
    _set_field(address, "domain", domain)
    _set_field(address, "route", ())
    _set_field(address, "quoted", False)
    _set_field(address, "given", given)
    return address


class AddressError(ValueError):
    """A path or command argument Postfix would refuse, with its reply."""

    def __init__(self, reply_code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{reply_code} {enhanced} {text}")
        self.reply_code = reply_code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> Reply:
        """The SMTP reply Postfix gives."""
        return Reply(self.reply_code, self.enhanced, self.text)


def _bad_sender() -> AddressError:
    return AddressError(501, "5.1.7", "Bad sender address syntax")


def _bad_recipient() -> AddressError:
    return AddressError(501, "5.1.3", "Bad recipient address syntax")


def _bad_address() -> AddressError:
    return AddressError(501, "5.1.3", "Bad address syntax")


class _Syntax(Exception):
    """Internal: the path is malformed (the caller picks the reply)."""


# -- the SMTP command tokenizer (smtpd_token.c) --------------------------------


def _quoted_token(line: str, i: int, buf: list[str], start: str, last: str) -> tuple[int, bool]:
    """smtp_quoted(): copy up to the matching ``last``; True if it is missing.

    Quotes nest inside brackets and brackets inside brackets, so
    ``<"a>b"@c>`` is one token.
    """
    wanted = [last]
    buf.append(start)
    n = len(line)
    while i < n:
        ch = line[i]
        i += 1
        buf.append(ch)
        if ch == "\\":
            if i >= n:
                break
            buf.append(line[i])
            i += 1
        elif ch == wanted[-1]:
            if len(wanted) == 1:
                return i, False
            wanted.pop()
        elif ch == '"':
            wanted.append('"')
        elif ch == "<" and wanted[-1] == ">":
            wanted.append(">")
    return i, True


def _tokenize(line: str) -> list[tuple[str, bool]]:
    """smtpd_token(): the tokens of a command, each with an "unterminated"
    flag (Postfix's SMTPD_TOK_ERROR)."""
    tokens: list[tuple[str, bool]] = []
    i = 0
    n = len(line)
    while True:
        buf: list[str] = []
        error = False
        while i < n:
            ch = line[i]
            i += 1
            if ch in _SPACE:
                while i < n and line[i] in _SPACE:
                    i += 1
                if buf:
                    break
            elif ch == "<" or ch == '"':
                i, missing = _quoted_token(line, i, buf, ch, ">" if ch == "<" else '"')
                error = error or missing
            elif ch == ":":
                buf.append(ch)
                # "this is gross, but...": FROM: and TO: end a token.
                if "".join(buf).lower() in ("to:", "from:"):
                    break
            else:
                if ch == "\\":
                    buf.append(ch)
                    if i >= n:
                        break
                    ch = line[i]
                    i += 1
                buf.append(ch)
        if not buf:
            return tokens
        tokens.append(("".join(buf), error))


def _parameters(tokens: list[tuple[str, bool]]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for text, _ in tokens:
        key, sep, value = text.partition("=")
        params[key.upper()] = value if sep else None
    return params


# -- the path and the mailbox ---------------------------------------------------


def _check_chars(text: str) -> None:
    """Refuse ASCII control characters and lone surrogates anywhere. A tab
    passes here; outside quotes it is white space, which the parser refuses."""
    for ch in text:
        code = ord(ch)
        if (code < 32 and ch != "\t") or code == 127 or 0xD800 <= code <= 0xDFFF:
            raise _Syntax


def _parse_mailbox(text: str, smtputf8: bool) -> tuple[str, str, bool, str]:
    """``local[@domain]`` -> (local, domain, quoted, given), ``given`` as
    :attr:`Address.given`. Raises _Syntax."""
    _check_chars(text)
    # Pieces: ("a", atom text), ("q", quoted content), ("@", "@"), ("l", literal).
    pieces: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            out: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise _Syntax  # unterminated quoted string
                ch = text[i]
                if ch == "\\":
                    if i + 1 >= n:
                        raise _Syntax
                    out.append(text[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    out.append(ch)
                    i += 1
            pieces.append(("q", "".join(out)))
        elif ch == "@":
            pieces.append(("@", "@"))
            i += 1
        elif ch == "[":
            end = text.find("]", i)
            if end < 0:
                raise _Syntax
            pieces.append(("l", text[i : end + 1]))
            i = end + 1
        elif ch in _SPECIALS or ch in _SPACE:
            raise _Syntax
        else:
            start = i
            while i < n and text[i] not in _SPECIALS and text[i] not in _SPACE and text[i] != "@":
                i += 1
            pieces.append(("a", text[start:i]))

    at = max((k for k, (kind, _) in enumerate(pieces) if kind == "@"), default=-1)
    local_pieces = pieces if at < 0 else pieces[:at]
    domain_pieces = [] if at < 0 else pieces[at + 1 :]

    if any(kind == "l" for kind, _ in local_pieces):
        raise _Syntax
    local = "".join(value for _, value in local_pieces)
    quoted = any(kind == "q" for kind, _ in local_pieces)

    if at < 0:
        return local, "", quoted, _given(local)
    # The domain is one atom run (dots included) or one literal, then at
    # most a trailing dot after a literal.
    if any(kind in ("q", "@") for kind, _ in domain_pieces):
        raise _Syntax
    domain = "".join(value for _, value in domain_pieces)
    given = _given(f"{local}@{domain}")
    if domain_pieces and domain_pieces[0][0] == "l":
        if len(domain_pieces) > 2 or (len(domain_pieces) == 2 and domain_pieces[1][1] != "."):
            raise _Syntax
    elif len(domain_pieces) > 1:
        raise _Syntax
    domain = _truncate_dot(domain)
    if domain.startswith("["):
        if not is_valid_ip_literal(domain):
            raise _Syntax
    elif domain.isascii():
        if not _valid_hostname(domain):
            raise _Syntax
    elif not (smtputf8 and _valid_utf8_hostname(domain)):
        raise _Syntax
    return local, domain.lower(), quoted, given


def _given(text: str) -> str:
    # Postfix's address tokenizer turns white space in quotes into a space.
    return text.replace("\t", " ")


def _strip_brackets(path: str) -> str:
    """Remove ``<...>``, repeatedly: Postfix's RFC 822 parser ignores nested
    angle brackets, so ``<<a@b>>`` is ``a@b``."""
    while len(path) >= 2 and path[0] == "<" and path[-1] == ">":
        path = path[1:-1]
    return path


def _parse_path(path: str, smtputf8: bool) -> Address:
    """A path as sent (with or without brackets) -> Address. Raises _Syntax."""
    if len(path) > MAX_PATH_LENGTH:
        raise _Syntax
    inner = _strip_brackets(path)
    route: tuple[str, ...] = ()
    # Postfix drops "@a,@b:" when the address starts with "@" and has a ":".
    if inner.startswith("@") and ":" in inner:
        route_text, _, inner = inner.partition(":")
        _check_chars(route_text)
        if any(ch in _SPACE for ch in route_text):
            raise _Syntax
        # Postfix never looks inside the route; keep its domains for the record.
        route = tuple(d.lstrip("@") for d in route_text.split(",") if d.lstrip("@"))
    local, domain, quoted, given = _parse_mailbox(inner, smtputf8)
    if not local and not domain:
        return NULL_ADDRESS
    return Address(local, domain, route, quoted, given)


def parse_address(text: str, *, smtputf8: bool = True) -> Address:
    """Parse an address given without a command: ``a@b.example``, a source
    route, a bare local part, ``""`` (the null address); brackets optional.

    ``smtputf8`` allows a non-ASCII domain (the default, since a stored
    address has already been accepted once). Raises :class:`AddressError`
    (``501 5.1.3 Bad address syntax``).
    """
    try:
        return _parse_path(text, smtputf8)
    except _Syntax:
        raise _bad_address() from None


#: The common address shape, ``dot-atom@host.name`` in plain ASCII, which
#: :func:`parse_address` turns into ``Address(local, domain.lower(),
#: given=text)`` whenever the domain is a valid host name: labels of letters,
#: digits, ``_`` and inner ``-`` (at most 63), not all digits, at most 255
#: characters. Anything else takes the full parser.
_SIMPLE_ADDRESS = re.compile(
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)@"
    r"((?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
)
_SIMPLE_NOT_NUMERIC = re.compile(r"[A-Za-z_]")


def simple_address(text: str) -> Address | None:
    """``parse_address(text)`` for the common shape (see ``_SIMPLE_ADDRESS``),
    built without the parser; ``None`` for anything else, which then needs
    :func:`parse_address` (tests/test_fast_paths.py holds them equal)."""
    m = _SIMPLE_ADDRESS.fullmatch(text)
    if m is not None and len(text) <= 1000:
        domain = m.group(2)
        if len(domain) <= 255 and _SIMPLE_NOT_NUMERIC.search(domain):
            return normal_address(m.group(1), domain.lower(), text)
    return None


def _simple_path(arg: str, verb: int) -> Address | None:
    """The address of ``FROM:<a@b.example>`` / ``TO:<...>`` with nothing else
    on the line (``verb``: the length of ``FROM:``/``TO:``), or ``None``."""
    if verb + 2 < len(arg) <= verb + MAX_PATH_LENGTH and arg[verb] == "<" and arg[-1] == ">":
        return simple_address(arg[verb + 1 : -1])
    return None


def parse_mail_from(
    arg: str, *, smtputf8: bool | None = None
) -> tuple[Address, dict[str, str | None]]:
    """Parse the argument of MAIL: ``FROM:<a@b.example> SIZE=5000 BODY=8BITMIME``.

    Returns the sender (the null address for ``<>``) and the parameters,
    keys upper-cased, ``None`` for a parameter without ``=``. ``smtputf8``
    says whether a non-ASCII domain is allowed; by default it is when the
    command carries the ``SMTPUTF8`` parameter, as in Postfix.

    Raises :class:`AddressError`: ``501 5.5.4 Syntax: MAIL FROM:<address>``
    without ``FROM:`` and a path, ``501 5.1.7 Bad sender address syntax`` for
    a malformed path.
    """
    if arg[:5].lower() == "from:":
        simple = _simple_path(arg, 5)
        if simple is not None:
            return simple, {}
    return _mail_from_tokens(arg, smtputf8)


def _mail_from_tokens(arg: str, smtputf8: bool | None) -> tuple[Address, dict[str, str | None]]:
    """:func:`parse_mail_from` by Postfix's tokenizer, for any argument."""
    tokens = _tokenize(arg)
    if len(tokens) < 2 or tokens[0][0].lower() != "from:":
        raise AddressError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    path, unterminated = tokens[1]
    params = _parameters(tokens[2:])
    if smtputf8 is None:
        smtputf8 = any(text.upper() == "SMTPUTF8" for text, _ in tokens[2:])
    if unterminated:
        raise _bad_sender()
    try:
        return _parse_path(path, smtputf8), params
    except _Syntax:
        raise _bad_sender() from None


def parse_rcpt_to(arg: str, *, smtputf8: bool = False) -> tuple[Address, dict[str, str | None]]:
    """Parse the argument of RCPT: ``TO:<u@c.example> NOTIFY=NEVER``.

    Returns the recipient and the parameters (as :func:`parse_mail_from`).
    Pass ``smtputf8=True`` when the transaction's MAIL FROM carried
    ``SMTPUTF8``; only then is a non-ASCII domain allowed.

    Raises :class:`AddressError`: ``501 5.5.4 Syntax: RCPT TO:<address>``
    without ``TO:`` and a path, ``501 5.1.3 Bad recipient address syntax`` for
    a malformed path or ``<>``.
    """
    if arg[:3].lower() == "to:":
        simple = _simple_path(arg, 3)
        if simple is not None:
            return simple, {}
    return _rcpt_to_tokens(arg, smtputf8)


def _rcpt_to_tokens(arg: str, smtputf8: bool) -> tuple[Address, dict[str, str | None]]:
    """:func:`parse_rcpt_to` by Postfix's tokenizer, for any argument."""
    tokens = _tokenize(arg)
    if len(tokens) < 2 or tokens[0][0].lower() != "to:":
        raise AddressError(501, "5.5.4", "Syntax: RCPT TO:<address>")
    path, unterminated = tokens[1]
    params = _parameters(tokens[2:])
    if unterminated:
        raise _bad_recipient()
    try:
        address = _parse_path(path, smtputf8)
    except _Syntax:
        raise _bad_recipient() from None
    if address.is_null:
        raise _bad_recipient()
    return address, params
