"""DINOv2's GELU MLP with the GELU in Triton matmuls' epilogues (trainables/gelu_mlp.py): the kernels, the
autograd function and a converted model checked in Triton's interpreter on the CPU (a fresh process, since
Triton decides at import whether it interprets; ``tests/gelu_mlp_interp.py``), and on CUDA where there is one;
when and how a module is converted, and that it runs its own forward wherever the kernels cannot run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables import dinov2_fast, gelu_mlp as gm

ROOT = Path(__file__).resolve().parent.parent
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mlp(act="gelu"):
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2MLP

    torch.manual_seed(0)
    return Dinov2MLP(Dinov2Config(hidden_size=32, mlp_ratio=4, hidden_act=act))


@pytest.mark.skipif(gm.triton is None, reason="Triton is not installed")
def test_kernels_function_and_model_in_the_interpreter():
    """Both kernels against PyTorch's unfused arithmetic (partial tiles, a K the K-tile does not divide; bf16 and
    fp16); the autograd function's output and every gradient no further from fp32 than PyTorch's bf16 MLP; a
    tiny DINOv2 with the fast blocks against the unconverted one, eager and traced by torch.compile."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gelu_mlp_interp.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.split() == ["kernels:", "ok", "function:", "ok", "model:", "ok"], r.stdout


def test_convert_only_exact_gelu_mlps_and_keep_the_module():
    """An exact-GELU MLP becomes a ``GeluMLP`` in place (same parameters, same state dict, converted once); a
    tanh-approximate or other activation is left alone; on the CPU, and on CUDA in fp32, the converted module
    runs its own forward (the same output, bit for bit)."""
    mlp = _mlp()
    keys, params = list(mlp.state_dict()), [id(p) for p in mlp.parameters()]
    x = torch.randn(5, 7, 32)
    before = mlp(x)
    assert gm.convert(mlp) and isinstance(mlp, gm.GeluMLP)
    assert not gm.convert(mlp)  # already
    assert list(mlp.state_dict()) == keys and [id(p) for p in mlp.parameters()] == params
    assert torch.equal(mlp(x), before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mlp(x), _mlp()(x))
    for act in ("gelu_new", "gelu_pytorch_tanh", "relu", "silu"):
        other = _mlp(act)
        assert not gm.convert(other) and not isinstance(other, gm.GeluMLP), act
    assert gm.is_exact_gelu(F.gelu) and not gm.is_exact_gelu(lambda t: F.gelu(t, approximate="tanh"))
    assert not gm.is_exact_gelu(lambda t: t[:1])  # wrong shape: not GELU, no exception


def test_fast_blocks_convert_the_mlps_and_the_benchmark_switch():
    """``dinov2_fast.convert_layers`` makes every block's MLP a ``GeluMLP`` (its second layer folded with the
    LayerScale); with ``FUSE_MLP`` off (the step benchmark's ``--no-fused-mlp``) only the fold happens."""
    from tests.test_dinov2_fast import _tiny

    model = _tiny()
    assert dinov2_fast.convert_layers(model.encoder.layer) == 2
    assert all(isinstance(b.mlp, gm.GeluMLP) and isinstance(b.mlp.fc2, dinov2_fast.LayerScaledLinear)
               for b in model.encoder.layer)
    w, b = model.encoder.layer[0].mlp.fc2.effective()
    ls = model.encoder.layer[0].layer_scale2.lambda1
    assert torch.equal(w, model.encoder.layer[0].mlp.fc2.weight * ls[:, None]) and torch.equal(
        b, model.encoder.layer[0].mlp.fc2.bias * ls)
    model = _tiny()
    dinov2_fast.FUSE_MLP = False
    try:
        assert dinov2_fast.convert_layers(model.encoder.layer) == 2
    finally:
        dinov2_fast.FUSE_MLP = True
    assert not any(isinstance(b.mlp, gm.GeluMLP) for b in model.encoder.layer)


@_CUDA
@pytest.mark.skipif(gm.triton is None, reason="Triton is not installed")
def test_on_cuda_the_fused_mlp_matches_pytorch():
    """On the GPU, bf16 at a ViT-like width with a row count that is no multiple of any tile: the output and every
    gradient no further from fp32 than PyTorch's bf16 MLP (with slack for the matmuls' order of summation), under
    autocast from fp32 weights and compiled; the module's forward takes the fused path (its function runs)."""
    torch.manual_seed(0)
    M, d, hidden, dt = 1000, 128, 512, torch.bfloat16
    ins = [torch.randn(M, d), torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden) * 0.5,
           torch.randn(d, hidden) / hidden ** 0.5, torch.randn(d) * 0.5]
    ins = [t.cuda().to(dt) for t in ins]
    dy = torch.randn(M, d, device="cuda", dtype=dt)

    def run(fn, dtype):
        ts = [t.to(dtype, copy=True).requires_grad_() for t in ins]
        y = fn(*ts)
        y.backward(dy.to(dtype))
        return [y.detach().float()] + [t.grad.float() for t in ts]

    def unfused(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    exact, pytorch = run(unfused, torch.float32), run(unfused, dt)
    for fn in (gm.gelu_mlp, torch.compile(gm.gelu_mlp)):
        for name, e, p, f in zip(["y", "dx", "dw1", "db1", "dw2", "db2"], exact, pytorch, run(fn, dt)):
            err_p, err_f = float((p - e).abs().max() / e.abs().max()), float((f - e).abs().max() / e.abs().max())
            assert err_f <= 1.5 * err_p + 2e-3, f"{name}: {err_f:.4g} from fp32, PyTorch's bf16 {err_p:.4g}"

    mlp = _mlp().cuda()
    mlp.fc1, mlp.fc2 = nn.Linear(d, hidden).cuda(), nn.Linear(hidden, d).cuda()
    ref = copy.deepcopy(mlp)
    assert gm.convert(mlp)
    x = torch.randn(4, 250, d, device="cuda")
    calls = []
    orig = gm._GeluMLP.forward
    gm._GeluMLP.forward = staticmethod(lambda ctx, *a: calls.append(1) or orig(ctx, *a))
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = mlp(x), ref(x)
    finally:
        gm._GeluMLP.forward = staticmethod(orig)
    assert calls and got.dtype == want.dtype == torch.bfloat16
    assert float((got.float() - want.float()).abs().max()) <= 0.02 * float(want.float().abs().max())
    assert torch.equal(mlp(x), ref(x))  # fp32: its own forward
