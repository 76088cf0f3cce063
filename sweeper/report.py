"""``sweeper report SWEEP_DIR [--out FILE]``: one self-contained HTML page about a sweep.

Everything is drawn here as inline SVG (no JavaScript, no CDN: the page opens offline and can be
mailed as one file):

* learning curves of the selection metric, coloured by ASHA's decision (ran to the end /
  stopped at a rung / failed), with each rung's cutoffs marked;
* parallel coordinates of the search space (one axis per parameter, last axis the metric);
* parameter importance: Optuna's fANOVA on a study rebuilt from the trials, else Optuna's
  PED-ANOVA, else |Spearman rank correlation| with the metric (the page says which one ran);
* the seeded fan-out (``promotion.json``): every seed's result per candidate with mean ± std;
* per-dimension MAE (Qwen regression: ``val_mae_<dim>``) of the top trials, or a reliability
  diagram (DINOv2 classifier: computed from the best checkpoint on the selection split);
* the cost breakdown: wall seconds per trial split into start-up/train/eval/checkpoint/idle,
  and wall/accelerator seconds per status.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from pathlib import Path

from . import results
from .errors import UserError

W, H = 900, 360
ML, MR, MT, MB = 70, 20, 20, 50
STATUS_COLOUR = {"completed": "#2e7d32", "stopped": "#ef6c00", "failed": "#c62828", "error": "#6a1b9a",
                 "pending": "#9e9e9e", "running": "#1565c0"}
PART_COLOUR = {"startup_s": "#90a4ae", "train_s": "#1e88e5", "eval_s": "#43a047", "ckpt_s": "#fb8c00", "idle_s": "#e0e0e0"}
PALETTE = ["#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b", "#6d4c41", "#3949ab"]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v, nd=4) -> str:
    return f"{v:.{nd}g}" if _finite(v) else "-"


# ----------------------------------------------------------------------------------- SVG helpers
class Axis:
    def __init__(self, lo, hi, a, b, log=False):
        if log and lo > 0 and hi > 0:
            lo, hi = math.log10(lo), math.log10(hi)
        else:
            log = False
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = (hi - lo) * 0.05
        self.lo, self.hi, self.a, self.b, self.log = lo - pad, hi + pad, a, b, log

    def __call__(self, v):
        if self.log:
            v = math.log10(max(v, 1e-300))
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def digits(self) -> int:
        """Significant digits that tell neighbouring ticks apart."""
        if self.log:
            return 3
        span = abs(self.hi - self.lo) / 5 or 1.0
        mag = max(abs(self.lo), abs(self.hi)) or 1.0
        return max(3, min(8, int(math.ceil(math.log10(mag / span))) + 2))

    def ticks(self, n=5):
        out = []
        for i in range(n + 1):
            x = self.lo + (self.hi - self.lo) * i / n
            out.append(10 ** x if self.log else x)
        return out


def _svg(body: str, w=W, h=H, title="") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img" aria-label="{_e(title)}" font-family="sans-serif" font-size="11">'
            f'<rect width="{w}" height="{h}" fill="white"/>{body}</svg>')


def _axes(x: Axis, y: Axis, xlabel: str, ylabel: str, w=W, h=H, xticks=None) -> str:
    out = [f'<line x1="{ML}" y1="{h - MB}" x2="{w - MR}" y2="{h - MB}" stroke="#333"/>',
           f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{h - MB}" stroke="#333"/>']
    for t in (xticks if xticks is not None else x.ticks()):
        px = x(t)
        out.append(f'<line x1="{px:.1f}" y1="{h - MB}" x2="{px:.1f}" y2="{h - MB + 4}" stroke="#333"/>'
                   f'<text x="{px:.1f}" y="{h - MB + 16}" text-anchor="middle">{_fmt(t, x.digits())}</text>')
    for t in y.ticks():
        py = y(t)
        out.append(f'<line x1="{ML - 4}" y1="{py:.1f}" x2="{w - MR}" y2="{py:.1f}" stroke="#eee"/>'
                   f'<text x="{ML - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt(t, y.digits())}</text>')
    out.append(f'<text x="{(ML + w - MR) / 2}" y="{h - 12}" text-anchor="middle" font-size="12">{_e(xlabel)}</text>'
               f'<text transform="translate(16,{(MT + h - MB) / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{_e(ylabel)}</text>')
    return "".join(out)


def _legend(items: list[tuple[str, str]], x=ML + 10, y=MT + 6, dash: dict | None = None) -> str:
    out = []
    for i, (label, colour) in enumerate(items):
        yy = y + i * 15
        d = f' stroke-dasharray="{dash[label]}"' if dash and label in dash else ""
        out.append(f'<line x1="{x}" y1="{yy}" x2="{x + 18}" y2="{yy}" stroke="{colour}" stroke-width="2.5"{d}/>'
                   f'<text x="{x + 24}" y="{yy + 4}">{_e(label)}</text>')
    return f'<g class="legend"><rect x="{x - 6}" y="{y - 10}" width="230" height="{15 * len(items) + 6}" ' \
           f'fill="white" fill-opacity="0.85" stroke="#ccc"/>{"".join(out)}</g>'


def _colour_scale(t: float) -> str:
    """0 (best) .. 1 (worst): blue -> yellow -> red."""
    t = min(1.0, max(0.0, t))
    stops = [(0.0, (33, 102, 172)), (0.5, (240, 200, 60)), (1.0, (200, 40, 40))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return "#%02x%02x%02x" % tuple(int(a + (b - a) * f) for a, b in zip(c0, c1))
    return "#c82828"


# ----------------------------------------------------------------------------------- data
def load(sweep_dir: Path) -> dict:
    sweep_dir = Path(sweep_dir)
    phase = sweep_dir / "sweep"
    if not (phase / results.TRIALS).exists():
        raise UserError(f"{sweep_dir}: not a finished sweep directory (no sweep/{results.TRIALS})")
    import yaml

    man = {}
    if (sweep_dir / "manifest.resolved.yaml").exists():
        man = yaml.safe_load((sweep_dir / "manifest.resolved.yaml").read_text()) or {}
    rows = results.read_rows(phase / results.TRIALS)
    mrows = results.read_rows(phase / results.METRICS) if (phase / results.METRICS).exists() else []
    prom = {}
    if (sweep_dir / "promotion.json").exists():
        try:
            prom = json.loads((sweep_dir / "promotion.json").read_text())
        except json.JSONDecodeError:
            prom = {}
    state = {}
    if (sweep_dir / "state.json").exists():
        state = json.loads((sweep_dir / "state.json").read_text())
    sel = man.get("selection") or {}
    metric = sel.get("metric") or (rows[0]["metric"] if rows else "metric")
    return {"dir": sweep_dir, "manifest": man, "rows": rows, "metrics": mrows, "decisions": results.read_decisions(phase),
            "promotion": prom, "state": state, "metric": metric, "mode": sel.get("mode", "min")}


def _curves(data: dict, metric: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in data["metrics"]:
        if r["metric"] == metric and _finite(r["value"]):
            out.setdefault(r["trial_id"], []).append((int(r["epoch"]), float(r["value"])))
    return {k: sorted(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------- sections
def learning_curves(data: dict) -> str:
    metric = data["metric"]
    curves = _curves(data, metric)
    if not curves:
        return "<p>No learning curves recorded.</p>"
    status = {r["trial_id"]: r["status"] for r in data["rows"]}
    xs = [e for c in curves.values() for e, _ in c]
    ys = [v for c in curves.values() for _, v in c]
    cut = [d for d in data["decisions"] if d.get("rung") is not None and _finite(d.get("cutoff"))]
    ys += [d["cutoff"] for d in cut]
    lo, hi = min(ys), max(ys)
    log = lo > 0 and hi / lo > 30
    x = Axis(min(xs + [0]), max(xs), ML, W - MR)
    y = Axis(lo, hi, H - MB, MT, log=log)
    body = [_axes(x, y, "epoch", metric + (" (log scale)" if log else ""), xticks=sorted(set(xs)))]
    # rungs: a vertical line at each rung, and each decision's cutoff as a short tick
    for rung in sorted({d["rung"] for d in cut}):
        px = x(rung)
        body.append(f'<line class="rung" x1="{px:.1f}" y1="{MT}" x2="{px:.1f}" y2="{H - MB}" stroke="#555" '
                    f'stroke-dasharray="4 3"/><text x="{px + 3:.1f}" y="{MT + 10}" fill="#555">rung {_fmt(rung)}</text>')
    for d in cut:
        px, py = x(d["rung"]), y(d["cutoff"])
        body.append(f'<line class="cutoff" x1="{px - 9:.1f}" y1="{py:.1f}" x2="{px + 9:.1f}" y2="{py:.1f}" '
                    f'stroke="black" stroke-width="2"><title>cutoff {_fmt(d["cutoff"])} '
                    f'({d.get("rung_size")} trials at rung {d["rung"]})</title></line>')
    order = sorted(curves, key=lambda t: {"completed": 2, "stopped": 1}.get(status.get(t), 0))
    for t in order:
        pts = curves[t]
        col = STATUS_COLOUR.get(status.get(t), "#999")
        path = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in pts)
        body.append(f'<polyline class="curve" points="{path}" fill="none" stroke="{col}" stroke-width="1.6" '
                    f'stroke-opacity="0.85"><title>{_e(t)} ({_e(status.get(t))})</title></polyline>')
        body.extend(f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="2.5" fill="{col}"/>' for e, v in pts)
        ex, ev = pts[-1]
        if status.get(t) == "stopped":
            body.append(f'<text x="{x(ex):.1f}" y="{y(ev) + 4:.1f}" text-anchor="middle" fill="{col}" '
                        f'font-size="13" font-weight="bold">×</text>')
    present = [s for s in ("completed", "stopped", "failed", "error") if s in status.values()]
    labels = {"completed": "ran to max_t (ASHA: continue)", "stopped": "stopped by ASHA at a rung",
              "failed": "failed (NaN / never finite)", "error": "errored"}
    items = [(labels[s], STATUS_COLOUR[s]) for s in present] + [("rung cutoff", "black")]
    body.append(_legend(items, x=W - MR - 250, y=MT + 22))
    return _svg("".join(body), title="learning curves")


def _space_axes(data: dict) -> list[dict]:
    space = ((data["manifest"].get("search") or {}).get("space") or {})
    rows = data["rows"]
    axes = []
    for name, spec in space.items():
        if not isinstance(spec, dict) or "type" not in spec:
            continue  # a fixed value: not a dimension
        vals = []
        for r in rows:
            v = json.loads(r["config"]).get(name)
            vals.append(v)
        if spec["type"] == "choice":
            cats = [json.dumps(c) for c in spec.get("values", [])]
            axes.append({"name": name, "kind": "cat", "cats": cats, "vals": [json.dumps(v) for v in vals]})
        else:
            nums = [float(v) for v in vals if _finite(v)]
            lo = float(spec.get("low", min(nums) if nums else 0))
            hi = float(spec.get("high", max(nums) if nums else 1))
            axes.append({"name": name, "kind": "num", "lo": lo, "hi": hi, "log": spec["type"] == "loguniform"
                         or bool(spec.get("log")), "vals": vals})
    return axes


def parallel_coordinates(data: dict) -> str:
    axes = _space_axes(data)
    rows = data["rows"]
    if not axes:
        return "<p>The space has no free parameters.</p>"
    bests = [r["best"] for r in rows if _finite(r.get("best")) and r["status"] in ("completed", "stopped")]
    mlo, mhi = (min(bests), max(bests)) if bests else (0.0, 1.0)
    axes = axes + [{"name": data["metric"] + " (best)", "kind": "num", "lo": mlo, "hi": mhi, "log": False,
                    "vals": [r.get("best") if r["status"] in ("completed", "stopped") else None for r in rows]}]
    n = len(axes)
    top, bot = MT + 20, H - MB
    xs = [ML + i * (W - ML - MR - 40) / max(1, n - 1) for i in range(n)]
    body = []
    scales = []
    for ax, px in zip(axes, xs):
        if ax["kind"] == "cat":
            k = len(ax["cats"])
            scales.append(lambda v, k=k, cats=ax["cats"]: bot - (cats.index(v) + 0.5) / k * (bot - top)
                          if v in cats else None)
            ticks = [(c, bot - (i + 0.5) / k * (bot - top)) for i, c in enumerate(ax["cats"])]
        else:
            a = Axis(ax["lo"], ax["hi"], bot, top, log=ax["log"] and ax["lo"] > 0)
            scales.append(lambda v, a=a: a(float(v)) if _finite(v) else None)
            ticks = [(_fmt(t, a.digits()), a(t)) for t in a.ticks(4)]
        body.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bot}" stroke="#333" stroke-width="1.5"/>'
                    f'<text x="{px:.1f}" y="{top - 8}" text-anchor="middle" font-size="12" font-weight="bold">'
                    f'{_e(ax["name"])}{" (log)" if ax.get("log") else ""}</text>')
        for label, py in ticks:
            body.append(f'<text x="{px + 4:.1f}" y="{py + 3:.1f}" font-size="10" fill="#555">{_e(label)}</text>')
    lines = []
    for i, r in enumerate(rows):
        pts = []
        for ax, px, sc in zip(axes, xs, scales):
            py = sc(ax["vals"][i])
            if py is None:
                py = bot + 14  # off-scale: failed trials end below the metric axis
            pts.append(f"{px:.1f},{py:.1f}")
        ok = _finite(r.get("best")) and r["status"] in ("completed", "stopped")
        if ok:
            t = (r["best"] - mlo) / (mhi - mlo) if mhi > mlo else 0.0
            if data["mode"] == "max":
                t = 1 - t
            col, width, dash = _colour_scale(t), 2.0, ""
        else:
            col, width, dash = "#9e9e9e", 1.2, ' stroke-dasharray="3 3"'
        lines.append((0 if not ok else 1, f'<polyline class="pc-line" points="{" ".join(pts)}" fill="none" stroke="{col}" '
                      f'stroke-width="{width}" stroke-opacity="0.8"{dash}><title>{_e(r["trial_id"])} {_e(r["status"])} '
                      f'{_fmt(r.get("best"))}</title></polyline>'))
    body = [ln for _, ln in sorted(lines, key=lambda t: t[0])] + body
    body.append(_legend([("best (low " + data["metric"] + ")" if data["mode"] == "min" else "best", _colour_scale(0)),
                         ("worst", _colour_scale(1)), ("failed / errored", "#9e9e9e")], x=W - MR - 235, y=H - MB + 8))
    return _svg("".join(body), h=H + 40, title="parallel coordinates")


def importance(data: dict) -> tuple[dict[str, float], str]:
    """(importance per parameter, method used)."""
    space = ((data["manifest"].get("search") or {}).get("space") or {})
    free = {k: v for k, v in space.items() if isinstance(v, dict) and "type" in v}
    ok_rows = [r for r in data["rows"] if r["status"] in ("completed", "stopped") and _finite(r.get("best"))]
    if not free or len(ok_rows) < 2:
        return {}, "not enough finished trials"
    errors = []
    try:
        import optuna.importance as oi

        from .manifest import SearchSpec
        from .studydb import build_study

        spec = SearchSpec.model_validate(data["manifest"]["search"])
        study = build_study(data["dir"] / "sweep", spec.space, data["metric"], data["mode"], "report")
        completed = [t for t in study.trials if t.state.name == "COMPLETE"]
        # fANOVA needs finished trials with values; ASHA-stopped ones are PRUNED, so score on best instead
        if len(completed) < 2:
            raise ValueError(f"{len(completed)} completed trials in the rebuilt study")
        for name, ev in (("Optuna fANOVA (FanovaImportanceEvaluator)", lambda: oi.FanovaImportanceEvaluator(seed=0)),
                         ("Optuna PED-ANOVA (PedAnovaImportanceEvaluator)", lambda: oi.PedAnovaImportanceEvaluator())):
            try:
                imp = oi.get_param_importances(study, evaluator=ev())
                if imp and all(_finite(v) for v in imp.values()):
                    return dict(imp), name
                errors.append(f"{name}: empty")
            except Exception as e:  # noqa: BLE001
                errors.append(f"{name.split(' (')[0]}: {type(e).__name__}: {str(e)[:80]}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"study: {type(e).__name__}: {str(e)[:80]}")
    # |Spearman rank correlation| between each parameter and the best metric, over finished trials
    ys = [r["best"] for r in ok_rows]
    out = {}
    for name, spec in free.items():
        xs = []
        for r in ok_rows:
            v = json.loads(r["config"]).get(name)
            if spec["type"] == "choice":
                vals = [json.dumps(c) for c in spec.get("values", [])]
                v = vals.index(json.dumps(v)) if json.dumps(v) in vals else None
            xs.append(float(v) if _finite(v) else None)
        pairs = [(a, b) for a, b in zip(xs, ys) if a is not None]
        out[name] = abs(_spearman([a for a, _ in pairs], [b for _, b in pairs])) if len(pairs) > 2 else 0.0
    tot = sum(out.values())
    if tot > 0:
        out = {k: v / tot for k, v in out.items()}
    why = "; ".join(errors)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])), \
        "|Spearman rank correlation| with the best metric, normalised to sum 1" + (f" (fallback: {why})" if why else "")


def _rankdata(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _rankdata(a), _rankdata(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else 0.0


def _hbars(items: list[tuple[str, float]], xlabel: str, colour="#1e88e5", fmt=lambda v: f"{v:.3f}") -> str:
    if not items:
        return "<p>Nothing to show.</p>"
    h = MT + MB + 26 * len(items)
    vmax = max(v for _, v in items) or 1.0
    x = Axis(0, vmax, 160, W - MR - 60)
    x.lo = 0
    body = []
    for i, (label, v) in enumerate(items):
        y0 = MT + 26 * i
        body.append(f'<text x="154" y="{y0 + 15}" text-anchor="end" font-size="12">{_e(label)}</text>'
                    f'<rect class="bar" x="160" y="{y0 + 3}" width="{max(0.5, x(v) - 160):.1f}" height="18" fill="{colour}"/>'
                    f'<text x="{x(v) + 4:.1f}" y="{y0 + 16}">{_e(fmt(v))}</text>')
    body.append(f'<text x="{(160 + W - MR) / 2}" y="{h - 14}" text-anchor="middle" font-size="12">{_e(xlabel)}</text>')
    return _svg("".join(body), h=h, title=xlabel)


def fanout(data: dict) -> str:
    fo = (data["promotion"] or {}).get("fanout")
    if not fo or not fo.get("candidates"):
        return "<p>No seeded fan-out in this sweep (no <code>promotion.fanout</code>, or it has not run).</p>"
    cands = fo["candidates"]
    vals = [v for c in cands for v in c["per_seed"].values() if _finite(v)]
    if not vals:
        return "<p>The fan-out produced no finite results.</p>"
    lo, hi = min(vals), max(vals)
    for c in cands:
        if _finite(c.get("mean")) and _finite(c.get("std")):
            lo, hi = min(lo, c["mean"] - c["std"]), max(hi, c["mean"] + c["std"])
    n = len(cands)
    y = Axis(lo, hi, H - MB, MT)
    band = (W - ML - MR) / n
    body = [_axes(Axis(0, 1, ML, W - MR), y, "candidate (phase-1 rank)", f"{fo.get('metric', data['metric'])} per seed",
                  xticks=[])]
    seeds = sorted({s for c in cands for s in c["per_seed"]}, key=lambda s: int(s) if s.isdigit() else s)
    for i, c in enumerate(cands):
        cx = ML + band * (i + 0.5)
        label = f"{c['trial_id']} (#{c.get('phase1_rank')})" + (" ★ chosen" if c.get("chosen") else "")
        body.append(f'<text x="{cx:.1f}" y="{H - MB + 16}" text-anchor="middle" font-weight="{"bold" if c.get("chosen") else "normal"}">'
                    f'{_e(label)}</text>')
        if _finite(c.get("mean")):
            m, s = c["mean"], c.get("std") or 0.0
            body.append(f'<line class="spread" x1="{cx:.1f}" y1="{y(m - s):.1f}" x2="{cx:.1f}" y2="{y(m + s):.1f}" '
                        f'stroke="#333" stroke-width="2"/>'
                        f'<line x1="{cx - 10:.1f}" y1="{y(m - s):.1f}" x2="{cx + 10:.1f}" y2="{y(m - s):.1f}" stroke="#333"/>'
                        f'<line x1="{cx - 10:.1f}" y1="{y(m + s):.1f}" x2="{cx + 10:.1f}" y2="{y(m + s):.1f}" stroke="#333"/>'
                        f'<rect x="{cx - 16:.1f}" y="{y(m) - 1.5:.1f}" width="32" height="3" fill="#333"/>'
                        f'<text x="{cx + 20:.1f}" y="{y(m) + 4:.1f}">mean {_fmt(m)} ± {_fmt(s, 2)}</text>')
        for j, s in enumerate(seeds):
            v = c["per_seed"].get(s)
            if _finite(v):
                px = cx - 8 + 16 * (j / max(1, len(seeds) - 1))
                body.append(f'<circle class="seed" cx="{px:.1f}" cy="{y(v):.1f}" r="5" fill="{PALETTE[j % len(PALETTE)]}">'
                            f'<title>seed {s}: {_fmt(v)}</title></circle>')
    body.append(_legend([(f"seed {s}", PALETTE[j % len(PALETTE)]) for j, s in enumerate(seeds)] +
                        [("mean ± std", "#333")], x=W - MR - 240))
    return _svg("".join(body), title="seed fan-out")


def per_dimension(data: dict) -> tuple[str, str]:
    """(section title, html): per-dimension MAE (regression) or a reliability diagram (classifier)."""
    rows = [r for r in data["rows"] if r.get("rank")]
    rows.sort(key=lambda r: r["rank"])
    dims = sorted({k[len("final.val_mae_"):] for r in rows for k in r if k.startswith("final.val_mae_")
                   and _finite(r.get(k))})
    if dims:
        top = rows[:5]
        vals = [r.get(f"final.val_mae_{d}") for r in top for d in dims]
        vmax = max(v for v in vals if _finite(v))
        y = Axis(0, vmax, H - MB, MT)
        y.lo = 0
        group = (W - ML - MR) / len(dims)
        bw = min(28, group / (len(top) + 1))
        body = [_axes(Axis(0, 1, ML, W - MR), y, "dimension", "validation MAE (last epoch)", xticks=[])]
        for i, d in enumerate(dims):
            gx = ML + group * i + (group - bw * len(top)) / 2
            body.append(f'<text x="{ML + group * (i + 0.5):.1f}" y="{H - MB + 16}" text-anchor="middle">{_e(d)}</text>')
            for j, r in enumerate(top):
                v = r.get(f"final.val_mae_{d}")
                if _finite(v):
                    body.append(f'<rect class="bar" x="{gx + j * bw:.1f}" y="{y(v):.1f}" width="{bw - 2:.1f}" '
                                f'height="{(H - MB) - y(v):.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                                f'<title>{_e(r["trial_id"])} {d}: {_fmt(v)}</title></rect>')
        body.append(_legend([(f"#{r['rank']} {r['trial_id']}", PALETTE[j % len(PALETTE)]) for j, r in enumerate(top)],
                            x=W - MR - 240))
        return "Per-dimension MAE (top trials)", _svg("".join(body), title="per-dimension MAE")
    trainable = data["manifest"].get("trainable", "")
    if "dinov2" in trainable or "classifier" in trainable:
        try:
            bins = reliability_bins(data)
            return "Reliability diagram (best checkpoint, selection split)", _reliability_svg(bins)
        except Exception as e:  # noqa: BLE001
            return "Reliability diagram", f"<p>Not available: {_e(type(e).__name__)}: {_e(str(e)[:200])}</p>"
    return "Per-dimension metrics", "<p>This trainable reports no per-dimension metrics.</p>"


def reliability_bins(data: dict, bins: int = 10) -> list[dict]:
    """Confidence vs accuracy per equal-width bin, evaluating the best checkpoint on val_select."""
    import torch

    from trainables import registry
    from trainables.base import cached_splits, seed_everything

    from . import checkpoint as ckpt_mod
    from .trial import _hparams

    man = data["manifest"]
    best = data["dir"] / "checkpoints" / "best"
    if not best.exists():
        raise FileNotFoundError("no checkpoints/best")
    top = min((r for r in data["rows"] if r.get("rank")), key=lambda r: r["rank"])
    family = registry.get(man["trainable"])
    seed_everything(man["training"]["seed"], man["training"].get("deterministic", False))
    hp = _hparams({k: v for k, v in json.loads(top["config"]).items() if not k.startswith("_")}, family)
    splits = cached_splits(family, man["data"], man["model"])
    model = family.build_model(man["model"], splits, hp)
    model.load_state_dict(ckpt_mod.load_weights_file(str(best.resolve())))
    model.eval()
    outs = []
    with torch.no_grad():
        for batch in family.loader(splits.get("val_select", "select"), man["training"]["eval_batch_size"], False, 0):
            outs.append(family.eval_batch(model, batch))
    logits = torch.cat([o["logits"] for o in outs])
    y = torch.cat([o["target"] for o in outs])
    conf, pred = logits.softmax(-1).max(-1)
    out = []
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        m = (conf > lo) & (conf <= hi)
        n = int(m.sum())
        out.append({"lo": lo, "hi": hi, "n": n, "conf": float(conf[m].mean()) if n else None,
                    "acc": float((pred[m] == y[m]).float().mean()) if n else None})
    return out


def _reliability_svg(bins: list[dict]) -> str:
    x = Axis(0, 1, ML, W - MR)
    y = Axis(0, 1, H - MB, MT)
    body = [_axes(x, y, "confidence", "accuracy"),
            f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(1):.1f}" y2="{y(1):.1f}" stroke="#999" stroke-dasharray="4 3"/>']
    for b in bins:
        if b["acc"] is not None:
            body.append(f'<rect class="bar" x="{x(b["lo"]) + 1:.1f}" y="{y(b["acc"]):.1f}" width="{x(b["hi"]) - x(b["lo"]) - 2:.1f}" '
                        f'height="{y(0) - y(b["acc"]):.1f}" fill="#1e88e5" fill-opacity="0.8"><title>n={b["n"]}</title></rect>')
    return _svg("".join(body), title="reliability diagram")


def cost(data: dict) -> tuple[str, str]:
    rows = sorted(data["rows"], key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r["trial_id"]))
    parts = ("startup_s", "train_s", "eval_s", "ckpt_s", "idle_s")
    if rows and "idle_s" not in rows[0]:
        for r in rows:
            r["idle_s"] = max(0.0, (r.get("wall_s") or 0) - sum(r.get(p) or 0 for p in parts[:-1]))
    wmax = max([r.get("wall_s") or 0 for r in rows] + [1e-9])
    h = MT + MB + 22 * len(rows) + 20
    x = Axis(0, wmax, 190, W - MR - 70)
    x.lo = 0
    body = []
    for i, r in enumerate(rows):
        y0 = MT + 22 * i
        col = STATUS_COLOUR.get(r["status"], "#999")
        body.append(f'<text x="184" y="{y0 + 14}" text-anchor="end" fill="{col}">{_e(r["trial_id"])} {_e(r["status"])}</text>')
        cx = 190.0
        for p in parts:
            v = r.get(p) or 0.0
            w = x(v) - 190
            if w > 0:
                body.append(f'<rect class="cost" x="{cx:.1f}" y="{y0 + 3}" width="{w:.1f}" height="15" fill="{PART_COLOUR[p]}">'
                            f'<title>{p[:-2]}: {v:.1f}s</title></rect>')
                cx += w
        body.append(f'<text x="{cx + 4:.1f}" y="{y0 + 14}">{_fmt(r.get("wall_s"), 3)}s</text>')
    body.append(_legend([(p[:-2], PART_COLOUR[p]) for p in parts], x=W - MR - 240, y=h - MB - 60))
    body.append(f'<text x="{(190 + W - MR) / 2}" y="{h - 12}" text-anchor="middle" font-size="12">wall seconds per trial</text>')
    svg = _svg("".join(body), h=h, title="cost breakdown")
    by: dict[str, dict] = {}
    for r in rows:
        b = by.setdefault(r["status"], {"n": 0, "wall_s": 0.0, "accel_s": 0.0})
        b["n"] += 1
        b["wall_s"] += r.get("wall_s") or 0.0
        b["accel_s"] += r.get("accel_s") or 0.0
    unit = (rows[0].get("accel_unit") if rows else None) or "accelerator s"
    tbl = ["<table class='cost'><tr><th>status</th><th>trials</th><th>wall s</th><th>" + _e(unit) + "</th></tr>"]
    for s, b in sorted(by.items()):
        tbl.append(f"<tr><td>{_e(s)}</td><td>{b['n']}</td><td>{b['wall_s']:.1f}</td><td>{b['accel_s']:.1f}</td></tr>")
    tw, ta = sum(b["wall_s"] for b in by.values()), sum(b["accel_s"] for b in by.values())
    tbl.append(f"<tr><th>total</th><th>{len(rows)}</th><th>{tw:.1f}</th><th>{ta:.1f}</th></tr></table>")
    return svg, "".join(tbl)


# ----------------------------------------------------------------------------------- page
CSS = """body{font-family:sans-serif;max-width:960px;margin:24px auto;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:12px}svg{display:block;margin:6px 0}"""


def build(sweep_dir: Path) -> str:
    data = load(sweep_dir)
    rows = data["rows"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    best = min((r for r in rows if r.get("rank")), key=lambda r: r["rank"], default=None)
    imp, method = importance(data)
    dim_title, dim_html = per_dimension(data)
    cost_svg, cost_tbl = cost(data)
    top = "".join(
        f"<tr><td>{r['rank']}</td><td>{_e(r['trial_id'])}</td><td>{_e(r['status'])}</td><td>{_fmt(r.get('best'))}</td>"
        f"<td>{r.get('epochs')}</td><td>{_e(', '.join(f'{k[7:]}={v}' for k, v in r.items() if k.startswith('config.') and v is not None))}</td></tr>"
        for r in sorted((r for r in rows if r.get("rank")), key=lambda r: r["rank"])[:10])
    dec = data["decisions"]
    stops = sum(1 for d in dec if d["action"] == "stop")
    fo = (data["promotion"] or {}).get("fanout") or {}
    sections = [
        ("learning-curves", f"Learning curves ({data['metric']}), coloured by ASHA decision",
         learning_curves(data) + f"<p class='note'>{len(dec)} ASHA decisions recorded, {stops} stops. Dashed verticals: "
         "rungs; black ticks: the cutoff each decision used; ×: where a trial was stopped.</p>"),
        ("parallel-coordinates", "Parallel coordinates of the search space", parallel_coordinates(data)),
        ("importance", "Parameter importance",
         _hbars(list(imp.items()), "importance") + f"<p class='note'>Method: {_e(method)}.</p>" if imp else
         f"<p>Not computed: {_e(method)}.</p>"),
        ("fanout", "Seed fan-out", fanout(data) + (f"<p class='note'>Chosen: {_e(fo.get('chosen'))} (seed "
                                                   f"{_e(fo.get('chosen_seed'))}); lucky winner: {_e(fo.get('lucky_winner'))}.</p>"
                                                   if fo else "")),
        ("per-dimension", dim_title, dim_html),
        ("cost", "Cost breakdown", cost_svg + cost_tbl),
    ]
    nav = " · ".join(f"<a href='#{sid}'>{_e(t.split(' (')[0])}</a>" for sid, t, _ in sections)
    body = "".join(f"<h2 id='{sid}'>{_e(t)}</h2>{h}" for sid, t, h in sections)
    man = data["manifest"]
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>sweeper report: {_e(Path(sweep_dir).resolve().name)}</title>
<style>{CSS}</style></head><body>
<h1>Sweep report: {_e(Path(sweep_dir).resolve().name)}</h1>
<p>Trainable <b>{_e(man.get('trainable'))}</b>, selection <b>{_e(data['metric'])}</b> ({_e(data['mode'])}),
status <b>{_e(data['state'].get('status', '?'))}</b>; {len(rows)} trials: {_e(', '.join(f'{k} {v}' for k, v in sorted(counts.items())))}.
Best: <b>{_e(best['trial_id']) if best else '-'}</b> {_e(data['metric'])} = <b>{_fmt(best['best']) if best else '-'}</b>.</p>
<table><tr><th>rank</th><th>trial</th><th>status</th><th>best</th><th>epochs</th><th>config</th></tr>{top}</table>
<p>{nav}</p>{body}
<p class="note">Generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} by <code>sweeper report</code>
from {_e(Path(sweep_dir).resolve())}. Optuna study for optuna-dashboard: <code>sweep/optuna_study.db</code>.</p>
</body></html>"""


def write_report(sweep_dir: Path, out: Path | None = None) -> Path:
    from .fsutil import atomic_write_text

    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "report.html"
    page = build(sweep_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out
