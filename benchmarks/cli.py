"""``python -m benchmarks <scenario> [options]``: options, runs, medians, output.

Every run prints one JSON line on standard output (and appends it to ``--json-out``), then a
human summary on standard error; after the N runs of a point (``--runs N``) a JSON line of
``"kind": "median"`` holds the median of every metric over them (written for N = 1 too).
Sweeps (``--rate 100,200,500``, ``--subscribers 100,1000``, ``--connections ...``) repeat
this for each point.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks import scenarios
from benchmarks.admin import SetupError
from benchmarks.procstat import ProcGroup
from benchmarks.runner import Target, machine
from benchmarks.scenarios import Outcome, ScenarioError
from benchmarks.servers import ServerSet
from benchmarks.stats import median_metrics

RESULTS = Path(__file__).resolve().parent / "results"
Scenario = Callable[[argparse.Namespace, Target, dict[str, Any]], Awaitable[Outcome]]

SCENARIOS: dict[str, Scenario] = {
    "fanout": scenarios.fanout,
    "chat": scenarios.chat,
    "connections": scenarios.connections,
    "storage": scenarios.storage,
    "history": scenarios.history,
    "crossnode": scenarios.fanout,
}


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    t = common.add_argument_group("target")
    t.add_argument(
        "--url",
        action="append",
        default=[],
        help="WebSocket URL ws://host:port/chat (repeat for several nodes; "
        "crossnode: the first gets the publishers, the others the receivers)",
    )
    t.add_argument(
        "--http-url",
        action="append",
        default=[],
        help="HTTP side-port URL used for setup (default http://127.0.0.1:7778)",
    )
    t.add_argument(
        "--jwt-secret",
        default=os.environ.get("NANOMSG_JWT_SECRET", ""),
        help="HS256 secret the server checks tokens with [env NANOMSG_JWT_SECRET]",
    )
    t.add_argument("--jwt-audience", default="", help="'aud' claim, if the server wants one")
    t.add_argument("--jwt-issuer", default="", help="'iss' claim, if the server wants one")
    t.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="pid of an external server, for CPU/RSS from /proc (repeatable)",
    )
    t.add_argument(
        "--database-url",
        default="",
        help="external server's database (history seeding, storage row check)",
    )
    s = common.add_argument_group("spawned server")
    s.add_argument(
        "--spawn-server",
        action="store_true",
        help="start `python -m nanomsg serve` on free ports for the run",
    )
    s.add_argument(
        "--db",
        choices=("sqlite", "postgres"),
        default=None,
        help="database of the spawned server: a fresh temp file or a fresh database "
        "(default sqlite; crossnode: postgres)",
    )
    s.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL where --db postgres creates nanomsg_bench_<hex>",
    )
    s.add_argument(
        "--redis-url",
        default=None,
        help="Redis for the spawned server(s) (crossnode default redis://127.0.0.1:6379/0)",
    )
    s.add_argument("--nodes", type=int, default=None, help="spawned server processes")
    s.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for `nanomsg serve`, e.g. --server-arg=--max-backlog=4194304",
    )
    s.add_argument(
        "--server-per-run",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fresh server for every run (default: yes, except history)",
    )
    s.add_argument("--keep-db", action="store_true", help="do not drop the PostgreSQL database")
    s.add_argument(
        "--server-log-dir",
        default="",
        help="copy the spawned servers' logs here (they live in a temp dir otherwise)",
    )
    r = common.add_argument_group("run")
    r.add_argument("--runs", type=int, default=1, help="repeat each point; report medians")
    r.add_argument("--duration", type=float, default=30.0, help="steady window, seconds")
    r.add_argument("--warmup", type=float, default=3.0, help="seconds before the window opens")
    r.add_argument("--drain", type=float, default=5.0, help="max seconds to wait for stragglers")
    r.add_argument(
        "--setup-timeout",
        type=float,
        default=600.0,
        help="max seconds for workers to open their connections",
    )
    r.add_argument(
        "--json-out",
        default=None,
        help="JSONL file to append to (default benchmarks/results/<scenario>.jsonl)",
    )
    r.add_argument("--label", default="", help="free text stored with the results")
    c = common.add_argument_group("load generator")
    c.add_argument("--client-procs", type=int, default=2, help="receiver processes")
    c.add_argument(
        "--sample-every",
        type=int,
        default=10,
        help="decode 1 message frame in K for latency (the others are only counted)",
    )
    c.add_argument(
        "--sample-cap",
        type=int,
        default=200_000,
        help="latency samples kept per process (reservoir)",
    )
    c.add_argument(
        "--source-addrs",
        type=int,
        default=0,
        help="127.0.0.x source addresses to spread connections over (0: enough)",
    )
    c.add_argument(
        "--connect-concurrency",
        type=int,
        default=200,
        help="connections being opened at once, per process",
    )
    c.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="seconds for one connection to reach CONNECTED",
    )
    c.add_argument("--size", type=int, default=64, help="message content length, characters")

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, title in (
        ("fanout", "1. one room, N subscribers, publishers at a total rate"),
        ("crossnode", "6. fan-out with publishers and receivers on other nodes"),
    ):
        p = sub.add_parser(name, parents=[common], help=title, description=title)
        p.add_argument(
            "--subscribers",
            type=_ints,
            default=[100],
            help="subscriber counts (comma list: a sweep)",
        )
        p.add_argument(
            "--rate",
            type=_floats,
            default=[1000.0],
            help="total offered messages/s (comma list: a sweep)",
        )
        p.add_argument("--publishers", type=int, default=4, help="publishing connections")
        p.add_argument(
            "--rooms-per-receiver",
            type=int,
            default=1,
            help="rooms each receiver holds: the measured room selected, the rest subscribed "
            "(quiet rooms, so the fan-out measures delivery with several subscriptions held)",
        )
        p.add_argument(
            "--max-outstanding",
            type=int,
            default=256,
            help="unacknowledged messages per publisher before it skips",
        )
    p = sub.add_parser("chat", parents=[common], help="2. many small rooms, everyone sends")
    p.add_argument("--connections", type=_ints, default=[10_000], help="comma list: a sweep")
    p.add_argument("--room-min", type=int, default=5)
    p.add_argument("--room-max", type=int, default=20)
    p.add_argument(
        "--interval", type=float, default=10.0, help="mean seconds between two messages of one user"
    )
    p.add_argument("--http-concurrency", type=int, default=32, help="setup requests at once")
    p = sub.add_parser("connections", parents=[common], help="3. idle connections: memory, rate")
    p.add_argument("--connections", type=_ints, default=[10_000], help="comma list: a sweep")
    p.add_argument("--rooms", type=int, default=100, help="rooms the connections select")
    p = sub.add_parser("storage", parents=[common], help="4. stored messages/s, ack latency")
    p.add_argument("--rooms", type=int, default=64, help="rooms, one sending connection each")
    p.add_argument(
        "--window", type=int, default=1, help="closed loop: messages in flight per connection"
    )
    p.add_argument(
        "--rate",
        type=_floats,
        default=[0.0],
        help="open loop: total offered messages/s over all rooms (comma list: a sweep; "
        "0: closed loop with --window)",
    )
    p.add_argument("--max-messages", type=int, default=10_000_000, help="stop after this many")
    p = sub.add_parser("history", parents=[common], help="5. history reads of a big room")
    p.add_argument("--messages", type=int, default=1_000_000, help="messages seeded in the room")
    p.add_argument("--readers", type=int, default=4, help="connections reading in closed loop")
    p.add_argument(
        "--ops",
        type=_words,
        default=["latest", "page", "resume"],
        help="latest: last 50; page: 50 before a random seq; resume: since=last-1000",
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--resume", type=int, default=1000, help="messages missed before a resume")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="per connection")
    p = sub.add_parser("selftest", help="client only: frames/s the scanner counts (no server)")
    p.add_argument("--frames", type=int, default=200_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--json-out", default=None)
    p.add_argument("--label", default="")
    sub.add_parser("machine", help="print the machine description (markdown) and exit")
    return parser


def _points(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.scenario in ("fanout", "crossnode"):
        return [
            {"subscribers": s, "rate": r} for s, r in itertools.product(args.subscribers, args.rate)
        ]
    if args.scenario in ("chat", "connections"):
        return [{"connections": n} for n in args.connections]
    if args.scenario == "storage":
        return [{"rate": r} for r in args.rate]
    return [{}]


class Targets:
    """Builds the target of each run: spawned servers (fresh per run, or kept) or external."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = args.jwt_secret
        self.current: Target | None = None
        self.servers: ServerSet | None = None
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    async def acquire(self) -> Target:
        if self.current is not None:
            return self.current
        args = self.args
        if not args.spawn_server:
            if not args.url:
                raise ScenarioError("give --url (and --http-url) or --spawn-server")
            if not self.secret:
                raise ScenarioError("give --jwt-secret (the server's HS256 secret)")
            self.current = Target(
                ws_urls=args.url,
                http_urls=args.http_url or ["http://127.0.0.1:7778"],
                secret=self.secret,
                audience=args.jwt_audience,
                issuer=args.jwt_issuer,
                group=ProcGroup(args.server_pid) if args.server_pid else None,
                database_url=args.database_url,
            )
            return self.current
        if not self.secret:
            self.secret = secrets.token_urlsafe(32)
        self.tmp = tempfile.TemporaryDirectory(prefix="nanomsg-bench-")
        self.servers = ServerSet(
            db=args.db,
            secret=self.secret,
            workdir=Path(self.tmp.name),
            nodes=args.nodes,
            pg_url=args.pg_url,
            redis_url=args.redis_url,
            extra_args=args.server_arg,
            keep_db=args.keep_db,
        )
        try:
            nodes = await self.servers.start()
        except BaseException:
            await self.release(final=True)
            raise
        self.current = Target(
            ws_urls=[n.ws_url for n in nodes],
            http_urls=[n.http_url for n in nodes],
            secret=self.secret,
            group=ProcGroup([n.pid for n in nodes]),
            database_url=self.servers.database_url,
            servers=self.servers,
            node_pids=[n.pid for n in nodes],
        )
        return self.current

    async def release(self, final: bool = False) -> None:
        """After a run: stop spawned servers if they are per run (or at the very end)."""
        if self.servers is None or not (final or self.args.server_per_run):
            return
        await self.servers.stop()
        self.servers = None
        self.current = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def server_info(self) -> dict[str, Any]:
        args = self.args
        if not args.spawn_server:
            return {"spawned": False, "urls": args.url, "pids": args.server_pid}
        return {
            "spawned": True,
            "db": args.db,
            "nodes": args.nodes,
            "redis": bool(args.redis_url),
            "extra_args": args.server_arg,
            "per_run": args.server_per_run,
        }


