"""The SQLite store's record of a sweep under way, so that a restart (a ``kill -9`` included) goes
on from the exchanges not yet read: the exchanges listed, one row for each exchange read (its coins
and their tickers there), and the last whole sweep's calls."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from store import SweepProgress


class SqliteSweeps:
    """Mixed into ``SqliteStore``: its one connection, its lock and its transactions."""

    _lock: threading.Lock
    _conn: sqlite3.Connection
    _transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]

    def begin_sweep(self, exchanges: list[str], started: float) -> bool:
        with self._lock, self._transaction() as conn:
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("DELETE FROM sweep")
            conn.execute("INSERT INTO sweep (id, started, exchanges) VALUES (1, ?, ?)",
                         (started, json.dumps(exchanges)))
        return True

    def sweep_progress(self) -> SweepProgress | None:
        with self._lock:
            row = self._conn.execute("SELECT started, exchanges FROM sweep WHERE id = 1").fetchone()
            if row is None:
                return None
            states = {exchange_id: json.loads(state) for exchange_id, state in self._conn.execute(
                "SELECT exchange_id, state FROM sweep_exchanges ORDER BY rowid")}
            return SweepProgress(row[0], json.loads(row[1]), states)

    def keep_exchange_state(self, exchange_id: str, state: dict) -> None:
        with self._lock, self._transaction() as conn:
            conn.execute("INSERT INTO sweep_exchanges (exchange_id, state) VALUES (?, ?)"
                         " ON CONFLICT (exchange_id) DO UPDATE SET state = excluded.state",
                         (exchange_id, json.dumps(state)))

    def end_sweep(self, calls: int | None) -> None:
        with self._lock, self._transaction() as conn:
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("DELETE FROM sweep")
            if calls is not None:
                conn.execute("INSERT OR REPLACE INTO sweep_history (id, last_calls) VALUES (1, ?)", (calls,))

    def last_sweep_calls(self) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT last_calls FROM sweep_history WHERE id = 1").fetchone()
            return None if row is None else row[0]
