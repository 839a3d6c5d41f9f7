"""UDP questions to a nameserver over a shared, rotating socket.

:class:`~mailpolicy.adapters.dns.LiveResolver` asks every question over UDP
first. A socket of its own per question cost a ``socket``, ``connect``,
``close``, two ``epoll_ctl`` and an event-loop task each time: about a
third of a question's CPU (``benchmarks/dns_client.py``). Here the questions
to one nameserver share one connected socket, and a reply is matched to its
question by message id (then by question section, in
:func:`~mailpolicy.adapters.dnswire.read`).

Spoofing resistance stays that of a fresh socket per question, near enough:
every question has a random 16-bit id not in use on its socket, the socket is
connected (the kernel drops datagrams from any other address), and its
random source port changes after :data:`ROTATE_AFTER` questions: a socket
retires then, takes no new question, and closes once the replies it waits
for have come or timed out.

A datagram that matches no question in flight (a late reply, a stray) is
dropped. An ICMP error (the server's port closed) fails every question
waiting on that socket, as it would have failed each question on a socket of
its own, and the socket is replaced.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import weakref
from collections.abc import Callable

import dns.exception
import dns.message

from . import dnswire

__all__ = ["ROTATE_AFTER", "Channels", "Pending", "Unreachable", "send", "wait"]

#: questions per source port before a socket retires
ROTATE_AFTER = 64


class Unreachable(Exception):
    """The nameserver cannot be reached (an ICMP error, a failed send)."""


Answer = dnswire.Reading | dns.message.Message


class _Question:
    __slots__ = ("future", "notify", "question", "request")

    def __init__(
        self,
        future: asyncio.Future[Answer],
        question: dnswire.Question | None,
        request: dns.message.Message | None,
        notify: Callable[[], None] | None,
    ) -> None:
        self.future = future
        self.question = question
        self.request = request
        self.notify = notify

    def done(self) -> None:
        """The future has its outcome: tell ``notify`` now, not a loop
        iteration later as the future's callbacks are."""
        if self.notify is not None:
            self.notify()

    def answer(self, data: bytes) -> Answer | None:
        """``data`` read as the reply to this question, or ``None`` when it
        is not one (another question, not DNS)."""
        question = self.question
        if question is not None:
            reading = dnswire.read(data, question)
            if reading is dnswire.NOT_OURS:
                return None
            if reading is not None:
                return reading
            if self.request is None:
                self.request = dns.message.from_wire(question.wire)
        try:
            response = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        assert self.request is not None
        return response if self.request.is_response(response) else None


