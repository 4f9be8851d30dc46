"""Domain records shared by the store, the session, permissions and the HTTP API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

from nanomsg.clock import iso_utc

RoomType = Literal["group", "user2user"]
RuleKind = Literal["user", "entity"]
ROOM_TYPES: tuple[str, ...] = ("group", "user2user")
RULE_KINDS: tuple[str, ...] = ("user", "entity")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token says the caller is."""

    user: str
    entity: str
    level: int
    exp: int
    claims: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Room:
    id: int
    uuid: str
    name: str
    level_admin: int
    type: str
    entity_owner: str
    max_entity_rules: int
    last_seq: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    # A DM (opened with open_dm): private to its two users, so rank in the owner entity
    # grants nothing in it (permissions.evaluate).
    dm: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "uuid": self.uuid,
            "name": self.name,
            "level_admin": self.level_admin,
            "type": self.type,
            "entity_owner": self.entity_owner,
            "max_entity_rules": self.max_entity_rules,
            "last_seq": self.last_seq,
            "createdAt": iso_utc(self.created_at),
            "updatedAt": iso_utc(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Rule:
    """A permission rule: ``subject`` is a userUUID (kind user) or an entityUUID (kind entity)."""

    room_id: int
    subject: str
    kind: str
    permissions: str
    level: int
    accepted: bool
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "room_id": self.room_id,
            "entity_UUID": self.subject,
            "kind": self.kind,
            "level": self.level,
            "permissions": self.permissions,
            "accepted": self.accepted,
            "createdAt": iso_utc(self.created_at),
            "updatedAt": iso_utc(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class RoomAccess:
    """A room with all its rules: everything a permission decision needs, read in one query."""

    room: Room
    rules: tuple[Rule, ...]


def message_json(
    content: str,
    emitter: str,
    id: int,
    room_id: int,
    seq: int,
    entity: str,
    created_at: str,
    client_id: str | None,
    system: bool,
    edited_at: str | None,
    deleted_at: str | None,
    deleted_by: str | None,
) -> dict[str, Any]:
    """The ``data`` object of a message frame; the original's content/emitter come first.

    A deleted message is a tombstone: ``content`` is empty and ``deleted``, ``deleted_at``,
    ``deleted_by`` say so. An edited one carries ``edited_at``; a system message
    ``system: true``. A plain message has none of these fields, as before. One function for
    ``Message.to_json`` and the conversation list (which writes it from its row, without a
    Message record), so the two cannot drift apart. The stamps come as the frame writes them
    (``iso_utc``).
    """
    out: dict[str, Any] = {
        "content": "" if deleted_at is not None else content,
        "emitter": emitter,
        "id": id,
        "room_id": room_id,
        "seq": seq,
        "entity": entity,
        "created_at": created_at,
        # The original's history rows carried these two; kept so old clients find them.
        "createdAt": created_at,
        "updatedAt": created_at,
    }
    if client_id is not None:
        out["client_id"] = client_id
    if system:
        out["system"] = True
    if edited_at is not None and deleted_at is None:
        out["edited_at"] = edited_at
    if deleted_at is not None:
        out["deleted"] = True
        out["deleted_at"] = deleted_at
        out["deleted_by"] = deleted_by
    return out


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    room_id: int
    seq: int
    emitter: str
    entity: str
    content: str
    created_at: datetime
    client_id: str | None = None
    # A stored room event is a message, or an ``edit``/``delete`` of the message at
    # ``target_seq``; the defaults describe a plain message, so code that knows only messages
    # builds and reads them unchanged.
    kind: str = "message"
    target_seq: int | None = None
    system: bool = False
    edited_at: datetime | None = None
    deleted_at: datetime | None = None
    deleted_by: str | None = None

    @property
    def deleted(self) -> bool:
        """A tombstone: the content stays stored but is never served."""
        return self.deleted_at is not None

    def to_json(self) -> dict[str, Any]:
        """The ``data`` object of a message frame (``message_json`` writes it)."""
        return message_json(
            self.content,
            self.emitter,
            self.id,
            self.room_id,
            self.seq,
            self.entity,
            iso_utc(self.created_at),
            self.client_id,
            self.system,
            None if self.edited_at is None else iso_utc(self.edited_at),
            None if self.deleted_at is None else iso_utc(self.deleted_at),
            self.deleted_by,
        )

    def event_json(self) -> dict[str, Any]:
        """The ``data`` of this stored event's frame: a message's as ``to_json``; an edit's is
        the message frame's fields with the new content, ``edited_at`` and ``seq_edited``
        (``seq`` is the edit's own seq in the room's stream; its content is empty once the
        message is deleted); a delete's names ``seq_deleted``, ``deleted_by``, ``deleted_at``.
        """
        if self.kind == "edit":
            out = {k: v for k, v in self.to_json().items() if k not in ("deleted", "deleted_by")}
            out.pop("deleted_at", None)
            out["content"] = "" if self.deleted else self.content
            out["edited_at"] = iso_utc(self.created_at)
            out["seq_edited"] = self.target_seq
            return out
        if self.kind == "delete":
            return {
                "room_id": self.room_id,
                "seq": self.seq,
                "seq_deleted": self.target_seq,
                "deleted_by": self.emitter,
                "deleted_at": iso_utc(self.created_at),
            }
        return self.to_json()


@dataclass(frozen=True, slots=True)
class ReadMark:
    """How far a user has read a room: every seq up to ``seq`` included."""

    room_id: int
    user: str
    seq: int
    updated_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "seq": self.seq,
            "updated_at": None if self.updated_at is None else iso_utc(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class RoomState:
    """A room as a conversation list shows it to one user.

    ``last_message`` is the latest message (a tombstone if deleted), None in a room without
    messages; ``last_activity_at`` is when its latest event (or, with none, the room) was
    made; ``unread`` counts the messages after ``read_seq`` not sent by the user and not
    deleted.
    """

    room_id: int
    last_seq: int
    last_message: Message | None
    last_activity_at: datetime
    read_seq: int
    unread: int

    def to_json(self) -> dict[str, Any]:
        return {
            "last_seq": self.last_seq,
            "last_message": None if self.last_message is None else self.last_message.to_json(),
            "last_activity_at": iso_utc(self.last_activity_at),
            "read_seq": self.read_seq,
            "unread": self.unread,
        }


def instant(text: str) -> datetime:
    """A stamp of a ``Conversation`` (as the wire writes it, ``iso_utc``: UTC, ISO 8601 with
    milliseconds and a ``Z``) as the aware UTC datetime it names."""
    return datetime.fromisoformat(text)


class Conversation(NamedTuple):
    """A room of a user's conversation list with its state for that user: one row of the
    list's query, field for field (``store.common.room_states_sql`` selects these columns in
    this order), from which ``room``, ``state`` and the list's JSON entry are made.

    A tuple of the row rather than records, and stamps as text: on the 2-core benchmark
    machine, making a ``Room``, a ``Message``, a ``RoomState`` and a frozen pair of them for
    each of 1 000 rooms took 7-16 ms and writing the JSON from them as much again, of which
    ~1.4 us per stamp went to decoding a datetime and formatting it back. This tuple is the
    decoded row itself (``_make``, under a microsecond a room); its stamps are the wire's text
    already (``iso_utc``: UTC, ISO 8601 with milliseconds and a ``Z``, such as
    ``2026-01-02T03:04:05.678Z``), which ``to_json`` puts in the entry as they are and
    ``room``/``state`` read back (to the millisecond, all the wire shows). ``room``, ``state``
    and ``last_message`` build the records when asked (every time: a tuple keeps no cache).
    The fields after ``unread`` describe the latest message and are all None in a room without
    one.
    """

    id: int
    uuid: str
    name: str
    level_admin: int
    type: str
    entity_owner: str
    max_entity_rules: int
    last_seq: int
    created_at: str
    updated_at: str
    deleted_at: str | None
    dm: bool
    last_activity_at: str
    read_seq: int
    unread: int
    message_id: int | None
    message_seq: int | None
    message_emitter: str | None
    message_entity: str | None
    message_content: str | None
    message_created_at: str | None
    message_client_id: str | None
    message_system: bool | None
    message_edited_at: str | None
    message_deleted_at: str | None
    message_deleted_by: str | None

    @property
    def room(self) -> Room:
        return Room(
            self.id,
            self.uuid,
            self.name,
            self.level_admin,
            self.type,
            self.entity_owner,
            self.max_entity_rules,
            self.last_seq,
            instant(self.created_at),
            instant(self.updated_at),
            None if self.deleted_at is None else instant(self.deleted_at),
            self.dm,
        )

    @property
    def last_message(self) -> Message | None:
        """The latest message (a tombstone if deleted), None in a room without messages."""
        if self.message_id is None:
            return None
        # Never None beside a message id: the row's message columns are NULL together.
        assert self.message_seq is not None and self.message_created_at is not None
        assert self.message_content is not None and self.message_emitter is not None
        assert self.message_entity is not None
        return Message(
            id=self.message_id,
            room_id=self.id,
            seq=self.message_seq,
            emitter=self.message_emitter,
            entity=self.message_entity,
            content=self.message_content,
            created_at=instant(self.message_created_at),
            client_id=self.message_client_id,
            system=bool(self.message_system),
            edited_at=None if self.message_edited_at is None else instant(self.message_edited_at),
            deleted_at=None
            if self.message_deleted_at is None
            else instant(self.message_deleted_at),
            deleted_by=self.message_deleted_by,
        )

    @property
    def state(self) -> RoomState:
        return RoomState(
            room_id=self.id,
            last_seq=self.last_seq,
            last_message=self.last_message,
            last_activity_at=instant(self.last_activity_at),
            read_seq=self.read_seq,
            unread=self.unread,
        )

    def to_json(self) -> dict[str, Any]:
        """The list's entry: the same fields, in the same order, as ``{**room.to_json(),
        **state.to_json()}`` (a test holds them byte-identical), written without those
        records, by position, the stamps as they are (a room took ~1.6 us with attribute
        reads and each stamp cut and marked here, ~0.9 us so)."""
        c = self
        last = None
        message_id = c[15]
        if message_id is not None:
            seq, emitter, entity, content, created = c[16], c[17], c[18], c[19], c[20]
            # Never None beside a message id: the row's message columns are NULL together.
            assert seq is not None and emitter is not None and entity is not None
            assert content is not None and created is not None
            last = message_json(
                content, emitter, message_id, c[0], seq, entity, created, c[21], c[22] is True,
                c[23], c[24], c[25],
            )  # fmt: skip
        return {
            "id": c[0],
            "uuid": c[1],
            "name": c[2],
            "level_admin": c[3],
            "type": c[4],
            "entity_owner": c[5],
            "max_entity_rules": c[6],
            "last_seq": c[7],
            "createdAt": c[8],
            "updatedAt": c[9],
            "last_message": last,
            "last_activity_at": c[12],
            "read_seq": c[13],
            "unread": c[14],
        }
