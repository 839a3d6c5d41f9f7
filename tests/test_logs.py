"""serve's log formats: the text one is logging's own, only faster; the JSON
one has the decision's fields at the top level."""

from __future__ import annotations

import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from mailpolicy.adapters.logs import JsonFormatter, TextFormatter

PLAIN = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def record(created: float, message: str = "queued", **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("mailpolicy.delivery", logging.INFO, __file__, 1, message, (), None)
    made.created = created
    made.msecs = (created - int(created)) * 1000
    made.__dict__.update(extra)
    return made


@given(st.lists(st.floats(1.6e9, 1.9e9), min_size=1, max_size=20))
def test_text_lines_are_what_logging_writes_second_after_second(times: list[float]) -> None:
    formatter = TextFormatter()
    for created in sorted(times) + sorted(times, reverse=True):
        assert formatter.format(record(created)) == PLAIN.format(record(created))


def test_json_lines_carry_the_time_in_utc_and_the_decision_fields() -> None:
    formatter = JsonFormatter()
    first = json.loads(formatter.format(record(1_700_000_000.25, decision={"rule": "r"})))
    again = json.loads(formatter.format(record(1_700_000_000.5)))
    later = json.loads(formatter.format(record(1_700_000_001.0)))
    assert (first["ts"], first["rule"], first["msg"]) == ("2023-11-14T22:13:20.250Z", "r", "queued")
    assert (again["ts"], later["ts"]) == ("2023-11-14T22:13:20.500Z", "2023-11-14T22:13:21.000Z")
