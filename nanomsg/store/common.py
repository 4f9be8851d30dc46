"""Logic both backends share, so they cannot drift apart.

Argument checks, the column lists and their mapping to models, the rules a new room starts
with, the history query and the handling of client_ids repeated inside one batch are the same
for SQLite and PostgreSQL. What differs (SQL dialect, placeholders, how timestamps are stored)
stays in each backend and comes in here as a parameter where needed: ``stamp`` turns a stored
timestamp into an aware UTC datetime, ``store_stamp`` an aware datetime into a parameter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from nanomsg.models import (
    ROOM_TYPES,
    RULE_KINDS,
    Conversation,
    Message,
    Room,
    RoomAccess,
    Rule,
)
from nanomsg.store.base import (
    AlreadyDeleted,
    Changed,
    EventOutcome,
    EventRefused,
    HistoryQuery,
    LimitBelowRules,
    MessageChange,
    NewMessage,
    NewRoom,
    NotAuthor,
    RoomChanges,
    RoomEvent,
    RoomGone,
    UnknownSeq,
)

Row = Sequence[Any]
# A stored timestamp as read back from a row, made an aware UTC datetime.
Stamp = Callable[[Any], datetime]
# The outcome of one input of ``append_batch``.
Outcome = tuple[Message, bool] | RoomGone

ROOM_COLS = (
    "r.id, r.uuid, r.name, r.level_admin, r.type, r.entity_owner, r.max_entity_rules, "
    "r.last_seq, r.created_at, r.updated_at, r.deleted_at, (r.dm_key IS NOT NULL)"
)
ROOM_WIDTH = 12
RULE_COLS = (
    "rr.room_id, rr.subject, rr.kind, rr.permissions, rr.level, rr.accepted, "
    "rr.created_at, rr.updated_at"
)
RULE_WIDTH = 8
MSG_COLS = (
    "m.id, m.room_id, m.seq, m.emitter, m.entity, m.content, m.created_at, m.client_id,"
    " m.kind, m.target_seq, m.system, m.edited_at, m.deleted_at, m.deleted_by"
)
MSG_WIDTH = 14
# Orders of the conversation list: by room id (as GET /rooms/all always was), or latest first.
CONVERSATION_ORDERS = ("id", "activity")
# A DM holds its two users' rules; an admin may add rules up to this (the schema's minimum).
DM_MAX_RULES = 2


def utc(dt: datetime) -> datetime:
    """The same instant in UTC; naive datetimes are a caller bug (their zone is unknown).

    A datetime already in UTC (what the server's clock gives) is returned as is, without the
    offset checks: it runs for every stamp of every batch."""
    if dt.tzinfo is UTC:
        return dt
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
        dm=bool(row[11]),
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
        kind=str(row[8]),
        target_seq=None if row[9] is None else int(row[9]),
        system=bool(row[10]),
        edited_at=None if row[11] is None else stamp(row[11]),
        deleted_at=None if row[12] is None else stamp(row[12]),
        deleted_by=None if row[13] is None else str(row[13]),
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


def dm_room(
    room_id: int, room_uuid: str, key: str, level_admin: int, entity: str, now: datetime
) -> Room:
    """The DM room just inserted: named by its key, two rules, no messages yet."""
    return Room(
        id=room_id,
        uuid=room_uuid,
        name=key,
        level_admin=level_admin,
        type="user2user",
        entity_owner=entity,
        max_entity_rules=DM_MAX_RULES,
        last_seq=0,
        created_at=utc(now),
        updated_at=utc(now),
        dm=True,
    )


def check_changes(room_id: int, changes: RoomChanges, rules: int) -> None:
    """Refuse a ``max_entity_rules`` below the ``rules`` the room already holds."""
    wanted = changes.max_entity_rules
    if wanted is not None and wanted < rules:
        raise LimitBelowRules(room_id, rules, wanted)


def history_sql(
    query: HistoryQuery,
    store_stamp: Callable[[datetime], Any],
    mark: Callable[[int], str],
    *,
    events: bool = False,
) -> tuple[str, list[Any]]:
    """The SELECT answering ``query`` and its parameters; ``mark(n)`` writes the nth placeholder.

    Only the bounds given make it into the SQL, so the planner sees a plain index range on
    (room_id, seq), walked from the requested end. Without ``events`` only messages are read;
    with it every event, each edit joined to its message (whose deletion hides its content).
    """
    check_page(query.limit)
    args: list[Any] = [query.room_id]
    conditions = [f"m.room_id = {mark(1)}"]
    if not events:
        conditions.append("m.kind = 'message'")

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
    target = (
        ", t.deleted_at FROM messages m LEFT JOIN messages t"
        " ON m.kind = 'edit' AND t.room_id = m.room_id AND t.seq = m.target_seq"
        if events
        else " FROM messages m"
    )
    sql = (
        f"SELECT {MSG_COLS}{target} WHERE {' AND '.join(conditions)}"
        f" ORDER BY m.seq {order} LIMIT {mark(len(args))}"
    )
    return sql, args


def history_messages(rows: Sequence[Row], query: HistoryQuery, stamp: Stamp) -> list[Message]:
    """The messages read by ``history_sql``, oldest first whichever end they were read from.

    An edit of a deleted message (read with ``events``) carries that deletion, so its content
    is never served either.
    """
    messages = []
    for row in rows:
        message = message_from_row(row, stamp)
        if len(row) > MSG_WIDTH and row[MSG_WIDTH] is not None:
            message = dataclasses.replace(message, deleted_at=stamp(row[MSG_WIDTH]))
        messages.append(message)
    if query.newest:
        messages.reverse()
    return messages


# -- edits, deletes, read marks, DMs, the conversation list ---------------------------------------


def check_target(
    room_id: int,
    seq: int,
    target: Row | None,
    actor: str,
    *,
    admin: bool,
) -> None:
    """Refuse an edit or delete of the message at ``seq``: ``target`` is its (kind, emitter,
    deleted_at) row, or None when no row holds that seq. ``admin`` lets a room admin delete
    another's message."""
    if target is None or target[0] != "message":
        raise UnknownSeq(room_id, seq)
    if target[2] is not None:
        raise AlreadyDeleted(room_id, seq)
    if target[1] != actor and not admin:
        raise NotAuthor(room_id, seq)


def check_seq(seq: int) -> None:
    """Reject a negative seq (no message or mark has one)."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")


def dm_key(user: str, other: str) -> str:
    """The key of the DM of two users: their lower-case UUIDs sorted, joined by ':'."""
    return ":".join(sorted((user.lower(), other.lower())))


def check_order(order: str) -> None:
    if order not in CONVERSATION_ORDERS:
        raise ValueError(f"order must be one of {CONVERSATION_ORDERS}, got {order!r}")


# The rooms of a page of the conversation list: every column of the room row and when the
# room was last active (its latest event, kept on the room row by every writer, or its
# creation while it has none). ``room_states_sql`` reads the page as ``r`` in place of the
# rooms table, so the room rows are read once.
ROOM_PAGE = "SELECT r.*, coalesce(r.last_activity_at, r.created_at) AS activity FROM rooms r"


def room_page(version: str | None = None) -> str:
    """``ROOM_PAGE``, with ``version`` (the backend's SQL for the room row's version, such as
    PostgreSQL's ``r.xmin``; see ``list_cache``) selected as ``version`` when given."""
    if version is None:
        return ROOM_PAGE
    return ROOM_PAGE.replace("SELECT r.*,", f"SELECT r.*, {version} AS version,", 1)


def conversation_page_sql(visible_ids: str, order: str, *, version: str | None = None) -> str:
    """One page of the rooms ``visible_ids`` (a SELECT of room ids, named parameters) lists,
    by id or latest activity first, as ``room_page(version)`` rows; ``:limit`` and ``:offset``
    page it."""
    check_order(order)
    order_by = "activity DESC, r.id DESC" if order == "activity" else "r.id"
    return (
        f"{room_page(version)} WHERE r.deleted_at IS NULL AND r.id IN ({visible_ids})"
        f" ORDER BY {order_by} LIMIT :limit OFFSET :offset"
    )


def page_versions_sql(page: str, order: str) -> str:
    """The rooms of ``page`` (a SELECT of ``room_page(version)`` rows) in its order, each as
    (id, version, the ``:user``'s read mark): all a cached entry needs to be checked, with one
    probe of the read mark per room and none of the messages (``list_cache``)."""
    check_order(order)
    order_by = "r.activity DESC, r.id DESC" if order == "activity" else "r.id"
    return (
        f"SELECT r.id, r.version, coalesce(rd.seq, 0) FROM ({page}) r"
        " LEFT JOIN room_reads rd ON rd.room_id = r.id AND rd.user_uuid = :user"
        f" ORDER BY {order_by}"
    )


# The columns of a ``Conversation``, in its field order, over the page ``r`` (whose row holds
# its latest message, ``LATEST_FIELDS``) and the read mark ``rd`` (see ``room_states_sql``).
# The uuid is cast to text so that the row needs no conversion on PostgreSQL; the stamps at
# ``_CONVERSATION_STAMPS`` are wrapped by the backend's ``stamp_text``.
_CONVERSATION_COLS = (
    "r.id",
    "CAST(r.uuid AS TEXT)",
    "r.name",
    "r.level_admin",
    "r.type",
    "r.entity_owner",
    "r.max_entity_rules",
    "r.last_seq",
    "r.created_at",
    "r.updated_at",
    "r.deleted_at",
    "(r.dm_key IS NOT NULL)",
    "r.activity",
    "coalesce(rd.seq, 0)",
    "{unread}",
    "r.latest_id",
    "r.latest_seq",
    "r.latest_emitter",
    "r.latest_entity",
    "r.latest_content",
    "r.latest_created_at",
    "r.latest_client_id",
    "r.latest_system",
    "r.latest_edited_at",
    "r.latest_deleted_at",
    "r.latest_deleted_by",
)
# Positions of the stamps and booleans among them.
_CONVERSATION_STAMPS = (8, 9, 10, 12, 20, 23, 24)
_CONVERSATION_BOOLS = (11, 22)
# The room row's copy of its latest message (kind 'message'), as ``latest_<field>`` columns
# (schema.sql migration 7): every statement that writes a room's events keeps it, so the list
# reads it with the room rather than probing the messages for it.
LATEST_FIELDS = (
    "id",
    "seq",
    "emitter",
    "entity",
    "content",
    "created_at",
    "client_id",
    "system",
    "edited_at",
    "deleted_at",
    "deleted_by",
)


def latest_values_sql(source: str, *, seq: str | None = None) -> list[str]:
    """The SQL of each ``LATEST_FIELDS`` value of the message ``source`` (an alias with the
    messages table's columns) as a room row's copy holds it: a deleted message's text is not
    copied (its tombstone shows none). ``seq``: the SQL of its seq where ``source`` has none."""

    def value(field: str) -> str:
        if field == "content":
            return f"CASE WHEN {source}.deleted_at IS NULL THEN {source}.content ELSE '' END"
        if field == "seq" and seq is not None:
            return seq
        return f"{source}.{field}"

    return [value(field) for field in LATEST_FIELDS]


def latest_copy_sql(source: str, when: str | None = None, *, seq: str | None = None) -> str:
    """The SET assignments of an UPDATE of ``rooms r`` copying the message ``source`` as the
    room's latest message (``latest_values_sql``). ``when``: an SQL condition under which it
    is copied, the room's copy left as it is otherwise."""
    values = latest_values_sql(source, seq=seq)
    if when is None:
        return ", ".join(f"latest_{f} = {v}" for f, v in zip(LATEST_FIELDS, values, strict=True))
    return ", ".join(
        f"latest_{f} = CASE WHEN {when} THEN {v} ELSE r.latest_{f} END"
        for f, v in zip(LATEST_FIELDS, values, strict=True)
    )


# Each member's count of their own messages in a room lives on their ``room_reads`` row
# (schema.sql migration 8), with how many of them are at or before their mark; the unread
# count takes out the difference. On PostgreSQL every statement that stores messages adds
# each (room, author) pair's number of new messages with this upsert (a row without a mark
# yet: seq 0, no ``updated_at``); on SQLite a trigger on messages does it per message, in
# the engine (schema_sqlite.sql migration 8): a statement of its own in each batch would
# cost one more hop to aiosqlite's thread.
OWN_COUNT_UPSERT = (
    "INSERT INTO room_reads (room_id, user_uuid, seq, ordinal, own_count) {rows}"
    " ON CONFLICT (room_id, user_uuid)"
    " DO UPDATE SET own_count = room_reads.own_count + excluded.own_count"
)
# The SET of a read mark's upsert that moves it forward (``excluded`` the new mark): the
# seq, the ordinal of the latest message at or before it, the stamp (also set on a row that
# had none: a row a post made), and the own messages at or before the mark raised by those
# the move passes, a short range of ``messages_own_idx`` (whatever else was sent
# meanwhile, every message up to the new mark is in the statement's snapshot, which read it
# below the room's last seq). ``greatest`` is the backend's two-argument maximum.
READ_MARK_MOVED = (
    " SET seq = {greatest}(room_reads.seq, excluded.seq),"
    " ordinal = CASE WHEN excluded.seq > room_reads.seq"
    "  THEN excluded.ordinal ELSE room_reads.ordinal END,"
    " updated_at = CASE WHEN excluded.seq > room_reads.seq OR room_reads.updated_at IS NULL"
    "  THEN excluded.updated_at ELSE room_reads.updated_at END,"
    " own_at_mark = CASE WHEN excluded.seq > room_reads.seq"
    "  THEN room_reads.own_at_mark + (SELECT count(*) FROM messages o"
    "  WHERE o.room_id = room_reads.room_id AND o.emitter = room_reads.user_uuid"
    "  AND o.kind = 'message' AND o.seq > room_reads.seq AND o.seq <= excluded.seq)"
    "  ELSE room_reads.own_at_mark END"
)


# Messages after the read mark not sent by the reader and not deleted, without scanning them:
# the room's messages after the mark (its message count less the ordinal the mark holds, see
# schema.sql migration 5), less the reader's own messages after it, deleted or not (their
# message count in the room less those at or before the mark, both on their read row:
# schema.sql migration 8), and the others' deleted messages after it
# (``messages_deleted_idx``, which only deleted messages enter, carrying their emitter):
# disjoint sets, so nothing is taken out twice (schema.sql migration 6: a delete then writes
# one index entry, not two). Nothing after the mark: no probe at all. Every event after the
# mark a message (as many seqs as ordinals after it): no deletion after the mark, so none of
# those messages is deleted, and the probe is skipped (measured: ~1 ms of the 1 000 rooms'
# list, where a room in ten has edits or deletions). The own messages were a probe of
# ``messages_own_idx`` per room until migration 8: ~3.5 us each, half of the list's
# PostgreSQL time for 1 000 rooms.
_UNREAD = (
    "CASE WHEN r.message_count <= coalesce(rd.ordinal, 0) THEN 0"
    " ELSE r.message_count - coalesce(rd.ordinal, 0)"
    " - coalesce(rd.own_count - rd.own_at_mark, 0)"
    " - CASE WHEN r.last_seq - coalesce(rd.seq, 0) = r.message_count - coalesce(rd.ordinal, 0)"
    "  THEN 0 ELSE (SELECT count(*) FROM messages d WHERE d.room_id = r.id"
    "  AND d.seq > coalesce(rd.seq, 0) AND d.kind = 'message' AND d.deleted_at IS NOT NULL"
    "  AND d.emitter <> :user)"
    "  END"
    " END"
)


def room_states_sql(
    page: str,
    order: str,
    *,
    stamp_text: Callable[[str], str] | None = None,
    versioned: bool = False,
    extra: Sequence[str] = (),
) -> str:
    """ONE SELECT of the rooms ``page`` (a SELECT of ``ROOM_PAGE`` rows) holds with their state
    for ``:user``, as ``Conversation`` rows, in the page's order; ``versioned``: each row ends
    with the room's version too (the page is then a SELECT of ``room_page(version)`` rows),
    and then with the ``extra`` columns of ``r``.

    Per room: one probe of the read mark; the latest message is the room row's copy
    (``LATEST_FIELDS``); and, when messages follow the mark, the unread count from the room's
    message count and the mark's ordinal less the reader's own messages after the mark (their
    read row) and, when events other than messages follow the mark, one short index range of
    the deleted ones (``_UNREAD``): no part of
    it grows with the number of messages. ``stamp_text`` turns a stamp column into the SQL of
    its ``Conversation`` text (None: the backend converts the stored value itself, see
    ``conversations_from_rows``).
    """
    check_order(order)
    order_by = "r.activity DESC, r.id DESC" if order == "activity" else "r.id"
    cols = list(_CONVERSATION_COLS)
    cols[cols.index("{unread}")] = _UNREAD
    if stamp_text is not None:
        for index in _CONVERSATION_STAMPS:
            cols[index] = stamp_text(cols[index])
    if versioned:
        cols.append("r.version")
    cols.extend(extra)
    return (
        f"SELECT {', '.join(cols)}"
        f" FROM ({page}) r"
        " LEFT JOIN room_reads rd ON rd.room_id = r.id AND rd.user_uuid = :user"
        f" ORDER BY {order_by}"
    )


def conversations_from_rows(
    rows: Sequence[Row], stamp_text: Callable[[Any], str] | None
) -> list[Conversation]:
    """The rows read by ``room_states_sql``, in its order, as ``Conversation`` tuples.

    ``stamp_text`` None: the query already wrote each column as its field holds it
    (PostgreSQL), so each row becomes its tuple as is. Otherwise (SQLite) the stored stamps
    are made text with it and the stored booleans bools first.
    """
    if stamp_text is None:
        return [Conversation._make(row) for row in rows]
    out = []
    for row in rows:
        values = list(row)
        for index in _CONVERSATION_STAMPS:
            if values[index] is not None:
                values[index] = stamp_text(values[index])
        for index in _CONVERSATION_BOOLS:
            if values[index] is not None:
                values[index] = bool(values[index])
        out.append(Conversation._make(values))
    return out


_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)\b")


def numbered(sql: str, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """``sql`` with its ``:name`` parameters made PostgreSQL's ``$n``, and their values in
    order (a name used twice is one parameter). ``::type`` casts are left alone."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(number, sql), [params[name] for name in names]


def first_copies(batch: Sequence[RoomEvent]) -> tuple[list[int], list[int]]:
    """Where each input's (room, emitter, client_id) key first occurs, and the inputs to store.

    Returns ``(firsts, sent)``: ``firsts[i]`` is the index of the first input with input i's
    key, and ``sent`` the indexes that are their own first copy, in order. An input without
    client_id is its own first copy. A client_id repeated inside one batch is stored once; the
    later copies report that message (as a retry would).
    """
    seen: dict[tuple[int, str, str], int] = {}
    firsts: list[int] = []
    for index, new in enumerate(batch):
        if not isinstance(new, NewMessage) or new.client_id is None:  # a change: its own
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


# -- batches of room events: messages, edits and deletes ------------------------------------------


def change_targets(batch: Sequence[RoomEvent]) -> list[tuple[int, int]]:
    """The (room, seq) of every message the batch's changes name, each once, in order."""
    seen: dict[tuple[int, int], None] = {}
    for event in batch:
        if isinstance(event, MessageChange):
            check_seq(event.seq)
            seen.setdefault((event.room_id, event.seq), None)
    return list(seen)


@dataclasses.dataclass(slots=True)
class EventPlan:
    """What a batch of room events writes, decided in Python from the state it was read on,
    so that both backends apply one rule in one place.

    ``rooms``: each room written, (last_seq read, last_seq after, latest event stamp,
    message_count after); ``rows``: the rows to insert in their final state (a message edited
    or deleted later in the same batch is inserted so), id 0; ``ordinals``: the position of
    each new message (kind 'message') among its room's messages, which edit and delete rows
    lack (schema.sql migration 5); ``first_contents``: the original content of those rows
    edited in the batch; ``updates``: stored messages in their state after the batch, with
    whether the batch edited them (``first_content`` keeps the content before the first edit
    ever). ``finish`` gives the outcomes once the inserted rows' ids are known.
    """

    rooms: dict[int, tuple[int, int, datetime, int]]
    rows: dict[tuple[int, int], Message]
    ordinals: dict[tuple[int, int], int]
    first_contents: dict[tuple[int, int], str]
    updates: dict[tuple[int, int], tuple[Message, bool]]
    outcomes: list[EventOutcome | int]  # an int: a later copy of that input's client_id

    def finish(self, ids: Mapping[tuple[int, int], int]) -> list[EventOutcome]:
        """The outcome of every input, the rows inserted given their ``ids`` by (room, seq)."""
        out: list[EventOutcome] = []
        for outcome in self.outcomes:
            if isinstance(outcome, Changed):
                # The event row is always new (and has no client_id, system flag, edit or
                # deletion of its own); the message is new only when sent in this batch (id
                # 0), else stored with its id.
                e, message = outcome.event, outcome.message
                event = Message(
                    ids[e.room_id, e.seq],
                    e.room_id,
                    e.seq,
                    e.emitter,
                    e.entity,
                    e.content,
                    e.created_at,
                    None,
                    e.kind,
                    e.target_seq,
                )
                if message.id == 0:
                    message = _message(message, id=ids[message.room_id, message.seq])
                out.append(Changed(event, message))
            elif isinstance(outcome, tuple):
                message = outcome[0]
                if message.id == 0 and (message.room_id, message.seq) in ids:
                    message = _message(message, id=ids[message.room_id, message.seq])
                out.append((message, outcome[1]))
            elif isinstance(outcome, int):
                first = out[outcome]
                assert isinstance(first, tuple | RoomGone)
                out.append(_repeated(first))
            else:
                out.append(outcome)
        return out


def plan_events(
    batch: Sequence[RoomEvent],
    heads: Mapping[int, tuple[int, int]],
    targets: Mapping[tuple[int, int], Message],
    stored_ids: Mapping[tuple[int, str, str | None], Message],
) -> EventPlan:
    """Decide a batch in order: ``heads`` holds each live room's last seq and message count
    (a room missing is absent or deleted), ``targets`` the stored rows at the seqs the
    changes name, ``stored_ids`` the messages already stored under the batch's client_ids.

    Each accepted event takes its room's next seq, and each new message its room's next
    ordinal as well (edits and deletes take none); a change is checked (``check_target``)
    against the state the events before it left, so it may edit a message sent earlier in
    the batch, and a second delete of one message is AlreadyDeleted. A refusal takes no seq.
    """
    plan = EventPlan(rooms={}, rows={}, ordinals={}, first_contents={}, updates={}, outcomes=[])
    outcomes, rows, updates = plan.outcomes, plan.rows, plan.updates
    # The state of every message or event the batch has touched or written, by (room, seq).
    state: dict[tuple[int, int], Message] = {}
    firsts: dict[tuple[int, str, str], int] = {}
    seqs: dict[int, int] = {}  # each room written: the last seq taken so far
    latest: dict[int, datetime] = {}  # and its newest event's stamp
    counts: dict[int, int] = {}  # each room with new messages: its message count so far

    for index, event in enumerate(batch):
        stamp = utc(event.now)
        room_id = event.room_id
        head = heads.get(room_id)
        if head is None:
            outcomes.append(RoomGone(room_id))
            continue
        if isinstance(event, NewMessage):
            if event.client_id is not None:
                key = (room_id, event.emitter, event.client_id)
                found = stored_ids.get(key)
                if found is not None:
                    outcomes.append((found, False))
                    continue
                if key in firsts:
                    outcomes.append(firsts[key])
                    continue
                firsts[key] = index
            # Each accepted event takes its room's next seq (and its stamp may be the room's
            # latest); a new message its next ordinal as well.
            seq = seqs[room_id] = seqs.get(room_id, head[0]) + 1
            if room_id not in latest or stamp > latest[room_id]:
                latest[room_id] = stamp
            ordinal = counts[room_id] = counts.get(room_id, head[1]) + 1
            plan.ordinals[room_id, seq] = ordinal
            message = Message(
                0,
                room_id,
                seq,
                event.emitter,
                event.entity,
                event.content,
                stamp,
                event.client_id,
                "message",
                None,
                event.system,
            )
            state[room_id, seq] = rows[room_id, seq] = message
            outcomes.append((message, True))
            continue
        where = (room_id, event.seq)
        target = state.get(where) or targets.get(where)
        # The common case, a live message changed by its author (or by an admin), decided
        # without building check_target's row; anything else is check_target's to refuse.
        if (
            target is None
            or target.kind != "message"
            or target.deleted_at is not None
            or (target.emitter != event.actor and not event.admin)
        ):
            row = None if target is None else (target.kind, target.emitter, target.deleted_at)
            try:
                check_target(room_id, event.seq, row, event.actor, admin=event.admin)
            except EventRefused as refused:
                outcomes.append(refused)
                continue
            raise AssertionError(f"check_target accepted a refused change: {event!r}")
        seq = seqs[room_id] = seqs.get(room_id, head[0]) + 1
        if room_id not in latest or stamp > latest[room_id]:
            latest[room_id] = stamp
        content = event.content
        t = target
        if content is not None:
            after = Message(
                t.id,
                room_id,
                t.seq,
                t.emitter,
                t.entity,
                content,
                t.created_at,
                t.client_id,
                "message",
                None,
                t.system,
                stamp,
                None,
                None,
            )
            change = Message(
                0, room_id, seq, event.actor, t.entity, content, stamp, None, "edit", event.seq
            )
        else:
            after = Message(
                t.id,
                room_id,
                t.seq,
                t.emitter,
                t.entity,
                t.content,
                t.created_at,
                t.client_id,
                "message",
                None,
                t.system,
                t.edited_at,
                stamp,
                event.actor,
            )
            change = Message(
                0, room_id, seq, event.actor, event.entity, "", stamp, None, "delete", event.seq
            )
        state[room_id, seq] = rows[room_id, seq] = change
        state[where] = after
        if where in rows:  # sent earlier in this batch: inserted as it ends up
            rows[where] = after
            if content is not None:
                plan.first_contents.setdefault(where, target.content)
        else:
            held = updates.get(where)
            updates[where] = (after, content is not None or (held is not None and held[1]))
        outcomes.append(Changed(change, after))
    plan.rooms = {
        room: (heads[room][0], seq, latest[room], counts.get(room, heads[room][1]))
        for room, seq in seqs.items()
    }
    return plan


def _message(
    m: Message,
    *,
    id: int | None = None,
    content: str | None = None,
    edited_at: datetime | None = None,
    deleted_at: datetime | None = None,
    deleted_by: str | None = None,
) -> Message:
    """``m`` with the given fields changed: ``dataclasses.replace`` for the fields a batch
    changes, at half its cost (it runs two or three times per edit or delete)."""
    return Message(
        m.id if id is None else id,
        m.room_id,
        m.seq,
        m.emitter,
        m.entity,
        m.content if content is None else content,
        m.created_at,
        m.client_id,
        m.kind,
        m.target_seq,
        m.system,
        m.edited_at if edited_at is None else edited_at,
        m.deleted_at if deleted_at is None else deleted_at,
        m.deleted_by if deleted_by is None else deleted_by,
    )


def row_values(
    message: Message,
    first_content: str | None,
    ordinal: int | None,
    store_stamp: Callable[[datetime], Any],
) -> tuple[Any, ...]:
    """The columns ``INSERT_COLS`` of a row to insert, timestamps made parameters by
    ``store_stamp``; ``ordinal`` is the message's position among its room's messages (None
    for an edit or delete row)."""
    edited, deleted = message.edited_at, message.deleted_at
    return (
        message.room_id,
        message.seq,
        message.emitter,
        message.entity,
        message.content,
        message.client_id,
        store_stamp(message.created_at),
        message.system,
        message.kind,
        message.target_seq,
        first_content,
        None if edited is None else store_stamp(edited),
        None if deleted is None else store_stamp(deleted),
        message.deleted_by,
        ordinal,
    )


INSERT_COLS = (
    "room_id, seq, emitter, entity, content, client_id, created_at, system, kind, target_seq,"
    " first_content, edited_at, deleted_at, deleted_by, ordinal"
)
INSERT_WIDTH = 15


def sole_change(outcomes: Sequence[EventOutcome]) -> tuple[Message, Message]:
    """The outcome of a batch of one change, as ``edit_message`` reports it: refusals raised."""
    (outcome,) = outcomes
    if isinstance(outcome, Exception):
        raise outcome
    assert isinstance(outcome, Changed)
    return outcome.event, outcome.message
