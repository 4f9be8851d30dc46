"""The JSONL results and the choice of one record per point, shared by the plots
(``benchmarks.plot``) and the tables (``benchmarks.report``).

Kept apart from ``plot.py`` so that the tables need nothing but the standard library:
matplotlib (the ``bench`` extra) is only needed to draw PNGs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BOOKKEEPING = {"duration", "warmup", "client_procs", "sample_every"}


def load(path: Path, label: str | None = None) -> list[dict[str, Any]]:
    """The records of one JSONL file (optionally only those with ``label``)."""
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if label is None or record.get("label") == label:
            records.append(record)
    return records


def _key(record: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What makes a point: its parameters, the label (a variant of the same command, e.g. on
    another database) and the spawned server's database."""
    params = record.get("params", {})
    key = [(k, v) for k, v in params.items() if k not in BOOKKEEPING]
    key.append(("label", record.get("label") or ""))
    key.append(("server_db", (record.get("server") or {}).get("db")))
    return tuple(sorted(key, key=lambda kv: kv[0]))


def variant(record: dict[str, Any]) -> str:
    """A short name for a point's label, shown in legends and tables ("" when unlabelled)."""
    return str(record.get("label") or "")


def points(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per distinct point: the latest median, else the latest run."""
    best: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
    for record in records:
        key = _key(record)
        current = best.get(key)
        is_median = record.get("kind") == "median"
        if current is None or is_median or current.get("kind") != "median":
            best[key] = record
    return list(best.values())
