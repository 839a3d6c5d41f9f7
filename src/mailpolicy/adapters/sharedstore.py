"""Counters shared by the worker processes of one machine, in shared memory.

``mailpolicy serve --workers N`` runs N processes; per-client limits must
hold as with one (``--state redis://`` shares Redis instead). The parent
creates one file (in ``/dev/shm`` where there is one) and every worker maps
it: counting is a few memory reads and writes under a file lock, with no
message to another process and no wait for one. (It replaced a parent that
served the counts on a Unix socket: that round trip came before every
banner, 0.4-0.5 ms of the client's wait at one session, see
docs/performance.md.)

Layout (all integers little-endian), after a 64-byte header (magic, version,
worker columns, the two capacities, the probe length):

* the **connection table**: a 16-byte tag (a BLAKE2b digest of the client
  address) and one open-connection count per worker (``int32``). A client's
  concurrent sessions are the sum of its row. A worker that dies has its
  column zeroed by the parent (:meth:`SharedTable.release_worker`) before
  its replacement starts: a crash never leaves a client locked out.
* the **rate table**: a 16-byte tag (kind, subject and window length), the
  end of the counter's window (``float64``, seconds) and its count
  (``int64``). Windows are the fixed, aligned ones of
  :mod:`~mailpolicy.adapters.state`, so a counter whose window has ended is
  a free slot.

A key lives in the first :data:`PROBES` slots after its hash (open
addressing, no wrap-around: the tables have ``PROBES`` spare slots at their
end). Finding it is one ``mmap.find`` of its tag in that span. A new key
takes the first free slot there; when none is free, a rate counter takes the
slot of the one whose window ends first (that subject may then get a few
events more than its limit, as :class:`~mailpolicy.adapters.state.MemoryStore`
does past its ``max_entries``), and a connection that finds every slot held
by open sessions gets :class:`~mailpolicy.adapters.state.StateStoreError`:
the client hears ``421 4.3.0``, never an unchecked accept.

Every operation holds an exclusive ``flock`` on the file (released by the
kernel if a worker dies holding it) and a thread lock (``flock`` does not
exclude threads sharing one open file). Tags are written last, so a worker
killed in the middle of an update leaves at worst a counter that reads as
empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import struct
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Final

from .state import ConnectionCounts, StateStoreError, SyncStore, _check_kind, _window_start

__all__ = ["PROBES", "SharedStore", "SharedTable"]

#: slots searched for a key, from its hash on
PROBES: Final = 32

_MAGIC: Final = b"mpshm\x00\x01\x00"
_HEADER: Final = struct.Struct("<8sIIII")  # magic, workers, connections, rates, probes
_HEADER_SIZE: Final = 64
_TAG: Final = 16
_ZERO_TAG: Final = bytes(_TAG)
_RATE: Final = struct.Struct("<dq")  # window end, count
_RATE_SLOT: Final = _TAG + _RATE.size
_RATE_ROW: Final = struct.Struct(f"<{_TAG}sdq")


def _size(workers: int, connections: int, rates: int, probes: int) -> int:
    """The file's size for these columns and capacities."""
    return (
        _HEADER_SIZE + (connections + probes) * (_TAG + 4 * workers) + (rates + probes) * _RATE_SLOT
    )


def _find(mm: mmap.mmap, tag: bytes, base: int, slot: int) -> int:
    """The offset of the slot holding ``tag`` among the :data:`PROBES`
    slots of ``slot`` bytes from ``base`` on, or -1 (a match that is not at
    a slot's start is a coincidence inside another slot's numbers)."""
    end = base + PROBES * slot
    at = mm.find(tag, base, end)
    while at != -1 and (at - base) % slot:
        at = mm.find(tag, at + 1, end)
    return at


def _tag(*parts: str) -> bytes:
    tag = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=_TAG)
    digest = tag.digest()
    # the all-zero tag marks a slot never used
    return digest if digest != _ZERO_TAG else b"\x01" * _TAG


