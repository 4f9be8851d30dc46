"""Scale-out: three real ``nanomsg serve`` processes on one PostgreSQL and one (private) Redis.

Clients on every node, in several rooms, all sending at once: every receiver of a room gets the
room's messages 1..n exactly once, in the same order as every other receiver on any node; and a
permission change made through one node reaches the connections held by the other two.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.conftest import Client, User
from tests.integration.processes import (
    NodeProcess,
    Nodes,
    PrivateRedis,
    Tally,
    assert_exactly_once_in_order,
    connect_and_join,
    create_room,
    grant,
    http,
    make_user,
    nodes,  # noqa: F401  (fixture)
    private_redis,  # noqa: F401  (fixture)
    revoke,
)

pytestmark = pytest.mark.asyncio

ROOMS = 5
SENDERS_PER_ROOM = 6  # two on each node: 30 senders
PER_SENDER = 20
LIVE_DEADLINE = 1.0  # protocol.md section 8: "well under a second"


async def test_three_nodes_give_every_receiver_each_room_exactly_once_in_one_order(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    trio = await nodes.start(3, database_url=pg_url, redis_url=private_redis.url)
    owner = make_user()
    # Rooms created through different nodes; members of the owner's entity get "rw".
    rooms = [
        await create_room(trio[i % 3], owner, name=f"scale-{i}", type="group") for i in range(ROOMS)
    ]
    tally = Tally()
    try:
        # No pause after joining: a message published before a node's subscription to the
        # room is active must still reach it (resync on subscribe, gap fill from storage).
        senders = await asyncio.gather(
            *(
                tally.join(f"s{r}.{k}", trio[k % 3], make_user(owner.entity), room)
                for r, room in enumerate(rooms)
                for k in range(SENDERS_PER_ROOM)
            )
        )
        await asyncio.gather(
            *(
                tally.join(f"r{r}.{node.name}", node, make_user(owner.entity), room)
                for r, room in enumerate(rooms)
                for node in trio
            )
        )
        await asyncio.gather(*(tally.burst(s, PER_SENDER) for s in senders))
        await tally.wait_caught_up(pg_url, timeout=10.0)

        summary = await assert_exactly_once_in_order(tally, pg_url)
        per_room = SENDERS_PER_ROOM * PER_SENDER
        assert summary.acked == ROOMS * per_room
        assert summary.stored == dict.fromkeys(rooms, per_room)
        for room in rooms:
            peers = [p for p in tally.peers if p.room == room]
            assert len(peers) == SENDERS_PER_ROOM + 3
            streams = [[(d.seq, d.id, d.client_id) for d in p.deliveries] for p in peers]
            assert [seq for seq, _, _ in streams[0]] == list(range(1, per_room + 1))
            for peer, stream in zip(peers, streams, strict=True):
                assert stream == streams[0], f"{peer.name} on {peer.node.name} differs"
            # Each room's one order interleaves what senders on all three nodes stored.
            assert {p.node.name for p in peers if p.sends} == {"A", "B", "C"}
        assert all(p.open for p in tally.peers)
    finally:
        await tally.close()


async def _revoked_within(clients: dict[str, Client], room: int, began: float) -> dict[str, float]:
    """Per node, the seconds from ``began`` until its connection got NOTAUTHORIZED(room)."""
    expected = {"type": "status", "data": "NOTAUTHORIZED", "room_id": room}

    async def one(client: Client) -> float:
        frame = await client.recv(timeout=LIVE_DEADLINE + 1.0)
        assert frame == expected
        return time.monotonic() - began

    names = list(clients)
    took = await asyncio.gather(*(one(clients[n]) for n in names))
    return dict(zip(names, took, strict=True))


async def _join_everywhere(trio: list[NodeProcess], who: User, room: int) -> dict[str, Client]:
    return {n.name: await connect_and_join(n, who, room) for n in trio}


async def test_permission_change_through_one_node_reaches_the_other_two_within_a_second(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    trio = await nodes.start(3, database_url=pg_url, redis_url=private_redis.url)
    a, b, c = trio
    owner, member = make_user(), make_user()  # the member is of another entity
    room = await create_room(a, owner, name="perm")
    assert await grant(a, owner, room, member.user, "rw") == 201
    clients = await _join_everywhere(trio, member, room)
    try:
        await asyncio.sleep(0.3)  # every node subscribed to the room and the control channel
        # Revoked through B: A and C hold connections of the member too.
        began = time.monotonic()
        await revoke(b, owner, room, member.user)
        took = await _revoked_within(clients, room, began)
        assert max(took.values()) < LIVE_DEADLINE, took
        for name in ("A", "C"):
            answer = await clients[name].ask({"type": "message", "content": "still here?"})
            assert answer == {"type": "query", "data": "SELECTROOM?"}, (name, answer)
            reselect = await clients[name].ask({"type": "select_room", "room_id": room})
            assert reselect == {"type": "status", "data": "NOTAUTHORIZED"}, (name, reselect)

        # Granted again through C, then the room deleted through C: A and B hear of it.
        assert await grant(c, owner, room, member.user, "rw") == 201
        for client in clients.values():
            await client.close()
        clients = await _join_everywhere(trio, member, room)
        await asyncio.sleep(0.3)
        began = time.monotonic()
        status, body = await http(c, "DELETE", f"/rooms/{room}", owner)
        assert status == 200, body
        took = await _revoked_within(clients, room, began)
        assert max(took.values()) < LIVE_DEADLINE, took
    finally:
        for client in clients.values():
            await client.close()
