"""mailpolicy: SMTP policy decisions that answer like Postfix.

The core is pure (no sockets, no DNS, no clock, no files)::

    import mailpolicy
    from mailpolicy import Envelope, Session, Stage

    policy = mailpolicy.load_policy("policy.toml")
    session = Session("203.0.113.5", helo="mail.example.org")
    envelope = Envelope(Stage.RCPT, sender="a@example.org", recipient="bob@example.com")

    # Decide, asking any resolver (a function from a set of DnsQuery to
    # their DnsResult) for the DNS answers the enabled rules need.
    memo = mailpolicy.Memo()  # one per connection, shared by its decisions
    session, verdict = mailpolicy.decide_with(policy, session, envelope, my_resolver, memo)
    print(verdict.action, verdict.reply, verdict.rule)

    # Step by step: decide() gives a Verdict, or Lookups (the questions
    # still needed): answer them, add the answers, decide again.
    found = mailpolicy.decide(policy, session, envelope, memo)
    if isinstance(found, mailpolicy.Lookups):
        session = session.with_dns(my_resolver(found.queries))

Adapters bind the core to the world: :mod:`mailpolicy.adapters.smtp`
(an aiosmtpd server), :mod:`mailpolicy.adapters.replay` (captured sessions),
:mod:`mailpolicy.adapters.dns` (dnspython and static zones),
:mod:`mailpolicy.adapters.maildir` and :mod:`mailpolicy.adapters.relay`
(delivery), :mod:`mailpolicy.adapters.state` (rate counters).
"""

from __future__ import annotations

import os

from .config import PolicyError, load_settings, settings_from_mapping, settings_to_mapping
from .counting import RateCount, rates_to_count

# Imported here, before anything imports the submodule lazily, so that the
# package attribute ``evaluate`` is the function, not the module.
from .evaluate import Lookups, Memo, decide, decide_with, evaluate
from .model import (
    Action,
    Counters,
    DnsOutcome,
    DnsQuery,
    DnsResult,
    Envelope,
    Evidence,
    MessageFacts,
    NextHop,
    Reply,
    Route,
    RouteKind,
    RType,
    Session,
    Stage,
    Verdict,
)
from .policy import Policy, compile_policy
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Counters",
    "DnsOutcome",
    "DnsQuery",
    "DnsResult",
    "Envelope",
    "Evidence",
    "Lookups",
    "Memo",
    "MessageFacts",
    "NextHop",
    "Policy",
    "PolicyError",
    "RType",
    "RateCount",
    "Replies",
    "Reply",
    "Route",
    "RouteKind",
    "Session",
    "Settings",
    "Stage",
    "Verdict",
    "compile_policy",
    "decide",
    "decide_with",
    "evaluate",
    "load_policy",
    "load_settings",
    "rates_to_count",
    "replay_case",
    "settings_from_mapping",
    "settings_to_mapping",
]

#: names served by adapters, imported on first use so that ``import
#: mailpolicy`` (the pure core) never loads aiosmtpd
_LAZY = {"replay_case": "mailpolicy.adapters.diff", "Replies": "mailpolicy.adapters.diff"}


def __getattr__(name: str) -> object:
    """``mailpolicy.replay_case`` and ``mailpolicy.Replies``: replay a captured
    session in a test (see docs/replay.md), imported lazily."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mailpolicy' has no attribute {name!r}")


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a TOML policy file and compile it.

    Raises :class:`PolicyError` naming the file, the key path and the reason
    for every problem; nothing half-loaded is ever returned.
    """
    return compile_policy(load_settings(path))
