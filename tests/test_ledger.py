"""Exactly once across a 451 and its retry, also on a full disk and after kill -9.

The full-disk tests mount a real 1 MiB tmpfs (they need root and a kernel
that allows it, and are skipped with the reason otherwise); the kill -9 test
kills a real process between two copies of one message.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.gateway import GatewayDelivery
from mailpolicy.adapters.ledger import DeliveryLedger, LedgerEntry, LedgerError
from mailpolicy.adapters.maildir import delivery_headers
from mailpolicy.config import settings_from_mapping
from mailpolicy.dialogue import Submission
from mailpolicy.model import Reply, Session
from mailpolicy.settings import Settings

POLICY: dict[str, Any] = {
    "general": {"hostname": "mx.example.com", "local_domains": ["example.com"]},
}
RCPTS = ("alice@example.com", "bob@example.com")


def settings(extra: dict[str, Any] | None = None) -> Settings:
    general = {**POLICY["general"], **(extra or {})}
    return settings_from_mapping({"general": general}, source="<test>")


def submission(
    content: bytes, recipients: tuple[str, ...] = RCPTS, sender: str = "carol@example.org"
) -> Submission:
    return Submission(
        sender=sender,
        recipients=recipients,
        message=b"Received: from client.example.org\r\n" + content,
        content=content,
        queue_id="Q1",
        session=Session("192.0.2.1"),
    )


def message(size: int = 0) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (size // 78)
    return b"Subject: full disk\r\nMessage-ID: <fd@example.org>\r\n\r\n" + body


def copies(root: Path, address: str) -> list[Path]:
    new = root / address / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def deliver(gateway: GatewayDelivery, sub: Submission) -> Reply:
    return asyncio.run(gateway.deliver(sub))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at teardown."""
    mount = shutil.which("mount")
    point = tmp_path / "small"
    point.mkdir()
    if mount is None:
        pytest.skip("no mount command")
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(point: Path, leave: int) -> Path:
    """A file taking all but ``leave`` bytes of the file system."""
    filler = point / "filler"
    stat = os.statvfs(point)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


# ---------------------------------------------------------------------------
# Full disk


