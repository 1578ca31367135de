"""The stores' backends (``memory``, ``sqlite``, ``postgres``, and the ``tallies`` they share) and the factory
that picks one from ``COINS_DB``. No backend imports this module; the backends import ``store``, never
the other way round.
"""

from __future__ import annotations

from store import Store


def is_postgres_url(db: str | None) -> bool:
    return bool(db) and db.split("://", 1)[0].lower() in ("postgresql", "postgres")


def open_store(db_path: str | None, lock_wait: float = 0.0, lease_seconds: float = 30.0,
               load: bool = True) -> Store:
    """The store the configuration asks for: PostgreSQL at a ``postgresql://`` URL, SQLite at a path,
    else in memory. ``load=False``: only proof that it opens (SQLite then reads none of its records)."""
    if not db_path:
        from stores.memory import MemoryStore

        return MemoryStore()
    if is_postgres_url(db_path):
        from stores.postgres import PostgresStore

        return PostgresStore(db_path, lease_seconds=lease_seconds)
    from stores.sqlite import SqliteStore

    return SqliteStore(db_path, lock_wait=lock_wait, load=load)
