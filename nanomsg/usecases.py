"""The use cases of a conversation, each in one place for every driver.

The composition root builds one instance per process and hands it to the WebSocket driver
and to the HTTP side-port, so a rule (who may edit, what a DM with oneself is, how far a read
mark may go) lives here only, and both doors decide on the same kept rules. They take a
verified ``Principal`` and plain values, talk to the injected ``Store``, and answer with
domain records or one of three errors every driver maps to its own words:

- ``NoSuchRoom``: the room does not exist *or* the caller may not read it (HTTP 404,
  WebSocket ``NOTAUTHORIZED``): the two are indistinguishable on purpose, so room ids cannot
  be probed;
- ``Forbidden``: the caller may read the room but not do this (HTTP 403, ``NOTAUTHORIZED``);
- ``BadArgs``: the request itself is wrong (HTTP 400, ``BADARGS``).

No sockets, no global state: the clock, the batching writer and the hub are injected, so tests
run them against a real store. Storage being down is ``StoreUnavailable`` from
``nanomsg.store.base``, passed through unchanged (HTTP 503, WebSocket ``UNAVAILABLE``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from nanomsg.clock import Clock, utc_datetime
from nanomsg.models import (
    Conversation,
    Message,
    Principal,
    ReadMark,
    Room,
    RoomAccess,
    RoomState,
    Rule,
)
from nanomsg.openapi import LEVEL_ADMIN_MAX
from nanomsg.permissions import Access, evaluate
from nanomsg.store.base import (
    Changed,
    ContentRefused,
    EventRefused,
    MessageChange,
    NewMessage,
    NotAuthor,
    RoomEvent,
    RoomGone,
    Settled,
    Store,
    StoreUnavailable,
    UnknownSeq,
)
from nanomsg.store.common import CONVERSATION_ORDERS
from nanomsg.store.writer import Done, Stored
from nanomsg.together import both

log = logging.getLogger(__name__)
T = TypeVar("T")

# A DM's level_admin: the highest a room may have. It grants nothing there (a DM is private to
# its two users whatever anyone's rank: permissions.evaluate), but the column needs a value.
DM_LEVEL_ADMIN = LEVEL_ADMIN_MAX

# User events (the ``event`` of a ``user_event`` frame's data).
ROOM_ADDED = "room_added"
ROOM_REMOVED = "room_removed"
INVITED = "invited"
READ = "read"
# Internal, never sent: a DM was opened with the user while their rule waits for their entity;
# each of their connections settles it and sends ROOM_ADDED or INVITED (ws_server).
DM_OPENED = "dm_opened"


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


class NoSuchMessage(BadArgs):
    """A seq that names no message of a room the caller may use (unknown, or an edit or
    deletion event): ``BADARGS`` on the WebSocket; on the side-port, where the seq is a path
    segment naming a resource, 404 "no such message" (asked only once the room is readable,
    so it tells nothing about rooms)."""


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
class Posted:
    """A message ``post``-ed: the stored message (the ``data`` of its message frame) and
    whether it is new; False for a ``client_id`` repeat, answered with the message stored the
    first time and delivered to nobody again."""

    message: Message
    created: bool


class MessageWriter(Protocol):
    """What ``post``, ``edit`` and ``delete`` need of the batching writer
    (``store.writer.BatchWriter``)."""

    def enqueue(self, new: RoomEvent, done: Done) -> None: ...


class Publisher(Protocol):
    """What ``post``, ``edit`` and ``delete`` need of the hub (``fanout.Hub``): deliver a
    stored room event to this process's receivers in seq order and relay it to the other
    processes."""

    def publish(self, message: Message) -> None: ...


class ReadReceipts(Protocol):
    """What ``mark_read`` needs of the receipt coalescer (``receipts.Receipts``): the mark a
    user holds now, to tell the room's other subscribers on every process."""

    def read(self, room_id: int, user: str, seq: int) -> None: ...


class UserEvents(Protocol):
    """What the use cases need of the hub (``fanout.Hub``) to tell a user's connections, on
    every process, about the user (``skip``: the connection the change came from, if any)."""

    def user_event(self, user: str, data: dict[str, Any], skip: object | None = None) -> None: ...


