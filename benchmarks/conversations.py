"""The conversation list's cost on PostgreSQL: ``python -m benchmarks.conversations``.

Seeds a fresh database (dropped afterwards) with one user holding ``--rooms`` rooms of
``--messages`` messages each (from another user, read up to a random point, with an edit and
a deletion in every tenth room), next to ``--noise`` rooms of other users, then (after
VACUUM ANALYZE, unless ``--no-vacuum``) times ``PostgresStore.conversations`` (the one query
behind ``GET /rooms/all``, its rows made records) from this process:
the whole list (``limit`` = every room), the side-port's largest page (500) and its default
page (100), each by id and by activity.
Prints one JSON line per case with p50/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks.stats import percentile
from nanomsg.store.base import NewMessage, NewRoom
from nanomsg.store.postgres import PostgresStore


async def seed(
    store: PostgresStore, user: str, entity: str, rooms: int, messages: int, noise: int
) -> None:
    """The user's rooms (a user rule each, as a DM or an invitation gives) and the others'."""
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    other = str(uuid.uuid4())
    mine: list[int] = []
    for index in range(rooms + noise):
        owner = entity if index < rooms else str(uuid.uuid4())
        creator = user if index < rooms else str(uuid.uuid4())
        room = await store.create_room(
            NewRoom("bench", 100, "user2user", owner, 10, creator, 0, start)
        )
        if index < rooms:
            mine.append(room.id)
    batch: list[NewMessage] = []
    for index, room_id in enumerate(mine):
        for n in range(messages):
            at = start + timedelta(seconds=rng.randrange(10**6) + n)
            batch.append(NewMessage(room_id, other, entity, f"message {n}", None, at))
        if len(batch) >= 5000 or index == len(mine) - 1:
            await store.append_batch(batch)
            batch = []
    now = start + timedelta(days=30)
    for index, room_id in enumerate(mine):
        await store.set_read_mark(room_id, user, rng.randrange(messages + 1), now)
        if index % 10 == 0 and messages >= 2:
            await store.edit_message(room_id, 1, other, "edited", now)
            await store.delete_message(room_id, 2, other, False, now)


async def timed(call: Callable[[], Awaitable[None]], runs: int) -> dict[str, float]:
    """p50, p99 and max of ``runs`` sequential calls, in milliseconds."""
    samples = []
    for _ in range(runs):
        began = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - began)
    samples.sort()
    return {
        "p50_ms": round(percentile(samples, 50) / 1e6, 2),
        "p99_ms": round(percentile(samples, 99) / 1e6, 2),
        "max_ms": round(samples[-1] / 1e6, 2),
    }


async def amain(args: argparse.Namespace) -> None:
    name = f"nanomsg_conversations_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(args.pg_url)._replace(path="/" + name))
        store = PostgresStore(url, pool_size=2)
        await store.open()
        try:
            user, entity = str(uuid.uuid4()), str(uuid.uuid4())
            await seed(store, user, entity, args.rooms, args.messages, args.noise)
            conn = await asyncpg.connect(url)
            try:
                # A settled database, as autovacuum leaves it (PostgreSQL 13+ also vacuums
                # insert-only tables): the visibility map marks the pages all-visible, so the
                # unread count is an index-only scan. --no-vacuum measures right after bulk
                # inserts, each counted message then visits its heap page.
                await conn.execute("ANALYZE" if args.no_vacuum else "VACUUM ANALYZE")
            finally:
                await conn.close()
            for order in ("id", "activity"):
                for limit in (args.rooms, 500, 100):  # all; the side-port's largest page; default
                    found = await store.conversations(user, entity, 0, order, limit, 0)
                    assert len(found) == min(limit, args.rooms), len(found)

                    async def call(order: str = order, limit: int = limit) -> None:
                        await store.conversations(user, entity, 0, order, limit, 0)

                    await timed(call, 20)  # warm the plan and the cache
                    figures = await timed(call, args.runs)
                    print(
                        json.dumps(
                            {
                                "scenario": "conversations",
                                "rooms": args.rooms,
                                "messages_per_room": args.messages,
                                "noise_rooms": args.noise,
                                "order": order,
                                "limit": limit,
                                "queries": 1,
                                "vacuumed": not args.no_vacuum,
                                **figures,
                            }
                        )
                    )
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conversations", description=__doc__)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--noise", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--no-vacuum", action="store_true", help="ANALYZE only, no VACUUM")
    asyncio.run(amain(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
