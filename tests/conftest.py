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
