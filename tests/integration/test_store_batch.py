"""``Store.append_batch`` on real SQLite and PostgreSQL: per-room gapless seqs in batch order,
rooms gone, client_id idempotency, concurrent batches, and (PostgreSQL) a batch whose backend
dies mid-statement, which must leave nothing behind and no gap; and (PostgreSQL) the batch
statements' generic plans."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from nanomsg.models import Message
from nanomsg.store import common
from nanomsg.store.base import (
    AlreadyDeleted,
    Changed,
    EventOutcome,
    HistoryQuery,
    MessageChange,
    NewMessage,
    RoomEvent,
    RoomGone,
    Store,
    StoreUnavailable,
    UnknownSeq,
)
from nanomsg.store.postgres import (
    _APPEND_BATCH_SQL,
    _EVENTS_BATCH_SQL,
    _WRITE_EVENTS_SQL,
    PostgresStore,
    _event_row,
    _plan,
    _write_params,
)
from nanomsg.store.sqlite import SqliteStore
from tests.integration.test_store import (
    T0,
    make_room,
    message,
    new_id,
    recorded_sql,
    store,  # noqa: F401  (fixture: the same tests on SQLite and PostgreSQL)
    store_target,  # noqa: F401
    wait_for_lock_waiter,
)

pytestmark = pytest.mark.asyncio

Outcome = tuple[Message, bool] | RoomGone


def stored(outcome: Outcome) -> Message:
    """The message of an outcome that must be a success."""
    assert not isinstance(outcome, RoomGone), outcome
    return outcome[0]


async def history(store: Store, room_id: int) -> list[Message]:  # noqa: F811
    return await store.history(HistoryQuery(room_id=room_id, limit=10_000, newest=False))


async def last_seq(store: Store, room_id: int) -> int:  # noqa: F811
    return (await store.room_heads([room_id]))[room_id]


async def test_empty_batch_returns_an_empty_list(store: Store) -> None:  # noqa: F811
    assert await store.append_batch([]) == []


async def test_batch_seqs_are_gapless_and_in_batch_order_across_interleaved_rooms(
    store: Store,  # noqa: F811
) -> None:
    a, b, c = await make_room(store), await make_room(store), await make_room(store)
    await store.append_message(message(b.id, "before"))  # b continues from seq 1
    order = [a, b, a, c, b, a, c, a]
    batch = [
        message(room.id, f"m{i}", now=T0 + timedelta(seconds=i)) for i, room in enumerate(order)
    ]

    outcomes = await store.append_batch(batch)

    assert len(outcomes) == len(batch)
    assert all(not isinstance(o, RoomGone) and o[1] for o in outcomes)
    messages = [stored(o) for o in outcomes]
    assert [(m.room_id, m.content) for m in messages] == [(n.room_id, n.content) for n in batch]
    assert [m.seq for m in messages] == [1, 2, 2, 1, 3, 3, 2, 4]
    assert [m.created_at for m in messages] == [n.now for n in batch]
    assert len({m.id for m in messages}) == len(messages)
    # What the batch returned is exactly what was stored.
    assert await history(store, a.id) == [m for m in messages if m.room_id == a.id]
    assert [m.seq for m in await history(store, b.id)] == [1, 2, 3]
    assert await store.room_heads([a.id, b.id, c.id]) == {a.id: 4, b.id: 3, c.id: 2}
    # Single appends carry on from the batch without a gap.
    after, _ = await store.append_message(message(a.id, "after"))
    assert after.seq == 5


async def test_batch_with_a_deleted_and_an_absent_room_returns_room_gone_for_those_and_stores_the_rest(  # noqa: E501
    store: Store,  # noqa: F811
) -> None:
    live, deleted = await make_room(store), await make_room(store)
    await store.append_message(message(deleted.id, "kept"))
    assert await store.delete_room(deleted.id, T0)
    absent = 10**12
    batch = [
        message(live.id, "one"),
        message(deleted.id, "lost"),
        message(absent, "nowhere", client_id="x"),
        message(live.id, "two"),
        message(deleted.id, "lost again", client_id="y"),
        message(live.id, "three"),
    ]

    outcomes = await store.append_batch(batch)

    assert [isinstance(o, RoomGone) for o in outcomes] == [False, True, True, False, True, False]
    assert [stored(outcomes[i]).seq for i in (0, 3, 5)] == [1, 2, 3]
    assert [m.content for m in await history(store, live.id)] == ["one", "two", "three"]
    # The deleted room consumed no seq and stored nothing more.
    assert [m.content for m in await history(store, deleted.id)] == ["kept"]
    assert await last_seq(store, deleted.id) == 1
    assert await history(store, absent) == []


async def test_batch_client_id_already_stored_returns_that_message_not_created_and_stores_nothing(
    store: Store,  # noqa: F811
) -> None:
    room = await make_room(store)
    original, _ = await store.append_message(message(room.id, "first", client_id="abc"))
    batch = [
        message(room.id, "new"),
        message(room.id, "retry", client_id="abc", now=T0 + timedelta(seconds=5)),
        message(room.id, "other emitter", emitter="bob", client_id="abc"),
    ]

    outcomes = await store.append_batch(batch)

    assert not isinstance(outcomes[1], RoomGone)
    assert outcomes[1] == (original, False)
    assert [(stored(o).seq, stored(o).content) for o in outcomes] == [
        (2, "new"),
        (1, "first"),
        (3, "other emitter"),
    ]
    assert [o[1] for o in outcomes if not isinstance(o, RoomGone)] == [True, False, True]
    assert [m.content for m in await history(store, room.id)] == ["first", "new", "other emitter"]
    assert await last_seq(store, room.id) == 3


async def test_batch_client_id_repeated_inside_one_batch_is_stored_once(
    store: Store,  # noqa: F811
) -> None:
    room = await make_room(store)
    gone = 10**12
    batch = [
        message(room.id, "first copy", client_id="dup"),
        message(room.id, "plain"),
        message(room.id, "second copy", client_id="dup"),
        message(gone, "in no room", client_id="dup"),
        message(room.id, "third copy", client_id="dup", now=T0 + timedelta(seconds=1)),
        message(gone, "in no room again", client_id="dup"),
    ]

    outcomes = await store.append_batch(batch)

    first = stored(outcomes[0])
    assert outcomes[0] == (first, True)
    assert outcomes[2] == (first, False)
    assert outcomes[4] == (first, False)
    assert stored(outcomes[1]).seq == 2 and first.seq == 1
    assert isinstance(outcomes[3], RoomGone) and isinstance(outcomes[5], RoomGone)
    assert [m.content for m in await history(store, room.id)] == ["first copy", "plain"]
    assert await last_seq(store, room.id) == 2


async def test_concurrent_batches_on_the_same_rooms_give_every_room_seqs_one_to_n(
    store: Store,  # noqa: F811
) -> None:
    rooms = [await make_room(store) for _ in range(4)]
    rng = random.Random(7)
    # Each batch visits the rooms in its own random order: the rooms' locks must still be
    # taken in one global order, or concurrent batches would deadlock.
    batches = [[message(rng.choice(rooms).id, f"b{b}m{i}") for i in range(15)] for b in range(8)]

    results = await asyncio.gather(*(store.append_batch(batch) for batch in batches))

    for batch, outcomes in zip(batches, results, strict=True):
        messages = [stored(o) for o in outcomes]
        assert [m.content for m in messages] == [n.content for n in batch]
        for room in rooms:
            # Within a batch a room's messages follow batch order with consecutive seqs.
            seqs = [m.seq for m in messages if m.room_id == room.id]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)) if seqs else [])
    for room in rooms:
        sent = sum(n.room_id == room.id for batch in batches for n in batch)
        stored_history = await history(store, room.id)
        assert [m.seq for m in stored_history] == list(range(1, sent + 1))
        assert await last_seq(store, room.id) == sent
        # The room row's copy of its latest message is the last one stored, whichever of the
        # racing batches wrote it.
        state = (await store.room_states(new_id(), room.entity_owner, 100, [room.id]))[room.id]
        assert state.last_message is not None
        assert state.last_message.to_json() == stored_history[-1].to_json()


async def test_batch_is_a_bounded_number_of_statements_whatever_its_size(
    store: SqliteStore | PostgresStore,  # noqa: F811
) -> None:
    rooms = [await make_room(store) for _ in range(30)]
    await store.append_message(message(rooms[0].id, "known", client_id="known"))
    batch = [
        message(rooms[i % 30].id, f"m{i}", client_id=f"c{i}" if i % 3 else None) for i in range(300)
    ]
    batch.append(message(rooms[0].id, "retry", client_id="known"))

    async with recorded_sql(store) as statements:
        outcomes = await store.append_batch(batch)

    created = [o[1] for o in outcomes if not isinstance(o, RoomGone)]
    assert created == [True] * 300 + [False]
    if isinstance(store, PostgresStore):
        # One round trip, its commit included; handing the connection back to the pool sends
        # nothing (no reset query).
        assert len(statements) == 1, statements
    else:
        # BEGIN IMMEDIATE, stored client_ids, seqs of every room, all inserts, the rooms'
        # copies of their latest message, COMMIT.
        assert len(statements) == 6, statements


async def test_naive_timestamp_in_a_batch_is_rejected_before_anything_is_stored(
    store: Store,  # noqa: F811
) -> None:
    room = await make_room(store)
    naive = NewMessage(room.id, "alice", "acme", "naive", None, T0.replace(tzinfo=None))

    with pytest.raises(ValueError, match="timezone-aware"):
        await store.append_batch([message(room.id, "fine"), naive])

    assert await history(store, room.id) == []
    assert await last_seq(store, room.id) == 0


# -- PostgreSQL adversity ---------------------------------------------------------------------
BLOCKED_BY_ME = (
    "SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() = ANY (pg_blocking_pids(pid))"
)


async def test_postgres_batch_locks_its_rooms_in_id_order_whatever_the_batch_order(
    fresh_pg_url: str,
) -> None:
    pg = PostgresStore(fresh_pg_url, pool_size=2)
    await pg.open()
    locker = await asyncpg.connect(fresh_pg_url)
    prober = await asyncpg.connect(fresh_pg_url)
    try:
        low, high = await make_room(pg), await make_room(pg)
        assert low.id < high.id
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", high.id)
            # The batch names the high room first, yet must lock the low one before waiting.
            pending = asyncio.create_task(
                pg.append_batch([message(high.id, "h"), message(low.id, "l")])
            )
            await wait_for_lock_waiter(locker)
            with pytest.raises(asyncpg.LockNotAvailableError):
                await prober.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE NOWAIT", low.id)
        outcomes = await pending
        assert [stored(o).seq for o in outcomes] == [1, 1]
    finally:
        await prober.close()
        await locker.close()
        await pg.close()


async def test_postgres_batch_acks_only_after_commit_across_a_crash_of_the_batch(
    fresh_pg_url: str,
) -> None:
    pg = PostgresStore(fresh_pg_url, pool_size=2)
    await pg.open()
    locker = await asyncpg.connect(fresh_pg_url)
    try:
        low, high = await make_room(pg), await make_room(pg)
        await pg.append_batch([message(low.id, "one"), message(high.id, "one")])
        # Block the batch on the high room: by then it holds (and may have bumped) the low one.
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", high.id)
            pending = asyncio.create_task(
                pg.append_batch(
                    [
                        message(low.id, "lost"),
                        message(high.id, "lost"),
                        message(low.id, "lost", client_id="lost-1"),
                    ]
                )
            )
            await wait_for_lock_waiter(locker)
            await locker.execute("SELECT pg_stat_clear_snapshot()")
            victims = [row["pid"] for row in await locker.fetch(BLOCKED_BY_ME)]
            assert len(victims) == 1
            assert await locker.fetchval("SELECT pg_terminate_backend($1, 5000)", victims[0])
        # The lock is released; the batch's backend is gone with its uncommitted work.
        with pytest.raises(StoreUnavailable):
            await pending

        assert await locker.fetchval("SELECT count(*) FROM messages WHERE content = 'lost'") == 0
        assert await pg.room_heads([low.id, high.id]) == {low.id: 1, high.id: 1}
        outcomes = await pg.append_batch(
            [message(high.id, "two"), message(low.id, "two", client_id="lost-1")]
        )
        assert [(stored(o).seq, o[1]) for o in outcomes if not isinstance(o, RoomGone)] == [
            (2, True),
            (2, True),
        ]
        assert [m.seq for m in await history(pg, low.id)] == [1, 2]
    finally:
        await locker.close()
        await pg.close()


async def test_postgres_batches_racing_on_one_client_id_behind_the_room_lock_store_it_once(
    fresh_pg_url: str,
) -> None:
    pg = PostgresStore(fresh_pg_url, pool_size=6)
    await pg.open()
    locker = await asyncpg.connect(fresh_pg_url)
    try:
        room = await make_room(pg)
        # Every batch misses the client_id (not stored yet), then queues on the room lock; the
        # first through stores it, the others collide on the unique index and must retry.
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", room.id)
            batches = [
                asyncio.create_task(
                    pg.append_batch(
                        [message(room.id, f"plain {i}"), message(room.id, client_id="same")]
                    )
                )
                for i in range(4)
            ]
            await wait_for_lock_waiter(locker, count=4)
        results = await asyncio.gather(*batches)

        dup = [outcomes[1] for outcomes in results]
        assert sum(not isinstance(o, RoomGone) and o[1] for o in dup) == 1
        assert len({stored(o).id for o in dup}) == 1
        assert [m.seq for m in await history(pg, room.id)] == list(range(1, 6))
    finally:
        await locker.close()
        await pg.close()


# -- batches of room events: messages, edits and deletes together -------------------------------


def edit(
    room_id: int, seq: int, content: str, *, actor: str = "alice", at: int = 1
) -> MessageChange:
    return MessageChange(room_id, seq, actor, T0 + timedelta(seconds=at), content)


def delete(
    room_id: int, seq: int, *, actor: str = "alice", admin: bool = False, at: int = 1
) -> MessageChange:
    return MessageChange(room_id, seq, actor, T0 + timedelta(seconds=at), None, admin, "acme")


async def events(store: Store, room_id: int) -> list[Message]:  # noqa: F811
    return await store.events(HistoryQuery(room_id=room_id, limit=10_000, newest=False))


def sent(outcome: EventOutcome) -> Message:
    """The message of an outcome that must be a message stored."""
    assert isinstance(outcome, tuple), outcome
    return outcome[0]


def changed(outcome: EventOutcome) -> Changed:
    assert isinstance(outcome, Changed), outcome
    return outcome


async def test_a_mixed_batch_takes_seqs_in_batch_order_across_kinds_and_rooms(
    store: Store,  # noqa: F811
) -> None:
    a, b = await make_room(store), await make_room(store)
    await store.append_batch([message(a.id, "a1"), message(a.id, "a2"), message(b.id, "b1")])
    batch: list[RoomEvent] = [
        message(a.id, "a3"),
        edit(a.id, 1, "a1!"),
        message(b.id, "b2"),
        delete(b.id, 1),
        delete(a.id, 2),
        message(a.id, "a4"),
    ]

    outcomes = await store.append_events(batch)

    assert sent(outcomes[0]).seq == 3
    first_edit = changed(outcomes[1])
    assert (first_edit.event.seq, first_edit.event.kind, first_edit.event.target_seq) == (
        4,
        "edit",
        1,
    )
    assert (first_edit.message.seq, first_edit.message.content) == (1, "a1!")
    assert first_edit.message.edited_at == T0 + timedelta(seconds=1)
    assert sent(outcomes[2]).seq == 2
    assert (changed(outcomes[3]).event.seq, changed(outcomes[3]).message.deleted) == (3, True)
    assert changed(outcomes[4]).event.seq == 5
    assert sent(outcomes[5]).seq == 6
    # What the batch returned is what was stored, ids included.
    in_a = await events(store, a.id)
    assert [(e.seq, e.kind, e.target_seq) for e in in_a] == [
        (1, "message", None),
        (2, "message", None),
        (3, "message", None),
        (4, "edit", 1),
        (5, "delete", 2),
        (6, "message", None),
    ]
    assert in_a[3] == first_edit.event and in_a[4] == changed(outcomes[4]).event
    assert (await history(store, a.id))[0] == first_edit.message
    assert [e.kind for e in await events(store, b.id)] == ["message", "message", "delete"]
    assert (await last_seq(store, a.id), await last_seq(store, b.id)) == (6, 3)


async def test_two_deletes_of_one_message_in_one_batch_store_the_first_and_refuse_the_second(
    store: Store,  # noqa: F811
) -> None:
    room = await make_room(store)
    await store.append_batch([message(room.id, "m")])
    outcomes = await store.append_events(
        [delete(room.id, 1), delete(room.id, 1, actor="root", admin=True), message(room.id, "n")]
    )
    assert changed(outcomes[0]).event.seq == 2
    assert isinstance(outcomes[1], AlreadyDeleted) and outcomes[1].seq == 1
    assert sent(outcomes[2]).seq == 3  # the refusal took no seq
    assert [e.kind for e in await events(store, room.id)] == ["message", "delete", "message"]


async def test_a_message_sent_earlier_in_the_batch_may_be_edited_and_then_deleted_there(
    store: Store,  # noqa: F811
) -> None:
    room = await make_room(store)
    outcomes = await store.append_events(
        [
            message(room.id, "helo"),
            edit(room.id, 1, "hello"),
            edit(room.id, 1, "hello!"),
            delete(room.id, 1, at=2),
            edit(room.id, 1, "too late", at=3),
        ]
    )
    first = sent(outcomes[0])
    assert (first.seq, first.content, first.edited_at) == (1, "helo", None)  # as sent
    assert [changed(o).message.content for o in outcomes[1:3]] == ["hello", "hello!"]
    assert changed(outcomes[3]).message.deleted_at == T0 + timedelta(seconds=2)
    assert changed(outcomes[3]).message.id == first.id
    assert isinstance(outcomes[4], AlreadyDeleted)  # an edit after a delete in the same batch
    (tomb,) = await history(store, room.id)
    assert tomb == changed(outcomes[3]).message
    assert (tomb.content, tomb.edited_at, tomb.deleted_by) == (
        "hello!",
        T0 + timedelta(seconds=1),
        "alice",
    )
    assert [(e.seq, e.kind) for e in await events(store, room.id)] == [
        (1, "message"),
        (2, "edit"),
        (3, "edit"),
        (4, "delete"),
    ]


async def test_a_refused_change_fails_only_itself_and_takes_no_seq(
    store: Store,  # noqa: F811
) -> None:
    room, gone = await make_room(store), await make_room(store)
    await store.append_batch([message(room.id, "mine"), message(gone.id, "x")])
    await store.delete_room(gone.id, T0)
    outcomes = await store.append_events(
        [
            edit(room.id, 1, "theirs", actor="mallory"),
            delete(room.id, 1, actor="mallory"),
            edit(room.id, 9, "nothing there"),
            message(room.id, "next"),
            edit(room.id, 2, "next!"),  # seq 2: the message just sent in this batch...
            edit(gone.id, 1, "gone"),
            edit(room.id, 1, "mine!"),
        ]
    )
    assert [type(o).__name__ for o in outcomes] == [
        "NotAuthor",
        "NotAuthor",
        "UnknownSeq",
        "tuple",
        "Changed",  # ...so editing it works
        "RoomGone",
        "Changed",
    ]
    assert sent(outcomes[3]).seq == 2
    assert [changed(o).event.seq for o in (outcomes[4], outcomes[6])] == [3, 4]
    unknown = await store.append_events([edit(room.id, 3, "the edit event itself")])
    assert isinstance(unknown[0], UnknownSeq)
    assert await last_seq(store, room.id) == 4


async def test_an_edit_of_a_message_sent_earlier_in_the_batch_is_stored_after_it(
    store: Store,  # noqa: F811
) -> None:
    """One change, naming the message sent just before it in the same batch (PostgreSQL's
    one-statement path cannot see that message and hands the batch to the general one)."""
    room = await make_room(store)
    await store.append_batch([message(room.id, "a")])
    outcomes = await store.append_events(
        [message(room.id, "b"), edit(room.id, 2, "b!"), delete(room.id, 1)]
    )
    assert sent(outcomes[0]).seq == 2
    assert (changed(outcomes[1]).event.seq, changed(outcomes[1]).message.content) == (3, "b!")
    assert changed(outcomes[1]).message.id == sent(outcomes[0]).id
    assert changed(outcomes[2]).event.seq == 4
    assert [(m.seq, m.content, m.deleted) for m in await history(store, room.id)] == [
        (1, "a", True),
        (2, "b!", False),
    ]


def cte_rescans(node: dict[str, Any]) -> list[tuple[str, int]]:
    """The CTE scans of a JSON plan that ran more than once (a nested loop over a CTE: the
    work grows with the product of two inputs' sizes), with their loop counts."""
    found = []
    if node["Node Type"] == "CTE Scan" and node.get("Actual Loops", 1) > 1:
        found.append((node.get("CTE Name", "?"), node["Actual Loops"]))
    for child in node.get("Plans", []):
        found += cte_rescans(child)
    return found


async def test_postgres_batch_statements_generic_plans_scan_each_cte_once(pg_url: str) -> None:
    """PostgreSQL plans a prepared statement generically after five runs, without looking at
    its arrays: a join of two CTEs then became a nested loop, and a batch over 1 000 rooms
    cost 160 ms instead of 28. Under a generic plan (forced), the append, the batch with
    changes and the general path's write, each over 300 rooms, rescan no CTE."""
    pg = PostgresStore(pg_url)
    await pg.open()
    try:
        rooms = [(await make_room(pg)).id for _ in range(300)]
        await pg.append_batch([message(room_id, "first") for room_id in rooms])
    finally:
        await pg.close()
    now = datetime.now(UTC)
    n = len(rooms)
    appended = (
        "EXECUTE b('{"
        + ",".join(map(str, rooms))
        + "}', "
        + ", ".join(
            f"array_fill({value}, ARRAY[{n}])"
            for value in ("'alice'::text", "'e'::text", "'x'::text", "NULL::text", "now()", "false")
        )
        + ")"
    )
    changes = [MessageChange(room_id, 1, "alice", now, "edited") for room_id in rooms]
    changes += [NewMessage(room_id, "alice", "e", "more", None, now) for room_id in rooms]
    rows = orjson.dumps([_event_row(k + 1, e) for k, e in enumerate(changes)]).decode()
    cases = [
        (
            "bigint[], text[], text[], text[], text[], timestamptz[], boolean[]",
            _APPEND_BATCH_SQL,
            appended,
        ),
        ("jsonb", _EVENTS_BATCH_SQL, "EXECUTE b('" + rows.replace("'", "''") + "')"),
    ]
    conn = await asyncpg.connect(pg_url)
    try:
        # The general path's write, planned from the store's own read: a new message per room
        # and an edit of it in the same batch.
        heads = {room_id: 1 for room_id in rooms}
        general: list[RoomEvent] = [NewMessage(r, "alice", "e", "new", None, now) for r in rooms]
        general += [MessageChange(r, heads[r] + 1, "alice", now, "edited") for r in rooms]
        plan = await _plan(conn, general, rooms, common.change_targets(general), [])
        quoted = ", ".join("'" + p.replace("'", "''") + "'" for p in _write_params(plan))
        cases.append(("jsonb, jsonb, jsonb", _WRITE_EVENTS_SQL, f"EXECUTE b({quoted})"))
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for types, sql, execute in cases:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(f"PREPARE b({types}) AS {sql}")
                plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {execute}"))
            finally:
                await transaction.rollback()
                await conn.execute("DEALLOCATE b")
            assert plan[0]["Plan"]["Actual Rows"] >= len(rooms), plan  # it wrote the batch
            assert cte_rescans(plan[0]["Plan"]) == [], plan
    finally:
        await conn.close()
