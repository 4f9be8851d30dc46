"""Typed events: client commands (decoded once by the codec), results fed back to the session,
and the effects the session asks its I/O shell to carry out. All frozen and slotted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from nanomsg.models import Message, Principal, RoomAccess
from nanomsg.store.base import HistoryQuery, NewMessage

# -- client commands ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    token: object  # verified by auth.Verifier, which rejects anything but a non-empty string
    # The client asks for its user's event stream (``user_event`` frames): an opt-in, so
    # clients of the original protocol never see a frame they do not know.
    user_events: bool = False


@dataclass(frozen=True, slots=True)
class SelectRoom:
    room_id: int
    since: int | None = None  # resume: replay stored messages with seq > since


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Hold the room alongside the others (several rooms per connection)."""

    room_id: int
    since: int | None = None  # resume, as select_room's


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    room_id: int


@dataclass(frozen=True, slots=True)
class SendMessage:
    content: str
    client_id: str | None
    room_id: int | None = None  # None: the selected room


@dataclass(frozen=True, slots=True)
class GetPastMessages:
    limit: int
    before: int | None
    room_id: int | None = None  # None: the selected room


@dataclass(frozen=True, slots=True)
class EditMessage:
    """Replace the content of the sender's own message ``seq``."""

    seq: int
    content: str
    room_id: int | None = None  # None: the selected room


@dataclass(frozen=True, slots=True)
class DeleteMessage:
    """Soft-delete message ``seq`` (the sender's own, or any for a room admin)."""

    seq: int
    room_id: int | None = None  # None: the selected room


@dataclass(frozen=True, slots=True)
class MarkRead:
    """Move the user's read mark in the room to ``seq`` (never backwards, clamped)."""

    seq: int
    room_id: int | None = None  # None: the selected room


@dataclass(frozen=True, slots=True)
class OpenDm:
    """Open (or find) the DM of the user and ``user`` (a canonical lower-case UUID)."""

    user: str


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    """A JSON object whose ``type`` is missing, not a string, or not a command we know."""


@dataclass(frozen=True, slots=True)
class BadArgs:
    """A known command with a field of the wrong type or range."""

    command: str
    reason: str


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A message whose content is longer than the configured limit."""


@dataclass(frozen=True, slots=True)
class BadJson:
    """Not JSON, JSON that is not an object, or a binary frame that is not UTF-8."""


Command = (
    Token
    | SelectRoom
    | Subscribe
    | Unsubscribe
    | SendMessage
    | GetPastMessages
    | EditMessage
    | DeleteMessage
    | MarkRead
    | OpenDm
    | Quit
    | Unknown
    | BadArgs
    | TooLarge
    | BadJson
)

# -- results of effects, fed back into the session --------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomLoaded:
    room_id: int
    access: RoomAccess | None


@dataclass(frozen=True, slots=True)
class MessageStored:
    message: Message
    created: bool  # False: an idempotent resend of a stored client_id


@dataclass(frozen=True, slots=True)
class HistoryLoaded:
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Replayed:
    """Stored messages a resuming connection missed (oldest first), up to the resume cap."""

    room_id: int
    messages: tuple[Message, ...]
    complete: bool  # False: more were missed than the cap; older ones must be paged


@dataclass(frozen=True, slots=True)
class RoomMissing:
    """The store said the room is gone while we acted on it."""

    room_id: int


@dataclass(frozen=True, slots=True)
class StorageFailed:
    """A storage operation failed; ``room_id`` names the room of a failed LoadRoom."""

    room_id: int | None = None


@dataclass(frozen=True, slots=True)
class MessageRefused:
    """Storage refused this one message for its content (the others of its batch were stored);
    ``reason`` is safe to show the sender."""

    reason: str


@dataclass(frozen=True, slots=True)
class EventStored:
    """An edit or delete stored: ``event`` is the room event (its own seq) to deliver."""

    event: Message


@dataclass(frozen=True, slots=True)
class ChangeRefused:
    """An edit or delete refused; ``reply`` is the status frame that answers it."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class ReadMarked:
    """A read mark moved (or kept): the mark ``seq`` the user now holds in ``room_id``."""

    room_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class DmReady:
    """The DM asked for by ``open_dm``: its room id."""

    room_id: int


