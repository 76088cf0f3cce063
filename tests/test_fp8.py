"""training.fp8 (trainables.fp8): the blocks' linear layers multiply in FP8 with tensorwise scaling. Checked
against the same arithmetic written out (the operands quantised with the same scales, multiplied in fp32) and
against the bf16 layer it replaces; outliers and zeros; which layers change, with the state dict as it was;
a real tiny-Qwen trial that trains, checkpoints and resumes with it; refused, naming the field, where it
cannot run. PyTorch's CPU kernel for ``_scaled_mm`` does the arithmetic here; the CUDA cases run the same
checks on a GPU of compute capability 8.9 or newer."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.conftest import TINY_QWEN
from tests.test_trainables import resolved
from trainables import fp8

_FP8_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                              reason="needs a CUDA GPU of compute capability 8.9 or newer")
DEVS = ["cpu", pytest.param("cuda", marks=_FP8_GPU)]


def _pair(dev: str, dtype: torch.dtype, bias: bool = True, k: int = 128, n: int = 96):
    torch.manual_seed(0)
    ref = nn.Linear(k, n, bias=bias).to(dev, dtype)
    lin = copy.deepcopy(ref)
    assert fp8.convert_blocks(nn.ModuleList([lin])) == 1 and isinstance(lin, fp8.Float8Linear)
    return lin, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dev", DEVS)
def test_fp8_linear_is_the_arithmetic_written_out(dev):
    """Forward and both gradients equal the FP8 recipe done by hand: each operand scaled by a power of two that
    puts its amax under the format's largest number, cast (E4M3 forward, E5M2 for the output's gradient),
    multiplied in fp32 and unscaled. Then the bias, and its gradient, as in bf16."""
    lin, _ = _pair(dev, torch.bfloat16)
    x = (torch.randn(2, 32, 128, device=dev) * 3).to(torch.bfloat16).requires_grad_()
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)

    def q(t, fmax, dtype):
        s = fp8.scale_for(t, fmax)
        assert s == 2.0 ** torch.floor(torch.log2(fmax / t.float().abs().max()))  # a power of two, amax under fmax
        return (t.float() * s).to(dtype).float() / s

    xd = q(x.detach().reshape(64, 128), fp8.E4M3_MAX, fp8.E4M3)
    wd = q(lin.weight.detach(), fp8.E4M3_MAX, fp8.E4M3)
    gd = q(g.reshape(64, 96), fp8.E5M2_MAX, fp8.E5M2)
    # fp32 accumulation in another order: a few bf16 ulps apart at most
    torch.testing.assert_close(y.reshape(64, 96).float(), xd @ wd.T + lin.bias.float(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.reshape(64, 128).float(), gd @ wd, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(lin.weight.grad.float(), gd.T @ xd, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(lin.bias.grad.float(), g.reshape(64, 96).float().sum(0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dev", DEVS)
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_fp8_linear_against_the_layer_it_replaces(dev, dtype, autocast):
    """Results in the dtype ``F.linear`` gives (autocast's, else the input's), gradients in the weights' and
    inputs' dtypes, within FP8's rounding of the bf16 layer (3 mantissa bits forward, 2 for the gradient)."""
    lin, ref = _pair(dev, dtype)
    x = torch.randn(4, 16, 128, device=dev, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        y, y2 = lin(x), ref(x2)
    assert y.dtype == y2.dtype and y.shape == y2.shape
    g = torch.randn_like(y2)
    y.backward(g)
    y2.backward(g)
    assert x.grad.dtype == dtype and lin.weight.grad.dtype == dtype and lin.bias.grad.dtype == dtype
    assert _rel(y, y2) < 0.06
    assert _rel(x.grad, x2.grad) < 0.10 and _rel(lin.weight.grad, ref.weight.grad) < 0.10
    assert _rel(lin.bias.grad, ref.bias.grad) < 0.01
    assert _rel(y, y2) > 1e-3  # it did multiply in FP8


@pytest.mark.parametrize("dev", DEVS)
def test_fp8_outliers_and_zeros(dev):
    """A value far past E4M3's range does not overflow (inf or NaN): the scale brings it in. An all-zero input
    gives zeros, not NaN (the scale of an all-zero tensor is finite). Rows not a multiple of 16 take the bf16
    matmul."""
    lin, ref = _pair(dev, torch.bfloat16, bias=False)
    x = torch.randn(16, 128, device=dev, dtype=torch.bfloat16)
    x[3, 5] = 1e30  # one huge outlier: everything else scaled far down, nothing overflows
    assert torch.isfinite(lin(x)).all()
    z = torch.zeros(16, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    out = lin(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(z.grad).all()
    odd = torch.randn(3, 5, 128, device=dev, dtype=torch.bfloat16)  # 15 rows
    assert torch.equal(lin(odd), ref(odd))


def test_convert_blocks_changes_only_the_blocks_linears():
    """The repeated blocks' aligned linear layers become Float8Linear in place; the embedding, the head and a
    layer whose width _scaled_mm cannot take stay; parameter objects and state-dict keys are unchanged."""
    from trainables import registry
    from trainables.base import HParams, cached_splits
    from trainables.speed import repeated_blocks

    m = resolved(TINY_QWEN, [])
    family = registry.get(m["trainable"])
    splits = cached_splits(family, m["data"], m["model"])
    model = family.build_model(m["model"], splits, HParams.from_config({"lr": 1e-3, "batch_size": 16},
                                                                       family.info.hyperparameters))
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    blocks = repeated_blocks(model, min_len=1)  # the tiny Qwen has one layer
    want = [n for n, mod in blocks.named_modules() if type(mod) is nn.Linear
            and mod.in_features % 16 == 0 and mod.out_features % 16 == 0]
    outside = [mod for mod in model.modules() if isinstance(mod, nn.Linear)
               and not any(mod is b for b in blocks.modules())]
    assert want and outside  # the tiny Qwen has both: the check below is not empty
    assert fp8.convert_blocks(blocks) == len(want)
    assert [n for n, mod in blocks.named_modules() if isinstance(mod, fp8.Float8Linear)] == want
    assert not any(isinstance(mod, fp8.Float8Linear) for mod in outside)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    odd = nn.ModuleList([nn.Linear(24, 16), nn.Linear(16, 16)])
    assert fp8.convert_blocks(odd) == 1 and type(odd[0]) is nn.Linear
    toy = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(16, 16)]), "head": nn.Linear(16, 16)})
    assert fp8.convert_blocks(toy["blocks"]) == 1 and type(toy["head"]) is nn.Linear  # aligned, but outside


def test_fp8_compiled_as_eager():
    """The layer compiles (the blocks are compiled in the product) and gives what it gives in eager mode."""
    lin, _ = _pair("cpu", torch.bfloat16)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    comp = torch.compile(lin)
    torch.testing.assert_close(comp(x), lin(x), rtol=1e-2, atol=1e-2)


def _m(epochs, extra=()):
    return resolved(TINY_QWEN, [f"training.max_epochs={epochs}", f"scheduler.max_t={epochs}", "training.strategy=plain",
                                "training.precision=bf16", *extra])


def test_fp8_trial_learns_checkpoints_and_resumes(tmp_path):
    """A real trial (tiny Qwen, the product's trial loop) with fp8, on its own and with bf16 weights: it
    learns about as the bf16 run does, its checkpoint holds the model's own keys in fp32, and a restart
    resumes from it."""
    from sweeper.checkpoint import load_checkpoint

    hp = {"lr": 3e-3, "batch_size": 16}
    base = ListReporter(str(tmp_path / "bf16"))
    train_loop(hp, TrialSpec(manifest=_m(2)), base)
    for name, extra in (("fp8", ["training.fp8=true"]),
                        ("fp8-o2", ["training.fp8=true", "training.bf16_weights=true"])):
        rep = ListReporter(str(tmp_path / name))
        train_loop(hp, TrialSpec(manifest=_m(2, extra)), rep)
        losses = [r["train_loss"] for r in rep.reports]
        assert losses == pytest.approx([r["train_loss"] for r in base.reports], rel=0.1), name
        assert losses != [r["train_loss"] for r in base.reports], name  # FP8 did change the arithmetic
        ck = load_checkpoint(rep.checkpoints[-1])
        assert set(ck.model_state) == set(load_checkpoint(base.checkpoints[-1]).model_state)
        assert all(v.dtype == torch.float32 for v in ck.model_state.values() if v.is_floating_point())
        train_loop(hp, TrialSpec(manifest=_m(3, extra)), rep)
        assert [r["epoch"] for r in rep.reports] == [1, 2, 3] and os.path.isdir(rep.checkpoints[-1])


def test_fp8_setting_is_checked():
    """Off by default (a sweep's identity is as before the setting existed); where it does not run (the Lightning
    loop, DeepSpeed, FSDP or PyTorch's DDP wrapper over several workers) refused by the schema check and by the trial, naming the field; a device
    that cannot multiply in FP8 refused at the start of the trial."""
    from sweeper import manifest as mf
    from sweeper.errors import UserError
    from trainables.speed import use_fp8

    assert resolved(TINY_QWEN, [])["training"]["fp8"] is False
    assert ("training", "fp8") in mf.LATER_DEFAULTS
    assert resolved(TINY_QWEN, ["training.strategy=plain", "training.fp8=true"])["training"]["fp8"] is True
    for bad, why in (([], "the Lightning loop"),
                     (["training.strategy=lightning", "resources.gpus=1"], "the Lightning loop"),
                     (["training.strategy=deepspeed"], "DeepSpeed"),
                     (["training.strategy=ddp", "training.ddp.impl=torch", "resources.gpus=1", "resources.workers=2"],
                      r"2 workers under PyTorch's DDP wrapper \(ddp.impl torch\)"),
                     (["training.strategy=fsdp", "resources.gpus=1", "resources.workers=2"], "2 workers under FSDP")):
        with pytest.raises(UserError, match=rf"`training.fp8`: true needs the fast path's own step.* run {why}"):
            resolved(TINY_QWEN, bad + ["training.fp8=true"])
    with pytest.raises(UserError, match=r"training.fp8: true needs the fast path's own step .* strategy ddp \(ddp.impl "
                                        r"torch\), 2 worker"):
        use_fp8(True, nn.Sequential(nn.Linear(16, 16)), torch.device("cpu"), strategy="ddp", world=2, ddp_impl="torch")
    with pytest.raises(UserError, match=r"training.fp8: true needs the fast path's own step .* strategy fsdp, 2 worker"):
        use_fp8(True, nn.Sequential(nn.Linear(16, 16)), torch.device("cpu"), strategy="fsdp", world=2)
    # the workers of strategy ddp with the blocks reducer (the default impl) run the fast path's own step
    assert resolved(TINY_QWEN, ["training.strategy=ddp", "resources.gpus=1", "resources.workers=2",
                                "training.fp8=true"])["training"]["fp8"] is True
    assert use_fp8(True, nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)]), torch.device("cpu"),
                   strategy="ddp", world=2) == 2
    with pytest.raises(UserError, match="`training.fp8`"):
        resolved(TINY_QWEN, ["training.strategy=plain", "training.fp8=maybe"])
    assert fp8.fp8_ready(torch.device("cpu")) is None
    assert "CUDA or the CPU" in fp8.fp8_ready(torch.device("meta"))
    with pytest.raises(UserError, match="training.fp8: FP8 matmuls need CUDA or the CPU"):
        use_fp8(True, nn.Sequential(nn.Linear(16, 16)), torch.device("meta"))
    net = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
    assert use_fp8(False, net, torch.device("meta")) == 0 and type(net[0]) is nn.Linear


@_FP8_GPU
def test_fp8_packing_probe_and_compiled_step_on_cuda():
    """On the GPU: the packing probe holds the model as the trial will (FP8 layers, a smaller footprint at the
    same batch), and the product's compiled step with bf16 weights trains."""
    from sweeper import packing
    from trainables import speed
    from trainables.base import HParams

    over = ["resources.gpus=auto", "training.precision=bf16", "search.space.batch_size=64"]
    on = packing.probe_peak_bytes(resolved(TINY_QWEN, over + ["training.fp8=true"]))
    off = packing.probe_peak_bytes(resolved(TINY_QWEN, over))
    assert 0 < on["peak_bytes"] and 0 < off["peak_bytes"]

    m = _m(1, ["training.fp8=true", "resources.gpus=1", "training.compile=true"])
    p = speed.prepare({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), None)
    assert p.stepper.fp8 > 0 and p.stepper.master is not None and p.stepper.compiled
    assert isinstance(p.hp, HParams)
    losses = [float(p.stepper.step(b)) for _ in range(3) for b in p.train_loader(0)]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]


# two decoder layers: with one, there are no repeated blocks to compile (and so no CUDA graphs)
_TWO_LAYERS = "model.config_overrides.num_hidden_layers=2"


def _graphs_recorded() -> int:
    """How many compiled functions PyTorch's CUDA graph trees have recorded graphs for on this GPU (since the
    last ``torch._dynamo.reset()``)."""
    from torch._inductor import cudagraph_trees

    mgr = cudagraph_trees.get_manager(torch.cuda.current_device(), False)
    return 0 if mgr is None else len(mgr.roots)


@_FP8_GPU
@pytest.mark.parametrize("micro", [None, 8])
def test_fp8_steps_with_cuda_graphs_equal_steps_without_on_cuda(monkeypatch, micro):
    """On the GPU a compiled FP8 step with bf16 weights replays its blocks as CUDA graphs
    (``speed.use_cudagraphs``), and computes what the same step without them does: the fp32 masters after
    three steps agree, with the whole batch in one forward and with 8-row micro-batches (gradients
    accumulated over 3 parts: a CUDA graph's outputs are overwritten by its next replay,
    pytorch/pytorch#169545). Without bf16 weights, or without FP8, the blocks keep plain launches."""
    from trainables import speed

    from torch._dynamo.utils import counters

    hp = {"lr": 3e-3, "batch_size": 24}
    over = ["resources.gpus=1", "training.compile=true", "training.fp8=true", _TWO_LAYERS,
            *([f"training.micro_batch={micro}"] if micro else [])]
    orig = speed.use_cudagraphs
    masters = {}
    for graphs in (True, False):
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(speed, "use_cudagraphs", orig if graphs else (lambda **kw: False))
        p = speed.prepare(hp, TrialSpec(manifest=_m(1, over)), None)
        assert p.stepper.cudagraphs is graphs and p.stepper.fp8 > 0 and p.stepper.master is not None
        assert p.stepper.compiled == 2  # the two decoder layers, each compiled in place
        start = [w.detach().float().cpu().clone() for w in p.stepper.master.masters]
        batches = list(p.train_loader(0))
        assert [speed.batch_units(b)[0] for b, _ in p.stepper.parts(batches[0])] == ([8, 8, 8] if micro else [24])
        losses = [float(p.stepper.step(b)) for b in [*batches, batches[0]]]
        assert all(v == v for v in losses)
        # graphs were recorded (the blocks' forward and backward) and none was skipped; none without them
        assert (_graphs_recorded() > 0) is graphs and not counters["inductor"]["cudagraph_skips"]
        masters[graphs] = [w.detach().float().cpu().clone() for w in p.stepper.master.masters]
    monkeypatch.setattr(speed, "use_cudagraphs", orig)
    assert max(_rel(a, b) for a, b in zip(masters[True], masters[False])) < 1e-3
    assert min(_rel(a, b) for a, b in zip(masters[True], start)) > 1e-4  # the steps did move every weight
    for off in (["training.fp8=true", "training.bf16_weights=false", _TWO_LAYERS], [_TWO_LAYERS],
                ["training.fp8=true"]):  # bf16 weights off; FP8 off; no repeated blocks to compile
        p = speed.prepare(hp, TrialSpec(manifest=_m(1, ["resources.gpus=1", "training.compile=true", *off])), None)
        assert not p.stepper.cudagraphs


@_FP8_GPU
def test_fp8_trial_with_cuda_graphs_on_cuda(tmp_path, monkeypatch):
    """A real compiled FP8 trial on the GPU with CUDA graphs (the memory try of ``micro_batch: auto``, training,
    evaluation, checkpoints) learns as the same trial without them does, and a restart resumes."""
    from trainables import speed

    hp = {"lr": 3e-3, "batch_size": 24}
    gpu = ["resources.gpus=1", "training.compile=true", "training.fp8=true", _TWO_LAYERS]
    orig = speed.use_cudagraphs
    reports = {}
    for graphs in (True, False):
        torch._dynamo.reset()
        monkeypatch.setattr(speed, "use_cudagraphs", orig if graphs else (lambda **kw: False))
        rep = ListReporter(str(tmp_path / f"graphs-{graphs}"))
        train_loop(hp, TrialSpec(manifest=_m(2, gpu)), rep)
        assert (_graphs_recorded() > 0) is graphs
        if graphs:
            train_loop(hp, TrialSpec(manifest=_m(3, gpu)), rep)
        reports[graphs] = rep
    on, off = reports[True].reports, reports[False].reports
    assert [r["epoch"] for r in on] == [1, 2, 3] and os.path.isdir(reports[True].checkpoints[-1])
    for key in ("train_loss", "val_loss"):
        got, want = [r[key] for r in on[:2]], [r[key] for r in off]
        assert all(v == v for v in got) and got == pytest.approx(want, rel=0.01), key
