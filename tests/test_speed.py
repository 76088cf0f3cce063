"""The GPU fast path (trainables/speed.py) on the CPU: plain and DeepSpeed give the same run, DeepSpeed
checkpoints carry ZeRO state and a restarted trial resumes from them, the benchmark's smoke mode runs."""

from __future__ import annotations

import os
import time

import pytest

from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.conftest import ROOT, TINY_QWEN
from tests.test_trainables import resolved


def _m(strategy, epochs=2, extra=()):
    return resolved(TINY_QWEN, [f"training.max_epochs={epochs}", f"scheduler.max_t={epochs}",
                                f"training.strategy={strategy}", "training.precision=fp32", *extra])


@pytest.mark.skipif("__import__('torch').cuda.is_available()",
                    reason="a CPU test: in-process DeepSpeed on a GPU machine takes the CUDA accelerator while a gpus: 0 "
                           "trial keeps its batches on the CPU (a Ray trial without a GPU sees none)")
def test_plain_and_deepspeed_match_and_resume(tmp_path):
    """Plain PyTorch and DeepSpeed train alike, DeepSpeed with its batches of 16 in micro-batches of 4
    (gradients accumulated over DeepSpeed's manual boundary); a restarted DeepSpeed trial resumes."""
    plain = ListReporter(str(tmp_path / "p"))
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=_m("plain")), plain)
    ds = ListReporter(str(tmp_path / "d"))
    micro = ["training.micro_batch=4"]
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=_m("deepspeed", extra=micro)), ds)
    assert [r["epoch"] for r in ds.reports] == [1, 2]
    assert [r["micro_batch"] for r in plain.reports] == [16, 16] and [r["micro_batch"] for r in ds.reports] == [4, 4]
    assert [r["val_mae"] for r in ds.reports] == pytest.approx([r["val_mae"] for r in plain.reports], abs=2e-5)
    assert ds.reports[-1]["val_mae"] != plain.reports[0]["val_mae"]  # it trained
    assert os.path.isdir(os.path.join(ds.checkpoints[-1], "deepspeed"))
    # restart: a 3-epoch run with the same reporter resumes at epoch 3 from the DeepSpeed checkpoint
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=_m("deepspeed", 3, micro)), ds)
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


@pytest.mark.parametrize("gpu_manifest", ["qwen2.5-0.5b_regression_gpu.yaml", "dinov2-vitb14_classifier_gpu.yaml",
                                          "dinov2-vits14_classifier_gpu.yaml"])
def test_step_bench_smoke(gpu_manifest):
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.step_bench import main

    rows = main(["--manifest", str(ROOT / "search_spaces" / gpu_manifest), "--smoke", "--steps", "2", "--warmup", "1"])
    assert {r["mode"] for r in rows} == {"product", "loader", "plain"}


@pytest.mark.slow  # ~55 s each: CI runs them in its slow pass
@pytest.mark.parametrize("strategy", ["deepspeed", "ddp", "fsdp", "ddp-bf16w-fp8"])
def test_two_worker_trial(ray_session, write_manifest, tiny_qwen, strategy):
    """A 2-worker (gloo) trial, DeepSpeed ZeRO-2, DDP (``impl: blocks``, the default) or FSDP: every evaluation
    reaches Tune, the checkpoint verifies (under ZeRO-2 it holds both ranks' optimizer shards). DDP with bf16
    weights and FP8 blocks as well: its checkpoint holds the fp32 masters under the model's own names."""
    import pyarrow.parquet as pq
    from pathlib import Path

    from sweeper import manifest, runner
    from sweeper.checkpoint import verify_checkpoint

    tiny_qwen["name"] = f"t-{strategy}"
    tiny_qwen["resources"] = {"cpus": 0.5, "gpus": 0, "workers": 2}
    tiny_qwen["search"].update(num_samples=1, max_concurrent=1)
    tiny_qwen["training"].update(max_epochs=2, strategy=strategy.split("-")[0], precision="fp32", deepspeed={"stage": 2})
    if strategy == "ddp-bf16w-fp8":
        tiny_qwen["training"].update(precision="bf16", bf16_weights=True, fp8=True)
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
    if strategy == "ddp-bf16w-fp8":
        import torch
        from safetensors.torch import load_file

        weights = load_file(str(ck / "model.safetensors"))
        assert weights and all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


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


