"""The GPU fast path (trainables/speed.py) on the CPU: plain and DeepSpeed give the same run, DeepSpeed
checkpoints carry ZeRO state and a restarted trial resumes from them, the benchmark's smoke mode runs."""

from __future__ import annotations

import os
import time

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


class _KeepOutputs:
    """A family that hands ``metrics`` through unchanged and keeps what it was given."""

    def __init__(self, family):
        self.family, self.outs = family, []

    def __getattr__(self, k):
        return getattr(self.family, k)

    def metrics(self, out, splits):
        self.outs.append(out)
        return self.family.metrics(out, splits)


def test_eval_batches_by_length_keep_the_split_order():
    """Evaluation batches come sorted by length (less padding); the metrics still get every row in the
    split's order, each with the prediction it gets in the split-order batches, and the same prediction
    as when the padding mask is passed into the backbone's attention."""
    import torch

    from trainables import speed

    m = _m("plain")
    m["data"]["max_length"] = 128  # rows of different lengths (at the tiny default of 32 all are cut to 32)
    p = speed.prepare({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), None)
    ds = p.splits.get("val_select", "select")
    lengths = [len(x) for x in ds.ids]
    loader = p.eval_loader(5)
    order = [i for batch in loader.batches for i in batch]
    assert order != sorted(order) and len(set(lengths)) > 1  # else this shows nothing
    assert [lengths[i] for i in order] == sorted(lengths)
    for batch in list(p.train_loader(1))[:3]:
        p.stepper.step(batch)  # off the label-mean start, so the rows' predictions differ
    p.stepper.family = keep = _KeepOutputs(p.stepper.family)
    by_length = p.stepper.evaluate(loader, p.splits)
    split_order = p.stepper.evaluate(p.eval_loader(5, by_length=False), p.splits)
    # the backbone gets no attention mask (right padding, causal attention): the same as passing the mask in
    p.stepper.inner.mask_attention = True
    masked = p.stepper.evaluate(p.eval_loader(5, by_length=False), p.splits)
    (a, b, c) = keep.outs
    torch.testing.assert_close(a["target"], ds.labels, rtol=0, atol=0)
    assert a["pred"].std(0).min() > 0
    torch.testing.assert_close(a["pred"], b["pred"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c["pred"], b["pred"], rtol=1e-4, atol=1e-5)
    assert masked["val_mae"] == pytest.approx(split_order["val_mae"], rel=1e-4)
    assert by_length.keys() == split_order.keys()
    for k in by_length:
        assert by_length[k] == pytest.approx(split_order[k], rel=1e-4)


def test_step_bench_smoke():
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.step_bench import main

    rows = main(["--manifest", str(ROOT / "search_spaces/qwen2.5-0.5b_regression_gpu.yaml"), "--smoke",
                 "--steps", "2", "--warmup", "1"])
    assert {r["mode"] for r in rows} == {"product", "loader", "plain"}


@pytest.mark.slow  # ~55 s each: CI runs them in its slow pass
@pytest.mark.parametrize("strategy", ["deepspeed", "ddp", "fsdp"])
def test_two_worker_trial(ray_session, write_manifest, tiny_qwen, strategy):
    """A 2-worker (gloo) trial, DeepSpeed ZeRO-2, DDP (``impl: blocks``, the default) or FSDP: every evaluation
    reaches Tune, the checkpoint verifies (under ZeRO-2 it holds both ranks' optimizer shards)."""
    import pyarrow.parquet as pq
    from pathlib import Path

    from sweeper import manifest, runner
    from sweeper.checkpoint import verify_checkpoint

    tiny_qwen["name"] = f"t-{strategy}"
    tiny_qwen["resources"] = {"cpus": 0.5, "gpus": 0, "workers": 2}
    tiny_qwen["search"].update(num_samples=1, max_concurrent=1)
    tiny_qwen["training"].update(max_epochs=2, strategy=strategy, precision="fp32", deepspeed={"stage": 2})
    tiny_qwen["scheduler"].update(max_t=2)
    loaded = manifest.load(write_manifest(tiny_qwen), [])
    sweep_dir, rows = runner.run_sweep(loaded, quiet=True, dashboard=False)
    assert rows[0]["status"] == "completed", rows[0]
    mt = [r for r in pq.read_table(sweep_dir / "sweep" / "metrics.parquet").to_pylist() if r["metric"] == "val_mae"]
    assert [r["epoch"] for r in mt] == [1, 2]
    ck = Path(rows[0]["checkpoint"])
    verify_checkpoint(ck)
    if strategy == "deepspeed":
        shards = sorted(p.name for p in (ck / "deepspeed" / "state").glob("*optim_states.pt"))
        assert len(shards) == 2, shards


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipping active on every step / never active
def test_fused_clip_matches_clip_grad_norm(max_norm, early):
    """Stepper.clip (the clip factor applied inside the fused AdamW kernel) trains exactly as
    clip_grad_norm_ followed by the same optimizer."""
    import copy

    import torch
    from torch import nn

    from trainables.speed import EarlyNorm, Stepper

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    ours = copy.deepcopy(ref)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    st = Stepper.__new__(Stepper)  # only what clip() reads: a fused optimizer over the params
    st.params, st.grad_clip, st.fused_opt, st.device = list(ours.parameters()), max_norm, True, torch.device("cpu")
    st.opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    # early: the norm summed per block by gradient hooks during the backward (EarlyNorm; here without a
    # CUDA side stream); the last layer's bias is left out of the loss on odd steps, so its group never
    # completes there and total() must sum it at the end
    st.early_norm = EarlyNorm(list(ours.named_parameters()), torch.device("cpu")) if early else None
    clipped = 0
    for i in range(5):
        for model, opt in ((ref, opt_ref), (ours, st.opt)):
            if model is ours and st.early_norm is not None:
                st.early_norm.arm()
            h = model[1](model[0](x))
            out = h @ model[2].weight.T + (model[2].bias if i % 2 == 0 else 0)
            nn.functional.mse_loss(out, y).backward()
            if model is ref:
                norm = nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
                clipped += bool(norm > max_norm)
            else:
                if early:  # every group summed by its hooks, but the one missing the bias on odd steps
                    assert [s is None for s in st.early_norm.sq] == [False, i % 2 == 1]
                st.clip()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for a, b in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert clipped == (5 if max_norm < 1 else 0)


def test_ddp_settings_reach_the_wrapper(tmp_path):
    """training.ddp: the manifest's bucket size reaches DistributedDataParallel (here a one-process gloo
    group standing in for the workers), and a bad hook name is refused by the schema, naming the field."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from sweeper import manifest as mf
    from sweeper.errors import UserError
    from trainables.speed import Stepper

    m = resolved(TINY_QWEN, ["training.strategy=ddp", "training.ddp.impl=torch", "training.ddp.bucket_cap_mb=7"])
    assert m["training"]["ddp"] == {"impl": "torch", "bucket_cap_mb": 7, "comm_hook": "none"}
    assert resolved(TINY_QWEN, [])["training"]["ddp"]["impl"] == "blocks"
    with pytest.raises(UserError, match="comm_hook applies to impl 'torch' only"):
        resolved(TINY_QWEN, ["training.ddp.comm_hook=bf16"])
    assert resolved(TINY_QWEN, [])["training"]["ddp"]["bucket_cap_mb"] == 200
    with pytest.raises(UserError, match="comm_hook"):
        resolved(TINY_QWEN, ["training.ddp.impl=torch", "training.ddp.comm_hook=fp8"])
    # training.fsdp: defaults as measured (benchmarks/results/gpu_2026-11-27.md), bad values named
    assert resolved(TINY_QWEN, [])["training"]["fsdp"] == {"blocks_per_unit": 4, "fp32_root": False}
    with pytest.raises(UserError, match="blocks_per_unit"):
        resolved(TINY_QWEN, ["training.fsdp.blocks_per_unit=0"])
    with pytest.raises(UserError, match="strategy"):
        resolved(TINY_QWEN, ["training.strategy=zero3"])

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        st = Stepper(_Fam, nn.Linear(8, 1), _HP, strategy="ddp", device=torch.device("cpu"), precision="32-true",
                     grad_clip=1.0, total_steps=4, world=2, ddp=m["training"]["ddp"])
        assert isinstance(st.fwd, nn.parallel.DistributedDataParallel)
        assert st.fwd.bucket_bytes_cap == 7 * 1024 * 1024
        st.step(torch.randn(4, 8))
        del st
        # The GIL let go a moment: gloo's worker thread drops its last collective (which needs the GIL) before
        # the group's destructor joins that thread while holding the GIL (see _dp_run's end).
        time.sleep(0.2)
    finally:
        dist.destroy_process_group()


class _Fam:
    @staticmethod
    def loss(model, batch, hp):
        return (model(batch) - batch.sum(1, keepdim=True)).pow(2).mean()


class _HP:
    lr, weight_decay, warmup_ratio, batch_size = 1e-2, 0.01, 0.0, 4


def _net():
    """Input layer, two repeated blocks (what FSDP shards one by one), output layer."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 1)
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

        def forward(self, x):
            h = nn.functional.gelu(self.inp(x))
            for b in self.blocks:
                h = h + nn.functional.gelu(b(h))
            return self.out(h)

    return Net()


def _dp_run(rank, world, init, out, impl):
    """One rank of a 2-process gloo data-parallel run (or the 1-process reference when world == 1)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from trainables.speed import Stepper

    if world > 1 or impl == "fsdp":
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # ranks start different: the wrapper must hand out rank 0's weights
        model = _net()
        strategy = "plain" if world == 1 else ("fsdp" if impl == "fsdp" else "ddp")
        st = Stepper(_Fam, model, _HP, strategy=strategy, device=torch.device("cpu"),
                     precision="32-true", grad_clip=0.5, total_steps=6, world=world,
                     ddp={"impl": impl} if impl != "fsdp" else None, fsdp={"blocks_per_unit": 2} if impl == "fsdp" else None)
        if world > 1:
            assert (st.reducer is not None) == (impl == "blocks")
            assert st.fsdp == (impl == "fsdp")
            if st.fsdp:
                assert st.fsdp_units == 2  # the two blocks as one unit, and the rest
        x = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(1))
        for step in range(4):
            st.step(x[step][rank::world])  # each rank its half of the step's batch
        if impl == "fsdp":  # the optimizer state a checkpoint holds: gathered, then put back, then trained on
            full = st.full_optimizer_state() if world > 1 else get_optimizer_state_dict(
                st.loss_mod, st.opt, options=StateDictOptions(full_state_dict=True))
            if rank == 0:
                torch.save({f"{k}.{n}": v for n, s in full["state"].items() for k, v in s.items()}, out + ".opt")
                torch.save(full, out + ".full")
            dist.barrier()
            if world > 1:  # wiped, so a load that does nothing shows
                for state in st.opt.state.values():
                    for v in state.values():
                        v.zero_()
                st.load_optimizer_state(torch.load(out + ".full", weights_only=True))
            for step in range(4, 6):
                st.step(x[step][rank::world])
        # and the averaged gradients themselves (AdamW with clipping hardly sees their scale)
        if st.reducer is not None:
            st.reducer.arm()
        st.fwd(x[0][rank::world]).backward()
        if st.reducer is not None:
            st.reducer.finish()
        sd = st.full_state_dict()  # gathered from the shards under FSDP (every rank takes part)
        grads = {f"grad.{n}": p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({**sd, **grads}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world > 1:
        # A spawned rank that got here has written what it had to: it leaves without running destructors.
        # torch's ProcessGroupGloo destructor (run when the DDP Reducer holding the group is freed, as this
        # frame unwinds) joins the group's worker thread while holding the GIL, and that thread may still need
        # the GIL to drop the last collective's Python thread-local state: a deadlock, about 1 run in 10 on
        # 2 cores (py-spy --native: ~ProcessGroupGloo -> thread::join vs ~AsyncWork -> gil_scoped_acquire).
        os._exit(0)


@pytest.mark.parametrize("impl", ["blocks", "torch", "fsdp"])
def test_two_process_data_parallel_matches_one_process(tmp_path, impl):
    """training.ddp.impl and training.strategy fsdp: two gloo processes, each with half of every batch,
    end with the weights of one process training on the whole batches (gradients averaged, clipping
    active, rank 0's start). FSDP's gathered optimizer state matches the one process's too, and training
    goes on the same after it has been loaded back (a resumed trial)."""
    import torch
    import torch.multiprocessing as tmp

    _dp_run(0, 1, f"file://{tmp_path}/pg1", str(tmp_path / "one.pt"), impl)
    tmp.spawn(_dp_run, args=(2, f"file://{tmp_path}/pg", str(tmp_path / "two.pt"), impl), nprocs=2)
    files = [("one.pt", "two.pt")] + ([("one.pt.opt", "two.pt.opt")] if impl == "fsdp" else [])
    for f1, f2 in files:
        one, two = (torch.load(tmp_path / f, weights_only=True) for f in (f1, f2))
        assert one.keys() == two.keys() and one
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
