"""The batching message writer (nanomsg/store/writer.py) on real SQLite and PostgreSQL: order,
batching, acknowledgement only after commit, and a batch killed mid-flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from nanomsg.store.base import (
    Changed,
    ContentRefused,
    HistoryQuery,
    MessageChange,
    RoomGone,
    Store,
    StoreUnavailable,
)
from nanomsg.store.postgres import PostgresStore
from nanomsg.store.writer import BatchWriter, Stored
from tests.integration.test_store import (
    T0,
    make_room,
    message,
    store,  # noqa: F401  (fixture: the same tests on SQLite and PostgreSQL)
    store_target,  # noqa: F401
    wait_for_lock_waiter,
)

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def writer(store: Store) -> AsyncIterator[BatchWriter]:  # noqa: F811
    w = BatchWriter(store, shards=1, max_batch=500)
    w.start()
    try:
        yield w
    finally:
        await w.close()


async def contents(store: Store, room_id: int) -> list[tuple[int, str]]:  # noqa: F811
    found = await store.history(HistoryQuery(room_id=room_id, limit=10_000, newest=False))
    return [(m.seq, m.content) for m in found]


async def test_messages_submitted_together_are_stored_in_one_batch_in_submission_order(
    store: Store,  # noqa: F811
    writer: BatchWriter,
) -> None:
    rooms = [await make_room(store) for _ in range(3)]
    futures = [
        writer.submit(message(rooms[i % 3].id, f"m{i}")) for i in range(150)
    ]  # all queued before the writer task runs: one batch
    results = await asyncio.gather(*futures)

    assert writer.batches == 1 and writer.messages == 150
    for r, room in enumerate(rooms):
        sent = [f"m{i}" for i in range(150) if i % 3 == r]
        assert await contents(store, room.id) == list(enumerate(sent, start=1))
    assert all(created for _, created in results)
    assert [m.seq for m, _ in results[:6]] == [1, 1, 1, 2, 2, 2]


async def test_batches_are_capped_and_later_arrivals_form_the_next_batch(
    store: Store,  # noqa: F811
) -> None:
    w = BatchWriter(store, shards=1, max_batch=40)
    w.start()
    try:
        room = await make_room(store)
        first = [w.submit(message(room.id, f"a{i}")) for i in range(100)]
        await asyncio.sleep(0)  # the writer takes its first batch
        second = [w.submit(message(room.id, f"b{i}")) for i in range(10)]
        await asyncio.gather(*first, *second)
        assert w.batches == 3  # 40 + 40 + (20 + 10 that arrived meanwhile)
        expected = [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(10)]
        assert await contents(store, room.id) == list(enumerate(expected, start=1))
    finally:
        await w.close()


async def test_a_deleted_room_fails_only_its_own_messages(
    store: Store,  # noqa: F811
    writer: BatchWriter,
) -> None:
    live, gone = await make_room(store), await make_room(store)
    await store.delete_room(gone.id, T0)
    ok1 = writer.submit(message(live.id, "one"))
    lost = writer.submit(message(gone.id, "lost"))
    ok2 = writer.submit(message(live.id, "two"))

    assert (await ok1)[0].seq == 1
    with pytest.raises(RoomGone):
        await lost
    assert (await ok2)[0].seq == 2
    assert await contents(store, gone.id) == []


async def test_repeated_client_id_is_acknowledged_with_the_stored_message(
    store: Store,  # noqa: F811
    writer: BatchWriter,
) -> None:
    room = await make_room(store)
    first = writer.submit(message(room.id, "x", client_id="c1"))
    again = writer.submit(message(room.id, "x", client_id="c1"))
    (m1, created1), (m2, created2) = await first, await again
    assert created1 and not created2 and m1.id == m2.id
    assert await contents(store, room.id) == [(1, "x")]


async def test_close_stores_what_was_submitted_then_refuses_new_messages(
    store: Store,  # noqa: F811
) -> None:
    w = BatchWriter(store, shards=2)
    w.start()
    room = await make_room(store)
    queued = [w.submit(message(room.id, f"q{i}")) for i in range(20)]
    await w.close()
    assert all(f.done() and not f.exception() for f in queued)
    refused = w.submit(message(room.id, "late"))
    with pytest.raises(StoreUnavailable):
        await refused
    assert len(await contents(store, room.id)) == 20


async def test_postgres_batch_killed_mid_flight_is_never_acknowledged_and_leaves_no_gap(
    fresh_pg_url: str,
) -> None:
    """Ack after commit across a crash: the batch's backend is terminated while it waits on a
    room lock. None of its messages is acknowledged or stored; messages queued behind it are
    stored next, in submission order, with no gap in the room's seq."""
    pg = PostgresStore(fresh_pg_url, pool_size=4)
    await pg.open()
    w = BatchWriter(pg, shards=1)
    w.start()
    locker = await asyncpg.connect(fresh_pg_url)
    try:
        room = await make_room(pg)
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", room.id)
        doomed = [w.submit(message(room.id, f"doomed{i}")) for i in range(3)]
        await wait_for_lock_waiter(locker)
        behind: list[asyncio.Future[Stored]] = [
            w.submit(message(room.id, f"next{i}")) for i in range(3)
        ]
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in doomed + behind)  # nothing acknowledged before commit

        killed = await locker.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        assert killed == 1
        for future in doomed:
            with pytest.raises(StoreUnavailable):
                await future
        await tx.rollback()

        stored = [m for m, _ in await asyncio.gather(*behind)]
        assert [m.seq for m in stored] == [1, 2, 3]
        assert await contents(pg, room.id) == [(1, "next0"), (2, "next1"), (3, "next2")]
    finally:
        await locker.close()
        await w.close()
        await pg.close()


