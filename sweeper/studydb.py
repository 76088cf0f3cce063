"""The sweep as an Optuna study on disk, for ``optuna-dashboard`` and for parameter importance.

Tune's ``OptunaSearch`` keeps its study in memory and checkpoints it (pickled) with the
experiment, which is what makes ``Tuner.restore`` resume the searcher exactly; giving it a live
database instead would leave orphaned RUNNING trials in the database after a driver crash. So the
searcher is left as it is, and the study is rebuilt from the results tables after each phase:
``<sweep>/sweep/optuna_study.db`` (SQLite), one Optuna trial per Tune trial with its parameters,
its best selection metric as the value (COMPLETE), ASHA-stopped trials as PRUNED, failed and
errored ones as FAIL, and every epoch's metric as an intermediate value. Open it with

    optuna-dashboard sqlite:///<sweep>/sweep/optuna_study.db
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from . import results

log = logging.getLogger("sweeper")
STUDY_DB = "optuna_study.db"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_study(phase_dir: Path, space: dict, metric: str, mode: str, study_name: str, storage=None):
    """An Optuna study (in memory unless ``storage``) holding the phase's trials."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from .space import to_optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists, _fixed = to_optuna(space)
    rows = results.read_rows(phase_dir / results.TRIALS)
    curves: dict[str, dict[int, float]] = {}
    if (phase_dir / results.METRICS).exists():
        for r in results.read_rows(phase_dir / results.METRICS):
            if r["metric"] == metric and _finite(r["value"]):
                curves.setdefault(r["trial_id"], {})[int(r["epoch"])] = float(r["value"])
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=False,
                                direction="minimize" if mode == "min" else "maximize")
    study.set_user_attr("source", "sweeper results tables (rebuilt after the phase)")
    study.set_user_attr("metric", metric)
    for r in sorted(rows, key=lambda r: r["trial_id"]):
        cfg = json.loads(r["config"])
        params = {k: cfg[k] for k in dists if k in cfg}
        if len(params) != len(dists):
            continue
        ok = r["status"] in ("completed", "stopped") and _finite(r.get("best"))
        state = TrialState.COMPLETE if ok and r["status"] == "completed" else (
            TrialState.PRUNED if ok else TrialState.FAIL)
        try:
            study.add_trial(create_trial(
                state=state, value=float(r["best"]) if state == TrialState.COMPLETE else None,
                params=params, distributions=dists, intermediate_values=curves.get(r["trial_id"], {}),
                user_attrs={"tune_trial_id": r["trial_id"], "status": r["status"],
                            "stop_reason": r.get("stop_reason") or "", "best": r.get("best") if ok else None},
            ))
        except (ValueError, TypeError) as e:  # a value outside its distribution (edited space): skip it
            log.info("study export: trial %s skipped (%s)", r["trial_id"], e)
    return study


def export_study(phase_dir: Path, space: dict, metric: str, mode: str, study_name: str) -> Path:
    """Write ``phase_dir/optuna_study.db`` atomically (built next to it, then renamed)."""
    dst = phase_dir / STUDY_DB
    tmp = phase_dir / f".{STUDY_DB}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        study = build_study(phase_dir, space, metric, mode, study_name, storage=_scratch_sqlite(tmp))
        storage = getattr(study, "_storage", None)
        backend = getattr(storage, "_backend", storage)
        engine = getattr(backend, "engine", None)
        if engine is not None:
            engine.dispose()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _scratch_sqlite(path: Path):
    """Optuna storage on a scratch SQLite file without a sync per commit (one commit per trial
    made the export ~2 s of a sweep's wall time). Safe: the file is renamed into place only once
    complete, and a crash leaves nothing but the temp file, removed on the next export."""
    import sqlite3

    import optuna

    def connect():
        c = sqlite3.connect(str(path.resolve()), check_same_thread=False)
        c.execute("PRAGMA synchronous=OFF")
        c.execute("PRAGMA journal_mode=MEMORY")
        return c

    return optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}", engine_kwargs={"creator": connect})


def export_quietly(phase_dir: Path, m) -> Path | None:
    """After a phase: best effort (a sweep never fails for want of the dashboard file)."""
    try:
        return export_study(phase_dir, m.search.space, m.selection.metric, m.selection.mode,
                            f"{m.name}-{phase_dir.name}")
    except Exception as e:  # noqa: BLE001
        log.warning("optuna study export skipped: %s", e)
        return None
