"""Stored Responses (`store: true`): one SQLite file, shared by every worker of a host.

A stored response keeps its public body (what GET returns), the conversation that led to
it as chat messages, so `previous_response_id` can continue it after a restart, and its
request's input items (GET .../input_items). SQLite
in WAL mode lets several gunicorn workers read and write the same file; each call opens
its own connection (no connection crosses a thread or a fork). One host only: several
hosts behind a balancer would need a shared database, which this is not.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

DEFAULT_PATH = os.path.join("~", ".cache", "flaxserve", "responses.sqlite")
_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created REAL NOT NULL, body TEXT NOT NULL, messages TEXT NOT NULL,
    items TEXT NOT NULL DEFAULT '[]')"""


class ResponseStore:
    def __init__(self, path: str = DEFAULT_PATH):
        self.path = os.path.abspath(os.path.expanduser(path))
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        if not self._ready:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            conn.commit()
            self._ready = True
        return conn

    def put(self, body: dict, messages: list[dict], items: list[dict] = ()) -> None:
        """`items`: the request's input items (GET .../input_items lists them)."""
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                         (body["id"], time.time(), json.dumps(body), json.dumps(messages),
                          json.dumps(list(items))))
        conn.close()

    def items(self, response_id: str) -> list[dict] | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT items FROM responses WHERE id = ?",
                               (response_id,)).fetchone()
        finally:
            conn.close()
        return None if row is None else json.loads(row[0])

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT body, messages FROM responses WHERE id = ?",
                               (response_id,)).fetchone()
        finally:
            conn.close()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def delete(self, response_id: str) -> bool:
        with self._connect() as conn:
            n = conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
        conn.close()
        return n > 0
