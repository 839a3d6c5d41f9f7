"""What a :class:`~mailpolicy.dialogue.Connection` asks of its host, and tells it.

Every value :meth:`Connection.next_event` returns is one of these. Three kinds:

* **output**: :class:`Send` (bytes to write), :class:`Spool` (message bytes
  to keep aside) and :class:`Close` (hang up after writing what was sent).
  The host acts and asks for the next event.
* **needs**: :data:`NEED_DATA` (read from the client, then
  :meth:`~Connection.receive_data`), :class:`NeedDns`, :class:`NeedCount`,
  :class:`NeedRecipientCheck`, :class:`CheckPassword`, :class:`StartTls`,
  :class:`NeedStamp`,
  :class:`NeedSpooled` and :class:`Deliver`. The host does the I/O and hands
  the result back with the matching method (:meth:`~Connection.dns_answers`,
  :meth:`~Connection.counted`, ...) or :meth:`~Connection.failed`, before it
  asks for the next event.
* **notes**: :class:`CommandReceived`, :class:`Decided`, :class:`Authenticated`,
  :class:`MessageReceived`, :class:`TlsStarted`, :class:`Prefetch`. Nothing to
  do; a host logs them or shows them to an observer (capture) and asks for
  the next event. (A host may act on :class:`Prefetch` to save time.)

All are frozen attrs values: a test compares them with ``==``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

from ..model import DnsQuery, Reply, Session, Stage, Verdict

__all__ = [
    "NEED_DATA",
    "Authenticated",
    "CheckPassword",
    "Close",
    "CommandReceived",
    "CountKind",
    "Decided",
    "Deliver",
    "Event",
    "HitKind",
    "MessageReceived",
    "NeedCount",
    "NeedData",
    "NeedDns",
    "NeedRecipientCheck",
    "NeedSpooled",
    "NeedStamp",
    "Observed",
    "Prefetch",
    "ReplyRecord",
    "Send",
    "Spool",
    "Stamp",
    "StartTls",
    "Submission",
    "TlsStarted",
]


@attrs.frozen
class ReplyRecord:
    """A reply as sent, and the verdict behind it (``None`` when no rule decided)."""

    reply: Reply
    verdict: Verdict | None = None


@attrs.frozen
class Send:
    """Write ``data`` to the client: one reply, already formatted."""

    data: bytes
    record: ReplyRecord

    @property
    def reply(self) -> Reply:
        return self.record.reply


@attrs.frozen
class Close:
    """Close the connection (after everything sent so far). Final: every
    later call of ``next_event`` returns it again."""

    reason: str


class NeedData:
    """Read from the client and pass it to ``receive_data`` (``b""`` at end
    of input). While waiting, the host may call ``timed_out`` or
    ``shut_down`` instead."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The one :class:`NeedData` value.
NEED_DATA = NeedData()


@attrs.frozen
class NeedDns:
    """Answer these questions: ``dns_answers({query: DnsResult, ...})``."""

    queries: frozenset[DnsQuery]


#: ``"connection"``: a new connection (answer ``(open, rate)``); the others
#: count one event (or, with ``peek``, read the count) and answer an int.
#: ``user_*``, ``sender_domain_*``, ``recipient_domain_*`` and ``global_*``
#: are counted per :attr:`NeedCount.key`, the others per client.
HitKind = Literal[
    "message",
    "recipient",
    "auth_failure",
    "user_message",
    "user_recipient",
    "sender_domain_message",
    "recipient_domain_recipient",
    "global_message",
    "global_recipient",
]
CountKind = Literal["connection", HitKind]


@attrs.frozen
class NeedCount:
    """Count an event for ``client`` in the window of ``window`` seconds:
    ``counted(n)`` with the count including this event (``peek``: read the
    count without adding to it). ``"connection"`` answers ``(open, rate)``.
    A store that cannot count: ``failed(...)``, and the dialogue answers 4xx.

    ``key``, when set, is what the event is counted for instead of the
    client: the SASL login, a domain, or ``"*"`` for the whole server
    (:attr:`subject` is the one to count under).
    """

    kind: CountKind
    client: str
    window: int
    peek: bool = False
    key: str | None = None

    @property
    def subject(self) -> str:
        """What to count under: ``key``, else the client address."""
        return self.client if self.key is None else self.key


