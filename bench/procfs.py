"""Readings from /proc: a process's CPU and memory, the machine's busy time, a measured window.

The load driver reads them at the edges of each measured window, so the
figures cover exactly the calls counted.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def busy_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS


class Window:
    """CPU accounting over a measured window: the server's, ours and everyone else's."""

    def __init__(self, server_pid: int | None, watch: list[int]) -> None:
        self.server_pid = server_pid
        self.pids = sorted({*watch, *([server_pid] if server_pid else [])})

    def _ours(self) -> float:
        total = time.process_time()
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def open(self) -> None:
        """Mark the start of the window."""
        self.t0 = time.perf_counter()
        self.server0 = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        self.client0 = time.process_time()
        self.busy0, self.ours0 = busy_seconds(), self._ours()
        self.pid0 = {}
        for pid in self.pids:
            with contextlib.suppress(OSError):
                self.pid0[pid] = cpu_seconds(pid)

    def close(self) -> dict[str, Any]:
        """Figures for the window since open()."""
        elapsed = time.perf_counter() - self.t0
        server = cpu_seconds(self.server_pid) - self.server0 if self.server_pid else 0.0
        foreign = (busy_seconds() - self.busy0) - (self._ours() - self.ours0)
        per_pid: dict[str, float] = {}
        for pid, before in self.pid0.items():
            with contextlib.suppress(OSError):
                per_pid[str(pid)] = (cpu_seconds(pid) - before) / elapsed
        return {
            "cores_by_pid": per_pid,
            "elapsed_s": elapsed,
            "server_cpu_s": server,
            "client_cpu_s": time.process_time() - self.client0,
            # Cores used by processes outside the benchmark: the noise indicator.
            "foreign_cores": max(0.0, foreign) / elapsed if elapsed else 0.0,
        }


def rss(pid: int) -> int:
    """Current RSS of a process in bytes."""
    return memory(pid).get("VmRSS", 0)
