"""The results store: Parquet tables a sweep leaves, readable with pyarrow alone.

``trials.parquet``  one row per trial: config, status, stop reason and rung, final and best
                    metric, wall/accelerator seconds and their split, checkpoint path.
``metrics.parquet`` one row per (trial, epoch, metric): every reported number, long format.
``decisions.jsonl`` ASHA's decision for every trial at every rung (written by the scheduler).

Tables are written atomically (temp file, fsync, rename): a reader, the leaderboard included,
sees the old table or the new one, never half of either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .fsutil import atomic_open

TRIALS = "trials.parquet"
METRICS = "metrics.parquet"
DECISIONS = "decisions.jsonl"

STATUS_ORDER = {"completed": 0, "stopped": 0, "running": 1, "pending": 1, "failed": 2, "error": 2}


def write_table(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema) if rows else (schema or pa.schema([])).empty_table()
    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh)


def read_rows(path: Path) -> list[dict]:
    # One open file: given a path, pyarrow may open it more than once (footer, then pages), and a
    # writer's rename in between would pair the old footer with the new pages. The open
    # descriptor keeps reading one version whatever is renamed over the path meanwhile.
    # pa.OSFile, not open(): a Python file object here made ~half of the CLI processes that read a
    # table abort at interpreter exit ("terminate called without an active exception", pyarrow 2x).
    with pa.OSFile(str(path)) as fh:
        return pq.read_table(fh).to_pylist()


def read_decisions(sweep_dir: Path) -> list[dict]:
    p = Path(sweep_dir) / DECISIONS
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line after a crash: everything before it is intact
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _one_per_epoch(hist: list[dict]) -> list[dict]:
    """One report per epoch, the last one kept, in epoch order.

    A driver killed after a trial's final report reached Tune's ``result.json`` but before the
    experiment snapshot recorded it restores that trial from its newest verified checkpoint, and
    the trial reports that epoch again (the same numbers, from the same weights). Tune's raw
    ``result.json`` then holds the epoch twice; the results tables hold it once.
    """
    if not hist or not all(_finite(h.get("epoch")) for h in hist):
        return hist  # reports without an epoch: nothing to align on, keep them as they came
    by_epoch = {int(h["epoch"]): h for h in hist}  # the later report of an epoch wins
    return [by_epoch[k] for k in sorted(by_epoch)]


def _history_fallback(result, metric: str) -> list[dict]:
    """A trial's reports when Tune's ``result.json`` for it is empty: a driver killed while Tune's
    background thread was uploading the trial's files leaves it (and ``params.json``) at 0 bytes.
    Then ``progress.csv`` (the same reports, as CSV), else the last result Tune kept in its
    experiment state; without this the finished trial was listed as ``pending``."""
    try:
        import pandas as pd

        f = Path(result.path) / "progress.csv"
        if f.is_file() and f.stat().st_size:
            recs = pd.read_csv(f).to_dict("records")
            if recs and all(metric in h for h in recs):
                return recs
    except Exception:  # noqa: BLE001 - a torn CSV: try the last result instead
        pass
    last = dict(result.metrics or {})
    return [last] if _finite(last.get(metric)) else []


def _with_last_result(records: list[dict], last: dict | None) -> list[dict]:
    """The reports, plus Tune's last result where it is newer than the last report on file.

    A driver killed after Tune had processed a trial's final report (its experiment snapshot holds
    the trial finished, with that result) but before the line reached the trial's ``result.json``
    restores the trial as finished and never runs it again: the file ends an epoch short. Seen in
    the fresh-clone CI of 2026-11-27 (a trial with epochs 1-2 on file, its epoch-3 checkpoint
    written, Tune's last result epoch 3); the tables listed it "stopped at epoch 2 of 3"."""
    last = dict(last or {})
    if not records or not _finite(last.get("epoch")) or not all(_finite(h.get("epoch")) for h in records):
        return records
    if int(last["epoch"]) > max(int(h["epoch"]) for h in records):
        return [*records, last]
    return records


RUN_TIMES = ("time_startup_s", "time_train_s", "time_eval_s", "time_ckpt_s", "time_wall_s")


def _runs_summed(hist: list[dict]) -> list[dict]:
    """A trial's reports with its clocks summed over runs.

    Each run of a trial (the first, a retry after a failure, a resume after a driver kill, a
    promotion out of a paused ASHA rung) reports times from its own start. A new run shows as a new
    ``first_step_unix`` or a wall clock that went back; from there on, each clock gets the previous
    runs' totals added, so the last report holds what the whole trial cost. (Work a killed run did
    after its last report is not in any report and is not counted.)"""
    out, offset, prev, prev_first = [], dict.fromkeys(RUN_TIMES, 0.0), None, None
    for h in hist:
        first = h.get("first_step_unix")
        wall = h.get("time_wall_s")
        if prev is not None and ((_finite(first) and _finite(prev_first) and first != prev_first)
                                 or (_finite(wall) and _finite(prev.get("time_wall_s")) and wall < prev["time_wall_s"])):
            for k in RUN_TIMES:
                if _finite(prev.get(k)):
                    offset[k] += float(prev[k])
        prev, prev_first = h, first
        if any(offset.values()):
            h = {**h, **{k: float(h[k]) + offset[k] for k in RUN_TIMES if _finite(h.get(k))}}
        out.append(h)
    return out


def trial_rows(results, *, metric: str, mode: str, phase: str, max_t: int, gpus: float, workers: int,
               decisions: list[dict], cpus: float = 1.0) -> tuple[list[dict], list[dict]]:
    """Tune ``ResultGrid`` -> (trial rows, metric rows)."""
    by_trial: dict[str, list[dict]] = {}
    for d in decisions:
        by_trial.setdefault(d["trial_id"], []).append(d)
    rows, mrows = [], []
    for r in results:
        cfg = dict(r.config or {})
        df = r.metrics_dataframe
        records = df.to_dict("records") if df is not None and len(df) else []
        records = _with_last_result(records or _history_fallback(r, metric), r.metrics)
        hist = _one_per_epoch(_runs_summed(records))
        last = hist[-1] if hist else (r.metrics or {})
        trial_id = (r.metrics or {}).get("trial_id") or last.get("trial_id") or Path(r.path).name
        vals = [h.get(metric) for h in hist if _finite(h.get(metric)) and not h.get("sweeper_failed")]
        best = (min(vals) if mode == "min" else max(vals)) if vals else None
        final = last.get(metric) if _finite(last.get(metric)) and not last.get("sweeper_failed") else None
        epochs = int(last.get("epoch") or 0)
        stop_reason, rung = None, None
        if r.error is not None:
            status = "error"
            stop_reason = _first_line(r.error)
        elif last.get("sweeper_failed"):
            status, stop_reason = "failed", str(last["sweeper_failed"])
        elif epochs and epochs < max_t:
            status, rung = "stopped", epochs
            stops = [d for d in by_trial.get(trial_id, []) if d["action"] == "stop"]
            if stops:
                d = stops[-1]
                stop_reason = (f"ASHA: {metric}={d['value']:.4g} worse than the rung-{d['rung']:g} cutoff "
                               f"{_g(d.get('cutoff'))} ({d['rung_size']} trials at the rung)")
            else:
                stop_reason = f"stopped at epoch {epochs} of {max_t}"
        elif not hist:
            status = "pending"
        else:
            status = "completed"
            passed = [d for d in by_trial.get(trial_id, []) if d.get("rung") is not None and d["action"] in ("continue", "promote")]
            if passed:
                stop_reason = "ran to max_t; ASHA continued it at " + ", ".join(
                    f"rung {d['rung']:g} ({d['value']:.4g} vs cutoff {_g(d.get('cutoff'))})" for d in passed)
        if best is None and status in ("completed", "stopped"):
            status, stop_reason = "failed", f"{metric} never finite"
        acct = accounting(last, gpus=gpus, cpus=cpus, workers=workers)
        ckpt = None
        try:
            ranked = [(c, m) for c, m in (r.best_checkpoints or []) if _finite(m.get(metric))]
            if ranked:
                ranked.sort(key=lambda cm: cm[1][metric], reverse=(mode == "max"))
                ckpt = ranked[0][0].path
            elif r.checkpoint is not None:
                ckpt = r.checkpoint.path
            else:  # a Ray Train worker group stores its own checkpoints and reports their paths
                paths = [(h.get(metric), h.get("checkpoint_path")) for h in hist if h.get("checkpoint_path")]
                paths = [(v, p) for v, p in paths if _finite(v)]
                if paths:
                    ckpt = sorted(paths, key=lambda vp: vp[0], reverse=(mode == "max"))[0][1]
        except Exception:  # noqa: BLE001 - a trial without checkpoints simply has none
            pass
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "phase": phase,
            "config": json.dumps(cfg, sort_keys=True, default=str),
            "status": status,
            "stop_reason": stop_reason,
            "rung": rung,
            "epochs": epochs,
            "metric": metric,
            "final": final,
            "best": best,
            **acct,
            "asha_decisions": json.dumps([{k: d.get(k) for k in ("rung", "time", "value", "cutoff", "rung_size", "action")}
                                          for d in by_trial.get(trial_id, [])]) if by_trial.get(trial_id) else None,
            "worker_pid": int(last["pid"]) if _finite(last.get("pid")) else None,
            "data_cache_hit": bool(last["data_cache_hit"]) if _finite(last.get("data_cache_hit")) else None,
            "checkpoint": ckpt,
            "path": r.path,
            "node_id": last.get("node_id") or (r.metrics or {}).get("node_id"),
        }
        for k, v in cfg.items():
            row[f"config.{k}"] = json.dumps(v) if not isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in last.items():
            if k.startswith("val_") and _finite(v):
                row[f"final.{k}"] = float(v)
        rows.append(row)
        for h in hist:
            for k, v in h.items():
                if _finite(v) and (k.startswith(("val_", "train_", "time_")) or k in ("epoch",)):
                    mrows.append({"trial_id": trial_id, "phase": phase, "epoch": int(h.get("epoch") or 0),
                                  "metric": k, "value": float(v)})
    return rows, mrows


