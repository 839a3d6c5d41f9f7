"""CPU of whole SMTP sessions in process, with and without delivery (not a
test: it prints figures).

Runs ``mailpolicy.adapters.driver.run_connection`` for one transaction after
another (HELO, MAIL, RCPT, DATA with a 1 KiB message, QUIT) over a channel
in memory, with ``benchmarks/serve.py``'s policy (every check on, 10,000
sender entries, 1,000 client networks) and its DNS answers from a static
zone: no sockets, no event-loop waits. Once with a delivery that keeps
nothing (the dialogue, the policy, the driver) and once with
``GatewayDelivery`` into a Maildir, written on the loop's thread as
``serve`` does with one session open. Prints user and system CPU per
session (``getrusage``): what ``serve`` spends beyond its sockets.

    python benchmarks/session_cpu.py --sessions 1000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as bench

from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.driver import AcceptAllDelivery, Services, _Shutdown, run_connection
from mailpolicy.adapters.gateway import GatewayDelivery
from mailpolicy.config import settings_from_mapping
from mailpolicy.dialogue import Connection
from mailpolicy.policy import compile_policy


class _Channel:
    """The client's side, in memory: one command (or the message) a read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.replies: list[bytes] = []

    async def read(self, timeout: float | None) -> bytes | _Shutdown | None:
        return self.chunks.pop(0) if self.chunks else b""

    def write(self, data: bytes) -> None:
        self.replies.append(data)

    async def start_tls(self) -> bool:
        return False

    def close(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        policy_data = bench.serve_policy(bench.restriction_lists())
        settings = settings_from_mapping(policy_data, source="benchmarks/serve.py")
        policy = compile_policy(settings)
        zone = StaticZone.from_mapping(bench.ZONE)
        client, helo = bench.ADDRESS, bench.HELO
        message = b"From: <%s>\r\nTo: <%s>\r\nSubject: test\r\n\r\n" % (
            bench.SENDER.encode(),
            bench.RECIPIENT.encode(),
        )
        chunks = [
            b"HELO %s\r\n" % helo.encode(),
            b"MAIL FROM:<%s>\r\n" % bench.SENDER.encode(),
            b"RCPT TO:<%s>\r\n" % bench.RECIPIENT.encode(),
            b"DATA\r\n",
            message + b"x" * 1000 + b"\r\n.\r\n",
            b"QUIT\r\n",
        ]
        gateway = GatewayDelivery(
            settings, zone, maildir_root=Path(folder) / "maildir", state_dir=Path(folder)
        )
        gateway.maildir.write_inline = lambda: True
        try:
            for name, delivery in (("no delivery", AcceptAllDelivery()), ("Maildir", gateway)):
                services = Services(zone, delivery=delivery)

                async def sessions(count: int, services: Services = services) -> list[bytes]:
                    replies: list[bytes] = []
                    for _ in range(count):
                        channel = _Channel(chunks)
                        await run_connection(Connection(policy, client), channel, services)
                        replies = channel.replies
                    return replies

                replies = asyncio.run(sessions(50))  # warm up
                if not replies[-2].startswith(b"250 2.0.0"):
                    print(f"{name}: the message was not accepted: {replies}", file=sys.stderr)
                    return 1
                before = resource.getrusage(resource.RUSAGE_SELF)
                asyncio.run(sessions(args.sessions))
                after = resource.getrusage(resource.RUSAGE_SELF)
                user = (after.ru_utime - before.ru_utime) / args.sessions * 1e3
                system = (after.ru_stime - before.ru_stime) / args.sessions * 1e3
                print(f"{name:<12} user {user:.3f} ms  system {system:.3f} ms a session")
        finally:
            gateway.ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
