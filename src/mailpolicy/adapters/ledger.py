"""Which recipients already have a message: exactly-once delivery across retries.

The end of DATA gets one reply for all recipients. When some recipients were
delivered and another failed temporarily, the right reply is ``451`` (the
client keeps the message and retries), but the retry carries every recipient
again. The ledger lets the retry skip those that already have it: each
recipient gets the message once, and nothing is lost. Once a message gets a
final answer (``250`` or ``5xx``) its entries are forgotten, so the same
message sent again later (a daily report with the same text) is delivered
again.

Write-ahead
-----------
A ledger written only after the deliveries fails exactly when it is needed:
the disk that refused the second copy also refuses the ledger's write, and the
retry duplicates the first copy (or a ``kill -9`` between two copies does).
So for a message with several recipients the gateway writes its plan first
(:meth:`DeliveryLedger.begin`): one *pending* entry per recipient, holding the
name the Maildir file will have. If that write fails nothing is delivered and
the client gets ``451``. After delivering, nothing more has to be written for
local copies: a pending entry whose file exists in the recipient's Maildir is
a delivered copy (:meth:`~.maildir.MaildirDelivery.has`), whatever happened
since. Relayed copies, which leave no file, are marked *done*
(:meth:`DeliveryLedger.record`) before a ``451``.

The digest covers the envelope sender and the message as the client sent it
(not the ``Received:`` header we add, which differs per attempt). Entries
expire after ``keep_seconds`` (five days, Postfix's
``maximal_queue_lifetime``: a client gives up before then). The ledger is a
SQLite file (by default under ``--state-dir``), so it survives a restart;
writes are committed (``synchronous=FULL``) before they return.

The file is opened lazily: a server whose disk is full still starts (single
recipient mail needs no ledger), and the ledger is retried at each use. Every
failure raises :class:`LedgerError` with the reason in one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import attrs

__all__ = ["DeliveryLedger", "LedgerEntry", "LedgerError", "message_digest"]

FIVE_DAYS = 5 * 86400

log = logging.getLogger("mailpolicy.delivery")

_T = TypeVar("_T")


class LedgerError(Exception):
    """The ledger could not be read or written (a full disk, say)."""


@attrs.frozen
class LedgerEntry:
    """What the ledger knows of one recipient of one message: ``done`` (it has
    the message), else pending, with ``name`` the Maildir file its copy was to
    be written to (``None`` for a relayed copy)."""

    done: bool
    name: str | None = None


def message_digest(sender: str, content: bytes) -> str:
    """The identity of a message for the ledger."""
    h = hashlib.sha256()
    h.update(sender.lower().encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(content)
    return h.hexdigest()


class DeliveryLedger:
    """A small persistent map ``(digest, recipient) -> entry`` with expiry."""

    def __init__(
        self,
        path: str | Path,
        *,
        keep_seconds: float = FIVE_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.keep_seconds = keep_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        # lookup_now's connection, and the lock it never waits for
        self._read_db: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._purged_at = 0.0
        self._closed = False
        try:
            with self._lock:
                self._open()
        except LedgerError as e:
            # Not fatal: mail to one recipient needs no ledger, and the next
            # message with several tries again.
            log.warning("%s; mail to several recipients gets 451 until it is writable", e)

    def __repr__(self) -> str:
        return f"DeliveryLedger({str(self.path)!r})"

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        if self._closed:
            raise LedgerError(f"delivery ledger {self.path} is closed")
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # timeout: wait for another process's lock instead of failing at once.
            db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS delivered ("
                " digest TEXT NOT NULL, recipient TEXT NOT NULL, at REAL NOT NULL,"
                " PRIMARY KEY (digest, recipient))"
            )
            columns = {row[1] for row in db.execute("PRAGMA table_info(delivered)")}
            # Ledgers written before write-ahead hold only delivered entries.
            if "done" not in columns:
                db.execute("ALTER TABLE delivered ADD COLUMN done INTEGER NOT NULL DEFAULT 1")
            if "name" not in columns:
                db.execute("ALTER TABLE delivered ADD COLUMN name TEXT")
        except (sqlite3.Error, OSError) as e:
            if db is not None:
                db.close()
            raise LedgerError(f"delivery ledger {self.path} cannot be opened: {e}") from None
        self._db = db
        return db

    def _run(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            db = self._open()
            try:
                return work(db)
            except (sqlite3.Error, OSError) as e:
                if db.in_transaction:
                    db.rollback()
                raise LedgerError(f"delivery ledger {self.path}: {what} failed: {e}") from None

    def _lookup_query(
        self, digest: str, recipients: Iterable[str]
    ) -> tuple[str, tuple[object, ...]] | None:
        wanted = sorted({r.lower() for r in recipients})
        if not wanted:
            return None
        since = self.clock() - self.keep_seconds
        marks = ",".join("?" * len(wanted))
        return (
            "SELECT recipient, done, name FROM delivered WHERE digest = ? AND at >= ?"
            f" AND recipient IN ({marks})",
            (digest, since, *wanted),
        )

    def lookup(self, digest: str, recipients: Iterable[str]) -> dict[str, LedgerEntry]:
        """The entries of those of ``recipients`` the ledger knows (lower-cased keys)."""
        query = self._lookup_query(digest, recipients)
        if query is None:
            return {}
        sql, args = query

        def work(db: sqlite3.Connection) -> dict[str, LedgerEntry]:
            rows = db.execute(sql, args).fetchall()
            return {r: LedgerEntry(bool(done), name) for r, done, name in rows}

        return self._run("reading", work)

    def lookup_now(self, digest: str, recipients: Iterable[str]) -> dict[str, LedgerEntry] | None:
        """:meth:`lookup` if it can be answered without waiting, else ``None``.

        For the event loop: a thread round trip per message cost more than
        the read itself (see docs/performance.md). It reads through its own
        connection that never waits for a lock (the ledger is in WAL mode, so
        writers do not block it; what would block, such as a recovery, makes
        it give up at once), and never creates the file. ``None`` (busy,
        not created yet, any error) means: ask :meth:`lookup_async`, which
        waits and reports errors."""
        query = self._lookup_query(digest, recipients)
        if query is None:
            return {}
        if not self._read_lock.acquire(blocking=False):
            return None
        try:
            if self._read_db is None:
                if self._closed or not self.path.exists():
                    return None
                uri = self.path.absolute().as_uri() + "?mode=rw"
                self._read_db = sqlite3.connect(
                    uri, uri=True, timeout=0, check_same_thread=False, isolation_level=None
                )
            rows = self._read_db.execute(*query).fetchall()
        except (sqlite3.Error, OSError):
            return None
        finally:
            self._read_lock.release()
        return {r: LedgerEntry(bool(done), name) for r, done, name in rows}

    def delivered(self, digest: str, recipients: Iterable[str]) -> set[str]:
        """Those of ``recipients`` marked as having this message."""
        return {r for r, entry in self.lookup(digest, recipients).items() if entry.done}

    def begin(self, digest: str, plan: Iterable[tuple[str, str | None]]) -> None:
        """Write ``(recipient, maildir file name or None)`` as pending, before
        delivering (committed on return)."""
        now = self.clock()
        rows = [(digest, r.lower(), now, name) for r, name in plan]
        if not rows:
            return

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO delivered (digest, recipient, at, done, name)"
                " VALUES (?, ?, ?, 0, ?)",
                rows,
            )
            self._purge(db, now)
            db.execute("COMMIT")

        self._run("writing the plan", work)

    def record(self, digest: str, recipients: Iterable[str]) -> None:
        """Remember that these recipients have the message (committed on return)."""
        now = self.clock()
        rows = [(digest, r.lower(), now) for r in recipients]
        if not rows:
            return

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            # An entry's file name survives being marked done.
            db.executemany(
                "INSERT INTO delivered (digest, recipient, at, done) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (digest, recipient) DO UPDATE SET done = 1, at = excluded.at",
                rows,
            )
            self._purge(db, now)
            db.execute("COMMIT")

        self._run("recording deliveries", work)

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._purged_at > 3600:
            db.execute("DELETE FROM delivered WHERE at < ?", (now - self.keep_seconds,))
            self._purged_at = now

    def forget(self, digest: str) -> None:
        """The message got its final answer: a later identical one is new mail.

        Not fsynced: the forget happens between the last delivery and our
        ``250``, and a crash there makes the client send the message again
        (the RFC 1047 window), so that window is kept as short as a write.
        A machine crash may bring the entries back; they then only cost a
        later identical message (same sender and bytes) within
        ``keep_seconds``."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                db.execute("DELETE FROM delivered WHERE digest = ?", (digest,))
            finally:
                db.execute("PRAGMA synchronous=FULL")

        self._run("forgetting a message", work)

    async def lookup_async(self, digest: str, recipients: Iterable[str]) -> dict[str, LedgerEntry]:
        return await asyncio.to_thread(self.lookup, digest, list(recipients))

    async def begin_async(self, digest: str, plan: Iterable[tuple[str, str | None]]) -> None:
        await asyncio.to_thread(self.begin, digest, list(plan))

    async def forget_async(self, digest: str) -> None:
        await asyncio.to_thread(self.forget, digest)

    async def delivered_async(self, digest: str, recipients: Iterable[str]) -> set[str]:
        return await asyncio.to_thread(self.delivered, digest, list(recipients))

    async def record_async(self, digest: str, recipients: Iterable[str]) -> None:
        await asyncio.to_thread(self.record, digest, list(recipients))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None
        with self._read_lock:
            if self._read_db is not None:
                self._read_db.close()
                self._read_db = None
