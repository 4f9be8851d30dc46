"""A real nanomsg server on port 0 over real sockets, on each backend.

``backend`` is "embedded" (SQLite file + in-process relay) or "services" (PostgreSQL + Redis);
tests that take the ``server`` fixture run on both.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from nanomsg.app import App
from nanomsg.config import Config
from tests.conftest import SECRET, TokenFactory

RECV_TIMEOUT = 5.0


@dataclass
class User:
    user: str
    entity: str
    level: int
    token: str


class Client:
    """A thin test client over a real WebSocket connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, obj: Any) -> None:
        await self.ws.send(obj if isinstance(obj, str | bytes) else orjson.dumps(obj).decode())

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        obj = orjson.loads(raw)
        assert isinstance(obj, dict)
        return obj

    async def ask(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        return await self.recv()

    async def expect_close(self, timeout: float = RECV_TIMEOUT) -> int | None:
        """Read until the server closes; return the close code it sent."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    async def silent(self, seconds: float = 0.3) -> bool:
        """True when nothing arrives for ``seconds``."""
        try:
            await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        """Close politely, but never wait long: a test client may have stopped reading."""
        try:
            await asyncio.wait_for(self.ws.close(), 1.0)
        except TimeoutError:
            self.ws.transport.abort()


@dataclass
class Server:
    app: App
    make_token: TokenFactory
    http: aiohttp.ClientSession
    clients: list[Client]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.app.ws_port}/chat"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    def user(self, entity: str | None = None, level: int = 100, **kw: Any) -> User:
        u, e = str(uuid.uuid4()), entity or str(uuid.uuid4())
        return User(u, e, level, self.make_token(user=u, entity=e, level=level, **kw))

    async def connect(self, path: str = "/chat", **kw: Any) -> Client:
        ws = await connect(f"ws://127.0.0.1:{self.app.ws_port}{path}", **kw)
        client = Client(ws)
        self.clients.append(client)
        return client

    async def login(self, user: User) -> Client:
        """Connect, answer START? with the user's token, expect READY."""
        client = await self.connect()
        assert await client.recv() == {"type": "query", "data": "START?"}
        assert await client.ask({"type": "token", "content": user.token}) == {
            "type": "status",
            "data": "READY",
        }
        return client

    async def join(self, user: User, room_id: int) -> Client:
        client = await self.login(user)
        reply = await client.ask({"type": "select_room", "room_id": room_id})
        assert reply == {"type": "status", "data": "CONNECTED"}, reply
        return client

    async def call(
        self, method: str, path: str, user: User | None, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {user.token}"} if user else {}
        async with self.http.request(
            method, self.http_url + path, json=body, headers=headers
        ) as resp:
            return resp.status, orjson.loads(await resp.read())

    async def create_room(self, owner: User, **fields: Any) -> int:
        body = {"name": "room", "level_admin": 100, **fields}
        status, data = await self.call("POST", "/rooms", owner, body)
        assert status == 200, data
        room_id: int = data["content"]["room"]["id"]
        return room_id

    async def grant(
        self, admin: User, room_id: int, subject: str, flags: str, **fields: Any
    ) -> int:
        body = {"entity_UUID": subject, "permissions": flags, **fields}
        status, data = await self.call("PUT", f"/rooms/{room_id}/members", admin, body)
        assert status in (200, 201), data
        return status


def make_config(
    backend: str, tmp_path: Path, pg_url: str | None, redis_url: str | None, **overrides: Any
) -> Config:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "jwt_secret": SECRET,
        "ping_interval": 0,
    }
    if backend == "embedded":
        base["database_url"] = f"sqlite:///{tmp_path / 'nanomsg.db'}"
    else:
        assert pg_url and redis_url
        base["database_url"] = pg_url
        base["redis_url"] = redis_url
    base.update(overrides)
    return Config(**base).validate()


@pytest.fixture(params=["embedded", "services"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ServerFactory = Callable[..., Awaitable[Server]]


@pytest_asyncio.fixture
async def server_factory(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, make_token: TokenFactory
) -> AsyncIterator[ServerFactory]:
    """Start servers with config overrides; all are stopped after the test."""
    pg = request.getfixturevalue("pg_url") if backend == "services" else None
    rd = request.getfixturevalue("redis_url") if backend == "services" else None
    started: list[Server] = []
    session = aiohttp.ClientSession()
    # Servers of one test share a Redis namespace; other tests' rooms can't leak in.
    prefix = "t" + uuid.uuid4().hex[:12]

    async def factory(**overrides: Any) -> Server:
        app = App(make_config(backend, tmp_path, pg, rd, redis_prefix=prefix, **overrides))
        await app.start()
        srv = Server(app=app, make_token=make_token, http=session, clients=[])
        started.append(srv)
        return srv

    try:
        yield factory
    finally:
        for srv in started:
            await asyncio.gather(*(client.close() for client in srv.clients))
            await srv.app.stop()
        await session.close()


@pytest_asyncio.fixture
async def server(server_factory: ServerFactory) -> Server:
    return await server_factory()