def copy_size(sub: Submission, rcpt: str) -> int:
    """Bytes one copy takes on a tmpfs: whole pages."""
    stored = delivery_headers(sub.sender, rcpt) + sub.message
    pages = -(-len(stored.replace(b"\r\n", b"\n")) // 4096)
    return pages * 4096


@pytest.mark.parametrize("ledger_on", ["maildir-fs", "own-fs"])
def test_full_disk_two_recipients_room_for_one_each_has_one_copy_after_the_retry(
    ledger_on: str, tmpfs: Path, tmp_path: Path
) -> None:
    # "maildir-fs": the worst place for the ledger, on the full disk itself
    # (the default, DELIVERY_ROOT/.mailpolicy); "own-fs": --state-dir elsewhere.
    root = tmpfs / "maildir"
    state = tmp_path / "state" if ledger_on == "own-fs" else None
    gateway = GatewayDelivery(
        settings(), StaticZone.from_mapping({}), maildir_root=root, state_dir=state
    )
    try:
        # Both mailboxes and the ledger's files exist, as on a server that ran.
        assert deliver(gateway, submission(b"Subject: warm up\r\n\r\n")).code == 250
        sub = submission(message(200_000))
        # Room for exactly one copy (tmpfs counts whole pages), nothing more.
        filler = fill(tmpfs, leave=copy_size(sub, "alice@example.com") + 2048)
        answer = deliver(gateway, sub)
        assert answer.code == 451, answer
        first = [len(copies(root, rcpt)) - 1 for rcpt in RCPTS]
        if ledger_on == "own-fs":
            assert sorted(first) == [0, 1], first  # one got its copy, one did not
        else:
            assert max(first) <= 1, first  # the ledger may have had no room to plan

        filler.unlink()  # the operator makes room; the client retries
        assert deliver(gateway, sub).code == 250
        assert [len(copies(root, rcpt)) - 1 for rcpt in RCPTS] == [1, 1]
        # answered 250: a later identical message is new mail
        assert deliver(gateway, sub).code == 250
        assert [len(copies(root, rcpt)) - 1 for rcpt in RCPTS] == [2, 2]
    finally:
        gateway.ledger.close()


def test_full_disk_after_the_plan_alice_has_her_copy_and_bob_gets_his_on_the_retry(
    tmpfs: Path,
) -> None:
    root = tmpfs / "maildir"
    gateway = GatewayDelivery(settings(), StaticZone.from_mapping({}), maildir_root=root)
    try:
        assert deliver(gateway, submission(b"Subject: warm up\r\n\r\n")).code == 250
        sub = submission(message(200_000))
        # room for the ledger's plan and one copy
        filler = fill(tmpfs, leave=copy_size(sub, "alice@example.com") + 64 * 1024)
        answer = deliver(gateway, sub)
        assert (answer.code, answer.enhanced) == (451, "4.4.0"), answer
        assert [len(copies(root, rcpt)) - 1 for rcpt in RCPTS] == [1, 0]
        filler.unlink()
        assert deliver(gateway, sub).code == 250
        assert [len(copies(root, rcpt)) - 1 for rcpt in RCPTS] == [1, 1]
    finally:
        gateway.ledger.close()


def test_full_disk_with_no_room_for_the_ledger_delivers_nothing(tmpfs: Path) -> None:
    root = tmpfs / "maildir"
    gateway = GatewayDelivery(settings(), StaticZone.from_mapping({}), maildir_root=root)
    try:
        fill(tmpfs, leave=0)
        answer = deliver(gateway, submission(message(1000)))
        assert (answer.code, answer.enhanced) == (451, "4.3.0"), answer
        assert [copies(root, rcpt) for rcpt in RCPTS] == [[], []]
    finally:
        gateway.ledger.close()


def test_starts_on_a_full_disk_and_recovers_when_there_is_room(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmpfs / "maildir"
    root.mkdir()
    filler = fill(tmpfs, leave=0)
    gateway = GatewayDelivery(settings(), StaticZone.from_mapping({}), maildir_root=root)
    try:
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "delivery ledger" in warning.getMessage()
        assert warning.exc_info is None
        assert deliver(gateway, submission(message(1000))).code == 451
        filler.unlink()
        assert deliver(gateway, submission(message(1000))).code == 250
        assert [len(copies(root, rcpt)) for rcpt in RCPTS] == [1, 1]
    finally:
        gateway.ledger.close()


def test_an_unusable_ledger_fails_mail_to_several_recipients_only(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    gateway = GatewayDelivery(
        settings(),
        StaticZone.from_mapping({}),
        maildir_root=tmp_path / "maildir",
        state_dir=blocker / "sub",
    )
    try:
        assert deliver(gateway, submission(message(), ("alice@example.com",))).code == 250
        answer = deliver(gateway, submission(message()))
        assert (answer.code, answer.enhanced) == (451, "4.3.0"), answer
        assert len(copies(tmp_path / "maildir", "alice@example.com")) == 1
        assert copies(tmp_path / "maildir", "bob@example.com") == []
        with pytest.raises(LedgerError, match="cannot be opened"):
            gateway.ledger.lookup("d", ["alice@example.com"])
    finally:
        gateway.ledger.close()


def test_state_dir_holds_the_ledger(tmp_path: Path) -> None:
    gateway = GatewayDelivery(
        settings(),
        StaticZone.from_mapping({}),
        maildir_root=tmp_path / "maildir",
        state_dir=tmp_path / "state",
    )
    gateway.ledger.close()
    assert (tmp_path / "state" / "delivered.sqlite3").is_file()
    assert not (tmp_path / "maildir" / ".mailpolicy").exists()


# ---------------------------------------------------------------------------
# kill -9 between two copies

_KILLED = """
import asyncio, os, signal, sys
from mailpolicy.adapters import gateway as gw
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.config import settings_from_mapping
from mailpolicy.dialogue import Submission
from mailpolicy.model import Session

root, content = sys.argv[1], sys.argv[2].encode()

class DiesAtBob(gw.MaildirDelivery):
    async def deliver_async(self, recipient, message, **kw):
        if recipient.startswith("bob@"):
            os.kill(os.getpid(), signal.SIGKILL)
        return await super().deliver_async(recipient, message, **kw)

gw.MaildirDelivery = DiesAtBob
settings = settings_from_mapping(
    {"general": {"hostname": "mx.example.com", "local_domains": ["example.com"]}}, source="t"
)
delivery = gw.GatewayDelivery(settings, StaticZone.from_mapping({}), maildir_root=root)
sub = Submission(
    sender="carol@example.org", recipients=("alice@example.com", "bob@example.com"),
    message=content, content=content, queue_id="Q1", session=Session("192.0.2.1"),
)
asyncio.run(delivery.deliver(sub))
"""


def test_kill_9_between_two_copies_then_the_retry_gives_each_one_copy(tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    content = message(1000)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED, str(root), content.decode()],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert killed.returncode == -9, killed.stderr
    assert len(copies(root, "alice@example.com")) == 1  # alice's copy was made
    assert copies(root, "bob@example.com") == []

    gateway = GatewayDelivery(settings(), StaticZone.from_mapping({}), maildir_root=root)
    try:
        sub = submission(content)
        assert deliver(gateway, sub).code == 250  # the client's retry
        assert [len(copies(root, rcpt)) for rcpt in RCPTS] == [1, 1]
    finally:
        gateway.ledger.close()


def test_a_planned_copy_a_reader_has_moved_to_cur_still_counts(tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    ledger = DeliveryLedger(tmp_path / "ledger.sqlite3")
    gateway = GatewayDelivery(
        settings(), StaticZone.from_mapping({}), maildir_root=root, ledger=ledger
    )
    try:
        sub = submission(message(1000))
        name = gateway.maildir.new_name()
        path = gateway.maildir.deliver("alice@example.com", b"Subject: x\n\n", name=name)
        # as if alice's copy had been made before a crash, and then read
        path.rename(root / "alice@example.com" / "cur" / f"{name}:2,S")
        from mailpolicy.adapters.ledger import message_digest

        ledger.begin(
            message_digest(sub.sender, sub.content),
            [("alice@example.com", name), ("bob@example.com", "other-name")],
        )
        assert deliver(gateway, sub).code == 250
        assert copies(root, "alice@example.com") == []  # not delivered again
        assert len(copies(root, "bob@example.com")) == 1
    finally:
        gateway.ledger.close()


# ---------------------------------------------------------------------------
# Trace headers of local delivery


def test_local_copies_carry_return_path_and_delivered_to(tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    gateway = GatewayDelivery(settings(), StaticZone.from_mapping({}), maildir_root=root)
    try:
        content = message()
        assert deliver(gateway, submission(content)).code == 250
        for rcpt in RCPTS:
            [path] = copies(root, rcpt)
            assert path.read_bytes() == (
                f"Return-Path: <carol@example.org>\nDelivered-To: {rcpt}\n".encode()
                + b"Received: from client.example.org\n"
                + content.replace(b"\r\n", b"\n")
            )
        before = set(copies(root, "alice@example.com"))
        bounce = submission(content, ("alice@example.com",), sender="")
        assert deliver(gateway, bounce).code == 250
        # the new file itself: two copies written within one tick of the
        # file system's clock have the same mtime (a CI run picked the first)
        [newest] = set(copies(root, "alice@example.com")) - before
        assert newest.read_bytes().startswith(
            b"Return-Path: <>\nDelivered-To: alice@example.com\nReceived: "
        )
    finally:
        gateway.ledger.close()


def test_a_rewritten_recipient_gets_x_original_to(tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    gateway = GatewayDelivery(
        settings({"external_postmasters": ["admin@example.com"]}),
        StaticZone.from_mapping({}),
        maildir_root=root,
    )
    try:
        assert deliver(gateway, submission(message(), ("postmaster@example.com",))).code == 250
        [path] = copies(root, "admin@example.com")
        assert path.read_bytes().startswith(
            b"Return-Path: <carol@example.org>\n"
            b"X-Original-To: postmaster@example.com\n"
            b"Delivered-To: admin@example.com\n"
            b"Received: "
        )
    finally:
        gateway.ledger.close()


def test_delivery_headers_never_hold_a_line_break() -> None:
    assert delivery_headers("a\r\nX-Evil: 1@example.org", "b@example.com") == (
        b"Return-Path: <aX-Evil: 1@example.org>\r\nDelivered-To: b@example.com\r\n"
    )
    # a change of case only is not a rewrite
    assert b"X-Original-To" not in delivery_headers("", "A@example.com", "a@EXAMPLE.com")


# ---------------------------------------------------------------------------
# lookup_now: the event loop's read, which never waits


def test_lookup_now_sees_what_another_process_wrote(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ours = DeliveryLedger(path)
    theirs = DeliveryLedger(path)  # another worker's connection to the same file
    try:
        assert ours.lookup_now("d1", ["Alice@Example.com"]) == {}
        theirs.begin("d1", [("alice@example.com", "1.M1P1.host"), ("bob@example.com", None)])
        theirs.record("d1", ["bob@example.com"])
        expected = {
            "alice@example.com": LedgerEntry(False, "1.M1P1.host"),
            "bob@example.com": LedgerEntry(True, None),
        }
        assert ours.lookup_now("d1", ["ALICE@example.com", "bob@example.com"]) == expected
        assert ours.lookup("d1", ["alice@example.com", "bob@example.com"]) == expected
    finally:
        ours.close()
        theirs.close()


def test_lookup_now_after_close_says_ask_the_waiting_lookup(tmp_path: Path) -> None:
    ledger = DeliveryLedger(tmp_path / "ledger.sqlite3")
    ledger.record("d1", ["alice@example.com"])
    assert ledger.lookup_now("d1", ["alice@example.com"]) == {
        "alice@example.com": LedgerEntry(True, None)
    }
    ledger.close()
    assert ledger.lookup_now("d1", ["alice@example.com"]) is None
    with pytest.raises(LedgerError, match="is closed"):
        ledger.lookup("d1", ["alice@example.com"])


def test_lookup_now_never_creates_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    ledger = DeliveryLedger(blocker / "ledger.sqlite3")  # cannot be opened: warned, not fatal
    assert ledger.lookup_now("d1", ["alice@example.com"]) is None
    assert blocker.read_text() == "x"
