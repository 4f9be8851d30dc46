"""The PostgreSQL conversation list read in parts: a page larger than ``list_part`` rooms is
its ids in one statement, then the rooms' states in concurrent statements of at most
``list_part`` rooms each, and answers exactly what one statement answers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from nanomsg.store.list_cache import ListCache
from nanomsg.store.postgres import PostgresStore
from tests.integration.test_store import make_room, new_id
from tests.integration.test_store_events import later, send

pytestmark = pytest.mark.asyncio


class CountingStore(PostgresStore):
    """A real PostgreSQL store that counts the reads it runs and how many overlap."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.reads = 0
        self.running = 0
        self.most_running = 0

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        self.reads += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0)  # let the other parts start before this one answers
            return await super()._fetch(sql, *args)
        finally:
            self.running -= 1


@pytest_asyncio.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[CountingStore, PostgresStore]]:
    """The same database through a store reading in parts of 2 rooms and one that never
    splits a page."""
    parts, whole = CountingStore(pg_url, pool_size=4, list_part=2), PostgresStore(pg_url)
    await parts.open()
    await whole.open()
    try:
        yield parts, whole
    finally:
        await parts.close()
        await whole.close()


async def seeded_user(store: PostgresStore) -> tuple[str, str]:
    """A user of an entity holding seven rooms with various states (messages by others and
    by them, read marks, an edit, a deletion, an empty room), next to rooms they may not
    read; returns (user, entity)."""
    rng = random.Random(11)
    me, entity, other = new_id(), new_id(), new_id()
    for index in range(7):
        room = await make_room(store, creator=me, owner=entity)
        sent = []
        for n in range(index):
            author = rng.choice([me, other])
            sent.append(
                (await send(store, room.id, author, f"m{n}", at=rng.randrange(100)), author)
            )
        if sent:
            await store.set_read_mark(room.id, me, rng.choice(sent)[0], later(200))
        if len(sent) >= 3:
            await store.edit_message(room.id, sent[1][0], sent[1][1], "edited", later(201))
            await store.delete_message(room.id, sent[2][0], other, True, later(202))
    for _ in range(3):  # another entity's rooms: never listed
        await make_room(store)
    return me, entity


@pytest.mark.parametrize("order", ["id", "activity"])
async def test_a_page_read_in_parts_equals_the_page_read_in_one_statement(
    stores: tuple[CountingStore, PostgresStore], order: str
) -> None:
    parts, whole = stores
    me, entity = await seeded_user(whole)
    for limit, offset in ((7, 0), (5, 0), (5, 3), (3, 6), (10, 7)):
        expected = await whole.conversations(me, entity, 0, order, limit, offset)
        assert await parts.conversations(me, entity, 0, order, limit, offset) == expected
    assert len(await parts.conversations(me, entity, 0, order, 1000, 0)) == 7


async def test_a_page_in_parts_costs_its_ids_then_one_read_per_part_run_side_by_side(
    stores: tuple[CountingStore, PostgresStore],
) -> None:
    parts, whole = stores
    me, entity = await seeded_user(whole)
    parts.reads = parts.most_running = 0
    listed = await parts.conversations(me, entity, 0, "activity", 7, 0)
    assert len(listed) == 7
    assert parts.reads == 1 + 4  # the ids, then parts of 2, 2, 2 and 1 rooms
    assert parts.most_running == 4
    parts.reads = 0
    await parts.conversations(me, entity, 0, "id", 2, 0)  # no larger than a part: one read
    assert parts.reads == 1


async def test_a_page_is_one_statement_while_the_pool_has_no_spare_connection_per_part(
    stores: tuple[CountingStore, PostgresStore],
) -> None:
    parts, whole = stores
    me, entity = await seeded_user(whole)
    expected = await whole.conversations(me, entity, 0, "activity", 7, 0)
    pool = parts._pool
    assert pool is not None
    held = [await pool.acquire() for _ in range(2)]  # 2 of 4 busy: 4 parts would wait
    try:
        parts.reads = 0
        assert await parts.conversations(me, entity, 0, "activity", 7, 0) == expected
        assert parts.reads == 1
        parts.reads = 0
        assert await parts.conversations(me, entity, 0, "activity", 4, 0) == expected[:4]
        assert parts.reads == 1 + 2  # two parts of 2: the two spare connections
    finally:
        for conn in held:
            await pool.release(conn)


