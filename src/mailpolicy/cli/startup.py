"""What the long-running commands (``serve``, ``policyd``) load before they
listen, each problem one line for the user (exit status 2)."""

from __future__ import annotations

import contextlib
import json

from ..adapters.dns import LiveResolver, Resolver, StaticZone, ZoneError
from ..adapters.state import RedisStore, StateStore, StateStoreError
from ..config import PolicyError, load_settings
from ..settings import Settings

__all__ = ["StartupError", "check_store", "load_resolver", "load_settings_or_fail"]


class StartupError(Exception):
    """A start-up problem, worded for the user (printed after ``mailpolicy: ``)."""


def load_settings_or_fail(path: str) -> Settings:
    try:
        return load_settings(path)
    except PolicyError as e:
        raise StartupError(e.report()) from None


def load_resolver(zone_file: str | None, settings: Settings) -> Resolver:
    """A static zone from ``--dns ZONE.json``, else the configured resolvers."""
    if not zone_file:
        return LiveResolver.from_settings(settings.dns)
    try:
        with open(zone_file, "rb") as f:
            return StaticZone.from_mapping(json.load(f), source=zone_file)
    except (OSError, ValueError, ZoneError) as e:
        raise StartupError(f"{zone_file}: {e}") from None


async def check_store(store: StateStore) -> None:
    """A Redis store must answer before we listen: better a clear refusal to
    start than a 4xx for every client. (Memory stores always answer.)"""
    if not isinstance(store, RedisStore):
        return
    try:
        await store.ping()
    except StateStoreError as e:
        with contextlib.suppress(StateStoreError):
            await store.close()
        raise StartupError(f"--state: {e}") from None
