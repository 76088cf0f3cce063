"""Phase 1: the sweep on Ray Tune (OptunaSearch proposes, ASHA stops, checkpoints kept by metric).

One sweep directory per (manifest, overrides): ``<root>/<name>-<hash>``. Running the same
command again resumes an interrupted sweep with its searcher and scheduler state, or reports a
finished one without launching anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from . import artifacts, results
from .errors import IntegrityError, NoResult, UserError
from .manifest import Loaded
from .progress import ProgressCallback

log = logging.getLogger("sweeper")
# Tune's own console output (config box, trial tables) is replaced by sweeper's quiet progress
# line; full details stay in the experiment directory. Must be set before ray.tune is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune warns on every forced experiment snapshot (each checkpoint with num_to_keep set): noise for users.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune snapshots the experiment (trials, searcher, scheduler) at most every max(10 s, 19 x the last
# snapshot's time) by default. A driver killed between snapshots loses every trial started since:
# restore drops them and the searcher issues new configurations. A snapshot of a sweep's state is
# milliseconds next to a trial, so take one every 2 s (override with the variable itself).
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


def make_scheduler(loaded: Loaded, decisions_path: Path):
    m = loaded.manifest
    if m.scheduler.type == "none":
        return None
    from .asha import RecordingASHA

    return RecordingASHA(
        time_attr=m.scheduler.time_attr,
        max_t=m.scheduler.max_t,
        grace_period=m.scheduler.grace_period,
        reduction_factor=m.scheduler.reduction_factor,
        decisions_path=str(decisions_path),
    )


def init_ray(address: str | None, *, num_cpus: int | None = None, dashboard: bool = True) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kw = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **kw)
        artifacts.warn_if_unauthenticated()
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, **kw)


def trial_resources(m, gpus: float | None = None) -> dict:
    r = m.resources
    gpus = r.gpus if gpus is None else gpus  # resolved by run_phase when the manifest says `auto`
    if r.workers > 1:
        # Train V2 pattern: the Tune trial only drives; its TorchTrainer asks Ray for the workers'
        # resources itself. Reserving them here too (a placement group) would deadlock: the
        # trainer's workers cannot use the trial's bundles. Concurrency is bounded by
        # search.max_concurrent and by the workers' own resource requests.
        return {"cpu": 0.01}
    return {"cpu": r.cpus, "gpu": gpus}


def _watchdogs(m) -> list:
    """``training.hang_timeout_s``: kill a trial that stops reporting, so FailureConfig retries it;
    for multi-worker trials, free the worker group of a trial Tune ends mid-``fit()``."""
    from .watchdog import HangWatchdog, WorkerGroupReaper

    out: list = [WorkerGroupReaper()] if m.resources.workers > 1 else []
    timeout = getattr(m.training, "hang_timeout_s", None)
    if timeout:
        out.append(HangWatchdog(timeout))
    return out


_SNAPSHOT = re.compile(r"^(experiment_state|search_gen_state|searcher-state|callback-states|basic-variant-state)"
                       r"-(?P<session>[0-9A-Za-z_.:-]+)\.(json|pkl)$")


def _pickle_whole(data: bytes) -> bool:
    """Walks the pickle's opcodes (``pickletools.genops`` decodes, it never builds objects or runs
    code) and checks that the STOP opcode is the last byte: a torn pickle is cut short."""
    import pickletools

    try:
        last = None
        for op, _arg, pos in pickletools.genops(data):
            last = (op.name, pos)
        return last is not None and last[0] == "STOP" and last[1] == len(data) - 1
    except Exception:  # noqa: BLE001 - any decoding error: not whole
        return False


def _intact(f: Path) -> bool:
    """A snapshot file written whole: JSON that parses, or a pickle whose opcodes run to STOP."""
    try:
        data = f.read_bytes()
    except OSError:
        return False
    if data[:1] == b"\x80":  # a pickle (Tune names some of them .json: search_gen_state-*.json)
        return _pickle_whole(data)
    if f.suffix == ".json":
        try:
            json.loads(data)
            return True
        except ValueError:
            return False
    return _pickle_whole(data)


LAST_GOOD = ".sweeper-last-good"


def _sessions(d: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    if d.is_dir():
        for f in d.iterdir():
            mt = _SNAPSHOT.match(f.name)
            if mt and f.is_file():
                out.setdefault(mt["session"], []).append(f)
    return out


def snapshot_keeper(exp_dir: Path):
    """A Tune callback that keeps the last intact copy of the running session's snapshot files in
    ``<exp_dir>/.sweeper-last-good/`` (copied to a temp name, fsynced, renamed): what
    ``set_aside_torn_snapshots`` falls back to when the driver is killed mid-snapshot."""
    from ray.tune import Callback

    class SnapshotKeeper(Callback):
        def __init__(self):
            self.exp_dir = Path(exp_dir)
            self.sig = None
            self.t = 0.0

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self.t >= 1.0:
                self.t = now
                self.keep()

        def on_experiment_end(self, trials, **info):
            self.keep()

        def keep(self) -> None:
            try:
                sessions = {k: v for k, v in _sessions(self.exp_dir).items()
                            if any(f.name.startswith("experiment_state-") for f in v)}
                if not sessions:
                    return
                files = sessions[max(sessions)]  # session names are start timestamps
                sig = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
                if sig == self.sig or not all(_intact(f) for f in files):
                    return
                bdir = self.exp_dir / LAST_GOOD
                bdir.mkdir(exist_ok=True)
                tp = self.exp_dir / "tuner.pkl"  # Tune rewrites it (non-atomically) on every restore
                if tp.is_file() and _intact(tp):
                    files = [*files, tp]
                for f in files:
                    tmp = bdir / f".{f.name}.tmp"
                    shutil.copyfile(f, tmp)
                    with open(tmp, "rb+") as fh:
                        os.fsync(fh.fileno())
                    os.replace(tmp, bdir / f.name)
                self.sig = sig
            except OSError as e:  # a snapshot being rewritten under us: the next step tries again
                log.debug("snapshot keeper: %s", e)

    return SnapshotKeeper()


def set_aside_torn_snapshots(exp_dir: Path, note=lambda s: None) -> list[str]:
    """Before ``Tuner.restore``: move aside every driver session's snapshot that is torn.

    Tune writes its experiment snapshot (trials, searcher, scheduler, callbacks; one set of files
    per driver session) with plain ``open(..., "w")``, so a driver SIGKILLed mid-write leaves a
    truncated file, and restoring from it fails; Tune then carries on as a new experiment and the
    sweep's trials are lost. A torn session's files all go to ``.torn-<session>/`` (kept, not
    deleted) so the restore takes the newest session that is intact: the trials that session had
    not recorded are re-proposed, never duplicated, and their checkpoints stay on disk.
    """
    tp, tp_good = exp_dir / "tuner.pkl", exp_dir / LAST_GOOD / "tuner.pkl"
    if tp.is_file() and not _intact(tp):
        dst = exp_dir / ".torn-tuner"
        dst.mkdir(exist_ok=True)
        os.replace(tp, dst / tp.name)
        if not (tp_good.is_file() and _intact(tp_good)):
            raise IntegrityError(f"{tp}: torn by a killed driver and no intact copy is kept (moved to {dst.name}/); "
                                 "the sweep cannot be resumed. Trial directories and checkpoints are untouched")
        shutil.copyfile(tp_good, tp)
        msg = f"tuner.pkl was torn by a killed driver (kept in {dst.name}/); restored its last intact copy"
        log.warning(msg)
        note(msg)
    sessions = _sessions(exp_dir)
    kept = _sessions(exp_dir / LAST_GOOD)
    torn = sorted(sess for sess, files in sessions.items() if not all(_intact(f) for f in files))
    for sess in torn:
        dst = exp_dir / f".torn-{sess}"
        dst.mkdir(exist_ok=True)
        for f in sessions[sess]:
            os.replace(f, dst / f.name)
        good = kept.get(sess, [])
        if any(f.name.startswith("experiment_state-") for f in good) and all(_intact(f) for f in good):
            for f in good:  # the session's last intact snapshot, a step or two older than the torn one
                shutil.copyfile(f, exp_dir / f.name)
            sessions[sess] = [exp_dir / f.name for f in good]
            msg = (f"the snapshot a killed driver was writing is torn (kept in {dst.name}/); "
                   f"restoring from its last intact copy")
        else:
            sessions.pop(sess)
            msg = f"the snapshot a killed driver was writing is torn; set aside in {dst.name}/ (restoring from the one before)"
        log.warning(msg)
        note(msg)
    if torn and not any(f.name.startswith("experiment_state-") for files in sessions.values() for f in files):
        raise IntegrityError(f"{exp_dir}: the only experiment snapshot is torn (set aside in .torn-{torn[-1]}/); "
                             "the sweep cannot be resumed. Trial directories and checkpoints are untouched; "
                             "move the sweep directory away to start over")
    return torn


def run_phase(loaded: Loaded, sweep_dir: Path, *, phase: str = "sweep", spec_overrides: dict | None = None,
              num_samples: int | None = None, searcher=True, param_space: dict | None = None,
              retry_errored: bool = False, quiet: bool = False) -> list[dict]:
    """Run (or resume) one Tune experiment under ``sweep_dir/<phase>``; returns ranked trial rows
    and writes them to ``sweep_dir/<phase>/trials.parquet`` and ``metrics.parquet``."""
    from ray import tune

    from .space import make_searcher
    from .trial import TrialSpec, tune_trainable

    m = loaded.manifest
    phase_dir = artifacts.ensure_dir(sweep_dir, phase)  # refuses a planted symlink (sweep -> elsewhere)
    decisions_path = phase_dir / results.DECISIONS
    spec = TrialSpec(manifest=loaded.resolved(), phase=phase, **(spec_overrides or {}))
    from .packing import resolve_gpus

    gpus = resolve_gpus(spec.manifest, sweep_dir, notice=(lambda s: None) if quiet else print)
    spec.manifest["resources"]["gpus"] = gpus  # trials see a number, never `auto`
    trainable = tune_trainable(spec, trial_resources(m, gpus))
    exp_dir = phase_dir / "tune"
    progress = ProgressCallback(m.name, phase, m.selection.metric, m.selection.mode, quiet=quiet,
                                out_dir=phase_dir, total=num_samples or m.search.num_samples,
                                max_t=spec.max_epochs or m.training.max_epochs)
    from .metrics import MetricsCallback

    dash = MetricsCallback(m.name, phase, m.selection.metric, m.selection.mode, gpus=gpus, workers=m.resources.workers,
                           max_t=spec.max_epochs or m.training.max_epochs)
    sweep_name = m.name

    def trial_name(trial) -> str:
        return f"{sweep_name}_{phase}_{trial.trial_id}"

    run_config = tune.RunConfig(
        name="tune",
        storage_path=str(phase_dir.resolve()),
        verbose=0,
        progress_reporter=None,
        callbacks=[progress, dash, *_watchdogs(m), *_tune_loggers(), snapshot_keeper(exp_dir)],
        failure_config=tune.FailureConfig(max_failures=m.training.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=m.training.keep_checkpoints,
            checkpoint_score_attribute=m.selection.metric,
            checkpoint_score_order=m.selection.mode,
        ),
    )
    if (exp_dir / "tuner.pkl").exists():
        set_aside_torn_snapshots(exp_dir, note=progress.note)  # before Tune reads any of it
    if (exp_dir / "tuner.pkl").exists() and tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming %s from %s", phase, exp_dir)
        progress.note(f"resuming {phase} from {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored, restart_errored=False,
                                   param_space=None)
    else:
        srch, fixed = make_searcher(m.search, m.selection.metric, m.selection.mode) if searcher else (None, {})
        space = dict(fixed)
        if param_space:
            space.update(param_space)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=srch,
                scheduler=make_scheduler(loaded, decisions_path) if phase == "sweep" else None,
                num_samples=num_samples or m.search.num_samples,
                max_concurrent_trials=m.search.max_concurrent,
                metric=m.selection.metric,
                mode=m.selection.mode,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=run_config,
        )
    with _result_buffering(not (phase == "sweep" and m.scheduler.type != "none")):
        grid = tuner.fit()
    rows, mrows = results.trial_rows(
        grid, metric=m.selection.metric, mode=m.selection.mode, phase=phase,
        max_t=(spec.max_epochs or m.training.max_epochs), gpus=gpus, workers=m.resources.workers,
        decisions=results.read_decisions(phase_dir), cpus=m.resources.cpus,
    )
    ranked = results.rank(rows, m.selection.mode)
    results.write_table(phase_dir / results.TRIALS, ranked)
    results.write_table(phase_dir / results.METRICS, mrows)
    if phase == "sweep":  # for optuna-dashboard and `sweeper report` (sweeper/studydb.py)
        from .studydb import export_quietly

        in_background(export_quietly, phase_dir, m)  # a derived view: the results and next phase don't wait
    counts: dict[str, int] = {}
    for r in ranked:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        log.info("trial %s: %s %s best %s=%s epochs %s%s", r["trial_id"], r["status"], r.get("config"),
                 m.selection.metric, r.get("best"), r.get("epochs"),
                 f" ({r['stop_reason']})" if r.get("stop_reason") else "")
    log.info("phase %s finished: %s; tables in %s", phase, counts, phase_dir)
    return ranked


_BACKGROUND: list = []


def in_background(fn, *args) -> None:
    """Derived files (the Optuna study for optuna-dashboard, ~1 s) are written after the phase's
    tables on a thread, off the sweep's critical path: the leaderboard and the promotion phases
    need only the tables. ``wait_background`` joins them (run_pipeline does before it returns); the
    thread is not a daemon, so the interpreter also waits for it at exit."""
    import threading

    t = threading.Thread(target=fn, args=args, name=f"sweeper-{getattr(fn, '__name__', 'bg')}")
    t.start()
    _BACKGROUND.append(t)


def wait_background() -> None:
    while _BACKGROUND:
        _BACKGROUND.pop().join()


@contextlib.contextmanager
def _result_buffering(enabled: bool):
    """Without a scheduler nothing decides on a trial's intermediate results, so its reports need
    not wait for the driver: a function trainable's ``tune.report`` otherwise blocks each time until
    the driver has processed the result and asked for the next. Tune's result buffering lets the
    actor run on and send what it reported at most every TUNE_RESULT_BUFFER_MIN_TIME_S (a checkpoint,
    the trial's end or an error sends at once). Under ASHA each result is a decision: unbuffered.
    The user's own TUNE_RESULT_BUFFER_* settings win."""
    keys = {"TUNE_RESULT_BUFFER_LENGTH": "1000", "TUNE_RESULT_BUFFER_MIN_TIME_S": "1.0"}
    saved = {k: os.environ.get(k) for k in keys}
    if enabled and not any(saved.values()):
        os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tune_loggers() -> list:
    from .tunelog import loggers  # TensorBoard events without an fsync per result (sweeper/tunelog.py)

    return loggers()


def run_sweep(loaded: Loaded, *, address: str | None = None, rerun: bool = False, retry_errored: bool = False,
              quiet: bool = False, dashboard: bool = True) -> tuple[Path, list[dict]]:
    m = loaded.manifest
    root = artifacts.results_root(m)
    sweep_dir = artifacts.sweep_dir_for(loaded, root, rerun=rerun)
    state = artifacts.read_state(sweep_dir)
    if state.get("status") == "complete" and not retry_errored:
        rows = results.read_rows(sweep_dir / "sweep" / results.TRIALS)
        print(f"sweep {sweep_dir.name} already complete; showing its results (use --rerun for a new sweep)")
        return sweep_dir, rows
    with artifacts.SweepLock(sweep_dir), artifacts.driver_log(sweep_dir):
        artifacts.write_inputs(loaded, sweep_dir, resumed=bool(state))
        artifacts.link_latest(root, sweep_dir)
        artifacts.write_state(sweep_dir, status="running", phase="sweep")
        t0 = time.time()
        artifacts.ensure_dir(sweep_dir, "sweep")  # a planted symlink is refused before Ray starts
        init_ray(address, dashboard=dashboard)
        rows = run_phase(loaded, sweep_dir, retry_errored=retry_errored, quiet=quiet)
        artifacts.link_checkpoints(sweep_dir, rows)
        artifacts.finish_metadata(sweep_dir, wall_s=time.time() - t0, rows=rows)
        ok = [r for r in rows if r["rank"]]
        artifacts.write_state(sweep_dir, status="complete" if ok else "no_result", phase="sweep")
    if not ok:
        raise NoResult(f"sweep {sweep_dir.name}: no trial produced a finite {m.selection.metric}; see {sweep_dir}/sweep/trials.parquet")
    return sweep_dir, rows