def test_gradient_hooks_do_not_keep_the_model_alive():
    """EarlyNorm's (and the blocks reducer's) per-parameter gradient hooks must not hold the model: a hook
    lives in the parameter's C++ gradient accumulator, where the garbage collector cannot see a cycle,
    and with a bound method every trial on a reused actor left its whole model on the GPU (found with
    benchmarks/memory_probe.py on the H100: 2.5 MB a trial for the packing benchmark's small model)."""
    import gc
    import weakref

    import torch
    from torch import nn

    from trainables.speed import EarlyNorm

    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1))
    early = EarlyNorm(list(model.named_parameters()), torch.device("cpu"))
    early.arm()
    model(torch.randn(4, 8)).sum().backward()
    assert all(s is not None for s in early.sq)  # the hooks ran
    alive = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(early)]
    del model, early
    gc.collect()
    assert [r() is None for r in alive] == [True] * len(alive)


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


def _net(unused: bool = False):
    """Input layer, two repeated blocks (what FSDP shards one by one), output layer; ``unused``: and a weight the
    loss never reaches (zero, so AdamW leaves it at zero whether its gradient is None or zero)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 1)
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
            if unused:
                self.unused = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            h = nn.functional.gelu(self.inp(x))
            for b in self.blocks:
                h = h + nn.functional.gelu(b(h))
            return self.out(h)

    return Net()


def _dp_run(rank, world, init, out, variant):
    """One rank of a 2-process gloo data-parallel run (or the 1-process reference when world == 1). ``variant``:
    the impl (blocks, torch, fsdp), or blocks with bf16 weights (``blocks-bf16w``) and FP8 blocks as well
    (``blocks-bf16w-fp8``: 16-row multiples per call, which FP8 needs)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from trainables.speed import Stepper

    impl, bf16w, fp8 = variant.split("-")[0], "bf16w" in variant, "fp8" in variant
    if world > 1 or impl == "fsdp":
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # ranks start different: the wrapper must hand out rank 0's weights
        model = _net(unused=impl == "blocks")  # a weight without gradients: the reducer reduces zeros for it
        strategy = "plain" if world == 1 else ("fsdp" if impl == "fsdp" else "ddp")
        st = Stepper(_Fam, model, _HP, strategy=strategy, device=torch.device("cpu"),
                     precision="bf16-mixed" if bf16w else "32-true", grad_clip=0.5, total_steps=6, world=world,
                     ddp={"impl": impl} if impl != "fsdp" else None, fsdp={"blocks_per_unit": 2} if impl == "fsdp" else None,
                     bf16_weights=bf16w, fp8=fp8)
        assert (st.master is not None) == bf16w and st.fp8 == 2 * fp8
        if world > 1:
            assert (st.reducer is not None) == (impl == "blocks")
            assert st.fsdp == (impl == "fsdp")
            if st.fsdp:
                assert st.fsdp_units == 2  # the two blocks as one unit, and the rest
        rows = 64 if fp8 else 8
        x = torch.randn(6, rows, 8, generator=torch.Generator().manual_seed(1))
        for step in range(4):
            # each rank its half of the step's batch; on odd steps in 2 micro-batches (training.micro_batch):
            # gradients accumulate locally and are reduced once, after the last
            st.micro = rows // 4 if (world > 1 and step % 2) else rows
            st.step(x[step][rank::world])
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
        # and the averaged gradients themselves (AdamW with clipping hardly sees their scale), of the two ranks'
        # micro-batches (2 each) against the one process's whole batch; with bf16 weights those of the fp32
        # masters, as a step hands them to the optimizer
        st.micro = rows // 4 if world > 1 else rows
        st.gradients(st.parts(x[0][rank::world]))
        sd = st.full_state_dict()  # gathered from the shards under FSDP (every rank takes part)
        weights = st.master.named_masters(model) if st.master is not None else dict(model.named_parameters())
        grads = {f"grad.{n}": (torch.zeros_like(p) if p.grad is None  # the unused weight on one process
                               else p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in weights.items()}
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


# the two-process run against the one-process one: fp32 agrees to rounding (elementwise); under bf16 autocast each
# rank's half-batch gradients are rounded to bf16 before they are averaged (the one process rounds the whole
# batch's), and FP8 scales each rank's half by its own largest magnitude: there each tensor's relative L2
# difference, weights / gradients (measured: at most 6e-4 / 4e-3 with bf16 weights, 6e-4 / 2.1e-2 with FP8 too;
# a gradient not averaged, or a rank's own, is off by 0.3 to 1)
_DP_REL = {"blocks-bf16w": (2e-3, 1e-2), "blocks-bf16w-fp8": (2e-3, 5e-2)}


@pytest.mark.parametrize("variant", ["blocks", "torch", "fsdp", "blocks-bf16w", "blocks-bf16w-fp8"])
def test_two_process_data_parallel_matches_one_process(tmp_path, variant):
    """training.ddp.impl and training.strategy fsdp: two gloo processes, each with half of every batch
    (every other step in micro-batches), end with the weights of one process training on the whole
    batches (gradients averaged, clipping active, rank 0's start). FSDP's gathered optimizer state
    matches the one process's too, and training goes on the same after it has been loaded back (a
    resumed trial). The blocks reducer with bf16 weights (the fp32 gradient buffers averaged, rank 0's
    masters), and with FP8 blocks as well, likewise up to bf16 and FP8 rounding."""
    import torch
    import torch.multiprocessing as tmp

    _dp_run(0, 1, f"file://{tmp_path}/pg1", str(tmp_path / "one.pt"), variant)
    tmp.spawn(_dp_run, args=(2, f"file://{tmp_path}/pg", str(tmp_path / "two.pt"), variant), nprocs=2)
    files = [("one.pt", "two.pt")] + ([("one.pt.opt", "two.pt.opt")] if variant == "fsdp" else [])
    for f1, f2 in files:
        one, two = (torch.load(tmp_path / f, weights_only=True) for f in (f1, f2))
        assert one.keys() == two.keys() and one
        for k in one:
            if variant not in _DP_REL:
                torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
                continue
            diff, ref = float((two[k].float() - one[k].float()).norm()), float(one[k].float().norm())
            rel = diff / ref if ref else diff  # the unused weight and its gradient are zero: exactly
            assert rel < _DP_REL[variant][k.startswith("grad.")], (k, rel)


_CUDA = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA (the GPU machine)")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=_CUDA)])
def test_train_loader_batches_are_the_gathered_rows(dev):
    """``make_collate`` and ``Prefetcher``: every batch holds the dataset's rows at its indices, in the batches'
    order, on the trial's device. For a CUDA trial the rows are gathered straight into pinned memory, so the
    prefetcher's pin is no second copy (the same storage)."""
    import torch

    from trainables.speed import Prefetcher, _pin, make_collate

    ds = torch.utils.data.TensorDataset(torch.randn(50, 3, 4, 4), torch.arange(50))
    batches = [[3, 1, 4], [15, 9, 2], [6, 5, 35], [49, 0, 7], [8]]
    collate, lengths = make_collate(None, ds, pin=dev == "cuda")
    assert lengths is None
    if dev == "cuda":
        b = collate(batches[0])
        assert all(t.is_pinned() for t in b) and _pin(b)[0].data_ptr() == b[0].data_ptr()
    got = list(Prefetcher(collate, batches, torch.device(dev)))
    assert len(got) == len(batches)
    for idx, (x, y) in zip(batches, got):
        assert x.device.type == dev and y.device.type == dev
        assert torch.equal(x.cpu(), ds.tensors[0][idx]) and y.tolist() == idx


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("rows,micro", [(8, 2), (7, 3)])  # equal micro-batches; a short batch (3 + 3 + 1 rows)
def test_micro_batches_train_as_the_whole_batch(rows, micro, dev, monkeypatch):
    """training.micro_batch: a batch split into micro-batches, gradients accumulated, gives the update and
    the loss of the whole batch at once (clipping active). SGD as the update, so a wrong weight on a
    micro-batch's gradient shows (AdamW would normalise most of it away); then the product's AdamW (on
    CUDA the fused one, with the clip norm summed during the last micro-batch's backward: EarlyNorm)."""
    import copy

    import torch

    from trainables.speed import Stepper, resolve_micro

    assert [resolve_micro(k, 12) for k in ("auto", None, 5, 100, 1)] == [12, 12, 4, 12, 1]
    assert resolve_micro(3, 7) == 1
    # fp32 matmuls in fp32: a trial's set-up on a GPU (speed.prepare) turns TF32 on for its whole process, and an
    # earlier test in this one may have run it; TF32's rounding is far above this test's tolerance
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(6, rows, 8, generator=torch.Generator().manual_seed(2)).to(dev)
    for sgd in (True, False):
        torch.manual_seed(0)
        whole_net = _net().to(dev)
        split_net = copy.deepcopy(whole_net)
        runs = []
        for net, m in ((whole_net, None), (split_net, micro)):
            st = Stepper(_Fam, net, _HP, strategy="plain", device=torch.device(dev), precision="32-true",
                         grad_clip=0.5, total_steps=6, micro_batch=m)
            assert (st.early_norm is not None) == (dev == "cuda")
            st.micro = m or rows  # (7, 3): the short-batch case, which resolve_micro never yields
            if sgd:
                # fused on CUDA: it reads the clip factor from grad_scale as the fused AdamW does
                st.opt = torch.optim.SGD(st.params, lr=0.05, fused=(dev == "cuda") or None)
                st.sched = torch.optim.lr_scheduler.LambdaLR(st.opt, lambda s: 1.0)
            assert len(st.parts(x[0])) == (1 if m is None else -(-rows // micro))
            runs.append([float(st.step(x[i])) for i in range(6)])
        assert runs[1] == pytest.approx(runs[0], rel=1e-5)
        for a, b in zip(whole_net.parameters(), split_net.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert any((a - b.to(dev)).abs().max() > 0 for a, b in zip(whole_net.parameters(), _net().parameters()))


def test_fit_micro_batch_halves_until_it_fits():
    """training.micro_batch: auto on a model that runs out of memory above 3 rows (CUDA's own error,
    raised by the loss: this machine has no GPU to fill): 8 and 4 rows fail, 2 fit. The tries leave
    weights, gradients and optimizer state as they were; a model that fits nothing is refused, naming
    every size tried."""
    import copy

    import torch

    from trainables.speed import MicroBatchError, Stepper

    class OOMAbove:
        def __init__(self, rows):
            self.rows, self.seen = rows, []

        def loss(self, model, batch, hp):
            self.seen.append(batch.shape[0])
            if batch.shape[0] > self.rows:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return _Fam.loss(model, batch, hp)

    torch.manual_seed(0)
    net = _net()
    before = copy.deepcopy(net.state_dict())
    fam = OOMAbove(3)
    st = Stepper(fam, net, _HP, strategy="plain", device=torch.device("cpu"), precision="32-true",
                 grad_clip=0.5, total_steps=4)
    x = torch.randn(8, 8)
    micro, failed = st.fit_micro_batch(x)
    assert (micro, st.micro, fam.seen) == (2, 2, [8, 4, 2])
    assert failed == ["8 rows: out of memory", "4 rows: out of memory"]
    assert all(p.grad is None for p in net.parameters()) and not st.opt.state
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    st.step(x)  # and it trains, 4 micro-batches of 2
    assert fam.seen[3:] == [2, 2, 2, 2]
    # a step that runs out later (a wider batch, a neighbour's memory): with shrink_on_oom (set by choose_micro_batch
    # for micro_batch: auto) it is run again in halves, updating once, as a run at that size from the start
    ref_net = copy.deepcopy(net)
    ref = Stepper(_Fam, ref_net, _HP, strategy="plain", device=torch.device("cpu"), precision="32-true",
                  grad_clip=0.5, total_steps=4, micro_batch=1)
    ref.opt.load_state_dict(copy.deepcopy(st.opt.state_dict()))  # (a plain load shares the moment tensors)
    ref.sched.load_state_dict(st.sched.state_dict())
    fam.rows = 1
    with pytest.raises(torch.OutOfMemoryError):
        st.step(x)  # without shrink_on_oom the error is the trial's
    st.shrink_on_oom = True
    assert float(st.step(x)) == pytest.approx(float(ref.step(x)), rel=1e-6)
    assert st.micro == 1 and st.micro_failed[-1] == "2 rows: out of memory in a step"
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # running out in the update itself is raised: the weights may be half updated
    def update_oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory in the update")
    st.opt.step = update_oom
    fam.rows, st.micro, tried = 8, 2, len(st.micro_failed)
    with pytest.raises(torch.OutOfMemoryError, match="in the update"):
        st.step(x)
    assert st.micro == 2 and len(st.micro_failed) == tried  # not taken for a forward's: no smaller retry
    with pytest.raises(MicroBatchError, match=r"8 rows: out of memory; 4 rows.*; 1 rows: out of memory"):
        Stepper(OOMAbove(0), _net(), _HP, strategy="plain", device=torch.device("cpu"), precision="32-true",
                grad_clip=0.5, total_steps=4).fit_micro_batch(x)


def test_longest_batch_is_the_epochs_widest():
    """What micro_batch: auto tries: the first epoch's batch of the longest rows, whole; on it a model
    that fits keeps the whole batch."""
    import torch

    from trainables import speed

    m = _m("plain", extra=["data.max_length=256"])
    p = speed.prepare({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), None)
    assert speed.choose_micro_batch(p, m) is False  # auto tries on a CUDA process only; here the whole batch
    assert p.stepper.micro == 16 and not p.stepper.shrink_on_oom
    ids, _mask, labels = p.longest_batch()
    widths = [b[0].shape[1] for b in p.train_loader(p.seed * 7919 + 1)]
    assert ids.shape == (16, max(widths)) and labels.shape[0] == 16
    assert len(set(widths)) > 1  # the tiny data's rows differ in length, so "longest" means something
    assert p.stepper.fit_micro_batch((ids, _mask, labels)) == (16, [])
    assert all(q.grad is None for q in p.stepper.params) and not p.stepper.opt.state
    assert isinstance(ids, torch.Tensor)


@_CUDA
def test_micro_batch_auto_on_real_cuda_memory():
    """On a GPU: a cap on this process's memory makes the whole batch really run out (CUDA's allocator,
    not a stand-in); fit_micro_batch settles on a smaller micro-batch, a tighter cap later makes a step
    run out and it is run again in halves; a budget below the peak also counts as not fitting."""
    import torch
    from torch import nn

    from trainables.speed import Stepper

    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(2048, 2048), nn.GELU())], nn.Linear(2048, 1)).to(dev)

    class Fam:
        @staticmethod
        def loss(model, batch, hp):
            return model(batch).float().pow(2).mean()

    class HP(_HP):
        batch_size = 16384

    x = torch.randn(16384, 2048, device=dev)  # 134 MB; activations about 64 KB a row (1 GB for the batch)
    st = Stepper(Fam, net, HP, strategy="plain", device=dev, precision="32-true", grad_clip=1.0, total_steps=4)
    total = torch.cuda.get_device_properties(dev).total_memory
    try:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(0.9e9 / total, dev)
        micro, failed = st.fit_micro_batch(x)
        assert 1 < micro < 16384 and failed and all(f.endswith("out of memory") for f in failed), failed
        loss = st.step(x)
        assert torch.isfinite(loss)
        torch.cuda.set_per_process_memory_fraction(0.75e9 / total, dev)
        st.shrink_on_oom = True
        before = st.micro
        assert torch.isfinite(st.step(x)) and st.micro < before
        assert st.micro_failed[-1] == f"{before} rows: out of memory in a step"
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        st2 = Stepper(Fam, net, HP, strategy="plain", device=dev, precision="32-true", grad_clip=1.0, total_steps=4)
        micro2, failed2 = st2.fit_micro_batch(x, budget_bytes=int(0.8e9))
        assert micro2 < 16384 and "over the budget" in failed2[0] and st2.probe_peak[1] <= 0.8e9
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()


@_CUDA
def test_gpu_trial_tries_its_micro_batch_first(tmp_path):
    """A one-GPU trial through the product's trial loop with micro_batch: auto: the try runs before the
    first step (counted as training), the whole batch fits, and every report says so."""
    rep = ListReporter(str(tmp_path / "g"))
    m = resolved(TINY_QWEN, ["training.max_epochs=2", "scheduler.max_t=2", "resources.gpus=1",
                             "training.strategy=plain", "training.compile=false"])
    train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2]
    assert [r["micro_batch"] for r in rep.reports] == [16, 16]
    assert 0 < rep.reports[0]["time_startup_s"] and rep.reports[0]["time_train_s"] > 0


