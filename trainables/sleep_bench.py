"""A model-free trainable for platform-overhead benchmarks (``benchmarks/overhead.py``).

Each "epoch" sleeps ``sleep_s`` seconds and reports; nothing is built, no torch import. It goes
through the product's whole path (manifest -> runner -> Tune -> trial_fn -> reporter -> results),
so the time a sweep of these takes beyond ``trials x epochs x sleep_s / slots`` is the platform's
own overhead. Checkpoints follow ``training.checkpoint_every`` like any family (0: none).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time


class SleepFamily:
    """Duck-types the parts of ``trainables.base.Family`` the runner needs: ``info`` and ``run_trial``."""

    def __init__(self):
        from .registry import describe

        self.info = describe("sleep_bench")

    def run_trial(self, config: dict, spec, reporter) -> dict:
        """The whole trial (no Lightning): ``max_epochs`` reports, ``sleep_s`` apart."""
        t0 = time.perf_counter()
        wall0 = time.time()  # epoch seconds: benchmarks/overhead_trace.py lines them up with the driver's clock
        m = spec.manifest
        training = m["training"]
        sleep_s = float(config.get("sleep_s", self.info.hyperparameters["sleep_s"]))
        max_epochs = int(spec.max_epochs or training["max_epochs"])
        every = int(training.get("checkpoint_every", 1))
        metric = m["selection"]["metric"]
        lr = float(config.get("lr", 1e-3))
        train_s = ckpt_s = 0.0
        first_step = time.perf_counter()
        last: dict = {}
        report_prev_s = 0.0  # how long the previous report took (the benchmark's trace prints it)
        for epoch in range(1, max_epochs + 1):
            t = time.perf_counter()
            time.sleep(sleep_s)
            train_s += time.perf_counter() - t
            metrics = {metric: abs(lr - 1e-3) / epoch, "epoch": epoch, "phase": spec.phase,
                       "time_startup_s": first_step - t0, "time_train_s": train_s, "time_eval_s": 0.0}
            ck = None
            tmp = None
            if every and (epoch % every == 0 or epoch == max_epochs):
                from sweeper import checkpoint as ckpt_mod

                t = time.perf_counter()
                tmp = tempfile.mkdtemp(prefix="sweeper-ckpt-")
                ck = os.path.join(tmp, "ckpt")
                ckpt_mod.write_checkpoint(ck, {}, None, {"epoch": epoch, "metrics": metrics, "trainable": "sleep_bench"})
                ckpt_s += time.perf_counter() - t
            metrics["time_ckpt_s"] = ckpt_s
            metrics["time_wall_s"] = time.perf_counter() - t0
            metrics["t_trial_begin"], metrics["t_report"] = wall0, time.time()
            metrics["report_prev_s"] = report_prev_s
            last = metrics
            t = time.perf_counter()
            try:
                reporter.report(metrics, ck)
            finally:
                report_prev_s = time.perf_counter() - t
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
        return last


FAMILY = SleepFamily()
