"""The storage engine's own ceiling, without WebSockets: ``python -m benchmarks.store_ceiling``.

Calls ``PostgresStore.append_batch`` in a loop from this one process, ``--writers`` loops at
once (as the server's write shards do, each with its own rooms), on a fresh database that is
dropped afterwards. Prints rows/s per batch size: what PostgreSQL can store with the batch
statement when it has the machine to itself, to compare with the ``storage`` scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from nanomsg.store.base import NewMessage, NewRoom
from nanomsg.store.postgres import PostgresStore


async def run(url: str, batch: int, writers: int, rooms_n: int, seconds: float) -> float:
    store = PostgresStore(url, pool_size=writers + 1)
    await store.open()
    try:
        now = datetime.now(UTC)
        rooms = []
        for _ in range(rooms_n):
            new = NewRoom(
                "ceiling", 100, "group", str(uuid.uuid4()), 10, str(uuid.uuid4()), 100, now
            )
            rooms.append((await store.create_room(new)).id)
        stored = 0
        stop = time.monotonic() + seconds

        async def writer(k: int) -> None:
            nonlocal stored
            mine = [r for i, r in enumerate(rooms) if i % writers == k]
            turn = 0
            while time.monotonic() < stop:
                messages = [
                    NewMessage(mine[(turn + j) % len(mine)], "u", "e", "x" * 64, None, now)
                    for j in range(batch)
                ]
                await store.append_batch(messages)
                stored += batch
                turn += batch

        started = time.monotonic()
        await asyncio.gather(*(writer(k) for k in range(writers)))
        return stored / (time.monotonic() - started)
    finally:
        await store.close()


async def amain(args: argparse.Namespace) -> None:
    name = f"nanomsg_ceiling_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(args.pg_url)
        url = urlunsplit(parts._replace(path="/" + name))
        for batch in args.batch:
            rate = await run(url, batch, args.writers, args.rooms, args.seconds)
            print(
                json.dumps(
                    {
                        "scenario": "store_ceiling",
                        "batch": batch,
                        "writers": args.writers,
                        "rooms": args.rooms,
                        "rows_per_s": round(rate, 1),
                    }
                )
            )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_ceiling", description=__doc__)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--batch", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200, 500]
    )
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--rooms", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    asyncio.run(amain(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