def _emit(args: argparse.Namespace, record: dict[str, Any]) -> None:
    line = orjson.dumps(record).decode()
    print(line, flush=True)
    path = Path(args.json_out) if args.json_out else RESULTS / f"{args.scenario}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def _record(
    args: argparse.Namespace, kind: str, run: int | None, outcome: Outcome, server: dict[str, Any]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "scenario": args.scenario,
        "kind": kind,
        "label": args.label,
        "run": run,
        "runs": getattr(args, "runs", 1),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "params": outcome.params,
        "metrics": outcome.metrics,
        "server": server,
        "machine": machine(),
    }
    if kind == "run" and outcome.info:
        record["info"] = outcome.info
    if kind == "run" and getattr(args, "duration", None) is not None:
        record["params"] = {
            **outcome.params,
            "duration": args.duration,
            "warmup": args.warmup,
            "client_procs": args.client_procs,
            "sample_every": args.sample_every,
        }
    return record


def summary(scenario: str, kind: str, outcome: Outcome) -> str:
    """A few human lines: the figures that matter for the scenario."""
    m = outcome.metrics

    def f(key: str, unit: str = "") -> str:
        value = m.get(key)
        if value is None:
            return "n/a"
        if isinstance(value, float) and not value.is_integer():
            return f"{value:,.3f}".rstrip("0").rstrip(".") + unit
        return f"{int(value):,}{unit}"

    def lat(prefix: str) -> str:
        return (
            f"p50 {f(prefix + '_p50_ms')} / p90 {f(prefix + '_p90_ms')} / "
            f"p99 {f(prefix + '_p99_ms')} / max {f(prefix + '_max_ms')} ms "
            f"({f(prefix + '_samples')} samples)"
        )

    head = f"[{scenario} {kind}] " + " ".join(f"{k}={v}" for k, v in outcome.params.items())
    lines = [head]
    if scenario in ("fanout", "crossnode"):
        lines += [
            f"  offered {f('offered_rate')} msg/s, sent {f('sent_per_s')} msg/s "
            f"(skipped {f('skipped_sends')}), delivered {f('delivered_per_s')} msg/s "
            f"to {f('subscribers')} subscribers, delivery ratio {f('delivery_ratio')}",
            f"  latency {lat('latency')}",
            f"  ack     {lat('ack')}",
        ]
    elif scenario == "chat":
        lines += [
            f"  {f('connections')} connections in {f('rooms')} rooms, sent {f('sent_per_s')} "
            f"msg/s, delivered {f('delivered_per_s')} msg/s, ratio {f('delivery_ratio')}",
            f"  latency {lat('latency')}",
        ]
    elif scenario == "connections":
        lines += [
            f"  {f('connections')} connected ({f('failed')} failed) at "
            f"{f('connect_rate_per_s')}/s; still open after hold {f('still_open')}",
            f"  setup   {lat('setup')}",
            f"  server RSS {f('server_rss_before_mib')} -> {f('server_rss_loaded_mib')} MiB = "
            f"{f('server_rss_per_conn_kib')} KiB/connection; "
            f"{f('server_cpu_ms_per_conn')} ms CPU/connection; idle CPU "
            f"{f('server_idle_cpu_pct')} %",
        ]
    elif scenario == "storage":
        lines += [
            f"  offered {f('offered_rate')} msg/s (0: closed loop, window {f('window')}), "
            f"skipped {f('skipped')}",
            f"  stored {f('stored_per_s')} msg/s over {f('rooms')} rooms "
            f"(acked {f('acked')}, rows {f('db_rows')}, acks without row "
            f"{f('acks_without_row')})",
            f"  ack {lat('ack')}",
        ]
    elif scenario == "history":
        for op in ("latest", "page", "resume"):
            if f"{op}_samples" in m:
                lines.append(
                    f"  {op:7s} {f(op + '_req_per_s')} req/s, {lat(op)}, "
                    f"bad replies {f(op + '_bad_replies')}"
                )
    elif scenario == "selftest":
        lines.append(
            f"  scanner {f('scanner_frames_per_s')} frames/s (64 KiB reads), "
            f"{f('scanner_one_frame_per_read_per_s')} frames/s (one frame per read); "
            f"websockets parser {f('websockets_frames_per_s')} frames/s "
            f"(scanner x{f('speedup')}); {f('frame_bytes')} B frames"
        )
    nodes = sorted(k for k in m if k.startswith("server_cpu_pct_node"))
    if nodes:
        lines.append(
            "  per node CPU: "
            + ", ".join(f"node{k.removeprefix('server_cpu_pct_node')} {f(k, ' %')}" for k in nodes)
            + " (node0 holds the publishers)"
        )
    if scenario not in ("selftest", "history") and "server_cpu_pct" in m:
        lines.append(
            f"  server CPU {f('server_cpu_pct', ' %')} RSS {f('server_rss_mib', ' MiB')}; "
            f"load generator busiest process {f('client_cpu_pct_max', ' %')}"
        )
    return "\n".join(lines)


