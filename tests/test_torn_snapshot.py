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


def test_mixed_upload_is_replaced_by_the_kept_staging_set(tmp_path):
    """Tune uploads a snapshot set from its staging dir file by file: a kill mid-upload leaves the
    trials of one step beside the searcher of another. The keeper zips each staging set whole; the
    restore puts that set back and keeps the mixed files aside."""
    import os

    from sweeper import asha

    exp, staging = tmp_path / "tune", tmp_path / "staging"
    exp.mkdir()
    staging.mkdir()
    asha.STAGING[os.path.realpath(exp)] = str(staging)
    try:
        keeper = runner.snapshot_keeper(exp)
        _session(staging, S1, ["a", "b"])
        keeper.keep_bundle()
        _session(staging, S1, ["a", "b", "c"])  # the next step's snapshot, written whole
        keeper.keep_bundle()
        kept = (exp / runner.LAST_GOOD / f"{S1}.zip")
        assert kept.is_file() and not list((exp / runner.LAST_GOOD).glob(".*.tmp"))
        # the upload got the new trials but not the new searcher before the kill
        _session(exp, S1, ["a", "b"])
        (exp / f"experiment_state-{S1}.json").write_bytes((staging / f"experiment_state-{S1}.json").read_bytes())
        notes = []
        assert runner.restore_kept_sets(exp, note=notes.append) == [S1]
        for f in staging.iterdir():
            assert (exp / f.name).read_bytes() == f.read_bytes(), f.name
        assert (exp / f".superseded-{S1}" / f"searcher-state-{S1}.pkl").is_file()
        assert notes == []  # mixed, not torn: nothing for the user to act on
        assert runner.restore_kept_sets(exp) == []  # now identical: left alone
        # a torn upload: put back too, and the user is told
        (exp / f"searcher-state-{S1}.pkl").write_bytes(b"\x80\x04")
        assert runner.restore_kept_sets(exp, note=notes.append) == [S1] and "torn" in notes[0]
        # a kept zip that does not verify is never used
        kept.write_bytes(kept.read_bytes()[:-30])
        (exp / f"experiment_state-{S1}.json").write_text("{}")
        assert runner.restore_kept_sets(exp) == []
        assert (exp / f"experiment_state-{S1}.json").read_text() == "{}"
    finally:
        asha.STAGING.pop(os.path.realpath(exp), None)
