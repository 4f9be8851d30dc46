"""The history benchmark's seeding (``benchmarks/seed.py``) writes rows as the server's own
writers would, on SQLite and real PostgreSQL: the room's seqs, message ordinals and count, and
its row's copy of the latest message follow, so that the server goes on from them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.seed import SEED_CONTENT, seed_postgres, seed_sqlite
from nanomsg.store.base import HistoryQuery, NewMessage, Store
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.sqlite import SqliteStore
from tests.integration.test_store import make_room, new_id

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "seeded.db")
    return "postgres", str(request.getfixturevalue("fresh_pg_url"))


def open_store(kind: str, where: str) -> Store:
    return SqliteStore(where) if kind == "sqlite" else PostgresStore(where)


async def test_seeded_messages_follow_the_room_and_the_list_shows_the_last_one(
    target: tuple[str, str],
) -> None:
    kind, where = target
    owner, user = new_id(), new_id()
    store = open_store(kind, where)
    await store.open()
    try:
        room = await make_room(store, owner=owner)
        await store.append_message(
            NewMessage(room.id, user, owner, "before", None, datetime.now(UTC))
        )
    finally:
        await store.close()
    if kind == "sqlite":
        head = seed_sqlite(where, room.id, 120, nonce=3, batch=50)
    else:
        head = await seed_postgres(where, room.id, 120, nonce=3)
    assert head == 121
    store = open_store(kind, where)
    await store.open()
    try:
        [entry] = await store.conversations(new_id(), owner, 100, "id", 10, 0)
        assert (entry.last_seq, entry.unread) == (121, 121)
        assert entry.last_message is not None
        assert entry.last_message.seq == 121
        assert entry.last_message.content == SEED_CONTENT.format(seq=121)
        sent, _ = await store.append_message(
            NewMessage(room.id, user, owner, "after", None, datetime.now(UTC))
        )
        assert sent.seq == 122
        history = await store.history(HistoryQuery(room_id=room.id, limit=200, newest=False))
        assert [m.seq for m in history] == list(range(1, 123))
        [entry] = await store.conversations(new_id(), owner, 100, "id", 10, 0)
        assert entry.last_message is not None and entry.last_message.content == "after"
        assert entry.unread == 122
    finally:
        await store.close()
