"""Helpers for tests of the pure policy core (no sockets, no real DNS).

* :func:`make_policy` builds a compiled policy from a policy-file mapping (the
  same keys as the TOML file), on top of a small base (our host name and one
  local domain), optionally with accounts.
* :class:`Zone` is a fake DNS: a dict ``DnsQuery -> DnsResult``, NXDOMAIN for
  anything else, that records the rounds of questions it was asked.
* :func:`resolve` runs the adapter's loop (:func:`mailpolicy.decide_with`)
  and :func:`judge` does that and then evaluates.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from mailpolicy import (
    DnsOutcome,
    DnsQuery,
    DnsResult,
    Envelope,
    Lookups,
    Memo,
    MessageFacts,
    Policy,
    RType,
    Session,
    Stage,
    Verdict,
    compile_policy,
    decide,
    decide_with,
    evaluate,
    settings_from_mapping,
)
from mailpolicy.settings import Account

__all__ = [
    "HOSTNAME",
    "LOCAL",
    "NODATA",
    "NXDOMAIN",
    "OUTSIDER",
    "OUTSIDER_HELO",
    "SERVFAIL",
    "TIMEOUT",
    "Zone",
    "account",
    "answer",
    "deep_merge",
    "eod",
    "judge",
    "make_policy",
    "q",
    "rcpt",
    "resolve",
    "session",
    "standard_zone",
]

HOSTNAME = "mx.example.com"
LOCAL = "example.com"
#: an outside client with a forward-confirmed PTR in :func:`standard_zone`
OUTSIDER = "203.0.113.5"
OUTSIDER_HELO = "outside.example.org"

NXDOMAIN = DnsResult(DnsOutcome.NXDOMAIN)
NODATA = DnsResult(DnsOutcome.NODATA)
SERVFAIL = DnsResult(DnsOutcome.SERVFAIL)
TIMEOUT = DnsResult(DnsOutcome.TIMEOUT)


class Counting:
    """Counts the calls of a method of a class (patched on the class): a
    rule's ``check`` by default."""

    def __init__(self, monkeypatch: Any, cls: type, name: str = "check") -> None:
        self.calls = 0
        original = getattr(cls, name)

        def counted(*args: object) -> object:
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(cls, name, counted)


def answer(*records: str) -> DnsResult:
    """An ANSWER with ``records`` (presentation format)."""
    return DnsResult.answer(*records)


def q(name: str, rtype: str) -> DnsQuery:
    """``q("example.com", "MX")``; for PTR, ``name`` is the IP address."""
    return DnsQuery(name, RType(rtype))


def deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``b`` merged into a copy of ``a``; nested tables merge, lists replace."""
    out = copy.deepcopy(dict(a))
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BASE_POLICY: dict[str, Any] = {"general": {"hostname": HOSTNAME, "local_domains": [LOCAL]}}


def account(name: str, *addresses: str) -> Account:
    """An account; the hash is never checked by the rules under test."""
    return Account(name, "not-a-real-hash", addresses)


def make_policy(
    mapping: Mapping[str, Any] | None = None, *, accounts: Iterable[Account] = ()
) -> Policy:
    """Compile ``mapping`` (policy-file keys) merged over :data:`BASE_POLICY`."""
    settings = settings_from_mapping(deep_merge(BASE_POLICY, mapping or {}), source="<test>")
    extra = tuple(accounts)
    if extra:
        settings = attrs.evolve(settings, accounts=settings.accounts + extra)
    return compile_policy(settings)


class Zone:
    """A static fake DNS zone. Unknown questions are NXDOMAIN (or ``default``)."""

    def __init__(
        self,
        records: Mapping[DnsQuery, DnsResult] | None = None,
        default: DnsResult = NXDOMAIN,
    ) -> None:
        self.records: dict[DnsQuery, DnsResult] = dict(records or {})
        self.default = default
        self.rounds: list[frozenset[DnsQuery]] = []

    def set(self, name: str, rtype: str, result: DnsResult) -> Zone:
        """Add or replace one answer; returns the zone for chaining."""
        self.records[q(name, rtype)] = result
        return self

    def copy(self) -> Zone:
        return Zone(self.records, self.default)

    def __call__(self, queries: Iterable[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        asked = frozenset(queries)
        self.rounds.append(asked)
        return {query: self.records.get(query, self.default) for query in asked}


def standard_zone() -> Zone:
    """A small world shared by many tests (names as in the conformance corpus)."""
    return Zone(
        {
            q(OUTSIDER, "PTR"): answer(OUTSIDER_HELO),
            q(OUTSIDER_HELO, "A"): answer(OUTSIDER),
            q("192.0.2.10", "PTR"): answer("client.example.com"),
            q("client.example.com", "A"): answer("192.0.2.10"),
            q("2001:db8::10", "PTR"): answer("v6.example.com"),
            q("v6.example.com", "AAAA"): answer("2001:db8::10"),
            q("known.example", "A"): answer("192.0.2.60"),
            q("known.example", "MX"): NODATA,
            q("known.example", "AAAA"): NODATA,
            q("partner.example", "MX"): answer("10 mx.partner.example"),
            q("elsewhere.example", "MX"): answer("10 mx.elsewhere.example"),
            q("spam.example", "A"): answer("192.0.2.70"),
            q("sub.spam.example", "A"): answer("192.0.2.71"),
            q("vip.example", "A"): answer("192.0.2.72"),
        }
    )


def session(ip: str = OUTSIDER, helo: str | None = OUTSIDER_HELO, **kwargs: Any) -> Session:
    return Session(ip, helo=helo, **kwargs)


def rcpt(
    recipient: str,
    sender: str | None = "s@known.example",
    recipients: Iterable[str] = (),
    declared_size: int | None = None,
    discard: str | None = None,
) -> Envelope:
    return Envelope(
        Stage.RCPT,
        sender=sender,
        recipient=recipient,
        recipients=tuple(recipients),
        declared_size=declared_size,
        discard=discard,
    )


def eod(
    message: MessageFacts,
    recipients: Iterable[str] = ("r@example.com",),
    sender: str = "s@known.example",
) -> Envelope:
    return Envelope(Stage.END_OF_DATA, sender=sender, recipients=tuple(recipients), message=message)


def resolve(
    policy: Policy,
    sess: Session,
    envelope: Envelope,
    zone: Zone,
    max_rounds: int = 10,
    memo: Memo | None = None,
) -> tuple[Session, list[frozenset[DnsQuery]]]:
    """Ask ``zone`` what :func:`mailpolicy.decide` wants until it decides.

    Returns the session with every answer, and the questions of each round.
    """
    rounds: list[frozenset[DnsQuery]] = []

    def answer(queries: frozenset[DnsQuery]) -> dict[DnsQuery, DnsResult]:
        rounds.append(queries)
        return zone(queries)

    sess, _ = decide_with(policy, sess, envelope, answer, memo, rounds=max_rounds)
    if isinstance(decide(policy, sess, envelope, memo), Lookups):
        raise AssertionError(f"lookups did not converge: {rounds}")
    return sess, rounds


def judge(
    policy: Policy,
    envelope: Envelope,
    sess: Session | None = None,
    zone: Zone | None = None,
    memo: Memo | None = None,
) -> Verdict:
    """The verdict after resolving every question against ``zone``."""
    sess = sess if sess is not None else session()
    zone = zone if zone is not None else standard_zone()
    sess, _ = resolve(policy, sess, envelope, zone, memo=memo)
    return evaluate(policy, sess, envelope, memo)
