"""What every model family shares: seeding, precision policy, the LightningModule, data caching.

A family module (``qwen_regression``, ``dinov2_classifier``) supplies four things: how to load
its data into ``Splits``, how to build its model (a ``backbone`` plus a ``head``), a loss on a
batch, and metrics over a split. Everything else — the optimizer, the schedule, NaN handling,
evaluation cadence — is here, once.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .registry import FamilyInfo
from .splits import Splits


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        # warn_only: some fused GPU kernels have no deterministic variant; they stay usable
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def resolve_precision(requested: str, on_gpu: bool, info: FamilyInfo) -> str:
    """fp32 on CPU, bf16 mixed on GPU; fp16 only where the family allows it."""
    if requested == "fp16" and not info.allows_fp16:
        from sweeper.errors import UserError

        raise UserError(f"training.precision: fp16 is refused for {info.name}: {info.fp16_reason}")
    if requested == "auto":
        return "bf16-mixed" if on_gpu else "32-true"
    return {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[requested]


class Regressor(nn.Module):
    """A backbone and a head, with the names the transfer rules rely on (``backbone.``/``head.``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head


@dataclass
class HParams:
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup_ratio: float = 0.0
    dropout: float = 0.0
    grad_clip: float | None = None
    pooling: str | None = None
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config: dict, defaults: dict) -> "HParams":
        known = {k: config.get(k, defaults.get(k)) for k in cls.__dataclass_fields__ if k in defaults}
        known = {k: v for k, v in known.items() if v is not None}
        hp = cls(**known)
        hp.batch_size = int(hp.batch_size)
        return hp


class Family:
    """Base class; subclasses set ``info`` and implement the four hooks."""

    info: FamilyInfo

    def load_splits(self, data_spec: dict, model_spec: dict) -> Splits:
        raise NotImplementedError  # abstract

    def build_model(self, model_spec: dict, splits: Splits, hp: HParams) -> nn.Module:
        raise NotImplementedError  # abstract

    def loss(self, model: nn.Module, batch: Any, hp: HParams) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def eval_batch(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Per-example outputs to accumulate (e.g. predictions, targets)."""
        raise NotImplementedError  # abstract

    def metrics(self, outputs: dict[str, torch.Tensor], splits: Splits) -> dict[str, float]:
        raise NotImplementedError  # abstract

    def collate(self, rows):
        return torch.utils.data.default_collate(rows)

    def fast_blocks(self, model: nn.Module) -> int:
        """``training.fast_blocks``: make the model's repeated blocks a faster form with the same arithmetic, in
        place (parameters and state dict unchanged), before they are compiled. Returns how many blocks
        changed; a family without such a form changes none."""
        return 0

    def compile_rest(self, model: nn.Module) -> int:
        """With ``training.compile`` on the fast path: compile the model's parts outside its repeated blocks
        that run as many small eager kernels (after ``speed.compile_blocks``). Returns how many regions; a
        family without such parts compiles none."""
        return 0

    # shared ---------------------------------------------------------------------------------
    def loader(self, dataset, batch_size: int, shuffle: bool, seed: int, first_epoch: int = 0):
        """Batches of ``dataset``; shuffled, each epoch's order depends on (seed, epoch) alone, so a
        trial resumed at epoch k trains on exactly the batches an uninterrupted one would
        (``first_epoch``: the epochs already done; the fast path's ``index_batches`` does the same)."""
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededSampler(len(dataset), seed, first_epoch) if shuffle else None,
            collate_fn=self.collate,
            num_workers=0,  # CPU trials share 1-2 cores; GPU benchmarks pass their own loaders
            drop_last=False,
        )


class EpochSeededSampler(torch.utils.data.Sampler):
    """A random order per epoch, from ``seed * 7919 + epoch`` (epochs counted from 1, as the fast
    path counts them) instead of one generator carried across epochs: epoch e's order is the same
    whether the run started at epoch 1 or resumed at e. Each ``iter()`` is the next epoch."""

    def __init__(self, n: int, seed: int, first_epoch: int = 0):
        self.n, self.seed, self.epoch = n, seed, first_epoch

    def __iter__(self):
        self.epoch += 1
        g = torch.Generator()
        g.manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


_DATA_CACHE: dict[str, Splits] = {}


def _data_key(family: Family, data_spec: dict, model_spec: dict) -> str:
    import json

    return family.info.name + json.dumps([data_spec, model_spec.get("path"), model_spec.get("size")], sort_keys=True)


def data_cache_has(family: Family, data_spec: dict, model_spec: dict) -> bool:
    """Whether this process already holds the data (a reused actor's second and later trials)."""
    return _data_key(family, data_spec, model_spec) in _DATA_CACHE


def cached_splits(family: Family, data_spec: dict, model_spec: dict) -> Splits:
    """Data is built once per worker process and reused by every trial a reused actor runs."""
    key = _data_key(family, data_spec, model_spec)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # keep one dataset per process: trials of one sweep share it
        _DATA_CACHE[key] = family.load_splits(data_spec, model_spec)
    return _DATA_CACHE[key]


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warm = int(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f
