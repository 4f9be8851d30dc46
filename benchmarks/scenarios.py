"""The six scenarios of the benchmark issue, plus ``selftest`` (the client's own speed).

Each scenario function sets up rooms over HTTP, runs worker processes through one timed phase
(or two, for history), and returns an ``Outcome``: the parameters that define the point, the
numeric ``metrics`` (medians are taken over runs of these) and non-numeric ``info`` (close
codes, failure reasons, nodes). Formulas:

- rates are counted over the steady window only (warm-up and drain excluded): messages whose
  *send* time falls in the window for ``sent_per_s``/``stored_per_s``, frames whose *receive*
  time falls in it for ``delivered_per_s``;
- ``delivery_ratio`` = frames received by subscribers / (messages sent x subscribers
  connected), over the whole run including the drain (a lost or closed subscriber lowers it);
- latency percentiles are nearest-rank over the merged samples of every worker, keeping only
  messages sent inside the steady window; ``max`` is the largest *sampled* value.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.admin import ADMIN_ENTITY, USER_ENTITY, Admin
from benchmarks.procstat import Snapshot, cpu_percent
from benchmarks.runner import (
    Target,
    WorkerPool,
    source_addresses,
    split,
    timed_phase,
)
from benchmarks.seed import count_messages, seed_postgres, seed_sqlite, sqlite_path
from benchmarks.servers import server_fd_limit
from benchmarks.stats import latency_summary, merge_counts
from benchmarks.tokens import entity_uuid, user_uuid
from benchmarks.worker import ConnSpec, Job


class ScenarioError(RuntimeError):
    """The scenario cannot run as asked (limits of this machine, bad options, no server)."""


@dataclass
class Outcome:
    params: dict[str, Any]
    metrics: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def new_nonce() -> int:
    return random.getrandbits(32)


def _job(
    args: argparse.Namespace, target: Target, kind: str, specs: list[ConnSpec], **kw: Any
) -> Job:
    return Job(
        kind=kind,
        specs=specs,
        secret=target.secret,
        audience=target.audience,
        issuer=target.issuer,
        sample_every=args.sample_every,
        sample_cap=args.sample_cap,
        connect_concurrency=args.connect_concurrency,
        connect_timeout=args.connect_timeout,
        hard_deadline=time.time() + args.setup_timeout + args.warmup + args.duration + 300,
        size=args.size,
        **kw,
    )


def _check_fds(args: argparse.Namespace, target: Target, connections: int) -> None:
    """Refuse runs this machine's file-descriptor limits cannot hold, with the fix."""
    if target.servers is not None:
        limit = server_fd_limit()
        per_node = connections / max(len(target.ws_urls), 1)
        if per_node + 200 > limit:
            raise ScenarioError(
                f"{connections} connections need ~{int(per_node) + 200} file descriptors in the "
                f"server process, but the hard RLIMIT_NOFILE here is {limit}: raise it "
                f"(ulimit -Hn / systemd LimitNOFILE / docker --ulimit nofile=...) and rerun"
            )
    per_proc = connections / max(args.client_procs, 1)
    if per_proc + 200 > server_fd_limit():
        raise ScenarioError(
            f"{connections} connections over {args.client_procs} client processes is "
            f"{int(per_proc)} sockets each, over the fd limit {server_fd_limit()}: "
            f"raise --client-procs"
        )


