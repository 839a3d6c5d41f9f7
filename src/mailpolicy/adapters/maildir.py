"""Local delivery into one Maildir per recipient address, without losing mail.

Theory of operation
-------------------
The server answers ``250`` to the end of DATA only after :meth:`MaildirDelivery.deliver`
has returned, so everything this module does is aimed at one promise: when
``deliver`` returns, the message is on stable storage under ``new/``; when it
raises, nothing was delivered and the caller answers ``4xx`` so the client
keeps the message and retries.

The Maildir protocol gives exactly that:

1. write the message to ``tmp/`` under a name no other delivery can pick,
2. ``fsync`` the file, so its bytes are on disk before its name is published,
3. ``rename`` it into ``new/`` (atomic: a reader sees the whole message or none),
4. ``fsync`` the ``new/`` directory, so the rename itself survives a crash.

Directories created on demand are fsynced into their parents too: a crash
must not take away the ``new/`` folder a message was just renamed into.

On any error the file in ``tmp/`` is removed and the exception propagates. If
only the final directory ``fsync`` fails, the message is also taken back out of
``new/`` (best effort) before raising: the client will send it again, and a
copy we could not make durable is better withdrawn than duplicated.

The folder of a recipient is its address, lower-cased and made safe for a file
name by :func:`mailbox_name`: characters outside a small safe set are
percent-escaped (``%`` itself included, so two addresses never share a
folder), and a leading dot is escaped, so a name is never ``.``, ``..``, hidden,
or a path with a separator. An address can never escape the root.

Messages are written byte for byte as given. Maildir readers expect ``\\n``
line ends; converting the SMTP ``\\r\\n`` and adding the ``Return-Path:`` and
``Delivered-To:`` headers (:func:`delivery_headers`) is the caller's job, done
before calling.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

__all__ = [
    "DeliveryOutcome",
    "MaildirDelivery",
    "delivery_headers",
    "mailbox_name",
]

# Characters kept as they are in a folder name. Everything else, ``%``
# included, is written as ``%XX`` per UTF-8 byte, which keeps the mapping
# one-to-one: distinct addresses never land in the same folder.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789@._+-=")

# NAME_MAX on every filesystem we care about.
_MAX_NAME_BYTES = 255

_DIR_MODE = 0o700
_FILE_MODE = 0o600


def mailbox_name(address: str) -> str:
    """The folder name of ``address``: lower-cased, every unsafe byte escaped.

    Raises :class:`ValueError` for an empty address or one whose escaped form is
    too long for a file name. That is a permanent property of the address, so a
    server can call this at RCPT time and refuse it with a ``5xx`` then.
    """
    if not address:
        raise ValueError("empty recipient address has no mailbox")
    out: list[str] = []
    for index, char in enumerate(address.lower()):
        if char in _SAFE and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    name = "".join(out)
    if len(name.encode("ascii")) > _MAX_NAME_BYTES:
        raise ValueError(f"recipient address is too long for a mailbox name: {address[:64]!r}...")
    return name


def delivery_headers(sender: str, recipient: str, original: str | None = None) -> bytes:
    """The trace headers a final delivery puts on top, as Postfix's local and
    virtual agents write them: ``Return-Path: <sender>`` (``<>`` for the null
    sender), ``X-Original-To: original`` when the recipient was rewritten (an
    external postmaster), ``Delivered-To: recipient``. CRLF line ends."""

    def clean(value: str) -> str:
        # An address never holds a line break; a header must not either.
        return value.replace("\r", "").replace("\n", "")

    lines = [f"Return-Path: <{clean(sender)}>"]
    if original is not None and original.lower() != recipient.lower():
        lines.append(f"X-Original-To: {clean(original)}")
    lines.append(f"Delivered-To: {clean(recipient)}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def _hostname_part() -> str:
    # Maildir names use the host name as their last component; "/" and ":"
    # would break the path or the ":2,flags" info suffix, so they are encoded
    # as the Maildir specification says.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


@attrs.frozen
class DeliveryOutcome:
    """What happened to one recipient's copy in :meth:`MaildirDelivery.deliver_many`.

    Exactly one of ``path`` (the file in ``new/``) and ``error`` is set.
    """

    recipient: str
    path: Path | None = None
    error: Exception | None = attrs.field(default=None, eq=False)

    @property
    def ok(self) -> bool:
        return self.error is None


class MaildirDelivery:
    """Deliver messages into ``root/<mailbox_name(recipient)>/{tmp,new,cur}``.

    The folders are created on demand (mode ``0700``, files ``0600``: mail is
    private). One instance can be shared by threads and by the event loop.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._host = _hostname_part()
        self._root = str(self.root)
        # Maildirs seen complete; a write that finds one gone makes sure again
        self._ready: set[str] = set()
        self._committer = _Committer(self)
        #: Asked at each :meth:`deliver_async`: when it returns true, the copy
        #: is written on the calling thread instead. ``serve`` sets it to
        #: "this is the only session open": then nothing else could run on
        #: the event loop meanwhile, and the thread round trip only adds
        #: latency and CPU (waking a thread, the GIL handed over and back).
        self.write_inline: Callable[[], bool] | None = None

    def __repr__(self) -> str:
        return f"MaildirDelivery({str(self.root)!r})"

    def maildir(self, recipient: str) -> Path:
        """The Maildir of ``recipient`` (not created)."""
        return Path(self._maildir_path(recipient))

    def deliver(self, recipient: str, message: bytes, *, name: str | None = None) -> Path:
        """Write ``message`` to the Maildir of ``recipient``; return its path in ``new/``.

        Returns only once the message and its directory entry are on stable
        storage. Raises (``OSError``, or ``ValueError`` for an address that
        cannot be a mailbox) with nothing left behind in ``tmp/`` or ``new/``.
        ``name`` is the file name to use, from :meth:`new_name` (chosen ahead
        so that a ledger can say where the copy will be, see :meth:`has`).
        """
        job = _Job(recipient, message, name)
        self._write_batch((job,))
        if job.error is not None:
            raise job.error
        return Path(job.new)

    async def deliver_async(
        self, recipient: str, message: bytes, *, name: str | None = None
    ) -> Path:
        """:meth:`deliver` off the event loop, so the loop never waits on a disk.

        The copies of concurrent calls are written by a few threads, a batch at
        a time: each file is written and fsynced and renamed into ``new/`` as
        :meth:`deliver` does, then each ``new/`` folder of the batch is fsynced
        once, and the batch's callers are woken together. Each caller still
        returns only when its own copy and its directory entry are on disk
        (and gets its own error); what is shared is the folder fsync and the
        wake-up, which is where the time went when every copy took its own
        thread round trip (see docs/performance.md).

        Cancelling the awaiting task does not stop a write already queued; it
        completes (or cleans up) in its thread. When :attr:`write_inline`
        says so, the copy is written by :meth:`deliver` on the spot.
        """
        inline = self.write_inline
        if inline is not None and inline():
            return self.deliver(recipient, message, name=name)
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        job = _Job(recipient, message, name, written)
        self._committer.submit(job)
        await written
        return Path(job.new)

    def deliver_many(
        self, recipients: Iterable[str], message: bytes
    ) -> tuple[DeliveryOutcome, ...]:
        """Deliver one copy per recipient; each copy succeeds or fails on its own.

        Copies are independent files in independent folders, so there is no
        all-or-nothing: a full disk for one mailbox must not undo a copy
        already safe in another (the client would then retry and duplicate
        it). The result has one outcome per distinct mailbox, in order;
        recipients naming the same mailbox (differing only in case) get one
        copy and share its outcome, as Postfix suppresses duplicate recipients.
        Never raises for a single recipient's failure; the caller decides
        the reply from the outcomes.
        """
        done: dict[str, DeliveryOutcome] = {}
        out: list[DeliveryOutcome] = []
        for recipient in recipients:
            try:
                key = mailbox_name(recipient)
            except ValueError as exc:
                out.append(DeliveryOutcome(recipient, error=exc))
                continue
            if key in done:
                out.append(attrs.evolve(done[key], recipient=recipient))
                continue
            try:
                outcome = DeliveryOutcome(recipient, path=self.deliver(recipient, message))
            except Exception as exc:
                outcome = DeliveryOutcome(recipient, error=exc)
            done[key] = outcome
            out.append(outcome)
        return tuple(out)

    async def deliver_many_async(
        self, recipients: Iterable[str], message: bytes
    ) -> tuple[DeliveryOutcome, ...]:
        """:meth:`deliver_many` in a worker thread."""
        return await asyncio.to_thread(self.deliver_many, tuple(recipients), message)

    # -- internals -----------------------------------------------------------

    def has(self, recipient: str, name: str) -> bool:
        """Whether the copy written as ``name`` is in the Maildir of
        ``recipient``: in ``new/``, or in ``cur/`` once a reader has seen it
        (``name:2,FLAGS``)."""
        maildir = self.maildir(recipient)
        if (maildir / "new" / name).exists():
            return True
        # Only a retry after a failure gets here; cur/ has to be listed because
        # readers append flags of their own to the name.
        try:
            with os.scandir(maildir / "cur") as entries:
                return any(e.name == name or e.name.startswith(name + ":") for e in entries)
        except FileNotFoundError:
            return False

    def new_name(self) -> str:
        """A file name no other delivery picks (the Maildir convention)."""
        return self._unique_name()

    def _unique_name(self) -> str:
        # The classic "time.M<usec>P<pid>.host" name, plus a per-process
        # counter (two deliveries in the same microsecond) and random bits
        # (a reused pid after a restart, or a clock stepping backwards).
        now = time.time_ns() // 1000
        seconds, usec = divmod(now, 1_000_000)
        with self._lock:
            count = next(self._counter)
        return f"{seconds}.M{usec}P{os.getpid()}Q{count}R{secrets.token_hex(4)}.{self._host}"

    def _maildir_path(self, recipient: str) -> str:
        # maildir() as a string: pathlib costs more than the write on this path
        name = mailbox_name(recipient)
        # mailbox_name cannot produce a separator, "." or ".."; checking the
        # result anyway keeps that promise local and visible.
        if name in (".", "..") or "/" in name or "\0" in name:
            raise ValueError(f"recipient address escapes the maildir root: {recipient!r}")
        return os.path.join(self._root, name)

    def _write_batch(self, jobs: Iterable[_Job]) -> None:
        """Write each job's copy (its ``new`` path or its ``error`` set), then
        fsync each ``new/`` folder once; a copy whose folder cannot be
        synced is taken back out and gets that error."""
        synced: dict[str, list[_Job]] = {}
        for job in jobs:
            try:
                job.new = self._write_one(job)
            except BaseException as exc:
                job.error = exc
            else:
                synced.setdefault(os.path.dirname(job.new), []).append(job)
        for folder, done in synced.items():
            try:
                _fsync_dir(folder)
            except BaseException as exc:
                for job in done:
                    _unlink_quietly(job.new)
                    job.error = exc

    def _write_one(self, job: _Job) -> str:
        maildir = self._maildir_path(job.recipient)
        name = job.name
        if name is None:
            name = self.new_name()
        elif "/" in name or name in ("", ".", "..") or ":" in name:
            raise ValueError(f"not a Maildir file name: {name!r}")
        tmp = os.path.join(maildir, "tmp", name)
        new = os.path.join(maildir, "new", name)
        if maildir not in self._ready:
            self._ensure(Path(maildir))
            self._ready.add(maildir)
        # O_EXCL: never write into (or later remove) a file someone else
        # created under our name; if it exists, this raises before we own it.
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, _FILE_MODE)
        except FileNotFoundError:
            # the Maildir went away since we last made sure of it
            self._ready.discard(maildir)
            self._ensure(Path(maildir))
            self._ready.add(maildir)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, _FILE_MODE)
        try:
            try:
                view = memoryview(job.message)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, new)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return new

    def _ensure(self, maildir: Path) -> None:
        if all((maildir / sub).is_dir() for sub in ("tmp", "new", "cur")):
            return
        _make_dir(self.root, sync_parent=True, parents=True)
        _make_dir(maildir, sync_parent=True)
        for sub in ("tmp", "new", "cur"):
            _make_dir(maildir / sub, sync_parent=False)
        # One fsync of the maildir publishes all three sub-folders.
        _fsync_dir(maildir)


