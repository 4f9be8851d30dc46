"""The use cases of a conversation, each in one place for every driver.

The HTTP side-port calls these functions now and the WebSocket driver will call the same ones,
so a rule (who may edit, what a DM with oneself is, how far a read mark may go) lives here
only. They take a verified ``Principal`` and plain values, talk to the injected ``Store``, and
answer with domain records or one of three errors every driver maps to its own words:

- ``NoSuchRoom``: the room does not exist *or* the caller may not read it (HTTP 404,
  WebSocket ``NOTAUTHORIZED``): the two are indistinguishable on purpose, so room ids cannot
  be probed;
- ``Forbidden``: the caller may read the room but not do this (HTTP 403, ``NOTAUTHORIZED``);
- ``BadArgs``: the request itself is wrong (HTTP 400, ``BADARGS``).

No sockets, no global state: the clock is injected, so tests run them against a real store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nanomsg.clock import Clock, utc_datetime
from nanomsg.models import Message, Principal, ReadMark, Room, RoomAccess, RoomState
from nanomsg.openapi import LEVEL_ADMIN_MAX
from nanomsg.permissions import Access, evaluate
from nanomsg.store.base import (
    AlreadyDeleted,
    Conversation,
    NotAuthor,
    RoomGone,
    Settled,
    Store,
    UnknownSeq,
)
from nanomsg.store.common import CONVERSATION_ORDERS

# A DM's level_admin: the highest a room may have. It grants nothing there (a DM is private to
# its two users whatever anyone's rank: permissions.evaluate), but the column needs a value.
DM_LEVEL_ADMIN = LEVEL_ADMIN_MAX


class UseCaseError(Exception):
    """A refusal; ``reason`` is short and safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoSuchRoom(UseCaseError):
    """No such room, or one the caller may not read: the same answer for both."""

    def __init__(self) -> None:
        super().__init__("no such room")


class Forbidden(UseCaseError):
    """The caller may read the room but lacks the right for this."""


class BadArgs(UseCaseError):
    """The arguments are wrong whoever asks."""


@dataclass(frozen=True, slots=True)
class Granted:
    """A room the caller may read, its rules, and what the caller may do in it."""

    access: RoomAccess
    rights: Access

    @property
    def room(self) -> Room:
        return self.access.room


@dataclass(frozen=True, slots=True)
class DmOpened:
    """The DM of the caller and ``other``: ``created`` now or found; ``invited`` while the
    other side's rule is still pending (not yet seen, or another entity not yet accepted)."""

    room: Room
    created: bool
    invited: bool


@dataclass(frozen=True, slots=True)
class Changed:
    """An edit or delete stored: the ``event`` (its own seq in the room) and the message's
    state after it (edited content, or a tombstone)."""

    event: Message
    message: Message


