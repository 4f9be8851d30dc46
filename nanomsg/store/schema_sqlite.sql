-- nanomsg SQLite schema: the same versions as the canonical PostgreSQL schema.sql.
--
-- Differences from PostgreSQL, all forced by SQLite's type system:
--   * timestamps are INTEGER microseconds since the Unix epoch (UTC): they sort correctly,
--     compare cheaply and round-trip exactly to aware UTC datetimes (PostgreSQL's timestamptz
--     has the same microsecond precision, so both backends return identical values);
--   * booleans are INTEGER 0/1; UUIDs are TEXT.
-- Pending `-- migration: <version> <name>` sections are applied together in one BEGIN IMMEDIATE
-- transaction, so two processes opening a fresh file cannot both migrate it.

-- migration: 1 initial
CREATE TABLE rooms (
    -- AUTOINCREMENT: ids are never reused, like a PostgreSQL bigserial.
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid             TEXT NOT NULL UNIQUE,
    name             TEXT NOT NULL,
    level_admin      INTEGER NOT NULL,
    type             TEXT NOT NULL CHECK (type IN ('group', 'user2user')),
    entity_owner     TEXT NOT NULL,
    max_entity_rules INTEGER NOT NULL,
    -- Last message seq handed out; bumped inside the sender's write transaction.
    last_seq         INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    -- Soft delete: history stays readable after a room is closed.
    deleted_at       INTEGER NULL
);

CREATE INDEX rooms_entity_owner_idx ON rooms (entity_owner) WHERE deleted_at IS NULL;

CREATE TABLE room_rules (
    room_id     INTEGER NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('user', 'entity')),
    subject     TEXT NOT NULL,
    permissions TEXT NOT NULL,
    level       INTEGER NOT NULL,
    accepted    INTEGER NOT NULL CHECK (accepted IN (0, 1)),
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (room_id, kind, subject)
);

CREATE INDEX room_rules_subject_idx ON room_rules (subject);

CREATE TABLE messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id    INTEGER NOT NULL REFERENCES rooms (id),
    seq        INTEGER NOT NULL,
    emitter    TEXT NOT NULL,
    entity     TEXT NOT NULL,
    content    TEXT NOT NULL,
    client_id  TEXT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (room_id, seq)
);

CREATE UNIQUE INDEX messages_client_id_idx
    ON messages (room_id, emitter, client_id) WHERE client_id IS NOT NULL;

CREATE INDEX messages_room_created_idx ON messages (room_id, created_at);

-- migration: 2 lower-case uuids
-- Stored UUIDs to their lower-case form; colliding rules merged into the one that grants
-- least (schema.sql explains the order); a client_id shared by two spellings of one emitter
-- stays on the first message only.
DELETE FROM room_rules
WHERE rowid IN (
    SELECT rowid FROM (
        SELECT rowid,
               row_number() OVER (
                   PARTITION BY room_id, kind, lower(subject)
                   ORDER BY (accepted = 1 AND instr(permissions, 'b') > 0) DESC,
                            accepted ASC,
                            (instr(permissions, 'a') > 0) ASC,
                            length(permissions) ASC,
                            level DESC,
                            updated_at DESC,
                            subject ASC
               ) AS rank
        FROM room_rules
    )
    WHERE rank > 1
);

UPDATE room_rules SET subject = lower(subject) WHERE subject <> lower(subject);

UPDATE rooms SET entity_owner = lower(entity_owner) WHERE entity_owner <> lower(entity_owner);

UPDATE messages SET client_id = NULL
WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
                   PARTITION BY room_id, lower(emitter), client_id ORDER BY seq
               ) AS rank
        FROM messages WHERE client_id IS NOT NULL
    )
    WHERE rank > 1
);

UPDATE messages SET emitter = lower(emitter), entity = lower(entity)
WHERE emitter <> lower(emitter) OR entity <> lower(entity);

-- migration: 3 room events, read marks, direct messages
-- Edits and deletes are rows of messages taking the room's next seq; the original keeps its
-- current state (schema.sql explains every column). SQLite adds one column per statement.
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'message'
    CHECK (kind IN ('message', 'edit', 'delete'));
ALTER TABLE messages ADD COLUMN target_seq INTEGER NULL
    CHECK ((kind = 'message') = (target_seq IS NULL));
