"""The conversation list's cost on PostgreSQL: ``python -m benchmarks.conversations``.

Seeds a fresh database (dropped afterwards) with one user holding ``--rooms`` rooms of
``--messages`` messages each (from another user, read up to a random point, with an edit and
a deletion in every tenth room), next to ``--noise`` rooms of other users, then (after
VACUUM ANALYZE, unless ``--no-vacuum``) times ``PostgresStore.conversations`` (the one query
behind ``GET /rooms/all``) from this process, alone (``part`` store) and with the side-port's
JSON body written from its result (``part`` answer): the whole list (``limit`` = every room),
the side-port's largest page (500) and its default page (100), each by id and by activity.
With ``--http`` it then starts a server process on the seeded database and times the real
route, ``GET /rooms/all`` (``part`` http): every room in pages of the route's largest size
(one page of 1 000; two of 500 for code whose largest page is 500), one page of 500, one of
100.
``--churn K[,K...]`` repeats the HTTP series for each K, sending a message (untimed, from
this process, as the user's correspondents on other processes would) to K random rooms of the
user before every request: 0 asks for an unchanged list again and again, the number of rooms
for a list changed throughout. ``--server-arg`` passes an argument to the server (such as
``--list-cache-mb=0`` to measure without its conversation-list cache). The ``queries`` of an
HTTP line count the statements without that cache; with it, a page whose rooms are all cached
is its one statement of versions and the settle, and the rooms it cannot answer add one
statement (or one per part of ``LIST_PART`` rooms, side by side); and a first page the cache
knows to hold the user's whole list, read without checking it first, is its parts alone and
the settle (no statement of ids).
With ``--explain N`` it also runs the whole list's query N times under
``EXPLAIN (ANALYZE, TIMING OFF)`` (``part`` explain), by id and by activity: PostgreSQL's own
execution time, which another process's load on the machine disturbs less than the
wall-clock figures.
Prints one JSON line per case with p50/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import secrets
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson

from benchmarks.servers import ServerSet
from benchmarks.stats import percentile
from benchmarks.tokens import mint
from nanomsg.openapi import PAGE_LIMIT_MAX

try:  # GET /rooms/all's own largest page, where the code measured has one
    from nanomsg.openapi import CONVERSATIONS_LIMIT_MAX as LIST_LIMIT_MAX
except ImportError:  # pragma: no cover - older code: the other lists' largest page
    LIST_LIMIT_MAX = PAGE_LIMIT_MAX
from nanomsg.store.base import NewMessage, NewRoom
from nanomsg.store.postgres import PostgresStore

try:  # the largest page the code measured reads in one statement, where it reads in parts
    from nanomsg.store.postgres import LIST_PART
except ImportError:  # pragma: no cover - older code: every page is one statement
    LIST_PART = 10**9


async def seed(
    store: PostgresStore, user: str, entity: str, rooms: int, messages: int, noise: int
) -> tuple[list[int], str]:
    """The user's rooms (a user rule each, as a DM or an invitation gives) and the others';
    returns the user's rooms and the other user who writes in them."""
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
    return mine, other


async def timed(
    call: Callable[[], Awaitable[None]],
    runs: int,
    before: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, float]:
    """p50, p99 and max of ``runs`` sequential calls, in milliseconds; ``before`` runs ahead of
    each call, untimed."""
    samples = []
    for _ in range(runs):
        if before is not None:
            await before()
        began = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - began)
    samples.sort()
    return {
        "p50_ms": round(percentile(samples, 50) / 1e6, 2),
        "p99_ms": round(percentile(samples, 99) / 1e6, 2),
        "max_ms": round(samples[-1] / 1e6, 2),
    }


def answer_of(found: Sequence[Any]) -> bytes:
    """The side-port's body for a page, as the code under test writes it: each entry from its
    Conversation (``to_json``), or, for code without it, from the room and state records."""
    if found and hasattr(found[0], "to_json"):
        entries = [c.to_json() for c in found]
    else:
        entries = [{**c.room.to_json(), **c.state.to_json()} for c in found]
    return orjson.dumps({"meta": {"code": 200, "message": "OK"}, "content": entries})


