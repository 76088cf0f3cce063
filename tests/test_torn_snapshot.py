"""A driver SIGKILLed while Tune writes its experiment snapshot leaves a torn file: the restore must
take the last intact copy (or an older session), never start the sweep over silently."""

from __future__ import annotations

import json
import pickle

import pytest

from sweeper import runner
from sweeper.errors import IntegrityError

S1, S2 = "2026-11-26_10-00-00", "2026-11-26_11-00-00"


def _session(d, sess, trials, *, torn=None):
    files = {f"experiment_state-{sess}.json": json.dumps({"trial_data": trials}).encode(),
             f"searcher-state-{sess}.pkl": pickle.dumps({"issued": len(trials)}),
             f"search_gen_state-{sess}.json": pickle.dumps({"n": len(trials)})}  # Tune's: a pickle named .json
    for name, data in files.items():
        if torn and name.startswith(torn):
            data = data[: len(data) // 2]  # cut mid-write
        (d / name).write_bytes(data)


def test_torn_current_session_restores_its_last_intact_copy(tmp_path):
    exp = tmp_path / "tune"
    exp.mkdir()
    _session(exp, S1, ["a", "b"])
    keeper = runner.snapshot_keeper(exp)
    keeper.keep()  # what the callback does between Tune steps
    _session(exp, S1, ["a", "b", "c"], torn="experiment_state")  # the kill lands mid-write
    keeper.keep()  # a torn set is never copied over the good one
    notes = []
    assert runner.set_aside_torn_snapshots(exp, note=notes.append) == [S1]
    assert json.loads((exp / f"experiment_state-{S1}.json").read_text())["trial_data"] == ["a", "b"]
    assert (exp / f".torn-{S1}" / f"experiment_state-{S1}.json").exists()  # kept, not deleted
    assert "last intact copy" in notes[0]


def test_torn_pickle_is_detected_without_unpickling(tmp_path):
    exp = tmp_path / "tune"
    exp.mkdir()
    _session(exp, S1, ["a"])
    _session(exp, S2, ["a", "b"], torn="searcher-state")
    assert runner.set_aside_torn_snapshots(exp) == [S2]
    left = sorted(p.name for p in exp.iterdir() if p.is_file())
    assert left == sorted([f"experiment_state-{S1}.json", f"searcher-state-{S1}.pkl", f"search_gen_state-{S1}.json"])


def test_only_snapshot_torn_and_no_copy_is_an_integrity_error(tmp_path):
    exp = tmp_path / "tune"
    exp.mkdir()
    _session(exp, S1, ["a"], torn="experiment_state")
    (exp / "trial_x").mkdir()
    with pytest.raises(IntegrityError, match="only experiment snapshot is torn"):
        runner.set_aside_torn_snapshots(exp)
    assert (exp / "trial_x").is_dir() and (exp / f".torn-{S1}").is_dir()


def test_intact_snapshots_are_left_alone(tmp_path):
    exp = tmp_path / "tune"
    exp.mkdir()
    _session(exp, S1, ["a"])
    before = {p.name: p.stat().st_mtime_ns for p in exp.iterdir()}
    assert runner.set_aside_torn_snapshots(exp) == []
    assert {p.name: p.stat().st_mtime_ns for p in exp.iterdir()} == before


def test_torn_tuner_pkl_is_restored_from_its_kept_copy(tmp_path):
    exp = tmp_path / "tune"
    exp.mkdir()
    _session(exp, S1, ["a"])
    good = pickle.dumps({"tuner": 1})
    (exp / "tuner.pkl").write_bytes(good)
    runner.snapshot_keeper(exp).keep()
    (exp / "tuner.pkl").write_bytes(b"")  # Tune rewrites it on restore; the kill lands mid-write
    assert runner.set_aside_torn_snapshots(exp) == []
    assert (exp / "tuner.pkl").read_bytes() == good
    (exp / "tuner.pkl").write_bytes(good[:5])
    (exp / runner.LAST_GOOD / "tuner.pkl").unlink()
    with pytest.raises(IntegrityError, match="tuner.pkl"):
        runner.set_aside_torn_snapshots(exp)
