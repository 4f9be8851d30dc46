"""The command line as an operator runs it: ``python -m nanomsg serve | migrate | token``.

Every test starts a real subprocess with the ``NANOMSG_*`` variables it needs set explicitly
(inherited ones are removed) and a SQLite database under ``tmp_path``; every process a test
starts is killed when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from nanomsg.auth import Verifier
from nanomsg.clock import SystemClock
from nanomsg.config import OPTIONS
from nanomsg.store.migrate import load_migrations, postgres_schema_path, sqlite_schema_path
from tests.conftest import SECRET

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 30.0  # a one-shot command (token, migrate, --help)
START_TIMEOUT = 20.0  # until serve logs that it listens
STOP_TIMEOUT = 5.0  # SIGTERM to exit
RECV_TIMEOUT = 5.0

LISTENING = re.compile(r"nanomsg listening: ws://([^ ]+):(\d+)/chat, http://([^ ]+):(\d+)")
BANNER_END = re.compile(r"^\s*HTTP: curl ")


# -- helpers -------------------------------------------------------------------------------------


def cli_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The parent's environment without any NANOMSG_* variable, plus ``settings``.

    The database defaults to a file in ``tmp_path`` so no test touches ./nanomsg.db, and the
    checkout is on PYTHONPATH so ``-m nanomsg`` works with or without an installed package.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("NANOMSG_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["COLUMNS"] = "200"  # argparse help on one line per option
    env["NANOMSG_DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"
    env.update(settings)
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = RUN_TIMEOUT
) -> Finished:
    """Run ``python -m nanomsg ARGS`` to completion (killed after ``timeout`` seconds)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nanomsg",
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    output = asyncio.gather(proc.stdout.read(), proc.stderr.read())
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave it running
            proc.kill()
            await proc.wait()
    out, err = await output
    if timed_out:
        raise AssertionError(
            f"nanomsg {' '.join(args)} did not finish in {timeout}s; stderr: {err.decode()!r}"
        )
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(), err.decode())


