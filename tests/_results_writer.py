"""Writes sweep/trials.parquet over and over through sweeper.results' atomic writer, alternating
two tables, until test_results_writer.py SIGKILLs it.

    python tests/_results_writer.py SWEEP_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sweeper import results  # noqa: E402


def table(version: int, n: int) -> list[dict]:
    """A trials table whose every row says which version it belongs to."""
    return [{"trial_id": f"v{version}_{i:05d}", "phase": "sweep", "config": '{"lr": %d}' % i,
             "status": "completed", "stop_reason": None, "rung": None, "epochs": 3, "metric": "val_mae",
             "final": float(i), "best": float(i) + version, "wall_s": 1.0, "accel_s": 0.0, "startup_s": 0.0,
             "train_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0, "checkpoint": None, "path": f"/x/{i}",
             "rank": i + 1, "pad": f"{version}" * 20000} for i in range(n)]


TABLES = {1: table(1, 300), 2: table(2, 700)}

if __name__ == "__main__":
    target = Path(sys.argv[1]) / "sweep" / results.TRIALS
    results.write_table(target, TABLES[2])  # warm up (first pyarrow calls are slow), then report ready
    print("ready", flush=True)
    k = 0
    while True:
        v = 1 + k % 2
        results.write_table(target, TABLES[v])
        k += 1