class UseCases:
    """The use cases over one store; drivers hold one instance each."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def now(self) -> datetime:
        return utc_datetime(self.clock.wall())

    # -- access ------------------------------------------------------------------------------
    async def settle(self, principal: Principal) -> Settled:
        """What the caller's token teaches about their entity, applied to the DMs waiting for
        it: a DM opened with them by a member of their own entity becomes readable, one from
        another entity stays a pending invitation (tenant isolation: nanomsg learns an entity
        only from its members' own tokens). Drivers call it when a caller authenticates."""
        return await self.store.settle_dms(principal.user, principal.entity, self.now())

    async def readable(self, principal: Principal, room_id: int) -> Granted:
        """The room if the caller may read it; NoSuchRoom otherwise (absent or not theirs)."""
        found = await self.store.room_access(room_id)
        if found is None:
            raise NoSuchRoom()
        rights = evaluate(principal, found.room, found.rules)
        if not rights.read:
            raise NoSuchRoom()
        return Granted(access=found, rights=rights)

    async def writable(self, principal: Principal, room_id: int) -> Granted:
        """The room if the caller may write it: NoSuchRoom unless readable, else Forbidden."""
        granted = await self.readable(principal, room_id)
        if not granted.rights.write:
            raise Forbidden("write permission required")
        return granted

    # -- DMs ---------------------------------------------------------------------------------
    async def open_dm(self, principal: Principal, other: str) -> DmOpened:
        """The ``user2user`` room of the caller and ``other`` (a canonical lower-case UUID).

        The same room whoever asks first; the caller's rule is accepted (asking for the DM
        accepts a pending invitation to it), the other side's waits for their entity: see
        ``settle``. A DM with oneself is BadArgs.
        """
        if other == principal.user:
            raise BadArgs("a DM needs another user than the caller")
        await self.settle(principal)
        try:
            room, created = await self.store.open_dm(
                principal.user, principal.entity, other, DM_LEVEL_ADMIN, self.now()
            )
        except RoomGone:
            raise NoSuchRoom() from None
        found = await self.store.room_access(room.id)
        if found is None:  # deleted in between
            raise NoSuchRoom()
        invited = any(
            rule.kind == "user" and rule.subject == other and not rule.accepted
            for rule in found.rules
        )
        return DmOpened(room=found.room, created=created, invited=invited)

    # -- read marks --------------------------------------------------------------------------
    async def mark_read(self, principal: Principal, room_id: int, seq: int) -> int:
        """Move the caller's mark in a room they may read to ``seq`` (never backwards, clamped
        to the room's latest seq); the mark now held."""
        _check_seq(seq)
        await self.readable(principal, room_id)
        try:
            return await self.store.set_read_mark(room_id, principal.user, seq, self.now())
        except RoomGone:
            raise NoSuchRoom() from None

    async def reads(self, principal: Principal, room_id: int) -> list[ReadMark]:
        """The read marks of a room the caller may read: every user who holds a mark, and
        every user named by an accepted, unbanned user rule (0 until they read), by user."""
        granted = await self.readable(principal, room_id)
        marks = {mark.user: mark for mark in await self.store.read_marks(room_id)}
        for rule in granted.access.rules:
            if rule.kind == "user" and rule.accepted and "b" not in rule.permissions:
                marks.setdefault(rule.subject, ReadMark(room_id, rule.subject, 0, None))
        return [marks[user] for user in sorted(marks)]

    # -- the conversation list ---------------------------------------------------------------
    async def conversations(
        self, principal: Principal, order: str, limit: int, offset: int
    ) -> list[Conversation]:
        """The rooms the caller may read, each with its state for them, by id or by latest
        activity; one store query."""
        if order not in CONVERSATION_ORDERS:
            raise BadArgs(f"order must be one of: {', '.join(CONVERSATION_ORDERS)}")
        await self.settle(principal)
        return await self.store.conversations(
            principal.user, principal.entity, principal.level, order, limit, offset
        )

    async def room_states(self, principal: Principal, room_ids: list[int]) -> dict[int, RoomState]:
        """The state of each given room the caller may read (others are left out)."""
        return await self.store.room_states(
            principal.user, principal.entity, principal.level, room_ids
        )

    # -- edit and delete ---------------------------------------------------------------------
    async def edit(self, principal: Principal, room_id: int, seq: int, content: str) -> Changed:
        """Replace the content of the caller's own message ``seq`` in a room they may write.

        Forbidden for another's message or a deleted one; BadArgs for a seq that names no
        message (unknown, or an edit or delete event).
        """
        _check_seq(seq)
        if not content.strip():
            raise BadArgs("content must not be empty")
        await self.writable(principal, room_id)
        try:
            event, message = await self.store.edit_message(
                room_id, seq, principal.user, content, self.now()
            )
        except (NotAuthor, AlreadyDeleted, UnknownSeq, RoomGone) as exc:
            raise _refused(exc) from None
        return Changed(event=event, message=message)

    async def delete(self, principal: Principal, room_id: int, seq: int) -> Changed:
        """Soft-delete message ``seq``: the caller's own in a room they may write, or anyone's
        for a room admin (``a``, or an owner-entity admin)."""
        _check_seq(seq)
        granted = await self.writable(principal, room_id)
        try:
            event, message = await self.store.delete_message(
                room_id, seq, principal.user, granted.rights.admin, self.now(), principal.entity
            )
        except (NotAuthor, AlreadyDeleted, UnknownSeq, RoomGone) as exc:
            raise _refused(exc) from None
        return Changed(event=event, message=message)


def _check_seq(seq: int) -> None:
    if seq < 0:
        raise BadArgs("seq must be 0 or more")


def _refused(exc: Exception) -> UseCaseError:
    """The driver-neutral error for a store refusal of an edit or delete."""
    if isinstance(exc, RoomGone):
        return NoSuchRoom()
    if isinstance(exc, UnknownSeq):
        return BadArgs(f"no message has seq {exc.seq}")
    if isinstance(exc, NotAuthor):
        return Forbidden("not the author of this message")
    return Forbidden("the message was deleted")
