"""Checkpoint writer that test_checkpoint.py SIGKILLs at random moments.

    python tests/_ckpt_writer.py ROOT                 write step_0001, step_0002, ... forever
    python tests/_ckpt_writer.py ROOT --fork-server   import torch once, then per "spawn" line on stdin
                                                      fork a writer and print its pid; "reap PID" waits
                                                      for it and prints how it ended ("signal 9")

The fork server exists because importing torch takes ~2 s here: 50 fresh interpreters would
spend 100 s importing. A forked writer is still a separate process that the test kills outright.

Each writer behaves like a trainer resuming: remove partial dirs, continue after the newest step
under its final name, and per step write step_NNNN, overwrite ``latest`` (the replace path), drop
steps older than the newest 3 (the delete path), and log "done N" once step N is fully written
(and "have N" at start: the newest step it found complete).
Tensor contents are a function of the step, so the test can check a loaded checkpoint byte for byte.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sweeper import checkpoint as ck  # noqa: E402

KEEP = 3
N = 256 * 1024  # float32 elements per tensor: 1 MiB each, ~5 MiB per checkpoint


def tensors_for(step: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(step)
    w = torch.randn(512, 512, generator=g)
    model = {"w": w, "w_tied": w, "b": torch.full((N,), float(step))}  # w_tied shares w's storage
    opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(N, generator=g)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}
    return model, opt


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob("step_*"):
        try:
            out.append((int(p.name.split("_")[1]), p))
        except ValueError:
            pass
    return sorted(out)


def run(root: Path) -> None:
    ck.cleanup_partials(root)
    done = step_dirs(root)
    step = (done[-1][0] if done else 0) + 1
    with open(root / "progress.log", "a", buffering=1) as logf:
        logf.write(f"have {step - 1}\n")  # complete before this writer started (its "done" may be unlogged)
        while True:
            model, opt = tensors_for(step)
            state = {"epoch": step, "global_step": step, "metrics": {"loss": 1.0 / step}}
            ck.write_checkpoint(root / f"step_{step:04d}", model, opt, state)
            ck.write_checkpoint(root / "latest", model, opt, state)
            for _, old in step_dirs(root)[:-KEEP]:
                ck.remove_checkpoint(old)
            logf.write(f"done {step}\n")
            step += 1


def fork_server(root: Path) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd == ["spawn"]:
            pid = os.fork()
            if pid == 0:  # child: write until killed; never return into the server loop
                code = 0
                try:
                    run(root)
                except BaseException as e:  # noqa: BLE001 - report, the test fails on a non-kill exit
                    print(f"writer failed: {e!r}", file=sys.stderr, flush=True)
                    code = 3
                os._exit(code)
            print(pid, flush=True)
        elif cmd and cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            if os.WIFSIGNALED(status):
                print(f"signal {os.WTERMSIG(status)}", flush=True)
            else:
                print(f"exit {os.WEXITSTATUS(status)}", flush=True)
        elif cmd == ["quit"]:
            return


if __name__ == "__main__":
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    if "--fork-server" in sys.argv[2:]:
        fork_server(root)
    else:
        print("ready", flush=True)
        run(root)