async def test_a_room_deleted_after_the_ids_were_read_is_left_out(
    stores: tuple[CountingStore, PostgresStore],
) -> None:
    parts, whole = stores
    me, entity = await seeded_user(whole)
    ids = [c.id for c in await whole.conversations(me, entity, 0, "id", 7, 0)]
    gone = ids[3]
    original = parts._fetch
    first = True

    async def delete_after_ids(sql: str, *args: Any) -> list[Any]:
        nonlocal first
        rows = await original(sql, *args)
        if first:  # the ids are read: the room goes before its state is
            first = False
            await whole.delete_room(gone, later(300))
        return rows

    parts._fetch = delete_after_ids  # type: ignore[method-assign]
    listed = await parts.conversations(me, entity, 0, "id", 7, 0)
    assert [c.id for c in listed] == [i for i in ids if i != gone]


async def test_a_store_refuses_parts_of_no_room(pg_url: str) -> None:
    with pytest.raises(ValueError, match="list_part"):
        PostgresStore(pg_url, list_part=0)


@pytest_asyncio.fixture
async def cached_parts(pg_url: str) -> AsyncIterator[CountingStore]:
    """A store reading in parts of 2 rooms, with a list cache."""
    store = CountingStore(pg_url, pool_size=4, list_part=2, list_cache=ListCache(1 << 20))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def change_all(store: PostgresStore, user: str, entity: str, at: float) -> None:
    """A message from another user in every room of ``user``'s list, in random order, so
    that no kept entry holds and the order by activity changes."""
    rooms = [c.id for c in await store.conversations(user, entity, 0, "id", 100, 0)]
    random.Random(at).shuffle(rooms)
    for n, room_id in enumerate(rooms):
        await send(store, room_id, new_id(), "churn", at=at + n / 100)


@pytest.mark.parametrize("order", ["id", "activity"])
async def test_a_whole_list_known_to_fit_is_one_step_of_parts_equal_to_one_statement(
    cached_parts: CountingStore, stores: tuple[CountingStore, PostgresStore], order: str
) -> None:
    """Once the cache knows the user's last list held all their rooms within the page, the
    next first page whose rooms all changed is its parts side by side with no statement of
    ids first, and answers what one statement answers."""
    _, whole = stores
    me, entity = await seeded_user(whole)
    for at in range(300, 306):
        await change_all(whole, me, entity, at)
        cached_parts.reads = cached_parts.most_running = 0
        listed = await cached_parts.conversations(me, entity, 0, order, 8, 0)
        assert listed == await whole.conversations(me, entity, 0, order, 8, 0), at
        if at >= 302:  # read at once (no check first) with the whole list known: no ids
            assert (cached_parts.reads, cached_parts.most_running) == (4, 4), at
    # A page at an offset, or one the cache knows less than the whole list of, is two steps.
    await change_all(whole, me, entity, 306)
    cached_parts.reads = 0
    listed = await cached_parts.conversations(me, entity, 0, order, 4, 2)
    assert listed == await whole.conversations(me, entity, 0, order, 4, 2)
    assert cached_parts.reads == 1 + 2


@pytest.mark.parametrize("order", ["id", "activity"])
async def test_a_user_who_gained_more_rooms_than_the_page_gets_the_page_then_two_steps(
    cached_parts: CountingStore, stores: tuple[CountingStore, PostgresStore], order: str
) -> None:
    """The cache's knowledge is a hint: a user whose seven rooms fitted a page of eight and
    who gained four more gets the right first eight from the parts (each part reads at most
    eight), and, their list no longer whole, their next list in two steps."""
    _, whole = stores
    me, entity = await seeded_user(whole)
    for at in (400, 401, 402):
        await change_all(whole, me, entity, at)
        await cached_parts.conversations(me, entity, 0, order, 8, 0)
    for _ in range(4):
        room = await make_room(whole, creator=me, owner=entity)
        await send(whole, room.id, new_id(), "new", at=403)
    await change_all(whole, me, entity, 404)
    cached_parts.reads = 0
    listed = await cached_parts.conversations(me, entity, 0, order, 8, 0)
    assert listed == await whole.conversations(me, entity, 0, order, 8, 0)
    assert cached_parts.reads == 4  # the parts alone, each of up to 8 rooms
    await change_all(whole, me, entity, 405)
    cached_parts.reads = 0
    listed = await cached_parts.conversations(me, entity, 0, order, 8, 0)
    assert listed == await whole.conversations(me, entity, 0, order, 8, 0)
    assert cached_parts.reads == 1 + 4  # the ids first again
