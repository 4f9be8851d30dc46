"""Relays carry stored messages and room-change notices between server processes."""

from nanomsg.relay.base import Relay, RelayHandlers
from nanomsg.relay.memory import MemoryRelay

__all__ = ["MemoryRelay", "Relay", "RelayHandlers"]
