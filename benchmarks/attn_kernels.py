"""ViT-B/14's attention (257 tokens: 256 patches and CLS; 12 heads of 64) forward + backward, side by side in
one process on one GPU: PyTorch's SDPA (cuDNN on the H100, and FlashAttention-2) against FlexAttention's
Triton kernels at several tile sizes. At 257 tokens 128-row tiles cover 384 rows (3 × 3 tiles where 256
tokens take 2 × 2); 64-row tiles cover 320. Whether a smaller tile pays for the rest of the kernel is what
this measures.

    python3 benchmarks/attn_kernels.py --out $OUT/attn.jsonl

One JSON line per variant: milliseconds a forward + backward (median of rounds), the ratio to cuDNN's, the
attention TFLOP/s counted at 257 tokens, and the largest difference from cuDNN's output and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.jsonl import emit  # noqa: E402


def main(argv=None):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    B, H, S, D = a.batch, 12, a.tokens, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    flex = torch.compile(flex_attention)

    def sdpa(backend):
        def f():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return f

    def flexed(opts):
        return lambda: flex(q, k, v, kernel_options=opts or None)

    variants = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash2": sdpa(SDPBackend.FLASH_ATTENTION),
                "flex-default": flexed({})}
    for bm, bn in ((64, 64), (128, 64), (64, 128)):
        variants[f"flex-fwd{bm}x{bn}"] = flexed({"fwd_BLOCK_M": bm, "fwd_BLOCK_N": bn})
    variants["flex-64-bwd32x64"] = flexed({"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 32,
                                           "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32})
    variants["flex-64-bwd64x64"] = flexed({"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64,
                                           "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64})

    def step(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(dout)
        return out

    ref = None
    ok, results = {}, {}
    for name, fn in variants.items():
        try:
            for _ in range(3):
                out = step(fn)
            torch.cuda.synchronize()
            got = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
            if ref is None:
                ref = got
            results[name] = {"max_diff_vs_cudnn": [round(float((g - r).abs().max()), 5) for g, r in zip(got, ref)]}
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - a tile size this GPU's shared memory cannot take: reported
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    times = {n: [] for n in ok}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(a.rounds):
        for n, fn in ok.items():
            start.record()
            for _ in range(a.iters):
                step(fn)
            end.record()
            torch.cuda.synchronize()
            times[n].append(start.elapsed_time(end) / a.iters)
    flops = 4 * B * H * S * S * D * 3.5  # forward 2 matmuls, backward 5 (counted as 2.5 × forward)
    base = statistics.median(times["cudnn"]) if "cudnn" in times else None
    for n, r in results.items():
        if n in times:
            ms = statistics.median(times[n])
            r.update(ms=round(ms, 3), rounds=[round(t, 3) for t in times[n]],
                     ratio_vs_cudnn=round(ms / base, 4) if base else None, tflops=round(flops / ms / 1e9, 1))
        emit(dict(variant=n, B=B, H=H, S=S, D=D, device=torch.cuda.get_device_name(), torch=torch.__version__, **r),
             a.out)


if __name__ == "__main__":
    main()
