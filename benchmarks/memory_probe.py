"""What a GPU trial leaves behind on its process: runs the memory-return workload of benchmarks/gpu_packing.py
(Qwen2 "small", 8 steps, 0.25 GPU) N times in this process, as a reused actor runs them (``gc.freeze()`` at each
trial's start and ``release_memory()`` at its end, like ``sweeper.trial.trial_fn``), and after each prints the
CUDA memory still allocated and the CUDA tensors alive that were not alive after the first trial, with what
holds them.

    python benchmarks/memory_probe.py [--trials 4] [--no-freeze]
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cuda_tensors() -> dict[int, object]:
    import torch

    gc.unfreeze()
    gc.collect()
    out = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda:
                out[id(o)] = o
        except Exception:  # noqa: BLE001
            pass
    return out


def holders(t) -> list[str]:
    out = []
    for r in gc.get_referrers(t):
        if isinstance(r, dict):
            for rr in gc.get_referrers(r):
                if hasattr(rr, "__dict__") and getattr(rr, "__dict__", None) is r:
                    out.append(type(rr).__qualname__)
                    break
            else:
                out.append("dict[" + ",".join(list(map(str, r.keys()))[:4]) + "]")
        elif isinstance(r, (list, tuple)):
            out.append(type(r).__name__ + f"[{len(r)}]")
        else:
            out.append(type(r).__qualname__)
    return out[:4]


def _describe(o) -> str:
    import types

    if isinstance(o, types.FrameType):
        return f"frame {o.f_code.co_name} ({o.f_code.co_filename.split('/')[-1]}:{o.f_lineno})"
    if isinstance(o, dict):
        keys = list(o.keys())[:5]
        return "dict" + str([str(k)[:30] for k in keys])
    if isinstance(o, (list, tuple, set)):
        return f"{type(o).__name__}[{len(o)}]"
    if isinstance(o, types.ModuleType):
        return f"module {o.__name__}"
    return type(o).__module__ + "." + type(o).__qualname__


def roots(obj, exclude: set[int], depth: int = 14, limit: int = 3) -> list[list[str]]:
    """Referrer chains from ``obj`` up to what keeps it alive: a module, a running frame, a thread.
    The search keeps its objects in one dict (id -> object), which is itself excluded."""
    import threading
    import types

    objs: dict[int, object] = {id(obj): obj}
    paths: dict[int, list[str]] = {id(obj): [_describe(obj)]}
    exclude |= {id(objs), id(paths)}
    found, frontier = [], [id(obj)]
    for _ in range(depth):
        nxt: list[int] = []
        for k in frontier:
            for r in gc.get_referrers(objs[k]):
                if id(r) in objs or id(r) in exclude or r is frontier or r is nxt:
                    continue
                if isinstance(r, types.FrameType) and r.f_code.co_name in ("roots", "main", "cuda_tensors", "holders"):
                    continue
                d = _describe(r)
                path = paths[k] + [d]
                if (isinstance(r, (types.ModuleType, types.FrameType, threading.Thread))
                        or (isinstance(r, dict) and "__builtins__" in r)):
                    found.append(path + ([str(r.get("__name__"))] if isinstance(r, dict) else []))
                    if len(found) >= limit:
                        return found
                    continue
                objs[id(r)], paths[id(r)] = r, path
                nxt.append(id(r))
        frontier = nxt[:400]
        if not frontier:
            break
    return found or [["no root found within depth"] + (paths[frontier[0]] if frontier else [])]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--no-freeze", action="store_true")
    a = ap.parse_args()
    import torch

    from benchmarks.gpu_packing import base_manifest
    from sweeper import manifest as mf
    from sweeper.trial import ListReporter, TrialSpec, release_memory, train_loop

    m = base_manifest(tempfile.mkdtemp(), smoke=not torch.cuda.is_available())
    m["resources"]["gpus"] = 0.25
    m["training"]["max_epochs"], m["training"]["limit_train_batches"] = 1, 8
    spec = TrialSpec(manifest=mf.validate_data(copy.deepcopy(m), "probe").model_dump(mode="json"))
    first = None
    for i in range(a.trials):
        if not a.no_freeze:
            gc.freeze()
        train_loop({"lr": 1e-3, "batch_size": m["search"]["space"]["batch_size"]}, spec, ListReporter())
        release_memory()
        alloc = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        live = cuda_tensors()
        if first is None:
            first = set(live)
        new = [t for k, t in live.items() if k not in first]
        kinds = collections.Counter((tuple(t.shape), str(t.dtype)) for t in new)
        print(json.dumps({"trial": i + 1, "allocated": alloc, "cuda_tensors": len(live), "new_since_first": len(new),
                          "new_bytes": sum(t.numel() * t.element_size() for t in new),
                          "new_kinds": [f"{s} {d} x{n}" for (s, d), n in kinds.most_common(8)],
                          "held_by": sorted({h for t in new[:20] for h in holders(t)})[:12]}), flush=True)
        if new and i == 1:
            big = max(new, key=lambda t: t.numel())
            ex = {id(live), id(new), id(first)}
            for chain in roots(big, ex):
                print("ROOT " + " <- ".join(chain), flush=True)
        first |= set(live)  # each line: what this trial added
    return 0


if __name__ == "__main__":
    sys.exit(main())
