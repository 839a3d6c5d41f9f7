"""Relaying a message to its next hops with aiosmtplib.

Theory of operation
-------------------
:func:`relay` hands one message to the next hops of a route, in order, and
says for every recipient what became of it: ``delivered`` (a hop answered
``250`` to the end of DATA with it among the accepted recipients),
``permanent`` (a hop refused it with a ``5xx``) or ``temporary`` (no hop took
it, and none refused it for good). It never raises for a hop's failure; it
raises only for a programming error (no recipients).

For each hop the recipients still pending are sent in one SMTP transaction:

* connection refused, timeout, TLS failure, a greeting that is not ``220``,
  a lost connection at any point, a ``4xx`` to MAIL FROM or to DATA, a failed
  or impossible AUTH: **temporary** for every recipient still pending on that
  hop; they are tried on the next hop.
* ``4xx`` to one RCPT TO: temporary for that recipient; it goes on to the next
  hop. ``5xx`` to one RCPT TO: **permanent** for that recipient; no further hop
  sees it (another MX of the same domain would give the same answer, and
  trying on is how loops and double bounces start).
* ``5xx`` to MAIL FROM or to the end of DATA: permanent for every recipient
  that was still in that transaction.

A greeting with a ``5xx`` is treated as temporary, like Postfix's default
``smtp_skip_5xx_greeting = yes``: that server does not want to talk now, the
next one may. A failed AUTH is temporary like Postfix's default
``smtp_sasl_auth_soft_bounce = yes``: bad credentials are fixed by an operator,
and meanwhile the client keeps the message.

Exactly once
------------
SMTP commits a transaction at the reply to the end of DATA, for all the
recipients accepted in it at once: if DATA fails (a reply of ``4xx``/``5xx``,
or the connection drops before the reply), the hop delivered the message to
none of them, even those it accepted at RCPT time. So a recipient is marked
delivered only after that final ``250``, and only recipients not yet
delivered and not yet refused go to the next hop: within one call a recipient
is delivered at most once and refused at most once.

One window remains, and no SMTP client can close it (RFC 1047): the
connection drops after the hop has received the final dot but before its
``250`` reaches us. The hop may have delivered; we cannot know. We count that
as temporary (a copy too many is recoverable, a lost message is not), so the
message may reach that recipient twice. Keeping ``timeout`` generous keeps the
window small.

What the caller answers
-----------------------
The server talks to one client per transaction and can give only one reply to
the end of DATA, while the outcomes are per recipient. ``all_delivered``:
``250``. ``any_temporary``: ``451``, and the client retries the whole
transaction, so any recipient already delivered here would get a second copy;
nothing is lost. A server avoids that by keeping one route per transaction
(answering ``452 4.5.3`` at RCPT to recipients with a different route, which
RFC 5321 lets the client send in a later transaction), which leaves only the
hop's own per-recipient answers to differ. None temporary but some permanent:
for a single route the hop refused them at RCPT or at DATA; a server answers
with the hop's reply (it already knew better than to accept a mixed set).
That choice belongs to the server; this module reports the facts.

Security levels
---------------
A hop's ``security`` is one of Postfix's TLS levels (docs/settings.md):
``"none"`` means no TLS at all, even if the hop offers STARTTLS: the
setting says what the operator asked for. ``"may"``: STARTTLS when offered,
the certificate not checked; a failed handshake is tried once more on a new
connection without TLS, as Postfix does. ``"encrypt"``: STARTTLS required,
not checked. ``"verify"``, ``"secure"`` and ``"starttls"``: STARTTLS
required, and the certificate verified against ``ca_file`` (else the system
trust store) and the hop's *host name* (not the address connected to), unless
``tls_context`` says otherwise: credentials must not be handed to whoever
answers. ``"tls"``: implicit TLS from the first byte (port 465 style),
verified. A hop that does not offer STARTTLS where it is required is
temporary (``4.7.4``); a failed handshake is temporary (``4.7.5``) with the
reason (an untrusted certificate, a name that does not match) in the reply
and the log. AUTH goes in the clear with ``"none"`` or ``"may"`` if the hop
allows it; choose a verified level for a hop that needs a password.

Addresses and time limits
-------------------------
With a ``resolver`` each hop's host name is resolved through it (A, then
AAAA: :mod:`.nexthops`) and every address is tried in order, each as its own
connection, before the next hop; the operating system's resolver is never
asked. Without one, aiosmtplib connects by name (for library callers).
``connect_timeout`` bounds setting up one TCP connection, ``timeout`` each
reply (the TLS handshake included) and ``time_limit`` the whole call: when it
runs out the recipients still pending are temporary (``4.4.7``).

Passwords
---------
A :class:`~mailpolicy.model.NextHop` names the environment variable that holds
the password, never the password. It is read from ``env`` at the moment of
the attempt, handed to aiosmtplib and dropped; it is never logged, never put in
a reply, an exception or a result. A missing variable is a temporary failure
whose text names the variable.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import ssl
import typing
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Literal

import aiosmtplib
import attrs

from ..model import DnsQuery, DnsResult, NextHop, Reply
from ..settings import VERIFIED_SECURITY, Security
from .dns import Resolver
from .nexthops import HopAddresses, resolve_hops

__all__ = [
    "RecipientOutcome",
    "RelayResult",
    "RelayStatus",
    "relay",
]

log = logging.getLogger(__name__)

RelayStatus = Literal["delivered", "temporary", "permanent"]

DELIVERED: RelayStatus = "delivered"
TEMPORARY: RelayStatus = "temporary"
PERMANENT: RelayStatus = "permanent"

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


@attrs.frozen
class RecipientOutcome:
    """What became of one recipient.

    ``reply`` is the hop's reply that decided (the ``250`` to DATA for a
    delivery, the refusal otherwise), or one we made up for a failure that had
    no reply (``451 4.4.1 connect to ...``). ``hop`` is the hop that decided, or
    for a temporary failure the last hop tried (``None`` when there was none).
    """

    recipient: str
    status: RelayStatus
    reply: Reply | None
    hop: NextHop | None

    @property
    def delivered(self) -> bool:
        return self.status == DELIVERED

    @property
    def temporary(self) -> bool:
        return self.status == TEMPORARY

    @property
    def permanent(self) -> bool:
        return self.status == PERMANENT


def _outcome_tuple(values: Iterable[RecipientOutcome]) -> tuple[RecipientOutcome, ...]:
    return tuple(values)


@attrs.frozen
class RelayResult:
    """The outcome of :func:`relay`: one :class:`RecipientOutcome` per distinct
    recipient, in the order given."""

    outcomes: tuple[RecipientOutcome, ...] = attrs.field(converter=_outcome_tuple)

    def __iter__(self) -> Iterator[RecipientOutcome]:
        return iter(self.outcomes)

    def __len__(self) -> int:
        return len(self.outcomes)

    def __getitem__(self, recipient: str) -> RecipientOutcome:
        """The outcome for ``recipient`` (``KeyError`` if it was not relayed)."""
        for outcome in self.outcomes:
            if outcome.recipient == recipient:
                return outcome
        raise KeyError(recipient)

    @property
    def all_delivered(self) -> bool:
        """Every recipient was delivered: the caller may answer ``250``."""
        return all(o.delivered for o in self.outcomes)

    @property
    def any_temporary(self) -> bool:
        """Some recipient may still be delivered later: the caller answers ``4xx``."""
        return any(o.temporary for o in self.outcomes)

    @property
    def delivered(self) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.delivered)

    @property
    def temporary(self) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.temporary)

    @property
    def permanent(self) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.permanent)


async def relay(
    message: bytes,
    sender: str,
    recipients: Sequence[str],
    next_hops: Sequence[NextHop],
    *,
    timeout: float = 30,
    local_hostname: str | None = None,
    tls_context: ssl.SSLContext | None = None,
    env: Mapping[str, str] = os.environ,
    resolver: Resolver | None = None,
    dns: MutableMapping[DnsQuery, DnsResult] | None = None,
    connect_timeout: float | None = None,
    time_limit: float | None = None,
    ca_file: str | None = None,
) -> RelayResult:
    """Send ``message`` from ``sender`` to ``recipients`` through ``next_hops``.

    Hops are tried in order, each with the recipients still pending (see the
    module documentation for what is pending), and with a ``resolver`` each
    address of each hop in order. ``sender`` is the envelope sender without
    angle brackets (``""`` for the null sender). ``timeout`` is the limit for
    each reply, the one to the end of DATA included; ``connect_timeout``
    (default: ``timeout``) for setting up one connection; ``time_limit``
    (default: none) for the whole call. ``local_hostname`` is our EHLO name
    (default: this machine's FQDN). ``tls_context`` replaces the default,
    verifying, client context of the verified levels; ``ca_file`` replaces
    the system trust store in it. Passwords are read from ``env``. ``dns``
    seeds the resolver's answers and receives the new ones.

    Duplicate recipients are relayed once. An empty ``next_hops`` makes every
    recipient temporary (``451 4.3.5``): a routing mistake must not bounce mail.
    Raises :class:`ValueError` when ``recipients`` is empty.
    """
    if not recipients:
        raise ValueError("relay needs at least one recipient")
    order = list(dict.fromkeys(recipients))
    final: dict[str, RecipientOutcome] = {}
    if not next_hops:
        reply = Reply(451, "4.3.5", "no next hop to relay to")
        return RelayResult(RecipientOutcome(r, TEMPORARY, reply, None) for r in order)
    limits = _Limits(
        timeout,
        timeout if connect_timeout is None else connect_timeout,
        local_hostname,
        tls_context,
        ca_file,
    )
    last: list[NextHop] = []
    try:
        async with asyncio.timeout(time_limit):
            await _each_hop(
                message, sender, order, next_hops, limits, env, resolver, dns, final, last
            )
    except TimeoutError:
        reply = Reply(451, "4.4.7", "delivery attempt reached its time limit, try again later")
        hop = last[-1] if last else None
        for r in order:
            if r not in final or final[r].temporary:
                final[r] = RecipientOutcome(r, TEMPORARY, reply, hop)
        log.warning("relay: %s", reply)
    return RelayResult(final[r] for r in order)


@attrs.frozen
class _Limits:
    """How every attempt of one :func:`relay` call behaves."""

    timeout: float
    connect_timeout: float
    local_hostname: str | None
    tls_context: ssl.SSLContext | None
    ca_file: str | None


async def _each_hop(
    message: bytes,
    sender: str,
    order: list[str],
    next_hops: Sequence[NextHop],
    limits: _Limits,
    env: Mapping[str, str],
    resolver: Resolver | None,
    dns: MutableMapping[DnsQuery, DnsResult] | None,
    final: dict[str, RecipientOutcome],
    last: list[NextHop],
) -> None:
    """Fill ``final`` hop by hop, address by address (``last``: the hop tried last)."""
    pending = order
    if resolver is None:
        targets = [HopAddresses(hop, (hop.host,)) for hop in next_hops]
    else:
        targets = list(await resolve_hops(next_hops, resolver, dns))
    for target in targets:
        last.append(target.hop)
        if target.error is not None:
            log.info("relay via %s: %s", _hop_name(target.hop), target.error)
            for r in pending:
                final[r] = RecipientOutcome(r, TEMPORARY, target.error, target.hop)
            continue
        for address in target.addresses:
            connect_to = None if resolver is None else address
            attempt = _Attempt(target.hop, connect_to, message, sender, pending, limits)
            outcomes = await attempt.run(env)
            if attempt.retry_plain:
                # "may": a failed handshake is retried without TLS
                attempt = _Attempt(
                    target.hop, connect_to, message, sender, pending, limits, plain=True
                )
                outcomes = await attempt.run(env)
            final.update(outcomes)
            pending = [r for r in pending if outcomes[r].temporary]
            if not pending:
                return


# ---------------------------------------------------------------------------
# One hop


def _reply_from(code: int, message: str) -> Reply:
    """A :class:`Reply` from an SMTP reply code and text.

    The enhanced status code is split off; a multi-line reply becomes one
    line (each line repeats the enhanced code, which is dropped), so the text
    can be logged or quoted in a reply of our own without breaking it.
    """
    enhanced: str | None = None
    lines: list[str] = []
    for line in message.splitlines():
        line = line.strip()
        match = _ENHANCED.match(line)
        if match:
            enhanced = enhanced or match.group(1)
            line = line[match.end() :]
        if line:
            lines.append(line)
    return Reply(code, enhanced, " ".join(lines))


def _hop_name(hop: NextHop, address: str | None = None) -> str:
    """``host:port``, or Postfix's ``host[address]:port`` when connecting to an address."""
    if address is not None and address != hop.host:
        return f"{hop.host}[{address}]:{hop.port}"
    host = f"[{hop.host}]" if ":" in hop.host else hop.host
    return f"{host}:{hop.port}"


@functools.cache
def _verifying_context(ca_file: str | None) -> ssl.SSLContext:
    # Built once per trust store: loading one is not free, and an SSLContext
    # is safe to share between connections.
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    # "may" and "encrypt": encryption without authentication, as Postfix's
    # levels of those names (a passive eavesdropper learns nothing).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _tls_reason(exc: ssl.SSLError) -> str:
    """Why a handshake failed, in words: an untrusted certificate and a
    name that does not match must not read the same."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc)


class _TlsFailed(Exception):
    """A STARTTLS handshake failed (``__cause__`` says why)."""


class _Attempt:
    """One SMTP transaction with one hop (at one address), for the recipients
    still pending."""

    def __init__(
        self,
        hop: NextHop,
        address: str | None,
        message: bytes,
        sender: str,
        recipients: Sequence[str],
        limits: _Limits,
        *,
        plain: bool = False,
    ) -> None:
        self.hop = hop
        self.address = address
        self.message = message
        self.sender = sender
        self.recipients = recipients
        self.limits = limits
        #: a "may" hop tried again without TLS
        self.plain = plain
        #: set when a "may" handshake failed: the caller tries once more, plain
        self.retry_plain = False
        self.name = _hop_name(hop, address)
        self.results: dict[str, RecipientOutcome] = {}
        self.stage = "connecting"

    def _set(self, recipient: str, status: RelayStatus, reply: Reply) -> None:
        self.results[recipient] = RecipientOutcome(recipient, status, reply, self.hop)

    def _rest(self, status: RelayStatus, reply: Reply) -> dict[str, RecipientOutcome]:
        """``status`` for every recipient that has no outcome yet on this hop."""
        for recipient in self.recipients:
            if recipient not in self.results:
                self._set(recipient, status, reply)
        log.info(
            "relay via %s (security %s) %s while %s: %s",
            self.name,
            self.hop.security,
            status,
            self.stage,
            reply,
        )
        return self.results

    def _local_failure(self, enhanced: str, text: str) -> dict[str, RecipientOutcome]:
        return self._rest(TEMPORARY, Reply(451, enhanced, text))

    async def _connect(self) -> socket.socket:
        """A TCP connection to ``address``, within the connect time limit."""
        assert self.address is not None
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                await asyncio.get_running_loop().sock_connect(sock, (self.address, self.hop.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def run(self, env: Mapping[str, str]) -> dict[str, RecipientOutcome]:
        hop = self.hop
        name = self.name
        password: str | None = None
        if hop.username is not None:
            if hop.password_env is None:
                return self._local_failure(
                    "4.7.0", f"no password_env configured for user {hop.username} at {name}"
                )
            password = env.get(hop.password_env)
            if password is None:
                return self._local_failure(
                    "4.7.0",
                    f"password for {hop.username} at {name}: "
                    f"environment variable {hop.password_env} is not set",
                )
        if hop.security not in typing.get_args(Security):
            return self._local_failure("4.3.5", f"unknown security {hop.security!r} for {name}")

        use_tls = hop.security == "tls"
        context = None
        if hop.security in VERIFIED_SECURITY:
            context = self.limits.tls_context or _verifying_context(self.limits.ca_file)
        elif hop.security in ("may", "encrypt"):
            context = _unverified_context()
        sock: socket.socket | None = None
        if self.address is not None:
            try:
                sock = await self._connect()
            except TimeoutError:
                return self._local_failure(
                    "4.4.1",
                    f"connect to {name}: timed out after {self.limits.connect_timeout:g} s",
                )
            except OSError as exc:
                return self._local_failure("4.4.1", f"connect to {name}: {exc.strerror or exc}")
        client = aiosmtplib.SMTP(
            # the host name, not the address: TLS checks the certificate against it
            hostname=hop.host,
            port=None if sock is not None else hop.port,
            sock=sock,
            local_hostname=self.limits.local_hostname,
            timeout=self.limits.timeout,
            use_tls=use_tls,
            # Never on connect, not even opportunistically: _converse sends
            # STARTTLS itself when the hop's security asks for it.
            start_tls=False,
            tls_context=context,
        )
        try:
            results = await self._guarded(client, password)
        except BaseException:
            # Cancelled (or a bug): drop the connection without a polite QUIT,
            # which could itself hang. Nothing counts as delivered.
            client.close()
            raise
        await _quit(client)
        return results

    async def _guarded(
        self, client: aiosmtplib.SMTP, password: str | None
    ) -> dict[str, RecipientOutcome]:
        """:meth:`_converse`, with every failure of the hop turned into outcomes."""
        name = self.name
        level = self.hop.security
        try:
            return await self._converse(client, password)
        except _TlsFailed as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                reason = _tls_reason(cause)
            elif isinstance(cause, aiosmtplib.SMTPResponseException):
                reason = f"{cause.code} {cause.message}"
            else:
                reason = f"{type(cause).__name__}: {cause} while {self.stage}"
            if level == "may" and not self.plain:
                self.retry_plain = True
                log.info("relay via %s: TLS failed (%s), trying again without TLS", name, reason)
            return self._local_failure(
                "4.7.5", f"TLS with {name} failed (security {level}): {reason}"
            )
        except aiosmtplib.SMTPAuthenticationError as exc:
            # The server's words only: aiosmtplib never echoes the secret.
            return self._local_failure(
                "4.7.0", f"SASL authentication failed; server {name} said: {exc.code} {exc.message}"
            )
        except aiosmtplib.SMTPConnectResponseError as exc:
            return self._local_failure(
                "4.4.1", f"host {name} refused to talk to me: {exc.code} {exc.message}"
            )
        except aiosmtplib.SMTPResponseException as exc:
            # A reply other than the ones _converse judges itself (EHLO, STARTTLS).
            return self._rest(TEMPORARY, _reply_from(exc.code, exc.message))
        except aiosmtplib.SMTPConnectError as exc:
            if isinstance(exc.__cause__, ssl.SSLError):
                return self._local_failure(
                    "4.7.5",
                    f"TLS with {name} failed (security {level}): {_tls_reason(exc.__cause__)}",
                )
            return self._local_failure("4.4.1", f"connect to {name}: {exc.message}")
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            return self._local_failure(
                "4.4.2", f"lost connection with {name} while {self.stage}: {exc}"
            )
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            return self._local_failure(
                "4.4.2", f"conversation with {name} timed out while {self.stage}"
            )
        except ssl.SSLError as exc:
            return self._local_failure(
                "4.7.5", f"TLS with {name} failed (security {level}): {_tls_reason(exc)}"
            )
        except aiosmtplib.SMTPException as exc:
            return self._local_failure("4.4.0", f"{name} while {self.stage}: {exc.message}")
        except OSError as exc:
            return self._local_failure("4.4.2", f"{name} while {self.stage}: {exc}")

    async def _converse(
        self, client: aiosmtplib.SMTP, password: str | None
    ) -> dict[str, RecipientOutcome]:
        hop = self.hop
        name = self.name
        self.stage = "connecting"
        await client.connect()
        self.stage = "sending EHLO"
        await _ehlo(client)
        required = hop.security in ("encrypt", "verify", "secure", "starttls")
        wanted = required or (hop.security == "may" and not self.plain)
        if wanted and client.supports_extension("starttls"):
            self.stage = "starting TLS"
            try:
                await client.starttls(server_hostname=hop.host)
                # RFC 3207: forget what was learnt before TLS, and ask again.
                # (With TLS 1.3 a hop that dislikes the handshake says so only
                # now, by hanging up: still a failed TLS set-up.)
                self.stage = "sending EHLO after STARTTLS"
                await _ehlo(client)
            except (
                ssl.SSLError,
                aiosmtplib.SMTPServerDisconnected,
                aiosmtplib.SMTPResponseException,
                ConnectionError,
            ) as exc:
                raise _TlsFailed() from exc
        elif required:
            return self._local_failure(
                "4.7.4",
                f"TLS is required (security {hop.security}), but was not offered by {name}",
            )
        if password is not None and hop.username is not None:
            self.stage = "authenticating"
            if not client.supports_extension("auth"):
                return self._local_failure(
                    "4.7.0", f"authentication required, but {name} does not offer AUTH"
                )
            await client.login(hop.username, password)

        self.stage = "sending MAIL FROM"
        needs_utf8 = not (self.sender.isascii() and all(r.isascii() for r in self.recipients))
        options: list[str] = []
        if needs_utf8:
            if not client.supports_extension("smtputf8"):
                return self._rest(
                    PERMANENT,
                    Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by {name}"),
                )
            options.append("SMTPUTF8")
        if client.supports_extension("size"):
            options.append(f"SIZE={len(self.message)}")
        if client.supports_extension("8bitmime") and not self.message.isascii():
            options.append("BODY=8BITMIME")
        encoding = "utf-8" if needs_utf8 else "ascii"

        try:
            await client.mail(self.sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as exc:
            return self._rest(_status(exc.code), _reply_from(exc.code, exc.message))
        except ValueError as exc:
            # aiosmtplib refuses to put this address on the wire.
            return self._rest(PERMANENT, Reply(553, "5.1.7", f"bad sender address: {exc}"))

        self.stage = "sending RCPT TO"
        accepted: list[str] = []
        for recipient in self.recipients:
            try:
                await client.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                self._set(recipient, _status(exc.code), _reply_from(exc.code, exc.message))
            except ValueError as exc:
                self._set(recipient, PERMANENT, Reply(553, "5.1.3", f"bad address: {exc}"))
            else:
                accepted.append(recipient)
        if not accepted:
            log.info("relay via %s: no recipient accepted", name)
            return self.results

        self.stage = "sending message body"
        try:
            response = await client.data(self.message)
        except aiosmtplib.SMTPDataError as exc:
            # Refused at DATA or at its end: nobody in this transaction got it.
            return self._rest(_status(exc.code), _reply_from(exc.code, exc.message))
        # The transaction is committed: only now is anyone delivered.
        reply = _reply_from(response.code, response.message)
        for recipient in accepted:
            self._set(recipient, DELIVERED, reply)
        log.info("relay via %s delivered to %d recipient(s): %s", name, len(accepted), reply)
        return self.results


def _status(code: int) -> RelayStatus:
    return PERMANENT if 500 <= code < 600 else TEMPORARY


async def _ehlo(client: aiosmtplib.SMTP) -> None:
    # EHLO now (STARTTLS and AUTH may already have done it): the extensions
    # decide the MAIL FROM options. Fall back to HELO for an old server.
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


async def _quit(client: aiosmtplib.SMTP) -> None:
    # Politeness only: the outcome is already decided, so no error here may
    # change it.
    if not client.is_connected:
        return
    try:
        await client.quit(timeout=5)
    except Exception:
        pass
    finally:
        client.close()
