"""trainables/fuse.py: sibling projections as one matmul compute what HF's own forwards compute (outputs and
every gradient), with the same parameters and state_dict; the knob; the guard that leaves a model unfused
when the installed transformers is not what the replacements were written for."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from tests.conftest import TINY_QWEN
from tests.test_trainables import resolved
from trainables import fuse
from trainables.fuse import fuse_projections, resolve_fuse


def _perturbed(m: nn.Module) -> nn.Module:
    # HF starts biases at 0 and norms at 1: random ones, so a bias or a split in the wrong place shows
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.train()


def qwen() -> nn.Module:  # as the family builds it: 2 layers, hidden 64, 4 heads, 2 kv heads, intermediate 128, sdpa
    from transformers import Qwen2Model

    from trainables.qwen_regression import FAMILY

    torch.manual_seed(0)
    return _perturbed(Qwen2Model(FAMILY.build_config({"size": "tiny"})))


def dino() -> nn.Module:  # 2 layers, hidden 64, 4 heads, 28 px images in patches of 7, sdpa
    from transformers import Dinov2Model

    from trainables.dinov2_classifier import FAMILY

    torch.manual_seed(0)
    return _perturbed(Dinov2Model(FAMILY.build_config({"size": "tiny"})))


def qwen_inputs(padded: bool = False) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 258, (3, 11), generator=g)
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as the family's collate makes it
    mask[2, 4:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def dino_inputs() -> dict:
    return {"pixel_values": torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))}


FAMILIES = {"qwen": (qwen, qwen_inputs, 4), "dino": (dino, dino_inputs, 2)}  # fused: 2 attention + 2 MLP; 2 attention


def run(model: nn.Module, inputs: dict, autocast: bool = False):
    """Output, and every parameter's gradient after the backward of a scalar loss (a fixed random weighting
    of the output, so every row, position and channel counts)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = model(**inputs).last_hidden_state
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    (h.float() * w).sum().backward()
    return h.detach().float(), {n: p.grad for n, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-4, atol=5e-5):  # fp32; the input gradient is summed in another order
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"grad of {n}: {m}")


def fused_pair(build, expect: int):
    ref = build()
    fused = copy.deepcopy(ref)
    assert fuse_projections(fused) == expect
    return ref, fused


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "right-padding"])
def test_qwen_fused_matches_outputs_and_every_gradient(padded):
    ref, fused = fused_pair(qwen, 4)
    for layer in fused.layers:
        assert "forward" in vars(layer.self_attn) and "forward" in vars(layer.mlp)  # the replacements are in
    assert_same(run(fused, qwen_inputs(padded)), run(ref, qwen_inputs(padded)))


def test_dino_fused_matches_outputs_and_every_gradient():
    ref, fused = fused_pair(dino, 2)
    assert_same(run(fused, dino_inputs()), run(ref, dino_inputs()))


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_and_parameters_unchanged(family):
    build, _, n = FAMILIES[family]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    assert fuse_projections(model) == n
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert {k: id(p) for k, p in model.named_parameters()} == {k: id(p) for k, p in params.items()}
    model.load_state_dict(build().state_dict())  # strict: an unfused model's checkpoint loads as it is


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_split_order_is_caught(family, monkeypatch):
    """The equality above fails when the split is wrong (k and v swapped; gate and up swapped)."""
    build, inputs, n = FAMILIES[family]
    ref, fused = fused_pair(build, n)
    right = fuse.fused_linear
    monkeypatch.setattr(fuse, "fused_linear", lambda x, projs: (lambda o: (o[0], *o[:0:-1]))(right(x, projs)))
    with pytest.raises(AssertionError):
        assert_same(run(fused, inputs()), run(ref, inputs()))
    monkeypatch.setattr(fuse, "fused_linear", right)
    assert_same(run(fused, inputs()), run(ref, inputs()))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_agrees(family):
    build, inputs, n = FAMILIES[family]
    ref, fused = fused_pair(build, n)
    a, b = run(fused, inputs(), autocast=True), run(ref, inputs(), autocast=True)
    torch.testing.assert_close(a[0], b[0], rtol=2e-2, atol=2e-2)
    ref32 = run(ref, inputs())[0]
    assert (a[0] - ref32).abs().max() < 0.2  # it did run in bf16 and still tracks fp32


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_blocks_match_eager(family):
    """Fused, then each block compiled in place as ``compile_blocks`` does: the graphs (forward and backward)
    trace the fused forwards and give what eager gives."""
    import torch._dynamo

    from trainables.speed import compile_blocks

    build, inputs, n = FAMILIES[family]
    model = build()
    assert fuse_projections(model) == n
    eager = run(model, inputs())
    torch._dynamo.reset()
    assert compile_blocks(model) == 2
    try:
        out = run(model, inputs())
    except Exception as e:  # noqa: BLE001 - only a missing compiler toolchain skips
        if "compiler" in str(e).lower() or "cpp" in str(e).lower():
            pytest.skip(f"inductor cannot compile on this CPU: {type(e).__name__}: {str(e)[:200]}")
        raise
    finally:
        torch._dynamo.reset()
    assert_same(out, eager, rtol=1e-4, atol=2e-4)  # inductor's kernels round otherwise


