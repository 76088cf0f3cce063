"""GPU packing figures (prepared for an H100; ``--smoke`` runs the same code paths on CPU).

    python benchmarks/gpu_packing.py --out $OUT            # on the GPU machine
    python benchmarks/gpu_packing.py --smoke --out /tmp/x  # here: tiny, CPU, checks nothing silly breaks

Through the product's runner (manifest -> runner.run_sweep), a small Qwen regression model:
  1. packed: N trials (default 16) at 0.25 GPU each (4 per GPU):
       overhead = (GPU-slots x wall - sum of training-step seconds) / sum of training-step seconds
       (GPU-slots = GPUs / fraction: the trial slots the sweep held), median start-up (the trial
       scheduled -> its first training step; scheduled = the searcher issued its configuration),
       trials/hour
  2. the same N trials at 1 GPU each: trials/hour (4 per GPU vs 1 per GPU)
  3. what ``resources.gpus: auto`` picks for this model (the one-step memory probe)
  4. memory return: M trials (default 50) on reused 0.25-GPU actors; after each trial the actor
     logs torch.cuda.memory_allocated/reserved (SWEEPER_MEMORY_LOG, written by trial.release_memory);
     each actor's later values are compared with its first trial's.
Writes ``<out>/gpu_packing_<date>_<device>.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def base_manifest(root: str, *, smoke: bool) -> dict:
    return {
        "name": "gpu-packing",
        "trainable": "qwen_regression",
        "model": {"size": "tiny" if smoke else "small", "pooling": "mean",
                  **({"config_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}} if smoke else {})},
        "data": {"generator": {"kind": "qwen_synthetic", "n_train": 64 if smoke else 4096, "n_val_select": 32 if smoke else 512,
                               "n_val_calib": 16, "n_test": 16, "dimensions": 3, "seed": 0},
                 "max_length": 32 if smoke else 128, "min_rows": {"train": 16, "val_select": 16}},
        "resources": {"cpus": 1, "gpus": 0.25, "workers": 1},
        "search": {"algorithm": "random", "seed": 0, "num_samples": 16, "max_concurrent": 4,
                   "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3}, "batch_size": 16 if smoke else 64}},
        "scheduler": {"type": "none"},
        "selection": {"metric": "val_mae", "mode": "min"},
        "training": {"max_epochs": 2 if smoke else 3, "seed": 0, "checkpoint_every": 0,
                     "compile": False},  # a 4-layer model: compiling costs more start-up than it saves
        "export": {"enabled": False},
        "output": {"root": root},
    }


class Scheduled:
    """Tune callback: when each trial was first seen (PENDING = scheduled), on the driver's clock."""

    def __new__(cls):
        from ray.tune import Callback

        class _Cb(Callback):
            def __init__(self):
                self.seen: dict[str, float] = {}

            def on_step_begin(self, iteration, trials, **info):
                now = time.time()
                for t in trials:
                    self.seen.setdefault(t.trial_id, now)

        return _Cb()


def run(m: dict, tag: str, scheduled) -> dict:
    """One sweep through the product's runner; the Scheduled callback is added to its RunConfig."""
    import yaml

    from ray import tune

    from sweeper import manifest, runner

    p = Path(m["output"]["root"]) / f"{tag}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(m))
    loaded = manifest.load(p)
    orig = tune.RunConfig.__init__

    def with_cb(self, *a, **k):  # add our callback to the runner's own list
        k["callbacks"] = list(k.get("callbacks") or []) + [scheduled]
        orig(self, *a, **k)

    # scheduled = when the searcher issued the trial's configuration (Tune creates the trial from it at
    # once); the callback alone first sees a trial only when its step loop runs, after a reused actor
    # may already have started it (the 2026-11-26 figure of 0.01 s was that artefact)
    from ray.tune.search.optuna import OptunaSearch

    orig_suggest = OptunaSearch.suggest

    def timed_suggest(self, trial_id):
        out = orig_suggest(self, trial_id)
        if isinstance(out, dict):
            now = time.time()
            scheduled.seen[trial_id] = min(scheduled.seen.get(trial_id, now), now)
        return out

    orig_fit = tune.Tuner.fit
    fits: list[tuple[float, float]] = []

    def timed_fit(self, *a, **k):  # where the sweep's wall goes outside Tune: before and after its fit
        t0 = time.perf_counter()
        try:
            return orig_fit(self, *a, **k)
        finally:
            fits.append((t0, time.perf_counter()))

    tune.RunConfig.__init__ = with_cb
    OptunaSearch.suggest = timed_suggest
    tune.Tuner.fit = timed_fit
    try:
        t = time.perf_counter()
        sweep_dir, rows = runner.run_sweep(loaded, quiet=True, dashboard=False)
        end = time.perf_counter()
        wall = end - t
    finally:
        tune.RunConfig.__init__ = orig
        OptunaSearch.suggest = orig_suggest
        tune.Tuner.fit = orig_fit
    from sweeper import results

    mrows = results.read_rows(sweep_dir / "sweep" / results.METRICS)
    return {"sweep_dir": str(sweep_dir), "wall_s": wall, "rows": rows, "metrics": mrows,
            "before_fit_s": fits[0][0] - t if fits else None, "after_fit_s": end - fits[-1][1] if fits else None}


