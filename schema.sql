-- nanomsg canonical PostgreSQL schema.
--
-- Versioned: each section starts with a `-- migration: <version> <name>` line. The migrator
-- (nanomsg/store/migrate.py) splits on those markers and applies, in order and each in its own
-- transaction, every version not yet recorded in schema_migrations. Never edit a released
-- section: append a new one. nanomsg/store/schema_sqlite.sql mirrors these versions for SQLite.

-- migration: 1 initial
CREATE TABLE rooms (
    id               bigserial PRIMARY KEY,
    -- Public, unguessable identifier; the numeric id stays internal and compact for joins.
    uuid             uuid NOT NULL UNIQUE,
    name             text NOT NULL,
    level_admin      int NOT NULL,
    type             text NOT NULL CHECK (type IN ('group', 'user2user')),
    entity_owner     text NOT NULL,
    max_entity_rules int NOT NULL,
    -- Last message seq handed out. Senders bump it with UPDATE ... RETURNING, whose row lock
    -- serialises them, so seqs are gapless per room without a sequence object or MAX(seq) scan.
    last_seq         bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- Soft delete: history stays readable after a room is closed.
    deleted_at       timestamptz NULL
);

-- "Rooms owned by my entity" lookups; deleted rooms never match, so leave them out.
CREATE INDEX rooms_entity_owner_idx ON rooms (entity_owner) WHERE deleted_at IS NULL;

CREATE TABLE room_rules (
    -- Rules belong to the room; a hard delete of a room (maintenance only) takes them along.
    room_id     bigint NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('user', 'entity')),
    -- A user UUID (kind user) or an entity UUID (kind entity); kept as text because the
    -- identity provider decides its format.
    subject     text NOT NULL,
    permissions text NOT NULL,
    level       int NOT NULL,
    accepted    boolean NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    -- One rule per (room, kind, subject): put_rule is an upsert on this key, and the key's
    -- index also serves room_access (all rules of a room).
    PRIMARY KEY (room_id, kind, subject)
);

-- "Rules of a caller" and "rooms visible to a caller" start from the subject.
CREATE INDEX room_rules_subject_idx ON room_rules (subject);

CREATE TABLE messages (
    id         bigserial PRIMARY KEY,
    -- No cascade: rooms are only soft-deleted, and history must outlive them.
    room_id    bigint NOT NULL REFERENCES rooms (id),
    seq        bigint NOT NULL,
    emitter    text NOT NULL,
    entity     text NOT NULL,
    content    text NOT NULL,
    -- Optional idempotency key chosen by the sending client, unique per (room, emitter).
    client_id  text NULL,
    created_at timestamptz NOT NULL,
    -- Backstop for the gapless seq, and the index every history read walks.
    UNIQUE (room_id, seq)
);

-- Makes a retried send with the same client_id a no-op even when two copies race; partial
-- because most messages carry no client_id and need no entry.
CREATE UNIQUE INDEX messages_client_id_idx
    ON messages (room_id, emitter, client_id) WHERE client_id IS NOT NULL;

-- History reads filtered by date range.
CREATE INDEX messages_room_created_idx ON messages (room_id, created_at);

-- migration: 2 lower-case uuids
-- UUIDs are compared as text, so one UUID spelled in two cases was two users, and a ban on
-- the upper-case spelling banned nobody. The server now writes only the lower-case form; this
-- brings stored UUIDs to it. Rules that then name one subject twice in a room are merged into
-- the one that grants least: an accepted ban first, then a rule that grants nothing yet
-- (pending), then the fewest flags (admin last), then the highest level (admits fewest
-- members), then the latest change.
DELETE FROM room_rules rr
USING (
    SELECT room_id, kind, subject,
           row_number() OVER (
               PARTITION BY room_id, kind, lower(subject)
               ORDER BY (accepted AND strpos(permissions, 'b') > 0) DESC,
                        accepted ASC,
                        (strpos(permissions, 'a') > 0) ASC,
                        length(permissions) ASC,
                        level DESC,
                        updated_at DESC,
                        subject COLLATE "C" ASC
           ) AS rank
    FROM room_rules
) ranked
WHERE ranked.rank > 1
  AND rr.room_id = ranked.room_id AND rr.kind = ranked.kind AND rr.subject = ranked.subject;

