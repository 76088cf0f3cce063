"""Issue 6.4: a pickle that runs code when loaded is never loaded, whatever path it comes in by.

The malicious file's ``__reduce__`` creates a canary file; every test asserts the canary does not
exist afterwards. Entry paths: a trial resuming from its checkpoint (optimizer.pt), a warm start
(``init_from``), ``--from-checkpoint`` (a file and a checkpoint directory), ``sweeper export``
(promotion record and checkpoints/best), ``sweeper verify`` and ``sweeper leaderboard`` on a
sweep directory full of planted pickles. Unit-level loads are in test_checkpoint.py.
The trial paths run the real ``train_loop`` in-process (ListReporter: no Ray needed).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sweeper import checkpoint as ck
from sweeper import cli, manifest, results
from sweeper.errors import EXIT_INTEGRITY, EXIT_USER, IntegrityError, UserError
from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.conftest import TINY_QWEN


class _Canary:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


@pytest.fixture
def armed(tmp_path):
    """(evil .pt file, canary path); the file is proven to run code under an unrestricted load."""
    canary = tmp_path / "CANARY"
    evil = tmp_path / "evil.pt"
    torch.save({"state": {0: {"x": _Canary(canary)}}, "param_groups": [], "state_dict": {"w": _Canary(canary)},
                "w": _Canary(canary)}, evil)
    torch.load(evil, weights_only=False)
    assert canary.exists()
    canary.unlink()
    return evil, canary


def _rewrite_checksums(c: Path) -> None:
    doc = json.loads((c / "CHECKSUMS.json").read_text())
    for name in doc["files"]:
        doc["files"][name] = ck._digest(c / name)
    (c / "CHECKSUMS.json").write_text(json.dumps(doc))


def _manifest_dict(tmp_path: Path, **extra) -> dict:
    m = copy.deepcopy(TINY_QWEN)
    m["name"] = "canary"
    m["search"]["space"] = {"lr": 1e-3, "batch_size": 16}
    m["output"] = {"root": str(tmp_path / "results")}
    m["export"] = {"enabled": True}
    m.update(extra)
    return m


def _loaded(tmp_path: Path, **extra):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(_manifest_dict(tmp_path, **extra), sort_keys=False))
    return p, manifest.load(p)


def _real_checkpoint(tmp_path: Path, loaded) -> Path:
    """A genuine checkpoint of the manifest's model, written by one epoch of the real trial loop."""
    rep = ListReporter(str(tmp_path / "ckpts"))
    spec = TrialSpec(manifest=copy.deepcopy(loaded.resolved()), max_epochs=1)
    train_loop({"lr": 1e-3, "batch_size": 16}, spec, rep)
    assert rep.checkpoints
    return Path(rep.checkpoints[-1])


def _poison_optimizer(c: Path, evil: Path) -> None:
    shutil.copyfile(evil, c / "optimizer.pt")
    _rewrite_checksums(c)
    ck.verify_checkpoint(c)  # the attacker made the checksums vouch for it


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("genuine")
    _, loaded = _loaded(tmp)
    return _real_checkpoint(tmp, loaded)


def _copy(genuine: Path, tmp_path: Path, name="ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(genuine, dst)
    return dst


# --------------------------------------------------------------------------------- trial paths


def test_resume_from_checkpoint_with_poisoned_optimizer(tmp_path, armed, genuine):
    evil, canary = armed
    _, loaded = _loaded(tmp_path)
    c = _copy(genuine, tmp_path)
    _poison_optimizer(c, evil)
    rep = ListReporter(str(tmp_path / "more"))
    rep.checkpoints = [str(c)]  # what the trial finds when it restarts
    with pytest.raises(IntegrityError) as e:
        train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=copy.deepcopy(loaded.resolved())), rep)
    assert "optimizer.pt" in str(e.value) and "refused to unpickle" in str(e.value)
    assert not canary.exists()
    assert rep.reports == []  # never trained on top of it


# In-process DeepSpeed (no Ray) on a GPU machine takes the CUDA accelerator while a `gpus: 0` trial keeps its batches on
# the CPU; a Ray trial without a GPU sees none. The GPU's DeepSpeed checkpoints: test_speed.py::test_deepspeed_resume_cuda
_CPU_ONLY = pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="a CPU test (DeepSpeed in-process)")


@_CPU_ONLY
@pytest.mark.parametrize("planted", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_deepspeed_resume_refuses_a_planted_pickle(tmp_path, armed, planted):
    """``strategy: deepspeed`` resumes through DeepSpeed's own checkpoint (``deepspeed/state/*.pt``), which DeepSpeed
    loads with ``weights_only=False``: the trial's loads are restricted (``speed.restricted_ds_load``). A genuine
    DeepSpeed checkpoint resumes (also in test_speed.py); one with a planted pickle is refused, naming the file,
    before any training, and the pickle's code never runs."""
    evil, canary = armed
    _, loaded = _loaded(tmp_path)
    m = loaded.resolved()
    m["training"].update(strategy="deepspeed", precision="fp32")
    rep = ListReporter(str(tmp_path / "ds"))
    train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=copy.deepcopy(m), max_epochs=1), rep)
    c = Path(rep.checkpoints[-1])
    genuine_ds = c.parent / "genuine"
    shutil.copytree(c, genuine_ds)
    train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=copy.deepcopy(m), max_epochs=2), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2]  # the genuine one resumed under the restriction

    shutil.copyfile(evil, genuine_ds / "deepspeed" / "state" / planted)
    ck.verify_checkpoint(genuine_ds)  # sweeper's own files still verify: DeepSpeed's are not in its list
    again = ListReporter(str(tmp_path / "again"))
    again.checkpoints = [str(genuine_ds)]
    with pytest.raises(IntegrityError) as e:
        train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=copy.deepcopy(m), max_epochs=2), again)
    assert planted in str(e.value) and "refused" in str(e.value), str(e.value)
    assert not canary.exists()
    assert again.reports == []


