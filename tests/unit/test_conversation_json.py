"""The conversation list's entry written from its row (``Conversation.to_json``) against the
entry written from the records (``{**room.to_json(), **state.to_json()}``), for every shape of
latest message: none, plain, with a client_id, system, edited, deleted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from nanomsg.clock import iso_utc
from nanomsg.models import Conversation, instant

T0 = datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)


def text(at: datetime) -> str:
    """A stamp as the conversation list's query writes it: as the wire does."""
    return iso_utc(at)


ROOM = (7, "6f0c1a52-8d0e-4c0b-9a43-2f1e5d6c7b8a", "team", 50, "group", "acme", 10, 12)
NO_MESSAGE: tuple[Any, ...] = (None,) * 11


def entry(message: tuple[Any, ...], *, deleted_room: bool = False) -> Conversation:
    return Conversation(
        *ROOM,
        text(T0),
        text(T0 + timedelta(seconds=1)),
        text(T0) if deleted_room else None,
        False,
        text(T0 + timedelta(minutes=5, microseconds=-234)),
        9,
        3,
        *message,
    )


def message(
    *,
    client_id: str | None = None,
    system: bool = False,
    edited: bool = False,
    deleted: bool = False,
) -> tuple[Any, ...]:
    return (
        41,
        11,
        "0d7c5a1e-0000-4000-8000-000000000001",
        "acme",
        "hello",
        text(T0 + timedelta(minutes=4, microseconds=999)),
        client_id,
        system,
        text(T0 + timedelta(minutes=4, seconds=30)) if edited else None,
        text(T0 + timedelta(minutes=5)) if deleted else None,
        "0d7c5a1e-0000-4000-8000-000000000002" if deleted else None,
    )


@pytest.mark.parametrize(
    "latest",
    [
        NO_MESSAGE,
        message(),
        message(client_id="c-1"),
        message(system=True),
        message(edited=True),
        message(deleted=True),
        message(edited=True, deleted=True, client_id="c-2", system=True),
    ],
    ids=["none", "plain", "client_id", "system", "edited", "deleted", "everything"],
)
def test_the_entry_written_from_the_row_is_byte_identical_to_the_records_entry(
    latest: tuple[Any, ...],
) -> None:
    conversation = entry(latest)
    from_records = {**conversation.room.to_json(), **conversation.state.to_json()}
    assert orjson.dumps(conversation.to_json()) == orjson.dumps(from_records)


def test_stamps_read_back_to_the_millisecond_and_reach_the_wire_cut_not_rounded() -> None:
    at = datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert instant(text(at)) == at.replace(microsecond=999000)
    assert instant(text(at.replace(microsecond=0))) == at.replace(microsecond=0)
    conversation = entry(NO_MESSAGE)._replace(created_at=text(at))
    assert conversation.to_json()["createdAt"] == "2026-12-31T23:59:59.999Z"


def test_the_records_made_from_the_row_carry_every_field() -> None:
    conversation = entry(message(deleted=True), deleted_room=True)
    room, state = conversation.room, conversation.state
    at = T0.replace(microsecond=891000)  # the list's stamps are the wire's milliseconds
    assert (room.id, room.name, room.created_at, room.deleted_at, room.dm) == (
        7,
        "team",
        at,
        at,
        False,
    )
    assert (state.room_id, state.last_seq, state.read_seq, state.unread) == (7, 12, 9, 3)
    assert state.last_message is not None and state.last_message.room_id == 7
    assert state.last_message.deleted and state.last_message.to_json()["content"] == ""
    assert entry(NO_MESSAGE).state.last_message is None
