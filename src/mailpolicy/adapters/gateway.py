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
* the rest failed permanently (null MX, no such domain, a next hop's 5xx):
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
from ..model import IPAddress, NextHop, Reply, Route, RouteKind
from ..settings import Settings
from .dns import Resolver
from .ledger import DeliveryLedger, LedgerError, message_digest
from .maildir import MaildirDelivery, delivery_headers, mailbox_name
from .relay import relay
from .routing import resolve_routes

__all__ = ["GatewayDelivery"]

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
        relay_timeout: float = 60,
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
        self.our_addresses = frozenset(our_addresses)
        self.relay_timeout = relay_timeout
        self.env = env

    def check_recipient(self, recipient: str) -> Reply | None:
        """Refuse at RCPT a local recipient that can never have a Maildir
        (an address too long for a folder name), instead of after DATA."""
        routes = routing.route(self.settings, "", [recipient], {}, rng=self.rng)
        for r in routes:
            if r.kind is RouteKind.LOCAL and r.mailbox is not None:
                try:
                    mailbox_name(r.mailbox)
                except ValueError as e:
                    return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: {e}")
        return None

    async def deliver(self, submission: Submission) -> Reply:
        s = submission
        digest = message_digest(s.sender, s.content)
        routes = await resolve_routes(
            self.settings, s.sender, s.recipients, self.resolver, self.rng, self.our_addresses
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
        for hops, rcpts in by_hops.items():
            result = await relay(
                s.message,
                s.sender,
                rcpts,
                hops,
                timeout=self.relay_timeout,
                local_hostname=self.settings.general.hostname,
                env=self.env,
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
        for rcpt in delivered:
            log.info("%s: delivered to <%s>", s.queue_id, rcpt)
        if temporary:
            rcpt, reply = temporary[0]
            log.warning("%s: deferred <%s>: %s", s.queue_id, rcpt, reply)
            return Reply(451, "4.4.0", f"Error: delivery to <{rcpt}> deferred: {reply.text}")
        if permanent and not delivered and not done:
            rcpt, reply = permanent[0]
            log.warning("%s: refused <%s>: %s", s.queue_id, rcpt, reply)
            code = reply.code if 500 <= reply.code < 600 else 550
            return Reply(code, reply.enhanced or "5.0.0", f"<{rcpt}>: {reply.text}")
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


_LEDGER_DOWN = Reply(451, "4.3.0", "Error: delivery ledger not writable, try again later")


def _maildir_form(message: bytes) -> bytes:
    """Maildir files hold lines ending in LF, as local delivery agents write them."""
    return message.replace(b"\r\n", b"\n")
