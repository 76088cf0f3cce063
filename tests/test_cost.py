"""Issue 7: cost accounting (columns, totals per rung/phase), ASHA decisions per rung, packing.

One small real sweep (tiny Qwen, 6 trials, ASHA rf 2) checks the accounting columns, actor and
data-cache reuse, decisions at every rung, ``sweeper cost``/``explain``/leaderboard totals and
``resources.gpus: auto`` resolving to 0 on this CPU machine. The fraction selection is unit-tested
with given footprints. No timed assertions.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pyarrow.parquet as pq
import pytest

from sweeper import cli, cost, manifest, packing, results, runner

GiB = 2**30
PARTS = ("startup_s", "train_s", "eval_s", "ckpt_s", "idle_s")


# ------------------------------------------------------------------------------ gpus: auto (unit)


@pytest.mark.parametrize("peak_gib,total_gib,expect_k", [
    (0.1, 80, 8),     # tiny model: capped at MAX_PER_GPU
    (2.0, 80, 8),     # 2.5 GiB + ctx -> 26 fit; still capped
    (12.0, 80, 5),    # 15 + 0.59 = 15.6 GiB each -> 5 fit
    (20.0, 80, 3),    # 25.6 GiB each -> 3 fit
    (30.0, 80, 2),    # 38.1 GiB each -> 2 fit
    (50.0, 80, 1),    # 63 GiB -> 1
    (70.0, 80, 1),    # does not fit even alone: whole GPU, flagged
])
def test_choose_fraction_from_footprint(peak_gib, total_gib, expect_k):
    r = packing.choose_fraction(peak_gib * GiB, total_gib * GiB)
    assert r["per_gpu"] == expect_k and r["gpus"] == pytest.approx(1 / expect_k)
    if r["fits"]:
        assert r["committed_bytes"] <= total_gib * GiB  # never over-committed
    else:
        assert peak_gib * GiB * packing.HEADROOM + packing.CONTEXT_BYTES > total_gib * GiB


def test_choose_fraction_never_overcommits_across_sizes():
    total = 80 * GiB
    for peak_mib in range(0, 80 * 1024, 97):
        r = packing.choose_fraction(peak_mib * 2**20, total)
        k = r["per_gpu"]
        assert r["gpus"] == pytest.approx(1 / k) and 1 <= k <= packing.MAX_PER_GPU
        if r["fits"]:
            assert k * (peak_mib * 2**20 * packing.HEADROOM + packing.CONTEXT_BYTES) <= total
            # and it is the largest such k (under the cap)
            assert k == packing.MAX_PER_GPU or (k + 1) * r["need_bytes"] > total
    assert packing.choose_fraction(1 * GiB, 80 * GiB, headroom=2.0, max_per_gpu=64)["per_gpu"] == 30


def test_packing_probe_shrinks_like_the_trials():
    """resources.gpus: auto with training.micro_batch: auto: a largest batch that runs out of the whole GPU is
    probed at the micro-batch the trials will use (the next smaller divisors), not failed; with a fixed
    micro-batch the error stays (the stand-in is CUDA's own error: this machine has no GPU)."""
    import torch

    ran, released = [], []

    def run(rows):
        ran.append(rows)
        if rows > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert packing.fitting_rows(run, 24, 24, shrink=True, release=lambda: released.append(1)) == (
        3, ["24 rows: out of memory", "12 rows: out of memory", "6 rows: out of memory"])
    assert ran == [24, 12, 6, 3] and len(released) == 3  # halving: the largest divisor of 24 up to half
    with pytest.raises(torch.OutOfMemoryError):
        packing.fitting_rows(run, 24, 24, shrink=False)
    with pytest.raises(torch.OutOfMemoryError):
        packing.fitting_rows(lambda rows: run(rows + 5), 24, 24, shrink=True)  # not even 1 row
    assert packing.fitting_rows(run, 3, 24, shrink=False) == (3, [])


def test_choose_fraction_rejects_nonsense():
    with pytest.raises(ValueError):
        packing.choose_fraction(1.0, 0)
    with pytest.raises(ValueError):
        packing.choose_fraction(float("nan"), GiB)


def test_auto_resolves_to_zero_without_gpu_and_is_cached(tmp_path, tiny_qwen, monkeypatch):
    monkeypatch.setattr(packing, "_local_gpus", lambda: 0)
    import ray

    if ray.is_initialized():  # a session Ray from another test: it has no GPU either
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    tiny_qwen["resources"]["gpus"] = "auto"
    notes = []
    assert packing.resolve_gpus(tiny_qwen, tmp_path, notice=notes.append) == 0.0
    assert len(notes) == 1 and "auto -> 0" in notes[0]
    assert json.loads((tmp_path / packing.PACKING).read_text())["gpus"] == 0.0
    assert packing.resolve_gpus(tiny_qwen, tmp_path, notice=notes.append) == 0.0 and len(notes) == 1
    tiny_qwen["resources"]["gpus"] = 0.25
    assert packing.resolve_gpus(tiny_qwen, None) == 0.25


def test_manifest_and_plan_accept_auto(write_manifest, tiny_qwen):
    tiny_qwen["resources"]["gpus"] = "auto"
    loaded = manifest.load(write_manifest(tiny_qwen))
    assert loaded.manifest.resources.gpus == "auto"
    p = cli.plan(loaded)
    assert p["per_trial"]["gpus"] == "auto" and "gpus_auto" in p
    tiny_qwen["resources"]["gpus"] = "most"
    from sweeper.errors import ManifestError

    with pytest.raises(ManifestError, match="resources.gpus"):
        manifest.load(write_manifest(tiny_qwen, "bad.yaml"))


# ------------------------------------------------------------------------------ a real small sweep


@pytest.fixture(scope="module")
def cost_sweep(ray_session, tmp_path_factory):
    import copy

    import yaml

    from tests.conftest import TINY_QWEN

    d = copy.deepcopy(TINY_QWEN)
    tmp = tmp_path_factory.mktemp("cost")
    d["name"] = "t-cost"
    d["resources"]["gpus"] = "auto"
    d["search"] = {"algorithm": "random", "seed": 3, "num_samples": 6, "max_concurrent": 2,
                   "space": {"lr": {"type": "choice", "values": [1e-7, 1e-2, 3e-3]}, "batch_size": 16}}
    d["training"].update(max_epochs=3, grad_clip=0)
    d["scheduler"].update(max_t=3, grace_period=1, reduction_factor=2)
    d["output"] = {"root": str(tmp / "results")}
    p = tmp / "m.yaml"
    p.write_text(yaml.safe_dump(d))
    sweep_dir, rows = runner.run_sweep(manifest.load(p), quiet=True)
    return sweep_dir, rows


def test_accounting_columns_are_consistent(cost_sweep):
    sweep_dir, rows = cost_sweep
    t = pq.read_table(sweep_dir / "sweep" / results.TRIALS)
    for col in ("wall_s", "accel_s", "accel_unit", *PARTS, "stop_reason", "asha_decisions", "worker_pid", "data_cache_hit"):
        assert col in t.column_names, col
    assert json.loads((sweep_dir / packing.PACKING).read_text())["gpus"] == 0.0  # auto on CPU
    for r in rows:
        assert r["accel_unit"] == "cpu_slot_s"  # CPU trials: accelerator seconds are CPU-slot seconds
        parts = [r[c] for c in PARTS]
        assert all(p >= 0 for p in parts), r
        assert sum(parts) <= r["wall_s"] + 1e-6
        assert math.isclose(sum(parts), r["wall_s"], rel_tol=1e-9, abs_tol=1e-9)  # idle is the rest
        assert r["train_s"] > 0 and r["eval_s"] > 0 and r["ckpt_s"] > 0
        assert r["accel_s"] == pytest.approx(r["wall_s"] * 1.0)  # cpus: 1, workers: 1
    # reused actors: fewer worker processes than trials, and the data cache hit on a reused one
    pids = {r["worker_pid"] for r in rows}
    assert None not in pids and len(pids) < len(rows)
    assert any(r["data_cache_hit"] for r in rows)


def test_every_trial_has_a_decision_at_every_rung_it_reached(cost_sweep):
    sweep_dir, rows = cost_sweep
    decisions = results.read_decisions(sweep_dir / "sweep")
    rungs = sorted({d["rung"] for d in decisions if d["rung"] is not None})
    assert rungs == [1, 2]
    for r in rows:
        got = {d["rung"] for d in json.loads(r["asha_decisions"] or "[]") if d["rung"] is not None}
        assert got == {x for x in rungs if x <= r["epochs"]}, (r["trial_id"], r["epochs"], got)
        if r["status"] == "stopped":
            assert r["stop_reason"].startswith("ASHA:")
    assert any(r["status"] == "stopped" for r in rows)


def test_cost_totals_per_rung_and_phase(cost_sweep):
    sweep_dir, rows = cost_sweep
    rep = cost.report(sweep_dir)
    ph = rep["phases"]["sweep"]
    assert ph["total"]["trials"] == len(rows)
    for c in ("wall_s", "accel_s", *PARTS):
        assert ph["total"][c] == pytest.approx(sum(r[c] for r in rows))
        assert sum(t[c] for t in ph["by_end"].values()) == pytest.approx(ph["total"][c])
        assert rep["total"][c] == pytest.approx(ph["total"][c])  # one phase here
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert ph["stopped_by_asha"]["trials"] == len(stopped)
    assert ph["stopped_by_asha"]["accel_s"] == pytest.approx(sum(r["accel_s"] for r in stopped))
    segs = ph["rung_segments"]
    assert [s["epochs"] for s in segs] == ["(0, 1]", "(1, 2]", "(2, 3]"]
    assert segs[0]["trials"] == len(rows) >= segs[1]["trials"] >= segs[2]["trials"]
    assert sum(s["wall_s"] for s in segs) == pytest.approx(ph["total"]["wall_s"], rel=1e-3)


def _run_cli(argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


def test_cost_explain_and_leaderboard_views(cost_sweep):
    sweep_dir, rows = cost_sweep
    data = json.loads(_run_cli(["cost", str(sweep_dir), "--json"]))
    assert data["phases"]["sweep"]["total"]["unit"] == "cpu_slot_s"
    text = _run_cli(["cost", str(sweep_dir)])
    assert "stopped by ASHA" in text and "CPU-slot s" in text and "idle" in text
    r = next(r for r in rows if r["status"] == "stopped")
    ex = _run_cli(["explain", r["trial_id"], str(sweep_dir)])
    assert "stop" in ex and "cutoff" in ex and "why: ASHA" in ex
    lb = _run_cli(["leaderboard", str(sweep_dir)])
    assert "totals:" in lb and "stopped by ASHA" in lb


def test_sleep_trainable_without_checkpoints(ray_session, write_manifest):
    m = {"name": "t-sleep", "trainable": "sleep_bench",
         "data": {"generator": {"kind": "qwen_synthetic", "n_train": 8, "n_val_select": 8, "n_val_calib": 8, "n_test": 8}},
         "resources": {"cpus": 1, "gpus": 0},
         "search": {"algorithm": "random", "seed": 0, "num_samples": 4, "max_concurrent": 2,
                    "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "sleep_s": 0.05}},
         "scheduler": {"type": "none"}, "selection": {"metric": "val_loss", "mode": "min"},
         "training": {"max_epochs": 3, "checkpoint_every": 0}, "export": {"enabled": False}}
    sweep_dir, rows = runner.run_sweep(manifest.load(write_manifest(m)), quiet=True)
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert all(r["checkpoint"] is None and r["ckpt_s"] == 0 and r["train_s"] > 0 for r in rows)
    assert len({r["worker_pid"] for r in rows}) <= 2  # 4 trials on 2 reused actors


def test_a_trial_run_in_several_runs_costs_the_sum_of_its_runs():
    """A promotion out of a paused rung, a retry or a resume starts the trial's clocks again: the
    results add the runs up (the last report alone would say only what the last run cost)."""
    from sweeper import results

    run1 = [{"epoch": 1, "first_step_unix": 100.0, "time_startup_s": 2.0, "time_train_s": 1.0, "time_eval_s": 0.5,
             "time_ckpt_s": 0.1, "time_wall_s": 4.0}]
    run2 = [{"epoch": e, "first_step_unix": 200.0, "time_startup_s": 3.0, "time_train_s": 1.0 * (e - 1),
             "time_eval_s": 0.5 * (e - 1), "time_ckpt_s": 0.1 * (e - 1), "time_wall_s": 3.5 + 2.0 * (e - 1)}
            for e in (2, 3)]
    out = results._runs_summed(run1 + run2)
    assert out[0] == run1[0]
    assert out[-1]["time_wall_s"] == 4.0 + 7.5 and out[-1]["time_startup_s"] == 5.0
    assert abs(out[-1]["time_train_s"] - 3.0) < 1e-9 and out[-1]["epoch"] == 3
    acct = results.accounting(out[-1], gpus=0, cpus=1, workers=1)
    assert acct["wall_s"] == 11.5 and abs(acct["idle_s"] - (11.5 - 5.0 - 3.0 - 1.5 - 0.3)) < 1e-9
    # no first_step_unix: a wall clock that went back marks the new run
    bare = [{"epoch": 1, "time_wall_s": 9.0}, {"epoch": 2, "time_wall_s": 6.0}, {"epoch": 3, "time_wall_s": 8.0}]
    assert results._runs_summed(bare)[-1]["time_wall_s"] == 17.0
    # one run: unchanged
    assert results._runs_summed(run2) == run2


def test_a_trial_whose_result_json_was_torn_is_still_listed_finished(tmp_path):
    """A driver killed while Tune's background thread uploaded a trial's files leaves its
    result.json at 0 bytes (seen in CI's driver-kill test): the row comes from progress.csv, else
    from the last result Tune kept, never 'pending'."""
    from types import SimpleNamespace

    import pandas as pd

    from sweeper import results

    hist = [{"epoch": e, "val_mae": 1.0 / e, "time_wall_s": 2.0 * e, "first_step_unix": 100.0} for e in (1, 2, 3)]
    d = tmp_path / "trial_a"
    d.mkdir()
    (d / "result.json").write_text("")
    pd.DataFrame(hist).to_csv(d / "progress.csv", index=False)

    def grid(path):
        return [SimpleNamespace(config={"lr": 0.1}, metrics_dataframe=None, metrics={**hist[-1], "trial_id": "a"},
                                path=str(path), error=None, best_checkpoints=[], checkpoint=None)]

    kw = dict(metric="val_mae", mode="min", phase="sweep", max_t=3, gpus=0, workers=1, decisions=[])
    rows, mrows = results.trial_rows(grid(d), **kw)
    assert rows[0]["status"] == "completed" and rows[0]["epochs"] == 3
    assert abs(rows[0]["best"] - 1 / 3) < 1e-9 and rows[0]["wall_s"] == 6.0
    assert sorted({m["epoch"] for m in mrows}) == [1, 2, 3]
    (d / "progress.csv").write_text("")  # torn too: the last result
    rows, _ = results.trial_rows(grid(d), **kw)
    assert rows[0]["status"] == "completed" and abs(rows[0]["final"] - 1 / 3) < 1e-9


def test_a_final_report_missing_from_result_json_comes_from_tunes_last_result(tmp_path):
    """Killed after Tune processed a trial's final report but before its line reached result.json
    (CI 2026-11-27): Tune restores the trial as finished and never reruns it; the file ends an epoch
    short. The row takes the final epoch from Tune's last result: completed, not 'stopped at 2 of 3'."""
    from types import SimpleNamespace

    import pandas as pd

    from sweeper import results

    hist = [{"epoch": e, "val_mae": 1.0 / e, "time_wall_s": 2.0 * e, "first_step_unix": 100.0} for e in (1, 2, 3)]

    def grid(on_file):
        return [SimpleNamespace(config={"lr": 0.1}, metrics_dataframe=pd.DataFrame(on_file),
                                metrics={**hist[-1], "trial_id": "a"}, path=str(tmp_path), error=None,
                                best_checkpoints=[], checkpoint=None)]

    kw = dict(metric="val_mae", mode="min", phase="sweep", max_t=3, gpus=0, workers=1, decisions=[])
    rows, mrows = results.trial_rows(grid(hist[:2]), **kw)
    assert rows[0]["status"] == "completed" and rows[0]["epochs"] == 3, rows[0]
    assert abs(rows[0]["final"] - 1 / 3) < 1e-9 and rows[0]["wall_s"] == 6.0
    assert sorted(m["epoch"] for m in mrows if m["metric"] == "val_mae") == [1, 2, 3]
    rows, mrows = results.trial_rows(grid(hist), **kw)  # all on file: nothing added twice
    assert rows[0]["epochs"] == 3 and sorted(m["epoch"] for m in mrows if m["metric"] == "val_mae") == [1, 2, 3]
