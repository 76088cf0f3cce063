"""``sweeper leaderboard``: trials ranked on the selection metric; errored and NaN trials shown, never first."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import results
from .errors import UserError


def resolve_sweep_dir(arg: str | None, root: str = "results") -> Path:
    p = Path(arg) if arg else Path(root) / "latest"
    if not p.exists():
        raise UserError(f"{p}: no such sweep directory" + ("" if arg else " (run a sweep first, or pass SWEEP_DIR)"))
    if not (p / "sweep" / results.TRIALS).exists():
        raise UserError(f"{p}: not a sweep directory (no sweep/{results.TRIALS})")
    return p


def load(sweep_dir: Path, phase: str = "sweep") -> tuple[list[dict], dict]:
    try:
        rows = results.read_rows(sweep_dir / phase / results.TRIALS)
    except Exception as e:  # noqa: BLE001 - a corrupt table is a user-facing condition
        raise UserError(f"{sweep_dir / phase / results.TRIALS}: unreadable ({type(e).__name__}: {e})") from None
    extra = {}
    prom = sweep_dir / "promotion.json"
    if prom.exists():
        extra = json.loads(prom.read_text())
    return rows, extra


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _params(row: dict) -> str:
    try:
        cfg = json.loads(row.get("config") or "{}")
    except json.JSONDecodeError:
        return ""
    return " ".join(f"{k}={_fmt(v)}" for k, v in sorted(cfg.items()))


def table_rows(rows: list[dict], limit: int | None) -> list[dict]:
    rows = sorted(rows, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["trial_id"]))
    return rows[:limit] if limit else rows


def render(sweep_dir: Path, rows: list[dict], extra: dict, limit: int | None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    import shutil

    console = console or Console(width=max(140, shutil.get_terminal_size((140, 40)).columns))
    metric = rows[0]["metric"] if rows else "metric"
    t = Table(title=f"{sweep_dir.name}: {len(rows)} trials ranked on {metric}", show_lines=False)
    for col in ("rank", "trial", "status", f"best {metric}", f"final {metric}", "epochs", "wall s", "params", "why stopped"):
        t.add_column(col, overflow="fold")
    for r in table_rows(rows, limit):
        t.add_row(_fmt(r.get("rank")), r["trial_id"], r["status"], _fmt(r.get("best")), _fmt(r.get("final")),
                  _fmt(r.get("epochs")), f"{r.get('wall_s') or 0:.1f}", _params(r), r.get("stop_reason") or "")
    console.print(t)
    if rows and "idle_s" in rows[0]:
        from .cost import totals_line

        console.print(totals_line(rows))
    fan = extra.get("fanout")
    if fan:
        ft = Table(title=f"seed fan-out ({extra.get('metric', metric)}): final choice on the seed mean")
        for col in ("phase-1 rank", "candidate", "seed mean ± std", "seeds"):
            ft.add_column(col)
        for c in fan.get("candidates", []):
            seeds = " ".join(f"{s}:{_fmt(v)}" for s, v in sorted(c.get("per_seed", {}).items()))
            mark = " ← chosen" if c.get("chosen") else ""
            ft.add_row(_fmt(c.get("phase1_rank")), c["trial_id"] + mark,
                       f"{_fmt(c.get('mean'))} ± {_fmt(c.get('std'))}", seeds)
        console.print(ft)
    if extra.get("export"):
        console.print(f"export: {extra['export'].get('path')}")


def all_sweeps(root: Path) -> list[dict]:
    """The best trial of every sweep under a root."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        f = d / "sweep" / results.TRIALS
        if not f.exists():
            continue
        try:
            rows = results.read_rows(f)
        except Exception:  # noqa: BLE001 - one bad sweep must not hide the others
            out.append({"sweep": d.name, "status": "unreadable"})
            continue
        ranked = [r for r in rows if r.get("rank")]
        best = min(ranked, key=lambda r: r["rank"]) if ranked else None
        out.append({"sweep": d.name, "trials": len(rows), "metric": rows[0]["metric"] if rows else None,
                    "best": best["best"] if best else None, "best_trial": best["trial_id"] if best else None,
                    "status": "ok" if best else "no result"})
    return out
