"""``sweeper cost``: where a sweep's seconds went, per trial, per ASHA rung, per phase, per sweep.

Every trial row in ``<phase>/trials.parquet`` carries its wall and accelerator seconds split into
start-up, training steps, evaluation, checkpointing and idle (``results.accounting``). This module
only adds them up; the same numbers feed the leaderboard's totals line and ``--json``.

Accelerator seconds are GPU-fraction x wall; on CPU trials they are CPU-slot seconds
(``cpus x wall``), marked by the ``unit`` (``gpu_s`` / ``cpu_slot_s``).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import results
from .artifacts import PHASE_DIRS as PHASES

SUM_COLS = ("wall_s", "accel_s", "startup_s", "train_s", "eval_s", "ckpt_s", "idle_s")


def totals(rows: list[dict]) -> dict:
    out = {"trials": len(rows), **{c: 0.0 for c in SUM_COLS}, "epochs": 0}
    for r in rows:
        for c in SUM_COLS:
            out[c] += float(r.get(c) or 0.0)
        out["epochs"] += int(r.get("epochs") or 0)
    units = sorted({r.get("accel_unit") for r in rows if r.get("accel_unit")})
    out["unit"] = "+".join(units) if units else None
    return out


def reached(r: dict) -> str:
    """Where a trial ended: ``stopped@3`` (by ASHA at the rung of epoch 3), ``completed@9``, ``failed``."""
    st = r.get("status")
    if st in ("stopped", "completed"):
        return f"{st}@{r.get('epochs')}"
    return st or "unknown"


def rung_segments(metric_rows: list[dict], trial_rows: list[dict], decisions: list[dict]) -> list[dict]:
    """Seconds spent between consecutive ASHA rungs (``(0, 1]``, ``(1, 3]``, ``(3, 9]``), summed over
    trials, from each trial's cumulative ``time_wall_s`` per epoch. Start-up lands in the first."""
    rungs = sorted({d["rung"] for d in decisions if d.get("rung") is not None})
    max_ep = max((int(r.get("epochs") or 0) for r in trial_rows), default=0)
    if not rungs or not max_ep:
        return []
    bounds = [0] + [x for x in rungs if x < max_ep] + [max_ep]
    wall: dict[str, dict[int, float]] = {}
    for m in metric_rows:
        if m["metric"] == "time_wall_s":
            wall.setdefault(m["trial_id"], {})[int(m["epoch"])] = float(m["value"])
    if not wall:
        return []
    unit_of = {r["trial_id"]: r for r in trial_rows}
    out = []
    for a, b in zip(bounds, bounds[1:]):
        secs = slot_secs = 0.0
        n = 0
        for tid, w in wall.items():
            at_b = [s for e, s in w.items() if e <= b]
            if not at_b or max(w) <= a:
                continue
            at_a = max((s for e, s in w.items() if e <= a), default=0.0)
            d = max(at_b) - at_a
            secs += d
            r = unit_of.get(tid, {})
            wl = float(r.get("wall_s") or 0.0)
            slot_secs += d * (float(r.get("accel_s") or 0.0) / wl if wl else 0.0)
            n += 1
        out.append({"epochs": f"({_num(a)}, {_num(b)}]", "trials": n, "wall_s": secs, "accel_s": slot_secs})
    return out


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def report(sweep_dir: Path) -> dict:
    sweep_dir = Path(sweep_dir)
    phases, all_rows = {}, []
    for ph in PHASES:
        f = sweep_dir / ph / results.TRIALS
        if not f.exists():
            continue
        rows = results.read_rows(f)
        all_rows += rows
        by: dict[str, list[dict]] = {}
        for r in rows:
            by.setdefault(reached(r), []).append(r)
        asha_stopped = [r for r in rows if r.get("status") == "stopped"]
        mf = sweep_dir / ph / results.METRICS
        segs = rung_segments(results.read_rows(mf) if mf.exists() else [], rows, results.read_decisions(sweep_dir / ph))
        phases[ph] = {
            "total": totals(rows),
            "by_end": {k: totals(v) for k, v in sorted(by.items(), key=lambda kv: _end_key(kv[0]))},
            "stopped_by_asha": totals(asha_stopped),
            "rung_segments": segs,
        }
    meta = {}
    mp = sweep_dir / "run_metadata.json"
    if mp.exists():
        try:
            meta = json.loads(mp.read_text())
        except json.JSONDecodeError:
            meta = {}
    runs = meta.get("runs") or [{}]
    wall = sum(r.get("wall_s") or 0.0 for r in runs if isinstance(r.get("wall_s"), (int, float)))
    return {"sweep": sweep_dir.name, "phases": phases, "total": totals(all_rows),
            "sweep_wall_s": wall or None}


