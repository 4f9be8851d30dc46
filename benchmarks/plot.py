"""Render PNG plots from the JSONL results: ``python -m benchmarks.plot [--results DIR]``.

One PNG per scenario found in ``DIR/<scenario>.jsonl`` (default ``benchmarks/results``),
written next to it as ``DIR/<scenario>.png``:

- fanout, crossnode: latency p50/p90/p99 against offered rate (one colour per subscriber
  count), and delivered msgs/s against the ideal offered x subscribers;
- chat: latency percentiles and server CPU against connections;
- connections: server RSS per connection and connect rate against connections;
- storage: ack latency percentiles and stored msgs/s per database;
- history: latency percentiles per operation (latest 50, deep page, resume).

For every distinct point (the record's ``params`` apart from run bookkeeping) the most recent
``median`` record is used, or the most recent run when the point was run once. Matplotlib
runs on the Agg backend (no display needed); install it with ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.records import RESULTS, load, points, variant

if TYPE_CHECKING:
    from matplotlib.axes import Axes

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as exc:
    # Only drawing needs matplotlib; main() says so in one line instead of a traceback, and
    # the tables (benchmarks.report) never import it.
    MISSING: str | None = f"matplotlib cannot be imported ({exc})"
else:
    MISSING = None

PCTS = ("p50", "p90", "p99")
STYLES = {"p50": "-", "p90": "--", "p99": ":"}


def _title(ax: Axes, text: str, records: Sequence[dict[str, Any]]) -> None:
    # A label names the whole plot only when every point has it; mixed plots name their
    # labelled series in the legend instead (plot_fanout).
    labels = {r.get("label") or "" for r in records}
    machine = records[0].get("machine", {}) if records else {}
    sub = f"{machine.get('cpu_model', '')}, {machine.get('nproc', '?')} cores"
    if len(labels) == 1 and "" not in labels:
        sub = f"{labels.pop()} | {sub}"
    ax.set_title(f"{text}\n{sub}", fontsize=9)


def _m(record: dict[str, Any], key: str) -> float | None:
    value = record.get("metrics", {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def plot_fanout(records: list[dict[str, Any]], out: Path, name: str) -> None:
    pts = points(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    groups = sorted({(variant(r), int(r["params"].get("subscribers", 0))) for r in pts})
    palette = [f"C{i}" for i in range(10)]
    for colour, (label, subs) in zip(palette * 10, groups, strict=False):
        rows = sorted(
            (
                r
                for r in pts
                if int(r["params"].get("subscribers", 0)) == subs and variant(r) == label
            ),
            key=lambda r: float(r["params"].get("rate", 0)),
        )
        rates = [float(r["params"]["rate"]) for r in rows]
        name_ = f"{subs} subs" + (f" ({label})" if label else "")
        for pct in PCTS:
            ys = [_m(r, f"latency_{pct}_ms") for r in rows]
            left.plot(rates, ys, STYLES[pct], marker="o", color=colour, label=f"{name_} {pct}")
        right.plot(
            rates,
            [_m(r, "delivered_per_s") for r in rows],
            "-o",
            color=colour,
            label=f"{name_} delivered",
        )
        right.plot(
            rates,
            [x * subs for x in rates],
            ":",
            color=colour,
            alpha=0.6,
            label=f"{name_} ideal",
        )
    left.set_xlabel("offered messages/s (all publishers)")
    left.set_ylabel("send -> receive latency, ms")
    left.set_yscale("log")
    left.legend(fontsize=7)
    _title(left, f"{name}: latency percentiles vs offered load", pts)
    right.set_xlabel("offered messages/s")
    right.set_ylabel("frames delivered to subscribers / s")
    right.legend(fontsize=7)
    _title(right, f"{name}: delivered vs ideal", pts)
    _save(fig, out)


def plot_by_connections(records: list[dict[str, Any]], out: Path, name: str) -> None:
    pts = sorted(points(records), key=lambda r: int(r["params"].get("connections", 0)))
    xs = [int(r["params"].get("connections", 0)) for r in pts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    if name == "chat":
        for pct in PCTS:
            left.plot(
                xs, [_m(r, f"latency_{pct}_ms") for r in pts], STYLES[pct], marker="o", label=pct
            )
        left.set_ylabel("send -> receive latency, ms")
        right.plot(xs, [_m(r, "server_cpu_pct") for r in pts], "-o", label="server CPU %")
        right.plot(
            xs,
            [_m(r, "client_cpu_pct_max") for r in pts],
            "--o",
            label="busiest load-generator process CPU %",
        )
        right.set_ylabel("CPU, % of one core")
        _title(left, "chat: latency vs connections", pts)
        _title(right, "chat: CPU vs connections", pts)
    else:
        left.plot(xs, [_m(r, "server_rss_per_conn_kib") for r in pts], "-o")
        left.set_ylabel("server RSS per connection, KiB")
        right.plot(xs, [_m(r, "connect_rate_per_s") for r in pts], "-o")
        right.set_ylabel("connect + auth + select per second")
        _title(left, "connections: memory per idle connection", pts)
        _title(right, "connections: setup rate", pts)
    for ax in (left, right):
        ax.set_xlabel("connections")
        ax.set_xscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, out)


def _bars(ax: Axes, groups: list[str], series: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v or 0 for v in values], width, label=label)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.legend(fontsize=8)


def plot_storage(records: list[dict[str, Any]], out: Path, name: str) -> None:
    pts = points(records)
    pts = sorted(
        pts,
        key=lambda r: (str(r["params"].get("db")), float(r["params"].get("rate") or 0)),
    )

    def offered(r: dict[str, Any]) -> str:
        rate = float(r["params"].get("rate") or 0)
        if rate > 0:
            return f"{rate:,.0f}/s offered"
        return f"closed, window {r['params'].get('window')}"

    groups = [
        "\n".join((str(r["params"].get("db")), f"{r['params'].get('rooms')} rooms", offered(r)))
        for r in pts
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(12.0, 1.6 * len(groups)), 5.2))
    _bars(left, groups, {p: [_m(r, f"ack_{p}_ms") for r in pts] for p in PCTS})
    left.set_ylabel("ack (echo after commit) latency, ms")
    left.set_yscale("log")
    _title(left, "storage: ack latency", pts)
    _bars(right, groups, {"stored msgs/s": [_m(r, "stored_per_s") for r in pts]})
    right.set_ylabel("messages stored and acknowledged / s")
    _title(right, "storage: sustained rate", pts)
    _save(fig, out)


def plot_history(records: list[dict[str, Any]], out: Path, name: str) -> None:
    pts = points(records)
    groups: list[str] = []
    series: dict[str, list[float | None]] = {p: [] for p in PCTS}
    for r in pts:
        for op in ("latest", "page", "resume"):
            if _m(r, f"{op}_p50_ms") is None:
                continue
            params = r["params"]
            groups.append(f"{op}\n{params.get('db')}\n{int(params.get('messages', 0)):,} msgs")
            for p in PCTS:
                series[p].append(_m(r, f"{op}_{p}_ms"))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.5 * len(groups)), 5.2))
    _bars(ax, groups, series)
    ax.set_ylabel("request -> last frame latency, ms")
    ax.set_yscale("log")
    _title(ax, "history: latest 50 / random page of 50 / resume of 1 000", pts)
    _save(fig, out)


def _save(fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


PLOTTERS = {
    "fanout": plot_fanout,
    "crossnode": plot_fanout,
    "chat": plot_by_connections,
    "connections": plot_by_connections,
    "storage": plot_storage,
    "history": plot_history,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of *.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG directory (default: same)")
    parser.add_argument("--label", default=None, help="only records with this --label")
    args = parser.parse_args(argv)
    if MISSING is not None:
        print(
            f"benchmarks.plot: no plots drawn: {MISSING}; install it with "
            "pip install -e '.[bench]' (the tables of python -m benchmarks.report need no plots)",
            file=sys.stderr,
        )
        return 1
    out_dir = args.out or args.results
    out_dir.mkdir(parents=True, exist_ok=True)
    made = 0
    for scenario, plotter in PLOTTERS.items():
        path = args.results / f"{scenario}.jsonl"
        if not path.exists():
            continue
        records = load(path, args.label)
        if records:
            plotter(records, out_dir / f"{scenario}.png", scenario)
            made += 1
    if not made:
        print(f"no results in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
