"""Real processes for fault tests: a private Redis, a throwaway PostgreSQL cluster, nanomsg nodes
as ``python -m nanomsg serve`` subprocesses, and a ``Tally`` that checks delivery guarantees.

Nothing here mocks anything: faults are made by stopping, killing and restarting real servers.
Every process started here is stopped by its fixture; node and Redis subprocesses also get
SIGKILL from the kernel if the test process itself dies (``PR_SET_PDEATHSIG``).

Fixtures (import them into a test module to use them):

- ``private_redis``: a started ``PrivateRedis`` on a free port, killed after the test.
- ``private_pg``: a ``PrivatePostgres`` cluster, initdb'd once per test module (~0.7 s).
- ``private_pg_url``: a fresh database in ``private_pg`` (started if a test left it stopped).
- ``nodes``: a ``Nodes`` group; ``await nodes.start(3, database_url=..., redis_url=...)``.

Helpers: ``make_user``, ``connect_and_join``, ``http``, ``create_room``, ``grant``, ``revoke``,
``readyz``, ``eventually``, and ``Tally`` with ``assert_exactly_once_in_order``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from nanomsg.app import App
from nanomsg.auth import mint
from nanomsg.clock import SystemClock
from tests.conftest import REQUIRE, SECRET, TokenFactory
from tests.integration.conftest import Client, Server, User, make_config

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening: ws://\S+?:(\d+)/chat, http://\S+?:(\d+)")
TAIL_LINES = 200

# -- small utilities ---------------------------------------------------------------------------

try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:  # pragma: no cover - no libc symbols exposed
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the test process dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


async def wait_port(port: int, *, open_: bool, timeout: float, what: str) -> None:
    """Wait until the port accepts (``open_``) or refuses connections; AssertionError if not."""
    deadline = time.monotonic() + timeout
    while port_open(port) is not open_:
        if time.monotonic() > deadline:
            state = "accept" if open_ else "refuse"
            raise AssertionError(f"{what}: port {port} did not {state} within {timeout:.0f}s")
        await asyncio.sleep(0.02)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.05
) -> float:
    """Poll ``check`` until it returns True; the seconds it took. AssertionError on timeout."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def server_on(
    database_url: str, make_token: TokenFactory, tmp_path: Path
) -> AsyncIterator[Server]:
    """An in-process server on ``database_url`` (a private PostgreSQL a test stops and
    starts), with the fixtures' ``Server`` helpers; its clients and the app stopped after."""
    app = App(make_config("embedded", tmp_path, None, None, database_url=database_url))
    await app.start()
    session = aiohttp.ClientSession()
    server = Server(app=app, make_token=make_token, http=session, clients=[])
    try:
        yield server
    finally:
        for client in server.clients:
            await client.close()
        await app.stop()
        await session.close()


