"""Pick the storage backend from a database URL."""

from __future__ import annotations

from nanomsg.store.base import Store
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import SqliteStore

_SQLITE_PREFIX = "sqlite:///"


def store_from_url(url: str, *, pg_pool_size: int = 10) -> Store:
    """A (not yet opened) store for ``url``.

    ``sqlite:///relative/path``, ``sqlite:////abs/path`` and ``sqlite:///:memory:`` give a
    SqliteStore; ``postgresql://`` and ``postgres://`` give a PostgresStore with a pool of
    ``pg_pool_size`` connections. Anything else is a configuration error (ValueError).
    """
    if url.startswith(_SQLITE_PREFIX):
        path = url[len(_SQLITE_PREFIX) :]
        if not path:
            raise ValueError(f"SQLite URL without a path: {url!r}")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, pool_size=pg_pool_size)
    raise ValueError(
        f"unsupported database URL {url.split('://', 1)[0]!r}://...: expected sqlite:///path,"
        " postgresql:// or postgres://"
    )
