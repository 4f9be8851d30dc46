"""``--spawn-server``: start ``python -m nanomsg serve`` processes for a run, and stop them.

Each node listens on free ports (``--port 0 --http-port 0``; the ports are read back from the
``nanomsg listening: ws://...:P/chat, http://...:Q`` log line), on a database created for the
run: a SQLite file in a temporary directory, or a fresh PostgreSQL database
``nanomsg_bench_<hex>`` (dropped afterwards unless ``--keep-db``). The schema is applied with
``python -m nanomsg migrate`` before any node starts, as an operator would. With Redis, every
node of the set gets the same fresh ``--redis-prefix``, so runs never hear each other or the
test suites sharing the Redis.

Servers get ``PR_SET_PDEATHSIG`` (SIGTERM when the harness dies) so that no server outlives
the harness, and they are only ever stopped by their own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LISTENING = re.compile(r"nanomsg listening: (ws://\S+/chat), (http://\S+)")
START_TIMEOUT = 60.0


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Raise the fd limit to the hard limit and die with the harness."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_fd_limit() -> int:
    """The most file descriptors a spawned server may hold (the hard RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@dataclass
class Node:
    """One running server process."""

    proc: subprocess.Popen[bytes]
    ws_url: str
    http_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class ServerSet:
    """The server processes of one run, all on one database (and one Redis prefix)."""

    db: str  # sqlite | postgres
    secret: str
    workdir: Path
    nodes: int = 1
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    redis_url: str = ""
    extra_args: list[str] = field(default_factory=list)
    keep_db: bool = False
    running: list[Node] = field(default_factory=list)
    database_url: str = ""
    pg_database: str = ""
    redis_prefix: str = ""

    async def start(self) -> list[Node]:
        """Create the database, migrate it, start every node and wait until each listens."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.db == "sqlite":
            self.database_url = "sqlite:///" + str((self.workdir / "bench.db").resolve())
        elif self.db == "postgres":
            self.pg_database = f"nanomsg_bench_{secrets.token_hex(4)}"
            await _pg_admin(self.pg_url, f'CREATE DATABASE "{self.pg_database}"')
            self.database_url = with_database(self.pg_url, self.pg_database)
        else:
            raise ValueError(f"unknown database kind {self.db!r}")
        if self.redis_url:
            self.redis_prefix = f"nanomsg-bench-{secrets.token_hex(4)}"
        await self.migrate()
        for index in range(self.nodes):
            self.running.append(await self._spawn(index))
        return self.running

    async def start_on(self, database_url: str) -> list[Node]:
        """Start every node on an existing, already migrated database (kept afterwards)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        for index in range(self.nodes):
            self.running.append(await self._spawn(index))
        return self.running

    async def migrate(self) -> None:
        """``python -m nanomsg migrate`` on the run's database (bounded: 120 s)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nanomsg",
            "migrate",
            "--database-url",
            self.database_url,
            env=_server_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("nanomsg migrate did not finish within 120 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"nanomsg migrate failed: {out.decode(errors='replace')}")

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "nanomsg",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            "--database-url",
            self.database_url,
            "--log-level",
            "INFO",
        ]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url, "--redis-prefix", self.redis_prefix]
        return cmd + list(self.extra_args)

    async def _spawn(self, index: int) -> Node:
        log = self.workdir / f"server-{index}.log"
        proc = self._popen(log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            text = log.read_text(errors="replace")
            match = LISTENING.search(text)
            if match:
                return Node(proc=proc, ws_url=match.group(1), http_url=match.group(2), log=log)
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{text[-2000:]}")
        _stop(proc)
        raise RuntimeError(f"server did not listen within {START_TIMEOUT} s; log: {log}")

    def _popen(self, log: Path) -> subprocess.Popen[bytes]:
        """Start one node with its output in ``log`` (Popen returns at once).

        The secret goes in ``NANOMSG_JWT_SECRET``, not on the command line: a urlsafe secret
        may start with ``-``, which argparse then takes for a flag (and ps would show it).
        """
        with open(log, "wb") as out:
            return subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**_server_env(), "NANOMSG_JWT_SECRET": self.secret},
                preexec_fn=_child_setup,
                start_new_session=True,  # a Ctrl-C of the harness reaches us, not the server
            )

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM every node (SIGKILL after 20 s), then drop the run's PostgreSQL database."""
        codes: dict[str, int | None] = {}
        for node in self.running:
            codes[str(node.pid)] = await asyncio.to_thread(_stop, node.proc)
        self.running = []
        if self.pg_database and not self.keep_db:
            with contextlib.suppress(Exception):
                await _pg_admin(
                    self.pg_url, f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)'
                )
        return codes

    def log_issues(self, keep: int = 5) -> dict[str, Any]:
        """WARNING/ERROR lines and tracebacks the nodes logged so far (a run should have none)."""
        warnings = errors = 0
        first: list[str] = []
        for index in range(self.nodes):
            path = self.workdir / f"server-{index}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                is_warning = " WARNING " in line
                is_error = " ERROR " in line or line.startswith("Traceback")
                warnings += is_warning
                errors += is_error
                if (is_warning or is_error) and len(first) < keep:
                    first.append(f"node{index}: {line[:300]}")
        return {"warnings": warnings, "errors": errors, "first": first}

    def copy_logs(self, dest: Path, tag: str) -> None:
        """Keep the nodes' logs (``--server-log-dir``) before the temporary directory goes."""
        dest.mkdir(parents=True, exist_ok=True)
        for index in range(self.nodes):
            path = self.workdir / f"server-{index}.log"
            if path.exists():
                shutil.copyfile(path, dest / f"{tag}-node{index}.log")

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for index in range(self.nodes):
            path = self.workdir / f"server-{index}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(out)


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def _server_env() -> dict[str, str]:
    """The harness's environment without NANOMSG_* settings: only our flags configure it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOMSG_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def with_database(url: str, database: str) -> str:
    """``url`` with its path replaced by ``/database``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