ALTER TABLE messages ADD COLUMN system INTEGER NOT NULL DEFAULT 0 CHECK (system IN (0, 1));
ALTER TABLE messages ADD COLUMN first_content TEXT NULL;
ALTER TABLE messages ADD COLUMN edited_at INTEGER NULL;
ALTER TABLE messages ADD COLUMN deleted_at INTEGER NULL;
ALTER TABLE messages ADD COLUMN deleted_by TEXT NULL;

CREATE TABLE room_reads (
    room_id    INTEGER NOT NULL REFERENCES rooms (id),
    user_uuid  TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_uuid)
);

ALTER TABLE rooms ADD COLUMN dm_key TEXT NULL;
ALTER TABLE rooms ADD COLUMN dm_pending TEXT NULL;
ALTER TABLE rooms ADD COLUMN last_activity_at INTEGER NULL;
UPDATE rooms SET last_activity_at = (
    SELECT m.created_at FROM messages m WHERE m.room_id = rooms.id AND m.seq = rooms.last_seq
);
CREATE UNIQUE INDEX rooms_dm_key_idx ON rooms (dm_key) WHERE dm_key IS NOT NULL;
CREATE INDEX rooms_dm_pending_idx ON rooms (dm_pending) WHERE dm_pending IS NOT NULL;

-- migration: 4 unread count index
-- The live messages' keys and emitter (schema.sql explains why). SQLite has no INCLUDE, so the
-- other columns the count reads are trailing key columns: the emitter, and kind and deleted_at
-- (constant in this index, but SQLite covers a query only with every column it names).
CREATE INDEX messages_unread_idx ON messages (room_id, seq, emitter, kind, deleted_at)
    WHERE kind = 'message' AND deleted_at IS NULL;

-- migration: 5 message ordinals for the unread count
-- Each message's ordinal among the room's messages, the room's message count and the ordinal
-- at each read mark, so the unread count is a subtraction less two short index ranges
-- (schema.sql explains it). As in migration 4, the partial indexes name kind and deleted_at
-- as trailing key columns so that SQLite covers the counts with them.
ALTER TABLE rooms ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN ordinal INTEGER NULL;
ALTER TABLE room_reads ADD COLUMN ordinal INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET ordinal = o.n
FROM (
    SELECT id, row_number() OVER (PARTITION BY room_id ORDER BY seq) AS n
    FROM messages WHERE kind = 'message'
) AS o
WHERE messages.id = o.id;
UPDATE rooms SET message_count = (
    SELECT count(*) FROM messages m WHERE m.room_id = rooms.id AND m.kind = 'message'
);
UPDATE room_reads SET ordinal = (
    SELECT count(*) FROM messages m
    WHERE m.room_id = room_reads.room_id AND m.kind = 'message' AND m.seq <= room_reads.seq
);
DROP INDEX messages_unread_idx;
CREATE INDEX messages_own_idx ON messages (room_id, emitter, seq, kind, deleted_at)
    WHERE kind = 'message' AND deleted_at IS NULL;
CREATE INDEX messages_deleted_idx ON messages (room_id, seq, kind, deleted_at)
    WHERE kind = 'message' AND deleted_at IS NOT NULL;

-- migration: 6 fewer index entries per edit and delete
-- The own messages' index no longer depends on deleted_at and the deleted messages' index
-- carries the emitter, so a soft delete adds one index entry instead of moving one between
-- two; the date index holds messages only, which is all its reader (a history page with a
-- date window) reads, so edit and delete rows no longer enter it (schema.sql explains both).
-- As in migration 5, the columns the unread count names are trailing key columns so that
-- SQLite covers it with them.
DROP INDEX messages_own_idx;
DROP INDEX messages_deleted_idx;
CREATE INDEX messages_own_idx ON messages (room_id, emitter, seq, kind) WHERE kind = 'message';
CREATE INDEX messages_deleted_idx ON messages (room_id, seq, emitter, kind, deleted_at)
    WHERE kind = 'message' AND deleted_at IS NOT NULL;
DROP INDEX messages_room_created_idx;
CREATE INDEX messages_room_created_idx ON messages (room_id, created_at) WHERE kind = 'message';

