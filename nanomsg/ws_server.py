"""The /chat WebSocket shell: plain asyncio Protocols driving websockets' sans-I/O
``ServerProtocol`` and the pure ``Session``; no task per connection.

websockets does the handshake, framing, ping/pong replies and the close handshake. This module
owns what the library leaves to its caller: path routing, fragment reassembly, UTF-8 checks,
keepalive, close timeouts, inbound backpressure (reading paused while commands pile up) and
outbound limits (a reader whose backlog passes ``max_backlog`` is closed with 4000).

Ordering and batching:

- **Pipelined sends.** Up to ``PIPELINE`` message sends of a connection are handed to the
  batching writer (``store.writer``) without waiting for each other, so one connection is not
  capped by commit latency; their results are applied strictly in the order of the commands.
  Every other command waits until the sends before it are answered, so replies still come in
  command order (protocol.md section 2).
- **Outbox.** Everything written to a connection during one pass of the event loop (replies,
  room messages, control frames) is appended to its outbox and written with one
  ``transport.write`` at the end of the pass: the cost of a delivery is one list append, and a
  connection owed ten messages costs one system call, not ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol as WsProtocol
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from nanomsg import codec
from nanomsg.auth import Verifier
from nanomsg.clock import Clock
from nanomsg.config import Config
from nanomsg.events import (
    Arm,
    AuthRefused,
    BadArgs,
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
    MessageRefused,
    MessageStored,
    Publish,
    Replayed,
    Result,
    RoomLoaded,
    RoomMissing,
    Send,
    SendMessage,
    SetReceiving,
    StorageFailed,
    StoreMessage,
    Timer,
    TooLarge,
    Unknown,
)
from nanomsg.fanout import DeflateCache, Hub, text_frame
from nanomsg.models import RoomAccess
from nanomsg.session import CloseCode, Limits, Session, State
from nanomsg.store.base import ContentRefused, HistoryQuery, RoomGone, Store, StoreUnavailable
from nanomsg.store.writer import BatchWriter, Stored

log = logging.getLogger(__name__)

PATH = "/chat"
INBOX_PAUSE = 32  # commands queued behind a slow store operation before we stop reading
INBOX_RESUME = 8
PIPELINE = 64  # message sends of one connection in flight at once
# Commands whose READY handler changes no session state (only Send or StoreMessage comes out),
# so they may be answered behind sends still in flight. Anything else is a barrier.
PIPELINABLE: frozenset[type] = frozenset({SendMessage, BadArgs, TooLarge, Unknown})
PING_SLICES = 20  # the keepalive sweep is spread over this many steps per interval
CLOSE_TIMEOUT = 3.0  # seconds to wait for the client's close frame before dropping the socket


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP upgrade, then WebSocket frames in, session effects out."""

    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.conn_id: str = server.new_conn_id()  # names the connection in the log
        self.ws = ServerProtocol(
            extensions=server.extensions, max_size=server.config.max_frame, logger=_quiet
        )
        self.deflate_bits: int | None = None  # permessage-deflate negotiated: window size
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.fragments: list[bytes] = []
        self.fragment_binary = False
        # Lists, not deques: both are nearly always empty, and an empty deque costs ~600 bytes
        # (it allocates a block up front), which is most of an idle connection's budget.
        self.inbox: list[Command] = []
        self.busy = False  # a LoadRoom / LoadHistory / replay is out: the next command waits
        # Sends in flight and the replies queued behind them, answered strictly in this order.
        self.pipeline: list[_InFlight | list[Effect]] = []
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
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
            for extension in self.ws.extensions:
                if isinstance(extension, PerMessageDeflate):
                    self.deflate_bits = extension.local_max_window_bits
        self.ws.send_response(response)
        if response.status_code != 101:
            return
        self._release_request()
        self._disarm(None)
        self.session = Session(self.server.verifier, self.server.clock, self.server.limits)
        self._flush()
        self.apply(self.session.start())

    def _release_request(self) -> None:
        """Let the parsed upgrade request go (~1.8 KB, a third of an idle connection).

        websockets' server parser is a generator that keeps the request as a local variable for
        the connection's whole life, although after the handshake it only parses frames. When
        no frame byte has arrived yet, it is suspended exactly where a fresh frame parser starts,
        so we swap in one (websockets itself swaps parsers this way when it closes).
        """
        ws = self.ws
        if ws.reader.buffer or ws.reader.eof:
            return  # frame bytes already consumed or pending: keep the original parser
        ws.parser = WsProtocol.parse(ws)
        next(ws.parser)

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
        """Hand queued commands to the session in order: sends may overlap (up to
        ``PIPELINE``), any other command waits for everything before it to be answered."""
        session = self.session
        while (
            not self.busy
            and self.inbox
            and session is not None
            and not self.closing
            and not self.draining
        ):
            if self.pipeline:
                command = self.inbox[0]
                if (
                    type(command) not in PIPELINABLE
                    or session.state is not State.READY
                    or len(self.pipeline) >= PIPELINE
                ):
                    break
                del self.inbox[0]
                for effect in session.receive(command):
                    if isinstance(effect, StoreMessage):
                        self._submit(effect)
                    else:  # a reply: it waits behind the sends in flight
                        self.pipeline.append([effect])
            else:
                self.apply(session.receive(self.inbox.pop(0)))
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
            elif isinstance(effect, StoreMessage):
                self._submit(effect)
            elif isinstance(effect, LoadRoom) and (
                cached := self.server.hub.cached_access(effect.room_id)
            ):
                # The room is live on this process: its rules are known and kept current.
                assert self.session is not None
                self.apply(self.session.result(RoomLoaded(effect.room_id, cached)))
            elif isinstance(effect, LoadRoom | LoadHistory):
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
            elif isinstance(effect, AuthRefused):
                log.info("connection %s: token refused: %s", self.conn_id, effect.reason)

    def _join(self, join: Join) -> None:
        self.joined = join.room_id
        live_from = self.server.hub.join(self, join.room_id, join.last_seq, join.access)
        self.min_seq = join.since or 0
        if join.since is None:
            return
        # Replay seqs since+1 .. live_from-1 from storage; live frames from live_from are held
        # until the replay is written, so the client sees no gap and no duplicate.
        self.held, self.held_bytes = [], 0
        self.busy = True
        self.server.spawn(self._run(_Replay(join.room_id, join.since, live_from)))

    def _submit(self, effect: StoreMessage) -> None:
        entry = _InFlight(self)
        self.pipeline.append(entry)
        self.server.writer.enqueue(effect.new, entry)

    def _advance(self) -> None:
        """Apply the results at the head of the pipeline that are ready, in command order."""
        pipeline = self.pipeline
        while pipeline:
            head = pipeline[0]
            if isinstance(head, list):
                del pipeline[0]
                if self.session is not None and not self.closing:
                    self.apply(head)
                continue
            result = head.result
            if result is None:
                break
            del pipeline[0]
            if self.session is not None and not self.closing:
                self.apply(self.session.result(result))
            elif isinstance(result, MessageStored) and result.created:
                # The sender is gone, but the message is stored: the room must still get it.
                self.server.hub.publish(result.message)
        self._pump()

    async def _run(self, effect: LoadRoom | LoadHistory | _Replay) -> None:
        store = self.server.store
        result: Result
        try:
            if isinstance(effect, LoadRoom):
                result = RoomLoaded(effect.room_id, await store.room_access(effect.room_id))
            elif isinstance(effect, LoadHistory):
                result = HistoryLoaded(tuple(await store.history(effect.query)))
            else:
                result = await effect.load(store, self.server.config.resume_cap)
        except StoreUnavailable:
            result = StorageFailed()
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
        """A room message from the hub (``fanout.Receiver``): the per-recipient hot path, so
        the outbox append of ``_write`` is inlined."""
        if seq <= self.min_seq or self.closing or not self.receiving:
            return
        if self.deflate_bits is not None:
            frame = self.server.deflate.deflated(frame, self.deflate_bits)
        if self.held is not None:
            self.held.append(frame)
            self.held_bytes += len(frame)
            if self.held_bytes > self.server.config.max_backlog:
                self.close(CloseCode.SLOW_CONSUMER, "backlog over limit")
            return
        outbox = self.outbox
        if not outbox:
            self.server.mark_dirty(self)
        outbox.append(frame)
        self.outbox_bytes += len(frame)
        if self.outbox_bytes > self.server.config.max_backlog:
            self._slow_consumer()

    def reauthorize(self, access: RoomAccess | None) -> None:
        if self.session is not None and not self.closing:
            self.apply(self.session.reauthorize(access))

    def _write(self, data: bytes) -> None:
        """Queue a frame in the outbox; the server writes all outboxes once per loop pass."""
        if self.closing or self.transport is None:
            return
        if not self.outbox:
            self.server.mark_dirty(self)
        self.outbox.append(data)
        self.outbox_bytes += len(data)
        if self.outbox_bytes > self.server.config.max_backlog:
            self._slow_consumer()

    def flush_outbox(self) -> None:
        """Write the whole outbox with one call (``WsServer`` calls this once per loop pass)."""
        outbox = self.outbox
        if not outbox:
            return
        transport = self.transport
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        self.outbox, self.outbox_bytes = [], 0
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self.server.config.max_backlog:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        log.info("closing a slow consumer (backlog over %d bytes)", self.server.config.max_backlog)
        # What is queued will not be read in time anyway; the close frame goes first.
        self.outbox, self.outbox_bytes = [], 0
        self.close(CloseCode.SLOW_CONSUMER, "backlog over limit")

    def _flush(self) -> None:
        """Write what the websockets protocol has to send (handshake, pong, close), after the
        outbox so that frames keep the order in which they were produced."""
        transport = self.transport
        if transport is None:
            return
        self.flush_outbox()
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


