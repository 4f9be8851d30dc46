"""The benchmark tools run where matplotlib is not installed: the tables need only the standard
library, and the plotter says in one line why it draws nothing.

Each test runs the module in a subprocess in which ``import matplotlib`` fails, whether or not
matplotlib is installed on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0

# Runs ``python -m MODULE ARGS`` with matplotlib made unimportable (None in sys.modules makes
# every ``import matplotlib`` raise ModuleNotFoundError).
WITHOUT_MATPLOTLIB = (
    "import runpy, sys\n"
    "sys.modules['matplotlib'] = None\n"
    "module = sys.argv[1]\n"
    "sys.argv = [module, *sys.argv[2:]]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def run_without_matplotlib(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def write_fanout_results(directory: Path) -> None:
    record = {
        "scenario": "fanout",
        "kind": "median",
        "label": "",
        "runs": 3,
        "params": {"subscribers": 10, "rate": 5.0, "duration": 1.0},
        "metrics": {"subscribers": 10, "offered_rate": 5.0, "delivered_per_s": 49.5},
        "server": {"db": "sqlite"},
    }
    (directory / "fanout.jsonl").write_text(json.dumps(record) + "\n")


def test_report_prints_its_tables_without_matplotlib(tmp_path: Path) -> None:
    write_fanout_results(tmp_path)
    done = run_without_matplotlib("benchmarks.report", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "### fanout" in done.stdout
    assert "| sqlite | 10 | 5 | n/a | 49.5 |" in done.stdout
    assert done.stderr == ""


def test_plot_without_matplotlib_exits_1_with_one_line_saying_why(tmp_path: Path) -> None:
    write_fanout_results(tmp_path)
    done = run_without_matplotlib("benchmarks.plot", "--results", str(tmp_path))
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "no plots drawn: matplotlib cannot be imported" in lines[0]
    assert "pip install -e '.[bench]'" in lines[0]
    assert list(tmp_path.glob("*.png")) == []