UPDATE room_rules SET subject = lower(subject) WHERE subject <> lower(subject);

UPDATE rooms SET entity_owner = lower(entity_owner) WHERE entity_owner <> lower(entity_owner);

-- Two spellings of one emitter may have used one client_id in a room: the first message keeps
-- it (a resend returns that one), the later ones keep their text but lose the key.
UPDATE messages SET client_id = NULL
WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
                   PARTITION BY room_id, lower(emitter), client_id ORDER BY seq
               ) AS rank
        FROM messages WHERE client_id IS NOT NULL
    ) ranked
    WHERE ranked.rank > 1
);

UPDATE messages SET emitter = lower(emitter), entity = lower(entity)
WHERE emitter <> lower(emitter) OR entity <> lower(entity);

-- migration: 3 room events, read marks, direct messages
-- The room's stream holds events, not only messages: an edit and a delete are rows of
-- messages too, taking the room's next seq like a send (so they share its ordering, gap-fill,
-- resume and history path). ``kind`` says which; ``target_seq`` names the message an edit or
-- delete acts on. The original row keeps its seq and carries its current state: ``content``
-- is the latest edit (``first_content`` keeps the text as sent, for audit), ``edited_at``,
-- and the soft delete ``deleted_at``/``deleted_by`` (its content stays stored, never served).
-- ``system`` marks messages a partner backend posted. Constant defaults: no table rewrite.
ALTER TABLE messages
    ADD COLUMN kind text NOT NULL DEFAULT 'message'
        CHECK (kind IN ('message', 'edit', 'delete')),
    ADD COLUMN target_seq bigint NULL,
    ADD COLUMN system boolean NOT NULL DEFAULT false,
    ADD COLUMN first_content text NULL,
    ADD COLUMN edited_at timestamptz NULL,
    ADD COLUMN deleted_at timestamptz NULL,
    ADD COLUMN deleted_by text NULL,
    ADD CONSTRAINT messages_target_seq_check CHECK ((kind = 'message') = (target_seq IS NULL));

-- A user's read mark per room: the highest seq they have read (never moves backwards).
CREATE TABLE room_reads (
    room_id    bigint NOT NULL REFERENCES rooms (id),
    user_uuid  text NOT NULL,
    seq        bigint NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (room_id, user_uuid)
);

-- A direct-message room exists once per pair of users: ``dm_key`` is their two lower-case
-- UUIDs sorted and joined by ':'. ``dm_pending`` names the invited user until a token of
-- theirs showed their entity (same as the room's owner entity: their rule is accepted; else
-- it stays a pending invitation).
ALTER TABLE rooms ADD COLUMN dm_key text NULL, ADD COLUMN dm_pending text NULL;

-- When the room's latest event was stored (NULL: none yet), written with last_seq by every
-- writer, so the conversation list sorts rooms by activity without a probe per room.
ALTER TABLE rooms ADD COLUMN last_activity_at timestamptz NULL;
UPDATE rooms r SET last_activity_at = m.created_at
FROM messages m WHERE m.room_id = r.id AND m.seq = r.last_seq;
CREATE UNIQUE INDEX rooms_dm_key_idx ON rooms (dm_key) WHERE dm_key IS NOT NULL;
CREATE INDEX rooms_dm_pending_idx ON rooms (dm_pending) WHERE dm_pending IS NOT NULL;

-- migration: 4 unread count index
-- The unread count of a room (the conversation list's costliest part) counts the live
-- messages after a read mark not sent by the reader. This partial index holds exactly those
-- rows' keys and the emitter, so the count is an index-only scan of the unread range (no heap
-- visit once autovacuum has marked the pages all-visible). Edits and deletes stay out of it,
-- and a soft delete drops its message out of it.
CREATE INDEX messages_unread_idx ON messages (room_id, seq) INCLUDE (emitter)
    WHERE kind = 'message' AND deleted_at IS NULL;

