"""``trainables/cls_attn.py``: attention with the CLS token outside the tiles (``training.cls_attention``).
The kernels in Triton's interpreter on the CPU (a fresh process: Triton decides at import whether it
interprets; ``tests/cls_attn_interp.py``) and on CUDA against PyTorch's attention; where the product turns
it on and where it refuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainables import cls_attn as ca

ROOT = Path(__file__).resolve().parent.parent
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny_dinov2(layers=2, image=28, patch=7):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                    intermediate_size=128, image_size=image, patch_size=patch))


@pytest.mark.skipif(ca.triton is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the compiled kernels are tested (below); the GPU "
                    "image's Triton 3.6 interpreter cannot run these kernels (a program id it will not turn into a "
                    "Python scalar), Triton 3.9's can")
def test_kernels_and_ops_in_the_interpreter():
    """Forward, log-sum-exp and every gradient against PyTorch's fp32 attention (two layouts, three tilings,
    a scale of its own, a CLS key that takes nearly all the weight), and the custom ops with autograd in fp16,
    eager and under torch.compile, no further from fp32 than PyTorch's fp16 attention."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cls_attn_interp.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.split() == ["kernels:", "ok", "ops:", "ok", "qkv:", "ok", "module:", "ok"], r.stdout


def test_supported_says_why_not():
    q = torch.randn(2, 3, 257, 64)
    assert ca.supported(q, q, q) is None or ca.triton is None
    if ca.triton is None:
        return
    assert "tokens" in ca.supported(*(torch.randn(2, 3, 256, 64),) * 3)  # no CLS token past whole tiles
    assert "head dim" in ca.supported(*(torch.randn(2, 3, 257, 48),) * 3)
    assert "shapes" in ca.supported(q, q, torch.randn(2, 3, 257, 32))
    assert "contiguous" in ca.supported(q, q, torch.randn(2, 3, 64, 257).transpose(-1, -2))
    big = torch.empty(11000, 12, 257, 64, device="meta")  # 2.2e9 elements: SDPA takes it
    assert "32-bit" in ca.supported(big, big, big)
    with pytest.raises(ValueError, match="cls_attention: "):
        ca.cls_attention(*(torch.randn(1, 1, 100, 64),) * 3)


def test_model_on_the_cpu_runs_sdpa_and_keeps_its_config_clean():
    """On the CPU the registered implementation hands every call to PyTorch's SDPA: the same output bit for bit;
    the implementation's name stays out of the saved config (an export loads anywhere)."""
    if ca.triton is None:
        pytest.skip("Triton is not installed")
    a, b = _tiny_dinov2(), _tiny_dinov2()
    assert ca.use(b) == 2  # both layers' q, k, v as one matmul (ca.FusedQKVAttention), which on the CPU is not taken
    assert all(isinstance(layer.attention, ca.FusedQKVAttention) for layer in b.encoder.layer)
    assert b.state_dict().keys() == a.state_dict().keys() and ca.use(b) == 2  # same parameters; twice is once
    assert ca.active(type("M", (), {"backbone": b})()) and not ca.active(type("M", (), {"backbone": a})())
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(a(pixel_values=x).last_hidden_state, b(pixel_values=x).last_hidden_state)
    assert ca.IMPLEMENTATION not in str(b.config.to_dict())


def test_product_turns_it_on_only_where_it_applies(tmp_path):
    from sweeper import manifest as mf
    from sweeper.errors import ManifestError, UserError
    from trainables import registry, speed

    dino, qwen = registry.get("dinov2_classifier"), registry.get("qwen_regression")
    model = type("M", (torch.nn.Module,), {})()
    model.backbone = _tiny_dinov2()
    cpu = torch.device("cpu")
    cuda = torch.device("cuda")  # the decision only: nothing runs on it here
    assert speed.use_cls_attention("auto", dino, model, cpu) is False  # the CPU: nothing changes
    assert speed.use_cls_attention(True, dino, model, cpu) is False
    assert speed.use_cls_attention(False, dino, model, cuda) is False
    assert speed.use_cls_attention("auto", qwen, model, cuda) is False
    with pytest.raises(UserError, match=r"training.cls_attention: qwen_regression has no CLS token"):
        speed.use_cls_attention(True, qwen, model, cuda)
    assert not ca.active(model)
    if ca.triton is None:
        return
    # auto: rows × heads (4 here) under the threshold without CUDA graphs keeps SDPA; at it, or with graphs, or
    # with true, the kernels
    small = speed.CLS_ATTENTION_MIN_ROWS_HEADS // 4 - 1
    assert speed.use_cls_attention("auto", dino, model, cuda, rows=small) is False and not ca.active(model)
    assert speed.use_cls_attention("auto", dino, model, cuda, rows=small, cudagraphs=True) and ca.active(model)
    for knob, rows in ((True, small), ("auto", small + 1), ("auto", None)):
        model.backbone = _tiny_dinov2()
        assert speed.use_cls_attention(knob, dino, model, cuda, rows=rows) and ca.active(model), (knob, rows)
        assert ca.fuse_qkv(model.backbone) == 2  # (already fused: counted, not changed)
    # DeepSpeed ZeRO-3 gathers q_proj's weight only inside q_proj's forward, and FSDP's shards are not tested with
    # it: the kernels, but no fused projection
    for strategy, stage, fused in (("deepspeed", 3, False), ("fsdp", None, False), ("deepspeed", 2, True),
                                   ("ddp", None, True)):
        model.backbone = _tiny_dinov2()
        assert speed.use_cls_attention(True, dino, model, cuda, strategy=strategy, stage=stage) and ca.active(model)
        assert isinstance(model.backbone.encoder.layer[0].attention, ca.FusedQKVAttention) is fused, (strategy, stage)
    with pytest.raises(ManifestError, match=r"`training.cls_attention`: qwen_regression has no CLS token"):
        mf.load(ROOT / "search_spaces" / "qwen-tiny_regression_cpu.yaml", ["training.cls_attention=true"])
    assert mf.load(ROOT / "search_spaces" / "dinov2-tiny_classifier_cpu.yaml",
                   ["training.cls_attention=true"]).resolved()["training"]["cls_attention"] is True


