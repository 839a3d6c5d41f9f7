"""Host the pure SMTP dialogue yourself: bytes in, events out, no sockets.

Run it: ``python examples/dialogue_host.py``. It plays one session against
the example policy, answering DNS from a static zone and storing the message
in a list, and prints what the server would have sent.
"""

from __future__ import annotations

from pathlib import Path

import mailpolicy
from mailpolicy import Reply
from mailpolicy.adapters.dns import StaticZone
from mailpolicy.dialogue import (
    NEED_DATA,
    CheckPassword,
    Close,
    Connection,
    Deliver,
    NeedCount,
    NeedDns,
    NeedRecipientCheck,
    NeedSpooled,
    NeedStamp,
    Send,
    Spool,
    Stamp,
    StartTls,
)

HERE = Path(__file__).parent
policy = mailpolicy.load_policy(HERE / "policy.toml")
zone = StaticZone.from_mapping({"203.0.113.5": {"PTR": ["mail.example.org"]}})

client_says = [
    b"EHLO mail.example.org\r\n",
    b"MAIL FROM:<friend@example.org>\r\n",
    b"RCPT TO:<alice@example.com>\r\nRCPT TO:<someone@elsewhere.example>\r\n",
    b"DATA\r\n",
    b"Subject: hi\r\n\r\nHello Alice\r\n.\r\n",
    b"QUIT\r\n",
]
stored: list[bytes] = []
spool = bytearray()
counts: dict[str, int] = {}

conn = Connection(policy, "203.0.113.5")
while True:
    event = conn.next_event()
    if isinstance(event, Send):
        print("S:", event.data.decode().rstrip())
    elif event is NEED_DATA:
        data = client_says.pop(0) if client_says else b""
        if data:
            print("C:", data.decode().rstrip())
        conn.receive_data(data)
    elif isinstance(event, NeedDns):
        conn.dns_answers({q: zone.lookup(q) for q in event.queries})
    elif isinstance(event, NeedCount):
        # a real host keeps these in a store shared by its connections
        counts[event.kind] = counts.get(event.kind, 0) + (0 if event.peek else 1)
        n = counts[event.kind]
        conn.counted((n, n) if event.kind == "connection" else n)
    elif isinstance(event, NeedRecipientCheck):
        conn.recipient_checked(None)  # this host can deliver to anyone
    elif isinstance(event, CheckPassword):
        conn.password_checked(policy.check_password(event.user, event.password))
    elif isinstance(event, StartTls):
        conn.tls_started(False)  # this host has no TLS
    elif isinstance(event, Spool):
        spool += event.data
    elif isinstance(event, NeedSpooled):
        conn.spooled(bytes(spool))
        spool.clear()
    elif isinstance(event, NeedStamp):
        conn.stamped(Stamp(now=1_700_000_000.0, queue_id="EXAMPLE1"))
    elif isinstance(event, Deliver):
        stored.append(event.submission.message)
        conn.delivered(Reply(250, "2.0.0", f"Ok: queued as {event.submission.queue_id}"))
    elif isinstance(event, Close):
        break
    # anything else is a note (a decision, a command received ...): log it if you like

print(f"{len(stored)} message stored, {len(stored[0])} bytes")
