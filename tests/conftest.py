"""Shared fixtures: one local Ray for the whole session (ray.init costs ~6 s here), tiny manifests."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_QWEN = {
    "name": "t-qwen",
    "trainable": "qwen_regression",
    "model": {"size": "tiny", "pooling": "mean", "config_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}},
    "data": {"generator": {"kind": "qwen_synthetic", "n_train": 64, "n_val_select": 32, "n_val_calib": 16, "n_test": 16,
                           "dimensions": 2, "seed": 0},
             "max_length": 32, "min_rows": {"train": 16, "val_select": 16}},
    "resources": {"cpus": 1, "gpus": 0, "workers": 1},
    "search": {"algorithm": "optuna", "seed": 0, "num_samples": 2, "max_concurrent": 2,
               "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}, "batch_size": 16}},
    "scheduler": {"type": "asha", "time_attr": "epoch", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
    "selection": {"metric": "val_mae", "mode": "min"},
    "training": {"max_epochs": 3, "seed": 0},
}


@pytest.fixture
def tiny_qwen():
    return copy.deepcopy(TINY_QWEN)


@pytest.fixture
def write_manifest(tmp_path):
    def write(data: dict, name: str = "m.yaml") -> Path:
        data = copy.deepcopy(data)
        data.setdefault("output", {"root": str(tmp_path / "results")})
        p = tmp_path / name
        p.write_text(yaml.safe_dump(data, sort_keys=False))
        return p

    return write


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it; subprocess CLIs join it through RAY_ADDRESS."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    addr = ray.get_runtime_context().gcs_address
    yield addr
    ray.shutdown()


@pytest.fixture
def ray_starts(monkeypatch):
    """Every call the code under test makes to start or join Ray, recorded.

    Checking ``ray.is_initialized()`` instead would depend on test order: the shared
    session Ray (above) is up whenever an earlier test in the run asked for it.
    """
    import sweeper.runner as runner

    calls: list = []
    real = runner.init_ray

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "init_ray", spy)
    return calls


@pytest.fixture(autouse=True)
def _ray_resources_given_back(request):
    """A test that leaves actors holding the shared Ray's CPUs would hang a later trial.

    After every test that used the session Ray, wait for its resources to come back and fail
    the test that kept them, naming the actors still alive.
    """
    yield
    if "ray_session" not in request.fixturenames:
        return
    import time

    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total - 1e-6:
            return
        time.sleep(0.5)
    from ray._private.state import actors  # GCS table: works without the dashboard

    alive = [(a.get("ActorClassName"), a.get("Name"), a.get("State")) for a in actors().values() if a.get("State") != "DEAD"]
    from ray.util.placement_group import placement_group_table

    from sweeper.watchdog import free_placement_group

    left = {k: v["bundles"] for k, v in placement_group_table().items() if v.get("state") != "REMOVED"}
    for k in left:  # free them so one leak fails one test, not every later one by a hang
        free_placement_group(k)
    pytest.fail(f"Ray CPUs not given back 60 s after the test ({ray.available_resources().get('CPU')}/{total}): actors {alive}, placement groups {left}")
