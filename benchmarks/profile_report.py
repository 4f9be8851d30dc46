"""Group py-spy's folded stacks by area: ``python -m benchmarks.profile_report FILE``.

Each sample goes to the area of its innermost frame that matches one of ``AREAS`` (so a
socket write made from the hub counts as a socket write); samples in no area fall to "event
loop and kernel" when only the loop's own frame is on the stack (uvloop's C code: polling,
accepting, reading, and idle waits), else to "other Python". Prints a markdown table, largest
first, then the top functions by own samples.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

# (substring of a frame, area); the innermost matching frame decides.
AREAS: tuple[tuple[str, str], ...] = (
    ("flush_outbox", "socket writes (one per connection per loop pass)"),
    ("Connection._flush ", "socket writes (one per connection per loop pass)"),
    ("asyncpg", "asyncpg (PostgreSQL protocol, encoding, decoding)"),
    ("aiosqlite", "SQLite (aiosqlite thread and calls)"),
    ("websockets/", "websockets (HTTP upgrade, frame parsing)"),
    ("nanomsg/auth.py", "token verification"),
    ("nanomsg/store/writer.py", "batching writer"),
    ("nanomsg/store/", "store (building batches, mapping rows)"),
    ("nanomsg/clock.py", "timestamps"),
    ("nanomsg/fanout.py", "hub (ordering, per-receiver append)"),
    ("write_frame", "hub (ordering, per-receiver append)"),
    ("nanomsg/session.py", "session"),
    ("nanomsg/codec.py", "codec (decode, encode once per message)"),
    ("nanomsg/models.py", "codec (decode, encode once per message)"),
    ("nanomsg/relay/", "relay (Redis)"),
    ("redis/", "relay (Redis)"),
)


def group(lines: list[str]) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    total = 0
    areas: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaves[frames[-1]] += n
        area = next(
            (name for frame in reversed(frames) for key, name in AREAS if key in frame), None
        )
        if area is None:
            area = (
                "event loop and kernel (uvloop C code, idle waits included)"
                if "Runner.run" in frames[-1]
                else "other Python"
            )
        areas[area] += n
    return total, areas, leaves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_report", description=__doc__
    )
    parser.add_argument("file", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=12, help="functions to list by own samples")
    args = parser.parse_args(argv)
    total, areas, leaves = group(args.file.read_text().splitlines())
    if total == 0:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples\n\n| where | share |\n|---|---|")
    for name, n in areas.most_common():
        print(f"| {name} | {n / total * 100:.0f} % |")
    print("\ntop functions by own samples:")
    for name, n in leaves.most_common(args.top):
        print(f"  {n / total * 100:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
