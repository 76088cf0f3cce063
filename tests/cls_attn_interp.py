"""Checks of ``trainables/cls_attn.py``'s Triton kernels in Triton's interpreter on the CPU. Run in a fresh
process with ``TRITON_INTERPRET=1`` (Triton decides at import whether its kernels are interpreted) by
``tests/test_cls_attn.py``; exits non-zero with the failing check's message. Not collected by pytest itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainables import cls_attn as ca  # noqa: E402

# tiles the interpreter runs in seconds; tl.dot needs 16 or more a side
SMALL = dict(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, kv_n=16, kv_m=16, warps_fwd=4, warps_dq=4, warps_kv=4,
             stages_fwd=1, stages_dq=1, stages_kv=1)
MIXED = dict(SMALL, fwd_m=32, dq_n=32, kv_n=32)


def qkv(B, H, T, D, layout, dt, seed):
    """q, k, v as [B, H, T, D]; ``bthd``: views of [B, T, H, D] tensors (as the model's projections give)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(B, T, H, D, generator=g) * 1.5
        x = x.transpose(1, 2) if layout == "bthd" else x.transpose(1, 2).contiguous()
        out.append(x.to(dt).requires_grad_(True))
    return out


def check(B, H, T, D, layout, cfg, scale=None, seed=0):
    q, k, v = qkv(B, H, T, D, layout, torch.float32, seed)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed + 1))
    sc = D ** -0.5 if scale is None else scale
    why = ca.supported(q, k, v, cfg=cfg)
    assert why is None, why
    o, lse = ca._forward(q.detach(), k.detach(), v.detach(), sc, cfg)
    assert o.shape == (B, H, T, D) and o.transpose(1, 2).is_contiguous(), (o.shape, o.stride())
    ref = F.scaled_dot_product_attention(q, k, v, scale=sc)
    ref.backward(do)
    s = (q.detach() @ k.detach().transpose(-1, -2)) * sc
    want_lse = torch.logsumexp(s, -1) * ca.LOG2E
    dq, dk, dv = ca._backward(do, q.detach(), k.detach(), v.detach(), o, lse, sc, cfg)
    for name, got, want in (("out", o, ref.detach()), ("lse", lse, want_lse), ("dq", dq, q.grad),
                            ("dk", dk, k.grad), ("dv", dv, v.grad)):
        err = float((got.float() - want.float()).abs().max())
        tol = 2e-4 * max(1.0, float(want.abs().max()))
        assert err <= tol, f"{name} B{B} H{H} T{T} D{D} {layout} {cfg['fwd_m']}: off by {err:.3g} (tol {tol:.3g})"
    # the CLS row of every output is the one the tiles do not cover: checked on its own, by value
    for name, got, want in (("out[cls]", o[:, :, 0], ref.detach()[:, :, 0]), ("dk[cls]", dk[:, :, 0], k.grad[:, :, 0]),
                            ("dv[cls]", dv[:, :, 0], v.grad[:, :, 0]), ("dq[cls]", dq[:, :, 0], q.grad[:, :, 0])):
        assert torch.allclose(got.float(), want.float(), atol=2e-4, rtol=1e-4), name


def kernels():
    check(2, 3, 33, 16, "bthd", SMALL)
    check(1, 2, 65, 32, "bhtd", SMALL, scale=0.3, seed=3)
    check(2, 2, 65, 16, "bthd", MIXED, seed=5)
    # one CLS token that dominates every softmax: its column and row carry nearly all the weight
    q, k, v = qkv(1, 1, 33, 16, "bthd", torch.float32, 7)
    with torch.no_grad():
        k[:, :, 0] *= 0
        k[:, :, 0] += q.mean(2) * 20
    o, _ = ca._forward(q.detach(), k.detach(), v.detach(), 0.25, SMALL)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert torch.allclose(o, ref, atol=1e-4), float((o - ref).abs().max())
    print("kernels: ok")