class Server:
    """A running ``nanomsg serve``: its output, read continuously, line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._closed = 0
        self._changed = asyncio.Condition()
        self._readers = [
            asyncio.get_running_loop().create_task(self._read(proc.stdout, self.stdout)),
            asyncio.get_running_loop().create_task(self._read(proc.stderr, self.stderr)),
        ]

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while raw := await stream.readline():
            async with self._changed:
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._closed += 1
            self._changed.notify_all()

    def output(self) -> str:
        return "stdout:\n" + "\n".join(self.stdout) + "\nstderr:\n" + "\n".join(self.stderr)

    async def wait_for_line(self, lines: list[str], pattern: re.Pattern[str]) -> re.Match[str]:
        """The first line of ``lines`` (self.stdout or self.stderr) matching ``pattern``."""
        try:
            async with asyncio.timeout(START_TIMEOUT), self._changed:
                while True:
                    for line in lines:
                        if found := pattern.search(line):
                            return found
                    if self._closed == len(self._readers):
                        raise AssertionError(f"serve exited early\n{self.output()}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no line matching {pattern.pattern!r} in {START_TIMEOUT}s\n{self.output()}"
            ) from None

    async def ports(self) -> tuple[int, int]:
        """(WebSocket port, HTTP port), from the "nanomsg listening" log line on stderr."""
        found = await self.wait_for_line(self.stderr, LISTENING)
        return int(found.group(2)), int(found.group(4))

    async def exit_status(self) -> int:
        """The exit status, once the process has exited and its output is read to the end."""
        try:
            status = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            raise AssertionError(
                f"serve still running after {STOP_TIMEOUT}s\n{self.output()}"
            ) from None
        await asyncio.gather(*self._readers)
        return status

    async def cleanup(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


StartServe = Callable[..., Awaitable[Server]]


@pytest_asyncio.fixture
async def start_serve(tmp_path: Path) -> AsyncIterator[StartServe]:
    """start_serve(*args, **NANOMSG_settings) -> Server; every server is killed at the end."""
    started: list[Server] = []

    async def start(*args: str, **settings: str) -> Server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nanomsg",
            "serve",
            *args,
            env=cli_env(tmp_path, **settings),
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        server = Server(proc)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.cleanup()


@dataclass
class Banner:
    secret: str
    room_id: int
    token_a: str
    token_b: str
    wscat_port: int


def parse_banner(stdout: str) -> Banner:
    def one(pattern: str) -> str:
        found = re.search(pattern, stdout, re.MULTILINE)
        assert found, f"no {pattern!r} in the dev banner:\n{stdout}"
        return found.group(1)

    return Banner(
        secret=one(r"^\s*NANOMSG_JWT_SECRET=(\S+)$"),
        room_id=int(one(r"^\s*room (\d+) ")),
        token_a=one(r"^\s*token A: (\S+)$"),
        token_b=one(r"^\s*token B: (\S+)$"),
        wscat_port=int(one(r"^\s*try:\s+npx wscat -c ws://[^ ]+:(\d+)/chat$")),
    )


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    obj = orjson.loads(raw)
    assert isinstance(obj, dict)
    return obj


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


# -- serve: configuration errors and --help -----------------------------------------------------


async def test_serve_without_a_signing_key_exits_2_with_one_line_naming_the_variable(
    tmp_path: Path,
) -> None:
    done = await run_cli("serve", env=cli_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2, done
    assert "NANOMSG_JWT_SECRET" in one_line(done.stderr)
    assert done.stdout == ""


async def test_serve_help_lists_every_option_flag_and_its_variable(tmp_path: Path) -> None:
    done = await run_cli("serve", "--help", env=cli_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done
    missing = [opt.flag for opt in OPTIONS if opt.flag not in done.stdout]
    assert missing == []
    missing_env = [opt.env for opt in OPTIONS if opt.env not in done.stdout]
    assert missing_env == []


async def test_serve_with_a_public_key_file_that_is_not_a_key_exits_2_with_one_line(
    tmp_path: Path,
) -> None:
    pem = tmp_path / "not-a-key.pem"
    pem.write_text("this is not a PEM public key\n")
    done = await run_cli(
        "serve",
        env=cli_env(tmp_path, NANOMSG_JWT_PUBLIC_KEY=str(pem), NANOMSG_PORT="0"),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done
    assert "NANOMSG_JWT_PUBLIC_KEY" in one_line(done.stderr)


async def test_serve_exits_1_with_one_line_when_the_websocket_port_is_taken(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await run_cli(
            "serve",
            *("--port", str(port), "--http-port", "0"),
            env=cli_env(tmp_path, NANOMSG_JWT_SECRET=SECRET),
            cwd=tmp_path,
            timeout=10.0,
        )
    assert done.returncode == 1, done
    assert "address already in use" in one_line(done.stderr)


# -- token ---------------------------------------------------------------------------------------


async def test_token_prints_a_jwt_the_verifier_accepts_with_the_given_claims(
    tmp_path: Path,
) -> None:
    user, entity = str(uuid.uuid4()), str(uuid.uuid4())
    before = time.time()
    done = await run_cli(
        "token",
        *("--user", user, "--entity", entity, "--level", "100", "--ttl", "1h"),
        env=cli_env(tmp_path, NANOMSG_JWT_SECRET=SECRET),
        cwd=tmp_path,
    )
    after = time.time()
    assert done.returncode == 0, done
    token = one_line(done.stdout)
    principal = Verifier.from_material(clock=SystemClock(), secret=SECRET).verify(token)
    assert (principal.user, principal.entity, principal.level) == (user, entity, 100)
    assert before + 3600 - 1 <= principal.exp <= after + 3600 + 1


async def test_token_without_a_secret_exits_2_naming_the_variable(tmp_path: Path) -> None:
    done = await run_cli(
        "token",
        *("--user", str(uuid.uuid4()), "--entity", str(uuid.uuid4())),
        env=cli_env(tmp_path),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done
    assert "NANOMSG_JWT_SECRET" in one_line(done.stderr)
    assert done.stdout == ""


async def test_token_refuses_a_user_that_is_not_a_uuid(tmp_path: Path) -> None:
    env = {**cli_env(tmp_path), "NANOMSG_JWT_SECRET": SECRET}
    done = await run_cli(
        "token", *("--user", "alice", "--entity", str(uuid.uuid4())), env=env, cwd=tmp_path
    )
    assert done.returncode == 2, done
    assert "--user must be a UUID" in one_line(done.stderr)
    assert done.stdout == ""


async def test_token_help_lists_its_own_flags_first_and_only_the_signing_settings(
    tmp_path: Path,
) -> None:
    done = await run_cli("token", "--help", env=cli_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done
    text = done.stdout
    own = [text.find(f"\n  {flag} ") for flag in ("--user", "--entity", "--level", "--ttl")]
    signing = [text.find(f"\n  {flag} ") for flag in ("--jwt-secret", "--jwt-audience")]
    signing.append(text.find("\n  --jwt-issuer "))
    assert -1 not in own + signing, text
    assert max(own) < min(signing), text
    server_only = [
        opt.flag
        for opt in OPTIONS
        if opt.name not in ("jwt_secret", "jwt_audience", "jwt_issuer") and opt.flag in text
    ]
    assert server_only == [], text


# -- migrate -------------------------------------------------------------------------------------


def sqlite_state(path: Path) -> tuple[list[int], set[str]]:
    """(versions in schema_migrations, table names) of a SQLite file."""
    with sqlite3.connect(path) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    return versions, tables


async def test_migrate_creates_the_sqlite_schema_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "migrate.db"
    path.parent.mkdir()
    env = cli_env(tmp_path, NANOMSG_DATABASE_URL=f"sqlite:///{path}")
    first = await run_cli("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first
    versions, tables = sqlite_state(path)
    every = [m.version for m in load_migrations(sqlite_schema_path())]
    assert versions == every
    assert {"rooms", "room_rules", "messages", "schema_migrations"} <= tables

    second = await run_cli("migrate", env=env, cwd=tmp_path)
    assert second.returncode == 0, second
    assert sqlite_state(path)[0] == every


async def test_migrate_applies_the_schema_to_a_fresh_postgres_database_twice(
    tmp_path: Path, fresh_pg_url: str
) -> None:
    env = cli_env(tmp_path, NANOMSG_DATABASE_URL=fresh_pg_url)
    for _ in range(2):
        done = await run_cli("migrate", env=env, cwd=tmp_path)
        assert done.returncode == 0, done
    conn = await asyncpg.connect(fresh_pg_url)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        tables = {
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
    finally:
        await conn.close()
    assert versions == [m.version for m in load_migrations(postgres_schema_path())]
    assert {"rooms", "room_rules", "messages"} <= tables


# -- serve --dev ---------------------------------------------------------------------------------


async def test_serve_dev_prints_tokens_a_room_and_a_wscat_line_that_work(
    start_serve: StartServe,
) -> None:
    server = await start_serve("--dev", "--port", "0", "--http-port", "0")
    ws_port, _ = await server.ports()
    await server.wait_for_line(server.stdout, BANNER_END)
    banner = parse_banner("\n".join(server.stdout))
    assert banner.wscat_port == ws_port

    verifier = Verifier.from_material(clock=SystemClock(), secret=banner.secret)
    a, b = verifier.verify(banner.token_a), verifier.verify(banner.token_b)
    assert a.user != b.user
    assert a.entity == b.entity
    assert a.level == b.level == 100

    async with connect(f"ws://127.0.0.1:{banner.wscat_port}/chat") as ws:
        assert await recv_json(ws) == {"type": "query", "data": "START?"}
        await ws.send(orjson.dumps({"type": "token", "content": banner.token_a}).decode())
        assert await recv_json(ws) == {"type": "status", "data": "READY"}
        await ws.send(orjson.dumps({"type": "select_room", "room_id": banner.room_id}).decode())
        assert await recv_json(ws) == {"type": "status", "data": "CONNECTED"}
        await ws.send(orjson.dumps({"type": "message", "content": "hello"}).decode())
        echo = await recv_json(ws)
    assert echo["type"] == "message"
    data = echo["data"]
    assert (data["content"], data["emitter"], data["room_id"]) == ("hello", a.user, banner.room_id)


async def test_serve_answers_healthz_on_the_http_port_it_logged(start_serve: StartServe) -> None:
    server = await start_serve("--port", "0", "--http-port", "0", NANOMSG_JWT_SECRET=SECRET)
    _, http_port = await server.ports()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{http_port}/healthz") as resp,
    ):
        assert resp.status == 200
        body = orjson.loads(await resp.read())
    assert body["content"] == {"status": "ok", "closes": {}}


async def test_sigterm_closes_clients_with_1001_and_serve_exits_0(
    start_serve: StartServe,
) -> None:
    server = await start_serve("--dev", "--port", "0", "--http-port", "0")
    ws_port, _ = await server.ports()
    await server.wait_for_line(server.stdout, BANNER_END)
    banner = parse_banner("\n".join(server.stdout))
    async with connect(f"ws://127.0.0.1:{ws_port}/chat") as ws:
        assert await recv_json(ws) == {"type": "query", "data": "START?"}
        await ws.send(orjson.dumps({"type": "token", "content": banner.token_a}).decode())
        assert await recv_json(ws) == {"type": "status", "data": "READY"}

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001

    assert await server.exit_status() == 0, server.output()
    assert time.monotonic() - started < STOP_TIMEOUT
    assert "Traceback" not in "\n".join(server.stderr), server.output()


def banner_tokens(stdout: str) -> tuple[str, str]:
    found = re.search(r"^\s*token A: (\S+)$\n^\s*token B: (\S+)$", stdout, re.MULTILINE)
    assert found, f"no tokens in the dev banner:\n{stdout}"
    return found.group(1), found.group(2)


async def test_serve_dev_with_the_secret_in_the_environment_names_it_and_does_not_print_it(
    start_serve: StartServe,
) -> None:
    server = await start_serve(
        "--dev", "--port", "0", "--http-port", "0", NANOMSG_JWT_SECRET=SECRET
    )
    await server.ports()
    await server.wait_for_line(server.stdout, BANNER_END)
    stdout = "\n".join(server.stdout)
    assert stdout.splitlines()[0] == (
        "nanomsg dev mode: tokens signed with the secret from NANOMSG_JWT_SECRET."
    ), stdout
    assert "fresh" not in stdout
    assert SECRET not in server.output()
    verifier = Verifier.from_material(clock=SystemClock(), secret=SECRET)
    assert {verifier.verify(token).user for token in banner_tokens(stdout)} == {
        "00000000-0000-4000-8000-0000000000a1",
        "00000000-0000-4000-8000-0000000000b2",
    }


async def test_serve_dev_with_jwt_secret_flag_names_the_flag_and_does_not_print_it(
    start_serve: StartServe,
) -> None:
    flag_secret = "f" * 40
    server = await start_serve(
        "--dev",
        f"--jwt-secret={flag_secret}",
        *("--port", "0", "--http-port", "0"),
        NANOMSG_JWT_SECRET=SECRET,  # the flag overrides it; the banner must say so
    )
    await server.ports()
    await server.wait_for_line(server.stdout, BANNER_END)
    stdout = "\n".join(server.stdout)
    assert stdout.splitlines()[0] == (
        "nanomsg dev mode: tokens signed with the secret from --jwt-secret."
    ), stdout
    assert flag_secret not in server.output()
    token_a, _ = banner_tokens(stdout)
    principal = Verifier.from_material(clock=SystemClock(), secret=flag_secret).verify(token_a)
    assert principal.user == "00000000-0000-4000-8000-0000000000a1"