def _server_figures(
    before: Snapshot | None, after: Snapshot | None, node_pids: list[int] | None = None
) -> dict[str, Any]:
    """Server CPU % over the steady window and RSS at its end (all server processes); with
    several spawned nodes also per node (node 0 is the publishers' node in crossnode)."""
    if before is None or after is None:
        return {"server_cpu_pct": None, "server_rss_mib": None, "server_peak_rss_mib": None}
    out: dict[str, Any] = {
        "server_cpu_pct": cpu_percent(before, after),
        "server_rss_mib": round(after.total_rss_kib / 1024, 1),
        "server_peak_rss_mib": round(after.total_hwm_kib / 1024, 1),
    }
    if node_pids and len(node_pids) > 1:
        elapsed = after.wall - before.wall
        for i, pid in enumerate(node_pids):
            if pid in before.cpu and pid in after.cpu and elapsed > 0:
                used = after.cpu[pid] - before.cpu[pid]
                out[f"server_cpu_pct_node{i}"] = round(100 * used / elapsed, 1)
            if pid in after.rss_kib:
                out[f"server_rss_mib_node{i}"] = round(after.rss_kib[pid] / 1024, 1)
    return out


def _client_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How busy the load generator's processes were: near 100 % means it may be the limit."""
    busy = [100 * r["cpu_s"] / r["wall_s"] for r in results if r.get("wall_s")]
    return {
        "client_cpu_pct_max": round(max(busy), 1) if busy else None,
        "client_cpu_pct_sum": round(sum(busy), 1) if busy else None,
    }


def _common_info(ready: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "connect_failures": merge_counts(r["failures"] for r in ready),
        "close_codes": merge_counts(r["close_codes"] for r in results),
        "status_words": merge_counts(r["status_words"] for r in results),
        "errors": merge_counts(r["failures"] for r in results),
        "lost_connections": sum(r["lost"] for r in results),
        "nodes": merge_counts(r["nodes"] for r in ready),
    }


def _setup_timeout(args: argparse.Namespace) -> float:
    return float(args.setup_timeout)


# -- 1 and 6: fan-out (one node, or senders and receivers on different nodes) ----------------------


async def fanout(args: argparse.Namespace, target: Target, point: dict[str, Any]) -> Outcome:
    """One room, N subscribers, P publishers at a target total rate."""
    subscribers = int(point["subscribers"])
    rate = float(point["rate"])
    publishers = max(1, args.publishers)
    cross = len(target.ws_urls) > 1
    _check_fds(args, target, subscribers + publishers)
    nonce = new_nonce()
    t_setup = time.monotonic()
    async with Admin(
        target.http_urls[0],
        secret=target.secret,
        nonce=nonce,
        audience=target.audience,
        issuer=target.issuer,
    ) as admin:
        room = await admin.create_room(f"bench-fanout-{nonce:08x}")
        extra = tuple(
            [
                await admin.create_room(f"bench-fanout-{nonce:08x}-{n}")
                for n in range(1, max(1, getattr(args, "rooms_per_receiver", 1)))
            ]
        )
    pub_url = target.ws_urls[0]
    recv_urls = target.ws_urls[1:] if cross else target.ws_urls
    srcs = source_addresses(pub_url, subscribers + publishers, args.source_addrs)
    pub_specs = [
        ConnSpec(pub_url, room, 1 + i, srcs[i % len(srcs)], 1 + i) for i in range(publishers)
    ]
    sub_specs = [
        ConnSpec(
            recv_urls[i % len(recv_urls)],
            room,
            1 + publishers + i,
            srcs[(publishers + i) % len(srcs)],
            0,
            extra,
        )
        for i in range(subscribers)
    ]
    entity = entity_uuid(nonce, ADMIN_ENTITY)
    duration = args.warmup + args.duration
    jobs = [
        _job(args, target, "recv", part, nonce=nonce, entity=entity, level=100)
        for part in split(sub_specs, args.client_procs)
    ]
    jobs.append(
        _job(
            args,
            target,
            "publish",
            pub_specs,
            nonce=nonce,
            entity=entity,
            level=100,
            rate=rate,
            max_outstanding=args.max_outstanding,
            max_messages=int(rate * duration * 1.05) + 10,
        )
    )
    pool = WorkerPool(jobs)
    try:
        ready = await pool.start(_setup_timeout(args))
        setup_s = time.monotonic() - t_setup
        subs = int(sum(r["connected"] for r in ready[:-1]))
        pubs = ready[-1]["connected"]
        if subs == 0 or pubs == 0:
            raise ScenarioError(f"no subscribers or publishers connected: {ready}")

        def complete(progress: list[dict[str, Any]]) -> bool:
            sent = sum(int(p["sent"]) for p in progress if p["kind"] == "publish")
            got = sum(int(p["frames"]) for p in progress if p["kind"] == "recv")
            return got >= sent * subs

        timed = await timed_phase(
            pool,
            target,
            warmup=args.warmup,
            duration=args.duration,
            drain=args.drain,
            complete=complete,
        )
    finally:
        pool.close()
    recv = [r for r in timed.results if r["kind"] == "recv"]
    pub = [r for r in timed.results if r["kind"] == "publish"]
    sent = sum(r["sent"] for r in pub)
    delivered = sum(r["frames"] for r in recv)
    expected = sent * subs
    window = timed.window_s
    metrics: dict[str, Any] = {
        "subscribers": subs,
        "publishers": pubs,
        "offered_rate": rate,
        "sent": sent,
        "sent_per_s": round(sum(r["window_sent"] for r in pub) / window, 1),
        "skipped_sends": sum(r["skipped"] for r in pub),
        "delivered": delivered,
        "delivered_per_s": round(sum(r["window_frames"] for r in recv) / window, 1),
        "delivery_ratio": round(delivered / expected, 5) if expected else None,
        **latency_summary(s for r in recv for s in r["samples"]),
        **latency_summary((s for r in pub for s in r["ack_samples"]), "ack"),
        **_server_figures(timed.before, timed.after, target.node_pids),
        **_client_figures(timed.results),
        "setup_s": round(setup_s, 2),
        "drain_s": round(timed.drained_s, 2),
    }
    info = _common_info(ready, timed.results)
    info["room"] = room
    if cross:
        info["publisher_url"] = pub_url
        info["receiver_urls"] = recv_urls
    params = {
        "subscribers": subscribers,
        "rate": rate,
        "publishers": publishers,
        "size": args.size,
        "nodes": len(target.ws_urls),
        "rooms_per_receiver": 1 + len(extra),
    }
    return Outcome(params, metrics, info)


