"""nanomsg over a real 3-master Redis Cluster with sharded pub/sub (``--redis-cluster``).

Every test runs real ``App`` instances (WebSocket + HTTP side-port, PostgreSQL storage) whose
Redis URL names the second node of a local cluster started from ``redis-server``; each test
uses its own channel prefix, so tests sharing the module's cluster never hear each other.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
import pytest_asyncio
import redis
from redis.crc import key_slot

from nanomsg.app import App
from nanomsg.config import Config
from nanomsg.relay.redis_cluster import RedisClusterRelay
from tests.conftest import SECRET, TokenFactory
from tests.integration.conftest import Client, Server, User
from tests.integration.redis_cluster_fixture import LocalCluster, local_cluster, need_redis_server

pytestmark = [pytest.mark.asyncio, pytest.mark.services]

URL_NODE = 1  # the App is pointed at the second node, not the first one redis-cli was given


class Servers:
    """Starts Apps against the cluster; stops whatever is still running at the end."""

    def __init__(
        self,
        cluster: LocalCluster,
        pg_url: str,
        make_token: TokenFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        self.cluster = cluster
        self.pg_url = pg_url
        self.make_token = make_token
        self.http = http
        self.running: list[Server] = []

    async def start(self, prefix: str, *, head_check: bool = True) -> Server:
        """An App on the cluster. ``head_check=False`` turns off the hub's periodic storage
        check, so a test sees what the relay alone recovers."""
        config = Config(
            host="127.0.0.1",
            port=0,
            http_port=0,
            jwt_secret=SECRET,
            database_url=self.pg_url,
            redis_url=self.cluster.url(URL_NODE),
            redis_cluster=True,
            redis_prefix=prefix,
            ping_interval=0,
        ).validate()
        app = App(config)
        if not head_check:
            app.hub.head_check = 0
        await app.start()
        assert isinstance(app.relay, RedisClusterRelay)
        server = Server(app=app, make_token=self.make_token, http=self.http, clients=[])
        self.running.append(server)
        return server

    async def stop(self, server: Server) -> None:
        self.running.remove(server)
        for client in server.clients:
            await client.close()
        await server.app.stop()

    async def stop_all(self) -> None:
        for server in list(self.running):
            await self.stop(server)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for the module's tests; its processes are killed at teardown."""
    need_redis_server()
    with local_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest_asyncio.fixture
async def servers(
    redis_cluster: LocalCluster, pg_url: str, make_token: TokenFactory
) -> AsyncIterator[Servers]:
    async with aiohttp.ClientSession() as http:
        started = Servers(redis_cluster, pg_url, make_token, http)
        try:
            yield started
        finally:
            await started.stop_all()


def new_prefix() -> str:
    return "c" + uuid.uuid4().hex[:12]


def owner_port(owners: dict[int, int], channel: str) -> int:
    return owners[key_slot(channel.encode())]


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def rooms_on_shards(
    server: Server, owner: User, prefix: str, owners: dict[int, int], ports: list[int]
) -> dict[int, int]:
    """Create rooms until there is one whose channel lives on each port; port -> room id."""
    found: dict[int, int] = {}
    for _ in range(100):
        room = await server.create_room(owner)
        port = owner_port(owners, f"{prefix}:room:{room}")
        if port in ports and port not in found:
            found[port] = room
        if len(found) == len(ports):
            return found
    raise AssertionError(f"no rooms hashing to every one of {ports}")


def spublish_calls(port: int) -> int:
    client = redis.Redis(port=port, socket_timeout=2.0)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_spublish", {}).get("calls", 0))


async def receive_messages(client: Client, count: int) -> list[tuple[int, str]]:
    got = []
    for _ in range(count):
        frame = await client.recv(timeout=10)
        assert frame["type"] == "message", frame
        got.append((frame["data"]["seq"], frame["data"]["content"]))
    return got


