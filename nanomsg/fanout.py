"""Room fan-out for one process: which local connections hold which room, the order in
which a room's messages are delivered, and the one place that writes room messages to sockets.

Order: every process keeps, per room with local receivers, the next ``seq`` it owes them.
Messages reach a process from its own senders (right after the store commits) and from the relay
(other processes), in any order; a message ahead of the expected seq waits in a small bounded
buffer, and a gap that does not close by itself within ``gap_timeout`` is filled from storage.
Duplicates (seq already delivered) are dropped. So every receiver sees 1, 2, 3... once each.

Cost per message: one JSON encode and one WebSocket frame header for the whole room, then one
``write`` per local receiver.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from nanomsg import codec
from nanomsg.models import Message, RoomAccess
from nanomsg.store.base import HistoryQuery, Store, StoreUnavailable

log = logging.getLogger(__name__)

MAX_PENDING = 1000  # out-of-order messages held per room before forcing a fill from storage
FILL_BATCH = 500


def text_frame(payload: bytes, first_byte: int = 0x81) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (server to client), built once per use.

    ``first_byte`` is FIN + opcode (0x81), with RSV1 (0xC1) for a compressed payload."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first_byte, n)
    elif n < 65536:
        head = struct.pack("!BBH", first_byte, 126, n)
    else:
        head = struct.pack("!BBQ", first_byte, 127, n)
    return head + payload


def frame_payload(frame: bytes) -> bytes:
    """The payload of a frame built by ``text_frame``."""
    n = frame[1]
    return frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]


class DeflateCache:
    """permessage-deflate for room messages, compressed once per message and window size.

    Compressed connections negotiate no context takeover on the server side, so a message
    compresses the same for every receiver: the hub's one frame per message stays one
    compression per message. Only the latest message is kept, since the hub writes one message
    to all its receivers before the next.
    """

    def __init__(self, level: int = 6) -> None:
        self.level = level
        self._source: bytes | None = None
        self._out: dict[int, bytes] = {}
        self.compressions = 0

    def deflated(self, frame: bytes, window_bits: int) -> bytes:
        if frame is not self._source:
            self._source, self._out = frame, {}
        out = self._out.get(window_bits)
        if out is None:
            encoder = zlib.compressobj(self.level, zlib.DEFLATED, -window_bits)
            data = encoder.compress(frame_payload(frame)) + encoder.flush(zlib.Z_SYNC_FLUSH)
            out = self._out[window_bits] = text_frame(data[:-4], 0xC1)  # RFC 7692 7.2.1
            self.compressions += 1
        return out


class Receiver(Protocol):
    """What the hub needs of a connection."""

    def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None:
        """Write a ready frame of room ``room_id`` (unless closing, not receiving, or already
        had)."""

    def reauthorize(self, room_id: int, access: RoomAccess | None) -> None:
        """The room's rules changed; re-check and act (leave, tell the client)."""

    def write_signal(self, frame: bytes, room_id: int, about: str | None) -> None:
        """Write a ready ephemeral frame of room ``room_id`` (no seq), unless the connection
        is the user's ``about`` (a receipt is not sent back to its reader's connections)."""

    def write_user_event(self, frame: bytes, data: dict[str, Any]) -> None:
        """Write a ready ``user_event`` frame about the connection's own user (``data`` is
        its event object, for the connection to act on)."""


class Relay(Protocol):
    """What the hub needs of the relay (see nanomsg.relay)."""

    def publish(self, message: Message) -> None: ...

    def signal(self, room_id: int, data: dict[str, Any]) -> None: ...

    def user_event(self, user: str, data: dict[str, Any]) -> None: ...

    def watch(self, room_id: int) -> None: ...

    def unwatch(self, room_id: int) -> None: ...

    def healthy(self) -> bool: ...


_SMALL_MAX = 2**31 - 1


class _Places:
    """Where one receiver stands in the ``members`` of each room it holds on this process:
    the room ids (sorted, 4 bytes each while every id fits, 8 after) and, parallel, its
    index in that room's list. About 8 bytes a membership, where a dict entry per room
    would cost ~37; found by bisection, so a leave is O(log rooms) and needs no scan of the
    room's members."""

    __slots__ = ("at", "rooms")

    def __init__(self) -> None:
        self.rooms = array("i")
        self.at = array("i")  # index in the room's ``members`` (< 2**31 receivers)

    def find(self, room_id: int) -> int:
        """The position of ``room_id`` in ``rooms``, or -1."""
        rooms = self.rooms
        i = bisect_left(rooms, room_id)
        return i if i < len(rooms) and rooms[i] == room_id else -1

    def add(self, room_id: int, index: int) -> None:
        if self.rooms.typecode == "i" and not -_SMALL_MAX - 1 <= room_id <= _SMALL_MAX:
            self.rooms = array("q", self.rooms)
        i = bisect_left(self.rooms, room_id)
        self.rooms.insert(i, room_id)
        self.at.insert(i, index)


