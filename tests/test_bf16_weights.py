"""training.bf16_weights (trainables.speed.MasterWeights): the model computes with bf16 weights while AdamW
updates fp32 masters. Checked against a hand-written reference of that scheme, step by step and bit for bit;
checkpoints hold the fp32 masters and a trial resumes from them; the hooks free the model; the setting is
refused, naming the field, where it cannot apply."""

from __future__ import annotations

import copy
import gc
import os
import weakref

import pytest
import torch
from torch import nn

from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.conftest import ROOT, TINY_QWEN
from tests.test_speed import _Fam  # the loss: the model's output against the row sums
from tests.test_trainables import resolved

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _Net(nn.Module):
    """Input layer, two blocks and an output layer; ``skip_bias`` leaves the output bias out of the
    forward (a weight with no gradient in a step: its master must get none, not last step's)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 1)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.norm = nn.LayerNorm(16)
        self.skip_bias = False

    def forward(self, x):
        h = nn.functional.gelu(self.inp(x))
        for b in self.blocks:
            h = h + nn.functional.gelu(b(self.norm(h)))
        return h @ self.out.weight.T + (0 if self.skip_bias else self.out.bias)


class _HP:
    lr, weight_decay, warmup_ratio, batch_size = 1e-2, 0.01, 0.0, 8


def _reference(net: _Net, xs, micro: int, clip: float, dev: str, fused: bool) -> tuple[list[float], list[torch.Tensor]]:
    """The scheme written out: fp32 masters in the optimizer, a bf16 copy of the model for forward and
    backward (under autocast), each micro-batch's bf16 gradients added into fp32, clip_grad_norm_ on the fp32
    gradients, AdamW, the masters rounded back into the copy."""
    masters = net
    work = copy.deepcopy(net).to(torch.bfloat16)
    decay = [p for p in masters.parameters() if p.ndim >= 2]
    no_decay = [p for p in masters.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": _HP.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=_HP.lr, betas=(0.9, 0.95), fused=fused or None)
    losses = []
    for step, x in enumerate(xs):
        work.skip_bias = step % 2 == 1
        total = 0.0
        n = x.shape[0]
        for s in range(0, n, micro):
            b = x[s:s + micro]
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = _Fam.loss(work, b, _HP)
            (loss * (b.shape[0] / n)).backward()
            total += float(loss.detach()) * b.shape[0] / n
            for m, w in zip(masters.parameters(), work.parameters()):
                if w.grad is not None:
                    m.grad = w.grad.float() if m.grad is None else m.grad + w.grad.float()
                    w.grad = None
        nn.utils.clip_grad_norm_([p for p in masters.parameters() if p.grad is not None], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, w in zip(masters.parameters(), work.parameters()):
                w.copy_(m)
        losses.append(total)
    return losses, [p.detach().clone() for p in masters.parameters()]


@pytest.mark.parametrize("dev", ["cpu", "cpu-early", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("micro,clip", [(8, 0.5), (2, 0.5), (2, 1e3)])  # whole batch / 4 micro-batches; clip on / off
def test_bf16_weights_train_as_the_scheme_written_out(dev, micro, clip):
    """Stepper with bf16_weights: the same losses and fp32 masters as ``_reference`` after 6 steps, the model's
    weights are the masters rounded to bf16, a weight left out of a step gets no update from stale gradients,
    and the optimizer holds the masters (fp32) in the model's order. On CUDA with the product's fused AdamW and
    the clip norm summed during the backward from the fp32 buffers (EarlyNorm)."""
    from trainables.speed import EarlyNorm, Stepper, param_groups

    early_on_cpu = dev == "cpu-early"
    dev = "cpu" if early_on_cpu else dev
    torch.manual_seed(0)
    base = _Net().to(dev)
    xs = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(3)).to(dev)
    fused = dev == "cuda" or early_on_cpu
    ref_losses, ref_params = _reference(copy.deepcopy(base), xs, micro, clip, dev, fused=fused)

    net = copy.deepcopy(base)
    names = [n for n, _ in net.named_parameters()]
    st = Stepper(_Fam, net, _HP, strategy="plain", device=torch.device(dev), precision="bf16-mixed",
                 grad_clip=clip, total_steps=6, micro_batch=micro, bf16_weights=True)
    if early_on_cpu:  # what the constructor does on CUDA: the fused AdamW, the clip norm taken block by block
        st.fused_opt = True
        st.opt = torch.optim.AdamW(param_groups(net, _HP.weight_decay, st.master), lr=_HP.lr, betas=(0.9, 0.95), fused=True)
        st.early_norm = EarlyNorm([(n, p) for n, p in net.named_parameters()], st.device, st.master.grad_of)
    assert st.master is not None and (st.early_norm is not None) == fused
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    opt_params = [p for g in st.opt.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in opt_params)
    assert {id(p) for p in opt_params} == {id(p) for p in st.master.masters}
    st.sched = torch.optim.lr_scheduler.LambdaLR(st.opt, lambda s: 1.0)  # the reference has no schedule
    losses = []
    for i in range(6):
        net.skip_bias = i % 2 == 1
        losses.append(float(st.step(xs[i])))
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for name, m, r, w in zip(names, st.master.masters, ref_params, net.parameters()):
        torch.testing.assert_close(m, r, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(w, m.to(torch.bfloat16)), name
    # it trained, and the bias skipped on odd steps moved only on even ones (AdamW's moments aside)
    assert any((m - b).abs().max() > 1e-3 for m, b in zip(st.master.masters, base.parameters()))
    # the checkpoint holds the fp32 masters under the model's own names
    sd = st.full_state_dict()
    assert set(sd) == set(base.state_dict()) and all(v.dtype == torch.float32 for v in sd.values())
    for name, r in zip(names, ref_params):
        torch.testing.assert_close(sd[name], r.cpu(), rtol=1e-6, atol=1e-7)


def test_bf16_weights_hooks_do_not_keep_the_model_alive():
    """The gradient hooks on the bf16 weights reach MasterWeights through a weak reference (see
    test_speed.test_gradient_hooks_do_not_keep_the_model_alive): model, masters and buffers are freed."""
    from trainables.speed import MasterWeights

    model = _Net()
    mw = MasterWeights(model)
    mw.begin()
    mw.arm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 8)).sum().backward()
    assert all(mw.seen) and all(w.grad is None for w in model.parameters())  # taken into the fp32 buffers
    mw.flush()
    alive = ([weakref.ref(p) for p in model.parameters()] + [weakref.ref(p) for p in mw.masters]
             + [weakref.ref(mw)])
    del model, mw
    gc.collect()
    assert [r() is None for r in alive] == [True] * len(alive)


def test_tied_weights_share_one_master():
    """A weight two modules share gets one bf16 copy and one master, and the checkpoint has both names."""
    from trainables.speed import MasterWeights

    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    shared = a.weight
    model = nn.Sequential(a, b)
    mw = MasterWeights(model)
    assert model[0].weight is model[1].weight and model[0].weight.dtype == torch.bfloat16
    assert len(mw.masters) == 3  # the shared weight and the two biases
    named = mw.named_masters(model)
    assert named["0.weight"] is named["1.weight"] is shared and shared.dtype == torch.float32
    assert set(named) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def _m(epochs, extra=()):
    return resolved(TINY_QWEN, [f"training.max_epochs={epochs}", f"scheduler.max_t={epochs}", "training.strategy=plain",
                                "training.precision=bf16", *extra])


def test_bf16_weights_trial_checkpoints_fp32_and_resumes(tmp_path):
    """A real trial (the tiny Qwen, the product's trial loop) with bf16_weights: its checkpoints hold fp32
    weights, it learns as the autocast run does to within bf16's rounding, and a restart resumes from
    the checkpoint (epoch 3 after 2), masters and optimizer state included."""
    from sweeper.checkpoint import load_checkpoint

    hp = {"lr": 3e-3, "batch_size": 16}
    mixed = ListReporter(str(tmp_path / "mixed"))
    train_loop(hp, TrialSpec(manifest=_m(2, ["training.bf16_weights=false"])), mixed)
    rep = ListReporter(str(tmp_path / "o2"))
    train_loop(hp, TrialSpec(manifest=_m(2, ["training.bf16_weights=true"])), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2]
    ck = load_checkpoint(rep.checkpoints[-1])
    assert ck.model_state and all(v.dtype == torch.float32 for v in ck.model_state.values() if v.is_floating_point())
    # bf16 rounding of the elementwise results, not a different training run
    assert [r["train_loss"] for r in rep.reports] == pytest.approx([r["train_loss"] for r in mixed.reports], rel=0.05)
    assert rep.reports[-1]["train_loss"] != rep.reports[0]["train_loss"]
    train_loop(hp, TrialSpec(manifest=_m(3, ["training.bf16_weights=true"])), rep)
    assert [r["epoch"] for r in rep.reports] == [1, 2, 3]
    assert os.path.isdir(rep.checkpoints[-1])


def test_bf16_weights_setting_is_checked():
    """auto by default (a sweep's identity is as before the setting existed); true where it cannot apply is
    refused by the schema check, naming the field and why; at run time likewise (precision auto on a CPU)."""
    from sweeper.errors import UserError
    from trainables.speed import Stepper

    assert resolved(TINY_QWEN, [])["training"]["bf16_weights"] == "auto"
    assert resolved(TINY_QWEN, ["training.strategy=plain", "training.bf16_weights=true"])["training"]["bf16_weights"] is True
    for bad, why in ((["training.strategy=plain", "training.precision=fp32"], "precision fp32"),
                     ([], "the Lightning loop"),
                     (["training.strategy=deepspeed"], "DeepSpeed"),
                     (["training.strategy=ddp", "training.ddp.impl=torch", "resources.gpus=1", "resources.workers=2"],
                      r"2 workers under PyTorch's DDP wrapper \(ddp.impl torch\)"),
                     (["training.strategy=fsdp", "resources.gpus=1", "resources.workers=2"], "2 workers under FSDP")):
        with pytest.raises(UserError, match=rf"`training.bf16_weights`: true needs bf16 .* run {why}"):
            resolved(TINY_QWEN, bad + ["training.bf16_weights=true"])
    # the workers of strategy ddp with the blocks reducer (the default impl) run the fast path's own step
    two = ["training.strategy=ddp", "resources.gpus=1", "resources.workers=2", "training.bf16_weights=true"]
    assert resolved(TINY_QWEN, two)["training"]["bf16_weights"] is True
    with pytest.raises(UserError, match="`training.bf16_weights`"):
        resolved(TINY_QWEN, ["training.bf16_weights=sometimes"])
    with pytest.raises(UserError, match="training.bf16_weights: true needs bf16 precision"):
        Stepper(_Fam, _Net(), _HP, strategy="plain", device=torch.device("cpu"), precision="32-true",
                grad_clip=1.0, total_steps=1, bf16_weights=True)
    # auto: off on the CPU, and off in fp32
    st = Stepper(_Fam, _Net(), _HP, strategy="plain", device=torch.device("cpu"), precision="bf16-mixed",
                 grad_clip=1.0, total_steps=1, bf16_weights="auto")
    assert st.master is None


def test_loss_curve_smoke(tmp_path):
    """benchmarks/loss_curve.py on tiny shapes: both variants train from the same weights on the same batches,
    the bf16-weights curve stays within a few percent of mixed precision's, and the curves are written."""
    import json

    from benchmarks import loss_curve

    out = tmp_path / "c.json"
    s = loss_curve.main(["--manifest", str(ROOT / "search_spaces/qwen2.5-0.5b_regression_gpu.yaml"), "--smoke",
                         "--set", "training.precision=bf16", "--set", "training.strategy=plain", "--hp", "lr=1e-3",
                         "--steps", "12", "--window", "4", "--variant", "mixed:training.bf16_weights=false",
                         "--variant", "bf16w:training.bf16_weights=true", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [runs[k]["bf16_weights"] for k in ("mixed", "bf16w")] == [False, True]
    assert len(runs["bf16w"]["losses"]) == 12 and runs["bf16w"]["losses"] != runs["mixed"]["losses"]
    assert s["variants"]["bf16w"]["max_rel_gap"] < 0.05
    assert runs["bf16w"]["losses"][0] == pytest.approx(runs["mixed"]["losses"][0], rel=0.01)  # same start


def test_where_bf16_weights_apply():
    """The one decision the trial's Stepper and the packing probe share (trainables.speed.uses_bf16_weights)."""
    from sweeper.errors import UserError
    from trainables.speed import uses_bf16_weights

    def uses(knob, cuda=True, strategy="plain", world=1, precision="bf16-mixed", ddp_impl="blocks"):
        return uses_bf16_weights(knob, on_cuda=cuda, strategy=strategy, world=world, precision=precision,
                                 ddp_impl=ddp_impl)

    assert uses("auto") and uses(True) and uses(True, cuda=False)
    assert not uses("auto", cuda=False) and not uses(False)
    assert uses("auto", strategy="ddp") and uses("auto", strategy="fsdp")  # one worker runs the plain step
    assert uses("auto", strategy="ddp", world=2)  # the blocks reducer's workers run it too
    for off in ({"strategy": "ddp", "world": 2, "ddp_impl": "torch"}, {"strategy": "fsdp", "world": 2},
                {"strategy": "deepspeed"},
                {"strategy": "lightning"}, {"precision": "32-true"}, {"precision": "16-mixed"}):
        assert not uses("auto", **off), off
        with pytest.raises(UserError, match="training.bf16_weights: true needs bf16 precision"):
            uses(True, **off)


@_CUDA
def test_packing_probe_holds_the_weights_as_the_trial_will():
    """resources.gpus: auto measures a trial's footprint with the weights held as the trial will hold them:
    bf16 copies, fp32 masters and fp32 gradient buffers where bf16_weights applies, fp32 under autocast where not."""
    from sweeper import packing

    on = packing.probe_peak_bytes(resolved(TINY_QWEN, ["resources.gpus=auto", "training.precision=bf16"]))
    off = packing.probe_peak_bytes(resolved(TINY_QWEN, ["resources.gpus=auto", "training.precision=bf16",
                                                        "training.bf16_weights=false"]))
    assert on["bf16_weights"] is True and off["bf16_weights"] is False
    assert on["peak_bytes"] > 0 and off["peak_bytes"] > 0


def test_bf16_weights_micro_batch_try_and_retry_in_halves():
    """micro_batch: auto with bf16 weights, where a backward runs out of memory halfway (after the later blocks'
    gradients were already taken into fp32): the try leaves masters, optimizer and buffers as they were, and
    a step run again in halves trains exactly as a run at that micro-batch from the start."""
    from trainables.speed import Stepper

    limit = {"rows": 3}

    def boom(grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def arm_boom(mod, inp, out):  # the input layer's output: its gradient comes after the blocks' and the head's
        if out.shape[0] > limit["rows"]:
            out.register_hook(boom)

    torch.manual_seed(0)
    base = _Net()
    net = copy.deepcopy(base)
    net.inp.register_forward_hook(arm_boom)
    st = Stepper(_Fam, net, _HP, strategy="plain", device=torch.device("cpu"), precision="bf16-mixed",
                 grad_clip=0.5, total_steps=6, bf16_weights=True)
    ref = Stepper(_Fam, copy.deepcopy(base), _HP, strategy="plain", device=torch.device("cpu"), precision="bf16-mixed",
                  grad_clip=0.5, total_steps=6, micro_batch=2, bf16_weights=True)
    xs = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(5))
    micro, failed = st.fit_micro_batch(xs[0])
    assert (micro, failed) == (2, ["8 rows: out of memory", "4 rows: out of memory"])
    assert all(w.grad is None for w in net.parameters()) and all(b is None for b in st.master.buf)
    assert not st.opt.state and all(m.grad is None for m in st.master.masters)
    for m, b in zip(st.master.masters, base.parameters()):
        assert torch.equal(m, b)
    for x in xs[:2]:
        assert float(st.step(x)) == float(ref.step(x))
    limit["rows"] = 1  # now 2 rows run out too: the step is run again in micro-batches of 1
    st.shrink_on_oom = True
    ref.micro = 1
    assert float(st.step(xs[2])) == pytest.approx(float(ref.step(xs[2])), rel=1e-6)
    assert st.micro == 1 and st.micro_failed[-1] == "2 rows: out of memory in a step"
    for a, b in zip(st.master.masters, ref.master.masters):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_finished_stepper_with_bf16_weights_is_freed():
    """A trial's Stepper with bf16 weights and EarlyNorm (which reads MasterWeights' buffers through its
    method) leaves nothing alive once dropped: weights, masters, buffers (a reused trial actor must not keep
    the last trial's model; see test_bf16_weights_hooks_do_not_keep_the_model_alive)."""
    from trainables.speed import EarlyNorm, Stepper

    net = _Net()
    st = Stepper(_Fam, net, _HP, strategy="plain", device=torch.device("cpu"), precision="bf16-mixed",
                 grad_clip=0.5, total_steps=2, micro_batch=4, bf16_weights=True)
    st.early_norm = EarlyNorm(list(net.named_parameters()), st.device, st.master.grad_of)
    st.fused_opt = True
    st.opt = torch.optim.AdamW(st.params, lr=1e-2, fused=True)
    st.sched = torch.optim.lr_scheduler.LambdaLR(st.opt, lambda s: 1.0)
    st.step(torch.randn(8, 8))
    alive = [weakref.ref(x) for x in (*net.parameters(), *st.master.masters, st.master, st.early_norm, st)]
    del net, st
    gc.collect()
    assert [r() is None for r in alive] == [True] * len(alive)
