"""Replay needs no network: it runs in a network namespace with no interface up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare --net")
@pytest.mark.parametrize("corpus", ["conformance", "conformance_extra"])
def test_replay_passes_with_no_network_interface_up(corpus: str) -> None:
    script = (
        # prove there is no usable interface: even loopback is down
        "import socket, sys\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.connect(('127.0.0.1', 9))\n"
        "except OSError as e:\n"
        "    print('no network:', e.errno)\n"
        "else:\n"
        "    sys.exit('loopback is up')\n"
        "from mailpolicy.cli import main\n"
        f"sys.exit(main(['replay', '--check', {str(ROOT / 'tests' / corpus)!r}]))\n"
    )
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no network: 101" in done.stdout  # ENETUNREACH
    assert " 0 failed" in done.stdout.splitlines()[-1]
