"""Relay through Redis pub/sub: one publisher and one subscriber connection per process.

Channels (``<prefix>`` is ``--redis-prefix``, default ``nanomsg``): ``<prefix>:room:<id>``
carries stored messages (and signals) of a room, subscribed only while this process has
receivers there; ``<prefix>:control`` carries room-change notices to every process. Payloads
are relay envelopes (:mod:`nanomsg.relay.envelope`); each names the sending node, so a process
ignores its own echoes (it delivered locally first) from the payload's first bytes.

Redis pub/sub is at-most-once, so nothing relies on it for completeness: the hub fills any seq
gap from storage, and after a reconnect every watched room is resynchronised from storage.
Publishes wait in the shared outbox (:mod:`nanomsg.relay.outbox`): notices apart and never
dropped, messages bounded (``max_queue``; the oldest is dropped and counted when full, since
receivers recover it from storage). The publisher task sends everything queued as one
pipeline, notices first, one PUBLISH per room: one round trip per pass, however many messages
the pass stored.

Notices this process may have missed (its subscription was down while another published them)
are made up for explicitly: every confirmation of the control channel's subscription, the first
one and each after a reconnect, re-checks every watched room (``handlers.room_changed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from nanomsg.models import Message
from nanomsg.relay.base import RelayHandlers, recheck_watched
from nanomsg.relay.envelope import hand_over
from nanomsg.relay.outbox import MAX_ENTRIES, Outbox, Packet

log = logging.getLogger(__name__)


async def quietly_close(*resources: Any) -> None:
    """Close redis-py objects without letting a dead connection stall shutdown (used by both
    Redis relays)."""
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
        max_queue: int = MAX_ENTRIES,
        max_backoff: float = 5.0,
    ) -> None:
        self.url = url
        self.handlers = handlers
        self.node = uuid.uuid4().hex
        self.room_prefix = f"{prefix}:room:"
        self.control = f"{prefix}:control"
        self.max_backoff = max_backoff
        self.outbox = Outbox(self.node, max_entries=max_queue)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set while the outbox is empty
        self._drained.set()
        self._pub_ok = True  # the last publish attempt reached Redis
        self._watched: set[int] = set()
        self._pub: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._sub_ready = False
        self._tasks: list[asyncio.Task[None]] = []
        self._commands: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def dropped(self) -> int:
        """Messages dropped from the full outbox since start (never a notice)."""
        return self.outbox.dropped

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
        if self.outbox and self._pub_ok:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), flush_timeout)
        tasks = [*self._tasks, *self._commands]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pub is not None:
            await quietly_close(self._pub)

    def healthy(self) -> bool:
        return self._sub_ready

    # -- outgoing -------------------------------------------------------------------------------

    def publish(self, message: Message) -> None:
        self.outbox.message(message)
        self._queued()

    def signal(self, room_id: int, data: dict[str, Any]) -> None:
        self.outbox.signal(room_id, data)
        self._queued()

    def user_event(self, user: str, data: dict[str, Any]) -> None:
        self.outbox.user_event(user, data)
        self._queued()

    async def room_changed(self, room_id: int) -> None:
        self.handlers.room_changed(room_id)  # locally at once, even if Redis is down
        self.outbox.notice(room_id)
        self._queued()

    def _queued(self) -> None:
        self._drained.clear()
        self._wake.set()

    def _channel(self, room_id: int | None) -> str:
        return self.control if room_id is None else f"{self.room_prefix}{room_id}"

    async def _publisher(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.outbox:
                packets = self.outbox.take()
                try:
                    await self._send(packets)
                except (RedisError, OSError) as exc:
                    self._pub_ok = False
                    self.outbox.put_back(packets)
                    log.warning("redis publish failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                if not self._pub_ok:
                    log.warning(
                        "redis publishing again; %d messages dropped from the full publish "
                        "queue so far (receivers recover them from storage)",
                        self.outbox.dropped,
                    )
                self._pub_ok = True
                backoff = 0.1
            self._drained.set()

    async def _send(self, packets: list[Packet]) -> None:
        """One pipeline, one round trip: notices first (``take`` puts them there)."""
        assert self._pub is not None
        async with self._pub.pipeline(transaction=False) as pipe:
            for packet in packets:
                pipe.publish(self._channel(packet.room_id), packet.payload)
            await pipe.execute()

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
                # Rooms watched meanwhile may have been subscribed by neither path.
                for room_id in self._watched - rooms:
                    await pubsub.subscribe(f"{self.room_prefix}{room_id}")
                while True:
                    item = await pubsub.get_message(timeout=1.0)
                    if item is not None:
                        self.dispatch(item)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._sub_ready = False
                log.warning("redis subscriber lost (%s); reconnecting in %.1fs", exc, backoff)
            finally:
                self._sub_ready = False
                self._pubsub = None
                await quietly_close(pubsub, client)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def dispatch(self, item: dict[str, Any]) -> None:
        """One pub/sub event from the subscriber connection."""
        kind = item.get("type")
        channel = item.get("channel", b"")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == "subscribe":
            if name == self.control:
                self.missed_notices()
            elif name.startswith(self.room_prefix):
                # Anything published before the subscription took effect is in storage.
                self.handlers.resync(int(name[len(self.room_prefix) :]))
            return
        if kind != "message":
            return
        try:
            hand_over(item["data"], self.outbox.head, self.handlers)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed relay payload on %s: %s", name, exc)

    def missed_notices(self) -> None:
        """The control channel is (again) subscribed: re-check every watched room."""
        recheck_watched(self.handlers, self._watched)
