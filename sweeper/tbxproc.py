"""The TensorBoard writer process of a sweep (started by ``sweeper.tunelog``; not a user command).

Reads length-prefixed pickles from stdin, written by the sweep's own driver (never from a file or
the network): ``("start", key, logdir)``, ``("result", key, iteration, result)`` and
``("end", key, failed, evaluated_params)``. Each goes to Tune's own ``TBXLoggerCallback``, so the
event files, tags and hparams are what Tune would write. Flushes by the writer's 30 s timer and at
each trial's end, not per result. At end of input it closes every writer and exits.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys


class _Trial:
    """What ``TBXLoggerCallback`` reads of a trial: a hashable key, its directory, its parameters."""

    def __init__(self, key: str, local_path: str):
        self.key, self.local_path, self.evaluated_params = key, local_path, {}

    def init_local_path(self) -> None:  # the trial's dir in the sweep: Tune may not have made it yet
        os.makedirs(self.local_path, exist_ok=True)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Trial) and other.key == self.key

    def __str__(self) -> str:
        return self.key


def _noop(*_a, **_k) -> None:
    return None


def _frames(stream):
    while True:
        head = stream.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack("<I", head)
        data = stream.read(n)
        if len(data) < n:
            return
        yield pickle.loads(data)  # noqa: S301 - written by this sweep's driver over a private pipe


def main() -> int:
    from ray.tune.logger.tensorboardx import TBXLoggerCallback

    cb = TBXLoggerCallback()
    trials: dict[str, _Trial] = {}
    for item in _frames(sys.stdin.buffer):
        what, key = item[0], item[1]
        try:
            if what == "start":
                trials[key] = t = _Trial(key, item[2])
                cb.log_trial_start(t)
            elif what == "result" and key in trials:
                t = trials[key]
                w = cb._trial_writer.get(t)
                if w is None:
                    cb.log_trial_start(t)
                    w = cb._trial_writer[t]
                w.flush = _noop  # no fsync per result: the 30 s timer and the trial's end flush
                try:
                    cb.log_trial_result(item[2], t, item[3])
                finally:
                    del w.flush
            elif what == "end" and key in trials:
                t = trials.pop(key)
                t.evaluated_params = item[3]
                cb.log_trial_end(t, item[2])
        except Exception as e:  # noqa: BLE001 - one bad result costs its own event, not the others
            print(f"sweeper.tbxproc: {what} of {key} skipped: {e}", file=sys.stderr)
    for w in list(cb._trial_writer.values()):
        w.close()
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stderr.flush()
    os._exit(rc)  # every writer is closed: skip the interpreter's teardown (about 1 s with torch imported)
