"""Publishing over HTTP with real processes and real faults: a message posted on node A reaches
a WebSocket client of node B live (PostgreSQL + Redis), and a PostgreSQL outage is a 503 that
stores and delivers nothing, after which posting works again without a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TokenFactory
from tests.integration.processes import (
    Nodes,
    PrivatePostgres,
    connect_and_join,
    create_room,
    grant,
    http,
    make_user,
    nodes,  # noqa: F401  (fixture)
    once_served,
    private_pg,  # noqa: F401  (fixture)
    private_pg_url,  # noqa: F401  (fixture)
    server_on,
)

pytestmark = pytest.mark.asyncio


async def test_a_message_posted_on_node_a_reaches_a_websocket_client_of_node_b_live(
    nodes: Nodes,  # noqa: F811
    pg_url: str,
    redis_url: str,
) -> None:
    a, b = await nodes.start(2, database_url=pg_url, redis_url=redis_url)
    owner, member = make_user(), make_user()
    room = await create_room(a, owner)
    await grant(a, owner, room, member.user, "rw")
    on_b = await connect_and_join(b, member, room)
    try:
        await on_b.send({"type": "message", "content": "from b"})
        assert (await on_b.recv())["data"]["seq"] == 1
        status, data = await http(a, "POST", f"/rooms/{room}/messages", owner, {"content": "x"})
        assert status == 200, data
        frame = await on_b.recv()
        assert frame == {"type": "message", "data": data["content"]}
        assert frame["data"]["seq"] == 2
        # A client_id repeat posted on node B is answered there and delivered nowhere again.
        body = {"content": "once", "client_id": "c1", "system": True}
        first = await http(a, "POST", f"/rooms/{room}/messages", owner, body)
        assert (await on_b.recv())["data"] == first[1]["content"]
        assert first[1]["content"]["system"] is True
        assert await http(b, "POST", f"/rooms/{room}/messages", owner, body) == first
        assert await on_b.silent(0.5)
    finally:
        await on_b.close()


async def test_postgres_down_is_503_then_posting_works_again(
    private_pg: PrivatePostgres,  # noqa: F811
    private_pg_url: str,  # noqa: F811
    make_token: TokenFactory,
    tmp_path: Path,
) -> None:
    async with server_on(private_pg_url, make_token, tmp_path) as server:
        owner = server.user()
        room = await server.create_room(owner)
        watcher = await server.join(owner, room)
        path = f"/rooms/{room}/messages"
        await private_pg.stop("immediate")
        try:
            status, data = await server.call("POST", path, owner, {"content": "lost"})
            assert (status, data["meta"]["reason"]) == (503, "storage unavailable")
        finally:
            await private_pg.start()
        assert await watcher.silent(0.3)
        # Back without a restart: the pool reconnects; the failed post took no seq.
        status, data = await once_served(server, "POST", path, owner, {"content": "kept"})
        assert status == 200, data
        assert data["content"]["seq"] == 1
        assert (await watcher.recv())["data"] == data["content"]
