"""The PostgreSQL store's record of a sweep under way: the exchanges listed, one row for each
exchange begun (how far it was read and the coins it named), and the last whole sweep's calls. A restart, or
another process, goes on from the exchanges not yet read."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from store import SweepProgress
from stores.postgres_connector import PostgresConnector


class PostgresSweeps:
    """Mixed into ``PostgresStore``: its connector."""

    _db: PostgresConnector

    def begin_sweep(self, exchanges: list[str], started: float) -> None:
        def work(conn) -> None:
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("DELETE FROM sweep")
            conn.execute("INSERT INTO sweep (id, started, exchanges) VALUES (1, %s, %s)", (started, Jsonb(exchanges)))

        self._db.write(work)

    def sweep_progress(self) -> SweepProgress | None:
        row = self._db.one("SELECT started, exchanges FROM sweep WHERE id = 1")
        if row is None:
            return None
        states = dict(self._db.read("SELECT exchange_id, state FROM sweep_exchanges ORDER BY seq"))
        return SweepProgress(row[0], list(row[1]), states)

    def keep_exchange_state(self, exchange_id: str, state: dict) -> None:
        self._db.execute(
            "INSERT INTO sweep_exchanges (exchange_id, state) VALUES (%s, %s)"
            " ON CONFLICT (exchange_id) DO UPDATE SET state = EXCLUDED.state", (exchange_id, Jsonb(state)))

    def end_sweep(self, calls: int | None) -> None:
        def work(conn) -> None:
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("DELETE FROM sweep")
            if calls is not None:
                conn.execute("INSERT INTO sweep_history (id, last_calls) VALUES (1, %s)"
                             " ON CONFLICT (id) DO UPDATE SET last_calls = EXCLUDED.last_calls", (calls,))

        self._db.write(work)

    def last_sweep_calls(self) -> int | None:
        row = self._db.one("SELECT last_calls FROM sweep_history WHERE id = 1")
        return None if row is None else row[0]
