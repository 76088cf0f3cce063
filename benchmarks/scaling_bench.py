"""Multi-GPU scaling of the product's step: a Ray Train TorchTrainer whose workers build the trial's
Stepper (``trainables.speed.prepare``, the code a multi-worker trial runs) and time ``step`` on a batch
kept on the GPU; ``--plain`` times instead a raw loop over the same model (DDP + autocast + fused
AdamW, or ``deepspeed.initialize`` directly, like ../shared/device/scaling_probe_example.py).

    python benchmarks/scaling_bench.py --manifest search_spaces/qwen2.5-1.5b-x2_regression_gpu.yaml \
        --workers 2 --set training.strategy=ddp [--plain] [--steps 10] [--smoke]

Prints one JSON line: tokens/s per GPU and in all, MFU per GPU, peak memory (rank 0).
``--smoke``: two gloo workers on the CPU with tiny shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.jsonl import emit  # noqa: E402


def worker(cfg):
    import torch

    sys.path.insert(0, cfg["root"])
    import ray.train

    from sweeper.trial import TrialSpec
    from trainables import speed

    m = cfg["manifest"]
    if cfg.get("no_cudagraphs"):  # an A/B: without the CUDA graphs training.fp8 turns on
        speed.use_cudagraphs = lambda **kw: False
    p = speed.prepare(cfg["hp"], TrialSpec(manifest=m), None, use_ray_train=True)
    dev, st = p.device, p.stepper
    batch = next(iter(p.train_loader(0)))
    units = speed.batch_units(batch)[1]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = [st.step(batch) for _ in range(cfg["warmup"])]
    sync()
    torch.distributed.barrier()
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        losses.append(st.step(batch))
    sync()
    dt = (time.perf_counter() - t) / cfg["steps"]
    if cfg.get("profile"):  # 3 more steps under torch.profiler on rank 0 (every rank steps: collectives)
        import gzip
        import shutil

        from benchmarks.step_bench import profiled

        prof_ctx, key = profiled(dev)
        with (prof_ctx if p.rank == 0 else contextlib.nullcontext()) as prof:
            for _ in range(3):
                st.step(batch)
            sync()
        if p.rank == 0:
            Path(cfg["profile"] + ".txt").write_text(
                prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
            raw = cfg["profile"] + ".trace.json"
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as fi, gzip.open(raw + ".gz", "wb") as fo:
                shutil.copyfileobj(fi, fo)
            os.remove(raw)
    losses = [round(float(x), 5) for x in losses]  # the same batch each step: the curve compares numerics
    r = dict(strategy=p.strategy, stage=st.stage, compile=bool(st.compiled), cudagraphs=st.cudagraphs, world=p.world,
             bs=p.hp.batch_size,
             step_ms=round(dt * 1e3, 1), units_per_s_per_gpu=round(units / dt, 1), units_per_s=round(units * p.world / dt, 1),
             mfu=round((p.flops_unit or 0) * units / dt / speed.PEAK_BF16, 4) if dev.type == "cuda" else None,
             peak_mem_gb=round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None,
             losses=losses)
    if p.rank == 0:
        with open(cfg["result"], "w") as fh:
            json.dump(r, fh)
    ray.train.report(r)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None,
                    help="path prefix: rank 0 profiles 3 more steps (<prefix>.txt table, <prefix>.trace.json.gz)")
    ap.add_argument("--no-cudagraphs", action="store_true",
                    help="an A/B: the workers without the CUDA graphs that training.fp8 turns on (speed.use_cudagraphs)")
    a = ap.parse_args(argv)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from benchmarks.step_bench import SMOKE
    from sweeper import manifest as mf

    m = mf.load(a.manifest, (SMOKE if a.smoke else []) + a.set).resolved()
    if a.smoke:
        m["resources"]["gpus"] = 0
    m["resources"]["workers"] = a.workers
    space = m["search"]["space"]
    hp = {k: (v if not isinstance(v, dict) else (v.get("values") or [v.get("low")])[0]) for k, v in space.items()}
    use_gpu = not a.smoke
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True, logging_level="WARNING",
                 **({"num_cpus": 2} if a.smoke else {}))
    res = tempfile.mktemp(prefix="scaling-", suffix=".json")
    t0 = time.time()
    TorchTrainer(worker, train_loop_config=dict(manifest=m, hp=hp, steps=a.steps, warmup=a.warmup, result=res,
                                                root=str(ROOT), profile=a.profile, no_cudagraphs=a.no_cudagraphs),
                 scaling_config=ScalingConfig(num_workers=a.workers, use_gpu=use_gpu,
                                              resources_per_worker={"CPU": 0.5 if a.smoke else 4, **({"GPU": 1} if use_gpu else {})}),
                 run_config=RunConfig(name="scaling", storage_path=tempfile.mkdtemp(prefix="scaling-runs-"))).fit()
    r = json.load(open(res))
    r.update(manifest=Path(a.manifest).name, overrides=a.set, label=a.label, wall_s=round(time.time() - t0, 1),
             **({"no_cudagraphs": True} if a.no_cudagraphs else {}))
    emit(r, a.out)
    return r


if __name__ == "__main__":
    main()
