"""The /chat WebSocket shell: plain asyncio Protocols driving websockets' sans-I/O
``ServerProtocol`` and the pure ``Session``; no task per connection.

websockets does the handshake, framing, ping/pong replies and the close handshake. This module
owns what the library leaves to its caller: path routing, fragment reassembly, UTF-8 checks,
keepalive, close timeouts, inbound backpressure (reading paused while commands pile up, or
while the connection's own writes are not draining) and outbound limits (a reader whose backlog
passes ``max_backlog``, or whose writes make no progress for ``STALL_TIMEOUT``, is closed with
4000; past the process-wide ``max_outbound`` the largest backlogs are closed first).

This is the WebSocket adapter; command scheduling, session effects and the storage runner are
``driver.Driver``, a mixin of ``Connection``.

- **Outbox.** Everything written to a connection during one pass of the event loop (replies,
  room messages, control frames) is appended to its outbox and written with one
  ``transport.write`` at the end of the pass: the cost of a delivery is one list append, and a
  connection owed ten messages costs one system call, not ten.
- **Long replies.** History and resume replies (up to ``resume_cap`` messages of
  ``max_content`` code points, ~16 MB) are not put in the outbox: they are handed to the
  transport in ``CHUNK``-sized pieces whenever its buffer has drained (``resume_writing``), so
  they cost a reading client no backlog. Live frames arriving meanwhile are held and follow the
  reply in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
import secrets
import sys
from collections.abc import Coroutine
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
from nanomsg.driver import INBOX_PAUSE, INBOX_RESUME, PIPELINE, Driver, _InFlight, _Reply
from nanomsg.events import BadJson, Command, Effect, Timer
from nanomsg.fanout import DeflateCache, Hub
from nanomsg.session import CloseCode, Limits, Session
from nanomsg.store.base import Store
from nanomsg.store.writer import BatchWriter
from nanomsg.usecases import DM_OPENED, ReadReceipts, UseCases

__all__ = ["INBOX_PAUSE", "INBOX_RESUME", "PIPELINE", "Connection", "WsServer", "_Reply"]

log = logging.getLogger(__name__)

PATH = "/chat"
PING_SLICES = 20  # the keepalive sweep is spread over this many steps per interval
CLOSE_TIMEOUT = 3.0  # seconds to wait for the client's close frame before dropping the socket
MAX_FRAGMENTS = 128  # frames of one fragmented message: past it, close 1009 (frames, not bytes)
STALL_TIMEOUT = 10.0  # seconds a connection's writes may make no progress at all (close 4000)
CHUNK = 1 << 16  # bytes of a long reply handed to the transport at a time
HIGH_WATER = 1 << 16  # asyncio's and uvloop's default high-water mark of a transport's buffer
TRIM_AFTER = 64 << 20  # backlog bytes released by closed connections before malloc_trim
ABORTED = 1006  # counted for connections dropped without a close frame (handshake timeout)
STALL = "stall"  # the timer key of the stalled-writer check


class Connection(Driver, asyncio.Protocol):
    """One TCP connection: HTTP upgrade, then WebSocket frames in, session effects out."""

    # Slots: an idle connection's memory is counted in bytes (no instance dict to share keys).
    __slots__ = (
        "accounted",
        "closing",
        "conn_id",
        "deflate_bits",
        "draining",
        "fragment_binary",
        "fragments",
        "outbox",
        "outbox_bytes",
        "paused",
        "pong_pending",
        "server",
        "session",
        "timers",
        "transport",
        "write_paused",
        "written",
        "ws",
    )

    def __init__(self, server: WsServer) -> None:
        self.server = server
        self.conn_id = server.next_conn_id()  # names the connection in log lines
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
        self.busy = False  # a LoadRoom / LoadHistory / replay / long reply is out: next waits
        # Sends in flight and the replies queued behind them, answered strictly in this order.
        self.pipeline: list[_InFlight | list[Effect]] = []
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        # Reading is paused while commands pile up or while the transport's buffer is over its
        # high-water mark (write_paused): a client that does not read its replies (pongs
        # included) cannot make us buffer more by sending more.
        self.paused = False
        self.write_paused = False
        self.draining = False  # shutting down: no new commands are started
        self.receiving = True
        self.closing = False
        # Live frames (room id, frame) held while a long reply is written (not None then);
        # frames held while a room's resume replay is read are its subscription's.
        self.held: list[tuple[int, bytes]] | None = None
        self.held_bytes = 0
        self.reply: _Reply | None = None  # a replay is out or a long reply is being written
        self.pong_pending: bytes | None = None  # payload of the ping not yet answered
        # Attributes are few on purpose: each is 8 bytes of every connection.
        self.written = 0  # bytes handed to the transport: progress of a stalled writer
        self.accounted = 0  # this connection's share of WsServer.outbound
        self.timers: dict[Timer | str | None, asyncio.TimerHandle] = {}

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self.server.config.max_backlog < 4 * HIGH_WATER:
            # A small backlog bound: pause (and let a long reply wait) well before reaching it.
            self.transport.set_write_buffer_limits(high=self.server.config.max_backlog // 4)
        self.server.accept(self)
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
        self.leave_all()
        self.outbox, self.outbox_bytes = [], 0
        self._drop_output()
        if self.accounted:
            self.server.outbound -= self.accounted
            self.server.released += self.accounted
            self.accounted = 0
        self.server.forget(self)

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark: stop reading this client until
        it drains, and close it if nothing drains for ``STALL_TIMEOUT``."""
        self.write_paused = True
        self._update_reading()
        self._arm_stall(self._accepted())
        self.account()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        self._send_reply()
        self.account()

    # -- receiving ----------------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        sent = self.ws.close_sent
        if sent is not None and not self.closing and self.ws.close_rcvd is None:
            # websockets failed the connection itself: a frame over --max-frame (1009) or a
            # protocol error (1002). Logged and counted like the closes we start.
            self.closing = True
            self.server.closed(self, sent.code, sent.reason)
            self._drop_output()
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
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if self.closing:
                return
            data = bytes(frame.data)
            self.fragment_binary = opcode is Opcode.BINARY
            if not frame.fin:
                self.fragments = [data]
                return
            self._message(data)
        elif opcode is Opcode.CONT:
            if self.closing:
                return
            fragments = self.fragments
            if len(fragments) >= MAX_FRAGMENTS:
                # Bytes are bounded by --max-frame; frames must be too (empty ones cost a slot).
                self.fragments = []
                self.close(CloseCode.TOO_BIG, "too many fragments")
                return
            fragments.append(bytes(frame.data))
            if frame.fin:
                data, self.fragments = b"".join(fragments), []
                self._message(data)
        elif opcode is Opcode.PONG:
            # Only the answer to our own ping counts: unsolicited pongs prove nothing.
            if self.pong_pending is not None and frame.data == self.pong_pending:
                self.pong_pending = None
        elif opcode is Opcode.CLOSE:
            # The library answered with a close frame and EOF; stop writing room traffic.
            self.closing = True
            self._drop_output()

    def _message(self, data: bytes) -> None:
        if self.closing or self.session is None or self.draining:
            return  # while draining, commands are dropped unacknowledged (never started)
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
        if len(self.inbox) >= INBOX_PAUSE and not self.paused:
            self._update_reading()
        self._pump()

    def _update_reading(self) -> None:
        """Pause reading while commands pile up (from ``INBOX_PAUSE`` down to ``INBOX_RESUME``)
        or while our writes to this client do not drain."""
        queued = len(self.inbox)
        pause = (
            self.write_paused or queued >= INBOX_PAUSE or (self.paused and queued > INBOX_RESUME)
        )
        transport = self.transport
        if pause is self.paused or transport is None or transport.is_closing():
            return
        self.paused = pause
        if pause:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _send_reply(self) -> None:
        """Hand the long reply to the transport chunk by chunk while its buffer is under the
        high-water mark (``resume_writing`` calls again), then the live frames held behind it,
        the same way; then start the next command."""
        transport = self.transport
        while (reply := self.reply) is not None and reply.streaming:
            if self.closing or transport is None or transport.is_closing():
                self._drop_output()
                return
            if self.outbox:  # written earlier in this pass: it goes first
                self.flush_outbox()
            frames = reply.frames
            chunk_size = min(CHUNK, self.server.config.max_backlog // 4)
            while frames and not self.write_paused:
                size = count = 0
                while count < len(frames) and size < chunk_size:
                    size += len(frames[count])
                    count += 1
                chunk = frames[0] if count == 1 else b"".join(frames[:count])
                del frames[:count]
                reply.size -= size
                reply.streamed += size
                self.written += size
                transport.write(chunk)  # may call pause_writing, which ends this loop
            if frames:
                return  # resume_writing continues
            if self.held:
                # The live frames held meanwhile, written against the same flow control.
                reply.frames = [frame for _, frame in self.held]
                reply.size = sum(map(len, reply.frames))
                self.held = []
                self.held_bytes -= reply.size
                continue
            self.reply, self.held = None, None
            self.held_bytes = self.held_total()
            self.busy = False
            self._pump()

    def _arm(self, timer: Timer | None, delay: float) -> None:
        self._disarm(timer)
        loop = asyncio.get_running_loop()
        self.timers[timer] = loop.call_later(max(delay, 0.0), self._fire, timer)

    def _disarm(self, timer: Timer | str | None) -> None:
        handle = self.timers.pop(timer, None)
        if handle is not None:
            handle.cancel()

    def _fire(self, timer: Timer | None) -> None:
        self.timers.pop(timer, None)
        if timer is None:  # handshake or close handshake never finished
            if not self.closing:  # a close is logged where it starts; this one starts here
                self.server.closed(self, ABORTED, "no WebSocket handshake in time")
            if self.transport is not None:
                self.transport.abort()
            return
        if self.session is not None:
            self.apply(self.session.timer_fired(timer))

    def _accepted(self) -> int:
        """Bytes the kernel has taken from the transport so far: grows while the client reads."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.written - buffered

    def _arm_stall(self, mark: int) -> None:
        handle = self.timers.pop(STALL, None)
        if handle is not None:
            handle.cancel()
        loop = asyncio.get_running_loop()
        self.timers[STALL] = loop.call_later(STALL_TIMEOUT, self._stall_check, mark)

    def _stall_check(self, mark: int) -> None:
        self.timers.pop(STALL, None)
        if not self.write_paused or self.closing:
            return
        accepted = self._accepted()
        if accepted == mark:
            self._slow_consumer("not reading")
        else:
            self._arm_stall(accepted)

    # -- sending ------------------------------------------------------------------------------

    def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None:
        """A message of room ``room_id`` from the hub (``fanout.Receiver``): the per-recipient
        hot path, so the outbox append of ``_write`` is inlined. The room's subscription
        drops seqs below its resume floor and holds frames while its replay is read."""
        if self.closing or not self.receiving:
            return
        session = self.session
        sub = session.subs.get(room_id) if session is not None else None
        if sub is not None and seq <= sub.min_seq:
            return
        if self.deflate_bits is not None:
            frame = self.server.deflate.deflated(frame, self.deflate_bits)
        held = self.held
        if (sub is not None and sub.held is not None) or held is not None:
            if sub is not None and sub.held is not None:
                sub.held.append(frame)  # behind the room's replay, still being read
            else:
                assert held is not None
                held.append((room_id, frame))  # behind a long reply being written
            self._count_held(len(frame))
            return
        outbox = self.outbox
        if not outbox:
            self.server.mark_dirty(self)
        outbox.append(frame)
        self.outbox_bytes += len(frame)
        if self.outbox_bytes > self.server.config.max_backlog:
            self._slow_consumer()

    def write_user_event(self, frame: bytes, data: dict[str, Any]) -> None:
        """An event about this connection's user from the hub: written like a live frame
        (held behind a long reply, counted against the backlog), while the connection is
        receiving. A DM opened with the user is settled for this connection first, and told
        as the ``room_added`` or ``invited`` it turns out to be."""
        if self.closing or not self.receiving or self.session is None:
            return
        if data.get("event") == DM_OPENED:
            room_id = data.get("room_id")
            if isinstance(room_id, int):
                self.server.spawn(self._dm_opened(room_id))
            return
        self._write_live(frame, 0)

    def write_signal(self, frame: bytes, room_id: int, about: str | None) -> None:
        """An ephemeral frame of room ``room_id`` from the hub (a read receipt): no seq, so
        no resume floor. Dropped while the room's resume replay is read (the replay brings
        stored events only, and the receipt is ephemeral: the next one, or the room's read
        marks, tell the same), and for the user it is about. Held behind a long reply like
        any live frame, and counted against the backlog the same way."""
        if self.closing or not self.receiving:
            return
        session = self.session
        if session is None:
            return
        sub = session.subs.get(room_id)
        if sub is None or sub.held is not None:
            return
        principal = session.principal
        if about is not None and principal is not None and principal.user == about:
            return
        self._write_live(frame, room_id)

    def _write_live(self, frame: bytes, room_id: int) -> None:
        """An ephemeral frame (a receipt, a user event): behind a long reply being written,
        or in the outbox; counted against the backlog."""
        if self.deflate_bits is not None:
            frame = self.server.deflate.deflated(frame, self.deflate_bits)
        held = self.held
        if held is not None:
            held.append((room_id, frame))  # behind a long reply being written
            self._count_held(len(frame))
            return
        outbox = self.outbox
        if not outbox:
            self.server.mark_dirty(self)
        outbox.append(frame)
        self.outbox_bytes += len(frame)
        if self.outbox_bytes > self.server.config.max_backlog:
            self._slow_consumer()

    def _count_held(self, size: int) -> None:
        """Bytes held behind a replay or a long reply count against ``--max-backlog``; a
        reader who reads the reply earns room for what is held behind it."""
        self.held_bytes += size
        streamed = self.reply.streamed if self.reply is not None else 0
        if self.held_bytes > self.server.config.max_backlog + streamed:
            self._slow_consumer("backlog over limit while a reply is written")
        else:
            self.account()

    def _write(self, data: bytes) -> None:
        """Queue a frame in the outbox (or behind a long reply being written); the server
        writes all outboxes once per loop pass."""
        if self.closing or self.transport is None:
            return
        reply = self.reply
        if reply is not None and reply.streaming:
            reply.frames.append(data)
            reply.size += len(data)
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
        self.written += len(data)
        transport.write(data)
        buffered = transport.get_write_buffer_size()
        if buffered > self.server.config.max_backlog:
            self._slow_consumer()
        elif buffered or self.accounted:  # a reader that keeps up costs no accounting
            self.account()

    def backlog(self) -> int:
        """Bytes owed to this client: outbox, held frames, long reply, transport buffer."""
        size = self.outbox_bytes + self.held_bytes
        if self.reply is not None:
            size += self.reply.size
        if self.transport is not None:
            size += self.transport.get_write_buffer_size()
        return size

    def account(self) -> None:
        """Bring this connection's share of the process-wide outbound total up to date (a
        closing connection still holds its transport buffer until it is gone)."""
        size = self.backlog()
        if size != self.accounted:
            self.server.outbound += size - self.accounted
            self.accounted = size
            if size:
                self.server.check_budget()

    def drop_for_budget(self) -> None:
        """The process is over ``max_outbound``: close with 4000 and drop the socket at once.
        The close frame sits behind a backlog this client is not reading, and waiting for the
        close handshake would keep that backlog in memory for ``CLOSE_TIMEOUT``."""
        self._slow_consumer("server outbound budget exceeded")
        if self.transport is not None:
            self.transport.abort()

    def _slow_consumer(self, reason: str = "backlog over limit") -> None:
        # What is queued will not be read in time anyway; the close frame goes first.
        self.outbox, self.outbox_bytes = [], 0
        self.close(CloseCode.SLOW_CONSUMER, reason)

    def _drop_output(self) -> None:
        """Closing: held frames and a long reply will never be written (the outbox still goes
        out: it holds the replies that explain the close)."""
        self.held, self.held_bytes, self.reply = None, 0, None
        if self.session is not None:
            for sub in self.session.subs.values():
                sub.held = None
        self.fragments = []

    def _flush(self) -> None:
        """Write what the websockets protocol has to send (handshake, pong, close), after the
        outbox so that frames keep the order in which they were produced. Pongs count towards
        the backlog like everything else."""
        transport = self.transport
        if transport is None:
            return
        self.flush_outbox()
        for data in self.ws.data_to_send():
            if data:
                self.written += len(data)
                transport.write(data)
            else:  # the library's end-of-stream marker: the server closes TCP now
                transport.close()
        if (
            not self.closing
            and self.session is not None
            and transport.get_write_buffer_size() > self.server.config.max_backlog
        ):
            self._slow_consumer()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; drop the socket if the client does not answer."""
        if self.closing or self.ws.state is not WsState.OPEN:
            return
        self.server.closed(self, code, reason)
        self.leave_all()
        self.closing = True
        self._drop_output()
        self.ws.send_close(code, reason)
        self._flush()
        self._arm(None, CLOSE_TIMEOUT)
        self.account()

    def drain(self) -> None:
        """Shutdown: start no new command (queued ones were never acknowledged, so dropping
        them loses nothing; the one in flight completes), but keep reading, so the client's
        answer to our close frame is seen and the close handshake ends at once."""
        self.draining = True
        self.inbox.clear()
        if self.paused:
            self._update_reading()

    def ping(self) -> None:
        """Keepalive: a connection that has not answered the previous ping is dropped."""
        if self.session is None or self.closing or self.ws.state is not WsState.OPEN:
            return
        if self.pong_pending is not None:
            self.close(CloseCode.PING_TIMEOUT, "no pong")
            return
        # A fresh payload per ping: only a client that read this ping can answer it.
        self.pong_pending = secrets.token_bytes(8)
        self.ws.send_ping(self.pong_pending)
        self._flush()


