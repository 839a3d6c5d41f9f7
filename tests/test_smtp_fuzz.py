"""Arbitrary command lines never break a session (hypothesis, through replay)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpolicy.adapters.replay import cases_from_mapping, run_case_sync

POLICY = {"general": {"hostname": "mx.example.com", "local_domains": ["example.com"]}}

# Printable junk, SMTP-looking verbs with junk arguments, and real commands
# with broken arguments; never DATA (its 354 would make the rest message
# text), QUIT or STARTTLS (they end or change the session on purpose).
verbs = st.sampled_from(
    [
        "HELO",
        "EHLO",
        "MAIL FROM:",
        "RCPT TO:",
        "VRFY",
        "NOOP",
        "RSET",
        "AUTH",
        "EXPN",
        "HELP",
        "XCLIENT",
        "BDAT",
        "mail from:",
        "",
    ]
)
junk = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters="\x7f"),
    max_size=40,
)
lines = st.one_of(junk, st.builds(lambda v, a: f"{v} {a}".strip(), verbs, junk)).filter(
    lambda s: s.split(" ", 1)[0].upper() not in ("DATA", "QUIT", "STARTTLS", "BDAT")
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=6))
def test_any_command_lines_get_a_reply_and_the_session_goes_on(steps: list[str]) -> None:
    case = {
        "policy": POLICY,
        "client": {"ip": "203.0.113.5", "helo": "x.example.org"},
        "session": ["EHLO {helo}", *steps, "RSET", "MAIL FROM:<a@known.example>", "QUIT"],
    }
    (c,) = cases_from_mapping(case, "<fuzz>", "fuzz")
    replies = run_case_sync(c)
    codes = [r.code for r in replies]
    assert None not in codes, replies  # no timeout, no closed connection
    assert all(200 <= code < 600 for code in codes if code is not None)
    # No internal error reply (451 4.3.0 from a caught exception) for junk.
    assert not any(r.code == 451 and r.enhanced == "4.3.0" for r in replies), replies
    # The session is still usable afterwards.
    assert replies[-3].code == 250 and replies[-2].code in (250, 503), replies
    assert replies[-1].code == 221
