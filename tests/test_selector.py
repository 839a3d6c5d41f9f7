"""adapters/selector.py: one waiter woken for a shared listening socket, and
a selector asyncio can run on like its own."""

from __future__ import annotations

import asyncio
import errno
import select
import selectors
import socket
import threading
import time

import pytest

from mailpolicy.adapters.selector import EXCLUSIVE_WAKEUP, ExclusiveEpollSelector, new_event_loop

pytestmark = pytest.mark.skipif(not EXCLUSIVE_WAKEUP, reason="needs Linux epoll")


def _woken(exclusive: bool, waiters: int = 3) -> list[bool]:
    """``waiters`` threads, each with its own selector on one listening
    socket, all waiting when one client connects: which of them woke."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    fd = listener.fileno()
    sels = [ExclusiveEpollSelector([fd] if exclusive else []) for _ in range(waiters)]
    for sel in sels:  # in this order: the first registered is asked first
        sel.register(listener, selectors.EVENT_READ)
    woke = [False] * waiters
    ready = threading.Barrier(waiters + 1)

    def wait(index: int) -> None:
        ready.wait()
        woke[index] = bool(sels[index].select(timeout=1.5))

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(waiters)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.3)  # every thread is inside epoll_wait
    client = socket.create_connection(listener.getsockname())
    for t in threads:
        t.join()
    client.close()
    for sel in sels:
        sel.close()
    listener.close()
    return woke


def test_a_shared_listening_socket_wakes_the_first_waiter_only() -> None:
    assert _woken(exclusive=True) == [True, False, False]


def test_without_exclusive_every_waiter_wakes() -> None:
    # what serve --workers would do on a plain shared socket: the contrast
    # that shows the flag reaches the kernel
    assert _woken(exclusive=False) == [True, True, True]


def test_a_busy_first_waiter_leaves_the_connection_to_the_next() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    first = ExclusiveEpollSelector([listener.fileno()])
    second = ExclusiveEpollSelector([listener.fileno()])
    first.register(listener, selectors.EVENT_READ)
    second.register(listener, selectors.EVENT_READ)
    got: list[tuple[selectors.SelectorKey, int]] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        got.extend(second.select(timeout=1.5))

    t = threading.Thread(target=wait)
    t.start()
    waiting.wait()
    time.sleep(0.3)
    # ``first`` is not waiting (its process is busy): ``second`` is woken
    client = socket.create_connection(listener.getsockname())
    t.join()
    assert [key.fileobj for key, _ in got] == [listener]
    client.close()
    for sel in (first, second):
        sel.close()
    listener.close()


def test_keys_and_errors() -> None:
    a, b = socket.socketpair()
    with ExclusiveEpollSelector([a.fileno()]) as sel:
        key = sel.register(a, selectors.EVENT_READ, "data")
        assert sel.get_key(a) is key
        assert sel.get_key(a.fileno()) is key
        assert len(sel.get_map()) == 1
        assert list(sel.get_map()) == [a.fileno()]
        with pytest.raises(KeyError, match="already registered"):
            sel.register(a, selectors.EVENT_READ)
        with pytest.raises(ValueError, match="invalid events"):
            sel.register(b, 0)
        with pytest.raises(ValueError, match="invalid file object"):
            sel.register(object(), selectors.EVENT_READ)
        with pytest.raises(KeyError, match="not registered"):
            sel.unregister(b)
        with pytest.raises(KeyError, match="not registered"):
            sel.modify(b, selectors.EVENT_READ)
        # an exclusive registration cannot be modified in the kernel: it is
        # registered again, and then waits for writing too
        key = sel.modify(a, selectors.EVENT_READ | selectors.EVENT_WRITE, "both")
        assert (key.events, key.data) == (selectors.EVENT_READ | selectors.EVENT_WRITE, "both")
        assert sel.select(0) == [(key, selectors.EVENT_WRITE)]
        b.send(b"x")
        assert sel.select(0) == [(key, selectors.EVENT_READ | selectors.EVENT_WRITE)]
        # refused before the exclusive registration is taken apart: still there
        with pytest.raises(ValueError, match="invalid events"):
            sel.modify(a, 0)
        assert sel.get_key(a) is key
        assert sel.unregister(a) is key
        assert sel.select(0) == []
    a.close()
    b.close()


def test_asyncio_runs_on_it() -> None:
    # a listening socket registered exclusively, and connections that fill
    # their send buffer (add_writer on a registered reader: modify)
    listener = socket.create_server(("127.0.0.1", 0))
    payload = b"x" * 4_000_000

    async def main() -> int:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.readexactly(len(payload))
            writer.write(data)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, sock=listener)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(payload)
        back = await reader.readexactly(len(payload))
        writer.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # a timer, through select()'s timeout
        return len(back)

    with asyncio.Runner(loop_factory=lambda: new_event_loop([listener.fileno()])) as runner:
        assert runner.run(main()) == len(payload)
        loop = runner.get_loop()
        assert isinstance(loop, asyncio.SelectorEventLoop)


class _OldKernel:
    """An epoll whose kernel predates EPOLLEXCLUSIVE (Linux < 4.5)."""

    def __init__(self) -> None:
        self.real = select.epoll()
        self.masks: list[int] = []

    def register(self, fd: int, mask: int) -> None:
        if mask & select.EPOLLEXCLUSIVE:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.masks.append(mask)
        self.real.register(fd, mask)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_a_kernel_without_the_flag_wakes_every_waiter_instead_of_failing() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    old = _OldKernel()
    with ExclusiveEpollSelector([listener.fileno()], epoll=old) as sel:
        key = sel.register(listener, selectors.EVENT_READ)
        assert old.masks == [select.EPOLLIN]
        client = socket.create_connection(listener.getsockname())
        assert sel.select(1.0) == [(key, selectors.EVENT_READ)]
        client.close()
    listener.close()


def test_other_registration_errors_are_not_hidden() -> None:
    with ExclusiveEpollSelector([12345]) as sel:  # no such descriptor is open
        with pytest.raises(OSError, match="Bad file"):
            sel.register(12345, selectors.EVENT_READ)
        assert len(sel.get_map()) == 0  # nothing recorded for it
