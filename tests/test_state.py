"""The state store: one suite for MemoryStore and for RedisStore on a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import pytest

from mailpolicy.adapters.state import (
    ConnectionCounts,
    MemoryStore,
    RedisStore,
    StateStore,
    StateStoreError,
    store_from_url,
)

if TYPE_CHECKING:
    from conftest import RedisServer

T = TypeVar("T")
StoreFactory = Callable[[], StateStore]

WINDOW = 60
T0 = 1_700_000_040.0  # a multiple of WINDOW: a window starts here


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds the store inside the test's event loop (redis.asyncio binds its
    connections to the loop that first uses them)."""
    if request.param == "memory":
        return MemoryStore
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda: RedisStore.from_url(server.url, key_prefix=prefix)


def run(make_store: StoreFactory, test: Callable[[StateStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = make_store()
        try:
            return await test(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_concurrent_connections_count_and_release(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        assert await store.connection_opened("192.0.2.1", T0, WINDOW) == (1, 1)
        assert await store.connection_opened("192.0.2.1", T0 + 1, WINDOW) == (2, 2)
        assert await store.connection_opened("192.0.2.2", T0 + 1, WINDOW) == (1, 1)
        await store.connection_closed("192.0.2.1")
        counts = await store.connection_opened("192.0.2.1", T0 + 2, WINDOW)
        assert counts == ConnectionCounts(concurrent=2, rate=3)
        assert counts.concurrent == 2 and counts.rate == 3
        for _ in range(2):
            await store.connection_closed("192.0.2.1")
        assert await store.connection_opened("192.0.2.1", T0 + 3, WINDOW) == (1, 4)

    run(make_store, test)


def test_closing_more_than_opened_never_goes_negative(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        await store.connection_closed("2001:db8::1")
        await store.connection_closed("2001:db8::1")
        assert (await store.connection_opened("2001:db8::1", T0, WINDOW)).concurrent == 1

    run(make_store, test)


def test_connection_rate_resets_with_the_window_but_concurrency_does_not(
    make_store: StoreFactory,
) -> None:
    async def test(store: StateStore) -> None:
        for i in range(3):
            await store.connection_opened("192.0.2.1", T0 + i, WINDOW)
        assert await store.peek("connection", "192.0.2.1", T0 + 59.9, WINDOW) == 3
        assert await store.connection_opened("192.0.2.1", T0 + WINDOW, WINDOW) == (4, 1)

    run(make_store, test)


def test_fixed_windows(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        counts = [await store.hit("message", "192.0.2.1", T0 + i * 10, WINDOW) for i in range(6)]
        assert counts == [1, 2, 3, 4, 5, 6]
        # The window is [T0, T0 + 60): the next second starts a new count.
        assert await store.hit("message", "192.0.2.1", T0 + 59.999, WINDOW) == 7
        assert await store.hit("message", "192.0.2.1", T0 + 60, WINDOW) == 1
        assert await store.hit("message", "192.0.2.1", T0 + 3600, WINDOW) == 1

    run(make_store, test)


def test_kinds_clients_and_window_lengths_are_separate(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        assert await store.hit("message", "192.0.2.1", T0, WINDOW) == 1
        assert await store.hit("recipient", "192.0.2.1", T0, WINDOW) == 1
        assert await store.hit("recipient", "192.0.2.1", T0, WINDOW) == 2
        assert await store.hit("auth_failure", "192.0.2.1", T0, WINDOW) == 1
        assert await store.hit("message", "192.0.2.2", T0, WINDOW) == 1
        assert await store.hit("message", "192.0.2.1", T0, 3600) == 1
        assert await store.peek("message", "192.0.2.1", T0, WINDOW) == 1
        assert await store.peek("recipient", "192.0.2.1", T0, WINDOW) == 2
        assert await store.peek("connection", "192.0.2.1", T0, WINDOW) == 0

    run(make_store, test)


def test_peek_does_not_count(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        assert await store.peek("auth_failure", "192.0.2.9", T0, WINDOW) == 0
        assert await store.peek("auth_failure", "192.0.2.9", T0, WINDOW) == 0
        assert await store.hit("auth_failure", "192.0.2.9", T0, WINDOW) == 1
        assert await store.peek("auth_failure", "192.0.2.9", T0 + 1, WINDOW) == 1
        assert await store.peek("auth_failure", "192.0.2.9", T0 + WINDOW, WINDOW) == 0

    run(make_store, test)


def test_simultaneous_hits_each_get_their_own_count(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        counts = await asyncio.gather(
            *(store.hit("recipient", "192.0.2.1", T0, WINDOW) for _ in range(50))
        )
        assert sorted(counts) == list(range(1, 51))
        opened = await asyncio.gather(
            *(store.connection_opened("192.0.2.1", T0, WINDOW) for _ in range(20))
        )
        assert sorted(c.concurrent for c in opened) == list(range(1, 21))
        await asyncio.gather(*(store.connection_closed("192.0.2.1") for _ in range(20)))
        assert (await store.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 1

    run(make_store, test)


def test_bad_arguments_are_refused(make_store: StoreFactory) -> None:
    async def test(store: StateStore) -> None:
        with pytest.raises(ValueError, match="unknown counter kind 'messages'"):
            await store.hit("messages", "192.0.2.1", T0, WINDOW)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="rate window must be positive"):
            await store.hit("message", "192.0.2.1", T0, 0)

    run(make_store, test)


# ---------------------------------------------------------------------------
# MemoryStore: bounded memory


def test_memory_store_purges_expired_windows() -> None:
    async def test() -> None:
        store = MemoryStore()
        for i in range(10_000):
            await store.hit("recipient", f"10.0.{i // 256}.{i % 256}", T0, WINDOW)
        assert len(store) == 10_000
        # Time moves past the window: the next count sweeps the old ones out.
        await store.hit("recipient", "192.0.2.1", T0 + WINDOW, WINDOW)
        assert len(store) == 1
        await store.connection_opened("192.0.2.1", T0 + WINDOW, WINDOW)
        await store.connection_closed("192.0.2.1")
        assert len(store) == 2  # two rate counters, no open-connection entry

    asyncio.run(test())


def test_memory_store_caps_entries_under_an_address_flood() -> None:
    async def test() -> None:
        store = MemoryStore(max_entries=100)
        for i in range(1_000):
            await store.hit("message", f"2001:db8::{i:x}", T0, WINDOW)
        assert len(store) <= 100
        # The most recent clients are still counted exactly.
        assert await store.hit("message", "2001:db8::3e7", T0, WINDOW) == 2

    asyncio.run(test())


def test_memory_store_rejects_a_zero_cap() -> None:
    with pytest.raises(ValueError, match="max_entries must be at least 1"):
        MemoryStore(max_entries=0)


def test_close_gives_back_every_slot_and_later_closes_do_nothing(
    make_store: StoreFactory,
) -> None:
    async def test(store: StateStore) -> None:
        for _ in range(3):
            await store.connection_opened("192.0.2.1", T0, WINDOW)
        await store.close()  # a shutdown with sessions still open
        for _ in range(3):  # their sessions end afterwards
            await store.connection_closed("192.0.2.1")
        assert (await store.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 1

    run(make_store, test)


# ---------------------------------------------------------------------------
# RedisStore specifics


def test_redis_store_sets_expiries_and_drops_closed_connections(
    redis_server: RedisServer,
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"

    async def test() -> None:
        store = RedisStore.from_url(redis_server.url, key_prefix=prefix, connection_ttl=120)
        try:
            await store.connection_opened("192.0.2.1", T0, WINDOW)
            await store.hit("message", "192.0.2.1", T0, WINDOW)
            raw_keys = await store.client.keys(prefix + "*")
            keys = sorted(k.decode() if isinstance(k, bytes) else k for k in raw_keys)
            assert keys == [
                f"{prefix}conn:192.0.2.1",
                f"{prefix}rate:connection:60:{int(T0)}:192.0.2.1",
                f"{prefix}rate:message:60:{int(T0)}:192.0.2.1",
            ]
            # No key is ever left without an expiry.
            for key in keys:
                ttl = await store.client.ttl(key)
                assert 0 < ttl <= (120 if ":conn:" in key else WINDOW + 60)
            # One entry per open session, each expiring on its own.
            assert await store.client.zcard(f"{prefix}conn:192.0.2.1") == 1
            await store.connection_closed("192.0.2.1")
            assert await store.client.exists(f"{prefix}conn:192.0.2.1") == 0
        finally:
            await store.close()

    asyncio.run(test())


def test_redis_stores_share_counts(redis_server: RedisServer) -> None:
    # Two stores, two connection pools: as two server processes would be.
    prefix = f"test:{uuid.uuid4().hex}:"

    async def test() -> None:
        one = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        two = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        other = RedisStore.from_url(redis_server.url, key_prefix=prefix + "other:")
        try:
            assert await one.hit("message", "192.0.2.1", T0, WINDOW) == 1
            assert await two.hit("message", "192.0.2.1", T0, WINDOW) == 2
            assert await other.hit("message", "192.0.2.1", T0, WINDOW) == 1
            assert (await one.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 1
            assert (await two.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 2
        finally:
            for store in (one, two, other):
                await store.close()

    asyncio.run(test())


def test_unreachable_redis_raises_state_store_error(free_port: Callable[[], int]) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"

    async def test() -> None:
        store = RedisStore.from_url(url, timeout=1)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.connection_opened("192.0.2.1", T0, WINDOW),
            store.ping,
            lambda: store.hit("message", "192.0.2.1", T0, WINDOW),
            lambda: store.peek("message", "192.0.2.1", T0, WINDOW),
        ]
        for call in calls:
            with pytest.raises(StateStoreError) as info:
                await call()
            # The URL's password is never repeated.
            assert "hunter2" not in str(info.value)
            assert "127.0.0.1" in str(info.value)
        await store.close()

    asyncio.run(test())


def test_redis_dying_mid_way_raises_state_store_error(
    start_redis_server: Callable[[], RedisServer],
) -> None:
    server = start_redis_server()

    async def test() -> None:
        store = RedisStore.from_url(server.url, timeout=1)
        try:
            assert await store.hit("message", "192.0.2.1", T0, WINDOW) == 1
            server.stop()
            with pytest.raises(StateStoreError):
                await store.hit("message", "192.0.2.1", T0, WINDOW)
            with pytest.raises(StateStoreError):
                await store.connection_opened("192.0.2.1", T0, WINDOW)
        finally:
            await store.close()

    asyncio.run(test())


# ---------------------------------------------------------------------------
# Connection slots never outlive the process that took them

# A process that takes connection slots and is then killed (SIGKILL: no
# cleanup of any kind runs).
_HOLDER = """
import asyncio, sys
from mailpolicy.adapters.state import RedisStore

async def main():
    store = RedisStore.from_url(sys.argv[1], key_prefix=sys.argv[2], connection_ttl=1)
    for _ in range(3):
        await store.connection_opened("192.0.2.7", 0.0, 60)
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_slots_of_a_killed_process_expire_although_the_client_keeps_retrying(
    redis_server: RedisServer,
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_server.url, prefix],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        time.sleep(1.5)  # longer than the TTL: the holder's refreshes keep them
    finally:
        holder.kill()
        holder.wait(10)

    async def test() -> list[int]:
        store = RedisStore.from_url(redis_server.url, key_prefix=prefix, connection_ttl=1)
        seen: list[int] = []
        try:
            # A client retrying every 0.2 s, as one locked out would.
            for _ in range(10):
                counts = await store.connection_opened("192.0.2.7", time.time(), 60)
                seen.append(counts.concurrent)
                await store.connection_closed("192.0.2.7")
                await asyncio.sleep(0.2)
        finally:
            await store.close()
        return seen

    seen = asyncio.run(test())
    # The live holder's three slots counted at first (it refreshed them past
    # their TTL), and were gone about a second after the kill.
    assert seen[0] == 4, seen
    assert seen[-4:] == [1, 1, 1, 1], seen


def test_live_slots_are_refreshed_past_their_ttl(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"

    async def test() -> None:
        store = RedisStore.from_url(redis_server.url, key_prefix=prefix, connection_ttl=0.6)
        try:
            await store.connection_opened("192.0.2.1", T0, WINDOW)
            await asyncio.sleep(1.5)
            assert (await store.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 2
            assert 0 < await store.client.pttl(f"{prefix}conn:192.0.2.1") <= 600
        finally:
            await store.close()

    asyncio.run(test())


def test_a_failing_refresh_logs_one_line_not_one_per_attempt(
    start_redis_server: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis_server()

    async def test() -> None:
        store = RedisStore.from_url(server.url, connection_ttl=0.3, timeout=0.5)
        await store.connection_opened("192.0.2.1", T0, WINDOW)
        server.stop()
        await asyncio.sleep(1.2)  # about ten refresh attempts
        await store.close()  # a shutdown does not fail for it

    with caplog.at_level("WARNING", logger="mailpolicy.state"):
        asyncio.run(test())
    refresh, close = caplog.records
    assert refresh.levelname == "ERROR"
    assert "failed during refresh" in refresh.getMessage()
    assert "forgotten in 0.3s" in refresh.getMessage()
    assert close.levelname == "WARNING"
    assert close.getMessage().endswith("; 1 connection slots expire in 0.3s")
    assert refresh.exc_info is None
    assert close.exc_info is None


def test_close_gives_back_every_slot_still_held(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"

    async def test() -> None:
        stopping = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        other = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        try:
            for _ in range(5):
                await stopping.connection_opened("192.0.2.1", T0, WINDOW)
            await stopping.close()  # sessions still open, as at a shutdown
            # closing their sessions afterwards changes nothing
            await stopping.connection_closed("192.0.2.1")
            assert (await other.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 1
        finally:
            await other.close()

    asyncio.run(test())


def test_a_slot_is_given_back_once_and_only_by_its_holder(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"

    async def test() -> None:
        one = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        two = RedisStore.from_url(redis_server.url, key_prefix=prefix)
        try:
            await one.connection_opened("192.0.2.1", T0, WINDOW)
            await one.connection_opened("192.0.2.1", T0, WINDOW)
            # two holds nothing: it cannot give back one's slots
            await two.connection_closed("192.0.2.1")
            assert (await two.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 3
            for _ in range(4):
                await one.connection_closed("192.0.2.1")
            assert (await two.connection_opened("192.0.2.1", T0, WINDOW)).concurrent == 2
        finally:
            await one.close()
            await two.close()

    asyncio.run(test())


def test_connection_ttl_from_the_url(redis_server: RedisServer) -> None:
    store = store_from_url(redis_server.url + "?connection_ttl=7.5")
    assert isinstance(store, RedisStore)
    assert store.connection_ttl == 7.5
    assert "connection_ttl" not in store.description
    with pytest.raises(ValueError, match="connection_ttl must be positive"):
        store_from_url(redis_server.url + "?connection_ttl=0")
    with pytest.raises(ValueError, match="connection_ttl must be a number"):
        store_from_url(redis_server.url + "?connection_ttl=soon")
    asyncio.run(store.close())


def test_store_errors_carry_no_chained_traceback(free_port: Callable[[], int]) -> None:
    async def test() -> None:
        store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
        with pytest.raises(StateStoreError, match="failed during PING") as info:
            await store.ping()
        # the cause is in the message; a chain would print it three times
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__
        await store.close()

    asyncio.run(test())


# ---------------------------------------------------------------------------
# store_from_url


def test_store_from_url(redis_server: RedisServer) -> None:
    assert isinstance(store_from_url(None), MemoryStore)
    assert isinstance(store_from_url("memory://"), MemoryStore)

    async def test() -> None:
        store = store_from_url(redis_server.url, key_prefix=f"test:{uuid.uuid4().hex}:")
        assert isinstance(store, RedisStore)
        try:
            assert await store.hit("message", "192.0.2.1", T0, WINDOW) == 1
        finally:
            await store.close()

    asyncio.run(test())
    with pytest.raises(ValueError, match="unknown state store"):
        store_from_url("http://user:secret@example.org/")
    with pytest.raises(ValueError, match="unknown state store URL") as info:
        store_from_url("postgres://user:secret@example.org/")
    assert "secret" not in str(info.value)
