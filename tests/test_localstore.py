"""The store ``serve --workers`` shares without Redis: a real
LocalStoreServer on a Unix socket, and two workers' LocalStore clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailpolicy.adapters.localstore import LocalStore, LocalStoreServer
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
