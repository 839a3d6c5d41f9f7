"""The shared-memory store of ``serve --workers`` (adapters/sharedstore.py):
tables in one mapped file, used by several processes at once."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpolicy.adapters.sharedstore import PROBES, SharedStore, SharedTable
from mailpolicy.adapters.state import ConnectionCounts, MemoryStore, StateStoreError, store_from_url


@pytest.fixture
def table(tmp_path: Path) -> SharedTable:
    return SharedTable.create(str(tmp_path), workers=2)


def worker(table: SharedTable, n: int) -> SharedStore:
    """Worker ``n``'s store, through its own mapping of the file (as a worker
    process has)."""
    return SharedStore(SharedTable(table.path), n)


def test_sessions_of_one_client_add_up_across_workers(table: SharedTable) -> None:
    a, b = worker(table, 0), worker(table, 1)
    assert a.opened_now("192.0.2.1", 1000.0, 60) == ConnectionCounts(1, 1)
    assert b.opened_now("192.0.2.1", 1001.0, 60) == ConnectionCounts(2, 2)
    assert a.opened_now("192.0.2.1", 1002.0, 60) == ConnectionCounts(3, 3)
    assert b.opened_now("192.0.2.9", 1002.0, 60) == ConnectionCounts(1, 1)
    b.closed_now("192.0.2.1")
    b.closed_now("192.0.2.1")  # one too many: never below zero, a's stay
    assert table.open_sessions("192.0.2.1") == 2
    # the rate counts openings in the window; closing gives none back
    assert a.opened_now("192.0.2.1", 1003.0, 60) == ConnectionCounts(3, 4)
    # the next window (aligned on multiples of 60 s) starts again
    assert a.opened_now("192.0.2.1", 1020.0, 60) == ConnectionCounts(4, 1)


def test_a_dead_workers_sessions_are_given_back(table: SharedTable) -> None:
    a, b = worker(table, 0), worker(table, 1)
    for _ in range(3):
        a.opened_now("192.0.2.1", 0.0, 60)
    b.opened_now("192.0.2.1", 0.0, 60)
    a.opened_now("192.0.2.2", 0.0, 60)
    assert table.release_worker(0) == 4
    assert table.open_sessions("192.0.2.1") == 1
    assert table.open_sessions("192.0.2.2") == 0
    assert b.opened_now("192.0.2.1", 0.0, 60) == ConnectionCounts(2, 5)


def test_rate_counters_by_kind_subject_and_window(table: SharedTable) -> None:
    a, b = worker(table, 0), worker(table, 1)
    assert asyncio.run(a.peek("message", "192.0.2.1", 10.0, 60)) == 0
    assert asyncio.run(a.hit("message", "192.0.2.1", 10.0, 60)) == 1
    assert asyncio.run(b.hit("message", "192.0.2.1", 59.0, 60)) == 2
    assert asyncio.run(b.peek("message", "192.0.2.1", 59.5, 60)) == 2
    assert asyncio.run(a.hit("recipient", "192.0.2.1", 10.0, 60)) == 1
    assert asyncio.run(a.hit("message", "192.0.2.1", 10.0, 3600)) == 1
    assert asyncio.run(a.hit("message", "192.0.2.2", 10.0, 60)) == 1
    assert asyncio.run(a.peek("message", "192.0.2.1", 60.0, 60)) == 0  # a new window
    assert asyncio.run(a.hit("message", "192.0.2.1", 60.0, 60)) == 1
    with pytest.raises(ValueError, match="unknown counter kind 'messages'"):
        a.count_now("messages", "192.0.2.1", 10.0, 60, add=1)
    with pytest.raises(ValueError, match="rate window must be positive"):
        a.count_now("message", "192.0.2.1", 10.0, 0, add=1)


def test_a_full_span_of_open_sessions_is_a_store_error(tmp_path: Path) -> None:
    # one slot: every client's span is the same PROBES slots
    store = SharedStore(SharedTable.create(str(tmp_path), workers=1, connections=1), 0)
    for i in range(PROBES):
        assert store.opened_now(f"10.0.0.{i}", 0.0, 60).concurrent == 1
    with pytest.raises(StateStoreError, match="no room for another client"):
        store.opened_now("10.0.1.1", 0.0, 60)
    store.closed_now("10.0.0.5")  # a slot whose sessions are all gone is free again
    assert store.opened_now("10.0.1.1", 0.0, 60).concurrent == 1
    assert store.opened_now("10.0.0.6", 0.0, 60).concurrent == 2


def test_a_full_span_of_rate_counters_forgets_the_oldest_window(tmp_path: Path) -> None:
    store = SharedStore(SharedTable.create(str(tmp_path), workers=1, rates=1), 0)
    store.count_now("message", "old", 0.0, 60, add=1)  # ends at 60
    for i in range(PROBES - 1):
        store.count_now("message", f"s{i}", 30.0, 3600, add=1)  # end at 3600
    assert store.count_now("message", "new", 30.0, 3600, add=1) == 1
    assert store.count_now("message", "old", 30.0, 60, add=0) == 0  # its slot was taken
    assert store.count_now("message", "s0", 30.0, 3600, add=0) == 1
    # counters whose window has ended are free slots
    for i in range(PROBES):
        assert store.count_now("recipient", f"t{i}", 7200.0, 60, add=1) == 1


def test_what_is_not_a_store_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a mailpolicy shared store of this version"):
        SharedTable(str(other))
    (tmp_path / "short").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a mailpolicy shared store"):
        SharedTable(str(tmp_path / "short"))
    with pytest.raises(ValueError, match="No such file or directory"):
        store_from_url(f"shared://{tmp_path}/missing?worker=0")


def test_store_from_url_and_the_worker_column(table: SharedTable) -> None:
    store = store_from_url(f"shared://{table.path}?worker=1")
    assert isinstance(store, SharedStore) and store.worker == 1
    with pytest.raises(ValueError, match="worker 2 is not one of the table's 2"):
        store_from_url(f"shared://{table.path}?worker=2")
    with pytest.raises(ValueError, match="worker must be a number"):
        store_from_url(f"shared://{table.path}?worker=x")
    asyncio.run(store.close())
    with pytest.raises(StateStoreError, match="closed"):
        store.opened_now("192.0.2.1", 0.0, 60)


def _open_many(path: str, column: int, clients: int, times: int) -> None:
    store = SharedStore(SharedTable(path), column)
    for _ in range(times):
        for c in range(clients):
            store.opened_now(f"198.51.100.{c}", 5.0, 60)
            store.count_now("message", f"198.51.100.{c}", 5.0, 60, add=1)


def test_processes_counting_at_once_lose_no_count(tmp_path: Path) -> None:
    table = SharedTable.create(str(tmp_path), workers=4)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_open_many, args=(table.path, n, 5, 200)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = SharedStore(table, 0)
    for c in range(5):
        assert table.open_sessions(f"198.51.100.{c}") == 800
        assert store.count_now("message", f"198.51.100.{c}", 5.0, 60, add=0) == 800
        assert store.count_now("connection", f"198.51.100.{c}", 5.0, 60, add=0) == 800


operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "close", "hit", "peek"]),
        st.integers(0, 1),  # worker
        st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"]),
        st.sampled_from(["message", "recipient", "auth_failure"]),
        st.integers(0, 400),  # seconds
        st.sampled_from([60, 3600]),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_two_workers_count_as_one_memory_store(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, str, str, int, int]]
) -> None:
    table = SharedTable.create(str(tmp_path_factory.mktemp("shm")), workers=2)
    stores = [SharedStore(table, 0), SharedStore(SharedTable(table.path), 1)]
    model = MemoryStore()
    opened: dict[tuple[int, str], int] = {}
    now = 0.0
    for op, n, client, kind, step, window in ops:
        now += step
        if op == "open":
            got = stores[n].opened_now(client, now, window)
            assert got == model.opened_now(client, now, window)
            opened[(n, client)] = opened.get((n, client), 0) + 1
        elif op == "close":
            # a worker closes only sessions it opened (the driver's contract)
            if opened.get((n, client), 0) > 0:
                opened[(n, client)] -= 1
                stores[n].closed_now(client)
                model.closed_now(client)
        else:
            add = 1 if op == "hit" else 0
            got_count = stores[n].count_now(kind, client, now, window, add=add)
            assert got_count == model.count_now(kind, client, now, window, add=add)
