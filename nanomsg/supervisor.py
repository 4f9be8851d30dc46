"""``serve --workers N``: N worker processes sharing the ports through SO_REUSEPORT.

The supervisor applies migrations once, starts the workers (each a plain ``nanomsg serve``
with ``--workers 1 --reuse-port``, configured through the same NANOMSG_* variables), restarts
any worker that dies, and on SIGTERM/SIGINT passes SIGTERM on and waits for them, killing
those still running after ``--shutdown-timeout`` plus a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field, fields

from nanomsg.config import OPTIONS, Config
from nanomsg.store.factory import store_from_url

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the restart backoff


def worker_env(config: Config) -> dict[str, str]:
    """The environment a worker needs to run with this config, as one process of N."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOMSG_")}
    names = {f.name for f in fields(Config)}
    for opt in OPTIONS:
        if opt.name not in names:
            continue
        value = getattr(config, opt.name)
        env[opt.env] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    env["NANOMSG_WORKERS"] = "1"
    env["NANOMSG_REUSE_PORT"] = "1"
    env["NANOMSG_DEV"] = "0"
    return env


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = 0.5
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.env = worker_env(config)
        self.workers = [Worker(i) for i in range(config.workers)]
        self.stopping = asyncio.Event()

    async def _spawn(self, worker: Worker) -> None:
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nanomsg", "serve", env=self.env
        )
        worker.started_at = asyncio.get_running_loop().time()
        worker.pids.append(worker.proc.pid)
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    async def _watch(self, worker: Worker) -> None:
        """Keep one worker alive until shutdown."""
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            await self._spawn(worker)
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self.stopping.is_set():
                return
            lived = loop.time() - worker.started_at
            worker.backoff = 0.5 if lived > STABLE_AFTER else min(worker.backoff * 2, 30.0)
            worker.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                worker.index,
                worker.proc.pid,
                code,
                lived,
                worker.backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), worker.backoff)

    async def run(self) -> int:
        # Migrate once here, so N workers starting together do not all queue on the lock.
        store = store_from_url(self.config.database_url, pg_pool_size=1)
        await store.open()
        await store.close()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stopping.set)
        watchers = [loop.create_task(self._watch(w)) for w in self.workers]
        log.info(
            "supervising %d workers on ports %d (ws) and %d (http)",
            len(self.workers),
            self.config.port,
            self.config.http_port,
        )
        await self.stopping.wait()
        await self._stop_all()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return 0

    async def _stop_all(self) -> None:
        running = [w.proc for w in self.workers if w.proc and w.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        grace = self.config.shutdown_timeout + 5.0
        waits = [asyncio.wait_for(proc.wait(), grace) for proc in running]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for proc, result in zip(running, results, strict=True):
            if isinstance(result, TimeoutError):
                log.error("worker pid %d did not stop in %.0fs; killing it", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
