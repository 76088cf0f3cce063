"""Where a trial slot's first start-up goes (issue 7 item 3's fixed cost per slot): a fresh Python process
times each stage a trial worker goes through before its first training step, in the order a Tune trial
actor meets them:

  import ray · import ray.tune (the actor class) · import torch · CUDA context · import transformers' Qwen2 ·
  sweeper + trainables · data (``cached_splits``) · model + optimizer (``prepare``) · first step

``--procs K`` runs K such processes at once (the K trial slots of a packed sweep start together) after one
alone, so the cost of starting side by side shows. The model and data are ``benchmarks/gpu_packing.py``'s.

    python benchmarks/startup_bench.py [--procs 4] [--n-train 4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(n_train: int) -> dict:
    t0 = time.perf_counter()
    out: dict = {}

    def mark(k):
        out[k] = round(max(0.0, time.perf_counter() - t0 - sum(out.values())), 3)

    import ray  # noqa: F401

    mark("import_ray")
    import ray.tune  # noqa: F401

    mark("import_ray_tune")
    import torch

    mark("import_torch")
    gpu = torch.cuda.is_available()
    if gpu:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    mark("cuda_context")
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    mark("import_qwen2")
    import tempfile

    import yaml

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_packing
    from sweeper import manifest
    from sweeper.trial import TrialSpec
    from trainables import registry, speed
    from trainables.base import cached_splits

    mark("import_sweeper")
    m = gpu_packing.base_manifest(tempfile.mkdtemp(), smoke=not gpu)
    m["data"]["generator"]["n_train"] = n_train
    p = Path(tempfile.mkdtemp()) / "m.yaml"
    p.write_text(yaml.safe_dump(m))
    r = manifest.load(p).resolved()
    fam = registry.get(r["trainable"])
    cached_splits(fam, r["data"], r["model"])
    mark("data")
    prep = speed.prepare({"lr": 1e-3, "batch_size": r["search"]["space"]["batch_size"]}, TrialSpec(manifest=r), None)
    mark("model_and_optimizer")
    for batch in prep.train_loader(1):
        prep.stepper.step(batch).item()
        break
    mark("first_step")
    out["total"] = round(time.perf_counter() - t0, 3)
    out["device"] = torch.cuda.get_device_name(0) if gpu else "cpu"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.n_train)), flush=True)
        return 0
    cmd = [sys.executable, __file__, "--child", "--n-train", str(a.n_train)]

    def launch(k: int) -> tuple[float, list[dict]]:
        t = time.perf_counter()
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(k)]
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
        return time.perf_counter() - t, rows

    rec: dict = {"benchmark": "startup", "date": datetime.date.today().isoformat(), "n_train": a.n_train,
                 "command": "python benchmarks/startup_bench.py " + " ".join(sys.argv[1:])}
    for label, k in (("alone", 1), (f"{a.procs}_at_once", a.procs)):
        wall, rows = launch(k)
        keys = [x for x in rows[0] if x != "device"]
        rec[label] = {"wall_s": round(wall, 2), "median_s": {x: round(statistics.median(r[x] for r in rows), 3) for x in keys},
                      "max_s": {x: max(r[x] for r in rows) for x in keys}}
        rec["device"] = rows[0]["device"]
        print(label, json.dumps(rec[label]["median_s"]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=2))
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
