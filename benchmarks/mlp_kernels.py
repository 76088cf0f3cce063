"""DINOv2's GELU MLP with the GELU in the matmuls' epilogues (``trainables/gelu_mlp.py``) against PyTorch's own,
side by side in one process on one GPU: each compiled, forward + backward, timed in alternating rounds; then
the two fused kernels alone against what they replace (cuBLAS matmul + Inductor's fused GELU kernels).

    python3 benchmarks/mlp_kernels.py --out $OUT/mlp.jsonl      # ViT-B/14 (768 → 3072) at batch 512 and 128

Prints one JSON line per shape: milliseconds (median of rounds), the ratio fused / PyTorch, the largest
difference of output and gradients from an fp32 reference for both (so the fused path is seen to be no
further from it than PyTorch's), and the configs Triton's autotuner chose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _time(fn, n: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def bench(M: int, d: int, hidden: int, iters: int, rounds: int) -> dict:
    import torch
    import torch.nn.functional as F

    from trainables import gelu_mlp as gm

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(M, d, device=dev, dtype=dt, requires_grad=True)
    w1 = (torch.randn(hidden, d, device=dev) / d ** 0.5).to(dt).requires_grad_()
    b1 = (torch.randn(hidden, device=dev) * 0.1).to(dt).requires_grad_()
    w2 = (torch.randn(d, hidden, device=dev) / hidden ** 0.5).to(dt).requires_grad_()
    b2 = (torch.randn(d, device=dev) * 0.1).to(dt).requires_grad_()
    dy = torch.randn(M, d, device=dev, dtype=dt)
    params = [x, w1, b1, w2, b2]

    def ref(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def grads(fn):
        for t in params:
            t.grad = None
        y = fn(*params)
        y.backward(dy)
        return [y.detach().float()] + [t.grad.float() for t in params]

    # accuracy: both against fp32 arithmetic on the same bf16 inputs (on a slice of rows, to bound memory)
    rows = min(M, 8192)
    sub = [x[:rows].detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach()]
    f32 = [t.float().requires_grad_() for t in sub]
    y32 = ref(*f32)
    y32.backward(dy[:rows].float())
    exact = [y32.detach()] + [t.grad for t in f32]

    def err(fn):
        s = [t.clone().requires_grad_() for t in sub]
        y = fn(*s)
        y.backward(dy[:rows])
        got = [y.detach().float()] + [t.grad.float() for t in s]
        return [round(float((g - e).abs().max() / e.abs().max()), 5) for g, e in zip(got, exact)]

    names = ["y", "dx", "dw1", "db1", "dw2", "db2"]
    acc = {"pytorch": dict(zip(names, err(ref)))}
    for kern in ("tma", "pointer"):
        gm.KERNELS = kern
        acc[f"fused_{kern}"] = dict(zip(names, err(gm.gelu_mlp)))

    def with_kernels(kern, fn):
        def f(*a):
            gm.KERNELS = kern
            return fn(*a)
        return f

    ref_c = torch.compile(ref)
    fused_c = torch.compile(gm.gelu_mlp)
    variants = {"pytorch": ref_c, "fused_tma": with_kernels("tma", fused_c),
                "fused_pointer": with_kernels("pointer", fused_c)}
    for fn in variants.values():  # compile, autotune, warm up
        for _ in range(3):
            grads(fn)
    torch.cuda.synchronize()
    whole = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            whole[k].append(_time(lambda: grads(fn), iters))

    # the kernels alone against what they replace
    xd, w1d, b1d, w2d, dyd = x.detach(), w1.detach(), b1.detach(), w2.detach(), dy

    @torch.compile
    def fwd_ref(x, w, b):
        h = F.linear(x, w, b)
        return h, F.gelu(h)

    @torch.compile
    def bwd_ref(dy, w2, h):
        dh = torch.ops.aten.gelu_backward(dy @ w2, h)
        return dh, dh.float().sum(0)

    h = F.linear(xd, w1d, b1d)
    parts = {"fwd_pytorch": lambda: fwd_ref(xd, w1d, b1d), "bwd_pytorch": lambda: bwd_ref(dyd, w2d, h)}
    for kern in ("tma", "pointer"):
        parts[f"fwd_{kern}"] = with_kernels(kern, lambda: gm.fc1_gelu(xd, w1d, b1d))
        parts[f"bwd_{kern}"] = with_kernels(kern, lambda: gm.fc2_dgelu(dyd, w2d, h))
    for fn in parts.values():
        for _ in range(3):
            fn()
    kern = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            kern[k].append(_time(fn, iters))
    med = {k: round(statistics.median(v), 3) for k, v in {**whole, **kern}.items()}
    flops = 6 * 2 * M * d * hidden  # forward 2 matmuls (2·M·d·hidden each) + backward 4
    return dict(M=M, d=d, hidden=hidden, device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, ms=med,
                ratios={f"{part}_{kern}": round(med[f"{part}_{kern}" if part != "whole" else f"fused_{kern}"]
                                                / med[f"{part}_pytorch" if part != "whole" else "pytorch"], 4)
                        for part in ("whole", "fwd", "bwd") for kern in ("tma", "pointer")},
                tflops_whole={k: round(flops / (med[k] * 1e-3) / 1e12, 1) for k in variants},
                rounds={k: [round(v, 3) for v in vs] for k, vs in {**whole, **kern}.items()},
                rel_err=acc, configs={n: str(getattr(getattr(gm, n), "best_config", None)) for n in (
                    "_fc1_gelu_tuned", "_fc2_dgelu_tuned", "_fc1_gelu_tma_tuned", "_fc2_dgelu_tma_tuned")})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="131584,32896", help="M values: images × 257 tokens (512 and 128 images)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for M in (int(v) for v in a.rows.split(",")):
        r = bench(M, a.d, a.hidden, a.iters, a.rounds)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
