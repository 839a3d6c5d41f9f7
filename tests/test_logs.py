"""serve's log formats: the text one is logging's own, only faster; the JSON
one has the decision's fields at the top level. A decision's line is only
built when it is shown."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailpolicy.adapters.driver import log_decision
from mailpolicy.adapters.logs import JsonFormatter, TextFormatter
from mailpolicy.dialogue import Decided
from mailpolicy.model import Action, Reply, Session, Stage, Verdict

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


class Unprintable:
    def __str__(self) -> str:
        raise AssertionError("a line that is not shown was built")


@pytest.mark.parametrize(
    ("stage", "verdict", "level"),
    [
        ("delivery", Verdict(Action.ACCEPT, Reply(250, "2.0.0", "Ok")), logging.WARNING),
        ("delivery", Verdict(Action.DEFER, Reply(451, "4.3.0", "Try again")), logging.ERROR),
        (Stage.RCPT, Verdict(Action.REJECT, Reply(554, "5.7.1", "No")), logging.WARNING),
        (Stage.RCPT, Verdict(Action.ACCEPT), logging.INFO),
    ],
)
def test_a_decision_line_that_is_not_shown_is_not_built(
    stage: Any, verdict: Verdict, level: int
) -> None:
    # serve --log-level warning: a delivery (INFO) or a refusal (INFO) costs nothing
    decisions = logging.getLogger("mailpolicy.decisions")
    before = decisions.level
    decisions.setLevel(level)
    try:
        facts = {"queue_id": "Q1", "sender": "a@example.org", "recipients": [Unprintable()]}
        log_decision(Session("192.0.2.1"), Decided(stage, verdict, facts))
    finally:
        decisions.setLevel(before)


def test_a_decision_line_that_is_shown_says_what_was_decided(
    caplog: pytest.LogCaptureFixture,
) -> None:
    facts = {"queue_id": "Q1", "sender": "a@example.org", "recipients": ["b@example.com"]}
    verdict = Verdict(Action.DEFER, Reply(451, "4.3.0", "Try again"))
    with caplog.at_level(logging.INFO, logger="mailpolicy.decisions"):
        log_decision(Session("192.0.2.1"), Decided("delivery", verdict, facts))
        log_decision(Session("192.0.2.1"), Decided(Stage.RCPT, Verdict(Action.ACCEPT), {}))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert (
        record.getMessage()
        == "message Q1 from <a@example.org> to b@example.com: 451 4.3.0 Try again"
    )
