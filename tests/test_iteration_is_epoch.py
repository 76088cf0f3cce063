"""A trial that resumes from a checkpoint newer than the one Tune registered reports each epoch as that
epoch's ``training_iteration`` (``trial.iteration_is_epoch``). Tune counts ``training_iteration`` on from
the checkpoint it registered; a kill between a checkpoint's write and Tune registering it left the resumed
trial one behind (epoch 8 reported as iteration 7 in a CI run of 2026-11-28), which ASHA on
``time_attr: training_iteration`` and Optuna's intermediate steps would read.

The real Tune trainable class the runner uses, in-process on the shared local Ray, real checkpoints."""

from __future__ import annotations

import copy
import os

from ray import tune
from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext

from sweeper import manifest
from sweeper.trial import TrialSpec, iteration_is_epoch, tune_trainable
from tests.conftest import TINY_QWEN


def test_resumed_past_the_registered_checkpoint_reports_iteration_equal_to_epoch(ray_session, tmp_path):
    m = copy.deepcopy(TINY_QWEN)
    m["output"] = {"root": str(tmp_path / "results")}
    cls = tune_trainable(TrialSpec(manifest=manifest.validate_data(m, "test").model_dump(mode="json")), {"cpu": 1})

    def trainable():
        st = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp", trial_dir_name="t1")
        os.makedirs(st.trial_driver_staging_path, exist_ok=True)  # the trial's log goes there
        return cls(config={"lr": 1e-3, "batch_size": 16}, storage=st)

    first = trainable()
    try:
        got = [first.train() for _ in range(2)]  # epochs 1 and 2, each with its checkpoint
    finally:
        first.stop()
    assert [(r["epoch"], r["training_iteration"]) for r in got] == [(1, 1), (2, 2)]
    trial_dir = tmp_path / "exp" / "t1"
    assert sorted(p.name for p in trial_dir.glob("checkpoint_*")) == ["checkpoint_000000", "checkpoint_000001"]

    # the driver had registered only epoch 1's checkpoint; epoch 2's is on disk, verified
    resumed = trainable()
    try:
        resumed.restore(_TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(trial_dir / "checkpoint_000000")),
                                        metrics={"training_iteration": 1, "time_total_s": 1.0}))
        r = resumed.train()
    finally:
        resumed.stop()
    assert r["epoch"] == 3  # it went on from epoch 2's checkpoint, not epoch 1's
    assert r["training_iteration"] == 3  # Tune's own count says 2


def test_iteration_is_epoch_leaves_reports_without_an_epoch_alone():
    assert iteration_is_epoch({"val_mae": 0.5}) == {"val_mae": 0.5}
    got = iteration_is_epoch({"epoch": 4, "training_iteration": 3, "val_mae": 0.5})
    assert got == {"epoch": 4, "training_iteration": 4, "val_mae": 0.5}
