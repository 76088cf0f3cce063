"""Issue 6.7: the results writer is SIGKILLed 50 times mid-write while the leaderboard reads.

A subprocess rewrites ``sweep/trials.parquet`` in a loop through ``sweeper.results.write_table``
(temp file, fsync, rename), alternating two different tables; the test kills it at random moments.
Meanwhile a reader thread loads and renders the leaderboard as fast as it can, and the
``sweeper leaderboard`` CLI runs a few times: every read sees table 1 or table 2, whole, never an
error or a mix.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from sweeper import artifacts, leaderboard, results
from tests.conftest import ROOT

WRITER = Path(__file__).with_name("_results_writer.py")
sys.path.insert(0, str(WRITER.parent))
import _results_writer  # noqa: E402
import pytest

sys.path.remove(str(WRITER.parent))


def _version(rows: list[dict]) -> int:
    versions = {r["trial_id"].split("_")[0] for r in rows}
    assert len(versions) == 1, f"a mixed table: {sorted(versions)}"
    v = int(versions.pop()[1:])
    want = _results_writer.TABLES[v]
    assert len(rows) == len(want), f"table {v} has {len(rows)} rows, expected {len(want)}"
    assert rows[-1]["trial_id"] == want[-1]["trial_id"] and rows[-1]["best"] == want[-1]["best"]
    return v


class Reader(threading.Thread):
    def __init__(self, sweep_dir: Path):
        super().__init__(daemon=True)
        self.sweep_dir, self.stop, self.errors, self.seen = sweep_dir, threading.Event(), [], {1: 0, 2: 0}

    def run(self):
        while not self.stop.is_set():
            try:
                rows, extra = leaderboard.load(self.sweep_dir)
                self.seen[_version(rows)] += 1
                if sum(self.seen.values()) % 10 == 0:
                    leaderboard.render(self.sweep_dir, rows, extra, limit=5, console=Console(file=io.StringIO(), width=200))
            except BaseException as e:  # noqa: BLE001 - every failure is a test failure
                self.errors.append(f"{type(e).__name__}: {e}")


def _cli_leaderboard(sweep_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "sweeper", "leaderboard", str(sweep_dir), "--json", "--limit", "1"],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow  # ~60 s: CI runs it in its slow pass
def test_50_kills_of_the_results_writer_while_the_leaderboard_reads(tmp_path):
    sweep_dir = tmp_path / "s-0000000000"
    (sweep_dir / "sweep").mkdir(parents=True)
    target = sweep_dir / "sweep" / results.TRIALS
    results.write_table(target, _results_writer.TABLES[1])  # the leaderboard needs a table to exist
    reader = Reader(sweep_dir)
    reader.start()
    rng = random.Random(7)
    kills, mid_write, cli_runs, t0 = 50, 0, [], time.monotonic()
    stale: set = set()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        for i in range(kills):
            w = subprocess.Popen([sys.executable, str(WRITER), str(sweep_dir)], stdout=subprocess.PIPE, env=env)
            assert w.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(w.pid, signal.SIGKILL)
            assert w.wait(timeout=30) == -signal.SIGKILL
            w.stdout.close()
            now = set((sweep_dir / "sweep").glob(f".{results.TRIALS}.*.tmp"))
            mid_write += bool(now - stale)  # this kill left a new temp file: it landed mid-write
            stale = now
            _version(results.read_rows(target))  # right after the kill: whole
            if i % 10 == 0:
                cli_runs.append(_cli_leaderboard(sweep_dir))
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    assert reader.errors == [], reader.errors[:5]
    assert sum(reader.seen.values()) > kills, reader.seen
    for r in cli_runs:
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        assert len(out["trials"]) == 1 and out["trials"][0]["trial_id"].startswith(("v1_", "v2_"))
    leftovers = list((sweep_dir / "sweep").glob(f".{results.TRIALS}.*.tmp"))
    print(f"\n{kills} writer kills in {time.monotonic() - t0:.0f}s, {mid_write} mid-write (a temp file left), "
          f"reads: {reader.seen}, cli runs {len(cli_runs)}, stale temp files {len(leftovers)}")
    assert mid_write >= 10, f"only {mid_write}/{kills} kills landed mid-write: the test is not testing"
    # a stale temp file is never mistaken for the table
    assert all(not p.name.endswith(".parquet") for p in leftovers)
    # the next driver to take the sweep's lock removes them, and only them
    assert leftovers
    with artifacts.SweepLock(sweep_dir):
        assert not list((sweep_dir / "sweep").glob(".*.tmp"))
    assert _version(results.read_rows(target)) in (1, 2)
