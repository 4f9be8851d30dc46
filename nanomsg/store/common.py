"""Logic both backends share, so they cannot drift apart.

Argument checks, the column lists and their mapping to models, the rules a new room starts
with, the history query and the handling of client_ids repeated inside one batch are the same
for SQLite and PostgreSQL. What differs (SQL dialect, placeholders, how timestamps are stored)
stays in each backend and comes in here as a parameter where needed: ``stamp`` turns a stored
timestamp into an aware UTC datetime, ``store_stamp`` an aware datetime into a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from nanomsg.models import ROOM_TYPES, RULE_KINDS, Message, Room, RoomAccess, Rule
from nanomsg.store.base import (
    HistoryQuery,
    LimitBelowRules,
    NewMessage,
    NewRoom,
    RoomChanges,
    RoomGone,
)

Row = Sequence[Any]
# A stored timestamp as read back from a row, made an aware UTC datetime.
Stamp = Callable[[Any], datetime]
# The outcome of one input of ``append_batch``.
Outcome = tuple[Message, bool] | RoomGone

ROOM_COLS = (
    "r.id, r.uuid, r.name, r.level_admin, r.type, r.entity_owner, r.max_entity_rules, "
    "r.last_seq, r.created_at, r.updated_at, r.deleted_at"
)
ROOM_WIDTH = 11
RULE_COLS = (
    "rr.room_id, rr.subject, rr.kind, rr.permissions, rr.level, rr.accepted, "
    "rr.created_at, rr.updated_at"
)
RULE_WIDTH = 8
MSG_COLS = "m.id, m.room_id, m.seq, m.emitter, m.entity, m.content, m.created_at, m.client_id"


def utc(dt: datetime) -> datetime:
    """The same instant in UTC; naive datetimes are a caller bug (their zone is unknown)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got {dt!r}")
    return dt.astimezone(UTC)


