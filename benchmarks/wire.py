"""The client side of /chat for load generation: one asyncio Protocol per connection.

The opening handshake is done by websockets' sans-I/O ``ClientProtocol`` (request, key,
``Sec-WebSocket-Accept`` check): the HTTP upgrade is not hand-written. Once the server has
answered 101, the byte stream is handed to a minimal hand-written scanner of server frames.

Why a hand-written scanner after the handshake: a load generator must count frames faster than
the server can send them, or it measures itself. Server frames are unmasked and never
fragmented (protocol.md section 2), so a frame is a 2-, 4- or 10-byte header and a payload.
The scanner reads the header, compares the payload's first bytes with ``{"type":"message"`` in
place (``bytes.startswith`` with an offset: no copy), adds one to a counter and jumps over the
payload. It never builds a ``Frame`` object, never copies or UTF-8-decodes a payload and never
parses JSON for a message frame, except for one message in K (``sample_every``) whose send
timestamp it reads to measure latency. websockets' own parser allocates a Frame, copies the
payload and runs a generator per frame: several times the per-frame cost of the server's
``transport.write`` of a pre-built frame, so with it one client core could not keep up with one
server core. Status and query frames (rare) are decoded with orjson and drive the protocol.

Frames the client sends (token, select_room, message, pong, close) are masked as RFC 6455
requires, with websockets' C ``apply_mask``; the masking key comes from ``random`` rather than
``os.urandom`` because it only has to vary, not be secret, for a load generator.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C extension ships in websockets' wheels
    from websockets.utils import apply_mask

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MESSAGE_PREFIX = b'{"type":"message"'
CONTENT_KEY = b'"content":"'

# Connection phases (plain ints: compared on every data_received).
HANDSHAKE = 0
AWAIT_START = 1
AWAIT_READY = 2
AWAIT_CONNECTED = 3
OPEN = 4
CLOSED = 5

NEVER = 1 << 62  # a window bound no time_ns() reaches


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame."""
    n = len(payload)
    mask = random.randbytes(4)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + mask + apply_mask(payload, mask)


def text_frame(obj: Any) -> bytes:
    """A masked text frame carrying ``obj`` as JSON."""
    return client_frame(OP_TEXT, orjson.dumps(obj))


def stamped_content(tag: int, size: int, now_ns: int | None = None) -> str:
    """Message content ``"<time_ns> <tag> xxx..."`` padded to ``size`` characters.

    ``time.time_ns()`` (not ``perf_counter_ns``) so that a receiver in another process can
    subtract it from its own clock; every process of a run is on this one machine.
    """
    head = f"{time.time_ns() if now_ns is None else now_ns} {tag} "
    return head + "x" * max(size - len(head), 1)


