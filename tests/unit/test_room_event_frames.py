"""How stored room events serialise: a plain message exactly as before, an edited one with
``edited_at``, a deleted one as a tombstone without its content, a system one flagged, and the
``data`` of edit and delete events."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from nanomsg.models import Message

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
AUTHOR = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
ADMIN = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
PLAIN = Message(id=10, room_id=2, seq=4, emitter=AUTHOR, entity="e", content="hello", created_at=T0)
STAMP = "2026-03-01T12:00:00.000Z"
LATER = "2026-03-01T12:05:00.000Z"


def test_a_plain_message_has_exactly_the_fields_it_always_had() -> None:
    assert PLAIN.to_json() == {
        "content": "hello",
        "emitter": AUTHOR,
        "id": 10,
        "room_id": 2,
        "seq": 4,
        "entity": "e",
        "created_at": STAMP,
        "createdAt": STAMP,
        "updatedAt": STAMP,
    }


def test_an_edited_message_carries_its_latest_content_and_edited_at() -> None:
    edited = replace(PLAIN, content="hello!", edited_at=T0 + timedelta(minutes=5))
    assert edited.to_json() == {**PLAIN.to_json(), "content": "hello!", "edited_at": LATER}


def test_a_deleted_message_is_a_tombstone_without_its_content() -> None:
    gone = replace(
        PLAIN,
        edited_at=T0,
        deleted_at=T0 + timedelta(minutes=5),
        deleted_by=ADMIN,
    )
    assert gone.to_json() == {
        **PLAIN.to_json(),
        "content": "",
        "deleted": True,
        "deleted_at": LATER,
        "deleted_by": ADMIN,
    }


def test_a_system_message_says_so() -> None:
    assert replace(PLAIN, system=True).to_json() == {**PLAIN.to_json(), "system": True}


def test_an_edit_event_is_the_message_frame_with_the_new_content_and_the_seq_edited() -> None:
    edit = Message(
        id=11,
        room_id=2,
        seq=5,
        emitter=AUTHOR,
        entity="e",
        content="hello!",
        created_at=T0 + timedelta(minutes=5),
        kind="edit",
        target_seq=4,
    )
    data = edit.event_json()
    assert (data["content"], data["seq"], data["seq_edited"], data["edited_at"]) == (
        "hello!",
        5,
        4,
        LATER,
    )
    hidden = replace(edit, deleted_at=T0 + timedelta(minutes=9)).event_json()
    assert hidden["content"] == "" and "deleted" not in hidden


def test_a_delete_event_names_the_seq_deleted_and_who_deleted_it() -> None:
    delete = Message(
        id=12,
        room_id=2,
        seq=6,
        emitter=ADMIN,
        entity="e",
        content="",
        created_at=T0 + timedelta(minutes=5),
        kind="delete",
        target_seq=4,
    )
    assert delete.event_json() == {
        "room_id": 2,
        "seq": 6,
        "seq_deleted": 4,
        "deleted_by": ADMIN,
        "deleted_at": LATER,
    }
