"""``mailpolicy export postfix``: the ``main.cf`` lines that put a Postfix in
front of ``mailpolicy policyd``.

What Postfix enforces itself at the protocol level (sizes, recipient and
hop limits, HELO required, VRFY, AUTH over TLS only, connection limits, which
domains are ours, relay control, routing) becomes its native parameters;
every other decision of the policy goes through ``check_policy_service`` at
RCPT, with ``smtpd_delay_reject = yes`` as the policy's order of evaluation
says. Lookup tables are written next to ``main.cf`` as ``texthash:`` files
(read as they are, no ``postmap``), referenced by absolute path.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping

import attrs

from ...model import IPNetwork
from ...settings import RelayHost, Settings

__all__ = ["Export", "export_postfix", "postfix_network", "write_export"]


def postfix_network(net: IPNetwork) -> str:
    """A network as ``mynetworks`` spells it (IPv6 in brackets)."""
    if isinstance(net, ipaddress.IPv6Network):
        return f"[{net.network_address}]/{net.prefixlen}"
    return str(net)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _nexthop(host: RelayHost) -> str:
    return f"[{host.host}]:{host.port}"


@attrs.frozen
class Export:
    """``main`` (parameter -> value, in order) and ``tables`` (file name ->
    lines), before they are written."""

    main: Mapping[str, str]
    tables: Mapping[str, tuple[str, ...]]
    #: what the Postfix administrator still has to do, one line each
    notes: tuple[str, ...] = ()


def policy_service(endpoint: str, context: str) -> str:
    return f"check_policy_service {{ {endpoint}, policy_context={context} }}"


def export_postfix(settings: Settings, policyd: str, table_dir: str) -> Export:
    """The export of ``settings`` for a policy server at ``policyd``
    (``inet:HOST:PORT`` or ``unix:PATH``), its tables living in ``table_dir``."""
    if not policyd.startswith(("inet:", "unix:")):
        raise ValueError(f"--policyd {policyd!r}: inet:HOST:PORT or unix:PATH")
    g, relay, sec = settings.general, settings.relay, settings.security
    cp, adv = sec.connection_policy, sec.advanced
    auth = g.smtp_auth
    main: dict[str, str] = {}
    tables: dict[str, tuple[str, ...]] = {}
    notes: list[str] = []

    def table(name: str, lines: Iterable[str]) -> str:
        tables[name] = tuple(lines)
        return f"texthash:{os.path.join(table_dir, name)}"

    # who we are and what is ours
    main["myhostname"] = g.hostname
    main["smtpd_banner"] = g.banner.replace("$hostname", "$myhostname")
    main["mydestination"] = ", ".join(g.local_domains)
    nets = list(relay.trusted_networks)
    if auth.skip_for_local_network:
        nets += auth.local_networks
    main["mynetworks"] = " ".join(postfix_network(n) for n in nets)
    main["relay_domains"] = ", ".join(relay.inbound_domains)
    # protocol-level limits
    main["message_size_limit"] = str(g.max_message_size)
    main["smtpd_recipient_limit"] = str(g.max_recipients)
    main["hopcount_limit"] = str(g.max_hops)
    main["smtpd_helo_required"] = _yes(adv.require_helo)
    main["disable_vrfy_command"] = _yes(adv.disable_vrfy)
    # Connection limits are judged at connect, which Postfix asks no policy
    # server about with smtpd_delay_reject = yes: anvil counts them. Message and
    # recipient rates are counted by policyd (shared through --state).
    main["smtpd_client_connection_count_limit"] = str(cp.max_connections_per_client)
    main["smtpd_client_connection_rate_limit"] = str(cp.max_connection_rate_per_client)
    main["anvil_rate_time_unit"] = f"{cp.rate_window_seconds}s"
    # reply codes Postfix chooses itself
    main["relay_domains_reject_code"] = str(settings.replies.relay_denied)
    # SMTP AUTH: Postfix talks to Dovecot (or Cyrus); the accounts live there
    if auth.enabled and settings.accounts:
        main["smtpd_sasl_auth_enable"] = "yes"
        main["smtpd_sasl_type"] = "dovecot"
        main["smtpd_sasl_path"] = "private/auth"
        main["smtpd_tls_auth_only"] = _yes(auth.no_plaintext_without_tls)
        names = ", ".join(a.name for a in settings.accounts)
        notes.append(
            f"SASL: Postfix asks Dovecot (smtpd_sasl_path = private/auth) for the "
            f"accounts {names}; give them the policy's passwords there"
        )
    if settings.server.tls_cert and settings.server.tls_key:
        main["smtpd_tls_cert_file"] = os.path.abspath(settings.server.tls_cert)
        main["smtpd_tls_key_file"] = os.path.abspath(settings.server.tls_key)
        main["smtpd_tls_security_level"] = "may"
    else:
        notes.append("TLS: set smtpd_tls_cert_file / smtpd_tls_key_file to offer STARTTLS")
    # the decisions: client, HELO, sender, relay and recipient checks at RCPT
    main["smtpd_delay_reject"] = "yes"
    main["smtpd_client_restrictions"] = ""
    main["smtpd_helo_restrictions"] = ""
    main["smtpd_sender_restrictions"] = policy_service(policyd, "sender")
    main["smtpd_relay_restrictions"] = (
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
    )
    main["smtpd_recipient_restrictions"] = policy_service(policyd, "recipient")
    main["smtpd_data_restrictions"] = (
        "reject_unauth_pipelining" if adv.reject_unauth_pipelining else ""
    )
    # a policy server that cannot answer defers, it never accepts
    main["smtpd_policy_service_default_action"] = "451 4.3.5 Server configuration problem"
    # delivery
    delivery = settings.delivery
    if delivery.mode == "relay" and delivery.relay_host is not None:
        main["relayhost"] = _nexthop(delivery.relay_host)
    transport: list[str] = []
    by_sender: list[str] = []
    for exc in delivery.exceptions:
        hop = _nexthop(exc.relay_host)
        for target in exc.targets:
            if exc.match == "recipient":
                if "@" in target:
                    transport.append(f"{target} smtp:{hop}")
                else:
                    transport += [f"{target} smtp:{hop}", f".{target} smtp:{hop}"]
            else:
                by_sender.append(f"{target if '@' in target else '@' + target} {hop}")
    if transport:
        main["transport_maps"] = table("transport", transport)
    if by_sender:
        main["sender_dependent_relayhost_maps"] = table("sender_relayhost", by_sender)
    hosts = [delivery.relay_host] if delivery.relay_host is not None else []
    hosts += [e.relay_host for e in delivery.exceptions]
    tls_policy = sorted({f"{_nexthop(h)} encrypt" for h in hosts if h.security != "none"})
    if tls_policy:
        main["smtp_tls_policy_maps"] = table("tls_policy", tls_policy)
        if any(h.security == "tls" for h in hosts):
            main["smtp_tls_wrappermode"] = "yes"
    logins = sorted({f"{_nexthop(h)} {h.username}:${h.password_env}" for h in hosts if h.username})
    if logins:
        notes.append(
            "relay credentials: fill in the passwords in sasl_passwd (named after the "
            "environment variables the policy gives), then postmap it"
        )
        main["smtp_sasl_auth_enable"] = "yes"
        main["smtp_sasl_password_maps"] = table("sasl_passwd", logins)
    if g.max_attachment_size or g.disable_auto_forwarding:
        notes.append(
            "not enforced through Postfix: max_attachment_size_mb and "
            "disable_auto_forwarding need the message's content (a milter)"
        )
    return Export(main, tables, tuple(notes))


def render_main(export: Export) -> str:
    lines = [
        "# written by `mailpolicy export postfix`: merge into main.cf",
    ]
    lines += [f"# {note}" for note in export.notes]
    lines += [f"{key} = {value}".rstrip() for key, value in export.main.items()]
    return "\n".join(lines) + "\n"


def write_export(export: Export, out_dir: str) -> list[str]:
    """Write ``main.cf`` and the tables into ``out_dir``; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, lines in export.tables.items():
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        written.append(path)
    path = os.path.join(out_dir, "main.cf")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_main(export))
    written.append(path)
    return written