async def test_rooms_on_different_shards_deliver_every_message_once_in_order_via_spublish(
    servers: Servers, redis_cluster: LocalCluster
) -> None:
    prefix = new_prefix()
    a, b = await servers.start(prefix), await servers.start(prefix)
    owner = a.user()
    owners = redis_cluster.slot_owners()
    rooms = await rooms_on_shards(a, owner, prefix, owners, redis_cluster.ports)
    channels = {port: f"{prefix}:room:{room}" for port, room in rooms.items()}
    clients = {
        room: [await srv.join(owner, room) for srv in (a, b, a, b)] for room in rooms.values()
    }

    # Each App holds one sharded subscription per room channel, on the channel's own master.
    def subscribed_everywhere() -> bool:
        return all(
            redis_cluster.shard_numsub(port, channel)[channel] == 2
            for port, channel in channels.items()
        )

    await eventually(subscribed_everywhere, 5.0, "both Apps SSUBSCRIBEd to every room channel")
    await eventually(lambda: a.app.relay.healthy() and b.app.relay.healthy(), 5.0, "healthy")
    for port in redis_cluster.ports:
        mine = redis_cluster.shard_channels(port, f"{prefix}:room:*")
        assert mine == {channels[port]}, (port, mine)  # nothing on a master that does not own it
        foreign = [c for p, c in channels.items() if p != port]
        assert set(redis_cluster.shard_numsub(port, *foreign).values()) == {0}
    control = f"{prefix}:control"
    assert redis_cluster.shard_numsub(owner_port(owners, control), control)[control] == 2

    calls_before = {port: spublish_calls(port) for port in redis_cluster.ports}
    per_sender = 10
    await asyncio.gather(
        *(
            client.send({"type": "message", "content": f"{room}-{i}-{n}"})
            for room, room_clients in clients.items()
            for i, client in enumerate(room_clients)
            for n in range(per_sender)
        )
    )
    total = per_sender * 4
    for room, room_clients in clients.items():
        streams = [await receive_messages(client, total) for client in room_clients]
        assert [seq for seq, _ in streams[0]] == list(range(1, total + 1))
        assert all(stream == streams[0] for stream in streams)
        assert all(content.startswith(f"{room}-") for _, content in streams[0])
        for client in room_clients:
            assert await client.silent(0.3)
    # Each master took the SPUBLISHes of its own room: one per room and publishing pass of
    # each sender's App (both Apps sent), each carrying all of that pass's messages.
    for port in redis_cluster.ports:
        assert 2 <= spublish_calls(port) - calls_before[port] <= total, port


async def test_member_removed_through_one_app_is_told_on_the_other_within_a_second(
    servers: Servers, redis_cluster: LocalCluster
) -> None:
    prefix = new_prefix()
    a, b = await servers.start(prefix), await servers.start(prefix)
    owner, member = a.user(), a.user()
    room = await a.create_room(owner)
    assert await a.grant(owner, room, member.user, "rw") == 201
    on_b = await b.join(member, room)
    control = f"{prefix}:control"
    control_port = owner_port(redis_cluster.slot_owners(), control)
    await eventually(
        lambda: redis_cluster.shard_numsub(control_port, control)[control] == 2,
        5.0,
        "both Apps SSUBSCRIBEd to the control channel",
    )
    await eventually(lambda: b.app.relay.healthy(), 5.0, "b healthy")
    status, _ = await a.call("DELETE", f"/rooms/{room}/members/{member.user}", owner)
    assert status == 200
    assert await on_b.recv(timeout=1.0) == {
        "type": "status",
        "data": "NOTAUTHORIZED",
        "room_id": room,
    }


async def test_shard_restart_recovers_and_refills_missed_messages_and_notices(
    servers: Servers, redis_cluster: LocalCluster
) -> None:
    """The master that owns both the control channel and the room's channel (and is the
    node the Apps were configured with) is SIGKILLed and restarted. Meanwhile a third App
    stores messages and removes a member, then stops: what it published is lost with it,
    and the hubs' periodic storage check is off, so the surviving Apps can only learn of it
    through the resync and the room re-check that follow their resubscription."""
    down = redis_cluster.ports[URL_NODE]
    owners = redis_cluster.slot_owners()
    prefix = new_prefix()
    while owner_port(owners, f"{prefix}:control") != down:
        prefix = new_prefix()
    a, b, c = [await servers.start(prefix, head_check=False) for _ in range(3)]
    owner, member = a.user(), a.user()
    room = (await rooms_on_shards(a, owner, prefix, owners, [down]))[down]
    other_room = await a.create_room(owner)
    assert await a.grant(owner, other_room, member.user, "rw") == 201
    on_a, on_b, on_c = (
        await a.join(owner, room),
        await b.join(owner, room),
        await c.join(owner, room),
    )
    member_on_b = await b.join(member, other_room)
    apps = (a.app, b.app, c.app)
    await eventually(lambda: all(app.relay.healthy() for app in apps), 5.0, "all healthy")
    channel = f"{prefix}:room:{room}"
    await eventually(
        lambda: redis_cluster.shard_numsub(down, channel)[channel] == 3, 5.0, "subscribed"
    )

    for n in range(3):
        await on_a.send({"type": "message", "content": f"before-{n}"})
    before = [(seq, f"before-{seq - 1}") for seq in range(1, 4)]
    for client in (on_a, on_b, on_c):
        assert await receive_messages(client, 3) == before

    redis_cluster.kill(down)
    await eventually(
        lambda: not any(app.relay.healthy() for app in apps), 5.0, "every App sees the shard down"
    )
    assert (await b.app.readiness())["broker"] is False
    for n in range(5):
        await on_c.send({"type": "message", "content": f"during-{n}"})
    during = [(seq, f"during-{seq - 4}") for seq in range(4, 9)]
    assert await receive_messages(on_c, 5) == during  # stored and echoed on c
    status, _ = await c.call("DELETE", f"/rooms/{other_room}/members/{member.user}", owner)
    assert status == 200
    stopping = time.monotonic()
    await servers.stop(c)  # its queued publishes and notice die with it
    assert time.monotonic() - stopping < 5.0, "closing with a shard down must not hang"

    await redis_cluster.revive(down)
    await eventually(lambda: a.app.relay.healthy() and b.app.relay.healthy(), 20.0, "recovered")
    for client in (on_a, on_b):
        assert await receive_messages(client, 5) == during  # refilled from storage
    assert await member_on_b.recv(timeout=5.0) == {
        "type": "status",
        "data": "NOTAUTHORIZED",
        "room_id": other_room,
    }

    for n in range(2):
        await on_a.send({"type": "message", "content": f"after-{n}"})
    after = [(seq, f"after-{seq - 9}") for seq in range(9, 11)]
    for client in (on_a, on_b):
        assert await receive_messages(client, 2) == after
        assert await client.silent(0.5)  # nothing twice


