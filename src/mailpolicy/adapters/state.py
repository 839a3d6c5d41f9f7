"""Counters shared by SMTP sessions: connections and rates per client.

Theory of operation
-------------------
The policy core judges :class:`~mailpolicy.model.Counters`; it never counts.
The server counts here, with Postfix's anvil semantics (docs/settings.md, connection policy), and
puts the numbers in the session before asking the core:

* at connect, :meth:`StateStore.connection_opened` returns how many sessions
  this client has open (this one included) and how many it opened in the
  current window (this one included); at disconnect,
  :meth:`StateStore.connection_closed` gives the slot back. Every
  ``connection_opened`` must be matched by exactly one ``connection_closed``,
  also when the session is refused with ``421`` right away;
* at MAIL FROM and RCPT TO, :meth:`StateStore.hit` counts a ``"message"`` or a
  ``"recipient"`` and returns the count in the current window, this one
  included; after a failed AUTH, ``hit("auth_failure", ...)`` counts it, and
  :meth:`StateStore.peek` reads a count without adding to it (to refuse AUTH
  before checking a password once a client has failed too often).

Windows are fixed and aligned to multiples of ``window`` seconds since the
epoch (``now - now % window``), so every process and machine sharing a store
agrees on which window an event falls in without talking to each other.
Postfix's anvil starts a client's window at its first event instead; both
allow a burst of up to twice the limit across a window boundary, and neither
is a sliding window. ``now`` is passed in (the caller's clock, ``time.time()``
in the server) so that tests control time.

Three stores:

* :class:`MemoryStore`, the default: one process, no dependencies. Memory stays
  bounded: counters of past windows are purged as time moves on, closed
  connections leave no entry, and a hard cap on entries survives a flood of
  client addresses.
* :class:`RedisStore`: several processes or machines count together. A failure
  to reach Redis raises :class:`StateStoreError`; the server answers ``4xx``
  (``421 4.3.0`` at connect, ``451 4.3.0`` later) so the client retries. A
  limit that cannot be checked is never silently waived.
* :class:`~mailpolicy.adapters.sharedstore.SharedStore`: the worker
  processes of ``serve --workers N`` on one machine, in shared memory (the
  parent gives back a dead worker's slots).

A connection slot never outlives the process that took it. In memory that
holds by construction. In Redis each open session is its own entry in a
sorted set per client, scored with its expiry (Redis's clock, so gateways with
different clocks agree); a live process refreshes its entries every
``connection_ttl / 3`` seconds, and counting first drops the expired ones. A
process that is stopped gives its slots back in :meth:`StateStore.close`; one
that is killed (``kill -9``, a crash, a lost machine) stops refreshing, and
its slots are gone ``connection_ttl`` seconds later (30 by default). A client
that keeps retrying adds and removes only its own entries, so it can never keep
a dead process's slots alive.

:func:`store_from_url` picks one from a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import threading
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypeVar, get_args

from ..dialogue.events import CountKind, HitKind

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "ConnectionCounts",
    "CountKind",
    "HitKind",
    "MemoryStore",
    "RedisStore",
    "StateStore",
    "StateStoreError",
    "SyncStore",
    "store_from_url",
]

# HitKind is what StateStore.hit counts: message/recipient/auth_failure keyed
# on the client address, user_* on the SASL login, sender_domain_* and
# recipient_domain_* on the domain, global_* on "*"; CountKind is what peek
# reads: a hit kind, or new connections. Both are defined beside the
# dialogue's NeedCount, which asks for them.
_KINDS: Final = frozenset(("connection", *get_args(HitKind)))

_T = TypeVar("_T")

log = logging.getLogger("mailpolicy.state")


class StateStoreError(Exception):
    """The store could not count. The caller must answer with a temporary
    failure: it cannot know whether the client is over a limit."""


class ConnectionCounts(NamedTuple):
    """What :meth:`StateStore.connection_opened` returns; both include the new
    connection."""

    concurrent: int
    rate: int


class StateStore(Protocol):
    """Connection and rate counters per client (an IP address as a string)."""

    async def connection_opened(self, client: str, now: float, window: int) -> ConnectionCounts:
        """Count a new session: ``(concurrent, connection rate)``, this one included."""
        ...

    async def connection_closed(self, client: str) -> None:
        """Give back the slot of a session counted by :meth:`connection_opened`."""
        ...

    async def hit(self, kind: HitKind, client: str, now: float, window: int) -> int:
        """Count one event; return the count in the current window, this one included."""
        ...

    async def peek(self, kind: CountKind, client: str, now: float, window: int) -> int:
        """The count in the current window, without counting anything."""
        ...

    async def close(self) -> None:
        """Give back every slot still held and release resources (connections
        to Redis). Later :meth:`connection_closed` calls do nothing."""
        ...


def _window_start(now: float, window: int) -> int:
    if window <= 0:
        raise ValueError(f"rate window must be positive, not {window}")
    return math.floor(now / window) * window


def _check_kind(kind: str) -> None:
    # The Literal types say it already; this keeps a typo from becoming a
    # silent, never-limited counter (or a surprising Redis key).
    if kind not in _KINDS:
        raise ValueError(f"unknown counter kind {kind!r}")


# ---------------------------------------------------------------------------
# In memory


class _Window:
    __slots__ = ("count", "end", "start")

    def __init__(self, start: int, window: int) -> None:
        self.start = start
        self.end = start + window
        self.count = 0


class SyncStore:
    """The :class:`StateStore` coroutines of a store that never waits: each
    calls its synchronous twin (``opened_now``, ``closed_now``,
    ``count_now``), which a caller that cannot await may call directly."""

    def opened_now(self, client: str, now: float, window: int) -> ConnectionCounts:
        raise NotImplementedError

    def closed_now(self, client: str) -> None:
        raise NotImplementedError

    def count_now(self, kind: str, client: str, now: float, window: int, *, add: int) -> int:
        raise NotImplementedError

    async def connection_opened(self, client: str, now: float, window: int) -> ConnectionCounts:
        return self.opened_now(client, now, window)

    async def connection_closed(self, client: str) -> None:
        self.closed_now(client)

    async def hit(self, kind: HitKind, client: str, now: float, window: int) -> int:
        return self.count_now(kind, client, now, window, add=1)

    async def peek(self, kind: CountKind, client: str, now: float, window: int) -> int:
        return self.count_now(kind, client, now, window, add=0)


class MemoryStore(SyncStore):
    """Counters in this process: the default, and what tests use.

    All operations are synchronous under a lock, so one store can serve
    several event loops or threads. ``max_entries`` caps the number of rate
    counters kept; it only comes into play when more distinct clients than
    that were active in one window, and then the counter whose window started
    first is forgotten (that client may get a few events more than its limit,
    instead of the process running out of memory).
    """

    def __init__(self, *, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._connections: dict[str, int] = {}
        # Insertion order is the order windows started in: a key whose window
        # restarts is moved to the end, so the oldest counters come first.
        self._rates: dict[tuple[str, str, int], _Window] = {}
        self._next_purge = -math.inf

    def __repr__(self) -> str:
        return f"MemoryStore(connections={len(self._connections)}, counters={len(self._rates)})"

    def __len__(self) -> int:
        """How many entries (open-connection counts and rate counters) are kept."""
        return len(self._connections) + len(self._rates)

    # What the protocol's coroutines call (SyncStore): the store never waits.

    def opened_now(self, client: str, now: float, window: int) -> ConnectionCounts:
        """:meth:`connection_opened`, synchronously."""
        with self._lock:
            rate = self._count("connection", client, now, window, add=1)
            concurrent = self._connections.get(client, 0) + 1
            self._connections[client] = concurrent
        return ConnectionCounts(concurrent, rate)

    def closed_now(self, client: str) -> None:
        """:meth:`connection_closed`, synchronously."""
        with self._lock:
            left = self._connections.get(client, 0) - 1
            # Never below zero, and no entry at zero: memory follows the
            # connections actually open.
            if left > 0:
                self._connections[client] = left
            else:
                self._connections.pop(client, None)

    def count_now(self, kind: str, client: str, now: float, window: int, *, add: int) -> int:
        """:meth:`hit` (``add=1``) or :meth:`peek` (``add=0``), synchronously."""
        with self._lock:
            return self._count(kind, client, now, window, add=add)

    async def close(self) -> None:
        with self._lock:
            self._connections.clear()
            self._rates.clear()

    def _count(self, kind: str, client: str, now: float, window: int, *, add: int) -> int:
        _check_kind(kind)
        start = _window_start(now, window)
        if now >= self._next_purge:
            self._purge(now)
            self._next_purge = now + window
        key = (kind, client, window)
        entry = self._rates.get(key)
        if entry is not None and entry.start != start:
            del self._rates[key]
            entry = None
        if entry is None:
            if not add:
                return 0
            if len(self._rates) >= self.max_entries:
                self._purge(now)
                while len(self._rates) >= self.max_entries:
                    del self._rates[next(iter(self._rates))]
            entry = self._rates[key] = _Window(start, window)
        entry.count += add
        return entry.count

    def _purge(self, now: float) -> None:
        expired = [key for key, entry in self._rates.items() if entry.end <= now]
        for key in expired:
            del self._rates[key]


# ---------------------------------------------------------------------------
# Redis

# Lua keeps each step atomic: a purge, an add and a count that another
# process could interleave with would miscount. TIME is Redis's clock, the one
# every gateway sharing the server agrees on. (Redis before 5 needs
# replicate_commands() to call TIME before a write; later ones ignore it.)
_OPEN_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
local concurrent = redis.call('ZCARD', KEYS[1])
local rate = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return {concurrent, rate}
"""