# -- 2: chat -------------------------------------------------------------------------------------


def room_sizes(connections: int, low: int, high: int, rng: random.Random) -> list[int]:
    """Room sizes uniform in [low, high] adding up to ``connections`` (the last one smaller)."""
    sizes: list[int] = []
    left = connections
    while left > 0:
        size = min(rng.randint(low, high), left)
        sizes.append(size)
        left -= size
    return sizes


async def chat(args: argparse.Namespace, target: Target, point: dict[str, Any]) -> Outcome:
    """Many small rooms, every user both reads and sends now and then."""
    connections = int(point["connections"])
    _check_fds(args, target, connections)
    nonce = new_nonce()
    rng = random.Random(nonce)
    sizes = room_sizes(connections, args.room_min, args.room_max, rng)
    t_setup = time.monotonic()
    async with Admin(
        target.http_urls[0],
        secret=target.secret,
        nonce=nonce,
        audience=target.audience,
        issuer=target.issuer,
        concurrency=args.http_concurrency,
    ) as admin:
        rooms = await admin.create_rooms(f"bench-chat-{nonce:08x}", len(sizes))
        members: list[int] = [
            room for room, size in zip(rooms, sizes, strict=True) for _ in range(size)
        ]
        await admin.add_members([(room, user_uuid(nonce, 1 + i)) for i, room in enumerate(members)])
        http_requests = admin.requests
    http_s = time.monotonic() - t_setup
    srcs = source_addresses(target.ws_urls[0], connections, args.source_addrs)
    specs = [
        ConnSpec(target.ws_urls[i % len(target.ws_urls)], room, 1 + i, srcs[i % len(srcs)], 1 + i)
        for i, room in enumerate(members)
    ]
    entity = entity_uuid(nonce, USER_ENTITY)
    expected_rate = connections / args.interval
    max_messages = int(expected_rate * (args.warmup + args.duration) * 2) + 100
    jobs = [
        _job(
            args,
            target,
            "chat",
            part,
            nonce=nonce,
            entity=entity,
            level=0,
            interval=args.interval,
            max_messages=max_messages,
        )
        for part in split(specs, args.client_procs)
    ]
    pool = WorkerPool(jobs)
    try:
        ready = await pool.start(_setup_timeout(args))
        setup_s = time.monotonic() - t_setup
        timed = await timed_phase(
            pool, target, warmup=args.warmup, duration=args.duration, drain=args.drain
        )
    finally:
        pool.close()
    connected_in: dict[int, int] = {}
    sends_in: dict[int, int] = {}
    for r in timed.results:
        for room, n in r["room_members"].items():
            connected_in[room] = connected_in.get(room, 0) + n
        for room, n in r["room_sends"].items():
            sends_in[room] = sends_in.get(room, 0) + n
    expected = sum(n * connected_in.get(room, 0) for room, n in sends_in.items())
    delivered = sum(r["frames"] for r in timed.results)
    window = timed.window_s
    metrics: dict[str, Any] = {
        "connections": sum(r["connected"] for r in ready),
        "rooms": len(rooms),
        "mean_room_size": round(statistics.mean(sizes), 2),
        "sent": sum(r["sent"] for r in timed.results),
        "sent_per_s": round(sum(r["window_sent"] for r in timed.results) / window, 1),
        "delivered": delivered,
        "delivered_per_s": round(sum(r["window_frames"] for r in timed.results) / window, 1),
        "delivery_ratio": round(delivered / expected, 5) if expected else None,
        **latency_summary(s for r in timed.results for s in r["samples"]),
        **_server_figures(timed.before, timed.after, target.node_pids),
        **_client_figures(timed.results),
        "http_setup_s": round(http_s, 2),
        "http_setup_req_per_s": round(http_requests / http_s, 1) if http_s else None,
        "setup_s": round(setup_s, 2),
    }
    params = {
        "connections": connections,
        "room_min": args.room_min,
        "room_max": args.room_max,
        "interval": args.interval,
        "size": args.size,
    }
    return Outcome(params, metrics, _common_info(ready, timed.results))