COST_PARTS = ("startup_s", "train_s", "eval_s", "ckpt_s", "idle_s")


def accounting(last: dict, *, gpus: float, cpus: float, workers: int) -> dict:
    """A trial's wall seconds split into start-up, training steps, evaluation, checkpointing and
    idle (the rest: waiting on Tune between reports, data loading outside the timed loops), and its
    accelerator seconds. Wall is the trial's own clock (``time_wall_s``: trial start to its last
    report, checkpoint included), else Tune's ``time_total_s``. On CPU (gpus 0) the accelerator
    seconds are CPU-slot seconds (wall x cpus x workers) and ``accel_unit`` says so."""
    parts = {k: max(0.0, float(last.get("time_" + k[:-2] + "_s") or 0.0)) for k in COST_PARTS[:-1]}
    wall = float(last.get("time_wall_s") or last.get("time_total_s") or 0.0)
    wall = max(wall, sum(parts.values()))  # parts are sub-intervals of the trial's clock
    parts["idle_s"] = wall - sum(parts.values())
    slots, unit = (gpus, "gpu_s") if gpus else (cpus, "cpu_slot_s")
    return {"wall_s": wall, "accel_s": wall * slots * workers, "accel_unit": unit, **parts}


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def rank(rows: list[dict], mode: str) -> list[dict]:
    """Rank by best selection metric. Errored, failed and NaN trials come last and get no rank.
    Ties break on the final value, then fewer epochs (cheaper), then trial id: deterministic."""
    def key(r):
        ok = r["status"] in ("completed", "stopped") and _finite(r.get("best"))
        if not ok:
            return (1, 0.0, 0.0, 0, r["trial_id"])
        sign = 1 if mode == "min" else -1
        fin = r.get("final") if _finite(r.get("final")) else r["best"]
        return (0, sign * r["best"], sign * fin, r.get("epochs") or 0, r["trial_id"])

    out = sorted(rows, key=key)
    n = 0
    for r in out:
        if r["status"] in ("completed", "stopped") and _finite(r.get("best")):
            n += 1
            r["rank"] = n
        else:
            r["rank"] = None
    return out


def _first_line(err) -> str:
    s = str(err).strip()
    lines = [ln for ln in s.splitlines() if ln.strip()]
    # Ray wraps errors: the last line is usually the user's exception
    return (lines[-1] if lines else repr(err))[:300]
