"""The PostgreSQL store's record of a sweep under way, shared by every process on the database: the
exchanges listed and the process leading the sweep (it claims the coins, records them and ends it),
and a row for each exchange with how far it was read, the coins it named, and the process reading it.
Both are held under leases, renewed while their process lives: the processes share one sweep's
exchanges, and when the leader stops, another takes the lead and goes on from the exchanges not read."""

from __future__ import annotations

import logging
import os
import threading

from psycopg.types.json import Jsonb

from store import SweepProgress
from stores.postgres_connector import PostgresConnector, error_line
from stores.postgres_shared import NOW

log = logging.getLogger("stores.postgres")


class PostgresSweeps:
    """Mixed into ``PostgresStore``: its connector and lease length; ``_start_sweep_leases`` at its start."""

    _db: PostgresConnector
    lease_seconds: float

    def _start_sweep_leases(self) -> None:
        self._sweeper_id = os.urandom(8).hex()
        self._sweep_lock = threading.Lock()
        self._leading = False
        self._reading: set[str] = set()

    def begin_sweep(self, exchanges: list[str], started: float) -> bool:
        def work(conn) -> bool:
            began = conn.execute(
                f"INSERT INTO sweep (id, started, exchanges, leader, lease_until) VALUES (1, %s, %s, %s, {NOW} + %s)"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                (started, Jsonb(exchanges), self._sweeper_id, self.lease_seconds)).fetchone()
            if began is None:
                return False
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("INSERT INTO sweep_exchanges (exchange_id) SELECT e FROM unnest(%s::text[])"
                         " WITH ORDINALITY AS listed(e, n) ORDER BY n", (exchanges,))
            return True

        began = self._db.write(work)
        with self._sweep_lock:
            self._leading = began
        return began

    def lead_sweep(self) -> bool:
        row = self._db.execute(
            f"UPDATE sweep SET leader = %(me)s, lease_until = {NOW} + %(lease)s WHERE id = 1"
            f" AND (leader = %(me)s OR lease_until < {NOW}) RETURNING (SELECT leader FROM sweep WHERE id = 1)",
            {"me": self._sweeper_id, "lease": self.lease_seconds}).fetchone()
        with self._sweep_lock:
            took_over = row is not None and not self._leading and row[0] != self._sweeper_id
            self._leading = row is not None
        if took_over:
            log.info("sweep: its leader stopped renewing its lease; this process leads it now")
        return row is not None

    def take_exchange(self, progress: SweepProgress, now: float) -> tuple[str, dict | None] | None:
        row = self._db.execute(
            f"UPDATE sweep_exchanges SET reader = %(me)s, lease_until = {NOW} + %(lease)s WHERE exchange_id = ("
            " SELECT exchange_id FROM sweep_exchanges WHERE (state IS NULL OR NOT (state->>'done')::boolean)"
            " AND COALESCE((state->>'again_at')::float8, 0) <= %(now)s"
            f" AND (reader IS NULL OR lease_until < {NOW})"
            " ORDER BY COALESCE((state->>'again_at')::float8, 0), seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " RETURNING exchange_id, state",
            {"me": self._sweeper_id, "lease": self.lease_seconds, "now": now}).fetchone()
        if row is None:
            return None
        with self._sweep_lock:
            self._reading.add(row[0])
        return row[0], row[1]

    def let_go_exchange(self, exchange_id: str) -> None:
        with self._sweep_lock:
            self._reading.discard(exchange_id)
        self._db.execute("UPDATE sweep_exchanges SET reader = NULL, lease_until = NULL"
                         " WHERE exchange_id = %s AND reader = %s", (exchange_id, self._sweeper_id))

    def _renew_sweep_leases(self) -> None:
        """The sweep's lead and the exchanges this process reads, kept while it lives (the lease renewer's
        round)."""
        with self._sweep_lock:
            leading, reading = self._leading, list(self._reading)
        if not (leading or reading):
            return
        try:
            with self._db.connection() as conn:
                if leading:
                    conn.execute(f"UPDATE sweep SET lease_until = {NOW} + %s WHERE leader = %s",
                                 (self.lease_seconds, self._sweeper_id))
                if reading:
                    conn.execute(f"UPDATE sweep_exchanges SET lease_until = {NOW} + %s"
                                 " WHERE reader = %s AND exchange_id = ANY(%s)",
                                 (self.lease_seconds, self._sweeper_id, reading))
        except Exception as exc:  # the next round tries again; a lease outlives a few misses
            log.warning("renewing the sweep's leases failed: %s", error_line(exc))

    def sweep_progress(self) -> SweepProgress | None:
        row = self._db.one("SELECT started, exchanges FROM sweep WHERE id = 1")
        if row is None:
            return None
        states = dict(self._db.read("SELECT exchange_id, state FROM sweep_exchanges WHERE state IS NOT NULL"
                                    " ORDER BY seq"))
        return SweepProgress(row[0], list(row[1]), states)

    def keep_exchange_state(self, exchange_id: str, state: dict) -> None:
        self._db.execute(f"UPDATE sweep_exchanges SET state = %s, lease_until = {NOW} + %s WHERE exchange_id = %s",
                         (Jsonb(state), self.lease_seconds, exchange_id))

    def end_sweep(self, calls: int | None) -> None:
        def work(conn) -> None:
            conn.execute("DELETE FROM sweep_exchanges")
            conn.execute("DELETE FROM sweep")
            if calls is not None:
                conn.execute("INSERT INTO sweep_history (id, last_calls) VALUES (1, %s)"
                             " ON CONFLICT (id) DO UPDATE SET last_calls = EXCLUDED.last_calls", (calls,))

        self._db.write(work)
        with self._sweep_lock:
            self._leading = False

    def last_sweep_calls(self) -> int | None:
        row = self._db.one("SELECT last_calls FROM sweep_history WHERE id = 1")
        return None if row is None else row[0]