# -- 3: idle connections ---------------------------------------------------------------------------


async def connections(args: argparse.Namespace, target: Target, point: dict[str, Any]) -> Outcome:
    """K idle authenticated connections with a room selected: memory and setup rate."""
    count = int(point["connections"])
    _check_fds(args, target, count)
    nonce = new_nonce()
    async with Admin(
        target.http_urls[0],
        secret=target.secret,
        nonce=nonce,
        audience=target.audience,
        issuer=target.issuer,
    ) as admin:
        rooms = await admin.create_rooms(f"bench-idle-{nonce:08x}", max(1, min(args.rooms, count)))
    srcs = source_addresses(target.ws_urls[0], count, args.source_addrs)
    specs = [
        ConnSpec(
            target.ws_urls[i % len(target.ws_urls)],
            rooms[i % len(rooms)],
            1 + i,
            srcs[i % len(srcs)],
            0,
        )
        for i in range(count)
    ]
    entity = entity_uuid(nonce, ADMIN_ENTITY)
    jobs = [
        _job(args, target, "idle", part, nonce=nonce, entity=entity, level=100)
        for part in split(specs, args.client_procs)
    ]
    await asyncio.sleep(0.5)
    before = target.snapshot()
    pool = WorkerPool(jobs)
    try:
        ready = await pool.start(_setup_timeout(args))
        await asyncio.sleep(1.0)  # let the server settle (buffers freed, timers armed)
        loaded = target.snapshot()
        await asyncio.sleep(args.duration)  # idle hold: keepalive pings must be answered
        held = target.snapshot()
        progress = await pool.poll()
        results = await pool.stop()
    finally:
        pool.close()
    connected = sum(r["connected"] for r in ready)
    starts = [r["first_start_ns"] for r in ready if r["connected"]]
    ends = [r["last_done_ns"] for r in ready if r["connected"]]
    span = (max(ends) - min(starts)) / 1e9 if starts else 0.0
    metrics: dict[str, Any] = {
        "connections": connected,
        "failed": count - connected,
        "connect_rate_per_s": round(connected / span, 1) if span > 0 else None,
        "connect_span_s": round(span, 2),
        **latency_summary((s for r in ready for s in r["setup_ns"]), "setup"),
        "still_open": sum(p["open"] for p in progress),
        **_client_figures(results),
    }
    if before is not None and loaded is not None and held is not None:
        grew = loaded.total_rss_kib - before.total_rss_kib
        metrics.update(
            {
                "server_rss_before_mib": round(before.total_rss_kib / 1024, 1),
                "server_rss_loaded_mib": round(loaded.total_rss_kib / 1024, 1),
                "server_rss_per_conn_kib": round(grew / connected, 2) if connected else None,
                "server_cpu_ms_per_conn": round(
                    1000 * (loaded.total_cpu - before.total_cpu) / connected, 3
                )
                if connected
                else None,
                "server_idle_cpu_pct": cpu_percent(loaded, held),
                "server_peak_rss_mib": round(held.total_hwm_kib / 1024, 1),
            }
        )
    params = {"connections": count, "rooms": len(rooms), "source_addrs": len(srcs)}
    info = _common_info(ready, results)
    info["source_addrs"] = srcs
    return Outcome(params, metrics, info)