def test_resume_skips_unverified_poisoned_newest(tmp_path, armed, genuine):
    """The evil file without rewritten checksums: verification skips it, the older one is used."""
    evil, canary = armed
    _, loaded = _loaded(tmp_path)
    old = _copy(genuine, tmp_path, "checkpoint_000000")
    new = _copy(genuine, tmp_path, "checkpoint_000001")
    shutil.copyfile(evil, new / "optimizer.pt")
    rep = ListReporter(str(tmp_path / "more"))
    rep.checkpoints = [str(old), str(new)]
    spec = TrialSpec(manifest=copy.deepcopy(loaded.resolved()), max_epochs=2)
    train_loop({"lr": 1e-3, "batch_size": 16}, spec, rep)
    assert [r["epoch"] for r in rep.reports] == [2]  # resumed after the verified epoch-1 checkpoint
    assert not canary.exists()


@pytest.mark.parametrize("how", ["file", "dir"])
def test_init_from_poisoned(tmp_path, armed, genuine, how):
    evil, canary = armed
    if how == "file":
        src = evil
    else:
        src = _copy(genuine, tmp_path)
        _poison_optimizer(src, evil)
    _, loaded = _loaded(tmp_path, init_from=str(src))
    with pytest.raises((UserError, IntegrityError)) as e:
        train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=copy.deepcopy(loaded.resolved())),
                   ListReporter())
    assert "refused to unpickle" in str(e.value)
    assert not canary.exists()


# ----------------------------------------------------------------------------------- CLI paths


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth", ".safetensors"])
def test_from_checkpoint_file(tmp_path, armed, capsys, suffix):
    evil, canary = armed
    f = tmp_path / f"weights{suffix}"
    shutil.copyfile(evil, f)
    p, _ = _loaded(tmp_path)
    code = cli.main(["--manifest", str(p), "--from-checkpoint", str(f), "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_USER and len(err.splitlines()) == 1 and str(f) in err, err
    assert not canary.exists()
    assert not (tmp_path / "results").exists()  # refused before anything was created


def test_from_checkpoint_dir_with_poisoned_optimizer(tmp_path, armed, genuine, capsys):
    evil, canary = armed
    c = _copy(genuine, tmp_path)
    _poison_optimizer(c, evil)
    p, _ = _loaded(tmp_path)
    code = cli.main(["--manifest", str(p), "--from-checkpoint", str(c), "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_INTEGRITY and len(err.splitlines()) == 1 and "optimizer.pt" in err, err
    assert not canary.exists()
    assert not (tmp_path / "results").exists()  # refused before a sweep dir or Ray


def _sweep_dir_with(tmp_path: Path, loaded, ckpt: Path, how: str) -> Path:
    d = tmp_path / "results" / f"canary-{loaded.identity()}"
    (d / "sweep" / "tune" / "canary_sweep_x").mkdir(parents=True)
    (d / "manifest.resolved.yaml").write_text(yaml.safe_dump(loaded.resolved(), sort_keys=False))
    results.write_table(d / "sweep" / results.TRIALS, [{"trial_id": "x", "status": "completed", "rank": 1,
                                                          "best": 1.0, "final": 1.0, "metric": "val_mae",
                                                          "epochs": 1, "wall_s": 0.0, "config": "{}",
                                                          "checkpoint": str(ckpt)}])
    if how == "promotion":
        (d / "promotion.json").write_text(json.dumps({"final": {"checkpoint": str(ckpt)}}))
    else:
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "best").symlink_to(ckpt, target_is_directory=True)
    return d


@pytest.mark.parametrize("how", ["promotion", "best_link"])
def test_export_of_poisoned_checkpoint(tmp_path, armed, genuine, capsys, how):
    evil, canary = armed
    _, loaded = _loaded(tmp_path)
    c = _copy(genuine, tmp_path)
    _poison_optimizer(c, evil)
    d = _sweep_dir_with(tmp_path, loaded, c, how)
    code = cli.main(["export", str(d)])
    err = capsys.readouterr().err
    assert code == EXIT_INTEGRITY and len(err.splitlines()) == 1 and "optimizer.pt" in err, err
    assert not canary.exists()
    assert not (d / "export").exists()


def test_leaderboard_and_verify_never_touch_pickles(tmp_path, armed, genuine, capsys):
    """A sweep dir full of planted pickles (Tune's own file names): read-only commands load none."""
    evil, canary = armed
    _, loaded = _loaded(tmp_path)
    c = _copy(genuine, tmp_path)
    _poison_optimizer(c, evil)
    d = _sweep_dir_with(tmp_path, loaded, c, "promotion")
    tune = d / "sweep" / "tune"
    for name in ("tuner.pkl", "searcher-state-x.pkl", "canary_sweep_x/params.pkl", "trainable.pkl"):
        shutil.copyfile(evil, tune / name)
    assert cli.main(["leaderboard", str(d)]) == 0
    assert cli.main(["leaderboard", str(d), "--json"]) == 0
    assert cli.main(["leaderboard", "--all", str(d.parent), "--json"]) == 0
    assert cli.main(["verify", str(c)]) == 0  # checksums only: verify never unpickles
    capsys.readouterr()
    assert not canary.exists()