def read_stamp(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """``(send_time_ns, tag)`` from a message frame's ``content``, without decoding the JSON."""
    i = data.find(CONTENT_KEY, start, end)
    if i < 0:
        return None
    i += len(CONTENT_KEY)
    j = data.find(b" ", i, end)
    if j < 0:
        return None
    k = data.find(b" ", j + 1, end)
    try:
        return int(data[i:j]), int(data[j + 1 : k])
    except ValueError:  # a message that was not sent by this harness (seeded history)
        return None


class Tally:
    """Counters and latency samples shared by every connection of one worker process.

    ``warm_end``/``end`` bound the steady window (wall ns); frames received inside it count in
    ``window_frames`` and samples whose *send* time falls inside it are kept. Samples are a
    reservoir of at most ``sample_cap`` values, so memory stays bounded whatever the run length.
    """

    __slots__ = (
        "ack_samples",
        "ack_seen",
        "close_codes",
        "end",
        "failures",
        "frames",
        "lost",
        "other_frames",
        "sample_cap",
        "samples",
        "seen",
        "status_words",
        "warm_end",
        "window_frames",
    )

    def __init__(self, sample_cap: int = 200_000) -> None:
        self.frames = 0
        self.window_frames = 0
        self.other_frames = 0
        self.warm_end = NEVER
        self.end = NEVER
        self.sample_cap = sample_cap
        self.samples: list[int] = []
        self.seen = 0
        self.ack_samples: list[int] = []
        self.ack_seen = 0
        self.status_words: dict[str, int] = {}
        self.close_codes: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.lost = 0

    def sample(self, latency_ns: int, sent_ns: int) -> None:
        if self.warm_end <= sent_ns < self.end:
            self.seen += 1
            _reservoir(self.samples, latency_ns, self.seen, self.sample_cap)

    def ack_sample(self, latency_ns: int, sent_ns: int) -> None:
        if self.warm_end <= sent_ns < self.end:
            self.ack_seen += 1
            _reservoir(self.ack_samples, latency_ns, self.ack_seen, self.sample_cap)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def _reservoir(samples: list[int], value: int, seen: int, cap: int) -> None:
    """Algorithm R: a uniform sample of at most ``cap`` of the ``seen`` values."""
    if len(samples) < cap:
        samples.append(value)
    else:
        slot = random.randrange(seen)
        if slot < cap:
            samples[slot] = value


def _retrieve(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()


class BenchConn(asyncio.Protocol):
    """One /chat connection: handshake, ``START?`` -> token -> ``READY`` -> select_room ->
    ``CONNECTED`` (``ready`` resolves with the wall time), then counting.

    Subclasses change what happens to a sampled message frame (``sampled``) and to status
    frames once the room is selected (``on_status``).
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        room_id: int,
        tally: Tally,
        sample_every: int = 1,
        tag: int = 0,
        extra_rooms: tuple[int, ...] = (),
    ) -> None:
        self.url = url
        self.extra_rooms = extra_rooms
        self.token = token
        self.room_id = room_id
        self.tally = tally
        self.sample_every = max(1, sample_every)
        # A random phase, so that receivers of one room do not all sample the same messages.
        self.countdown = random.randint(1, self.sample_every)
        self.tag = tag
        self.transport: asyncio.Transport | None = None
        self.ws: ClientProtocol | None = None
        self.hbuf = bytearray()
        self.rest = b""
        self.phase = HANDSHAKE
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(_retrieve)  # a failure nobody awaits any more is not news
        self.node = ""
        self.msgs = 0  # message frames received on this connection
        self.sent = 0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ws = ClientProtocol(parse_uri(self.url), max_size=None)
        self.ws = ws
        ws.send_request(ws.connect())
        for chunk in ws.data_to_send():
            self.transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        if self.phase == HANDSHAKE:
            self._handshake(data)
        else:
            self._scan(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase != CLOSED:
            self.tally.lost += 1
        self.phase = CLOSED
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection lost before CONNECTED"))

    # -- handshake ----------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        self.hbuf += data
        end = self.hbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.hbuf) > 65536:
                self.fail("handshake response too large")
            return
        ws = self.ws
        assert ws is not None
        # Only the response head goes to the library; what follows is already WebSocket frames
        # (START? usually arrives in the same segment) and belongs to the scanner.
        head, rest = bytes(self.hbuf[: end + 4]), bytes(self.hbuf[end + 4 :])
        self.hbuf = bytearray()
        ws.receive_data(head)
        response = next((e for e in ws.events_received() if isinstance(e, Response)), None)
        if ws.handshake_exc is not None or response is None:
            first = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.fail(f"handshake refused: {first}")
            return
        self.node = response.headers.get("X-Nanomsg-Node", "")
        self.ws = None
        self.phase = AWAIT_START
        if rest:
            self._scan(rest)

    # -- the scanner (hot path) -------------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        # Hand-written on purpose (see the module docstring): per frame, a header read, one
        # in-place prefix comparison and a counter; counting must cost less than the
        # server's sending, or the load generator and not the server sets the ceiling.
        if self.rest:
            data = self.rest + data
            self.rest = b""
        n = len(data)
        pos = 0
        count = 0
        now = 0
        startswith = data.startswith
        while n - pos >= 2:
            b1 = data[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            b0 = data[pos]
            if b0 == 0x81 and not b1 & 0x80 and startswith(MESSAGE_PREFIX, start, end):
                count += 1
                self.countdown -= 1
                if not self.countdown:
                    self.countdown = self.sample_every
                    if not now:
                        now = time.time_ns()
                    self.sampled(data, start, end, now)
            else:
                if not now:
                    now = time.time_ns()
                if count:  # settle the counts first: a status frame may end a history reply
                    self._counted(count, now)
                    count = 0
                if self._frame(b0, b1, data[start:end], now):
                    self._counted(1, now)
            pos = end
            if self.phase == CLOSED:
                return
        if pos < n:
            self.rest = data[pos:]
        if count:
            self._counted(count, now or time.time_ns())

    def _counted(self, count: int, now: int) -> None:
        self.msgs += count
        tally = self.tally
        tally.frames += count
        if tally.warm_end <= now < tally.end:
            tally.window_frames += count

    def _frame(self, b0: int, b1: int, payload: bytes, now: int) -> bool:
        """Anything but a plain message frame; returns True when it was a message after all."""
        if b1 & 0x80:
            self.fail("masked server frame")
            return False
        if not b0 & 0x80:
            self.tally.count(self.tally.failures, "fragmented server frame")
            return False
        opcode = b0 & 0x0F
        if opcode == OP_TEXT or opcode == 0x2:
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.tally.count(self.tally.failures, "server frame not JSON")
                return False
            if isinstance(obj, dict) and obj.get("type") == "message":
                # Another implementation may order keys differently: slow but correct path.
                self.countdown -= 1
                if not self.countdown:
                    self.countdown = self.sample_every
                    self.sampled(payload, 0, len(payload), now)
                return True
            self.tally.other_frames += 1
            if isinstance(obj, dict):
                self._status(obj, now)
            return False
        if opcode == OP_PING:
            self.write(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.tally.count(self.tally.close_codes, str(code))
            self.write(client_frame(OP_CLOSE, payload[:2]))
            self.phase = CLOSED
            if not self.ready.done():
                reason = payload[2:].decode("utf-8", "replace")
                self.ready.set_exception(ConnectionError(f"closed {code} {reason}".strip()))
            if self.transport is not None:
                self.transport.close()
        return False

    # -- protocol -----------------------------------------------------------------------------

    def _status(self, obj: dict[str, Any], now: int) -> None:
        word = obj.get("data")
        word = word if isinstance(word, str) else str(obj.get("type"))
        phase = self.phase
        if phase == AWAIT_START:
            if word == "START?":
                self.phase = AWAIT_READY
                self.send({"type": "token", "content": self.token})
            else:
                self.fail(f"expected START?, got {word}")
        elif phase == AWAIT_READY:
            if word == "READY":
                self.phase = AWAIT_CONNECTED
                for room in self.extra_rooms:  # several rooms per connection: the rest first
                    self.send({"type": "subscribe", "room_id": room})
                self.send({"type": "select_room", "room_id": self.room_id})
            else:
                self.fail(f"token refused: {word}")
        elif phase == AWAIT_CONNECTED:
            if word == "SUBSCRIBED":
                pass  # an extra room; the select's answer follows
            elif word == "CONNECTED":
                self.phase = OPEN
                if not self.ready.done():
                    self.ready.set_result(now)
            else:
                self.fail(f"select_room refused: {word}")
        else:
            self.tally.count(self.tally.status_words, word)
            self.on_status(word, obj, now)

    def sampled(self, data: bytes, start: int, end: int, now: int) -> None:
        """One message frame in ``sample_every``: record its send-to-receive latency."""
        stamp = read_stamp(data, start, end)
        if stamp is not None:
            self.tally.sample(now - stamp[0], stamp[0])

    def on_status(self, word: str, obj: dict[str, Any], now: int) -> None:
        """A status or query frame after CONNECTED (already counted in ``status_words``)."""

    # -- sending ------------------------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def send(self, obj: Any) -> None:
        self.write(text_frame(obj))

    def send_message(self, size: int) -> int:
        """Send one stamped message; returns its send time (ns)."""
        now = time.time_ns()
        self.write(text_frame({"type": "message", "content": stamped_content(self.tag, size, now)}))
        self.sent += 1
        return now

    def backlog(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    @property
    def open(self) -> bool:
        return self.phase == OPEN

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        else:
            self.tally.count(self.tally.failures, reason)
        self.phase = CLOSED
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        self.phase = CLOSED
        if self.transport is not None:
            self.transport.abort()


class AckingConn(BenchConn):
    """A sender that recognises the echo of its own messages (its ``tag``) as the ack.

    Used with ``sample_every=1``: every message frame's stamp is read, acks are counted, and
    the send-to-echo time is an ack-latency sample. ``on_ack`` lets a closed-loop sender send
    the next message from the receive path, without a task.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acks = 0
        self.on_ack: Callable[[AckingConn], None] | None = None

    @property
    def outstanding(self) -> int:
        return self.sent - self.acks

    def sampled(self, data: bytes, start: int, end: int, now: int) -> None:
        stamp = read_stamp(data, start, end)
        if stamp is None:
            return
        sent_ns, tag = stamp
        if tag == self.tag:
            self.acks += 1
            self.tally.ack_sample(now - sent_ns, sent_ns)
            if self.on_ack is not None:
                self.on_ack(self)
        elif self.sample_every == 1:
            self.tally.sample(now - sent_ns, sent_ns)
