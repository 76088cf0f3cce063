"""Trainables register by name; the manifest names them.

``describe`` answers schema questions (hyperparameters, metrics, sizes) without importing torch,
so ``sweeper validate`` stays fast and offline. ``get`` imports the family's module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    module: str
    hyperparameters: dict[str, object]
    """Name -> default. The search space may only name these."""
    metrics: dict[str, str]
    """Reported metric -> the mode in which it is better ("min"/"max")."""
    sizes: tuple[str, ...]
    generator: str
    allows_fp16: bool = True
    fp16_reason: str = ""
    backbone_prefix: str = "backbone."
    gelu_mlp: bool = False
    """The blocks hold fc1 → GELU → fc2 MLPs (``training.gelu_epilogue`` applies)."""
    cls_token: bool = False
    """The sequence is one CLS token and then the patches (``training.cls_attention`` applies)."""
    extra: dict = field(default_factory=dict)


_COMMON_HP = {
    "lr": 1e-3,
    "weight_decay": 0.01,
    "batch_size": 32,
    "warmup_ratio": 0.0,
    "dropout": 0.0,
    "grad_clip": None,
}

_FAMILIES: dict[str, FamilyInfo] = {
    "qwen_regression": FamilyInfo(
        name="qwen_regression",
        module="trainables.qwen_regression",
        hyperparameters={**_COMMON_HP, "pooling": None},
        metrics={"val_loss": "min", "val_mae": "min", "val_rmse": "min"},
        sizes=("tiny", "small", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"),
        generator="qwen_synthetic",
    ),
    "dinov2_classifier": FamilyInfo(
        name="dinov2_classifier",
        module="trainables.dinov2_classifier",
        hyperparameters={**_COMMON_HP, "label_smoothing": 0.0},
        metrics={"val_loss": "min", "val_acc": "max", "val_ece": "min"},
        sizes=("tiny", "small", "vit-s14", "vit-b14"),
        generator="images_synthetic",
        allows_fp16=False,
        fp16_reason="DINOv2 activations overflow fp16's range (65504) and the loss turns NaN",
        gelu_mlp=True,
        cls_token=True,
    ),
    # benchmarks only: no model and no data, each epoch sleeps (platform-overhead measurements)
    "sleep_bench": FamilyInfo(
        name="sleep_bench",
        module="trainables.sleep_bench",
        hyperparameters={"lr": 1e-3, "sleep_s": 0.2},
        metrics={"val_loss": "min"},
        sizes=("tiny",),
        generator="qwen_synthetic",  # the data section is required but ignored
    ),
}


def names() -> list[str]:
    return sorted(_FAMILIES)


def describe(name: str) -> FamilyInfo | None:
    return _FAMILIES.get(name)


def get(name: str):
    """The family object (imports torch and transformers)."""
    info = _FAMILIES.get(name)
    if info is None:
        from sweeper.errors import UserError

        raise UserError(f"unknown trainable {name!r}; known: {', '.join(names())}")
    return importlib.import_module(info.module).FAMILY
