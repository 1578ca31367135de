"""The PostgreSQL store's connector: the connection pool, the schema brought up to date, and the
few ways the store talks to the database (a transaction retried on a deadlock, one statement, a
read). A server that does not answer is ``StoreUnavailable``, never a driver error."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from store import StoreError, StoreUnavailable
from stores.postgres_schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

SCHEMA = "coin_retriever"
MIGRATION_LOCK = 0x636F696E  # pg_advisory_xact_lock key: one process migrates at a time
# No JIT: it compiles any statement whose estimate passes jit_above_cost, and every statement here is
# short and index-driven, so it only costs (a connection's first such call loads LLVM).
SESSION_OPTIONS = f"-c search_path={SCHEMA} -c jit=off"
RETRIES = 8
TRANSIENT = (errors.DeadlockDetected, errors.SerializationFailure)
# How long a request waits for a pooled connection before it gives up (a 503): a database that is away
# must not pin the service's threads.
POOL_WAIT_SECONDS = 3.0


def display_url(url: str) -> str:
    """``url`` without its password, fit for a log line or an error."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    params.pop("password", None)
    return f"postgresql://{params.get('user', '')}@{params.get('host', '')}:{params.get('port', 5432)}/" \
           f"{params.get('dbname', '')}"



def error_line(exc: BaseException) -> str:
    """The first line of a driver error: enough to act on, nothing from the URL."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class PostgresConnector:
    """One pool of connections to ``url``, in the service's schema, migrated on opening."""

    def __init__(self, url: str, *, pool_size: int = 16, connect_timeout: float = 5.0) -> None:
        self._shown = display_url(url)
        try:
            conninfo = make_conninfo(url, connect_timeout=max(1, round(connect_timeout)),
                                     options=SESSION_OPTIONS, application_name="coin-retriever")
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"cannot open COINS_DB {self._shown}: not a PostgreSQL URL ({exc})") from None
        self._pool = ConnectionPool(conninfo, min_size=1, max_size=pool_size, open=False, timeout=POOL_WAIT_SECONDS,
                                    kwargs={"autocommit": True}, name="coin-retriever")
        try:
            psycopg.connect(conninfo).close()  # the server's own refusal, rather than the pool's time-out
            self._pool.open(wait=True, timeout=connect_timeout + 1)
            self.scope = self._migrate()
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            raise StoreError(f"cannot open COINS_DB {self._shown}: {error_line(exc)}") from None

    def _migrate(self) -> str:
        """Bring the schema up to this release's version; returns the database's scope (for ETags)."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"COINS_DB {self._shown} has schema version {version}, written by a newer release; "
                    f"this release reads version {SCHEMA_VERSION}: upgrade every process on it"
                )
            for step in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[step])
                conn.execute("UPDATE schema_version SET version = %s", (step + 1,))
                log.info("COINS_DB %s: schema version %d", self._shown, step + 1)
            return conn.execute("SELECT scope FROM state").fetchone()[0]

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; a server that does not answer is ``StoreUnavailable`` (503 to a client,
        a retry in a second to the worker), never a driver error."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except TRANSIENT:
            raise
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._drop_broken_connections()
            raise StoreUnavailable(f"the database {self._shown} does not answer: {error_line(exc)}") from exc

    def _drop_broken_connections(self) -> None:
        """After a server restart every pooled connection is broken: find them all now, rather than one
        failed request each."""
        try:
            self._pool.check()
        except Exception as exc:  # the server is still away: the next failure checks again
            log.debug("checking the pool's connections failed: %s", error_line(exc))

    def write(self, work: Callable[[psycopg.Connection], object], block: bool = True) -> object:
        """Run ``work`` in one transaction (``block``: BEGIN … COMMIT; else one statement that is its own),
        again if PostgreSQL broke a deadlock by aborting it."""
        for attempt in range(RETRIES):
            try:
                with self.connection() as conn:
                    if not block:
                        return work(conn)
                    with conn.transaction():
                        return work(conn)
            except TRANSIENT:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def execute(self, query: str, params: Sequence | dict = ()) -> psycopg.Cursor:
        """One statement on its own (atomic without a transaction block: one round trip), again on a
        deadlock."""
        return self.write(lambda conn: conn.execute(query, params), block=False)

    def read(self, query: str, params: Sequence = ()) -> list[tuple]:
        with self.connection() as conn:
            return conn.execute(query, params).fetchall()

    def one(self, query: str, params: Sequence = ()):
        rows = self.read(query, params)
        return rows[0] if rows else None

    def close(self) -> None:
        self._pool.close()