@attrs.frozen
class NeedRecipientCheck:
    """The policy accepts ``recipient``: can it be delivered at all?
    ``recipient_checked(None)``, or the reply that refuses it now rather
    than after the message (a local address too long for a mailbox)."""

    recipient: str


@attrs.frozen
class CheckPassword:
    """Verify a login (slow: scrypt; off the event loop): ``password_checked(ok)``."""

    user: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class StartTls:
    """Do the server side of a TLS handshake now: ``tls_started(ok)``. Bytes
    the client sent before it are already dropped (RFC 3207)."""


@attrs.frozen
class Stamp:
    """The time and the queue id for one accepted message."""

    now: float
    queue_id: str


@attrs.frozen
class NeedStamp:
    """The message is in: ``stamped(Stamp(now, queue_id))``. Time and
    randomness come from the host, so the dialogue stays deterministic."""


@attrs.frozen
class Spool:
    """Append ``data`` (the next part of the message being received) to this
    connection's spool: the dialogue keeps only a bounded part of a message
    in memory."""

    data: bytes = attrs.field(repr=False)


@attrs.frozen
class NeedSpooled:
    """The message is complete: ``spooled(everything appended)``, and the
    spool can go."""


@attrs.frozen
class Submission:
    """An accepted message.

    ``message`` is what to deliver (our ``Received:`` header first);
    ``content`` is the message exactly as the client sent it, which stays the
    same when the client retries (the delivery ledger keys on it).
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes = attrs.field(repr=False)
    content: bytes = attrs.field(repr=False)
    queue_id: str
    session: Session


@attrs.frozen
class Deliver:
    """Store or pass on the message: ``delivered(reply)``. 250 only once it is
    safe; a 4xx makes the client retry."""

    submission: Submission


@attrs.frozen
class CommandReceived:
    """A command line as received (AUTH arguments redacted); ``pending``: the
    client had already sent more (it pipelined)."""

    line: str
    pending: bool


@attrs.frozen
class Decided:
    """A policy decision worth logging: the stage, the verdict, and the
    facts it was about (sender, recipient, size ...)."""

    stage: Stage | Literal["auth", "delivery"]
    verdict: Verdict
    facts: Mapping[str, object] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class Observed:
    """A note: rules in observe mode would have refused this request
    (``verdict.observed``, each with its rule, reply and evidence); it went
    on as ``verdict`` says. Log and count them; the client saw nothing."""

    stage: Stage
    verdict: Verdict


@attrs.frozen
class Prefetch:
    """A note: DNS questions a later rule will ask whatever comes next (the
    sender domain's MX, once MAIL is accepted:
    :meth:`~mailpolicy.policy.Policy.questions_ahead`). A host may ask them
    now, without waiting, and give the answers with the :class:`NeedDns`
    round that needs them, or ignore this."""

    queries: frozenset[DnsQuery]


@attrs.frozen
class Authenticated:
    """An AUTH attempt's outcome (never the password)."""

    user: str
    ok: bool


@attrs.frozen
class MessageReceived:
    """The message as received (dot-unstuffed); ``content`` holds at most the
    size limit, ``size`` counts every byte."""

    content: bytes = attrs.field(repr=False)
    size: int


@attrs.frozen
class TlsStarted:
    """The TLS handshake succeeded; the session starts afresh."""


Event = (
    Send
    | Close
    | NeedData
    | NeedDns
    | NeedCount
    | NeedRecipientCheck
    | CheckPassword
    | StartTls
    | NeedStamp
    | Spool
    | NeedSpooled
    | Deliver
    | CommandReceived
    | Decided
    | Prefetch
    | Observed
    | Authenticated
    | MessageReceived
    | TlsStarted
)