def _end_key(k: str):
    st, _, ep = k.partition("@")
    return ({"stopped": 0, "completed": 1}.get(st, 2), int(ep) if ep.isdigit() else 0, k)


def parts_line(t: dict) -> str:
    w = t["wall_s"] or 1.0
    parts = "  ".join(f"{c[:-2]} {t[c]:.1f}s ({100 * t[c] / w:.0f}%)" for c in ("startup_s", "train_s", "eval_s", "ckpt_s", "idle_s"))
    unit = {"cpu_slot_s": "CPU-slot s", "gpu_s": "GPU s"}.get(t.get("unit"), t.get("unit") or "accel s")
    return f"wall {t['wall_s']:.1f}s  accel {t['accel_s']:.1f} {unit}  |  {parts}"


def totals_line(rows: list[dict]) -> str:
    """The leaderboard's one-line summary, ASHA's savings included."""
    t = totals(rows)
    st = totals([r for r in rows if r.get("status") == "stopped"])
    share = f" ({100 * st['accel_s'] / t['accel_s']:.0f}% of accel)" if t["accel_s"] else ""
    return (f"totals: {t['trials']} trials, {t['epochs']} epochs, {parts_line(t)}; "
            f"stopped by ASHA: {st['trials']} trials, {st['accel_s']:.1f}{share}")


def render(rep: dict) -> str:
    lines = [f"{rep['sweep']}: cost" + (f" (sweep wall clock {rep['sweep_wall_s']:.1f}s)" if rep.get("sweep_wall_s") else "")]
    for ph, p in rep["phases"].items():
        lines.append(f"\n[{ph}] {p['total']['trials']} trials, {p['total']['epochs']} epochs")
        lines.append(f"  total                {parts_line(p['total'])}")
        for k, t in p["by_end"].items():
            lines.append(f"  {k:<14} {t['trials']:>4} {parts_line(t)}")
        if p["stopped_by_asha"]["trials"]:
            lines.append(f"  stopped by ASHA {p['stopped_by_asha']['trials']:>3} {parts_line(p['stopped_by_asha'])}")
        for s in p["rung_segments"]:
            lines.append(f"  epochs {s['epochs']:<10} {s['trials']:>4} trials  wall {s['wall_s']:.1f}s  accel {s['accel_s']:.1f}")
    lines.append(f"\n[all phases] {rep['total']['trials']} trials  {parts_line(rep['total'])}")
    return "\n".join(lines)


def explain(sweep_dir: Path, trial: str) -> dict:
    """One trial: its status, why it stopped, every ASHA decision, and its cost split."""
    sweep_dir = Path(sweep_dir)
    for ph in PHASES:
        f = sweep_dir / ph / results.TRIALS
        if not f.exists():
            continue
        for r in results.read_rows(f):
            if r["trial_id"] == trial or r["trial_id"].endswith(trial):
                dec = json.loads(r.get("asha_decisions") or "[]")
                return {"phase": ph, **{k: r.get(k) for k in ("trial_id", "status", "rank", "epochs", "best", "final",
                                                              "metric", "stop_reason", "config", *SUM_COLS, "accel_unit")},
                        "decisions": dec}
    from .errors import UserError

    raise UserError(f"{sweep_dir}: no trial {trial!r}")


def render_explain(e: dict) -> str:
    lines = [f"{e['trial_id']} ({e['phase']}): {e['status']}, rank {e.get('rank') or '-'}, {e['epochs']} epochs, "
             f"best {e['metric']} {e.get('best')}", f"  config {e['config']}"]
    if e.get("stop_reason"):
        lines.append(f"  why: {e['stop_reason']}")
    for d in e["decisions"]:
        lines.append(f"  rung {d.get('rung')}: {d['action']}  value {d['value']:.4g}  cutoff "
                     f"{'-' if d.get('cutoff') is None else format(d['cutoff'], '.4g')}  ({d.get('rung_size')} at the rung)")
    lines.append("  " + parts_line({**e, "unit": e.get("accel_unit")}))
    return "\n".join(lines)
