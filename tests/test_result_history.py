"""A restored trial's ``result.json`` and ``progress.csv`` carry on from the sweep dir's copies (``tunelog``).

Real Tune objects: a ``StorageContext`` on a sweep dir in ``tmp_path`` (its staging dir in the shared Ray's
session, fresh per context, as for a new driver), a ``Trial``, and the loggers' own start/result/end calls.
The situation is the one docs/reliability.md ("Lost result history") describes: the sweep dir holds a trial's
first epochs, the restored snapshot holds no checkpoint for it, and a new driver logs its next epoch.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def _trial(storage_root: Path):
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    # staging dirs are named by the second and the experiment: a name of its own keeps each test's apart
    trial_dir = f"t_{storage_root.parent.name}"
    storage = StorageContext(storage_path=str(storage_root), experiment_dir_name="tune", trial_dir_name=trial_dir)
    trial = Trial("trial_fn", config={"lr": 0.01}, trial_id="0001", storage=storage, stub=True,
                  trial_dirname_creator=lambda t: trial_dir)  # the runner names trial dirs too
    assert trial.checkpoint is None  # the snapshot named no checkpoint for it
    return trial


def _result(epoch: int) -> dict:
    return {"epoch": epoch, "val_mae": 1.0 / epoch, "training_iteration": epoch, "trial_id": "0001"}


def _log(callback, trial, epochs) -> Path:
    trial.init_local_path()  # Tune makes the staging dir before a trial's loggers start
    callback.log_trial_start(trial)
    for e in epochs:
        callback.log_trial_result(e, trial, _result(e))
    callback.log_trial_end(trial)
    return Path(trial.local_path)


def _sweep_dir_copy(storage_root: Path, trial, name: str, text: str) -> None:
    d = storage_root / "tune" / trial.storage.trial_dir_name
    assert Path(trial.storage.trial_fs_path) == d
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)


@pytest.mark.parametrize("torn", [False, True])
def test_json_history_carries_on_from_the_sweep_dir(tmp_path, torn):
    from sweeper.tunelog import HistoryJsonLogger

    trial = _trial(tmp_path / "sweep")
    lines = "".join(json.dumps(_result(e)) + "\n" for e in (1, 2, 3))
    if torn:  # a killed upload cut the copy mid-line: the broken line is not carried on
        lines += '{"epoch": 4, "val_m'
    _sweep_dir_copy(tmp_path / "sweep", trial, "result.json", lines)

    staged = _log(HistoryJsonLogger(), trial, [4])
    epochs = [json.loads(x)["epoch"] for x in (staged / "result.json").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_csv_history_carries_on_with_one_header(tmp_path):
    from sweeper.tunelog import HistoryCSVLogger

    trial = _trial(tmp_path / "sweep")
    staged = _log(HistoryCSVLogger(), trial, [1, 2])  # the first driver, whose staging dir was uploaded
    _sweep_dir_copy(tmp_path / "sweep", trial, "progress.csv", (staged / "progress.csv").read_text())
    shutil.rmtree(staged)  # a new driver's staging dir has none of it

    rows = list(csv.DictReader((_log(HistoryCSVLogger(), trial, [3]) / "progress.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_a_new_trial_and_a_file_this_driver_writes_are_left_alone(tmp_path):
    from sweeper.tunelog import HistoryJsonLogger

    trial = _trial(tmp_path / "sweep")
    cb = HistoryJsonLogger()
    staged = _log(cb, trial, [1, 2])  # nothing in the sweep dir: a new trial starts its file
    _sweep_dir_copy(tmp_path / "sweep", trial, "result.json", json.dumps(_result(1)) + "\n")  # an older upload
    _log(cb, trial, [3])  # retried in this session: its own file is the newest
    assert [json.loads(x)["epoch"] for x in (staged / "result.json").read_text().splitlines()] == [1, 2, 3]


def test_tunes_own_logger_starts_the_file_again(tmp_path):
    """The control case: Tune's JsonLoggerCallback, same situation, loses the first epochs (why the mixin exists)."""
    from ray.tune.logger import JsonLoggerCallback

    trial = _trial(tmp_path / "sweep")
    _sweep_dir_copy(tmp_path / "sweep", trial, "result.json", "".join(json.dumps(_result(e)) + "\n" for e in (1, 2)))
    staged = _log(JsonLoggerCallback(), trial, [3])
    assert [json.loads(x)["epoch"] for x in (staged / "result.json").read_text().splitlines()] == [3]
