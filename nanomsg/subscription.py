"""One room held by one connection: a small pure state machine whose transitions are data.

A connection (``session.Session``) holds a dict room_id -> ``Subscription``: the room it selected
with ``select_room`` and every room it subscribed to with ``subscribe``. Each goes

    LOADING --granted--> LIVE
    LOADING --granted with since--> REPLAYING --replayed--> LIVE
    any --denied / revoked / left--> GONE (terminal: the session forgets it)

``TRANSITIONS`` is the whole table, state x event -> next state; tests/unit/test_subscription.py
checks that every pair of the two enums has an entry, and protocol.md section 3 mirrors it.

Per-room bookkeeping of delivery lives here too, not on the connection: ``min_seq`` (the floor
below which live frames are dropped after a resume) and ``held`` (live frames of this room that
arrived while its resume replay was being read; they follow the replay). The driver reads and
writes those two; nothing here does I/O.
"""

from __future__ import annotations

from enum import Enum

from nanomsg.models import RoomAccess
from nanomsg.permissions import Access


class SubState(Enum):
    LOADING = "LOADING"  # the room's rules are being read; nothing is delivered yet
    REPLAYING = "REPLAYING"  # joined; the resume replay is read, live frames are held
    LIVE = "LIVE"  # joined; live frames are written as they come
    GONE = "GONE"  # left, refused or revoked: terminal


class SubEvent(Enum):
    GRANTED = "GRANTED"  # read access confirmed, no resume asked
    GRANTED_RESUME = "GRANTED_RESUME"  # read access confirmed, resume from ``since`` asked
    REPLAYED = "REPLAYED"  # the resume replay was written
    DENIED = "DENIED"  # the load found no read access (or no room)
    REVOKED = "REVOKED"  # read access lost while held (rules, deletion, refresh, failed replay)
    LEFT = "LEFT"  # unsubscribe, select_room of another room, close


_S, _E = SubState, SubEvent

# State x event -> next state. Pairs that cannot change anything keep the state (a late
# REPLAYED for a room already live, GRANTED while a replay is read). GONE is terminal.
TRANSITIONS: dict[tuple[SubState, SubEvent], SubState] = {
    (_S.LOADING, _E.GRANTED): _S.LIVE,
    (_S.LOADING, _E.GRANTED_RESUME): _S.REPLAYING,
    (_S.LOADING, _E.REPLAYED): _S.LOADING,
    (_S.LOADING, _E.DENIED): _S.GONE,
    (_S.LOADING, _E.REVOKED): _S.GONE,
    (_S.LOADING, _E.LEFT): _S.GONE,
    (_S.REPLAYING, _E.GRANTED): _S.REPLAYING,
    (_S.REPLAYING, _E.GRANTED_RESUME): _S.REPLAYING,
    (_S.REPLAYING, _E.REPLAYED): _S.LIVE,
    (_S.REPLAYING, _E.DENIED): _S.GONE,
    (_S.REPLAYING, _E.REVOKED): _S.GONE,
    (_S.REPLAYING, _E.LEFT): _S.GONE,
    (_S.LIVE, _E.GRANTED): _S.LIVE,
    (_S.LIVE, _E.GRANTED_RESUME): _S.REPLAYING,  # a resume of a room already held
    (_S.LIVE, _E.REPLAYED): _S.LIVE,
    (_S.LIVE, _E.DENIED): _S.GONE,
    (_S.LIVE, _E.REVOKED): _S.GONE,
    (_S.LIVE, _E.LEFT): _S.GONE,
    (_S.GONE, _E.GRANTED): _S.GONE,
    (_S.GONE, _E.GRANTED_RESUME): _S.GONE,
    (_S.GONE, _E.REPLAYED): _S.GONE,
    (_S.GONE, _E.DENIED): _S.GONE,
    (_S.GONE, _E.REVOKED): _S.GONE,
    (_S.GONE, _E.LEFT): _S.GONE,
}


class Subscription:
    """A room held by a connection, with its own delivery bookkeeping."""

    __slots__ = ("access", "explicit", "held", "min_seq", "room_id", "rules", "state")

    def __init__(self, room_id: int, *, explicit: bool) -> None:
        self.room_id = room_id
        self.state = SubState.LOADING
        # Subscribed with ``subscribe`` (kept when another room is selected), or only selected.
        self.explicit = explicit
        self.access: Access | None = None  # the decision, once granted
        self.rules: RoomAccess | None = None  # the rules it was made on (re-evaluated on refresh)
        self.min_seq = 0  # live frames with seq <= this are dropped (a resume's floor)
        self.held: list[bytes] | None = None  # live frames held while the replay is read

    def fire(self, event: SubEvent) -> SubState:
        """Apply ``event``: the table decides the next state."""
        self.state = TRANSITIONS[(self.state, event)]
        return self.state

    @property
    def joined(self) -> bool:
        """Receiving the room's live frames (through the hub)."""
        return self.state is SubState.LIVE or self.state is SubState.REPLAYING
