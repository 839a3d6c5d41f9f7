"""Starting ``mailpolicy console`` processes for the console tests."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from test_serve_cli import _command


class ConsoleProcess:
    def __init__(self, args: list[str], workdir: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / f"console-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*_command(), "console", *args],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_listening(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"console exited:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"console never listened:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def run_console(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """A console command expected to exit at once (a refused start)."""
    return subprocess.run(
        [*_command(), "console", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
