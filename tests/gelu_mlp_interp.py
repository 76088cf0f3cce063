"""Checks of ``trainables/gelu_mlp.py``'s Triton kernels in Triton's interpreter on the CPU. Run in a fresh
process with ``TRITON_INTERPRET=1`` (Triton decides at import whether its kernels are interpreted) by
``tests/test_gelu_mlp.py``; exits non-zero with the failing check's message. Not collected by pytest itself."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainables import dinov2_fast, gelu_mlp as gm  # noqa: E402

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def close(got, want, dt, what, ulps=2.0, scale=None):
    """Within ``ulps`` units in the last place of ``dt`` at each element's magnitude (or at ``scale``)."""
    got, want = got.float(), want.float()
    tol = ulps * ULP[dt] * (want.abs() if scale is None else torch.full_like(want, scale)) + 1e-6
    bad = (got - want).abs() > tol
    assert not bad.any(), f"{what} ({dt}): {int(bad.sum())} of {bad.numel()} elements off, largest " \
                          f"{float((got - want).abs().max()):.4g} (tolerance there {float(tol[bad].max()):.4g})"


def kernels():
    """Both kernels against PyTorch's unfused arithmetic: a row count that is not a multiple of the tile, a
    K that the K-tile does not divide (the masked path) and one it does, a width not a multiple of the tile."""
    torch.manual_seed(0)
    for dt in (torch.bfloat16, torch.float16):
        for M, K, N in ((100, 96, 130), (70, 80, 64), (100, 96, 136), (150, 40, 64)):
            x = torch.randn(M, K, dtype=dt)
            w1 = (torch.randn(N, K) / K ** 0.5).to(dt)
            b1 = torch.randn(N).to(dt)
            h, g = gm.fc1_gelu(x, w1, b1)
            h_ref = (x.float() @ w1.float().t() + b1.float()).to(dt)
            close(h, h_ref, dt, "fc1_gelu h")
            close(g, F.gelu(h.float()).to(dt), dt, "fc1_gelu g = gelu(h)", ulps=1.0)
            dy = torch.randn(M, K, dtype=dt)
            w2 = (torch.randn(K, N) / N ** 0.5).to(dt)
            dh, db = gm.fc2_dgelu(dy, w2, h)
            dg = (dy.float() @ w2.float()).to(dt)
            dh_ref = torch.ops.aten.gelu_backward(dg.float(), h.float())
            close(dh, dh_ref.to(dt), dt, "fc2_dgelu dh", scale=float(dh_ref.abs().max()))
            close(db, dh_ref.sum(0), dt, "fc2_dgelu bias gradient", scale=float(dh_ref.abs().sum(0).max()))


def function():
    """The autograd function (both kernels and the cuBLAS matmuls around them) against fp32 arithmetic on the
    same bf16 inputs: its output and every gradient no further off than PyTorch's unfused bf16 MLP is (a
    gradient scaled by 1 % shows)."""
    torch.manual_seed(1)
    M, K, N, dt = 150, 48, 192, torch.bfloat16
    ins = [torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N) * 0.5, torch.randn(K, N) / N ** 0.5,
           torch.randn(K) * 0.5]
    ins = [t.to(dt) for t in ins]
    dy = torch.randn(M, K, dtype=dt)

    def run(fn, dtype):
        ts = [t.to(dtype, copy=True).requires_grad_() for t in ins]
        y = fn(*ts)
        y.backward(dy.to(dtype))
        return [y.detach().float()] + [t.grad.float() for t in ts]

    def unfused(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    exact, pytorch, fused = run(unfused, torch.float32), run(unfused, dt), run(gm.gelu_mlp, dt)
    for name, e, p, f in zip(["y", "dx", "dw1", "db1", "dw2", "db2"], exact, pytorch, fused):
        err_p, err_f = float((p - e).abs().max() / e.abs().max()), float((f - e).abs().max() / e.abs().max())
        assert err_f <= 1.5 * err_p + 2e-3, f"gelu_mlp {name}: {err_f:.4g} from fp32, PyTorch's bf16 {err_p:.4g}"


def _tiny_dino():
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14,
                       layerscale_value=0.5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = Dinov2Model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _grads(model, x, g):
    for p in model.parameters():
        p.grad = None
    out = model(pixel_values=x).last_hidden_state
    out.backward(g)
    return out.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def model():
    """A tiny DINOv2 in bf16 with the fast blocks (LayerScale folded, MLP fused): the same outputs and every
    gradient as the unconverted model, to bf16 rounding, eager and traced by torch.compile (the custom ops'
    fake forms and the autograd function)."""
    base = _tiny_dino().to(torch.bfloat16)
    fast = copy.deepcopy(base)
    assert dinov2_fast.convert_layers(fast.encoder.layer) == 2
    assert all(isinstance(b.mlp, gm.GeluMLP) for b in fast.encoder.layer)
    x, g = torch.randn(3, 3, 28, 28, dtype=torch.bfloat16), torch.randn(3, 5, 32, dtype=torch.bfloat16)
    out0, grads0 = _grads(base, x, g)
    calls = []
    orig = gm._GeluMLP.forward
    gm._GeluMLP.forward = staticmethod(lambda ctx, *a: calls.append(1) or orig(ctx, *a))
    try:
        out1, grads1 = _grads(fast, x, g)
    finally:
        gm._GeluMLP.forward = staticmethod(orig)
    assert len(calls) == 2, f"the fused MLP ran {len(calls)} times, not once per block"
    close(out1, out0, torch.bfloat16, "model output", ulps=4, scale=float(out0.abs().max()))
    assert grads1.keys() == grads0.keys()
    for n in grads0:
        if n.endswith(("k_proj.bias", "key.bias")):  # softmax ignores a bias added to every key: zero but for rounding
            continue
        close(grads1[n], grads0[n], torch.bfloat16, f"gradient of {n}", ulps=8, scale=float(grads0[n].abs().max()))
    traced = copy.deepcopy(fast)
    for b in traced.encoder.layer:
        b.compile(backend="aot_eager", fullgraph=True)
    out2, grads2 = _grads(traced, x, g)
    close(out2, out1, torch.bfloat16, "traced output", ulps=1, scale=float(out1.abs().max()))
    for n in grads1:
        close(grads2[n], grads1[n], torch.bfloat16, f"traced gradient of {n}", ulps=1,
              scale=float(grads1[n].abs().max()))


if __name__ == "__main__":
    for check in (kernels, function, model):
        check()
        print(f"{check.__name__}: ok", flush=True)
