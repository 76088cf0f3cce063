"""The GPU fast path (trainables/speed.py) on the CPU: plain and DeepSpeed give the same run, DeepSpeed
checkpoints carry ZeRO state and a restarted trial resumes from them, the benchmark's smoke mode runs."""

from __future__ import annotations

import os

import pytest

from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.conftest import ROOT, TINY_QWEN
from tests.test_trainables import resolved


def _m(strategy, epochs=2):
    return resolved(TINY_QWEN, [f"training.max_epochs={epochs}", f"scheduler.max_t={epochs}",
                                f"training.strategy={strategy}", "training.precision=fp32"])


def test_plain_and_deepspeed_match_and_resume(tmp_path):
    plain = ListReporter(str(tmp_path / "p"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=_m("plain")), plain)
    ds = ListReporter(str(tmp_path / "d"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=_m("deepspeed")), ds)
    assert [r["epoch"] for r in ds.reports] == [1, 2]
    assert [round(r["val_mae"], 5) for r in ds.reports] == [round(r["val_mae"], 5) for r in plain.reports]
    assert os.path.isdir(os.path.join(ds.checkpoints[-1], "deepspeed"))
    # restart: a 3-epoch run with the same reporter resumes at epoch 3 from the DeepSpeed checkpoint
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=_m("deepspeed", 3)), ds)
    assert [r["epoch"] for r in ds.reports] == [1, 2, 3]


def test_step_bench_smoke():
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.step_bench import main

    rows = main(["--manifest", str(ROOT / "search_spaces/qwen2.5-0.5b_regression_gpu.yaml"), "--smoke",
                 "--steps", "2", "--warmup", "1"])
    assert {r["mode"] for r in rows} == {"product", "loader", "plain"}


@pytest.mark.slow  # ~55 s: CI runs it in its slow pass
def test_two_worker_deepspeed_trial(ray_session, write_manifest, tiny_qwen):
    """A 2-worker (gloo) DeepSpeed ZeRO-2 trial: every evaluation reaches Tune, checkpoints hold both shards."""
    import pyarrow.parquet as pq
    from pathlib import Path

    from sweeper import manifest, runner
    from sweeper.checkpoint import verify_checkpoint

    tiny_qwen["name"] = "t-ds"
    tiny_qwen["resources"] = {"cpus": 0.5, "gpus": 0, "workers": 2}
    tiny_qwen["search"].update(num_samples=1, max_concurrent=1)
    tiny_qwen["training"].update(max_epochs=2, strategy="deepspeed", precision="fp32", deepspeed={"stage": 2})
    tiny_qwen["scheduler"].update(max_t=2)
    loaded = manifest.load(write_manifest(tiny_qwen), [])
    sweep_dir, rows = runner.run_sweep(loaded, quiet=True, dashboard=False)
    assert rows[0]["status"] == "completed", rows[0]
    mt = [r for r in pq.read_table(sweep_dir / "sweep" / "metrics.parquet").to_pylist() if r["metric"] == "val_mae"]
    assert [r["epoch"] for r in mt] == [1, 2]
    ck = Path(rows[0]["checkpoint"])
    verify_checkpoint(ck)
    shards = sorted(p.name for p in (ck / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
