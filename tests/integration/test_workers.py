"""``serve --workers N``: worker processes share the ports, relay through Redis, and the
supervisor restarts a worker that dies."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from tests.conftest import SECRET, TokenFactory
from tests.integration.conftest import Client, User

pytestmark = pytest.mark.asyncio

LISTENING = re.compile(rb"listening: ws://")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Cluster:
    proc: asyncio.subprocess.Process
    ws_port: int
    http_port: int
    listening: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    log: list[bytes] = field(default_factory=list)


async def _pump_stderr(cluster: Cluster) -> None:
    assert cluster.proc.stderr is not None
    while line := await cluster.proc.stderr.readline():
        cluster.log.append(line)
        if LISTENING.search(line):
            cluster.listening.put_nowait(line)


@pytest_asyncio.fixture
async def cluster(pg_url: str, redis_url: str) -> AsyncIterator[Cluster]:
    ws_port, http_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NANOMSG_")},
        "NANOMSG_JWT_SECRET": SECRET,
        "NANOMSG_DATABASE_URL": pg_url,
        "NANOMSG_REDIS_URL": redis_url,
        "NANOMSG_REDIS_PREFIX": "w" + uuid.uuid4().hex[:10],
        "NANOMSG_PORT": str(ws_port),
        "NANOMSG_HTTP_PORT": str(http_port),
        "NANOMSG_PING_INTERVAL": "0",
        "NANOMSG_WORKERS": "2",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanomsg", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    c = Cluster(proc, ws_port, http_port)
    pump = asyncio.get_running_loop().create_task(_pump_stderr(c))
    try:
        for _ in range(2):
            await asyncio.wait_for(c.listening.get(), 30)
        yield c
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        pump.cancel()


def user(make_token: TokenFactory) -> User:
    u, e = str(uuid.uuid4()), str(uuid.uuid4())
    return User(u, e, 100, make_token(user=u, entity=e, level=100))


async def join(c: Cluster, who: User, room: int) -> tuple[Client, str]:
    """Connect (the kernel picks the worker), log in, select; returns the serving node."""
    ws = await connect(f"ws://127.0.0.1:{c.ws_port}/chat")
    node = ws.response.headers["X-Nanomsg-Node"]
    client = Client(ws)
    await client.recv()
    assert (await client.ask({"type": "token", "content": who.token}))["data"] == "READY"
    assert (await client.ask({"type": "select_room", "room_id": room}))["data"] == "CONNECTED"
    return client, node


async def create_room(c: Cluster, owner: User) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{c.http_port}/rooms",
            json={"name": "w", "level_admin": 100},
            headers={"Authorization": f"Bearer {owner.token}"},
        ) as resp,
    ):
        assert resp.status == 200
        room_id: int = orjson.loads(await resp.read())["content"]["room"]["id"]
        return room_id


async def test_clients_spread_over_workers_share_rooms(
    cluster: Cluster, make_token: TokenFactory
) -> None:
    owner = user(make_token)
    room = await create_room(cluster, owner)
    joined = [await join(cluster, owner, room) for _ in range(16)]
    nodes = {node for _, node in joined}
    assert len(nodes) == 2, f"all clients landed on one worker: {nodes}"
    await asyncio.sleep(0.3)  # both workers' Redis subscriptions are in place
    clients = [c for c, _ in joined]
    for i, c in enumerate(clients[:4]):
        await c.send({"type": "message", "content": f"hello {i}"})
    for c in clients:
        seqs = [(await c.recv(timeout=10))["data"]["seq"] for _ in range(4)]
        assert seqs == [1, 2, 3, 4]
    for c in clients:
        await c.close()


async def test_supervisor_restarts_a_killed_worker_and_others_keep_serving(
    cluster: Cluster, make_token: TokenFactory
) -> None:
    owner = user(make_token)
    room = await create_room(cluster, owner)
    joined = [await join(cluster, owner, room) for _ in range(12)]
    victim_node = joined[0][1]
    victim_pid = int(victim_node.split("-", 1)[0])
    os.kill(victim_pid, signal.SIGKILL)
    # The supervisor starts a replacement, which logs its own listening line.
    await asyncio.wait_for(cluster.listening.get(), 30)
    survivors = [c for c, node in joined if node != victim_node]
    assert survivors, "no client on the surviving worker"
    echo = await survivors[0].ask({"type": "message", "content": "still here"})
    assert echo["data"]["content"] == "still here"
    # New connections are served by both workers again, the new one included.
    fresh_nodes = {(await join(cluster, owner, room))[1] for _ in range(16)}
    assert victim_node not in fresh_nodes and len(fresh_nodes) == 2
    assert cluster.proc.returncode is None
