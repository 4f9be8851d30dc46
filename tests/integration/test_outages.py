"""Broker and storage outages under continuous traffic, with real processes.

Every fault is real: a private ``redis-server`` or a private PostgreSQL cluster is stopped and
started again on the same port while ``nanomsg serve`` subprocesses carry traffic. The shared
PostgreSQL and Redis of the machine are never touched. Senders send lock-step, one message every
~10 ms after the previous answer, so every answer (echo or status word) is attributed to its
send; the ``Tally`` then checks the delivery guarantees against what PostgreSQL holds.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from tests.integration.conftest import User
from tests.integration.processes import (
    ACKED,
    NodeProcess,
    Nodes,
    Peer,
    PrivatePostgres,
    PrivateRedis,
    Tally,
    assert_exactly_once_in_order,
    connect_and_join,
    create_room,
    eventually,
    grant,
    make_user,
    nodes,  # noqa: F401  (fixture)
    private_pg,  # noqa: F401  (fixture)
    private_pg_url,  # noqa: F401  (fixture)
    private_redis,  # noqa: F401  (fixture)
    readyz,
    revoke,
    stored_messages,
)

pytestmark = pytest.mark.asyncio

OUTAGE = 3.0
INTERVAL = 0.01
UNAVAILABLE = "UNAVAILABLE"


async def wait_ready(
    node: NodeProcess, expected: tuple[int, dict[str, bool]], timeout: float
) -> float:
    """Poll /readyz until it answers ``expected`` (status, content); the seconds it took."""
    seen: list[tuple[int, dict[str, bool]]] = []

    async def check() -> bool:
        seen.append(await readyz(node))
        return seen[-1] == expected

    try:
        return await eventually(check, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(
            f"/readyz on {node.name}: wanted {expected}, last {seen[-3:]}"
        ) from None


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def has_seq(peer: Peer, seq: int) -> bool:
    return peer.last_seq() >= seq


def acked_between(peer: Peer, start: float, end: float) -> list[int]:
    """Seqs of the peer's acked sends that went out within [start, end]."""
    return [
        r.delivery.seq
        for r in peer.sends
        if r.outcome == ACKED and r.delivery is not None and start <= r.sent_at <= end
    ]


