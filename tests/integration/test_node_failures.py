"""A node killed (SIGKILL) or stopped (SIGTERM) under load, with real processes: the others
keep serving, nothing acknowledged is lost, and clients resume without gap or duplicate."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect

from tests.integration.conftest import Client
from tests.integration.processes import (
    ACKED,
    Nodes,
    PrivateRedis,
    Tally,
    assert_exactly_once_in_order,
    create_room,
    make_user,
    nodes,  # noqa: F401  (fixture)
    private_redis,  # noqa: F401  (fixture)
    stored_last_seqs,
    stored_messages,
)

pytestmark = pytest.mark.asyncio
INTERVAL = 0.01


async def read_seqs_until(client: Client, last: int) -> tuple[list[int], dict[str, object]]:
    """After a resume: replayed seqs, the RESUMED frame, then live seqs up to ``last``."""
    seqs: list[int] = []
    resumed: dict[str, object] = {}
    while not seqs or seqs[-1] < last or not resumed:
        frame = await client.recv(timeout=10)
        if frame["type"] == "status":
            assert frame["data"] == "RESUMED", frame
            resumed = frame
        else:
            seqs.append(frame["data"]["seq"])
    return seqs, resumed


async def test_sigkilled_node_others_keep_serving_and_its_clients_resume_exactly(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    a, b, c = await nodes.start(3, database_url=pg_url, redis_url=private_redis.url)
    owner = make_user()
    room = await create_room(b, owner, name="kill")
    tally = Tally()
    try:
        senders = [
            await tally.join(f"s.{n.name}", n, make_user(owner.entity), room) for n in (b, c)
        ]
        victim = await tally.join("r.A", a, make_user(owner.entity), room)
        await tally.join("r.B", b, make_user(owner.entity), room)
        for s in senders:
            tally.pace(s, INTERVAL, max_messages=2000, max_seconds=20.0)
        await asyncio.sleep(0.7)
        await a.kill()
        had = victim.last_seq()
        assert had > 0
        # The phone notices and reconnects to another node, resuming from what it had.
        back = Client(await connect(b.ws_url))
        await back.recv()
        assert (await back.ask({"type": "token", "content": victim.user.token}))["data"] == "READY"
        await back.send({"type": "select_room", "room_id": room, "since": had})
        assert await back.recv() == {"type": "status", "data": "CONNECTED"}
        await asyncio.sleep(0.7)  # traffic keeps flowing while it resumes
        await tally.stop_pacing()
        last = (await stored_last_seqs(pg_url, [room]))[room]
        seqs, end = await read_seqs_until(back, last)
        assert end["complete"] is True
        assert [d.seq for d in victim.deliveries] + seqs == list(range(1, last + 1))
        assert await back.silent(0.3)
        await back.close()
        assert all(s.open for s in senders)
        assert len(tally.acked(room)) > 0
        await tally.wait_caught_up(pg_url, timeout=10.0)
        await assert_exactly_once_in_order(tally, pg_url)
    finally:
        await tally.close()


async def test_sigterm_under_load_finishes_sends_then_closes_1001(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    a, b = await nodes.start(2, database_url=pg_url, redis_url=private_redis.url)
    owner = make_user()
    room = await create_room(b, owner, name="term")
    tally = Tally()
    try:
        on_a = [await tally.join(f"s.A{i}", a, make_user(owner.entity), room) for i in range(3)]
        watcher = await tally.join("r.B", b, make_user(owner.entity), room)
        for s in on_a:
            tally.pace(s, INTERVAL, max_messages=3000, max_seconds=20.0)
        await asyncio.sleep(1.0)
        assert await a.terminate(timeout=15.0) == 0
        await tally.stop_pacing()
        for s in on_a:
            assert s.close_code == 1001, (s.name, s.close_code)
        stored = {r.client_id: r for r in (await stored_messages(pg_url, [room]))[room]}
        records = tally.records(room)
        acked = [r for r in records if r.outcome == ACKED]
        assert len(acked) >= 30
        for record in records:
            if record.outcome == ACKED:
                assert record.delivery is not None
                assert stored[record.client_id].seq == record.delivery.seq
            else:  # cut off by the shutdown before it was started: never stored
                assert record.client_id not in stored, record
        assert len(stored) == len(acked)  # nothing stored that its sender was not told
        last = max(r.seq for r in stored.values())
        await asyncio.sleep(0.5)
        assert [d.seq for d in watcher.deliveries] == list(range(1, last + 1))
        assert watcher.open
    finally:
        await tally.close()
