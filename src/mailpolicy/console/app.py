"""The console's web application (Starlette, Jinja2 templates).

Safety: every POST carries a CSRF token that must equal the ``mpc_csrf``
cookie (``SameSite=Strict``, so another site's page cannot send it) and an
``Origin`` (or ``Referer``) of this console when the browser gives one; with a
password hash or token configured, every request needs the session cookie
set by logging in (or ``Authorization: Bearer TOKEN``). Templates
autoescape everything.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import PolicyError, PolicyIssue, load_settings
from ..passwords import verify_password
from . import model
from .model import SECTIONS, Draft

__all__ = ["ConsoleConfig", "create_app"]

_LIST_FIELDS = ("client", "client_hostname", "helo", "sender", "recipient")
PAGE_SIZE = 50
_SESSION = "mpc_session"
_CSRF = "mpc_csrf"


@attrs.frozen
class ConsoleConfig:
    policy: Path
    captures: Path | None = None
    pid_file: Path | None = None
    metrics_url: str | None = None
    decision_log: Path | None = None
    password_hash: str | None = None
    token: str | None = None
    read_only: bool = False

    @property
    def needs_login(self) -> bool:
        return bool(self.password_hash or self.token)


Handler = Callable[[Request], Awaitable[Response]]


class Console:
    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.draft = Draft(config.policy)
        self.sessions: set[str] = set()
        self.env = Environment(
            loader=PackageLoader("mailpolicy.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        #: (time, refusals by rule) samples for the chart of the last hour
        self.history: deque[tuple[float, dict[str, float]]] = deque()
        self.last_apply: dict[str, Any] | None = None

    # -- plumbing ------------------------------------------------------------

    def render(self, request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        csrf = request.cookies.get(_CSRF) or secrets.token_urlsafe(24)
        html = self.env.get_template(name).render(
            sections=SECTIONS,
            csrf=csrf,
            read_only=self.config.read_only,
            pending=self.draft.pending,
            policy=str(self.config.policy),
            logged_in=self.config.needs_login,
            path=request.url.path,
            **ctx,
        )
        response = HTMLResponse(html, status_code=status)
        if request.cookies.get(_CSRF) != csrf:
            response.set_cookie(_CSRF, csrf, httponly=True, samesite="strict")
        return response

    def authenticated(self, request: Request) -> bool:
        if not self.config.needs_login:
            return True
        if request.cookies.get(_SESSION) in self.sessions:
            return True
        auth = request.headers.get("authorization", "")
        token = self.config.token
        return bool(
            token
            and auth.startswith("Bearer ")
            and hmac.compare_digest(auth[7:].encode(), token.encode())
        )

    def same_origin(self, request: Request) -> bool:
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source:
            return True  # not a browser: the CSRF token still has to match
        parts = urlsplit(source)
        return parts.netloc == request.headers.get("host") and parts.scheme == request.url.scheme

    async def csrf_ok(self, request: Request) -> tuple[bool, Any]:
        form = await request.form()
        cookie = request.cookies.get(_CSRF, "")
        sent = form.get("csrf")
        ok = (
            self.same_origin(request)
            and bool(cookie)
            and isinstance(sent, str)
            and hmac.compare_digest(sent.encode(), cookie.encode())
        )
        return ok, form

    def guarded(self, handler: Handler, *, change: bool = False) -> Handler:
        async def run(request: Request) -> Response:
            if not self.authenticated(request):
                if request.method == "GET" and not request.url.path.endswith(".json"):
                    return RedirectResponse("/login", status_code=303)
                return Response("login required\n", status_code=401)
            if request.method == "POST":
                ok, form = await self.csrf_ok(request)
                if not ok:
                    return Response(
                        "refused: cross-site request (bad CSRF token or Origin)\n",
                        status_code=403,
                    )
                if change and self.config.read_only:
                    return Response("refused: the console is read-only\n", status_code=403)
                request.state.form = form
            return await handler(request)

        return run

    # -- pages ----------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.render(request, "login.html")
        ok, form = await self.csrf_ok(request)
        if not ok:
            return Response("refused: cross-site request\n", status_code=403)
        secret = str(form.get("secret", ""))
        good = False
        if self.config.token and hmac.compare_digest(secret.encode(), self.config.token.encode()):
            good = True
        elif self.config.password_hash:
            # scrypt takes a while: off the event loop
            good = await asyncio.to_thread(verify_password, secret, self.config.password_hash)
        if not good:
            return self.render(request, "login.html", status=401, error="wrong password or token")
        session = secrets.token_urlsafe(32)
        self.sessions.add(session)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(_SESSION, session, httponly=True, samesite="strict")
        return response

    async def index(self, request: Request) -> Response:
        return RedirectResponse("/section/general", status_code=303)

    def _section(self, slug: str) -> model.Section | None:
        return next((s for s in SECTIONS if s.slug == slug), None)

    async def section(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        section = self._section(slug)
        if section is None:
            return Response("no such section\n", status_code=404)
        if slug == "lists":
            return self.lists_page(request)
        issues: tuple[PolicyIssue, ...] = ()
        data: dict[str, Any] = self.draft.data
        saved = False
        if request.method == "POST":
            form = request.state.form
            changes: dict[str, Any] = {}
            for group in section.groups:
                for f in model.fields(group, {}):
                    if f.kind != "bool" and f.path not in form:
                        continue
                    raw = form.get(f.path)
                    value = model.parse_field(f.kind, raw if isinstance(raw, str) else None)
                    if value == f.value and model.get_path(self.draft.data, f.path) is None:
                        continue  # a default left as it is stays out of the file
                    changes[f.path] = value
            issues = self.draft.update(changes)
            if issues:
                # show what was typed, with the loader's reasons next to it
                data = json.loads(json.dumps(self.draft.data))
                for path, value in changes.items():
                    model._set_path(data, path, value)
            else:
                saved = True
                data = self.draft.data  # the new draft
        groups = [(g, model.fields(g, data, issues)) for g in section.groups]
        placed = {e for _, fs in groups for f in fs for e in f.errors}
        others = [str(i) for i in issues if i.reason not in placed]
        return self.render(
            request,
            "section.html",
            status=400 if issues else 200,
            section=section,
            groups=groups,
            others=others,
            saved=saved,
            exceptions=model.get_path(data, "delivery.exceptions") if slug == "delivery" else None,
        )

    def _lists(self) -> list[dict[str, Any]]:
        lists = model.get_path(self.draft.data, "security.lists")
        return [dict(x) for x in lists] if isinstance(lists, list) else []

    def lists_page(self, request: Request, issues: tuple[PolicyIssue, ...] = ()) -> Response:
        q = request.query_params.get("q", "").strip().lower()
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            page = 1
        rules = self._lists()
        entries = [
            (i, rule.get("name", ""), field, str(value))
            for i, rule in enumerate(rules)
            for field in _LIST_FIELDS
            for value in rule.get(field, [])
            if not q or q in str(value).lower() or q in str(rule.get("name", "")).lower()
        ]
        pages = max(1, -(-len(entries) // PAGE_SIZE))
        page = min(page, pages)
        shown = entries[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        help_ = model.help_rows()
        return self.render(
            request,
            "lists.html",
            status=400 if issues else 200,
            section=self._section("lists"),
            rules=rules,
            entries=shown,
            total=len(entries),
            q=q,
            page=page,
            pages=pages,
            fields=_LIST_FIELDS,
            help={f: help_.get(f"security.lists[].{f}") for f in _LIST_FIELDS},
            errors=[str(i) for i in issues],
        )

    async def lists_change(self, request: Request) -> Response:
        form = request.state.form
        op = str(form.get("op", ""))
        rules = self._lists()
        if op == "new-rule":
            rules.append(
                {"name": str(form.get("name", "")).strip(), "list": str(form.get("list", "black"))}
            )
        else:
            try:
                index = int(str(form.get("rule", "")))
                rule = rules[index]
            except (ValueError, IndexError):
                return Response("no such rule\n", status_code=400)
            field = str(form.get("field", ""))
            if field not in _LIST_FIELDS:
                return Response("no such field\n", status_code=400)
            value = str(form.get("value", "")).strip()
            values = list(rule.get(field, []))
            if op == "add" and value:
                values.append(value)
            elif op == "remove" and value in values:
                values.remove(value)
            rule[field] = values
            if not values:
                rule.pop(field)
        issues = self.draft.replace_lists(rules)
        if issues:
            return self.lists_page(request, issues)
        return RedirectResponse("/section/lists", status_code=303)

    async def preview(self, request: Request) -> Response:
        try:
            old = load_settings(self.config.policy)
            new = self.draft.check(self.draft.data)
        except PolicyError as e:
            return self.render(request, "error.html", status=400, message=e.report())
        result = await model.preview(old, new, self.config.captures)
        return self.render(
            request,
            "preview.html",
            result=result,
            captures=str(self.config.captures) if self.config.captures else None,
            reply=_reply,
        )

    async def apply(self, request: Request) -> Response:
        try:
            self.draft.check(self.draft.data)
        except PolicyError as e:
            return self.render(request, "error.html", status=400, message=e.report())
        before = None
        url = self.config.metrics_url
        if url:
            try:
                before = (await asyncio.to_thread(model.scrape_metrics, url)).generation
            except OSError:
                before = None
        backup = model.apply_file(self.config.policy, self.draft.data)
        self.draft.reset()
        outcome: dict[str, Any] = {"backup": str(backup), "at": time.strftime("%H:%M:%S")}
        if self.config.pid_file is not None:
            try:
                outcome["pid"] = model.reload_server(self.config.pid_file)
            except (OSError, ValueError) as e:
                outcome["reload_error"] = str(e)
            if url and "pid" in outcome:
                snap = await asyncio.to_thread(model.wait_generation, url, before or 0)
                if snap is not None:
                    outcome["generation"] = snap.generation
                    outcome["reload_ok"] = snap.last_reload_ok
        self.last_apply = outcome
        return self.render(request, "applied.html", outcome=outcome)

    async def discard(self, request: Request) -> Response:
        self.draft.reset()
        return RedirectResponse("/section/general", status_code=303)

    async def live(self, request: Request) -> Response:
        return self.render(request, "live.html", metrics=self.config.metrics_url)

    async def live_json(self, request: Request) -> Response:
        url = self.config.metrics_url
        log = self.config.decision_log
        refusals_log = await asyncio.to_thread(model.last_refusals, log) if log else []
        if not url:
            return JSONResponse({"error": "no --metrics URL given", "last": refusals_log})
        try:
            snap = await asyncio.to_thread(model.scrape_metrics, url)
        except OSError as e:
            return JSONResponse({"error": f"metrics: {e}"})
        now = time.time()
        refusals: dict[str, float] = {}
        for _stage, action, rule, mode, n in snap.verdicts:
            if action in ("reject", "defer") and mode != "observed":
                refusals[rule] = refusals.get(rule, 0) + n
        self.history.append((now, refusals))
        # the baseline: the last sample an hour old or more; before the
        # console has watched an hour, the server's counts since it started
        while len(self.history) > 1 and self.history[1][0] <= now - 3600:
            self.history.popleft()
        first = self.history[0][1] if self.history[0][0] <= now - 3600 else {}
        hour = {r: n - first.get(r, 0) for r, n in refusals.items()}
        return JSONResponse(
            {
                "generation": snap.generation,
                "sessions_open": snap.sessions_open,
                "verdicts": [
                    {"stage": s, "action": a, "rule": r, "mode": m, "count": n}
                    for s, a, r, m, n in snap.verdicts
                ],
                "refusals_last_hour": hour,
                "last": refusals_log,
            }
        )

    async def try_page(self, request: Request) -> Response:
        ctx: dict[str, Any] = {"form": {}, "replies": None, "error": None}
        if request.method == "POST":
            form = request.state.form
            values = {k: str(form.get(k, "")) for k in ("ip", "helo", "sender", "rcpt", "user")}
            values["zone"] = str(form.get("zone", ""))
            values["live"] = "on" if form.get("live") is not None else ""
            ctx["form"] = values
            try:
                zone = json.loads(values["zone"]) if values["zone"].strip() else {}
                if not isinstance(zone, dict):
                    raise ValueError("the zone must be a JSON object")
                ctx["replies"] = await model.try_session(
                    load_settings(self.config.policy),
                    ip=values["ip"].strip(),
                    helo=values["helo"].strip(),
                    sender=values["sender"].strip(),
                    recipients=values["rcpt"].split(),
                    user=values["user"].strip(),
                    zone=zone,
                    live=form.get("live") is not None,
                )
            except (ValueError, PolicyError) as e:
                ctx["error"] = str(e)
        return self.render(request, "try.html", **ctx)


def _reply(r: Any) -> str:
    if r is None:
        return "(not sent)"
    return f"{r.code or ''} {r.enhanced or ''} {r.text}".strip()


def create_app(config: ConsoleConfig) -> Starlette:
    """The console for ``config``: an ASGI application."""
    c = Console(config)
    g = c.guarded
    routes = [
        Route("/login", c.login, methods=["GET", "POST"]),
        Route("/", g(c.index)),
        Route("/section/{slug}", g(c.section, change=True), methods=["GET", "POST"]),
        Route("/lists", g(c.lists_change, change=True), methods=["POST"]),
        Route("/preview", g(c.preview)),
        Route("/apply", g(c.apply, change=True), methods=["POST"]),
        Route("/discard", g(c.discard, change=True), methods=["POST"]),
        Route("/live", g(c.live)),
        Route("/live.json", g(c.live_json)),
        Route("/try", g(c.try_page), methods=["GET", "POST"]),
        Mount("/static", StaticFiles(packages=[("mailpolicy.console", "static")]), name="static"),
    ]
    return Starlette(routes=routes)
