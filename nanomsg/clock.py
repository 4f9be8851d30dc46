"""Injected time: the only place that reads the system clocks, so tests can drive time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Wall time (seconds since the epoch, for token expiry and timestamps) and monotonic time."""

    def wall(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class FakeClock:
    """A clock that only moves when told to; used by tests."""

    now: float = 1_800_000_000.0
    mono: float = field(default=1000.0)

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


def utc_datetime(epoch: float) -> datetime:
    """An aware UTC datetime truncated to milliseconds, the precision frames carry."""
    ms = int(epoch * 1000)
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso_utc(dt: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``, as the original's ``createdAt``."""
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    # isoformat is C code and truncates to milliseconds, as the frames need; with UTC it ends
    # in "+00:00", which the original's format spells "Z". This runs once per message frame.
    return dt.isoformat(timespec="milliseconds")[:-6] + "Z"
