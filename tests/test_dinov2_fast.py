"""``training.fast_blocks`` for DINOv2 (trainables/dinov2_fast.py): each LayerScale folded into the projection
before it. The same arithmetic as the blocks it replaces: checked against the unconverted model (outputs and
every gradient, eager and compiled), in a real trial, and on the GPU in the product's compiled bf16 step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sweeper.trial import ListReporter, TrialSpec, train_loop
from tests.test_trainables import TINY_DINO, TINY_QWEN, resolved
from trainables import dinov2_fast as fast

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny(layers=2, **over):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, image_size=28, patch_size=7,
                       layerscale_value=0.5, **over)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Dinov2Model(cfg)


def _run(model, x, g):
    out = model(pixel_values=x).last_hidden_state
    out.backward(g)
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fast_layers_are_the_same_model():
    """Converted in place: the same parameters (the same objects) and state-dict keys; the same outputs and
    every gradient (the LayerScales' included) as the original blocks, eager and compiled, with every weight,
    bias and scale drawn at random (a scale applied along the wrong axis, or to the weight but not the bias,
    shows). A LayerScale whose parameter object is replaced (as ``training.bf16_weights`` does) is followed;
    a linear layer that is not a plain ``nn.Linear`` is left alone."""
    base = _tiny()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.3)
    model = copy.deepcopy(base)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    assert fast.convert_layers(model.encoder.layer) == 2
    for b in model.encoder.layer:
        assert isinstance(b.layer_scale1, fast.FoldedLayerScale) and isinstance(b.layer_scale2, fast.FoldedLayerScale)
        assert sum(isinstance(m, fast.LayerScaledLinear) for m in b.modules()) == 2
    assert fast.convert_layers(model.encoder.layer) == 0  # already converted
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    x, g = torch.randn(3, 3, 28, 28), torch.randn(3, 17, 32)
    out0, grads0 = _run(base, x, g)
    assert not torch.allclose(out0, _run(_tiny(), x, g)[0])  # the random draw matters
    for compiled in (False, True):
        m = copy.deepcopy(model)
        for b in m.encoder.layer if compiled else []:
            b.compile()
        out, grads = _run(m, x, g)
        torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-5)
        assert grads.keys() == grads0.keys() and any("lambda1" in n for n in grads)
        for n, gr in grads.items():
            if not n.endswith(("k_proj.bias", "key.bias")):  # mathematically zero (softmax ignores a shift)
                torch.testing.assert_close(gr, grads0[n], rtol=1e-4, atol=1e-5 * float(grads0[n].abs().max()))
    for mod in (base, model):  # a new parameter object, as MasterWeights makes
        mod.encoder.layer[1].layer_scale2.lambda1 = nn.Parameter(torch.linspace(-1, 1, 32))
    torch.testing.assert_close(model(pixel_values=x).last_hidden_state, base(pixel_values=x).last_hidden_state,
                               rtol=1e-5, atol=1e-5)

    class Other(nn.Linear):
        pass

    ls = _tiny().encoder.layer[0].layer_scale1
    assert not fast.fold(ls, Other(32, 32)) and not fast.fold(ls, nn.Linear(32, 16))
    assert not isinstance(ls, fast.FoldedLayerScale)


@pytest.mark.parametrize("c,out,k,h,w", [(3, 32, 7, 28, 28), (3, 24, 7, 31, 45), (2, 16, 4, 16, 16)])
def test_patch_conv_is_the_convolution(c, out, k, h, w):
    """The patch embedding as one matmul (``PatchConv2d``): the convolution's output and every gradient (pixels,
    weight, bias), in fp32 with random weights, for rows padded to a multiple of 8 (3·7·7 = 147 columns) and not
    (2·4·4 = 32), and for an image whose last pixels make no whole patch (dropped, as the convolution drops
    them). Under autocast, bf16 like the convolution. The output is a view of contiguous rows after DINOv2's
    ``flatten(2).transpose(1, 2)``. Convolutions that are not a patch cut stay as they are."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c, out, k, k)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    pc = copy.deepcopy(conv)
    keys = list(pc.state_dict())
    assert fast.convert_patch_embed(pc) == 1 and type(pc) is fast.PatchConv2d and list(pc.state_dict()) == keys
    x = torch.randn(3, c, h, w, requires_grad=True)
    y0, y1 = conv(x), pc(x)
    assert y1.shape == y0.shape
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert y1.flatten(2).transpose(1, 2).is_contiguous()
    g = torch.randn_like(y0)
    for a, b in zip(torch.autograd.grad(y0, [x, conv.weight, conv.bias], g),
                    torch.autograd.grad(y1, [x, pc.weight, pc.bias], g)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z0, z1 = conv(x), pc(x)
    assert z1.dtype == z0.dtype == torch.bfloat16
    torch.testing.assert_close(z1.float(), z0.float(), rtol=2e-2, atol=2e-2 * float(z0.detach().float().abs().max()))
    others = nn.Sequential(nn.Conv2d(3, 8, 3, 1), nn.Conv2d(3, 8, 4, 4, padding=1), nn.Conv2d(4, 8, 2, 2, groups=2))
    assert fast.convert_patch_embed(others) == 0 and all(type(m) is nn.Conv2d for m in others)


def test_fast_blocks_make_dinov2_patch_embedding_a_matmul():
    """The family's ``fast_blocks`` converts the patch embedding with the blocks; the model computes what it did."""
    from trainables import registry

    base = _tiny()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.3)
    model = copy.deepcopy(base)
    assert registry.get("dinov2_classifier").fast_blocks(model) == 2
    assert type(model.embeddings.patch_embeddings.projection) is fast.PatchConv2d
    x, g = torch.randn(3, 3, 28, 28), torch.randn(3, 17, 32)
    (out0, grads0), (out, grads) = _run(base, x, g), _run(model, x, g)
    torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-5)
    for n in ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"):
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-4, atol=1e-5 * float(grads0[n].abs().max()))


