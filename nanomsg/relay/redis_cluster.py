"""Relay through a Redis Cluster with sharded pub/sub (SSUBSCRIBE / SPUBLISH).

Same channels, payloads and guarantees as :mod:`nanomsg.relay.redis` (``<prefix>:room:<id>``
for a room's stored messages, ``<prefix>:control`` for room-change notices, every payload a
relay envelope of :mod:`nanomsg.relay.envelope` naming the sending node), but each channel
lives on the shard that owns its hash slot, so relay traffic spreads over the cluster's masters
instead of being copied to every node as classic PUBLISH is in a cluster.

Topology: ``redis.asyncio.cluster.RedisCluster`` (started from the one node ``--redis-url``
names) loads the slot map with CLUSTER SLOTS and keeps every discovered node as a startup node,
so the map can be reloaded while the configured node is down. The map is reloaded whenever
something suggests it changed: a subscriber or publisher connection failed, a reply was MOVED
or ASK, or a server dropped one of our subscriptions on its own (it does that when a slot
moves away). Only the slot map is taken from the library. Its async ``ClusterPubSub`` does
support SSUBSCRIBE, but ``get_sharded_message`` waits on one node's connection after another
(a message on one shard waits out the others' timeouts) and reconnects inside redis-py's retry
loop, so neither per-shard health nor this relay's backoff and resync could be expressed with
it; subscriptions therefore run on plain per-node ``redis.asyncio`` PubSub connections.

Subscribing: one ``_Shard`` per master that owns at least one wanted channel (the control
channel, which every process wants, and the channel of every watched room). It keeps a single
connection SSUBSCRIBEd to its channels, one command per channel (a multi-channel SSUBSCRIBE
must stay within one slot). When the connection fails, that shard alone is marked down,
backs off, asks for a fresh slot map and reconnects; every channel it SSUBSCRIBEs again is
confirmed by the server, and each room confirmation calls ``handlers.resync(room)`` (anything
published meanwhile is in storage), exactly as the first confirmation does. Every confirmation
of the control channel re-checks all watched rooms with ``handlers.room_changed``, since
notices published while it was down are gone. Channels whose slot moved are moved to the
connection of their new owner. A quiet connection is pinged, so a dead peer is noticed even
without a reset.

Publishing: as in RedisRelay, ``publish`` and ``room_changed`` only add to the shared outbox
(:mod:`nanomsg.relay.outbox`: notices apart, coalesced by room and never dropped; messages
bounded, the oldest dropped and counted when full, since receivers recover them from storage).
The publisher takes the outbox as packets (notices first, one payload per room) and sends them
as one pipeline of SPUBLISH per owning master (at most ``MAX_BATCH`` each), all masters
concurrently; what a master could not take goes back to the outbox, ahead of newer entries, and
that master alone backs off, so one shard being down does not hold back the others. ``close``
first gives the queue a moment to reach the masters that are up, as RedisRelay does.

Every network wait has a timeout, every task belongs to the relay and is cancelled by
``close``, and closing never waits on a dead connection for more than a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, RedisClusterException, RedisError

from nanomsg.config import ConfigError
from nanomsg.models import Message
from nanomsg.relay.base import RelayHandlers, recheck_watched
from nanomsg.relay.envelope import hand_over
from nanomsg.relay.outbox import MAX_ENTRIES, Outbox, Packet
from nanomsg.relay.redis import quietly_close

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # one TCP connect to one node
COMMAND_TIMEOUT = 5.0  # one command or pipeline round trip
TOPOLOGY_TIMEOUT = 10.0  # one slot-map load, which may try several nodes in turn
READ_POLL = 1.0  # longest single wait for a pub/sub message
KEEPALIVE = 5.0  # a subscriber connection quiet this long is pinged; twice this long, dead
MIN_REFRESH_GAP = 0.2  # slot-map reloads asked for within this window are done once
MAX_BATCH = 1000  # most publishes sent to one master in one pipeline

# What a broken connection, a refused command or an unreachable cluster raises.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


def node_url(url: str, host: str, port: int) -> str:
    """``url`` pointed at another node: same scheme, credentials and options."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{address}" if userinfo else address))


