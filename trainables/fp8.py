"""``training.fp8``: the repeated blocks' linear layers multiply in FP8 (Hopper's tensor cores run FP8 at
twice the bf16 rate), with dynamic tensorwise scaling, the recipe of torchao's ``Float8Linear``
("tensorwise") and of NVIDIA Transformer Engine's current scaling:

- forward: input and weight each scaled by a power of two that puts the tensor's largest magnitude just
  under E4M3's largest number (448), cast to ``float8_e4m3fn``, multiplied by
  ``torch._scaled_mm`` (the scales undone in its epilogue, which adds the bias too);
- backward: the output's gradient scaled into ``float8_e5m2`` (range before precision) the same way, and
  both gradients (input, weight) computed from FP8 operands, with the fp32 accumulation promoted
  (``use_fast_accum=False``), as torchao does for the gradients;
- saved for the backward: the FP8 input and weight (half the bytes of bf16).

Only the blocks' linear layers change (attention's q/k/v/o and the MLP for Qwen2; q/k/v, projection and
MLP for DINOv2); the embedding, the head, norms and attention itself stay bf16. The weights stay what they
were (fp32 masters, bf16 working weights under ``training.bf16_weights``): FP8 is how they are multiplied,
not how they are kept, so checkpoints and optimizer state are unchanged. The module's class changes in
place (``Float8Linear`` is an ``nn.Linear``), so parameter names and the state dict stay as they were.

This changes the numerics: ``benchmarks/loss_curve.py`` compares its loss curve with mixed precision over
the same steps (docs/gpu.md). FP8 matmuls need compute capability 8.9 (Ada, Hopper) on CUDA; PyTorch's CPU
kernel runs the same arithmetic for the tests.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
E5M2_MAX = float(torch.finfo(E5M2).max)  # 57344
ALIGN = 16  # _scaled_mm: every dimension a multiple of 16


def scale_for(t: torch.Tensor, fmax: float) -> torch.Tensor:
    """The fp32 power of two that brings ``t``'s largest magnitude to at most ``fmax`` (exact to apply and to
    undo). An all-zero tensor gets the scale of an amax of 1e-12 (its cast is zero all the same)."""
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    return torch.exp2(torch.floor(torch.log2(fmax / amax)))


def to_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t * scale`` cast to ``dtype``. With ``scale`` from ``scale_for`` on the same tensor no product passes the
    format's largest number (the scale is a power of two at most ``fmax / amax``, and multiplying by it is
    exact), so no clamp is needed before the cast (which would give NaN past the range)."""
    return (t.float() * scale).to(dtype)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (``_scaled_mm`` takes its second operand so)."""
    return t.t().contiguous().t()


class _FP8Linear(torch.autograd.Function):
    """``x @ w.T + b`` for ``x`` (M, K), ``w`` (N, K) and ``b`` (N) or None, in FP8 both ways (module
    docstring), the result in ``out_dtype`` (what ``F.linear`` would give: autocast's dtype, else the
    input's). A bf16 result takes the bias in the matmul's epilogue."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        sx, sw = scale_for(x, E4M3_MAX), scale_for(w, E4M3_MAX)
        xq, wq = to_fp8(x, sx, E4M3), to_fp8(w, sw, E4M3)
        fused = b is not None and out_dtype == torch.bfloat16
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx.reciprocal(), scale_b=sw.reciprocal(),
                             bias=b.to(out_dtype) if fused else None, out_dtype=out_dtype, use_fast_accum=True)
        if b is not None and not fused:
            y = y + b.to(out_dtype)
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else None)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xq, wq, sx, sw = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        sg = scale_for(gy, E5M2_MAX)
        gq = to_fp8(gy, sg, E5M2)
        gx = torch._scaled_mm(gq, _col_major(wq), scale_a=sg.reciprocal(), scale_b=sw.reciprocal(),
                              out_dtype=torch.bfloat16, use_fast_accum=False)
        gw = torch._scaled_mm(gq.t().contiguous(), _col_major(xq), scale_a=sg.reciprocal(), scale_b=sx.reciprocal(),
                              out_dtype=torch.float32 if w_dtype == torch.float32 else torch.bfloat16,
                              use_fast_accum=False)
        gb = gy.sum(0, dtype=torch.float32).to(b_dtype) if b_dtype is not None else None
        return gx.to(x_dtype), gw.to(w_dtype), gb, None


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` that multiplies in FP8 (``_FP8Linear``). A call whose rows are not a multiple of 16
    (``_scaled_mm`` cannot take it) runs the bf16 matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows % ALIGN:
            return super().forward(x)
        dt = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        y = _FP8Linear.apply(x.reshape(rows, x.shape[-1]), self.weight, self.bias, dt)
        return y.reshape(*x.shape[:-1], self.out_features)


def fp8_ready(device: torch.device) -> str | None:
    """None if ``device`` multiplies in FP8, else why not."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"FP8 matmuls need CUDA or the CPU, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return (f"FP8 matmuls need compute capability 8.9 or newer (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def convert_blocks(blocks: nn.Module | None) -> int:
    """Every ``nn.Linear`` inside ``blocks`` whose dimensions suit ``_scaled_mm`` becomes a ``Float8Linear``
    in place (same parameters, same names). Returns how many."""
    n = 0
    for mod in blocks.modules() if blocks is not None else ():
        if type(mod) is nn.Linear and mod.in_features % ALIGN == 0 and mod.out_features % ALIGN == 0:
            mod.__class__ = Float8Linear
            n += 1
    return n