def test_fast_blocks_trial_and_setting(tmp_path):
    """A real tiny-DINOv2 trial on the fast path converts its blocks and learns as it does without them; the
    setting is on by default and leaves a sweep's identity as it was; DeepSpeed ZeRO-3 and a family without
    fast blocks change nothing."""
    from sweeper import manifest as mf
    from trainables import registry, speed
    from trainables.base import HParams, cached_splits

    def m(*extra):
        return resolved(TINY_DINO, ["training.max_epochs=2", "scheduler.max_t=2", "training.strategy=plain",
                                    "training.precision=bf16", *extra])

    hp = {"lr": 3e-3, "batch_size": 16}
    p = speed.prepare(hp, TrialSpec(manifest=m()), None)
    assert p.stepper.fast_blocks == 1
    assert isinstance(p.stepper.model.backbone.encoder.layer[0].layer_scale2, fast.FoldedLayerScale)
    runs = {}
    for name, extra in (("on", []), ("off", ["training.fast_blocks=false"])):
        rep = ListReporter(str(tmp_path / name))
        train_loop(hp, TrialSpec(manifest=m(*extra)), rep)
        runs[name] = [r["train_loss"] for r in rep.reports]
    assert runs["on"] == pytest.approx(runs["off"], rel=0.02) and runs["on"][-1] < runs["on"][0]

    assert m()["training"]["fast_blocks"] is True and ("training", "fast_blocks") in mf.LATER_DEFAULTS
    from tests.conftest import ROOT

    demo = ROOT / "search_spaces/qwen-tiny_regression_cpu.yaml"  # its identity from before the setting existed
    assert mf.load(demo, ["training.fast_blocks=true"]).identity() == "2d3cf794bc"
    assert mf.load(demo, ["training.fast_blocks=false"]).identity() != "2d3cf794bc"
    with pytest.raises(Exception, match="fast_blocks"):
        m("training.fast_blocks=maybe")
    family = registry.get("dinov2_classifier")
    dm = m()
    model = family.build_model(dm["model"], cached_splits(family, dm["data"], dm["model"]),
                               HParams.from_config(hp, family.info.hyperparameters))
    assert speed.use_fast_blocks(True, family, model, strategy="deepspeed", stage=3) == 0
    assert speed.use_fast_blocks(False, family, model) == 0
    assert speed.use_fast_blocks(True, family, model, strategy="deepspeed", stage=2) == 1
    assert registry.get("qwen_regression").fast_blocks(nn.Linear(2, 2)) == 0
    # the trial's order: fast blocks, then FP8, which leaves the folded layers bf16 and takes the others
    from trainables.fp8 import Float8Linear

    model = family.build_model(dm["model"], cached_splits(family, dm["data"], dm["model"]),
                               HParams.from_config(hp, family.info.hyperparameters))
    fast_n, _, fp8_n = speed.transform_blocks(family, model, torch.device("cpu"), fast_blocks=True, fp8=True)
    kinds = {type(m) for m in model.backbone.encoder.layer.modules() if isinstance(m, nn.Linear)}
    assert fast_n == 1 and fp8_n > 0 and kinds == {fast.LayerScaledLinear, Float8Linear}


