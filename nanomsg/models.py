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

    def to_json(self) -> dict[str, Any]:
        """The ``data`` object of a message frame; the original's content/emitter come first."""
        stamp = iso_utc(self.created_at)
        out: dict[str, Any] = {
            "content": self.content,
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
        return out
