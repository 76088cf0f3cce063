"""`sweeper report` on a real small sweep (ASHA + a seeded fan-out), the monitor, the live view,
TensorBoard files and the Optuna study file; a slow test renders the page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sweeper import manifest, report, results, runner
from tests.conftest import ROOT, TINY_QWEN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def small_sweep(ray_session, tmp_path_factory):
    """4 trials under ASHA (rungs 1, 2 of 3), then the top 2 re-run under 2 seeds for 1 epoch."""
    import yaml

    from sweeper import promote

    tmp = tmp_path_factory.mktemp("report")
    data = json.loads(json.dumps(TINY_QWEN))
    data["name"] = "t-report"
    data["search"] = {"algorithm": "random", "seed": 3, "num_samples": 4, "max_concurrent": 2,
                      "space": {"lr": {"type": "loguniform", "low": 1e-6, "high": 3e-2},
                                "batch_size": {"type": "choice", "values": [8, 16]}}}
    data["output"] = {"root": str(tmp / "results")}
    data["promotion"] = {"fanout": {"seeds": [101, 555], "candidates": 2, "epochs": 1}}
    p = tmp / "m.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    sweep_dir, _state = promote.run_pipeline(manifest.load(p, []), quiet=True)
    return sweep_dir


def test_report_has_every_plot(small_sweep, tmp_path):
    out = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "sweeper", "report", str(small_sweep), "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stderr[-2000:]
    page = out.read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # offline
    for sid in ("learning-curves", "parallel-coordinates", "importance", "fanout", "per-dimension", "cost"):
        assert f"id='{sid}'" in page, sid
    rows = results.read_rows(small_sweep / "sweep" / results.TRIALS)
    assert page.count("<svg") >= 6
    # learning curves: one polyline per trial that reported; rung lines and cutoffs when ASHA decided
    curves = {r["trial_id"] for r in results.read_rows(small_sweep / "sweep" / results.METRICS) if r["metric"] == "val_mae"}
    assert page.count('class="curve"') == len(curves) == len(rows)
    decisions = results.read_decisions(small_sweep / "sweep")
    assert page.count('class="cutoff"') == sum(1 for d in decisions if d.get("rung") is not None and d.get("cutoff") is not None)
    assert page.count('class="pc-line"') == len(rows)  # parallel coordinates: one line per trial
    assert "lr (log)" in page and "batch_size" in page
    assert re.search(r"Method: (Optuna fANOVA|Optuna PED-ANOVA|\|Spearman rank correlation\|)", page)
    prom = json.loads((small_sweep / "promotion.json").read_text())
    n_seed_results = sum(1 for c in prom["fanout"]["candidates"] for v in c["per_seed"].values() if v is not None)
    assert page.count('class="seed"') == n_seed_results >= 2 and "mean ±" in page
    assert "Per-dimension MAE" in page and page.count('class="bar"') >= 2  # Qwen: val_mae_<dim>
    assert page.count('class="cost"') >= len(rows)  # a stacked bar per trial
    assert "<table class='cost'>" in page


def test_importance_and_study_file(small_sweep):
    import optuna

    data = report.load(small_sweep)
    imp, method = report.importance(data)
    assert set(imp) == {"lr", "batch_size"} and abs(sum(imp.values()) - 1) < 1e-6, (imp, method)
    db = small_sweep / "sweep" / "optuna_study.db"
    assert db.is_file()
    summaries = optuna.get_all_study_summaries(f"sqlite:///{db}")
    assert [s.study_name for s in summaries] == ["t-report-sweep"] and summaries[0].n_trials == 4
    study = optuna.load_study(study_name="t-report-sweep", storage=f"sqlite:///{db}")
    rows = results.read_rows(small_sweep / "sweep" / results.TRIALS)
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    for r in rows:
        assert states[r["trial_id"]] == {"completed": "COMPLETE", "stopped": "PRUNED"}.get(r["status"], "FAIL")
    assert all(t.intermediate_values for t in study.trials if t.state.name != "FAIL")


def test_tensorboard_files_per_trial(small_sweep):
    trial_dirs = [p for p in (small_sweep / "sweep" / "tune").iterdir() if p.is_dir() and p.name.startswith("t-report_sweep_")]
    assert len(trial_dirs) == 4
    for d in trial_dirs:
        assert list(d.glob("events.out.tfevents.*")), sorted(x.name for x in d.iterdir())


def test_monitor_reads_the_sweep_dir(small_sweep):
    r = subprocess.run([sys.executable, "-m", "sweeper", "monitor", str(small_sweep), "--follow"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("[t-report/") and "(complete)" in line and "running 0" in line, line
    assert "best val_mae" in line
    bad = subprocess.run([sys.executable, "-m", "sweeper", "monitor", str(small_sweep / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_progress_json_and_live_view(small_sweep):
    from rich.console import Console

    from sweeper import liveview, monitor

    snap = json.loads((small_sweep / "sweep" / "progress.json").read_text())
    assert snap["status"] == "finished" and snap["total"] == 4 and snap["running"] == 0
    assert snap["finished"] + snap["stopped"] + snap["errored"] == 4 and len(snap["trials"]) == 4
    rows = results.read_rows(small_sweep / "sweep" / results.TRIALS)
    assert snap["stopped"] == sum(1 for r in rows if r["status"] == "stopped")
    assert snap["best"] == pytest.approx(min(r["best"] for r in rows if r.get("rank")))
    con = Console(file=io.StringIO(), record=True, width=140, force_terminal=True)
    con.print(liveview.table(monitor.snapshot(small_sweep)))
    text = con.export_text()
    for word in ("running", "finished", "ASHA-stopped", "errored", "best val_mae", "elapsed", "ETA"):
        assert word in text, text


def test_report_user_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sweeper", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(small_sweep, tmp_path):
    from PIL import Image

    page = report.write_report(small_sweep, tmp_path / "report.html")
    png = tmp_path / "report.png"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={png}", "--window-size=1400,3000",
                        "--hide-scrollbars", f"file://{page}"], capture_output=True, text=True, timeout=120)
    assert png.exists(), r.stderr[-2000:]
    assert png.stat().st_size > 50_000
    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 3000)
    small = img.resize((350, 750))
    pixels = list(small.getdata())
    non_white = sum(1 for p in pixels if sum(p) < 720)
    coloured = sum(1 for (r_, g, b) in pixels if max(r_, g, b) - min(r_, g, b) > 60)
    assert non_white > 0.03 * len(pixels), non_white
    assert coloured > 200, coloured  # the plots' colours, not only text
