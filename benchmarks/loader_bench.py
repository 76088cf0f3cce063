"""The training loader's host side for image batches (``trainables.speed.make_collate`` and ``Prefetcher``):
a ``TensorDataset`` of normalised fp32 images (ViT-B/14's 3 × 224 × 224) gathered 512 rows a batch, as a CUDA
trial's loader does, the old way (a new pageable tensor, then ``pin_memory()``'s copy) against the new one
(gathered straight into pinned memory: ``make_collate(pin=True)``). Times the collate alone on one thread, and
the whole ``Prefetcher`` (background collate and pin, side-stream copy to the GPU) with no step to wait for:
the most batches a second the data path can give. CUDA only; one JSON row (``benchmarks/jsonl.emit``).

    python3 benchmarks/loader_bench.py --out loader.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.jsonl import emit


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096, help="images in the dataset")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from trainables.speed import Prefetcher, _pin, index_batches, make_collate

    ds = torch.utils.data.TensorDataset(torch.randn(a.rows, 3, 224, 224), torch.randint(0, 10, (a.rows,)))
    dev = torch.device("cuda")
    batches = index_batches(a.rows, a.batch, shuffle=True, seed=0, rank=0, world=1, drop_last=True, lengths=None)
    batches = (batches * (-(-a.batches // len(batches))))[: a.batches]
    row = dict(bench="loader", rows=a.rows, batch=a.batch, batch_mb=round(a.batch * 3 * 224 * 224 * 4 / 2**20, 1),
               device=torch.cuda.get_device_name(dev), torch=torch.__version__, threads=torch.get_num_threads())
    ways = {name: make_collate(None, ds, pin=pin)[0] for name, pin in (("pageable_then_pin", False),
                                                                       ("gather_pinned", True))}
    times: dict[str, list[float]] = {}
    for name, collate in ways.items():
        x0 = _pin(collate(batches[0]))
        assert x0[0].is_pinned() and torch.equal(x0[0], ds.tensors[0][torch.as_tensor(batches[0])])
    for _ in range(a.rounds):  # alternating rounds: drift hits both ways alike
        for name, collate in ways.items():
            t = time.perf_counter()
            for idx in batches:
                _pin(collate(idx))
            times.setdefault(f"{name}_collate_ms", []).append((time.perf_counter() - t) / len(batches) * 1e3)
            torch.cuda.synchronize()
            t, n = time.perf_counter(), 0
            for b in Prefetcher(collate, batches, dev):
                b[0].sum()  # the batch used on the compute stream, as a step uses it
                n += 1
            torch.cuda.synchronize()
            times.setdefault(f"{name}_prefetcher_ms", []).append((time.perf_counter() - t) / n * 1e3)
    for k, v in times.items():
        row[k] = round(statistics.median(v), 2)
        row[k + "_rounds"] = [round(x, 2) for x in v]
    row["gather_pinned_over_old_prefetcher"] = round(row["gather_pinned_prefetcher_ms"] / row["pageable_then_pin_prefetcher_ms"], 3)
    emit(row, a.out)


if __name__ == "__main__":
    main()
