"""Evaluation cost on the fast path, three ways timed side by side in one process: the selection split in
its own order with the padding mask passed into the backbone's attention (the code before 2026-11-27), the
rows sorted by length (``Prepared.eval_loader``'s default) with that mask, and sorted with causal
attention only (the Qwen family's forward now: right padding, so no real token sees a pad).

    python benchmarks/eval_bench.py                     # issue 7's packing workload (Qwen "small", 512 rows)
    python benchmarks/eval_bench.py --rounds 7 --out benchmarks/results/eval_<date>_<device>.json

The model, data and batch size are those of ``benchmarks/gpu_packing.py`` (the 16-trial 0.25-GPU sweep),
built by ``trainables.speed.prepare``, the code a trial runs. Rounds alternate the variants, the median
of each is kept, and their metrics are compared (they must agree: ``evaluate`` puts the sorted rows back
in the split's order). Prints the padded-token share and the batches with no padding of each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def padding(loader) -> tuple[float, int]:
    """(padded share of the tokens, batches with no mask) of one pass over ``loader``'s batches."""
    real = total = unmasked = 0
    for idx in loader.batches:
        ids, mask, _ = loader.collate(idx)
        total += ids.numel()
        real += ids.numel() if mask is None else int(mask.sum())
        unmasked += mask is None
    return 1 - real / total, unmasked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-batch-size", type=int, default=None, help="default: the manifest's (64)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch
    import yaml

    from benchmarks.gpu_packing import base_manifest
    from sweeper import manifest as mf
    from sweeper.trial import TrialSpec
    from trainables import speed

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.yaml"
        raw = base_manifest(tmp, smoke=False)
        raw["resources"]["gpus"] = "auto"
        path.write_text(yaml.safe_dump(raw))
        m = mf.load(str(path), []).resolved()
        bs = a.eval_batch_size or m["training"]["eval_batch_size"]
        p = speed.prepare({"lr": 1e-3, "batch_size": 64}, TrialSpec(manifest=m), None)
        st = p.stepper
        for batch in list(p.train_loader(1))[:8]:  # trained a little, so the outputs are not all the label mean
            st.step(batch)
        dev = p.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        # (name, rows sorted by length, padding mask passed into the backbone's attention)
        variants = [("split order, mask in attention (before)", False, True),
                    ("by length, mask in attention", True, True),
                    ("by length, causal only (now)", True, False)]
        times: dict[str, list[float]] = {k: [] for k, _, _ in variants}
        metrics = {}

        def evaluate(by_length: bool, mask_attention: bool) -> dict:
            st.inner.mask_attention = mask_attention
            return st.evaluate(p.eval_loader(bs, by_length=by_length), p.splits)

        for k, by_length, mask_attention in variants:  # warm-up, and the metrics each variant gives
            metrics[k] = evaluate(by_length, mask_attention)
        for _ in range(a.rounds):
            for k, by_length, mask_attention in variants:
                sync()
                t = time.perf_counter()
                evaluate(by_length, mask_attention)
                sync()
                times[k].append(time.perf_counter() - t)
        st.inner.mask_attention = False
        n = len(p.splits.get("val_select", "select"))
        rows = {}
        for k, by_length, mask_attention in variants:
            pad, unmasked = padding(p.eval_loader(bs, by_length=by_length))
            rows[k] = {"median_s": statistics.median(times[k]), "times_s": times[k], "padded_share": pad,
                       "batches": len(p.eval_loader(bs).batches), "unmasked_batches": unmasked,
                       "by_length": by_length, "mask_attention": mask_attention}
        base = variants[0][0]
        worst = max(abs(metrics[base][k] - metrics[v][k]) / max(abs(metrics[base][k]), 1e-12)
                    for k in metrics[base] for v, _, _ in variants)
        ratios = {k: rows[k]["median_s"] / rows[base]["median_s"] for k in rows}
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        for k, r in rows.items():
            print(f"{k:42s} {r['median_s'] * 1e3:8.1f} ms per evaluation of {n} rows ({ratios[k]:.3f} of the first)  "
                  f"padded tokens {r['padded_share']:.1%}  batches with no padding {r['unmasked_batches']}/{r['batches']}")
        print(f"metrics: largest relative difference from the first {worst:.2e}  ({device})")
        ratio = ratios[variants[-1][0]]
        if a.out:
            Path(a.out).write_text(json.dumps({
                "date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
                "rows": n, "eval_batch_size": bs, "rounds": a.rounds, "loaders": rows, "ratio": ratio,
                "ratios": ratios, "metrics": metrics, "metric_rel_diff_max": worst}, indent=1))
        return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
