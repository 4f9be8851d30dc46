"""A load-generator process: opens its share of the connections, then counts, sends, reports.

The coordinator (``benchmarks.runner``) starts one process per ``Job`` with multiprocessing
(spawn) and talks to it over a Pipe:

    worker -> ("ready", info)        every connection has CONNECTED (or failed)
    coord  -> ("go", t0, warm_end, end)   wall-clock ns; sending starts at t0, stops at end
    coord  -> ("poll",)              worker -> ("progress", {...}) while draining
    coord  -> ("stop",)              worker -> ("result", {...}) and exits

Everything is bounded: connecting by ``connect_timeout`` per connection, sending by ``end`` and
``max_messages``, and the whole process by ``hard_deadline``, after which it exits by itself
even if the coordinator is gone. No task per connection: connections are asyncio Protocols,
connecting uses ``connect_concurrency`` coroutines that each open connections one after the
other, and each sending kind uses one coroutine for all its connections (or none: closed-loop
senders send the next message from the receive path).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import random
import resource
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from benchmarks.tokens import mint, user_uuid
from benchmarks.wire import NEVER, AckingConn, BenchConn, Tally

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class ConnSpec(NamedTuple):
    """One connection to open: where, as whom, which room, from which source address."""

    url: str
    room: int
    user: int  # index: userUUID = user_uuid(job.nonce, user)
    src: str  # source address to bind ("" = let the kernel choose)
    tag: int  # written into the content of messages this connection sends
    extra_rooms: tuple[int, ...] = ()  # subscribed before the room is selected


@dataclass
class Job:
    """What one worker process does. Picklable: it is the Process argument."""

    kind: str  # recv | publish | chat | storage | history | idle
    specs: list[ConnSpec]
    secret: str
    nonce: int
    entity: str
    level: int
    audience: str = ""
    issuer: str = ""
    ttl: float = 7200.0
    sample_every: int = 1
    sample_cap: int = 200_000
    connect_concurrency: int = 200
    connect_timeout: float = 30.0
    hard_deadline: float = 0.0  # time.time() after which the process exits by itself
    size: int = 64  # message content length
    rate: float = 0.0  # publish: messages/s for the whole worker
    max_outstanding: int = 256  # publish: unacknowledged messages per connection
    max_messages: int = 1_000_000  # any sender: stop after this many
    interval: float = 10.0  # chat: mean seconds between two messages of one connection
    window: int = 1  # storage: messages in flight per connection (closed loop)
    op: str = ""  # history: latest | page | resume
    limit: int = 50  # history: get_past_messages limit
    resume: int = 1000  # history: messages missed before the resume
    total: int = 0  # history: messages in the room (its last seq)
    extra: dict[str, Any] = field(default_factory=dict)


def worker_main(pipe: Pipe, job: Job) -> None:
    """Process entry point (multiprocessing target)."""
    _raise_nofile()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        runner.run(_Worker(pipe, job).run())


def _raise_nofile() -> None:
    """Lift the soft file-descriptor limit to the hard one (10 000 sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Worker:
    def __init__(self, pipe: Pipe, job: Job) -> None:
        self.pipe = pipe
        self.job = job
        self.tally = Tally(job.sample_cap)
        self.conns: list[BenchConn] = []
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.sent = 0
        self.window_sent = 0
        self.skipped = 0
        self.room_sends: dict[int, int] = {}
        # Until "go" (or for ever, in the connections scenario) CPU counts from the start.
        self.go_cpu = time.process_time()
        self.go_wall = time.time()
        self.sender: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._pipe_readable)
        deadline = self.job.hard_deadline or time.time() + 3600
        try:
            await asyncio.wait_for(self._main(), max(deadline - time.time(), 1.0))
        except TimeoutError:
            pass  # the coordinator is gone or stuck: exit on our own
        finally:
            loop.remove_reader(self.pipe.fileno())
            for conn in self.conns:
                conn.abort()
            if self.sender is not None:
                self.sender.cancel()
                with contextlib.suppress(BaseException):
                    await self.sender

    def _send(self, obj: object) -> None:
        """Send to the coordinator; the event loop made the pipe non-blocking (add_reader), and
        a large result would not fit the socket buffer in one go, so block for the send."""
        fd = self.pipe.fileno()
        os.set_blocking(fd, True)
        try:
            self.pipe.send(obj)
        finally:
            os.set_blocking(fd, False)

    def _pipe_readable(self) -> None:
        try:
            self.inbox.put_nowait(self.pipe.recv())
        except (EOFError, OSError):
            self.inbox.put_nowait(("stop", "pipe closed"))

    async def _main(self) -> None:
        info = await self._connect_all()
        self._send(("ready", info))
        while True:
            msg = await self.inbox.get()
            if msg[0] == "go":
                self._go(*msg[1:])
            elif msg[0] == "poll":
                self._send(("progress", self._progress()))
            elif msg[0] == "stop":
                if len(msg) > 1:  # the pipe closed: nobody to report to
                    return
                if self.sender is not None:
                    self.sender.cancel()
                    with contextlib.suppress(BaseException):
                        await self.sender
                    self.sender = None
                self._send(("result", self._result()))
                return

    # -- connecting ---------------------------------------------------------------------------

    def _make(self, spec: ConnSpec) -> BenchConn:
        job = self.job
        token = mint(
            job.secret,
            user=user_uuid(job.nonce, spec.user),
            entity=job.entity,
            level=job.level,
            ttl=job.ttl,
            audience=job.audience,
            issuer=job.issuer,
        )
        common: dict[str, Any] = {
            "url": spec.url,
            "token": token,
            "room_id": spec.room,
            "tally": self.tally,
            "tag": spec.tag,
            "extra_rooms": spec.extra_rooms,
        }
        if job.kind in ("publish", "storage"):
            return AckingConn(sample_every=1, **common)
        if job.kind == "history":
            return HistoryConn(job=job, sample_every=1 << 30, **common)
        return BenchConn(sample_every=job.sample_every, **common)

    async def _connect_all(self) -> dict[str, Any]:
        job = self.job
        specs = job.specs
        setup_ns: list[int] = []
        first = NEVER
        last = 0
        next_index = 0
        nodes: dict[str, int] = {}

        async def slot() -> None:
            nonlocal next_index, first, last
            while next_index < len(specs):
                spec = specs[next_index]
                next_index += 1
                started = time.time_ns()
                first = min(first, started)
                conn = self._make(spec)
                try:
                    done = await asyncio.wait_for(
                        self._open(conn, spec), timeout=job.connect_timeout
                    )
                except Exception as exc:
                    conn.abort()
                    reason = f"{type(exc).__name__}: {exc}"[:120]
                    self.tally.count(self.tally.failures, reason)
                    continue
                self.conns.append(conn)
                setup_ns.append(done - started)
                last = max(last, done)
                if conn.node:
                    nodes[conn.node] = nodes.get(conn.node, 0) + 1

        slots = max(1, min(job.connect_concurrency, len(specs)))
        await asyncio.gather(*(slot() for _ in range(slots)))
        return {
            "connected": len(self.conns),
            "wanted": len(specs),
            "failures": dict(self.tally.failures),
            "setup_ns": setup_ns,
            "first_start_ns": first if setup_ns else 0,
            "last_done_ns": last,
            "nodes": nodes,
            "pid": os.getpid(),
        }

    async def _open(self, conn: BenchConn, spec: ConnSpec) -> int:
        """TCP connect from ``spec.src`` (bound without a port: IP_BIND_ADDRESS_NO_PORT lets
        the kernel pick the port at connect time per destination, so each 127.0.0.x source
        gets its own ~28 000 ephemeral ports), then the WebSocket and protocol handshakes."""
        loop = asyncio.get_running_loop()
        parts = urlsplit(spec.url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if spec.src:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((spec.src, 0))
            await loop.sock_connect(sock, (host, port))
            await loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        return await conn.ready

    # -- the timed phase ------------------------------------------------------------------------

    def _go(self, t0: int, warm_end: int, end: int) -> None:
        self.tally.warm_end = warm_end
        self.tally.end = end
        self.go_cpu = time.process_time()
        self.go_wall = time.time()
        kind = self.job.kind
        loop = asyncio.get_running_loop()
        if kind == "publish":
            self.sender = loop.create_task(self._publish(t0, warm_end, end))
        elif kind == "chat":
            self.sender = loop.create_task(self._chat(t0, warm_end, end))
        elif kind == "storage" and self.job.rate > 0:
            self.sender = loop.create_task(self._publish(t0, warm_end, end))
        elif kind == "storage":
            self.sender = loop.create_task(self._closed_loop(t0, warm_end, end))
        elif kind == "history":
            self.sender = loop.create_task(self._history(t0, end))

    def _count_send(self, conn: BenchConn, sent_ns: int) -> None:
        self.sent += 1
        if self.tally.warm_end <= sent_ns < self.tally.end:
            self.window_sent += 1
        self.room_sends[conn.room_id] = self.room_sends.get(conn.room_id, 0) + 1

    async def _publish(self, t0: int, warm_end: int, end: int) -> None:
        """Open loop at ``rate`` msg/s over all connections, round-robin.

        A message is *offered* when its slot comes; it is *skipped* (counted, not sent) when the
        connection already has ``max_outstanding`` unacknowledged messages or 1 MiB unsent, so
        an overloaded server shows up as skipped sends instead of unbounded client buffers.
        Latency is measured from the actual write.
        """
        job = self.job
        conns = [c for c in self.conns if isinstance(c, AckingConn)]
        if not conns or job.rate <= 0:
            return
        await _sleep_until(t0)
        offered = 0
        turn = 0
        while True:
            now = time.time_ns()
            if now >= end or self.sent >= job.max_messages:
                return
            due = int((now - t0) * job.rate / 1e9) - offered
            for _ in range(due):
                conn = conns[turn]
                turn = (turn + 1) % len(conns)
                if (
                    not conn.open
                    or conn.outstanding >= job.max_outstanding
                    or conn.backlog() > 1 << 20
                    or self.sent >= job.max_messages
                ):
                    self.skipped += 1
                    continue
                self._count_send(conn, conn.send_message(job.size))
            offered += max(due, 0)
            await asyncio.sleep(0.001)

    async def _chat(self, t0: int, warm_end: int, end: int) -> None:
        """Each connection sends now and then: exponential gaps of mean ``interval`` seconds."""
        job = self.job
        rng = random.Random(os.getpid())
        mean_ns = job.interval * 1e9
        heap = [(t0 + int(rng.expovariate(1.0) * mean_ns), i) for i in range(len(self.conns))]
        heapq.heapify(heap)
        await _sleep_until(t0)
        while heap:
            now = time.time_ns()
            if now >= end or self.sent >= job.max_messages:
                return
            while heap and heap[0][0] <= now:
                _, i = heapq.heappop(heap)
                conn = self.conns[i]
                if conn.open:
                    self._count_send(conn, conn.send_message(job.size))
                heapq.heappush(heap, (now + int(rng.expovariate(1.0) * mean_ns), i))
            wait = (heap[0][0] - now) / 1e9 if heap else 0.01
            await asyncio.sleep(min(max(wait, 0.001), 0.01))

    async def _closed_loop(self, t0: int, warm_end: int, end: int) -> None:
        """``window`` messages in flight per connection; each ack (echo) sends the next."""
        job = self.job
        conns = [c for c in self.conns if isinstance(c, AckingConn)]

        def next_one(conn: AckingConn) -> None:
            if conn.open and time.time_ns() < end and self.sent < job.max_messages:
                self._count_send(conn, conn.send_message(job.size))

        await _sleep_until(t0)
        for conn in conns:
            conn.on_ack = next_one
            for _ in range(job.window):
                next_one(conn)
        await _sleep_until(end)
        for conn in conns:
            conn.on_ack = None

    async def _history(self, t0: int, end: int) -> None:
        await _sleep_until(t0)
        for conn in self.conns:
            if isinstance(conn, HistoryConn) and conn.open:
                conn.request()

    # -- reports ------------------------------------------------------------------------------

    def _progress(self) -> dict[str, Any]:
        acks = sum(c.acks for c in self.conns if isinstance(c, AckingConn))
        return {
            "kind": self.job.kind,
            "frames": self.tally.frames,
            "sent": self.sent,
            "acks": acks,
            "open": sum(1 for c in self.conns if c.open),
        }

    def _result(self) -> dict[str, Any]:
        tally = self.tally
        cpu = time.process_time() - self.go_cpu
        wall = time.time() - self.go_wall
        history = [c for c in self.conns if isinstance(c, HistoryConn)]
        return {
            "kind": self.job.kind,
            "pid": os.getpid(),
            "frames": tally.frames,
            "window_frames": tally.window_frames,
            "other_frames": tally.other_frames,
            "samples": tally.samples,
            "samples_seen": tally.seen,
            "ack_samples": tally.ack_samples,
            "ack_seen": tally.ack_seen,
            "status_words": tally.status_words,
            "close_codes": tally.close_codes,
            "failures": tally.failures,
            "lost": tally.lost,
            "sent": self.sent,
            "window_sent": self.window_sent,
            "skipped": self.skipped,
            "acks": sum(c.acks for c in self.conns if isinstance(c, AckingConn)),
            "room_sends": self.room_sends,
            "room_members": _room_members(self.conns),
            "open": sum(1 for c in self.conns if c.open),
            "requests": sum(c.requests for c in history),
            "bad_replies": sum(c.bad for c in history),
            "cpu_s": cpu,
            "wall_s": wall,
        }


def _room_members(conns: list[BenchConn]) -> dict[int, int]:
    members: dict[int, int] = {}
    for conn in conns:
        members[conn.room_id] = members.get(conn.room_id, 0) + 1
    return members


async def _sleep_until(wall_ns: int) -> None:
    delay = (wall_ns - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


class HistoryConn(BenchConn):
    """A closed-loop history reader: one request at a time, timed from send to the end marker.

    ``latest``: get_past_messages limit L (ends with HISTORYEND count=L). ``page``: the same
    with a random ``before`` deep in the room. ``resume``: select_room with
    ``since = total - resume`` on the already selected room, which re-joins it and replays the
    missed messages (ends with RESUMED count=resume). Each reply's message count is checked.
    """

    def __init__(self, *, job: Job, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.requests = 0
        self.bad = 0
        self.started = 0
        self.base = 0
        self.expected = 0
        self.rng = random.Random()

    def request(self) -> None:
        job = self.job
        self.base = self.msgs
        self.started = time.time_ns()
        if job.op == "resume":
            since = max(job.total - job.resume, 0)
            self.expected = job.total - since
            self.send({"type": "select_room", "room_id": self.room_id, "since": since})
        elif job.op == "page":
            before = self.rng.randint(min(job.limit + 1, job.total), max(job.total, 1))
            self.expected = min(job.limit, before - 1)
            self.send({"type": "get_past_messages", "limit": job.limit, "before": before})
        else:
            self.expected = min(job.limit, job.total)
            self.send({"type": "get_past_messages", "limit": job.limit})

    def on_status(self, word: str, obj: dict[str, Any], now: int) -> None:
        final = "RESUMED" if self.job.op == "resume" else "HISTORYEND"
        if word != final:
            if word != "CONNECTED":
                self.bad += 1
            return
        got = self.msgs - self.base
        if got != self.expected or obj.get("count") != self.expected:
            self.bad += 1
        if final == "RESUMED" and obj.get("complete") is not True:
            self.bad += 1
        self.requests += 1
        self.tally.sample(now - self.started, self.started)
        if now < self.tally.end and self.requests < self.job.max_messages:
            self.request()
