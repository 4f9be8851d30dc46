"""The relay contract: what a process tells the others, and what it hears from them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from nanomsg.models import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayHandlers:
    """Where a relay hands what it hears (the hub's entry points)."""

    message: Callable[[Message], None]  # a message stored by another process
    room_changed: Callable[[int], None]  # a room's rules changed, or it was deleted
    resync: Callable[[int], None]  # maybe missed messages for this room: fill from storage
    # An ephemeral event another process sent to a room's receivers (room id, its object);
    # None: signals are ignored.
    signal: Callable[[int, dict[str, Any]], None] | None = None
    # An event about a user another process sent to that user's connections (user, its
    # data); None: user events are ignored.
    user_event: Callable[[str, dict[str, Any]], None] | None = None


def recheck_watched(handlers: RelayHandlers, watched: Collection[int]) -> None:
    """The control channel is (again) subscribed: notices published while it was not are gone,
    so re-check every watched room against storage. Both Redis relays call this on every
    confirmation of the control subscription, after it took effect, so no notice falls
    between the two."""
    if watched:
        log.info("redis control channel subscribed; re-checking %d rooms", len(watched))
    for room_id in list(watched):
        handlers.room_changed(room_id)


class Relay(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def publish(self, message: Message) -> None:
        """Send a stored message to the other processes; never blocks, never raises."""

    def signal(self, room_id: int, data: dict[str, Any]) -> None:
        """Send an ephemeral event to the room's receivers on the other processes (at most
        once: dropped under pressure, never stored); never blocks, never raises."""

    def user_event(self, user: str, data: dict[str, Any]) -> None:
        """Send an ephemeral event to the user's connections on the other processes (at most
        once, like ``signal``); never blocks, never raises."""

    def watch(self, room_id: int) -> None:
        """This process now has receivers in the room."""

    def unwatch(self, room_id: int) -> None:
        """This process no longer has receivers in the room."""

    async def room_changed(self, room_id: int) -> None:
        """Tell every process, this one included, to re-check the room's receivers. The
        notice to the others is never dropped: it waits for the broker however long it is
        down."""

    def healthy(self) -> bool:
        """False while the broker is unreachable (reported by /readyz)."""