def test_knob_schema_and_identity():
    from sweeper import manifest
    from sweeper.errors import UserError

    assert resolved(TINY_QWEN, [])["training"]["fuse_projections"] == "auto"
    for v, want in (("auto", "auto"), ("true", True), ("false", False)):
        assert resolved(TINY_QWEN, [f"training.fuse_projections={v}"])["training"]["fuse_projections"] == want
    for bad in ('"yes"', "1", "fast"):
        with pytest.raises(UserError, match=r"`training.fuse_projections`: must be auto, true or false"):
            resolved(TINY_QWEN, [f"training.fuse_projections={bad}"])
    assert manifest.LATER_DEFAULTS[("training", "fuse_projections")] == "auto"


def test_knob_resolution():
    assert resolve_fuse("auto", True, "plain", 2) and resolve_fuse("auto", True, "fsdp", 2)
    assert resolve_fuse("auto", True, "deepspeed", 2)
    assert not resolve_fuse("auto", False, "plain", 2)  # auto: CUDA only
    assert resolve_fuse(True, False, "plain", 2)  # true: also on the CPU
    assert not resolve_fuse(False, True, "plain", 2)
    assert not resolve_fuse("auto", True, "deepspeed", 3) and not resolve_fuse(True, True, "deepspeed", 3)  # ZeRO-3


@pytest.mark.parametrize("knob, fused", [("auto", 0), ("true", 2), ("false", 0)])
def test_prepare_applies_the_knob_on_the_cpu(knob, fused):
    from sweeper.trial import TrialSpec
    from trainables import speed

    m = resolved(TINY_QWEN, ["training.strategy=plain", "training.precision=fp32", f"training.fuse_projections={knob}"])
    p = speed.prepare({"lr": 3e-3, "batch_size": 16}, TrialSpec(manifest=m), None)
    assert p.stepper.fused == fused  # TINY_QWEN: one layer (its attention and its MLP)
    assert ("forward" in vars(p.stepper.inner.backbone.layers[0].self_attn)) == bool(fused)
    assert torch.isfinite(p.stepper.step(next(iter(p.train_loader(1)))))


# ----------------------------------------------- the guard


def _unfused_with_warning(model, caplog, *words):
    ref = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="sweeper.fuse"):
        assert fuse_projections(model) == 0
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "left unfused" in warns[0], warns
    for w in words:
        assert w in warns[0], warns[0]
    assert not any("forward" in vars(mod) for mod in model.modules())  # nothing fused, not even the MLPs
    assert_same(run(model, qwen_inputs()), run(ref, qwen_inputs()))


def test_guard_another_forward_signature(monkeypatch, caplog):
    from transformers.models.qwen2 import modeling_qwen2 as hf

    original = hf.Qwen2Attention.forward

    def forward(self, *args, output_attentions=False, **kwargs):
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hf.Qwen2Attention, "forward", forward)
    _unfused_with_warning(qwen(), caplog, "Qwen2Attention.forward", "output_attentions")


def test_guard_a_forward_with_another_step(caplog):
    """Same signature, one more step (a subclass whose forward reads something the replacement would skip)."""
    from transformers.models.qwen2 import modeling_qwen2 as hf

    class ScaledMLP(hf.Qwen2MLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * self.config.mlp_scale

    model = qwen()
    model.config.mlp_scale = 1.0
    sub = ScaledMLP(model.config)
    sub.load_state_dict(model.layers[1].mlp.state_dict())
    model.layers[1].mlp = sub
    _unfused_with_warning(model, caplog, "ScaledMLP.forward reads", "mlp_scale")


def test_guard_an_extra_child_and_partitioned_weights(caplog):
    model = qwen()
    model.layers[0].self_attn.q_norm = nn.Identity()
    _unfused_with_warning(model, caplog, "children")
    caplog.clear()
    model = qwen()
    model.layers[1].self_attn.k_proj.weight.ds_id = 7  # as DeepSpeed ZeRO-3 marks its partitioned parameters
    _unfused_with_warning(model, caplog, "partitions")


def test_nothing_to_fuse_is_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="sweeper.fuse"):
        assert fuse_projections(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))) == 0
    assert not caplog.records
