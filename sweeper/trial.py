"""One trial: build data and model, restore or warm-start, train with Lightning, report every epoch.

``trial_fn`` is the Ray Tune function trainable. One-worker trials train inside it; multi-worker
trials (``resources.workers > 1``) start a Ray Train ``TorchTrainer`` whose workers run the same
``train_loop`` with Ray's Lightning integration, and whose reports reach Tune through
``TuneReportCallback`` so ASHA acts on multi-worker trials too.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("sweeper.trial")

FAILED_KEY = "sweeper_failed"  # a reported metric holding the reason a trial failed (NaN loss, ...)


@dataclass
class TrialSpec:
    """What a trial needs beyond its hyperparameters (passed with ``tune.with_parameters``)."""

    manifest: dict
    phase: str = "sweep"
    seed: int | None = None
    init_from: str | None = None  # checkpoint dir to warm-start from (promotion phases)
    transfer: str = "compatible"  # how init_from is applied: compatible | backbone
    max_epochs: int | None = None
    extra: dict = field(default_factory=dict)


class Reporter:
    """Where metrics and checkpoints go: Tune in a trial, Ray Train in a worker group, a list in tests."""

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        raise NotImplementedError  # abstract

    def restore_dir(self) -> Callable | None:
        return None


def iteration_is_epoch(metrics: dict) -> dict:
    """The report with ``training_iteration`` set to its ``epoch`` (a trial reports once an epoch).

    Tune fills in ``training_iteration`` only where the report has none, counting on from the
    checkpoint it registered. A trial resumes from the newest verified checkpoint on disk, which can
    be newer than that one (a kill between the checkpoint's write and Tune registering it), and Tune's
    count then runs one behind the epochs: ASHA on ``time_attr: training_iteration`` and Optuna's
    intermediate steps would see that trial late (tests/test_iteration_is_epoch.py)."""
    if "epoch" not in metrics:
        return metrics
    return {**metrics, "training_iteration": int(metrics["epoch"])}


class TuneReporter(Reporter):
    def report(self, metrics, ckpt_dir):
        from ray import tune

        tune.report(iteration_is_epoch(metrics), checkpoint=tune.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    def restore_candidates(self) -> list[str]:
        """Every checkpoint of this trial, Tune's own included, newest first by the step/epoch
        recorded inside: if the newest fails verification (a crash mid-write) we fall back instead
        of starting over, and one persisted just before the driver or the worker died counts even
        though Tune never heard of it (it would otherwise restart from an older one, or from 0)."""
        from ray import tune

        from . import checkpoint as ckpt_mod

        found: dict[str, Path] = {}
        ck = tune.get_checkpoint()
        self.tune_checkpoint = str(ck.path) if ck is not None else None  # the one Tune has the report of
        if ck is not None:
            found[str(ck.path)] = Path(ck.path)
        trial_dir = _storage_trial_dir()
        if trial_dir is not None:
            for p in trial_dir.glob("checkpoint_*"):
                found.setdefault(str(p), p)
            _skip_past_unregistered(found.values())
        return [str(p) for p in sorted(found.values(), key=ckpt_mod._recency, reverse=True)]


def _skip_past_unregistered(dirs) -> None:
    """Tune numbers a restarted trial's next checkpoint after the last one the driver registered.
    One persisted after that (the worker died before Tune's save round-trip) would be overwritten
    in place by the next report, and a kill during that copy would leave it mixed: number past
    every checkpoint dir on disk instead."""
    import re

    idx = [int(m.group(1)) for d in dirs if (m := re.fullmatch(r"checkpoint_(\d{6})", Path(d).name))]
    try:
        from ray.train._internal.session import get_session

        storage = get_session().storage
        if idx and storage.current_checkpoint_index < max(idx):
            storage.current_checkpoint_index = max(idx)  # the next report increments it first
    except Exception:  # noqa: BLE001 - another Ray version: Tune's own numbering
        pass


def _storage_trial_dir() -> Path | None:
    """Where Tune persists this trial's checkpoints (``<phase>/tune/<trial>``) when that is local.
    Not ``get_trial_dir()``: that is the actor's working directory, which holds none of them."""
    try:
        from ray.train._internal.session import get_session

        storage = get_session().storage
        if _is_local(storage.storage_filesystem):
            return Path(storage.trial_fs_path)
    except Exception:  # noqa: BLE001 - remote storage or another Ray version: Tune's checkpoint only
        pass
    return None


class TrainReporter(Reporter):
    """Inside a Ray Train worker group: every rank reports, rank 0 attaches the checkpoint
    (``every_rank=True``: each rank attaches its own shard, which Ray Train merges: DeepSpeed)."""

    def report(self, metrics, ckpt_dir, *, every_rank: bool = False):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        if rank == 0:
            # lets the driver free this worker group if Tune ends the trial mid-fit (WorkerGroupReaper)
            from ray.util import get_current_placement_group

            pg = get_current_placement_group()
            if pg is not None:
                metrics = {**metrics, "sweeper_worker_pg": pg.id.hex()}
        attach = ckpt_dir and (every_rank or rank == 0)
        ray.train.report(iteration_is_epoch(metrics), checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if attach else None)

    def restore_candidates(self) -> list[str]:
        import ray.train

        ck = ray.train.get_checkpoint()
        return [ck.path] if ck is not None else []


class ListReporter(Reporter):
    """For tests and benchmarks: keeps reports in memory, checkpoints in a directory."""

    def __init__(self, ckpt_root: str | None = None):
        self.reports: list[dict] = []
        self.ckpt_root = ckpt_root
        self.checkpoints: list[str] = []

    def report(self, metrics, ckpt_dir):
        self.reports.append(dict(metrics))
        if ckpt_dir and self.ckpt_root:
            dst = Path(self.ckpt_root) / f"checkpoint_{int(metrics.get('epoch', len(self.reports))):06d}"
            shutil.copytree(ckpt_dir, dst)
            self.checkpoints.append(str(dst))

    def restore_candidates(self):
        from . import checkpoint as ckpt_mod

        # newest first by what each checkpoint records, as TuneReporter orders them
        return [str(p) for p in sorted(map(Path, self.checkpoints), key=ckpt_mod._recency, reverse=True)]


def _hparams(config: dict, family):
    from trainables.base import HParams

    return HParams.from_config(config, family.info.hyperparameters)


def train_loop(config: dict, spec: TrialSpec, reporter: Reporter, *, use_ray_train: bool = False) -> dict:
    """Train one configuration. Returns the last metrics. Never raises for a NaN loss: the trial
    is reported as failed with the reason (retrying a deterministic NaN would only burn time)."""
    t0 = time.perf_counter()
    _quiet_worker()
    from trainables import registry

    fam = registry.get(spec.manifest["trainable"])
    if hasattr(fam, "run_trial"):  # a family with its own loop (the overhead benchmark's sleep trainable)
        return fam.run_trial(config, spec, reporter)
    from trainables import speed

    if speed.wants_fast_path(spec.manifest):  # GPU trials: plain PyTorch / DDP / DeepSpeed (docs/gpu.md)
        return speed.run_trial(config, spec, reporter, use_ray_train=use_ray_train)
    import lightning.pytorch as pl
    import torch

    from trainables.base import cached_splits, data_cache_has, resolve_precision, seed_everything
    from trainables.lit import LitTrial, NonFiniteLoss

    from . import checkpoint as ckpt_mod
    from .transfer import apply_transfer

    m = spec.manifest
    family = registry.get(m["trainable"])
    training = m["training"]
    init_from, transfer, seed = spec.init_from or m.get("init_from"), spec.transfer, spec.seed
    if spec.init_from is None and m.get("init_from"):
        transfer = m.get("init_transfer", "compatible")
    run = config.get("_run")
    if isinstance(run, dict):  # a fixed promotion run: its own seed, start weights and hyperparameters
        seed, init_from, transfer = run["seed"], run["init_from"], run.get("transfer", transfer)
        config = dict(run["hp"])
    seed = training["seed"] if seed is None else seed
    seed_everything(seed, training["deterministic"])
    hp = _hparams(config, family)
    cache_hit = data_cache_has(family, m["data"], m["model"])
    splits = cached_splits(family, m["data"], m["model"])
    _check_coverage(splits, m["data"]["min_rows"])
    model = family.build_model(m["model"], splits, hp)
    init_report = {}
    if init_from:
        src = ckpt_mod.load_weights_file(init_from)
        init_report = apply_transfer(model, src, transfer, family.info.backbone_prefix)
        log.info("warm start from %s (%s): %d copied, %d skipped", init_from, transfer,
                 len(init_report["copied"]), len(init_report["skipped"]))

    # resume: newest checkpoint of this trial that verifies
    start_epoch, opt_state, resumed_metrics, resumed_from = 0, None, None, None
    cands = reporter.restore_candidates() if hasattr(reporter, "restore_candidates") else []
    if cands:
        best, _skipped = ckpt_mod.latest_valid_checkpoint([Path(c) for c in cands])  # logs each skipped one
        if best is not None:
            loaded = ckpt_mod.load_checkpoint(best)
            model.load_state_dict(loaded.model_state)
            opt_state = loaded.optimizer_state
            start_epoch = int(loaded.state.get("epoch", 0))
            resumed_metrics, resumed_from = loaded.state.get("metrics"), str(best)
            log.info("resumed from %s at epoch %d", best, start_epoch)

    on_gpu = torch.cuda.is_available() and (m["resources"]["gpus"] > 0)
    precision = resolve_precision(training["precision"], on_gpu, family.info)
    max_epochs = spec.max_epochs or training["max_epochs"]
    bs = hp.batch_size
    train_ds = splits.get("train", "fit")
    val_ds = splits.get("val_select", "select")
    steps_per_epoch = -(-len(train_ds) // bs)
    if training.get("limit_train_batches"):
        steps_per_epoch = min(steps_per_epoch, training["limit_train_batches"])
    lit = LitTrial(family, model, hp, splits, total_steps=steps_per_epoch * max_epochs,
                   step_offset=steps_per_epoch * start_epoch, optimizer_state=opt_state)
    state = {"start": t0, "ckpt_s": 0.0, "first_step": None, "last": {}, "data_cache_hit": int(cache_hit),
             "ckpt_every": int(training.get("checkpoint_every", 1)), "max_epochs": max_epochs}
    report_cb = _ReportCallback(reporter, spec, start_epoch, state, family, init_report, config, seed)
    kwargs: dict[str, Any] = {}
    if use_ray_train:
        from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

        kwargs.update(strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()], devices="auto",
                      accelerator="gpu" if on_gpu else "cpu")
    else:
        kwargs.update(accelerator="gpu" if on_gpu else "cpu", devices=1)
    remaining = max_epochs - start_epoch
    if remaining <= 0:
        # the last epoch's checkpoint was written but its report never reached Tune (the driver or
        # this worker died in between; Tune hands back an older checkpoint or none): report it
        # again, or the trial ends one epoch short. Tune's own checkpoint came with its report.
        if (isinstance(resumed_metrics, dict) and resumed_metrics
                and resumed_from != getattr(reporter, "tune_checkpoint", None)):
            state["last"] = dict(resumed_metrics)
            reporter.report(state["last"], None)
        return state["last"]
    trainer = pl.Trainer(
        max_epochs=remaining,
        precision=precision,
        gradient_clip_val=(hp.grad_clip if hp.grad_clip is not None else training["grad_clip"]) or None,
        limit_train_batches=training.get("limit_train_batches") or 1.0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[report_cb],
        deterministic=False,  # seeding + use_deterministic_algorithms(warn_only) is set above
        **kwargs,
    )
    if use_ray_train:
        from ray.train.lightning import prepare_trainer

        trainer = prepare_trainer(trainer)
    # epoch e's batch order and random draws (dropout) depend on (seed, e) alone: a trial resumed
    # from its epoch-k checkpoint (a retry, a driver restart, an ASHA promotion) trains exactly as
    # one that never stopped
    train_loader = family.loader(train_ds, bs, shuffle=True, seed=seed, first_epoch=start_epoch)
    val_loader = family.loader(val_ds, training["eval_batch_size"], shuffle=False, seed=0)
    try:
        trainer.fit(lit, train_loader, val_loader)
    except NonFiniteLoss as e:
        metrics = {**state["last"], FAILED_KEY: str(e), "epoch": start_epoch + trainer.current_epoch + 1}
        metrics[m["selection"]["metric"]] = float("inf") if m["selection"]["mode"] == "min" else float("-inf")
        reporter.report(metrics, None)
        return metrics
    return state["last"]


def _check_coverage(splits, min_rows: dict) -> None:
    from .errors import UserError

    sizes = splits.sizes()
    short = [f"{s} has {sizes.get(s, 0)} rows, needs >= {n}" for s, n in min_rows.items() if sizes.get(s, 0) < n]
    if short:
        raise UserError("data coverage below threshold (data.min_rows): " + "; ".join(short))


class _ReportCallback:
    """Lightning callback (duck-typed to avoid importing lightning at module import)."""

    def __new__(cls, *a, **k):
        import lightning.pytorch as pl

        class ReportCallback(pl.Callback):
            def __init__(self, reporter, spec, start_epoch, state, family, init_report, config, seed):
                self.reporter, self.spec, self.start_epoch = reporter, spec, start_epoch
                self.state, self.family, self.init_report = state, family, init_report
                self.config, self.seed = config, seed

            def on_train_epoch_start(self, trainer, pl_module):
                import torch

                torch.manual_seed(self.seed * 7919 + self.start_epoch + trainer.current_epoch + 1)
                # start-up ends where the training clock starts (LitTrial.on_train_epoch_start runs
                # after the callbacks' hook): the parts never overlap and sum to at most the wall
                if self.state["first_step"] is None:
                    self.state["first_step"] = time.perf_counter()
                    self.state["first_step_unix"] = time.time()  # comparable with the driver's clock

            def on_validation_end(self, trainer, pl_module):
                if trainer.sanity_checking:
                    return
                from . import checkpoint as ckpt_mod

                epoch = self.start_epoch + trainer.current_epoch + 1
                metrics = dict(pl_module.last_metrics)
                now = time.perf_counter()
                st = self.state
                metrics.update(
                    epoch=epoch,
                    phase=self.spec.phase,
                    time_startup_s=(st["first_step"] or now) - st["start"],
                    first_step_unix=st.get("first_step_unix") or time.time(),
                    time_train_s=pl_module.timing["train_s"],
                    time_eval_s=pl_module.timing["eval_s"],
                    time_ckpt_s=st["ckpt_s"],
                    data_cache_hit=st.get("data_cache_hit", 0),
                    node_id=_node_id(),
                )
                if self.init_report and epoch == self.start_epoch + 1:
                    metrics["transfer_copied"] = len(self.init_report.get("copied", []))
                    metrics["transfer_skipped"] = len(self.init_report.get("skipped", []))
                t = time.perf_counter()
                every = st.get("ckpt_every", 1)
                due = bool(every) and (epoch % every == 0 or epoch >= st.get("max_epochs", epoch))
                tmp = tempfile.mkdtemp(prefix="sweeper-ckpt-")
                try:
                    rank0 = trainer.global_rank == 0 and due
                    ck = os.path.join(tmp, "ckpt")
                    if rank0:
                        opt = trainer.optimizers[0].state_dict() if trainer.optimizers else None
                        ckpt_mod.write_checkpoint(
                            ck, {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}, opt,
                            {"epoch": epoch, "global_step": int(pl_module.step_offset) + int(trainer.global_step), "metrics": metrics,
                             "trainable": self.family.info.name, "phase": self.spec.phase, "seed": self.seed,
                             "config": self.config, "transfer": {k: self.init_report[k] for k in ("rule", "copied", "skipped")}
                             if self.init_report else None},
                        )
                    st["ckpt_s"] += time.perf_counter() - t
                    metrics["time_ckpt_s"] = st["ckpt_s"]
                    metrics["time_wall_s"] = time.perf_counter() - st["start"]
                    st["last"] = metrics
                    self.reporter.report(metrics, ck if rank0 else None)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)

        return ReportCallback(*a, **k)


# ------------------------------------------------------------------------------- Tune entry points


def trial_fn(config: dict, spec: TrialSpec) -> None:
    """Ray Tune function trainable."""
    _quiet_worker()
    import gc

    # what is alive now (Ray, Tune, imported modules, cached data) outlives every trial on this
    # actor: freezing it keeps release_memory's collection to this trial's objects (~1 ms, not ~100 ms)
    gc.freeze()
    workers = spec.manifest["resources"]["workers"]
    handler = _attach_trial_log()
    try:
        if workers <= 1:
            train_loop(config, spec, TuneReporter())
            return
        _run_worker_group(config, spec)
    finally:
        release_memory()
        if handler is not None:
            for name in ("sweeper", "trainables", "lightning.pytorch"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()


def tune_trainable(spec: TrialSpec, resources):
    """``trial_fn`` as the Tune trainable class, with ``spec`` and ``resources`` attached.

    Two changes to Tune's function trainable. A reused actor waits (``REUSE_WAIT_S``) for the last
    trial's thread to end instead of 2 s. A restore whose checkpoint is gone from local storage
    starts the trial without it instead of failing. Tune's ``num_to_keep`` deletes a superseded
    checkpoint as soon as the newer one registers, but the experiment snapshot naming it is taken
    later; a driver killed in between (or a snapshot set aside as torn, see runner) leaves a restore
    pointing at a deleted dir, and Tune's own restore raised on every retry until the trial ended
    ``error`` with all its epochs done (seen in the driver-kill test). ``TuneReporter`` then resumes
    from the newest verified checkpoint in the trial dir. Trial name (``trial_fn``) unchanged, so
    sweeps written before this still restore."""
    from ray import tune

    return sweeper_trainable(tune.with_resources(tune.with_parameters(trial_fn, spec=spec), resources))


# How long a reused actor waits for the previous trial's thread to end (its last steps after the
# final report: removing a checkpoint's staging dir, giving GPU memory back). Tune's own wait is
# TUNE_FUNCTION_THREAD_TIMEOUT_S = 2 s; past it the reset fails, and Tune 2.60 then errors the next
# trial without telling the searcher, whose concurrency slot is never freed: the sweep waited
# forever (0.5B trials on the H100, 2026-11-26: 5.6 GB checkpoints). A thread that truly hangs is
# the hang watchdog's (training.hang_timeout_s).
REUSE_WAIT_S = os.environ.get("SWEEPER_REUSE_WAIT_S", "600")


def sweeper_trainable(fn):
    """A Tune function trainable class around ``fn`` (see ``tune_trainable``)."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(fn)
    swapped = _controller_swaps_buffer_args()

    class SweeperTrial(base):
        def __init__(self, *args, **kwargs):
            _ipython_only_if_loaded()
            super().__init__(*args, **kwargs)

        def train_buffered(self, a, b=1000):
            """Tune's result buffering (``runner._result_buffering``), with the arguments read right.
            Ray 2.60's controller calls ``train_buffered(buffer_length, buffer_time_s)`` against the
            signature ``train_buffered(buffer_time_s, max_buffer_length)``: a buffer of at most 1.0
            results, so every report waited for the driver's round trip (~3.5 ms each on 2 CPUs;
            benchmarks/RESULTS.md (a5)). Whether this Ray's controller swaps them was read from its
            source when the class was made (``swapped``)."""
            length, secs = (a, b) if swapped else (b, a)
            return super().train_buffered(buffer_time_s=secs, max_buffer_length=length)

        def reset_config(self, new_config):
            os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = REUSE_WAIT_S  # read by Tune's reset_config
            return super().reset_config(new_config)

        def restore(self, checkpoint_path):
            ck = getattr(checkpoint_path, "checkpoint", None)
            path = getattr(ck, "path", None)
            if path is not None and _is_local(getattr(ck, "filesystem", None)) and not os.path.exists(path):
                metrics = getattr(checkpoint_path, "metrics", None) or {}
                self._iteration = metrics.get("training_iteration", 0)
                self._time_total = metrics.get("time_total_s", 0)
                self._time_since_restore, self._iterations_since_restore = 0.0, 0
                log.warning("checkpoint %s named by the experiment snapshot no longer exists; the trial "
                            "resumes from the newest verified checkpoint in its dir", path)
                return
            return super().restore(checkpoint_path)

    return SweeperTrial  # the actor shows as ray::SweeperTrial


def _controller_swaps_buffer_args() -> bool:
    """Whether this Ray's Tune controller passes ``(buffer_length, buffer_time_s)`` positionally to
    ``Trainable.train_buffered(buffer_time_s, max_buffer_length)`` (Ray 2.60 does)."""
    import inspect

    try:
        from ray.tune.execution.tune_controller import TuneController

        src = inspect.getsource(TuneController._schedule_trial_train)
    except Exception:  # noqa: BLE001 - no source to read: take the signature at its word
        return False
    return "args = (buffer_length, buffer_time_s)" in src


def _ipython_only_if_loaded() -> None:
    """Tune's ``Trainable.__init__`` calls ``disable_ipython()`` in every actor, which imports IPython
    (where installed) only to clear IPython's shell singleton: 0.3 s of each trial actor's start on 2
    CPUs (benchmarks/RESULTS.md (a5)). A worker that never imported IPython has no shell to clear, so
    the call is passed on only where IPython is loaded."""
    import ray.tune.trainable.trainable as tt

    orig = tt.disable_ipython
    if getattr(orig, "sweeper_wrapped", False):
        return

    def disable_ipython():
        if "IPython" in sys.modules:
            orig()

    disable_ipython.sweeper_wrapped = True
    tt.disable_ipython = disable_ipython


def _is_local(fs) -> bool:
    """Whether a pyarrow filesystem (Tune's storage, a checkpoint's) is this machine's disk."""
    import pyarrow.fs

    return isinstance(fs, pyarrow.fs.LocalFileSystem)


def _attach_trial_log() -> logging.Handler | None:
    """Each trial's own log (``trial.log`` in its Tune trial dir): warm starts, restores, skipped
    checkpoints, Lightning warnings. The console stays quiet; the details are here."""
    try:
        from ray import tune

        trial_dir = tune.get_context().get_trial_dir()
    except Exception:  # not inside a Tune trial (direct train_loop use)
        return None
    if not trial_dir:
        return None
    h = logging.FileHandler(os.path.join(trial_dir, "trial.log"))
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name, level in (("sweeper", logging.INFO), ("trainables", logging.INFO), ("lightning.pytorch", logging.WARNING)):
        lg = logging.getLogger(name)
        lg.addHandler(h)
        if lg.getEffectiveLevel() > level:
            lg.setLevel(level)
    h.setLevel(logging.INFO)
    return h


def release_memory() -> None:
    """End of a trial on a (possibly reused) actor: give its accelerator memory back so the next
    trial on this actor, or another trial packed on the same GPU, starts from the same baseline."""
    import gc
    import sys

    graphs = sys.modules.get("torch._inductor.cudagraph_trees")
    # CUDA graphs (training.cuda_graphs, on with training.fp8) hold a private memory pool until their trees are
    # reset. The compiled code that Dynamo keeps for the block's class still calls into those trees, and the next
    # trial's blocks (same class, same code) would reuse it: "Running CUDAGraph after shutdown" in its first step,
    # seen on an H200 in a sweep of the ViT-S/14 GPU manifest on reused actors (fifteenth session). So the compiled
    # code goes too, and that trial compiles and records its own graphs.
    if graphs is not None and _graph_trees_in_use(graphs):
        graphs.reset_cudagraph_trees()
        sys.modules["torch._dynamo"].reset()
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch for a trial that did not (sleep_bench)
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log_path = os.environ.get("SWEEPER_MEMORY_LOG")  # benchmarks/gpu_packing.py: memory after each trial
    if log_path:
        import json

        on = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
        rec = {"pid": os.getpid(), "time": time.time(),
               "allocated": torch.cuda.memory_allocated() if on else 0,
               "reserved": torch.cuda.memory_reserved() if on else 0}
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _graph_trees_in_use(graphs) -> bool:
    """Whether this thread holds a CUDA graph tree (``torch._inductor.cudagraph_trees``' per-thread containers)."""
    import torch

    if not torch._C._is_key_in_tls("tree_manager_containers"):
        return False
    containers = graphs.get_obj(graphs.local, "tree_manager_containers")
    return any(c is not None and c.tree_manager is not None for c in containers.values())


def _run_worker_group(config: dict, spec: TrialSpec) -> None:
    """A multi-worker trial: a Ray Train TorchTrainer inside the Tune trial (Train V2 pattern)."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig, FailureConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.manifest["resources"]
    ctx = tune.get_context()
    trial_dir = Path(ctx.get_trial_dir())

    def worker(cfg):
        _quiet_worker()
        train_loop(cfg, spec, TrainReporter(), use_ray_train=True)

    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=res["workers"],
            use_gpu=res["gpus"] > 0,
            resources_per_worker={"CPU": res["cpus"], **({"GPU": res["gpus"]} if res["gpus"] else {})},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(trial_dir),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=spec.manifest["training"]["max_failures"]),
        ),
    )
    trainer.fit()


def _node_id() -> str | None:
    """The Ray node this trial runs on (recorded per trial: which node ran what, on a cluster)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray (tests, benchmarks)
        return None


def _quiet_worker() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def evaluate(manifest: dict, config: dict, weights: str, split: str = "test", role: str = "report") -> dict:
    """Evaluate saved weights on one split, with the split's role checked (the test split only
    serves the final report of a promoted model). Metric names take the split's prefix."""
    import torch

    from trainables import registry
    from trainables.base import cached_splits, seed_everything
    from trainables.speed import _to_device

    from . import checkpoint as ckpt_mod

    _quiet_worker()
    family = registry.get(manifest["trainable"])
    seed_everything(manifest["training"]["seed"], manifest["training"]["deterministic"])
    hp = _hparams({k: v for k, v in config.items() if not k.startswith("_")}, family)
    splits = cached_splits(family, manifest["data"], manifest["model"])
    if not splits.has(split):
        return {}
    ds = splits.get(split, role)
    model = family.build_model(manifest["model"], splits, hp)
    model.load_state_dict(ckpt_mod.load_weights_file(weights))
    if manifest["training"].get("gelu_epilogue"):  # the function the trials trained: the tanh GELU
        from trainables.gelu_lt import tanh_layers
        from trainables.speed import repeated_blocks

        tanh_layers(repeated_blocks(model, min_len=1))
    model.eval()
    # on the GPU when the sweep trained on one and this process has one (the export after a GPU
    # sweep: a 0.5B model's test split took ~2.5 min on the driver's CPU), with the trials' bf16
    gpus = manifest["resources"].get("gpus")
    dev = torch.device("cuda" if torch.cuda.is_available() and gpus not in (None, 0, 0.0) else "cpu")
    bf16 = dev.type == "cuda" and manifest["training"].get("precision") in ("auto", "bf16")
    model.to(dev)
    outs = []
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        for batch in family.loader(ds, manifest["training"]["eval_batch_size"], shuffle=False, seed=0):
            o = family.eval_batch(model, _to_device(batch, dev))
            # bf16 outputs to fp32; class targets stay integers (cross-entropy takes no float targets)
            outs.append({k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()})
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    prefix = {"test": "test_", "val_calib": "calib_", "val_select": "val_"}[split]
    return {prefix + k[len("val_"):]: v for k, v in family.metrics(out, splits).items()}
