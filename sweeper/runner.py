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
import zipfile
from pathlib import Path

from . import artifacts, results
from .errors import IntegrityError, NoResult, UserError
from .fsutil import atomic_write_bytes
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


def make_scheduler(loaded: Loaded, decisions_path: Path | None):
    """The sweep phase's scheduler; ``None`` gives the first-in-first-out one (promotion, or a
    manifest with ``scheduler.type: none``). Each snapshots on every trial added or finished."""
    from .asha import PromotingASHA, RecordingASHA, SnapshottingFIFO

    m = loaded.manifest
    if decisions_path is None or m.scheduler.type == "none":
        return SnapshottingFIFO()

    if m.scheduler.variant == "promotion":
        return PromotingASHA(
            time_attr=m.scheduler.time_attr, max_t=m.scheduler.max_t, grace_period=m.scheduler.grace_period,
            reduction_factor=m.scheduler.reduction_factor, decisions_path=str(decisions_path),
            metric=m.selection.metric, mode=m.selection.mode)
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
        # Tune starts each trial actor with runtime_env {"env_vars": {"PL_DISABLE_FORK": "1"}}, and an
        # actor with environment variables of its own cannot use the workers Ray started ahead of
        # demand: each waited for a fresh worker process (~0.6 s on 2 CPUs, benchmarks/RESULTS.md (a5)).
        # Set here, before Ray starts, every worker inherits the variable, and Tune need not add it.
        for k, v in _tune_actor_env().items():
            os.environ.setdefault(k, v)
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, **kw)
        _tune_env_inherited()