class _Job:
    """One copy for :meth:`MaildirDelivery._write_batch`: what to write, and
    afterwards where it went or why not."""

    __slots__ = ("error", "future", "message", "name", "new", "recipient")

    def __init__(
        self,
        recipient: str,
        message: bytes,
        name: str | None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        self.recipient = recipient
        self.message = message
        self.name = name
        self.future = future
        self.new = ""
        self.error: BaseException | None = None


class _Committer:
    """The threads behind :meth:`MaildirDelivery.deliver_async`.

    A thread takes up to ``BATCH`` queued copies, writes them, and wakes each
    waiting event loop once for the batch. While it waits on the disk, the
    copies queued meanwhile go to another thread (up to ``MAX_THREADS``), so
    fsyncs still overlap, which the filesystem's journal commits together:
    one thread doing every copy in turn halved the messages per second. A
    thread stops after a second with nothing to do."""

    BATCH = 4
    MAX_THREADS = 8
    IDLE_SECONDS = 1.0

    def __init__(self, maildir: MaildirDelivery) -> None:
        self._maildir = maildir
        # a C queue: handing a copy over costs the event loop one put
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        #: threads waiting for a copy (a new thread counts from its start)
        self._idle = 0

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)
        with self._lock:
            if self._idle == 0 and self._threads < self.MAX_THREADS:
                self._threads += 1
                self._idle += 1
                threading.Thread(target=self._run, name="maildir-writer", daemon=True).start()
            # else: a waiting thread takes it, or a busy one with its next batch

    def _run(self) -> None:
        while True:
            try:
                first = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # under the lock, so that a copy queued meanwhile either
                    # is seen here or sees this thread gone and starts one
                    if self._jobs.empty():
                        self._threads -= 1
                        self._idle -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.BATCH:
                    batch.append(self._jobs.get_nowait())
            self._maildir._write_batch(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
            for job in batch:
                if job.future is not None:
                    by_loop.setdefault(job.future.get_loop(), []).append(job)
            for loop, jobs in by_loop.items():
                # a closed loop (RuntimeError) has nobody waiting any more
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, jobs)
            with self._lock:
                self._idle += 1


def _settle(jobs: list[_Job]) -> None:
    for job in jobs:
        future = job.future
        if future is None or future.done():  # the caller was cancelled
            continue
        if job.error is None:
            future.set_result(None)
        else:
            future.set_exception(job.error)


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _make_dir(path: Path, *, sync_parent: bool, parents: bool = False) -> None:
    try:
        path.mkdir(mode=_DIR_MODE, parents=parents)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    if sync_parent:
        _fsync_dir(path.parent)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory at all (EINVAL); their
        # renames are as durable as they get without it.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        # The original error is the one worth reporting; a leftover in tmp/
        # is harmless (Maildir readers ignore tmp/, and it is never renamed).
        pass
