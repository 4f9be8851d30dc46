"""``python -m benchmarks.relay_micro``: the Redis relay alone, CPU time per published message.

No WebSocket and no storage: one ``RedisRelay`` publishes ``--messages`` messages spread over
``--rooms`` rooms, ``--per-pass`` of them per event-loop pass (as a server stores them in
batches), while subscribed to those rooms itself, as a server is to the rooms it has receivers
in (so it also reads its own publishes back, and drops them). The figure is the process's CPU
time from the first publish until the relay's queue is empty, divided by the messages, over
``--runs`` runs; building the ``Message`` objects is included (about 1 us each).

``--no-hiredis`` hides the hiredis module, so redis-py falls back to its pure-Python reply
parser: the pair of runs measures what hiredis is worth to the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay_micro", description=__doc__)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rooms", type=int, default=64)
    parser.add_argument("--per-pass", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hiredis", action="store_true", help="use redis-py's own parser")
    return parser.parse_args(argv)


async def one_run(args: argparse.Namespace) -> float:
    """CPU microseconds per message of one run."""
    from nanomsg.models import Message
    from nanomsg.relay.base import RelayHandlers
    from nanomsg.relay.redis import RedisRelay

    handlers = RelayHandlers(
        message=lambda m: None, room_changed=lambda r: None, resync=lambda r: None
    )
    relay = RedisRelay(args.redis_url, handlers, prefix=f"relay-micro-{uuid.uuid4().hex[:8]}")
    await relay.start()
    try:
        for room in range(args.rooms):
            relay.watch(room)
        deadline = time.monotonic() + 10.0
        while not relay.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Redis at {args.redis_url}")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the room subscriptions take effect
        now = datetime.now(UTC)
        seqs = [0] * args.rooms
        began = time.process_time()
        for first in range(0, args.messages, args.per_pass):
            for n in range(first, min(first + args.per_pass, args.messages)):
                room = n % args.rooms
                seqs[room] += 1
                relay.publish(
                    Message(
                        id=n + 1,
                        room_id=room,
                        seq=seqs[room],
                        emitter="0" * 36,
                        entity="1" * 36,
                        content="x" * 64,
                        created_at=now,
                        client_id=f"c{n}",
                    )
                )
            await asyncio.sleep(0)
        for _ in range(10_000):  # at most ~10 s for the queue to empty
            # (``_queue``: the relay before the outbox, to measure it with the same script)
            if not getattr(relay, "outbox", None) and not getattr(relay, "_queue", None):
                break
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)  # the own echoes still on the way are read and dropped
        spent = time.process_time() - began
        if relay.dropped:
            print(f"warning: {relay.dropped} messages dropped", file=sys.stderr)
        return float(spent / args.messages * 1e6)
    finally:
        await relay.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # import fails: Python parser
    import redis.utils

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    figures = [asyncio.run(one_run(args)) for _ in range(args.runs)]
    parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "redis-py's Python parser"
    shown = ", ".join(f"{f:.1f}" for f in figures)
    print(
        f"relay publish+own echo, {parser}: median {statistics.median(figures):.1f} us CPU per "
        f"message ({shown}); {args.messages} messages, {args.rooms} rooms, "
        f"{args.per_pass} per pass"
    )


if __name__ == "__main__":
    main()
