"""The /chat WebSocket shell: plain asyncio Protocols driving websockets' sans-I/O
``ServerProtocol`` and the pure ``Session``; no task per connection.

websockets does the handshake, framing, ping/pong replies and the close handshake. This module
owns what the library leaves to its caller: path routing, fragment reassembly, UTF-8 checks,
keepalive, close timeouts, inbound backpressure (one command at a time per connection, reading
paused while commands pile up) and outbound limits (a reader whose backlog passes
``max_backlog`` is closed with 4000).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from nanomsg import codec
from nanomsg.auth import Verifier
from nanomsg.clock import Clock
from nanomsg.config import Config
from nanomsg.events import (
    Arm,
    BadJson,
    Close,
    Command,
    Disarm,
    Effect,
    EndReplay,
    HistoryLoaded,
    Join,
    Leave,
    LoadHistory,
    LoadRoom,
    MessageStored,
    Publish,
    Replayed,
    Result,
    RoomLoaded,
    RoomMissing,
    Send,
    SetReceiving,
    StorageFailed,
    StoreMessage,
    Timer,
)
from nanomsg.fanout import Hub, text_frame
from nanomsg.models import RoomAccess
from nanomsg.session import CloseCode, Limits, Session
from nanomsg.store.base import HistoryQuery, RoomGone, Store, StoreUnavailable

log = logging.getLogger(__name__)

PATH = "/chat"
INBOX_PAUSE = 32  # commands queued behind a slow store operation before we stop reading
INBOX_RESUME = 8
CLOSE_TIMEOUT = 3.0  # seconds to wait for the client's close frame before dropping the socket


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP upgrade, then WebSocket frames in, session effects out."""

    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.ws = ServerProtocol(max_size=server.config.max_frame, logger=_quiet)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.fragments: list[bytes] = []
        self.fragment_binary = False
        self.inbox: deque[Command] = deque()
        self.busy = False
        self.paused = False
        self.draining = False  # shutting down: no new commands are started
        self.receiving = True
        self.closing = False
        self.joined: int | None = None
        # Resume: live frames held while the replay is read, and the seq the client already has.
        self.held: list[bytes] | None = None
        self.held_bytes = 0
        self.min_seq = 0
        self.pong_pending = False
        self.timers: dict[Timer | None, asyncio.TimerHandle] = {}

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        # Until the session arms its own auth timer, bound the handshake itself.
        self._arm(None, self.server.config.auth_timeout)

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        self.closing = True
        if self.joined is not None:
            self.server.hub.leave(self, self.joined)
            self.joined = None
        self.server.forget(self)

    # -- receiving ----------------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def _handshake(self, request: Request) -> None:
        if request.path.split("?", 1)[0] != PATH:
            self.ws.send_response(self.ws.reject(404, "Not Found: the WebSocket path is /chat\n"))
            return
        response = self.ws.accept(request)
        if response.status_code == 101:
            # Which process serves this connection: for operators, and for the worker tests.
            response.headers["X-Nanomsg-Node"] = self.server.node_id
        self.ws.send_response(response)
        if response.status_code != 101:
            return
        self._disarm(None)
        self.session = Session(self.server.verifier, self.server.clock, self.server.limits)
        self._flush()
        self.apply(self.session.start())

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = bytes(frame.data)
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.fragment_binary = opcode is Opcode.BINARY
            if not frame.fin:
                self.fragments = [data]
                return
            self._message(data)
        elif opcode is Opcode.CONT:
            self.fragments.append(data)
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), []
                self._message(data)
        elif opcode is Opcode.PONG:
            self.pong_pending = False
        elif opcode is Opcode.CLOSE:
            # The library answered with a close frame and EOF; stop writing room traffic.
            self.closing = True

    def _message(self, data: bytes) -> None:
        if self.closing or self.session is None:
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if self.fragment_binary:
                self.inbox.append(BadJson())
                self._pump()
            else:
                self.close(CloseCode.INVALID_UTF8, "text frame is not valid UTF-8")
            return
        self.inbox.append(codec.decode(text, max_content=self.server.config.max_content))
        if len(self.inbox) >= INBOX_PAUSE and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._pump()

    def _pump(self) -> None:
        """Hand queued commands to the session one at a time (storage ops finish in order)."""
        while (
            not self.busy
            and self.inbox
            and self.session is not None
            and not self.closing
            and not self.draining
        ):
            self.apply(self.session.receive(self.inbox.popleft()))
        if self.draining:
            return
        if self.paused and len(self.inbox) <= INBOX_RESUME and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # -- effects ------------------------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self._write(text_frame(effect.payload))
            elif isinstance(effect, Publish):
                self.server.hub.publish(effect.message)
            elif isinstance(effect, Join):
                self._join(effect)
            elif isinstance(effect, EndReplay):
                held, self.held, self.held_bytes = self.held or [], None, 0
                for frame in held:
                    self._write(frame)
            elif isinstance(effect, Leave):
                self.server.hub.leave(self, effect.room_id)
                self.joined, self.held, self.held_bytes = None, None, 0
            elif isinstance(effect, LoadRoom | StoreMessage | LoadHistory):
                self.busy = True
                self.server.spawn(self._run(effect))
            elif isinstance(effect, Arm):
                self._arm(effect.timer, effect.at - self.server.clock.wall())
            elif isinstance(effect, Disarm):
                self._disarm(effect.timer)
            elif isinstance(effect, SetReceiving):
                self.receiving = effect.on
            elif isinstance(effect, Close):
                self.close(effect.code, effect.reason)

    def _join(self, join: Join) -> None:
        self.joined = join.room_id
        live_from = self.server.hub.join(self, join.room_id, join.last_seq)
        self.min_seq = join.since or 0
        if join.since is None:
            return
        # Replay seqs since+1 .. live_from-1 from storage; live frames from live_from are held
        # until the replay is written, so the client sees no gap and no duplicate.
        self.held, self.held_bytes = [], 0
        self.busy = True
        self.server.spawn(self._run(_Replay(join.room_id, join.since, live_from)))

    async def _run(self, effect: LoadRoom | StoreMessage | LoadHistory | _Replay) -> None:
        store = self.server.store
        result: Result
        try:
            if isinstance(effect, LoadRoom):
                result = RoomLoaded(effect.room_id, await store.room_access(effect.room_id))
            elif isinstance(effect, StoreMessage):
                message, created = await store.append_message(effect.new)
                result = MessageStored(message, created)
            elif isinstance(effect, LoadHistory):
                result = HistoryLoaded(tuple(await store.history(effect.query)))
            else:
                result = await effect.load(store, self.server.config.resume_cap)
        except StoreUnavailable:
            result = StorageFailed()
        except RoomGone:
            room_id = effect.new.room_id if isinstance(effect, StoreMessage) else 0
            result = RoomMissing(room_id)
        except Exception:
            log.exception("storage operation failed unexpectedly")
            result = StorageFailed()
        finally:
            self.busy = False
        if self.session is not None and not self.closing:
            self.apply(self.session.result(result))
            self._pump()

    def _arm(self, timer: Timer | None, delay: float) -> None:
        self._disarm(timer)
        loop = asyncio.get_running_loop()
        self.timers[timer] = loop.call_later(max(delay, 0.0), self._fire, timer)

    def _disarm(self, timer: Timer | None) -> None:
        handle = self.timers.pop(timer, None)
        if handle is not None:
            handle.cancel()

    def _fire(self, timer: Timer | None) -> None:
        self.timers.pop(timer, None)
        if timer is None:  # handshake or close handshake never finished
            if self.transport is not None:
                self.transport.abort()
            return
        if self.session is not None:
            self.apply(self.session.timer_fired(timer))

    # -- sending ------------------------------------------------------------------------------

    def write_frame(self, frame: bytes, seq: int) -> None:
        """A room message from the hub (``fanout.Receiver``)."""
        if not self.receiving or self.closing or seq <= self.min_seq:
            return
        if self.held is None:
            self._write(frame)
            return
        self.held.append(frame)
        self.held_bytes += len(frame)
        if self.held_bytes > self.server.config.max_backlog:
            self.close(CloseCode.SLOW_CONSUMER, "backlog over limit")

    def reauthorize(self, access: RoomAccess | None) -> None:
        if self.session is not None and not self.closing:
            self.apply(self.session.reauthorize(access))

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.server.config.max_backlog:
            log.info(
                "closing a slow consumer (backlog over %d bytes)", self.server.config.max_backlog
            )
            self.close(CloseCode.SLOW_CONSUMER, "backlog over limit")

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:  # the library's end-of-stream marker: the server closes TCP now
                transport.close()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; drop the socket if the client does not answer."""
        if self.closing or self.ws.state is not WsState.OPEN:
            return
        if self.joined is not None:
            self.server.hub.leave(self, self.joined)
            self.joined = None
        self.ws.send_close(code, reason)
        self._flush()
        self.closing = True
        self._arm(None, CLOSE_TIMEOUT)

    def drain(self) -> None:
        """Shutdown: read nothing more and start no new command (queued ones were never
        acknowledged, so dropping them loses nothing); the one in flight completes."""
        self.draining = True
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def ping(self) -> None:
        """Keepalive: a connection that has not answered the previous ping is dropped."""
        if self.session is None or self.closing or self.ws.state is not WsState.OPEN:
            return
        if self.pong_pending:
            self.close(CloseCode.PING_TIMEOUT, "no pong")
            return
        self.pong_pending = True
        self.ws.send_ping(b"nanomsg")
        self._flush()


@dataclass(frozen=True, slots=True)
class _Replay:
    """Read what a resuming connection missed: seq in (since, live_from), the latest ``cap``."""

    room_id: int
    since: int
    live_from: int

    async def load(self, store: Store, cap: int) -> Replayed:
        missed = max(self.live_from - 1 - self.since, 0)
        if missed == 0:
            return Replayed(self.room_id, (), True)
        query = HistoryQuery(
            room_id=self.room_id,
            limit=min(missed, cap),
            after=self.since,
            before=self.live_from,
            newest=True,
        )
        return Replayed(self.room_id, tuple(await store.history(query)), missed <= cap)


class _QuietLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every open and close at INFO; per-connection lines stay at DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING:
            super().log(level, msg, *args, **kwargs)
        elif self.logger.isEnabledFor(logging.DEBUG):
            super().log(logging.DEBUG, msg, *args, **kwargs)


_quiet = _QuietLogger(logging.getLogger("websockets.server"), {})


class WsServer:
    """Owns the listening socket, the live connections, their storage tasks and keepalive."""

    def __init__(
        self,
        *,
        config: Config,
        hub: Hub,
        store: Store,
        verifier: Verifier,
        clock: Clock,
        node_id: str = "",
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.hub = hub
        self.store = store
        self.verifier = verifier
        self.clock = clock
        self.limits = Limits(auth_timeout=config.auth_timeout, refresh_grace=config.refresh_grace)
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._all_gone = asyncio.Event()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_gone.set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            host,
            port,
            backlog=2048,
            reuse_port=self.config.reuse_port or None,
        )
        if self.config.ping_interval > 0:
            self._keepalive = loop.create_task(self._ping_loop(), name="ws-keepalive")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval)
            for conn in list(self.connections):
                conn.ping()

    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop within ``timeout``: stop accepting and reading, let every storage
        operation in flight finish (so each send either was acknowledged or never happened),
        then close every connection with 1001."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._server is not None:
            self._server.close()
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
        for conn in list(self.connections):
            conn.drain()
        # Keep a second (or a fifth of the budget) for the closing handshakes.
        close_budget = min(1.0, timeout / 5)
        while self._tasks and loop.time() < deadline - close_budget:
            await asyncio.wait(list(self._tasks), timeout=deadline - close_budget - loop.time())
        self._all_gone.clear()
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), max(deadline - loop.time(), 0.05))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