@pytest.mark.parametrize("bad", ["bad\x00content", "lone \ud800"], ids=["nul", "surrogate"])
async def test_postgres_refusing_one_messages_content_fails_that_message_alone(
    pg_url: str, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    """PostgreSQL refuses U+0000 in text, and text with a lone surrogate cannot be sent to it
    (the codec keeps both out; this goes around the codec).
    The batch holding it is split until the message at fault is alone: it gets ContentRefused,
    every other message of the batch, in its own or other rooms, is stored and acknowledged in
    submission order, and the log gets one line, no traceback."""
    pg = PostgresStore(pg_url, pool_size=2)
    await pg.open()
    w = BatchWriter(pg, shards=1, max_batch=500)
    w.start()
    try:
        rooms = [await make_room(pg) for _ in range(3)]
        contents_sent = [f"m{i}" if i != 37 else bad for i in range(90)]
        futures = [  # all queued before the writer task runs: one batch
            w.submit(message(rooms[i % 3].id, text)) for i, text in enumerate(contents_sent)
        ]
        with caplog.at_level(logging.INFO, logger="nanomsg.store.writer"):
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        refused = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Exception)]
        assert refused == [37] and isinstance(outcomes[37], ContentRefused)
        assert w.refused == 1
        for r, room in enumerate(rooms):
            kept = [t for i, t in enumerate(contents_sent) if i % 3 == r and i != 37]
            assert await contents(pg, room.id) == list(enumerate(kept, start=1))
        records = [rec for rec in caplog.records if rec.name == "nanomsg.store.writer"]
        assert len(records) == 1 and records[0].exc_info is None
        assert "refused a batch of 90 messages" in records[0].getMessage()
    finally:
        await w.close()
        await pg.close()


async def test_postgres_a_refused_message_takes_no_seq_and_the_next_one_is_stored(
    pg_url: str,
) -> None:
    pg = PostgresStore(pg_url, pool_size=2)
    await pg.open()
    w = BatchWriter(pg, shards=1)
    w.start()
    try:
        room = await make_room(pg)
        with pytest.raises(ContentRefused):
            await w.submit(message(room.id, "\x00"))
        stored, created = await w.submit(message(room.id, "after"))
        assert created and stored.seq == 1  # the refused message took no seq
    finally:
        await w.close()
        await pg.close()


async def test_text_no_backend_can_encode_fails_only_its_own_message(
    store: Store,  # noqa: F811
    writer: BatchWriter,
) -> None:
    """A lone surrogate (the codec refuses it; this goes around the codec) cannot be encoded
    for SQLite or PostgreSQL: on both, that message alone is refused."""
    room = await make_room(store)
    before = writer.submit(message(room.id, "before"))
    bad = writer.submit(message(room.id, "lone \ud800"))
    after = writer.submit(message(room.id, "after"))
    assert (await before)[0].seq == 1
    with pytest.raises(ContentRefused):
        await bad
    assert (await after)[0].seq == 2
    assert await contents(store, room.id) == [(1, "before"), (2, "after")]


