"""Hot reload: read the policy file again and swap the compiled policy in.

:class:`PolicyReloader` is what ``mailpolicy serve`` runs on SIGHUP (and
what a ``policyd`` host can run the same way): the new file is loaded and
compiled completely, off the event loop, before anything changes; then one
assignment makes it the holder's policy. A file that does not load changes
nothing and is logged in one line (file, key, reason).

What a reload changes, and when:

* new sessions use the new policy from the moment it is swapped in;
* a session in progress keeps the policy it started with to its end (its
  transactions all answer by the same rules; a long session lasts at most
  ``server.max_session_seconds``);
* counters survive: they live in the state store, not in the policy;
* ``[server]`` (listeners, TLS, limits, timeouts), ``[dns]`` and
  ``delivery.maildir`` are read once at start: a change to them is logged as
  needing a restart, and the rest of the new policy still applies.

Each successful load is a new *generation* (1 at start), logged with its
load time and exported as metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..config import PolicyError, load_settings
from ..policy import Policy, compile_policy
from ..settings import Settings
from .metrics import Metrics

__all__ = ["PolicyHolder", "PolicyReloader", "needs_restart"]

log = logging.getLogger("mailpolicy.reload")


class PolicyHolder(Protocol):
    """What holds the running policy (:class:`~.server.MailServer`)."""

    policy: Policy


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The settings that changed but are only read at start."""
    changed = [name for name in ("server", "dns") if getattr(old, name) != getattr(new, name)]
    if old.delivery.maildir != new.delivery.maildir:
        changed.append("delivery.maildir")
    return changed


def _one_line(error: PolicyError) -> str:
    more = len(error.errors) - 1
    first = f"{error.source}: {error.key}: {error.reason}" if error.key else str(error.errors[0])
    return first + (f" (and {more} more)" if more > 0 else "")


class PolicyReloader:
    """Reloads ``path`` into ``holder.policy`` (and ``delivery.settings``,
    when the delivery reads its routing from settings); ``on_reload``
    callbacks get each new policy's settings (``serve --capture``)."""

    def __init__(
        self,
        holder: PolicyHolder,
        path: str | os.PathLike[str],
        *,
        delivery: Any = None,
        metrics: Metrics | None = None,
        on_reload: Iterable[Callable[[Settings], None]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.path = os.fspath(path)
        self.delivery = delivery
        self.metrics = metrics
        self.on_reload = list(on_reload)
        self.clock = clock
        #: 1 for the policy the server started with, +1 per successful reload
        self.generation = 1
        self.loaded_at = clock()
        self._lock = asyncio.Lock()
        if metrics is not None:
            metrics.policy_loaded(self.generation, self.loaded_at)

    def _load(self) -> Policy:
        return compile_policy(load_settings(self.path))

    async def reload(self) -> bool:
        """Load and swap in the file's policy; False (the running policy
        stays) when the file does not load. Reloads do not overlap: a
        second request waits for the first, then reads the file again."""
        async with self._lock:
            started = self.clock()
            try:
                policy = await asyncio.to_thread(self._load)
            except PolicyError as e:
                self._failed(started, _one_line(e))
                return False
            except Exception as e:  # the running policy must survive anything
                self._failed(started, f"{self.path}: {type(e).__name__}: {e}")
                return False
            old = self.holder.policy.settings
            for name in needs_restart(old, policy.settings):
                log.warning(
                    "reload: %s changed in %s; it takes effect after a restart", name, self.path
                )
            self.holder.policy = policy
            if (
                self.delivery is not None
                and hasattr(self.delivery, "settings")
                and old.delivery.maildir == policy.settings.delivery.maildir
            ):
                # routing reads local domains, relays and exceptions per message
                self.delivery.settings = policy.settings
            for callback in self.on_reload:
                callback(policy.settings)
            self.generation += 1
            self.loaded_at = self.clock()
            if self.metrics is not None:
                self.metrics.policy_loaded(self.generation, self.loaded_at)
                self.metrics.reload_attempted(True, self.loaded_at)
            log.info(
                "policy %s reloaded: generation %d, loaded at %s (%.0f ms)",
                self.path,
                self.generation,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                (self.loaded_at - started) * 1000,
            )
            return True

    def _failed(self, started: float, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reload_attempted(False, started)
        log.error("reload failed, generation %d stays in force: %s", self.generation, reason)
