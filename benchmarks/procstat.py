"""Server-side resource figures read from /proc: CPU time and resident memory per process.

``/proc/<pid>/stat`` fields 14 and 15 (utime, stime, in clock ticks) give CPU time;
``/proc/<pid>/status`` gives ``VmRSS`` (resident now) and ``VmHWM`` (peak resident). A
``ProcGroup`` follows a set of root pids and their descendants (a ``--workers`` supervisor's
children included), so the figures cover the whole server however it is started.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` in KiB, or None when the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None
    return rss, hwm


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scans /proc; fine at the rate we sample)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds and memory of every process of a group at one instant."""

    wall: float
    cpu: dict[int, float]
    rss_kib: dict[int, int]
    hwm_kib: dict[int, int]

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu.values())

    @property
    def total_rss_kib(self) -> int:
        return sum(self.rss_kib.values())

    @property
    def total_hwm_kib(self) -> int:
        return sum(self.hwm_kib.values())


class ProcGroup:
    """The server processes of a run: root pids and, at each snapshot, their descendants."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)

    def members(self) -> list[int]:
        seen: list[int] = []
        todo = list(self.pids)
        while todo:
            pid = todo.pop()
            if pid in seen or not os.path.exists(f"/proc/{pid}"):
                continue
            seen.append(pid)
            todo.extend(children(pid))
        return seen

    def snapshot(self) -> Snapshot:
        cpu: dict[int, float] = {}
        rss: dict[int, int] = {}
        hwm: dict[int, int] = {}
        for pid in self.members():
            c = cpu_seconds(pid)
            m = memory_kib(pid)
            if c is None or m is None:
                continue
            cpu[pid], (rss[pid], hwm[pid]) = c, m
        return Snapshot(wall=time.time(), cpu=cpu, rss_kib=rss, hwm_kib=hwm)


def cpu_percent(before: Snapshot, after: Snapshot) -> float | None:
    """CPU use between two snapshots, in percent of one core (200 = two cores busy)."""
    elapsed = after.wall - before.wall
    if elapsed <= 0:
        return None
    used = sum(after.cpu.get(pid, 0.0) - c for pid, c in before.cpu.items() if pid in after.cpu)
    return round(100 * used / elapsed, 1)
