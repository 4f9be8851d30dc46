"""The relay contract: what a process tells the others, and what it hears from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nanomsg.models import Message


@dataclass(frozen=True, slots=True)
class RelayHandlers:
    """Where a relay hands what it hears (the hub's entry points)."""

    message: Callable[[Message], None]  # a message stored by another process
    room_changed: Callable[[int], None]  # a room's rules changed, or it was deleted
    resync: Callable[[int], None]  # maybe missed messages for this room: fill from storage


class Relay(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def publish(self, message: Message) -> None:
        """Send a stored message to the other processes; never blocks, never raises."""

    def watch(self, room_id: int) -> None:
        """This process now has receivers in the room."""

    def unwatch(self, room_id: int) -> None:
        """This process no longer has receivers in the room."""

    async def room_changed(self, room_id: int) -> None:
        """Tell every process, this one included, to re-check the room's receivers."""

    def healthy(self) -> bool:
        """False while the broker is unreachable (reported by /readyz)."""
