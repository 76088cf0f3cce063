"""Both trainables at tiny size on the CPU: split roles, seeding, NaN, coverage, checkpoint round trip."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sweeper import manifest
from sweeper.checkpoint import load_checkpoint
from sweeper.errors import UserError
from sweeper.trial import FAILED_KEY, ListReporter, TrialSpec, train_loop
from tests.conftest import TINY_QWEN
from trainables import registry
from trainables.base import HParams, resolve_precision
from trainables.splits import SplitRoleError, Splits

TINY_DINO = {
    **copy.deepcopy(TINY_QWEN),
    "name": "t-dino",
    "trainable": "dinov2_classifier",
    "model": {"size": "tiny", "config_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}},
    "data": {"generator": {"kind": "images_synthetic", "n_train": 64, "n_val_select": 32, "n_val_calib": 16, "n_test": 16,
                           "num_classes": 3, "seed": 0},
             "min_rows": {"train": 16, "val_select": 16}},
    "selection": {"metric": "val_acc", "mode": "max"},
}


def resolved(d: dict, overrides=()) -> dict:
    d = copy.deepcopy(d)
    _, problems = manifest.apply_overrides(d, list(overrides))
    return manifest.validate_data(d, "test", problems).model_dump(mode="json")


@pytest.mark.parametrize("base", [TINY_QWEN, TINY_DINO], ids=["qwen", "dino"])
def test_trains_reports_each_epoch_and_learns(base, tmp_path):
    m = resolved(base, ["training.max_epochs=3", "scheduler.max_t=3"])
    rep = ListReporter(str(tmp_path))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2, 3]
    metric = m["selection"]["metric"]
    assert all(np.isfinite(r[metric]) for r in rep.reports)
    assert rep.reports[-1]["train_loss"] < rep.reports[0]["train_loss"] * 1.5
    assert len(rep.checkpoints) == 3
    for key in ("time_train_s", "time_eval_s", "time_ckpt_s", "time_startup_s"):
        assert rep.reports[-1][key] >= 0
    # the export's report on the test split, from the saved weights (DINOv2's integer class targets included)
    from sweeper.trial import evaluate

    test = evaluate(m, {"lr": 3e-3, "batch_size": 16}, rep.checkpoints[-1], "test", "report")
    assert "test_" + metric[len("val_"):] in test and all(np.isfinite(v) for v in test.values()), test


def test_qwen_reports_per_dimension_metrics(tmp_path):
    m = resolved(TINY_QWEN, ["training.max_epochs=1", "scheduler.max_t=1"])
    rep = ListReporter(str(tmp_path))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    r = rep.reports[-1]
    for k in ("val_mae", "val_rmse", "val_loss", "val_mae_dim_0", "val_mae_dim_1", "val_rmse_dim_1"):
        assert k in r and np.isfinite(r[k])


def test_seeded_runs_are_identical(tmp_path):
    m = resolved(TINY_QWEN, ["training.max_epochs=2", "scheduler.max_t=2"])
    a, b = ListReporter(str(tmp_path / "a")), ListReporter(str(tmp_path / "b"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), a)
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), b)
    assert [r["val_mae"] for r in a.reports] == [r["val_mae"] for r in b.reports]
    c = ListReporter(str(tmp_path / "c"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m, seed=101), c)
    assert [r["val_mae"] for r in c.reports] != [r["val_mae"] for r in a.reports]


def test_checkpoint_resume_continues_where_it_stopped(tmp_path):
    """Stop after 2 of 4 epochs, resume from the checkpoint: epochs 3-4 match an uninterrupted run."""
    m4 = resolved(TINY_QWEN, ["training.max_epochs=4", "scheduler.max_t=4"])
    full = ListReporter(str(tmp_path / "full"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m4), full)

    class Died(Exception):
        pass

    class StopAfter(ListReporter):
        def report(self, metrics, ckpt_dir):
            super().report(metrics, ckpt_dir)
            if len(self.reports) == 2:
                raise Died  # the process dies here

    part = StopAfter(str(tmp_path / "part"))
    with pytest.raises(Died):
        train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m4), part)
    resumed = ListReporter(str(tmp_path / "part"))
    resumed.checkpoints = list(part.checkpoints)
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m4), resumed)
    assert [r["epoch"] for r in resumed.reports] == [3, 4]  # not restarted from scratch
    # the restored weights, optimizer and schedule, and epoch-seeded batch orders and draws: the
    # resumed epochs are the uninterrupted run's epochs (an ASHA promotion resumes exactly like this)
    for a, b in zip(resumed.reports, full.reports[2:]):
        assert a["epoch"] == b["epoch"]
        assert abs(a["val_mae"] - b["val_mae"]) < 1e-5, (a["epoch"], a["val_mae"], b["val_mae"])


def test_second_kill_resumes_from_the_epoch_written_after_the_first_resume(tmp_path):
    """Killed after epoch 2, resumed, killed after epoch 3: the next run starts at epoch 4. The
    epoch-3 checkpoint was the first of a new Lightning run; ordering checkpoints by that run's own
    step counter (16 < 32) once picked epoch 2 again (seen in CI as a repeated epoch)."""
    m4 = resolved(TINY_QWEN, ["training.max_epochs=4", "scheduler.max_t=4"])

    class Died(Exception):
        pass

    class DieAt(ListReporter):
        def __init__(self, root, at):
            super().__init__(root)
            self.at = at

        def report(self, metrics, ckpt_dir):
            super().report(metrics, ckpt_dir)
            if metrics["epoch"] == self.at:
                raise Died

    root = str(tmp_path / "ck")
    first = DieAt(root, 2)
    with pytest.raises(Died):
        train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m4), first)
    second = DieAt(root, 3)
    second.checkpoints = list(first.checkpoints)
    with pytest.raises(Died):
        train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m4), second)
    assert [r["epoch"] for r in second.reports] == [3]
    steps = [load_checkpoint(c).state["global_step"] for c in second.checkpoints]
    assert steps == sorted(steps) and steps[2] == 3 * steps[0] > 0  # the step count spans the run
    third = ListReporter(root)
    third.checkpoints = list(second.checkpoints)
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m4), third)
    assert [r["epoch"] for r in third.reports] == [4]


def test_nan_loss_ends_trial_as_failed_with_reason(tmp_path):
    m = resolved(TINY_QWEN, ["training.max_epochs=2", "scheduler.max_t=2", "training.grad_clip=0"])
    rep = ListReporter(str(tmp_path))
    out = train_loop({"lr": 1e9, "batch_size": 16}, TrialSpec(manifest=m), rep)
    assert FAILED_KEY in out and "training loss became" in out[FAILED_KEY]
    assert out["val_mae"] == float("inf")  # worst possible: ASHA and ranking never favour it


def test_coverage_threshold_stops_before_training(tmp_path):
    m = resolved(TINY_QWEN, ["data.min_rows.train=1000"])
    rep = ListReporter(str(tmp_path))
    with pytest.raises(UserError, match=r"train has 64 rows, needs >= 1000"):
        train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    assert rep.reports == []


def test_split_roles_enforced():
    s = Splits({"train": [1], "val_select": [2], "val_calib": [3], "test": [4]})
    assert s.get("train", "fit") == [1] and s.get("test", "report") == [4]
    with pytest.raises(SplitRoleError, match="serves role 'report', not 'select'"):
        s.get("test", "select")
    with pytest.raises(SplitRoleError, match="serves role 'select', not 'fit'"):
        s.get("val_select", "fit")
    with pytest.raises(SplitRoleError, match="unknown role"):
        s.get("train", "peek")
    with pytest.raises(SplitRoleError, match="was not provided"):
        Splits({"train": [1]}).get("val_calib", "calibrate")


def test_precision_policy():
    q, d = registry.describe("qwen_regression"), registry.describe("dinov2_classifier")
    assert resolve_precision("auto", False, q) == "32-true"
    assert resolve_precision("auto", True, q) == "bf16-mixed"
    assert resolve_precision("fp16", True, q) == "16-mixed"
    with pytest.raises(UserError, match="overflow"):
        resolve_precision("fp16", True, d)


def test_jsonl_data_and_errors(tmp_path):
    from trainables.qwen_regression import synthetic_rows

    paths = {}
    for split, n in (("train", 40), ("val_select", 20)):
        p = tmp_path / f"{split}.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in synthetic_rows(n, 2, 1, 0.1)) + "\n")
        paths[split] = str(p)
    d = copy.deepcopy(TINY_QWEN)
    d["data"] = {"paths": paths, "max_length": 32, "min_rows": {"train": 16, "val_select": 16}}
    m = resolved(d, ["training.max_epochs=1", "scheduler.max_t=1"])
    rep = ListReporter(str(tmp_path / "c"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    assert len(rep.reports) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "content": "x", "labels": [1], "dimension_names": ["a"]}\n{"id": 2}\n')
    from trainables.qwen_regression import read_jsonl

    with pytest.raises(UserError, match=r"bad.jsonl line 2: missing 'content'"):
        read_jsonl(str(bad))


def test_npz_and_image_folder(tmp_path):
    from PIL import Image

    from trainables.dinov2_classifier import read_split, synthetic_images

    imgs, labels = synthetic_images(12, 3, 28, 0, 0.1)
    np.savez(tmp_path / "s.npz", images=imgs, labels=labels)
    x, y, _ = read_split(str(tmp_path / "s.npz"), 28, None)
    assert x.shape == (12, 3, 28, 28) and y.tolist() == labels.tolist()
    for k in range(3):
        (tmp_path / "folder" / f"c{k}").mkdir(parents=True)
    for i, (im, lab) in enumerate(zip(imgs, labels)):
        Image.fromarray(im).save(tmp_path / "folder" / f"c{lab}" / f"{i}.png")
    x2, y2, classes = read_split(str(tmp_path / "folder"), 28, None)
    assert classes == ["c0", "c1", "c2"] and sorted(y2.tolist()) == sorted(labels.tolist())
    # pickled npz payloads are refused, not executed
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "evil.npz", images=np.array([object()], dtype=object), labels=labels)
    with pytest.raises(UserError):
        read_split(str(tmp_path / "evil.npz"), 28, None)
