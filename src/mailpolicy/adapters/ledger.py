"""Which recipients already have a message: exactly-once delivery across retries.

The end of DATA gets one reply for all recipients. When some recipients were
delivered and another failed temporarily, the right reply is ``451`` (the
client keeps the message and retries), but the retry carries every recipient
again. The ledger remembers ``(message digest, recipient)`` for each delivery,
so the retry skips those already delivered: each recipient gets the message
once, and nothing is lost. Once a message gets a final answer (``250`` or
``5xx``) its entries are forgotten, so the same message sent again later (a
daily report with the same text) is delivered again.

The digest covers the envelope sender and the message as the client sent it
(not the ``Received:`` header we add, which differs per attempt). Entries
expire after ``keep_seconds`` (five days, Postfix's
``maximal_queue_lifetime``: a client gives up before then). The ledger is a
SQLite file, so it survives a restart; writes are committed before the
delivery counts as done.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["DeliveryLedger", "message_digest"]

FIVE_DAYS = 5 * 86400


def message_digest(sender: str, content: bytes) -> str:
    """The identity of a message for the ledger."""
    h = hashlib.sha256()
    h.update(sender.lower().encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(content)
    return h.hexdigest()


class DeliveryLedger:
    """A small persistent set of ``(digest, recipient)`` with expiry."""

    def __init__(
        self,
        path: str | Path,
        *,
        keep_seconds: float = FIVE_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_seconds = keep_seconds
        self.clock = clock
        self._lock = threading.Lock()
        # timeout: wait for another process's lock instead of failing at once.
        self._db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS delivered ("
            " digest TEXT NOT NULL, recipient TEXT NOT NULL, at REAL NOT NULL,"
            " PRIMARY KEY (digest, recipient))"
        )
        self._purged_at = 0.0

    def delivered(self, digest: str, recipients: Iterable[str]) -> set[str]:
        """Those of ``recipients`` that already have this message."""
        wanted = [r.lower() for r in recipients]
        if not wanted:
            return set()
        since = self.clock() - self.keep_seconds
        marks = ",".join("?" * len(wanted))
        with self._lock:
            rows = self._db.execute(
                f"SELECT recipient FROM delivered WHERE digest = ? AND at >= ?"
                f" AND recipient IN ({marks})",
                (digest, since, *wanted),
            ).fetchall()
        return {r for (r,) in rows}

    def record(self, digest: str, recipients: Iterable[str]) -> None:
        """Remember that these recipients have the message (committed on return)."""
        now = self.clock()
        rows = [(digest, r.lower(), now) for r in recipients]
        if not rows:
            return
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO delivered (digest, recipient, at) VALUES (?, ?, ?)", rows
            )
            if now - self._purged_at > 3600:
                self._db.execute("DELETE FROM delivered WHERE at < ?", (now - self.keep_seconds,))
                self._purged_at = now

    def forget(self, digest: str) -> None:
        """The message got its final answer: a later identical one is new mail."""
        with self._lock:
            self._db.execute("DELETE FROM delivered WHERE digest = ?", (digest,))

    async def forget_async(self, digest: str) -> None:
        await asyncio.to_thread(self.forget, digest)

    async def delivered_async(self, digest: str, recipients: Iterable[str]) -> set[str]:
        return await asyncio.to_thread(self.delivered, digest, list(recipients))

    async def record_async(self, digest: str, recipients: Iterable[str]) -> None:
        await asyncio.to_thread(self.record, digest, list(recipients))

    def close(self) -> None:
        with self._lock:
            self._db.close()
