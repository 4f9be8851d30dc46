"""PostgreSQL backend: an asyncpg pool, for multi-node deployments.

Every call has a deadline (pool acquire timeout plus the pool's ``command_timeout``), and every
connection-level failure surfaces as StoreUnavailable. The pool replaces dead connections on
its own, so the store recovers without help once PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from operator import itemgetter
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import orjson

from nanomsg.models import Conversation, Message, ReadMark, Room, RoomAccess, RoomState, Rule
from nanomsg.store import common
from nanomsg.store.base import (
    AlreadyDeleted,
    Changed,
    ContentRefused,
    EventOutcome,
    HistoryQuery,
    MessageChange,
    NewMessage,
    NewRoom,
    NotAuthor,
    RoomChanges,
    RoomEvent,
    RoomGone,
    Settled,
    StoreUnavailable,
    TooManyRules,
    UnknownSeq,
)
from nanomsg.store.list_cache import ListCache
from nanomsg.store.migrate import load_migrations, postgres_schema_path
from nanomsg.together import together

# The ids of the live rooms a caller may read (``rooms_visible_to`` explains the two
# branches), with named parameters :user, :entity, :level (see ``common.numbered``).
_VISIBLE_IDS = (
    "SELECT id FROM rooms"
    " WHERE entity_owner = :entity AND level_admin <= :level AND deleted_at IS NULL"
    " AND dm_key IS NULL"
    " UNION SELECT room_id FROM room_rules"
    " WHERE subject IN (:user, :entity) AND accepted"
    " AND ((kind = 'user' AND subject = :user)"
    "  OR (kind = 'entity' AND subject = :entity AND level <= :level))"
    " GROUP BY room_id"
    " HAVING bool_or(strpos(permissions, 'r') > 0 OR strpos(permissions, 'a') > 0)"
    " AND NOT bool_or(strpos(permissions, 'b') > 0)"
)
_RETURNED_MSG = common.MSG_COLS.replace("m.", "")
# The conversation list reads at most this many rooms' states per statement; a larger page
# is read in parts side by side (``PostgresStore.conversations``). On the 2-core benchmark
# machine a page of 1 000 rooms took ~10.5 ms of PostgreSQL execution as one statement;
# two parts of 500 after the ids (~1.7 ms) answered ~25 % sooner.
LIST_PART = 500

log = logging.getLogger(__name__)

# pg_advisory_lock key serialising migrations across nodes: "nanomsg" + version byte 1.
MIGRATION_LOCK_KEY = 0x6E616E6F6D736701

# Errors meaning "the database cannot be used now", as opposed to a bug in a query.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # a command_timeout or acquire deadline passed (asyncio.TimeoutError)
    asyncpg.InterfaceError,  # connection already closed, and similar client-side states
    asyncpg.PostgresConnectionError,  # class 08, and ConnectionDoesNotExistError (lost mid-call)
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # pointed at a standby after failover
    # Raised instead of a connection error when the server ends the session while the
    # connection is idle in the pool (asyncpg issue #1069); the connection is unusable.
    asyncpg.exceptions.InternalClientError,
)

# The subset meaning a pooled connection went stale; a fresh one may well work.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InternalClientError,
)


def _counted(new_rows: str, where: str = "TRUE") -> str:
    """For a statement that stores messages: each (room, author) pair's new messages among
    ``new_rows`` (those matching ``where``) added to the author's own count on their read
    row (``common.OWN_COUNT_UPSERT``); the rows are written in key order."""
    rows = (
        f"SELECT room_id, emitter, 0, 0, count(*) FROM {new_rows} WHERE {where}"
        " GROUP BY room_id, emitter ORDER BY room_id, emitter"
    )
    return f"counted AS ({common.OWN_COUNT_UPSERT.format(rows=rows)})"


# One statement, so one round trip with its commit (an implicit transaction): either the
# whole batch is stored or nothing is. Inputs arrive as parallel arrays; ``ord`` is the
# 1-based position in them. ``existing`` finds messages already stored under an input's
# client_id; the other inputs are ``fresh`` and numbered per room in batch order. ``locked``
# takes the row locks of their live rooms in id order, so concurrent batches from several
# server processes queue instead of deadlocking, and reads each room's last seq and message
# count as the lock found them (under READ COMMITTED, the latest committed version): the fresh
# inputs take the next ``n`` seqs and message ordinals (schema.sql migration 5) and their ids
# from the table's sequence, as the column's default would (so the answer and the room's copy
# of its newest message need nothing back from the INSERT), and ``bumped`` raises both counts
# on the row it holds, with the copy of the room's newest message (its input with the room's
# largest ``n``; schema.sql migration 7) in the same write of the row. NO KEY UPDATE is the
# lock the UPDATE takes anyway; unlike FOR UPDATE it does not block foreign-key checks.
# ``counted`` raises each author's count of their own messages on their read row (schema.sql
# migration 8), after the rooms' locks, so concurrent batches take those rows in one order.
# ``= ANY (ARRAY (...))`` keeps the lookup on the primary key whatever the estimates.
# Rooms absent or deleted are missing from ``locked``: their inputs get no row back.
# The inputs are numbered by ``generate_series`` rather than read by ``unnest``: PostgreSQL
# plans a prepared statement generically after five runs, without its arrays, and sized
# ``unnest`` of an unknown array at 10 rows, so the CTEs' joins became nested loops that
# rescan one CTE per row of another (a batch over 1 000 rooms: 160 ms instead of 28); a
# series of unknown length is sized at 1 000 rows, and those joins are hashed.
_APPEND_BATCH_SQL = f"""
WITH input AS (
    SELECT t.*, g.ord
    FROM generate_series(1, cardinality($1::bigint[])) AS g(ord), LATERAL (
        SELECT $1[g.ord] AS room_id, ($2::text[])[g.ord] AS emitter,
               ($3::text[])[g.ord] AS entity, ($4::text[])[g.ord] AS content,
               ($5::text[])[g.ord] AS client_id, ($6::timestamptz[])[g.ord] AS created_at,
               ($7::boolean[])[g.ord] AS system
    ) t
), existing AS (
    SELECT i.ord, m.id, m.seq, m.entity, m.content, m.created_at, m.system
    FROM input i JOIN messages m
        ON m.room_id = i.room_id AND m.emitter = i.emitter AND m.client_id = i.client_id
    WHERE i.client_id IS NOT NULL  -- no index probe for the (usual) sends without one
), fresh AS (
    SELECT i.*, nextval('messages_id_seq') AS id,
           row_number() OVER (PARTITION BY i.room_id ORDER BY i.ord) AS n,
           count(*) OVER (PARTITION BY i.room_id) AS total,
           max(i.created_at) OVER (PARTITION BY i.room_id) AS at
    FROM input i WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE e.ord = i.ord)
), wanted AS (
    SELECT * FROM fresh WHERE n = total  -- each room's newest input, with the room's count
), locked AS MATERIALIZED (
    SELECT r.id, r.last_seq, r.message_count FROM rooms r
    WHERE r.id = ANY (ARRAY (SELECT room_id FROM wanted)) AND r.deleted_at IS NULL
    ORDER BY r.id FOR NO KEY UPDATE
), planned AS (
    SELECT f.id, f.ord, f.room_id, l.last_seq + f.n AS seq, f.emitter, f.entity, f.content,
           f.client_id, f.created_at, f.system, l.message_count + f.n AS ordinal
    FROM fresh f JOIN locked l ON l.id = f.room_id
), inserted AS (
    INSERT INTO messages (id, room_id, seq, emitter, entity, content, client_id, created_at,
                          system, ordinal)
    SELECT id, room_id, seq, emitter, entity, content, client_id, created_at, system, ordinal
    FROM planned
), {_counted("planned")}, bumped AS (
    UPDATE rooms r SET last_seq = l.last_seq + n.total,
        message_count = l.message_count + n.total,
        last_activity_at = greatest(r.last_activity_at, n.at),
        {common.latest_copy_sql("n", seq="l.last_seq + n.total")}
    FROM locked l JOIN (
        SELECT w.*, NULL::timestamptz AS edited_at, NULL::timestamptz AS deleted_at,
               NULL::text AS deleted_by
        FROM wanted w
    ) n ON n.room_id = l.id
    WHERE r.id = l.id
)
SELECT ord, id, seq, entity, content, created_at, system, TRUE AS created FROM planned
UNION ALL
SELECT ord, id, seq, entity, content, created_at, system, FALSE AS created FROM existing
"""

# Tries of the batch statement when it collided with a concurrent writer (it was rolled back
# as a whole, so trying again is safe).
_BATCH_TRIES = 3


_NULL_MSG = ", ".join(["NULL"] * common.MSG_WIDTH)


# For a statement that writes room events: each room's newest message among the rows it
# wrote, the new ones (``new_rows``: ``inserted``, in their ``final_state``, or ``numbered``,
# whose new messages are never changed in their own batch; both also hold edit and delete
# rows) and the changed ones in their new state (``changed``); and the room row's copy of
# its latest message set from it when it is that latest message: a new message, or the
# change of the message the copy is of. A change of an older message leaves the copy as it
# is (schema.sql migration 7).
def _newest(new_rows: str, *, final_state: bool) -> str:
    if final_state:  # rows in their final state: a new message may be changed in its batch
        changes = "edited_at, deleted_at, deleted_by"
    else:  # inputs: the batch's changes never name its own new messages
        changes = "NULL::timestamptz AS edited_at, NULL::timestamptz AS deleted_at, NULL::text"
        changes += " AS deleted_by"
    return f"""newest AS (
    SELECT DISTINCT ON (room_id) * FROM (
        SELECT id, room_id, seq, emitter, entity, content, client_id, created_at, system,
               {changes}
        FROM {new_rows} WHERE kind = 'message'
        UNION ALL
        SELECT id, room_id, seq, emitter, entity, content, client_id, created_at, system,
               edited_at, deleted_at, deleted_by FROM changed
    ) w ORDER BY room_id, seq DESC
)"""


_NEWEST_COPY = common.latest_copy_sql("n", "n.seq >= coalesce(r.latest_seq, 0)")

# A batch with edits or deletes in ONE statement, when no two of its changes name the same
# message (the caller checks) and no change names a message of the batch itself (checked
# here: a target above its room's last seq). Inputs are one JSON array of rows (see
# _WRITE_EVENTS_SQL on why JSON), ``ord`` their 1-based position; client_ids repeated inside
# the batch are dropped by the caller first, as for _APPEND_BATCH_SQL. ``locked`` takes the
# rooms' row locks in id order and reads their latest last_seq; ``seen`` is the same rooms as
# this statement's snapshot has them. Every writer of a room's rows bumps its last_seq under
# that lock, so where the two agree the snapshot's rows of that room (the targets, the
# client_ids) are current, and stay so under the lock. ``judged`` gives each input its
# verdict (as ``common.check_target`` does for a change), ``numbered`` the accepted ones
# their seqs in batch order, and the new messages (not the edits and deletes) their ordinals
# after the room's message_count, which ``bumped`` raises by as many (schema.sql migration 5).
# Unless every room agrees and no change is ``ahead``, nothing is
# written (``go``) and the caller takes the general path (_READ_EVENTS_SQL, then
# _WRITE_EVENTS_SQL). The answer: part 0, whether it wrote (``go``); part 1, each input's
# verdict and, accepted, its seq; part 2, the changed messages as they are now and those
# already stored under a client_id; part 3, the new rows' ids. The parts are kept apart
# rather than joined: the planner cannot size CTEs, and its nested loops over them cost more
# than the writes (EXPLAIN ANALYZE, 64 edits: 4.2 ms, 1.4 ms of it one such join).
_EVENTS_BATCH_SQL = f"""
WITH input AS (
    SELECT (r->>0)::int AS ord, r->>1 AS kind, (r->>2)::bigint AS room_id, r->>3 AS emitter,
           r->>4 AS entity, r->>5 AS content, r->>6 AS client_id,
           (r->>7)::timestamptz AS created_at, (r->>8)::boolean AS system,
           (r->>9)::bigint AS target_seq, (r->>10)::boolean AS admin
    FROM jsonb_array_elements($1::jsonb) AS r
), locked AS MATERIALIZED (
    SELECT r.id, r.last_seq, r.message_count, r.deleted_at IS NULL AS live FROM rooms r
    WHERE r.id = ANY (ARRAY (SELECT DISTINCT room_id FROM input))
    ORDER BY r.id FOR NO KEY UPDATE
), seen AS MATERIALIZED (
    SELECT array_agg(r.last_seq ORDER BY r.id) AS seqs FROM rooms r
    WHERE r.id = ANY (ARRAY (SELECT DISTINCT room_id FROM input))
), existing AS MATERIALIZED (
    SELECT i.ord, m.* FROM input i CROSS JOIN LATERAL (
        SELECT {common.MSG_COLS} FROM messages m
        WHERE m.room_id = i.room_id AND m.emitter = i.emitter AND m.client_id = i.client_id
        LIMIT 1  -- a fence: the probe stays an index lookup per input
    ) m
    WHERE i.client_id IS NOT NULL
), target AS (
    SELECT i.ord, m.* FROM input i CROSS JOIN LATERAL (
        SELECT m.kind, m.emitter, m.entity, m.deleted_at FROM messages m
        WHERE m.room_id = i.room_id AND m.seq = i.target_seq
        LIMIT 1
    ) m
    WHERE i.kind <> 'message'
), judged AS MATERIALIZED (
    SELECT i.*, t.entity AS target_entity, l.last_seq AS base, l.message_count AS counted, CASE
        WHEN l.id IS NULL OR NOT l.live THEN 'gone'
        WHEN i.kind = 'message' THEN
            CASE WHEN i.ord IN (SELECT ord FROM existing) THEN 'stored' ELSE 'ok' END
        WHEN i.target_seq > l.last_seq THEN 'ahead'
        WHEN t.kind IS DISTINCT FROM 'message' THEN 'unknown'
        WHEN t.deleted_at IS NOT NULL THEN 'deleted'
        WHEN t.emitter <> i.emitter AND NOT i.admin THEN 'author'
        ELSE 'ok' END AS verdict
    FROM input i LEFT JOIN locked l ON l.id = i.room_id LEFT JOIN target t ON t.ord = i.ord
), go AS MATERIALIZED (
    SELECT NOT EXISTS (SELECT 1 FROM judged WHERE verdict = 'ahead')
        AND (SELECT array_agg(last_seq ORDER BY id) FROM locked) = (SELECT seqs FROM seen)
        AS ok
), numbered AS MATERIALIZED (
    SELECT nextval('messages_id_seq') AS id, j.*,
           j.base + row_number() OVER (PARTITION BY j.room_id ORDER BY j.ord) AS seq,
           CASE WHEN j.kind = 'message' THEN j.counted + count(*) FILTER (
               WHERE j.kind = 'message') OVER (PARTITION BY j.room_id ORDER BY j.ord) END
               AS ordinal
    FROM judged j WHERE j.verdict = 'ok' AND (SELECT ok FROM go)
), wanted AS (
    SELECT room_id, count(*) AS n, count(*) FILTER (WHERE kind = 'message') AS messages,
           max(created_at) AS at
    FROM numbered GROUP BY room_id
), changed AS (
    UPDATE messages m SET
        first_content = CASE WHEN n.kind = 'edit' THEN coalesce(m.first_content, m.content)
            ELSE m.first_content END,
        content = CASE WHEN n.kind = 'edit' THEN n.content ELSE m.content END,
        edited_at = CASE WHEN n.kind = 'edit' THEN n.created_at ELSE m.edited_at END,
        deleted_at = CASE WHEN n.kind = 'delete' THEN n.created_at ELSE m.deleted_at END,
        deleted_by = CASE WHEN n.kind = 'delete' THEN n.emitter ELSE m.deleted_by END
    FROM numbered n
    WHERE n.kind <> 'message' AND m.room_id = n.room_id AND m.seq = n.target_seq
    RETURNING n.ord, {common.MSG_COLS}
), inserted AS (
    INSERT INTO messages (id, room_id, seq, emitter, entity, content, client_id, created_at,
                          system, kind, target_seq, ordinal)
    SELECT id, room_id, seq, emitter,
           CASE WHEN kind = 'edit' THEN target_entity ELSE entity END, content, client_id,
           created_at, system, kind, target_seq, ordinal
    FROM numbered
), {_counted("numbered", "kind = 'message'")}, {_newest("numbered", final_state=False)},
bumped AS (
    UPDATE rooms r SET last_seq = r.last_seq + w.n, message_count = r.message_count + w.messages,
        last_activity_at = greatest(r.last_activity_at, w.at), {_NEWEST_COPY}
    FROM wanted w LEFT JOIN newest n ON n.room_id = w.room_id WHERE r.id = w.room_id
)
SELECT 0 AS part, NULL::int AS ord, NULL::text AS verdict, NULL::bigint AS seq,
       (SELECT ok FROM go) AS ok,
       NULL::bigint, NULL::bigint, NULL::bigint, NULL::text, NULL::text, NULL::text,
       NULL::timestamptz, NULL::text, NULL::text, NULL::bigint, NULL::boolean,
       NULL::timestamptz, NULL::timestamptz, NULL::text