def first_steps(sweep_dir: str) -> dict[str, float]:
    """trial_id -> first training step (unix time), from each trial's result.json."""
    out = {}
    for d in Path(sweep_dir, "sweep", "tune").iterdir():
        f = d / "result.json"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r.get("first_step_unix"):
                out[r["trial_id"]] = float(r["first_step_unix"])
                break
    return out


def packed_figures(res: dict, gpus_per_trial: float, n_gpus: int, seen: dict) -> dict:
    rows = res["rows"]
    train = sum(r["train_s"] for r in rows)
    slots = (n_gpus / gpus_per_trial) if gpus_per_trial else None
    fs = first_steps(res["sweep_dir"])
    startup = [fs[t] - seen[t] for t in fs if t in seen]
    return {
        "trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
        "wall_s": res["wall_s"], "gpu_fraction": gpus_per_trial, "gpu_slots": slots,
        "sum_train_step_s": train,
        "overhead": ((slots * res["wall_s"] - train) / train) if (slots and train) else None,
        "median_startup_s": statistics.median(startup) if startup else None,
        "startup_s_all": sorted(startup),
        "trials_per_hour": len(rows) / res["wall_s"] * 3600,
        "actors": len({r.get("worker_pid") for r in rows}),
        "cost_parts_s": {c: sum(r[c] for r in rows) for c in ("startup_s", "train_s", "eval_s", "ckpt_s", "idle_s")},
        # the driver's own time in run_sweep before Tune's fit starts and after it returns (every slot waits)
        "before_fit_s": res.get("before_fit_s"), "after_fit_s": res.get("after_fit_s"),
    }


