"""Attention for a ViT's 1 + 256 tokens without the padded tile (``training.cls_attention``).

DINOv2 at 224 px with 14-px patches attends over 257 tokens: the CLS token and 256 patches. Fused attention
kernels tile the sequence in blocks of 64 or 128, so 257 tokens take 3 × 3 tiles of 128 where 256 take
2 × 2: cuDNN's kernel spends about 2.2 times the work a tile-aligned sequence needs (ViT-B/14, batch 512:
35 ms of a 168 ms step on an H200, at about 12 % of the bf16 peak counted on the useful FLOPs).

Here the CLS token is not a row of any tile. Its key enters each patch query's softmax as one more score
(a 64-wide dot product), its value as one more term of the accumulator; its query attends over the 257 keys
in a separate program with vector arithmetic. The patch queries and keys run in whole tiles. The same
arithmetic as softmax attention over the 257 tokens: every score, the log-sum-exp and the weighted sums are
those of the full attention, only the order of the additions differs (as between any two attention kernels).

The backward is FlashAttention-2's (recompute the probabilities from the saved log-sum-exp): one kernel
writes dQ, program by query block, with the CLS key's share; one writes dK and dV, program by key block,
with the CLS query's share; the CLS key's own dK and dV are summed from the dQ programs' partials. One
kernel forward, two backward, no passes over the activations beyond what the kernels read.

Triton kernels, called through ``torch.library`` custom ops (opaque to ``torch.compile``, recorded into CUDA
graphs like any kernel). Tested against PyTorch's attention in Triton's interpreter on the CPU and on CUDA
(``tests/test_cls_attn.py``). The block sizes are the ones measured fastest on an H200
(``benchmarks/cls_attn_bench.py``).

Measured on one H200 (2026-11-28, eighteenth session; docs/gpu.md, ``benchmarks/results/gpu_2026-11-28-eighteenth.md``):
one layer of ViT-B/14 at batch 512, forward + backward, 1.98 ms against cuDNN's 2.52 (0.78×; cuDNN at a
tile-aligned 256 tokens: 1.63); the product's ViT-B/14 step at batch 512 161.3 / 161.6 ms against 166.3 /
166.1 ms with cuDNN in the same call (MFU 43.3 → 44.6 %), at batch 1024 317.9 ms (45.3 %); ViT-S/14 at 256
34.3 against 35.2 ms.

Where the kernels run, DINOv2's q, k and v projections are one matmul whose [B, T, 3, H, D] output the kernels
read in place and whose gradient the backward writes as one tensor (``FusedQKVAttention``, ``cls_attn_qkv_fwd``;
nineteenth session): ViT-B/14 bs 512 162.0 / 162.5 against 163.7 / 164.1 ms with three projections, bs 1024
319.4 ms (45.1 %), one H200 (``benchmarks/results/gpu_2026-11-28-nineteenth.md``).

Tried and not kept (same session, ``benchmarks/results/cls_attn_{fused,clsin}_h200_2026-11-28.jsonl``): the
whole backward of a (batch, head) in one program, dQ's partial sums kept in an fp32 scratch (five matmuls a
tile instead of seven; 2.56 ms against 1.46 for the two kernels: one long serial program per head, and most
tile configurations crashed Triton 3.6's compiler); the CLS query's row computed by the first query block's
program beside its tiles instead of by a program of its own (forward and dQ each a few percent slower).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton is on every CUDA machine with PyTorch; the CPU test installs it for its interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - no Triton: the op reports itself unavailable
    triton = None

LOG2E = 1.4426950408889634

# Tiles, warps and pipeline stages of the three kernels: the forward's query × key tile, dQ's query × key tile,
# dK/dV's key × query tile. Each kernel's best of a grid on an H200 (ViT-B/14, batch 512; 2026-11-28,
# benchmarks/results/cls_attn_h200_2026-11-28.jsonl and cls_attn_clsin_h200_2026-11-28.jsonl, which adds tiles
# of 256 keys or queries): forward 0.481 ms, dQ 0.735-0.746, dK/dV 0.718-0.723 a layer. Tiles of 64 and 4 warps
# won in every kernel. The patch count must be a multiple of the largest tile (``supported``).
CONFIG = dict(fwd_m=64, fwd_n=64, dq_m=64, dq_n=64, kv_n=64, kv_m=64, warps_fwd=4, warps_dq=4, warps_kv=4,
              stages_fwd=3, stages_dq=2, stages_kv=1)


def problem(t: int, d: int, dtype: torch.dtype, numel: int, *, cfg: dict | None = None) -> str | None:
    """Why the kernels cannot take [·, ·, t, d] operands of ``dtype`` spanning ``numel`` elements (None: they can);
    the checks ``supported`` shares with ``FusedQKVAttention``, which makes its operands only if they pass."""
    c = cfg or CONFIG
    if triton is None:
        return "Triton is not installed"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype}"
    if d not in (16, 32, 64, 128):
        return f"head dim {d} (16, 32, 64 or 128 only)"
    blocks = [c[x] for x in ("fwd_m", "fwd_n", "dq_m", "dq_n", "kv_n", "kv_m")]
    if t < 2 or (t - 1) % max(blocks) != 0:
        return f"{t} tokens: needs 1 + a multiple of {max(blocks)} (the CLS token and whole tiles of patches)"
    if numel >= 2 ** 31:
        return "2^31 elements or more (the kernels' offsets are 32-bit)"
    return None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cfg: dict | None = None) -> str | None:
    """Why the kernels cannot take these [B, H, T, D] operands (None: they can)."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        return f"q, k, v shapes differ or are not 4-D ({tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})"
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return f"dtype {q.dtype}, {k.dtype}, {v.dtype}"
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        return "the head dim is not contiguous"
    span = max([q.numel()] + [sum((n - 1) * st for n, st in zip(x.shape, x.stride())) + 1 for x in (q, k, v)])
    return problem(q.shape[-2], q.shape[-1], q.dtype, span, cfg=cfg)


