"""sweeper's own metrics reach Ray's metrics endpoint (what the dashboard and Prometheus read).

A real sweep in a subprocess with its own local Ray (short metrics report interval; the shared
session Ray is not touched) scrapes every node's ``MetricsExportPort`` while the sweep runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TINY_QWEN


def _last(scrape: dict, name: str, sweep: str) -> float | None:
    vals = [s["value"] for s in scrape["samples"] if s["name"] == name and s["labels"].get("sweep") == sweep]
    return vals[-1] if vals else None


# its own Ray in a subprocess and a sweep: 34 s on 2 cores (the default run stays under 10 minutes; CI's slow pass
# runs it)
@pytest.mark.slow
def test_sweeper_metrics_on_ray_endpoint(tmp_path):
    data = json.loads(json.dumps(TINY_QWEN))
    data["name"] = "t-dash"
    data["search"].update(num_samples=3, max_concurrent=2)
    data["output"] = {"root": str(tmp_path / "results")}
    man = tmp_path / "m.yaml"
    man.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_metrics_report_interval_ms": "500"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "_metrics_probe.py"), str(man)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] is None, out["error"]
    assert out["ports"] and len(out["statuses"]) == 3
    scrapes = out["scrapes"]
    names = {s["name"] for sc in scrapes for s in sc["samples"] if s["labels"].get("sweep") == "t-dash"}
    for n in ("ray_sweeper_trials_running", "ray_sweeper_trials_finished", "ray_sweeper_trials_stopped",
              "ray_sweeper_trials_errored", "ray_sweeper_best_metric", "ray_sweeper_accelerator_seconds"):
        assert n in names, names
    assert any(n.startswith("ray_sweeper_trial_seconds") for n in names), names

    # while the sweep ran, the endpoint showed trials running
    assert any((_last(sc, "ray_sweeper_trials_running", "t-dash") or 0) >= 1 for sc in scrapes if sc["during"])
    final = scrapes[-1]
    assert _last(final, "ray_sweeper_trials_running", "t-dash") == 0
    ended = sum(_last(final, f"ray_sweeper_trials_{k}", "t-dash") or 0 for k in ("finished", "stopped", "errored"))
    assert ended == 3
    assert _last(final, "ray_sweeper_trials_errored", "t-dash") == 0
    n_stopped = sum(1 for s in out["statuses"] if s == "stopped")
    assert _last(final, "ray_sweeper_trials_stopped", "t-dash") == n_stopped
    best = _last(final, "ray_sweeper_best_metric", "t-dash")
    assert best is not None and math.isfinite(best) and best > 0
    assert math.isclose(best, out["best"], rel_tol=1e-5)  # the same best the results table ranks first
    secs = [s["value"] for s in final["samples"] if s["name"].startswith("ray_sweeper_trial_seconds")
            and s["labels"].get("sweep") == "t-dash"]
    assert secs and secs[-1] > 0
    assert _last(final, "ray_sweeper_accelerator_seconds", "t-dash") == 0  # CPU trials: no accelerator time
    labels = next(s["labels"] for s in final["samples"] if s["name"] == "ray_sweeper_best_metric")
    assert labels["phase"] == "sweep" and labels["metric"] == "val_mae"
    print("metrics seen:", {s["name"]: s["value"] for s in final["samples"] if s["labels"].get("sweep") == "t-dash"},
          "sweep_s", round(out["sweep_s"], 1))