UNION ALL
SELECT 1, ord, verdict, NULL, NULL, {_NULL_MSG} FROM judged WHERE verdict <> 'ok'
UNION ALL
SELECT 1, ord, verdict, seq, NULL, {_NULL_MSG} FROM numbered
UNION ALL
SELECT 2, m.ord, NULL, NULL, NULL, {common.MSG_COLS} FROM changed m
UNION ALL
SELECT 2, m.ord, NULL, NULL, NULL, {common.MSG_COLS} FROM existing m
UNION ALL
SELECT 3, NULL, NULL, seq, NULL, id, room_id, {_NULL_MSG.split(", ", 2)[2]} FROM numbered
"""

# What a batch with edits or deletes depends on, in one read: the live rooms' last seqs and
# message counts (part 0, padded to the message columns, the count in target_seq's), the
# rows at the seqs its changes name (part 1) and the messages already stored under its
# client_ids (part 2). Its inputs come as JSON arrays, as _WRITE_EVENTS_SQL's do. The counts
# are read with the last seqs: every writer that bumps a message_count bumps the last_seq
# with it, so _WRITE_EVENTS_SQL's last_seq check covers them too.
_READ_EVENTS_SQL = f"""
SELECT 0 AS part, r.id, r.id, r.last_seq, NULL::text, NULL::text, NULL::text,
       NULL::timestamptz, NULL::text, NULL::text, r.message_count, NULL::boolean,
       NULL::timestamptz, NULL::timestamptz, NULL::text