def test_compile_rest_is_the_same_model():
    """``Family.compile_rest`` (DINOv2: the embeddings, the final LayerNorm and the pooling compiled, each on its
    own): the same loss and every gradient as the eager model, in fp32 on the CPU, the state dict unchanged; a
    trial's step compiles them with ``training.compile`` on and leaves them eager with it off."""
    from trainables import speed
    from trainables.dinov2_classifier import DinoClassifier, pool

    fam = DinoClassifier()
    m = resolved(TINY_DINO, ["training.compile=true", "model.config_overrides.num_hidden_layers=2", "resources.gpus=0"])
    torch.manual_seed(0)
    p = speed.prepare({"lr": 1e-3, "batch_size": 8}, TrialSpec(manifest=m), None)
    assert p.stepper.compiled == 2 and p.stepper.compiled_rest == 3
    model = p.stepper.model
    assert isinstance(model._pool_fn, type(torch.compile(pool))) and "_pool_fn" not in str(list(model.state_dict()))
    base = copy.deepcopy(model.cpu())
    del base._pool_fn
    for mod in (base.backbone.embeddings, base.backbone.layernorm, *base.backbone.encoder.layer):
        mod._compiled_call_impl = None  # eager again
    with torch.no_grad():
        for q in base.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    model.load_state_dict(base.state_dict())
    x, y = torch.randn(5, 3, 28, 28), torch.tensor([0, 1, 2, 1, 0])
    grads, losses = [], []
    for mod in (base, model):
        mod.zero_grad()
        loss = nn.functional.cross_entropy(fam.forward(mod, x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: q.grad.clone() for n, q in mod.named_parameters() if q.grad is not None})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("position_embeddings" in n for n in grads[1])
    for n, g in grads[1].items():
        if not n.endswith(("k_proj.bias", "key.bias")):  # mathematically zero (softmax ignores a shift)
            torch.testing.assert_close(g, grads[0][n], rtol=1e-4, atol=1e-5 * float(grads[0][n].abs().max()))
    off = speed.prepare({"lr": 1e-3, "batch_size": 8}, TrialSpec(manifest=resolved(TINY_DINO, ["training.compile=false", "resources.gpus=0"])), None)
    assert off.stepper.compiled_rest == 0 and not hasattr(off.stepper.model, "_pool_fn")


@_CUDA
def test_fast_blocks_compiled_step_on_cuda():
    """The product's compiled step with bf16 weights and the fast blocks on the GPU: the same losses as without
    them, to bf16 rounding (two epochs of this tiny set at this rate do not lower the loss, with or without)."""
    from trainables import speed

    losses = {}
    for on in (True, False):
        m = resolved(TINY_DINO, ["training.max_epochs=1", "scheduler.max_t=1", "resources.gpus=1",
                                 "training.compile=true", f"training.fast_blocks={str(on).lower()}",
                                 "model.config_overrides.image_size=56", "model.config_overrides.patch_size=7"])
        torch.manual_seed(0)
        p = speed.prepare({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=m), None)
        assert p.stepper.fast_blocks == int(on) and p.stepper.compiled
        losses[on] = [float(p.stepper.step(b)) for _ in range(2) for b in p.train_loader(0)]
    assert all(v == v for v in losses[True]) and losses[True] == pytest.approx(losses[False], rel=0.05)


def test_cuda_graphs_setting():
    """``training.cuda_graphs``: ``auto`` replays the compiled blocks as CUDA graphs with FP8 only, ``true`` without
    it too, ``false`` never; always only compiled, on CUDA, with bf16 weights and repeated blocks. ``true`` where
    it cannot run is refused, naming the field and why; the default leaves a sweep's identity as it was."""
    from sweeper import manifest as mf
    from sweeper.errors import UserError
    from tests.conftest import ROOT
    from trainables.speed import use_cudagraphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def uses(knob, fp8=0, compile_=True, device=cuda, bf16=True, blocks=True):
        return use_cudagraphs(fp8_layers=fp8, compile_=compile_, device=device, bf16_weights=bf16, blocks=blocks,
                              knob=knob)

    assert uses("auto", fp8=4) and not uses("auto") and uses(True) and uses(True, fp8=4)
    assert not uses(False, fp8=4) and not uses(False)
    for off in (dict(compile_=False), dict(device=cpu), dict(bf16=False), dict(blocks=False)):
        assert not uses(True, **off) and not uses("auto", fp8=4, **off), off
    gpu = ROOT / "search_spaces/dinov2-vits14_classifier_gpu.yaml"
    assert mf.load(gpu, ["training.cuda_graphs=true"]).resolved()["training"]["cuda_graphs"] is True
    for bad, why in ((["training.compile=false"], "compile false"), (["training.bf16_weights=false"], "bf16_weights"),
                     (["training.precision=fp32"], "precision fp32"), (["training.gelu_epilogue=true"], "gelu_epilogue"),
                     (["training.strategy=deepspeed"], "DeepSpeed"), (["training.strategy=lightning"], "Lightning")):
        with pytest.raises(UserError, match=rf"training\.cuda_graphs`: true needs .*{why}"):
            mf.load(gpu, ["training.cuda_graphs=true", *bad])
        mf.load(gpu, ["training.cuda_graphs=false", *bad])  # false and auto: nothing to refuse
    with pytest.raises(UserError, match="training.cuda_graphs"):
        mf.load(gpu, ["training.cuda_graphs=maybe"])
    demo = ROOT / "search_spaces/qwen-tiny_regression_cpu.yaml"
    assert mf.load(demo, ["training.cuda_graphs=auto"]).identity() == "2d3cf794bc"
    assert mf.load(demo, ["training.cuda_graphs=false"]).identity() != "2d3cf794bc"


