"""Read receipts, coalesced: at most one per user per room per second, the latest mark wins.

A client that marks every message read as it scrolls may move its mark many times a second;
the room's other subscribers need only where it ends. So the process that handles a read (the
WebSocket driver or the HTTP side-port, both through ``UseCases.mark_read``) hands the mark
held to one ``Receipts`` per process:

- the first mark of a (room, user) is sent at once and opens a window of ``window`` seconds;
- marks inside the window are remembered, the highest wins; when the window ends, that one is
  sent (so no mark is lost, only the intermediate ones) and a new window opens from then;
- a window that ends with nothing remembered closes: the next mark is sent at once again.

Coalescing happens once, where the read is handled: the receipt then goes as one ephemeral
event to this process's subscribers (the hub) and to the other processes (the relay's signal
path), which deliver it as they get it. Time comes from the injected clock and timers from an
injected scheduler, so tests drive both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nanomsg.clock import Clock

WINDOW = 1.0  # seconds: at most one receipt per user per room in any such span


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Cancellable]
Emit = Callable[[int, str, int], None]  # room id, user, seq


def loop_schedule(delay: float, callback: Callable[[], None]) -> Cancellable:
    """The default scheduler: the running event loop's ``call_later``."""
    return asyncio.get_running_loop().call_later(delay, callback)


@dataclass(slots=True)
class _Window:
    opened: float  # monotonic time the last receipt of this (room, user) was sent
    sent: int  # its seq
    pending: int | None = None  # the latest mark since, to send when the window ends
    timer: Cancellable | None = None


class Receipts:
    """The coalescer of one process; ``emit`` sends a receipt (hub and relay)."""

    def __init__(
        self,
        clock: Clock,
        emit: Emit,
        *,
        window: float = WINDOW,
        schedule: Schedule = loop_schedule,
    ) -> None:
        self.clock = clock
        self.emit = emit
        self.window = window
        self.schedule = schedule
        # Only (room, user) pairs with a receipt sent in the last ``window`` seconds: the map
        # stays as small as the set of users reading right now.
        self._open: dict[tuple[int, str], _Window] = {}

    def read(self, room_id: int, user: str, seq: int) -> None:
        """The mark ``seq`` of ``user`` in ``room_id`` is held now: send it or coalesce it."""
        key = (room_id, user)
        window = self._open.get(key)
        if window is None:
            self._send(key, seq)
            return
        if seq <= window.sent or (window.pending is not None and seq <= window.pending):
            return  # marks never go backwards; an equal one says nothing new
        window.pending = seq

    def _send(self, key: tuple[int, str], seq: int) -> None:
        window = _Window(opened=self.clock.monotonic(), sent=seq)
        self._open[key] = window
        window.timer = self.schedule(self.window, lambda: self._expire(key, window))
        self.emit(key[0], key[1], seq)

    def _expire(self, key: tuple[int, str], window: _Window) -> None:
        if self._open.get(key) is not window:
            return
        left = window.opened + self.window - self.clock.monotonic()
        if left > 0:  # the timer ran early by the clock: wait for the rest
            window.timer = self.schedule(left, lambda: self._expire(key, window))
            return
        del self._open[key]
        if window.pending is not None:
            self._send(key, window.pending)

    def close(self) -> None:
        """Stop every timer (shutting down); marks still pending are not sent."""
        for window in self._open.values():
            if window.timer is not None:
                window.timer.cancel()
        self._open.clear()
