"""The batching writer: every room event waiting for storage goes out in one transaction.

A room event is a new message, an edit or a delete (``store.base.RoomEvent``); each takes its
room's next seq. One is ``enqueue``-d with a callback (the WebSocket shell: no future and no
extra loop callback per event) or ``submit``-ted for a future. One writer task per shard takes
*everything* that arrived while the previous batch was being committed (up to ``max_batch``),
whatever its kinds, and stores it with ``Store.append_events``: one transaction and, on
PostgreSQL, one round trip (edits and deletes included, bar the rare batches
``PostgresStore.append_events`` describes). Outcomes are delivered only after the commit,
in submission order, so an acknowledgement always means "stored": a message's
``(message, created)``, a change's ``Changed`` (the event and the message after it), or the
refusal of that one event (``RoomGone``; for a change also ``UnknownSeq``, ``NotAuthor``,
``AlreadyDeleted``, judged after the events before it in the batch).

Rooms are spread over ``shards`` by id, each shard with one batch in flight at a time: a room's
events always go through the same shard, in one queue, so their seqs follow submission order
(a connection's sends, edits and deletes stay in the order it sent them), while different
shards commit in parallel. There is no timer: under light load a batch is one event and waits
for nothing; under heavy load batches grow by themselves, which is what amortises the commit.

A batch the database refuses for what one of its events holds (``ContentRefused``; the codec
keeps such content out, so this is a last line of defence) is split in halves and each half
stored on its own, down to the single event at fault, which alone gets the refusal: one
sender's content can never fail the other senders of its batch, and costs them a few round
trips at most (about two per halving). It is logged once per refused batch, without a
traceback.

The queue is bounded by the connections themselves (each has at most ``driver.PIPELINE``
sends, edits and deletes in flight and stops reading beyond that), so it needs no policy of
its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nanomsg.models import Message
from nanomsg.store.base import (
    Changed,
    ContentRefused,
    RoomEvent,
    Store,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

# A room event stored: a message with whether it is new (False: a client_id already stored),
# or an edit or delete with the message after it.
Stored = tuple[Message, bool] | Changed
# Called once, after the commit (or the failure), with the outcome: a ``Stored``, or the
# StoreUnavailable / RoomGone / ContentRefused / EventRefused exception.
Done = Callable[[Stored | Exception], None]


@dataclass(eq=False, slots=True)
class _Shard:
    queue: deque[tuple[RoomEvent, Done]] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False
    task: asyncio.Task[None] | None = None


class BatchWriter:
    """Owns the writer tasks; ``close`` stores what was submitted, then stops them."""

    def __init__(self, store: Store, *, shards: int = 2, max_batch: int = 500) -> None:
        if shards < 1 or max_batch < 1:
            raise ValueError("shards and max_batch must be at least 1")
        self.store = store
        self.max_batch = max_batch
        self._shards = [_Shard() for _ in range(shards)]
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        # What the benchmarks and operators want to know: how well batching amortises.
        self.batches = 0
        self.messages = 0  # room events stored: messages, edits and deletes
        self.refused = 0  # events the database refused for their content

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, shard in enumerate(self._shards):
            shard.task = loop.create_task(self._run(shard), name=f"message-writer-{index}")

    @property
    def pending(self) -> int:
        """Events submitted and not yet resolved (queued or in a batch being committed)."""
        return sum(len(s.queue) + (1 if s.busy else 0) for s in self._shards)

    def enqueue(self, new: RoomEvent, done: Done) -> None:
        """Queue a room event; ``done`` is called with its outcome after the commit, in
        submission order within a room. Refused (StoreUnavailable) once closing."""
        if self._closing:
            done(StoreUnavailable("the server is shutting down"))
            return
        shard = self._shards[new.room_id % len(self._shards)]
        shard.queue.append((new, done))
        self._idle.clear()
        shard.wakeup.set()

    def submit(self, new: RoomEvent) -> asyncio.Future[Stored]:
        """``enqueue`` with a future: the ``Stored`` outcome, or the refusal raised."""
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()

        def resolve(outcome: Stored | Exception) -> None:
            if future.done():  # the caller gave up (cancelled)
                return
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.enqueue(new, resolve)
        return future

    async def _run(self, shard: _Shard) -> None:
        while True:
            if not shard.queue:
                self._check_idle()
                shard.wakeup.clear()
                await shard.wakeup.wait()
                continue
            take = min(len(shard.queue), self.max_batch)
            batch = [shard.queue.popleft() for _ in range(take)]
            shard.busy = True
            try:
                await self._store(batch)
            finally:
                shard.busy = False

    async def _store(self, batch: Sequence[tuple[RoomEvent, Done]], *, part: bool = False) -> None:
        """Store ``batch`` and tell each sender its outcome; ``part``: a half of a refused
        batch (already logged)."""
        try:
            outcomes: Sequence[Stored | Exception] = await self.store.append_events(
                [new for new, _ in batch]
            )
        except asyncio.CancelledError:
            self._tell(batch, [StoreUnavailable("the writer was stopped")] * len(batch))
            raise
        except (ContentRefused, UnicodeError) as exc:
            # UnicodeError: text no backend can encode (a lone surrogate), raised by the driver
            # before the database sees it; SQLite's driver raises it as such.
            refused = exc if isinstance(exc, ContentRefused) else ContentRefused(type(exc).__name__)
            if not part:
                log.warning(
                    "storage refused a batch of %d messages for their content (%s);"
                    " storing them in parts to find the event at fault",
                    len(batch),
                    refused,
                )
            if len(batch) == 1:
                self.refused += 1
                self._tell(batch, [refused])
                return
            # Halves in order: a room's events keep their order, hence their seqs.
            middle = len(batch) // 2
            await self._store(batch[:middle], part=True)
            await self._store(batch[middle:], part=True)
            return
        except StoreUnavailable as exc:
            self._tell(batch, [StoreUnavailable(str(exc))] * len(batch))
            return
        except Exception as exc:
            log.exception("storing a batch of %d messages failed unexpectedly", len(batch))
            failed = StoreUnavailable(f"unexpected storage error: {exc!r}")
            self._tell(batch, [failed] * len(batch))
            return
        self.batches += 1
        self.messages += len(batch)
        self._tell(batch, outcomes)

    @staticmethod
    def _tell(
        batch: Sequence[tuple[RoomEvent, Done]], outcomes: Sequence[Stored | Exception]
    ) -> None:
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            try:
                done(outcome)
            except Exception:  # a bug in one receiver must not cost the others their answer
                log.exception("an event-stored callback failed")

    def _check_idle(self) -> None:
        if self.pending == 0:
            self._idle.set()

    async def flush(self) -> None:
        """Wait until everything submitted so far is resolved."""
        while self.pending:
            await self._idle.wait()

    async def close(self) -> None:
        """Refuse new events, resolve the queued ones, stop the tasks."""
        self._closing = True
        await self.flush()
        tasks = [s.task for s in self._shards if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
