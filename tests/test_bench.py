"""The benchmark harness: its smoke run end to end, `bench.ab`, and the pieces that need no servers.

Only the shape of the report is checked, never the figures: they depend on
the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.processes import Fleet
from bench.profiling import summarize
from bench.report import Row, noise, table
from sia.config import without_settings

ROOT = Path(__file__).resolve().parent.parent
ROW_IDS = {
    "1",
    "1f",
    "1k",
    "1r",
    "2",
    "2k",
    "3",
    "4a",
    "4b",
    "5a",
    "5b",
    "5c",
    "6a",
    "6b",
    "6c",
    "6d",
    "7a",
    "7b",
    "7c",
    "7d",
    "8a",
    "8b",
}
RESULTS = {"pass", "FAIL", "pending", "skipped", "info"}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_smoke_run_writes_a_complete_report(tmp_path: Path) -> None:
    """`python -m bench.run --smoke` exits 0, prints the table and writes every row."""
    out = tmp_path / "smoke.json"
    env = without_settings(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| # | measure |" in proc.stdout
    assert "fake upstreams at niceness 19" in proc.stdout

    report = json.loads(out.read_text())
    assert report["schema"] == 1
    assert {"nproc", "cpu", "memory_gib", "python"} <= report["machine"].keys()
    assert report["config"]["upstream_nice"] == 19  # the upstream takes only idle CPU
    rows = {row["id"]: row for row in report["rows"]}
    assert rows.keys() == ROW_IDS
    for row in rows.values():
        assert row["result"] in RESULTS
        assert {"name", "baseline", "figure", "ratio", "target"} <= row.keys()
    for key in (
        "throughput",
        "latency",
        "large",
        "burst",
        "burst_rss_after",
        "async",
        "streams",
        "rest",
        "cli_startup",
    ):
        assert key in report["raw"]
    assert rows["6b"]["result"] == "skipped"  # the smoke run leaves Redis out


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ab_runs_both_sides_and_reports_the_difference() -> None:
    """`python -m bench.ab` with one pair and a short window prints both sides and B's delta."""
    env = without_settings(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--b-src", "src", "--b-env", "LOG_LEVEL=info",
         "--pairs", "1", "--duration", "0.3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("A (this tree): CPU per call ")
    assert lines[1].startswith("B: CPU per call ")
    assert lines[2].startswith("B against A: CPU per call ")


def test_ab_needs_a_side_b() -> None:
    """Without --b-src or --b-env there is nothing to compare: a usage error."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "give side B" in proc.stderr


def test_fake_upstream_runs_at_the_niceness_asked(tmp_path: Path) -> None:
    """`--upstream-nice N` starts the fake upstreams at niceness N."""
    fleet = Fleet(tmp_path)
    try:
        fake = fleet.fake("fake", nice=10)
        fake.wait_ready("fake_ark_listening")
        assert os.getpriority(os.PRIO_PROCESS, fake.pid) == 10
    finally:
        fleet.stop()


def test_noise_collects_every_windows_foreign_cores() -> None:
    """`noise` finds `foreign_cores` at any depth of the raw results, in order."""
    raw = {"a": [{"foreign_cores": 0.2}, {"b": {"foreign_cores": 0.7, "x": 1}}], "c": "text"}
    assert noise(raw) == [0.2, 0.7]


def test_table_prints_one_markdown_line_per_row() -> None:
    """`table` writes the header and each row's cells in the column order."""
    row = Row("1", "throughput", "echo 10 calls/s", "5 calls/s", 0.5, "0.50", ">= 0.45", "pass")
    lines = table([row]).splitlines()
    assert lines[0] == "| # | measure | baseline | SIA | ratio | target | result |"
    assert lines[2] == "| 1 | throughput | echo 10 calls/s | 5 calls/s | 0.50 | >= 0.45 | pass |"


def test_profile_summary_counts_only_the_event_loop_thread(tmp_path: Path) -> None:
    """Idle samples are set apart, other threads ignored, busy time split by component."""
    loop = "MainThread;Runner.run (asyncio/runners.py:118)"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"{loop};EpollSelector.select (selectors.py:468) 6\n"
        f"{loop};handle (sia/rpc/servicer.py:10);dumps (orjson) 3\n"
        f"{loop} 1\n"
        "Thread-1;work (threading.py:1) 100\n"
    )
    summary = summarize(raw).splitlines()
    assert summary[0] == "10 samples of the event loop thread, 4 busy"
    assert " 75.0%  json, base64" in summary
    assert " 25.0%  native: event loop, grpc core, or idle" in summary
    assert " 75.0%  handle (sia/rpc/servicer.py:10)" in summary