-- migration: 5 message ordinals for the unread count
-- The unread count of a room was a count of its unread range, so the conversation list cost
-- grew with the number of unread messages (1 000 rooms of 25 unread: ~8 ms of PostgreSQL time).
-- Now every message carries its ``ordinal``: how many messages (kind 'message') the room holds
-- up to and including it, handed out by the writer with the seq from the room's
-- ``message_count`` (bumped once per room per batch, like last_seq); edits and deletes carry
-- none. A read mark keeps the ordinal of the latest message at or before it, so "messages
-- after the mark" is ``message_count - room_reads.ordinal``, with nothing to scan. The unread
-- count then takes out the reader's own live messages after the mark (``messages_own_idx``,
-- usually an empty range) and the deleted ones after it (``messages_deleted_idx``, which holds
-- deleted messages only): three figures, none growing with what is unread. The backfill
-- rewrites every message row once.
ALTER TABLE rooms ADD COLUMN message_count bigint NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN ordinal bigint NULL;
ALTER TABLE room_reads ADD COLUMN ordinal bigint NOT NULL DEFAULT 0;
UPDATE messages m SET ordinal = o.n
FROM (
    SELECT id, row_number() OVER (PARTITION BY room_id ORDER BY seq) AS n
    FROM messages WHERE kind = 'message'
) o
WHERE m.id = o.id;
UPDATE rooms r SET message_count = c.n
FROM (SELECT room_id, count(*) AS n FROM messages WHERE kind = 'message' GROUP BY room_id) c
WHERE r.id = c.room_id;
UPDATE room_reads rd SET ordinal = (
    SELECT count(*) FROM messages m
    WHERE m.room_id = rd.room_id AND m.kind = 'message' AND m.seq <= rd.seq
);
-- The count no longer scans the unread range; the two indexes below replace it (one entry
-- per message, as before, plus one per deleted message).
DROP INDEX messages_unread_idx;
CREATE INDEX messages_own_idx ON messages (room_id, emitter, seq)
    WHERE kind = 'message' AND deleted_at IS NULL;
CREATE INDEX messages_deleted_idx ON messages (room_id, seq)
    WHERE kind = 'message' AND deleted_at IS NOT NULL;