# Refresh this process's own entries. XX: an entry closed meanwhile (its ZREM
# may overtake this on another connection) is not brought back to life.
_REFRESH_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('PEXPIRE', KEYS[1], lease)
end
return 0
"""


def _redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    """Counters in Redis, shared by every process that uses the same server
    and ``key_prefix``.

    Rate counters are ``{prefix}rate:{kind}:{window}:{window_start}:{client}``,
    incremented and given an expiry in one ``MULTI``/``EXEC`` (or script), so
    a counter never outlives its window by much, even if a process dies
    mid-way. Open connections are ``{prefix}conn:{client}``, a sorted set with
    one member per open session (``{process id}:{n}``) scored with its expiry
    in milliseconds of Redis's clock; the concurrency count is its size after
    dropping expired members. The key itself expires with its last member. A
    background task refreshes this process's members every
    ``connection_ttl / 3`` seconds, so they expire ``connection_ttl`` seconds
    after the process dies; :meth:`close` removes them at once. Any Redis or
    network error raises :class:`StateStoreError`.

    ``client`` is a ``redis.asyncio.Redis``; it should have socket timeouts, as
    the one :meth:`from_url` builds does, or an unreachable server stalls the
    SMTP session instead of failing it.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        key_prefix: str = "mailpolicy:",
        connection_ttl: float = 30,
        description: str = "redis",
    ) -> None:
        from redis.exceptions import RedisError

        if connection_ttl <= 0:
            raise ValueError(f"connection_ttl must be positive, not {connection_ttl}")
        self.client = client
        self.key_prefix = key_prefix
        #: seconds a slot outlives the last sign of life of its process
        self.connection_ttl = connection_ttl
        self.description = description
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._open_script = client.register_script(_OPEN_SCRIPT)
        self._refresh_script = client.register_script(_REFRESH_SCRIPT)
        # This process's slots: client address -> members it holds in Redis.
        self._process = secrets.token_hex(8)
        self._serial = itertools.count(1)
        self._slots: dict[str, list[str]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_failing = False
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "mailpolicy:",
        timeout: float = 2.0,
        connection_ttl: float = 30,
    ) -> RedisStore:
        """A store on ``url`` (``redis://``, ``rediss://``, ``unix://``).

        ``timeout`` bounds connecting and each command: a slow Redis costs a
        session at most that long before it gets its ``4xx``. A
        ``connection_ttl=SECONDS`` query parameter in the URL overrides
        ``connection_ttl``.
        """
        try:
            import redis.asyncio
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StateStoreError(
                "the Redis state store needs the redis package: pip install 'mailpolicy[redis]'"
            ) from exc
        url, connection_ttl = _take_ttl(url, connection_ttl)
        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(
            client,
            key_prefix=key_prefix,
            connection_ttl=connection_ttl,
            description=_redact_url(url),
        )

    def __repr__(self) -> str:
        return f"RedisStore({self.description!r}, key_prefix={self.key_prefix!r})"

    def _rate_key(self, kind: str, client: str, now: float, window: int) -> str:
        _check_kind(kind)
        start = _window_start(now, window)
        return f"{self.key_prefix}rate:{kind}:{window}:{start}:{client}"

    def _conn_key(self, client: str) -> str:
        return f"{self.key_prefix}conn:{client}"

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.connection_ttl * 1000))

    @staticmethod
    def _rate_ttl(window: int) -> int:
        # The window's length from the first hit, plus room for clocks of
        # different machines that disagree a little about when it began.
        return window + 60

    async def _guard(self, operation: str, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except self._errors as exc:
            # The cause is in the message: a chained traceback would only
            # repeat it, three times over, in every log.
            raise StateStoreError(
                f"state store {self.description} failed during {operation}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    async def ping(self) -> None:
        """Raise :class:`StateStoreError` unless Redis answers (``serve`` checks
        this at start-up)."""
        await self._guard("PING", self.client.ping())

    async def connection_opened(self, client: str, now: float, window: int) -> ConnectionCounts:
        rate_key = self._rate_key("connection", client, now, window)
        member = f"{self._process}:{next(self._serial)}"
        concurrent, rate = await self._guard(
            "connection_opened",
            self._open_script(
                keys=[self._conn_key(client), rate_key],
                args=[member, self._lease_ms, self._rate_ttl(window)],
            ),
        )
        if self._closed:
            # Counted after close(): give it back at once, nobody will.
            await self._guard("connection_opened", self.client.zrem(self._conn_key(client), member))
        else:
            self._slots.setdefault(client, []).append(member)
            self._start_refresher()
        return ConnectionCounts(int(concurrent), int(rate))

    async def connection_closed(self, client: str) -> None:
        # Any of this process's slots for the client will do: they are alike.
        held = self._slots.get(client)
        if not held:
            return
        member = held.pop()
        if not held:
            del self._slots[client]
        # If this fails, the member is no longer refreshed: it expires.
        await self._guard("connection_closed", self.client.zrem(self._conn_key(client), member))

    async def hit(self, kind: HitKind, client: str, now: float, window: int) -> int:
        key = self._rate_key(kind, client, now, window)

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, self._rate_ttl(window))
                return await pipe.execute()

        count, _ = await self._guard("hit", run())
        return int(count)

    async def peek(self, kind: CountKind, client: str, now: float, window: int) -> int:
        key = self._rate_key(kind, client, now, window)
        value = await self._guard("peek", self.client.get(key))
        return int(value) if value is not None else 0

    async def refresh(self) -> None:
        """Push the expiry of this process's slots ``connection_ttl`` ahead
        (the background task calls this; tests may too)."""
        held = {client: list(members) for client, members in self._slots.items() if members}
        if not held:
            return

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for client, members in held.items():
                    await self._refresh_script(
                        keys=[self._conn_key(client)], args=[self._lease_ms, *members], client=pipe
                    )
                return await pipe.execute()

        await self._guard("refresh", run())

    def _start_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.connection_ttl / 3)
            try:
                await self.refresh()
            except StateStoreError as e:
                # One line when it starts failing, one when it recovers: not
                # a line every few seconds for as long as Redis is away.
                if not self._refresh_failing:
                    log.error(
                        "%s; open connections will be forgotten in %gs", e, self.connection_ttl
                    )
                self._refresh_failing = True
            else:
                if self._refresh_failing:
                    log.warning("state store %s answers again", self.description)
                self._refresh_failing = False

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        held, self._slots = self._slots, {}
        if held:

            async def run() -> list[Any]:
                async with self.client.pipeline(transaction=False) as pipe:
                    for client, members in held.items():
                        pipe.zrem(self._conn_key(client), *members)
                    return await pipe.execute()

            try:
                await self._guard("close", run())
            except StateStoreError as e:
                # Not worth failing a shutdown over: they expire on their own.
                count = sum(len(members) for members in held.values())
                log.warning("%s; %d connection slots expire in %gs", e, count, self.connection_ttl)
        await self._guard("close", self.client.aclose())


