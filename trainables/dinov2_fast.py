"""DINOv2 blocks with LayerScale folded into the projection before it (``training.fast_blocks``).

A DINOv2 block scales each branch's output by a learned per-channel vector before the residual add:
``ls ∘ (W x + b)``. Here that is computed as ``(diag(ls) W) x + ls ∘ b``, which is the same in real arithmetic
(only where a rounding happens moves). The scale then touches the 768 × 768 weight instead of an
activation-sized tensor (131k rows at batch 512): the backward's reduction of ``y ∘ dy`` over every row for
``ls``'s gradient becomes one over the weight's rows, and ``y`` is not kept for it. Measured on the H100,
ViT-B/14 at batch 512: 197.7 → 191.6 ms a step and 2.4 GB less peak memory (docs/gpu.md).

Only classes change, in place: the branch's last linear layer (the attention's output projection, the MLP's
second layer) becomes ``LayerScaledLinear``, which reads the scale from the block's LayerScale module, and
that module becomes ``FoldedLayerScale``, which passes its input through. Parameters, their names, the state
dict and the block's own ``forward`` are unchanged, so checkpoints load either way and any transformers
version whose block runs ``layer_scale(linear(...))`` with only dropout between them works (transformers 5.17's
``attention.output.dense`` and 5.2x's ``attention.o_proj`` alike). A linear layer that is not a plain
``nn.Linear`` is left alone (its block keeps the unfolded scale), and ``training.fp8`` does not convert the
folded layers (it takes plain ``nn.Linear`` only).

The patch embedding's convolution (kernel = stride: every pixel in exactly one patch) becomes one matmul over
the image's patches (``PatchConv2d``): the same sums, in another order. cuDNN ran it as an Ampere-style kernel
behind layout conversions, about 6 ms of a 173 ms ViT-B/14 step at batch 512 on an H200 (profile of
2026-11-28, fourteenth session), for 0.12 TFLOP that a matmul does in a fraction of a millisecond.

Tried and not kept (docs/gpu.md, ninth session): attending with the 256 patch tokens in one tile-aligned
fused kernel and merging the CLS token in by log-sum-exp. cuDNN's kernels got faster (forward 9.0 → 3.8 ms,
backward 20 → 13 ms a step), but the merge's extra elementwise passes cost more than that saved. The
CLS token is now kept out of the tiles inside the attention kernels themselves, with no extra pass
(``trainables/cls_attn.py``, ``training.cls_attention``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class LayerScaledLinear(nn.Linear):
    """``ls ∘ (x Wᵀ + b)`` as ``x (diag(ls) W)ᵀ + ls ∘ b``, ``ls`` read from the LayerScale module that
    ``fold`` linked (kept outside the module tree: the parameter stays where it was, under its own name, and a
    step that replaces parameter objects, as ``training.bf16_weights`` does, is followed)."""

    def folded(self):
        """The weight and bias with the scale folded in: ``diag(ls) W`` and ``ls ∘ b``."""
        ls = self._layer_scale.lambda1
        return self.weight * ls.unsqueeze(-1), None if self.bias is None else self.bias * ls

    def forward(self, x):
        return F.linear(x, *self.folded())


class FoldedLayerScale(nn.Module):
    """A LayerScale whose scale the linear layer before it applies (``LayerScaledLinear``): passes through."""

    def forward(self, hidden_state):
        return hidden_state


def _last_linear(module: nn.Module) -> nn.Module | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def fold(layer_scale: nn.Module, linear: nn.Module) -> bool:
    """Fold ``layer_scale`` (a module with a ``lambda1`` vector) into ``linear`` when it is a plain
    ``nn.Linear`` of the same output width. Returns whether it did."""
    ls = getattr(layer_scale, "lambda1", None)
    if type(linear) is not nn.Linear or not isinstance(ls, nn.Parameter) or ls.shape != (linear.out_features,):
        return False
    linear.__class__ = LayerScaledLinear
    linear.__dict__["_layer_scale"] = layer_scale  # not a submodule: the state dict stays as it was
    layer_scale.__class__ = with_mixin(FoldedLayerScale, type(layer_scale))
    return True


@functools.cache
def with_mixin(mixin: type, orig: type) -> type:
    """``orig`` with ``mixin``'s methods first, one class per pair: a module converted in place by assigning
    its ``__class__`` keeps its state, and all blocks share the class, so torch.compile reuses one graph."""
    return type(f"{mixin.__name__}_{orig.__name__}", (mixin, orig), {})


def convert_layers(blocks: nn.ModuleList | None) -> int:
    """Fold both LayerScales of every DINOv2 block in ``blocks`` into the projections before them, in place
    (before compiling). Returns how many blocks changed (both branches folded)."""
    n = 0
    for layer in blocks or []:
        done = 0
        for ls_name, branch in (("layer_scale1", "attention"), ("layer_scale2", "mlp")):
            ls, sub = getattr(layer, ls_name, None), getattr(layer, branch, None)
            if ls is None or sub is None or isinstance(ls, FoldedLayerScale):
                continue
            done += fold(ls, _last_linear(sub))
        n += done == 2
    return n


class PatchConv2d(nn.Conv2d):
    """A patch embedding's ``nn.Conv2d`` (kernel = stride, no padding, dilation or groups) as one matmul:
    the image's patches gathered into rows of ``C·p·q`` (in the weight's ``(C, p, q)`` order) and multiplied
    by the weight seen as ``(out, C·p·q)``. Returns what the convolution returns, ``(B, out, H/p, W/q)``,
    as a view of the ``(B, H/p·W/q, out)`` product, so DINOv2's ``flatten(2).transpose(1, 2)`` after it
    is a view of contiguous rows (no copy). Pixels past the last whole patch are dropped, as the convolution
    drops them.

    The rows are gathered in one copy that also casts them to autocast's dtype and pads them to a multiple of
    8 columns (``PAD``): ViT-B/14's 588 columns give rows that are not 16-byte aligned, which cuBLAS runs on
    slower kernels. The pad's columns are zero in the rows and the weight, so the product is unchanged."""

    PAD = 8

    def forward(self, x):
        p, q = self.kernel_size
        b, c, h, w = x.shape
        hh, ww = h // p, w // q
        x = x[:, :, : hh * p, : ww * q]
        k = c * p * q
        kp = k + -k % self.PAD  # the next multiple of PAD (k itself with PAD 1)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = x.new_empty((b * hh * ww, kp), dtype=dt)
        if kp > k:
            rows[:, k:].zero_()
        rows[:, :k].view(b, hh, ww, c, p, q).copy_(x.reshape(b, c, hh, p, ww, q).permute(0, 2, 4, 1, 3, 5))
        wt = self.weight.reshape(self.out_channels, k)
        if kp > k:
            wt = F.pad(wt, (0, kp - k))
        y = F.linear(rows, wt.to(dt), None if self.bias is None else self.bias.to(dt))
        return y.view(b, hh, ww, self.out_channels).permute(0, 3, 1, 2)


def convert_patch_embed(model: nn.Module) -> int:
    """Every plain ``nn.Conv2d`` in ``model`` that cuts its input into patches (kernel = stride, zero padding,
    no dilation, one group, zeros padding mode) made a ``PatchConv2d``, in place: same parameters, same state
    dict. Returns how many changed (DINOv2: its one patch embedding)."""
    n = 0
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.kernel_size == m.stride and m.padding == (0, 0) and m.dilation == (1, 1)
                and m.groups == 1 and m.padding_mode == "zeros"):
            m.__class__ = PatchConv2d
            n += 1
    return n
