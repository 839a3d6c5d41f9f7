"""Counters shared by the worker processes of one machine, without Redis.

``mailpolicy serve --workers N`` runs N processes; per-client limits must
hold as with one. With ``--state redis://`` they share Redis; otherwise the
parent process keeps one :class:`~.state.MemoryStore` and serves it on a Unix
socket (:class:`LocalStoreServer`), and each worker counts through a
:class:`LocalStore` (URL ``local:///path/to/socket``).

The protocol is one JSON object a line each way: ``{"id", "op", "kind",
"client", "now", "window"}`` in, ``{"id", "value"}`` or ``{"id", "error"}``
out; a request without ``id`` (a closed connection: the worker needs no
answer, and its requests are served in order) gets none. A worker's
connection slots are tied to its socket: when a worker dies, the server
gives back every slot it still held, so a crash never leaves a client
locked out.

Both ends are :class:`asyncio.BufferedProtocol` s reading into a buffer of
their own, answered in the read callback: asyncio's streams cost a 256 KiB
allocation per read and two task wake-ups per line, which made the parent
spend 0.4 ms of CPU per SMTP connection (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from .state import ConnectionCounts, CountKind, HitKind, MemoryStore, StateStoreError

__all__ = ["LocalStore", "LocalStoreServer"]

log = logging.getLogger("mailpolicy.state")

#: the longest line either end accepts (a request or an answer is < 300 bytes)
LINE_LIMIT = 1 << 16


class _Lines(asyncio.BufferedProtocol):
    """Reads newline-ended lines into its own buffer and hands each to
    ``on_line``; a line over :data:`LINE_LIMIT` closes the connection."""

    def __init__(self) -> None:
        self._space = bytearray(LINE_LIMIT)
        self._space_view = memoryview(self._space)
        self._partial = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._space_view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._space_view[:nbytes].tobytes()
        if self._partial:
            data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > LINE_LIMIT:
            self._partial = b""
            if self.transport is not None:
                self.transport.close()
            return
        for line in lines:
            if line and not self.on_line(line):
                if self.transport is not None:
                    self.transport.close()
                return

    def on_line(self, line: bytes) -> bool:
        """Handle one line; ``False`` ends the connection."""
        raise NotImplementedError


class _Served(_Lines):
    """The parent's end of one worker's connection."""

    def __init__(self, store: MemoryStore, gone: Callable[[_Served], None]) -> None:
        super().__init__()
        self.store = store
        self.held: dict[str, int] = {}  # this worker's open connection slots
        self._gone = gone

    def on_line(self, line: bytes) -> bool:
        try:
            request = json.loads(line)
        except ValueError:
            return False
        if not isinstance(request, dict):
            return False
        try:
            answer: dict[str, Any] = {"id": request.get("id"), "value": self._do(request)}
        except (KeyError, TypeError, ValueError) as e:
            answer = {"id": request.get("id"), "error": str(e)}
        if "id" in request:
            if self.transport is not None:
                self.transport.write(json.dumps(answer).encode() + b"\n")
        elif "error" in answer:
            log.warning("local store: %s", answer["error"])
        return True

    def _do(self, r: dict[str, Any]) -> Any:
        op, client = r["op"], str(r["client"])
        if op == "opened":
            counts = self.store.opened_now(client, float(r["now"]), int(r["window"]))
            self.held[client] = self.held.get(client, 0) + 1
            return list(counts)
        if op == "closed":
            if self.held.get(client, 0) > 0:
                self.held[client] -= 1
                self.store.closed_now(client)
            return None
        if op in ("hit", "peek"):
            add = 1 if op == "hit" else 0
            return self.store.count_now(
                str(r["kind"]), client, float(r["now"]), int(r["window"]), add=add
            )
        raise ValueError(f"unknown operation {op!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        # the worker is gone (or stopped): its sessions are over too
        for client, n in self.held.items():
            for _ in range(n):
                self.store.closed_now(client)
        self.held.clear()
        self._gone(self)


class LocalStoreServer:
    """Serves one :class:`MemoryStore` to the workers on a Unix socket."""

    def __init__(self, path: str, store: MemoryStore | None = None) -> None:
        self.path = path
        self.store = store if store is not None else MemoryStore()
        self._server: asyncio.AbstractServer | None = None
        self._workers: set[_Served] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._accept, self.path)
        os.chmod(self.path, 0o600)

    def _accept(self) -> _Served:
        served = _Served(self.store, self._workers.discard)
        self._workers.add(served)
        return served

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for served in list(self._workers):
                if served.transport is not None:
                    served.transport.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Client(_Lines):
    """A worker's end: answers resolve the requests waiting for them."""

    def __init__(self, waiting: dict[int, asyncio.Future[Any]]) -> None:
        super().__init__()
        self.waiting = waiting
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_line(self, line: bytes) -> bool:
        try:
            answer = json.loads(line)
        except ValueError:
            return False
        if not isinstance(answer, dict):
            return False
        waiter = self.waiting.pop(answer.get("id"), None)  # type: ignore[arg-type]
        if waiter is not None and not waiter.done():
            if "error" in answer:
                waiter.set_exception(StateStoreError(str(answer["error"])))
            else:
                waiter.set_result(answer.get("value"))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_exception(StateStoreError("local store connection lost"))
        self.waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)


class LocalStore:
    """A worker's view of the parent's store (a :class:`~.state.StateStore`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._client: _Client | None = None
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"LocalStore({self.path!r})"

    def _open(self) -> asyncio.Transport | None:
        client = self._client
        if client is None or client.transport is None or client.transport.is_closing():
            return None
        return client.transport

    async def _connect(self) -> asyncio.Transport:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            transport = self._open()
            if transport is None:
                loop = asyncio.get_running_loop()
                try:
                    _, client = await loop.create_unix_connection(
                        lambda: _Client(self._waiting), self.path
                    )
                except OSError as e:
                    raise StateStoreError(f"local store {self.path}: {e.strerror or e}") from None
                self._client = client
                transport = self._open()
                if transport is None:
                    raise StateStoreError(f"local store {self.path}: connection lost")
            return transport

    async def _call(self, **request: Any) -> Any:
        transport = self._open() or await self._connect()
        ident = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        transport.write(json.dumps({"id": ident, **request}).encode() + b"\n")
        return await waiter

    async def connection_opened(self, client: str, now: float, window: int) -> ConnectionCounts:
        concurrent, rate = await self._call(
            op="opened", kind="connection", client=client, now=now, window=window
        )
        return ConnectionCounts(int(concurrent), int(rate))

    async def connection_closed(self, client: str) -> None:
        # no answer awaited: the parent serves a worker's requests in order,
        # so a later "opened" counts after this, and a lost connection gives
        # back every slot the worker held anyway
        transport = self._open() or await self._connect()
        request = {"op": "closed", "kind": "connection", "client": client, "now": 0, "window": 1}
        transport.write(json.dumps(request).encode() + b"\n")

    async def hit(self, kind: HitKind, client: str, now: float, window: int) -> int:
        return int(await self._call(op="hit", kind=kind, client=client, now=now, window=window))

    async def peek(self, kind: CountKind, client: str, now: float, window: int) -> int:
        return int(await self._call(op="peek", kind=kind, client=client, now=now, window=window))

    async def close(self) -> None:
        # closing the socket gives back every slot this worker still holds
        client = self._client
        if client is not None:
            if client.transport is not None:
                client.transport.close()
            await client.closed
