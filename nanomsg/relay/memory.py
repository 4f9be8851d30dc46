"""The in-process relay for a single process: nothing to carry, only local notices."""

from __future__ import annotations

from typing import Any

from nanomsg.models import Message
from nanomsg.relay.base import RelayHandlers


class MemoryRelay:
    """Used with no Redis URL. Local delivery is done by the hub itself, so publishing is a
    no-op; room changes are handed straight back to the hub."""

    def __init__(self, handlers: RelayHandlers) -> None:
        self.handlers = handlers

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def publish(self, message: Message) -> None:
        return None

    def signal(self, room_id: int, data: dict[str, Any]) -> None:
        return None

    def user_event(self, user: str, data: dict[str, Any]) -> None:
        return None

    def watch(self, room_id: int) -> None:
        return None

    def unwatch(self, room_id: int) -> None:
        return None

    async def room_changed(self, room_id: int) -> None:
        self.handlers.room_changed(room_id)

    def healthy(self) -> bool:
        return True