def test_micro_batch_setting_is_checked():
    """training.micro_batch: 'auto' or a whole number >= 1, named in the message; a number for trials that
    run the Lightning loop (which takes whole batches) is refused, saying why."""
    from sweeper.errors import UserError

    assert resolved(TINY_QWEN, [])["training"]["micro_batch"] == "auto"
    assert resolved(TINY_QWEN, ["training.strategy=plain", "training.micro_batch=4"])["training"]["micro_batch"] == 4
    for bad in ("0", "true", "big", "2.5", "-3"):
        with pytest.raises(UserError, match=r"`training.micro_batch`: must be 'auto' or a whole number of rows >= 1"):
            resolved(TINY_QWEN, ["training.strategy=plain", f"training.micro_batch={bad}"])
    for lightning in (["training.micro_batch=4"], ["training.strategy=lightning", "resources.gpus=1", "training.micro_batch=4"]):
        with pytest.raises(UserError, match=r"`training.micro_batch`: the Lightning loop takes whole batches"):
            resolved(TINY_QWEN, lightning)


@_CUDA
@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "bf16")])
def test_deepspeed_resume_cuda(tmp_path, stage, precision):
    """On a GPU, DeepSpeed's bf16 checkpoints (ZeRO 2 and 3) resume through the restricted load
    (``speed.restricted_ds_load``: weights_only with DeepSpeed's few classes allowed), where the CPU tests only saw
    files written on the CPU. (The fast path takes no fp16.)"""
    rep = ListReporter(str(tmp_path / "d"))
    common = ["training.strategy=deepspeed", f"training.precision={precision}", f"training.deepspeed.stage={stage}",
              "resources.gpus=1"]
    for epochs in (1, 2):  # the second run resumes from the first one's DeepSpeed checkpoint
        m = resolved(TINY_QWEN, [f"training.max_epochs={epochs}", f"scheduler.max_t={epochs}", *common])
        train_loop({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
        assert os.path.isdir(os.path.join(rep.checkpoints[-1], "deepspeed", "state"))
    assert [r["epoch"] for r in rep.reports] == [1, 2]
