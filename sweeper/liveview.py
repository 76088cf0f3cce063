"""Rendering of a sweep's progress snapshot: a rich table (terminal) or one quiet line (logs).

A snapshot is the dict ``ProgressCallback.snapshot()`` builds and writes to
``<sweep>/<phase>/progress.json``; ``sweeper monitor`` renders the same dict read back from disk,
so the live view and the monitor always show the same thing.
"""

from __future__ import annotations

import math


def _fmt_s(s) -> str:
    if s is None or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _fmt_v(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def line(snap: dict) -> str:
    return (f"[{snap['sweep']}/{snap['phase']} {snap.get('elapsed_s', 0):5.0f}s] running {snap['running']}  "
            f"finished {snap['finished']}  stopped by ASHA {snap['stopped']}  errored {snap['errored']}  "
            f"best {snap['metric']} {_fmt_v(snap.get('best'))}")


def table(snap: dict, *, max_rows: int = 12):
    """One rich renderable: the counts, best so far, elapsed and ETA, then the trials."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    total = snap.get("total") or 0
    ended = snap["finished"] + snap["stopped"] + snap["errored"]
    head = Table(box=box.ROUNDED, title=f"sweeper  {snap['sweep']} / {snap['phase']}"
                 + ("" if snap.get("status", "running") == "running" else f"  ({snap['status']})"),
                 title_justify="left", expand=False)
    for col, style in (("running", "cyan"), ("finished", "green"), ("ASHA-stopped", "yellow"),
                       ("errored", "red"), (f"best {snap['metric']}", "bold magenta"),
                       ("elapsed", ""), ("ETA", "")):
        head.add_column(col, style=style or None, justify="right", no_wrap=True)
    head.add_row(str(snap["running"]), f"{snap['finished']}", str(snap["stopped"]), str(snap["errored"]),
                 _fmt_v(snap.get("best")), _fmt_s(snap.get("elapsed_s")),
                 _fmt_s(snap.get("eta_s")) if ended < total else "done")
    cap = [f"{ended}/{total} trials ended"] if total else []
    if snap.get("best_trial"):
        cap.append(f"best: trial {snap['best_trial']} ({snap.get('mode', '')})")
    head.caption = "  ·  ".join(cap) or None
    trials = Table(box=box.SIMPLE_HEAD, expand=False)
    for col, width in (("trial", 8), ("status", 10), ("epoch", 5), (f"last {snap['metric']}", 8), ("best", 7),
                       ("node", 8), ("config", None)):
        trials.add_column(col, justify="right" if col in ("epoch", "best") or col.startswith("last") else "left",
                          overflow="ellipsis", no_wrap=True, min_width=width, max_width=56 if width is None else None)
    colour = {"RUNNING": "cyan", "TERMINATED": "green", "STOPPED": "yellow", "ERROR": "red", "PENDING": "dim"}
    rows = sorted(snap.get("trials", []), key=lambda t: (t["status"] != "RUNNING", t["trial_id"]))
    for t in rows[:max_rows]:
        st = t["status"]
        trials.add_row(t["trial_id"], f"[{colour.get(st, '')}]{st.lower()}[/]" if colour.get(st) else st.lower(),
                       str(t.get("epoch") or 0), _fmt_v(t.get("last")), _fmt_v(t.get("best")),
                       (t.get("node_id") or "")[:8], t.get("config", ""))
    if len(rows) > max_rows:
        trials.caption = f"... {len(rows) - max_rows} more"
    return Group(head, trials)
