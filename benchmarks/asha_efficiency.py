"""ASHA's efficiency on the Qwen tiny regression demo (CPU): same configurations, two schedules.

The same seeded list of configurations (search.algorithm=random, search.seed fixed, so every run
draws the identical sequence; checked below) runs through the product's runner under each schedule:
  * ASHA: reduction factor 3, grace period 1, max_t 27 (rungs 1/3/9/27: the issue's 11 % ideal;
    ``--max-t 9`` gives rungs 1/3/9, whose ideal is 26 %), once per ``scheduler.variant``:
    ``stopping`` (Ray's asynchronous rule) and ``promotion`` (sweeper's PromotingASHA)
  * full budget: no scheduler, every configuration for max_t epochs
then the best full-budget configuration runs under 3 more training seeds (the product's fixed-run
phase, as the fan-out uses) to estimate the seed standard deviation of the final metric.
Reported: ASHA's best final metric vs the full budget's, the seed std, and ASHA's accelerator
(here CPU-slot) seconds over the full budget's, from the trials' own accounting (sweeper cost).

    python benchmarks/asha_efficiency.py [--configs 27] [--max-t 27] [--variants stopping,promotion] [--out FILE] [overrides ...]
"""

from __future__ import annotations

import argparse
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
BASE = ROOT / "search_spaces" / "qwen-tiny_regression_cpu.yaml"
# shrunk so that the full-budget run fits in ~15 min on 2 shared cores
SHRINK = ["data.generator.n_train=256", "data.generator.n_val_select=96", "data.max_length=48",
          "promotion.fanout=null", "gates={}", "export.enabled=false", "training.keep_checkpoints=1"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=27)
    ap.add_argument("--max-t", type=int, default=27, help="epochs of a full-budget trial (ASHA's max_t)")
    ap.add_argument("--seeds", default="1,2,3", help="extra training seeds for the best full-budget config")
    ap.add_argument("--variants", default="stopping,promotion",
                    help="ASHA variants to run beside the full budget (scheduler.variant)")
    ap.add_argument("--out")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from sweeper import cost, manifest, promote, runner

    root = Path(tempfile.mkdtemp(prefix="asha-eff-"))
    common = SHRINK + [f"search.num_samples={args.configs}", "search.algorithm=random", "search.seed=7",
                       "search.max_concurrent=2", f"training.max_epochs={args.max_t}", f"output.root={root}"] + args.overrides
    runner.init_ray(None, num_cpus=2, dashboard=False)
    load_before = os.getloadavg()
    out: dict = {}
    asha_ov = ["scheduler.type=asha", f"scheduler.max_t={args.max_t}", "scheduler.grace_period=1",
               "scheduler.reduction_factor=3"]
    schedules = [(f"asha-{v}", asha_ov + [f"scheduler.variant={v}", f"name=asha-eff-{v}"]) for v in args.variants.split(",")]
    for name, ov in (*schedules, ("full", ["scheduler.type=none", "name=asha-eff-full"])):
        loaded = manifest.load(BASE, common + ov)
        t = time.perf_counter()
        sweep_dir, rows = runner.run_sweep(loaded, quiet=True, dashboard=False)
        wall = time.perf_counter() - t
        rep = cost.report(sweep_dir)["phases"]["sweep"]
        best = min((r for r in rows if r.get("rank")), key=lambda r: r["rank"])
        out[name] = {"sweep_dir": str(sweep_dir), "wall_s": wall, "accel_s": rep["total"]["accel_s"],
                     "unit": rep["total"]["unit"], "epochs": rep["total"]["epochs"], "trials": len(rows),
                     "stopped": rep["stopped_by_asha"]["trials"],
                     "best_trial": best["trial_id"], "best_config": json.loads(best["config"]),
                     "best_final": best["final"], "best_best": best["best"],
                     "configs": sorted(r["config"] for r in rows), "cost": rep["total"]}
        print(f"{name}: {len(rows)} trials, {rep['total']['epochs']} epochs, {rep['total']['accel_s']:.1f} "
              f"{rep['total']['unit']}, best {loaded.manifest.selection.metric} final {best['final']:.4f} "
              f"({best['trial_id']}), wall {wall:.0f}s", flush=True)
    same = all(out[n]["configs"] == out["full"]["configs"] for n, _ in schedules)
    # seed spread of the best full-budget configuration (fixed runs, as the fan-out phase runs them)
    loaded = manifest.load(BASE, common + ["scheduler.type=none", "name=asha-eff-full"])
    full_dir = Path(out["full"]["sweep_dir"])
    hp = {k: v for k, v in out["full"]["best_config"].items() if not k.startswith("_")}
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [{"candidate": out["full"]["best_trial"], "seed": s, "init_from": None, "hp": hp} for s in seeds]
    t = time.perf_counter()
    seed_rows = promote._run_fixed(loaded, full_dir, "seeds", runs, args.max_t, True)
    finals = {json.loads(r["config"])["_run"]["seed"]: r["final"] for r in seed_rows}
    finals[loaded.manifest.training.seed] = out["full"]["best_final"]  # the sweep's own seed
    vals = [v for v in finals.values() if v is not None]
    std = statistics.stdev(vals) if len(vals) > 1 else None
    ideal = _ideal_fraction(args.configs, 3, 1, args.max_t)
    variants = {}
    for n, _ in schedules:
        gap = out[n]["best_final"] - out["full"]["best_final"]
        ratio = out[n]["accel_s"] / out["full"]["accel_s"]
        variants[n] = {"asha_minus_full_final": gap, "accel_ratio_asha_over_full": ratio,
                       "epoch_ratio": out[n]["epochs"] / out["full"]["epochs"],
                       "targets": {"within_one_seed_std": (std is not None and abs(gap) <= std) or gap <= 0,
                                   "le_20pct_seconds": ratio <= 0.20}}
    rec = {
        "benchmark": "asha_efficiency", "date": args.date, "device": "2-core CPU (this CI machine kind)",
        "command": "python benchmarks/asha_efficiency.py " + " ".join(sys.argv[1:]),
        "manifest": str(BASE.relative_to(ROOT)), "overrides": common,
        "metric": loaded.manifest.selection.metric, "mode": loaded.manifest.selection.mode,
        "same_configurations": same, "configs": args.configs, "max_t": args.max_t,
        **{n: {k: v for k, v in out[n].items() if k != "configs"} for n in out},
        "seed_finals": {str(k): v for k, v in sorted(finals.items())}, "seed_std": std,
        "seed_runs_wall_s": time.perf_counter() - t,
        "variants": variants,
        "ideal_asha_epoch_fraction": ideal,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "note": "all schedules in one invocation, one after another, on the same local Ray (2 CPUs)",
    }
    dst = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"asha_efficiency_{args.date}_cpu.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(rec, indent=2, default=str))
    print(json.dumps({k: rec[k] for k in ("same_configurations", "seed_finals", "seed_std", "variants",
                                          "ideal_asha_epoch_fraction")}, indent=2))
    for n in variants:
        v = variants[n]
        print(f"{n}: best final {out[n]['best_final']:.4f} vs full {out['full']['best_final']:.4f} "
              f"(seed std {std if std is None else round(std, 4)}); seconds {100 * v['accel_ratio_asha_over_full']:.1f} % "
              f"and epochs {100 * v['epoch_ratio']:.1f} % of the full budget's (ideal {100 * ideal:.1f} %)")
    print(f"wrote {dst}")
    return 0


def _ideal_fraction(n: int, rf: float, grace: int, max_t: int) -> float:
    """Epochs synchronous ASHA would train (1/rf of the trials promoted at each rung) over n x max_t."""
    epochs, alive, prev, t = 0.0, float(n), 0, grace
    while t < max_t:
        epochs += alive * (t - prev)
        prev, alive, t = t, alive / rf, t * rf
    epochs += alive * (max_t - prev)
    return epochs / (n * max_t)


if __name__ == "__main__":
    sys.exit(main())