def _take_ttl(url: str, default: float) -> tuple[str, float]:
    """``url`` without its ``connection_ttl`` parameter, and that parameter's value."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ttl = default
    rest = []
    for name, value in query:
        if name == "connection_ttl":
            try:
                ttl = float(value)
            except ValueError:
                raise ValueError(
                    f"connection_ttl must be a number of seconds, not {value!r}"
                ) from None
            if not 0 < ttl < math.inf:
                raise ValueError(f"connection_ttl must be positive, not {value!r}")
        else:
            rest.append((name, value))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest))), ttl


def store_from_url(url: str | None, *, key_prefix: str = "mailpolicy:") -> StateStore:
    """The store a URL names: ``None`` or ``memory://`` gives a
    :class:`MemoryStore`; ``redis://``, ``rediss://`` or ``unix://`` a
    :class:`RedisStore` (no connection is made until the first count);
    ``shared:///path?worker=K`` a
    :class:`~mailpolicy.adapters.sharedstore.SharedStore` (what ``serve
    --workers`` passes its workers). Anything else is a :class:`ValueError`."""
    if url is None or url in ("memory://", "memory:", "memory"):
        return MemoryStore()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore.from_url(url, key_prefix=key_prefix)
    if scheme == "shared":
        # what the parent of `serve --workers N` gives each worker (adapters/sharedstore.py)
        from .sharedstore import SharedStore

        return SharedStore.from_url(url)
    raise ValueError(f"unknown state store URL {_redact_url(url)!r}: use memory:// or redis://")
