"""The conformance corpus through a real Postfix 3.7 configured by
``mailpolicy export postfix`` and asking ``mailpolicy policyd``: every reply's
code and enhanced code must equal the recording from native Postfix.

Each case starts its own private Postfix in a network namespace
(``tests/postfix_instance.py``), a few seconds each; it needs root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import postfix_instance

HERE = Path(__file__).parent
CORPUS = sorted((HERE / "conformance").glob("*.json"))

#: what a Postfix in front of policyd cannot do as the recordings say
NOT_THROUGH_POSTFIX: dict[str, str] = {}

WHY_NOT = postfix_instance.can_run()


def _variants(path: Path) -> list[str | None]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [None, *sorted(data.get("variants", {}))]


CASES = [
    pytest.param(path, variant, id=f"{path.stem}[{variant}]" if variant else path.stem)
    for path in CORPUS
    for variant in _variants(path)
]


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 37


@pytest.mark.skipif(WHY_NOT is not None, reason=f"a private Postfix {WHY_NOT}")
@pytest.mark.parametrize(("path", "variant"), CASES)
def test_postfix_with_policyd_answers_as_native_postfix(path: Path, variant: str | None) -> None:
    if path.stem in NOT_THROUGH_POSTFIX:
        pytest.skip(NOT_THROUGH_POSTFIX[path.stem])
    stem = f"{path.stem}.{variant}" if variant else path.stem
    expected = [
        json.loads(line)
        for line in path.with_name(f"{stem}.expected.jsonl").read_text().splitlines()
        if line.strip()
    ]
    got = postfix_instance.run_case(path, variant)
    # The code and enhanced code of each reply; commands are labelled
    # differently by the recording harness (AUTH steps), so they only help
    # to read a failure.
    rows = [(r.code, r.enhanced) for r in got]
    want = [(e["code"], e["enhanced"]) for e in expected]
    differ = [
        f"#{i} {e['cmd']}: got {g.code} {g.enhanced} {g.text!r}, expected "
        f"{e['code']} {e['enhanced']} {e['text']!r}"
        for i, (e, g) in enumerate(zip(expected, got, strict=False))
        if (e["code"], e["enhanced"]) != (g.code, g.enhanced)
    ]
    assert rows == want, "\n".join(differ) or f"{len(got)} replies, expected {len(expected)}"
