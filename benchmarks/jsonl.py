"""Shared by the benchmarks that write rows (the step, scaling and kernel benchmarks): one JSON row printed and
appended to ``--out``, and CUDA-event timing."""

from __future__ import annotations

import json
import statistics


def emit(row: dict, out: str | None) -> None:
    """Print ``row`` as one JSON line and append it to ``out`` (if given)."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def cuda_rounds(fn, iters: int) -> float:
    """Milliseconds a call of ``fn`` over ``iters`` calls, timed with CUDA events (one round)."""
    import torch

    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / iters


def cuda_ms(fn, iters: int, rounds: int) -> float:
    """The median of ``rounds`` rounds of ``cuda_rounds``."""
    return statistics.median(cuda_rounds(fn, iters) for _ in range(rounds))