class _QuietLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every open and close at INFO; per-connection lines stay at DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING:
            super().log(level, msg, *args, **kwargs)
        elif self.logger.isEnabledFor(logging.DEBUG):
            super().log(logging.DEBUG, msg, *args, **kwargs)


_quiet = _QuietLogger(logging.getLogger("websockets.server"), {})


def _load_libc() -> ctypes.CDLL | None:
    """glibc, for ``malloc_trim``; None elsewhere (musl, macOS), where nothing is trimmed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()


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
        receipts: ReadReceipts | None = None,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.hub = hub
        self.store = store
        self.writer = writer
        self.verifier = verifier
        self.clock = clock
        # The use cases (edit, delete, read) the driver runs, the HTTP side-port's rules;
        # ``receipts`` is the process's one coalescer, shared with the side-port. Edits and
        # deletes go through the batching writer, as sends do.
        self.usecases = UseCases(
            store,
            clock,
            writer=writer,
            publisher=hub,
            receipts=receipts,
            users=hub,
            kept_rules=hub.cached_access,
        )
        self.limits = Limits(
            auth_timeout=config.auth_timeout,
            refresh_grace=config.refresh_grace,
            max_subscriptions=config.max_subscriptions,
        )
        self.connections: set[Connection] = set()
        # Keepalive: each connection is pinged in the slice it was accepted in, so it is pinged
        # once per interval however many connections open and close meanwhile.
        self._ping_slots: list[set[Connection]] = [set() for _ in range(PING_SLICES)]
        self._ping_slice = 0  # the slice pinged last
        self._conn_ids = 0
        # Server-initiated closes by close code (1006: dropped without a close handshake).
        self.closes: collections.Counter[int] = collections.Counter()
        # Bytes queued for all connections (outbox, held, long replies, transport buffers), as
        # last accounted; past config.max_outbound the largest backlogs are closed.
        self.outbound = 0
        self._budget_check: asyncio.Handle | None = None
        self.released = 0  # backlog bytes of closed connections since the last malloc_trim
        self._trim: asyncio.TimerHandle | None = None
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

    def mark_dirty(self, conn: Connection) -> None:
        """``conn`` has an outbox to write: flush all such at the end of this loop pass."""
        self._dirty.append(conn)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        dirty, self._dirty, self._flush_handle = self._dirty, [], None
        for conn in dirty:
            conn.flush_outbox()

    def next_conn_id(self) -> str:
        """A short id naming a connection in log lines: the node id (unique per process run)
        and a counter, e.g. ``4242-9f86d081#17``."""
        self._conn_ids += 1
        return f"{self.node_id}#{self._conn_ids}"

    def accept(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._ping_slots[self._ping_slice].add(conn)  # first ping about one interval from now

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        for slot in self._ping_slots:  # 20 lookups, once per connection: no slot attribute
            slot.discard(conn)
        if not self.connections:
            self._all_gone.set()
        if self.released >= TRIM_AFTER and self._trim is None:
            # Let the transports of the closed connections go first, then give memory back.
            self._trim = asyncio.get_running_loop().call_later(1.0, self._malloc_trim)

    def closed(self, conn: Connection, code: int, reason: str) -> None:
        """A close the server starts: logged once with the connection and user, and counted.
        Quit (1000) and shutdown (1001) are routine and logged at DEBUG."""
        self.closes[code] += 1
        principal = conn.session.principal if conn.session is not None else None
        log.log(
            logging.DEBUG if code in (1000, 1001) else logging.INFO,
            "closing connection %s (user %s): %d %s",
            conn.conn_id,
            principal.user if principal is not None else "-",
            code,
            reason,
        )

    def check_budget(self) -> None:
        """Schedule one budget check at the end of this loop pass when over ``max_outbound``."""
        if self.outbound > self.config.max_outbound and self._budget_check is None:
            self._budget_check = asyncio.get_running_loop().call_soon(self._enforce_budget)

    def _enforce_budget(self) -> None:
        """Past ``max_outbound`` bytes queued in all, close the connections with the largest
        backlogs first (4000) until the rest fits. Counted afresh: accounted shares may be
        stale (a transport that drained between its high- and low-water marks says nothing).
        Connections already closing are candidates too: their buffers are memory as well."""
        # _budget_check stays set meanwhile: the accounting below schedules no second check.
        conns = list(self.connections)
        for conn in conns:
            conn.account()
        over = self.outbound - self.config.max_outbound
        if over > 0:
            conns.sort(key=lambda conn: conn.accounted, reverse=True)
            for conn in conns:
                if over <= 0 or not conn.accounted:
                    break
                over -= conn.accounted
                conn.drop_for_budget()
        self._budget_check = None

    def _malloc_trim(self) -> None:
        """After a slow-consumer storm, hand the freed heap back to the system: the transport
        buffers of closed connections leave free pages inside glibc's heap that it keeps."""
        self._trim, self.released = None, 0
        if _libc is not None:
            _libc.malloc_trim(0)

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
        134 ms with one sweep, 12 ms without pings). A connection keeps the slice it was
        accepted in, and the steps keep to a fixed schedule (no drift), so the pings of one
        connection are one interval apart whatever opens and closes meanwhile."""
        interval = self.config.ping_interval
        step = interval / PING_SLICES
        loop = asyncio.get_running_loop()
        start, tick = loop.time(), 0
        while True:
            tick += 1
            await asyncio.sleep(max(start + tick * step - loop.time(), 0.0))
            self._ping_slice = tick % PING_SLICES
            for conn in list(self._ping_slots[self._ping_slice]):
                conn.ping()

    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop within ``timeout``: stop accepting and reading, let every storage
        operation in flight finish (so each send either was acknowledged or never happened),
        then close every connection with 1001."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        in_flight = len(self._tasks) + self.writer.pending
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
        unfinished = len(self._tasks) + self.writer.pending
        self._all_gone.clear()
        open_conns = len(self.connections)
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), max(deadline - loop.time(), 0.05))
        dropped = len(self.connections)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:  # not after a failed start: nothing to report then
            log.info(
                "shutdown: %d connections closed with 1001 (%d without the client's answer), "
                "%d of %d storage operations finished, in %.2f s",
                open_conns,
                dropped,
                in_flight - unfinished,
                in_flight,
                loop.time() - started,
            )
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
