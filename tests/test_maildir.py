"""Local delivery: real files in a temporary directory."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailpolicy.adapters.maildir import MaildirDelivery, mailbox_name

MESSAGE = b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n.line\r\n\x00\xff end\r\n"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_delivery_creates_maildir_and_writes_exact_bytes(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path / "maildir")
    path = delivery.deliver("Bob@Example.COM", MESSAGE)

    box = tmp_path / "maildir" / "bob@example.com"
    assert {p.name for p in box.iterdir()} == {"tmp", "new", "cur"}
    assert path.parent == box / "new"
    assert path.read_bytes() == MESSAGE
    assert list((box / "tmp").iterdir()) == []
    assert list((box / "cur").iterdir()) == []
    # Private mail: only the owner may read it.
    assert path.stat().st_mode & 0o077 == 0
    assert box.stat().st_mode & 0o077 == 0


def test_same_address_any_case_is_one_mailbox(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    first = delivery.deliver("Alice@Example.org", b"1")
    second = delivery.deliver("alice@example.ORG", b"2")
    assert first.parent == second.parent
    assert first != second
    assert sorted(p.read_bytes() for p in first.parent.iterdir()) == [b"1", b"2"]


def test_unique_names_under_concurrency(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    bodies = [f"message {i}\n".encode() for i in range(400)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        paths = list(pool.map(lambda body: delivery.deliver("x@example.org", body), bodies))

    assert len(set(paths)) == len(bodies)
    new = tmp_path / "x@example.org" / "new"
    assert sorted(p.read_bytes() for p in new.iterdir()) == sorted(bodies)
    assert list((tmp_path / "x@example.org" / "tmp").iterdir()) == []


def test_deliver_async_does_not_block_the_loop(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)

    async def main() -> list[Path]:
        return await asyncio.gather(
            *(delivery.deliver_async(f"u{i}@example.org", MESSAGE) for i in range(20))
        )

    paths = asyncio.run(main())
    assert len(paths) == 20
    assert all(p.read_bytes() == MESSAGE for p in paths)


def test_write_inline_decides_which_thread_writes(
    tmp_path: Path, fsyncs_by_thread: list[str]
) -> None:
    delivery = MaildirDelivery(tmp_path)
    synced_by = fsyncs_by_thread
    alone = [True]
    delivery.write_inline = lambda: alone[0]

    async def main() -> tuple[Path, list[str], Path]:
        inline = await delivery.deliver_async("a@x.org", MESSAGE)
        seen = list(synced_by)
        synced_by.clear()
        alone[0] = False
        threaded = await delivery.deliver_async("a@x.org", MESSAGE)
        return inline, seen, threaded

    inline, seen_inline, threaded = asyncio.run(main())
    assert inline.read_bytes() == threaded.read_bytes() == MESSAGE
    assert inline != threaded
    # the file, its new/ folder (and the new Maildir's folders) on this thread
    assert len(seen_inline) >= 2
    assert set(seen_inline) == {threading.current_thread().name}
    assert synced_by == ["maildir-writer", "maildir-writer"]


def test_an_inline_write_fails_as_a_threaded_one(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    delivery.write_inline = lambda: True
    with pytest.raises(ValueError, match="too long for a mailbox name"):
        asyncio.run(delivery.deliver_async("a" * 300 + "@example.org", MESSAGE))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "address",
    [
        "../../escape@example.org",
        "../escape",
        "..",
        ".",
        "/etc/passwd",
        "a/../../b@example.org",
        "a\x00b@example.org",
        ".hidden@example.org",
        "back\\slash@example.org",
        "~root",
        "spaces and\ttabs@example.org",
        "ünïcødé@exämple.org",
        "%2e%2e",
    ],
)
def test_hostile_addresses_stay_inside_the_root(tmp_path: Path, address: str) -> None:
    root = tmp_path / "root"
    delivery = MaildirDelivery(root)
    path = delivery.deliver(address, b"x")

    box = path.parent.parent
    assert box.parent == root
    assert path.resolve().is_relative_to(root.resolve())
    assert not box.name.startswith(".")
    assert "/" not in box.name and "\x00" not in box.name
    # Nothing was written anywhere but under the root.
    assert [p for p in files_under(tmp_path) if not p.is_relative_to(root)] == []


def test_escaping_is_one_to_one() -> None:
    addresses = ["a/b@x", "a%2fb@x", ".a@x", "%2ea@x", "a b@x", "a%20b@x", "a@x"]
    names = [mailbox_name(a) for a in addresses]
    assert len(set(names)) == len(names)
    # Only case folds together, "%" included as any other character.
    assert mailbox_name("A%2Fb@X") == mailbox_name("a%2fb@x")
    assert mailbox_name("plain.user+tag@example.org") == "plain.user+tag@example.org"


def test_unusable_addresses_are_refused(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    with pytest.raises(ValueError, match="empty recipient address"):
        delivery.deliver("", b"x")
    with pytest.raises(ValueError, match="too long for a mailbox name"):
        delivery.deliver("/" * 200 + "@example.org", b"x")
    assert files_under(tmp_path) == []


def test_deliver_many_is_independent_per_recipient(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    outcomes = delivery.deliver_many(["a@x.org", "", "B@x.org", "b@X.org"], MESSAGE)

    assert [o.recipient for o in outcomes] == ["a@x.org", "", "B@x.org", "b@X.org"]
    assert [o.ok for o in outcomes] == [True, False, True, True]
    assert isinstance(outcomes[1].error, ValueError)
    # Two spellings of one mailbox: one copy, shared outcome.
    assert outcomes[2].path == outcomes[3].path
    assert len(list((tmp_path / "b@x.org" / "new").iterdir())) == 1
    assert outcomes[0].path is not None and outcomes[0].path.read_bytes() == MESSAGE


def test_deliver_many_async(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    outcomes = asyncio.run(delivery.deliver_many_async(["a@x.org", "b@x.org"], b"m"))
    assert all(o.ok for o in outcomes)


# ---------------------------------------------------------------------------
# Failures leave nothing behind


def assert_nothing_delivered(root: Path, address: str) -> None:
    box = root / mailbox_name(address)
    for sub in ("tmp", "new", "cur"):
        folder = box / sub
        assert not folder.exists() or list(folder.iterdir()) == [], sub


def test_write_failure_removes_tmp_file(tmp_path: Path) -> None:
    # A real write error from the kernel: a file size limit makes write()
    # fail with EFBIG half-way through the message.
    delivery = MaildirDelivery(tmp_path)
    delivery.deliver("a@x.org", b"warm up: the folders exist")
    for leftover in (delivery.maildir("a@x.org") / "new").iterdir():
        leftover.unlink()

    big = b"x" * (2 * 1024 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, hard))
    try:
        with pytest.raises(OSError) as info:
            delivery.deliver("a@x.org", big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.errno == errno.EFBIG
    assert_nothing_delivered(tmp_path, "a@x.org")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_maildir_raises_and_delivers_nothing(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    delivery.deliver("a@x.org", b"first")
    box = delivery.maildir("a@x.org")
    for leftover in (box / "new").iterdir():
        leftover.unlink()
    (box / "tmp").chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            delivery.deliver("a@x.org", b"second")
    finally:
        (box / "tmp").chmod(0o700)
    assert_nothing_delivered(tmp_path, "a@x.org")


def test_rename_failure_removes_tmp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    delivery = MaildirDelivery(tmp_path)

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "injected rename failure")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        delivery.deliver("a@x.org", MESSAGE)
    assert_nothing_delivered(tmp_path, "a@x.org")


def test_directory_fsync_failure_withdraws_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # If the rename cannot be made durable we say so (the client retries),
    # and take the message back out of new/ so the retry is not a duplicate.
    delivery = MaildirDelivery(tmp_path)
    delivery.deliver("a@x.org", b"warm up")
    for leftover in (delivery.maildir("a@x.org") / "new").iterdir():
        leftover.unlink()

    real_fsync = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the file first, then the new/ directory
            raise OSError(errno.EIO, "injected fsync failure")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="injected"):
        delivery.deliver("a@x.org", MESSAGE)
    assert_nothing_delivered(tmp_path, "a@x.org")


def test_file_in_place_of_maildir_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "a@x.org").write_bytes(b"not a folder")
    with pytest.raises(FileExistsError, match=r"a@x\.org"):
        MaildirDelivery(tmp_path).deliver("a@x.org", MESSAGE)
    assert (tmp_path / "a@x.org").read_bytes() == b"not a folder"


# ---------------------------------------------------------------------------
# deliver_async: one writer thread, a batch at a time


def test_concurrent_async_copies_each_land_once_and_a_failure_stays_its_own(
    tmp_path: Path,
) -> None:
    delivery = MaildirDelivery(tmp_path)
    delivery.deliver("a@x.org", b"already here")
    # somebody else's file in tmp/ under the name a copy is told to use
    taken = delivery.new_name()
    (delivery.maildir("a@x.org") / "tmp" / taken).write_bytes(b"not ours")

    async def main() -> list[Path | BaseException]:
        copies = [delivery.deliver_async("a@x.org", b"copy %d" % i) for i in range(30)]
        # the same file name again: O_EXCL refuses this copy and only this one
        copies.insert(15, delivery.deliver_async("a@x.org", b"clash", name=taken))
        copies.append(delivery.deliver_async("b@x.org", b"other box"))
        return await asyncio.gather(*copies, return_exceptions=True)

    results = asyncio.run(main())
    clash = results.pop(15)
    assert isinstance(clash, FileExistsError)
    paths = [r for r in results if isinstance(r, Path)]
    assert len(paths) == 31  # nothing else failed
    new = delivery.maildir("a@x.org") / "new"
    assert sorted(p.read_bytes() for p in new.iterdir()) == sorted(
        [b"already here"] + [b"copy %d" % i for i in range(30)]
    )
    assert paths[-1].read_bytes() == b"other box"
    assert paths[-1].parent == delivery.maildir("b@x.org") / "new"
    tmp = delivery.maildir("a@x.org") / "tmp"
    assert [(p.name, p.read_bytes()) for p in tmp.iterdir()] == [(taken, b"not ours")]


def test_async_folder_fsync_failure_withdraws_every_copy_of_that_folder_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivery = MaildirDelivery(tmp_path)
    for box in ("a@x.org", "b@x.org"):
        delivery.deliver(box, b"warm up")
        for leftover in (delivery.maildir(box) / "new").iterdir():
            leftover.unlink()
    bad = os.stat(delivery.maildir("a@x.org") / "new").st_ino
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == bad:
            raise OSError(errno.EIO, "injected fsync failure")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    async def main() -> list[Path | BaseException]:
        boxes = ["a@x.org", "b@x.org"] * 5
        return await asyncio.gather(
            *(delivery.deliver_async(b, MESSAGE) for b in boxes), return_exceptions=True
        )

    results = asyncio.run(main())
    assert [isinstance(r, OSError) and "injected" in str(r) for r in results] == [True, False] * 5
    assert_nothing_delivered(tmp_path, "a@x.org")
    assert len(list((delivery.maildir("b@x.org") / "new").iterdir())) == 5


def test_a_maildir_removed_between_deliveries_is_made_again(tmp_path: Path) -> None:
    delivery = MaildirDelivery(tmp_path)
    delivery.deliver("a@x.org", b"first")
    for sub in ("tmp", "new", "cur"):
        for f in (delivery.maildir("a@x.org") / sub).iterdir():
            f.unlink()
        (delivery.maildir("a@x.org") / sub).rmdir()
    delivery.maildir("a@x.org").rmdir()
    path = asyncio.run(delivery.deliver_async("a@x.org", b"second"))
    assert path.read_bytes() == b"second"
    assert {p.name for p in delivery.maildir("a@x.org").iterdir()} == {"tmp", "new", "cur"}
