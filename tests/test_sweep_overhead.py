"""The pieces that took the 40 x 1 s sweep from 1.117x to 1.076x of the ideal on 2 CPUs
(benchmarks/RESULTS.md (a5)), each checked for what it must keep doing, not for its speed."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sweeper import runner

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def _events(path: Path) -> list:
    """The Event protos of one TensorBoard file (TFRecord framing: length, its CRC, data, data CRC)."""
    from tensorboardX.proto import event_pb2

    out, data, i = [], path.read_bytes(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


# ------------------------------------------------------------------ TensorBoard events from a child process


def test_tensorboard_events_come_from_a_child_and_the_driver_imports_neither_tensorboardx_nor_torch(tmp_path):
    pytest.importorskip("tensorboardX")
    r = _py(f"""
        import sys
        from sweeper.tunelog import BackgroundTBXLoggerCallback
        class Trial:  # what the callback reads of Tune's Trial (hashable, as Tune's is)
            trial_id, local_path, path, storage = "t1", {str(tmp_path / 'staging')!r}, None, None
            evaluated_params = {{"lr": 0.01}}
            def init_local_path(self):
                pass
        cb = BackgroundTBXLoggerCallback()
        trial = Trial()
        cb.log_trial_start(trial)
        for it in range(1, 4):
            cb.log_trial_result(it, trial, {{"training_iteration": it, "val_mae": 1.0 / it, "config": {{"lr": 0.01}},
                                             "note": "text", "unpicklable": lambda: 0}})
        cb.log_trial_end(trial)
        cb.on_experiment_end([])
        print(sorted(m for m in ("tensorboardX", "torch") if m in sys.modules))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"  # neither was imported by the driver's process
    files = list((tmp_path / "staging").glob("events.out.tfevents.*"))
    assert len(files) == 1, list((tmp_path / "staging").iterdir()) if (tmp_path / "staging").exists() else None
    ev = _events(files[0])
    scalars = [(e.step, v.tag, v.simple_value) for e in ev for v in e.summary.value if v.HasField("simple_value")]
    assert [(s, round(x, 4)) for s, tag, x in scalars if tag == "ray/tune/val_mae"] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert not [t for _, t, _ in scalars if t.endswith(("config/lr", "pid", "timestamp"))]
    plugins = {v.metadata.plugin_data.plugin_name for e in ev for v in e.summary.value if v.metadata.plugin_data.plugin_name}
    assert "hparams" in plugins  # Tune's hparams, written at the trial's end


def test_tensorboard_events_reach_the_child_while_the_sweep_runs(tmp_path):
    """The driver's side flushes the pipe whenever it has caught up: a trial's event file exists while
    the sweep still runs (live TensorBoard), not only once the experiment ends and the pipe closes."""
    pytest.importorskip("tensorboardX")
    r = _py(f"""
        import time
        from pathlib import Path
        from sweeper.tunelog import BackgroundTBXLoggerCallback
        class Trial:
            trial_id, local_path, path, storage = "t1", {str(tmp_path / 'live')!r}, None, None
            evaluated_params = {{}}
            def init_local_path(self):
                pass
        cb = BackgroundTBXLoggerCallback()
        cb.log_trial_start(Trial())
        t0 = time.monotonic()
        while not list(Path({str(tmp_path / 'live')!r}).glob("events.out.tfevents.*")) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        print(bool(list(Path({str(tmp_path / 'live')!r}).glob("events.out.tfevents.*"))))
        cb.on_experiment_end([])
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "True"


def test_tensorboard_events_go_straight_into_the_trials_dir_on_local_storage(tmp_path):
    """Tune's last upload of its staging dir comes before on_experiment_end: events written by the
    child after it would never reach the sweep (seen in tests/test_report.py when the child was late)."""
    import pyarrow.fs
    from types import SimpleNamespace

    from sweeper.tunelog import _events_dir

    local = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem()),
                            path=str(tmp_path / "sweep" / "t1"), local_path=str(tmp_path / "staging" / "t1"))
    assert _events_dir(local) == str(tmp_path / "sweep" / "t1")
    remote = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=object()), path="bucket/t1",
                             local_path=str(tmp_path / "staging" / "t1"))
    assert _events_dir(remote) == str(tmp_path / "staging" / "t1")


# ------------------------------------------------------------------ Tune's result buffering, arguments read right


def test_train_buffered_reads_the_controllers_argument_order(monkeypatch):
    """Ray 2.60's controller calls train_buffered(buffer_length, buffer_time_s) against the signature
    train_buffered(buffer_time_s, max_buffer_length): a buffer of 1.0 results."""
    from ray.tune.trainable.trainable import Trainable

    from sweeper.trial import sweeper_trainable

    seen = []
    monkeypatch.setattr(Trainable, "train_buffered",
                        lambda self, buffer_time_s, max_buffer_length=1000: seen.append((buffer_time_s, max_buffer_length)))
    from sweeper import trial

    assert trial._controller_swaps_buffer_args()  # Ray 2.60, as installed
    obj = object.__new__(sweeper_trainable(lambda config: None))
    obj.train_buffered(1000, 2)  # the controller's order (buffer_time_s is an int once it has 20+ tasks)
    obj.train_buffered(1000, 1.0)
    assert seen == [(2, 1000), (1.0, 1000)]
    monkeypatch.setattr(trial, "_controller_swaps_buffer_args", lambda: False)  # a Ray that calls it right
    obj = object.__new__(sweeper_trainable(lambda config: None))
    obj.train_buffered(2.0, 50)
    obj.train_buffered(3.0)
    assert seen[2:] == [(2.0, 50), (3.0, 1000)]


def _reports(config):
    from ray import tune

    for i in range(5):
        time.sleep(0.06)
        tune.report({"loss": 1.0 / (i + 1)})


@pytest.mark.usefixtures("ray_session")
def test_results_of_a_fifo_phase_really_are_buffered(tmp_path):
    """Under result buffering the trial's reports reach the driver together (one train_buffered call
    returns them all), instead of one driver round trip per report: 5 reports 0.06 s apart arrive
    within a few ms of each other. Unbuffered they arrive over ~0.25 s."""
    from ray import tune

    from sweeper.trial import sweeper_trainable

    got: list[float] = []

    class Arrivals(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            got.append(time.monotonic())

    with runner._result_buffering(True):
        tuner = tune.Tuner(tune.with_resources(sweeper_trainable(_reports), {"cpu": 1}),
                           param_space={"x": 1}, tune_config=tune.TuneConfig(num_samples=1, metric="loss", mode="min"),
                           run_config=tune.RunConfig(name="buf", storage_path=str(tmp_path), callbacks=[Arrivals()],
                                                     verbose=0))
        grid = tuner.fit()
    assert not grid.errors and len(got) == 5
    assert got[-1] - got[0] < 0.1, [round(t - got[0], 3) for t in got]


# ------------------------------------------------------------------ trial actors start without IPython


def test_trial_actor_start_skips_ipython_unless_it_is_loaded():
    pytest.importorskip("IPython")
    r = _py("""
        import sys
        from sweeper.trial import _ipython_only_if_loaded
        import ray.tune.trainable.trainable as tt
        _ipython_only_if_loaded()
        _ipython_only_if_loaded()  # once wrapped, not twice
        tt.disable_ipython()
        print("IPython" in sys.modules)
        from IPython.core.interactiveshell import InteractiveShell
        cleared = []
        InteractiveShell.clear_instance = classmethod(lambda cls: cleared.append(1))
        tt.disable_ipython()
        print(cleared)
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "[1]"]