# -- 4: storage ------------------------------------------------------------------------------------


async def storage(args: argparse.Namespace, target: Target, point: dict[str, Any]) -> Outcome:
    """Sustained stored messages/s over many rooms; the echo to the sender is the ack.

    Closed loop (``rate`` 0): ``window`` messages in flight per connection, the most the server
    stores. Open loop (``rate`` > 0): that many messages/s offered round-robin over the rooms,
    for ack latency at a given load."""
    rooms_n = max(1, args.rooms)
    rate = float(point.get("rate", 0.0))
    _check_fds(args, target, rooms_n)
    nonce = new_nonce()
    async with Admin(
        target.http_urls[0],
        secret=target.secret,
        nonce=nonce,
        audience=target.audience,
        issuer=target.issuer,
    ) as admin:
        rooms = await admin.create_rooms(f"bench-store-{nonce:08x}", rooms_n)
    srcs = source_addresses(target.ws_urls[0], rooms_n, args.source_addrs)
    specs = [
        ConnSpec(target.ws_urls[i % len(target.ws_urls)], room, 1 + i, srcs[i % len(srcs)], 1 + i)
        for i, room in enumerate(rooms)
    ]
    entity = entity_uuid(nonce, ADMIN_ENTITY)
    parts = split(specs, args.client_procs)
    jobs = [
        _job(
            args,
            target,
            "storage",
            part,
            nonce=nonce,
            entity=entity,
            level=100,
            window=args.window,
            rate=rate * len(part) / len(specs),
            max_outstanding=256,
            max_messages=args.max_messages,
        )
        for part in parts
    ]
    pool = WorkerPool(jobs)
    try:
        ready = await pool.start(_setup_timeout(args))
        timed = await timed_phase(
            pool,
            target,
            warmup=args.warmup,
            duration=args.duration,
            drain=args.drain,
            complete=lambda p: all(x["acks"] >= x["sent"] for x in p),
        )
    finally:
        pool.close()
    acks = sum(r["acks"] for r in timed.results)
    sent = sum(r["sent"] for r in timed.results)
    metrics: dict[str, Any] = {
        "rooms": rooms_n,
        "connections": sum(r["connected"] for r in ready),
        "window": args.window,
        "offered_rate": rate,
        "skipped": sum(r.get("skipped", 0) for r in timed.results),
        "sent": sent,
        "acked": acks,
        "stored_per_s": round(sum(r["ack_seen"] for r in timed.results) / timed.window_s, 1),
        **latency_summary((s for r in timed.results for s in r["ack_samples"]), "ack"),
        **_server_figures(timed.before, timed.after, target.node_pids),
        **_client_figures(timed.results),
    }
    info = _common_info(ready, timed.results)
    if target.database_url:
        rows = await count_messages(target.database_url, rooms)
        metrics["db_rows"] = rows
        # Every ack must have a committed row behind it; rows without an ack are possible
        # only for sends cut short by the end of the run.
        metrics["acks_without_row"] = max(acks - rows, 0)
    params = {
        "db": _backend(target),
        "rooms": rooms_n,
        "window": args.window,
        "rate": rate,
        "size": args.size,
    }
    return Outcome(params, metrics, info)


