"""The storage contract every backend implements, and its errors.

Both backends must behave identically; the integration suite runs the same tests on each.
Timestamps are given by the caller (from the injected clock) rather than taken from the database,
so both backends produce the same values and tests can control them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from nanomsg.models import (
    Conversation,
    Message,
    ReadMark,
    Room,
    RoomAccess,
    RoomState,
    Rule,
)


class StoreUnavailable(Exception):
    """The database cannot be reached or failed; the operation had no effect."""


class ContentRefused(Exception):
    """The database refused a write for what it holds, not for being unavailable (PostgreSQL's
    data errors, such as U+0000 in text); nothing of the write was stored. Trying the same
    write again fails the same way; the other messages of a batch can be stored without it."""


class RoomGone(Exception):
    """The room does not exist or was deleted."""


class TooManyRules(Exception):
    """Adding a rule would pass the room's ``max_entity_rules``."""


class LimitBelowRules(Exception):
    """A new ``max_entity_rules`` would be below the number of rules the room already holds.

    ``rules`` is that number, so the caller can say how low the limit may go.
    """

    def __init__(self, room_id: int, rules: int, requested: int) -> None:
        super().__init__(f"room {room_id} holds {rules} rules; max_entity_rules {requested}")
        self.rules = rules
        self.requested = requested


class EventRefused(Exception):
    """An edit or delete the store refused; nothing was stored. ``seq`` is the target."""

    def __init__(self, room_id: int, seq: int) -> None:
        super().__init__(f"room {room_id} seq {seq}: {type(self).__name__}")
        self.room_id = room_id
        self.seq = seq


class UnknownSeq(EventRefused):
    """No message has this seq in the room (or the seq is an edit or delete event)."""


class NotAuthor(EventRefused):
    """The message is another user's (and, for a delete, the caller is no room admin)."""


class AlreadyDeleted(EventRefused):
    """The message was deleted: it can be neither edited nor deleted again."""


@dataclass(frozen=True, slots=True)
class Settled:
    """The DMs in which a user's entity was just learnt: rooms now readable (same entity as
    the room's owner) and rooms left as pending invitations (another entity)."""

    added: tuple[int, ...] = ()
    invited: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NewRoom:
    name: str
    level_admin: int
    type: str
    entity_owner: str
    max_entity_rules: int
    creator_user: str
    creator_level: int
    now: datetime
    # Level of the owner entity's rule in a group room: members below it do not see the room.
    entity_level: int = 100


@dataclass(frozen=True, slots=True)
class RoomChanges:
    """What ``update_room`` changes; None leaves a field as it is."""

    name: str | None = None
    level_admin: int | None = None
    max_entity_rules: int | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    room_id: int
    emitter: str
    entity: str
    content: str
    client_id: str | None
    now: datetime
    # A message a partner backend posted ("a document was attached"); its frames say so.
    system: bool = False


@dataclass(frozen=True, slots=True)
class MessageChange:
    """An edit (``content`` given) or a delete (``content`` None) of the message ``seq`` of
    ``room_id`` by ``actor``: a room event the batching writer stores in turn with the sends.

    The store checks the target (a message, not deleted, by ``actor`` unless ``admin``: the
    caller's rights in the room decided ``admin`` and whether it may write at all). An edit
    event carries the message's entity; a delete event the deleter's ``entity``."""

    room_id: int
    seq: int
    actor: str
    now: datetime
    content: str | None = None
    admin: bool = False
    entity: str = ""

    @property
    def kind(self) -> str:
        """The stored event's kind: ``edit`` or ``delete``."""
        return "delete" if self.content is None else "edit"


# The room events the batching writer stores, in one queue per shard and one transaction per
# batch: each takes the room's next seq in submission order.
RoomEvent = NewMessage | MessageChange


@dataclass(frozen=True, slots=True)
class Changed:
    """An edit or delete stored: the ``event`` (its own seq in the room) and the message's
    state after it (edited content, or a tombstone)."""

    event: Message
    message: Message


# The outcome of one room event of a batch: a message stored (with False for a client_id
# already stored), a change stored, or the refusal of that event alone.
EventOutcome = tuple[Message, bool] | Changed | RoomGone | EventRefused


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """Which stored messages of a room to read.

    ``before``/``after`` are exclusive seq bounds; ``date_from``/``date_to`` are inclusive
    instants. ``newest`` picks the latest ``limit`` matches (still returned oldest first);
    otherwise the oldest ``limit`` matches are returned.
    """

    room_id: int
    limit: int
    before: int | None = None
    after: int | None = None
    date_from: datetime | None = None
    date_to: datetime | None = None
    newest: bool = True