Result = (
    RoomLoaded
    | ReadMarked
    | DmReady
    | MessageStored
    | EventStored
    | ChangeRefused
    | HistoryLoaded
    | Replayed
    | RoomMissing
    | StorageFailed
    | MessageRefused
)


class Timer(Enum):
    AUTH = "auth"  # no valid token yet
    EXPIRY = "expiry"  # the token's exp (plus leeway) has passed
    REFRESH = "refresh"  # the grace after EXPIRED has run out


# -- effects, carried out by the shell in order ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    payload: bytes  # one JSON text frame


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Arm:
    """Call the session's ``timer_fired`` at wall time ``at`` (replacing an armed one)."""

    timer: Timer
    at: float


@dataclass(frozen=True, slots=True)
class Disarm:
    timer: Timer


@dataclass(frozen=True, slots=True)
class LoadRoom:
    room_id: int


@dataclass(frozen=True, slots=True)
class StoreMessage:
    new: NewMessage


@dataclass(frozen=True, slots=True)
class ChangeMessage:
    """Run the edit (``content`` given) or delete use case of message ``seq`` in ``room_id``
    for ``principal``; the shell answers with ``EventStored``, ``ChangeRefused`` or
    ``StorageFailed``."""

    principal: Principal
    room_id: int
    seq: int
    content: str | None


@dataclass(frozen=True, slots=True)
class SetReadMark:
    """Run the mark-read use case for ``principal`` in ``room_id``; the shell answers with
    ``ReadMarked``, ``ChangeRefused`` or ``StorageFailed``."""

    principal: Principal
    room_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class RunOpenDm:
    """Run the open-DM use case for ``principal`` with ``user``; the shell answers with
    ``DmReady``, ``ChangeRefused`` or ``StorageFailed``."""

    principal: Principal
    user: str


@dataclass(frozen=True, slots=True)
class Settle:
    """The connection authenticated: apply what its token teaches about the user's entity to
    the DMs waiting for it (the settle use case). Once per connection; no result. With
    ``user_events``, the connection joins its user's event stream."""

    principal: Principal
    user_events: bool = False


@dataclass(frozen=True, slots=True)
class LoadHistory:
    query: HistoryQuery


@dataclass(frozen=True, slots=True)
class Join:
    """Start receiving the room's live messages, the first one expected after ``last_seq``.

    With ``since``, first replay what was stored after ``since`` (the shell answers with
    ``Replayed``); live messages arriving meanwhile wait until ``EndReplay``.
    """

    room_id: int
    last_seq: int
    since: int | None = None
    # The room and rules the decision was made on: the hub keeps them while the room has local
    # receivers, so the next select of that room on this process needs no query.
    access: RoomAccess | None = None


@dataclass(frozen=True, slots=True)
class EndReplay:
    """The replay of the room is written: release its live messages held meanwhile."""

    room_id: int


@dataclass(frozen=True, slots=True)
class Leave:
    room_id: int


@dataclass(frozen=True, slots=True)
class Publish:
    """A stored message: deliver it locally and relay it to the other processes."""

    message: Message


@dataclass(frozen=True, slots=True)
class AuthRefused:
    """A token was refused. The client gets ``BADAUTH``, byte for byte the original's, so the
    reason (an ``AuthError`` text, safe to show) goes to the server's log instead."""

    reason: str


@dataclass(frozen=True, slots=True)
class SetReceiving:
    """Whether live room messages are written to this connection (not while EXPIRED)."""

    on: bool


Effect = (
    Send
    | Close
    | Arm
    | Disarm
    | LoadRoom
    | StoreMessage
    | ChangeMessage
    | SetReadMark
    | RunOpenDm
    | Settle
    | LoadHistory
    | Join
    | EndReplay
    | Leave
    | Publish
    | SetReceiving
    | AuthRefused
)
AWAITING = (
    LoadRoom,
    StoreMessage,
    ChangeMessage,
    SetReadMark,
    RunOpenDm,
    LoadHistory,
)  # effects whose result the session waits for
