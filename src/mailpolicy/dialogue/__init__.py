"""The SMTP dialogue as a pure state machine: bytes in, replies and needs out.

See :mod:`.connection` for the theory of operation. A host's loop::

    conn = Connection(policy, client_ip, starttls=True)
    while True:
        event = conn.next_event()
        if isinstance(event, Send):
            write(event.data)
        elif event is NEED_DATA:
            conn.receive_data(read())          # b"" at end of input
        elif isinstance(event, NeedDns):
            conn.dns_answers(resolve(event.queries))
        elif ...                               # the other needs, see events
        elif isinstance(event, Close):
            break
"""

from .connection import (
    COMMAND_LINE_LIMIT,
    HARD_ERROR_LIMIT,
    SEQUENCE,
    Connection,
    DialogueError,
    Phase,
)
from .events import (
    NEED_DATA,
    Authenticated,
    CheckPassword,
    Close,
    CommandReceived,
    CountKind,
    Decided,
    Deliver,
    Event,
    MessageReceived,
    NeedCount,
    NeedData,
    NeedDns,
    NeedRecipientCheck,
    NeedSpooled,
    NeedStamp,
    Observed,
    Prefetch,
    ReplyRecord,
    Send,
    Spool,
    Stamp,
    StartTls,
    Submission,
    TlsStarted,
)
from .replies import R, format_reply

__all__ = [
    "COMMAND_LINE_LIMIT",
    "HARD_ERROR_LIMIT",
    "NEED_DATA",
    "SEQUENCE",
    "Authenticated",
    "CheckPassword",
    "Close",
    "CommandReceived",
    "Connection",
    "CountKind",
    "Decided",
    "Deliver",
    "DialogueError",
    "Event",
    "MessageReceived",
    "NeedCount",
    "NeedData",
    "NeedDns",
    "NeedRecipientCheck",
    "NeedSpooled",
    "NeedStamp",
    "Observed",
    "Phase",
    "Prefetch",
    "R",
    "ReplyRecord",
    "Send",
    "Spool",
    "Stamp",
    "StartTls",
    "Submission",
    "TlsStarted",
    "format_reply",
]
