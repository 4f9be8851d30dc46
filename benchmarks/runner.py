"""The coordinator's machinery: worker processes, the timed phase, the target, the machine.

The coordinator process does no load itself: it sets up rooms over HTTP, starts worker
processes (``benchmarks.worker``), tells them when to go, samples the server's /proc figures at
the edges of the steady window, drains, and merges what the workers report.

Timeline of a timed phase (all wall-clock ns, shared by every process of the machine):

    t0 (= now + 0.5 s)   senders start
    warm_end = t0 + warmup   steady window opens: server CPU snapshot
    end = warm_end + duration   senders stop; server CPU snapshot
    drain (<= --drain s)   until the counts stop moving, then the workers report
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from typing import Any
from urllib.parse import urlsplit

from benchmarks.procstat import ProcGroup, Snapshot
from benchmarks.servers import ServerSet
from benchmarks.worker import ConnSpec, Job, worker_main

PORTS_PER_SOURCE = 20_000  # of the ~28 000 ephemeral ports per source address, with margin


@dataclass
class Target:
    """Where the load goes: WebSocket and HTTP URLs, key material, and what we know of the
    server (its pids for /proc figures, its database URL for seeding and checks)."""

    ws_urls: list[str]
    http_urls: list[str]
    secret: str
    audience: str = ""
    issuer: str = ""
    group: ProcGroup | None = None
    database_url: str = ""
    servers: ServerSet | None = None
    node_pids: list[int] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)  # per-server state (the seeded room)

    def snapshot(self) -> Snapshot | None:
        return self.group.snapshot() if self.group is not None else None


def source_addresses(url: str, connections: int, wanted: int = 0) -> list[str]:
    """Source addresses to spread ``connections`` over: 127.0.0.1, .2, ... (loopback only).

    One source address gives about 28 000 ephemeral ports towards one server port; beyond that
    connect() fails with EADDRNOTAVAIL. ``wanted`` 0 picks enough for ``PORTS_PER_SOURCE`` each.
    """
    host = urlsplit(url).hostname or ""
    if not host.startswith("127."):
        return [""]
    count = wanted or max(1, math.ceil(connections / PORTS_PER_SOURCE))
    count = min(count, 250)
    if count == 1 and not wanted:
        return [""]
    return [f"127.0.0.{i + 1}" for i in range(count)]


def split(specs: list[ConnSpec], parts: int) -> list[list[ConnSpec]]:
    """Round-robin ``specs`` over ``parts`` lists (so a room's members span processes)."""
    parts = max(1, parts)
    return [specs[i::parts] for i in range(parts)]


class WorkerPool:
    """Worker processes (spawned, not forked: no inherited event loop or threads)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.procs: list[BaseProcess] = []
        self.pipes: list[Pipe] = []
        self.queues: list[asyncio.Queue[tuple[Any, ...]]] = []

    async def start(self, timeout: float) -> list[dict[str, Any]]:
        """Start every worker; wait until each has opened its connections."""
        ctx = mp.get_context("spawn")
        loop = asyncio.get_running_loop()
        for job in self.jobs:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(theirs, job), daemon=True)
            proc.start()
            theirs.close()
            queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
            loop.add_reader(mine.fileno(), self._readable, mine, queue)
            self.procs.append(proc)
            self.pipes.append(mine)
            self.queues.append(queue)
        return await self._gather("ready", timeout)

    @staticmethod
    def _readable(pipe: Pipe, queue: asyncio.Queue[tuple[Any, ...]]) -> None:
        try:
            queue.put_nowait(pipe.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            queue.put_nowait(("gone",))

    async def _gather(self, word: str, timeout: float) -> list[dict[str, Any]]:
        async def one(i: int) -> dict[str, Any]:
            while True:
                msg = await self.queues[i].get()
                if msg[0] == word:
                    return dict(msg[1])
                if msg[0] == "gone":
                    raise RuntimeError(f"worker {i} (pid {self.procs[i].pid}) died")

        return list(
            await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(len(self.jobs)))), timeout
            )
        )

    def send(self, *msg: Any) -> None:
        for pipe in self.pipes:
            pipe.send(msg)

    async def poll(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        self.send("poll")
        return await self._gather("progress", timeout)

    async def stop(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        self.send("stop")
        return await self._gather("result", timeout)

    def close(self) -> None:
        """Reap the workers: they exit after ``stop``; stragglers (ours only) are terminated."""
        loop = asyncio.get_event_loop()
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(pipe.fileno())
            pipe.close()
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


@dataclass
class Timed:
    """What a timed phase produced."""

    results: list[dict[str, Any]]
    before: Snapshot | None
    after: Snapshot | None
    t0: int
    warm_end: int
    end: int
    drained_s: float

    @property
    def window_s(self) -> float:
        return (self.end - self.warm_end) / 1e9


async def sleep_until(wall_ns: int) -> None:
    delay = (wall_ns - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def timed_phase(
    pool: WorkerPool,
    target: Target,
    *,
    warmup: float,
    duration: float,
    drain: float,
    complete: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> Timed:
    """Run the go / steady window / drain / stop sequence (see the module docstring)."""
    t0 = time.time_ns() + 500_000_000
    warm_end = t0 + int(warmup * 1e9)
    end = warm_end + int(duration * 1e9)
    pool.send("go", t0, warm_end, end)
    await sleep_until(warm_end)
    before = target.snapshot()
    await sleep_until(end)
    after = target.snapshot()
    drain_start = time.monotonic()
    deadline = drain_start + drain
    last: tuple[int, ...] | None = None
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        progress = await pool.poll()
        key = tuple(p["frames"] + p["acks"] for p in progress)
        if complete is not None and complete(progress):
            break
        if key == last:
            break
        last = key
    drained = time.monotonic() - drain_start
    results = await pool.stop()
    return Timed(results, before, after, t0, warm_end, end, drained)


def machine() -> dict[str, Any]:
    """The machine a result was measured on (and how busy it was when the run started)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
