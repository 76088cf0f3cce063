"""``resources.gpus: auto``: pack trials on a GPU from a measured memory footprint.

A short probe trains the manifest's model for one step at the largest batch size its search
space allows, on a whole GPU, and reads the peak memory PyTorch allocated. The fraction is the
largest 1/k such that k trials, each needing ``peak x headroom`` plus a CUDA context, fit in the
GPU's memory: never over-committed. On a cluster with no GPU, ``auto`` resolves to 0 (CPU) with a
one-line notice. The resolution is written to ``<sweep>/packing.json`` so a resumed sweep and its
promotion phases keep the same packing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("sweeper")

PACKING = "packing.json"
HEADROOM = 1.25  # allocator fragmentation, longer sequences in later batches, eval buffers
CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS/cuDNN workspaces per process (not in max_memory_allocated)
MAX_PER_GPU = 8  # past this the trials fight over SMs and CPU, not memory


def choose_fraction(peak_bytes: float, total_bytes: float, *, headroom: float = HEADROOM,
                    context_bytes: float = CONTEXT_BYTES, max_per_gpu: int = MAX_PER_GPU) -> dict:
    """The GPU fraction 1/k for a trial whose one training step peaked at ``peak_bytes``.

    k = floor(total / (peak x headroom + context)), capped at ``max_per_gpu``; k trials then need at
    most ``total`` bytes. A trial that needs more than one GPU gets 1.0 (the sweep runs, one per
    GPU, and the notice says it may not fit)."""
    if total_bytes <= 0:
        raise ValueError("total_bytes must be > 0")
    if peak_bytes < 0 or not math.isfinite(peak_bytes):
        raise ValueError("peak_bytes must be a finite number >= 0")
    need = peak_bytes * headroom + context_bytes
    k = int(total_bytes // need)
    fits = k >= 1
    k = max(1, min(k, max_per_gpu))
    frac = 1.0 / k
    return {"gpus": frac, "per_gpu": k, "need_bytes": int(need), "peak_bytes": int(peak_bytes),
            "total_bytes": int(total_bytes), "headroom": headroom, "fits": fits,
            "committed_bytes": int(need * k)}


def _largest_batch(manifest: dict) -> int:
    sp = manifest["search"]["space"].get("batch_size", 32)
    if isinstance(sp, dict):
        if sp.get("type") == "choice":
            return int(max(sp["values"]))
        if "high" in sp:
            return int(sp["high"])
    return int(sp)


def fitting_rows(run, rows: int, batch_rows: int, *, shrink: bool, release=lambda: None) -> tuple[int, list[str]]:
    """``run(rows)`` at ``rows``; when it runs out of GPU memory and ``shrink`` (``training.micro_batch:
    auto``: the trials will split their batches the same way), again at smaller divisors of
    ``batch_rows`` as a trial would (``trainables.speed.largest_fitting``), down to 1 row. Returns the
    rows that ran and, for each size that did not, why."""
    import torch

    from trainables.speed import largest_fitting

    def attempt(r: int) -> str | None:
        try:
            run(r)
        except torch.OutOfMemoryError:
            if not shrink:
                raise
            return "out of memory"  # returned, so the failed run's frames are freed before release()
        return None

    return largest_fitting(attempt, rows, batch_rows, release)


def probe_peak_bytes(manifest: dict) -> dict:
    """On the current process's GPU: build data and model, run two forward/backward/optimizer steps at
    the largest batch size of the search space (or its micro-batch: ``training.micro_batch``; under
    ``auto``, smaller micro-batches when the whole batch runs out of the whole GPU) and the manifest's
    precision; returns peak and total memory."""
    import gc

    import torch

    from trainables import registry
    from trainables.base import HParams, cached_splits, resolve_precision
    from trainables.speed import (MasterWeights, resolve_micro, resolve_strategy, slice_rows, transform_blocks,
                                  uses_bf16_weights, wants_fast_path)

    family = registry.get(manifest["trainable"])
    if not hasattr(family, "build_model"):
        return {"peak_bytes": 0, "total_bytes": torch.cuda.get_device_properties(0).total_memory}
    dev = torch.device("cuda")
    fixed = {k: v for k, v in manifest["search"]["space"].items() if not isinstance(v, dict)}
    hp = HParams.from_config({**fixed, "batch_size": _largest_batch(manifest)}, family.info.hyperparameters)
    knob = manifest["training"].get("micro_batch", "auto")
    splits = cached_splits(family, manifest["data"], manifest["model"])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = family.build_model(manifest["model"], splits, hp).to(dev)
    prec = resolve_precision(manifest["training"]["precision"], True, family.info)
    # the trial's weights as the trial will hold them: bf16 with fp32 masters and fp32 gradient buffers
    # (training.bf16_weights), or fp32 under autocast
    master_on = uses_bf16_weights(manifest["training"].get("bf16_weights", "auto"), on_cuda=True, world=1,
                                  strategy=resolve_strategy(manifest) if wants_fast_path(manifest) else "lightning",
                                  precision=prec)
    # the blocks as the trial's (FP8 layers keep their inputs in 1 byte)
    transform_blocks(family, model, dev, fast_blocks=bool(manifest["training"].get("fast_blocks", True)),
                     fp8=bool(manifest["training"].get("fp8", False)),
                     gelu_epilogue=bool(manifest["training"].get("gelu_epilogue", False)),
                     cls_attention=manifest["training"].get("cls_attention", "auto"), rows=hp.batch_size)
    master = MasterWeights(model) if master_on else None
    opt = torch.optim.AdamW(master.masters if master is not None else model.parameters(), lr=1e-4)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(prec)
    batch = next(iter(family.loader(splits.get("train", "fit"), hp.batch_size, shuffle=False, seed=0)))
    batch = tuple(b.to(dev) if hasattr(b, "to") else b for b in batch)

    def two_steps(rows: int) -> None:
        part = slice_rows(batch, 0, rows)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the second step has the optimizer state allocated: the steady-state peak
            if master is not None:
                master.begin()
                master.arm()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = family.loss(model, part, hp)
            loss.backward()
            del loss
            if master is not None:
                master.flush()
                master.finish()
            opt.step()
            if master is not None:
                master.publish()
            opt.zero_grad(set_to_none=True)

    def release() -> None:
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()

    rows, failed = fitting_rows(two_steps, resolve_micro(knob, hp.batch_size), hp.batch_size,
                                shrink=knob == "auto", release=release)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    del model, opt, batch, master
    torch.cuda.empty_cache()
    return {"peak_bytes": int(peak), "total_bytes": int(total), "batch_size": hp.batch_size, "micro_batch": rows,
            "micro_failed": failed, "precision": prec, "bf16_weights": master_on}


def resolve_gpus(manifest: dict, sweep_dir: Path | None = None, *, notice=print) -> float:
    """A number for ``resources.gpus``: itself, or the probed fraction for ``auto`` (cached in the sweep)."""
    g = manifest["resources"]["gpus"]
    if g != "auto":
        return float(g)
    cache = Path(sweep_dir) / PACKING if sweep_dir else None
    if cache and cache.exists():
        return float(json.loads(cache.read_text())["gpus"])
    import ray

    gpus_in_cluster = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else _local_gpus()
    if not gpus_in_cluster:
        rec = {"gpus": 0.0, "reason": "no GPU in the cluster"}
        notice("resources.gpus: auto -> 0 (no GPU visible; trials run on CPU)")
    elif manifest["resources"]["workers"] > 1:
        rec = {"gpus": 1.0, "reason": "a multi-worker trial takes whole GPUs per worker"}
        notice("resources.gpus: auto -> 1 per worker (multi-worker trials take whole GPUs)")
    else:
        probe = ray.remote(num_gpus=1, num_cpus=0)(probe_peak_bytes) if ray.is_initialized() else probe_peak_bytes
        meas = ray.get(probe.remote(manifest)) if ray.is_initialized() else probe(manifest)
        rec = {**choose_fraction(meas["peak_bytes"], meas["total_bytes"]), "probe": meas}
        micro = meas.get("micro_batch") or meas.get("batch_size")
        at = f" at micro-batch {micro} of batch {meas['batch_size']}" if micro != meas.get("batch_size") else ""
        notice(f"resources.gpus: auto -> {rec['gpus']:.4g} ({rec['per_gpu']} per GPU; one step{at} peaked at "
               f"{meas['peak_bytes'] / 2**20:.0f} MiB, x{HEADROOM} + {CONTEXT_BYTES / 2**20:.0f} MiB context, "
               f"of {meas['total_bytes'] / 2**30:.1f} GiB)" + ("" if rec["fits"] else "; WARNING: may not fit on one GPU"))
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rec, indent=2))
    return float(rec["gpus"])


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPU
        return 0


def plan_entry(manifest: dict) -> dict:
    """For ``--dry-run``: what ``auto`` will do, without probing (dry runs start nothing)."""
    g = manifest["resources"]["gpus"]
    if g != "auto":
        return {"gpus": g}
    n = _local_gpus()
    if not n:
        return {"gpus": "auto", "resolves_to": 0, "why": "no GPU visible here; a cluster with GPUs probes at start"}
    return {"gpus": "auto", "resolves_to": "1/k from a one-step memory probe at start",
            "headroom": HEADROOM, "context_mib": CONTEXT_BYTES // 2**20, "max_per_gpu": MAX_PER_GPU}
