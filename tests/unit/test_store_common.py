"""``common.plan_events``, the one planner of both stores' mixed batches: besides seqs, every
new message takes its room's next ordinal (its position among the room's messages, which the
conversation list's unread count subtracts) and the room's message_count rises by as many;
edits, deletes and refused inputs take none."""

from __future__ import annotations

from datetime import UTC, datetime

from nanomsg.models import Message
from nanomsg.store import common
from nanomsg.store.base import MessageChange, NewMessage, UnknownSeq

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
ALICE, BOB = "a", "b"


def stored(room_id: int, seq: int, emitter: str) -> Message:
    return Message(1000 + seq, room_id, seq, emitter, "e", "old", T0)


def test_new_messages_take_consecutive_ordinals_after_the_count_and_changes_take_none() -> None:
    heads = {1: (10, 7), 2: (0, 0)}  # room: (last_seq, message_count)
    batch = [
        NewMessage(1, ALICE, "e", "one", None, T0),  # seq 11, ordinal 8
        MessageChange(1, 3, BOB, T0, "edited"),  # seq 12, an edit: no ordinal
        MessageChange(1, 99, BOB, T0, None),  # refused: no seq, no ordinal
        NewMessage(2, BOB, "e", "first", None, T0),  # room 2: seq 1, ordinal 1
        NewMessage(1, BOB, "e", "two", None, T0),  # seq 13, ordinal 9
        MessageChange(1, 11, ALICE, T0, None),  # seq 14, deletes the batch's own message
    ]
    plan = common.plan_events(batch, heads, {(1, 3): stored(1, 3, BOB)}, {})
    assert plan.ordinals == {(1, 11): 8, (2, 1): 1, (1, 13): 9}
    assert {room: (after, count) for room, (_, after, _, count) in plan.rooms.items()} == {
        1: (14, 9),
        2: (1, 1),
    }
    assert isinstance(plan.outcomes[2], UnknownSeq)
    # The message deleted in its own batch is inserted deleted, with its ordinal all the same.
    assert plan.rows[1, 11].deleted and plan.ordinals[1, 11] == 8
    values = {
        key: common.row_values(row, None, plan.ordinals.get(key), lambda at: at)
        for key, row in plan.rows.items()
    }
    ordinal_at = common.INSERT_COLS.split(", ").index("ordinal")
    assert [values[key][ordinal_at] for key in sorted(values)] == [8, None, 9, None, 1]


def test_a_batch_of_changes_only_leaves_the_count_as_it_was() -> None:
    plan = common.plan_events(
        [MessageChange(1, 3, BOB, T0, "edited")], {1: (10, 7)}, {(1, 3): stored(1, 3, BOB)}, {}
    )
    assert plan.ordinals == {}
    assert plan.rooms[1][1:] == (11, T0, 7)


def test_latest_copy_takes_every_field_and_never_a_deleted_messages_text() -> None:
    values = common.latest_values_sql("n")
    assert len(values) == len(common.LATEST_FIELDS)
    content = values[common.LATEST_FIELDS.index("content")]
    assert content == "CASE WHEN n.deleted_at IS NULL THEN n.content ELSE '' END"
    assert common.latest_values_sql("n", seq="l.s + 1")[1] == "l.s + 1"
    plain = common.latest_copy_sql("n")
    assert plain.count("latest_") == len(common.LATEST_FIELDS)
    assert f"latest_content = {content}" in plain


def test_latest_copy_with_a_condition_keeps_the_rooms_copy_otherwise() -> None:
    guarded = common.latest_copy_sql("n", "n.seq >= r.latest_seq")
    for field in common.LATEST_FIELDS:
        assert f"latest_{field} = CASE WHEN n.seq >= r.latest_seq THEN" in guarded
        assert f"ELSE r.latest_{field} END" in guarded
