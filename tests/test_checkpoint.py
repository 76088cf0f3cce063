"""sweeper.checkpoint: round trips, kills mid-write, corruption fallback, and pickle that must never run.

Real torch, real files, real SIGKILLs; no mocks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sweeper import checkpoint as ck
from sweeper.errors import IntegrityError, UserError

WRITER = Path(__file__).with_name("_ckpt_writer.py")


# ------------------------------------------------------------------------------------ helpers


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.norm(self.lin(x)).relu())


class Tied(nn.Module):
    """Embedding and output head share one Parameter, as in most language models."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def _step(model, opt, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _write_simple(path: Path, step: int, **kw) -> Path:
    g = torch.Generator().manual_seed(step)
    return ck.write_checkpoint(path, {"w": torch.randn(64, 64, generator=g), "b": torch.full((64,), float(step))},
                               state={"epoch": step, "global_step": step}, **kw)


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"error must be one line: {msg!r}"
    return msg


def _flip_bit(f: Path, at: int | None = None) -> None:
    data = bytearray(f.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x10
    f.write_bytes(bytes(data))


# --------------------------------------------------------------------------------- 1. round trip


def test_round_trip_model_and_optimizer_continue_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = Small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _step(model, opt, seed=1)
    state = {"epoch": 3, "global_step": 42, "metrics": {"val_mae": 0.5, "inf": float("inf")},
             "rng": {"seed": 7}, "np_like": torch.tensor(2.5)}
    out = ck.write_checkpoint(tmp_path / "c", model.state_dict(), opt.state_dict(), state,
                              extra_files={"config.yaml": b"lr: 0.01\n"})
    assert out == tmp_path / "c"
    assert sorted(p.name for p in out.iterdir()) == ["CHECKSUMS.json", "config.yaml", "model.safetensors",
                                                     "optimizer.pt", "state.json"]
    sums = json.loads((out / "CHECKSUMS.json").read_text())
    assert sums["format"] == "sweeper-ckpt-1" and set(sums["files"]) == {"config.yaml", "model.safetensors",
                                                                          "optimizer.pt", "state.json"}

    loaded = ck.load_checkpoint(out)
    assert loaded.path == out
    assert loaded.state["global_step"] == 42 and loaded.state["np_like"] == 2.5
    assert loaded.state["metrics"]["inf"] == float("inf")
    ref = model.state_dict()
    assert loaded.model_state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(loaded.model_state[k], ref[k]) and loaded.model_state[k].dtype == ref[k].dtype

    fresh = Small()
    fresh.load_state_dict(loaded.model_state)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=999.0)  # lr comes back from the state dict
    fresh_opt.load_state_dict(loaded.optimizer_state)
    _step(model, opt, seed=2)
    _step(fresh, fresh_opt, seed=2)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), f"{n} differs after one more step"
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_tied_noncontiguous_and_view_tensors(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    sd = model.state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()  # really shared
    big = torch.arange(100.0)
    sd_extra = {**sd, "t": torch.randn(5, 7).t(), "view": big[10:20], "bf16": torch.randn(3, dtype=torch.bfloat16)}
    ck.write_checkpoint(tmp_path / "tied", sd_extra)
    loaded = ck.load_checkpoint(tmp_path / "tied")
    for k, v in sd_extra.items():
        assert torch.equal(loaded.model_state[k], v), k
    assert loaded.optimizer_state is None and loaded.state == {}
    # the saved slice holds its 10 elements, not the 100-element storage behind it
    assert loaded.model_state["view"].untyped_storage().nbytes() == 40

    fresh = Tied()
    fresh.load_state_dict({k: loaded.model_state[k] for k in sd})
    assert fresh.head.weight is fresh.emb.weight  # loading copies into the tied Parameter: tie kept
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_overwrite_replaces_old_checkpoint_and_leaves_no_tmp(tmp_path):
    _write_simple(tmp_path / "c", 1, optimizer_state={"state": {}, "param_groups": []},
                  extra_files={"old.txt": b"x"})
    _write_simple(tmp_path / "c", 2)
    loaded = ck.load_checkpoint(tmp_path / "c")
    assert loaded.state["global_step"] == 2 and torch.equal(loaded.model_state["b"], torch.full((64,), 2.0))
    assert loaded.optimizer_state is None and not (tmp_path / "c" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    # writing over a symlink replaces the link, never the checkpoint it points at
    os.symlink(tmp_path / "c", tmp_path / "link")
    _write_simple(tmp_path / "link", 3)
    assert not (tmp_path / "link").is_symlink() and ck.load_checkpoint(tmp_path / "link").state["epoch"] == 3
    assert ck.load_checkpoint(tmp_path / "c").state["epoch"] == 2
    os.symlink(tmp_path / "c", tmp_path / "link2")
    ck.remove_checkpoint(tmp_path / "link2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "link"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        ck.write_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, state={"bad": object()})
    with pytest.raises(TypeError):
        ck.write_checkpoint(tmp_path / "c", {"w": [1, 2]})
    with pytest.raises(UserError):
        ck.write_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, extra_files={"../evil": b""})
    with pytest.raises(UserError):
        ck.write_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, extra_files={"CHECKSUMS.json": b"{}"})
    assert list(tmp_path.iterdir()) == []


def test_cleanup_partials_and_remove_checkpoint(tmp_path):
    _write_simple(tmp_path / "a", 1)
    (tmp_path / ".a.tmp-deadbeef").mkdir()
    (tmp_path / ".a.tmp-deadbeef" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".b.tmp-old-1234").mkdir()
    (tmp_path / ".hidden").mkdir()  # not ours: left alone
    removed = ck.cleanup_partials(tmp_path)
    assert sorted(p.name for p in removed) == [".a.tmp-deadbeef", ".b.tmp-old-1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a"]
    ck.remove_checkpoint(tmp_path / "a")
    ck.remove_checkpoint(tmp_path / "a")  # already gone: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden"]


def test_find_checkpoints_order_and_tmp_dirs_ignored(tmp_path):
    _write_simple(tmp_path / "trial" / "checkpoint_000010", 10)
    _write_simple(tmp_path / "trial" / "checkpoint_000002", 2)
    _write_simple(tmp_path / "other" / "z_step5", 5)
    _write_simple(tmp_path / "trial" / ".checkpoint_000099.tmp-abc", 99)  # a killed writer's leftover
    nostate = tmp_path / "trial" / "nostate"
    _write_simple(nostate, 100)
    (nostate / "state.json").write_text("{not json")  # unreadable step: sorts after those with one
    os.symlink(tmp_path / "trial" / "checkpoint_000010", tmp_path / "best")  # symlinks are not followed
    found = ck.find_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint_000010", "z_step5", "checkpoint_000002", "nostate"]
    assert ck.find_checkpoints(tmp_path / "trial" / "checkpoint_000002") == [tmp_path / "trial" / "checkpoint_000002"]
    assert ck.find_checkpoints(tmp_path / "missing") == []


# ------------------------------------------------------------------------ 2. kills mid-checkpoint


class _Writer:
    """Starts writers and kills them: a fresh interpreter each time ("exec"), or forked from a server
    that imported torch once ("fork", 50 kills in seconds instead of minutes)."""

    def __init__(self, root: Path, mode: str):
        self.root, self.mode = root, mode
        self.server = self.proc = None
        self.alive = False  # a writer started and not yet reaped (so its pid is still ours to kill)
        if mode == "fork":
            self.server = self._popen("--fork-server")
            assert self.server.stdout.readline().strip() == "ready"

    def _popen(self, *args):
        return subprocess.Popen([sys.executable, str(WRITER), str(self.root), *args], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def start(self) -> None:
        if self.mode == "fork":
            self.server.stdin.write("spawn\n")
            self.server.stdin.flush()
            self.pid = int(self.server.stdout.readline())
        else:
            self.proc = self._popen()
            assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()
            self.pid = self.proc.pid
        self.alive = True

    def kill(self) -> None:
        """SIGKILL, then wait until the process is really gone (a kill is asynchronous: checking
        before the reap could watch a writer that is still renaming)."""
        os.kill(self.pid, signal.SIGKILL)
        self.alive = False
        if self.mode == "fork":
            self.server.stdin.write(f"reap {self.pid}\n")
            self.server.stdin.flush()
            ended = self.server.stdout.readline().strip()
        else:
            rc = self.proc.wait(timeout=30)
            ended = f"signal {-rc}" if rc < 0 else f"exit {rc}"
            err = self.proc.stderr.read()
            self.proc.stdout.close(), self.proc.stderr.close(), self.proc.stdin.close()
        assert ended == "signal 9", f"writer ended with {ended!r} before the kill: " + (
            err if self.mode == "exec" else "see the fork server's stderr")

    def close(self) -> None:
        if self.alive:  # the test failed between start and kill
            self.kill()
        if self.server is not None:
            self.server.stdin.write("quit\n")
            self.server.stdin.flush()
            self.server.wait(timeout=30)
            for f in (self.server.stdout, self.server.stderr, self.server.stdin):
                f.close()


def _expected_step_tensors(step: int) -> dict:
    sys.path.insert(0, str(WRITER.parent))
    try:
        import _ckpt_writer
    finally:
        sys.path.remove(str(WRITER.parent))
    return _ckpt_writer.tensors_for(step)[0]


@pytest.mark.parametrize("mode", ["fork", pytest.param("exec", marks=pytest.mark.slow)])
def test_50_kills_mid_checkpoint_always_leave_newest_complete(tmp_path, mode):
    kills, rng = 50, random.Random(1234)
    root = tmp_path / "ckpts"
    root.mkdir()
    writer = _Writer(root, mode)
    newest_before, partial_kills, t0 = 0, 0, time.monotonic()
    try:
        for i in range(kills):
            writer.start()
            time.sleep(rng.uniform(0.0, 0.3))
            writer.kill()

            names = sorted(p.name for p in root.iterdir() if p.is_dir())
            final = [root / n for n in names if not n.startswith(".")]
            partial_kills += any(n.startswith(".") for n in names)
            # every directory under its final name is complete
            for d in final:
                ck.verify_checkpoint(d)
            found = ck.find_checkpoints(root)
            assert sorted(found) == sorted(final), "tmp dirs must never be listed"

            best, skipped = ck.latest_valid_checkpoint(found)
            assert skipped == []
            steps = [int(p.name[5:]) for p in final if p.name.startswith("step_")]
            if not steps:
                assert i == 0 and best in (None, root / "latest"), "only the first kill may precede any step"
                continue
            newest = max(steps)
            # a complete checkpoint is never lost; the writer logs "done N" only after N is complete,
            # so the newest found is that step or (killed between the rename and the log line) one more
            assert newest >= newest_before
            lines = [line.split() for line in (root / "progress.log").read_text().splitlines()]
            logged = max(int(n) for _, n in lines)
            assert logged <= newest <= logged + 1
            newest_before = newest

            loaded = ck.load_checkpoint(best)
            assert loaded.state["global_step"] == newest, f"picked {best.name}, newest complete is step {newest}"
            want = _expected_step_tensors(newest)
            assert loaded.model_state.keys() == want.keys()
            assert all(torch.equal(loaded.model_state[k], want[k]) for k in want)
            assert loaded.optimizer_state["state"][0]["step"].item() == newest
            if (root / "latest").exists():  # killed mid-replace it is absent, never partial or mixed
                latest = ck.load_checkpoint(root / "latest")
                done = [int(n) for what, n in lines if what == "done"]
                assert (done[-1] if done else 1) <= latest.state["global_step"] <= newest
                want = _expected_step_tensors(latest.state["global_step"])
                assert all(torch.equal(latest.model_state[k], want[k]) for k in want)
    finally:
        writer.close()
    elapsed = time.monotonic() - t0
    print(f"\n{mode}: {kills} kills in {elapsed:.1f}s, {partial_kills} left a partial dir, newest step {newest_before}")
    assert partial_kills >= 10, f"only {partial_kills}/{kills} kills landed mid-write: the test is not testing"
    assert newest_before >= 20
    assert len(ck.cleanup_partials(root)) <= 2  # a kill leaves at most the new tmp dir and the old one aside
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------- 3. corrupted newest: fall back


def _three(root: Path) -> list[Path]:
    return [_write_simple(root / f"step_{s}", s, optimizer_state={"state": {}, "param_groups": []}) for s in (1, 2, 3)]


@pytest.mark.parametrize("damage, why", [
    ("truncate", "size mismatch"),
    ("bitflip", "sha256 mismatch"),
    ("no_checksums", "CHECKSUMS.json: missing"),
    ("missing_model", "model.safetensors: missing"),
])
def test_damaged_newest_falls_back_to_next_that_verifies(tmp_path, caplog, damage, why):
    c1, c2, c3 = _three(tmp_path)
    model = c3 / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "bitflip":
        _flip_bit(model)
    elif damage == "no_checksums":
        (c3 / "CHECKSUMS.json").unlink()
    else:
        model.unlink()
    with caplog.at_level(logging.WARNING, logger="sweeper.checkpoint"):
        best, skipped = ck.latest_valid_checkpoint(ck.find_checkpoints(tmp_path))
    assert best == c2
    assert len(skipped) == 1 and skipped[0][0] == c3 and why in skipped[0][1]
    if damage != "no_checksums":
        assert "model.safetensors" in skipped[0][1]
    assert any(str(c3) in r.getMessage() and why in r.getMessage() for r in caplog.records)
    assert ck.load_checkpoint(best).state["global_step"] == 2


def test_two_bad_then_none(tmp_path):
    c1, c2, c3 = _three(tmp_path)
    _flip_bit(c3 / "optimizer.pt")
    (c2 / "state.json").write_text('{"epoch": 2, "global_step": 2}  ')  # one byte longer
    best, skipped = ck.latest_valid_checkpoint(ck.find_checkpoints(tmp_path))
    assert best == c1 and [p for p, _ in skipped] == [c3, c2]
    assert "optimizer.pt" in skipped[0][1] and "state.json" in skipped[1][1]
    _flip_bit(c1 / "model.safetensors")
    best, skipped = ck.latest_valid_checkpoint([c3, c2, c1])
    assert best is None and len(skipped) == 3
    assert ck.latest_valid_checkpoint([]) == (None, [])


def test_load_refuses_damaged_checkpoint(tmp_path):
    c = _write_simple(tmp_path / "c", 1)
    _flip_bit(c / "model.safetensors")
    with pytest.raises(IntegrityError) as e:
        ck.load_checkpoint(c)
    assert "model.safetensors" in _one_line_error(e)
    assert e.value.exit_code == 5


# ------------------------------------------------------------------------- 4. pickle canary


class _Canary:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


@pytest.fixture
def evil_pt(tmp_path):
    canary = tmp_path / "CANARY"
    f = tmp_path / "evil.pt"
    torch.save({"state": {0: {"x": _Canary(canary)}}, "param_groups": [], "state_dict": {"w": _Canary(canary)}}, f)
    # the file really is armed: an unrestricted load runs it
    torch.load(f, weights_only=False)
    assert canary.exists()
    canary.unlink()
    return f, canary


def _rewrite_checksums(c: Path) -> None:
    """What an attacker who can write the directory does after swapping a file."""
    doc = json.loads((c / "CHECKSUMS.json").read_text())
    for name in doc["files"]:
        doc["files"][name] = ck._digest(c / name)
    (c / "CHECKSUMS.json").write_text(json.dumps(doc))


def test_canary_optimizer_swapped_refused_by_checksum(tmp_path, evil_pt):
    evil, canary = evil_pt
    c = _write_simple(tmp_path / "c", 1, optimizer_state={"state": {}, "param_groups": []})
    shutil.copyfile(evil, c / "optimizer.pt")
    with pytest.raises(IntegrityError) as e:
        ck.load_checkpoint(c)
    msg = _one_line_error(e)
    assert "optimizer.pt" in msg and "mismatch" in msg
    assert ck.latest_valid_checkpoint([c])[0] is None
    assert not canary.exists()


def test_canary_with_matching_checksums_refused_by_weights_only(tmp_path, evil_pt):
    evil, canary = evil_pt
    c = _write_simple(tmp_path / "c", 1, optimizer_state={"state": {}, "param_groups": []})
    shutil.copyfile(evil, c / "optimizer.pt")
    _rewrite_checksums(c)
    ck.verify_checkpoint(c)  # the checksums now vouch for the evil file
    for verify in (True, False):
        with pytest.raises(IntegrityError) as e:
            ck.load_checkpoint(c, verify=verify)
        msg = _one_line_error(e)
        assert "optimizer.pt" in msg and "refused to unpickle" in msg and "exec" in msg
        assert "weights_only=False" not in msg  # never advise the unsafe load
        assert not canary.exists()


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth", ".bin"])
def test_canary_weights_file_refused(tmp_path, evil_pt, suffix):
    evil, canary = evil_pt
    f = tmp_path / f"weights{suffix}"
    shutil.copyfile(evil, f)
    with pytest.raises((UserError, IntegrityError)) as e:
        ck.load_weights_file(f)
    msg = _one_line_error(e)
    assert str(f) in msg and "refused to unpickle" in msg
    assert not canary.exists()


def test_canary_disguised_as_safetensors_or_in_checkpoint_dir(tmp_path, evil_pt):
    evil, canary = evil_pt
    f = tmp_path / "model.safetensors"
    shutil.copyfile(evil, f)
    with pytest.raises(UserError) as e:
        ck.load_weights_file(f)
    assert str(f) in _one_line_error(e)
    c = _write_simple(tmp_path / "c", 1, optimizer_state={"state": {}, "param_groups": []})
    shutil.copyfile(evil, c / "optimizer.pt")
    _rewrite_checksums(c)
    with pytest.raises(IntegrityError):
        ck.load_weights_file(c)  # a checkpoint dir goes through load_checkpoint: optimizer refused too
    assert not canary.exists()


def test_full_module_pickle_refused(tmp_path):
    f = tmp_path / "whole_model.pt"
    torch.save(Small(), f)  # a legit but unsafe format: pickles the class, not just tensors
    with pytest.raises(UserError) as e:
        ck.load_weights_file(f)
    assert "refused to unpickle" in _one_line_error(e) and "state_dict" in str(e.value)


# ------------------------------------------------------------------------ load_weights_file


def test_load_weights_file_formats(tmp_path):
    import safetensors.torch

    model = Small()
    sd = model.state_dict()

    def same(got):
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)

    ck.write_checkpoint(tmp_path / "dir", sd)
    same(ck.load_weights_file(tmp_path / "dir"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    same(ck.load_weights_file(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "plain.pt")
    same(ck.load_weights_file(tmp_path / "plain.pt"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.ckpt")
    same(ck.load_weights_file(tmp_path / "lightning.ckpt"))
    torch.save({"model": sd, "optimizer": {}}, tmp_path / "wrapped.pth")
    same(ck.load_weights_file(str(tmp_path / "wrapped.pth")))

    cases = {
        tmp_path / "nope.pt": "no such file",
        tmp_path / "w.txt": "unsupported weights file",
        tmp_path / "emptydir": "not a sweeper checkpoint",
        tmp_path / "list.pt": "state dict of tensors",
        tmp_path / "garbage.bin": "refused to unpickle",
        tmp_path / "truncated.pt": "could not be loaded",
    }
    (tmp_path / "w.txt").write_text("hi")
    (tmp_path / "emptydir").mkdir()
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    (tmp_path / "garbage.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:300])
    for path, why in cases.items():
        with pytest.raises(UserError) as e:
            ck.load_weights_file(path)
        msg = _one_line_error(e)
        assert str(path) in msg and why in msg, msg
        assert e.value.exit_code == 2


# ------------------------------------------------------------- 5. verify messages name the file


def test_verify_messages_name_the_failing_file(tmp_path):
    def fails(c: Path, *needles: str) -> None:
        with pytest.raises(IntegrityError) as e:
            ck.verify_checkpoint(c)
        msg = _one_line_error(e)
        for n in needles:
            assert n in msg, (n, msg)

    c = _write_simple(tmp_path / "c", 1, extra_files={"notes.txt": b"hello"})
    ck.verify_checkpoint(c)
    (c / "unlisted.bin").write_bytes(b"ignored")  # unknown extra files are fine
    ck.verify_checkpoint(c)

    (c / "notes.txt").unlink()
    fails(c, str(c / "notes.txt"), "missing")
    (c / "notes.txt").write_bytes(b"hellO")
    fails(c, str(c / "notes.txt"), "sha256 mismatch")
    (c / "notes.txt").write_bytes(b"hello!")
    fails(c, str(c / "notes.txt"), "size mismatch", "6 bytes, expected 5")
    (c / "notes.txt").write_bytes(b"hello")
    ck.verify_checkpoint(c)

    sums = c / "CHECKSUMS.json"
    good = sums.read_text()
    sums.write_text(good[:-10])
    fails(c, str(sums), "unreadable")
    sums.write_text(json.dumps({"format": "other", "files": {}}))
    fails(c, str(sums), "not a sweeper-ckpt-1")
    doc = json.loads(good)
    doc["files"]["../c/state.json"] = doc["files"]["state.json"]
    sums.write_text(json.dumps(doc))
    fails(c, str(sums), "plain file name")
    doc = json.loads(good)
    del doc["files"]["model.safetensors"]
    sums.write_text(json.dumps(doc))
    fails(c, str(sums), "does not list model.safetensors")
    sums.unlink()
    fails(c, str(sums), "missing")
    fails(tmp_path / "nowhere", "nowhere", "not a checkpoint directory")