def test_cuda_graphs_trials_get_fresh_actors():
    """A sweep whose trials replay CUDA graphs on GPUs (``cuda_graphs: true``, or ``auto`` with ``fp8``) gives each
    trial a fresh Ray actor; every other sweep reuses them (``runner.reuse_actors``)."""
    from sweeper import manifest
    from sweeper.runner import reuse_actors

    def model(overrides, base=TINY_DINO):
        d = copy.deepcopy(base)
        _, problems = manifest.apply_overrides(d, overrides)
        return manifest.validate_data(d, "test", problems)

    gpu = ["resources.gpus=1", "training.compile=true"]
    assert reuse_actors(model([])) and reuse_actors(model(gpu))
    assert not reuse_actors(model([*gpu, "training.cuda_graphs=true"]))
    assert reuse_actors(model([*gpu, "training.cuda_graphs=false"]))
    assert not reuse_actors(model([*gpu, "training.fp8=true"], TINY_QWEN))
    assert reuse_actors(model([*gpu, "training.fp8=true", "training.cuda_graphs=false"], TINY_QWEN))


@_CUDA
def test_cuda_graphs_trials_one_after_another_in_one_process(tmp_path):
    """Two trials with ``training.cuda_graphs: true``, one after the other in one process as on a reused Ray actor,
    ``release_memory`` between them (as ``trial_fn`` does): the second records its own graphs and trains. Before the
    mend the second failed in its first compiled step: "Running CUDAGraph after shutdown"."""
    from sweeper.trial import release_memory
    from tests.test_fp8 import _graphs_recorded

    m = resolved(TINY_DINO, ["training.max_epochs=2", "scheduler.max_t=2", "resources.gpus=1",
                             "training.compile=true", "training.cuda_graphs=true",
                             "model.config_overrides.num_hidden_layers=2"])
    torch._dynamo.reset()
    for i in range(2):
        rep = ListReporter(str(tmp_path / f"t{i}"))
        train_loop({"lr": 1e-3, "batch_size": 16}, TrialSpec(manifest=m), rep)
        assert rep.reports[-1]["epoch"] == 2 and all(r["val_loss"] == r["val_loss"] for r in rep.reports)
        assert _graphs_recorded() > 0
        release_memory()


@_CUDA
@pytest.mark.parametrize("micro", [None, 8])
def test_cuda_graphs_without_fp8_on_cuda(micro):
    """``training.cuda_graphs: true`` on a DINOv2 step without FP8 (bf16 weights, fast blocks): graphs are recorded
    and none skipped, and three steps leave the fp32 masters where the same steps without graphs do, with the whole
    batch and with 8-row micro-batches (gradients accumulated over 3 parts)."""
    from torch._dynamo.utils import counters

    from sweeper.trial import TrialSpec
    from tests.test_fp8 import _graphs_recorded
    from trainables import speed

    hp = {"lr": 3e-3, "batch_size": 24}
    masters, start = {}, None
    for graphs in (True, False):
        torch._dynamo.reset()
        counters.clear()
        m = resolved(TINY_DINO, ["training.max_epochs=1", "scheduler.max_t=1", "resources.gpus=1",
                                 "training.compile=true", f"training.cuda_graphs={str(graphs).lower()}",
                                 "model.config_overrides.num_hidden_layers=2",
                                 *([f"training.micro_batch={micro}"] if micro else [])])
        torch.manual_seed(0)
        p = speed.prepare(hp, TrialSpec(manifest=m), None)
        st = p.stepper
        assert st.cudagraphs is graphs and st.fp8 == 0 and st.master is not None and st.compiled == 2
        if start is None:
            start = [w.detach().float().cpu().clone() for w in st.master.masters]
        batches = list(p.train_loader(0))
        assert [speed.batch_units(b)[0] for b, _ in st.parts(batches[0])] == ([8, 8, 8] if micro else [24])
        losses = [float(st.step(b)) for b in [*batches, batches[0]]]
        assert all(v == v for v in losses)
        assert (_graphs_recorded() > 0) is graphs and not counters["inductor"]["cudagraph_skips"]
        masters[graphs] = [w.detach().float().cpu().clone() for w in st.master.masters]
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(masters[True], masters[False]) if float(b.norm())]
    assert max(rel) < 1e-3
    moved = [float((a - b).norm()) for a, b in zip(masters[True], start)]
    assert sum(v > 0 for v in moved) > len(moved) // 2
