"""The publish queue of the Redis relays: what waits to be published, and what goes when full.

Two parts with two policies, because what is lost costs differently:

- Room-change notices (a room's rules changed, or it was deleted) are kept in an insertion-
  ordered set of room ids: a second notice for a room already waiting adds nothing, so they are
  few (at most one per room), and they are never dropped. Nothing else recovers a lost notice
  while the receiving process stays connected, and a lost one would leave another process
  admitting readers on revoked rules.
- Messages (and signals, and user events) wait in a bounded queue, ``max_entries``; past it
  the oldest is dropped and counted in ``dropped``. Receivers recover a dropped message from
  storage (gap fill, head check, resync after a reconnect); a dropped signal or user event is
  ephemeral anyway.

``take`` empties the queue into ``Packet``s, ready to publish in one pipeline: the notices first
(one control payload), then the user events (one more control payload), then one payload per
room holding that room's messages and signals in order (split when a payload would exceed
``max_payload`` bytes). So a whole loop pass of publishes costs one encoding per message and one
PUBLISH per room, and a receiver reads one pub/sub message per room instead of one per message.
``put_back`` returns the packets a broker did not take, ahead of what was queued meanwhile,
under the same two policies.

Pure data: no I/O, no clock, no event loop; both relays wrap it in their publisher task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from nanomsg.models import Message
from nanomsg.relay.envelope import (
    control_payload,
    encode_message,
    encode_user_event,
    header,
    room_payload,
    user_payload,
)

MAX_ENTRIES = 10_000
MAX_PAYLOAD = 256 * 1024  # bytes of one PUBLISH; a room's backlog is split beyond it


@dataclass(frozen=True, slots=True)
class Signal:
    """An ephemeral event for the receivers of a room on other processes (never stored)."""

    room_id: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UserEvent:
    """An ephemeral event for a user's connections on other processes (never stored)."""

    user: str
    data: dict[str, Any]


Entry = Message | Signal | UserEvent


@dataclass(frozen=True, slots=True)
class Packet:
    """One payload to publish, with what it carries (to put back if it is not taken)."""

    room_id: int | None  # None: the control channel
    payload: bytes
    notices: tuple[int, ...] = ()
    entries: tuple[Entry, ...] = ()


class Outbox:
    """Notices (never dropped, coalesced by room) and messages (bounded, oldest dropped)."""

    def __init__(
        self, node: str, *, max_entries: int = MAX_ENTRIES, max_payload: int = MAX_PAYLOAD
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.head = header(node)
        self.max_entries = max_entries
        self.max_payload = max_payload
        self.dropped = 0  # messages and signals dropped to keep the bound, since start
        self._notices: dict[int, None] = {}  # insertion-ordered set of room ids
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._notices) + len(self._entries)

    @property
    def notices(self) -> list[int]:
        """Rooms with a notice waiting, oldest first."""
        return list(self._notices)

    @property
    def entries(self) -> list[Entry]:
        """Messages and signals waiting, oldest first."""
        return list(self._entries)

    # -- adding -----------------------------------------------------------------------------

    def notice(self, room_id: int) -> None:
        """A room's rules changed: tell the others (once, however often it is asked)."""
        self._notices[room_id] = None

    def message(self, message: Message) -> None:
        self._append(message)

    def signal(self, room_id: int, data: dict[str, Any]) -> None:
        self._append(Signal(room_id, data))

    def user_event(self, user: str, data: dict[str, Any]) -> None:
        self._append(UserEvent(user, data))

    def _append(self, entry: Entry) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.popleft()
            self.dropped += 1
        self._entries.append(entry)

    # -- publishing -------------------------------------------------------------------------

    def take(self) -> list[Packet]:
        """Everything queued, as packets: notices first, then one or more per room."""
        packets: list[Packet] = []
        if self._notices:
            rooms = list(self._notices)
            self._notices = {}
            packets.append(Packet(None, control_payload(self.head, rooms), notices=tuple(rooms)))
        if self._entries:
            by_room: dict[int, list[Entry]] = {}
            users: list[UserEvent] = []
            for entry in self._entries:
                if isinstance(entry, UserEvent):
                    users.append(entry)
                else:
                    by_room.setdefault(entry.room_id, []).append(entry)
            self._entries.clear()
            if users:
                # User events go on the control channel, in one payload per pass.
                encoded = [encode_user_event(e.user, e.data) for e in users]
                packets.append(Packet(None, user_payload(self.head, encoded), entries=tuple(users)))
            for room_id, entries in by_room.items():
                packets.extend(self._pack(room_id, entries))
        return packets

    def _pack(self, room_id: int, entries: list[Entry]) -> list[Packet]:
        """One room's entries as payloads of at most ``max_payload`` bytes (a single entry
        larger than that still goes, alone)."""
        packets: list[Packet] = []
        messages: list[bytes] = []
        signals: list[bytes] = []
        carried: list[Entry] = []
        size = 0
        for entry in entries:
            if isinstance(entry, Message):
                encoded = encode_message(entry)
            else:
                assert isinstance(entry, Signal)
                encoded = orjson.dumps(entry.data)
            if carried and size + len(encoded) > self.max_payload:
                packets.append(self._room_packet(room_id, messages, signals, carried))
                messages, signals, carried, size = [], [], [], 0
            (messages if isinstance(entry, Message) else signals).append(encoded)
            carried.append(entry)
            size += len(encoded) + 1
        packets.append(self._room_packet(room_id, messages, signals, carried))
        return packets

    def _room_packet(
        self, room_id: int, messages: list[bytes], signals: list[bytes], carried: list[Entry]
    ) -> Packet:
        payload = room_payload(self.head, room_id, messages, signals)
        return Packet(room_id, payload, entries=tuple(carried))

    def put_back(self, packets: Iterable[Packet]) -> None:
        """Packets a broker did not take go back ahead of what was queued meanwhile: every
        notice (coalesced with newer ones), and the entries up to the bound (the oldest of the
        whole queue are dropped and counted)."""
        notices: dict[int, None] = {}
        entries: list[Entry] = []
        for packet in packets:
            notices.update(dict.fromkeys(packet.notices))
            entries.extend(packet.entries)
        if notices:
            notices.update(self._notices)
            self._notices = notices
        if entries:
            entries.extend(self._entries)
            excess = len(entries) - self.max_entries
            if excess > 0:
                self.dropped += excess
                del entries[:excess]
            self._entries = deque(entries)
