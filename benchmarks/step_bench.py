"""The product's own training step vs the plain-PyTorch step it wraps, from a manifest.

    python benchmarks/step_bench.py --manifest search_spaces/qwen2.5-0.5b_regression_gpu.yaml \
        [--set training.compile=false ...] [--modes product,loader,plain] [--steps 10] [--smoke]

product: ``trainables.speed.prepare`` (the code a trial runs) builds model, optimizer and schedule from
         the manifest; its ``Stepper.step`` is timed on one batch kept on the GPU.
loader:  the same step fed by the product's data path (background collate, pinned, side-stream copy).
plain:   the same family model, a plain loop (bf16 autocast, fused AdamW, loss.backward), like
         ../shared/device/speed_probe_example.py.
plain-clip: the plain loop plus ``clip_grad_norm_`` (the product clips at ``training.grad_clip``).
product, plain and plain-clip are built side by side and timed in alternating rounds (``--rounds``,
median kept), so a drift in the machine's speed hits them alike.
Prints one JSON line per mode: tokens/s (images/s), MFU = flops_per_unit · units/s ÷ 989e12, peak memory.
``--smoke``: tiny shapes on the CPU (what CI can run).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import jsonl  # noqa: E402

SMOKE = ["model.size=tiny", "model.config_overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2}",
         "data.max_length=64", "data.generator.n_train=64", "data.min_rows={train: 8, val_select: 8}", "data.generator.n_val_select=16", "data.generator.doc_words=[30, 40]",
         "data.generator.image_size=28", "search.space.batch_size=8", "training.precision=fp32",
         # the ViT-B/14 manifest turns gelu_epilogue on and the ViT-S/14 one cuda_graphs; both need bf16 (the
         # manifest check refuses them with fp32)
         "training.gelu_epilogue=false", "training.cuda_graphs=auto"]


def bench_manifest(path: str, overrides: list[str], smoke: bool) -> tuple[dict, dict]:
    """The resolved manifest and one trial's config (each search dimension at its first value or its low
    end), as the benchmarks run them; ``smoke``: tiny shapes on the CPU, the fast path's plain step."""
    from sweeper import manifest as mf

    m = mf.load(path, (SMOKE if smoke else []) + overrides).resolved()
    if smoke:
        m["resources"]["gpus"] = 0
        if m["training"]["strategy"] == "auto":
            m["training"]["strategy"] = "plain"
    config = {k: (v if not isinstance(v, dict) else (v.get("values") or [v.get("low")])[0])
              for k, v in m["search"]["space"].items()}
    return m, config


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, warmup, steps):
    for _ in range(warmup):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / steps


def profiled(dev):
    """torch.profiler over CPU (and CUDA on a GPU), and the column its tables sort by: device time on a GPU,
    CPU time on a CPU. Shared with scaling_bench.py."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    return profile(activities=acts), ("self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total")


def stream_overlap(prof) -> dict:
    """Per CUDA stream: kernel time, and how much of it ran while a kernel of another stream was running
    (from the profiler's kernel intervals). Shows whether side-stream work (EarlyNorm's norms, the loader's
    copies) really runs beside the main stream or only between its kernels."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        ev = json.load(open(f.name))
    ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    ks = [(e["ts"], e["ts"] + e["dur"], (e.get("args") or {}).get("stream"), e.get("name", ""))
          for e in ev if e.get("cat") == "kernel" and "dur" in e]
    if not ks:
        return {}

    def union(iv):
        tot, end = 0.0, None
        for a, b in sorted(iv):
            if end is None or a > end:
                tot, end = tot + (b - a), b
            elif b > end:
                tot, end = tot + (b - end), b
        return tot

    out = {"kernels_ms": round(sum(b - a for a, b, *_ in ks) / 1e3, 2), "busy_ms": round(union([(a, b) for a, b, *_ in ks]) / 1e3, 2)}
    streams = sorted({s for *_, s, _ in ks if s is not None})
    for st in streams:
        mine = [(a, b) for a, b, s, _ in ks if s == st]
        others = [(a, b) for a, b, s, _ in ks if s != st]
        own = union(mine)
        # time of this stream's kernels covered by other streams' kernels = |mine| + |others| - |mine ∪ others|
        both = own + union(others) - union(mine + others)
        out[f"stream_{st}"] = {"kernels": len(mine), "ms": round(own / 1e3, 2), "beside_other_streams_ms": round(both / 1e3, 2)}
    return out


