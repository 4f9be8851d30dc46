"""The composition root: builds storage, relay, hub, the WebSocket server and the HTTP side-port
from a Config, starts them in order and stops them in reverse. Nothing else wires parts together.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from nanomsg.auth import Verifier
from nanomsg.clock import Clock, SystemClock
from nanomsg.codec import receipt
from nanomsg.config import Config, ConfigError
from nanomsg.fanout import Hub
from nanomsg.http_api import build_http_app
from nanomsg.http_guard import ConnectionGuard, GuardedSite, server_log
from nanomsg.receipts import Receipts
from nanomsg.relay.base import Relay, RelayHandlers
from nanomsg.relay.memory import MemoryRelay
from nanomsg.relay.redis import RedisRelay
from nanomsg.relay.redis_cluster import RedisClusterRelay
from nanomsg.store.base import Store
from nanomsg.store.factory import store_from_url
from nanomsg.store.writer import BatchWriter
from nanomsg.usecases import ReadReceipts, UseCases
from nanomsg.ws_server import WsServer

log = logging.getLogger(__name__)


def build_verifier(config: Config, clock: Clock) -> Verifier:
    """The token verifier; a missing or unusable key file is a ConfigError naming the variable."""
    try:
        pem = Path(config.jwt_public_key).read_bytes() if config.jwt_public_key else b""
    except OSError as exc:
        raise ConfigError(
            f"NANOMSG_JWT_PUBLIC_KEY: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    try:
        return Verifier.from_material(
            clock=clock,
            secret=config.jwt_secret,
            public_key_pem=pem,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
        )
    except ValueError as exc:
        raise ConfigError(f"NANOMSG_JWT_PUBLIC_KEY: {exc}") from None


def build_usecases(
    store: Store,
    clock: Clock,
    *,
    writer: BatchWriter,
    hub: Hub,
    receipts: ReadReceipts | None = None,
    relay: Relay | None = None,
) -> UseCases:
    """The one use-case layer of a process, with every collaborator: the batching writer and
    the hub (publisher, user events, kept rules), the receipt coalescer, and the relay's
    change notice (``room_changed``: this process at once, then the others). ``App`` hands
    the same instance to the WebSocket server and to the HTTP side-port; tests that build a
    ``WsServer`` alone wire it the same way (without a relay: rules kept by the hub are then
    refreshed by nothing but the hub's own re-checks)."""
    return UseCases(
        store,
        clock,
        writer=writer,
        publisher=hub,
        receipts=receipts,
        users=hub,
        kept_rules=hub.cached_access,
        notify_room_changed=relay.room_changed if relay is not None else None,
    )


def url_host(host: str) -> str:
    """A host as it appears in a URL: IPv6 literals get brackets."""
    return f"[{host}]" if ":" in host else host


class App:
    """One nanomsg process."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.verifier = build_verifier(config, self.clock)
        self.store: Store = store_from_url(
            config.database_url,
            pg_pool_size=config.pg_pool_size,
            list_cache_bytes=config.list_cache_mb << 20,
        )
        self.writer = BatchWriter(
            self.store, shards=config.write_shards, max_batch=config.write_batch
        )
        self.hub = Hub(self.store)
        handlers = RelayHandlers(
            message=self.hub.deliver,
            room_changed=self.hub.room_changed,
            resync=self.hub.resync,
            signal=self.hub.deliver_signal,
            user_event=self.hub.deliver_user_event,
        )
        self.relay: Relay
        if config.redis_cluster:
            self.relay = RedisClusterRelay(config.redis_url, handlers, prefix=config.redis_prefix)
        elif config.redis_url:
            self.relay = RedisRelay(config.redis_url, handlers, prefix=config.redis_prefix)
        else:
            self.relay = MemoryRelay(handlers)
        self.hub.attach(self.relay)
        # Read receipts, coalesced once here for both drivers, then sent through the hub
        # (this process's subscribers) and the relay's signal path (the other processes).
        self.receipts = Receipts(
            self.clock,
            lambda room_id, user, seq: self.hub.signal(room_id, receipt(room_id, user, seq)),
        )
        # One use-case layer for both drivers: a rule, and the rules kept for live rooms,
        # are the same over the WebSocket and over HTTP.
        self.usecases = build_usecases(
            self.store,
            self.clock,
            writer=self.writer,
            hub=self.hub,
            receipts=self.receipts,
            relay=self.relay,
        )
        self.node_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.ws = WsServer(
            config=config,
            hub=self.hub,
            store=self.store,
            writer=self.writer,
            verifier=self.verifier,
            clock=self.clock,
            usecases=self.usecases,
            node_id=self.node_id,
        )
        self.http_guard = ConnectionGuard(
            header_timeout=config.http_header_timeout,
            body_timeout=config.http_body_timeout,
            max_connections=config.http_max_connections,
        )
        self.http_app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None

    async def readiness(self) -> dict[str, bool]:
        return {"storage": await self.store.ping(), "broker": self.relay.healthy()}

    async def start(self) -> None:
        await self.store.open()
        await self.relay.start()
        self.writer.start()
        self.hub.start()
        await self.ws.start(self.config.host, self.config.port)
        self.http_app = http_app = build_http_app(
            store=self.store,
            verifier=self.verifier,
            clock=self.clock,
            config=self.config,
            readiness=self.readiness,
            closes=lambda: self.ws.closes,
            usecases=self.usecases,
        )
        self._runner = web.AppRunner(
            http_app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=5.0,
            logger=server_log(),
        )
        await self._runner.setup()
        self._site = GuardedSite(
            self._runner,
            self.config.host,
            self.config.http_port,
            guard=self.http_guard,
            reuse_port=self.config.reuse_port,
        )
        await self._site.start()
        host = url_host(self.config.host)
        log.info(
            "nanomsg listening: ws://%s:%d/chat, http://%s:%d",
            host,
            self.ws_port,
            host,
            self.http_port,
        )

    @property
    def ws_port(self) -> int:
        return self.ws.port

    @property
    def http_port(self) -> int:
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("HTTP side-port not started")

    async def stop(self) -> None:
        """Stop in reverse order of start, all within ``--shutdown-timeout``.

        The WebSocket server gets most of the budget (sends in flight finish, then 1001);
        the relay then flushes what it still has to publish; storage closes last.
        """
        loop = asyncio.get_running_loop()
        budget = self.config.shutdown_timeout
        deadline = loop.time() + budget
        ws_budget = max(budget - 2.0, budget * 0.6)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("websocket server", lambda: self.ws.stop(ws_budget)),
            ("http side-port", self._stop_http),
            ("message writer", self.writer.close),
            ("hub", self._close_hub),
            ("relay", self.relay.close),
            ("storage", self.store.close),
        ]
        for name, step in steps:
            left = max(deadline - loop.time(), 0.1)
            try:
                await asyncio.wait_for(step(), left)
            except TimeoutError:
                log.error("shutdown: %s did not stop in time", name)

    async def _close_hub(self) -> None:
        self.receipts.close()
        await self.hub.close()

    async def _stop_http(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# Allocations (less deallocations) of container objects between two young collections of a
# server process; CPython's default is 700. A 1 000-room conversation list keeps ~4 000
# containers alive while it is written: at 700 it ran ~4 young collections and a third of an
# older one per answer, each walking the rows still alive (0.7-0.9 ms of ~7 ms of CPU per
# answer); at 10 000 none. Garbage without cycles is freed by reference counting whatever
# the threshold; only cyclic garbage waits longer (at most this many objects).
YOUNG_COLLECTION_THRESHOLD = 10_000


def tune_collector() -> None:
    """Set what startup made (modules, the app's parts, which live as long as the process)
    aside from the garbage collector, once the server has started, so that a full collection
    walks only the objects made since; and collect the young generation less often
    (``YOUNG_COLLECTION_THRESHOLD``). For a server process (``nanomsg serve``) only: both
    settings are process-wide."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then shut down cleanly."""
    app = App(config)
    await app.start()
    tune_collector()
    try:
        await stop.wait()
    finally:
        await app.stop()