-- migration: 6 fewer index entries per edit and delete
-- Migration 5's unread count took out the reader's own LIVE messages after the mark
-- (``messages_own_idx``, over ``deleted_at IS NULL``) and ALL deleted messages after it
-- (``messages_deleted_idx``), so a soft delete moved its message from the first index to the
-- second: two index writes on top of the delete event's row. Now the first holds the reader's
-- own messages whether deleted or not, and the second carries each deleted message's
-- emitter, so the count takes out the own messages after the mark and the OTHERS' deleted
-- ones after it (the same figure: own and others' are disjoint), and a delete adds one entry
-- to the second index and leaves the first alone.
-- And the date index holds messages only: its one reader, a history page with a date window,
-- reads messages only (``kind = 'message'``, which the partial index's predicate matches), so
-- the edit and delete event rows no longer enter it. (A page of the whole event stream with a
-- date window, which the server never asks for, walks the (room_id, seq) range instead.)
-- The three indexes are rebuilt; no row changes.
DROP INDEX messages_own_idx;
DROP INDEX messages_deleted_idx;
CREATE INDEX messages_own_idx ON messages (room_id, emitter, seq) WHERE kind = 'message';
CREATE INDEX messages_deleted_idx ON messages (room_id, seq) INCLUDE (emitter)
    WHERE kind = 'message' AND deleted_at IS NOT NULL;
DROP INDEX messages_room_created_idx;
CREATE INDEX messages_room_created_idx ON messages (room_id, created_at) WHERE kind = 'message';

-- migration: 7 the latest message on its room row
-- The conversation list showed each room's latest message by probing the (room_id, seq) index
-- from the top and visiting that message's heap page: per room, the largest part of the list's
-- cost, and one that grows with the messages table (1 000 rooms: ~2.8 ms of PostgreSQL on a
-- database of 50 000 messages, ~4.5 ms on one of 270 000). Every statement that writes a
-- room's events already rewrites its row (last_seq), so it now also keeps a copy of the
-- latest message there: the message's id, seq, author, text, stamps and flags as the
-- messages row holds them, except that a deleted message's copy keeps no text (a tombstone
-- shows none). An edit or delete of that latest message changes the copy with it; a room
-- without messages has none (all NULL). The list then reads the copy with the room.
ALTER TABLE rooms
    ADD COLUMN latest_id bigint NULL,
    ADD COLUMN latest_seq bigint NULL,
    ADD COLUMN latest_emitter text NULL,
    ADD COLUMN latest_entity text NULL,
    ADD COLUMN latest_content text NULL,
    ADD COLUMN latest_created_at timestamptz NULL,
    ADD COLUMN latest_client_id text NULL,
    ADD COLUMN latest_system boolean NULL,
    ADD COLUMN latest_edited_at timestamptz NULL,
    ADD COLUMN latest_deleted_at timestamptz NULL,
    ADD COLUMN latest_deleted_by text NULL;
UPDATE rooms r SET latest_id = l.id, latest_seq = l.seq, latest_emitter = l.emitter,
    latest_entity = l.entity,
    latest_content = CASE WHEN l.deleted_at IS NULL THEN l.content ELSE '' END,
    latest_created_at = l.created_at, latest_client_id = l.client_id, latest_system = l.system,
    latest_edited_at = l.edited_at, latest_deleted_at = l.deleted_at,
    latest_deleted_by = l.deleted_by
FROM (
    -- Each room's latest message from the top of its (room_id, seq) index: one probe per
    -- room, not a sort of the whole table.
    SELECT m.* FROM rooms x CROSS JOIN LATERAL (
        SELECT * FROM messages m WHERE m.room_id = x.id AND m.kind = 'message'
        ORDER BY m.seq DESC LIMIT 1
    ) m
) l
WHERE r.id = l.room_id;

-- migration: 8 each member's own message count on their read row
-- The unread count took out the reader's own messages after their mark with a probe of
-- ``messages_own_idx`` per room: half of the conversation list's PostgreSQL time (1 000
-- rooms: ~3.5 of ~7 ms), almost always to find none. A user's row of ``room_reads`` now also
-- counts their messages in the room (``own_count``, raised by every statement that stores
-- messages, in the same statement) and how many of those are at or before their mark
-- (``own_at_mark``, moved with the mark by the few own messages it passes), so the count is
-- ``own_count - own_at_mark``, read with the mark and no probe at all. A user who posts in a
-- room before reading it gets a row with no mark yet: seq 0 and no ``updated_at`` (the
-- "read at" stamp), which the list of read marks leaves out.
-- The rooms table leaves half of each page free: every batch of room events rewrites its
-- rooms' rows, and a new row version that fits on its page needs no new index entries (a
-- "HOT" update); on full pages a third of them did not fit, and the indexes of rooms grew
-- with dead entries between vacuums (1 000 rooms changed 200 times: 19.5 MB against 1.2 MB,
-- the list's page of room ids 3.3 ms against 2.5). room_reads keeps a fifth free for the
-- same reason (a post rewrites its author's row).
ALTER TABLE room_reads
    ALTER COLUMN updated_at DROP NOT NULL,
    ADD COLUMN own_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN own_at_mark bigint NOT NULL DEFAULT 0;
INSERT INTO room_reads AS rd (room_id, user_uuid, seq, ordinal, own_count)
SELECT room_id, emitter, 0, 0, count(*) FROM messages WHERE kind = 'message'
GROUP BY room_id, emitter
ON CONFLICT (room_id, user_uuid) DO UPDATE SET own_count = excluded.own_count;
UPDATE room_reads rd SET own_at_mark = (
    SELECT count(*) FROM messages m
    WHERE m.room_id = rd.room_id AND m.emitter = rd.user_uuid AND m.kind = 'message'
        AND m.seq <= rd.seq
) WHERE rd.seq > 0 AND rd.own_count > 0;
ALTER TABLE rooms SET (fillfactor = 50);
ALTER TABLE room_reads SET (fillfactor = 80);
-- The rooms a user may read through their entity's level (every list, a rule check) are
-- the entity's rooms at or below the level, DMs aside: the index now holds exactly those keys,
-- so a user below every room's level reads no room row for it (the index on entity_owner
-- alone led to every room of the entity, each then read to check its level and DM key).
DROP INDEX rooms_entity_owner_idx;
CREATE INDEX rooms_entity_level_idx ON rooms (entity_owner, level_admin)
    WHERE deleted_at IS NULL AND dm_key IS NULL;