def _no_retry() -> Retry:
    """No retries inside redis-py: the relay's own loops notice failures, back off, refresh
    the slot map and reconnect, and must see every failure to resynchronise afterwards."""
    return Retry(NoBackoff(), 0, supported_errors=())


class _Shard:
    """One subscriber connection to one master, SSUBSCRIBEd to the wanted channels whose slots
    that master owns. Its task reconnects with backoff until the relay retires it."""

    def __init__(self, relay: RedisClusterRelay, node: ClusterNode) -> None:
        self.relay = relay
        self.name: str = node.name
        self.url = node_url(relay.url, node.host, int(node.port))
        self.wanted: set[str] = set()  # channels this shard should be subscribed to
        self.up = False  # connected, every wanted channel sent, reader alive
        self._subscribed: set[str] = set()  # channels SSUBSCRIBEd on the current connection
        self._changed = asyncio.Event()  # wanted changed, or the reader stopped
        self._backoff = 0.1
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._run(), name=f"redis-shard-{self.name}"
        )

    def want(self, channel: str) -> None:
        self.wanted.add(channel)
        self._changed.set()

    def unwant(self, channel: str) -> None:
        self.wanted.discard(channel)
        self._changed.set()

    def forget(self, channel: str) -> None:
        """The server no longer has this subscription (its slot moved): never SUNSUBSCRIBE it
        here, which that server would refuse with MOVED."""
        self._subscribed.discard(channel)

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except NETWORK_ERRORS as exc:
                log.warning(
                    "redis shard %s subscriber lost (%s); reconnecting in %.1fs",
                    self.name,
                    exc,
                    self._backoff,
                )
            # A failed master may have been replaced by a replica, or its slots moved.
            self.relay.request_refresh()
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, self.relay.max_backoff)

    async def _session(self) -> None:
        """One connection: subscribe what is wanted, follow changes, until something breaks."""
        client = self.relay.node_client(self.url)
        pubsub = client.pubsub()
        self._subscribed = set()
        reader: asyncio.Task[None] | None = None
        try:
            # Connect before the first SSUBSCRIBE so the reader always has a connection.
            # (redis-py leaves PubSub.connect unannotated.)
            await asyncio.wait_for(pubsub.connect(), COMMAND_TIMEOUT)  # type: ignore[no-untyped-call]
            reader = asyncio.get_running_loop().create_task(
                self._read(pubsub), name=f"redis-shard-reader-{self.name}"
            )
            while True:
                if reader.done():
                    reader.result()  # raises what stopped it
                    raise ConnectionError(f"subscriber reader for {self.name} stopped")
                self._changed.clear()
                await self._apply(pubsub)
                self.up = True
                await self._changed.wait()
        finally:
            self.up = False
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            await quietly_close(pubsub, client)

    async def _apply(self, pubsub: PubSub) -> None:
        """Bring the connection's subscriptions in line with ``wanted``, one channel per
        command (a multi-channel SSUBSCRIBE is refused unless all share one slot)."""
        for channel in sorted(self.wanted - self._subscribed):
            await asyncio.wait_for(pubsub.ssubscribe(channel), COMMAND_TIMEOUT)
            self._subscribed.add(channel)
        for channel in sorted(self._subscribed - self.wanted):
            await asyncio.wait_for(pubsub.sunsubscribe(channel), COMMAND_TIMEOUT)
            self._subscribed.discard(channel)

    async def _read(self, pubsub: PubSub) -> None:
        """Hand every message to the relay; ping when quiet, so a dead peer is noticed."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        try:
            while True:
                try:
                    item = await pubsub.get_message(timeout=READ_POLL)
                except AskError as exc:
                    # MOVED/ASK answering one of our (S)SUBSCRIBEs: the slot map was stale.
                    # The connection itself is fine.
                    self.relay.misrouted(self, exc.slot_id)
                    continue
                now = loop.time()
                if item is not None:
                    heard, pinged = now, False
                    if item.get("type") == "ssubscribe":
                        # The server took a subscription: only now is the connection known to
                        # work (a node still joining the cluster accepts connections but
                        # refuses SSUBSCRIBE with CLUSTERDOWN).
                        self._backoff = 0.1
                    self.relay.dispatch(self, item)
                elif now - heard > 2 * KEEPALIVE:
                    raise TimeoutError(f"no reply from {self.name} for {now - heard:.0f}s")
                elif now - heard > KEEPALIVE and not pinged:
                    await asyncio.wait_for(pubsub.ping(), COMMAND_TIMEOUT)
                    pinged = True
        finally:
            self._changed.set()  # wake the session so it sees the reader has stopped


class RedisClusterRelay:
    """Relay over a Redis Cluster's sharded pub/sub; ``url`` names any one of its nodes."""

    def __init__(
        self,
        url: str,
        handlers: RelayHandlers,
        *,
        prefix: str = "nanomsg",
        max_queue: int = MAX_ENTRIES,
        max_backoff: float = 5.0,
    ) -> None:
        if urlsplit(url).scheme not in ("redis", "rediss"):
            raise ConfigError(
                "NANOMSG_REDIS_URL must start with redis:// or rediss:// when "
                "NANOMSG_REDIS_CLUSTER is set (a cluster is reached over TCP)"
            )
        self.url = url
        self.handlers = handlers
        self.node = uuid.uuid4().hex
        self.room_prefix = f"{prefix}:room:"
        self.control = f"{prefix}:control"
        self.max_backoff = max_backoff
        self.outbox = Outbox(self.node, max_entries=max_queue)
        self._wake = asyncio.Event()  # something to publish, or a new slot map
        self._settled = asyncio.Event()  # nothing queued that a reachable master could take
        self._settled.set()
        self._refresh = asyncio.Event()  # the slot map may be stale
        self._cluster: RedisCluster | None = None
        self._mapped = False  # a slot map has been loaded
        self._watched: set[int] = set()
        self._assigned: dict[str, str] = {}  # wanted channel -> name of its shard
        self._shards: dict[str, _Shard] = {}  # master name -> its subscriber
        self._retiring: set[asyncio.Task[None]] = set()  # shards no longer needed, closing
        self._pub_clients: dict[str, aioredis.Redis] = {}  # master name -> publishing client
        self._pub_backoff: dict[str, tuple[float, float]] = {}  # name -> (retry at, delay)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def dropped(self) -> int:
        """Messages dropped from the full outbox since start (never a notice)."""
        return self.outbox.dropped

    def node_client(self, url: str) -> aioredis.Redis:
        """A client for one node, with bounded socket waits and no hidden retries."""
        return aioredis.Redis.from_url(
            url,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=0,
            retry=_no_retry(),
        )

    async def start(self) -> None:
        self._cluster = RedisCluster.from_url(
            self.url,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            # Keep serving the covered slots while some are not.
            require_full_coverage=False,
        )
        try:
            await self._load_map()
        except NETWORK_ERRORS as exc:
            log.warning(
                "redis cluster unreachable at start (%s); relaying will resume when it is up", exc
            )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._topology(), name="redis-cluster-topology"),
            loop.create_task(self._publisher(), name="redis-cluster-publisher"),
        ]

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Publish what is still queued for reachable masters (briefly), then stop every
        connection. Publishes held for a master that is failing are given up: the receivers
        recover them from storage."""
        self._closing = True
        if self.outbox:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), flush_timeout)
        shards = list(self._shards.values())
        self._shards.clear()
        self._assigned.clear()
        tasks = [*self._tasks, *(shard.task for shard in shards), *self._retiring]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await quietly_close(*self._pub_clients.values())
        self._pub_clients.clear()
        if self._cluster is not None:
            await quietly_close(self._cluster)

    def healthy(self) -> bool:
        """True when every wanted channel is placed on its owner's shard and every one of
        those shard connections is up."""
        return (
            self._mapped
            and not self._closing
            and len(self._assigned) == len(self._watched) + 1
            and all(shard.up for shard in self._shards.values())
        )

    # -- topology -------------------------------------------------------------------------------

    def request_refresh(self) -> None:
        """Ask for the slot map to be reloaded (coalesced; done by the topology task)."""
        self._refresh.set()

    async def _load_map(self) -> None:
        assert self._cluster is not None
        if self._mapped:
            await asyncio.wait_for(self._cluster.nodes_manager.initialize(), TOPOLOGY_TIMEOUT)
        else:
            await asyncio.wait_for(self._cluster.initialize(), TOPOLOGY_TIMEOUT)
        self._mapped = True
        if not self._closing:
            self._assign_all()
        self._wake.set()  # queued publishes may have an owner now

    async def _topology(self) -> None:
        """Load the slot map until it works, then reload it whenever asked, and move each
        channel to the shard that owns it."""
        backoff = 0.1
        while True:
            if self._mapped:
                await self._refresh.wait()
            self._refresh.clear()
            try:
                await self._load_map()
            except NETWORK_ERRORS as exc:
                log.warning(
                    "redis cluster topology refresh failed (%s); retrying in %.1fs", exc, backoff
                )
                self._refresh.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.1
            await asyncio.sleep(MIN_REFRESH_GAP)

    # -- subscriptions --------------------------------------------------------------------------

    def _channel(self, room_id: int) -> str:
        return f"{self.room_prefix}{room_id}"

    def watch(self, room_id: int) -> None:
        self._watched.add(room_id)
        if self._mapped and not self._closing:
            self._place(self._channel(room_id))

    def unwatch(self, room_id: int) -> None:
        self._watched.discard(room_id)
        if not self._closing:
            self._unassign(self._channel(room_id))

    def _assign_all(self) -> None:
        """Place every wanted channel on its owner per the current map; drop the rest."""
        wanted = {self.control, *(self._channel(room_id) for room_id in self._watched)}
        for channel in [c for c in self._assigned if c not in wanted]:
            self._unassign(channel)
        for channel in sorted(wanted):
            self._place(channel)

    def _place(self, channel: str) -> None:
        """Have the shard owning the channel's slot subscribe it (moving it if it moved)."""
        assert self._cluster is not None
        try:
            node = self._cluster.get_node_from_key(channel)
        except RedisClusterException:
            node = None  # slot not covered by the map we have
        if node is None:
            self._unassign(channel)
            self.request_refresh()
            return
        current = self._assigned.get(channel)
        if current == node.name:
            return
        if current is not None:
            self._unassign(channel)
        shard = self._shards.get(node.name)
        if shard is None:
            shard = self._shards[node.name] = _Shard(self, node)
        shard.want(channel)
        self._assigned[channel] = node.name

    def _unassign(self, channel: str) -> None:
        name = self._assigned.pop(channel, None)
        shard = self._shards.get(name) if name is not None else None
        if shard is None:
            return
        shard.unwant(channel)
        if not shard.wanted:
            # Nothing left on that master: close its connection.
            del self._shards[shard.name]
            shard.task.cancel()
            self._retiring.add(shard.task)
            shard.task.add_done_callback(self._retiring.discard)

    def misrouted(self, shard: _Shard, slot: int) -> None:
        """A shard's server redirected a subscription for ``slot``: take that slot's channels
        off the shard and place them again once the slot map is reloaded."""
        for channel in [c for c in shard.wanted if key_slot(c.encode()) == slot]:
            shard.forget(channel)
            self._unassign(channel)
        self.request_refresh()

    def dispatch(self, shard: _Shard, item: dict[str, Any]) -> None:
        """One pub/sub event from a shard's connection."""
        kind = item.get("type")
        raw = item.get("channel", b"")
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "smessage":
            self._received(channel, item.get("data"))
        elif kind == "ssubscribe":
            self._confirmed(channel)
        elif kind == "sunsubscribe" and channel in shard.wanted:
            # Not asked for: the server gave the slot away (resharding or failover).
            log.info("redis shard %s dropped %s; its slot moved", shard.name, channel)
            shard.forget(channel)
            self._unassign(channel)
            self.request_refresh()

    def _confirmed(self, channel: str) -> None:
        if channel == self.control:
            self.missed_notices()
        elif channel.startswith(self.room_prefix):
            # Anything published before the subscription took effect is in storage.
            self.handlers.resync(int(channel[len(self.room_prefix) :]))

    def missed_notices(self) -> None:
        """The control channel is (again) subscribed: re-check every watched room."""
        recheck_watched(self.handlers, self._watched)

    def _received(self, channel: str, data: Any) -> None:
        try:
            if not isinstance(data, bytes):
                raise TypeError(f"expected bytes, got {type(data).__name__}")
            hand_over(data, self.outbox.head, self.handlers)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed relay payload on %s: %s", channel, exc)

    # -- publishing -----------------------------------------------------------------------------

    def _queued(self) -> None:
        self._settled.clear()
        self._wake.set()

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

    def _packet_channel(self, packet: Packet) -> str:
        return self.control if packet.room_id is None else self._channel(packet.room_id)

    async def _publisher(self) -> None:
        delay: float | None = None
        while True:
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            delay = await self._flush()

    async def _flush(self) -> float | None:
        """Send the queue, one SPUBLISH pipeline per owning master, concurrently. Returns how
        long to wait before trying again what is left (None: wait for a wake-up)."""
        if not self.outbox or not self._mapped or self._cluster is None:
            self._settled.set()
            return None
        now = asyncio.get_running_loop().time()
        held: list[Packet] = []
        groups: dict[str, tuple[ClusterNode, list[Packet]]] = {}
        more = False  # some master has more than one pipeline's worth: go again at once
        for item in self.outbox.take():  # notices first: each group sends them first
            try:
                node = self._cluster.get_node_from_key(self._packet_channel(item))
            except RedisClusterException:
                node = None
            if node is None:
                held.append(item)  # the topology task wakes us when the map changes
                self.request_refresh()
            elif self._pub_backoff.get(node.name, (0.0, 0.0))[0] > now:
                held.append(item)
            else:
                group = groups.setdefault(node.name, (node, []))[1]
                if len(group) < MAX_BATCH:
                    group.append(item)
                else:
                    held.append(item)
                    more = True
        unsent = await asyncio.gather(*(self._send(node, items) for node, items in groups.values()))
        for items in unsent:
            held.extend(items)
        self.outbox.put_back(held)
        if more:
            return 0.0
        if not self._wake.is_set():
            # Nothing new arrived meanwhile: all that is left waits for a failing master.
            self._settled.set()
        if not self.outbox:
            return None
        now = asyncio.get_running_loop().time()
        waits = [until - now for until, _ in self._pub_backoff.values() if until > now]
        return max(min(waits), 0.01) if waits else None

    async def _send(self, node: ClusterNode, items: list[Packet]) -> list[Packet]:
        """One pipeline to one master; returns the items it did not take."""
        client = self._pub_clients.get(node.name)
        if client is None:
            client = self._pub_clients[node.name] = self.node_client(
                node_url(self.url, node.host, int(node.port))
            )
        try:
            async with client.pipeline(transaction=False) as pipe:
                for packet in items:
                    pipe.spublish(self._packet_channel(packet), packet.payload)
                results = await asyncio.wait_for(
                    pipe.execute(raise_on_error=False), COMMAND_TIMEOUT
                )
        except NETWORK_ERRORS as exc:
            delay = self._back_off(node.name)
            log.warning("redis publish to %s failed (%s); retrying in %.1fs", node.name, exc, delay)
            self.request_refresh()
            return items
        failed = [
            (item, result)
            for item, result in zip(items, results, strict=True)
            if isinstance(result, Exception)
        ]
        if not failed:
            self._pub_backoff.pop(node.name, None)
            return []
        # MOVED, ASK, CLUSTERDOWN, TRYAGAIN...: the map is stale or the shard is in transition.
        delay = self._back_off(node.name)
        log.warning(
            "redis refused %d publishes on %s (%s); retrying in %.1fs",
            len(failed),
            node.name,
            failed[0][1],
            delay,
        )
        self.request_refresh()
        return [item for item, _ in failed]

    def _back_off(self, name: str) -> float:
        _, previous = self._pub_backoff.get(name, (0.0, 0.0))
        delay = min(previous * 2, self.max_backoff) if previous else 0.1
        self._pub_backoff[name] = (asyncio.get_running_loop().time() + delay, delay)
        return delay