if triton is not None:

    @triton.jit
    def _head(X, bh, H, sxb, sxh):
        """The first element of (batch, head) ``bh``'s rows in X: [B, ·, H, ·] seen through its strides."""
        return X + (bh // H) * sxb + (bh % H) * sxh

    @triton.jit
    def _fwd(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, H, NP, qk_scale,
             BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        qb, kb, vb = _head(Q, bh, H, sqb, sqh), _head(K, bh, H, skb, skh), _head(V, bh, H, svb, svh)
        ob = _head(O, bh, H, sob, soh)
        lb = LSE + bh * (NP + 1)
        d = tl.arange(0, D)
        k0 = tl.load(kb + d).to(tl.float32)
        v0 = tl.load(vb + d).to(tl.float32)
        if pid_m * BM < NP:
            rows = 1 + pid_m * BM + tl.arange(0, BM)
            q = tl.load(qb + rows[:, None] * sqt + d[None, :])
            # the CLS key's score opens the running softmax: max = it, sum = 1, accumulator = its value
            m_i = tl.sum(q.to(tl.float32) * k0[None, :], 1) * qk_scale
            l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
            acc = tl.zeros([BM, D], dtype=tl.float32) + v0[None, :]
            for start in range(0, NP, BN):
                cols = 1 + start + tl.arange(0, BN)
                k = tl.load(kb + cols[:, None] * skt + d[None, :])
                v = tl.load(vb + cols[:, None] * svt + d[None, :])
                s = tl.dot(q, tl.trans(k)) * qk_scale
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            acc = acc / l_i[:, None]
            tl.store(ob + rows[:, None] * sot + d[None, :], acc.to(O.dtype.element_ty))
            tl.store(lb + rows, m_i + tl.math.log2(l_i))
        else:
            # the CLS query over all keys, one row: vector arithmetic (names of their own: Triton wants a name
            # that both branches assign to have one type)
            c_q = tl.load(qb + d).to(tl.float32)
            c_m = tl.sum(c_q * k0, 0) * qk_scale
            c_l = c_m * 0.0 + 1.0
            c_acc = v0
            for c_start in range(0, NP, BN):
                c_cols = 1 + c_start + tl.arange(0, BN)
                c_k = tl.load(kb + c_cols[:, None] * skt + d[None, :]).to(tl.float32)
                c_v = tl.load(vb + c_cols[:, None] * svt + d[None, :]).to(tl.float32)
                c_s = tl.sum(c_k * c_q[None, :], 1) * qk_scale
                c_mn = tl.maximum(c_m, tl.max(c_s, 0))
                c_alpha = tl.math.exp2(c_m - c_mn)
                c_p = tl.math.exp2(c_s - c_mn)
                c_l = c_l * c_alpha + tl.sum(c_p, 0)
                c_acc = c_acc * c_alpha + tl.sum(c_p[:, None] * c_v, 0)
                c_m = c_mn
            tl.store(ob + d, (c_acc / c_l).to(O.dtype.element_ty))
            tl.store(lb, c_m + tl.math.log2(c_l))

    @triton.jit
    def _bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, PART, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                sdb, sdh, sdt, sgb, sgh, sgt, H, NP, qk_scale, scale, BM: tl.constexpr, BN: tl.constexpr,
                D: tl.constexpr):
        """dQ for a block of queries (or the CLS query), D_i = rowsum(dO ∘ O) saved for the dK/dV kernel, and
        this block's share of the CLS key's dK and dV (PART[bh, block, 0 / 1, :])."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        nblk = tl.num_programs(0)
        qb, kb, vb = _head(Q, bh, H, sqb, sqh), _head(K, bh, H, skb, skh), _head(V, bh, H, svb, svh)
        ob, dob = _head(O, bh, H, sob, soh), _head(DO, bh, H, sdb, sdh)
        dqb = _head(DQ, bh, H, sgb, sgh)
        lb = LSE + bh * (NP + 1)
        db = DELTA + bh * (NP + 1)
        pb = PART + (bh * nblk + pid_m) * 2 * D
        d = tl.arange(0, D)
        k0 = tl.load(kb + d).to(tl.float32)
        v0 = tl.load(vb + d).to(tl.float32)
        if pid_m * BM < NP:
            rows = 1 + pid_m * BM + tl.arange(0, BM)
            q = tl.load(qb + rows[:, None] * sqt + d[None, :])
            do = tl.load(dob + rows[:, None] * sdt + d[None, :])
            o = tl.load(ob + rows[:, None] * sot + d[None, :])
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            tl.store(db + rows, delta)
            lse = tl.load(lb + rows)
            # the CLS key's column
            pc = tl.math.exp2(tl.sum(q.to(tl.float32) * k0[None, :], 1) * qk_scale - lse)
            dsc = pc * (tl.sum(do.to(tl.float32) * v0[None, :], 1) - delta)
            dq = dsc[:, None] * k0[None, :]
            tl.store(pb + d, tl.sum(dsc[:, None] * q.to(tl.float32), 0))
            tl.store(pb + D + d, tl.sum(pc[:, None] * do.to(tl.float32), 0))
            for start in range(0, NP, BN):
                cols = 1 + start + tl.arange(0, BN)
                k = tl.load(kb + cols[:, None] * skt + d[None, :])
                v = tl.load(vb + cols[:, None] * svt + d[None, :])
                p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k)
            tl.store(dqb + rows[:, None] * sgt + d[None, :], (dq * scale).to(DQ.dtype.element_ty))
        else:
            q0 = tl.load(qb + d).to(tl.float32)
            do0 = tl.load(dob + d).to(tl.float32)
            o0 = tl.load(ob + d).to(tl.float32)
            delta0 = tl.sum(do0 * o0, 0)
            tl.store(db, delta0)
            lse0 = tl.load(lb)
            p_self = tl.math.exp2(tl.sum(q0 * k0, 0) * qk_scale - lse0)
            ds_self = p_self * (tl.sum(do0 * v0, 0) - delta0)
            dq0 = ds_self * k0
            tl.store(pb + d, ds_self * q0)
            tl.store(pb + D + d, p_self * do0)
            for c_start in range(0, NP, BN):
                c_cols = 1 + c_start + tl.arange(0, BN)
                c_k = tl.load(kb + c_cols[:, None] * skt + d[None, :]).to(tl.float32)
                c_v = tl.load(vb + c_cols[:, None] * svt + d[None, :]).to(tl.float32)
                c_p = tl.math.exp2(tl.sum(c_k * q0[None, :], 1) * qk_scale - lse0)
                c_ds = c_p * (tl.sum(c_v * do0[None, :], 1) - delta0)
                dq0 += tl.sum(c_ds[:, None] * c_k, 0)
            tl.store(dqb + d, (dq0 * scale).to(DQ.dtype.element_ty))

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, PART, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh,
                  sdt, sob, soh, sot, H, NP, NPART, qk_scale, scale, BN: tl.constexpr, BM: tl.constexpr,
                  D: tl.constexpr):
        """dK and dV for a block of patch keys: the patch queries' share in tiles, the CLS query's as vectors.
        The first block's program also writes the CLS key's dK and dV: the dQ kernel's NPART partial sums."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        qb, kb, vb = _head(Q, bh, H, sqb, sqh), _head(K, bh, H, skb, skh), _head(V, bh, H, svb, svh)
        dob = _head(DO, bh, H, sdb, sdh)
        lb = LSE + bh * (NP + 1)
        db = DELTA + bh * (NP + 1)
        d = tl.arange(0, D)
        cols = 1 + pid_n * BN + tl.arange(0, BN)
        k = tl.load(kb + cols[:, None] * skt + d[None, :])
        v = tl.load(vb + cols[:, None] * svt + d[None, :])
        q0 = tl.load(qb + d).to(tl.float32)
        do0 = tl.load(dob + d).to(tl.float32)
        lse0 = tl.load(lb)
        delta0 = tl.load(db)
        p0 = tl.math.exp2(tl.sum(k.to(tl.float32) * q0[None, :], 1) * qk_scale - lse0)
        dv = p0[:, None] * do0[None, :]
        ds0 = p0 * (tl.sum(v.to(tl.float32) * do0[None, :], 1) - delta0)
        dk = ds0[:, None] * q0[None, :]
        for start in range(0, NP, BM):
            rows = 1 + start + tl.arange(0, BM)
            q = tl.load(qb + rows[:, None] * sqt + d[None, :])
            do = tl.load(dob + rows[:, None] * sdt + d[None, :])
            lse = tl.load(lb + rows)
            delta = tl.load(db + rows)
            pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
        dkb, dvb = _head(DK, bh, H, sob, soh), _head(DV, bh, H, sob, soh)
        tl.store(dkb + cols[:, None] * sot + d[None, :], (dk * scale).to(DK.dtype.element_ty))
        tl.store(dvb + cols[:, None] * sot + d[None, :], dv.to(DV.dtype.element_ty))
        if pid_n == 0:
            pb = PART + bh * NPART * 2 * D
            c_dk = tl.zeros([D], dtype=tl.float32)
            c_dv = tl.zeros([D], dtype=tl.float32)
            for i in range(0, NPART):
                c_dk += tl.load(pb + i * 2 * D + d)
                c_dv += tl.load(pb + i * 2 * D + D + d)
            tl.store(dkb + d, (c_dk * scale).to(DK.dtype.element_ty))
            tl.store(dvb + d, c_dv.to(DV.dtype.element_ty))


def _bthd(x: torch.Tensor) -> torch.Tensor:
    """A fresh [B, T, H, D] tensor seen as [B, H, T, D] (the layout the projections before and after use)."""
    b, h, t, d = x.shape
    return x.new_empty(b, t, h, d).transpose(1, 2)


def launch_fwd(q, k, v, o, lse, scale, cfg):
    B, H, T, D = q.shape
    NP = T - 1
    _fwd[(NP // cfg["fwd_m"] + 1, B * H)](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], H, NP, scale * LOG2E,
        BM=cfg["fwd_m"], BN=cfg["fwd_n"], D=D, num_warps=cfg["warps_fwd"], num_stages=cfg["stages_fwd"])


def launch_dq(do, q, k, v, o, lse, delta, dq, part, scale, cfg):
    B, H, T, D = q.shape
    NP = T - 1
    _bwd_dq[(part.shape[1], B * H)](
        q, k, v, o, do, lse, delta, dq, part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], H, NP, scale * LOG2E, scale, BM=cfg["dq_m"], BN=cfg["dq_n"], D=D,
        num_warps=cfg["warps_dq"], num_stages=cfg["stages_dq"])


def launch_dkdv(do, q, k, v, lse, delta, dk, dv, part, scale, cfg):
    B, H, T, D = q.shape
    NP = T - 1
    _bwd_dkdv[(NP // cfg["kv_n"], B * H)](
        q, k, v, do, lse, delta, dk, dv, part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        *dk.stride()[:3], H, NP, part.shape[1], scale * LOG2E, scale, BN=cfg["kv_n"], BM=cfg["kv_m"], D=D,
        num_warps=cfg["warps_kv"], num_stages=cfg["stages_kv"])


def _forward(q, k, v, scale, cfg):
    B, H, T, D = q.shape
    o = _bthd(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    launch_fwd(q, k, v, o, lse, scale, cfg)
    return o, lse


def _backward(do, q, k, v, o, lse, scale, cfg, out=None):
    """(dq, dk, dv): fresh [B, T, H, D] tensors seen as [B, H, T, D], or ``out``'s three tensors written."""
    B, H, T, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv = out if out is not None else (_bthd(q), _bthd(q), _bthd(q))
    assert dk.stride() == dv.stride(), "dK and dV are written through one set of strides"
    delta = torch.empty_like(lse)
    part = torch.empty(B * H, (T - 1) // cfg["dq_m"] + 1, 2, D, device=q.device, dtype=torch.float32)
    launch_dq(do, q, k, v, o, lse, delta, dq, part, scale, cfg)
    launch_dkdv(do, q, k, v, lse, delta, dk, dv, part, scale, cfg)
    return dq, dk, dv


@torch.library.custom_op("sweeper::cls_attn_fwd", mutates_args=())
def cls_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over [B, H, 1 + n·tile, D] with the first token outside the tiles: (output, lse in log2)."""
    return _forward(q, k, v, scale, CONFIG)


@cls_attn_fwd.register_fake
def _(q, k, v, scale):
    B, H, T, _ = q.shape
    return _bthd(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("sweeper::cls_attn_bwd", mutates_args=())
def cls_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, scale, CONFIG)


@cls_attn_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return _bthd(q), _bthd(q), _bthd(q)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = cls_attn_bwd(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


cls_attn_fwd.register_autograd(_grad, setup_context=_setup)


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v of a [B, T, 3, H, D] tensor (one projection's output) as [B, H, T, D] views."""
    return qkv.select(2, 0).transpose(1, 2), qkv.select(2, 1).transpose(1, 2), qkv.select(2, 2).transpose(1, 2)


@torch.library.custom_op("sweeper::cls_attn_qkv_fwd", mutates_args=())
def cls_attn_qkv_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cls_attn_fwd`` reading q, k and v from one [B, T, 3, H, D] tensor (``FusedQKVAttention``)."""
    return _forward(*_split(qkv), scale, CONFIG)


@cls_attn_qkv_fwd.register_fake
def _(qkv, scale):
    B, T, _, H, D = qkv.shape
    return qkv.new_empty(B, T, H, D).transpose(1, 2), qkv.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("sweeper::cls_attn_qkv_bwd", mutates_args=())
def cls_attn_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """dq, dk and dv written into one [B, T, 3, H, D] tensor: the fused projection's output gradient as it is."""
    dqkv = qkv.new_empty(qkv.shape)
    _backward(do, *_split(qkv), o, lse, scale, CONFIG, out=_split(dqkv))
    return dqkv


@cls_attn_qkv_bwd.register_fake
def _(do, qkv, o, lse, scale):
    return qkv.new_empty(qkv.shape)


def _setup_qkv(ctx, inputs, output):
    qkv, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.scale = scale


def _grad_qkv(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return cls_attn_qkv_bwd(do, qkv, o, lse, ctx.scale), None


cls_attn_qkv_fwd.register_autograd(_grad_qkv, setup_context=_setup_qkv)


def cls_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of [B, H, T, D] q, k, v (no mask, no dropout) with T = 1 + a multiple of the tile;
    the output as [B, H, T, D] (a view of a [B, T, H, D] tensor)."""
    why = supported(q, k, v)
    if why:
        raise ValueError(f"cls_attention: {why}")
    return _attend(q, k, v, scale)


def _attend(q, k, v, scale):
    """The op's output for operands ``supported`` has taken (checked once, by the caller)."""
    return cls_attn_fwd(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))[0]


# Triton's interpreter (``TRITON_INTERPRET=1``, read by Triton at import) runs the kernels on CPU tensors: the
# CPU tests take the model's path through them that way (``tests/cls_attn_interp.py``)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_device(x: torch.Tensor) -> bool:
    return x.is_cuda or INTERPRET


IMPLEMENTATION = "sweeper_cls"
"""The name under which ``attention_forward`` is registered with transformers' ``AttentionInterface``."""


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention interface: these kernels where they apply (CUDA, bf16 or fp16, no mask, no
    dropout, not causal, 1 + a multiple of the tile tokens), PyTorch's SDPA (transformers' own ``sdpa``
    function) otherwise. Returns ([B, T, H, D] output, None) as that does."""
    if (_kernel_device(query) and query.dtype in (torch.bfloat16, torch.float16) and attention_mask is None and not dropout
            and not (is_causal if is_causal is not None else getattr(module, "is_causal", False))
            and supported(query, key, value) is None):
        return _attend(query, key, value, scaling).transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


class FusedQKVAttention(nn.Module):
    """DINOv2's attention with its query, key and value projections as one matmul whose [B, T, 3, H, D] output
    the kernels read in place, and whose gradient the backward writes in place (``cls_attn_qkv_fwd``). Per
    layer that is one matmul of 2304 columns instead of three of 768 in the forward, one 2304-deep matmul for
    the input's gradient instead of three whose outputs the LayerNorm's backward then sums, one weight-gradient
    matmul and one bias sum instead of three each.

    The three ``nn.Linear`` layers stay (their parameters, names and state dict are unchanged); their weights
    are concatenated each call (2304 × 768: a few microseconds). A call the kernels do not take (not CUDA, a
    mask, dropout, a shape or dtype ``problem`` refuses, a projection that is no longer a plain ``nn.Linear``,
    as after ``training.fp8``) runs the module's own forward. Installed by ``fuse_qkv`` in place, as a mixin
    (``dinov2_fast.with_mixin``: one class for all blocks, so the compiled block stays one graph), on
    transformers' ``Dinov2Attention`` (5.2x: ``q_proj``, ``k_proj``, ``v_proj``, then ``o_proj``) or
    ``Dinov2SelfAttention`` (5.17: ``query``, ``key``, ``value``; the output projection is its parent's)."""

    _layout: tuple = ()  # (q, k, v attribute names, head dim attribute, dropout attribute, output projection or None)

    def _fused_qkv(self, x: torch.Tensor, attention_mask) -> torch.Tensor | None:
        names, head_dim, dropout, _ = self._layout
        lin = [getattr(self, n) for n in names]
        if (attention_mask is not None or (self.training and getattr(self, dropout)) or not _kernel_device(x)
                or any(type(m) is not nn.Linear for m in lin)):  # (fuse_qkv checked their shapes and biases)
            return None
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        b, t, _ = x.shape
        h, d = self.num_attention_heads, getattr(self, head_dim)
        if dt not in (torch.bfloat16, torch.float16) or problem(t, d, dt, b * t * 3 * h * d) is not None:
            return None
        w = torch.cat([m.weight for m in lin])
        bias = None if lin[0].bias is None else torch.cat([m.bias for m in lin])
        return F.linear(x, w, bias).view(b, t, 3, h, d)

    def forward(self, hidden_states, *args, **kwargs):
        qkv = self._fused_qkv(hidden_states, kwargs.get("attention_mask", args[0] if args else None))
        if qkv is None:
            return super().forward(hidden_states, *args, **kwargs)
        b, t = hidden_states.shape[:2]
        o = cls_attn_qkv_fwd(qkv, float(self.scaling))[0].transpose(1, 2).reshape(b, t, -1)  # [B, T, H·D]
        out = self._layout[3]
        return (getattr(self, out)(o) if out else o), None


# transformers' DINOv2 attention classes fuse_qkv takes, and where their parts are (FusedQKVAttention._layout)
LAYOUTS = {"Dinov2Attention": (("q_proj", "k_proj", "v_proj"), "head_dim", "attention_dropout", "o_proj"),
           "Dinov2SelfAttention": (("query", "key", "value"), "attention_head_size", "dropout_prob", None)}


def fuse_qkv(backbone) -> int:
    """Make each of ``backbone``'s DINOv2 attention modules (``LAYOUTS``) whose q, k and v projections are
    plain ``nn.Linear`` layers of one shape a ``FusedQKVAttention``, in place. Returns how many are (already
    fused ones included)."""
    from .dinov2_fast import with_mixin

    n = 0
    for m in backbone.modules():
        if isinstance(m, FusedQKVAttention):
            n += 1
            continue
        layout = LAYOUTS.get(type(m).__name__)
        if layout is None:
            continue
        names, head_dim, dropout, out = layout
        lin = [getattr(m, a, None) for a in names]
        if (not all(type(x) is nn.Linear for x in lin) or (out and not hasattr(m, out))
                or not all(hasattr(m, a) for a in ("num_attention_heads", head_dim, dropout, "scaling"))):
            continue
        width = m.num_attention_heads * getattr(m, head_dim)
        if len({(x.in_features, x.out_features, x.bias is None) for x in lin}) != 1 or lin[0].out_features != width:
            continue
        cls = with_mixin(FusedQKVAttention, type(m))
        cls._layout = layout
        m.__class__ = cls
        n += 1
    return n


def use(backbone, *, fuse: bool = True) -> int:
    """Make a transformers model (DINOv2's ``Dinov2Model``) attend through ``attention_forward`` and, with
    ``fuse``, through ``FusedQKVAttention`` where its layers allow. Returns how many layers are fused. Not
    ``fuse`` under DeepSpeed ZeRO-3, which gathers a parameter only for its own module's forward, nor FSDP
    (``speed.use_cls_attention`` decides)."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    backbone.set_attn_implementation(IMPLEMENTATION)
    if backbone.config._attn_implementation != IMPLEMENTATION:
        raise RuntimeError(f"training.cls_attention: {type(backbone).__name__} kept attention "
                           f"{backbone.config._attn_implementation!r}")
    return fuse_qkv(backbone) if fuse else 0


def active(model) -> bool:
    """Whether ``model`` (a family's model, with a ``backbone``) attends through these kernels."""
    cfg = getattr(getattr(model, "backbone", None), "config", None)
    return getattr(cfg, "_attn_implementation", None) == IMPLEMENTATION