def memory_figures(log: Path) -> dict:
    by: dict[int, list[dict]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        r = json.loads(line)
        by.setdefault(r["pid"], []).append(r)
    per = {}
    worst_alloc = worst_res = 0
    for pid, recs in by.items():
        recs.sort(key=lambda r: r["time"])
        a0, r0 = recs[0]["allocated"], recs[0]["reserved"]
        da = max(r["allocated"] - a0 for r in recs)
        dr = max(r["reserved"] - r0 for r in recs)
        worst_alloc, worst_res = max(worst_alloc, da), max(worst_res, dr)
        per[str(pid)] = {"trials": len(recs), "baseline_allocated": a0, "baseline_reserved": r0,
                         "max_growth_allocated": da, "max_growth_reserved": dr,
                         "allocated": [r["allocated"] for r in recs], "reserved": [r["reserved"] for r in recs]}
    return {"actors": len(by), "trials_logged": sum(len(v) for v in by.values()),
            "max_growth_allocated_bytes": worst_alloc, "max_growth_reserved_bytes": worst_res,
            "returns_memory": bool(by) and worst_alloc <= 1 * 2**20, "per_actor": per}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny: exercise every code path quickly")
    ap.add_argument("--trials", type=int, default=None, help="packed/unpacked sweep size (default 16; smoke 4)")
    ap.add_argument("--memory-trials", type=int, default=None, help="memory-return check (default 50; smoke 6)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--n-train", type=int, default=None,
                    help="training rows per epoch (default 4096: ~4.4 s an epoch at 0.25 of an H100; longer trials weigh "
                         "the fixed start-up less)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: packed,whole,auto,memory")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    n = args.trials or (4 if args.smoke else 16)
    n_mem = args.memory_trials or (6 if args.smoke else 50)
    mem_log = out / "memory_log.jsonl"
    mem_log.unlink(missing_ok=True)
    os.environ["SWEEPER_MEMORY_LOG"] = str(mem_log.resolve())  # before ray.init: the workers inherit it
    import ray

    from sweeper import runner

    runner.init_ray(None, num_cpus=None if not args.smoke else 2, dashboard=False)  # as python -m sweeper starts Ray
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    if not n_gpus and not args.smoke:
        raise SystemExit("no GPU in this Ray cluster: run with --smoke for the CPU check")
    dev = "cpu-smoke"
    if n_gpus:
        import torch

        dev = torch.cuda.get_device_name(0)
    root = tempfile.mkdtemp(prefix="gpu-packing-")
    base = base_manifest(root, smoke=args.smoke)
    base["search"]["num_samples"] = n
    if args.n_train:
        base["data"]["generator"]["n_train"] = args.n_train
    frac, whole = (0.25, 1.0) if n_gpus else (0, 0)
    if args.smoke:  # CPU: 4 "slots" of 0.5 CPU stand in for 4 trials per GPU, 1 CPU for 1 per GPU
        base["resources"]["cpus"] = 0.5
    rec: dict = {"benchmark": "gpu_packing", "date": args.date, "device": dev, "gpus": n_gpus, "smoke": args.smoke,
                 "command": "python benchmarks/gpu_packing.py " + " ".join(sys.argv[1:]), "model": base["model"],
                 "data": base["data"]["generator"], "epochs": base["training"]["max_epochs"]}
    name = f"gpu_packing_{args.date}_{'cpu_smoke' if args.smoke else 'h100' if 'H100' in dev else 'gpu'}.json"

    def save() -> None:  # after every part: a run cut short by a time limit keeps what it measured
        (out / name).write_text(json.dumps(rec, indent=2, default=str))

    if "packed" not in skip:
        m = copy.deepcopy(base)
        m["name"], m["resources"]["gpus"] = "pack-quarter", frac
        m["search"]["max_concurrent"] = max(1, int(n_gpus / frac)) if frac else 4
        cb = Scheduled()
        rec["packed_4_per_gpu"] = packed_figures(run(m, "quarter", cb), frac, n_gpus, cb.seen)
        if args.smoke:
            rec["packed_4_per_gpu"]["overhead_cpu_slots"] = _cpu_overhead(rec["packed_4_per_gpu"], 4)
        print("packed:", json.dumps({k: v for k, v in rec["packed_4_per_gpu"].items() if k != "startup_s_all"}), flush=True)
        save()
    if "whole" not in skip:
        m = copy.deepcopy(base)
        m["name"], m["resources"]["gpus"] = "pack-whole", whole
        if args.smoke:
            m["resources"]["cpus"] = 1
        m["search"]["max_concurrent"] = max(1, n_gpus) if n_gpus else 2
        cb = Scheduled()
        rec["one_per_gpu"] = packed_figures(run(m, "whole", cb), whole, n_gpus, cb.seen)
        print("whole:", json.dumps({k: v for k, v in rec["one_per_gpu"].items() if k != "startup_s_all"}), flush=True)
        if "packed_4_per_gpu" in rec:
            rec["throughput_gain_4_vs_1"] = rec["packed_4_per_gpu"]["trials_per_hour"] / rec["one_per_gpu"]["trials_per_hour"]
        save()
    if "auto" not in skip:
        from sweeper import packing

        m = copy.deepcopy(base)
        m["resources"]["gpus"] = "auto"
        notes: list[str] = []
        import yaml

        from sweeper import manifest as manifest_mod

        mp = Path(root) / "auto.yaml"
        mp.write_text(yaml.safe_dump(m))
        (Path(root) / "auto").mkdir(parents=True, exist_ok=True)
        resolved = manifest_mod.load(mp).resolved()  # what the runner passes: every default filled in
        g = packing.resolve_gpus(resolved, Path(root) / "auto", notice=notes.append)
        rec["auto"] = {"gpus": g, "notice": notes, "record": json.loads((Path(root) / "auto" / packing.PACKING).read_text())}
        print("auto:", notes, flush=True)
        save()
    if "memory" not in skip:
        mem_log.unlink(missing_ok=True)
        m = copy.deepcopy(base)
        m["name"], m["resources"]["gpus"] = "mem-return", frac
        m["search"]["num_samples"] = n_mem
        m["search"]["max_concurrent"] = max(1, int(n_gpus / frac)) if frac else 4
        m["training"]["max_epochs"] = 1
        m["training"]["limit_train_batches"] = 8
        cb = Scheduled()
        res = run(m, "memory", cb)
        rec["memory_return"] = {"trials": len(res["rows"]), "wall_s": res["wall_s"], **memory_figures(mem_log)}
        mr = rec["memory_return"]
        print(f"memory: {mr['trials_logged']} trials on {mr['actors']} actors, max growth allocated "
              f"{mr['max_growth_allocated_bytes']} B reserved {mr['max_growth_reserved_bytes']} B", flush=True)
    save()
    print(f"wrote {out / name}")
    ray.shutdown()
    return 0


def _cpu_overhead(fig: dict, slots: int) -> float | None:
    t = fig["sum_train_step_s"]
    return (slots * fig["wall_s"] - t) / t if t else None


if __name__ == "__main__":
    sys.exit(main())
