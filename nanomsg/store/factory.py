"""Pick the storage backend from a database URL."""

from __future__ import annotations

from nanomsg.store.base import Store
from nanomsg.store.list_cache import ListCache
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import SqliteStore

_SQLITE_PREFIX = "sqlite:///"


def store_from_url(url: str, *, pg_pool_size: int = 10, list_cache_bytes: int = 0) -> Store:
    """A (not yet opened) store for ``url``.

    ``sqlite:///relative/path``, ``sqlite:////abs/path`` and ``sqlite:///:memory:`` give a
    SqliteStore; ``postgresql://`` and ``postgres://`` give a PostgresStore with a pool of
    ``pg_pool_size`` connections and, when ``list_cache_bytes`` is above 0, a ``ListCache`` of
    that many bytes for the conversation list (SQLite's list needs none). Anything else is a
    configuration error (ValueError).
    """
    if url.startswith(_SQLITE_PREFIX):
        path = url[len(_SQLITE_PREFIX) :]
        if not path:
            raise ValueError(f"SQLite URL without a path: {url!r}")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        cache = ListCache(list_cache_bytes) if list_cache_bytes > 0 else None
        return PostgresStore(url, pool_size=pg_pool_size, list_cache=cache)
    raise ValueError(
        f"unsupported database URL {url.split('://', 1)[0]!r}://...: expected sqlite:///path,"
        " postgresql:// or postgres://"
    )