FROM rooms r
WHERE r.id = ANY (ARRAY (SELECT value::bigint FROM jsonb_array_elements_text($1::jsonb)))
    AND r.deleted_at IS NULL
UNION ALL
SELECT 1, m.* FROM jsonb_array_elements($2::jsonb) AS t CROSS JOIN LATERAL (
    SELECT {common.MSG_COLS} FROM messages m
    WHERE m.room_id = (t->>0)::bigint AND m.seq = (t->>1)::bigint
    LIMIT 1  -- a fence: the probe stays an index lookup per input
) m
UNION ALL
SELECT 2, m.* FROM jsonb_array_elements($3::jsonb) AS k CROSS JOIN LATERAL (
    SELECT {common.MSG_COLS} FROM messages m
    WHERE m.room_id = (k->>0)::bigint AND m.emitter = k->>1 AND m.client_id = k->>2
    LIMIT 1
) m
"""

# One statement, so one round trip and its commit, storing what ``common.plan_events``
# decided: each room's new last_seq and message_count, the targets' new state, the new rows
# (messages with their ordinals, edits and deletes without, in their final state). The three
# lists come as JSON arrays of rows (one parameter each: asyncpg checks every element of an
# array parameter in Python, which cost more than the rest of the batch's Python work; orjson
# writes them in C). ``locked`` takes the rooms' row
# locks in id order (as _APPEND_BATCH_SQL does) and, being FOR NO KEY UPDATE under READ
# COMMITTED, reads each room's latest last_seq, committed or not when the statement began.
# Every write is gated on ``valid``: all rooms live and still at the last_seq the plan was
# read at. Since every writer of a room's rows bumps its last_seq under that lock, an
# unchanged last_seq means an unchanged room; otherwise nothing is written, no row comes back,
# and the caller plans again. jsonb refuses U+0000 in text, as the text columns would.
_WRITE_EVENTS_SQL = f"""
WITH plan AS (
    SELECT (r->>0)::bigint AS room_id, (r->>1)::bigint AS expected,
           (r->>2)::bigint AS last_seq, (r->>3)::timestamptz AS at,
           (r->>4)::bigint AS message_count
    FROM jsonb_array_elements($1::jsonb) AS r
), locked AS MATERIALIZED (
    SELECT r.id, r.last_seq FROM rooms r
    WHERE r.id = ANY (ARRAY (SELECT room_id FROM plan)) AND r.deleted_at IS NULL
    ORDER BY r.id FOR NO KEY UPDATE
), valid AS MATERIALIZED (
    SELECT count(*) = (SELECT count(*) FROM plan) AS ok
    FROM plan p JOIN locked l ON l.id = p.room_id AND l.last_seq = p.expected
), changed AS (
    UPDATE messages m SET
        first_content = CASE WHEN c.edited THEN coalesce(m.first_content, m.content)
            ELSE m.first_content END,
        content = c.content, edited_at = c.edited_at, deleted_at = c.deleted_at,
        deleted_by = c.deleted_by
    FROM (
        SELECT (r->>0)::bigint AS room_id, (r->>1)::bigint AS seq, r->>2 AS content,
               (r->>3)::timestamptz AS edited_at, (r->>4)::timestamptz AS deleted_at,
               r->>5 AS deleted_by, (r->>6)::boolean AS edited
        FROM jsonb_array_elements($2::jsonb) AS r
    ) c
    WHERE m.room_id = c.room_id AND m.seq = c.seq AND (SELECT ok FROM valid)
    RETURNING m.id, m.room_id, m.seq, m.emitter, m.entity, m.content, m.client_id,
              m.created_at, m.system, m.edited_at, m.deleted_at, m.deleted_by
), inserted AS (
    INSERT INTO messages ({common.INSERT_COLS})
    SELECT (r->>0)::bigint, (r->>1)::bigint, r->>2, r->>3, r->>4, r->>5,
           (r->>6)::timestamptz, (r->>7)::boolean, r->>8, (r->>9)::bigint, r->>10,
           (r->>11)::timestamptz, (r->>12)::timestamptz, r->>13, (r->>14)::bigint
    FROM jsonb_array_elements($3::jsonb) AS r
    WHERE (SELECT ok FROM valid)
    RETURNING id, room_id, seq, kind, emitter, entity, content, client_id, created_at, system,
              edited_at, deleted_at, deleted_by
), {_counted("inserted", "kind = 'message'")}, {_newest("inserted", final_state=True)},
bumped AS (
    UPDATE rooms r SET last_seq = p.last_seq, message_count = p.message_count,
        last_activity_at = greatest(r.last_activity_at, p.at), {_NEWEST_COPY}
    FROM plan p LEFT JOIN newest n ON n.room_id = p.room_id
    WHERE r.id = p.room_id AND (SELECT ok FROM valid)
)
SELECT room_id, seq, id FROM inserted
"""

# The rooms' row locks, in id order, for a batch that kept colliding (see append_events).
_LOCK_ROOMS_SQL = "SELECT id FROM rooms WHERE id = ANY ($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"


async def _plan(
    conn: Any,
    batch: Sequence[RoomEvent],
    rooms: list[int],
    wanted: list[tuple[int, int]],
    keys: Sequence[tuple[int, str, str | None]],
) -> common.EventPlan:
    """Read what ``batch`` depends on (_READ_EVENTS_SQL) and decide it."""
    try:
        params = (orjson.dumps(rooms), orjson.dumps(wanted), orjson.dumps(keys))
    except orjson.JSONEncodeError as exc:  # a client_id no backend can encode
        raise ContentRefused("UnicodeEncodeError") from exc
    rows = await conn.fetch(_READ_EVENTS_SQL, *(param.decode() for param in params))
    heads: dict[int, tuple[int, int]] = {}
    targets: dict[tuple[int, int], Message] = {}
    stored: dict[tuple[int, str, str | None], Message] = {}
    for row in rows:
        values = tuple(row)
        if values[0] == 0:
            heads[int(values[1])] = (int(values[3]), int(values[10]))
            continue
        message = common.message_from_row(values[1:], _timestamptz)
        if values[0] == 1:
            targets[message.room_id, message.seq] = message
        else:
            stored[message.room_id, message.emitter, message.client_id] = message
    return common.plan_events(batch, heads, targets, stored)


def _event_row(position: int, event: RoomEvent) -> tuple[Any, ...]:
    """One input row of _EVENTS_BATCH_SQL."""
    if isinstance(event, NewMessage):
        return (
            position,
            "message",
            event.room_id,
            event.emitter,
            event.entity,
            event.content,
            event.client_id,
            event.now,
            event.system,
            None,
            False,
        )
    return (
        position,
        event.kind,
        event.room_id,
        event.actor,
        event.entity,
        event.content or "",
        None,
        event.now,
        False,
        event.seq,
        event.admin,
    )


def _event_outcome(
    event: RoomEvent,
    said: str,
    seq: int | None,
    stored: Message | None,
    ids: Mapping[tuple[int, int], int],
) -> EventOutcome:
    """The outcome of one input of _EVENTS_BATCH_SQL from its verdict (and seq when
    accepted), its message (the one it changed, or the one stored under its client_id) and
    the new rows' ids by (room, seq)."""
    stamp = common.utc(event.now)
    if said == "gone":
        return RoomGone(event.room_id)
    if isinstance(event, NewMessage):
        if said == "stored":
            assert stored is not None
            return stored, False
        message = Message(
            id=ids[event.room_id, int(seq or 0)],
            room_id=event.room_id,
            seq=int(seq or 0),
            emitter=event.emitter,
            entity=event.entity,
            content=event.content,
            created_at=stamp,
            client_id=event.client_id,
            system=event.system,
        )
        return message, True
    if said != "ok":
        refusal = {"unknown": UnknownSeq, "deleted": AlreadyDeleted, "author": NotAuthor}[said]
        return refusal(event.room_id, event.seq)
    assert stored is not None
    change = Message(
        id=ids[event.room_id, int(seq or 0)],
        room_id=event.room_id,
        seq=int(seq or 0),
        emitter=event.actor,
        entity=stored.entity if event.content is not None else event.entity,
        content=event.content or "",
        created_at=stamp,
        kind=event.kind,
        target_seq=event.seq,
    )
    return Changed(change, stored)


