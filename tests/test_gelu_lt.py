"""``training.gelu_epilogue`` (trainables/gelu_lt.py): DINOv2's MLP with its GELU (tanh form) inside cuBLASLt's
matmul epilogues. On the CPU the custom ops run as plain PyTorch, which checks the autograd wiring (every
gradient against autograd's own, eager and compiled), the conversion, the setting's checks and a real trial;
the CUDA tests check cuBLASLt's kernels against fp32 arithmetic and the product's compiled step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.test_trainables import TINY_DINO, resolved
from trainables import dinov2_fast as fast
from trainables import gelu_lt

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _reference(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _operands(m=37, d=16, f=64, e=24, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).mul(0.5).to(device, dtype).requires_grad_()
            for s in ((m, d), (f, d), (f,), (e, f), (e,))]


def _grads(fn, ops, dy):
    ops = [o.detach().clone().requires_grad_() for o in ops]
    y = fn(*ops)
    y.backward(dy)
    return y.detach(), [o.grad for o in ops]


@pytest.mark.parametrize("compiled,bgradb", [(False, False), (True, False), (True, True)])
def test_gelu_mlp_equals_autograd_on_cpu(compiled, bgradb, monkeypatch):
    """The fused MLP's output and all five gradients (input, both weights, both biases) equal autograd's on the
    tanh-GELU MLP, eager and under torch.compile (the custom ops' fake forms), with fc1's weight and bias gradients
    through ``wgrad_bgradb`` too; 3-D inputs keep their shape."""
    monkeypatch.setattr(gelu_lt, "FC1_BGRADB", bgradb)
    ops = _operands()
    dy = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))  # e = 24 != d = 16
    fn = torch.compile(gelu_lt.gelu_mlp, fullgraph=True) if compiled else gelu_lt.gelu_mlp
    y0, g0 = _grads(_reference, ops, dy)
    y1, g1 = _grads(fn, ops, dy)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y0, F.linear(F.gelu(F.linear(*ops[:3])), *ops[3:]))  # tanh is not erf here
    x3 = ops[0].detach().reshape(1, 37, 16)
    assert gelu_lt.gelu_mlp(x3, *ops[1:]).shape == (1, 37, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gelu_lt.gelu_mlp(*ops).dtype == torch.bfloat16


def _tiny(act="gelu", layers=2):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, image_size=28, patch_size=7,
                       layerscale_value=0.5, hidden_act=act)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Dinov2Model(cfg)


def test_converted_dinov2_is_the_tanh_model():
    """Converted in place after the fast blocks' fold: same parameters and state-dict keys, and the same outputs
    and gradients as the unconverted model with tanh GELU (the numerics it claims), close to but not equal to
    the erf model's. Idempotent; an MLP of another shape is left alone."""
    tanh = _tiny("gelu_pytorch_tanh")
    model = _tiny("gelu")
    with torch.no_grad():
        for p, q in zip(model.parameters(), tanh.parameters(), strict=True):
            p.normal_(0.0, 0.3)
            q.copy_(p)
    erf = copy.deepcopy(model)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    assert fast.convert_layers(model.encoder.layer) == 2
    assert gelu_lt.convert_layers(model.encoder.layer) == 2
    assert gelu_lt.convert_layers(model.encoder.layer) == 0
    assert all(isinstance(b.mlp, gelu_lt.GeluEpilogueMLP) for b in model.encoder.layer)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    x, g = torch.randn(3, 3, 28, 28), torch.randn(3, 17, 32)

    def run(mod):
        out = mod(pixel_values=x).last_hidden_state
        out.backward(g)
        return out.detach(), {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}

    out, grads = run(model)
    out_t, grads_t = run(tanh)
    torch.testing.assert_close(out, out_t, rtol=1e-4, atol=1e-4)
    assert grads.keys() == grads_t.keys() and any("fc1.bias" in n for n in grads)
    for n, gr in grads.items():
        if not n.endswith(("k_proj.bias", "key.bias")):  # mathematically zero
            torch.testing.assert_close(gr, grads_t[n], rtol=1e-3, atol=1e-4 * float(grads_t[n].abs().max()))
    out_e = erf(pixel_values=x).last_hidden_state.detach()
    assert not torch.equal(out, out_e) and torch.allclose(out, out_e, rtol=0.05, atol=0.05)

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.activation_fn = nn.Linear(4, 8), nn.Linear(8, 4), nn.SiLU()

    class Renamed(nn.Module):  # transformers 5.17 names the activation ``activation``
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.activation = nn.Linear(4, 8), nn.Linear(8, 4), nn.GELU()

    blocks = nn.ModuleList([nn.Module(), nn.Module()])
    blocks[0].mlp, blocks[1].mlp = SwiGLU(), Renamed()
    assert gelu_lt.convert_layers(blocks) == 1 and isinstance(blocks[1].mlp, gelu_lt.GeluEpilogueMLP)


def test_gelu_epilogue_trial_and_setting(tmp_path):
    """A real tiny-DINOv2 trial on the fast path (CPU: the ops' PyTorch form) converts its MLPs and learns as the
    erf model does; the setting is off by default and leaves a sweep's identity as it was; it is refused, naming
    the field, for Qwen, with FP8 and off the fast path's own step."""
    from sweeper import manifest as mf
    from sweeper.errors import UserError
    from tests.conftest import ROOT
    from trainables import registry, speed
    from trainables.base import HParams, cached_splits

    def m(*extra):
        return resolved(TINY_DINO, ["training.max_epochs=2", "scheduler.max_t=2", "training.strategy=plain",
                                    "training.precision=bf16", *extra])

    hp = {"lr": 3e-3, "batch_size": 16}
    p = speed.prepare(hp, TrialSpec(manifest=m("training.gelu_epilogue=true")), None)
    assert p.stepper.gelu_epilogue == 1
    assert isinstance(p.stepper.model.backbone.encoder.layer[0].mlp, gelu_lt.GeluEpilogueMLP)
    runs = {}
    for name, extra in (("on", ["training.gelu_epilogue=true"]), ("off", [])):
        rep = ListReporter(str(tmp_path / name))
        train_loop(hp, TrialSpec(manifest=m(*extra)), rep)
        runs[name] = [r["train_loss"] for r in rep.reports]
    assert runs["on"] == pytest.approx(runs["off"], rel=0.05) and runs["on"][-1] < runs["on"][0]

    assert m()["training"]["gelu_epilogue"] is False and ("training", "gelu_epilogue") in mf.LATER_DEFAULTS
    demo = ROOT / "search_spaces/qwen-tiny_regression_cpu.yaml"
    assert mf.load(demo, ["training.gelu_epilogue=false"]).identity() == "2d3cf794bc"
    for over, why in (([], "has no GELU MLP"),):
        with pytest.raises(UserError, match="training.gelu_epilogue.*" + why):
            mf.load(demo, ["training.gelu_epilogue=true", *over])
    dino = ROOT / "search_spaces/dinov2-tiny_classifier_cpu.yaml"
    for over, why in ((["training.fp8=true", "training.strategy=plain"], "not with `training.fp8`"),
                      (["training.strategy=deepspeed"], "DeepSpeed"), (["training.strategy=lightning"], "Lightning"),
                      (["training.strategy=ddp", "resources.workers=2"], "2 workers"),
                      (["training.strategy=plain", "training.precision=fp32"], "precision fp32")):
        with pytest.raises(UserError, match="training.gelu_epilogue.*" + why):
            mf.load(dino, ["training.gelu_epilogue=true", *over])
    family, dm = registry.get("dinov2_classifier"), m()
    model = family.build_model(dm["model"], cached_splits(family, dm["data"], dm["model"]),
                               HParams.from_config(hp, family.info.hyperparameters))
    with pytest.raises(UserError, match="training.gelu_epilogue: not with training.fp8"):
        speed.transform_blocks(family, model, torch.device("cpu"), fast_blocks=True, fp8=True, gelu_epilogue=True)
    with pytest.raises(UserError, match="training.gelu_epilogue: .*DeepSpeed|training.gelu_epilogue: .*deepspeed"):
        speed.use_gelu_epilogue(True, family, model, torch.device("cpu"), strategy="deepspeed")
    with pytest.raises(UserError, match="has no GELU MLP"):
        speed.use_gelu_epilogue(True, registry.get("qwen_regression"), model, torch.device("cpu"))
    with pytest.raises(UserError, match="training.gelu_epilogue: .*2 worker"):
        speed.use_gelu_epilogue(True, family, model, torch.device("cpu"), strategy="ddp", world=2)


def test_evaluation_off_the_trial_is_the_tanh_model(tmp_path):
    """The export's test report (``sweeper.trial.evaluate``) scores weights trained with the setting on the tanh
    model the trial trained: ``tanh_layers`` gives the converted model's outputs exactly, and the report differs
    from the erf model's on the same weights."""
    from sweeper import checkpoint as ckpt_mod
    from sweeper.trial import evaluate
    from trainables import registry
    from trainables.base import HParams, cached_splits
    from trainables.speed import repeated_blocks

    m = resolved(TINY_DINO, ["training.strategy=plain", "training.precision=bf16", "training.gelu_epilogue=true"])
    family, hp = registry.get("dinov2_classifier"), {"lr": 1e-3, "batch_size": 16}
    hps = HParams.from_config(hp, family.info.hyperparameters)
    splits = cached_splits(family, m["data"], m["model"])
    model = family.build_model(m["model"], splits, hps)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    assert gelu_lt.convert_layers(repeated_blocks(a, min_len=1)) == gelu_lt.tanh_layers(repeated_blocks(b, min_len=1)) > 0
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(family.forward(a, x), family.forward(b, x), rtol=1e-5, atol=1e-5)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    assert ckpt_mod.load_weights_file(weights).keys() == model.state_dict().keys()
    on = evaluate(m, hp, str(weights), "test", "report")
    off = evaluate({**m, "training": {**m["training"], "gelu_epilogue": False}}, hp, str(weights), "test", "report")
    assert on.keys() == off.keys() and on["test_loss"] != off["test_loss"]
    assert on["test_loss"] == pytest.approx(off["test_loss"], rel=0.05)


@_CUDA
@pytest.mark.parametrize("m", [1, 1000, 4099])
def test_gelu_lt_kernels_on_cuda(m):
    """cuBLASLt's two epilogue matmuls against the same arithmetic in fp32: errors within what PyTorch's own bf16
    path makes (twice its error against fp32, plus bf16's last bit), for a row count that is no multiple of any
    tile."""
    d, f = 64, 256
    x, w1, b1, w2, _ = (o.detach() for o in _operands(m, d, f, 2 * d, torch.bfloat16, "cuda"))
    dy = torch.randn(m, 2 * d, device="cuda", dtype=torch.bfloat16)
    ran = []
    real = gelu_lt._call
    monkey = lambda *a: ran.append(a[0]) or real(*a)  # noqa: E731 - counts the cuBLASLt calls that ran
    gelu_lt._call = monkey
    assert gelu_lt.why_not_ready(torch.device("cuda")) is None
    try:
        act, pre = gelu_lt.linear_gelu(x, w1, b1)
        dpre = gelu_lt.dgelu(dy, w2, pre)
        dw1, db1 = gelu_lt.wgrad_bgradb(dpre, x)
    finally:
        gelu_lt._call = real
    assert ran == ["lt_linear_gelu", "lt_dgelu", "lt_wgrad_bgradb"]  # cuBLASLt's kernels, not the plain path
    pre32 = F.linear(x.float(), w1.float(), b1.float())
    act32 = F.gelu(pre32, approximate="tanh")
    dpre32 = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), pre.float(), approximate="tanh")
    torch_bf16 = {"pre": F.linear(x, w1, b1), "act": F.gelu(F.linear(x, w1, b1), approximate="tanh")}
    torch_bf16["dpre"] = torch.ops.aten.gelu_backward(dy @ w2, pre, approximate="tanh")
    dw32, db32 = dpre.float().t() @ x.float(), dpre.float().sum(0)
    torch_bf16["dw1"], torch_bf16["db1"] = dpre.t() @ x, dpre.sum(0)
    for name, got, want in (("pre", pre, pre32), ("act", act, act32), ("dpre", dpre, dpre32), ("dw1", dw1, dw32),
                            ("db1", db1, db32)):
        err = (got.float() - want).abs().max().item()
        ref = (torch_bf16[name].float() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2 * ref + scale / 128, (name, err, ref, scale)


@_CUDA
@pytest.mark.parametrize("bgradb", [False, True])
def test_gelu_epilogue_compiled_step_on_cuda(bgradb, monkeypatch):
    """The product's compiled bf16 step with the GELU epilogues (the cuBLASLt kernels) on the GPU: its losses
    match the tanh MLP's in plain PyTorch (the same ops taking their PyTorch form) to bf16 rounding; also with
    fc1's weight and bias gradients in one matmul (``FC1_BGRADB``)."""
    from trainables import speed

    monkeypatch.setattr(gelu_lt, "FC1_BGRADB", bgradb)

    losses = {}
    for lt in (True, False):
        m = resolved(TINY_DINO, ["training.max_epochs=1", "scheduler.max_t=1", "resources.gpus=1",
                                 "training.compile=true", "training.gelu_epilogue=true",
                                 "model.config_overrides.image_size=56", "model.config_overrides.patch_size=7",
                                 "model.config_overrides.hidden_size=64"])
        torch.manual_seed(0)
        p = speed.prepare({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=m), None)
        assert p.stepper.gelu_epilogue >= 1 and p.stepper.compiled
        orig, real, ran = gelu_lt._lt_ok, gelu_lt._call, []
        if not lt:
            gelu_lt._lt_ok = lambda *t: False
        gelu_lt._call = lambda *a: ran.append(a[0]) or real(*a)
        try:
            losses[lt] = [float(p.stepper.step(b)) for _ in range(2) for b in p.train_loader(0)]
        finally:
            gelu_lt._lt_ok, gelu_lt._call = orig, real
        assert (len(ran) > 0) == lt  # the kernels ran in one arm only
        assert ("lt_wgrad_bgradb" in ran) == (lt and bgradb)
    assert all(v == v for v in losses[True]) and losses[True][0] == pytest.approx(losses[False][0], rel=0.01)
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


def test_gelu_lt_build_failure_is_one_message(tmp_path, monkeypatch):
    """The kernels' build runs the real C compiler: a toolkit whose cuBLASLt header does not compile gives one
    RuntimeError naming the setting, the file and the compiler's complaint (use_gelu_epilogue turns it into the
    trial's UserError), and leaves no half-written library in the cache; nothing is cached for a failed build.
    A PyTorch without CUDA is named as the reason on a CUDA device."""
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    (tmp_path / "cuda" / "include").mkdir(parents=True)
    (tmp_path / "cuda" / "include" / "cublasLt.h").write_text("this is not C;\n")
    monkeypatch.setattr(gelu_lt, "_cuda_home", lambda: tmp_path / "cuda")
    monkeypatch.setattr(gelu_lt, "_LIB", None)
    monkeypatch.setenv("SWEEPER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"(?s)training.gelu_epilogue: building gelu_lt.c failed: .*cublasLt.h"):
        gelu_lt.library()
    assert list((tmp_path / "cache").iterdir()) == [] and gelu_lt._LIB is None
    if torch.version.cuda is None:
        assert gelu_lt.why_not_ready(torch.device("cuda")) == "this PyTorch was built without CUDA"
    assert gelu_lt.why_not_ready(torch.device("cpu")) is None