# -- edits and deletes in the same queue as the sends ---------------------------------------------


def edit(room_id: int, seq: int, content: str, actor: str = "alice") -> MessageChange:
    return MessageChange(room_id, seq, actor, T0, content)


def delete(room_id: int, seq: int, actor: str = "alice") -> MessageChange:
    return MessageChange(room_id, seq, actor, T0, None, False, "acme")


async def kinds(store: Store, room_id: int) -> list[tuple[int, str, int | None]]:  # noqa: F811
    found = await store.events(HistoryQuery(room_id=room_id, limit=10_000, newest=False))
    return [(e.seq, e.kind, e.target_seq) for e in found]


async def test_sends_edits_and_deletes_submitted_together_share_one_batch_in_order(
    store: Store,  # noqa: F811
    writer: BatchWriter,
) -> None:
    room = await make_room(store)
    futures = [  # all queued before the writer task runs: one batch
        writer.submit(message(room.id, "m1")),
        writer.submit(edit(room.id, 1, "m1!")),
        writer.submit(message(room.id, "m2")),
        writer.submit(delete(room.id, 3)),
        writer.submit(delete(room.id, 3)),
        writer.submit(edit(room.id, 1, "m1!!", actor="mallory")),
        writer.submit(message(room.id, "m3")),
    ]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)

    assert (writer.batches, writer.messages) == (1, 7)
    assert [type(o).__name__ for o in outcomes] == [
        "tuple",
        "Changed",
        "tuple",
        "Changed",
        "AlreadyDeleted",
        "NotAuthor",
        "tuple",
    ]
    assert await kinds(store, room.id) == [
        (1, "message", None),
        (2, "edit", 1),
        (3, "message", None),
        (4, "delete", 3),
        (5, "message", None),
    ]
    assert await contents(store, room.id) == [(1, "m1!"), (3, "m2"), (5, "m3")]


@pytest.mark.parametrize("bad", ["b\x00", "lone \ud800"], ids=["nul", "surrogate"])
async def test_postgres_refusing_an_edits_content_fails_that_edit_alone_in_a_mixed_batch(
    pg_url: str, bad: str
) -> None:
    """U+0000 or a lone surrogate in an edit (the codec keeps both out; this calls the writer
    directly): the mixed batch is halved down to that edit, which alone gets ContentRefused
    and takes no seq."""
    pg = PostgresStore(pg_url, pool_size=2)
    await pg.open()
    w = BatchWriter(pg, shards=1)
    w.start()
    try:
        room = await make_room(pg)
        await pg.append_batch([message(room.id, "a"), message(room.id, "b")])
        futures = [
            w.submit(edit(room.id, 1, "a!")),
            w.submit(message(room.id, "c")),
            w.submit(edit(room.id, 2, bad)),
            w.submit(delete(room.id, 1)),
            w.submit(message(room.id, "d")),
        ]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(o).__name__ for o in outcomes] == [
            "Changed",
            "tuple",
            "ContentRefused",
            "Changed",
            "tuple",
        ]
        assert w.refused == 1
        assert await kinds(pg, room.id) == [
            (1, "message", None),
            (2, "message", None),
            (3, "edit", 1),
            (4, "message", None),
            (5, "delete", 1),
            (6, "message", None),
        ]
        assert await contents(pg, room.id) == [(1, "a!"), (2, "b"), (4, "c"), (6, "d")]
    finally:
        await w.close()
        await pg.close()


async def test_an_edit_no_backend_can_encode_fails_only_itself(
    store: Store,  # noqa: F811
    writer: BatchWriter,
) -> None:
    room = await make_room(store)
    await store.append_batch([message(room.id, "a")])
    before = writer.submit(edit(room.id, 1, "a!"))
    bad = writer.submit(edit(room.id, 1, "lone \ud800"))
    after = writer.submit(message(room.id, "b"))
    assert isinstance(await before, Changed)
    with pytest.raises(ContentRefused):
        await bad
    assert (await after)[0].seq == 3
    assert await contents(store, room.id) == [(1, "a!"), (3, "b")]
