"""The benchmark's results: table rows, the Markdown table, the JSON report and its machine."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.processes import ROOT

if TYPE_CHECKING:
    from datetime import datetime

    from bench.config import Config


@dataclass
class Row:
    """One line of the table."""

    id: str
    name: str
    baseline: str
    figure: str
    ratio: float | None
    ratio_text: str
    target: str
    result: str  # pass, FAIL, pending, info
    values: dict[str, Any] = field(default_factory=dict)


def verdict(ok: bool) -> str:
    """The result word for a target check."""
    return "pass" if ok else "FAIL"


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def noise(raw: dict[str, Any]) -> list[float]:
    """Cores used by processes outside the benchmark, per measured window."""
    found: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if "foreign_cores" in value:
                found.append(value["foreign_cores"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(raw)
    return found


def table(rows: list[Row]) -> str:
    """The Markdown table."""
    lines = [
        "| # | measure | baseline | SIA | ratio | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.id} | {r.name} | {r.baseline} | {r.figure} | {r.ratio_text} | {r.target} "
            f"| {r.result} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    versions: dict[str, str | None] = {}
    for package in ("grpcio", "protobuf", "aiohttp", "orjson", "structlog", "uvloop"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def git_state() -> dict[str, Any]:
    """The commit measured and whether the tree had changes."""
    git = shutil.which("git")
    if git is None:
        return {"commit": None, "src_modified": None}
    try:
        commit = subprocess.run(  # noqa: S603 - git, found on PATH, fixed arguments
            [git, "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603
            [git, "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "src_modified": None}
    return {"commit": commit, "src_modified": bool(dirty)}


@dataclass
class Report:
    """Everything `--out` receives, and the footer printed under the table."""

    cfg: Config
    rows: list[Row]
    raw: dict[str, Any]
    redis_note: str
    taken_at: datetime
    elapsed: float
    load_before: tuple[float, float, float]
    machine: dict[str, Any] = field(default_factory=machine)

    @property
    def all_met(self) -> bool:
        """Whether every row with a target check passed."""
        return all(r.result == "pass" for r in self.rows if r.result in ("pass", "FAIL"))

    def as_json(self) -> dict[str, Any]:
        """The results file's content (schema 1)."""
        foreign = noise(self.raw)
        return {
            "schema": 1,
            "taken_at": self.taken_at.isoformat(timespec="seconds"),
            "duration_s": round(self.elapsed, 1),
            "machine": self.machine,
            "git": git_state(),
            "config": dataclasses.asdict(self.cfg),
            "load_average": {"before": self.load_before, "after": os.getloadavg()},
            "noise": {
                "foreign_cores_median": median(foreign),
                "foreign_cores_max": max(foreign, default=0.0),
            },
            "redis": self.redis_note,
            "all_met": self.all_met,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "raw": self.raw,
        }

    def footer(self, out: Path) -> str:
        """The lines under the table: the machine, the run and whether every target was met."""
        m, cfg, foreign = self.machine, self.cfg, noise(self.raw)
        return (
            f"{m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}; "
            f"{cfg.reps} repetitions, medians; fake upstreams at niceness {cfg.upstream_nice}; "
            f"{self.elapsed:.0f} s. Other processes used a median of "
            f"{median(foreign):.2f} cores (max {max(foreign, default=0.0):.2f}) while measuring.\n"
            f"{'every target met' if self.all_met else 'NOT every target met'}; wrote {out}"
        )