# ------------------------------------------------------------------ trial actors on Ray's pre-started workers


def test_tune_drops_from_each_actors_env_only_what_every_worker_inherits(monkeypatch):
    from ray.tune.execution import class_cache

    monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", {"PL_DISABLE_FORK": "1", "OTHER": "x"})
    monkeypatch.setenv("PL_DISABLE_FORK", "1")
    monkeypatch.setenv("OTHER", "y")  # inherited with another value: Tune must still set it
    runner._tune_env_inherited()
    assert class_cache.DEFAULT_ENV_VARS == {"OTHER": "x"}


# ------------------------------------------------------------------ the snapshot keeper's cheaper look


def test_staging_set_whole_or_cut_short():
    p = pickle.dumps({"issued": list(range(50))})
    j = json.dumps({"trial_data": [1, 2]}).encode()
    assert runner._ends_whole("searcher-state-x.pkl", p)
    assert runner._ends_whole("search_gen_state-x.json", p)  # Tune's pickle named .json
    assert runner._ends_whole("experiment_state-x.json", j + b"\n")
    for cut in (1, 5, len(p) // 2):
        assert not runner._ends_whole("searcher-state-x.pkl", p[:-cut])
    assert not runner._ends_whole("experiment_state-x.json", j[:-1])


def test_keeper_looks_at_the_staging_set_only_after_tune_saved_one(tmp_path):
    from types import SimpleNamespace

    from sweeper import asha

    exp, staging = tmp_path / "tune", tmp_path / "staging"
    exp.mkdir()
    staging.mkdir()
    key = os.path.realpath(exp)
    saver = SimpleNamespace(_last_save_time=1.0)
    asha.STAGING[key], asha.SAVER[key] = str(staging), saver
    sess = "2026-11-27_10-00-00"
    kept = exp / runner.LAST_GOOD / f"{sess}.zip"

    def write(n):
        (staging / f"experiment_state-{sess}.json").write_text(json.dumps({"trial_data": list(range(n))}))
        (staging / f"searcher-state-{sess}.pkl").write_bytes(pickle.dumps({"issued": n}))

    try:
        keeper = runner.snapshot_keeper(exp)
        write(1)
        assert keeper.keep_bundle(only_after_save=True) and kept.is_file()
        first = kept.read_bytes()
        write(2)  # written, but Tune has not finished a save since the last look: not read yet
        keeper.keep_bundle(only_after_save=True)
        assert kept.read_bytes() == first
        saver._last_save_time = 2.0
        keeper.keep_bundle(only_after_save=True)
        assert kept.read_bytes() != first
        # a set cut short is not kept, and is looked at again at the next step (no new save needed)
        saver._last_save_time = 3.0
        (staging / f"searcher-state-{sess}.pkl").write_bytes(pickle.dumps({"issued": 3})[:-2])
        second = kept.read_bytes()
        keeper.keep_bundle(only_after_save=True)
        assert kept.read_bytes() == second
        (staging / f"searcher-state-{sess}.pkl").write_bytes(pickle.dumps({"issued": 3}))
        keeper.keep_bundle(only_after_save=True)
        assert kept.read_bytes() != second
    finally:
        asha.STAGING.pop(key, None)
        asha.SAVER.pop(key, None)