def _profile(fn, dev, warmup, steps, path, info):
    """What a product step spends its time on: the profiler's top operators by device time (CPU time on a
    CPU). The table's last line ("Self CUDA time total") against ``wall_s`` gives the GPU-busy share (idle
    gaps = host stalls)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    prof_ctx, key = profiled(dev)
    t = time.perf_counter()
    with prof_ctx as prof:
        for _ in range(steps):
            fn()
        _sync(dev)
    wall = time.perf_counter() - t
    table = prof.key_averages().table(sort_by=key, row_limit=int(os.environ.get("PROF_ROWS", 30)), max_name_column_width=70)
    head = dict(info, mode="profile", steps=steps, wall_s=round(wall, 4))
    if dev.type == "cuda":
        head.update(stream_overlap(prof))
    with open(path, "w") as fh:
        fh.write(json.dumps(head) + "\n" + table)
    print(json.dumps(head), flush=True)
    return [head]


def _patch_conv(model) -> None:
    """``--patch-conv``: the fast blocks' patch-embedding matmul back to cuDNN's convolution (same module)."""
    from torch import nn

    from trainables.dinov2_fast import PatchConv2d

    for mod in model.modules():
        if isinstance(mod, PatchConv2d):
            mod.__class__ = nn.Conv2d


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--set", action="append", default=[], help="manifest override key=value")
    ap.add_argument("--modes", default="product,loader,plain", help="of product, loader, plain, plain-clip, product-late-norm (EarlyNorm off)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per mode (median kept)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the product step here (no timing rows)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sdpa", default=None, choices=["flash", "cudnn", "efficient", "math"],
                    help="experiment: only this SDPA backend enabled (torch.backends.cuda flags, before compiling)")
    ap.add_argument("--pure-bf16", action="store_true",
                    help="experiment, an upper bound: the product's model cast to bf16 before the first step, so "
                         "weights, gradients and AdamW's state are bf16 (not a product setting)")
    ap.add_argument("--fp8-only", default=None, metavar="SUBSTR",
                    help="experiment, with training.fp8: only the linear layers whose name contains SUBSTR keep FP8 "
                         "(e.g. 'mlp.'), the others go back to bf16 before the first (compiling) step")
    ap.add_argument("--autotune", action="store_true",
                    help="experiment: Inductor's GEMM autotuning (Triton templates with fused epilogues) for the blocks")
    ap.add_argument("--cudagraphs", action="store_true",
                    help="experiment: Inductor's CUDA graphs for the compiled blocks (what mode='reduce-overhead' "
                         "turns on): one launch per block graph instead of one per kernel")
    ap.add_argument("--no-cudagraphs", action="store_true",
                    help="experiment, an A/B: the product (and the plain loop) without the CUDA graphs that "
                         "training.fp8 turns on (speed.use_cudagraphs)")
    ap.add_argument("--patch-conv", action="store_true",
                    help="experiment, an A/B: DINOv2's patch embedding stays cuDNN's convolution (training.fast_blocks "
                         "makes it one matmul, trainables.dinov2_fast.PatchConv2d), in the product and the plain loop")
    ap.add_argument("--pageable-collate", action="store_true",
                    help="experiment, an A/B for the loader mode: batches gathered into pageable memory and pinned "
                         "after (the loader before 2026-11-28), not straight into pinned memory")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="experiment: set torch._inductor.config.KEY (dotted, e.g. coordinate_descent_tuning=True) "
                         "before compiling; VALUE is a Python literal")
    ap.add_argument("--blas", default=None, choices=["cublas", "cublaslt"],
                    help="experiment: torch.backends.cuda.preferred_blas_library for PyTorch's own matmuls")
    ap.add_argument("--eager-rest", action="store_true",
                    help="experiment, an A/B: the parts outside the blocks stay eager (Family.compile_rest not "
                         "called; DINOv2's embeddings, final norm and pooling), in the product and the plain loop")
    ap.add_argument("--fc1-bgradb", action="store_true",
                    help="experiment, with training.gelu_epilogue: fc1's weight and bias gradients in one cuBLASLt "
                         "matmul (BGRADB epilogue), in the product and the plain loop (trainables.gelu_lt.FC1_BGRADB)")
    ap.add_argument("--no-fuse-qkv", action="store_true",
                    help="experiment, an A/B: with training.cls_attention on, q, k and v stay three matmuls "
                         "(trainables.cls_attn.fuse_qkv not applied), in the product and the plain loop")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args(argv)

    import torch

    from sweeper.trial import TrialSpec
    from trainables import speed
    from trainables.base import resolve_precision

    m, config = bench_manifest(a.manifest, a.set + (["training.bf16_weights=false"] if a.pure_bf16 else []), a.smoke)
    spec = TrialSpec(manifest=m)
    rows = []
    modes = a.modes.split(",")
    if a.sdpa:
        for name in ("flash", "cudnn", "efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{'mem_' * (name == 'efficient')}{name}_sdp")(name == a.sdpa)
    import torch._inductor.config as ic

    if a.cudagraphs:
        ic.triton.cudagraphs = True
    if a.autotune:
        ic.max_autotune_gemm = True
        ic.max_autotune_gemm_backends = "ATEN,TRITON"
    for kv in a.inductor:
        import ast

        key, _, value = kv.partition("=")
        *path, leaf = key.split(".")
        obj = ic
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, leaf):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key}")
        setattr(obj, leaf, ast.literal_eval(value))
    if a.blas:
        torch.backends.cuda.preferred_blas_library(a.blas)
    if a.no_cudagraphs:
        speed.use_cudagraphs = lambda **kw: False
    if a.pageable_collate:
        make_collate = speed.make_collate
        speed.make_collate = lambda family, dataset, pin=False: make_collate(family, dataset, pin=False)
    if a.fc1_bgradb:
        from trainables import gelu_lt

        gelu_lt.FC1_BGRADB = True
    if a.no_fuse_qkv:
        from trainables import cls_attn

        cls_attn.fuse_qkv = lambda backbone: 0
    if a.eager_rest:
        from trainables.base import Family
        from trainables.dinov2_classifier import DinoClassifier

        DinoClassifier.compile_rest = Family.compile_rest  # compiles nothing
    p = speed.prepare(config, spec, None)
    if a.fp8_only:
        from trainables.fp8 import Float8Linear

        for name, mod in p.stepper.model.named_modules():
            if isinstance(mod, Float8Linear) and a.fp8_only not in name:
                mod.__class__ = torch.nn.Linear
    if a.patch_conv:
        _patch_conv(p.stepper.model)
    if a.pure_bf16:
        p.stepper.model.to(torch.bfloat16)  # same Parameter objects: the optimizer (no state yet) follows
    speed.choose_micro_batch(p, m)  # training.micro_batch: auto, as a trial does before its first step
    dev, st, fam, hp = p.device, p.stepper, p.family, p.hp
    info = dict(manifest=Path(a.manifest).name, overrides=a.set, label=a.label, size=m["model"]["size"],
                strategy=p.strategy, compile=bool(st.compiled), bs=hp.batch_size, micro=st.micro,
                micro_failed=list(st.micro_failed),
                probe_gb=[round(v / 1e9, 2) if isinstance(v, int) and i else v
                          for i, v in enumerate(st.probe_peak)] if st.probe_peak else None,
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                **({"sdpa": a.sdpa} if a.sdpa else {}), **({"pure_bf16": True} if a.pure_bf16 else {}),
                **({"fp8_only": a.fp8_only} if a.fp8_only else {}),
                fast_blocks=st.fast_blocks, gelu_epilogue=st.gelu_epilogue, cudagraphs_product=st.cudagraphs, **({"autotune": True} if a.autotune else {}),
                **({"cudagraphs": True} if a.cudagraphs else {}), **({"patch_conv": True} if a.patch_conv else {}),
                **({"pageable_collate": True} if a.pageable_collate else {}),
                compiled_rest=st.compiled_rest, **({"fc1_bgradb": True} if a.fc1_bgradb else {}), **({"inductor": a.inductor} if a.inductor else {}), **({"blas": a.blas} if a.blas else {}),
                **({"no_fuse_qkv": True} if a.no_fuse_qkv else {}))
    first = next(iter(p.train_loader(0)))
    units_per_batch = speed.batch_units(first)[1]
    flops = p.flops_unit or 0.0

    def emit(mode, dt, extra=None):
        r = dict(info, mode=mode, step_ms=round(dt * 1e3, 2), units_per_s=round(units_per_batch / dt, 1),
                 unit="tokens" if speed.batch_units(first)[0] != units_per_batch else "images",
                 mfu=round(flops * units_per_batch / dt / speed.PEAK_BF16, 4) if dev.type == "cuda" else None,
                 peak_mem_gb=round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None)
        r.update(extra or {})
        jsonl.emit(r, a.out)
        rows.append(r)

    if a.profile:
        return _profile(lambda: st.step(first), dev, a.warmup, a.steps, a.profile, info)
    peak_product = None
    if "product" in modes:
        _time(lambda: st.step(first), dev, a.warmup, 1)  # compiles; the product's own peak memory, alone
        peak_product = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None
    plain_step = None
    if "plain" in modes or "plain-clip" in modes:
        # the same family model, fresh, in a plain loop (no Stepper, no schedule; clipping only in plain-clip),
        # built beside the product's so both are timed in alternating rounds (drift hits both alike)
        from trainables.base import cached_splits

        splits = cached_splits(fam, m["data"], m["model"])
        with (torch.device(dev) if dev.type == "cuda" else torch.device("cpu")):
            model = fam.build_model(m["model"], splits, hp)
        # training.fast_blocks, gelu_epilogue, fp8 and cls_attention: the same model in the plain loop as in the product
        speed.transform_blocks(fam, model, dev, fast_blocks=bool(st.fast_blocks), fp8=bool(st.fp8),
                               gelu_epilogue=bool(st.gelu_epilogue), cls_attention=bool(st.cls_attention))
        if a.patch_conv:
            _patch_conv(model)
        if st.compiled:  # CUDA graphs where the product has them (training.fp8 with bf16 weights on CUDA)
            speed.compile_blocks(model, cudagraphs=st.cudagraphs)
            if st.compiled_rest:  # the parts outside the blocks too, where the product compiles them
                fam.compile_rest(model)
        model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, fused=dev.type == "cuda" or None)
        bf16 = resolve_precision(m["training"]["precision"], dev.type == "cuda", fam.info) == "bf16-mixed"
        clip = float(p.stepper.grad_clip or 1.0)

        def plain_step(clip_too=False):
            if st.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = fam.loss(model, first, hp)
            loss.backward()
            if clip_too:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=dev.type == "cuda" or None)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def late_norm_step():  # the product with its clip norm taken after the backward (EarlyNorm off): A/B
        early, st.early_norm = st.early_norm, None
        try:
            st.step(first)
        finally:
            st.early_norm = early

    fns = {"product": lambda: st.step(first), "plain": plain_step, "plain-clip": lambda: plain_step(True),
           "product-late-norm": late_norm_step}
    timed = [k for k in ("product", "product-late-norm", "plain", "plain-clip") if k in modes]
    for k in timed:  # warm-up (compiles) once per mode
        if k != "product":
            _time(fns[k], dev, a.warmup, 1)
    samples: dict = {k: [] for k in timed}
    for _ in range(a.rounds):
        for k in timed:
            samples[k].append(_time(fns[k], dev, 1, a.steps))
    for k in timed:
        v = sorted(samples[k])
        # peak memory: the product's alone (measured before the plain model existed); the plain modes' would
        # count both models, so it is left out
        emit(k, v[len(v) // 2], {"rounds_ms": [round(x * 1e3, 2) for x in samples[k]],
                                 "peak_mem_gb": peak_product if k == "product" else None,
                                 # the product's peak over all its timed steps as well (CUDA graphs record on
                                 # the second step): only where no other model shares the process
                                 **({"peak_mem_all_steps_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)}
                                    if k == "product" and timed == ["product"] and dev.type == "cuda" else {})})
    if "loader" in modes:
        def run_loader():
            n = 0
            t = None
            # epochs one after another (a large batch leaves few batches an epoch)
            batches = itertools.chain.from_iterable(p.train_loader(e) for e in itertools.count(1))
            for i, b in enumerate(batches):
                if i == a.warmup:
                    _sync(dev)
                    t = time.perf_counter()
                if i >= a.warmup + a.steps:
                    break
                st.step(b)
                n += 1
            _sync(dev)
            return (time.perf_counter() - t) / (n - a.warmup)
        emit("loader", run_loader())
    by = {r["mode"]: r for r in rows}
    if "product" in by and "plain" in by:
        print(json.dumps({"label": a.label, "product_over_plain": round(by["product"]["units_per_s"] / by["plain"]["units_per_s"], 4),
                          **({"product_over_plain_clip": round(by["product"]["units_per_s"] / by["plain-clip"]["units_per_s"], 4)}
                             if "plain-clip" in by else {}),
                          **({"loader_over_product": round(by["loader"]["units_per_s"] / by["product"]["units_per_s"], 4)}
                             if "loader" in by else {})}), flush=True)
    return rows


if __name__ == "__main__":
    main()
