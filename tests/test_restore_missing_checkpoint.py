"""A restore whose checkpoint Tune's ``num_to_keep`` already deleted (the experiment snapshot that
names it was taken before the deletion; the driver died in between) starts the trial without it
instead of failing every retry; the trial then resumes from the newest verified checkpoint in its
dir (``TuneReporter.restore_candidates``). Seen in the driver-kill test: a trial with all its epochs
done ended ``error`` after 3 x "Could not recover from checkpoint as it does not exist".

The real Tune trainable class the runner uses, in-process on the shared local Ray."""

from __future__ import annotations

import copy

import pytest
from ray import tune
from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext

from sweeper.trial import TrialSpec, tune_trainable
from tests.conftest import TINY_QWEN


@pytest.fixture
def trainable(ray_session, tmp_path):
    cls = tune_trainable(TrialSpec(manifest=copy.deepcopy(TINY_QWEN)), {"cpu": 1})
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp", trial_dir_name="t1")
    t = cls(config={"lr": 1e-3, "batch_size": 16}, storage=storage)
    yield t, tmp_path / "exp" / "t1"
    t.stop()


def _result(path, it):
    return _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(path)),
                           metrics={"training_iteration": it, "time_total_s": 5.0 * it})


def test_restore_from_a_deleted_checkpoint_goes_on_without_it(trainable):
    t, trial_dir = trainable
    assert type(t).__name__ == "SweeperTrial" and type(t)._name == "trial_fn"  # old sweeps still restore
    t.restore(_result(trial_dir / "checkpoint_000000", 2))  # never created: Tune's own restore raises
    assert t.iteration == 2  # training_iteration carries on after the restored history


def test_restore_from_an_existing_checkpoint_is_tunes_own(trainable):
    t, trial_dir = trainable
    ck = trial_dir / "checkpoint_000001"
    ck.mkdir(parents=True)
    t.restore(_result(ck, 3))
    assert t.iteration == 3 and t._restored
    from ray.train._internal.session import get_session

    assert get_session().loaded_checkpoint.path == str(ck)
