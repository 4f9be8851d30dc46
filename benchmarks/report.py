"""Markdown tables of the key figures from JSONL results, for pasting into BENCHMARKS.md:
``python -m benchmarks.report [--results DIR] [--label L]``.

Uses the same point selection as the plots (latest ``median`` record per point, else the
latest run), so the tables and the PNGs always show the same numbers. Nothing is computed
here that the harness did not measure: every cell is a field of a result line. Needs only the
standard library: matplotlib (for the PNGs of ``benchmarks.plot``) is not imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.records import RESULTS, load, points, variant

COLUMNS: dict[str, list[tuple[str, str]]] = {
    "fanout": [
        ("subscribers", "subs"),
        ("offered_rate", "offered msg/s"),
        ("sent_per_s", "sent msg/s"),
        ("delivered_per_s", "delivered msg/s"),
        ("delivery_ratio", "delivery ratio"),
        ("latency_p50_ms", "p50 ms"),
        ("latency_p90_ms", "p90 ms"),
        ("latency_p99_ms", "p99 ms"),
        ("latency_max_ms", "max ms"),
        ("server_cpu_pct", "server CPU %"),
        ("client_cpu_pct_max", "busiest client proc CPU %"),
    ],
    "chat": [
        ("connections", "connections"),
        ("rooms", "rooms"),
        ("sent_per_s", "sent msg/s"),
        ("delivered_per_s", "delivered msg/s"),
        ("delivery_ratio", "delivery ratio"),
        ("latency_p50_ms", "p50 ms"),
        ("latency_p90_ms", "p90 ms"),
        ("latency_p99_ms", "p99 ms"),
        ("latency_max_ms", "max ms"),
        ("server_cpu_pct", "server CPU %"),
        ("server_rss_mib", "server RSS MiB"),
    ],
    "connections": [
        ("connections", "connections"),
        ("failed", "failed"),
        ("connect_rate_per_s", "connect+auth+select /s"),
        ("setup_p50_ms", "setup p50 ms"),
        ("setup_p99_ms", "setup p99 ms"),
        ("server_rss_per_conn_kib", "server RSS KiB/conn"),
        ("server_cpu_ms_per_conn", "server CPU ms/conn"),
        ("server_idle_cpu_pct", "idle server CPU %"),
        ("still_open", "still open after hold"),
    ],
    "storage": [
        ("rooms", "rooms"),
        ("offered_rate", "offered msg/s (0: closed loop)"),
        ("window", "in flight per conn (closed loop)"),
        ("stored_per_s", "stored msg/s"),
        ("ack_p50_ms", "ack p50 ms"),
        ("ack_p90_ms", "ack p90 ms"),
        ("ack_p99_ms", "ack p99 ms"),
        ("ack_max_ms", "ack max ms"),
        ("acks_without_row", "acks without row"),
        ("server_cpu_pct", "server CPU %"),
    ],
    "selftest": [
        ("frame_bytes", "frame bytes"),
        ("scanner_frames_per_s", "scanner frames/s (64 KiB reads)"),
        ("scanner_one_frame_per_read_per_s", "scanner frames/s (1 frame/read)"),
        ("websockets_frames_per_s", "websockets parser frames/s"),
    ],
}
COLUMNS["crossnode"] = [
    *COLUMNS["fanout"][:-1],
    ("server_cpu_pct_node0", "node0 CPU %"),
    ("server_cpu_pct_node1", "node1 CPU %"),
]
HISTORY_OPS = (
    ("latest", "latest 50"),
    ("page", "50 before a random seq"),
    ("resume", "resume of 1 000"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int | float):
        return f"{int(value):,}"
    return str(value)


def table(scenario: str, records: list[dict[str, Any]]) -> str:
    pts = points(records)
    if scenario == "history":
        head = ["db", "messages", "operation", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"]
        rows = []
        for r in pts:
            m = r["metrics"]
            for op, title in HISTORY_OPS:
                if f"{op}_p50_ms" not in m:
                    continue
                rows.append(
                    [
                        str(r["params"].get("db")),
                        _cell(m.get("messages")),
                        title,
                        *(
                            _cell(m.get(f"{op}_{k}"))
                            for k in ("req_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")
                        ),
                    ]
                )
    else:
        cols = COLUMNS[scenario]
        head = [title for _, title in cols]
        if scenario == "storage":
            head = ["db", *head]
        rows = []
        for r in pts:
            row = [_cell(r["metrics"].get(key)) for key, _ in cols]
            if scenario == "storage":
                row = [str(r["params"].get("db")), *row]
            rows.append(row)
        if scenario in ("fanout", "crossnode", "chat", "connections"):
            head = ["db", *head]
            rows = [
                [str((r.get("server") or {}).get("db", "?")), *row]
                for r, row in zip(pts, rows, strict=True)
            ]
        if any(variant(r) for r in pts):
            head = ["label", *head]
            rows = [[variant(r) or "-", *row] for r, row in zip(pts, rows, strict=True)]
    kinds = sorted({str(r.get("kind")) for r in pts})
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"({', '.join(kinds)} records; runs per point: "
        f"{', '.join(sorted({str(r.get('runs')) for r in pts}))})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--label", default=None)
    args = parser.parse_args(argv)
    for scenario in (
        "selftest",
        "fanout",
        "chat",
        "connections",
        "storage",
        "history",
        "crossnode",
    ):
        path = args.results / f"{scenario}.jsonl"
        if not path.exists():
            continue
        records = load(path, args.label)
        if records:
            print(f"### {scenario}\n\n{table(scenario, records)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