def _repeated(outcome: EventOutcome) -> EventOutcome:
    """A later copy of a client_id in the batch: the first copy's message, not created."""
    if isinstance(outcome, tuple):
        return outcome[0], False
    if isinstance(outcome, RoomGone):
        return RoomGone(*outcome.args)
    return outcome


def _write_params(plan: common.EventPlan) -> tuple[str, str, str]:
    """The three JSON arrays _WRITE_EVENTS_SQL takes, from ``plan``.

    Raises ContentRefused for text no backend can encode (a lone surrogate), as sending it
    would."""
    try:
        return (
            orjson.dumps(
                [
                    (room_id, before, after, latest, count)
                    for room_id, (before, after, latest, count) in plan.rooms.items()
                ]
            ).decode(),
            orjson.dumps(
                [
                    (m.room_id, m.seq, m.content, m.edited_at, m.deleted_at, m.deleted_by, edited)
                    for m, edited in plan.updates.values()
                ]
            ).decode(),
            orjson.dumps(
                [
                    common.row_values(
                        row, plan.first_contents.get(key), plan.ordinals.get(key), _timestamptz
                    )
                    for key, row in plan.rows.items()
                ]
            ).decode(),
        )
    except orjson.JSONEncodeError as exc:
        raise ContentRefused("UnicodeEncodeError") from exc


def redact(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=user + host))


async def _keep_session(conn: Any) -> None:
    """The pool's reset of a connection handed back: nothing to undo.

    asyncpg's default sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`` on every hand-back, a round trip the caller waits for before it goes on (a batch's
    acknowledgements, the next part of a list). The store leaves no session state to undo: its
    statements set no setting, declare no cursor, listen to nothing, and take no advisory lock
    on a pooled connection (migrations take theirs on a connection of their own); and asyncpg
    still rolls back a transaction left open before calling this."""


def _timestamptz(value: datetime) -> datetime:
    """A timestamptz as read: asyncpg already decodes it as an aware UTC datetime."""
    return value


def _stamp_text(column: str) -> str:
    """The SQL writing a timestamptz column as a ``Conversation`` holds it: as the wire does
    (``iso_utc``: UTC, ISO 8601, milliseconds cut, not rounded, and a ``Z``), whatever the
    session's TimeZone and DateStyle. PostgreSQL writes it in ~0.45 us (1.7 ms for the 4 000
    stamps of 1 000 rooms); decoding a binary timestamptz into a datetime and formatting that
    for JSON took ~1.4 us in the server."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"


# The states of the live rooms of an id array ($2) for a user ($1), by id: one part of a large
# conversation list page (``PostgresStore.conversations``).
_STATES_OF_IDS, _STATES_OF_IDS_ARGS = common.numbered(
    common.room_states_sql(
        f"{common.ROOM_PAGE} WHERE r.id = ANY(:ids::bigint[]) AND r.deleted_at IS NULL",
        "id",
        stamp_text=_stamp_text,
    ),
    {"user": "user", "ids": "ids"},
)
assert _STATES_OF_IDS_ARGS == ["user", "ids"], _STATES_OF_IDS_ARGS
# The room row's version for ``list_cache``: the transaction that wrote the row's current
# version. Every write of a room row (each batch of room events bumps ``last_seq``, a settings
# change or deletion sets its columns) makes a new row version with its writer's id. Two
# committed versions of one row share it only if the later one's writer falls on exactly the
# same 32-bit id, 2^32 transactions later (one chance in 2^32 per such write), and the entry
# must still hold the user's current read mark to be served.
_ROOM_VERSION = "r.xmin"
# ``_STATES_OF_IDS`` with each row's room version last: the entries ``list_cache`` keeps from
# a list read without checking it first.
_VERSIONED_STATES_OF_IDS, _VERSIONED_ARGS = common.numbered(
    common.room_states_sql(
        f"{common.room_page(_ROOM_VERSION)} WHERE r.id = ANY(:ids::bigint[])"
        " AND r.deleted_at IS NULL",
        "id",
        stamp_text=_stamp_text,
        versioned=True,
    ),
    {"user": "user", "ids": "ids"},
)
assert _VERSIONED_ARGS == ["user", "ids"], _VERSIONED_ARGS


# ``_VERSIONED_STATES_OF_IDS``'s rows for one part of a first page read in parts without its
# ids first (``PostgresStore._split_conversations``): the page of the visible rooms whose id
# is ``:part`` modulo ``:parts``, by order, each row ending with its room's version and, by
# activity, its exact activity (the parts are merged on it). The residue is taken of the
# visible ids before the rooms are read, so a part reads only its own rooms.
_PART_STATES = {
    order: common.numbered(
        common.room_states_sql(
            common.conversation_page_sql(
                f"SELECT v.id FROM ({_VISIBLE_IDS}) v WHERE v.id % :parts = :part",
                order,
                version=_ROOM_VERSION,
            ),
            order,
            stamp_text=_stamp_text,
            versioned=True,
            extra=("r.activity",) if order == "activity" else (),
        ),
        {name: name for name in ("user", "entity", "level", "limit", "offset", "parts", "part")},
    )
    for order in ("id", "activity")
}


def _placeholder(n: int) -> str:
    """PostgreSQL's numbered placeholder for the nth parameter."""
    return f"${n}"


def _affected(status: Any) -> int:
    """Rows touched according to a command status such as ``UPDATE 1``."""
    return int(str(status).rsplit(" ", 1)[-1])


@dataclass(slots=True)
class _Keeper:
    """The entries of a list read without checking the list cache first, kept in it as they
    are read when it ``keeps`` them, counting those it held already; ``done`` tells the cache
    (``ListCache.note``)."""

    cache: ListCache
    user: str
    hits: int = 0
    rooms: int = 0
    keeping: bool = field(init=False)

    def __post_init__(self) -> None:
        self.keeping = self.cache.keeps(self.user)

    def keep(self, rows: Sequence[Any]) -> list[Conversation]:
        """Rows of ``room_states_sql(versioned=True)`` as the ``Conversation`` tuples kept."""
        cache, user = self.cache, self.user
        kept = []
        for row in rows:
            conversation = Conversation._make(row[:-1])
            version = row[-1]
            held = cache.get(conversation.id, version, user, conversation.read_seq)
            if held is None:
                if self.keeping:
                    cache.put(version, conversation, user)
                kept.append(conversation)
            else:  # the same entry: the one held keeps its written JSON
                self.hits += 1
                kept.append(held)
        self.rooms += len(kept)
        return kept

    def reader(
        self, fetch: Callable[..., Coroutine[Any, Any, list[Any]]]
    ) -> Callable[[list[int]], Coroutine[Any, Any, list[Conversation]]]:
        """A part's read for ``PostgresStore._states``: the rooms' versioned states, kept."""

        async def read(ids: list[int]) -> list[Conversation]:
            return self.keep(await fetch(_VERSIONED_STATES_OF_IDS, self.user, ids))

        return read

    def done(self, found: list[Conversation], *, whole: bool) -> list[Conversation]:
        """``found``, once the cache is told how much of the list it held and whether the
        list held every room the user may read."""
        self.cache.note(self.user, self.hits, self.rooms, whole=whole)
        return found


