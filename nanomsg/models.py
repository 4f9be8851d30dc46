"""Domain records shared by the store, the session, permissions and the HTTP API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

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
        """The ``data`` object of a message frame; the original's content/emitter come first.

        A deleted message is a tombstone: ``content`` is empty and ``deleted``,
        ``deleted_at``, ``deleted_by`` say so. An edited one carries ``edited_at``; a system
        message ``system: true``. A plain message has none of these fields, as before.
        """
        stamp = iso_utc(self.created_at)
        out: dict[str, Any] = {
            "content": "" if self.deleted else self.content,
            "emitter": self.emitter,
            "id": self.id,
            "room_id": self.room_id,
            "seq": self.seq,
            "entity": self.entity,
            "created_at": stamp,
            # The original's history rows carried these two; kept so old clients find them.
            "createdAt": stamp,
            "updatedAt": stamp,
        }
        if self.client_id is not None:
            out["client_id"] = self.client_id
        if self.system:
            out["system"] = True
        if self.edited_at is not None and not self.deleted:
            out["edited_at"] = iso_utc(self.edited_at)
        if self.deleted_at is not None:
            out["deleted"] = True
            out["deleted_at"] = iso_utc(self.deleted_at)
            out["deleted_by"] = self.deleted_by
        return out

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
