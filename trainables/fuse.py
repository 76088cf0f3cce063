"""Sibling projections that read the same input, run as one matmul: same math, same parameters.

What. Qwen2 attention: ``q_proj``, ``k_proj`` and ``v_proj`` become one ``F.linear`` over their weights
and biases concatenated, its output split in that order; Qwen2 MLP: ``gate_proj`` and ``up_proj`` likewise,
then ``down_proj(act_fn(gate) * up)``; DINOv2 self-attention: its query, key and value projections. The
parameters, their names and the ``state_dict`` are untouched: the concatenation happens inside the forward
(weight-sized; under ``torch.compile`` it fuses with autocast's bf16 cast), so checkpoints, weight transfer,
the optimizer, DDP and FSDP2 (whose units' weights are plain tensors during their forward) see the model
as before. Not under DeepSpeed ZeRO-3: its hooks gather a projection's weight only when that projection
is called.

Why. In the H100 profile of Qwen2.5-0.5B (d=896, k and v 128 wide) the k and v projections are tiny GEMMs
that each read the whole input again, and the backward adds up three (attention) or two (MLP) partial
input gradients with extra elementwise kernels. One GEMM reads the input once and returns one gradient.

How. Each module instance gets a new ``forward`` (``types.MethodType``) before ``compile_blocks`` compiles
the decoder layers, so the compiled graphs trace it. It is HF's forward with the projections changed: it
calls the HF module's own helpers (``apply_rotary_pos_emb``, the ``ALL_ATTENTION_FUNCTIONS`` interface,
``eager_attention_forward``), so SDPA, GQA, scaling, dropout, sliding window and kwargs stay HF's.

Checked against. Written from the forwards of transformers 5.17.0 to 5.24.0 (read in 5.17, 5.19, 5.21,
5.23 and 5.24; tests/test_fuse.py run on 5.17.0 and 5.24.0): Qwen2Attention with ``past_key_values`` (to
5.23) or ``cache`` (5.24, whose cache update also takes the kwargs), Qwen2MLP, Dinov2SelfAttention with
query/key/value (5.17) and Dinov2Attention with q/k/v_proj (from 5.19). A module is fused only where its
class's forward has one of those signatures and reads exactly the names it read there (its code's
``co_names``: an added step, a q-norm say, shows there), and its children are the expected ones, the
projections plain unhooked ``nn.Linear`` alike in dtype, device, input and bias, on plain tensors. If any
module of a model fails that, one warning says why and the model is left unfused.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("sweeper.fuse")

QWEN2 = "transformers.models.qwen2.modeling_qwen2"
DINOV2 = "transformers.models.dinov2.modeling_dinov2"


def resolve_fuse(knob: Any, on_gpu: bool, strategy: str, stage: int) -> bool:
    """``training.fuse_projections``: ``auto`` on CUDA, ``true`` also on the CPU, ``false`` never; never
    under DeepSpeed ZeRO-3 (the parameters are partitions outside each projection's own call)."""
    if knob is False or knob == "false":
        return False
    if strategy == "deepspeed" and stage == 3:
        if knob is True or knob == "true":
            log.warning("training.fuse_projections: not under DeepSpeed ZeRO-3 (its hooks gather each projection's "
                        "weight only when that projection is called): left unfused")
        return False
    return knob is True or knob == "true" or on_gpu


def fused_linear(x: torch.Tensor, projs: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(p(x) for p in projs)`` as one matmul: weights (and biases) concatenated, the output split."""
    w = torch.cat([p.weight for p in projs])
    b = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
    return F.linear(x, w, b).split([p.out_features for p in projs], dim=-1)


# ----------------------------------------------- the replacements: HF's forwards (``hf``: its module)


def _qwen2_attention(hf, update_takes_kwargs: bool):
    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # the name up to 5.23 (5.24's deprecated alias)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = [t.view(hidden_shape).transpose(1, 2)
                   for t in fused_linear(hidden_states, (self.q_proj, self.k_proj, self.v_proj))]
        cos, sin = position_embeddings
        q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, **({"kwargs": kwargs} if update_takes_kwargs else {}))
        attention_interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                       hf.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    return forward


def _qwen2_mlp(hf, _):
    def forward(self, x):
        gate, up = fused_linear(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act_fn(gate) * up)

    return forward


def _dinov2_attention(hf, _):  # 5.19 on
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = [t.view(hidden_shape).transpose(1, 2)
                   for t in fused_linear(hidden_states, (self.q_proj, self.k_proj, self.v_proj))]
        attention_interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                       hf.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    return forward


def _dinov2_self_attention(hf, _):  # 5.17: Dinov2SelfAttention
    def forward(self, hidden_states, **kwargs):
        new_shape = (hidden_states.shape[0], -1, self.num_attention_heads, self.attention_head_size)
        q, k, v = [t.view(*new_shape).transpose(1, 2)
                   for t in fused_linear(hidden_states, (self.query, self.key, self.value))]
        attention_interface = hf.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                       hf.eager_attention_forward)
        context, probs = attention_interface(
            self, q, k, v, None, is_causal=self.is_causal, scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob, **kwargs)
        return context.reshape(context.size()[:-2] + (self.all_head_size,)), probs

    return forward


# ----------------------------------------------- what each replacement was written for


@dataclass(frozen=True)
class Layout:
    hf_module: str  # a module with a class from here in its MRO and these projections as children is a candidate
    projs: tuple[str, ...]  # fused, in this order
    others: tuple[str, ...]  # its other children
    signatures: tuple[str, ...]  # HF's forward's, annotations left out
    names: str  # what HF's forward reads: its code's co_names
    make: Callable[[Any, bool], Callable]  # (HF module, flag) -> the replacement


LAYOUTS = (
    Layout(QWEN2, ("q_proj", "k_proj", "v_proj"), ("o_proj",),
           ("(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs)",
            "(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs)"),
           "ALL_ATTENTION_FUNCTIONS _attn_implementation apply_rotary_pos_emb attention_dropout config contiguous "
           "eager_attention_forward get_interface head_dim k_proj layer_idx o_proj q_proj reshape scaling shape "
           "sliding_window training transpose update v_proj view", _qwen2_attention),
    Layout(QWEN2, ("gate_proj", "up_proj"), ("down_proj", "act_fn"), ("(self, x)",),
           "act_fn down_proj gate_proj up_proj", _qwen2_mlp),
    Layout(DINOV2, ("q_proj", "k_proj", "v_proj"), ("o_proj",),
           ("(self, hidden_states, attention_mask=None, **kwargs)",),
           "ALL_ATTENTION_FUNCTIONS _attn_implementation attention_dropout config contiguous eager_attention_forward "
           "get_interface head_dim k_proj o_proj q_proj reshape scaling shape training transpose v_proj view",
           _dinov2_attention),
    Layout(DINOV2, ("query", "key", "value"), (), ("(self, hidden_states, **kwargs)",),
           "ALL_ATTENTION_FUNCTIONS _attn_implementation all_head_size attention_head_size config dropout_prob "
           "eager_attention_forward get_interface is_causal key num_attention_heads query reshape scaling shape size "
           "training transpose value view", _dinov2_self_attention),
)


def _signature(fn) -> str:
    s = inspect.signature(fn)
    return str(s.replace(parameters=[p.replace(annotation=p.empty) for p in s.parameters.values()],
                         return_annotation=s.empty))


@functools.lru_cache(maxsize=None)
def _replacement(lay: Layout, signature: str) -> Callable:
    # one function per layout and signature, shared by every block (no graph per block on its account)
    return lay.make(sys.modules[lay.hf_module], "cache=None" in signature)


def _candidate(mod: nn.Module, lay: Layout) -> bool:
    return (any(c.__module__ == lay.hf_module for c in type(mod).__mro__)
            and all(n in mod._modules for n in lay.projs))


def _mismatch(mod: nn.Module, lay: Layout) -> str | None:
    """Why ``mod`` is not what ``lay``'s replacement was written for (None: it is)."""
    cls = type(mod)
    try:
        sig = _signature(cls.forward)
        names = set(inspect.unwrap(cls.forward).__code__.co_names)
    except (TypeError, ValueError, AttributeError) as e:
        return f"{cls.__name__}.forward cannot be inspected ({e})"
    if sig not in lay.signatures:
        return f"{cls.__name__}.forward{sig}, written for {' or '.join(lay.signatures)}"
    if names != set(lay.names.split()):
        odd = sorted(names.symmetric_difference(lay.names.split()))
        return f"{cls.__name__}.forward reads {odd}: unlike the forward its replacement was written from"
    if set(mod._modules) != set(lay.projs + lay.others):
        return f"{cls.__name__} has children {sorted(mod._modules)}, not {sorted(lay.projs + lay.others)}"
    if "forward" in vars(mod) and getattr(vars(mod)["forward"], "__func__", None) is not _replacement(lay, sig):
        return f"{cls.__name__} already has a forward of its own"
    projs = [mod._modules[n] for n in lay.projs]
    if any(type(p) is not nn.Linear or p._forward_hooks or p._forward_pre_hooks for p in projs):
        return f"{cls.__name__}'s {'/'.join(lay.projs)} are not all plain nn.Linear without hooks"
    ts = [t for p in projs for t in (p.weight, p.bias) if t is not None]
    if len({(t.dtype, t.device) for t in ts}) > 1 or len({(p.in_features, p.bias is None) for p in projs}) > 1:
        return f"{cls.__name__}'s {'/'.join(lay.projs)} differ in dtype, device, input width or bias"
    if any(hasattr(t, "ds_id") or type(t.data) is not torch.Tensor for t in ts):
        return f"{cls.__name__}'s parameters are partitions or shards (ZeRO-3, DTensor), not whole tensors"
    return None


def fuse_projections(model: nn.Module) -> int:
    """Give each Qwen2 attention and MLP, and each DINOv2 self-attention, of ``model`` its fused forward, in
    place. Returns how many modules were fused: 0 where there are none, or where one is not what its
    replacement was written for (one warning; nothing is fused then)."""
    found, problems = [], []
    for name, mod in model.named_modules():
        lay = next((x for x in LAYOUTS if _candidate(mod, x)), None)
        if lay is not None:
            why = _mismatch(mod, lay)
            if why:
                problems.append(f"{name}: {why}")
            else:
                found.append((mod, lay))
    if problems:
        import transformers

        log.warning("training.fuse_projections: model left unfused, not what trainables/fuse.py was written for "
                    "(transformers %s): %s%s", transformers.__version__, problems[0],
                    f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        return 0
    for mod, lay in found:
        mod.forward = types.MethodType(_replacement(lay, _signature(type(mod).forward)), mod)
    if found:
        log.info("fused the sibling projections of %d modules into one matmul each", len(found))
    return len(found)
