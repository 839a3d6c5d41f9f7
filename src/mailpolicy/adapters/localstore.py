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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from typing import Any

from .state import ConnectionCounts, CountKind, HitKind, MemoryStore, StateStoreError

__all__ = ["LocalStore", "LocalStoreServer"]

log = logging.getLogger("mailpolicy.state")


class LocalStoreServer:
    """Serves one :class:`MemoryStore` to the workers on a Unix socket."""

    def __init__(self, path: str, store: MemoryStore | None = None) -> None:
        self.path = path
        self.store = store if store is not None else MemoryStore()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=1 << 16)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: dict[str, int] = {}  # this worker's open connection slots
        try:
            while line := await reader.readline():
                request = json.loads(line)
                try:
                    value = await self._do(request, held)
                    answer: dict[str, Any] = {"id": request.get("id"), "value": value}
                except (KeyError, TypeError, ValueError) as e:
                    answer = {"id": request.get("id"), "error": str(e)}
                if "id" in request:
                    writer.write(json.dumps(answer).encode() + b"\n")
                elif "error" in answer:
                    log.warning("local store: %s", answer["error"])
        except (ConnectionError, json.JSONDecodeError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            # the worker is gone (or stopped): its sessions are over too
            for client, n in held.items():
                for _ in range(n):
                    await self.store.connection_closed(client)
            writer.close()

    async def _do(self, r: dict[str, Any], held: dict[str, int]) -> Any:
        op, client = r["op"], str(r["client"])
        if op == "opened":
            counts = await self.store.connection_opened(client, float(r["now"]), int(r["window"]))
            held[client] = held.get(client, 0) + 1
            return list(counts)
        if op == "closed":
            if held.get(client, 0) > 0:
                held[client] -= 1
                await self.store.connection_closed(client)
            return None
        if op == "hit":
            return await self.store.hit(r["kind"], client, float(r["now"]), int(r["window"]))
        if op == "peek":
            return await self.store.peek(r["kind"], client, float(r["now"]), int(r["window"]))
        raise ValueError(f"unknown operation {op!r}")


class LocalStore:
    """A worker's view of the parent's store (a :class:`~.state.StateStore`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._stream: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"LocalStore({self.path!r})"

    async def _connect(self) -> asyncio.StreamWriter:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._stream is None or self._stream.is_closing():
                try:
                    reader, writer = await asyncio.open_unix_connection(self.path)
                except OSError as e:
                    raise StateStoreError(f"local store {self.path}: {e.strerror or e}") from None
                self._stream = writer
                self._reading = asyncio.ensure_future(self._read(reader))
            return self._stream

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = json.loads(line)
                waiter = self._waiting.pop(answer.get("id"), None)
                if waiter is not None and not waiter.done():
                    if "error" in answer:
                        waiter.set_exception(StateStoreError(answer["error"]))
                    else:
                        waiter.set_result(answer["value"])
        except (ConnectionError, json.JSONDecodeError, ValueError):
            pass
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(StateStoreError("local store connection lost"))
            self._waiting.clear()
            self._stream = None

    async def _call(self, **request: Any) -> Any:
        writer = self._stream
        if writer is None or writer.is_closing():
            writer = await self._connect()
        ident = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        writer.write(json.dumps({"id": ident, **request}).encode() + b"\n")
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
        writer = self._stream
        if writer is None or writer.is_closing():
            writer = await self._connect()
        request = {"op": "closed", "kind": "connection", "client": client, "now": 0, "window": 1}
        writer.write(json.dumps(request).encode() + b"\n")

    async def hit(self, kind: HitKind, client: str, now: float, window: int) -> int:
        return int(await self._call(op="hit", kind=kind, client=client, now=now, window=window))

    async def peek(self, kind: CountKind, client: str, now: float, window: int) -> int:
        return int(await self._call(op="peek", kind=kind, client=client, now=now, window=window))

    async def close(self) -> None:
        # closing the socket gives back every slot this worker still holds
        if self._stream is not None:
            self._stream.close()
        if self._reading is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
