"""Tune's TensorBoard logger, kept off the trials' critical path.

A function trainable's ``tune.report`` blocks until the driver has processed the result (loggers,
callbacks, scheduler, searcher) and asked for the next one, so every millisecond the driver spends
per result is a millisecond each reporting trial stands still. Tune's TensorBoard logger costs the
driver twice: importing tensorboardX (it imports torch: ~2 s, serially before the first trial, or
stealing the CPU the actors need to start up on a small machine) and a flush (an fsync) after every
result (~4 ms).

This subclass writes the same event files from one background thread: the driver only enqueues.
The thread starts at the first trial's start (after the actors are up), imports tensorboardX,
then drains the queue with Tune's own TBX code, flushing by the writer's 30 s timer and at each
trial's end. ``on_experiment_end`` waits for the queue, so the files are complete when ``fit``
returns. Being a ``TBXLoggerCallback``, it replaces Tune's default one; the CSV and JSON loggers
(``progress.csv``/``result.json``, which the results tables read) are untouched.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import threading

from ray.tune.logger import TBXLoggerCallback

log = logging.getLogger("sweeper")


class BackgroundTBXLoggerCallback(TBXLoggerCallback):
    def __init__(self):  # no import here (see the module doc); Tune's state is made on the thread
        self._trial_writer = {}
        self._trial_result = {}
        self._cls = None
        self._q = None
        self._thread = None

    # Tune pickles its callbacks into tuner.pkl: no queue or thread in the pickle
    def __getstate__(self):
        return {"_trial_writer": {}, "_trial_result": {}, "_cls": None, "_q": None, "_thread": None}

    @property
    def _summary_writer_cls(self):
        return self._cls

    def _put(self, item) -> None:
        if self._thread is None:
            self._q = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="sweeper-tbx", daemon=True)
            self._thread.start()
        self._q.put(item)

    def _run(self) -> None:
        try:
            from tensorboardX import SummaryWriter

            self._cls = SummaryWriter
        except Exception as e:  # noqa: BLE001 - no event files, never a failed sweep
            log.info("TensorBoard events skipped: %s", e)
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._cls is None:
                continue
            what, trial, arg = item
            try:
                if what == "start":
                    TBXLoggerCallback.log_trial_start(self, trial)
                elif what == "result":
                    w = self._trial_writer.get(trial)
                    if w is None:
                        TBXLoggerCallback.log_trial_start(self, trial)
                        w = self._trial_writer[trial]
                    w.flush = _noop  # no fsync per result: the 30 s timer and the trial's end flush
                    try:
                        TBXLoggerCallback.log_trial_result(self, arg[0], trial, arg[1])
                    finally:
                        del w.flush
                elif what == "end":
                    TBXLoggerCallback.log_trial_end(self, trial, arg)
            except Exception as e:  # noqa: BLE001
                log.info("TensorBoard event for %s skipped: %s", trial, e)

    def log_trial_start(self, trial):
        trial.init_local_path()
        self._put(("start", trial, None))

    def log_trial_result(self, iteration, trial, result):
        self._put(("result", trial, (iteration, dict(result))))

    def log_trial_end(self, trial, failed=False):
        self._put(("end", trial, failed))

    def on_experiment_end(self, trials, **info):
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        super().on_experiment_end(trials, **info)


def _noop(*_a, **_k) -> None:
    return None


def loggers() -> list:
    if importlib.util.find_spec("tensorboardX") is None:
        return []  # not installed: Tune's default handling (an info line, no event files)
    return [BackgroundTBXLoggerCallback()]
