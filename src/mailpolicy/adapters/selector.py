"""An epoll selector that can wake one process only for a shared listening socket.

``serve --workers N`` hands one listening socket to every worker. With a
plain epoll registration, a new connection wakes every worker waiting on
it; one accepts, the others find nothing. With ``EPOLLEXCLUSIVE`` (Linux
4.5) the kernel wakes one worker that is waiting, and the first that
registered is asked first: while the server is quiet, connection after
connection goes to the same worker, whose caches are warm; when it is
busy (not waiting in ``epoll_wait``), the next one that waits gets the
connection, so the load still spreads over the workers (see
``docs/performance.md``, "Eighth pass").

asyncio's own :class:`selectors.EpollSelector` offers no way to pass that
flag, so this module owns the layer: :class:`ExclusiveEpollSelector` is a
complete :class:`selectors.BaseSelector` on :func:`select.epoll`, which
registers the descriptors named in ``exclusive`` with ``EPOLLEXCLUSIVE``
and every other one as asyncio's does. :func:`new_event_loop` makes a
:class:`asyncio.SelectorEventLoop` on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import select
import selectors
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["EXCLUSIVE_WAKEUP", "ExclusiveEpollSelector", "new_event_loop"]

#: whether this system can wake one waiter only (Linux 4.5 and later)
EXCLUSIVE_WAKEUP = hasattr(select, "epoll") and hasattr(select, "EPOLLEXCLUSIVE")


def _check_events(events: int) -> None:
    if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
        raise ValueError(f"invalid events: {events!r}")


def _fd_of(fileobj: Any) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


class _Keys(Mapping[Any, selectors.SelectorKey]):
    """``get_map()``: the keys by file object or descriptor, read-only."""

    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            return self._keys[_fd_of(fileobj)]
        except ValueError:
            raise KeyError(fileobj) from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)


class ExclusiveEpollSelector(selectors.BaseSelector):
    """:class:`selectors.BaseSelector` on epoll; the descriptors in
    ``exclusive`` are registered for reading with ``EPOLLEXCLUSIVE``.

    Such a registration cannot be modified in place (the kernel refuses
    ``EPOLL_CTL_MOD``), so a change of its events is an unregister and a
    register; a listening socket is only ever read, so that never happens
    in ``serve``.
    """

    def __init__(self, exclusive: Iterable[int] = (), *, epoll: Any = None) -> None:
        #: the poller (``select.epoll()`` unless another object with its
        #: methods is given, as tests do)
        self._epoll = select.epoll() if epoll is None else epoll
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._map = _Keys(self._keys)
        self.exclusive = frozenset(exclusive)
        if self.exclusive and not EXCLUSIVE_WAKEUP:
            raise ValueError("this system has no EPOLLEXCLUSIVE")

    def _mask(self, fd: int, events: int) -> int:
        mask = 0
        if events & selectors.EVENT_READ:
            mask |= select.EPOLLIN
        if events & selectors.EVENT_WRITE:
            mask |= select.EPOLLOUT
        if fd in self.exclusive and events == selectors.EVENT_READ:
            mask |= select.EPOLLEXCLUSIVE
        return mask

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        _check_events(events)
        fd = _fd_of(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        mask = self._mask(fd, events)
        try:
            self._epoll.register(fd, mask)
        except OSError as e:
            # A kernel older than its headers (before 4.5) refuses the flag:
            # every waiter is woken then, which is still correct.
            if e.errno != errno.EINVAL or not mask & select.EPOLLEXCLUSIVE:
                raise
            self._epoll.register(fd, mask & ~select.EPOLLEXCLUSIVE)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        # closed before it was unregistered: the kernel dropped it already
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = _fd_of(fileobj)
        try:
            key = self._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        _check_events(events)  # before an exclusive registration is taken apart below
        if events == key.events:
            if data is key.data:
                return key
            key = key._replace(data=data)
            self._keys[fd] = key
            return key
        if fd in self.exclusive:
            self.unregister(fileobj)
            return self.register(fileobj, events, data)
        self._epoll.modify(fd, self._mask(fd, events))
        key = key._replace(events=events, data=data)
        self._keys[fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            wait = -1.0
        elif timeout <= 0:
            wait = 0.0
        else:
            # whole milliseconds, rounded up, as the kernel counts them: a
            # timer due in 0.4 ms must not make a busy loop of zero waits
            wait = math.ceil(timeout * 1e3) * 1e-3
        try:
            fired = self._epoll.poll(wait, max(len(self._keys), 1))
        except InterruptedError:
            return []
        ready = []
        for fd, mask in fired:
            key = self._keys.get(fd)
            if key is None:
                continue
            events = 0
            if mask & ~select.EPOLLIN:  # out, error, hang-up: the writer runs
                events |= selectors.EVENT_WRITE
            if mask & ~select.EPOLLOUT:  # in, error, hang-up: the reader runs
                events |= selectors.EVENT_READ
            ready.append((key, events & key.events))
        return ready

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()
        self._keys.clear()


def new_event_loop(exclusive: Iterable[int]) -> asyncio.AbstractEventLoop:
    """An asyncio event loop whose selector registers the descriptors of
    ``exclusive`` (listening sockets shared with other processes) with
    ``EPOLLEXCLUSIVE``."""
    return asyncio.SelectorEventLoop(ExclusiveEpollSelector(exclusive))
