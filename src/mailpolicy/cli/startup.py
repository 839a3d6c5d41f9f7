"""What the long-running commands (``serve``, ``policyd``) load before they
listen, each problem one line for the user (exit status 2)."""

from __future__ import annotations

import json

from ..adapters.dns import LiveResolver, Resolver, StaticZone, ZoneError
from ..config import PolicyError, load_settings
from ..settings import Settings

__all__ = ["StartupError", "load_resolver", "load_settings_or_fail"]


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
