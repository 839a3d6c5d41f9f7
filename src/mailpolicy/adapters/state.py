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

Two stores:

* :class:`MemoryStore`, the default: one process, no dependencies. Memory stays
  bounded: counters of past windows are purged as time moves on, closed
  connections leave no entry, and a hard cap on entries survives a flood of
  client addresses.
* :class:`RedisStore`: several processes or machines count together. A failure
  to reach Redis raises :class:`StateStoreError`; the server answers ``4xx``
  (``421 4.3.0`` at connect, ``451 4.3.0`` later) so the client retries. A
  limit that cannot be checked is never silently waived.

:func:`store_from_url` picks one from a URL.
"""

from __future__ import annotations

import math
import threading
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol, TypeVar

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
    "store_from_url",
]

#: What :meth:`StateStore.hit` counts.
HitKind = Literal["message", "recipient", "auth_failure"]
#: What :meth:`StateStore.peek` reads: a hit kind, or new connections.
CountKind = Literal["connection", "message", "recipient", "auth_failure"]

_KINDS: Final = frozenset(("connection", "message", "recipient", "auth_failure"))

_T = TypeVar("_T")


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
        """Release resources (connections to Redis)."""
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


class MemoryStore:
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

    async def connection_opened(self, client: str, now: float, window: int) -> ConnectionCounts:
        with self._lock:
            rate = self._count("connection", client, now, window, add=1)
            concurrent = self._connections.get(client, 0) + 1
            self._connections[client] = concurrent
        return ConnectionCounts(concurrent, rate)

    async def connection_closed(self, client: str) -> None:
        with self._lock:
            left = self._connections.get(client, 0) - 1
            # Never below zero, and no entry at zero: memory follows the
            # connections actually open.
            if left > 0:
                self._connections[client] = left
            else:
                self._connections.pop(client, None)

    async def hit(self, kind: HitKind, client: str, now: float, window: int) -> int:
        with self._lock:
            return self._count(kind, client, now, window, add=1)

    async def peek(self, kind: CountKind, client: str, now: float, window: int) -> int:
        with self._lock:
            return self._count(kind, client, now, window, add=0)

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

# DECR, and drop the key at zero (or below, if the safety TTL expired while
# sessions were open), in one step: a DECR then a separate DEL could delete a
# count another process had just incremented.
_CLOSE_SCRIPT: Final = """
local left = redis.call('DECR', KEYS[1])
if left <= 0 then
    redis.call('DEL', KEYS[1])
end
return left
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
    incremented and given an expiry in one ``MULTI``/``EXEC``, so a counter
    never outlives its window by much, even if a process dies mid-way.
    Open-connection counts are ``{prefix}conn:{client}``: ``INCR`` at open,
    ``DECR`` at close; ``connection_ttl`` (refreshed at each open) is a safety
    net that forgets the sessions of a process that crashed without closing
    them. Any Redis or network error raises :class:`StateStoreError`.

    ``client`` is a ``redis.asyncio.Redis``; it should have socket timeouts, as
    the one :meth:`from_url` builds does, or an unreachable server stalls the
    SMTP session instead of failing it.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        key_prefix: str = "mailpolicy:",
        connection_ttl: int = 3600,
        description: str = "redis",
    ) -> None:
        from redis.exceptions import RedisError

        self.client = client
        self.key_prefix = key_prefix
        self.connection_ttl = connection_ttl
        self.description = description
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._close_script = client.register_script(_CLOSE_SCRIPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "mailpolicy:",
        timeout: float = 2.0,
        connection_ttl: int = 3600,
    ) -> RedisStore:
        """A store on ``url`` (``redis://``, ``rediss://``, ``unix://``).

        ``timeout`` bounds connecting and each command: a slow Redis costs a
        session at most that long before it gets its ``4xx``.
        """
        try:
            import redis.asyncio
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StateStoreError(
                "the Redis state store needs the redis package: pip install 'mailpolicy[redis]'"
            ) from exc
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

    @staticmethod
    def _rate_ttl(window: int) -> int:
        # The window's length from the first hit, plus room for clocks of
        # different machines that disagree a little about when it began.
        return window + 60

    async def _guard(self, operation: str, call: Awaitable[_T]) -> _T:
        try:
            return await call
        except self._errors as exc:
            raise StateStoreError(
                f"state store {self.description} failed during {operation}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def connection_opened(self, client: str, now: float, window: int) -> ConnectionCounts:
        rate_key = self._rate_key("connection", client, now, window)
        conn_key = self._conn_key(client)

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(conn_key)
                pipe.expire(conn_key, self.connection_ttl)
                pipe.incr(rate_key)
                pipe.expire(rate_key, self._rate_ttl(window))
                return await pipe.execute()

        concurrent, _, rate, _ = await self._guard("connection_opened", run())
        return ConnectionCounts(int(concurrent), int(rate))

    async def connection_closed(self, client: str) -> None:
        await self._guard("connection_closed", self._close_script(keys=[self._conn_key(client)]))

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

    async def close(self) -> None:
        await self._guard("close", self.client.aclose())


def store_from_url(url: str | None, *, key_prefix: str = "mailpolicy:") -> StateStore:
    """The store a URL names: ``None`` or ``memory://`` gives a
    :class:`MemoryStore`; ``redis://``, ``rediss://`` or ``unix://`` a
    :class:`RedisStore` (no connection is made until the first count).
    Anything else is a :class:`ValueError`."""
    if url is None or url in ("memory://", "memory:", "memory"):
        return MemoryStore()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore.from_url(url, key_prefix=key_prefix)
    raise ValueError(f"unknown state store URL {_redact_url(url)!r}: use memory:// or redis://")