-- migration: 7 the latest message on its room row
-- Each room row keeps a copy of its latest message, kept by every writer of its events, so
-- the conversation list reads it with the room instead of probing the messages (schema.sql
-- explains it). A deleted message's copy keeps no text.
ALTER TABLE rooms ADD COLUMN latest_id INTEGER NULL;
ALTER TABLE rooms ADD COLUMN latest_seq INTEGER NULL;
ALTER TABLE rooms ADD COLUMN latest_emitter TEXT NULL;
ALTER TABLE rooms ADD COLUMN latest_entity TEXT NULL;
ALTER TABLE rooms ADD COLUMN latest_content TEXT NULL;
ALTER TABLE rooms ADD COLUMN latest_created_at INTEGER NULL;
ALTER TABLE rooms ADD COLUMN latest_client_id TEXT NULL;
ALTER TABLE rooms ADD COLUMN latest_system INTEGER NULL;
ALTER TABLE rooms ADD COLUMN latest_edited_at INTEGER NULL;
ALTER TABLE rooms ADD COLUMN latest_deleted_at INTEGER NULL;
ALTER TABLE rooms ADD COLUMN latest_deleted_by TEXT NULL;
UPDATE rooms SET (latest_id, latest_seq, latest_emitter, latest_entity, latest_content,
    latest_created_at, latest_client_id, latest_system, latest_edited_at, latest_deleted_at,
    latest_deleted_by) = (
    SELECT m.id, m.seq, m.emitter, m.entity,
        CASE WHEN m.deleted_at IS NULL THEN m.content ELSE '' END, m.created_at, m.client_id,
        m.system, m.edited_at, m.deleted_at, m.deleted_by
    FROM messages m WHERE m.room_id = rooms.id AND m.kind = 'message'
    ORDER BY m.seq DESC LIMIT 1
);

-- migration: 8 each member's own message count on their read row
-- A user's row of room_reads also counts their messages in the room and how many of those
-- are at or before their mark, so the unread count takes out their own messages after the
-- mark without a probe (schema.sql explains it). A user who posts before reading gets a row
-- with seq 0 and no updated_at, which the list of read marks leaves out; SQLite cannot drop
-- NOT NULL from a column, so the table is rebuilt.
CREATE TABLE room_reads_new (
    room_id     INTEGER NOT NULL REFERENCES rooms (id),
    user_uuid   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    updated_at  INTEGER NULL,
    ordinal     INTEGER NOT NULL DEFAULT 0,
    own_count   INTEGER NOT NULL DEFAULT 0,
    own_at_mark INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_uuid)
);
INSERT INTO room_reads_new (room_id, user_uuid, seq, updated_at, ordinal)
SELECT room_id, user_uuid, seq, updated_at, ordinal FROM room_reads;
DROP TABLE room_reads;
ALTER TABLE room_reads_new RENAME TO room_reads;
INSERT INTO room_reads (room_id, user_uuid, seq, ordinal, own_count)
SELECT room_id, emitter, 0, 0, count(*) FROM messages WHERE kind = 'message'
GROUP BY room_id, emitter
ON CONFLICT (room_id, user_uuid) DO UPDATE SET own_count = excluded.own_count;
UPDATE room_reads SET own_at_mark = (
    SELECT count(*) FROM messages m
    WHERE m.room_id = room_reads.room_id AND m.emitter = room_reads.user_uuid
        AND m.kind = 'message' AND m.seq <= room_reads.seq
) WHERE seq > 0 AND own_count > 0;
-- The rooms a user may read through their entity's level: the index holds exactly those keys
-- (schema.sql explains it).
DROP INDEX rooms_entity_owner_idx;
CREATE INDEX rooms_entity_level_idx ON rooms (entity_owner, level_admin)
    WHERE deleted_at IS NULL AND dm_key IS NULL;
-- Every new message (kind 'message') adds one to its author's own count, whichever writer
-- stored it (PostgreSQL's statements do it themselves: nanomsg/store/postgres.py).
CREATE TRIGGER messages_own_count AFTER INSERT ON messages WHEN new.kind = 'message'
BEGIN
    INSERT INTO room_reads (room_id, user_uuid, seq, ordinal, own_count)
    VALUES (new.room_id, new.emitter, 0, 0, 1)
    ON CONFLICT (room_id, user_uuid) DO UPDATE SET own_count = room_reads.own_count + 1;
END;
