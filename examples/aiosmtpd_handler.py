"""mailpolicy inside your own aiosmtpd server.

Run it from the project directory (no network needed: DNS answers come from
a static zone, and the example policy has every DNS-based check off):

    python examples/aiosmtpd_handler.py [PORT]

It starts an aiosmtpd Controller on 127.0.0.1:PORT (default 8025) with the policy of
examples/policy.toml in front of a handler that prints each message, sends
itself four messages with smtplib and prints what each one was told, then
stops. For a real server, use LiveResolver.from_settings(policy.settings.dns)
and keep the Controller running.
"""

from __future__ import annotations

import logging
import smtplib
import sys
import tomllib
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

import mailpolicy
from mailpolicy.adapters.aiosmtpd import PolicyHandler
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.adapters.state import MemoryStore

POLICY = Path(__file__).with_name("policy.toml")


class PrintHandler:
    """Your application's handler: the policy has accepted what reaches it."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        # Your own checks still run after the policy's (and must add the address).
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        print(f"    handler got a message from <{envelope.mail_from}> to {envelope.rcpt_tos}")
        return "250 Message accepted"


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8025
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="    log: %(name)s: %(message)s"
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's own chatter
    # The example policy, except that this demo's client (127.0.0.1) is not
    # in the local networks: it is judged like any client on the Internet.
    data = tomllib.loads(POLICY.read_text())
    data["general"]["smtp_auth"]["local_networks"] = []
    policy = mailpolicy.compile_policy(mailpolicy.settings_from_mapping(data, source=str(POLICY)))
    handler = PolicyHandler(
        policy,
        handler=PrintHandler(),
        resolver=StaticZone.from_mapping({}),
        store=MemoryStore(),
    )
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        attempts = [
            # accepted for alice; nobody@ is refused by PrintHandler
            ("friend@example.org", ["alice@example.com", "nobody@example.com"]),
            # not our domain: 554 5.7.1 Relay access denied
            ("friend@example.org", ["someone@elsewhere.example"]),
            # black-listed sender: 554 5.7.1 ... Mail from you is not welcome here
            ("offers@shop.example", ["alice@example.com"]),
            # spam trap: accepted (250), then dropped; PrintHandler never sees it
            ("friend@example.org", ["spamtrap@example.com"]),
        ]
        for sender, recipients in attempts:
            print(f"MAIL FROM:<{sender}> RCPT TO:{recipients}")
            with smtplib.SMTP("127.0.0.1", port) as smtp:
                try:
                    refused = smtp.sendmail(sender, recipients, b"Subject: hi\r\n\r\nHello\r\n")
                    print(f"    accepted; refused recipients: {refused or 'none'}")
                except smtplib.SMTPRecipientsRefused as e:
                    print(f"    refused: {e.recipients}")
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