async def store_cases(
    store: PostgresStore, user: str, entity: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """``store.conversations`` alone (``part`` store), and with the side-port's JSON body
    written from its result in the same process (``part`` answer)."""
    results = []
    for order in ("id", "activity"):
        for limit in (args.rooms, 500, 100):  # all; the side-port's largest page; its default
            found = await store.conversations(user, entity, 0, order, limit, 0)
            assert len(found) == min(limit, args.rooms), len(found)

            async def call(order: str = order, limit: int = limit) -> None:
                await store.conversations(user, entity, 0, order, limit, 0)

            async def answer(order: str = order, limit: int = limit) -> None:
                answer_of(await store.conversations(user, entity, 0, order, limit, 0))

            for part, timed_call in (("store", call), ("answer", answer)):
                await timed(timed_call, 20)  # warm the plan and the cache
                figures = await timed(timed_call, args.runs)
                results.append({"part": part, "order": order, "limit": limit, **figures})
    return results


async def http_cases(
    url: str,
    user: str,
    entity: str,
    args: argparse.Namespace,
    churn: Callable[[int], Awaitable[None]],
) -> list[dict[str, Any]]:
    """``GET /rooms/all`` of a server process started on the seeded database (``part``
    http), timed from the request to the last byte of the answer over a kept-alive loopback
    connection: every room in pages of the largest size (``pages`` requests in a row), one
    page of the largest size and one of the default size. For each ``--churn`` K, before
    every request (untimed) ``churn`` sends a message to K of the user's rooms from another
    process, as the other members of a busy list would."""
    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="nanomsg-conversations-") as workdir:
        servers = ServerSet(
            db="postgres", secret=secret, workdir=Path(workdir), extra_args=args.server_arg
        )
        [node] = await servers.start_on(url)
        try:
            token = mint(secret, user=user, entity=entity, level=0)
            headers = {"Authorization": f"Bearer {token}"}
            results = []
            async with aiohttp.ClientSession(headers=headers) as session:
                for changed, order in [(k, o) for k in args.churn for o in ("id", "activity")]:
                    largest = min(LIST_LIMIT_MAX, args.rooms)
                    pages = -(-args.rooms // largest)
                    for limit, count in ((largest, pages), (500, 1), (100, 1)):

                        async def call(
                            order: str = order, limit: int = limit, n: int = count
                        ) -> None:
                            for page in range(n):
                                async with session.get(
                                    f"{node.http_url}/rooms/all",
                                    params={"order": order, "limit": limit, "offset": page * limit},
                                ) as response:
                                    assert response.status == 200, response.status
                                    await response.read()

                        async def before(changed: int = changed) -> None:
                            await churn(changed)

                        await timed(call, 20, before)
                        figures = await timed(call, args.runs, before)
                        results.append(
                            {
                                "part": "http",
                                "order": order,
                                "limit": limit,
                                "pages": count,
                                "churn": changed,
                                **figures,
                            }
                        )
        finally:
            await servers.stop()
    return results


async def explain_cases(
    url: str, user: str, entity: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """PostgreSQL's execution time of the whole list's one query (``--explain`` runs of
    ``EXPLAIN (ANALYZE, TIMING OFF)`` each by id and by activity, after 10 to warm up), as the
    store sends it (a prepared statement)."""
    from nanomsg.store import common
    from nanomsg.store.postgres import _VISIBLE_IDS, _stamp_text

    results = []
    older = (
        {"lateral": True}
        if "lateral" in inspect.signature(common.room_states_sql).parameters
        else {}
    )
    conn = await asyncpg.connect(url)
    try:
        for order in ("id", "activity"):
            sql, params = common.numbered(
                common.room_states_sql(
                    common.conversation_page_sql(_VISIBLE_IDS, order),
                    order,
                    stamp_text=_stamp_text,
                    # older code probed the latest message, with a LATERAL join on PostgreSQL
                    **older,
                ),
                {"user": user, "entity": entity, "level": 0, "limit": args.rooms, "offset": 0},
            )
            statement = await conn.prepare("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + sql)
            samples = []
            for index in range(args.explain + 10):
                plan = json.loads(await statement.fetchval(*params))
                if index >= 10:
                    samples.append(plan[0]["Execution Time"])
            samples.sort()
            results.append(
                {
                    "part": "explain",
                    "order": order,
                    "limit": args.rooms,
                    "p50_ms": round(percentile(samples, 50), 3),
                    "p99_ms": round(percentile(samples, 99), 3),
                    "max_ms": round(samples[-1], 3),
                }
            )
    finally:
        await conn.close()
    return results


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
            mine, other = await seed(store, user, entity, args.rooms, args.messages, args.noise)
            rng = random.Random(11)

            async def churn(changed: int) -> None:
                """A message from the other user to ``changed`` of the user's rooms."""
                now = datetime.now(UTC)
                rooms = rng.sample(mine, min(changed, len(mine)))
                await store.append_batch(
                    [NewMessage(room, other, entity, "churn", None, now) for room in rooms]
                )

            conn = await asyncpg.connect(url)
            try:
                # A settled database, as autovacuum leaves it (PostgreSQL 13+ also vacuums
                # insert-only tables): the visibility map marks the pages all-visible, so the
                # unread count's probes are index-only. --no-vacuum measures right after bulk
                # inserts, each probed entry then visits its heap page.
                await conn.execute("ANALYZE" if args.no_vacuum else "VACUUM ANALYZE")
            finally:
                await conn.close()
            results = await store_cases(store, user, entity, args)
            if args.explain:
                results += await explain_cases(url, user, entity, args)
            if args.http:
                results += await http_cases(url, user, entity, args, churn)
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    for result in results:
        line = {
            "scenario": "conversations",
            "rooms": args.rooms,
            "messages_per_room": args.messages,
            "noise_rooms": args.noise,
            # Statements per request: the list's one query, or for a page larger than a part
            # its ids and then one per part; over HTTP the settle of the caller's waiting DMs
            # too. ``explain`` times the one-statement query.
            "queries": 1
            if result["part"] == "explain"
            else statements(min(result["limit"], args.rooms)) + (result["part"] == "http"),
            "vacuumed": not args.no_vacuum,
            **result,
        }
        if args.code:
            line["code"] = args.code
        print(json.dumps(line), flush=True)


def statements(page: int) -> int:
    """The list's statements for a page of ``page`` rooms: one, or the ids and one per part
    (when the pool has a connection to spare for each, as it has here)."""
    return 1 if page <= LIST_PART else 1 + -(-page // LIST_PART)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conversations", description=__doc__)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--noise", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--no-vacuum", action="store_true", help="ANALYZE only, no VACUUM")
    parser.add_argument(
        "--http", action="store_true", help="also time GET /rooms/all on a server process"
    )
    parser.add_argument("--code", default="", help="a label for the code measured (results)")
    parser.add_argument(
        "--churn",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[0],
        metavar="K[,K...]",
        help="with --http: rooms sent a message (untimed) before each request, per series",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="with --http: one more server argument, such as --server-arg=--list-cache-mb=0",
    )
    parser.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="also run the whole list's query N times under EXPLAIN (ANALYZE, TIMING OFF)",
    )
    asyncio.run(amain(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