async def once_served(
    server: Server, method: str, path: str, user: User, body: Any = None, *, timeout: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """``server.call`` again until it is not a 503: storage back, the pool reconnected."""
    answer: tuple[int, dict[str, Any]] = (0, {})

    async def served() -> bool:
        nonlocal answer
        answer = await server.call(method, path, user, body)
        return answer[0] != 503

    await eventually(served, timeout=timeout)
    return answer


def _skip_or_fail(message: str) -> NoReturn:
    """The ``_need`` policy of tests/conftest.py for missing local binaries."""
    if REQUIRE:
        pytest.fail(f"{message} and NANOMSG_REQUIRE_SERVICES is set")
    pytest.skip(message)


# -- Redis ----------------------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of our own on a free port: stop it, start it again on the same port.

    ``start`` waits until it answers PING; ``stop`` (SIGTERM: with ``--save ""`` Redis exits
    without saving) and ``kill`` (SIGKILL) wait until the port refuses connections.
    """

    def __init__(self, binary: str = "redis-server", port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nanomsg-redis-"))
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        if self.running:
            raise AssertionError(f"redis on port {self.port} is already running")
        if port_open(self.port):
            raise AssertionError(f"port {self.port} was taken while redis was stopped")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    async def start(self, timeout: float = 10.0) -> None:
        """Start (again) on the same port; returns once Redis answers PING."""
        self._spawn()
        deadline = time.monotonic() + timeout
        while not self._pong():
            if not self.running or time.monotonic() > deadline:
                raise AssertionError(f"redis did not start on {self.port}:\n{self.tail()}")
            await asyncio.sleep(0.01)

    async def _wait_exit(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"redis ignored SIGTERM for {timeout}s")
            await asyncio.sleep(0.01)
        await wait_port(self.port, open_=False, timeout=5.0, what="redis")

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (no save) and wait until the port refuses connections."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            await self._wait_exit(timeout)

    async def kill(self) -> None:
        """SIGKILL and wait until the port refuses connections."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            await self._wait_exit(5.0)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """Kill if running and remove the directory (fixture teardown; synchronous)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest_asyncio.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """A started private Redis, killed and removed after the test whatever state it is in."""
    binary = shutil.which("redis-server")
    if binary is None:
        _skip_or_fail("redis-server is not installed")
    redis = PrivateRedis(binary)
    try:
        await redis.start()
        yield redis
    finally:
        redis.close()


# -- PostgreSQL -----------------------------------------------------------------------------------


def find_postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        version = bindir.parent.name
        if (bindir / "pg_ctl").exists() and version.isdigit():
            found.append((int(version), bindir))
    return max(found)[1] if found else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster owned by the ``postgres`` OS user (initdb and postgres
    refuse to run as root), trust auth, on 127.0.0.1:<port> with its sockets in its directory.

    ``init`` runs initdb and starts it; ``stop(mode)`` / ``start()`` go through pg_ctl and keep
    the port; ``destroy`` stops it and removes everything. fsync is off: the tests crash the
    server process, never the machine, so the OS page cache still holds every commit.
    """

    OS_USER = "postgres"

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nanomsg-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.running = False
        self.init_seconds = 0.0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, tool: str, *args: str) -> list[str]:
        return ["runuser", "-u", self.OS_USER, "--", str(self.bindir / tool), *args]

    def _start_cmd(self) -> list[str]:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c shared_buffers=16MB -c max_connections=200"
        )
        return self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "30", "-o",
            options, "start",
        )  # fmt: skip

    def _stop_cmd(self, mode: str) -> list[str]:
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"pg_ctl stop mode must be smart, fast or immediate, not {mode!r}")
        return self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n"
                f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}"
                f"\n{self.tail()}"
            )

    def init(self) -> None:
        """initdb into the directory (chowned to postgres) and start the server."""
        began = time.monotonic()
        shutil.chown(self.dir, self.OS_USER, self.OS_USER)
        self._run(
            self._as_postgres(
                "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                "--no-sync", "--no-instructions",
            )
        )  # fmt: skip
        self.start_sync()
        self.init_seconds = time.monotonic() - began

    def start_sync(self) -> None:
        self._run(self._start_cmd())
        self.running = True

    def stop_sync(self, mode: str = "fast") -> None:
        self._run(self._stop_cmd(mode))
        self.running = False

    async def _run_async(self, cmd: list[str]) -> None:
        # A thread running subprocess.run (close_fds) rather than the loop's subprocess
        # support: under uvloop the postmaster would inherit the pipe and never let it EOF.
        await asyncio.to_thread(self._run, cmd)

    async def start(self) -> None:
        """Start again on the same port (crash recovery included); returns once it accepts."""
        await self._run_async(self._start_cmd())
        self.running = True
        await wait_port(self.port, open_=True, timeout=10.0, what="postgres")

    async def stop(self, mode: str = "fast") -> None:
        """``fast``: roll back sessions and shut down cleanly; ``immediate``: kill every
        process at once (crash recovery on the next start). Waits until the port refuses."""
        await self._run_async(self._stop_cmd(mode))
        self.running = False
        await wait_port(self.port, open_=False, timeout=10.0, what="postgres")

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        name = name or "nanomsg_" + secrets.token_hex(5)
        self._run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
             "postgres", name]
        )  # fmt: skip
        return self.url(name)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.data.exists():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop_sync("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    """One private cluster per test module (initdb + start cost ~0.7 s); removed afterwards."""
    bindir = find_postgres_bin()
    if bindir is None:
        _skip_or_fail("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    if shutil.which("runuser") is None or os.geteuid() != 0:
        _skip_or_fail(
            "a private PostgreSQL cluster needs root and runuser (initdb runs as postgres)"
        )
    try:
        pwd.getpwnam(PrivatePostgres.OS_USER)
    except KeyError:
        _skip_or_fail("no 'postgres' OS user to own a private PostgreSQL cluster")
    cluster = PrivatePostgres(bindir)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def private_pg_url(private_pg: PrivatePostgres) -> str:
    """A fresh database on the module's private cluster (restarted if a test left it down)."""
    if not private_pg.running:
        private_pg.start_sync()
    return private_pg.create_database()


# -- nanomsg nodes --------------------------------------------------------------------------------


class NodeProcess:
    """One ``python -m nanomsg serve`` subprocess. Ports come from its "listening" log line;
    stderr is drained all the time and its last ``TAIL_LINES`` lines are kept for messages."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ws_port = 0
        self.http_port = 0
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self.starts = 0
        self._drain: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<node {self.name} ws={self.ws_port} http={self.http_port}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/chat"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.lines)[-lines:])

    async def start(self, timeout: float = 20.0) -> None:
        """Start and wait for the listening line (AssertionError with the log if it exits)."""
        if self.running:
            raise AssertionError(f"node {self.name} is already running")
        listening: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nanomsg", "serve",
            env=self.env, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        self.starts += 1
        self.lines.append(f"---- {self.name} start #{self.starts} (pid {self.proc.pid}) ----")
        assert self.proc.stderr is not None
        self._drain = asyncio.get_running_loop().create_task(
            self._read_stderr(self.proc.stderr, listening)
        )
        try:
            self.ws_port, self.http_port = await asyncio.wait_for(listening, timeout)
        except (TimeoutError, EOFError) as exc:
            await self.kill()
            raise AssertionError(
                f"node {self.name} did not start ({exc!r}):\n{self.tail()}"
            ) from exc

    async def _read_stderr(
        self, stream: asyncio.StreamReader, listening: asyncio.Future[tuple[int, int]]
    ) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if not listening.done():
                found = LISTENING.search(line)
                if found:
                    listening.set_result((int(found.group(1)), int(found.group(2))))
        if not listening.done():
            listening.set_exception(EOFError("node exited before listening"))

    async def _reap(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain, 2.0)
        self.lines.append(f"---- {self.name} exited with {code} ----")
        return code

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit code; if it outlives ``timeout`` it is SIGKILLed and
        AssertionError is raised (a graceful shutdown must finish)."""
        if not self.running:
            return self.returncode if self.returncode is not None else 0
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await self._reap(timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"node {self.name} ignored SIGTERM for {timeout}s:\n{self.tail()}"
            ) from None

    async def kill(self) -> int:
        """SIGKILL: no shutdown at all (what a crash or the OOM killer does)."""
        if not self.running:
            return self.returncode if self.returncode is not None else 0
        assert self.proc is not None
        self.proc.kill()
        return await self._reap(10.0)

    async def restart(self, *, keep_ports: bool = True, hard: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL when ``hard``) and start again, on the same ports unless
        ``keep_ports`` is False."""
        await (self.kill() if hard else self.terminate())
        if keep_ports:
            self.env = {
                **self.env,
                "NANOMSG_PORT": str(self.ws_port),
                "NANOMSG_HTTP_PORT": str(self.http_port),
            }
        await self.start()


def node_env(
    *, database_url: str, redis_url: str, prefix: str, settings: dict[str, Any]
) -> dict[str, str]:
    """The environment of a node: the test process's, minus every NANOMSG_* variable, plus
    the test settings (keyword ``ping_interval=0.2`` becomes ``NANOMSG_PING_INTERVAL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOMSG_")}
    env.update(
        NANOMSG_DATABASE_URL=database_url,
        NANOMSG_REDIS_URL=redis_url,
        NANOMSG_REDIS_PREFIX=prefix,
        NANOMSG_JWT_SECRET=SECRET,
        NANOMSG_HOST="127.0.0.1",
        NANOMSG_PORT="0",
        NANOMSG_HTTP_PORT="0",
        NANOMSG_PING_INTERVAL="0",
    )
    for key, value in settings.items():
        env["NANOMSG_" + key.upper()] = str(value)
    return env


class Nodes:
    """The nodes of one test; they share a Redis channel prefix unique to the test."""

    def __init__(self) -> None:
        self.prefix = "t" + uuid.uuid4().hex[:12]
        self.all: list[NodeProcess] = []

    async def start(
        self, count: int = 1, *, database_url: str, redis_url: str = "", **settings: Any
    ) -> list[NodeProcess]:
        """Start ``count`` nodes at once (named A, B, C...) and wait until all listen."""
        env = node_env(
            database_url=database_url, redis_url=redis_url, prefix=self.prefix, settings=settings
        )
        new = [NodeProcess(chr(ord("A") + len(self.all) + i), dict(env)) for i in range(count)]
        self.all.extend(new)  # before starting: a failed start is still cleaned up
        await asyncio.gather(*(node.start() for node in new))
        return new

    def tails(self) -> str:
        return "\n".join(f"== node {n.name} ==\n{n.tail()}" for n in self.all)

    async def close(self) -> None:
        """SIGTERM every running node at once; SIGKILL any that does not stop in 10 s."""

        async def stop(node: NodeProcess) -> None:
            with contextlib.suppress(AssertionError):
                await node.terminate(10.0)
            await node.kill()

        await asyncio.gather(*(stop(node) for node in self.all))


@pytest_asyncio.fixture
async def nodes() -> AsyncIterator[Nodes]:
    group = Nodes()
    try:
        yield group
    finally:
        await group.close()


# -- clients and HTTP -----------------------------------------------------------------------------


def make_user(entity: str | None = None, level: int = 100, ttl: float = 3600.0) -> User:
    """A fresh user (new userUUID; new entity unless given) with a valid HS256 token."""
    user, ent = str(uuid.uuid4()), entity or str(uuid.uuid4())
    token = mint(
        secret=SECRET, user=user, entity=ent, level=level, now=SystemClock().wall(), ttl=ttl
    )
    return User(user, ent, level, token)


async def connect_and_join(node: NodeProcess, user: User, room: int) -> Client:
    """Connect to the node, log in, select the room; asserts READY and CONNECTED."""
    client = Client(await connect(node.ws_url, open_timeout=5))
    try:
        assert await client.recv() == {"type": "query", "data": "START?"}
        ready = await client.ask({"type": "token", "content": user.token})
        assert ready == {"type": "status", "data": "READY"}, ready
        joined = await client.ask({"type": "select_room", "room_id": room})
        assert joined == {"type": "status", "data": "CONNECTED"}, joined
    except BaseException:
        await client.close()
        raise
    return client


async def http(
    node: NodeProcess, method: str, path: str, user: User | None = None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """One request to the node's side-port; (status, decoded envelope)."""
    headers = {"Authorization": f"Bearer {user.token}"} if user else {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, node.http_url + path, json=body, headers=headers) as resp,
    ):
        decoded = orjson.loads(await resp.read())
        assert isinstance(decoded, dict)
        return resp.status, decoded


async def create_room(node: NodeProcess, owner: User, **fields: Any) -> int:
    body = {"name": "room", "level_admin": 100, **fields}
    status, data = await http(node, "POST", "/rooms", owner, body)
    assert status == 200, data
    room_id: int = data["content"]["room"]["id"]
    return room_id


async def grant(
    node: NodeProcess, admin: User, room: int, subject: str, flags: str, **fields: Any
) -> int:
    """PUT a rule (``subject`` is a userUUID or entityUUID); 201 created, 200 updated."""
    body = {"entity_UUID": subject, "permissions": flags, **fields}
    status, data = await http(node, "PUT", f"/rooms/{room}/members", admin, body)
    assert status in (200, 201), data
    return status


async def revoke(node: NodeProcess, admin: User, room: int, subject: str) -> None:
    status, data = await http(node, "DELETE", f"/rooms/{room}/members/{subject}", admin)
    assert status == 200, data


async def readyz(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    """GET /readyz: (status, content), content being {"storage": bool, "broker": bool}."""
    status, data = await http(node, "GET", "/readyz")
    content = data.get("content")
    return status, content if isinstance(content, dict) else {}


# -- the tally ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message frame as one connection received it."""

    room: int
    seq: int
    id: int
    emitter: str
    content: str
    client_id: str | None

    @classmethod
    def from_frame(cls, data: dict[str, Any]) -> Delivery:
        return cls(
            room=int(data["room_id"]),
            seq=int(data["seq"]),
            id=int(data["id"]),
            emitter=str(data["emitter"]),
            content=str(data["content"]),
            client_id=data.get("client_id"),
        )


ACKED = "acked"
PENDING = "pending"
NO_REPLY = "no-reply"
CLOSED = "closed"


@dataclass(slots=True)
class SendRecord:
    """One ``message`` command: when it went out, what answered it and when (monotonic)."""

    peer: str
    room: int
    client_id: str
    content: str
    sent_at: float
    replied_at: float | None = None
    outcome: str = PENDING  # "acked", a status/query word ("UNAVAILABLE"...), "no-reply", "closed"
    delivery: Delivery | None = None

    def in_flight(self, start: float, end: float) -> bool:
        """Sent before ``end`` and not answered before ``start``."""
        replied = self.replied_at if self.replied_at is not None else float("inf")
        return self.sent_at <= end and replied >= start


@dataclass(eq=False)
class Peer:
    """One tallied connection: everything it received, and the messages it sent."""

    name: str
    node: NodeProcess
    user: User
    room: int
    client: Client
    joined_at: float
    deliveries: list[Delivery] = field(default_factory=list)
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # non-message
    sends: list[SendRecord] = field(default_factory=list)
    close_code: int | None = None
    closed_at: float | None = None
    counter: int = 0
    _echoes: dict[str, asyncio.Future[Delivery]] = field(default_factory=dict)
    _reply: asyncio.Future[dict[str, Any]] | None = None
    _reader: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None

    def last_seq(self, room: int | None = None) -> int:
        room = self.room if room is None else room
        for delivery in reversed(self.deliveries):
            if delivery.room == room:
                return delivery.seq
        return 0


class Tally:
    """Records, per connection, every (room, seq, content) received and every send's answer.

    Senders use unique ``client_id``s (``<tally>-<peer>-<n>``) so storage can be checked per
    message. A send is "acked" when the sender receives its own echo (the message frame with
    its client_id), "refused" when a status word answers it instead (``UNAVAILABLE``...).
    ``send`` is lock-step (one command outstanding, so every answer is attributed exactly);
    ``burst`` pipelines many sends and matches echoes by client_id.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.peers: list[Peer] = []
        self._pacers: list[tuple[Peer, asyncio.Event, asyncio.Task[None]]] = []

    # -- connections --------------------------------------------------------------------------

    async def join(self, name: str, node: NodeProcess, user: User, room: int) -> Peer:
        """Connect, log in, select the room and start recording everything that arrives."""
        client = await connect_and_join(node, user, room)
        peer = Peer(name, node, user, room, client, joined_at=time.monotonic())
        peer._reader = asyncio.get_running_loop().create_task(self._read(peer))
        self.peers.append(peer)
        return peer

    async def _read(self, peer: Peer) -> None:
        try:
            async for raw in peer.client.ws:
                frame = orjson.loads(raw)
                now = time.monotonic()
                if frame.get("type") == "message":
                    delivery = Delivery.from_frame(frame["data"])
                    peer.deliveries.append(delivery)
                    if delivery.emitter == peer.user.user and delivery.client_id is not None:
                        echo = peer._echoes.pop(delivery.client_id, None)
                        if echo is not None and not echo.done():
                            echo.set_result(delivery)
                else:
                    peer.frames.append((now, frame))
                    if peer._reply is not None and not peer._reply.done():
                        peer._reply.set_result(frame)
        except ConnectionClosed:
            pass
        finally:
            peer.closed_at = time.monotonic()
            peer.close_code = peer.client.ws.close_code
            gone = ConnectionError(f"{peer.name}: connection closed ({peer.close_code})")
            for future in [*peer._echoes.values(), peer._reply]:
                if future is not None and not future.done():
                    future.set_exception(gone)
            peer._echoes.clear()

    # -- sending ------------------------------------------------------------------------------

    def _record(self, peer: Peer, content: str | None) -> SendRecord:
        peer.counter += 1
        cid = f"{self.tag}-{peer.name}-{peer.counter}"
        record = SendRecord(
            peer=peer.name,
            room=peer.room,
            client_id=cid,
            content=content or f"{peer.name} #{peer.counter}",
            sent_at=time.monotonic(),
        )
        peer.sends.append(record)
        return record

    async def send(
        self, peer: Peer, content: str | None = None, timeout: float = 5.0
    ) -> SendRecord:
        """Send one message and wait for its answer: the echo, or a status/query frame."""
        loop = asyncio.get_running_loop()
        record = self._record(peer, content)
        if not peer.open:
            record.outcome = CLOSED
            return record
        echo: asyncio.Future[Delivery] = loop.create_future()
        reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        peer._echoes[record.client_id] = echo
        peer._reply = reply
        try:
            record.sent_at = time.monotonic()
            await peer.client.send(
                {"type": "message", "content": record.content, "client_id": record.client_id}
            )
            futures: set[asyncio.Future[Any]] = {echo, reply}
            done, _ = await asyncio.wait(
                futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except ConnectionClosed:
            done = set()
        finally:
            peer._echoes.pop(record.client_id, None)
            peer._reply = None
        record.replied_at = time.monotonic()
        if echo in done and echo.exception() is None:
            record.outcome, record.delivery = ACKED, echo.result()
        elif reply in done and reply.exception() is None:
            record.outcome = str(reply.result().get("data"))
        else:
            record.outcome = CLOSED if not peer.open else NO_REPLY
        for future in (echo, reply):
            if future.done():
                future.exception()  # retrieved: no "exception never retrieved" warning
            else:
                future.cancel()
        return record

    async def burst(self, peer: Peer, count: int, timeout: float = 15.0) -> list[SendRecord]:
        """Send ``count`` messages back to back, then wait for all their echoes. Sends not
        echoed within ``timeout`` end as "no-reply" (status frames are in ``peer.frames``)."""
        loop = asyncio.get_running_loop()
        records = [self._record(peer, None) for _ in range(count)]
        echoes = {r.client_id: loop.create_future() for r in records}
        peer._echoes.update(echoes)
        for record in records:
            record.sent_at = time.monotonic()
            await peer.client.send(
                {"type": "message", "content": record.content, "client_id": record.client_id}
            )
        await asyncio.wait(echoes.values(), timeout=timeout)
        for record in records:
            future = echoes[record.client_id]
            peer._echoes.pop(record.client_id, None)
            if future.done() and future.exception() is None:
                record.outcome, record.delivery = ACKED, future.result()
                record.replied_at = time.monotonic()  # at most this late
            else:
                record.outcome = CLOSED if not peer.open else NO_REPLY
                future.cancel()
        return records

    def pace(
        self,
        peer: Peer,
        interval: float = 0.01,
        *,
        max_messages: int = 3000,
        max_seconds: float = 30.0,
        reply_timeout: float = 10.0,
    ) -> None:
        """Keep sending lock-step, one message every ``interval`` s after the previous answer,
        until ``stop_pacing``, ``max_messages`` or ``max_seconds``; stops early if a send gets
        no answer within ``reply_timeout`` or the connection closes. (An echo may legitimately
        wait: the hub holds it until the seqs before it are delivered, filling from storage.)"""
        stop = asyncio.Event()

        async def run() -> None:
            deadline = time.monotonic() + max_seconds
            for _ in range(max_messages):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                record = await self.send(peer, timeout=reply_timeout)
                if record.outcome in (NO_REPLY, CLOSED):
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)

        self._pacers.append((peer, stop, asyncio.get_running_loop().create_task(run())))

    async def stop_pacing(self, peers: Iterable[Peer] | None = None) -> None:
        """Stop the pacers (of ``peers``, or all) and wait for their last answers."""
        wanted = None if peers is None else set(peers)
        chosen = [entry for entry in self._pacers if wanted is None or entry[0] in wanted]
        self._pacers = [entry for entry in self._pacers if entry not in chosen]
        for _, stop, _ in chosen:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*(task for _, _, task in chosen)), 30.0)

    # -- views ------------------------------------------------------------------------------

    def records(self, room: int | None = None) -> list[SendRecord]:
        return [r for p in self.peers for r in p.sends if room is None or r.room == room]

    def acked(self, room: int | None = None) -> list[SendRecord]:
        return [r for r in self.records(room) if r.outcome == ACKED]

    def with_outcome(self, outcome: str) -> list[SendRecord]:
        return [r for r in self.records() if r.outcome == outcome]

    def rooms(self) -> list[int]:
        return sorted({p.room for p in self.peers})

    def node_tails(self) -> str:
        nodes = {p.node.name: p.node for p in self.peers}
        return "\n".join(f"== node {n} ==\n{nodes[n].tail()}" for n in sorted(nodes))

    async def wait_caught_up(
        self, database_url: str, *, timeout: float = 10.0, quiet: float = 0.3
    ) -> None:
        """Wait until every open connection has received its room's last stored seq, then
        ``quiet`` more seconds so late duplicates would still be recorded."""
        deadline = time.monotonic() + timeout
        while True:
            last = await stored_last_seqs(database_url, self.rooms())
            behind = [
                (p.name, p.node.name, p.last_seq(), last.get(p.room, 0))
                for p in self.peers
                if p.open and self._owes(p) and p.last_seq() < last.get(p.room, 0)
            ]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not caught up within {timeout}s (peer, node, has, stored): {behind}\n"
                    + self.node_tails()
                )
            await asyncio.sleep(0.05)
        await asyncio.sleep(quiet)

    def _owes(self, peer: Peer) -> bool:
        """Whether anything in the peer's room was sent after it joined."""
        return any(r.sent_at >= peer.joined_at for r in self.records(peer.room))

    async def close(self) -> None:
        """Stop pacers, close every connection, end the readers."""
        for _, stop, _ in self._pacers:
            stop.set()
        await asyncio.gather(*(t for _, _, t in self._pacers), return_exceptions=True)
        self._pacers = []
        for peer in self.peers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.client.close(), 3.0)
        readers = [p._reader for p in self.peers if p._reader is not None]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class StoredRow:
    room: int
    seq: int
    id: int
    emitter: str
    content: str
    client_id: str | None


async def stored_messages(database_url: str, rooms: list[int]) -> dict[int, list[StoredRow]]:
    """Every stored message of the rooms, by room, in seq order (read with asyncpg)."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT room_id, seq, id, emitter, content, client_id FROM messages"
            " WHERE room_id = ANY($1::bigint[]) ORDER BY room_id, seq",
            rooms,
        )
    finally:
        await conn.close()
    out: dict[int, list[StoredRow]] = {room: [] for room in rooms}
    for row in rows:
        out[int(row[0])].append(StoredRow(int(row[0]), int(row[1]), int(row[2]), *row[3:6]))
    return out


async def stored_last_seqs(database_url: str, rooms: list[int]) -> dict[int, int]:
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT room_id, max(seq) FROM messages WHERE room_id = ANY($1::bigint[])"
            " GROUP BY room_id",
            rooms,
        )
    finally:
        await conn.close()
    return {int(r[0]): int(r[1]) for r in rows}


@dataclass(frozen=True, slots=True)
class Summary:
    acked: int
    refused: int
    in_doubt_stored: int
    stored: dict[int, int]  # room -> messages stored
    deliveries: int


async def assert_exactly_once_in_order(
    tally: Tally,
    database_url: str,
    *,
    in_doubt: Callable[[SendRecord], bool] | None = None,
) -> Summary:
    """The delivery guarantees, checked against what PostgreSQL holds:

    1. storage: each tallied room's seqs are exactly 1..n, and every stored message was sent
       by a tallied peer (nothing else writes to these rooms);
    2. senders: every send was answered; every acked message is stored exactly once, at the
       seq and id its echo said; a refused send (a status word answered it) is not stored,
       unless ``in_doubt(record)`` says its commit may have raced the fault (a crash between
       commit and reply): then it may be stored, and if it is, it is checked like the rest;
    3. receivers: each connection's stream per room is contiguous from its first seq, with no
       duplicate, and each frame equals the stored row at that seq (so every receiver has the
       same message at the same position, and nothing unstored reached anyone);
    4. completeness: a connection that stayed open has everything up to its room's last seq,
       from a first seq no later than any acked message sent after it joined.
    """
    rooms = tally.rooms()
    stored = await stored_messages(database_url, rooms)
    problems: list[str] = []
    by_cid: dict[tuple[int, str | None, str], list[StoredRow]] = {}
    for room, rows in stored.items():
        seqs = [r.seq for r in rows]
        if seqs != list(range(1, len(rows) + 1)):
            problems.append(f"room {room}: stored seqs are not 1..{len(rows)}: {seqs[:50]}")
        for row in rows:
            by_cid.setdefault((row.room, row.client_id, row.emitter), []).append(row)

    records = tally.records()
    known = {(r.room, r.client_id) for r in records}
    for room, rows in stored.items():
        for row in rows:
            if (room, row.client_id) not in known:
                problems.append(f"room {room}: stored message not sent by the tally: {row}")

    users = {p.name: p.user.user for p in tally.peers}
    acked = refused = in_doubt_stored = 0
    for record in records:
        rows = by_cid.get((record.room, record.client_id, users[record.peer]), [])
        if len(rows) > 1:
            problems.append(f"{record.client_id} stored {len(rows)} times")
        if record.outcome == ACKED:
            acked += 1
            delivery = record.delivery
            assert delivery is not None
            if not rows:
                problems.append(f"acked but not stored: {record}")
            elif (rows[0].seq, rows[0].id) != (delivery.seq, delivery.id):
                problems.append(f"echo {delivery} differs from storage {rows[0]}")
        elif record.outcome in (PENDING, NO_REPLY, CLOSED):
            problems.append(f"send never answered: {record}")
        else:
            refused += 1
            if rows and in_doubt is not None and in_doubt(record):
                in_doubt_stored += 1
            elif rows:
                problems.append(f"answered {record.outcome} but stored: {record} -> {rows[0]}")

    deliveries = 0
    for peer in tally.peers:
        streams: dict[int, list[Delivery]] = {}
        for delivery in peer.deliveries:
            streams.setdefault(delivery.room, []).append(delivery)
        deliveries += len(peer.deliveries)
        for room, stream in streams.items():
            seqs = [d.seq for d in stream]
            first = seqs[0]
            if seqs != list(range(first, first + len(seqs))):
                problems.append(
                    f"{peer.name}@{peer.node.name} room {room}: not contiguous from {first}: "
                    f"{_first_break(seqs)}"
                )
            at_seq = {r.seq: r for r in stored.get(room, [])}
            for delivery in stream:
                want = at_seq.get(delivery.seq)
                if want is None or (want.id, want.emitter, want.content, want.client_id) != (
                    delivery.id,
                    delivery.emitter,
                    delivery.content,
                    delivery.client_id,
                ):
                    problems.append(f"{peer.name}@{peer.node.name}: got {delivery}, stored {want}")
                    break
        if not peer.open:
            continue
        room_rows = stored.get(peer.room, [])
        later = [
            r.delivery.seq
            for r in records
            if r.room == peer.room and r.outcome == ACKED and r.sent_at >= peer.joined_at
            and r.delivery is not None
        ]  # fmt: skip
        if not later:
            continue
        mine = [d.seq for d in streams.get(peer.room, [])]
        if not mine:
            problems.append(f"{peer.name}@{peer.node.name}: received nothing in room {peer.room}")
            continue
        if mine[0] > min(later):
            problems.append(
                f"{peer.name}@{peer.node.name}: starts at seq {mine[0]}, missing seq {min(later)}"
            )
        if room_rows and mine[-1] != room_rows[-1].seq:
            problems.append(
                f"{peer.name}@{peer.node.name}: stayed connected but ends at seq {mine[-1]}"
                f" of {room_rows[-1].seq}"
            )
    if problems:
        shown = "\n".join(problems[:40])
        more = f"\n... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise AssertionError(f"delivery guarantees broken:\n{shown}{more}\n{tally.node_tails()}")
    return Summary(
        acked=acked,
        refused=refused,
        in_doubt_stored=in_doubt_stored,
        stored={room: len(rows) for room, rows in stored.items()},
        deliveries=deliveries,
    )


def _first_break(seqs: list[int]) -> str:
    for i in range(1, len(seqs)):
        if seqs[i] != seqs[i - 1] + 1:
            return f"... {seqs[max(0, i - 3) : i + 3]} at index {i}"
    return str(seqs[:20])
