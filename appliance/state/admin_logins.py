"""Admin logins kept server-side, so a cookie stops working when its admin logs out.

The signed cookie alone cannot be taken back: a copy made before logout would stay
valid until it expires.  So the cookie carries a random login id, and this table in
the shared store says which ids are live.  Logout, `appliance admins del` and
`appliance admins passwd` end them; a restart does not.  This module is the only one
that knows the table's SQL.
"""

from __future__ import annotations

import secrets
import threading
import time

from appliance.state import schema
from appliance.state.connection import Connection


class AdminLogins:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()  # waitress serves from several threads
        with self.lock:
            schema.upgrade(self.conn)

    def start(self, admin: str, lifetime: float, now: float | None = None) -> str:
        """A new live login id for `admin`; expired ids are swept on the way."""
        now = time.time() if now is None else now
        login_id = secrets.token_urlsafe(24)
        with self.lock:
            self.conn.execute("DELETE FROM admin_logins WHERE expires <= ?", (now,))
            self.conn.execute(
                "INSERT INTO admin_logins (id, admin, expires) VALUES (?, ?, ?)",
                (login_id, admin, now + lifetime),
            )
        return login_id

    def live(self, login_id: object, admin: object, now: float | None = None) -> bool:
        if not isinstance(login_id, str) or not isinstance(admin, str):
            return False
        now = time.time() if now is None else now
        with self.lock:
            row = self.conn.execute(
                "SELECT 1 FROM admin_logins WHERE id = ? AND admin = ? AND expires > ?",
                (login_id, admin, now),
            ).fetchone()
        return row is not None

    def end(self, login_id: object) -> None:
        if isinstance(login_id, str):
            with self.lock:
                self.conn.execute("DELETE FROM admin_logins WHERE id = ?", (login_id,))

    def end_all(self, admin: str) -> int:
        """End every login of `admin` (account removed or password changed)."""
        with self.lock:
            cur = self.conn.execute("DELETE FROM admin_logins WHERE admin = ?", (admin,))
        return cur.rowcount
