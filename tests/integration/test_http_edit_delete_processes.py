"""Edit and delete over HTTP with real processes and real faults: an edit and a deletion made
over HTTP on node A reach a WebSocket subscriber of node B live, in the room's seq order
(PostgreSQL + Redis), and a PostgreSQL outage is a 503 that changes and delivers nothing,
after which editing works again without a restart."""

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


async def test_an_http_edit_and_delete_on_node_a_reach_a_websocket_subscriber_of_node_b(
    nodes: Nodes,  # noqa: F811
    pg_url: str,
    redis_url: str,
) -> None:
    a, b = await nodes.start(2, database_url=pg_url, redis_url=redis_url)
    owner, member = make_user(), make_user()
    room = await create_room(a, owner)
    await grant(a, owner, room, member.user, "rw")
    on_b = await connect_and_join(b, owner, room)
    try:
        status, data = await http(a, "POST", f"/rooms/{room}/messages", member, {"content": "v1"})
        assert status == 200, data
        seq = data["content"]["seq"]
        assert (await on_b.recv())["data"]["seq"] == seq
        status, data = await http(
            a, "PATCH", f"/rooms/{room}/messages/{seq}", member, {"content": "v2"}
        )
        assert status == 200, data
        assert await on_b.recv() == {"type": "edited", "data": data["content"]}
        # A send on node B between the two HTTP events keeps its place in the seq stream.
        await on_b.send({"type": "message", "content": "from b"})
        echo = await on_b.recv()
        assert (echo["type"], echo["data"]["seq"]) == ("message", seq + 2)
        status, data = await http(a, "DELETE", f"/rooms/{room}/messages/{seq}", owner)
        assert status == 200, data
        assert data["content"]["seq"] == seq + 3
        assert await on_b.recv() == {"type": "deleted", "data": data["content"]}
        assert await on_b.silent(0.3)
    finally:
        await on_b.close()


async def test_postgres_down_is_503_for_edit_and_delete_then_they_work_again(
    private_pg: PrivatePostgres,  # noqa: F811
    private_pg_url: str,  # noqa: F811
    make_token: TokenFactory,
    tmp_path: Path,
) -> None:
    async with server_on(private_pg_url, make_token, tmp_path) as server:
        owner = server.user()
        room = await server.create_room(owner)
        watcher = await server.join(owner, room)  # the room is live here: rules are kept
        status, data = await server.call("POST", f"/rooms/{room}/messages", owner, {"content": "a"})
        assert status == 200, data
        assert (await watcher.recv())["data"]["seq"] == 1
        path = f"/rooms/{room}/messages/1"
        await private_pg.stop("immediate")
        try:
            status, data = await server.call("PATCH", path, owner, {"content": "lost"})
            assert (status, data["meta"]["reason"]) == (503, "storage unavailable")
            status, data = await server.call("DELETE", path, owner)
            assert (status, data["meta"]["reason"]) == (503, "storage unavailable")
        finally:
            await private_pg.start()
        assert await watcher.silent(0.3)
        # Back without a restart: the pool reconnects; the failed changes took no seq.
        status, data = await once_served(server, "PATCH", path, owner, {"content": "kept"})
        assert status == 200, data
        assert (data["content"]["seq"], data["content"]["seq_edited"]) == (2, 1)
        assert await watcher.recv() == {"type": "edited", "data": data["content"]}