async def test_room_whose_slot_moves_to_another_master_is_resubscribed_there(
    servers: Servers, redis_cluster: LocalCluster
) -> None:
    prefix = new_prefix()
    a, b = [await servers.start(prefix, head_check=False) for _ in range(2)]
    owner = a.user()
    room = await a.create_room(owner)
    channel = f"{prefix}:room:{room}"
    source = owner_port(redis_cluster.slot_owners(), channel)
    target = next(port for port in redis_cluster.ports if port != source)
    on_a, on_b = await a.join(owner, room), await b.join(owner, room)

    def subscribers(port: int) -> int:
        return redis_cluster.shard_numsub(port, channel)[channel]

    await eventually(lambda: subscribers(source) == 2, 5.0, "subscribed on the first owner")
    slot = key_slot(channel.encode())
    redis_cluster.move_slot(slot, target)
    try:
        await eventually(
            lambda: subscribers(target) == 2 and subscribers(source) == 0,
            5.0,
            "both Apps moved their subscription to the new owner",
        )
        await eventually(lambda: a.app.relay.healthy() and b.app.relay.healthy(), 5.0, "healthy")
        for n in range(3):
            await on_a.send({"type": "message", "content": f"a-{n}"})
            await on_b.send({"type": "message", "content": f"b-{n}"})
        streams = [await receive_messages(client, 6) for client in (on_a, on_b)]
        assert [seq for seq, _ in streams[0]] == list(range(1, 7))
        assert streams[0] == streams[1]
        for client in (on_a, on_b):
            assert await client.silent(0.3)
    finally:
        redis_cluster.move_slot(slot, source)


async def test_one_master_down_does_not_hold_back_rooms_on_the_other_masters(
    servers: Servers, redis_cluster: LocalCluster
) -> None:
    prefix = new_prefix()
    a, b = [await servers.start(prefix, head_check=False) for _ in range(2)]
    owner = a.user()
    down, live = redis_cluster.ports[2], redis_cluster.ports[0]
    rooms = await rooms_on_shards(a, owner, prefix, redis_cluster.slot_owners(), [down, live])
    down_a, down_b = await a.join(owner, rooms[down]), await b.join(owner, rooms[down])
    live_a, live_b = await a.join(owner, rooms[live]), await b.join(owner, rooms[live])
    await eventually(lambda: a.app.relay.healthy() and b.app.relay.healthy(), 5.0, "healthy")

    redis_cluster.kill(down)
    try:
        await eventually(lambda: not b.app.relay.healthy(), 5.0, "b sees the master down")
        await down_a.send({"type": "message", "content": "held"})
        assert (await down_a.recv())["data"]["seq"] == 1  # stored and echoed; relay holds it
        for n in range(3):
            await live_a.send({"type": "message", "content": f"live-{n}"})
        # Relayed at once through the live master, while a's queue still holds "held".
        got = [await live_b.recv(timeout=2.0) for _ in range(3)]
        assert [(m["data"]["seq"], m["data"]["content"]) for m in got] == [
            (1, "live-0"),
            (2, "live-1"),
            (3, "live-2"),
        ]
    finally:
        await redis_cluster.revive(down)
    await eventually(lambda: a.app.relay.healthy() and b.app.relay.healthy(), 20.0, "recovered")
    assert await receive_messages(down_b, 1) == [(1, "held")]
    assert await down_b.silent(0.5)  # once, although both a's retry and the resync carry it
