"""SQLite writes a batch's edits and its deletes in separate UPDATEs (an edit leaves the
columns of the deletion index alone): the stored rows end as the changes left them
(first_content, client_id and ordinal kept), and a delete adds its message to the deleted
messages' index while leaving it in the own one. And the store's micro benchmark in rounds."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from nanomsg.store.base import MessageChange, NewMessage
from nanomsg.store.sqlite import SqliteStore, to_micros
from tests.integration.test_store import T0, make_room, new_id

STORED = "SELECT content, first_content, edited_at, deleted_at, deleted_by FROM messages"


@pytest.mark.asyncio
async def test_a_batch_of_edits_and_deletes_keeps_first_content_earlier_edits_and_own_entries(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "store.db")
    store = SqliteStore(path)
    await store.open()
    try:
        room = await make_room(store)
        user = new_id()
        sent = await store.append_batch(
            [NewMessage(room.id, user, "e", f"m{i}", None, T0) for i in range(3)]
        )
        a, b, c = (outcome[0].seq for outcome in sent if isinstance(outcome, tuple))
        first, second, third = (T0 + timedelta(seconds=s) for s in (1, 2, 3))
        # Batch 1: edit A and B. Batch 2: edit A again, delete B (edited before), delete C.
        await store.append_events(
            [
                MessageChange(room.id, a, user, first, "a1"),
                MessageChange(room.id, b, user, first, "b1"),
            ]
        )
        await store.append_events(
            [
                MessageChange(room.id, a, user, second, "a2"),
                MessageChange(room.id, b, user, third, None),
                MessageChange(room.id, c, user, third, None),
            ]
        )
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        rows = {
            seq: db.execute(f"{STORED} WHERE room_id = ? AND seq = ?", (room.id, seq)).fetchone()
            for seq in (a, b, c)
        }
        unread = db.execute(
            "SELECT seq FROM messages INDEXED BY messages_own_idx"
            " WHERE room_id = ? AND emitter = ? AND kind = 'message' AND deleted_at IS NULL",
            (room.id, user),
        ).fetchall()
        deleted = db.execute(
            "SELECT seq FROM messages INDEXED BY messages_deleted_idx"
            " WHERE room_id = ? AND kind = 'message' AND deleted_at IS NOT NULL ORDER BY seq",
            (room.id,),
        ).fetchall()
        own = db.execute(
            "SELECT seq FROM messages INDEXED BY messages_own_idx"
            " WHERE room_id = ? AND emitter = ? AND kind = 'message' ORDER BY seq",
            (room.id, user),
        ).fetchall()
        # What the unread count reads of them is in the indexes themselves (no row visited).
        plans = [
            str(row[-1])
            for sql in (
                "SELECT count(*) FROM messages WHERE room_id = ? AND emitter = ? AND seq > 0"
                " AND kind = 'message'",
                "SELECT count(*) FROM messages WHERE room_id = ? AND seq > 0"
                " AND kind = 'message' AND deleted_at IS NOT NULL AND emitter <> ?",
            )
            for row in db.execute("EXPLAIN QUERY PLAN " + sql, (room.id, user)).fetchall()
        ]
    assert rows[a] == ("a2", "m0", to_micros(second), None, None)
    assert rows[b] == ("b1", "m1", to_micros(first), to_micros(third), user)
    assert rows[c] == ("m2", None, None, to_micros(third), user)
    # The partial indexes over deleted_at hold exactly the live and the deleted messages.
    assert unread == [(a,)]
    assert deleted == [(b,), (c,)]
    # Since migration 6 a delete leaves its message's entry in the own index (one index
    # write per delete): that index holds every message of the emitter, deleted or not.
    assert own == [(a,), (b,), (c,)]
    assert any("COVERING INDEX messages_own_idx" in plan for plan in plans), plans
    assert any("COVERING INDEX messages_deleted_idx" in plan for plan in plans), plans


@pytest.mark.asyncio
async def test_changed_messages_keep_their_client_id_first_content_and_ordinal(
    tmp_path: Path,
) -> None:
    """A change rewrites none of its target's client_id, first_content once set, or ordinal:
    a resend of its client_id still finds it, edited or deleted; a message edited twice
    keeps the text as sent; a delete of a message edited before keeps that edit, and one
    edited and deleted in one batch keeps both (a delete alone sets the deletion columns
    alone, one after an edit of the same batch the edit's columns too)."""
    path = str(tmp_path / "store.db")
    store = SqliteStore(path)
    await store.open()
    try:
        room = await make_room(store)
        user = new_id()
        sent = await store.append_batch(
            [NewMessage(room.id, user, "e", f"m{i}", f"c{i}", T0) for i in range(4)]
        )
        a, b, c, d = (outcome[0].seq for outcome in sent if isinstance(outcome, tuple))
        first, second = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
        await store.append_events(
            [
                MessageChange(room.id, a, user, first, "a1"),
                MessageChange(room.id, d, user, first, "d1"),
            ]
        )
        await store.append_events(
            [
                MessageChange(room.id, a, user, second, "a2"),
                MessageChange(room.id, b, user, second, None),
                MessageChange(room.id, c, user, second, "c1"),
                MessageChange(room.id, c, user, second, None),
                MessageChange(room.id, d, user, second, None),
            ]
        )
        again = await store.append_events(
            [NewMessage(room.id, user, "e", "resent", f"c{i}", second) for i in range(4)]
        )
    finally:
        await store.close()
    assert [(o[0].seq, o[1]) for o in again if isinstance(o, tuple)] == [
        (a, False),
        (b, False),
        (c, False),
        (d, False),
    ]
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT seq, client_id, content, first_content, ordinal, edited_at, deleted_at,"
            " deleted_by FROM messages WHERE room_id = ? AND kind = 'message' ORDER BY seq",
            (room.id,),
        ).fetchall()
    s1, s2 = to_micros(first), to_micros(second)
    assert rows == [
        (a, "c0", "a2", "m0", 1, s2, None, None),
        (b, "c1", "m1", None, 2, None, s2, user),
        (c, "c2", "c1", "m2", 3, s2, s2, user),
        (d, "c3", "d1", "m3", 4, s1, s2, user),
    ]


def test_the_micro_benchmark_in_rounds_edits_and_deletes_every_message_it_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``benchmarks.sqlite_changes --rounds``: each round edits and deletes the messages it
    sent (a change refused would fail the run), and each kind gets one figure."""
    from benchmarks import sqlite_changes

    sqlite_changes.main(["--rooms", "2", "--batches", "6", "--rounds", "3", "--runs", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["send", "edit", "delete"], lines