async def test_redis_outage_keeps_connections_and_local_delivery_then_every_node_catches_up(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """Redis stops for 3 s and starts again on the same port, under traffic on three nodes.

    Room L has its only sender on C; room M has senders on A and B; every room has a receiver
    on every node. During the outage connections stay open, messages are stored, echoed and
    delivered on the sender's node, and /readyz says broker false on every node. After Redis
    returns /readyz says 200 and every receiver on every node ends with every acked message,
    exactly once, in order.
    """
    trio = await nodes.start(3, database_url=pg_url, redis_url=private_redis.url)
    a, b, c = trio
    owner = make_user()
    room_l = await create_room(c, owner, name="local")
    room_m = await create_room(a, owner, name="mixed")
    tally = Tally()
    try:

        def member() -> User:  # group rooms give the owner's entity "rw"
            return make_user(owner.entity)

        sender_l = await tally.join("sL.C", c, member(), room_l)
        senders_m = [await tally.join(f"sM.{n.name}", n, member(), room_m) for n in (a, b)]
        for node in trio:
            await tally.join(f"rL.{node.name}", node, member(), room_l)
            await tally.join(f"rM.{node.name}", node, member(), room_m)
        local_l = next(p for p in tally.peers if p.name == "rL.C")
        for sender in (sender_l, *senders_m):
            tally.pace(sender, INTERVAL, max_messages=2000, max_seconds=25.0)
        await asyncio.sleep(1.0)
        assert all(p.deliveries for p in tally.peers), "traffic flows before the outage"

        await private_redis.stop()
        stopped = time.monotonic()
        for node in trio:
            await wait_ready(node, (503, {"storage": True, "broker": False}), timeout=3.0)
        await sleep_until(stopped + OUTAGE)
        outage_end = time.monotonic()

        # Stored and echoed during the outage, and delivered on the sender's own node.
        during_l = acked_between(sender_l, stopped, outage_end)
        assert len(during_l) >= 50, f"only {len(during_l)} acked by sL.C during the outage"
        for sender in senders_m:  # their echoes wait for the other node's seqs: gap fill
            assert acked_between(sender, stopped, outage_end), f"{sender.name} stalled"
        await eventually(lambda: has_seq(local_l, during_l[-1]), timeout=1.0)
        assert {d.seq for d in local_l.deliveries} >= set(during_l)

        await private_redis.start()
        restarted = time.monotonic()
        healed = [
            await wait_ready(node, (200, {"storage": True, "broker": True}), timeout=10.0)
            for node in trio
        ]
        await asyncio.sleep(1.0)  # traffic goes on through the healed relay
        await tally.stop_pacing()
        await tally.wait_caught_up(pg_url, timeout=10.0)

        summary = await assert_exactly_once_in_order(tally, pg_url)
        assert summary.refused == 0  # storage was up all along: every send is acked
        assert all(p.open for p in tally.peers), [p.name for p in tally.peers if not p.open]
        for sender in (sender_l, *senders_m):
            assert acked_between(sender, restarted, time.monotonic()), sender.name
        print(f"redis outage: {len(during_l)} sent on C meanwhile; ready {healed}s; {summary}")
    finally:
        await tally.close()


async def test_messages_stored_during_redis_outage_reach_other_nodes_from_storage_after_it(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """The room's only sender is on A; B and C have receivers. Redis is stopped, A stores and
    echoes messages, then A is SIGKILLed before Redis returns, so the relay publishes it queued
    are gone. B and C have no local sender in the room either: once Redis is back they can
    only get those messages from storage (resync of re-subscribed rooms, or the hub's periodic
    head check), and they must, exactly once and in order."""
    a, b, c = await nodes.start(3, database_url=pg_url, redis_url=private_redis.url)
    owner = make_user()
    room = await create_room(a, owner, name="orphaned")
    tally = Tally()
    try:
        sender = await tally.join("s.A", a, make_user(owner.entity), room)
        for node in (a, b, c):
            await tally.join(f"r.{node.name}", node, make_user(owner.entity), room)
        tally.pace(sender, INTERVAL, max_messages=2000, max_seconds=20.0)
        await asyncio.sleep(0.5)
        await private_redis.stop()
        stopped = time.monotonic()
        await asyncio.sleep(1.5)
        await tally.stop_pacing()
        during = acked_between(sender, stopped, time.monotonic())
        assert len(during) >= 20, f"only {len(during)} acked during the outage"
        await a.kill()
        await private_redis.start()
        await tally.wait_caught_up(pg_url, timeout=10.0)

        await assert_exactly_once_in_order(tally, pg_url)
        for peer in tally.peers:
            if peer.node is not a:
                assert peer.open and {d.seq for d in peer.deliveries} >= set(during), peer.name
    finally:
        await tally.close()


async def test_postgres_outage_answers_unavailable_stores_nothing_and_recovers_without_restart(
    private_pg: PrivatePostgres,  # noqa: F811
    private_pg_url: str,  # noqa: F811
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """PostgreSQL is killed (``immediate``) for 3 s under traffic on two nodes.

    Sends during the outage are answered UNAVAILABLE and nothing unstored reaches anyone;
    connections stay open; /readyz says storage false. Once PostgreSQL is back the same
    connections send again within 10 s, no node restarted, and the tally holds: exactly the
    acked messages are stored, once each, and every receiver has them in order.

    A send in flight at the instant of the crash may be stored although it was answered
    UNAVAILABLE (then it is checked like any other stored message, and never duplicated). Some
    of that is unavoidable (a commit whose reply is lost), but today it happens in about half
    of the runs because of the bug pinned down by
    ``test_connection_lost_after_commit_does_not_turn_a_stored_message_into_unavailable``.
    """
    a, b = await nodes.start(2, database_url=private_pg_url, redis_url=private_redis.url)
    owner = make_user()
    rooms = [await create_room(a, owner, name="r1"), await create_room(b, owner, name="r2")]
    tally = Tally()
    try:
        senders = []
        for i, room in enumerate(rooms):
            for node in (a, b):
                senders.append(
                    await tally.join(f"s{i}.{node.name}", node, make_user(owner.entity), room)
                )
                await tally.join(f"r{i}.{node.name}", node, make_user(owner.entity), room)
        for sender in senders:
            tally.pace(sender, INTERVAL, max_messages=2000, max_seconds=25.0)
        await asyncio.sleep(1.0)
        assert all(acked_between(s, 0.0, time.monotonic()) for s in senders)

        crash_began = time.monotonic()
        await private_pg.stop("immediate")
        crashed = time.monotonic()
        await wait_ready(a, (503, {"storage": False, "broker": True}), timeout=3.0)
        await sleep_until(crashed + OUTAGE)
        restart_began = time.monotonic()
        await private_pg.start()
        restarted = time.monotonic()

        # Every send made while PostgreSQL was down was refused (the margin keeps out sends
        # that reach a node once the restart is under way). A given sender may have sent
        # nothing then: an echo stored just before the crash can wait behind a seq that only
        # storage can fill.
        during = [r for r in tally.records() if crashed <= r.sent_at <= restart_began - 0.05]
        assert len(during) >= 100, f"only {len(during)} sends during the outage"
        assert {r.outcome for r in during} == {UNAVAILABLE}, [
            r for r in during if r.outcome != UNAVAILABLE
        ][:3]

        async def all_recovered() -> bool:
            return all(acked_between(s, restarted, time.monotonic()) for s in senders)

        recovery = await eventually(all_recovered, timeout=10.0)
        await wait_ready(a, (200, {"storage": True, "broker": True}), timeout=5.0)
        await asyncio.sleep(1.0)
        await tally.stop_pacing()
        await tally.wait_caught_up(private_pg_url, timeout=10.0)

        summary = await assert_exactly_once_in_order(
            tally, private_pg_url, in_doubt=lambda r: r.in_flight(crash_began, crashed)
        )
        assert summary.refused >= len(senders)
        assert summary.in_doubt_stored <= len(senders)  # at most one command each in flight
        assert all(p.open for p in tally.peers), [p.name for p in tally.peers if not p.open]
        assert all(n.running and n.starts == 1 for n in (a, b))
        print(f"postgres outage: sends work again {recovery:.2f}s after restart; {summary}")
    finally:
        await tally.close()


async def test_revocation_during_redis_outage_reaches_other_nodes_once_redis_returns(
    pg_url: str,
    private_redis: PrivateRedis,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """A rule deleted through A while Redis is down: A's connection loses the room at once.
    A is then SIGKILLed, so the notice its relay queued is lost; B must re-check the rooms it
    watches when its subscriber reconnects, and its connection loses the room within a second
    of B's /readyz saying the broker is back."""
    a, b = await nodes.start(2, database_url=pg_url, redis_url=private_redis.url)
    owner, member = make_user(), make_user()
    room = await create_room(a, owner, name="revoke-offline")
    assert await grant(a, owner, room, member.user, "rw") == 201
    on_a = await connect_and_join(a, member, room)
    on_b = await connect_and_join(b, member, room)
    lost = {"type": "status", "data": "NOTAUTHORIZED", "room_id": room}
    try:
        await private_redis.stop()
        await wait_ready(b, (503, {"storage": True, "broker": False}), timeout=3.0)
        await revoke(a, owner, room, member.user)
        assert await on_a.recv(timeout=1.0) == lost
        await a.kill()
        await private_redis.start()
        await wait_ready(b, (200, {"storage": True, "broker": True}), timeout=10.0)
        assert await on_b.recv(timeout=1.0) == lost
        answer = await on_b.ask({"type": "message", "content": "after revocation"})
        assert answer == {"type": "query", "data": "SELECTROOM?"}
    finally:
        await on_a.close()
        await on_b.close()


async def node_backends(url: str) -> set[int]:
    """The pids of the database's client backends other than this query's own."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {int(row[0]) for row in rows}


async def test_connection_lost_after_commit_does_not_turn_a_stored_message_into_unavailable(
    private_pg: PrivatePostgres,  # noqa: F811
    private_pg_url: str,  # noqa: F811
    nodes: Nodes,  # noqa: F811  (last: its nodes stop before the services they use)
) -> None:
    """protocol.md 4.4/6: UNAVAILABLE means nothing was stored.

    A connection lost between a statement's commit and the store's next step would turn a
    stored message into a refusal. asyncpg's pool used to send a reset query (``SELECT
    pg_advisory_unlock_all(); CLOSE ALL; ...``) on every hand-back, after the commit: a trap
    function of that name, first on the database's search_path, terminating its own backend,
    pinned a real connection loss to that instant (the one the outage test above hits by
    chance when PostgreSQL is killed mid-traffic). The store now sends nothing on a hand-back
    (``postgres._keep_session``), so with the trap set every send is acknowledged and stored,
    and no backend dies; the store's handling of a loss on release stays for a rollback.
    """
    (node,) = await nodes.start(1, database_url=private_pg_url)
    owner = make_user()
    room = await create_room(node, owner, name="lost-after-commit")
    tally = Tally()
    try:
        sender = await tally.join("s", node, owner, room)
        assert (await tally.send(sender)).outcome == ACKED
        admin = await asyncpg.connect(private_pg_url)
        try:
            await admin.execute(
                "CREATE SCHEMA trap;"
                " CREATE FUNCTION trap.pg_advisory_unlock_all() RETURNS void LANGUAGE plpgsql"
                " AS $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); END $$;"
                " DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path ="
                " trap, pg_catalog, public', current_database()); END $$;"
            )
            # The node's pooled sessions still have the old search_path: end them.
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        # The node's first sends may meet the connections ended above; once one is acked,
        # the pool's connections are fresh ones, with the trap on their search_path.
        records = [await tally.send(sender)]
        while records[-1].outcome != ACKED and len(records) < 5:
            records.append(await tally.send(sender))
        warmup = len(records)
        backends = await node_backends(private_pg_url)
        records += [await tally.send(sender) for _ in range(5)]
        # No backend of the node died handing its connection back (the trap would end each).
        assert backends <= await node_backends(private_pg_url)
        stored = await stored_messages(private_pg_url, [room])
        stored_ids = {row.client_id for row in stored[room]}
        denied_but_stored = [
            r.client_id for r in records if r.outcome == UNAVAILABLE and r.client_id in stored_ids
        ]
        assert denied_but_stored == []
        # Nothing sent on a hand-back: the trap never fires, every send is acked and stored.
        assert all(r.outcome == ACKED for r in records[warmup - 1 :]), records
        assert {r.client_id for r in records[warmup - 1 :]} <= stored_ids
    finally:
        await tally.close()