class Store(Protocol):
    """Rooms, rules and messages. Every method raises StoreUnavailable when the database is down."""

    async def open(self) -> None:
        """Connect and apply pending migrations (under a lock: nodes may start together)."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the database answers a trivial query now."""

    # -- rooms -------------------------------------------------------------------------------
    async def create_room(self, new: NewRoom) -> Room:
        """Insert the room and its creator rules in one transaction.

        Rules created: an accepted ``user`` rule ``rwa`` for ``creator_user`` at
        ``creator_level``; for ``group`` rooms also an accepted ``entity`` rule ``rw`` at level
        ``entity_level`` (100 unless asked) for ``entity_owner``.
        """

    async def update_room(self, room_id: int, changes: RoomChanges, now: datetime) -> Room:
        """Apply ``changes`` to a live room (stamping updated_at) and return the room.

        Raises RoomGone when the room is absent or deleted, and LimitBelowRules when the new
        ``max_entity_rules`` is below the number of rules the room holds; the count and the
        update are one transaction, serialised with ``put_rule``.
        """

    async def room_access(self, room_id: int) -> RoomAccess | None:
        """The live (not deleted) room with all its rules, in one query; None if absent.

        Rules come ordered by kind, then subject in byte order, on both backends (the members
        listing pages them in that order).
        """

    async def room_heads(self, room_ids: Sequence[int]) -> dict[int, int]:
        """The current ``last_seq`` of each given room that exists, in one query (the hubs'
        periodic check for messages whose relay publish was lost)."""

    async def delete_room(self, room_id: int, now: datetime) -> bool:
        """Soft-delete (history kept); False if it was absent or already deleted."""

    async def rooms_visible_to(
        self, user: str, entity: str, level: int, limit: int, offset: int
    ) -> list[Room]:
        """The live rooms the caller may read per ``permissions.evaluate``, ordered by id.

        A room is listed when the caller is an owner-entity admin (``entity`` is the room's
        entity_owner and ``level`` >= its level_admin; bans do not apply), or else when the
        union of the caller's applying *accepted* rules (the user rule for ``user``; entity
        rules for ``entity`` with rule.level <= ``level``) holds ``r`` or ``a`` and no ``b``.
        Filtering, ordering and paging all happen in the database, so pages are full.
        """

    # -- rules -------------------------------------------------------------------------------
    async def rules_of(
        self, user: str, entity: str, level: int, accepted: bool | None, limit: int, offset: int
    ) -> list[tuple[Rule, Room]]:
        """The caller's rules in live rooms, each with its room, ordered by room id then kind.

        The caller's rules are the user rules for ``user`` and the entity rules for ``entity``
        with rule.level <= ``level`` (an entity rule above the caller's level is not theirs);
        ``accepted`` (when not None) filters on acceptance. Filtering and paging happen in the
        database, so pages are exact.
        """

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
        """Create or update the rule (room_id, kind, subject); True when created.

        Raises TooManyRules when creating would pass the room's max_entity_rules, RoomGone when
        the room is absent or deleted. The count check and insert are one transaction.
        """

    async def delete_rule(self, room_id: int, subject: str, kind: str | None) -> bool:
        """Delete the rule(s) for subject (of ``kind``, or of any kind); False if none."""

    async def set_accepted(
        self, room_id: int, subject: str, kind: str, accepted: bool, now: datetime
    ) -> Rule | None:
        """Accept or decline one rule; None if there is no such rule in a live room."""

    # -- messages ----------------------------------------------------------------------------
    async def append_message(self, new: NewMessage) -> tuple[Message, bool]:
        """Store a message with the room's next seq (no gaps) in one transaction.

        With a ``client_id`` already stored for the same (room, emitter), returns that message
        and False and stores nothing. Raises RoomGone for an absent or deleted room.
        """

    async def append_batch(
        self, batch: Sequence[NewMessage]
    ) -> list[tuple[Message, bool] | RoomGone]:
        """Store a batch of messages in ONE transaction (PostgreSQL: one statement, one round trip).

        Returns one entry per input, in input order: (message, created) like append_message, or
        a RoomGone instance for an input whose room is absent or deleted (those store nothing,
        the others still do). Seqs are assigned per room in batch order, gapless, in the same
        transaction. A client_id already stored for (room, emitter) returns that stored message
        with created=False and stores nothing; a client_id repeated inside the batch is stored
        once (the first occurrence) and the later ones return that message with created=False.
        Raises StoreUnavailable when the batch failed as a whole, ContentRefused when the
        database refused what one of its messages holds: either way nothing of it is stored.
        """

    async def append_events(self, batch: Sequence[RoomEvent]) -> list[EventOutcome]:
        """Store a batch of room events (messages, edits, deletes) in ONE transaction.

        Each room's events take its next seqs in batch order, gapless; a refused event takes
        none. One entry per input, in input order: for a message as ``append_batch``; for a
        change ``Changed`` (the event and the message after it), or the refusal of that input
        alone (RoomGone, UnknownSeq, NotAuthor, AlreadyDeleted) judged on the state the
        inputs before it left: a change may target a message stored earlier in the same
        batch, and a second delete of one message in a batch is AlreadyDeleted. Raises
        StoreUnavailable or ContentRefused for the batch as a whole, as ``append_batch``.
        """

    async def history(self, query: HistoryQuery) -> list[Message]:
        """Messages of the room matching the query, oldest first (deleted rooms included).

        Only messages (deleted ones as tombstones, edited ones with their latest content):
        the edit and delete events between them are left out, so ``limit`` counts messages.
        """

    async def events(self, query: HistoryQuery) -> list[Message]:
        """Every stored event of the room matching the query, oldest first: messages (as
        ``history``), edits (content hidden once their message is deleted) and deletes."""

    async def edit_message(
        self, room_id: int, seq: int, author: str, content: str, now: datetime
    ) -> tuple[Message, Message]:
        """Store an edit of the message ``seq`` as the room's next event; (edit, message).

        A batch of one ``MessageChange`` (``append_events``): the edit row takes the next
        seq, the message gets the new content and ``edited_at``. Raises RoomGone,
        UnknownSeq, AlreadyDeleted, or NotAuthor when ``author`` is not the emitter.
        """

    async def delete_message(
        self, room_id: int, seq: int, by: str, is_admin: bool, now: datetime, entity: str = ""
    ) -> tuple[Message, Message]:
        """Soft-delete the message ``seq`` as the room's next event; (delete, tombstone).

        A batch of one ``MessageChange`` (``append_events``). The message keeps its content
        in storage and gets ``deleted_at``/``deleted_by``. Raises RoomGone, UnknownSeq,
        AlreadyDeleted, or NotAuthor when ``by`` is neither the emitter nor ``is_admin``.
        """

    # -- read marks --------------------------------------------------------------------------
    async def set_read_mark(self, room_id: int, user: str, seq: int, now: datetime) -> int:
        """Move the user's mark to ``seq`` (clamped to the room's last_seq), never backwards;
        the mark held afterwards. Raises RoomGone for an absent or deleted room."""

    async def read_marks(self, room_id: int) -> list[ReadMark]:
        """Every stored mark of the room, by user."""

    # -- direct messages and the conversation list -------------------------------------------
    async def open_dm(
        self, user: str, entity: str, other: str, level_admin: int, now: datetime
    ) -> tuple[Room, bool]:
        """The ``user2user`` room of ``user`` and ``other``; True when created now.

        Created once per pair (a unique ``dm_key``; concurrent calls from both sides get the
        same room), owned by ``entity``, with an accepted ``rw`` rule for ``user`` and a
        pending one for ``other`` (settled by ``settle_dms`` once their entity is known), no
        entity rule. When the room exists and ``user`` is its invited side, their rule is
        accepted (asking for the DM is accepting it). Raises RoomGone if it was deleted.
        """

    async def settle_dms(self, user: str, entity: str, now: datetime) -> Settled:
        """Decide the DMs waiting to learn ``user``'s entity: accept their rule where ``entity``
        owns the room, leave it pending elsewhere. One indexed no-op when none waits."""

    async def conversations(
        self, user: str, entity: str, level: int, order: str, limit: int, offset: int
    ) -> list[Conversation]:
        """The rooms ``rooms_visible_to`` lists, each with its state for ``user``, in ONE
        query; ``order`` is ``id`` or ``activity`` (latest activity first)."""

    async def entries_json(self, user: str, conversations: Sequence[Conversation]) -> list[Any]:
        """The list entries of ``conversations`` (as ``conversations`` answered them to
        ``user``) ready for ``orjson.dumps``: each ``Conversation.to_json``, or the JSON the
        store kept for it (``ListCache.entry_json``), byte for byte the same once written.
        Reads nothing (a coroutine as every store call is)."""

    async def room_states(
        self, user: str, entity: str, level: int, room_ids: Sequence[int]
    ) -> dict[int, RoomState]:
        """The state for ``user`` of each given room they may read (others are left out),
        in one query."""
