"""Log output for the server: readable text, or one JSON object per line.

Decisions are logged on ``mailpolicy.decisions`` with their facts in the
record's ``decision`` attribute (client, HELO, sender, recipient, verdict,
rule, evidence); the JSON format puts those fields at the top level so a log
pipeline can filter on ``rule`` without parsing text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

__all__ = ["JsonFormatter", "configure_logging"]


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...decision fields}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        decision = getattr(record, "decision", None)
        if isinstance(decision, dict):
            out.update(decision)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(fmt: Literal["text", "json"] = "text", level: str = "info") -> None:
    """Send logs to stderr in ``fmt``; replaces handlers set before."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every line at INFO, passwords' base64 included: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
