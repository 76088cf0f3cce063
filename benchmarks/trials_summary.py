"""One line per trial of a sweep's trials.parquet (benchmarks/gpu_sweep_h100.sh): status counts, epochs, seconds.

    python benchmarks/trials_summary.py SWEEP_DIR
"""

from __future__ import annotations

import collections
import sys

import pyarrow.parquet as pq


def main(sweep_dir: str) -> None:
    rows = pq.read_table(f"{sweep_dir}/sweep/trials.parquet").to_pylist()
    print("trials", len(rows), dict(collections.Counter(r["status"] for r in rows)))
    print("epochs", sum(r["epochs"] or 0 for r in rows), "wall_s", round(sum(r["wall_s"] or 0 for r in rows), 1),
          "accel_s", round(sum(r["accel_s"] or 0 for r in rows), 1), rows[0]["accel_unit"] if rows else "")
    for r in sorted(rows, key=lambda r: (r["rank"] is None, r["rank"] or 0)):
        best = f"best={r['best']:.4f}" if r["best"] is not None else "best=-"
        parts = " ".join(f"{k[:-2]}={r[k]:.1f}" for k in ("wall_s", "startup_s", "train_s", "eval_s", "ckpt_s", "idle_s")
                         if r.get(k) is not None)
        print(r["rank"], r["trial_id"], r["status"], r["epochs"], best, parts, "pid", r["worker_pid"],
              "ckpt" if r["checkpoint"] else "no-ckpt")


if __name__ == "__main__":
    main(sys.argv[1])