class _Socket:
    """One connected UDP socket and the questions waiting on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((host, port))
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        # weak: the resolver keeps sockets per loop, and must not keep a loop alive
        self._loop = weakref.ref(loop)
        # a loop dropped without our close (asyncio.run ended) closes the socket
        self._finalizer = weakref.finalize(loop, sock.close)
        self.waiting: dict[int, _Question] = {}
        self.asked = 0
        self.retired = False
        self.closed = False

    def ask(
        self,
        loop: asyncio.AbstractEventLoop,
        question: dnswire.Question | None,
        request: dns.message.Message | None,
        notify: Callable[[], None] | None = None,
    ) -> tuple[int, asyncio.Future[Answer]]:
        qid = question.qid if question is not None else request.id if request else 0
        while qid in self.waiting:
            qid = secrets.randbits(16)
        if question is not None:
            if qid != question.qid:
                question = dnswire.Question(
                    qid,
                    qid.to_bytes(2, "big") + question.wire[2:],
                    question.section,
                    question.rtype,
                )
            wire = question.wire
        else:
            assert request is not None
            request.id = qid
            wire = request.to_wire()
        try:
            self.sock.send(wire)
        except OSError as error:
            # an ICMP error from an earlier datagram, or a full buffer
            self.fail(error)
            raise Unreachable(str(error)) from error
        future: asyncio.Future[Answer] = loop.create_future()
        self.waiting[qid] = _Question(future, question, request, notify)
        self.asked += 1
        if self.asked >= ROTATE_AFTER:
            self.retired = True
        return qid, future

    def forget(self, qid: int, future: asyncio.Future[Answer]) -> None:
        entry = self.waiting.get(qid)
        if entry is not None and entry.future is future:
            del self.waiting[qid]
        if self.retired and not self.waiting:
            self.close()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.fail(error)
            return
        if len(data) < 2:
            return
        qid = (data[0] << 8) | data[1]
        entry = self.waiting.get(qid)
        if entry is None or entry.future.done():
            return
        try:
            answer = entry.answer(data)
        except Exception as error:
            # a bug or a library error while reading: this question fails
            # (SERVFAIL for the resolver), it never waits for a better reply
            del self.waiting[qid]
            entry.future.set_exception(error)
            entry.done()
        else:
            if answer is None:
                return  # not the reply to this question: it waits on
            del self.waiting[qid]
            entry.future.set_result(answer)
            entry.done()
        if self.retired and not self.waiting:
            self.close()

    def fail(self, error: OSError) -> None:
        """Every question waiting here fails; the socket is done."""
        waiting = list(self.waiting.values())
        self.waiting.clear()
        self.retired = True
        self.close()
        for entry in waiting:
            if not entry.future.done():
                entry.future.set_exception(Unreachable(str(error)))
                entry.done()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.sock.fileno())
        self._finalizer.detach()
        self.sock.close()


class Channels:
    """The sockets a resolver asks through: one in use per nameserver and
    event loop, plus retired ones still waiting for replies."""

    def __init__(self) -> None:
        self._current: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[str, int], _Socket]
        ] = weakref.WeakKeyDictionary()

    def socket_for(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> _Socket:
        per_loop = self._current.get(loop)
        if per_loop is None:
            per_loop = self._current[loop] = {}
        current = per_loop.get((host, port))
        if current is None or current.retired or current.closed:
            current = per_loop[(host, port)] = _Socket(loop, host, port)
        return current


def _expire(future: asyncio.Future[Answer], notify: Callable[[], None] | None) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no reply before the deadline"))
        if notify is not None:
            notify()


class Pending:
    """A question sent by :func:`send`, its reply still to come: wait for it
    with :func:`wait`, or give it up with :meth:`finish`."""

    __slots__ = ("future", "qid", "sock", "timer")

    def __init__(
        self,
        sock: _Socket,
        qid: int,
        future: asyncio.Future[Answer],
        timer: asyncio.TimerHandle,
    ) -> None:
        self.sock = sock
        self.qid = qid
        self.future = future
        self.timer = timer

    def finish(self) -> None:
        """Stop waiting (idempotent): the timer goes, the id is free again,
        and an outcome nobody awaited is not reported as lost."""
        self.timer.cancel()
        self.sock.forget(self.qid, self.future)
        future = self.future
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # read: asyncio would log it as never retrieved


def send(
    channels: Channels,
    loop: asyncio.AbstractEventLoop,
    question: dnswire.Question | None,
    request: dns.message.Message | None,
    host: str,
    port: int,
    deadline: float,
    notify: Callable[[], None] | None = None,
) -> Pending:
    """Send one question to ``host:port`` now; :func:`wait` gives its reply.
    ``notify`` is called as soon as the future has its outcome (a reply, an
    error, the deadline), from the callback that read it. Raises
    :class:`Unreachable` when it cannot be sent."""
    sock = channels.socket_for(loop, host, port)
    qid, future = sock.ask(loop, question, request, notify)
    # a timer that fails the future costs less than asyncio.timeout_at
    return Pending(sock, qid, future, loop.call_at(deadline, _expire, future, notify))


async def wait(pending: Pending) -> Answer:
    """The reply to a question from :func:`send`: read by
    :mod:`~mailpolicy.adapters.dnswire` when it can, by dnspython otherwise.
    Raises :class:`TimeoutError` at its deadline and :class:`Unreachable` when
    the server cannot be reached."""
    try:
        return await pending.future
    finally:
        pending.finish()