# -- 5: history ------------------------------------------------------------------------------------


async def _history_room(args: argparse.Namespace, target: Target) -> tuple[int, int, int, float]:
    """The seeded room, created once per server: (room id, last seq, nonce, seconds spent).

    Readers must be of the nonce's admin entity (the room's entity rule admits them).
    """
    cached = target.cache.get("history")
    if cached is not None:
        return cached[0], cached[1], cached[2], 0.0
    url = target.database_url
    if not url:
        raise ScenarioError(
            "history needs the server's database to seed it: use --spawn-server or give "
            "--database-url (after running `python -m nanomsg migrate` on it)"
        )
    nonce = new_nonce()
    started = time.monotonic()
    async with Admin(
        target.http_urls[0],
        secret=target.secret,
        nonce=nonce,
        audience=target.audience,
        issuer=target.issuer,
    ) as admin:
        room = await admin.create_room(f"bench-history-{nonce:08x}")
    if url.startswith("sqlite://"):
        head = await asyncio.to_thread(seed_sqlite, sqlite_path(url), room, args.messages, nonce)
    else:
        head = await seed_postgres(url, room, args.messages, nonce)
    took = time.monotonic() - started
    target.cache["history"] = (room, head, nonce)
    return room, head, nonce, took


async def history(args: argparse.Namespace, target: Target, point: dict[str, Any]) -> Outcome:
    """Latest 50 of a big room, a random page deep in it, and a resume of 1 000 missed."""
    room, head, nonce, seed_s = await _history_room(args, target)
    entity = entity_uuid(nonce, ADMIN_ENTITY)
    metrics: dict[str, Any] = {"messages": head}
    if seed_s:
        metrics["seed_s"] = round(seed_s, 2)
        metrics["seed_rows_per_s"] = round(args.messages / seed_s, 1)
    info: dict[str, Any] = {"room": room}
    srcs = source_addresses(target.ws_urls[0], args.readers, args.source_addrs)
    for op in args.ops:
        specs = [
            ConnSpec(target.ws_urls[i % len(target.ws_urls)], room, 1 + i, srcs[i % len(srcs)], 0)
            for i in range(args.readers)
        ]
        jobs = [
            _job(
                args,
                target,
                "history",
                part,
                nonce=nonce,
                entity=entity,
                level=100,
                op=op,
                limit=args.limit,
                resume=args.resume,
                total=head,
                max_messages=args.max_requests,
            )
            for part in split(specs, args.client_procs)
        ]
        pool = WorkerPool(jobs)
        try:
            ready = await pool.start(_setup_timeout(args))
            timed = await timed_phase(
                pool, target, warmup=args.warmup, duration=args.duration, drain=args.drain
            )
        finally:
            pool.close()
        samples = [s for r in timed.results for s in r["samples"]]
        metrics[f"{op}_req_per_s"] = round(len(samples) / timed.window_s, 1)
        metrics.update(latency_summary(samples, op))
        metrics[f"{op}_bad_replies"] = sum(r["bad_replies"] for r in timed.results)
        srv = _server_figures(timed.before, timed.after)
        metrics[f"{op}_server_cpu_pct"] = srv["server_cpu_pct"]
        info[op] = _common_info(ready, timed.results)
    params = {
        "messages": args.messages,
        "readers": args.readers,
        "limit": args.limit,
        "resume": args.resume,
        "db": _backend(target),
    }
    return Outcome(params, metrics, info)


