"""``python -m benchmarks.sqlite_changes``: the SQLite store alone, CPU time per send, edit
and delete.

No WebSocket and no writer: ``--rooms`` rooms in a fresh database file, then ``--batches``
batches of one send per room through ``append_events``, then as many batches editing those
messages, then as many deleting them, as the batching writer hands them over under load.
The figure is the process's CPU time (the event loop and aiosqlite's thread) per operation
of each phase, over ``--runs`` runs; ``--profile`` prints cProfile's top of the edit phase
(the event loop's thread only). Each phase meets a larger file than the one before (a send
costs SQLite more as the file grows); ``--rounds R`` runs the three phases R times over a
``1/R`` share of the batches each, so that every kind meets the same sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

USER = "00000000-0000-4000-8000-000000000001"
ENTITY = "00000000-0000-4000-8000-000000000002"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sqlite_changes", description=__doc__
    )
    parser.add_argument("--rooms", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split the batches into this many rounds of the three phases, so that each kind"
        " meets the same database sizes (1: each phase once, sends on the empty file)",
    )
    parser.add_argument("--profile", action="store_true", help="profile the edit phase")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches % args.rounds:
        parser.error("--rounds must divide --batches")
    return args


async def one_run(args: argparse.Namespace, directory: str) -> dict[str, float]:
    """CPU microseconds per operation of each phase of one run, by kind."""
    from nanomsg.store.base import Changed, MessageChange, NewMessage, NewRoom
    from nanomsg.store.sqlite import SqliteStore

    store = SqliteStore(str(Path(directory) / "changes.db"))
    await store.open()
    try:
        rooms = []
        for index in range(args.rooms):
            new = NewRoom(
                name=f"r{index}",
                level_admin=10,
                type="group",
                entity_owner=ENTITY,
                max_entity_rules=10,
                creator_user=USER,
                creator_level=100,
                now=datetime.now(UTC),
            )
            rooms.append((await store.create_room(new)).id)
        seqs: dict[int, list[int]] = {room: [] for room in rooms}
        cpu = dict.fromkeys(("send", "edit", "delete"), 0.0)
        profile = cProfile.Profile()
        per_round = args.batches // args.rounds
        for round_no in range(args.rounds):
            first = round_no * per_round
            for kind in ("send", "edit", "delete"):
                started = time.process_time()
                if kind == "edit" and args.profile:
                    profile.enable()
                for batch in range(first, first + per_round):
                    if kind == "send":
                        sends = [
                            NewMessage(
                                room, USER, ENTITY, "hello world " * 3, None, datetime.now(UTC)
                            )
                            for room in rooms
                        ]
                        for outcome in await store.append_events(sends):
                            assert isinstance(outcome, tuple)
                            seqs[outcome[0].room_id].append(outcome[0].seq)
                    else:
                        content = "edited " * 3 if kind == "edit" else None
                        changes = [
                            MessageChange(room, seqs[room][batch], USER, datetime.now(UTC), content)
                            for room in rooms
                        ]
                        for outcome in await store.append_events(changes):
                            assert isinstance(outcome, Changed), outcome  # never a refusal
                profile.disable()
                cpu[kind] += time.process_time() - started
        ops = per_round * args.rounds * len(rooms)
        out = {kind: spent / ops * 1e6 for kind, spent in cpu.items()}
        if args.profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(20)
        return out
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs: dict[str, list[float]] = {"send": [], "edit": [], "delete": []}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as directory:
            for kind, value in asyncio.run(one_run(args, directory)).items():
                runs[kind].append(value)
    for kind, values in runs.items():
        shown = " / ".join(f"{value:.0f}" for value in values)
        print(f"{kind}: {shown} us CPU per op, median {statistics.median(values):.0f}")


if __name__ == "__main__":
    main()