class SharedTable:
    """The mapped file: both tables and the lock. One per process."""

    def __init__(
        self,
        path: str,
        *,
        create: bool = False,
        workers: int = 1,
        connections: int = 65_536,
        rates: int = 262_144,
    ) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                if workers < 1 or connections < 1 or rates < 1:
                    raise ValueError("workers and capacities must be at least 1")
                size = _size(workers, connections, rates, PROBES)
                os.ftruncate(fd, size)  # reads as zeros: every slot unused
                mm = mmap.mmap(fd, size)
                _HEADER.pack_into(mm, 0, _MAGIC, workers, connections, rates, PROBES)
            else:
                size = os.fstat(fd).st_size
                if size < _HEADER_SIZE:
                    raise ValueError(f"{path}: not a mailpolicy shared store")
                mm = mmap.mmap(fd, size)
                magic, workers, connections, rates, probes = _HEADER.unpack_from(mm, 0)
                if (
                    magic != _MAGIC
                    or probes != PROBES
                    or size != _size(workers, connections, rates, probes)
                ):
                    mm.close()
                    raise ValueError(f"{path}: not a mailpolicy shared store of this version")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._map = mm
        self.workers = workers
        self.connections = connections
        self.rates = rates
        self._conn_slot = _TAG + 4 * workers
        self._conn_row = struct.Struct(f"<{workers}i")
        self._conn_base = _HEADER_SIZE
        self._rate_base = _HEADER_SIZE + (connections + PROBES) * self._conn_slot
        self._thread_lock = threading.Lock()
        self.closed = False

    @classmethod
    def create(cls, folder: str | None = None, *, workers: int, **capacity: int) -> SharedTable:
        """A new, empty table in a new file in ``folder`` (default:
        ``/dev/shm`` if there is one, else the temporary folder)."""
        if folder is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            folder = "/dev/shm"
        fd, path = tempfile.mkstemp(prefix="mailpolicy-state-", suffix=".shm", dir=folder)
        os.close(fd)
        os.unlink(path)  # created again below, exclusively, at its size
        return cls(path, create=True, workers=workers, **capacity)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._map.close()
            os.close(self._fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[mmap.mmap]:
        if self.closed:
            raise StateStoreError("the shared store is closed")
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield self._map
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- connections -------------------------------------------------------

    def _conn_find(self, mm: mmap.mmap, tag: bytes) -> tuple[int, int]:
        """``(offset of tag's slot or -1, first slot of its span)``."""
        size = self._conn_slot
        base = self._conn_base + (int.from_bytes(tag[:8], "little") % self.connections) * size
        return _find(mm, tag, base, size), base

    def opened(self, client: str, worker: int, now: float, window: int) -> ConnectionCounts:
        """Count a session of ``client`` opened by ``worker``: its concurrent
        sessions on every worker and the sessions it opened in the current
        ``window``, this one included in both."""
        tag = _tag("connection", client)
        row = self._conn_row
        with self.locked() as mm:
            rate = self._count(mm, "connection", client, now, window, 1)
            at, base = self._conn_find(mm, tag)
            if at == -1:
                for i in range(PROBES):
                    slot = base + i * self._conn_slot
                    if mm[slot : slot + _TAG] == _ZERO_TAG or not any(
                        row.unpack_from(mm, slot + _TAG)
                    ):
                        at = slot
                        break
                else:
                    raise StateStoreError("the shared store has no room for another client")
                row.pack_into(mm, at + _TAG, *([0] * self.workers))
                mm[at : at + _TAG] = tag
            counts = list(row.unpack_from(mm, at + _TAG))
            counts[worker] += 1
            row.pack_into(mm, at + _TAG, *counts)
            return ConnectionCounts(sum(counts), rate)

    def closed_by(self, client: str, worker: int) -> None:
        """Give back a session of ``client`` counted by :meth:`opened`."""
        tag = _tag("connection", client)
        offset = _TAG + 4 * worker
        with self.locked() as mm:
            at, _ = self._conn_find(mm, tag)
            if at != -1:
                (count,) = struct.unpack_from("<i", mm, at + offset)
                if count > 0:  # never below zero
                    struct.pack_into("<i", mm, at + offset, count - 1)

    def open_sessions(self, client: str) -> int:
        """``client``'s concurrent sessions, every worker together."""
        with self.locked() as mm:
            at, _ = self._conn_find(mm, _tag("connection", client))
            return 0 if at == -1 else sum(self._conn_row.unpack_from(mm, at + _TAG))

    def release_worker(self, worker: int) -> int:
        """Zero ``worker``'s column (it died: its sessions are gone); how
        many sessions it still held."""
        offset = _TAG + 4 * worker
        released = 0
        with self.locked() as mm:
            for i in range(self.connections + PROBES):
                at = self._conn_base + i * self._conn_slot + offset
                (count,) = struct.unpack_from("<i", mm, at)
                if count:
                    released += count
                    struct.pack_into("<i", mm, at, 0)
        return released

    # -- rates -------------------------------------------------------------

    def count(self, kind: str, subject: str, now: float, window: int, add: int) -> int:
        """Add ``add`` to the counter of ``kind`` for ``subject`` in the
        current window; its count, this one included."""
        with self.locked() as mm:
            return self._count(mm, kind, subject, now, window, add)

    def _count(
        self, mm: mmap.mmap, kind: str, subject: str, now: float, window: int, add: int
    ) -> int:
        end = float(_window_start(now, window) + window)
        tag = _tag(kind, subject, str(window))
        base = self._rate_base + (int.from_bytes(tag[:8], "little") % self.rates) * _RATE_SLOT
        at = _find(mm, tag, base, _RATE_SLOT)
        if at != -1:
            ends, count = _RATE.unpack_from(mm, at + _TAG)
            if ends == end:
                if add:
                    count += add
                    _RATE.pack_into(mm, at + _TAG, end, count)
                return int(count)
            # a window of the past: this one starts now
        elif not add:
            return 0
        else:
            # the first free slot; else the counter whose window ends first
            oldest = math.inf
            stop = base + PROBES * _RATE_SLOT
            for i, (other, ends, _) in enumerate(_RATE_ROW.iter_unpack(mm[base:stop])):
                if other == _ZERO_TAG or ends <= now:
                    at = base + i * _RATE_SLOT
                    break
                if ends < oldest:
                    oldest, at = ends, base + i * _RATE_SLOT
        _RATE.pack_into(mm, at + _TAG, end, add)
        mm[at : at + _TAG] = tag
        return add


class SharedStore(SyncStore):
    """A :class:`~mailpolicy.adapters.state.StateStore` over a
    :class:`SharedTable`, counting as worker ``worker`` (its column).

    URL: ``shared:///path/to/file?worker=N`` (what the parent of
    ``serve --workers`` gives each worker). Every call is answered at once.
    """

    def __init__(self, table: SharedTable, worker: int) -> None:
        if not 0 <= worker < table.workers:
            raise ValueError(f"worker {worker} is not one of the table's {table.workers}")
        self.table = table
        self.worker = worker

    @classmethod
    def from_url(cls, url: str) -> SharedStore:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        try:
            worker = int(query.get("worker", ["0"])[0])
        except ValueError:
            raise ValueError(f"shared store URL {url!r}: worker must be a number") from None
        try:
            table = SharedTable(parts.path)
        except OSError as e:
            raise ValueError(f"shared store {parts.path}: {e.strerror or e}") from None
        return cls(table, worker)

    def __repr__(self) -> str:
        return f"SharedStore({self.table.path!r}, worker={self.worker})"

    def opened_now(self, client: str, now: float, window: int) -> ConnectionCounts:
        return self.table.opened(client, self.worker, now, window)

    def closed_now(self, client: str) -> None:
        self.table.closed_by(client, self.worker)

    def count_now(self, kind: str, client: str, now: float, window: int, *, add: int) -> int:
        _check_kind(kind)
        return self.table.count(kind, client, now, window, add)

    async def close(self) -> None:
        self.table.close()