@_CUDA
def test_cuda_kernels_against_pytorch_in_bf16():
    """ViT-B/14's shape at a small batch, in the projections' layout: output and gradients no further from
    fp32 than PyTorch's bf16 attention (cuDNN or Flash), at 257 tokens and at 1 + 128."""
    for T, H in ((257, 12), (129, 6)):
        g = torch.Generator(device="cuda").manual_seed(T)
        q32, k32, v32, do = (torch.randn(4, T, H, 64, device="cuda", generator=g).transpose(1, 2) for _ in range(4))
        q32, k32, v32 = (x.requires_grad_(True) for x in (q32, k32, v32))
        ref = F.scaled_dot_product_attention(q32, k32, v32)
        ref.backward(do)
        want = [ref.detach(), q32.grad, k32.grad, v32.grad]
        errs = {}
        for name, fn in (("ours", ca.cls_attention), ("torch", F.scaled_dot_product_attention)):
            q, k, v = (x.detach().bfloat16().requires_grad_(True) for x in (q32, k32, v32))
            out = fn(q, k, v)
            out.backward(do.bfloat16())
            errs[name] = [float((g.detach().float() - w).abs().max()) for g, w in zip((out, q.grad, k.grad, v.grad), want)]
        for i, what in enumerate(("out", "dq", "dk", "dv")):
            assert errs["ours"][i] <= 2 * errs["torch"][i] + 1e-3, (T, what, errs)


@_CUDA
def test_cuda_model_with_it_matches_sdpa_and_compiles():
    """A 224-px ViT (257 tokens, two layers) in bf16 through the registered implementation, eager and compiled,
    against the same model on PyTorch's SDPA: outputs and the parameters' gradients within bf16's noise."""
    ref_m = _tiny_dinov2(layers=2, image=224, patch=14).cuda().bfloat16()
    ours = _tiny_dinov2(layers=2, image=224, patch=14).cuda().bfloat16()
    assert ca.use(ours) == 2  # q, k and v as one matmul read in place by the kernels
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    outs = []
    for m, params in ((ref_m, ref_m), (ours, ours), (torch.compile(ours), ours)):
        params.zero_grad(set_to_none=True)
        y = m(pixel_values=x).last_hidden_state
        y.float().square().mean().backward()
        # (the mask token takes no part without a mask: no gradient)
        outs.append((y.detach().float(), {n: p.grad.float() for n, p in params.named_parameters() if p.grad is not None}))
    assert len(outs[0][1]) > 20
    for y, grads in outs[1:]:
        assert (y - outs[0][0]).abs().max() <= 0.05 * outs[0][0].abs().max()
        assert grads.keys() == outs[0][1].keys()
        for n, w in outs[0][1].items():
            assert (grads[n] - w).abs().max() <= 0.05 * w.abs().max() + 1e-3, n


@_CUDA
@pytest.mark.parametrize("graphs,knob,kernels", [(True, "auto", True), (False, "auto", False), (False, "true", True)])
def test_cuda_trial_attends_through_the_kernels(graphs, knob, kernels, monkeypatch):
    """A real DINOv2 trial on CUDA, compiled (and replayed as CUDA graphs): 56-px images in 7-px patches give
    1 + 64 tokens, so its attention can run these kernels (each call counted at the op); with ``auto`` and 16
    rows × 4 heads it does with CUDA graphs and not without them, with ``true`` always. It trains two epochs to
    finite losses."""
    from sweeper.trial import ListReporter, TrialSpec, train_loop
    from tests.test_trainables import TINY_DINO, resolved

    calls = []
    fwd = ca._forward
    monkeypatch.setattr(ca, "_forward", lambda *a: calls.append(1) or fwd(*a))
    m = resolved(TINY_DINO, ["training.max_epochs=2", "scheduler.max_t=2", "resources.gpus=1", "training.compile=true",
                             f"training.cuda_graphs={str(graphs).lower()}", f"training.cls_attention={knob}",
                             "model.config_overrides={hidden_size: 64, num_attention_heads: 4, intermediate_size: 128, "
                             "num_hidden_layers: 2, image_size: 56}", "data.generator.image_size=56"])
    torch._dynamo.reset()
    rep = ListReporter(None)
    train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
    assert rep.reports[-1]["epoch"] == 2 and all(r["val_loss"] == r["val_loss"] for r in rep.reports)
    assert bool(calls) == kernels  # (under CUDA graphs the op runs while the graphs are recorded)