@dataclass(eq=False, slots=True)
class RoomChannel:
    room_id: int
    next_seq: int
    # The room's local receivers, each once (``Hub.places`` says where): a list costs 8 bytes a
    # member where a dict costs ~37 at 1 000 members (BENCHMARKS.md section 10).
    members: list[Receiver] = field(default_factory=list)
    # Receivers that joined ahead of the channel's position (their select read storage after
    # messages this process has not delivered yet) -> the first seq each is written live. A
    # receiver never gets a seq below the position it joined at; one that joined at the
    # channel's position needs no entry (the channel only moves forward), so this is nearly
    # always empty and the delivery loop stays a plain loop. Entries go once reached.
    floors: dict[Receiver, int] = field(default_factory=dict)
    pending: dict[int, Message] = field(default_factory=dict)
    gap_timer: asyncio.TimerHandle | None = None
    filling: bool = False
    # The room's rules as last read, kept while the room has local receivers: a select of a
    # room already live here is decided without a query. Refreshed by every room_changed.
    access: RoomAccess | None = None
    changes: int = 0  # room_changed notifications seen, so a stale re-check cannot win


class Hub:
    """Local rooms and their receivers; fed by local senders and by the relay."""

    def __init__(self, store: Store, gap_timeout: float = 0.5, head_check: float = 2.0) -> None:
        self.store = store
        self.gap_timeout = gap_timeout
        self.head_check = head_check
        self.rooms: dict[int, RoomChannel] = {}
        self.relay: Relay | None = None
        # Authenticated local connections by user id: added at authentication, removed at
        # close, so a user event finds its receivers with one lookup and costs nothing per
        # message.
        self.users: dict[str, dict[Receiver, None]] = {}
        # Change notices heard, for every room (live here or not): a reader of a room's rules
        # notes it before reading, and a notice heard meanwhile means what it read may be
        # older than a change the room's channel, if it had none yet, never heard of.
        self.notices = 0
        # Every local receiver holding a room here -> where it stands in each room's members.
        self.places: dict[Receiver, _Places] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def attach(self, relay: Relay) -> None:
        self.relay = relay

    # -- membership -----------------------------------------------------------------------------

    def join(
        self, receiver: Receiver, room_id: int, last_seq: int, access: RoomAccess | None = None
    ) -> int:
        """Add a receiver (or move one already in the room); returns the first seq it will be
        written live: every seq from there on, each once, and none below.

        ``last_seq`` is the room's position as the caller knows it (every message up to it is
        stored). A new channel starts after it. A channel already live here keeps its own
        position, since its other receivers are owed what follows it; when ``last_seq`` is
        ahead of it (messages stored but not delivered here yet), this receiver's floor is
        set past ``last_seq``, so those reach it through the caller's own read (a resume
        replay) and never again as live. ``access`` (the rules the receiver was admitted on)
        is remembered for the room when it has none yet."""
        channel = self.rooms.get(room_id)
        if channel is None:
            channel = RoomChannel(room_id=room_id, next_seq=last_seq + 1, access=access)
            self.rooms[room_id] = channel
            if self.relay is not None:
                self.relay.watch(room_id)
        elif channel.access is None:
            channel.access = access
        live_from = max(channel.next_seq, last_seq + 1)
        places = self.places.get(receiver)
        if places is None:
            places = self.places[receiver] = _Places()
        if places.find(room_id) < 0:
            places.add(room_id, len(channel.members))
            channel.members.append(receiver)
        if live_from > channel.next_seq:
            channel.floors[receiver] = live_from
        else:
            channel.floors.pop(receiver, None)
        return live_from

    def cached_access(self, room_id: int) -> RoomAccess | None:
        """The rules of a room live on this process, as of its last change; else None.

        The room's ``last_seq`` in the answer is where delivery here stands (the rules were
        read when the room went live here, and its position has moved on since)."""
        channel = self.rooms.get(room_id)
        if channel is None or channel.access is None:
            return None
        if self.relay is not None and not self.relay.healthy():
            # While this process cannot hear other processes' change notices, the kept rules
            # may be stale: a select reads storage, where every change is committed.
            return None
        access = channel.access
        position = channel.next_seq - 1
        if access.room.last_seq != position:
            access = replace(access, room=replace(access.room, last_seq=position))
            channel.access = access
        return access

    def leave(self, receiver: Receiver, room_id: int) -> None:
        channel = self.rooms.get(room_id)
        if channel is None:
            return
        self._unlist(channel, receiver)
        channel.floors.pop(receiver, None)
        if not channel.members:
            if channel.gap_timer is not None:
                channel.gap_timer.cancel()
            del self.rooms[room_id]
            if self.relay is not None:
                self.relay.unwatch(room_id)

    def _unlist(self, channel: RoomChannel, receiver: Receiver) -> None:
        """Take ``receiver`` out of the room's members: the last member takes its place (the
        order of delivery within a room is no promise; each receiver's own order is)."""
        places = self.places.get(receiver)
        i = places.find(channel.room_id) if places is not None else -1
        if places is None or i < 0:
            return
        index = places.at[i]
        del places.rooms[i]
        del places.at[i]
        if not places.rooms:
            del self.places[receiver]
        members = channel.members
        last = members.pop()
        if last is not receiver:
            members[index] = last
            moved = self.places[last]
            moved.at[moved.find(channel.room_id)] = index

    def receivers(self, room_id: int) -> list[Receiver]:
        channel = self.rooms.get(room_id)
        return list(channel.members) if channel else []

    # -- messages -------------------------------------------------------------------------------

    def publish(self, message: Message) -> None:
        """A message this process stored: deliver locally now, and relay it to the others."""
        self.deliver(message)
        if self.relay is not None:
            self.relay.publish(message)

    def deliver(self, message: Message) -> None:
        """Deliver in seq order to local receivers; hold early ones; drop duplicates."""
        channel = self.rooms.get(message.room_id)
        if channel is None or message.seq < channel.next_seq:
            return
        if message.seq > channel.next_seq:
            channel.pending[message.seq] = message
            if len(channel.pending) > MAX_PENDING:
                self._fill(channel)
            elif channel.gap_timer is None:
                loop = asyncio.get_running_loop()
                channel.gap_timer = loop.call_later(self.gap_timeout, self._fill, channel)
            return
        self._write(channel, message)
        self._drain(channel)

    # -- ephemeral events -----------------------------------------------------------------------

    def signal(self, room_id: int, data: dict[str, Any]) -> None:
        """An ephemeral event of a room made here (a read receipt): deliver it to this
        process's receivers now and relay it to the other processes."""
        self.deliver_signal(room_id, data)
        if self.relay is not None:
            self.relay.signal(room_id, data)

    # -- user events ----------------------------------------------------------------------------

    def add_user(self, receiver: Receiver, user: str) -> None:
        """An authenticated connection of ``user``: it gets the user's events from now on."""
        self.users.setdefault(user, {})[receiver] = None

    def remove_user(self, receiver: Receiver, user: str) -> None:
        """The connection closed: no more user events for it."""
        held = self.users.get(user)
        if held is None:
            return
        held.pop(receiver, None)
        if not held:
            del self.users[user]

    def user_event(self, user: str, data: dict[str, Any], skip: object | None = None) -> None:
        """An event about ``user`` made here: deliver it to this process's connections of the
        user (but ``skip``, the connection it came from) and relay it to the other processes,
        which hold no connection ``skip`` could name."""
        self.deliver_user_event(user, data, skip)
        if self.relay is not None:
            self.relay.user_event(user, data)

    def deliver_user_event(
        self, user: str, data: dict[str, Any], skip: object | None = None
    ) -> None:
        """Write ``{"type":"user_event","data":data}`` to the user's local connections, encoded
        once; ephemeral (no seq, never stored, never held for a gap)."""
        held = self.users.get(user)
        if not held:
            return
        frame = text_frame(codec.user_event_frame(data))
        for receiver in list(held):
            if receiver is not skip:
                receiver.write_user_event(frame, data)

    def deliver_signal(self, room_id: int, data: dict[str, Any]) -> None:
        """Write an ephemeral event to the room's local receivers: no seq, no order with the
        room's stored events, never held for a gap, never stored. ``data`` is the frame's
        object (``{"type":..., "data":{...}}``), encoded once for the whole room; the user it
        is about (``data.user``) gets it on none of their connections."""
        channel = self.rooms.get(room_id)
        if channel is None or not channel.members:
            return
        inner = data.get("data")
        about = inner.get("user") if isinstance(inner, dict) else None
        frame = text_frame(codec.signal_frame(data))
        who = about if isinstance(about, str) else None
        for receiver in list(channel.members):
            receiver.write_signal(frame, room_id, who)

    def resync(self, room_id: int) -> None:
        """Something may have been missed (relay reconnected): fill from storage."""
        channel = self.rooms.get(room_id)
        if channel is not None:
            self._fill(channel)

    def _drain(self, channel: RoomChannel) -> None:
        while channel.pending:
            nxt = channel.pending.pop(channel.next_seq, None)
            if nxt is None:
                break
            self._write(channel, nxt)
        if not channel.pending and channel.gap_timer is not None:
            channel.gap_timer.cancel()
            channel.gap_timer = None

    def _write(self, channel: RoomChannel, message: Message) -> None:
        frame = text_frame(codec.event_frame(message))
        seq = message.seq
        channel.next_seq = seq + 1
        # Copy: a write can close a slow consumer, which leaves the room while we iterate.
        floors = channel.floors
        room_id = channel.room_id
        if not floors:
            for receiver in list(channel.members):
                receiver.write_frame(frame, seq, room_id)
            return
        for receiver in list(channel.members):
            if seq >= floors.get(receiver, 0):
                receiver.write_frame(frame, seq, room_id)
        for receiver in [r for r, floor in floors.items() if floor <= seq + 1]:
            del floors[receiver]  # from the next seq on, it gets what everyone gets

    def _fill(self, channel: RoomChannel) -> None:
        if channel.gap_timer is not None:
            channel.gap_timer.cancel()
            channel.gap_timer = None
        if not channel.filling:
            channel.filling = True
            self.spawn(self._fill_from_store(channel))

    async def _fill_from_store(self, channel: RoomChannel) -> None:
        try:
            while self.rooms.get(channel.room_id) is channel:
                query = HistoryQuery(
                    room_id=channel.room_id,
                    limit=FILL_BATCH,
                    after=channel.next_seq - 1,
                    newest=False,
                )
                try:
                    # Every event of the room's stream (messages, edits, deletions): each
                    # holds a seq, so a fill that read messages only would leave holes.
                    found = await self.store.events(query)
                except StoreUnavailable:
                    log.warning("gap fill for room %d failed: storage unavailable", channel.room_id)
                    await asyncio.sleep(1.0)
                    continue
                for message in found:
                    if message.seq == channel.next_seq:
                        self._write(channel, message)
                for seq in [s for s in channel.pending if s < channel.next_seq]:
                    del channel.pending[seq]
                self._drain(channel)
                if len(found) < FILL_BATCH:
                    break
        finally:
            channel.filling = False
        if channel.pending and self.rooms.get(channel.room_id) is channel:
            # Still a hole: the message is not committed yet; look again shortly.
            loop = asyncio.get_running_loop()
            channel.gap_timer = loop.call_later(self.gap_timeout, self._fill, channel)

    async def check_heads(self) -> None:
        """Fill any local room that storage says is ahead of what we delivered.

        Catches the one loss the gap logic cannot see: the last message of a room whose relay
        publish never arrived (its node died, or Redis dropped it) when nothing follows it.
        One query for all local rooms.
        """
        if not self.rooms:
            return
        try:
            heads = await self.store.room_heads(list(self.rooms))
        except StoreUnavailable:
            return
        for room_id, head in heads.items():
            channel = self.rooms.get(room_id)
            if channel is not None and head >= channel.next_seq:
                self._fill(channel)

    async def _head_check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.head_check)
            await self.check_heads()

    def start(self) -> None:
        """Start the hub's periodic storage check (owned; ``close`` cancels it)."""
        if self.head_check > 0:
            self.spawn(self._head_check_loop())

    # -- permission changes ---------------------------------------------------------------------

    def room_changed(self, room_id: int) -> None:
        """Rules of a room changed somewhere: re-check the local receivers of that room."""
        self.notices += 1
        channel = self.rooms.get(room_id)
        if channel is not None:
            # Forget the rules at once: a select arriving before the re-check completes reads
            # storage (where the change is already committed) instead of the old rules.
            channel.access = None
            channel.changes += 1
            self.spawn(self._recheck(room_id))

    async def _recheck(self, room_id: int) -> None:
        channel = self.rooms.get(room_id)
        seen = channel.changes if channel is not None else 0
        for attempt in range(5):
            try:
                access = await self.store.room_access(room_id)
                break
            except StoreUnavailable:
                await asyncio.sleep(0.2 * (attempt + 1))
        else:
            log.error("could not re-check room %d: storage unavailable", room_id)
            return
        current = self.rooms.get(room_id)
        if current is not None and current is channel and current.changes == seen:
            current.access = access
        for receiver in self.receivers(room_id):
            receiver.reauthorize(room_id, access)

    # -- tasks ----------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task owned by the hub (cancelled by ``close``)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub task failed", exc_info=task.exception())

    async def close(self) -> None:
        for channel in self.rooms.values():
            if channel.gap_timer is not None:
                channel.gap_timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
