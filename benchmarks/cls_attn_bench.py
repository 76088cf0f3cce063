"""``trainables/cls_attn.py`` (ViT attention with the CLS token outside the tiles) against PyTorch's SDPA
kernels at ViT-B/14's shape (batch 512, 12 heads of 64, 257 tokens), side by side in one process on one GPU.

1. Each of its three kernels over a grid of tiles, warps and pipeline stages, timed alone (the best of each
   is the config the rest uses, printed as ``best``).
2. The whole op, forward + backward through autograd, against cuDNN's and FlashAttention-2's at 257 tokens,
   and cuDNN's at 256 tokens (the tile-aligned bound), in the projections' [B, T, H, D] layout.
3. Errors in bf16 against an fp32 reference, next to cuDNN's.

    python3 benchmarks/cls_attn_bench.py --out $OUT/cls_attn.jsonl

One JSON line per measurement (milliseconds: median of rounds of ``--iters`` calls).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.jsonl import emit  # noqa: E402


def timed(fn, iters, rounds):
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / iters)
    return statistics.median(out), out


def main(argv=None):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trainables import cls_attn as ca

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    B, H, T, D = a.batch, a.heads, a.tokens, 64
    dev = torch.cuda.get_device_name()
    base = dict(B=B, H=H, T=T, D=D, device=dev, torch=torch.__version__)
    scale = D ** -0.5

    def make(t, layout="bthd"):
        g = torch.Generator(device="cuda").manual_seed(0)
        xs = [torch.randn(B, t, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)]
        if layout == "bthd":
            return [x.transpose(1, 2) for x in xs]
        return [x.transpose(1, 2).contiguous() for x in xs]

    q, k, v, do = make(T)
    cfg = dict(ca.CONFIG)

    # 1. each kernel alone over its grid
    if not a.no_tune:
        o, lse = ca._forward(q, k, v, scale, cfg)
        dq, dk, dv = ca._backward(do, q, k, v, o, lse, scale, cfg)
        delta = torch.empty_like(lse)
        grids = {
            "fwd": (("fwd_m", "fwd_n", "warps_fwd", "stages_fwd"), ((64, 128), (32, 64, 128), (4, 8), (2, 3)),
                    lambda c: ca.launch_fwd(q, k, v, o, lse, scale, c)),
            "dq": (("dq_m", "dq_n", "warps_dq", "stages_dq"), ((64, 128), (32, 64, 128), (4, 8), (1, 2)),
                   None),
            "dkdv": (("kv_n", "kv_m", "warps_kv", "stages_kv"), ((64, 128), (32, 64, 128), (4, 8), (1, 2)),
                     lambda c: ca.launch_dkdv(do, q, k, v, lse, delta, dk, dv, part0, scale, c)),
        }

        # D_i from the default dQ kernel, for the dK/dV timings
        part0 = torch.empty(B * H, (T - 1) // cfg["dq_m"] + 1, 2, D, device="cuda")
        ca.launch_dq(do, q, k, v, o, lse, delta, dq, part0, scale, cfg)
        for kern, (keys, values, fn) in grids.items():
            best = None
            for combo in itertools.product(*values):
                c = dict(cfg, **dict(zip(keys, combo)))
                if kern == "dq":
                    part = torch.empty(B * H, (T - 1) // c["dq_m"] + 1, 2, D, device="cuda")
                    call = (lambda c=c, part=part: ca.launch_dq(do, q, k, v, o, lse, delta, dq, part, scale, c))
                else:
                    call = (lambda c=c, fn=fn: fn(c))
                try:
                    ms, rounds = timed(call, a.iters, a.rounds)
                except Exception as e:  # noqa: BLE001 - a tile this GPU's shared memory cannot take: reported
                    emit(dict(base, kind="tune", kernel=kern, **dict(zip(keys, combo)),
                              error=f"{type(e).__name__}: {str(e)[:200]}"), a.out)
                    continue
                emit(dict(base, kind="tune", kernel=kern, **dict(zip(keys, combo)), ms=round(ms, 4)), a.out)
                if best is None or ms < best[0]:
                    best = (ms, dict(zip(keys, combo)))
            if best:
                cfg.update(best[1])
                emit(dict(base, kind="best", kernel=kern, ms=round(best[0], 4), **best[1]), a.out)
    ca.CONFIG.update(cfg)
    emit(dict(base, kind="config", config=cfg), a.out)


    # 2. the whole op, forward + backward
    def step(fn, qq, kk, vv, dd):
        def run():
            for t in (qq, kk, vv):
                t.grad = None
            fn(qq, kk, vv).backward(dd)
        return run

    def sdpa(backend):
        def f(qq, kk, vv):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qq, kk, vv)
        return f

    rows = {}
    for layout in ("bthd", "bhtd"):
        for t in (T, T - 1):
            xs = [x.requires_grad_(i < 3) for i, x in enumerate(make(t, layout))]
            fns = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
            if t == T:
                fns["flash2"] = sdpa(SDPBackend.FLASH_ATTENTION)
                fns["cls_triton"] = ca.cls_attention
            for name, fn in fns.items():
                try:
                    ms, rounds = timed(step(fn, *xs), a.iters, a.rounds)
                except Exception as e:  # noqa: BLE001
                    emit(dict(base, kind="op", variant=name, layout=layout, tokens=t,
                              error=f"{type(e).__name__}: {str(e)[:300]}"), a.out)
                    continue
                rows[(name, layout, t)] = ms
                ref = rows.get(("cudnn", layout, T))
                emit(dict(base, kind="op", variant=name, layout=layout, tokens=t, ms=round(ms, 4),
                          rounds=[round(r, 4) for r in rounds],
                          ratio_vs_cudnn_257=round(ms / ref, 4) if ref else None), a.out)
            # forward alone
            for name, fn in fns.items():
                if (name, layout, t) not in rows:
                    continue
                with torch.no_grad():
                    ms, _ = timed(lambda fn=fn: fn(*xs[:3]), a.iters, a.rounds)
                emit(dict(base, kind="op_fwd", variant=name, layout=layout, tokens=t, ms=round(ms, 4)), a.out)

    # 3. errors against fp32
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    ref.backward(do.float())
    want = [ref.detach(), q32.grad, k32.grad, v32.grad]
    for name, fn in (("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("cls_triton", ca.cls_attention)):
        qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(do)
        got = [out.detach(), qq.grad, kk.grad, vv.grad]
        errs = {w: float((g.float() - r).abs().max()) for w, g, r in zip(("out", "dq", "dk", "dv"), got, want)}
        cls = {w: float((g[:, :, 0].float() - r[:, :, 0]).abs().max())
               for w, g, r in zip(("out", "dq", "dk", "dv"), got, want)}
        emit(dict(base, kind="error_vs_fp32", variant=name, max_abs=errs, cls_row=cls), a.out)


if __name__ == "__main__":
    main()