def check_page(limit: int, offset: int = 0) -> None:
    """Reject negative paging, which neither database would read as the caller meant."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got {limit}, {offset}")


def check_kind(kind: str) -> None:
    """Reject a rule kind the permission model does not know."""
    if kind not in RULE_KINDS:
        raise ValueError(f"rule kind must be one of {RULE_KINDS}, got {kind!r}")


def check_room_type(room_type: str) -> None:
    """Reject a room type the permission model does not know."""
    if room_type not in ROOM_TYPES:
        raise ValueError(f"room type must be one of {ROOM_TYPES}, got {room_type!r}")


def room_from_row(row: Row, stamp: Stamp) -> Room:
    """The Room in a row that starts with ``ROOM_COLS``."""
    return Room(
        id=int(row[0]),
        uuid=str(row[1]),
        name=str(row[2]),
        level_admin=int(row[3]),
        type=str(row[4]),
        entity_owner=str(row[5]),
        max_entity_rules=int(row[6]),
        last_seq=int(row[7]),
        created_at=stamp(row[8]),
        updated_at=stamp(row[9]),
        deleted_at=None if row[10] is None else stamp(row[10]),
    )


def rule_from_row(row: Row, stamp: Stamp) -> Rule:
    """The Rule in a row that starts with ``RULE_COLS``."""
    return Rule(
        room_id=int(row[0]),
        subject=str(row[1]),
        kind=str(row[2]),
        permissions=str(row[3]),
        level=int(row[4]),
        accepted=bool(row[5]),
        created_at=stamp(row[6]),
        updated_at=stamp(row[7]),
    )


def message_from_row(row: Row, stamp: Stamp) -> Message:
    """The Message in a row that starts with ``MSG_COLS``."""
    return Message(
        id=int(row[0]),
        room_id=int(row[1]),
        seq=int(row[2]),
        emitter=str(row[3]),
        entity=str(row[4]),
        content=str(row[5]),
        created_at=stamp(row[6]),
        client_id=None if row[7] is None else str(row[7]),
    )


def rule_and_room_from_row(row: Row, stamp: Stamp) -> tuple[Rule, Room]:
    """The Rule and Room in a row of ``RULE_COLS`` followed by ``ROOM_COLS``."""
    values = tuple(row)
    return rule_from_row(values[:RULE_WIDTH], stamp), room_from_row(values[RULE_WIDTH:], stamp)


def room_access_from_rows(rows: Sequence[Row], stamp: Stamp) -> RoomAccess | None:
    """The RoomAccess in rows of ``ROOM_COLS`` LEFT JOINed with ``RULE_COLS``; None if no row.

    A room without rules comes as one row whose rule columns are all NULL.
    """
    if not rows:
        return None
    rules = tuple(
        rule_from_row(tuple(row)[ROOM_WIDTH:], stamp) for row in rows if row[ROOM_WIDTH] is not None
    )
    return RoomAccess(room=room_from_row(rows[0], stamp), rules=rules)


def creator_rules(new: NewRoom) -> list[tuple[str, str, str, int]]:
    """The (kind, subject, permissions, level) rules a new room starts with, all accepted.

    The creator administers the room; a group room also lets its owner entity read and write,
    from ``entity_level`` up (100 unless the creator asked otherwise).
    """
    rules = [("user", new.creator_user, "rwa", new.creator_level)]
    if new.type == "group":
        rules.append(("entity", new.entity_owner, "rw", new.entity_level))
    return rules


def created_room(new: NewRoom, room_id: int, room_uuid: str, now: datetime) -> Room:
    """The Room just inserted for ``new``: no messages yet, created and updated ``now``."""
    return Room(
        id=room_id,
        uuid=room_uuid,
        name=new.name,
        level_admin=new.level_admin,
        type=new.type,
        entity_owner=new.entity_owner,
        max_entity_rules=new.max_entity_rules,
        last_seq=0,
        created_at=now,
        updated_at=now,
    )


def check_changes(room_id: int, changes: RoomChanges, rules: int) -> None:
    """Refuse a ``max_entity_rules`` below the ``rules`` the room already holds."""
    wanted = changes.max_entity_rules
    if wanted is not None and wanted < rules:
        raise LimitBelowRules(room_id, rules, wanted)


def history_sql(
    query: HistoryQuery, store_stamp: Callable[[datetime], Any], mark: Callable[[int], str]
) -> tuple[str, list[Any]]:
    """The SELECT answering ``query`` and its parameters; ``mark(n)`` writes the nth placeholder.

    Only the bounds given make it into the SQL, so the planner sees a plain index range on
    (room_id, seq), walked from the requested end.
    """
    check_page(query.limit)
    args: list[Any] = [query.room_id]
    conditions = [f"m.room_id = {mark(1)}"]

    def add(condition: str, value: Any) -> None:
        args.append(value)
        conditions.append(f"{condition} {mark(len(args))}")

    if query.before is not None:
        add("m.seq <", query.before)
    if query.after is not None:
        add("m.seq >", query.after)
    if query.date_from is not None:
        add("m.created_at >=", store_stamp(query.date_from))
    if query.date_to is not None:
        add("m.created_at <=", store_stamp(query.date_to))
    args.append(query.limit)
    order = "DESC" if query.newest else "ASC"
    sql = (
        f"SELECT {MSG_COLS} FROM messages m WHERE {' AND '.join(conditions)}"
        f" ORDER BY m.seq {order} LIMIT {mark(len(args))}"
    )
    return sql, args


def history_messages(rows: Sequence[Row], query: HistoryQuery, stamp: Stamp) -> list[Message]:
    """The messages read by ``history_sql``, oldest first whichever end they were read from."""
    messages = [message_from_row(row, stamp) for row in rows]
    if query.newest:
        messages.reverse()
    return messages


def first_copies(batch: Sequence[NewMessage]) -> tuple[list[int], list[int]]:
    """Where each input's (room, emitter, client_id) key first occurs, and the inputs to store.

    Returns ``(firsts, sent)``: ``firsts[i]`` is the index of the first input with input i's
    key, and ``sent`` the indexes that are their own first copy, in order. An input without
    client_id is its own first copy. A client_id repeated inside one batch is stored once; the
    later copies report that message (as a retry would).
    """
    seen: dict[tuple[int, str, str], int] = {}
    firsts: list[int] = []
    for index, new in enumerate(batch):
        if new.client_id is None:
            firsts.append(index)
        else:
            firsts.append(seen.setdefault((new.room_id, new.emitter, new.client_id), index))
    sent = [index for index in range(len(batch)) if firsts[index] == index]
    return firsts, sent


def with_copies(outcomes: Mapping[int, Outcome], firsts: Sequence[int]) -> list[Outcome]:
    """The outcome of every input, given those of the first copies (by index).

    A later copy of a client_id gets the first copy's message, not created, or its own
    RoomGone.
    """
    return [
        outcomes[index] if first == index else _repeated(outcomes[first])
        for index, first in enumerate(firsts)
    ]


def _repeated(outcome: Outcome) -> Outcome:
    """The outcome of a later copy of a client_id: the first copy's message, not created."""
    if isinstance(outcome, RoomGone):
        return RoomGone(*outcome.args)
    return outcome[0], False


def sole_outcome(outcomes: Sequence[Outcome]) -> tuple[Message, bool]:
    """The outcome of a batch of one, as ``append_message`` reports it: RoomGone raised."""
    (outcome,) = outcomes
    if isinstance(outcome, RoomGone):
        raise outcome
    return outcome
