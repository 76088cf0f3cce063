"""Promotion: gate -> select -> (fine-tune) -> seeded fan-out -> export.

Every step records its outcome in ``<sweep>/promotion.json`` (written atomically) before the
next starts, and each phase is its own Tune experiment under ``<sweep>/<phase>/``. Re-running the
same command therefore resumes an interrupted phase through Tune's restore, skips completed ones,
and never launches a second fan-out for the same winner. Selection is a pure function of the
results tables (deterministic tie-breaks), so the same results always promote the same trial.

Selection rules (documented in the README):
  * phase-1 trials are ranked on their best selection metric; errored, failed (NaN) trials are
    never candidates, nor are trials whose promoted checkpoint fails a gate;
  * ties break on the final value, then fewer epochs, then trial id;
  * the fan-out's final choice is the candidate with the best *seed mean*; ties break on phase-1 rank;
  * the exported weights are the chosen candidate's best seed run (ties: the lower seed).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import artifacts, results
from .errors import GateFailed, NoResult, UserError
from .fsutil import atomic_write_text
from .manifest import Gate, Loaded

PROMOTION = "promotion.json"


def read_promotion(sweep_dir: Path) -> dict:
    p = sweep_dir / PROMOTION
    return json.loads(p.read_text()) if p.exists() else {}


def write_promotion(sweep_dir: Path, state: dict) -> None:
    atomic_write_text(sweep_dir / PROMOTION, json.dumps(state, indent=2, default=str))


def ckpt_metrics(path: str | None) -> dict:
    """The metrics recorded inside a checkpoint (the epoch it was taken at)."""
    if not path:
        return {}
    p = Path(path) / "state.json"
    try:
        return dict(json.loads(p.read_text()).get("metrics", {}))
    except (OSError, json.JSONDecodeError):
        return {}


def check_gates(gates: list[Gate], metrics: dict, what: str) -> list[str]:
    """The failed gates as verdict lines ('' list when all pass)."""
    failed = []
    for g in gates:
        v = metrics.get(g.metric)
        if not g.passes(v):
            shown = "missing" if v is None else f"{v:.4g}"
            failed.append(f"gate `{g}` failed for {what}: {g.metric} = {shown}, threshold {g.op} {g.threshold:g}")
    return failed


def select_candidates(rows: list[dict], gates: list[Gate], k: int) -> tuple[list[dict], list[str]]:
    """Top-k ranked phase-1 trials whose promoted checkpoint passes every gate."""
    out, verdicts = [], []
    for r in sorted((r for r in rows if r.get("rank")), key=lambda r: r["rank"]):
        if not r.get("checkpoint"):
            continue
        failed = check_gates(gates, ckpt_metrics(r["checkpoint"]) or {r["metric"]: r["best"]}, f"trial {r['trial_id']}")
        if failed:
            verdicts += failed
            continue
        out.append(r)
        if len(out) == k:
            break
    return out, verdicts


def _hp(row: dict) -> dict:
    cfg = json.loads(row["config"])
    run = cfg.get("_run")
    return dict(run["hp"]) if isinstance(run, dict) else {k: v for k, v in cfg.items() if not k.startswith("_")}


def summarize_fanout(rows: list[dict], candidates: list[dict], metric: str, mode: str) -> dict:
    """Group fan-out runs by candidate; choose on the seed mean."""
    per: dict[str, dict] = {c["trial_id"]: {"trial_id": c["trial_id"], "phase1_rank": c["rank"],
                                            "phase1_best": c["best"], "per_seed": {}, "runs": {}} for c in candidates}
    for r in rows:
        run = json.loads(r["config"]).get("_run") or {}
        c = per.get(run.get("candidate"))
        if c is None:
            continue
        v = r["best"] if r["status"] in ("completed", "stopped") and r.get("best") is not None else None
        c["per_seed"][str(run["seed"])] = v
        c["runs"][str(run["seed"])] = {"trial_id": r["trial_id"], "checkpoint": r.get("checkpoint"), "status": r["status"]}
    sign = 1 if mode == "min" else -1
    for c in per.values():
        vals = [v for v in c["per_seed"].values() if v is not None and math.isfinite(v)]
        ok = vals and len(vals) == len(c["per_seed"])  # a candidate with a failed seed cannot win
        c["mean"] = statistics.fmean(vals) if ok else None
        c["std"] = statistics.stdev(vals) if ok and len(vals) > 1 else (0.0 if ok else None)
    ranked = sorted(per.values(), key=lambda c: (c["mean"] is None, sign * (c["mean"] or 0), c["phase1_rank"]))
    chosen = ranked[0] if ranked and ranked[0]["mean"] is not None else None
    for c in per.values():
        c["chosen"] = chosen is not None and c["trial_id"] == chosen["trial_id"]
    best_seed = None
    if chosen:
        seeds = sorted(((sign * v, int(s)) for s, v in chosen["per_seed"].items() if v is not None))
        best_seed = str(seeds[0][1])
    return {"metric": metric, "mode": mode, "candidates": ranked,
            "chosen": chosen["trial_id"] if chosen else None, "chosen_seed": best_seed,
            "chosen_checkpoint": chosen["runs"][best_seed]["checkpoint"] if chosen else None,
            "lucky_winner": bool(chosen and chosen["phase1_rank"] != 1)}


def run_pipeline(loaded: Loaded, *, address=None, rerun=False, retry_errored=False, quiet=False, dashboard=True,
                 from_checkpoint: str | None = None) -> tuple[Path, dict]:
    """Phase 1 (unless --from-checkpoint), then the promotion the manifest declares."""
    from .runner import run_sweep

    m = loaded.manifest
    gates = m.gate_list()
    if m.export.enabled and m.export.encrypt:
        from . import crypto

        crypto.load_keys(m.export.key_env)  # a missing key fails now, not after an hour of training
    if from_checkpoint:
        sweep_dir, candidates = _from_checkpoint(loaded, from_checkpoint, rerun)
    else:
        sweep_dir, rows = run_sweep(loaded, address=address, rerun=rerun, retry_errored=retry_errored,
                                    quiet=quiet, dashboard=dashboard)
        k = m.promotion.fanout.candidates if m.promotion.fanout else 1
        candidates, verdicts = select_candidates(rows, gates, k)
        if not candidates:
            state = read_promotion(sweep_dir)
            state.update(verdict="gate failed after phase 1", gate_failures=verdicts[:10])
            write_promotion(sweep_dir, state)
            artifacts.write_state(sweep_dir, status="gate_failed", phase="sweep")
            if verdicts:
                raise GateFailed(f"{sweep_dir.name}: no phase-1 trial passes the gates; best: {verdicts[0]}")
            raise NoResult(f"{sweep_dir.name}: no phase-1 trial has a checkpoint to promote")
    # one driver per sweep dir for the promotion too: a second one would run the fan-out again beside it
    with artifacts.SweepLock(sweep_dir):
        return _promote(loaded, sweep_dir, candidates, gates, address=address, quiet=quiet, dashboard=dashboard)


def _promote(loaded: Loaded, sweep_dir: Path, candidates: list[dict], gates, *, address, quiet, dashboard):
    """The promotion after phase 1 (or from a given checkpoint): fine-tune, fan-out, export, each recorded in
    ``promotion.json`` as it completes, so that the same command resumes where it stopped."""
    from .runner import init_ray

    m = loaded.manifest
    state = read_promotion(sweep_dir)
    cand_ids = [c["trial_id"] for c in candidates]
    if state.get("candidate_ids") not in (None, cand_ids):
        # the results changed under us (e.g. resumed phase 1 finished more trials): re-promote from scratch
        state = {}
    state.update(metric=m.selection.metric, mode=m.selection.mode, candidate_ids=cand_ids,
                 winner={"trial_id": candidates[0]["trial_id"], "rank": candidates[0]["rank"],
                         "checkpoint": candidates[0]["checkpoint"], "config": _hp(candidates[0])})
    write_promotion(sweep_dir, state)
    has_work = m.promotion.finetune or m.promotion.fanout or m.export.enabled
    if has_work:
        init_ray(address, dashboard=dashboard)

    # ---- fine-tune: the winner, longer, from its checkpoint
    if m.promotion.finetune and not state.get("finetune", {}).get("complete"):
        ft = m.promotion.finetune
        w = candidates[0]
        run = {"candidate": w["trial_id"], "seed": m.training.seed, "init_from": w["checkpoint"], "hp": _hp(w),
               "transfer": ft.transfer}
        rows = _run_fixed(loaded, sweep_dir, "finetune", [run], ft.epochs, quiet)
        ok = [r for r in rows if r.get("rank")]
        if not ok:
            raise NoResult(f"{sweep_dir.name}: the fine-tune run failed; see {sweep_dir}/finetune/trials.parquet")
        state["finetune"] = {"complete": True, "trial_id": ok[0]["trial_id"], "best": ok[0]["best"],
                             "checkpoint": ok[0]["checkpoint"]}
        write_promotion(sweep_dir, state)
    if state.get("finetune"):
        failed = check_gates(gates, ckpt_metrics(state["finetune"]["checkpoint"]), "the fine-tuned winner")
        if failed:
            _gate_stop(sweep_dir, state, "finetune", failed)
        # the fan-out of the winner starts from the fine-tuned weights
        candidates = [dict(candidates[0], checkpoint=state["finetune"]["checkpoint"])] + candidates[1:]

    # ---- fan-out: each candidate under each seed, from its checkpoint
    final_ckpt, final_metrics = candidates[0]["checkpoint"], ckpt_metrics(candidates[0]["checkpoint"])
    if m.promotion.fanout:
        fo = m.promotion.fanout
        if not state.get("fanout", {}).get("complete"):
            runs = [{"candidate": c["trial_id"], "seed": s, "init_from": c["checkpoint"], "hp": _hp(c),
                     "transfer": fo.transfer} for c in candidates for s in fo.seeds]
            rows = _run_fixed(loaded, sweep_dir, "fanout", runs, fo.epochs or m.training.max_epochs, quiet)
            summary = summarize_fanout(rows, candidates, m.selection.metric, m.selection.mode)
            summary["complete"] = True
            summary["seeds"] = fo.seeds
            state["fanout"] = summary
            write_promotion(sweep_dir, state)
        fan = state["fanout"]
        if not fan.get("chosen"):
            raise NoResult(f"{sweep_dir.name}: no fan-out candidate finished every seed")
        chosen = next(c for c in fan["candidates"] if c["chosen"])
        failed = check_gates(gates, {m.selection.metric: chosen["mean"], **{
            g.metric: statistics.fmean([ckpt_metrics(r["checkpoint"]).get(g.metric, math.nan)
                                        for r in chosen["runs"].values()])
            for g in gates if g.metric != m.selection.metric}}, f"candidate {chosen['trial_id']}'s seed mean")
        if failed:
            _gate_stop(sweep_dir, state, "fanout", failed)
        final_ckpt = fan["chosen_checkpoint"]
        final_metrics = ckpt_metrics(final_ckpt)
    elif state.get("finetune"):
        final_ckpt = state["finetune"]["checkpoint"]
        final_metrics = ckpt_metrics(final_ckpt)
    state["final"] = {"checkpoint": final_ckpt, "metrics": final_metrics}
    write_promotion(sweep_dir, state)

    # ---- export
    if m.export.enabled and not (state.get("export") and Path(state["export"]["path"]).exists()):
        from .export import export_checkpoint

        info = export_checkpoint(loaded, sweep_dir, final_ckpt, state)
        state["export"] = info
        write_promotion(sweep_dir, state)
    artifacts.write_state(sweep_dir, status="complete", phase="promotion")
    from .runner import wait_background

    wait_background()  # the phase-1 study export (sweep/optuna_study.db) is complete on return
    return sweep_dir, state


def _gate_stop(sweep_dir: Path, state: dict, phase: str, failed: list[str]) -> None:
    state.update(verdict=f"gate failed after {phase}", gate_failures=failed)
    write_promotion(sweep_dir, state)
    artifacts.write_state(sweep_dir, status="gate_failed", phase=phase)
    raise GateFailed(f"{sweep_dir.name}: {failed[0]}" + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""))


def _run_fixed(loaded: Loaded, sweep_dir: Path, phase: str, runs: list[dict], epochs: int, quiet: bool) -> list[dict]:
    """A phase of fixed runs (no search, no ASHA): one Tune trial per run via grid_search."""
    from ray import tune

    from .runner import run_phase

    import logging

    with artifacts.driver_log(sweep_dir):
        logging.getLogger("sweeper.promote").info("phase %s: %d fixed runs of %d epochs: %s", phase, len(runs), epochs,
                                                  json.dumps(runs, default=str))
        return run_phase(loaded, sweep_dir, phase=phase, spec_overrides={"max_epochs": epochs},
                         num_samples=1, searcher=False, param_space={"_run": tune.grid_search(runs)}, quiet=quiet)


def _from_checkpoint(loaded: Loaded, path: str, rerun: bool) -> tuple[Path, list[dict]]:
    """Promote a checkpoint given by path, with no sweep. Validated before anything starts."""
    from . import checkpoint as ckpt_mod
    from trainables import registry

    m = loaded.manifest
    p = Path(path)
    if not p.exists():
        raise UserError(f"--from-checkpoint {p}: no such file or directory")
    state_cfg = {}
    if p.is_dir():
        ckpt_mod.verify_checkpoint(p)  # IntegrityError (exit 5) names the failing file
        # and load it, optimizer state included: a pickled optimizer.pt whose checksums were
        # rewritten verifies, but must be refused now, before Ray starts, not in a trial later
        ckpt_mod.load_checkpoint(p, verify=False)
        try:
            state_cfg = json.loads((p / "state.json").read_text()).get("config") or {}
        except (OSError, json.JSONDecodeError):
            state_cfg = {}
    else:
        ckpt_mod.load_weights_file(p)  # refuses anything but safetensors or weights-only tensors
    hp = {k: v for k, v in m.search.space.items() if not hasattr(v, "type")}
    hp.update({k: v for k, v in state_cfg.items() if not k.startswith("_")})
    missing = [k for k, v in m.search.space.items() if hasattr(v, "type") and k not in hp]
    if missing:
        raise UserError(f"--from-checkpoint: no value for {', '.join(missing)} (the checkpoint does not record them); "
                        f"fix them with overrides, e.g. search.space.{missing[0]}=<value>")
    # a model must be buildable from this manifest and take the weights
    fam = registry.describe(m.trainable)
    root = artifacts.results_root(m)
    sweep_dir = artifacts.sweep_dir_for(loaded, root, rerun=rerun)
    artifacts.write_inputs(loaded, sweep_dir)
    artifacts.link_latest(root, sweep_dir)
    row = {"trial_id": "from_checkpoint", "rank": 1, "best": None, "metric": m.selection.metric,
           "checkpoint": str(p.resolve()), "config": json.dumps(hp), "status": "completed", "family": fam.name}
    return sweep_dir, [row]
