"""What an edit and a delete cost next to a send: ``python -m benchmarks.edits``.

Spawns a server on a fresh database (``--db sqlite`` or ``--db postgres``), creates one room
per connection and opens ``--connections`` WebSocket connections (token, ``select_room``).
Then three phases, one after the other, each in closed loop with ``--in-flight`` commands
outstanding per connection:

1. ``send``: every connection sends ``--ops`` messages (acknowledged by its echo, matched by
   ``client_id``) and keeps the seqs it got;
2. ``edit``: every connection edits each of its messages once (``{"type":"edit","seq":S}``,
   acknowledged by the ``edited`` frame whose ``seq_edited`` is S);
3. ``delete``: every connection deletes each of its messages once (acknowledged by the
   ``deleted`` frame whose ``seq_deleted`` is S).

Each phase writes as many rows as the one before, so each kind meets a larger database than
the kind before it (SQLite's cost per write grows with it: measured ~50 us CPU per send on an
empty file, ~80 past 13 000 rows). ``--rounds R`` runs the three phases R times over a
``1/R`` share of the ops each (send them, edit them, delete them), so that every kind meets
the same sizes; each kind's line then sums its R phases.

Every command is acknowledged only after its storage transaction committed, so the figures
compare what the server does per kind of write. Prints one JSON line per phase (acknowledged
ops/s over the phase, ack p50/p99/max in milliseconds, server CPU % and CPU per op) and
appends them to ``--json-out``. The client is one asyncio process using ``websockets``: it is
the same for the three kinds, so the comparison holds even where the client costs a share of
the two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from benchmarks.admin import ADMIN_ENTITY, Admin
from benchmarks.procstat import cpu_seconds
from benchmarks.servers import ServerSet
from benchmarks.stats import percentile
from benchmarks.tokens import entity_uuid, mint, user_uuid

KINDS = ("send", "edit", "delete")


class Client:
    """One connection: its own room, its messages' seqs, the acks it waits for."""

    def __init__(self, ws: Any, index: int, user: str) -> None:
        self.ws = ws
        self.index = index
        self.user = user
        self.seqs: list[int] = []
        self.waiting: dict[tuple[str, str | int], asyncio.Future[int]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Resolve the future of each acknowledgement as its frame arrives; should the
        connection fail or answer a status word, fail every command still waiting at once
        (rather than each after its timeout)."""
        try:
            await self._scan()
        except Exception as exc:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(exc)
            raise

    async def _scan(self) -> None:
        """Match each frame to the command it acknowledges: an echo by ``client_id``, an
        ``edited`` by ``seq_edited``, a ``deleted`` by ``seq_deleted``."""
        async for raw in self.ws:
            frame = json.loads(raw)
            data = frame.get("data")
            kind = frame.get("type")
            key: tuple[str, str | int] | None = None
            if kind == "message" and isinstance(data, dict):
                key = ("send", str(data.get("client_id")))
            elif kind == "edited" and isinstance(data, dict):
                key = ("edit", int(data["seq_edited"]))
            elif kind == "deleted" and isinstance(data, dict):
                key = ("delete", int(data["seq_deleted"]))
            elif kind == "status":
                raise RuntimeError(f"connection {self.index}: unexpected {raw!r}")
            if key is not None and key in self.waiting:
                self.waiting.pop(key).set_result(int(data["seq"]))

    async def command(self, kind: str, n: int) -> tuple[int, int]:
        """Run the ``n``-th command of ``kind``; answer (latency ns, seq acknowledged)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if kind == "send":
            key: tuple[str, str | int] = ("send", f"c{self.index}-{n}")
            body: dict[str, Any] = {
                "type": "message",
                "content": f"message {n} " + "x" * 40,
                "client_id": key[1],
            }
        elif kind == "edit":
            key = ("edit", self.seqs[n])
            body = {"type": "edit", "seq": self.seqs[n], "content": f"edited {n} " + "y" * 40}
        else:
            key = ("delete", self.seqs[n])
            body = {"type": "delete", "seq": self.seqs[n]}
        self.waiting[key] = future
        began = time.perf_counter_ns()
        await self.ws.send(json.dumps(body))
        seq = await asyncio.wait_for(future, 30)
        return time.perf_counter_ns() - began, seq


async def open_client(url: str, secret: str, nonce: int, index: int, room: int) -> Client:
    """Connect, authenticate as user ``index`` of the creator's entity, select ``room``."""
    user = user_uuid(nonce, index)
    ws = await websockets.connect(url, max_size=None)
    assert json.loads(await ws.recv())["data"] == "START?"
    token = mint(secret, user=user, entity=entity_uuid(nonce, ADMIN_ENTITY), level=100)
    await ws.send(json.dumps({"type": "token", "content": token}))
    assert json.loads(await ws.recv())["data"] == "READY"
    await ws.send(json.dumps({"type": "select_room", "room_id": room}))
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("type") == "status" and frame.get("data") == "CONNECTED":
            break
    return Client(ws, index, user)


async def phase(
    clients: list[Client], kind: str, ops: int, in_flight: int, pid: int, start: int = 0
) -> tuple[list[int], float, float]:
    """Every client runs its commands ``start`` to ``start + ops - 1`` of ``kind``,
    ``in_flight`` at a time; the acks' latencies (ns), the seconds elapsed and the server's
    CPU seconds."""
    samples: list[int] = []

    async def lane(client: Client, lane_no: int) -> None:
        for n in range(start + lane_no, start + ops, in_flight):
            latency, seq = await client.command(kind, n)
            samples.append(latency)
            if kind == "send":
                client.seqs.append(seq)

    cpu0 = cpu_seconds(pid) or 0.0
    began = time.perf_counter()
    await asyncio.gather(*(lane(c, k) for c in clients for k in range(in_flight)))
    elapsed = time.perf_counter() - began
    cpu = (cpu_seconds(pid) or 0.0) - cpu0
    if kind == "send":
        for client in clients:
            client.seqs.sort()
    return samples, elapsed, cpu


def figures(kind: str, samples: list[int], elapsed: float, cpu: float) -> dict[str, Any]:
    """One kind's line: acknowledged ops/s over its phases, ack latencies, server CPU."""
    samples.sort()
    return {
        "kind": kind,
        "ops": len(samples),
        "elapsed_s": round(elapsed, 3),
        "ops_per_s": round(len(samples) / elapsed, 1),
        "ack_p50_ms": round(percentile(samples, 50) / 1e6, 3),
        "ack_p99_ms": round(percentile(samples, 99) / 1e6, 3),
        "ack_max_ms": round(samples[-1] / 1e6, 3),
        "server_cpu_pct": round(100 * cpu / elapsed, 1),
        "server_cpu_us_per_op": round(1e6 * cpu / len(samples), 1),
    }


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    secret = secrets.token_hex(16)
    nonce = secrets.randbits(32)
    with tempfile.TemporaryDirectory(prefix="nanomsg-edits-") as tmp:
        servers = ServerSet(db=args.db, secret=secret, workdir=Path(tmp), pg_url=args.pg_url)
        nodes = await servers.start()
        node = nodes[0]
        clients: list[Client] = []
        try:
            async with Admin(node.http_url, secret=secret, nonce=nonce) as admin:
                rooms = await admin.create_rooms(f"edits-{nonce}", args.connections)
            clients = list(
                await asyncio.gather(
                    *(
                        open_client(node.ws_url, secret, nonce, i + 1, rooms[i])
                        for i in range(args.connections)
                    )
                )
            )
            results = []
            load = os.getloadavg()
            totals: dict[str, tuple[list[int], float, float]] = {k: ([], 0.0, 0.0) for k in KINDS}
            per_round = args.ops // args.rounds
            for round_no in range(args.rounds):
                for kind in KINDS:
                    samples, elapsed, cpu = await phase(
                        clients, kind, per_round, args.in_flight, node.pid, round_no * per_round
                    )
                    held = totals[kind]
                    totals[kind] = (held[0] + samples, held[1] + elapsed, held[2] + cpu)
            for kind in KINDS:
                results.append(
                    {
                        "scenario": "edits",
                        "db": args.db,
                        "label": args.label,
                        "connections": args.connections,
                        "in_flight": args.in_flight,
                        "ops_per_connection": per_round * args.rounds,
                        "rounds": args.rounds,
                        "loadavg_before": [round(x, 2) for x in load],
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        **figures(kind, *totals[kind]),
                    }
                )
        finally:
            for client in clients:
                client.reader.cancel()
                await client.ws.close()
            await servers.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edits", description=__doc__)
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--connections", type=int, default=64, help="one room each")
    parser.add_argument("--ops", type=int, default=100, help="commands of each kind per connection")
    parser.add_argument("--in-flight", type=int, default=1, help="outstanding per connection")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split the ops into this many rounds of the three phases, so that each kind is"
        " measured on the same database sizes (1: each phase once, sends on the empty database)",
    )
    parser.add_argument("--label", default="")
    parser.add_argument("--json-out", default="benchmarks/results/edits.jsonl")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.ops % args.rounds:
        parser.error("--rounds must divide --ops")
    results = asyncio.run(amain(args))
    with open(args.json_out, "a", encoding="utf-8") as out:
        for line in results:
            print(json.dumps(line))
            out.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
