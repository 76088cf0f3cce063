"""Tune's TensorBoard logger, kept off the trials' critical path and out of the driver's process.

A function trainable's ``tune.report`` waits for the driver to take the result, so every
millisecond the driver's Python thread spends elsewhere, each reporting trial stands still. Tune's
TensorBoard logger costs the driver in two ways:

- importing tensorboardX, which imports torch: about 1 s of CPU holding the GIL. Done on a thread of
  the driver, as this module did until 2026-11-27, it still stalled the driver: the first trial's
  reports took 0.1-0.15 s each instead of 3 ms (benchmarks/overhead_trace.py, benchmarks/RESULTS.md
  (a5));
- a flush, an fsync, after every result (about 4 ms).

So the event files are written by a child process (``python -m sweeper.tbxproc``), which runs Tune's
own ``TBXLoggerCallback`` on stand-ins for the trials: same files, same tags, same hparams, written
straight into the trial's directory in the sweep (``_events_dir``). The
driver only enqueues. One thread of the driver pickles the items and writes them to the child's
stdin; a full pipe blocks that thread, never the driver. The child starts when the first trial
starts. It flushes by the writer's 30 s timer and at each trial's end, not per result.
``on_experiment_end`` closes the pipe and waits for the child, so the files are complete when
``fit`` returns. Being a ``TBXLoggerCallback``, this replaces Tune's default one. The CSV and JSON
loggers (``progress.csv``/``result.json``, which the results tables read) are Tune's, except that a restored
trial's files carry on from the sweep dir's copies (``_HistoryFromStorage``).
If the child cannot start or dies, the sweep goes on without event files, with one log line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

log = logging.getLogger("sweeper")

_WAIT_S = 120.0  # for the child to write what is queued, at the experiment's end


class BackgroundTBXLoggerCallback(TBXLoggerCallback):
    def __init__(self):  # no tensorboardX import here: the child does it (see the module doc)
        self._trial_writer = {}
        self._trial_result = {}
        self._q = None
        self._thread = None
        self._ids: dict = {}

    # Tune pickles its callbacks into tuner.pkl: no queue, thread or process in the pickle
    def __getstate__(self):
        return {"_trial_writer": {}, "_trial_result": {}, "_q": None, "_thread": None, "_ids": {}}

    def _key(self, trial) -> str:
        return self._ids.setdefault(trial, str(getattr(trial, "trial_id", None) or len(self._ids)))

    def _put(self, item) -> None:
        if self._thread is None:
            self._q = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="sweeper-tbx", daemon=True)
            self._thread.start()
        self._q.put(item)

    def _run(self) -> None:
        """The driver's side of the pipe: start the child, feed it, wait for it at the end."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the child imports sweeper from where the driver did
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        try:
            proc = subprocess.Popen([sys.executable, "-m", "sweeper.tbxproc"], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, env=env)
        except OSError as e:
            log.info("TensorBoard events skipped: the writer process did not start (%s)", e)
            proc = None
        broken = proc is None
        while True:
            item = self._q.get()
            if item is None:
                break
            if broken:
                continue
            try:
                data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 - a value that does not pickle: log the result without it
                data = pickle.dumps(_picklable(item), protocol=pickle.HIGHEST_PROTOCOL)
            try:
                proc.stdin.write(struct.pack("<I", len(data)) + data)
                if self._q.empty():  # caught up: hand the child what is buffered (live TensorBoard)
                    proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                broken = True
                log.info("TensorBoard events incomplete: the writer process exited (%s)", proc.poll())
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            rc = proc.wait(timeout=_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if rc and not broken:
            log.info("TensorBoard events may be incomplete: the writer process exited with %s", rc)

    def log_trial_start(self, trial):
        trial.init_local_path()
        self._put(("start", self._key(trial), _events_dir(trial)))

    def log_trial_result(self, iteration, trial, result):  # Tune drops ``config`` too: it need not pickle
        if trial not in self._ids:
            self.log_trial_start(trial)
        self._put(("result", self._key(trial), iteration, {k: v for k, v in result.items() if k != "config"}))

    def log_trial_end(self, trial, failed=False):
        if trial in self._ids:
            self._put(("end", self._key(trial), bool(failed), getattr(trial, "evaluated_params", None) or {}))
            del self._ids[trial]

    def on_experiment_end(self, trials, **info):
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
        super().on_experiment_end(trials, **info)


def _events_dir(trial) -> str:
    """Where a trial's event files go: straight into its directory in the sweep when that is on this
    machine's disk. Tune's own logger writes to the driver's staging copy, which Tune uploads with each
    snapshot; its last upload comes before ``on_experiment_end``, so events written by the child after
    it would never reach the sweep dir. Elsewhere (remote storage) the staging copy, as Tune does."""
    from .trial import _is_local

    try:
        if trial.path and _is_local(trial.storage.storage_filesystem):
            return str(trial.path)
    except AttributeError:  # no storage context: Tune's own place
        pass
    return str(trial.local_path)


def _picklable(item):
    """``item`` with the values that do not pickle left out (results may hold arbitrary objects)."""
    def ok(v) -> bool:
        try:
            pickle.dumps(v)
            return True
        except Exception:  # noqa: BLE001
            return False

    return tuple({k: v for k, v in x.items() if ok(v)} if isinstance(x, dict) else x for x in item)


class _HistoryFromStorage:
    """Mixin for Tune's JSON and CSV loggers: a trial's ``result.json`` / ``progress.csv`` carry on from the copy in
    the sweep dir when this driver has none yet.

    Each driver session writes these files in its own staging dir and uploads them over the sweep dir's copies.
    On a restore Tune copies the sweep dir's file down first, but only for a trial whose snapshot holds a
    checkpoint (``LoggerCallback._restore_from_remote``). A trial the snapshot held without one (a driver killed
    before the trial's first checkpoint was registered, though its epochs had run and been logged) started its
    file again from nothing, and the upload replaced the sweep dir's history with it: its earlier epochs were gone
    from ``result.json`` and ``metrics.parquet`` (docs/reliability.md, "Lost result history"). Here the sweep dir's
    file is copied down whenever the staging dir has no file of that name yet, checkpoint or not; up to its last
    complete line, so that a copy torn by a killed upload does not leave a broken line in the middle. A file this
    driver already writes (a retry within the session) is kept as it is: it is the newest."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        import pyarrow.fs

        local = Path(trial.local_path, file_name)
        if local.exists() and local.stat().st_size > 0:
            return
        fs, remote = trial.storage.storage_filesystem, Path(trial.storage.trial_fs_path, file_name).as_posix()
        try:
            if fs.get_file_info(remote).type != pyarrow.fs.FileType.File:
                return  # a new trial
            with fs.open_input_stream(remote) as f:
                data = f.readall()
        except Exception as exc:  # noqa: BLE001 - unreadable: start the file as Tune would
            log.warning("trial %s: could not read %s from the sweep dir (%s); it starts again", trial, file_name, exc)
            return
        data = data[: data.rfind(b"\n") + 1]
        if data:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)


class HistoryJsonLogger(_HistoryFromStorage, JsonLoggerCallback):
    """Tune's ``result.json`` logger, carrying a restored trial's history on (``_HistoryFromStorage``)."""


class HistoryCSVLogger(_HistoryFromStorage, CSVLoggerCallback):
    """Tune's ``progress.csv`` logger, carrying a restored trial's history on (``_HistoryFromStorage``)."""


def loggers() -> list:
    """The sweep's Tune loggers: JSON and CSV that keep a restored trial's history (``_HistoryFromStorage``),
    and TensorBoard's event files written by a child process where tensorboardX is installed."""
    hist = [HistoryJsonLogger(), HistoryCSVLogger()]
    if importlib.util.find_spec("tensorboardX") is None:
        return hist  # not installed: Tune's default handling (an info line, no event files)
    return [*hist, BackgroundTBXLoggerCallback()]
