"""The PostgreSQL conversation list through a ``ListCache``: it answers exactly what the
uncached store answers, whatever another process changed in between (each room's entry is
checked against the room row's version and the user's read mark), and a page whose rooms are
all cached costs one statement."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import orjson
import pytest
import pytest_asyncio

from nanomsg.store.base import RoomChanges
from nanomsg.store.list_cache import KEEP_EVERY, ListCache
from nanomsg.store.postgres import PostgresStore
from tests.integration.test_conversation_parts import CountingStore, seeded_user
from tests.integration.test_store import make_room, new_id
from tests.integration.test_store_events import later, send

pytestmark = pytest.mark.asyncio


class RecordingStore(CountingStore):
    """A counting store that also keeps the statements it ran."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.statements: list[str] = []

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        self.statements.append(sql)
        return await super()._fetch(sql, *args)

    def reads_messages(self) -> list[bool]:
        """For each statement since the last call, whether it read rooms' states (their latest
        messages, unread counts) rather than only the page's versions and read marks; then
        forgets them."""
        read = ["r.latest_content" in sql for sql in self.statements]
        self.statements.clear()
        return read


@pytest_asyncio.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[RecordingStore, PostgresStore, ListCache]]:
    """A store with a list cache (reading misses in parts of 2 rooms) and, as another process
    would, a store without one on the same database, which makes the changes and says what
    the list must be."""
    cache = ListCache(1 << 20)
    cached = RecordingStore(pg_url, pool_size=4, list_part=2, list_cache=cache)
    other = PostgresStore(pg_url)
    await cached.open()
    await other.open()
    try:
        yield cached, other, cache
    finally:
        await cached.close()
        await other.close()


class Seeded(NamedTuple):
    """The stores of ``stores`` and a user seeded on them (``seeded_user``)."""

    cached: RecordingStore
    other: PostgresStore
    cache: ListCache
    me: str
    entity: str


@pytest_asyncio.fixture
async def seeded(stores: tuple[RecordingStore, PostgresStore, ListCache]) -> Seeded:
    cached, other, cache = stores
    me, entity = await seeded_user(other)
    return Seeded(cached, other, cache, me, entity)


async def same_lists(cached: PostgresStore, other: PostgresStore, me: str, entity: str) -> None:
    """Every page shape, both orders: the cached store answers what the uncached one does."""
    for order in ("id", "activity"):
        for limit, offset in ((100, 0), (3, 0), (3, 2), (2, 5)):
            expected = await other.conversations(me, entity, 0, order, limit, offset)
            assert await cached.conversations(me, entity, 0, order, limit, offset) == expected


async def test_a_cached_list_answers_what_the_uncached_store_answers_read_after_read(
    seeded: Seeded,
) -> None:
    cached, other, cache, me, entity = seeded
    await same_lists(cached, other, me, entity)
    await same_lists(cached, other, me, entity)  # now from the cache
    assert len(cache) == 7


async def test_an_unchanged_page_is_one_statement_and_a_change_rereads_only_its_room(
    seeded: Seeded,
) -> None:
    cached, other, _, me, entity = seeded
    first = await cached.conversations(me, entity, 0, "id", 100, 0)
    cached.reads = 0
    assert await cached.conversations(me, entity, 0, "id", 100, 0) == first
    assert cached.reads == 1
    await send(other, first[4].id, new_id(), "news", at=500)
    cached.reads = 0
    again = await cached.conversations(me, entity, 0, "id", 100, 0)
    assert cached.reads == 2  # the versions, then the one room changed
    assert again == await other.conversations(me, entity, 0, "id", 100, 0)
    assert again[4].message_content == "news" and again[4].unread == first[4].unread + 1


async def test_each_change_made_elsewhere_shows_in_the_next_cached_list(
    seeded: Seeded,
) -> None:
    cached, other, _, me, entity = seeded
    await same_lists(cached, other, me, entity)
    rooms = [c.id for c in await other.conversations(me, entity, 0, "id", 100, 0)]
    stranger = new_id()
    seq = await send(other, rooms[6], stranger, "from a stranger", at=400)
    await same_lists(cached, other, me, entity)  # a message by another user
    await other.edit_message(rooms[6], seq, stranger, "edited elsewhere", later(401))
    await same_lists(cached, other, me, entity)  # its edit
    await other.delete_message(rooms[6], seq, stranger, False, later(402))
    await same_lists(cached, other, me, entity)  # its deletion: a tombstone, one unread less
    await send(other, rooms[5], me, "from me, on another device", at=403)
    await same_lists(cached, other, me, entity)  # the user's own message: not unread
    await send(other, rooms[5], stranger, "unread", at=404)
    await same_lists(cached, other, me, entity)
    mark = await send(other, rooms[5], stranger, "unread too", at=404)
    await same_lists(cached, other, me, entity)
    await other.set_read_mark(rooms[5], me, mark - 1, later(404))
    await same_lists(cached, other, me, entity)  # a read mark moved by another device
    await other.update_room(rooms[2], RoomChanges(name="renamed"), later(405))
    await same_lists(cached, other, me, entity)  # the room's settings
    await other.delete_room(rooms[1], later(406))
    await same_lists(cached, other, me, entity)  # a room deleted
    await make_room(other, creator=me, owner=entity)
    await same_lists(cached, other, me, entity)  # a room added
    listed = await cached.conversations(me, entity, 0, "id", 100, 0)
    assert [c.name for c in listed if c.id == rooms[2]] == ["renamed"]
    assert rooms[1] not in [c.id for c in listed]