def _apply_defaults(args: argparse.Namespace) -> None:
    scenario = args.scenario
    if args.db is None:
        args.db = "postgres" if scenario == "crossnode" else "sqlite"
    if args.nodes is None:
        args.nodes = 2 if scenario == "crossnode" else 1
    if args.redis_url is None:
        args.redis_url = "redis://127.0.0.1:6379/0" if scenario == "crossnode" else ""
    if args.server_per_run is None:
        args.server_per_run = scenario != "history"
    if args.spawn_server and args.nodes > 1 and not args.redis_url:
        raise ScenarioError("several spawned nodes need --redis-url to relay between them")
    if scenario == "crossnode" and not args.spawn_server and len(args.url) < 2:
        raise ScenarioError("crossnode needs two --url (publishers' node, receivers' node)")


async def _amain(args: argparse.Namespace) -> int:
    fn = SCENARIOS[args.scenario]
    targets = Targets(args)
    try:
        for point in _points(args):
            outcomes: list[Outcome] = []
            for run in range(args.runs):
                target = await targets.acquire()
                server = targets.server_info()
                try:
                    outcome = await fn(args, target, point)
                    if targets.servers is not None:
                        outcome.info["server_log"] = targets.servers.log_issues()
                except (ScenarioError, SetupError):
                    raise
                except Exception:
                    if targets.servers is not None:
                        print(targets.servers.log_tail(), file=sys.stderr)
                    raise
                finally:
                    if targets.servers is not None and args.server_log_dir:
                        tag = f"{args.scenario}-{int(time.time())}-run{run}"
                        targets.servers.copy_logs(Path(args.server_log_dir), tag)
                    await targets.release()
                outcomes.append(outcome)
                _emit(args, _record(args, "run", run, outcome, server))
                print(
                    summary(args.scenario, f"run {run + 1}/{args.runs}", outcome),
                    file=sys.stderr,
                    flush=True,
                )
            # Always a median line (of one run, it repeats that run), so that readers of the
            # JSONL never have to special-case single runs.
            median = Outcome(outcomes[-1].params, median_metrics([o.metrics for o in outcomes]))
            _emit(args, _record(args, "median", None, median, targets.server_info()))
            if args.runs > 1:
                print(
                    summary(args.scenario, f"median of {args.runs}", median),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await targets.release(final=True)
    return 0


def machine_markdown() -> str:
    info = machine()
    free = ""
    try:
        import subprocess

        free = subprocess.run(["free", "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    return (
        f"- CPU: {info['cpu_model']}, {info['nproc']} cores available (nproc)\n"
        f"- memory: {info['mem_gib']} GiB\n"
        f"- kernel {info['kernel']}, Python {info['python']}\n"
        f"- load average (1 min) when read: {info['loadavg_1m']}\n"
        + ("\n```\n$ free -h\n" + free + "```\n" if free else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scenario == "machine":
        print(machine_markdown())
        return 0
    if args.scenario == "selftest":
        outcome = scenarios.selftest(args)
        args.runs = 1
        _emit(args, _record(args, "run", 0, outcome, {"spawned": False}))
        print(summary("selftest", "run", outcome), file=sys.stderr)
        return 0
    try:
        _apply_defaults(args)
        started = time.monotonic()
        code = asyncio.run(_amain(args))
        print(f"# done in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return code
    except (ScenarioError, SetupError) as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks: interrupted; spawned servers were stopped", file=sys.stderr)
        return 130
