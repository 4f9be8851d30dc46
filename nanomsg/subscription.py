"""One room held by one connection: a small pure state machine whose transitions are data.

A connection (``session.Session``) holds ``Subscriptions``: the room it selected with
``select_room`` and every room it subscribed to with ``subscribe``. Each goes

    LOADING --granted--> LIVE
    LOADING --granted with since--> REPLAYING --replayed--> LIVE
    any --denied / revoked / left--> GONE (terminal: the session forgets it)

``TRANSITIONS`` is the whole table, state x event -> next state; tests/unit/test_subscription.py
checks that every pair of the two enums has an entry, and protocol.md section 3 mirrors it.

Per-room bookkeeping of delivery lives here too, not on the connection: ``min_seq`` (the floor
below which live frames are dropped after a resume) and ``held`` (live frames of this room that
arrived while its resume replay was being read; they follow the replay). The driver reads and
writes those two; nothing here does I/O.

Memory: a connection may hold hundreds of rooms, and nearly all of them are live with no floor
and nothing held, so ``Subscriptions`` keeps those as a room id in an ``array`` and one byte of
code (state, explicit, decision), about 5 bytes a room, and keeps a ``Subscription`` object only
for the few rooms that need its fields (BENCHMARKS.md section 10).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterator
from enum import Enum

from nanomsg.permissions import DECISIONS, Access


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

    __slots__ = ("access", "explicit", "held", "min_seq", "room_id", "state")

    def __init__(self, room_id: int, *, explicit: bool) -> None:
        self.room_id = room_id
        self.state = SubState.LOADING
        # Subscribed with ``subscribe`` (kept when another room is selected), or only selected.
        self.explicit = explicit
        self.access: Access | None = None  # the decision, once granted
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

    @property
    def compact(self) -> bool:
        """Nothing but the state, the flag and a shared decision: ``Subscriptions`` keeps it as
        one byte of code instead of this object."""
        return (
            self.min_seq == 0
            and self.held is None
            and self.state is not SubState.GONE
            and (self.access is None or self.access in _DECISION_CODE)
        )


# The one-byte code of a compact room: bits 0-1 the state, bit 2 ``explicit``, bits 3-7 the
# decision as 1 + its index in ``permissions.DECISIONS`` (0: none yet).
_STATES: tuple[SubState, ...] = (SubState.LOADING, SubState.REPLAYING, SubState.LIVE)
_STATE_CODE: dict[SubState, int] = {state: i for i, state in enumerate(_STATES)}
_DECISION_CODE: dict[Access, int] = {access: i + 1 for i, access in enumerate(DECISIONS)}
_DECISIONS: tuple[Access | None, ...] = (None, *DECISIONS)
_EXPLICIT = 4
assert len(_DECISIONS) <= 32  # five bits

_SMALL = "i"  # 4-byte room ids while every id fits
_LARGE = "q"  # 8-byte room ids from the first one that does not
_SMALL_MAX = 2**31 - 1


def _encode(sub: Subscription) -> int:
    code = _STATE_CODE[sub.state] | (_EXPLICIT if sub.explicit else 0)
    if sub.access is not None:
        code |= _DECISION_CODE[sub.access] << 3
    return code


def _decode(room_id: int, code: int) -> Subscription:
    sub = Subscription(room_id, explicit=bool(code & _EXPLICIT))
    sub.state = _STATES[code & 3]
    sub.access = _DECISIONS[code >> 3]
    return sub


class Subscriptions:
    """The rooms one connection holds, room_id -> ``Subscription``, in a few bytes per room.

    A room whose subscription is ``compact`` (no floor, nothing held, a shared decision: every
    live room once its replay is done) is a room id in ``_ids`` (sorted, found by bisection) and
    one byte in ``_codes``; any other is its ``Subscription`` object in ``objects`` (a room
    resuming, while its floor or held frames matter). ``get`` gives a ``Subscription`` either
    way: the stored object, or a new one decoded from the code. Changes to it are kept by
    ``set``, which stores the room compact again when it can (so a room is promoted to an
    object and demoted back as its fields come and go). ``TRANSITIONS`` stays the only place
    that moves a state: ``set`` stores what ``Subscription.fire`` decided.

    Iteration is by ascending room id.
    """

    __slots__ = ("_codes", "_ids", "objects")

    def __init__(self) -> None:
        self._ids = array(_SMALL)
        self._codes = bytearray()  # parallel to ``_ids``; 255 marks a room kept in ``objects``
        # The rooms that need their object; None while there are none (most of the time).
        # Read directly by the per-frame hot path (``ws_server.Connection.write_frame``).
        self.objects: dict[int, Subscription] | None = None

    def _index(self, room_id: int) -> int:
        """The position of ``room_id`` in ``_ids``, or -1."""
        ids = self._ids
        i = bisect_left(ids, room_id)
        return i if i < len(ids) and ids[i] == room_id else -1

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, room_id: object) -> bool:
        return isinstance(room_id, int) and self._index(room_id) >= 0

    def __iter__(self) -> Iterator[int]:
        # A copy: callers leave rooms while they iterate.
        return iter(self._ids.tolist())

    def get(self, room_id: int) -> Subscription | None:
        """The room's subscription, or None when it is not held. For a compact room this is a
        new object: store what changes on it with ``set``."""
        i = self._index(room_id)
        if i < 0:
            return None
        code = self._codes[i]
        if code == _OBJECT:
            assert self.objects is not None
            return self.objects[room_id]
        return _decode(room_id, code)

    def __getitem__(self, room_id: int) -> Subscription:
        sub = self.get(room_id)
        if sub is None:
            raise KeyError(room_id)
        return sub

    def set(self, sub: Subscription) -> None:
        """Hold ``sub.room_id`` as ``sub`` says (added when new): compact when it can be, as
        an object otherwise. A subscription that is GONE is forgotten."""
        room_id = sub.room_id
        if sub.state is SubState.GONE:
            self.pop(room_id)
            return
        code = _encode(sub) if sub.compact else _OBJECT
        i = self._index(room_id)
        if i < 0:
            if self._ids.typecode == _SMALL and not -_SMALL_MAX - 1 <= room_id <= _SMALL_MAX:
                self._ids = array(_LARGE, self._ids)  # a room id past 4 bytes: 8 from now on
            i = bisect_left(self._ids, room_id)
            self._ids.insert(i, room_id)
            self._codes.insert(i, code)
        else:
            self._codes[i] = code
        objects = self.objects
        if code == _OBJECT:
            if objects is None:
                objects = self.objects = {}
            objects[room_id] = sub
        elif objects is not None and objects.pop(room_id, None) is not None and not objects:
            self.objects = None

    def add(self, room_id: int, *, explicit: bool) -> Subscription:
        """Hold a new room, LOADING."""
        sub = Subscription(room_id, explicit=explicit)
        self.set(sub)
        return sub

    def pop(self, room_id: int) -> Subscription | None:
        """Stop holding ``room_id``; its subscription as it was, or None when not held."""
        sub = self.get(room_id)
        if sub is None:
            return None
        i = self._index(room_id)
        del self._ids[i]
        del self._codes[i]
        objects = self.objects
        if objects is not None and objects.pop(room_id, None) is not None and not objects:
            self.objects = None
        return sub

    def values(self) -> Iterator[Subscription]:
        """Every room's subscription (compact ones decoded: read-only views)."""
        for room_id in self:
            sub = self.get(room_id)
            if sub is not None:
                yield sub

    def kept(self) -> list[Subscription]:
        """The subscriptions kept as objects (the only ones with a floor or held frames)."""
        return list(self.objects.values()) if self.objects else []


_OBJECT = 255  # the code of a room kept in ``Subscriptions.objects``
assert ((len(_DECISIONS) - 1) << 3 | _EXPLICIT | 3) < _OBJECT  # no code looks like an object
