"""Issue 6.3, through the trial code: a trial restarting after its newest checkpoint was truncated,
bit-flipped or lost its checksum list resumes from the newest one that verifies (never from
scratch, never from the damaged one). The 50 kills mid-write are in test_checkpoint.py; this runs
the real ``train_loop`` on the checkpoints it wrote itself.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from sweeper import checkpoint as ck
from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.conftest import TINY_QWEN

CONFIG = {"lr": 3e-3, "batch_size": 16}


def _spec(max_epochs: int) -> TrialSpec:
    m = copy.deepcopy(TINY_QWEN)
    m["search"]["space"] = dict(CONFIG)
    from sweeper import manifest

    resolved = manifest.validate_data(m, "test").model_dump(mode="json")
    return TrialSpec(manifest=resolved, max_epochs=max_epochs)


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("trial")
    rep = ListReporter(str(root))
    train_loop(dict(CONFIG), _spec(3), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2, 3]
    return [Path(c) for c in rep.checkpoints]


def _damage(c: Path, how: str) -> None:
    f = c / "model.safetensors"
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "bitflip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "no_checksums":
        (c / "CHECKSUMS.json").unlink()
    elif how == "torn_dir":  # what a kill mid-write leaves under the final name if the rename were not atomic
        (c / "optimizer.pt").unlink()


@pytest.mark.parametrize("how, resumes_after", [("none", 3), ("truncate", 2), ("bitflip", 2), ("no_checksums", 2),
                                                ("torn_dir", 2), ("two_bad", 1)])
def test_trial_resumes_from_newest_that_verifies(tmp_path, three, how, resumes_after):
    copies = []
    for c in three:
        dst = tmp_path / c.name
        shutil.copytree(c, dst)
        copies.append(dst)
    if how == "two_bad":
        _damage(copies[2], "bitflip")
        _damage(copies[1], "truncate")
    elif how != "none":
        _damage(copies[2], how)
    rep = ListReporter(str(tmp_path / "after"))
    rep.checkpoints = [str(c) for c in copies]
    train_loop(dict(CONFIG), _spec(4), rep)
    epochs = [r["epoch"] for r in rep.reports]
    assert epochs == list(range(resumes_after + 1, 5)), epochs
    # and what it resumed from is bit-identical to what was saved at that epoch
    good = ck.load_checkpoint(three[resumes_after - 1])
    assert good.state["epoch"] == resumes_after


def test_all_damaged_starts_over_without_crashing(tmp_path, three):
    copies = []
    for c, how in zip(three, ("truncate", "bitflip", "no_checksums")):
        dst = tmp_path / c.name
        shutil.copytree(c, dst)
        _damage(dst, how)
        copies.append(dst)
    rep = ListReporter(str(tmp_path / "after"))
    rep.checkpoints = [str(c) for c in copies]
    train_loop(dict(CONFIG), _spec(2), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2]
