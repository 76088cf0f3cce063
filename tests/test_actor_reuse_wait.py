"""A reused trial actor waits for the previous trial's thread to end.

Tune stops a trial (ASHA, max_t, a stop rule) while its function may still be running its last
steps (a large checkpoint's staging dir being removed, GPU memory given back). Tune's reset waits
2 s for that; past it the reset fails and Tune 2.60 errors the next trial without telling the
searcher, so a sweep with a concurrency limit waited forever (0.5B trials on the H100). The trial
function here takes 4 s to wind down after it is stopped; with SWEEPER_REUSE_WAIT_S=2 (Tune's own
wait) this test hangs until its timeout.
"""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.usefixtures("ray_session")


def _slow_to_end(config):
    from ray import tune

    try:
        for _ in range(3):
            tune.report({"loss": config["x"], "pid": os.getpid()})
    finally:  # runs when Tune stops the trial at a report: like a trial's cleanup of its checkpoint staging dir
        time.sleep(4)


@pytest.mark.timeout(180)  # the bug this guards against hangs the sweep (Tune's time budget does not end it)
def test_reused_actor_waits_for_the_last_trial_to_wind_down(tmp_path):
    from ray import tune

    from sweeper.trial import sweeper_trainable

    trainable = sweeper_trainable(tune.with_resources(_slow_to_end, {"cpu": 1}))
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1.0, 2.0, 3.0])},
        tune_config=tune.TuneConfig(metric="loss", mode="min", reuse_actors=True, max_concurrent_trials=1,
                                    time_budget_s=120),
        run_config=tune.RunConfig(name="reuse", storage_path=str(tmp_path), stop={"training_iteration": 1},
                                  verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors, [str(e)[:300] for e in grid.errors]
    assert len(grid) == 3 and all(r.metrics["training_iteration"] == 1 for r in grid)
    pids = {r.metrics["pid"] for r in grid}
    assert len(pids) == 1, f"each trial got a fresh actor: {pids}"
