"""Tune's per-trial loggers, kept off the trial's critical path.

A function trainable's ``tune.report`` blocks until the driver has processed the result (loggers,
callbacks, scheduler, searcher) and asked for the next one, so every millisecond the driver spends
per result is a millisecond each reporting trial stands still. Tune's TensorBoard logger flushes
(an fsync) after every result: ~4 ms per result here, most of the driver's per-result time. This
subclass writes the same events but leaves flushing to the writer's own 30 s timer and to the
trial's end (``log_trial_end`` closes the file). Passing it makes Tune skip its default TBX logger;
the CSV and JSON loggers (``progress.csv``/``result.json``, which the results tables read) stay.
"""

from __future__ import annotations

import importlib.util
import threading

from ray.tune.logger import TBXLoggerCallback


_IMPORT: dict = {}  # one background import per process, shared by every callback instance


def _start_import() -> None:
    if "thread" in _IMPORT:
        return

    def run():
        from tensorboardX import SummaryWriter

        _IMPORT["cls"] = SummaryWriter

    t = threading.Thread(target=run, name="sweeper-tbx-import", daemon=True)
    _IMPORT["thread"] = t
    t.start()


class BufferedTBXLoggerCallback(TBXLoggerCallback):
    def __init__(self):
        # Tune's __init__ imports tensorboardX, which imports torch: ~2 s on the driver before the
        # first trial can start. Import it on a thread instead, overlapping the actors' start-up;
        # the first trial's log_trial_start waits for it (long done by then). No thread or lock is
        # kept on the instance: Tune pickles its callbacks into tuner.pkl.
        self._trial_writer = {}
        self._trial_result = {}
        _start_import()

    @property
    def _summary_writer_cls(self):
        _start_import()  # after unpickling in a fresh process
        _IMPORT["thread"].join()
        return _IMPORT["cls"]

    def log_trial_result(self, iteration, trial, result):
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        w = self._trial_writer[trial]
        w.flush = _noop  # instance attribute shadows the method for this call only
        try:
            super().log_trial_result(iteration, trial, result)
        finally:
            del w.flush


def _noop(*_a, **_k) -> None:
    return None


def loggers() -> list:
    if importlib.util.find_spec("tensorboardX") is None:
        return []  # not installed: Tune's default handling (an info line, no event files)
    return [BufferedTBXLoggerCallback()]