def _tune_actor_env() -> dict:
    """What Tune puts in every trial actor's environment (``class_cache.DEFAULT_ENV_VARS``, Ray 2.60)."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return {}
    return getattr(class_cache, "DEFAULT_ENV_VARS", {})


def _tune_env_inherited() -> None:
    """Drop from Tune's per-actor environment the variables this Ray's workers inherit with the same
    value, so the trial actors take the pre-started workers (an empty ``env_vars`` does not need
    workers of its own). Tune keeps adding whatever else it propagates (AWS keys, Train settings)."""
    env = _tune_actor_env()
    for k in [k for k, v in env.items() if os.environ.get(k) == v]:
        del env[k]


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
    return _intact_bytes(f.name, data)


def _intact_bytes(name: str, data: bytes) -> bool:
    if data[:1] == b"\x80":  # a pickle (Tune names some of them .json: search_gen_state-*.json)
        return _pickle_whole(data)
    if name.endswith(".json"):
        try:
            json.loads(data)
            return True
        except ValueError:
            return False
    return _pickle_whole(data)


def _ends_whole(name: str, data: bytes) -> bool:
    """The cheap check for the staging set: Tune wrote it in this process, synchronously, in the step
    that just ended, so it is whole unless that write failed part-way, which cuts the end off. A
    pickle ends with STOP, Tune's JSON (an object) with its closing brace. (``_intact_bytes`` walks
    every opcode or parses the JSON: ~3 ms a snapshot here, on the path from one trial's end to the
    next start; the restore still checks each kept file that way before using it.)"""
    end = data.rstrip()[-1:]
    if data[:1] == b"\x80" or not name.endswith(".json"):
        return end == b"."
    return end == b"}"


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
    """A Tune callback that keeps, in ``<exp_dir>/.sweeper-last-good/``, the newest consistent set of
    the running session's snapshot files: what ``set_aside_torn_snapshots`` restores from.

    Tune writes a snapshot set (trials, searcher, search generator) whole into the driver's staging
    dir, then a background thread uploads it to the experiment dir file by file. A driver killed
    mid-upload leaves a torn file, or a *mixed* set: trials from one step, the searcher from another
    (a trial finished in one and still running in the other, so the restored searcher never hears
    of its end, or hears of a trial it never issued). After each step that wrote a snapshot, the
    keeper zips the staging set into ``<session>.zip`` (temp name, rename): one file, so the
    kept set is never mixed. Where the staging dir is unknown (a scheduler that did not register
    it: ``asha.STAGING``), it copies the experiment dir's files once they are all intact, as before.
    ``tuner.pkl`` (rewritten by Tune, non-atomically, on every restore) is kept the same way."""
    from ray.tune import Callback

    class SnapshotKeeper(Callback):
        # NB: Tune pickles this callback into tuner.pkl (by value: a local class) and a resumed sweep
        # runs the unpickled copy. So it looks the staging registry up at call time, in the live
        # module: a dict captured here would be a frozen copy from the sweep's first session.
        def __init__(self):
            self.exp_dir = Path(exp_dir)
            self.sig = None
            self.bundle_sig = None
            self.seen_save = None  # Tune's _last_save_time at the last look that found the set kept
            self.t = 0.0

        def on_step_end(self, iteration, trials, **info):
            if self.keep_bundle(only_after_save=True):
                return  # the zip is the kept set: copying the sweep dir's files as well is work done twice
            now = time.monotonic()
            if now - self.t >= 1.0:
                self.t = now
                self.keep()

        def on_experiment_end(self, trials, **info):
            if not self.keep_bundle():
                self.keep()

        def keep_bundle(self, only_after_save: bool = False) -> bool:
            """Zip the staging set if it changed; False where the staging dir is unknown.
            ``only_after_save``: look at the staging dir only if Tune has saved a snapshot since the
            last look (listing it after every step cost the driver ~0.8 ms a step, on the path from
            one trial's end to the next one's start)."""
            import importlib

            asha_mod = importlib.import_module("sweeper.asha")
            key = os.path.realpath(self.exp_dir)
            staging = asha_mod.STAGING.get(key)
            if not staging:
                return False
            saved = getattr(asha_mod.SAVER.get(key), "_last_save_time", None)
            if only_after_save and saved is not None and saved == getattr(self, "seen_save", None):
                return True
            try:
                sessions = {k: v for k, v in _sessions(Path(staging)).items()
                            if any(f.name.startswith("experiment_state-") for f in v)}
                if not sessions:
                    return True
                sess = max(sessions)
                files = sessions[sess]
                sig = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
                if sig == self.bundle_sig:
                    self.seen_save = saved
                    return True
                data = {f.name: f.read_bytes() for f in files}
                if not all(_ends_whole(n, b) for n, b in data.items()):
                    return True
                bdir = self.exp_dir / LAST_GOOD
                bdir.mkdir(exist_ok=True)
                tmp = bdir / f".{sess}.zip.tmp"
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                    for n, b in sorted(data.items()):
                        z.writestr(n, b)
                # no fsync: the threat is a killed driver, and a rename is atomic for that without
                # one (an fsync per snapshot was most of their cost on 1 s trials); after a power
                # loss the CRCs refuse a zip whose data did not reach the disk
                os.replace(tmp, bdir / f"{sess}.zip")
                self.bundle_sig, self.seen_save = sig, saved
                self.keep_tuner(bdir)
            except OSError as e:
                log.debug("snapshot keeper: %s", e)
            return True

        def keep_tuner(self, bdir: Path) -> None:
            tp = self.exp_dir / "tuner.pkl"
            if tp.is_file() and not (bdir / tp.name).is_file():
                data = tp.read_bytes()
                if _intact_bytes(tp.name, data):
                    atomic_write_bytes(bdir / tp.name, data)

        def keep(self) -> None:
            try:
                sessions = {k: v for k, v in _sessions(self.exp_dir).items()
                            if any(f.name.startswith("experiment_state-") for f in v)}
                if not sessions:
                    return
                files = sessions[max(sessions)]  # session names are start timestamps
                sig = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
                if sig == self.sig:
                    return
                tp = self.exp_dir / "tuner.pkl"
                if tp.is_file():
                    files = [*files, tp]
                data = {f.name: f.read_bytes() for f in files}  # checked as read: a file rewritten meanwhile is not copied torn
                if not all(_intact_bytes(n, b) for n, b in data.items()):
                    return
                bdir = self.exp_dir / LAST_GOOD
                bdir.mkdir(exist_ok=True)
                for n, b in data.items():
                    atomic_write_bytes(bdir / n, b)
                self.sig = sig
            except OSError as e:  # a snapshot being rewritten under us: the next step tries again
                log.debug("snapshot keeper: %s", e)

    return SnapshotKeeper()


def _bundle(z: Path) -> dict[str, bytes] | None:
    """A kept snapshot set: its files when the zip reads back whole (CRCs) and each file is intact."""
    try:
        with zipfile.ZipFile(z) as zf:
            if zf.testzip() is not None:
                return None
            data = {n: zf.read(n) for n in zf.namelist()}
    except (OSError, zipfile.BadZipFile, EOFError):
        return None
    ok = (data and any(n.startswith("experiment_state-") for n in data)
          and all(_SNAPSHOT.match(n) and _intact_bytes(n, b) for n, b in data.items()))
    return data if ok else None


def restore_kept_sets(exp_dir: Path, note=lambda s: None) -> list[str]:
    """Before ``Tuner.restore``: put back each session's kept snapshot set (``SnapshotKeeper``) where
    the experiment dir's files differ from it (torn or mixed by a killed driver's upload). The
    files replaced go to ``.superseded-<session>/``. Returns the sessions put back."""
    bdir = exp_dir / LAST_GOOD
    done = []
    sessions = _sessions(exp_dir)
    for z in sorted(bdir.glob("*.zip")) if bdir.is_dir() else []:
        sess = z.name[: -len(".zip")]
        data = _bundle(z)
        if data is None:
            log.warning("kept snapshot set %s does not verify; not used", z.name)
            continue
        cur = {f.name: f for f in sessions.get(sess, [])}
        try:
            same = set(cur) == set(data) and all(cur[n].read_bytes() == b for n, b in data.items())
        except OSError:
            same = False
        if same:
            continue
        dst = exp_dir / f".superseded-{sess}"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        for f in cur.values():
            os.replace(f, dst / f.name)
        for n, b in data.items():
            atomic_write_bytes(exp_dir / n, b)
        done.append(sess)
        torn = [n for n, f in cur.items() if not _intact(dst / n)]
        msg = (f"restored the snapshot of driver session {sess} from its kept copy: the copy in the sweep dir "
               f"was {'torn' if torn else 'mixed or older'} (a killed driver's upload; kept in {dst.name}/)")
        log.info(msg)
        if torn:
            note(msg)
    return done


def set_aside_torn_snapshots(exp_dir: Path, note=lambda s: None) -> list[str]:
    """Before ``Tuner.restore``: move aside every driver session's snapshot that is torn.

    Tune writes its experiment snapshot (trials, searcher, scheduler, callbacks; one set of files
    per driver session) with plain ``open(..., "w")``, so a driver SIGKILLed mid-write leaves a
    truncated file, and restoring from it fails; Tune then carries on as a new experiment and the
    sweep's trials are lost. A torn session's files all go to ``.torn-<session>/`` (kept, not
    deleted) so the restore takes the newest session that is intact: the trials that session had
    not recorded are re-proposed, never duplicated, and their dirs, checkpoints included, are set aside
    in ``.orphans/`` after the fit (``set_aside_orphans``).
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


