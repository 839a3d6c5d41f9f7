"""Delivery for ``mailpolicy serve``: route each recipient, then Maildir or relay.

What the client is told at the end of DATA (one reply for all recipients):

* every recipient delivered (now, or by an earlier, deferred attempt of the same
  message, see :mod:`.ledger`): ``250``;
* any recipient failed temporarily (a DNS failure, a next hop down or
  answering 4xx, a disk error): ``451``. The client retries, and the
  recipients that already have the message are skipped then, so nobody gets
  it twice (:mod:`.ledger`). For a message with several recipients the
  ledger's plan is written *before* the first delivery, naming the Maildir
  file of each local copy: when it cannot be written (a full disk), nothing
  is delivered and the answer is ``451``; once it is written, a full disk, a
  ``kill -9`` or a lost connection between two copies leaves each copy
  findable by the retry. Relayed copies are marked in the ledger before a
  ``451``. A message to one recipient needs no ledger (nothing can be half
  done), as with Postfix; only a crash between its delivery and our ``250``
  makes a copy too many (RFC 1047), never a lost one;
* the rest failed permanently (a next hop's 5xx; a null MX, a domain that
  does not exist or an MX that is ourselves are refused at RCPT already by
  :meth:`GatewayDelivery.check_recipient`, unless the DNS failed then):
  when nothing was delivered, the first permanent reply, and the client
  bounces the message; when some recipients got it, ``250`` (a refusal would
  make the client bounce a message that was partly delivered) and the message
  is kept in the ``undeliverable@HOSTNAME`` Maildir under the delivery root,
  with a header naming each failed recipient and why, and a warning in the
  log. Accepted mail is never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .. import routing
from ..dialogue import Submission
from ..model import DnsQuery, DnsResult, IPAddress, NextHop, Reply, Route, RouteKind
from ..settings import Settings
from .dns import Resolver
from .ledger import DeliveryLedger, LedgerError, message_digest
from .maildir import MaildirDelivery, delivery_headers, mailbox_name
from .relay import relay
from .routing import resolve_routes

__all__ = ["MAX_REPLY_LINE", "GatewayDelivery", "fit_reply"]

log = logging.getLogger("mailpolicy.delivery")


class GatewayDelivery:
    """Route, then deliver each recipient locally or through its next hops.

    The ledger is ``state_dir/delivered.sqlite3`` (``serve --state-dir``),
    else ``MAILDIR_ROOT/.mailpolicy/delivered.sqlite3``.
    """

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver,
        *,
        maildir_root: str | os.PathLike[str] | None = None,
        ledger: DeliveryLedger | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        rng: random.Random | None = None,
        our_addresses: Iterable[str | IPAddress] = (),
        relay_timeout: float | None = None,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        root = Path(maildir_root if maildir_root is not None else settings.delivery.maildir)
        self.maildir = MaildirDelivery(root)
        if ledger is None:
            where = Path(state_dir) if state_dir is not None else root / ".mailpolicy"
            ledger = DeliveryLedger(where / "delivered.sqlite3")
        self.ledger = ledger
        # Who has which message, when the ledger could not be told: this
        # process still keeps its promise (digest -> lower-cased targets).
        self._remembered: dict[str, set[str]] = {}
        self.rng = rng or random.Random()
        self.our_addresses: frozenset[str | IPAddress] = frozenset(our_addresses)
        d = settings.delivery
        #: seconds per reply of a next hop (delivery.reply_timeout_seconds)
        self.relay_timeout = d.reply_timeout_seconds if relay_timeout is None else relay_timeout
        self.env = env

    def add_our_addresses(self, addresses: Iterable[str | IPAddress]) -> None:
        """More addresses that are this server (``serve`` adds its listeners'):
        an MX that resolves to one of them is a loop (``554 5.4.6``)."""
        self.our_addresses = self.our_addresses | frozenset(addresses)

    async def check_recipient(self, recipient: str) -> Reply | None:
        """Refuse at RCPT what can never be delivered, instead of after DATA:
        a local recipient that can never have a Maildir (an address too long
        for a folder name), and a destination the configured DNS already
        rules out: a null MX (RFC 7505, ``556 5.1.10``, as Postfix's
        ``reject_unknown_recipient_domain``), a domain that does not exist
        (``replies.unknown_address``, 450 by default, as Postfix), an MX
        that is ourselves (``554 5.4.6``). A temporary DNS failure refuses
        nothing: the delivery decides. With a sender exception configured
        the DNS is not consulted here (the route may depend on the sender,
        which this check does not see)."""
        if any(e.match == "sender" for e in self.settings.delivery.exceptions):
            routes = routing.route(self.settings, "", [recipient], {}, rng=self.rng)
        else:
            routes = await resolve_routes(
                self.settings, "", [recipient], self.resolver, self.rng, self.our_addresses
            )
        for r in routes:
            if r.kind is RouteKind.LOCAL and r.mailbox is not None:
                try:
                    mailbox_name(r.mailbox)
                except ValueError as e:
                    return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: {e}")
            elif r.kind is RouteKind.ERROR and r.error is not None and not r.error.temporary:
                return self._refusal(recipient, r.error)
        return None

    def _refusal(self, recipient: str, error: Reply) -> Reply:
        prefix = f"<{recipient}>: Recipient address rejected: "
        if error.enhanced == "5.4.4":
            # no such domain: Postfix's unknown_address_reject_code (450)
            code = self.settings.replies.unknown_address
            enhanced = f"{code // 100}.1.2"
            return fit_reply(Reply(code, enhanced, prefix + "Domain not found"))
        return fit_reply(Reply(error.code, error.enhanced, prefix + error.text))

    async def deliver(self, submission: Submission) -> Reply:
        s = submission
        digest = message_digest(s.sender, s.content)
        loop = asyncio.get_running_loop()
        limit = self.settings.delivery.attempt_timeout_seconds
        deadline = loop.time() + limit
        # every answer the decision used; the next hops' addresses reuse them
        answers: dict[DnsQuery, DnsResult] = {}
        routes = await resolve_routes(
            self.settings,
            s.sender,
            s.recipients,
            self.resolver,
            self.rng,
            self.our_addresses,
            answers=answers,
        )
        # A route's target is the address that gets the copy: the recipient,
        # or what an external postmaster rewrote it to (one recipient may
        # have several). The ledger counts copies per target.
        targets = [route.mailbox or route.recipient for route in routes]
        # With one target nothing can be half done: no plan to write.
        planned = len({t.lower() for t in targets}) > 1
        try:
            done = await self._already_delivered(digest, routes, targets)
        except LedgerError as e:
            if planned:
                log.error("%s: %s; nothing delivered", s.queue_id, e)
                return _LEDGER_DOWN
            done = set(self._remembered.get(digest, ()))
        names: dict[str, str] = {}
        if planned:
            plan: list[tuple[str, str | None]] = []
            for route, target in zip(routes, targets, strict=True):
                key = target.lower()
                if key in done or key in names:
                    continue
                if route.kind is RouteKind.LOCAL:
                    names[key] = self.maildir.new_name()
                plan.append((target, names.get(key)))
            try:
                await self.ledger.begin_async(digest, plan)
            except LedgerError as e:
                log.error("%s: %s; nothing delivered", s.queue_id, e)
                return _LEDGER_DOWN
        delivered: list[str] = []
        temporary: list[tuple[str, Reply]] = []
        permanent: list[tuple[str, Reply]] = []
        by_hops: dict[tuple[NextHop, ...], list[str]] = {}
        seen: set[str] = set()
        for route, target in zip(routes, targets, strict=True):
            key = target.lower()
            if key in done or key in seen:
                continue
            seen.add(key)
            if route.kind is RouteKind.SMTP:
                by_hops.setdefault(route.next_hops, []).append(target)
            elif route.kind is RouteKind.ERROR:
                error = route.error or Reply(451, "4.3.0", route.reason)
                (temporary if error.temporary else permanent).append((target, error))
            elif await self._local(
                s, route.recipient, target, names.get(key), temporary, permanent
            ):
                delivered.append(target)
        d = self.settings.delivery
        for hops, rcpts in by_hops.items():
            result = await relay(
                s.message,
                s.sender,
                rcpts,
                hops,
                timeout=self.relay_timeout,
                connect_timeout=d.connect_timeout_seconds,
                # the whole attempt, all hops together, stays within the limit
                time_limit=max(deadline - loop.time(), 0.001),
                ca_file=d.tls_ca_file,
                local_hostname=self.settings.general.hostname,
                env=self.env,
                resolver=self.resolver,
                dns=answers,
            )
            delivered += [o.recipient for o in result if o.delivered]
            for o in result:
                reply = o.reply or Reply(451, "4.4.0", "delivery failed")
                if o.temporary:
                    temporary.append((o.recipient, reply))
                elif o.permanent:
                    permanent.append((o.recipient, reply))
        try:
            reply = await self._answer(s, delivered, done, temporary, permanent)
        except BaseException:
            # The client will hear a 4xx and retry: remember who has it.
            await self._remember(s.queue_id, digest, delivered)
            raise
        if reply.temporary:
            await self._remember(s.queue_id, digest, delivered)
        elif planned or done:
            # A final answer: a later identical message is new mail. Entries
            # left behind would make that message look delivered, so when they
            # cannot be removed the client hears 451 and its retry, finding
            # every copy in place, tries again.
            try:
                await self.ledger.forget_async(digest)
            except LedgerError as e:
                log.error("%s: %s; answering 451 until it can be forgotten", s.queue_id, e)
                self._remembered.setdefault(digest, set()).update(t.lower() for t in delivered)
                return _LEDGER_DOWN
            self._remembered.pop(digest, None)
        return reply

    async def _already_delivered(
        self, digest: str, routes: Sequence[Route], targets: Sequence[str]
    ) -> set[str]:
        """The targets (lower-cased) that have this message from an earlier attempt."""
        entries = self.ledger.lookup_now(digest, targets)
        if entries is None:
            entries = await self.ledger.lookup_async(digest, targets)
        done = set(self._remembered.get(digest, ()))
        for route, target in zip(routes, targets, strict=True):
            key = target.lower()
            entry = entries.get(key)
            if entry is None or key in done:
                continue
            if entry.done or (
                # a planned copy whose fate went unrecorded: its file says
                entry.name is not None
                and route.kind is RouteKind.LOCAL
                and await self._has_copy(target, entry.name)
            ):
                done.add(key)
        return done

    async def _has_copy(self, target: str, name: str) -> bool:
        try:
            return await asyncio.to_thread(self.maildir.has, target, name)
        except ValueError:  # not a mailbox name: never delivered
            return False
        except OSError as e:
            # Unknown is not "no": delivering again could duplicate.
            raise LedgerError(f"cannot look for {name} in the Maildir of {target}: {e}") from None

    async def _remember(self, queue_id: str, digest: str, delivered: list[str]) -> None:
        if not delivered:
            return
        try:
            await self.ledger.record_async(digest, delivered)
        except LedgerError as e:
            # Local copies are found by their files; relayed ones only here.
            log.error("%s: %s; this process remembers the deliveries", queue_id, e)
            self._remembered.setdefault(digest, set()).update(t.lower() for t in delivered)

    async def _local(
        self,
        s: Submission,
        recipient: str,
        target: str,
        name: str | None,
        temporary: list[tuple[str, Reply]],
        permanent: list[tuple[str, Reply]],
    ) -> bool:
        """Deliver one local copy; True when it is safe on disk."""
        head = delivery_headers(s.sender, target, recipient)
        try:
            await self.maildir.deliver_async(target, _maildir_form(head + s.message), name=name)
        except ValueError as e:  # an address that can never be a mailbox name
            permanent.append((target, Reply(550, "5.1.1", f"<{target}>: {e}")))
            return False
        except OSError as e:
            log.error("local delivery to %s failed: %s", target, e)
            temporary.append((target, Reply(451, "4.3.0", "Error: queue file write error")))
            return False
        return True

    async def _answer(
        self,
        s: Submission,
        delivered: list[str],
        done: set[str],
        temporary: list[tuple[str, Reply]],
        permanent: list[tuple[str, Reply]],
    ) -> Reply:
        if log.isEnabledFor(logging.DEBUG):
            # at INFO, the session's "message ... to ...: 250" line says it once
            for rcpt in delivered:
                log.debug("%s: delivered to <%s>", s.queue_id, rcpt)
        if temporary:
            rcpt, reply = temporary[0]
            log.warning("%s: deferred <%s>: %s", s.queue_id, rcpt, reply)
            text = f"Error: delivery to <{rcpt}> deferred: {_quoted(rcpt, reply.text)}"
            return fit_reply(Reply(451, "4.4.0", text))
        if permanent and not delivered and not done:
            rcpt, reply = permanent[0]
            log.warning("%s: refused <%s>: %s", s.queue_id, rcpt, reply)
            code = reply.code if 500 <= reply.code < 600 else 550
            text = f"<{rcpt}>: {_quoted(rcpt, reply.text)}"
            return fit_reply(Reply(code, reply.enhanced or "5.0.0", text))
        if permanent:
            await self._keep_undeliverable(s, permanent)
        return Reply(250, "2.0.0", f"Ok: queued as {s.queue_id}")

    async def _keep_undeliverable(self, s: Submission, failures: list[tuple[str, Reply]]) -> None:
        head = "".join(
            f"X-Mailpolicy-Undeliverable: <{rcpt}> {reply}\r\n" for rcpt, reply in failures
        )
        box = f"undeliverable@{self.settings.general.hostname}"
        trace = delivery_headers(s.sender, box)
        await self.maildir.deliver_async(
            box, _maildir_form(trace + head.encode("utf-8", "replace") + s.message)
        )
        for rcpt, reply in failures:
            log.warning("%s: undeliverable to <%s> (%s); kept in %s", s.queue_id, rcpt, reply, box)


#: RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets, CRLF included
MAX_REPLY_LINE = 512


def fit_reply(reply: Reply) -> Reply:
    """``reply`` with its text cut (on a character boundary, marked with
    ``...``) so that ``CODE ENHANCED TEXT<CRLF>`` fits in one 512-octet line.
    A next hop's text is foreign: it may be long, or several lines joined."""
    text = " ".join(reply.text.split())  # one line, whatever the hop sent
    head = len(f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} ")
    room = MAX_REPLY_LINE - head - 2
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > room:
        text = raw[: room - 3].decode("utf-8", "ignore") + "..."
    return Reply(reply.code, reply.enhanced, text)


def _quoted(rcpt: str, text: str) -> str:
    """A next hop's text, quoted once: a hop that is itself a gateway put
    ``<rcpt>: `` (or our deferral words) in front already; drop them, so a
    chain of gateways does not repeat them at every level."""
    for prefix in (f"<{rcpt}>: ", f"Error: delivery to <{rcpt}> deferred: "):
        while text.lower().startswith(prefix.lower()):
            text = text[len(prefix) :]
    return text


_LEDGER_DOWN = Reply(451, "4.3.0", "Error: delivery ledger not writable, try again later")


def _maildir_form(message: bytes) -> bytes:
    """Maildir files hold lines ending in LF, as local delivery agents write them."""
    return message.replace(b"\r\n", b"\n")
