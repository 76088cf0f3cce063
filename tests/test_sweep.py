"""End to end on a real local Ray: Optuna/random proposals, ASHA stopping, results, links, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray import cloudpickle as ray_cloudpickle

from sweeper import manifest, results, runner
from sweeper.checkpoint import verify_checkpoint
from tests.conftest import ROOT, TINY_QWEN


class OldCallback:
    """A callback as a driver of older code pickled it: the code it runs under expects what it lacks."""

    def __getattr__(self, name):
        raise AttributeError(f"an old callback has no {name!r}")


def _load(write_manifest, data, overrides=()):
    return manifest.load(write_manifest(data), list(overrides))


def test_asha_stops_losers_and_results_are_complete(ray_session, write_manifest, tiny_qwen):
    # lr 1e9 diverges (NaN -> failed), 1e-7 learns nothing, 1e-2 learns: ASHA must stop some at a rung
    # One trial at a time: async ASHA's decisions depend on the order trials reach a rung, and with
    # two in flight that order was a race (a run where every 1e-7 trial reached the rung first
    # stopped nothing). Sequential trials in the seeded sample order make the decisions
    # reproducible. 256 training rows: lr 1e-2 beats the untouched 1e-7 model from epoch 1 on
    # (2.12 vs 2.17 val_mae; with 64 rows it was still worse after one epoch).
    tiny_qwen["search"] = {"algorithm": "random", "seed": 1, "num_samples": 8, "max_concurrent": 1,
                           "space": {"lr": {"type": "choice", "values": [1e9, 1e-7, 1e-2]}, "batch_size": 16}}
    tiny_qwen["data"]["generator"]["n_train"] = 256
    tiny_qwen["training"].update(max_epochs=4, grad_clip=0)
    tiny_qwen["scheduler"].update(max_t=4, grace_period=1, reduction_factor=2)
    loaded = _load(write_manifest, tiny_qwen, ["search.seed=2"])
    sweep_dir, rows = runner.run_sweep(loaded, quiet=True)

    assert len(rows) == 8
    statuses = [r["status"] for r in rows]
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, statuses
    for r in stopped:
        assert r["rung"] < 4 and r["stop_reason"].startswith("ASHA: val_mae=") and "cutoff" in r["stop_reason"]
    decisions = results.read_decisions(sweep_dir / "sweep")
    stops = [d for d in decisions if d["action"] == "stop"]
    assert stops and all(d["cutoff"] is not None and d["value"] > d["cutoff"] for d in stops if d["rung"])
    # never rank a failed (NaN) trial first; ranks are 1..n over finished trials only
    assert rows[0]["status"] in ("completed", "stopped") and rows[0]["rank"] == 1
    nan_rows = [r for r in rows if json.loads(r["config"])["lr"] == 1e9]
    assert nan_rows and all(r["status"] == "failed" and r["rank"] is None for r in nan_rows)
    assert json.loads(rows[0]["config"])["lr"] == 1e-2

    # the results directory is complete
    for f in ("manifest.resolved.yaml", "manifest.original.yaml", "overrides.yaml", "run_metadata.json", "state.json"):
        assert (sweep_dir / f).is_file(), f
    meta = json.loads((sweep_dir / "run_metadata.json").read_text())
    assert meta["seeds"] == {"search": 2, "training": 0}
    assert meta["versions"]["ray"] and meta["hardware"]["cpus"] and meta["runs"][-1]["command"]
    assert meta["runs"][-1]["trial_counts"]["stopped"] == len(stopped)
    t = pq.read_table(sweep_dir / "sweep" / "trials.parquet")  # pyarrow alone
    for col in ("trial_id", "config", "status", "stop_reason", "rung", "final", "best", "wall_s", "accel_s", "checkpoint"):
        assert col in t.column_names
    mt = pq.read_table(sweep_dir / "sweep" / "metrics.parquet").to_pylist()
    assert {r["metric"] for r in mt} >= {"val_mae", "val_rmse", "train_loss", "epoch"}
    best = sweep_dir / "checkpoints" / "best"
    assert best.is_symlink() and best.resolve().is_dir()
    verify_checkpoint(best.resolve())
    assert (sweep_dir / "checkpoints" / "second_best").exists()
    assert (Path(loaded.manifest.output.root) / "latest").resolve() == sweep_dir.resolve()

    # same command again: nothing re-runs, same results
    again_dir, again = runner.run_sweep(loaded, quiet=True)
    assert again_dir == sweep_dir and [r["trial_id"] for r in again] == [r["trial_id"] for r in rows]

    # the restore runs this driver's callbacks, not the ones tuner.pkl kept from the driver that began the sweep
    # (an upgrade between a crash and the resume): a pickled callback that no longer fits its code is not called
    tp = sweep_dir / "sweep" / "tune" / "tuner.pkl"
    state = pickle.loads(tp.read_bytes())  # Tune's pickle, written in this test
    state["_run_config"].callbacks.append(OldCallback())
    tp.write_bytes(ray_cloudpickle.dumps(state))  # as Tune writes it (the trial namer is a closure)
    # a trial dir no trial owns (a driver killed as the trial started) is set aside after the fit, kept
    tune_dir = sweep_dir / "sweep" / "tune"
    owned = sorted(p.name for p in tune_dir.iterdir() if p.is_dir() and p.name.startswith(f"{loaded.manifest.name}_sweep_"))
    assert len(owned) == len(rows)
    orphan = tune_dir / f"{loaded.manifest.name}_sweep_deadbeef"
    (orphan / "checkpoint_000000").mkdir(parents=True)
    (orphan / "checkpoint_000000" / "state.json").write_text("{}")
    (tune_dir / "not-a-trial").mkdir()
    restored = runner.run_phase(loaded, sweep_dir, quiet=True)
    assert sorted(r["trial_id"] for r in restored) == sorted(r["trial_id"] for r in rows)
    assert not orphan.exists()
    assert (tune_dir / runner.ORPHANS / orphan.name / "checkpoint_000000" / "state.json").is_file()
    assert sorted(p.name for p in tune_dir.iterdir() if p.is_dir() and p.name.startswith(f"{loaded.manifest.name}_sweep_")) == owned
    assert (tune_dir / "not-a-trial").is_dir()


def test_set_aside_orphans_moves_only_unowned_trial_dirs(tmp_path):
    for name in ("s_sweep_a", "s_sweep_b", "s_fanout_c", "s_sweep_file"):
        (tmp_path / name).mkdir() if name != "s_sweep_file" else (tmp_path / name).write_text("x")
    (tmp_path / "s_sweep_link").symlink_to(tmp_path / "s_sweep_b")
    notes = []
    assert runner.set_aside_orphans(tmp_path, set(), "s_sweep_", notes.append) == []  # nothing known: nothing moved
    assert runner.set_aside_orphans(tmp_path, {"s_sweep_a"}, "s_sweep_", notes.append) == ["s_sweep_b"]
    assert (tmp_path / runner.ORPHANS / "s_sweep_b").is_dir() and (tmp_path / "s_sweep_a").is_dir()
    assert (tmp_path / "s_fanout_c").is_dir() and (tmp_path / "s_sweep_file").is_file()  # another phase; not a dir
    assert (tmp_path / "s_sweep_link").is_symlink()
    assert len(notes) == 1 and "s_sweep_b" in notes[0] and ".orphans" in notes[0]
    (tmp_path / "s_sweep_b").mkdir()  # set aside again under the same name: both kept
    assert runner.set_aside_orphans(tmp_path, {"s_sweep_a"}, "s_sweep_") == ["s_sweep_b"]
    assert len(list((tmp_path / runner.ORPHANS).iterdir())) == 2


def test_rank_puts_errored_and_nan_last():
    rows = [
        {"trial_id": "a", "status": "error", "best": None, "final": None, "epochs": 0},
        {"trial_id": "b", "status": "failed", "best": float("nan"), "final": None, "epochs": 1},
        {"trial_id": "c", "status": "completed", "best": 0.5, "final": 0.6, "epochs": 4},
        {"trial_id": "d", "status": "stopped", "best": 0.9, "final": 0.9, "epochs": 1},
        {"trial_id": "e", "status": "completed", "best": 0.5, "final": 0.55, "epochs": 4},
        {"trial_id": "f", "status": "completed", "best": float("-inf"), "final": None, "epochs": 4},
    ]
    ranked = results.rank(copy.deepcopy(rows), "min")
    assert [r["trial_id"] for r in ranked][:3] == ["e", "c", "d"]  # tie on best -> better final wins
    assert {r["trial_id"]: r["rank"] for r in ranked}["a"] is None
    assert all(r["rank"] is None for r in ranked if r["trial_id"] in ("a", "b", "f"))
    ranked_max = results.rank(copy.deepcopy(rows), "max")
    assert ranked_max[0]["trial_id"] == "d"


def test_two_worker_torchtrainer_trial(ray_session, write_manifest, tiny_qwen):
    tiny_qwen["name"] = "t-ddp"
    tiny_qwen["resources"] = {"cpus": 0.5, "gpus": 0, "workers": 2}
    tiny_qwen["search"].update(num_samples=1, max_concurrent=1)
    tiny_qwen["training"].update(max_epochs=2)
    tiny_qwen["scheduler"].update(max_t=2)
    loaded = _load(write_manifest, tiny_qwen)
    sweep_dir, rows = runner.run_sweep(loaded, quiet=True)
    assert len(rows) == 1 and rows[0]["status"] == "completed", rows[0]
    mt = [r for r in pq.read_table(sweep_dir / "sweep" / "metrics.parquet").to_pylist() if r["metric"] == "val_mae"]
    assert [r["epoch"] for r in mt] == [1, 2]  # every evaluation reached Tune from the worker group
    lines = [json.loads(x) for f in (sweep_dir / "sweep" / "tune").glob("*/result.json") for x in f.read_text().splitlines()]
    assert [(r["epoch"], r["training_iteration"]) for r in lines] == [(1, 1), (2, 2)]  # trial.iteration_is_epoch
    assert rows[0]["checkpoint"] and Path(rows[0]["checkpoint"]).exists()
    verify_checkpoint(Path(rows[0]["checkpoint"]))


def _cli(args, env_extra=None, cwd=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "sweeper", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def test_cli_as_a_user(ray_session, write_manifest, tiny_qwen, tmp_path):
    tiny_qwen["name"] = "t-cli"
    p = write_manifest(tiny_qwen)
    env = {"RAY_ADDRESS": ray_session, "RAY_AUTH_MODE": "token"}
    r = _cli(["--manifest", str(p), "-q", "search.num_samples=2"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "override search.num_samples = 2" in r.stdout
    assert "ranked on val_mae" in r.stdout and "results:" in r.stdout
    sweep_dir = Path(r.stdout.strip().splitlines()[-1].split("results:", 1)[1].strip())
    lb = _cli(["leaderboard", str(sweep_dir), "--json", "--limit", "1"])
    assert lb.returncode == 0, lb.stderr
    data = json.loads(lb.stdout)
    assert len(data["trials"]) == 1 and data["trials"][0]["rank"] == 1
    allv = _cli(["leaderboard", "--all", str(sweep_dir.parent), "--json"])
    assert json.loads(allv.stdout)[0]["status"] == "ok"
    # re-running the same command launches nothing
    again = _cli(["--manifest", str(p), "-q", "search.num_samples=2"], env)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_cli_validate_reports_every_bad_key_without_traceback(write_manifest, tiny_qwen):
    tiny_qwen["search"]["num_samples"] = 0
    tiny_qwen["scheduler"]["grace_period"] = 9
    tiny_qwen["trainable"] = "qwen_regresion"
    tiny_qwen["bogus"] = True
    p = write_manifest(tiny_qwen)
    r = _cli(["validate", "--manifest", str(p)])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for key in ("`search.num_samples`", "`trainable`", "`bogus`", "`scheduler.grace_period`"):
        assert key in lines[0]
    r2 = _cli(["validate", "--manifest", str(p), "no.such.key=1"])
    assert r2.returncode == 2 and "override `no.such.key`: unknown key" in r2.stderr and "Traceback" not in r2.stderr
    r3 = _cli(["--manifest", str(p), "--dry-run"])
    assert r3.returncode == 2 and not (p.parent / "results").exists()  # nothing created


def test_cli_dry_run_prints_plan(write_manifest, tiny_qwen):
    p = write_manifest(tiny_qwen)
    r = _cli(["--manifest", str(p), "--dry-run", "search.num_samples=9"])
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout[r.stdout.index("{"):])
    assert plan["trials"] == 9 and plan["rungs"] == [1, 2] and plan["peak"]["cpus"] == 2
    assert plan["budget_epochs_max"] == 27 and plan["budget_epochs_asha_ideal"] < 27
    assert not (p.parent / "results").exists()
