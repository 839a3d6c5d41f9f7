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

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]


class TextFormatter(logging.Formatter):
    """``asctime level logger: message``, the time formatted once a second
    (``time.strftime`` per line was most of a line's cost)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            # what logging.Formatter writes: local time, then ",msecs"
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._text},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...decision fields}`` per line."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            self._second = second
        out: dict[str, object] = {
            "ts": f"{self._text}.{int(record.msecs):03d}Z",
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
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every line at INFO, passwords' base64 included: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