@dataclass(eq=False, slots=True)
class _InFlight:
    """A send handed to the batching writer; called with its outcome after the commit."""

    conn: Connection
    result: Result | None = None

    def __call__(self, outcome: Stored | Exception) -> None:
        if isinstance(outcome, tuple):
            self.result = MessageStored(*outcome)
        elif isinstance(outcome, RoomGone):
            self.result = RoomMissing(int(outcome.args[0]) if outcome.args else 0)
        elif isinstance(outcome, ContentRefused):
            self.result = MessageRefused("content refused by storage")
        else:
            if not isinstance(outcome, StoreUnavailable):
                log.error("storing a message failed unexpectedly", exc_info=outcome)
            self.result = StorageFailed()
        self.conn._advance()


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
        writer: BatchWriter,
        verifier: Verifier,
        clock: Clock,
        node_id: str = "",
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.hub = hub
        self.store = store
        self.writer = writer
        self.verifier = verifier
        self.clock = clock
        self.limits = Limits(auth_timeout=config.auth_timeout, refresh_grace=config.refresh_grace)
        self.connections: set[Connection] = set()
        self._conn_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._all_gone = asyncio.Event()
        self._dirty: list[Connection] = []
        self.deflate = DeflateCache()
        # Off by default: a compressing connection costs memory and CPU for little gain on
        # short chat messages. When on, the server compresses without context takeover, so a
        # room message is compressed once for all its receivers (fanout.DeflateCache), and asks
        # clients to do the same, so no connection keeps a zlib context between messages.
        self.extensions: list[ServerExtensionFactory] | None = (
            [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    client_no_context_takeover=True,
                    compress_settings={"memLevel": 5},
                )
            ]
            if config.compression
            else None
        )
        self._flush_handle: asyncio.Handle | None = None

    def new_conn_id(self) -> str:
        """A name for a new connection, unique on this process (node id, then a counter)."""
        number = next(self._conn_ids)
        return f"{self.node_id}-{number}" if self.node_id else str(number)

    def mark_dirty(self, conn: Connection) -> None:
        """``conn`` has an outbox to write: flush all such at the end of this loop pass."""
        self._dirty.append(conn)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        dirty, self._dirty, self._flush_handle = self._dirty, [], None
        for conn in dirty:
            conn.flush_outbox()

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
        """Ping every connection once per ``ping_interval``, spread over the interval in
        ``PING_SLICES`` steps: pinging 10 000 connections at once is 10 000 writes in one
        callback, a ~50 ms stall for every room message waiting behind it (measured: chat p99
        134 ms with one sweep, 12 ms without pings)."""
        interval = self.config.ping_interval
        while True:
            conns = list(self.connections)
            per_slice = -(-len(conns) // PING_SLICES)  # ceiling
            for start in range(0, PING_SLICES * per_slice or 1, per_slice or 1):
                await asyncio.sleep(interval / PING_SLICES)
                for conn in conns[start : start + per_slice]:
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
        while (self._tasks or self.writer.pending) and loop.time() < deadline - close_budget:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=deadline - close_budget - loop.time())
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.writer.flush(), max(deadline - close_budget - loop.time(), 0.0)
                    )
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
