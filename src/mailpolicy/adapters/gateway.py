"""Delivery for ``mailpolicy serve``: route each recipient, then Maildir or relay.

What the client is told at the end of DATA (one reply for all recipients):

* every recipient delivered (now, or by an earlier, deferred attempt of the same
  message, see :mod:`.ledger`): ``250``;
* any recipient failed temporarily (a DNS failure, a next hop down or
  answering 4xx, a disk error): ``451``. The client retries; the recipients
  delivered this time are written to the ledger before that answer and are
  skipped then, so nobody gets the message twice. (Only a crash between a
  delivery and that answer can make a copy too many: never a lost one.)
  The ledger is written only for such answers, so the usual message costs
  no ledger write at all;
* the rest failed permanently (null MX, no such domain, a next hop's 5xx):
  when nothing was delivered, the first permanent reply, and the client
  bounces the message; when some recipients got it, ``250`` (a refusal would
  make the client bounce a message that was partly delivered) and the message
  is kept in the ``undeliverable@HOSTNAME`` Maildir under the delivery root,
  with a header naming each failed recipient and why, and a warning in the
  log. Accepted mail is never dropped silently.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..dialogue import Submission
from ..model import IPAddress, NextHop, Reply, RouteKind
from ..settings import Settings
from .dns import Resolver
from .ledger import DeliveryLedger, message_digest
from .maildir import MaildirDelivery
from .relay import relay
from .routing import resolve_routes

__all__ = ["GatewayDelivery"]

log = logging.getLogger("mailpolicy.delivery")


class GatewayDelivery:
    """Route, then deliver each recipient locally or through its next hops."""

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver,
        *,
        maildir_root: str | os.PathLike[str] | None = None,
        ledger: DeliveryLedger | None = None,
        rng: random.Random | None = None,
        our_addresses: Iterable[str | IPAddress] = (),
        relay_timeout: float = 60,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        root = Path(maildir_root if maildir_root is not None else settings.delivery.maildir)
        self.maildir = MaildirDelivery(root)
        self.ledger = (
            ledger
            if ledger is not None
            else DeliveryLedger(root / ".mailpolicy" / "delivered.sqlite3")
        )
        self.rng = rng or random.Random()
        self.our_addresses = frozenset(our_addresses)
        self.relay_timeout = relay_timeout
        self.env = env

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
        done = await self.ledger.delivered_async(digest, targets)
        delivered: list[str] = []
        temporary: list[tuple[str, Reply]] = []
        permanent: list[tuple[str, Reply]] = []
        by_hops: dict[tuple[NextHop, ...], list[str]] = {}
        for route, target in zip(routes, targets, strict=True):
            if target.lower() in done:
                continue
            if route.kind is RouteKind.SMTP:
                by_hops.setdefault(route.next_hops, []).append(target)
            elif route.kind is RouteKind.ERROR:
                error = route.error or Reply(451, "4.3.0", route.reason)
                (temporary if error.temporary else permanent).append((target, error))
            elif await self._local(s, target, temporary, permanent):
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
            await self.ledger.record_async(digest, delivered)
            raise
        # The ledger only bridges a 451 and its retry, so it is written only
        # then: a message that gets its final answer at once costs no write.
        if reply.temporary:
            await self.ledger.record_async(digest, delivered)
        elif done:
            await self.ledger.forget_async(digest)
        return reply

    async def _local(
        self,
        s: Submission,
        target: str,
        temporary: list[tuple[str, Reply]],
        permanent: list[tuple[str, Reply]],
    ) -> bool:
        """Deliver one local copy; True when it is safe on disk."""
        try:
            await self.maildir.deliver_async(target, _maildir_form(s.message))
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
        await self.maildir.deliver_async(
            box, _maildir_form(head.encode("utf-8", "replace") + s.message)
        )
        for rcpt, reply in failures:
            log.warning("%s: undeliverable to <%s> (%s); kept in %s", s.queue_id, rcpt, reply, box)


def _maildir_form(message: bytes) -> bytes:
    """Maildir files hold lines ending in LF, as local delivery agents write them."""
    return message.replace(b"\r\n", b"\n")
