"""The admin web app (flask): login, access-rights grid, server-info, trusted agents,
sessions, audit log.

Every POST carries a CSRF token bound to the browser's session; the session cookie is
HttpOnly, SameSite=Strict, and Secure when `[admin] secure_cookie` is set (the pages
reached over HTTPS).  Edits are validated by the real table loaders before they are
saved; a save names the file version it was built from, so a second admin editing
the same version gets a conflict instead of overwriting the first one's change.
After a save the running roles get SIGHUP (as `appliance reload` does).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from flask import Flask, Response, abort, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from jinja2 import DictLoader

from appliance.accounts import admins as accounts
from appliance.admin import audit, grid, usage_page
from appliance.admin.files import Conflict, read_versioned, save_if_unchanged
from appliance.admin.templates import CSS, TEMPLATES
from appliance.core.config import Config
from appliance.core.tomlfile import ConfigError
from appliance.net.firewall import revoker
from appliance.policy import trusted_agents
from appliance.policy.access_rights import AccessTable
from appliance.policy.server_info import ServerTable
from appliance.policy.tables import check_texts
from appliance.portal.security import RateLimiter
from appliance.state import appliances, schema, store, usage
from appliance.state.admin_logins import AdminLogins
from appliance.state.connection import STORE_ERRORS, Connection
from appliance.state.sessions import SessionStore

log = logging.getLogger("appliance.admin")
LOGIN_FAILURES_ALLOWED = 5
LOGIN_WINDOW = 300.0
LOGIN_LIFETIME = timedelta(minutes=30)
_AGENTS_TEMPLATE = """# Trusted personal agents: the attribute keys each may assert.
# A login through any agent not listed here carries only source = "agent" and agent = <host>.
#
# [agents."corp.example"]          # its users log in as user@corp.example
# fingerprints = ["sha256:..."]    # `personal-agent fingerprint` on that agent
# domains = ["agent.corp.example"] # or: a CA-verified certificate for this name
# attributes = ["department", "role"]
"""


def session_store(config: Config) -> SessionStore:
    """The shared session store, with the firewall's revoke attached to end()."""
    return SessionStore.from_config(config, revoke=revoker(config))