def _backend(target: Target) -> str:
    url = target.database_url
    if url.startswith("sqlite"):
        return "sqlite"
    if url.startswith("postgres"):
        return "postgresql"
    return "unknown"


# -- selftest: how fast the client counts ----------------------------------------------------------


def selftest(args: argparse.Namespace) -> Outcome:
    """Frames/s the scanner counts, against websockets' own parser, on identical bytes.

    Both get the same stream of server-style message frames (a typical nanomsg message frame,
    content of ``--size`` characters) cut into 64 KiB reads at arbitrary boundaries; the
    scanner is also fed one frame per ``data_received`` call, the worst case (a lightly loaded
    socket delivers each frame alone). No server, no sockets: this is the client's ceiling per
    process, to compare with the frames/s a server sends; the event loop's own cost per read
    (a few microseconds) comes on top in real runs.
    """
    import orjson
    from websockets.client import ClientProtocol
    from websockets.protocol import State
    from websockets.uri import parse_uri

    from benchmarks.wire import OPEN, BenchConn, Tally, stamped_content

    payload = orjson.dumps(
        {
            "type": "message",
            "data": {
                "content": stamped_content(1, args.size),
                "emitter": user_uuid(1, 1),
                "id": 123456,
                "room_id": 42,
                "seq": 98765,
                "entity": entity_uuid(1, 0),
                "created_at": "2026-11-23T06:45:01.257Z",
                "createdAt": "2026-11-23T06:45:01.257Z",
                "updatedAt": "2026-11-23T06:45:01.257Z",
            },
        }
    )
    head = (
        bytes((0x81, len(payload)))
        if len(payload) < 126
        else (bytes((0x81, 126)) + len(payload).to_bytes(2, "big"))
    )
    frame = head + payload
    frames = int(args.frames)
    stream = frame * frames
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

    async def scanner() -> float:
        conn = BenchConn(
            url="ws://127.0.0.1/chat",
            token="",
            room_id=1,
            tally=Tally(),
            sample_every=args.sample_every,
        )
        conn.phase = OPEN
        started = time.perf_counter()
        for chunk in chunks:
            conn.data_received(chunk)
        took = time.perf_counter() - started
        assert conn.msgs == frames, (conn.msgs, frames)
        return took

    async def scanner_single() -> float:
        conn = BenchConn(
            url="ws://127.0.0.1/chat",
            token="",
            room_id=1,
            tally=Tally(),
            sample_every=args.sample_every,
        )
        conn.phase = OPEN
        started = time.perf_counter()
        for _ in range(frames):
            conn.data_received(frame)
        took = time.perf_counter() - started
        assert conn.msgs == frames, (conn.msgs, frames)
        return took

    took_scan = asyncio.run(scanner())
    took_single = asyncio.run(scanner_single())
    ws = ClientProtocol(parse_uri("ws://127.0.0.1/chat"), state=State.OPEN, max_size=None)
    started = time.perf_counter()
    seen = 0
    for chunk in chunks:
        ws.receive_data(chunk)
        seen += len(ws.events_received())
    took_ws = time.perf_counter() - started
    assert seen == frames, (seen, frames)
    metrics = {
        "frame_bytes": len(frame),
        "frames": frames,
        "scanner_frames_per_s": round(frames / took_scan),
        "scanner_one_frame_per_read_per_s": round(frames / took_single),
        "websockets_frames_per_s": round(frames / took_ws),
        "speedup": round(took_ws / took_scan, 2),
    }
    return Outcome({"size": args.size, "sample_every": args.sample_every}, metrics)
