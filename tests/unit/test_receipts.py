"""Read receipts coalesced per user per room per second, driven by a fake clock and timers."""

from __future__ import annotations

from collections.abc import Callable

from nanomsg.clock import FakeClock
from nanomsg.receipts import Receipts


class Timers:
    """A scheduler run by hand: timers fire when the fake clock has reached them."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.due: list[tuple[float, Callable[[], None], list[bool]]] = []

    def schedule(self, delay: float, callback: Callable[[], None]) -> Handle:
        cancelled = [False]
        self.due.append((self.clock.monotonic() + delay, callback, cancelled))
        return Handle(cancelled)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for _ in range(100):  # bounded: a firing may schedule another
            ready = [t for t in self.due if t[0] <= self.clock.monotonic()]
            if not ready:
                return
            for timer in ready:
                self.due.remove(timer)
                if not timer[2][0]:
                    timer[1]()


class Handle:
    def __init__(self, cancelled: list[bool]) -> None:
        self.cancelled = cancelled

    def cancel(self) -> None:
        self.cancelled[0] = True


def make() -> tuple[Receipts, Timers, list[tuple[int, str, int]]]:
    clock = FakeClock()
    timers = Timers(clock)
    sent: list[tuple[int, str, int]] = []
    receipts = Receipts(
        clock, lambda r, u, s: sent.append((r, u, s)), window=1.0, schedule=timers.schedule
    )
    return receipts, timers, sent


def test_the_first_mark_is_sent_at_once() -> None:
    receipts, _, sent = make()
    receipts.read(7, "u", 3)
    assert sent == [(7, "u", 3)]


def test_a_burst_within_a_second_sends_the_first_then_the_last_when_the_second_ends() -> None:
    receipts, timers, sent = make()
    for seq in range(1, 21):
        receipts.read(7, "u", seq)
        timers.advance(0.04)
    assert sent == [(7, "u", 1)]  # 0.8 s in: the rest waits
    timers.advance(0.25)
    assert sent == [(7, "u", 1), (7, "u", 20)]  # the latest wins, nothing in between
    timers.advance(5.0)
    assert sent == [(7, "u", 1), (7, "u", 20)]  # a quiet window sends nothing more


def test_at_most_one_receipt_per_second_while_marks_keep_coming() -> None:
    receipts, timers, sent = make()
    times: list[float] = []
    for seq in range(1, 101):  # ten seconds of marks, ten a second
        before = len(sent)
        receipts.read(7, "u", seq)
        timers.advance(0.1)
        if len(sent) > before:
            times.append(timers.clock.monotonic())
    timers.advance(2.0)
    assert sent[-1] == (7, "u", 100)  # the final mark is never lost
    assert 8 <= len(sent) <= 12
    sends = [s for _, _, s in sent]
    assert sends == sorted(sends)


def test_users_and_rooms_are_coalesced_apart() -> None:
    receipts, _, sent = make()
    receipts.read(7, "u", 1)
    receipts.read(7, "v", 1)
    receipts.read(8, "u", 1)
    assert sent == [(7, "u", 1), (7, "v", 1), (8, "u", 1)]


def test_a_mark_not_above_the_last_sent_is_not_sent_again() -> None:
    receipts, timers, sent = make()
    receipts.read(7, "u", 5)
    receipts.read(7, "u", 5)
    receipts.read(7, "u", 4)
    timers.advance(1.0)
    assert sent == [(7, "u", 5)]


def test_after_a_quiet_second_the_next_mark_is_sent_at_once() -> None:
    receipts, timers, sent = make()
    receipts.read(7, "u", 1)
    timers.advance(1.0)
    receipts.read(7, "u", 2)
    assert sent == [(7, "u", 1), (7, "u", 2)]


def test_close_stops_the_timers_and_forgets_pending_marks() -> None:
    receipts, timers, sent = make()
    receipts.read(7, "u", 1)
    receipts.read(7, "u", 2)
    receipts.close()
    timers.advance(2.0)
    assert sent == [(7, "u", 1)]
