"""``together``: results in order; a failure cancels the others and is raised as it is; the
caller's cancellation reaches every awaitable."""

from __future__ import annotations

import asyncio

import pytest

from nanomsg.together import both, together

pytestmark = pytest.mark.asyncio


async def value_after(value: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return value


async def test_results_come_in_the_order_of_the_awaitables_not_of_their_ends() -> None:
    assert await together(value_after(1, 0.02), value_after(2, 0), value_after(3, 0.01)) == [
        1,
        2,
        3,
    ]


async def test_a_failure_cancels_the_others_and_is_raised_unwrapped() -> None:
    cancelled = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def failing() -> int:
        await asyncio.sleep(0)
        raise LookupError("storage down")

    with pytest.raises(LookupError, match="storage down"):
        await together(slow(), failing())
    assert cancelled.is_set()  # awaited before the error was raised: nothing left running


async def test_cancelling_the_caller_cancels_every_awaitable() -> None:
    started, cancelled = asyncio.Event(), []

    async def waits(name: str) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        return 0

    caller = asyncio.ensure_future(together(waits("a"), waits("b")))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert sorted(cancelled) == ["a", "b"]


async def test_both_gives_the_two_results_as_a_pair() -> None:
    async def text() -> str:
        return "a"

    assert await both(value_after(1, 0.01), text()) == (1, "a")
