"""Prometheus metrics for the hosts of the policy (``serve``, ``policyd``).

One :class:`Metrics` holds its own registry (never the library's global one:
two servers in one process, or a test, do not mix their numbers). The host
loop (:func:`~.driver.run_connection`) tells it what passes: sessions,
replies, verdicts (observed ones too), DNS rounds, state-store calls and
deliveries; the reloader the policy's generation. :meth:`Metrics.serve`
answers ``GET /metrics`` in Prometheus' text format from a thread of its own.

Every method is cheap (a dictionary lookup and a locked add): the labelled
children are made once and kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ..model import DnsResult, Verdict

__all__ = ["Metrics"]

#: DNS and store latencies are milliseconds in the good case, seconds in the bad
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The numbers of one server, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.sessions_open = Gauge("mailpolicy_sessions_open", "Sessions open now", registry=r)
        self.sessions = Counter("mailpolicy_sessions", "Sessions started", registry=r)
        self.verdicts = Counter(
            "mailpolicy_verdicts",
            "Policy verdicts that decided something (a refusal, a rule's acceptance); "
            'mode="observed": what a rule in observe mode would have done',
            ["stage", "action", "rule", "mode"],
            registry=r,
        )
        self.replies = Counter(
            "mailpolicy_replies", "Replies sent, by code class", ["class"], registry=r
        )
        self.dns_queries = Counter(
            "mailpolicy_dns_queries", "DNS questions asked, by outcome", ["outcome"], registry=r
        )
        self.dns_latency = Histogram(
            "mailpolicy_dns_round_seconds",
            "Time to answer one round of DNS questions",
            buckets=_BUCKETS,
            registry=r,
        )
        self.store_calls = Counter(
            "mailpolicy_store_calls", "State-store calls, by counter kind", ["kind"], registry=r
        )
        self.store_errors = Counter(
            "mailpolicy_store_errors", "State-store calls that failed", ["kind"], registry=r
        )
        self.store_latency = Histogram(
            "mailpolicy_store_call_seconds",
            "State-store call latency",
            buckets=_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "mailpolicy_deliveries",
            "Messages handed to delivery, by outcome (delivered, deferred, failed, error)",
            ["outcome"],
            registry=r,
        )
        self.generation = Gauge(
            "mailpolicy_policy_generation", "Policy generation: 1 at start, +1 a reload", registry=r
        )
        self.loaded_at = Gauge(
            "mailpolicy_policy_loaded_timestamp_seconds",
            "When the running policy was loaded",
            registry=r,
        )
        self.last_reload = Gauge(
            "mailpolicy_policy_last_reload_timestamp_seconds",
            "When a reload was last attempted",
            registry=r,
        )
        self.last_reload_ok = Gauge(
            "mailpolicy_policy_last_reload_success",
            "1 when the last reload succeeded, 0 when it failed",
            registry=r,
        )
        self.reloads = Counter(
            "mailpolicy_policy_reloads", "Reloads, by result", ["result"], registry=r
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._server: Any = None

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- what the host loop reports ---------------------------------------------

    def session_opened(self) -> None:
        self.sessions.inc()
        self.sessions_open.inc()

    def session_closed(self) -> None:
        self.sessions_open.dec()

    def reply(self, code: int) -> None:
        self._child(self.replies, f"{code // 100}xx").inc()

    def verdict(self, stage: str, verdict: Verdict) -> None:
        """A decision the host logged (and the observed refusals in it)."""
        self._child(
            self.verdicts, stage, verdict.action.value, verdict.rule or "", "enforced"
        ).inc()

    def observed(self, stage: str, verdict: Verdict) -> None:
        for seen in verdict.observed:
            self._child(self.verdicts, stage, seen.action.value, seen.rule or "", "observed").inc()

    def dns(self, seconds: float, answers: Iterable[DnsResult]) -> None:
        self.dns_latency.observe(seconds)
        for result in answers:
            self._child(self.dns_queries, result.outcome.value).inc()

    def dns_failed(self, seconds: float) -> None:
        self.dns_latency.observe(seconds)
        self._child(self.dns_queries, "error").inc()

    def store(self, kind: str, seconds: float, ok: bool) -> None:
        self.store_latency.observe(seconds)
        self._child(self.store_calls, kind).inc()
        if not ok:
            self._child(self.store_errors, kind).inc()

    def delivery(self, code: int | None) -> None:
        if code is None:
            outcome = "error"
        elif code < 400:
            outcome = "delivered"
        elif code < 500:
            outcome = "deferred"
        else:
            outcome = "failed"
        self._child(self.deliveries, outcome).inc()

    # -- what the reloader reports ------------------------------------------------

    def policy_loaded(self, generation: int, when: float | None = None) -> None:
        self.generation.set(generation)
        self.loaded_at.set(time.time() if when is None else when)

    def reload_attempted(self, ok: bool, when: float | None = None) -> None:
        self.last_reload.set(time.time() if when is None else when)
        self.last_reload_ok.set(1 if ok else 0)
        self._child(self.reloads, "success" if ok else "failure").inc()

    # -- the endpoint ---------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Answer ``GET /metrics`` on ``host:port`` (port 0: any free one)
        from a daemon thread; returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