async def test_users_of_one_room_each_get_their_own_read_mark_and_unread_count(
    stores: tuple[RecordingStore, PostgresStore, ListCache],
) -> None:
    cached, other, cache = stores
    entity, me, you = new_id(), new_id(), new_id()
    room = await make_room(other, creator=me, owner=entity)
    await other.put_rule(room.id, you, "user", "rw", 0, True, later(1))
    seqs = [await send(other, room.id, new_id(), f"m{n}", at=n) for n in range(4)]
    await other.set_read_mark(room.id, you, seqs[2], later(10))
    (mine,) = await cached.conversations(me, entity, 0, "id", 10, 0)
    (yours,) = await cached.conversations(you, entity, 0, "id", 10, 0)
    assert (mine.read_seq, mine.unread) == (0, 4)
    assert (yours.read_seq, yours.unread) == (seqs[2], 1)
    assert len(cache) == 2  # one room, an entry for each user
    cached.reads = 0
    assert await cached.conversations(me, entity, 0, "id", 10, 0) == [mine]
    assert await cached.conversations(you, entity, 0, "id", 10, 0) == [yours]
    assert cached.reads == 2  # one statement each: both from the cache
    assert [await other.conversations(you, entity, 0, "id", 10, 0)] == [[yours]]


async def test_a_room_changed_between_the_two_steps_is_answered_as_read_then_reread(
    seeded: Seeded,
) -> None:
    cached, other, _, me, entity = seeded
    rooms = [c.id for c in await cached.conversations(me, entity, 0, "id", 100, 0)]
    await send(other, rooms[3], new_id(), "before the list", at=600)  # a miss to read
    original = cached._fetch
    first = True

    async def send_after_versions(sql: str, *args: Any) -> list[Any]:
        nonlocal first
        rows = await original(sql, *args)
        if first:  # the versions are read: the room changes before its state is read
            first = False
            await send(other, rooms[3], new_id(), "between the steps", at=601)
        return rows

    cached._fetch = send_after_versions  # type: ignore[method-assign]
    listed = await cached.conversations(me, entity, 0, "id", 100, 0)
    assert listed == await other.conversations(me, entity, 0, "id", 100, 0)
    assert listed[3].message_content == "between the steps"
    cached._fetch = original  # type: ignore[method-assign]
    cached.reads = 0
    assert await cached.conversations(me, entity, 0, "id", 100, 0) == listed
    assert cached.reads == 2  # kept under the version the first step read: read once more
    cached.reads = 0
    assert await cached.conversations(me, entity, 0, "id", 100, 0) == listed
    assert cached.reads == 1


async def test_the_entries_json_of_a_cached_list_is_byte_identical_to_the_uncached_entries(
    seeded: Seeded,
) -> None:
    cached, other, _, me, entity = seeded
    for _ in range(2):  # read, then answered from the cache
        for order in ("id", "activity"):
            listed = await cached.conversations(me, entity, 0, order, 100, 0)
            expected = await other.conversations(me, entity, 0, order, 100, 0)
            written = orjson.dumps(await cached.entries_json(me, listed))
            assert written == orjson.dumps(await other.entries_json(me, expected))
            assert written == orjson.dumps([c.to_json() for c in expected])
    kept = await cached.entries_json(me, listed)
    assert all(isinstance(entry, orjson.Fragment) for entry in kept)


async def test_a_list_is_checked_against_the_cache_first_only_while_it_mostly_answers_it(
    seeded: Seeded,
) -> None:
    cached, other, cache, me, entity = seeded
    rooms = [c.id for c in await other.conversations(me, entity, 0, "id", 100, 0)]

    async def listed() -> list[bool]:
        found = await cached.conversations(me, entity, 0, "id", 100, 0)
        assert found == await other.conversations(me, entity, 0, "id", 100, 0)
        return cached.reads_messages()

    async def change_every_room(at: float) -> None:
        for room_id in rooms:
            await send(other, room_id, new_id(), "news", at=at)

    assert await listed() == [True]  # the first list: read as without a cache, and kept
    assert await listed() == [False]  # answered from the cache
    await change_every_room(700)
    assert await listed() == [False, True, True, True, True]  # checked, then 4 parts read
    for at in range(701, 701 + 2 * KEEP_EVERY):  # every room changes before every list
        await change_every_room(at)
        assert await listed() == [True]  # the last list missed: read at once
    kept = cache.size
    await change_every_room(800)
    assert await listed() == [True]
    assert cache.size == kept  # lists that keep changing are not all kept
    # Once they stop changing, a list kept sees it within KEEP_EVERY lists, and the next is
    # checked first and answered from the cache.
    paths = [await listed() for _ in range(KEEP_EVERY + 2)]
    assert paths[-1] == [False] and [True] in paths
    assert paths.index([False]) <= KEEP_EVERY + 1
    assert all(path == [False] for path in paths[paths.index([False]) :])
    await send(other, rooms[0], new_id(), "one room", at=900)
    assert await listed() == [False, True]  # 6 of 7 held: still checked first
    assert await listed() == [False]
