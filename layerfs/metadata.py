"""The store's metadata: one SQLite database in WAL mode.

SQLite gives the graph atomic multi-row changes and cross-process locking:
every change runs in ``BEGIN IMMEDIATE`` so two processes sharing a root (an
engine and the CLI) serialise their writes, while readers never block.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    chain_id TEXT PRIMARY KEY,
    diff_id  TEXT NOT NULL,
    parent   TEXT REFERENCES layers(chain_id),
    cache_id TEXT NOT NULL UNIQUE,
    size     INTEGER NOT NULL,
    refs     INTEGER NOT NULL,
    depth    INTEGER NOT NULL,
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS containers (
    name     TEXT PRIMARY KEY,
    parent   TEXT REFERENCES layers(chain_id),
    cache_id TEXT NOT NULL UNIQUE,
    size     INTEGER,
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS containers_parent ON containers(parent);
-- Mount reference counts, keyed by driver cache id, cleared when the boot id changes.
CREATE TABLE IF NOT EXISTS mounts (cache_id TEXT PRIMARY KEY, refs INTEGER NOT NULL);
"""


class Metadata:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._depth = 0
        self._conn.execute("PRAGMA busy_timeout = 60000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # Why NORMAL: with WAL a killed process never corrupts or loses a
        # committed transaction; only a power cut may lose the last few.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        if self.get_meta("schema") != SCHEMA_VERSION:
            with self.write() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (nested calls join the outer one)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def get_meta(self, key: str) -> str | None:
        try:
            row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        except sqlite3.OperationalError:
            return None  # a new database: no meta table yet
        return None if row is None else row["value"]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
