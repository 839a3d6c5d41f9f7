"""``mailpolicy route``: where would mail from SENDER to these recipients go?

Prints one route per recipient (see :mod:`mailpolicy.routing`), as text or,
with ``--json``, one JSON object per line::

    {"recipient": "bob@example.net", "kind": "smtp",
     "next_hops": [{"host": "mx1.example.net", "port": 25, "security": "none"}],
     "reason": "delivery.mode = direct: MX of example.net: 10 mx1.example.net"}

``kind`` is ``"local"`` (with ``"mailbox"``), ``"smtp"`` (with
``"next_hops"`` in the order to try; a hop with credentials also names its
``"username"`` and ``"password_env"``, never a password) or ``"error"`` (with
``"error": {"code", "enhanced", "text", "temporary"}``). A route for an
external postmaster carries ``"mailbox"``, the address it was rewritten to,
whatever its kind.

DNS answers come from ``--dns ZONE.json`` (a static zone, docs/replay-format.md's ``dns``
object) or else from the policy's ``[dns]`` nameservers (the network). Exit
status: 0 when every recipient has a route, 1 when any is an error, 2 for a
usage, policy or zone error (``file: key: reason`` on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
from typing import TYPE_CHECKING, Any

from ..model import NextHop, Route, RouteKind

if TYPE_CHECKING:
    from ..adapters.dns import StaticZone

__all__ = ["register", "route_to_json", "route_to_text", "run"]


def register(sub: Any) -> None:
    """Add the ``route`` sub-command to the ``mailpolicy`` parser."""
    p = sub.add_parser(
        "route",
        help="show where mail to each recipient would be delivered",
        description="Decide, for each recipient, local delivery, the SMTP next hops in "
        "order, or the error, under a policy file; with a static DNS zone or the "
        "policy's name servers.",
    )
    p.add_argument("--policy", required=True, metavar="POLICY.toml", help="the policy file")
    p.add_argument(
        "--dns",
        metavar="ZONE.json",
        help="answer DNS questions from this static zone (a replay case's dns object, "
        'docs/replay-format.md, or a case file with a "dns" key) instead of the network',
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed for the order of MX hosts of equal preference (default: random)",
    )
    p.add_argument(
        "--our-address",
        action="append",
        default=[],
        metavar="IP",
        help="an address of this server, to spot ourselves among MX hosts (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line and recipient")
    p.add_argument(
        "--from",
        dest="sender",
        required=True,
        metavar="SENDER",
        help='the envelope sender ("" or "<>" for the null sender)',
    )
    p.add_argument("recipients", nargs="+", metavar="RCPT")
    p.set_defaults(func=run)


def _hop_json(hop: NextHop) -> dict[str, Any]:
    out: dict[str, Any] = {"host": hop.host, "port": hop.port, "security": hop.security}
    if hop.username is not None:
        out["username"] = hop.username
    if hop.password_env is not None:
        out["password_env"] = hop.password_env
    return out


def route_to_json(route: Route) -> dict[str, Any]:
    """The JSON object ``--json`` prints for ``route``."""
    out: dict[str, Any] = {"recipient": route.recipient, "kind": route.kind.value}
    if route.mailbox is not None:
        out["mailbox"] = route.mailbox
    if route.kind is RouteKind.SMTP:
        out["next_hops"] = [_hop_json(h) for h in route.next_hops]
    if route.error is not None:
        out["error"] = {
            "code": route.error.code,
            "enhanced": route.error.enhanced,
            "text": route.error.text,
            "temporary": route.error.temporary,
        }
    out["reason"] = route.reason
    return out


def route_to_text(route: Route) -> str:
    """Two lines: the recipient and its route, then the reason, indented."""
    if route.kind is RouteKind.LOCAL:
        what = f"local {route.mailbox}"
    elif route.kind is RouteKind.SMTP:
        hops = ", ".join(f"{h.host}:{h.port} ({h.security})" for h in route.next_hops)
        what = f"smtp {hops}"
        if route.mailbox is not None:
            what += f" as {route.mailbox}"
    else:
        what = f"error {route.error}"
    return f"{route.recipient}: {what}\n    {route.reason}"


def run(args: argparse.Namespace) -> int:
    """Run ``mailpolicy route``; the exit status."""
    # imported here: dnspython and the loader are not needed for --help
    from ..adapters.dns import LiveResolver, Resolver, ZoneError
    from ..adapters.routing import resolve_routes
    from ..config import PolicyError, load_settings

    try:
        settings = load_settings(args.policy)
    except PolicyError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    try:
        ours = frozenset(_address(a) for a in args.our_address)
    except ValueError as exc:
        print(f"mailpolicy route: --our-address: {exc}", file=sys.stderr)
        return 2
    resolver: Resolver
    if args.dns:
        try:
            resolver = _load_zone(args.dns)
        except (ZoneError, _ZoneFileError) as exc:
            print(exc, file=sys.stderr)
            return 2
    else:
        try:
            resolver = LiveResolver.from_settings(settings.dns)
        except ValueError as exc:
            print(f"{args.policy}: dns.nameservers: {exc}", file=sys.stderr)
            return 2
    sender = "" if args.sender.strip() in ("", "<>") else args.sender.strip().strip("<>")
    recipients = [r.strip().removeprefix("<").removesuffix(">") for r in args.recipients]
    rng = random.Random(args.seed)
    routes = asyncio.run(
        resolve_routes(settings, sender, recipients, resolver, rng, our_addresses=ours)
    )
    for route in routes:
        if args.json:
            print(json.dumps(route_to_json(route)))
        else:
            print(route_to_text(route))
    return 1 if any(r.kind is RouteKind.ERROR for r in routes) else 0


def _address(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))


class _ZoneFileError(Exception):
    """A zone file that cannot be read or is not JSON: ``file: reason``."""


def _load_zone(path: str) -> StaticZone:
    from ..adapters.dns import StaticZone

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise _ZoneFileError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _ZoneFileError(f"{path}: not valid JSON: {exc}") from None
    # a whole replay case works too: its "dns" object is the zone
    if isinstance(data, dict) and isinstance(data.get("dns"), dict) and "session" in data:
        return StaticZone.from_mapping(data["dns"], source=f"{path}: dns")
    return StaticZone.from_mapping(data, source=path)
