"""A trial is in Tune's experiment snapshot before its first result is handled: a driver killed at
any moment loses no trial the sweep had started (issue 6.1; the cause of the orphan trial dirs in
docs/reliability.md). A finished trial needs no snapshot of its own: restored as unfinished, it
resumes from its final checkpoint and reports its last epoch once more (test_faults_resume).

Tune's own periodic snapshot is pushed out to 1,000 s here, so only sweeper's forced snapshots
can satisfy the checks; with Tune's plain FIFOScheduler the first check fails (``test_plain_fifo``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def _trainable(config):
    from ray import tune

    for i in range(3):
        time.sleep(0.2)
        tune.report({"loss": config["x"] + 1.0 / (i + 1)})


def _recorded(exp_dir: Path) -> dict[str, str]:
    """trial_id -> status in the newest snapshot Tune wrote, in the driver's staging dir: written
    whole on the driver thread, what runner.snapshot_keeper zips after the step and a restore puts
    back (the sweep dir's copy is uploaded later, file by file, by a background thread)."""
    import os

    from sweeper import asha

    staging = asha.STAGING.get(os.path.realpath(exp_dir))
    if staging is None:
        return {}
    files = sorted(Path(staging).glob("experiment_state-*.json"))
    if not files:
        return {}
    state = json.loads(files[-1].read_text())
    out = {}
    for t in state["trial_data"]:
        meta = json.loads(t[1]) if isinstance(t, list) else json.loads(t["runtime_metadata"])
        data = json.loads(t[0]) if isinstance(t, list) else t
        out[data["trial_id"]] = meta.get("status") or data.get("status")
    return out


def _run(tmp_path: Path, scheduler, monkeypatch) -> list[str]:
    from ray import tune

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1000")
    exp_dir = tmp_path / "exp"
    problems: list[str] = []

    class Check(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id not in _recorded(exp_dir):
                problems.append(f"{trial.trial_id} reported before any snapshot named it")


    tuner = tune.Tuner(
        _trainable,
        param_space={"x": tune.grid_search([0.1, 0.2, 0.3, 0.4])},
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), callbacks=[Check()], verbose=0),
    )
    grid = tuner.fit()
    assert len(grid) == 4 and not grid.errors
    return sorted(set(problems))


def test_every_trial_is_snapshotted_before_its_first_result(tmp_path, monkeypatch):
    from sweeper.asha import SnapshottingFIFO

    assert _run(tmp_path, SnapshottingFIFO(), monkeypatch) == []


def test_asha_snapshots_too(tmp_path, monkeypatch):
    from sweeper.asha import RecordingASHA

    sched = RecordingASHA(time_attr="training_iteration", max_t=3, grace_period=1, reduction_factor=3,
                          decisions_path=str(tmp_path / "decisions.jsonl"))
    assert _run(tmp_path, sched, monkeypatch) == []


def test_plain_fifo(tmp_path, monkeypatch):
    """The control: without the forced snapshots, trials report long before any snapshot names them."""
    from ray.tune.schedulers import FIFOScheduler

    from sweeper import asha

    class PlainFIFO(FIFOScheduler):  # Tune's own, only telling the test where its staging dir is
        def on_trial_add(self, tune_controller, trial):
            asha._register_staging(tune_controller._tune_controller)
            super().on_trial_add(tune_controller, trial)

    problems = _run(tmp_path, PlainFIFO(), monkeypatch)
    assert any("reported before any snapshot named it" in p for p in problems), problems