class PostgresStore:
    """The Store protocol on PostgreSQL through an asyncpg pool of ``pool_size`` connections."""

    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        *,
        command_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        migration_lock_timeout: float = 60.0,
        list_part: int = LIST_PART,
        list_cache: ListCache | None = None,
    ) -> None:
        if list_part < 1:
            raise ValueError("list_part must be at least 1")
        self._url = url
        self._list_part = list_part
        self._list_cache = list_cache
        self._pool_size = pool_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._migration_lock_timeout = migration_lock_timeout
        self._pool: Any = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Apply pending migrations, then start the pool; StoreUnavailable if PG is unreachable."""
        if self._pool is not None:
            return
        where = redact(self._url)
        try:
            await self._migrate()
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            # At startup any failure to reach the database (bad credentials or database name
            # included) means this store cannot serve; say where and why.
            raise StoreUnavailable(f"cannot prepare PostgreSQL at {where}: {exc!r}") from exc
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=self._command_timeout,
                timeout=self._connect_timeout,
                reset=_keep_session,
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {where}: {exc!r}") from exc

    async def _migrate(self) -> None:
        """Apply pending schema.sql versions on one connection holding the advisory lock.

        Nodes starting together queue on the lock; each then reads schema_migrations and finds
        nothing left to do. Each version commits in its own transaction with its record.
        """
        migrations = load_migrations(postgres_schema_path())
        conn = await asyncpg.connect(
            self._url, timeout=self._connect_timeout, command_timeout=self._command_timeout
        )
        try:
            await conn.execute(
                "SELECT pg_advisory_lock($1)",
                MIGRATION_LOCK_KEY,
                timeout=self._migration_lock_timeout,
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)"
            )
            applied = {int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations:
                if migration.version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    # Metadata only, so the database's own clock is fine here.
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES ($1, $2, now())",
                        migration.version,
                        migration.name,
                    )
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        finally:
            # Closing the session also releases the lock if the unlock above never ran.
            try:
                await asyncio.wait_for(conn.close(), self._connect_timeout)
            except Exception:
                conn.terminate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._command_timeout)
        except Exception:
            pool.terminate()

    async def ping(self) -> bool:
        """True when a pooled connection answers ``SELECT 1`` now."""
        try:
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; connection-level failures become StoreUnavailable."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"PostgreSQL store {redact(self._url)} is not open")
        try:
            conn = await pool.acquire(timeout=self._connect_timeout + 1.0)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        try:
            try:
                yield conn
            except _CONNECTION_LOST:
                # Never hand a possibly broken connection back: asyncpg may otherwise
                # return it to the pool in a bad protocol state. The pool reconnects.
                # Not on timeouts: there asyncpg cancels the statement server-side, whereas
                # dropping the socket would leave it running (and maybe committing).
                conn.terminate()
                raise
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        finally:
            # Handing the connection back rolls back a transaction left open (none is: every
            # transaction here is a context manager). If the connection dies there, the work
            # above is already done (committed): reporting it as unavailable would tell a
            # sender "not stored" about a stored message. asyncpg closes it anyway.
            try:
                await pool.release(conn)
            except _UNAVAILABLE as exc:
                log.warning("PostgreSQL connection lost while returning it to the pool: %r", exc)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """Run a read; retried once when a pooled connection turns out to be dead.

        After a PostgreSQL restart the pool may still hold broken connections; a read is safe
        to repeat, and the pool hands out a fresh connection on the second try.
        """
        for attempt in (1, 2):
            try:
                async with self._connection() as conn:
                    return list(await conn.fetch(sql, *args))
            except StoreUnavailable as exc:
                if attempt == 2 or not isinstance(exc.__cause__, _CONNECTION_LOST):
                    raise
        raise AssertionError("unreachable")

    # -- rooms -------------------------------------------------------------------------------
    async def create_room(self, new: NewRoom) -> Room:
        """Insert the room (uuid4 made here) and its creator rules in one transaction."""
        common.check_room_type(new.type)
        now = common.utc(new.now)
        room_uuid = str(uuid4())
        async with self._connection() as conn, conn.transaction():
            room_id = int(
                await conn.fetchval(
                    "INSERT INTO rooms (uuid, name, level_admin, type, entity_owner,"
                    " max_entity_rules, last_seq, created_at, updated_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7) RETURNING id",
                    room_uuid,
                    new.name,
                    new.level_admin,
                    new.type,
                    new.entity_owner,
                    new.max_entity_rules,
                    now,
                )
            )
            await conn.executemany(
                "INSERT INTO room_rules (room_id, kind, subject, permissions, level, accepted,"
                " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                [(room_id, *rule, True, now) for rule in common.creator_rules(new)],
            )
        return common.created_room(new, room_id, room_uuid, now)

    async def update_room(self, room_id: int, changes: RoomChanges, now: datetime) -> Room:
        """Lock the room as ``put_rule`` does, count its rules, check the new limit, update."""
        async with self._connection() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT id FROM rooms WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
                room_id,
            )
            if locked is None:
                raise RoomGone(room_id)
            count = await conn.fetchval(
                "SELECT count(*) FROM room_rules WHERE room_id = $1", room_id
            )
            common.check_changes(room_id, changes, int(count))
            row = await conn.fetchrow(
                "UPDATE rooms r SET name = coalesce($2, r.name),"
                " level_admin = coalesce($3, r.level_admin),"
                " max_entity_rules = coalesce($4, r.max_entity_rules), updated_at = $5"
                f" WHERE r.id = $1 RETURNING {common.ROOM_COLS}",
                room_id,
                changes.name,
                changes.level_admin,
                changes.max_entity_rules,
                common.utc(now),
            )
        return common.room_from_row(row, _timestamptz)

    async def room_access(self, room_id: int) -> RoomAccess | None:
        """The live room and all its rules in one LEFT JOIN query."""
        rows = await self._fetch(
            f"SELECT {common.ROOM_COLS}, {common.RULE_COLS} FROM rooms r"
            " LEFT JOIN room_rules rr ON rr.room_id = r.id"
            # COLLATE "C": byte order, the same as SQLite's, so both backends agree.
            ' WHERE r.id = $1 AND r.deleted_at IS NULL ORDER BY rr.kind, rr.subject COLLATE "C"',
            room_id,
        )
        return common.room_access_from_rows(rows, _timestamptz)

    async def room_heads(self, room_ids: Sequence[int]) -> dict[int, int]:
        """Each existing room's last_seq, by primary key lookups in one statement."""
        if not room_ids:
            return {}
        rows = await self._fetch(
            "SELECT id, last_seq FROM rooms WHERE id = ANY($1::bigint[])", list(room_ids)
        )
        return {int(row[0]): int(row[1]) for row in rows}

    async def delete_room(self, room_id: int, now: datetime) -> bool:
        """Soft-delete: set deleted_at; messages and rules stay."""
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE rooms SET deleted_at = $2, updated_at = $2"
                " WHERE id = $1 AND deleted_at IS NULL",
                room_id,
                common.utc(now),
            )
        return _affected(status) == 1

    async def rooms_visible_to(
        self, user: str, entity: str, level: int, limit: int, offset: int
    ) -> list[Room]:
        """Live rooms the caller may read (``permissions.evaluate``), by id, paged in SQL.

        A UNION of two indexed lookups rather than one OR, so each branch uses its index: rooms
        where the caller is an owner-entity admin (no rule can ban them), and rooms whose
        applying accepted rules, grouped per room, hold ``r`` or ``a`` and no ``b``.
        """
        common.check_page(limit, offset)
        rows = await self._fetch(
            f"SELECT {common.ROOM_COLS} FROM rooms r WHERE r.deleted_at IS NULL AND r.id IN ("
            " SELECT id FROM rooms"
            "  WHERE entity_owner = $2 AND level_admin <= $3 AND deleted_at IS NULL"
            "  AND dm_key IS NULL"
            " UNION SELECT room_id FROM room_rules"
            "  WHERE subject IN ($1, $2) AND accepted"
            "  AND ((kind = 'user' AND subject = $1)"
            "   OR (kind = 'entity' AND subject = $2 AND level <= $3))"
            "  GROUP BY room_id"
            "  HAVING bool_or(strpos(permissions, 'r') > 0 OR strpos(permissions, 'a') > 0)"
            "  AND NOT bool_or(strpos(permissions, 'b') > 0)"
            ") ORDER BY r.id LIMIT $4 OFFSET $5",
            user,
            entity,
            level,
            limit,
            offset,
        )
        return [common.room_from_row(row, _timestamptz) for row in rows]

    # -- rules -------------------------------------------------------------------------------
    async def rules_of(
        self, user: str, entity: str, level: int, accepted: bool | None, limit: int, offset: int
    ) -> list[tuple[Rule, Room]]:
        """The caller's user rules and entity rules at or below ``level`` in live rooms."""
        common.check_page(limit, offset)
        rows = await self._fetch(
            f"SELECT {common.RULE_COLS}, {common.ROOM_COLS} FROM room_rules rr"
            " JOIN rooms r ON r.id = rr.room_id WHERE r.deleted_at IS NULL"
            " AND ((rr.kind = 'user' AND rr.subject = $1)"
            "  OR (rr.kind = 'entity' AND rr.subject = $2 AND rr.level <= $3))"
            " AND ($4::boolean IS NULL OR rr.accepted = $4::boolean)"
            ' ORDER BY rr.room_id, rr.kind, rr.subject COLLATE "C" LIMIT $5 OFFSET $6',
            user,
            entity,
            level,
            accepted,
            limit,
            offset,
        )
        return [common.rule_and_room_from_row(row, _timestamptz) for row in rows]

    async def put_rule(
        self,
        room_id: int,
        subject: str,
        kind: str,
        permissions: str,
        level: int,
        accepted: bool,
        now: datetime,
    ) -> tuple[Rule, bool]:
        """Create or update one rule, enforcing max_entity_rules under the room's row lock."""
        common.check_kind(kind)
        now = common.utc(now)
        async with self._connection() as conn, conn.transaction():
            # Lock first, count in a later statement: under READ COMMITTED the later statement
            # gets a fresh snapshot that includes rules committed by the previous lock holder.
            # NO KEY UPDATE serialises rule writers without blocking foreign-key checks.
            max_rules = await conn.fetchval(
                "SELECT max_entity_rules FROM rooms WHERE id = $1 AND deleted_at IS NULL"
                " FOR NO KEY UPDATE",
                room_id,
            )
            if max_rules is None:
                raise RoomGone(room_id)
            stats = await conn.fetchrow(
                "SELECT count(*) AS n,"
                " max(created_at) FILTER (WHERE kind = $2 AND subject = $3) AS existing"
                " FROM room_rules WHERE room_id = $1",
                room_id,
                kind,
                subject,
            )
            created_at: datetime = stats["existing"] or now
            created = stats["existing"] is None
            if created:
                if stats["n"] >= max_rules:
                    raise TooManyRules(
                        f"room {room_id} already holds {stats['n']} of {max_rules} rules"
                    )
                await conn.execute(
                    "INSERT INTO room_rules (room_id, kind, subject, permissions, level,"
                    " accepted, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                    room_id,
                    kind,
                    subject,
                    permissions,
                    level,
                    accepted,
                    now,
                )
            else:
                await conn.execute(
                    "UPDATE room_rules SET permissions = $4, level = $5, accepted = $6,"
                    " updated_at = $7 WHERE room_id = $1 AND kind = $2 AND subject = $3",
                    room_id,
                    kind,
                    subject,
                    permissions,
                    level,
                    accepted,
                    now,
                )
        rule = Rule(
            room_id=room_id,
            subject=subject,
            kind=kind,
            permissions=permissions,
            level=level,
            accepted=accepted,
            created_at=created_at,
            updated_at=now,
        )
        return rule, created

    async def delete_rule(self, room_id: int, subject: str, kind: str | None) -> bool:
        """Delete the subject's rule of ``kind`` (or of every kind)."""
        if kind is not None:
            common.check_kind(kind)
        async with self._connection() as conn:
            status = await conn.execute(
                "DELETE FROM room_rules WHERE room_id = $1 AND subject = $2"
                " AND ($3::text IS NULL OR kind = $3::text)",
                room_id,
                subject,
                kind,
            )
        return _affected(status) > 0

    async def set_accepted(
        self, room_id: int, subject: str, kind: str, accepted: bool, now: datetime
    ) -> Rule | None:
        """Flip ``accepted`` on one rule of a live room."""
        common.check_kind(kind)
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "UPDATE room_rules rr SET accepted = $4, updated_at = $5 FROM rooms r"
                " WHERE r.id = rr.room_id AND r.deleted_at IS NULL"
                " AND rr.room_id = $1 AND rr.kind = $2 AND rr.subject = $3"
                f" RETURNING {common.RULE_COLS}",
                room_id,
                kind,
                subject,
                accepted,
                common.utc(now),
            )
        return None if row is None else common.rule_from_row(row, _timestamptz)

    # -- messages ----------------------------------------------------------------------------
    async def append_message(self, new: NewMessage) -> tuple[Message, bool]:
        """Store one message: a batch of one (see _APPEND_BATCH_SQL), RoomGone raised."""
        return common.sole_outcome(await self.append_batch([new]))

    async def append_batch(self, batch: Sequence[NewMessage]) -> list[common.Outcome]:
        """Store the batch in one statement (see _APPEND_BATCH_SQL), hence one round trip.

        Repeated client_ids are dropped here, before sending, so the statement never inserts
        the same key twice; the copies get the first one's outcome.
        """
        stamps = [common.utc(new.now) for new in batch]  # rejects naive timestamps up front
        firsts, sent = common.first_copies(batch)
        if not sent:
            return []
        columns = (
            [batch[index].room_id for index in sent],
            [batch[index].emitter for index in sent],
            [batch[index].entity for index in sent],
            [batch[index].content for index in sent],
            [batch[index].client_id for index in sent],
            [stamps[index] for index in sent],
            [batch[index].system for index in sent],
        )
        rows = await self._run_batch(columns)
        by_ord = {int(row["ord"]): row for row in rows}
        outcomes: dict[int, common.Outcome] = {}  # by batch index, for the first copies
        for position, index in enumerate(sent, start=1):  # ``ord`` is the position in ``sent``
            new = batch[index]
            row = by_ord.get(position)
            if row is None:
                outcomes[index] = RoomGone(new.room_id)
                continue
            message = Message(
                id=int(row["id"]),
                room_id=new.room_id,
                seq=int(row["seq"]),
                emitter=new.emitter,
                entity=str(row["entity"]),
                content=str(row["content"]),
                created_at=row["created_at"],
                client_id=new.client_id,
                system=bool(row["system"]),
            )
            outcomes[index] = (message, bool(row["created"]))
        return common.with_copies(outcomes, firsts)

    async def _run_batch(self, columns: tuple[list[Any], ...]) -> list[Any]:
        """Run _APPEND_BATCH_SQL, again when it collided with a concurrent writer.

        A batch elsewhere may commit one of our client_ids while we wait on a room lock (our
        snapshot predates it, so ``existing`` missed it and the INSERT hits the unique index);
        the next try sees it. Deadlocks should not happen (rooms are locked in id order) but
        would be just as safe to retry: PostgreSQL rolled the whole statement back.
        """
        async with self._connection() as conn:
            for attempt in range(1, _BATCH_TRIES + 1):
                try:
                    return list(await conn.fetch(_APPEND_BATCH_SQL, *columns))
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name != "messages_client_id_idx":
                        raise  # (room_id, seq) cannot collide under the room locks: a bug
                    if attempt == _BATCH_TRIES:
                        raise StoreUnavailable(
                            f"batch kept colliding with concurrent writers: {exc!r}"
                        ) from exc
                except asyncpg.DataError as exc:
                    # Class 22: a value PostgreSQL will not store (U+0000 in text, text that
                    # is not encodable). The statement was rolled back as a whole.
                    raise ContentRefused(type(exc).__name__) from exc
                except asyncpg.DeadlockDetectedError as exc:
                    if attempt == _BATCH_TRIES:
                        raise StoreUnavailable(f"batch kept deadlocking: {exc!r}") from exc
        raise AssertionError("unreachable")

    async def history(self, query: HistoryQuery) -> list[Message]:
        """Walk the (room_id, seq) index from the requested end, return oldest first."""
        sql, args = common.history_sql(query, common.utc, _placeholder)
        rows = await self._fetch(sql, *args)
        return common.history_messages(rows, query, _timestamptz)

    async def events(self, query: HistoryQuery) -> list[Message]:
        """Every event in the range, by the same index walk as ``history``."""
        sql, args = common.history_sql(query, common.utc, _placeholder, events=True)
        rows = await self._fetch(sql, *args)
        return common.history_messages(rows, query, _timestamptz)

    async def edit_message(
        self, room_id: int, seq: int, author: str, content: str, now: datetime
    ) -> tuple[Message, Message]:
        """The edit row and the message's new state: a batch of one change."""
        change = MessageChange(room_id, seq, author, now, content)
        return common.sole_change(await self.append_events([change]))

    async def delete_message(
        self, room_id: int, seq: int, by: str, is_admin: bool, now: datetime, entity: str = ""
    ) -> tuple[Message, Message]:
        """The delete row and the tombstone: a batch of one change."""
        change = MessageChange(room_id, seq, by, now, None, is_admin, entity)
        return common.sole_change(await self.append_events([change]))

    async def append_events(self, batch: Sequence[RoomEvent]) -> list[EventOutcome]:
        """A batch of messages only is ``append_batch`` (one statement). With changes, one
        statement too (_EVENTS_BATCH_SQL) unless two changes name one message, a change
        names a message of the batch, or a room moved since the statement's snapshot. Then
        the general path: one read of what the batch depends on (_READ_EVENTS_SQL),
        ``common.plan_events`` decides every input, and one statement writes it all if no
        room changed since the read (_WRITE_EVENTS_SQL).

        A room written meanwhile by another process makes that write store nothing; the batch
        is read and decided again. After ``_BATCH_TRIES`` such collisions it is done under
        the rooms' row locks, taken first in one transaction (it then cannot collide)."""
        if all(isinstance(event, NewMessage) for event in batch):
            return list(await self.append_batch(cast(Sequence[NewMessage], batch)))
        for event in batch:
            common.utc(event.now)  # rejects naive timestamps up front
        rooms = sorted({event.room_id for event in batch})
        wanted = common.change_targets(batch)
        if len(wanted) == sum(isinstance(event, MessageChange) for event in batch):
            done = await self._events_at_once(batch)
            if done is not None:
                return done
        keys = [
            (event.room_id, event.emitter, event.client_id)
            for event in batch
            if isinstance(event, NewMessage) and event.client_id is not None
        ]
        try:
            async with self._connection() as conn:
                for attempt in range(1, _BATCH_TRIES + 2):
                    locking = attempt > _BATCH_TRIES
                    async with conn.transaction() if locking else contextlib.nullcontext():
                        if locking:
                            await conn.execute(_LOCK_ROOMS_SQL, rooms)
                        plan = await _plan(conn, batch, rooms, wanted, keys)
                        if not plan.rooms:  # every input refused: nothing to write
                            return plan.finish({})
                        try:
                            rows = await conn.fetch(_WRITE_EVENTS_SQL, *_write_params(plan))
                        except asyncpg.UniqueViolationError as exc:
                            # A client_id committed elsewhere since the read.
                            if exc.constraint_name != "messages_client_id_idx" or locking:
                                raise
                            continue
                        except asyncpg.DeadlockDetectedError:
                            if locking:
                                raise
                            continue
                        if rows:
                            return plan.finish({(int(r[0]), int(r[1])): int(r[2]) for r in rows})
                        if locking:
                            raise RuntimeError("a batch under its rooms' locks wrote nothing")
        except asyncpg.DataError as exc:
            # Class 22: a value PostgreSQL will not store (U+0000 in text); nothing was stored.
            raise ContentRefused(type(exc).__name__) from exc
        raise AssertionError("unreachable")

    async def _events_at_once(self, batch: Sequence[RoomEvent]) -> list[EventOutcome] | None:
        """The batch in one statement (_EVENTS_BATCH_SQL); None when that statement wrote
        nothing because the batch needs the general path (a change naming a message of the
        batch, or a room written by another process since the statement's snapshot)."""
        firsts, sent = common.first_copies(batch)
        try:
            param = orjson.dumps(
                [_event_row(position, batch[index]) for position, index in enumerate(sent, start=1)]
            ).decode()
        except orjson.JSONEncodeError as exc:
            raise ContentRefused("UnicodeEncodeError") from exc
        try:
            async with self._connection() as conn:
                try:
                    rows = await conn.fetch(_EVENTS_BATCH_SQL, param)
                except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError) as exc:
                    if (
                        isinstance(exc, asyncpg.UniqueViolationError)
                        and exc.constraint_name != "messages_client_id_idx"
                    ):
                        raise
                    return None  # a client_id committed elsewhere meanwhile: plan again
        except asyncpg.DataError as exc:
            raise ContentRefused(type(exc).__name__) from exc
        verdicts: dict[int, tuple[str, int | None]] = {}
        after: dict[int, Message] = {}
        ids: dict[tuple[int, int], int] = {}
        for row in rows:
            values = tuple(row)
            part = values[0]
            if part == 0:
                if not values[4]:
                    return None
            elif part == 1:
                verdicts[int(values[1])] = (str(values[2]), values[3])
            elif part == 2:
                after[int(values[1])] = common.message_from_row(values[5:], _timestamptz)
            else:
                ids[int(values[6]), int(values[3])] = int(values[5])
        outcomes: dict[int, EventOutcome] = {}
        for position, index in enumerate(sent, start=1):
            outcomes[index] = _event_outcome(
                batch[index], *verdicts[position], after.get(position), ids
            )
        return [
            outcomes[index] if first == index else _repeated(outcomes[first])
            for index, first in enumerate(firsts)
        ]

    # -- read marks --------------------------------------------------------------------------
    async def set_read_mark(self, room_id: int, user: str, seq: int, now: datetime) -> int:
        """One upsert: max(held, least(seq, last_seq)) for a live room, with the ordinal of
        the latest message at or before the mark (a backward probe of the (room_id, seq)
        index), which the conversation list subtracts from the room's message count, and the
        user's own messages at or before it (``common.READ_MARK_MOVED``). A user without a
        row has no message in the room (a post makes the row), so a new row counts none."""
        common.check_seq(seq)
        async with self._connection() as conn:
            held = await conn.fetchval(
                "INSERT INTO room_reads (room_id, user_uuid, seq, updated_at, ordinal)"
                " SELECT r.id, $2, c.seq, $4, coalesce((SELECT m.ordinal FROM messages m"
                "  WHERE m.room_id = r.id AND m.seq <= c.seq AND m.kind = 'message'"
                "  ORDER BY m.seq DESC LIMIT 1), 0)"
                " FROM rooms r CROSS JOIN LATERAL (SELECT least($3::bigint, r.last_seq) AS seq) c"
                " WHERE r.id = $1 AND r.deleted_at IS NULL"
                " ON CONFLICT (room_id, user_uuid) DO UPDATE"
                f"{common.READ_MARK_MOVED.format(greatest='greatest')}"
                " RETURNING seq",
                room_id,
                user,
                seq,
                common.utc(now),
            )
        if held is None:
            raise RoomGone(room_id)
        return int(held)

    async def read_marks(self, room_id: int) -> list[ReadMark]:
        rows = await self._fetch(
            "SELECT room_id, user_uuid, seq, updated_at FROM room_reads"
            " WHERE room_id = $1 AND updated_at IS NOT NULL"  # not a row a post made
            ' ORDER BY user_uuid COLLATE "C"',
            room_id,
        )
        return [ReadMark(int(r[0]), str(r[1]), int(r[2]), r[3]) for r in rows]

    # -- direct messages and the conversation list -------------------------------------------
    async def open_dm(
        self, user: str, entity: str, other: str, level_admin: int, now: datetime
    ) -> tuple[Room, bool]:
        """INSERT ... ON CONFLICT DO NOTHING on the unique ``dm_key``: a concurrent caller
        waits on the index entry until the first commits, then reads the committed room."""
        key = common.dm_key(user, other)
        stamp = common.utc(now)
        room_uuid = str(uuid4())
        async with self._connection() as conn, conn.transaction():
            room_id = await conn.fetchval(
                "INSERT INTO rooms (uuid, name, level_admin, type, entity_owner,"
                " max_entity_rules, last_seq, created_at, updated_at, dm_key, dm_pending)"
                " VALUES ($1, $2, $3, 'user2user', $4, $5, 0, $6, $6, $2, $7)"
                " ON CONFLICT (dm_key) WHERE dm_key IS NOT NULL DO NOTHING RETURNING id",
                room_uuid,
                key,
                level_admin,
                entity,
                common.DM_MAX_RULES,
                stamp,
                other,
            )
            if room_id is not None:
                await conn.executemany(
                    "INSERT INTO room_rules (room_id, kind, subject, permissions, level,"
                    " accepted, created_at, updated_at) VALUES ($1, 'user', $2, 'rw', 0, $3,"
                    " $4, $4)",
                    [(room_id, user, True, stamp), (room_id, other, False, stamp)],
                )
                return (
                    common.dm_room(int(room_id), room_uuid, key, level_admin, entity, now),
                    True,
                )
            row = await conn.fetchrow(
                f"SELECT {common.ROOM_COLS} FROM rooms r WHERE r.dm_key = $1", key
            )
            room = common.room_from_row(row, _timestamptz)
            if room.deleted_at is not None:
                raise RoomGone(room.id)
            await conn.execute(
                "UPDATE room_rules SET accepted = true, updated_at = $3"
                " WHERE room_id = $1 AND kind = 'user' AND subject = $2 AND NOT accepted",
                room.id,
                user,
                stamp,
            )
            await conn.execute(
                "UPDATE rooms SET dm_pending = NULL WHERE id = $1 AND dm_pending = $2",
                room.id,
                user,
            )
        return room, False

    async def settle_dms(self, user: str, entity: str, now: datetime) -> Settled:
        """One statement: clear the wait and accept the rules where the entity owns the DM."""
        rows = await self._fetch(
            "WITH settled AS (UPDATE rooms SET dm_pending = NULL WHERE dm_pending = $1"
            "  RETURNING id, entity_owner = $2 AND deleted_at IS NULL AS same),"
            " accepted AS (UPDATE room_rules SET accepted = true, updated_at = $3"
            "  WHERE kind = 'user' AND subject = $1"
            "  AND room_id IN (SELECT id FROM settled WHERE same) RETURNING room_id)"
            " SELECT id, same FROM settled ORDER BY id",
            user,
            entity,
            common.utc(now),
        )
        return Settled(
            added=tuple(int(r[0]) for r in rows if r[1]),
            invited=tuple(int(r[0]) for r in rows if not r[1]),
        )

    async def conversations(
        self, user: str, entity: str, level: int, order: str, limit: int, offset: int
    ) -> list[Conversation]:
        """The page of visible rooms with their states.

        A page of up to ``list_part`` rooms is one statement. A larger one is two steps: one
        statement reads the page's room ids, then ``_states`` reads theirs in parts side by
        side; or, when the list cache knows that the user's last list held all their rooms
        and no more than this page holds (``ListCache.whole``), one step of parts side by
        side (``_split_conversations``). With a ``list_cache``, the rows carry their room's
        version and every entry read is kept; and when the cache expects to answer most of
        the user's page (``ListCache.checks_first``) the page is read through it instead
        (``_cached_conversations``).

        Each room's entry is read in one snapshot (its state, read mark and unread count
        agree). In two steps one snapshot decides which rooms the page holds and in which
        order; a room deleted between the steps is left out, and one whose rules changed
        between them is listed as the first step saw it, as it would have been by a request
        a moment earlier. In one step of parts, each part's snapshot decides for its rooms
        (measured: BENCHMARKS.md, "The conversation list")."""
        common.check_page(limit, offset)
        params = {"user": user, "entity": entity, "level": level, "limit": limit, "offset": offset}
        cache = self._list_cache
        if cache is not None and cache.checks_first(user):
            return await self._cached_conversations(cache, user, order, params)
        keeper = None if cache is None else _Keeper(cache, user)
        parts = -(-limit // self._list_part)
        if parts == 1 or self._spare_connections() < parts:
            page = common.conversation_page_sql(
                _VISIBLE_IDS, order, version=None if keeper is None else _ROOM_VERSION
            )
            states = common.room_states_sql(
                page, order, stamp_text=_stamp_text, versioned=keeper is not None
            )
            sql, args = common.numbered(states, params)
            rows = await self._fetch(sql, *args)
            if keeper is None:
                return common.conversations_from_rows(rows, None)
            return keeper.done(keeper.keep(rows), whole=offset == 0 and len(rows) < limit)
        if keeper is not None and offset == 0:
            whole = keeper.cache.whole(user)
            if whole is not None and whole <= limit:
                return await self._split_conversations(keeper, order, params, parts)
        page = common.conversation_page_sql(_VISIBLE_IDS, order)
        # One id more than the page: whether it holds every room the user may read.
        sql, args = common.numbered(f"SELECT r.id FROM ({page}) r", {**params, "limit": limit + 1})
        ids = [int(row[0]) for row in await self._fetch(sql, *args)]
        whole_list = offset == 0 and len(ids) <= limit
        del ids[limit:]
        read: Callable[[list[int]], Coroutine[Any, Any, list[Conversation]]]
        read = partial(self._states_part, user) if keeper is None else keeper.reader(self._fetch)
        by_id = {c.id: c for c in await self._states(ids, read)}
        found = [by_id[i] for i in ids if i in by_id]
        return found if keeper is None else keeper.done(found, whole=whole_list)

    async def _split_conversations(
        self, keeper: _Keeper, order: str, params: dict[str, Any], parts: int
    ) -> list[Conversation]:
        """The first page of a user whose whole list fits it, in ``parts`` statements side by
        side, without a statement for the page's ids first: part k is the page of the rooms
        whose id is k modulo ``parts`` (``_PART_STATES``), with their states; the parts'
        rows are merged in the page's order (by activity, on each room's exact activity,
        read as a last column) and cut to the page. Each part returns at most the page's
        size, so the merge is the page whatever the user gained since their last list; only
        a user who gained more rooms than the page holds makes the parts read more rooms
        than it shows, once (their next list is read in two steps). Saves the ids' statement
        and its round trip (measured: BENCHMARKS.md, "The conversation list")."""
        limit = params["limit"]
        by_activity = order == "activity"
        sql, names = _PART_STATES[order]

        async def read(part: int) -> tuple[list[Any], list[Conversation], bool]:
            values = {**params, "parts": parts, "part": part}
            rows = await self._fetch(sql, *(values[name] for name in names))
            if by_activity:
                keys: list[Any] = [(row[-1], row[0]) for row in rows]
                rows = [row[:-1] for row in rows]
            else:
                keys = [row[0] for row in rows]
            return keys, keeper.keep(rows), len(rows) < limit

        found = await together(*(read(part) for part in range(parts)))
        pairs = [pair for keys, listed, _ in found for pair in zip(keys, listed, strict=True)]
        merged = sorted(pairs, key=itemgetter(0), reverse=by_activity)
        page = [conversation for _, conversation in merged[:limit]]
        whole = len(pairs) <= limit and all(short for _, _, short in found)
        return keeper.done(page, whole=whole)

    async def _cached_conversations(
        self, cache: ListCache, user: str, order: str, params: dict[str, Any]
    ) -> list[Conversation]:
        """``conversations`` through ``cache``: the page's (id, version, read mark), then the
        states of the rooms the cache cannot answer, which it then keeps under the version
        the page read. A room changed between the two steps is answered as the second step
        read it and kept under the older version, which no later page reads again: an entry
        is never served for a version it does not hold, only re-read once more."""
        limit = params["limit"]
        page = common.conversation_page_sql(_VISIBLE_IDS, order, version=_ROOM_VERSION)
        # One room more than the page: whether it holds every room the user may read.
        sql, args = common.numbered(
            common.page_versions_sql(page, order), {**params, "limit": limit + 1}
        )
        rows = await self._fetch(sql, *args)
        whole = params["offset"] == 0 and len(rows) <= limit
        del rows[limit:]
        found: dict[int, Conversation] = {}
        missing: dict[int, int] = {}  # room id: version
        for room_id, version, read_seq in rows:
            hit = cache.get(room_id, version, user, read_seq)
            if hit is None:
                missing[room_id] = version
            else:
                found[room_id] = hit
        cache.note(user, len(found), len(rows), whole=whole)
        if missing:
            for conversation in await self._states(list(missing), partial(self._states_part, user)):
                cache.put(missing[conversation.id], conversation, user)
                found[conversation.id] = conversation
        return [found[row[0]] for row in rows if row[0] in found]

    async def _states(
        self, ids: list[int], read: Callable[[list[int]], Coroutine[Any, Any, list[Conversation]]]
    ) -> list[Conversation]:
        """The states of the rooms ``ids`` by ``read`` (a statement over some of them), in
        parts of at most ``list_part`` rooms read by concurrent statements on as many pooled
        connections, so that PostgreSQL works on the parts side by side; each part's rows
        become ``Conversation`` while the others may still be running. Parts are read side by
        side only while the pool has a spare connection for each (idle, or not opened yet): on
        a busy pool the rooms are one statement, which costs PostgreSQL less in all, and other
        work (the writer's batches) is not kept waiting for connections."""
        parts = -(-len(ids) // self._list_part)
        if parts <= 1 or self._spare_connections() < parts:
            return await read(ids)
        size = -(-len(ids) // parts)  # even parts
        found = await together(*(read(ids[i : i + size]) for i in range(0, len(ids), size)))
        return [conversation for part in found for conversation in part]

    async def entries_json(self, user: str, conversations: Sequence[Conversation]) -> list[Any]:
        """The JSON the list cache keeps for each entry it answered, ``to_json`` for the
        others (all of them without a cache)."""
        cache = self._list_cache
        if cache is None:
            return [conversation.to_json() for conversation in conversations]
        return [cache.entry_json(user, c) or c.to_json() for c in conversations]

    def _spare_connections(self) -> int:
        """Connections the pool could hand out now without waiting: idle ones, and those it
        has not opened yet."""
        pool = self._pool
        if pool is None:
            return 0
        return int(pool.get_idle_size() + pool.get_max_size() - pool.get_size())

    async def _states_part(self, user: str, ids: list[int]) -> list[Conversation]:
        """One part of a large conversation list page: its live rooms' states, by id."""
        return common.conversations_from_rows(await self._fetch(_STATES_OF_IDS, user, ids), None)

    async def room_states(
        self, user: str, entity: str, level: int, room_ids: Sequence[int]
    ) -> dict[int, RoomState]:
        """One statement over the given ids the user may read."""
        if not room_ids:
            return {}
        page = f"{common.ROOM_PAGE} WHERE r.id = ANY(:ids::bigint[]) AND r.id IN ({_VISIBLE_IDS})"
        sql, args = common.numbered(
            common.room_states_sql(page, "id", stamp_text=_stamp_text),
            {"user": user, "entity": entity, "level": level, "ids": list(room_ids)},
        )
        found = common.conversations_from_rows(await self._fetch(sql, *args), None)
        return {c.id: c.state for c in found}