class UseCases:
    """The use cases over one store. The composition root (``app.App``) builds one instance
    and hands it to both drivers, the WebSocket server and the HTTP side-port, so a rule and
    the collaborators it relies on (the kept rules above all) are the same whoever asks.

    ``writer`` and ``publisher`` are needed by ``post``, ``edit`` and ``delete``
    only (room events are stored by the batching writer; a test of the other
    use cases may leave them out); without ``receipts``, ``mark_read`` sends no read
    receipts; without ``notify_room_changed``, rules changed by ``settle`` and ``open_dm``
    are announced to nobody (fine only where no rules are kept: no ``kept_rules``).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        writer: MessageWriter | None = None,
        publisher: Publisher | None = None,
        receipts: ReadReceipts | None = None,
        users: UserEvents | None = None,
        kept_rules: Callable[[int], RoomAccess | None] | None = None,
        notify_room_changed: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.writer = writer
        self.publisher = publisher
        self.receipts = receipts
        self.users = users
        # The rules of rooms live on this process, as the hub keeps them (``Hub.cached_access``:
        # current after every change notice, None while the relay cannot hear notices). With
        # them an edit, delete or read mark in a live room costs no rules query, as a send does.
        self.kept_rules = kept_rules
        # Tells every process, this one at once, that a room's rules changed (the relay's
        # ``room_changed``): the hub then forgets the rules it keeps for the room, so the next
        # request, on either driver, is decided on the stored rules.
        self.notify_room_changed = notify_room_changed

    async def room_changed(self, room_id: int) -> None:
        """Announce a rules change this layer made itself (a DM settled or accepted). The
        change is stored already, so a failing notice is logged, not raised."""
        if self.notify_room_changed is None:
            return
        try:
            await self.notify_room_changed(room_id)
        except Exception:
            log.exception("notify_room_changed(%d) failed", room_id)

    def tell(
        self, user: str, event: str, room_id: int, skip: object | None = None, **extra: Any
    ) -> None:
        """Send a user event (nothing without ``users``)."""
        if self.users is not None:
            self.users.user_event(user, {"event": event, "room_id": room_id, **extra}, skip)

    def rules_changed(
        self, room_id: int, before: tuple[Rule, ...], after: tuple[Rule, ...]
    ) -> None:
        """The one place user rules turn into user events: called with a room's rules before
        and after a change (``after`` empty for a room deleted). A user whose user rule now
        grants read and did not gets ``room_added``; one whose did and no longer does (rule
        deleted, ban, room deleted) ``room_removed``; one with a new pending rule (an
        invitation) ``invited``. Entity rules tell nobody: an organisation is not fanned out
        to (clients refresh GET /rooms/all on reconnect)."""
        was, now = _user_rules(before), _user_rules(after)
        for user in sorted(was.keys() | now.keys()):
            old, new = was.get(user), now.get(user)
            if _grants_read(new) and not _grants_read(old):
                self.tell(user, ROOM_ADDED, room_id)
            elif _grants_read(old) and not _grants_read(new):
                self.tell(user, ROOM_REMOVED, room_id)
            elif _pending(new) and not _pending(old):
                self.tell(user, INVITED, room_id)

    async def dm_state(self, principal: Principal, room_id: int) -> dict[str, Any] | None:
        """What a DM opened with the caller is to them now, as a user event's data:
        ``room_added`` when they may read it, ``invited`` while their rule is pending, None
        otherwise (declined, deleted)."""
        found = await self.store.room_access(room_id)
        if found is None:
            return None
        if evaluate(principal, found.room, found.rules).read:
            return {"event": ROOM_ADDED, "room_id": room_id}
        if any(
            _pending(r) and r.subject == principal.user for r in found.rules if r.kind == "user"
        ):
            return {"event": INVITED, "room_id": room_id}
        return None

    def now(self) -> datetime:
        return utc_datetime(self.clock.wall())

    # -- access ------------------------------------------------------------------------------
    async def settle(self, principal: Principal) -> Settled:
        """What the caller's token teaches about their entity, applied to the DMs waiting for
        it: a DM opened with them by a member of their own entity becomes readable, one from
        another entity stays a pending invitation (tenant isolation: nanomsg learns an entity
        only from its members' own tokens). Drivers call it when a caller authenticates.

        A DM made readable here has a rule accepted: its kept rules (on every process where
        it is live, its opener watching it) are announced stale before this returns, so the
        caller's next request in it is decided on the stored rules."""
        settled = await self.store.settle_dms(principal.user, principal.entity, self.now())
        for room_id in settled.added:
            await self.room_changed(room_id)
        return settled

    async def readable(self, principal: Principal, room_id: int) -> Granted:
        """The room if the caller may read it; NoSuchRoom otherwise (absent or not theirs)."""
        kept = self.kept_rules(room_id) if self.kept_rules is not None else None
        found = kept if kept is not None else await self.store.room_access(room_id)
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

    # -- posting -----------------------------------------------------------------------------
    async def post(
        self,
        principal: Principal,
        room_id: int,
        content: str,
        client_id: str | None = None,
        *,
        system: bool = False,
    ) -> Posted:
        """Store a message in a room the caller may write and deliver it like a WebSocket send.

        ``content`` and ``client_id`` come checked by the driver's decoder (``codec``'s rules:
        not empty, at most ``--max-content`` code points, no U+0000, no lone surrogate). The
        message goes through the batching writer, so it takes the room's next seq among the
        WebSocket sends, and ``client_id`` is idempotent per (room, user) whichever driver sent
        it first. Answers once it is stored; a new message is published (this process's
        receivers, then the relay) at the moment its batch commits, before this returns.

        NoSuchRoom unless readable; Forbidden without ``w``, or with ``system`` and without
        room admin rights; BadArgs if storage refuses the content; StoreUnavailable when
        storage is down (nothing stored, nothing delivered).

        The WebSocket driver will call the two halves instead, keeping its pipeline and the
        rights it holds per subscription (no storage read per send): ``message_to_post`` (or
        ``new_message``) with those rights when the command arrives, mapping Forbidden to
        ``NOTAUTHORIZED``; the writer's ``enqueue`` itself; then ``stored`` with the outcome
        when its turn comes in the pipeline, which publishes a new message (the echo reaches
        a subscribed sender through the hub; a sender not subscribed to the room needs the
        frame sent to it directly, as does a ``Posted`` that was not created) and raises the
        refusals it maps to ``NOTAUTHORIZED`` with ``room_id``, ``BADARGS`` and
        ``UNAVAILABLE``. A ``system`` flag on the WebSocket ``message`` command would need
        only the codec to read it.
        """
        granted = await self.readable(principal, room_id)
        new = self.new_message(principal, room_id, granted.rights, content, client_id, system)
        return await self._through_writer(new, self.stored)

    def new_message(
        self,
        principal: Principal,
        room_id: int,
        rights: Access,
        content: str,
        client_id: str | None,
        system: bool,
    ) -> NewMessage:
        """``message_to_post`` stamped with this instance's clock."""
        return message_to_post(principal, room_id, rights, content, client_id, system, self.now())

    def stored(self, outcome: Stored | Exception) -> Posted:
        """The writer's outcome for a posted message: a new message is published; a refusal
        becomes the driver-neutral error (NoSuchRoom for a room deleted meanwhile, BadArgs for
        content storage refused, StoreUnavailable for anything else)."""
        if isinstance(outcome, tuple):
            message, created = outcome
            if created:
                if self.publisher is None:
                    raise RuntimeError("UseCases.post needs a writer and a publisher")
                self.publisher.publish(message)
            return Posted(message=message, created=created)
        if isinstance(outcome, RoomGone):
            raise NoSuchRoom()
        if isinstance(outcome, ContentRefused):
            raise BadArgs("content refused by storage")
        if isinstance(outcome, StoreUnavailable):
            raise StoreUnavailable(str(outcome))  # a fresh one: a batch shares its failure
        log.error("storing a posted message failed unexpectedly", exc_info=_error(outcome))
        raise StoreUnavailable(f"unexpected storage error: {outcome!r}")

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
        if not created:
            # Asking for an existing DM may have accepted the caller's pending rule in it:
            # kept rules of the room must not outlive that (a rare call; one notice).
            await self.room_changed(room.id)
        found = await self.store.room_access(room.id)
        if found is None:  # deleted in between
            raise NoSuchRoom()
        invited = any(
            rule.kind == "user" and rule.subject == other and not rule.accepted
            for rule in found.rules
        )
        if created and invited:
            # Their rule waits for their entity: each of their connections settles it and
            # tells its client room_added (same entity) or invited (another).
            self.tell(other, DM_OPENED, found.room.id)
        return DmOpened(room=found.room, created=created, invited=invited)

    # -- read marks --------------------------------------------------------------------------
    async def mark_read(
        self, principal: Principal, room_id: int, seq: int, *, origin: object | None = None
    ) -> int:
        """Move the caller's mark in a room they may read to ``seq`` (never backwards, clamped
        to the room's latest seq); the mark now held.

        The room's other subscribers get a read receipt (through ``receipts``, which coalesces
        them) unless the mark did not move forward: a ``seq`` below the mark held, or a room
        with nothing to read yet, tells nobody anything. The user's other connections (all
        but ``origin``, the connection that read) get the ``read`` user event, on the same
        condition."""
        _check_seq(seq)
        await self.readable(principal, room_id)
        try:
            held = await self.store.set_read_mark(room_id, principal.user, seq, self.now())
        except RoomGone:
            raise NoSuchRoom() from None
        if 0 < held <= seq:
            if self.receipts is not None:
                self.receipts.read(room_id, principal.user, held)
            self.tell(principal.user, READ, room_id, origin, seq=held)
        return held

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
        activity; one store query.

        The settle of the caller's waiting DMs runs side by side with the list rather than
        before it (its round trip was ~0.6 ms of a list request's latency): it almost never
        changes what the caller may read, and when it does (a DM became readable) the list is
        read again after it, so the answer always includes the DMs it settled."""
        if order not in CONVERSATION_ORDERS:
            raise BadArgs(f"order must be one of: {', '.join(CONVERSATION_ORDERS)}")
        user, entity, level = principal.user, principal.entity, principal.level
        settled, found = await both(
            self.settle(principal),
            self.store.conversations(user, entity, level, order, limit, offset),
        )
        if settled.added:
            return await self.store.conversations(user, entity, level, order, limit, offset)
        return found

    async def conversation_entries(
        self, principal: Principal, order: str, limit: int, offset: int
    ) -> list[Any]:
        """``conversations`` as the list's entries, ready for ``orjson.dumps`` (see
        ``Store.entries_json``)."""
        found = await self.conversations(principal, order, limit, offset)
        return await self.store.entries_json(principal.user, found)

    async def room_states(self, principal: Principal, room_ids: list[int]) -> dict[int, RoomState]:
        """The state of each given room the caller may read (others are left out)."""
        return await self.store.room_states(
            principal.user, principal.entity, principal.level, room_ids
        )

    # -- edit and delete ---------------------------------------------------------------------
    async def edit(self, principal: Principal, room_id: int, seq: int, content: str) -> Changed:
        """Replace the content of the caller's own message ``seq`` in a room they may write.

        Stored through the batching writer, as a send: it takes the room's next seq among the
        sends, edits and deletes of every driver, and is published (this process's receivers,
        then the relay) when its batch commits, before this returns. Forbidden for another's
        message or a deleted one; BadArgs for a seq that names no message (unknown, or an edit
        or delete event); NoSuchRoom unless readable; StoreUnavailable when storage is down.
        """
        change = await self.new_change(principal, room_id, seq, content)
        return await self._through_writer(change, self.changed)

    async def delete(self, principal: Principal, room_id: int, seq: int) -> Changed:
        """Soft-delete message ``seq``: the caller's own in a room they may write, or anyone's
        for a room admin (``a``, or an owner-entity admin). Stored and published as ``edit``."""
        change = await self.new_change(principal, room_id, seq, None)
        return await self._through_writer(change, self.changed)

    async def new_change(
        self, principal: Principal, room_id: int, seq: int, content: str | None
    ) -> MessageChange:
        """The edit (``content`` given) or delete to hand to the writer, decided on the room's
        rules (kept ones when the room is live here, else read): ``change_to_store``."""
        _check_change(seq, content)
        granted = await self.readable(principal, room_id)
        return self.change_in(principal, room_id, granted.rights, seq, content)

    def kept_change(
        self, principal: Principal, room_id: int, seq: int, content: str | None
    ) -> MessageChange | None:
        """``new_change`` decided now on the rules kept for a room live on this process
        (the WebSocket driver: no task, no storage read, as for a send); None when the
        room's rules are not kept here, for ``new_change`` to read them."""
        _check_change(seq, content)
        kept = self.kept_rules(room_id) if self.kept_rules is not None else None
        if kept is None:
            return None
        rights = evaluate(principal, kept.room, kept.rules)
        if not rights.read:
            raise NoSuchRoom()
        return self.change_in(principal, room_id, rights, seq, content)

    def change_in(
        self,
        principal: Principal,
        room_id: int,
        rights: Access,
        seq: int,
        content: str | None,
    ) -> MessageChange:
        """``change_to_store`` with rights the driver already holds (a WebSocket
        subscription's), stamped with this instance's clock."""
        return change_to_store(principal, room_id, rights, seq, content, self.now())

    async def _through_writer(
        self, event: RoomEvent, settle: Callable[[Stored | Exception], T]
    ) -> T:
        """Hand ``event`` to the batching writer and answer what ``settle`` (``stored`` for a
        message, ``changed`` for an edit or delete) makes of its outcome. ``settle`` runs in
        the writer's task when the batch commits, so the publish happens there, in commit
        order, even if the caller has stopped waiting (an HTTP client gone)."""
        if self.writer is None:
            raise RuntimeError("posting, editing and deleting need a writer and a publisher")
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def done(outcome: Stored | Exception) -> None:
            try:
                settled = settle(outcome)
            except Exception as exc:
                if not answer.done():
                    answer.set_exception(exc)
                return
            if not answer.done():
                answer.set_result(settled)

        self.writer.enqueue(event, done)
        return await answer

    def changed(self, outcome: Stored | Exception) -> Changed:
        """The writer's outcome for an edit or delete: a stored one is published; a refusal
        becomes the driver-neutral error (``change_outcome``)."""
        changed = change_outcome(outcome)
        if self.publisher is None:
            raise RuntimeError("UseCases.edit and delete need a writer and a publisher")
        self.publisher.publish(changed.event)
        return changed


def change_to_store(
    principal: Principal,
    room_id: int,
    rights: Access,
    seq: int,
    content: str | None,
    now: datetime,
) -> MessageChange:
    """The rule for editing (``content`` given) and deleting, given the caller's rights in
    the room (``permissions.evaluate``): ``w`` is needed (Forbidden otherwise); a delete of
    another's message needs room admin rights (``a``, or an owner-entity admin), an edit is
    the author's alone, which the store checks against the message (NotAuthor). The change to
    hand to the writer. Pure, like ``message_to_post``."""
    _check_change(seq, content)
    if not rights.write:
        raise Forbidden("write permission required")
    return MessageChange(
        room_id=room_id,
        seq=seq,
        actor=principal.user,
        now=now,
        content=content,
        admin=content is None and rights.admin,
        entity=principal.entity,
    )


def change_outcome(outcome: Stored | Exception) -> Changed:
    """The writer's outcome for an edit or delete, ``Changed`` or the driver-neutral error
    raised: the store's refusals as ``_refused`` says, BadArgs for content storage refused,
    StoreUnavailable for anything else."""
    if isinstance(outcome, Changed):
        return outcome
    if isinstance(outcome, EventRefused | RoomGone):
        raise _refused(outcome)
    if isinstance(outcome, ContentRefused):
        raise BadArgs("content refused by storage")
    if isinstance(outcome, StoreUnavailable):
        raise StoreUnavailable(str(outcome))  # a fresh one: a batch shares its failure
    log.error("storing an edit or delete failed unexpectedly", exc_info=_error(outcome))
    raise StoreUnavailable(f"unexpected storage error: {outcome!r}")


def message_to_post(
    principal: Principal,
    room_id: int,
    rights: Access,
    content: str,
    client_id: str | None,
    system: bool,
    now: datetime,
) -> NewMessage:
    """The rule for posting, given the caller's rights in the room (``permissions.evaluate``):
    ``w`` is needed, and a system message (``system``) needs room admin rights (``a``, or an
    owner-entity admin); Forbidden otherwise. The message to hand to the writer.

    A pure function, so the WebSocket session, which holds each subscription's rights and
    its own clock, can apply the same rule without a storage read per send."""
    if not rights.write:
        raise Forbidden("write permission required")
    if system and not rights.admin:
        raise Forbidden("system messages need admin rights in the room")
    return NewMessage(
        room_id=room_id,
        emitter=principal.user,
        entity=principal.entity,
        content=content,
        client_id=client_id,
        now=now,
        system=system,
    )


def _user_rules(rules: tuple[Rule, ...]) -> dict[str, Rule]:
    return {rule.subject: rule for rule in rules if rule.kind == "user"}


def _grants_read(rule: Rule | None) -> bool:
    """Whether a user rule grants its user read access (accepted, ``r``, no ban)."""
    return (
        rule is not None
        and rule.accepted
        and "r" in rule.permissions
        and "b" not in rule.permissions
    )


def _pending(rule: Rule | None) -> bool:
    """Whether a user rule is an invitation waiting for its user (not a ban)."""
    return rule is not None and not rule.accepted and "b" not in rule.permissions


def _check_seq(seq: int) -> None:
    if seq < 0:
        raise BadArgs("seq must be 0 or more")


def _error(outcome: Stored | Exception) -> Exception | None:
    """The exception to log with an unexpected outcome (a record of the wrong kind has none)."""
    return outcome if isinstance(outcome, Exception) else None


def _check_change(seq: int, content: str | None) -> None:
    """BadArgs for an edit or delete wrong whoever asks: a negative seq, an empty edit."""
    _check_seq(seq)
    if content is not None and not content.strip():
        raise BadArgs("content must not be empty")


def _refused(exc: Exception) -> UseCaseError:
    """The driver-neutral error for a store refusal of an edit or delete."""
    if isinstance(exc, RoomGone):
        return NoSuchRoom()
    if isinstance(exc, UnknownSeq):
        return NoSuchMessage(f"no message has seq {exc.seq}")
    if isinstance(exc, NotAuthor):
        return Forbidden("not the author of this message")
    return Forbidden("the message was deleted")