def ops():
    """The custom ops with autograd, in fp16, against PyTorch's fp16 attention: no further from fp32 than it is;
    traced by torch.compile too; at two tilings. (fp16, not bf16: Triton 3.9's interpreter multiplies bf16
    tiles wrongly, by about 1e10 on a 16 × 16 product of normal values; bf16 is checked on CUDA,
    ``test_cls_attn.py``.)"""
    q32, k32, v32 = qkv(2, 2, 33, 32, "bthd", torch.float32, 11)
    do = torch.randn(2, 2, 33, 32, generator=torch.Generator().manual_seed(12))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    ref.backward(do)
    want = [ref.detach(), q32.grad, k32.grad, v32.grad]
    for cfg in (SMALL, MIXED):
        ca.CONFIG.update(cfg)
        results = {}
        for name, fn in (("ours", ca.cls_attention), ("torch", F.scaled_dot_product_attention),
                         ("compiled", torch.compile(ca.cls_attention, fullgraph=True))):
            q, k, v = (x.detach().to(torch.float16).requires_grad_(True) for x in (q32, k32, v32))
            out = fn(q, k, v)
            out.backward(do.to(torch.float16))
            results[name] = [out.detach(), q.grad, k.grad, v.grad]
        for i, what in enumerate(("out", "dq", "dk", "dv")):
            err = {n: float((r[i].float() - want[i]).abs().max()) for n, r in results.items()}
            assert err["ours"] <= 2 * err["torch"] + 1e-3, f"{cfg['fwd_m']} {what}: {err}"
            assert err["compiled"] <= 2 * err["torch"] + 1e-3, f"{cfg['fwd_m']} {what}: {err}"
    print("ops: ok")


def qkv_ops():
    """The fused projection's ops (q, k, v read from one [B, T, 3, H, D] tensor, its gradient written as one)
    against PyTorch's fp32 attention over the same three slices, in fp32."""
    ca.CONFIG.update(SMALL)
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(2, 33, 3, 2, 16, generator=g) * 1.5).requires_grad_(True)
    do = torch.randn(2, 2, 33, 16, generator=g)
    ref = F.scaled_dot_product_attention(*(x.select(2, i).transpose(1, 2) for i in range(3)))
    ref.backward(do)
    want = x.grad.clone()
    x.grad = None
    out = ca.cls_attn_qkv_fwd(x, 16 ** -0.5)[0]
    out.backward(do)
    assert x.grad.shape == x.shape and x.grad.is_contiguous()
    for name, got, w in (("out", out.detach(), ref.detach()), ("dqkv", x.grad, want)):
        err = float((got - w).abs().max())
        assert err <= 2e-4 * max(1.0, float(w.abs().max())), f"qkv {name}: off by {err:.3g}"
    print("qkv: ok")


def module():
    """A DINOv2 (1 + 64 tokens, two layers) whose attention ``ca.use`` fused: in fp16 no further from the fp32
    model than the same model on PyTorch's fp16 SDPA, output and every parameter's gradient, eager and compiled;
    the fused op runs, and the state dict is the original's."""
    from transformers import Dinov2Config, Dinov2Model

    ca.CONFIG.update(SMALL)
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=56, patch_size=7)
    ref = Dinov2Model(cfg)
    sd = ref.state_dict()
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))

    def run(m, dt):
        m.zero_grad(set_to_none=True)
        y = m(pixel_values=pix.to(dt)).last_hidden_state
        y.float().square().mean().backward()
        return [y.detach().float()] + [p.grad.float() for n, p in sorted(m.named_parameters()) if p.grad is not None]

    want = run(ref, torch.float32)
    sdpa = Dinov2Model(cfg).half()
    sdpa.load_state_dict(sd)
    base = run(sdpa, torch.float16)
    calls = []
    fwd = ca._forward
    ca._forward = lambda *a: calls.append(1) or fwd(*a)
    try:
        fused = Dinov2Model(cfg).half()
        fused.load_state_dict(sd)
        assert ca.use(fused) == 2, "both layers fused"
        assert fused.state_dict().keys() == sd.keys()
        for name, m in (("eager", fused), ("compiled", torch.compile(fused))):
            calls.clear()
            got = run(m, torch.float16)
            assert calls, f"{name}: the fused op did not run"
            assert len(got) == len(want) == len(base) > 20
            for i, (a, b, w) in enumerate(zip(got, base, want)):
                err, err_b = float((a - w).abs().max()), float((b - w).abs().max())
                assert err <= 2 * err_b + 2e-3 * max(1.0, float(w.abs().max())), f"{name} tensor {i}: {err} vs {err_b}"
    finally:
        ca._forward = fwd
    print("module: ok")


if __name__ == "__main__":
    kernels()
    ops()
    qkv_ops()
    module()