ORPHANS = ".orphans"


def set_aside_orphans(exp_dir: Path, known: set[str], prefix: str, note=lambda s: None) -> list[str]:
    """After ``tuner.fit()``: move trial dirs that no trial of the experiment owns to ``.orphans/``.

    A driver killed within a step of starting a trial (after Tune made its dir, before the snapshot
    that lists it was kept), or a restore from an older snapshot set (``set_aside_torn_snapshots``),
    leaves a trial dir that Tune never hears of again: a new configuration takes the trial's place,
    and the dir's epochs and checkpoints are not part of any result. They are moved aside, kept, and
    named in one line each, so that every trial dir under ``tune/`` is one that the tables list.
    Only dirs named like this phase's trials (``prefix``) are considered, and none while ``known``
    is empty (nothing to compare with)."""
    if not known:
        return []
    moved = []
    for d in sorted(exp_dir.iterdir()):
        if not d.name.startswith(prefix) or d.name in known or d.is_symlink() or not d.is_dir():
            continue
        dst = exp_dir / ORPHANS / d.name
        dst.parent.mkdir(exist_ok=True)
        if dst.exists():  # set aside before under the same name: keep both
            dst = dst.with_name(f"{d.name}.{time.time_ns()}")
        os.replace(d, dst)
        moved.append(d.name)
        msg = (f"trial dir {d.name} belongs to no trial of this sweep (a driver was killed before Tune recorded "
               f"the trial); moved to {dst.relative_to(exp_dir.parent)}: its epochs are not part of the results")
        log.warning(msg)
        note(msg)
    return moved


