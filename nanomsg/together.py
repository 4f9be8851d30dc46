"""Awaitables run side by side by one caller, which owns them: none outlives the call.

``asyncio.gather`` leaves the other tasks running when one fails (their errors then go
unretrieved) and ``asyncio.TaskGroup`` wraps a failure in an ``ExceptionGroup``, which the
callers here would have to unwrap to answer, say, 503 for ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


async def together(*coros: Coroutine[Any, Any, T]) -> list[T]:
    """The results of ``coros``, run side by side, in their order. When one fails (or the
    caller is cancelled) the others are cancelled and awaited before the first failure is
    raised as it is."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def both(first: Coroutine[Any, Any, A], second: Coroutine[Any, Any, B]) -> tuple[A, B]:
    """``together`` for two awaitables of different types, typed."""
    a, b = await together(first, second)
    return cast(A, a), cast(B, b)
