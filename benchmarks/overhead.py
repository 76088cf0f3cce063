"""Platform overhead: 40 trials x 1 s (5 reports, 0.2 s apart) on 2 CPU slots; ideal 20 s.

Three variants, each in its own Python process with its own ``ray.init(num_cpus=2)`` (so none
inherits another's warm workers), run one after another in the same invocation and timed
around the sweep only (Ray start-up excluded for all three; ``sweeper`` starts Ray as ``python -m sweeper``
does, ``runner.init_ray``, the plain variants with ``ray.init``; after it, each imports Tune and the sweeper
variant loads its manifest, then the clock starts):

  sweeper       the product's path: a manifest (trainable ``sleep_bench``, random search through
                OptunaSearch, no checkpoints: ``training.checkpoint_every=0``) -> ``runner.run_sweep``
                (Tune, trial_fn, reporter, progress callback, results Parquet, metadata)
  plain-reuse   plain Ray Tune, a function trainable, ``reuse_actors=True``
  plain-default plain Ray Tune, defaults (a new actor per trial)

    python benchmarks/overhead.py [--repeats N] [--variants sweeper,plain-reuse,plain-default] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_TRIALS, REPORTS, SLEEP_S, SLOTS = 40, 5, 0.2, 2
IDEAL_S = N_TRIALS * REPORTS * SLEEP_S / SLOTS


def _manifest(tmp: str) -> dict:
    return {
        "name": "overhead",
        "trainable": "sleep_bench",
        "data": {"generator": {"kind": "qwen_synthetic", "n_train": 8, "n_val_select": 8, "n_val_calib": 8, "n_test": 8}},
        "resources": {"cpus": 1, "gpus": 0, "workers": 1},
        "search": {"algorithm": "random", "seed": 0, "num_samples": N_TRIALS, "max_concurrent": SLOTS,
                   "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "sleep_s": SLEEP_S}},
        "scheduler": {"type": "none"},
        "selection": {"metric": "val_loss", "mode": "min"},
        "training": {"max_epochs": REPORTS, "checkpoint_every": 0},
        "export": {"enabled": False},
        "output": {"root": os.path.join(tmp, "results")},
    }


def run_variant(name: str) -> dict:
    import ray
    import yaml

    sys.path.insert(0, str(ROOT))
    tmp = tempfile.mkdtemp(prefix=f"overhead-{name}-")
    if name == "sweeper":  # Ray started as ``python -m sweeper`` starts it
        from sweeper import runner

        runner.init_ray(None, num_cpus=SLOTS, dashboard=False)
    else:
        ray.init(num_cpus=SLOTS, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    out: dict = {"variant": name}
    from ray import tune  # noqa: F401 - imported before the clock starts in every variant alike

    if name == "sweeper":
        from sweeper import manifest, runner

        p = Path(tmp) / "m.yaml"
        p.write_text(yaml.safe_dump(_manifest(tmp)))
        loaded = manifest.load(p)
        t = time.perf_counter()
        sweep_dir, rows = runner.run_sweep(loaded, quiet=True, dashboard=False)
        out["wall_s"] = time.perf_counter() - t
        runner.wait_background()  # the Optuna study export runs after the results, off the sweep's path
        out["wall_incl_background_s"] = time.perf_counter() - t
        out["trials"] = len(rows)
        out["completed"] = sum(r["status"] == "completed" for r in rows)
        out["actors"] = len({r.get("worker_pid") for r in rows if r.get("worker_pid")})
        out["idle_s_per_trial"] = statistics.fmean([r.get("idle_s") or 0.0 for r in rows]) if rows else None
    else:
        from ray import tune

        def trainable(config):
            for i in range(REPORTS):
                time.sleep(SLEEP_S)
                tune.report({"val_loss": config["lr"] / (i + 1), "epoch": i + 1})

        kw = {"reuse_actors": True} if name == "plain-reuse" else {}
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"lr": tune.loguniform(1e-4, 1e-2)},
            tune_config=tune.TuneConfig(num_samples=N_TRIALS, metric="val_loss", mode="min", **kw),
            run_config=tune.RunConfig(storage_path=tmp, name="plain", verbose=0),
        )
        t = time.perf_counter()
        grid = tuner.fit()
        out["wall_s"] = time.perf_counter() - t
        out["trials"] = len(grid)
        out["completed"] = sum(1 for r in grid if r.error is None)
        out["actors"] = len({(r.metrics or {}).get("pid") for r in grid})
    ray.shutdown()
    out["ratio_to_ideal"] = out["wall_s"] / IDEAL_S
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--variants", default="sweeper,plain-reuse,plain-default")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all variants (interleaved)")
    ap.add_argument("--out", help="results JSON (default: benchmarks/results/overhead_<date>_cpu.json)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant)), flush=True)
        return 0
    variants = args.variants.split(",")
    runs: list[dict] = []
    load_before = os.getloadavg()
    for rnd in range(args.repeats):
        for v in variants:
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            la = os.getloadavg()[0]
            p = subprocess.run([sys.executable, __file__, "--variant", v], capture_output=True, text=True, env=env)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode or not line:
                print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {v} failed (rc {p.returncode})")
            r = json.loads(line[len("RESULT "):])
            r.update(round=rnd, load1_at_start=la)
            runs.append(r)
            print(f"round {rnd} {v:14s} wall {r['wall_s']:6.1f} s  = {r['ratio_to_ideal']:.3f} x ideal ({IDEAL_S:.0f} s)"
                  f"  trials {r['completed']}/{r['trials']}  actors {r['actors']}  load1 {la:.2f}", flush=True)
    summary = {}
    for v in variants:
        w = [r["wall_s"] for r in runs if r["variant"] == v]
        summary[v] = {"wall_s_median": statistics.median(w), "wall_s_all": w,
                      "ratio_to_ideal": statistics.median(w) / IDEAL_S}
        bg = [r["wall_incl_background_s"] for r in runs if r["variant"] == v and "wall_incl_background_s" in r]
        if bg:
            summary[v]["wall_incl_background_s_median"] = statistics.median(bg)
    if "sweeper" in summary and "plain-reuse" in summary:
        summary["sweeper_over_plain_reuse"] = summary["sweeper"]["wall_s_median"] / summary["plain-reuse"]["wall_s_median"]
    if "sweeper" in summary and "plain-default" in summary:
        summary["sweeper_over_plain_default"] = summary["sweeper"]["wall_s_median"] / summary["plain-default"]["wall_s_median"]
    rec = {
        "benchmark": "overhead", "date": args.date, "device": "2-core CPU (this CI machine kind)",
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        "setup": {"trials": N_TRIALS, "reports": REPORTS, "sleep_s": SLEEP_S, "slots": SLOTS, "ideal_s": IDEAL_S},
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "note": "2 cores shared with other engineers' test runs; variants run back to back in one invocation",
        "runs": runs, "summary": summary,
        "targets": {"sweeper_le_1.10x_ideal": summary.get("sweeper", {}).get("ratio_to_ideal", 99) <= 1.10,
                    "sweeper_not_slower_than_plain_reuse": summary.get("sweeper_over_plain_reuse", 99) <= 1.0},
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"overhead_{args.date}_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