def _secret_key(config: Config) -> bytes:
    """A per-appliance signing key kept in the state directory (mode 0600)."""
    path = config.state.directory / "admin-secret.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def create_app(
    config: Config,
    *,
    sessions: Callable[[Config], SessionStore] = session_store,
    notify: Callable[[Config], object] | None = None,
) -> Flask:
    """The app; `sessions` and `notify` (after a save, default: SIGHUP the roles) are
    replaceable for tests."""
    app = Flask("appliance.admin")
    app.jinja_loader = DictLoader(TEMPLATES)
    app.config.update(
        SECRET_KEY=_secret_key(config),
        SESSION_COOKIE_NAME="appliance_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=config.admin.secure_cookie,
        PERMANENT_SESSION_LIFETIME=LOGIN_LIFETIME,
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,
    )
    if notify is None:
        from appliance.core.pidfiles import signal_roles

        notify = signal_roles
    failures = RateLimiter(LOGIN_FAILURES_ALLOWED, LOGIN_WINDOW)
    logins = AdminLogins(store.open_store(config.state))

    def csrf_token() -> str:
        token = session.get("csrf")
        if not isinstance(token, str):
            token = secrets.token_urlsafe(32)
            session["csrf"] = token
        return token

    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.filters["human_bytes"] = usage_page.human_bytes

    @app.before_request
    def guard() -> ResponseReturnValue | None:
        if request.method == "POST":
            sent = request.form.get("csrf", "")
            expected = session.get("csrf")
            # bytes: compare_digest refuses str with non-ASCII characters (TypeError)
            if not isinstance(expected, str) or not hmac.compare_digest(
                sent.encode(), expected.encode()
            ):
                log.warning("admin: refused a POST to %s without a valid CSRF token", request.path)
                abort(400, "CSRF token missing or wrong: reload the page and try again")
        if request.endpoint in ("login", "css"):
            return None
        if not session.get("admin"):
            return redirect(url_for("login"))
        if not logins.live(session.get("login"), session.get("admin")):
            # logged out, removed or given a new password since this cookie was signed
            session.clear()
            return redirect(url_for("login"))
        if request.method == "POST" and request.endpoint != "logout":
            try:  # a change the audit log could not record is not made
                audit.reachable(config)
            except STORE_ERRORS as exc:
                log.error("admin: the state store cannot be reached (%s): change refused", exc)
                abort(503, "The state store cannot be reached for the audit log: nothing changed.")
        return None

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'"
        )
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def admin() -> str:
        return str(session["admin"])

    def page(template: str, status: int = 200, **kw: object) -> tuple[str, int]:
        return render_template(template, admin=session.get("admin"), **kw), status

    @app.get("/admin.css")
    def css() -> Response:
        return Response(CSS, mimetype="text/css")

    @app.route("/login", methods=["GET", "POST"])
    def login() -> ResponseReturnValue:
        if request.method == "GET":
            return page("login.html")
        ip = request.remote_addr or "?"
        if failures.retry_after(ip):
            return page("login.html", 429, error="Too many failed logins: wait a few minutes.")
        name = request.form.get("name", "").strip()
        if not accounts.check_login(config.policies.admins, name, request.form.get("password", "")):
            failures.fail(ip)
            log.warning("admin: failed login for %r from %s", name, ip)
            return page("login.html", 403, error="Wrong admin name or password.")
        failures.reset(ip)
        session.clear()  # a fresh session (and CSRF token) after login
        session.permanent = True
        session["admin"] = name
        session["login"] = logins.start(name, LOGIN_LIFETIME.total_seconds())
        log.info("admin: %s logged in from %s", name, ip)
        return redirect(url_for("access"))

    @app.post("/logout")
    def logout() -> ResponseReturnValue:
        logins.end(session.get("login"))
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    def index() -> ResponseReturnValue:
        return redirect(url_for("access"))

    # -- access rights ------------------------------------------------------
    def current_tables() -> tuple[ServerTable, AccessTable]:
        return check_texts(config)

    @app.get("/access")
    def access() -> ResponseReturnValue:
        _text, version = read_versioned(config.policies.access)
        try:
            servers, table = current_tables()
        except ConfigError as exc:
            return page("error.html", 500, error=f"The tables on disk are invalid: {exc}")
        return page(
            "access.html",
            rows=grid.rows_of(table),
            services=list(servers.services),
            version=version,
            saved=request.args.get("saved"),
        )

    @app.post("/access")
    def access_save() -> ResponseReturnValue:
        path = config.policies.access
        old_text, _ = read_versioned(path)
        try:
            servers = check_texts(config, access_text="")[0]  # the server table alone
        except ConfigError as exc:
            return page("error.html", 500, error=f"The server table on disk is invalid: {exc}")
        services = list(servers.services)
        version = request.form.get("version", "")
        rows: list[grid.Row] = []
        try:
            rows = grid.rows_from_form(request.form, services)
            new_text = grid.to_toml(rows, old_text)
            check_texts(config, access_text=new_text)
            save_if_unchanged(path, new_text, version)
        except (grid.GridError, ConfigError) as exc:
            return page(
                "access.html", 400, rows=rows, services=services, version=version, error=str(exc)
            )
        except Conflict as exc:
            _, now_version = read_versioned(path)
            return page(
                "access.html",
                409,
                rows=rows,
                services=services,
                version=now_version,
                conflict=str(exc),
            )
        changed(path, "edit access rights", old_text, new_text)
        return redirect(url_for("access", saved=1))

    def changed(path: Path, action: str, old: str, new: str) -> None:
        """A saved table: the roles are told first (it is on disk), then the log."""
        assert notify is not None
        notify(config)
        record(action, str(path), audit.diff(old, new, path.name))

    def record(action: str, target: str, diff: str = "") -> None:
        try:
            audit.record(config, admin(), action, target, diff)
        except STORE_ERRORS as exc:  # checked just before: a blip since; said loudly
            log.error("audit: could not record %s %s by %s: %s", action, target, admin(), exc)

    # -- server info --------------------------------------------------------
    @app.get("/servers")
    def servers_page() -> ResponseReturnValue:
        text, version = read_versioned(config.policies.servers)
        try:
            services = list(current_tables()[0].services.values())
        except ConfigError as exc:  # show the text anyway, so it can be repaired here
            return page("servers.html", text=text, version=version, error=str(exc))
        return page(
            "servers.html",
            text=text,
            version=version,
            services=services,
            saved=request.args.get("saved"),
        )

    def save_text(
        path: Path, template: str, check: Callable[[str], object]
    ) -> tuple[tuple[str, int] | None, str, str, object]:
        """One table edited as text: validated by `check`, saved only over the version the
        admin saw.  (error page or None, old text, new text, what `check` returned)."""
        old_text, _ = read_versioned(path)
        text = request.form.get("text", "").replace("\r\n", "\n")
        version = request.form.get("version", "")
        try:
            checked = check(text)
            save_if_unchanged(path, text, version)
        except ConfigError as exc:
            return page(template, 400, text=text, version=version, error=str(exc)), "", "", None
        except Conflict as exc:
            _, now = read_versioned(path)
            return page(template, 409, text=text, version=now, conflict=str(exc)), "", "", None
        return None, old_text, text, checked

    @app.post("/servers")
    def servers_save() -> ResponseReturnValue:
        path = config.policies.servers
        error, old_text, text, _ = save_text(
            path, "servers.html", lambda t: check_texts(config, servers_text=t)
        )
        if error is not None:
            return error
        changed(path, "edit server info", old_text, text)
        return redirect(url_for("servers_page", saved=1))

    # -- trusted agents -----------------------------------------------------
    @app.get("/agents")
    def agents_page() -> ResponseReturnValue:
        path = config.policies.agents
        text, version = read_versioned(path)
        if not text:
            text = _AGENTS_TEMPLATE
        try:
            table = trusted_agents.parse_text(text, path)
        except ConfigError as exc:  # show the text anyway, so it can be repaired here
            return page("agents.html", text=text, version=version, error=str(exc))
        return page(
            "agents.html",
            text=text,
            version=version,
            agents=table.agents,
            saved=request.args.get("saved"),
        )

    @app.post("/agents")
    def agents_save() -> ResponseReturnValue:
        path = config.policies.agents
        error, old_text, text, new_table = save_text(
            path, "agents.html", lambda t: trusted_agents.parse_text(t, path)
        )
        if error is not None:
            return error
        assert isinstance(new_table, trusted_agents.AgentTable)
        changed(path, "edit trusted agents", old_text, text)
        end_untrusted_sessions(old_text, new_table)
        return redirect(url_for("agents_page", saved=1))

    def end_untrusted_sessions(old_text: str, new_table: trusted_agents.AgentTable) -> None:
        """Sessions holding attributes the new table no longer gives their agent end now
        (the visitor logs in again and gets what the new table gives)."""
        try:
            old_table: trusted_agents.AgentTable | None = trusted_agents.parse_text(
                old_text, config.policies.agents
            )
        except ConfigError:
            old_table = None
        store = session_list()
        for s in store.list():
            source, attrs = str(getattr(s, "source", "")), getattr(s, "attributes", {})
            why = f"trust in {source} changed by admin {admin()}"
            if trusted_agents.no_longer_vouched(old_table, new_table, source, attrs) and store.end(
                s.id, why
            ):
                record("end session", f"{s.user} {s.ip} {s.mac}")

    # -- sessions -----------------------------------------------------------
    per_thread = threading.local()

    def session_list() -> SessionStore:
        """This thread's store (one SQLite connection each, not one per request)."""
        store: SessionStore | None = getattr(per_thread, "store", None)
        if store is None:
            store = per_thread.store = sessions(config)
        return store

    @app.get("/sessions")
    def sessions_page() -> ResponseReturnValue:
        store = session_list()
        items = sorted(store.list(), key=lambda s: s.created)
        conn = getattr(store, "conn", None)  # several boxes on one store: whose is it
        boxes = appliances.listed(conn) if conn is not None else []
        where = {s.id: appliances.serving(boxes, s.ip) for s in items}
        return page("sessions.html", items=items, now=time.time(), where=where)

    @app.post("/sessions/end")
    def session_end() -> ResponseReturnValue:
        store = session_list()
        sid = request.form.get("id", "")
        s = store.get(sid)
        if s is None or not store.end(sid, f"ended by admin {admin()}"):
            return page("error.html", 404, error="No such active session.")
        record("end session", f"{s.user} {s.ip} {s.mac}")
        return redirect(url_for("sessions_page"))

    # -- usage --------------------------------------------------------------
    def usage_store() -> Connection:
        """This thread's connection to the accounting tables (the proxy writes them)."""
        conn = getattr(per_thread, "usage", None)
        if conn is None:
            conn = per_thread.usage = store.open_store(config.state)
            schema.upgrade(conn)
        return conn

    @app.get("/usage")
    def usage_page_view() -> ResponseReturnValue:
        period = usage_page.period_days(request.args.get("period"))
        return page("usage.html", **usage_page.page_data(usage_store(), period))

    @app.get("/usage.csv")
    def usage_csv() -> Response:
        period = usage_page.period_days(request.args.get("period"))
        first, last = usage.days_back(int(period))
        text = usage_page.csv_text(usage.csv_rows(usage_store(), first, last))
        return Response(
            text,
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="usage-{first}-{last}.csv"'},
        )

    # -- audit --------------------------------------------------------------
    @app.get("/audit")
    def audit_page() -> ResponseReturnValue:
        return page("audit.html", entries=audit.tail(config))

    return app


__all__ = ["create_app", "session_store"]
