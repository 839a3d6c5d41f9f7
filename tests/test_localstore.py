"""The store ``serve --workers`` shares without Redis: a real
LocalStoreServer on a Unix socket, and two workers' LocalStore clients."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mailpolicy.adapters.localstore import LINE_LIMIT, LocalStore, LocalStoreServer
from mailpolicy.adapters.state import StateStoreError


def test_two_workers_count_together_and_a_close_needs_no_answer(tmp_path: Path) -> None:
    async def main() -> None:
        server = LocalStoreServer(str(tmp_path / "state.sock"))
        await server.start()
        one, two = LocalStore(server.path), LocalStore(server.path)
        try:
            assert await one.connection_opened("192.0.2.1", 100.0, 60) == (1, 1)
            assert await two.connection_opened("192.0.2.1", 101.0, 60) == (2, 2)
            # not awaited by the server's answer: the next request of the same
            # worker is served after it
            await one.connection_closed("192.0.2.1")
            assert await one.connection_opened("192.0.2.1", 102.0, 60) == (2, 3)
            assert await one.hit("message", "192.0.2.1", 102.0, 60) == 1
            assert await two.hit("message", "192.0.2.1", 103.0, 60) == 2
            assert await two.peek("message", "192.0.2.1", 103.0, 60) == 2
            # a worker that goes away gives back the slots it held (one here)
            await two.close()
            three = LocalStore(server.path)
            for _ in range(100):  # the server sees the socket close a moment later
                counts = await three.connection_opened("192.0.2.1", 104.0, 60)
                if counts.concurrent == 2:  # one's slot and this one
                    break
                await three.connection_closed("192.0.2.1")
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the closed worker's slot was never given back")
            await three.close()
        finally:
            await one.close()
            await server.close()

    asyncio.run(main())


def test_a_store_that_is_not_there_is_a_store_error(tmp_path: Path) -> None:
    async def main() -> None:
        store = LocalStore(str(tmp_path / "missing.sock"))
        with pytest.raises(StateStoreError, match=r"missing\.sock"):
            await store.connection_opened("192.0.2.1", 1.0, 60)
        with pytest.raises(StateStoreError, match=r"missing\.sock"):
            await store.connection_closed("192.0.2.1")

    asyncio.run(main())


async def hung_up(reader: asyncio.StreamReader) -> bool:
    """The server closed this connection (a reset when it left bytes unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def test_requests_split_or_together_are_answered_in_order_and_garbage_ends_the_worker(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        server = LocalStoreServer(str(tmp_path / "state.sock"))
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(server.path)
            opened = b'{"id": %d, "op": "opened", "client": "192.0.2.7", "now": 5, "window": 60}\n'
            # one request in two pieces, then two in one write
            first = opened % 1
            writer.write(first[:20])
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(first[20:] + opened % 2 + opened % 3)
            answers = [json.loads(await reader.readline()) for _ in range(3)]
            assert answers == [
                {"id": 1, "value": [1, 1]},
                {"id": 2, "value": [2, 2]},
                {"id": 3, "value": [3, 3]},
            ]
            writer.write(b'{"id": 4, "op": "launch", "client": "x", "now": 1, "window": 1}\n')
            assert json.loads(await reader.readline()) == {
                "id": 4,
                "error": "unknown operation 'launch'",
            }
            writer.write(b"not json\n")
            assert await hung_up(reader)
            writer.close()
            # and gave back the three slots that worker held
            other = LocalStore(server.path)
            assert await other.connection_opened("192.0.2.7", 6.0, 60) == (1, 4)
            await other.close()
            # a line that never ends is refused, not kept growing
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b"x" * (2 * LINE_LIMIT + 10))
            assert await hung_up(reader)
            writer.close()
        finally:
            await server.close()

    asyncio.run(main())
