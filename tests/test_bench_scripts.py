"""The small benchmark scripts run and print what they promise (their
figures are not checked: they are measurements, not tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_maildir_fs_times_each_step(tmp_path: Path) -> None:
    out = _run("maildir_fs.py", "--copies", "5", "--folder", str(tmp_path))
    steps = [line.split("user")[0].strip() for line in out.splitlines()[1:]]
    assert steps == [
        "create, write, close",
        "+ rename into new/",
        "+ fsync the file",
        "+ fsync new/ (serve)",
    ]
    assert list(tmp_path.iterdir()) == []  # it cleans up


@pytest.mark.timeout(300)
def test_instructions_counts_serve_under_callgrind() -> None:
    script = str(ROOT / "benchmarks" / "instructions.py")
    done = subprocess.run(
        [sys.executable, script, "--sessions", "4", "--warmup", "2"],
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("mailpolicy serve --workers 1, 4 sessions after 2 (DNS TTL 0")
    label, _, count = second.partition(": ")
    assert label == "user-space instructions a session"
    # a whole session with every check and a Maildir copy: millions, not nothing
    assert 500_000 < int(count.replace(",", "")) < 100_000_000


@pytest.mark.timeout(120)
def test_session_cpu_runs_accepted_sessions_both_ways() -> None:
    out = _run("session_cpu.py", "--sessions", "5")
    names = [line.split(" user ")[0].strip() for line in out.splitlines()]
    # each run checks its last session was accepted (250) before timing
    assert names == ["no delivery", "Maildir"], out
