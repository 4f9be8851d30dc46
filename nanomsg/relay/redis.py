"""Relay through Redis pub/sub: one publisher and one subscriber connection per process.

Channels (``<prefix>`` is ``--redis-prefix``, default ``nanomsg``): ``<prefix>:room:<id>``
carries stored messages of a room, subscribed only while this
process has receivers there; ``<prefix>:control`` carries room-change notices to every process.
Payloads name the sending node so a process ignores its own echoes (it delivered locally first).

Redis pub/sub is at-most-once, so nothing relies on it for completeness: the hub fills any seq
gap from storage, and after a reconnect every watched room is resynchronised from storage.
Publishes wait in a bounded queue (``max_queue``; the oldest is dropped when full, since
receivers on other nodes recover it from storage) and are sent pipelined, one round trip per
batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from nanomsg.models import Message
from nanomsg.relay.base import RelayHandlers

log = logging.getLogger(__name__)


def _encode(node: str, message: Message) -> bytes:
    return orjson.dumps(
        {
            "n": node,
            "id": message.id,
            "r": message.room_id,
            "s": message.seq,
            "e": message.emitter,
            "en": message.entity,
            "c": message.content,
            "t": message.created_at.isoformat(),
            "k": message.client_id,
        }
    )


def _decode(obj: dict[str, Any]) -> Message:
    return Message(
        id=int(obj["id"]),
        room_id=int(obj["r"]),
        seq=int(obj["s"]),
        emitter=str(obj["e"]),
        entity=str(obj["en"]),
        content=str(obj["c"]),
        created_at=datetime.fromisoformat(obj["t"]),
        client_id=obj.get("k"),
    )


async def _quietly_close(*resources: Any) -> None:
    """Close redis-py objects without letting a dead connection stall shutdown."""
    for resource in resources:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(resource.aclose(), 2.0)


class RedisRelay:
    """Relay through one Redis server: one publisher and one subscriber connection."""

    def __init__(
        self,
        url: str,
        handlers: RelayHandlers,
        *,
        prefix: str = "nanomsg",
        max_queue: int = 10_000,
        max_backoff: float = 5.0,
    ) -> None:
        self.url = url
        self.handlers = handlers
        self.node = uuid.uuid4().hex
        self.room_prefix = f"{prefix}:room:"
        self.control = f"{prefix}:control"
        self.max_backoff = max_backoff
        self._queue: deque[tuple[str, bytes]] = deque(maxlen=max_queue)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set while the publish queue is empty
        self._pub_ok = True  # the last publish attempt reached Redis
        self._watched: set[int] = set()
        self._pub: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._sub_ready = False
        self._tasks: list[asyncio.Task[None]] = []
        self._commands: set[asyncio.Task[None]] = set()
        self._closing = False
        self.dropped = 0

    def _client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.url, socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=0
        )

    async def start(self) -> None:
        self._pub = self._client()
        try:
            await self._pub.ping()
        except (RedisError, OSError) as exc:
            log.warning("redis unreachable at start (%s); relaying will resume when it is up", exc)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._publisher(), name="redis-publisher"),
            loop.create_task(self._subscriber(), name="redis-subscriber"),
        ]

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Publish what is still queued (briefly), then stop both connections."""
        self._closing = True
        if self._queue and self._pub_ok:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), flush_timeout)
        tasks = [*self._tasks, *self._commands]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pub is not None:
            await _quietly_close(self._pub)

    def healthy(self) -> bool:
        return self._sub_ready

    # -- outgoing -------------------------------------------------------------------------------

    def publish(self, message: Message) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append((f"{self.room_prefix}{message.room_id}", _encode(self.node, message)))
        self._drained.clear()
        self._wake.set()

    async def room_changed(self, room_id: int) -> None:
        self.handlers.room_changed(room_id)  # locally at once, even if Redis is down
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append((self.control, orjson.dumps({"n": self.node, "room_changed": room_id})))
        self._drained.clear()
        self._wake.set()

    async def _publisher(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                assert self._pub is not None
                try:
                    async with self._pub.pipeline(transaction=False) as pipe:
                        for channel, payload in batch:
                            pipe.publish(channel, payload)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    self._pub_ok = False
                    self._requeue(batch)
                    log.warning("redis publish failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                self._pub_ok = True
                backoff = 0.1
            self._drained.set()

    def _requeue(self, batch: list[tuple[str, bytes]]) -> None:
        """Put an unsent batch back before what was queued meanwhile; past the bound the
        oldest go (receivers recover them from storage)."""
        combined = batch + list(self._queue)
        limit = self._queue.maxlen or len(combined)
        self.dropped += max(len(combined) - limit, 0)
        self._queue.clear()
        self._queue.extend(combined[-limit:])

    # -- incoming -------------------------------------------------------------------------------

    def watch(self, room_id: int) -> None:
        self._watched.add(room_id)
        if self._sub_ready:
            self._spawn(self._command("subscribe", room_id))

    def unwatch(self, room_id: int) -> None:
        self._watched.discard(room_id)
        if self._sub_ready:
            self._spawn(self._command("unsubscribe", room_id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short command task, owned so ``close`` cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _command(self, verb: str, room_id: int) -> None:
        try:
            await getattr(self._pubsub, verb)(f"{self.room_prefix}{room_id}")
        except (RedisError, OSError, AttributeError) as exc:
            # The subscriber loop notices the broken connection and resubscribes everything.
            log.debug("redis %s room %d failed: %s", verb, room_id, exc)

    async def _subscriber(self) -> None:
        backoff = 0.1
        lost = False  # a subscription existed and broke: notices may have been missed
        while True:
            client = self._client()
            pubsub = client.pubsub()
            self._pubsub = pubsub
            try:
                rooms = set(self._watched)
                channels = [self.control, *(f"{self.room_prefix}{r}" for r in rooms)]
                await pubsub.subscribe(*channels)
                self._sub_ready = True
                backoff = 0.1
                if lost:
                    # Messages are refilled by the subscribe confirmations (resync); room-change
                    # notices sent meanwhile are gone, so re-check every watched room too.
                    log.warning("redis subscriber reconnected; re-checking %d rooms", len(rooms))
                    for room_id in rooms:
                        self.handlers.room_changed(room_id)
                lost = True
                # Rooms watched meanwhile may have been subscribed by neither path.
                for room_id in self._watched - rooms:
                    await pubsub.subscribe(f"{self.room_prefix}{room_id}")
                while True:
                    item = await pubsub.get_message(timeout=1.0)
                    if item is not None:
                        self._dispatch(item)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._sub_ready = False
                log.warning("redis subscriber lost (%s); reconnecting in %.1fs", exc, backoff)
            finally:
                self._sub_ready = False
                self._pubsub = None
                await _quietly_close(pubsub, client)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def _dispatch(self, item: dict[str, Any]) -> None:
        kind = item.get("type")
        channel = item.get("channel", b"")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == "subscribe" and name.startswith(self.room_prefix):
            # Anything published before the subscription took effect is in storage.
            self.handlers.resync(int(name[len(self.room_prefix) :]))
            return
        if kind != "message":
            return
        try:
            obj = orjson.loads(item["data"])
            if obj.get("n") == self.node:
                return
            if name == self.control:
                self.handlers.room_changed(int(obj["room_changed"]))
            else:
                self.handlers.message(_decode(obj))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed relay payload on %s: %s", name, exc)
