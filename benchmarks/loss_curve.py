"""Loss curves of the product's training step under settings that change the numerics, over the same steps.

    python benchmarks/loss_curve.py --manifest search_spaces/qwen2.5-0.5b_regression_gpu.yaml \
        --hp lr=1e-4 --steps 300 --out curves.json \
        --variant mixed:training.bf16_weights=false --variant bf16w:training.bf16_weights=true \
        --variant mixed-order2:training.bf16_weights=false@order=1

Each variant is built by ``trainables.speed.prepare`` (the code a trial runs) from the manifest plus its
overrides, starting from the same initial weights (``training.seed``), and trained for ``--steps`` steps on
the real data path (``Prepared.train_loader``, epochs of shuffled, length-bucketed batches). ``@order=K``
shifts the batch order's seed (same weights, other batches): the yardstick for how far two runs drift apart
when nothing but the order of the data changes. After the steps the selection split is evaluated.

Prints, against the first variant: the mean of the losses in each window of ``--window`` steps and the
largest relative gap between windows, and the final evaluation metrics; the whole per-step curves go to
``--out``. A numerics-changing speed setting counts (the GPU speed issue) when its curve stays as close to
mixed precision as the reordered run does. ``--smoke``: tiny shapes on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_bench import bench_manifest  # noqa: E402


def _windows(xs: list[float], w: int) -> list[float]:
    return [sum(xs[i:i + w]) / len(xs[i:i + w]) for i in range(0, len(xs), w)]


def run_variant(manifest: str, overrides: list[str], hp: dict, steps: int, order: int, smoke: bool) -> dict:
    import torch

    from sweeper.trial import TrialSpec
    from trainables import speed

    m, config = bench_manifest(manifest, overrides, smoke)
    config.update(hp)
    t0 = time.perf_counter()
    p = speed.prepare(config, TrialSpec(manifest=m), None)
    speed.choose_micro_batch(p, m)
    st = p.stepper
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        for batch in p.train_loader(p.seed * 7919 + epoch + 1000 * order):
            losses.append(float(st.step(batch)))  # a sync per step: this measures the curve, not the speed
            if len(losses) == steps:
                break
    metrics = st.evaluate(p.eval_loader(m["training"]["eval_batch_size"]), p.splits)
    out = dict(overrides=overrides, order=order, bf16_weights=st.master is not None, fp8=st.fp8,
               fast_blocks=st.fast_blocks, gelu_epilogue=st.gelu_epilogue, micro=st.micro,
               bs=p.hp.batch_size, lr=p.hp.lr, steps=len(losses), epochs=epoch, wall_s=round(time.perf_counter() - t0, 1),
               losses=[round(x, 6) for x in losses],
               eval={k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))})
    del p, st
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from torch import _dynamo

    _dynamo.reset()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--set", action="append", default=[], help="override for every variant")
    ap.add_argument("--variant", action="append", required=True,
                    help="label:override[,override...][@order=K]; the first is the reference")
    ap.add_argument("--hp", action="append", default=[], help="hyperparameter key=value (else the space's first/low)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    def num(v: str):
        return float(v) if any(c in v for c in ".eE") else int(v)

    hp = {k: num(v) for k, v in (x.split("=", 1) for x in a.hp)}
    runs = {}
    for spec in a.variant:
        label, _, rest = spec.partition(":")
        rest, _, order = rest.partition("@order=")
        ov = a.set + [x for x in rest.split(",") if x]
        runs[label] = run_variant(a.manifest, ov, hp, a.steps, int(order or 0), a.smoke)
        r = runs[label]
        print(json.dumps({"variant": label, **{k: v for k, v in r.items() if k != "losses"},
                          "first": r["losses"][:3], "last": r["losses"][-3:]}), flush=True)
    ref_label = next(iter(runs))
    ref = _windows(runs[ref_label]["losses"], a.window)
    summary = {"manifest": Path(a.manifest).name, "steps": a.steps, "window": a.window, "reference": ref_label,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for label, r in runs.items():
        w = _windows(r["losses"], a.window)
        gaps = [abs(x - y) / abs(y) for x, y in zip(w, ref)]
        summary["variants"][label] = {"windows": [round(x, 5) for x in w],
                                      "max_rel_gap": round(max(gaps), 5), "mean_rel_gap": round(sum(gaps) / len(gaps), 5),
                                      "max_abs_gap": round(max(abs(x - y) for x, y in zip(w, ref)), 5),
                                      "eval": r["eval"]}
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}), flush=True)
    for label, s in summary["variants"].items():
        print(json.dumps({"variant": label, **s}), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({**summary, "runs": runs}, fh, indent=1)
    return summary


if __name__ == "__main__":
    main()
