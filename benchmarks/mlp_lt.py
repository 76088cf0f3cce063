"""ViT-B/14's MLP (768 → 3072 → 768, batch 512 × 257 tokens) forward + backward on one GPU, side by side in one
process: PyTorch's linear layers with Inductor's fused GELU (erf, as DINOv2; and the tanh form), against
``trainables.gelu_lt.gelu_mlp`` (the GELU and its gradient in cuBLASLt's matmul epilogues, ``training.gelu_epilogue``),
eager and compiled. Rounds alternate between the variants, so drift hits them alike.

    python3 benchmarks/mlp_lt.py --out $OUT/mlp_lt.jsonl

One JSON line per variant: milliseconds a forward + backward (median of the rounds' means), its ratio to the
compiled erf MLP, and its largest difference from the compiled tanh MLP's output and input gradient.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.jsonl import cuda_ms, cuda_rounds, emit  # noqa: E402


def main(argv=None):
    import torch
    import torch.nn.functional as F

    from trainables.gelu_lt import gelu_mlp

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512 * 257)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--algos", type=int, default=0,
                    help="also time each epilogue matmul alone at cuBLASLt's first N heuristic choices, against "
                         "PyTorch's matmul + Inductor's GELU pass")
    a = ap.parse_args(argv)

    m, d, f = a.rows, a.width, 4 * a.width
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, d, **bf).requires_grad_()
    w1, b1 = (torch.randn(f, d, **bf) * d ** -0.5).requires_grad_(), torch.zeros(f, **bf).requires_grad_()
    w2, b2 = (torch.randn(d, f, **bf) * f ** -0.5).requires_grad_(), torch.zeros(d, **bf).requires_grad_()
    dy = torch.randn(m, d, **bf)
    ops = (x, w1, b1, w2, b2)

    def plain(approx):
        return lambda *o: F.linear(F.gelu(F.linear(o[0], o[1], o[2]), approximate=approx), o[3], o[4])

    variants = {"erf-compiled": torch.compile(plain("none")), "tanh-compiled": torch.compile(plain("tanh")),
                "lt-eager": gelu_mlp, "lt-compiled": torch.compile(gelu_mlp)}

    def step(fn):
        for t in ops:
            t.grad = None
        y = fn(*ops)
        y.backward(dy)
        return y

    ref_y = step(variants["tanh-compiled"]).detach()
    ref_dx = x.grad.clone()
    diffs = {}
    for name, fn in variants.items():
        for _ in range(3):
            y = step(fn)
        diffs[name] = (float((y.detach().float() - ref_y.float()).abs().max()),
                       float((x.grad.float() - ref_dx.float()).abs().max()))
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            times[name].append(cuda_rounds(lambda fn=fn: step(fn), a.iters))
    if a.algos:
        gemm_algos(a, x, w1, b1, w2, dy)
    base = statistics.median(times["erf-compiled"])
    flops = 3 * 2 * 2 * m * d * f  # two matmuls, forward and two backward products each
    for name in variants:
        ms = statistics.median(times[name])
        row = dict(variant=name, rows=m, width=d, ms=round(ms, 3), rounds=[round(t, 3) for t in times[name]],
                   ratio_to_erf_compiled=round(ms / base, 4), tflops=round(flops / ms / 1e9, 1),
                   max_diff_y=diffs[name][0], max_diff_dx=diffs[name][1],
                   device=torch.cuda.get_device_name(), torch=torch.__version__)
        emit(row, a.out)


def gemm_algos(a, x, w1, b1, w2, dy):
    """Each epilogue matmul alone, at each of cuBLASLt's heuristic choices, against PyTorch's matmul with
    Inductor's GELU (forward: ``act, pre``; backward: ``dpre`` and its row sums, which ``lt_dgelu+sum`` adds
    to the DGELU matmul as the product does), in one process. (Commit 46e3662 also timed DGELU_BGRAD and
    BGRADB, the bias sums inside the matmuls: slower, not kept.)"""
    import torch
    import torch.nn.functional as F

    from trainables import gelu_lt

    x, w1, b1, w2 = (t.detach() for t in (x, w1, b1, w2))
    fwd = torch.compile(lambda x, w, b: (lambda pre: (F.gelu(pre, approximate="tanh"), pre))(F.linear(x, w, b)))

    def bwd_fn(dy, w2, pre):
        dpre = torch.ops.aten.gelu_backward(dy @ w2, pre, approximate="tanh")
        return dpre, dpre.sum(0)

    bwd = torch.compile(bwd_fn)
    _, pre = gelu_lt.linear_gelu(x, w1, b1)
    rows = {"torch-fwd": (lambda: fwd(x, w1, b1)), "torch-bwd": (lambda: bwd(dy, w2, pre))}
    dgelu_sum = torch.compile(lambda dy, w2, pre: (lambda d: (d, d.sum(0)))(gelu_lt.dgelu(dy, w2, pre)))
    calls = {"lt_linear_gelu": lambda: gelu_lt.linear_gelu(x, w1, b1), "lt_dgelu": lambda: gelu_lt.dgelu(dy, w2, pre),
             "lt_dgelu+sum": lambda: dgelu_sum(dy, w2, pre)}
    for name, fn in calls.items():
        for i in range(a.algos if name != "lt_dgelu+sum" else 1):  # "+": the same kernel, another use
            gelu_lt.ALGO[name.split("+")[0]] = i
            try:
                fn()
                torch.cuda.synchronize()
            except RuntimeError as e:
                print(json.dumps(dict(kernel=name, algo=i, error=str(e)[:200])), flush=True)
                break
            rows[f"{name}-{i}"] = (lambda fn=fn, k=name.split("+")[0], i=i: (gelu_lt.ALGO.__setitem__(k, i), fn()))
        gelu_lt.ALGO[name.split("+")[0]] = 0
    for name, fn in rows.items():
        fn()
    res = {name: cuda_ms(fn, a.iters, a.rounds) for name, fn in rows.items()}
    for k in gelu_lt.ALGO:
        gelu_lt.ALGO[k] = 0
    for name, ms in res.items():
        base = res["torch-fwd" if name == "torch-fwd" or "linear" in name else "torch-bwd"]
        emit(dict(kernel=name, ms=round(ms, 3), ratio_to_torch=round(ms / base, 4), rows=x.shape[0]), a.out)


if __name__ == "__main__":
    main()