def reuse_actors(m) -> bool:
    """Whether Tune reuses a trial's actor for the next trial (it saves the process start and the imports). Not
    where the trials replay CUDA graphs (``training.cuda_graphs: true``, or ``auto`` with ``fp8``, on GPUs): seen
    on an H200 with PyTorch 2.11 (fifteenth session), the next trial on a reused actor failed in its first compiled
    step, first on the graphs its predecessor's blocks had recorded ("Running CUDAGraph after shutdown"; the compiled
    code is now dropped at the end of a trial, ``trial.release_memory``) and then on the graph trees' per-thread
    state, which 2.11 sets up only for the thread that first used them (each trial runs on a new thread). Tune's
    retries hid it. A fresh process per trial starts clean."""
    tr, res = m.training, m.resources
    graphs = tr.cuda_graphs is True or (tr.cuda_graphs == "auto" and tr.fp8)
    return not (graphs and res.gpus != 0)


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
        restore_kept_sets(exp_dir, note=progress.note)  # before Tune reads any of it
        set_aside_torn_snapshots(exp_dir, note=progress.note)
    if (exp_dir / "tuner.pkl").exists() and tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming %s from %s", phase, exp_dir)
        progress.note(f"resuming {phase} from {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored, restart_errored=False,
                                   param_space=None)
        _fresh_callbacks(tuner, run_config.callbacks)
    else:
        srch, fixed = make_searcher(m.search, m.selection.metric, m.selection.mode) if searcher else (None, {})
        concurrency = m.search.max_concurrent
        promotion = phase == "sweep" and m.scheduler.type == "asha" and m.scheduler.variant == "promotion"
        if srch is not None and concurrency:
            # sweeper's limiter, not Tune's (space.py): trials paused at a rung do not hold the searcher's
            # concurrency slots, and a retried errored trial's result still reaches the searcher
            from .space import PauseAwareLimiter

            srch, concurrency = PauseAwareLimiter(srch, concurrency), None
        elif promotion:
            concurrency = None  # without a searcher, the trials' resources bound concurrency
        space = dict(fixed)
        if param_space:
            space.update(param_space)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=srch,
                scheduler=make_scheduler(loaded, decisions_path if phase == "sweep" else None),
                num_samples=num_samples or m.search.num_samples,
                max_concurrent_trials=concurrency,
                metric=m.selection.metric,
                mode=m.selection.mode,
                reuse_actors=reuse_actors(m),
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=run_config,
        )
    with _result_buffering(not (phase == "sweep" and m.scheduler.type != "none")):
        grid = tuner.fit()
    set_aside_orphans(exp_dir, {Path(r.path).name for r in grid if r.path}, f"{sweep_name}_{phase}_",
                      note=progress.note)
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


def _fresh_callbacks(tuner, callbacks: list) -> None:
    """A restored Tuner runs this driver's callbacks, not the ones pickled into ``tuner.pkl`` when the sweep began.

    ``Tuner.restore`` brings the callbacks back from ``tuner.pkl``: objects made by the code of the driver that
    started the sweep, run under the code of this one. Where sweeper was upgraded between a crash and the resume
    they lacked what the new code expects (seen in the fault tests: a ``ProgressCallback`` without ``max_t``, and
    every resumed trial errored). None of sweeper's callbacks keeps state for Tune to restore (no ``get_state``),
    and the pickled ones were taken before the sweep ran, so the fresh ones lose nothing. Ray 2.60 keeps the run
    config in the Tuner's private ``_local_tuner._run_config``; a Ray without it keeps Tune's behaviour."""
    cfg = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
    if cfg is None or not hasattr(cfg, "callbacks"):
        log.debug("this Ray Tune keeps no run config on the Tuner: the restored callbacks run")
        return
    cfg.callbacks = list(callbacks)


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
