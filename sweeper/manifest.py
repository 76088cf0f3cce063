"""The manifest: one strict, typed schema for everything a sweep declares.

Loading is a single pass that collects *every* problem and names each by its YAML key
(``search.space.lr.low``), so a user fixes a manifest in one round, not ten. Nothing here
starts Ray, creates a directory or imports torch: ``sweeper validate`` is fully offline.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ManifestError, UserError

MAX_MANIFEST_BYTES = 1_000_000  # a manifest is a page of YAML; 1 MB is generous and stops a 10 MB paste
MAX_YAML_NODES = 20_000  # alias bombs expand to millions of nodes; a real manifest has hundreds


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------- model / data


class ModelSpec(Strict):
    """What network a trial builds."""

    size: str = "tiny"
    """Named size for random init from a config (``tiny``, ``small``, ``qwen2.5-0.5b``, ``vit-s14``...).
    Ignored when ``path`` is set."""
    path: str | None = None
    """Local directory with a Hugging Face config and weights; loaded with ``from_pretrained``."""
    pooling: Literal["last", "mean"] = "last"
    """Qwen regression only: pool the last token or the mean of the sequence."""
    config_overrides: dict[str, int | float | str | bool] = Field(default_factory=dict)
    """Fields set on the Hugging Face config after the named size (``num_hidden_layers: 2``)."""


class GeneratorSpec(Strict):
    """Synthetic data with a learnable signal, for demos and CI."""

    kind: Literal["qwen_synthetic", "images_synthetic"]
    n_train: int = Field(512, ge=8)
    n_val_select: int = Field(128, ge=8)
    n_val_calib: int = Field(64, ge=8)
    n_test: int = Field(128, ge=8)
    seed: int = 0
    dimensions: int = Field(3, ge=1, le=64)
    """qwen_synthetic: number of regression targets."""
    num_classes: int = Field(4, ge=2, le=1000)
    """images_synthetic: number of classes."""
    image_size: int = Field(28, ge=14, le=1024)
    noise: float = Field(0.1, ge=0.0)
    doc_words: list[int] = Field(default_factory=lambda: [10, 16], min_length=2, max_length=2)
    """qwen_synthetic: filler words per document, [low, high] (about 3 tokens each; [400, 420] fills 1024)."""


SPLITS = ("train", "val_select", "val_calib", "test")


class DataSpec(Strict):
    """Where a trial's data comes from: files per split, or a generator."""

    paths: dict[Literal["train", "val_select", "val_calib", "test"], str] | None = None
    generator: GeneratorSpec | None = None
    min_rows: dict[Literal["train", "val_select", "val_calib", "test"], int] = Field(
        default_factory=lambda: {"train": 8, "val_select": 8}
    )
    """Coverage thresholds: a split with fewer rows stops the sweep before any training."""
    max_length: int = Field(64, ge=4, le=32768)
    """Qwen regression: tokens per example after truncation."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.paths is None) == (self.generator is None):
            raise ValueError("give exactly one of `paths` (a file per split) or `generator`")
        if self.paths is not None:
            missing = [s for s in ("train", "val_select") if s not in self.paths]
            if missing:
                raise ValueError(f"`paths` needs at least train and val_select; missing {missing}")
        return self


class Resources(Strict):
    """What one trial asks of the cluster."""

    cpus: float = Field(1.0, gt=0)
    gpus: Union[Annotated[float, Field(ge=0)], Literal["auto"]] = 0.0
    """Per worker. A fraction (0.25) packs several small trials on one GPU. ``auto``: the fraction
    1/k from a one-step memory probe at sweep start (never over-committing); 0 where there is no GPU."""
    workers: int = Field(1, ge=1, le=1024)
    """More than one runs the trial as a Ray Train TorchTrainer worker group."""

    @field_validator("gpus")
    @classmethod
    def _frac(cls, v):
        if v == "auto":
            return v
        if v > 1 and v != int(v):
            raise ValueError(f"got {v}; above 1 a GPU count must be whole")
        return v


# ----------------------------------------------------------------------------------- search space


class LogUniform(Strict):
    type: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Uniform(Strict):
    type: Literal["uniform"]
    low: float
    high: float


class IntRange(Strict):
    type: Literal["int"]
    low: int
    high: int
    """Inclusive."""
    log: bool = False


class Quantized(Strict):
    type: Literal["quniform"]
    low: float
    high: float
    q: float = Field(gt=0)


class Choice(Strict):
    type: Literal["choice"]
    values: list[int | float | str | bool] = Field(min_length=1)


Param = Annotated[Union[LogUniform, Uniform, IntRange, Quantized, Choice], Field(discriminator="type")]
Fixed = Union[int, float, str, bool]


class SearchSpec(Strict):
    algorithm: Literal["optuna", "random"] = "optuna"
    """``optuna``: seeded TPE through Ray Tune's OptunaSearch; ``random``: seeded random sampling."""
    seed: int = 0
    num_samples: int = Field(8, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1, le=10_000)
    space: dict[str, Union[Param, Fixed]] = Field(min_length=1)
    """Hyperparameter -> a distribution, or a plain value to fix it."""


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    time_attr: Literal["epoch", "training_iteration"] = "epoch"
    """What ASHA's rungs count. The same number either way: a trial reports once an epoch, and sweeper sets each
    report's ``training_iteration`` to its epoch (``trial.iteration_is_epoch``), also after a resume."""
    max_t: int = Field(9, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    variant: Literal["stopping", "promotion"] = "stopping"
    """``stopping``: Ray's asynchronous ASHA (a trial goes on unless it is below the cutoff of the
    trials that reached its rung before it). ``promotion``: ASHA as published: a trial waits at its
    rung (paused) until it is in the rung's top 1/reduction_factor, so no more than the ideal share of
    trials leaves each rung (sweeper/asha.py ``PromotingASHA``; benchmarks/RESULTS.md has both)."""


class SelectionSpec(Strict):
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"


class TrainingSpec(Strict):
    max_epochs: int = Field(9, ge=1, le=100_000)
    seed: int = 0
    """Training seed for phase-1 trials (fan-out seeds come from ``promotion.fanout.seeds``)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: fp32 on CPU, bf16 mixed precision on GPU. fp16 is refused for DINOv2 (overflow)."""
    limit_train_batches: int | None = Field(None, ge=1)
    """Cap on training batches per epoch (smoke tests)."""
    eval_batch_size: int = Field(64, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    max_failures: int = Field(2, ge=0)
    """Retries of a failed trial, each from its last checkpoint."""
    hang_timeout_s: float | None = Field(None, gt=0)
    """A running trial that reports nothing for this long (startup included) is killed and counts
    as a failure (retried from its last checkpoint, up to ``max_failures``). None: no watchdog."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept per trial, best by the selection metric."""
    checkpoint_every: int = Field(1, ge=0)
    """Checkpoint every N epochs and at the last one; 0: never (benchmarks only: nothing to promote or resume)."""
    deterministic: bool = True
    strategy: Literal["auto", "lightning", "plain", "ddp", "deepspeed", "fsdp"] = "auto"
    """How a trial trains (docs/gpu.md). ``auto``: GPU trials take the fast path (trainables/speed.py):
    plain PyTorch on one worker, DeepSpeed on several; CPU trials the Lightning loop. ``lightning``:
    always the Lightning loop. ``plain``: one worker, plain PyTorch. ``ddp`` / ``deepspeed``: by name.
    ``fsdp``: ZeRO-3 sharding (parameters, gradients and optimizer state) with PyTorch's FSDP2, each
    repeated block its own unit, compiled as on one GPU (``trainables.speed.shard_fsdp``); one worker
    runs plain."""
    deepspeed: "DeepSpeedSpec" = Field(default_factory=lambda: DeepSpeedSpec())
    """ZeRO settings when the strategy is DeepSpeed."""
    ddp: "DDPSpec" = Field(default_factory=lambda: DDPSpec())
    """DistributedDataParallel settings when the strategy is ``ddp`` with several workers."""
    fsdp: "FSDPSpec" = Field(default_factory=lambda: FSDPSpec())
    """FSDP2 settings when the strategy is ``fsdp`` with several workers."""
    compile: Literal["auto"] | bool = "auto"
    """Regional torch.compile of the repeated blocks. ``auto``: on GPU, except under ZeRO-3."""
    micro_batch: Union[Literal["auto"], int] = "auto"
    """Rows per forward and backward on the fast path (docs/gpu.md). A batch (``batch_size``, the
    hyperparameter) with more rows is split into equal micro-batches whose gradients are accumulated:
    one update per batch, as with the whole batch at once up to rounding. ``auto``: on one GPU process
    without DeepSpeed, the whole batch if its forward and backward fit in the trial's share of GPU
    memory (tried on the epoch's longest batch before the first step, with room for the optimizer
    state), else the largest divisor of the batch that does; elsewhere the whole batch. An int: at most
    that many rows (the largest divisor of the batch that is no larger). The Lightning loop (CPU trials
    under ``strategy: auto``, or ``strategy: lightning``) takes whole batches."""

    bf16_weights: Literal["auto"] | bool = "auto"
    """The model computes with bf16 weights and AdamW updates fp32 master copies (``trainables.speed.
    MasterWeights``; DeepSpeed's bf16 engine does the same), instead of autocast casting fp32 weights in
    every forward. The residual stream is then bf16 too. Measured on the H100, each against the same step
    with this off on the same machine: Qwen2.5-0.5B 3.4 % more tokens/s at batch 64 (45.9 % MFU), ViT-B/14
    4.5 % more images/s at 512, Qwen2.5-1.5B 2.1 % at 16. The loss curves of both stay as
    close as two mixed-precision runs that differ only in batch order (docs/gpu.md). ``auto``: on for
    the fast path's own step on GPUs in bf16: one process (strategy plain, or auto with one worker), and,
    since 2026-11-28, the workers of ``strategy: ddp`` with ``ddp.impl: blocks``, whose reducer then
    averages the fp32 gradient buffers (2×H200, Qwen2.5-1.5B: 2.7 % more tokens/s; a sweep resumed from
    before that date keeps its directory and checkpoints, and its later steps run with it). Off elsewhere,
    and on the CPU. ``true`` where that does not hold is refused."""

    fp8: bool = False
    """The repeated blocks' linear layers multiply in FP8 (``trainables.fp8``: dynamic tensorwise scaling,
    E4M3 forward and E5M2 gradients, the recipe of torchao's ``Float8Linear``); the weights, their
    checkpoints and the optimizer are unchanged. Needs a GPU of compute capability 8.9 or newer (Ada,
    Hopper), or the CPU. It changes the numerics: docs/gpu.md has its speed and its loss curves against
    mixed precision. On the fast path's own step only: one process, or the workers of ``strategy: ddp``
    with ``ddp.impl: blocks`` (not the Lightning loop, DeepSpeed, FSDP or PyTorch's DDP wrapper, where it is
    not tested). With ``bf16_weights`` on a GPU the compiled blocks replay as CUDA graphs (``cuda_graphs: auto``)."""

    cuda_graphs: Literal["auto"] | bool = "auto"
    """The compiled blocks replay as CUDA graphs (Inductor's CUDA graph trees: one launch per block graph
    instead of one per kernel), for steps too short for the host to launch their kernels as fast as the GPU
    runs them. Needs the fast path's own step with compiled repeated blocks and bf16 weights on a GPU
    (``trainables.speed.use_cudagraphs`` says why). ``auto``: with ``fp8``, whose casts double the kernels.
    ``true``: without it too (ViT-S/14 at batch 256 on an H200: 45.7 → 35.8 ms a step, docs/gpu.md; larger
    steps, such as ViT-B/14 at 512 or Qwen2.5-0.5B at 16, are GPU-bound and gain nothing). ``true`` with
    ``compile: false``, ``bf16_weights: false``, precision fp32 or fp16, ``gelu_epilogue`` (not tested together)
    or off the fast path's own step is refused; on a CPU it does nothing."""

    gelu_epilogue: bool = False
    """DINOv2: each block's MLP runs its GELU inside cuBLASLt's matmul epilogues (``trainables.gelu_lt``): the
    first matmul applies it and keeps its input, the backward's matmul applies its gradient, so the
    elementwise passes over the 4·d-wide activation go (ViT-B/14 bs 512 on the H100: 5 % faster a step).
    cuBLASLt's GELU is the tanh form, not DINOv2's erf form, so this changes the numerics (docs/gpu.md has the
    loss curve); the export's test report evaluates the tanh model, and EXPORT.json says so. On CUDA it builds
    a small C file against the CUDA toolkit's cuBLASLt at first use (needs a C compiler and the toolkit's
    headers, not only PyTorch's CUDA wheels); on the CPU the same tanh MLP runs in PyTorch. On the fast path's
    own step in one process, in bf16, and not together with ``fp8``."""

    fast_blocks: bool = True
    """The model family's faster form of its repeated blocks, with the same arithmetic (only where roundings
    happen moves), on the fast path. DINOv2 (``trainables.dinov2_fast``): each LayerScale folded into the
    projection before it (ViT-B/14 at batch 512 on the H100: 3 % faster, 2.4 GB less memory), and the patch
    embedding's convolution computed as one matmul over the patches (on an H200: 2.5 % faster). Families
    without such a form are unchanged. Not under DeepSpeed ZeRO-3. Parameters, checkpoints and the
    optimizer are unchanged."""

    cls_attention: Literal["auto"] | bool = "auto"
    """DINOv2 on CUDA, on the fast path: attention by ``trainables.cls_attn``'s Triton kernels, which keep the
    CLS token out of the tiles (257 tokens run as whole tiles of the 256 patches, and the CLS token's row and
    column as vectors, where PyTorch's fused kernels run 3 × 3 tiles of 128). The same softmax attention; only the
    order of the additions differs. ViT-B/14 at batch 512 on an H200: 4.5-4.9 ms (2.8 %) faster a step.
    ``auto``: on for DINOv2 on CUDA where Triton is installed and either the blocks replay as CUDA graphs or a
    micro-batch's rows × heads reach 3,072 (ViT-B/14 from 256 images; below that, without graphs, launching
    the kernels from Python can cost the host more than they save: ``trainables.speed.use_cls_attention``).
    ``true``: wherever the family has a CLS token. A call whose shape the kernels do not take (a patch count
    that is not a multiple of the tile, fp32, a mask or dropout) runs PyTorch's SDPA. ``true`` for a family
    without a CLS token is refused; on a CPU it does nothing."""

    @field_validator("micro_batch", mode="before")
    @classmethod
    def _micro_batch(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be 'auto' or a whole number of rows >= 1")


class DDPSpec(Strict):
    impl: Literal["torch", "blocks"] = "blocks"
    """``blocks`` (default): each block's gradients all-reduced in place, in one coalesced group, as the
    backward finishes the block (``trainables.speed.BlockAllReduce``: no copy of the gradients into
    buckets, no wrapper around the compiled model). Qwen2.5-1.5B on 2×H100, same call: 97.4k tokens/s
    (0.918 × twice the one-GPU product) against 92.1k for ``torch`` with 500 MB buckets, and 39.4 GB peak
    memory against 46.3 (benchmarks/results/gpu_2026-11-27.md). ``torch``: PyTorch's
    DistributedDataParallel (gradients copied into buckets, each bucket all-reduced); ``bucket_cap_mb``
    and ``comm_hook`` apply to it only."""
    bucket_cap_mb: int = Field(200, ge=1, le=4096)
    """Gradient bucket size for the all-reduce. 200 (PyTorch's default is 25): Qwen2.5-1.5B on 2×H200 ran
    100.3k tokens/s at 200 against 92.3k at 25 in the same call, and 11 GB less peak memory
    (benchmarks/results/gpu_2026-11-26.md; 500 and 1000 MB ran within noise of 200)."""
    comm_hook: Literal["none", "bf16"] = "none"
    """``bf16``: gradients are all-reduced in bf16 (half the traffic; the average is rounded to bf16,
    so the numerics change slightly: benchmarks/results show the loss curve against ``none``)."""

    @model_validator(mode="after")
    def _hook_needs_torch_ddp(self):
        if self.impl == "blocks" and self.comm_hook != "none":
            raise ValueError("comm_hook applies to impl 'torch' only (impl 'blocks' all-reduces in the gradients' dtype)")
        return self


class FSDPSpec(Strict):
    blocks_per_unit: int = Field(4, ge=1, le=64)
    """Consecutive repeated blocks (decoder layers) sharded as one FSDP unit: one all-gather before the
    unit's forward and its backward, one reduce-scatter after its backward. Each unit costs host time
    per step (hooks, copy-in/out, collectives): with one block per unit the Qwen2.5-1.5B step was
    bound by the host, not the GPU. 2×H200, same call: 1 block 0.602, 2 blocks 0.847, 4 blocks 0.907
    × twice the one-GPU product (benchmarks/results/gpu_2026-11-27.md)."""
    fp32_root: bool = False
    """Keep the embedding, final norm and head in fp32 and the residual stream fp32 under autocast (the
    one-GPU numerics; first losses equal DDP's) instead of FSDP's bf16 mixed precision throughout.
    Measured slower: 0.711 (4 blocks per unit) and 0.813 (7) against 0.907 (``trainables.speed.shard_fsdp``)."""


class DeepSpeedSpec(Strict):
    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Optimizer state and step on the CPU (ZeRO-Offload): fits larger models, much slower."""
    offload_params: bool = False
    """Parameters on the CPU between uses (ZeRO-Infinity); stage 3 only."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config merged over the generated one (expert use)."""

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedSpec":
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs stage 1, 2 or 3")
        return self


TrainingSpec.model_rebuild()


class OutputSpec(Strict):
    root: str = "results"
    """Results root. Relative paths are relative to the working directory; a URI (s3://, gs://)
    or a shared filesystem path for clusters."""

    @field_validator("root")
    @classmethod
    def _usable_root(cls, v: str) -> str:
        # the root is trusted configuration (it may be absolute or a symlink), but it must be a path
        # at all: a NUL or a line break would otherwise surface as a traceback at mkdir time
        if not v.strip():
            raise ValueError("must not be empty")
        if any(c in v for c in "\x00\n\r"):
            raise ValueError("must not contain NUL or line breaks")
        if len(v.encode("utf-8", "surrogatepass")) > 4096:
            raise ValueError("is longer than 4096 bytes")
        return v


_GATE_OPS = ("<=", ">=", "<", ">")


class Gate(Strict):
    """``metric op threshold``, e.g. ``val_mae < 1.0``."""

    metric: str
    op: Literal["<", "<=", ">", ">="]
    threshold: float

    def passes(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return {"<": value < self.threshold, "<=": value <= self.threshold,
                ">": value > self.threshold, ">=": value >= self.threshold}[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_gates(raw: dict) -> list[Gate]:
    """``{val_mae: "< 1.0"}`` -> [Gate]. A mapping (not a list) so ``gates.val_mae="<0.8"`` overrides one."""
    out = []
    for metric, cond in raw.items():
        text = str(cond).strip()
        op = next((o for o in _GATE_OPS if text.startswith(o)), None)
        if op is None:
            raise ValueError(f"gate {metric!r}: {text!r} must look like '< 1.0' (one of <, <=, >, >=)")
        try:
            thr = float(text[len(op):])
        except ValueError:
            raise ValueError(f"gate {metric!r}: threshold {text[len(op):].strip()!r} is not a number") from None
        if not math.isfinite(thr):
            raise ValueError(f"gate {metric!r}: threshold must be finite")
        out.append(Gate(metric=metric, op=op, threshold=thr))
    return out


class FinetuneSpec(Strict):
    """A longer run of the winner, initialised from its checkpoint."""

    epochs: int = Field(ge=1, le=100_000)
    transfer: Literal["compatible", "backbone"] = "compatible"


class FanoutSpec(Strict):
    """The promoted config re-run under several seeds; the final choice is on the seed mean."""

    seeds: list[int] = Field(default_factory=lambda: [101, 555, 888], min_length=1, max_length=64)
    candidates: int = Field(2, ge=1, le=16)
    """How many of phase 1's top trials fan out: with 2+, a lucky phase-1 winner loses to a steadier runner-up."""
    epochs: int | None = Field(None, ge=1)
    """Default: training.max_epochs."""
    transfer: Literal["compatible", "backbone"] = "compatible"

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v


class PromotionSpec(Strict):
    finetune: FinetuneSpec | None = None
    fanout: FanoutSpec | None = None


class ExportSpec(Strict):
    enabled: bool = True
    encrypt: bool = False
    key_env: str = "SWEEPER_EXPORT_KEY"
    """Name of the environment variable holding the Fernet key(s); the key itself never appears in a manifest."""
    chunk_mb: int = Field(4, ge=1, le=256)

    @field_validator("key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", v):
            raise ValueError("must be an environment variable NAME (upper-case letters, digits, _), not a key")
        return v


class StageSpec(Strict):
    """One stage of a chain: a manifest file run as a whole pipeline; later stages warm-start
    phase 1 from the previous stage's exported winner."""

    name: str
    manifest: str
    overrides: list[str] = Field(default_factory=list)
    transfer: Literal["auto", "compatible", "backbone"] = "auto"
    """auto: ``compatible`` when the model family and size match the previous stage, else ``backbone``."""


class Manifest(Strict):
    """A sweep: what to train, on which data, over which space, scheduled how, selected on what."""

    name: str
    trainable: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    resources: Resources = Field(default_factory=Resources)
    search: SearchSpec
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    gates: dict[str, str] = Field(default_factory=dict)
    """Conditions checked after each phase, ``{val_mae: "< 1.0"}``; a failed gate stops the pipeline (exit 3)."""
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    init_from: str | None = None
    """Warm-start every phase-1 trial from this checkpoint (set by stage chains and --from-checkpoint)."""
    init_transfer: Literal["compatible", "backbone"] = "compatible"

    def gate_list(self) -> list[Gate]:
        return parse_gates(self.gates)

    @model_validator(mode="after")
    def _promotion_needs_rung_checkpoints(self) -> "Manifest":
        s, every = self.scheduler, self.training.checkpoint_every
        if s.type == "asha" and s.variant == "promotion":  # either time_attr counts epochs (trial.iteration_is_epoch)
            rungs, t = [], float(s.grace_period)
            while t < s.max_t:
                rungs.append(t)
                t *= s.reduction_factor
            bad = [r for r in rungs if not every or r % every]
            if bad:
                raise ValueError(f"scheduler.variant `promotion` pauses trials at rungs {[f'{r:g}' for r in rungs]} and "
                                 f"resumes them from a checkpoint there, but training.checkpoint_every={every} writes "
                                 f"none at epoch(s) {', '.join(f'{r:g}' for r in bad)}")
        return self

    @field_validator("gates")
    @classmethod
    def _gates(cls, v: dict) -> dict:
        parse_gates(v)
        return v


class Chain(Strict):
    """A chain of stages (V2 -> V3 -> V4), each a manifest with its own gates."""

    name: str
    stages: list[StageSpec] = Field(min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)


# ----------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last) and huge graphs."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _count_nodes(node, limit: int) -> int:
    """Count nodes with aliases expanded, stopping early: an alias bomb is caught before it is built."""
    count = 0
    stack = [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.append(k)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return count


def parse_yaml_text(raw: bytes, source: str) -> Any:
    """bytes -> plain Python data, refusing anything a manifest never needs."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UserError(f"{source}: {len(raw)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise UserError(f"{source}: contains a NUL byte")
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise UserError(f"{source}: is empty")
            if _count_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
                raise UserError(f"{source}: more than {MAX_YAML_NODES} YAML nodes (an alias bomb?)")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except UserError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "could not determine a constructor" in str(e):
            problem = "a python object tag or other unsupported tag; manifests hold plain data only"
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply") from None


def read_manifest_file(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and parse a manifest file; returns (data, original text)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise UserError(f"manifest {p}: no such file")
        size = p.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise UserError(f"manifest {p}: {size} bytes is over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"manifest {p}: cannot read ({e.strerror})") from None
    data = parse_yaml_text(raw, f"manifest {p}")
    if not isinstance(data, dict):
        raise UserError(f"manifest {p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, raw.decode("utf-8")


def _loc(loc: tuple) -> str:
    parts = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x in ("loguniform", "uniform", "int", "quniform", "choice", "int|float|str|bool", "str", "int", "float", "bool",
                   "constrained-float"):
            # pydantic adds the union branch it tried; the user's key is what matters
            continue
        else:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts).replace(".[", "[") or "(top level)"


def _pydantic_problems(err: ValidationError) -> list[str]:
    problems: dict[str, str] = {}
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and (x.startswith("function-") or x.endswith("]"))))
        key = _loc(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            msg = "`type` must be one of loguniform, uniform, int, quniform, choice"
        inp = e.get("input")
        if e["type"] not in ("missing", "extra_forbidden") and not isinstance(inp, (dict, list)) and inp is not None:
            shown = repr(inp)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            msg = f"{msg} (got {shown})"
        # a union reports one error per branch; keep the first message per key
        problems.setdefault(key, f"`{key}`: {msg}")
    return list(problems.values())


def _not_one_fast_process(tr, res) -> str | None:
    """What a manifest's trials run where that is not the fast path's own step in each process (one process,
    or the workers of ``strategy: ddp`` with ``ddp.impl: blocks``: what ``training.bf16_weights`` and
    ``training.fp8`` need; ``trainables.speed.one_fast_process`` at run time), else None."""
    if tr.strategy == "lightning" or (tr.strategy == "auto" and res.gpus == 0):
        return "the Lightning loop"
    if tr.strategy == "deepspeed":
        return "DeepSpeed"
    if res.workers > 1:
        if tr.strategy == "ddp" and tr.ddp.impl == "blocks":
            return None
        what = {"ddp": "PyTorch's DDP wrapper (ddp.impl torch)", "fsdp": "FSDP", "plain": "strategy plain",
                "auto": "DeepSpeed (strategy auto)"}[tr.strategy]
        return f"{res.workers} workers under {what}"
    return None


def _semantic_problems(m) -> list[str]:
    """Cross-field rules, in the user's key names. ``m`` may be partial (a section that failed the
    schema is None): every rule whose inputs validated still runs, so one pass reports everything."""
    from trainables import registry  # light: no torch import at registry level

    out: list[str] = []
    fam = registry.describe(m.trainable) if isinstance(m.trainable, str) else None
    if isinstance(m.trainable, str) and fam is None:
        out.append(f"`trainable`: unknown trainable {m.trainable!r}; known: {', '.join(registry.names())}")
    if isinstance(m.name, str):
        from .paths import safe_name  # names become directories

        try:
            safe_name(m.name, "`name`")
        except UserError as e:
            out.append(str(e))
    s, sch, tr, sel, mod, data, res = m.search, m.scheduler, m.training, m.selection, m.model, m.data, m.resources
    for key, p in (s.space.items() if s is not None else ()):
        k = f"search.space.{key}"
        if fam is not None and key not in fam.hyperparameters:
            out.append(f"`{k}`: {m.trainable} has no hyperparameter {key!r}; known: {', '.join(sorted(fam.hyperparameters))}")
        if isinstance(p, float) and not math.isfinite(p):
            out.append(f"`{k}`: fixed value {p} is not finite")
        if isinstance(p, (LogUniform, Uniform, Quantized, IntRange)):
            for f in ("low", "high"):
                v = getattr(p, f)
                if isinstance(v, float) and not math.isfinite(v):
                    out.append(f"`{k}.{f}`: {v} is not finite")
            if not p.low < p.high:
                out.append(f"`{k}.low` is {p.low} but must be < `{k}.high` ({p.high})")
            if isinstance(p, Quantized) and p.q > (p.high - p.low) and p.high > p.low:
                out.append(f"`{k}.q` is {p.q} but must be <= high - low ({p.high - p.low})")
            if isinstance(p, IntRange) and p.log and p.low < 1:
                out.append(f"`{k}.low` is {p.low} but must be >= 1 when `log` is true")
        if isinstance(p, Choice):
            for i, v in enumerate(p.values):
                if isinstance(v, float) and not math.isfinite(v):
                    out.append(f"`{k}.values[{i}]`: {v} is not finite")
            if len({json.dumps(v) for v in p.values}) != len(p.values):
                out.append(f"`{k}.values` has duplicates")
    if sch is not None and sch.type == "asha":
        if sch.grace_period > sch.max_t:
            out.append(f"`scheduler.grace_period` is {sch.grace_period} but must be <= `scheduler.max_t` ({sch.max_t})")
        if tr is not None and sch.max_t > tr.max_epochs:
            out.append(
                f"`scheduler.max_t` is {sch.max_t} but trials stop at `training.max_epochs` ({tr.max_epochs}); "
                "make them equal"
            )
    if fam is not None:
        if sel is not None and sel.metric not in fam.metrics:
            out.append(f"`selection.metric`: {m.trainable} reports no metric {sel.metric!r}; known: {', '.join(fam.metrics)}")
        elif sel is not None and fam.metrics[sel.metric] != sel.mode:
            out.append(
                f"`selection.mode` is {sel.mode!r} but {sel.metric} is better when "
                f"{'lower' if fam.metrics[sel.metric] == 'min' else 'higher'}: use {fam.metrics[sel.metric]!r}"
            )
        for gm in (m.gates or {}) if isinstance(getattr(m, "gates", None), dict) else ():
            if gm not in fam.metrics:
                out.append(f"`gates.{gm}`: {m.trainable} reports no metric {gm!r}; known: {', '.join(fam.metrics)}")
        if tr is not None and tr.precision == "fp16" and not fam.allows_fp16:
            out.append(f"`training.precision`: fp16 is refused for {m.trainable}: {fam.fp16_reason}; use bf16 or fp32")
        if data is not None and data.generator is not None and data.generator.kind != fam.generator:
            out.append(f"`data.generator.kind`: {m.trainable} takes {fam.generator!r}, got {data.generator.kind!r}")
        if mod is not None and mod.path is None and mod.size not in fam.sizes:
            out.append(f"`model.size`: unknown size {mod.size!r} for {m.trainable}; known: {', '.join(fam.sizes)}")
    init = getattr(m, "init_from", None)
    if isinstance(init, str) and not Path(init).exists():
        out.append(f"`init_from`: {init} does not exist")
    if mod is not None and mod.path is not None and not Path(mod.path).exists():
        out.append(f"`model.path`: {mod.path} does not exist")
    for split, p in ((data.paths or {}).items() if data is not None else ()):
        if not Path(p).exists():
            out.append(f"`data.paths.{split}`: {p} does not exist")
    if res is not None and res.workers > 1 and res.gpus != "auto" and res.gpus != int(res.gpus):
        out.append("`resources.gpus`: a multi-worker trial takes whole GPUs per worker")
    if (res is not None and tr is not None and isinstance(tr.micro_batch, int)
            and (tr.strategy == "lightning" or (tr.strategy == "auto" and res.gpus == 0))):
        out.append("`training.micro_batch`: the Lightning loop takes whole batches (this manifest's trials run it: "
                   f"strategy {tr.strategy}, resources.gpus {res.gpus}); micro-batches are for the fast path "
                   "(GPU trials, or strategy plain, ddp, fsdp or deepspeed)")
    if res is not None and tr is not None and tr.bf16_weights is True:
        where = _not_one_fast_process(tr, res) or (f"precision {tr.precision}" if tr.precision in ("fp32", "fp16")
                                                   else None)
        if where:
            out.append(f"`training.bf16_weights`: {BF16_WEIGHTS_NEEDS}, but this manifest's trials run {where}")
    if res is not None and tr is not None and tr.fp8:
        where = _not_one_fast_process(tr, res)
        if where:
            out.append(f"`training.fp8`: {FP8_NEEDS}, but this manifest's trials run {where}")
    if res is not None and tr is not None and tr.cuda_graphs is True:
        where = (_not_one_fast_process(tr, res) or ("compile false" if tr.compile is False else None)
                 or ("bf16_weights false" if tr.bf16_weights is False else None)
                 or (f"precision {tr.precision}" if tr.precision in ("fp32", "fp16") else None)
                 or ("gelu_epilogue (not tested together)" if tr.gelu_epilogue else None))
        if where:
            out.append(f"`training.cuda_graphs`: true needs compiled blocks with bf16 weights on the fast path's own "
                       f"step, but this manifest's trials run {where}")
    if res is not None and tr is not None and tr.gelu_epilogue:
        where = _not_one_fast_process(tr, res)
        if fam is not None and not fam.gelu_mlp:
            out.append(f"`training.gelu_epilogue`: {m.trainable} has no GELU MLP (DINOv2's blocks have one)")
        elif tr.fp8:
            out.append("`training.gelu_epilogue`: not with `training.fp8` (the MLP's first layer would be FP8's)")
        elif where or res.workers > 1 or tr.precision in ("fp32", "fp16"):
            what = where or (f"{res.workers} workers" if res.workers > 1 else f"precision {tr.precision}")
            out.append(f"`training.gelu_epilogue`: {GELU_EPILOGUE_NEEDS}, but this manifest's trials run {what}")
    if tr is not None and tr.cls_attention is True and fam is not None and not fam.cls_token:
        out.append(f"`training.cls_attention`: {m.trainable} has no CLS token (DINOv2's sequences start with one)")
    if res is not None and tr is not None and tr.strategy == "plain" and res.workers > 1:
        out.append("`training.strategy`: plain runs one worker; use ddp, fsdp or deepspeed with `resources.workers` > 1")
    return out


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply ``a.b.c=value`` overrides in place. Values parse as YAML scalars (``1e-3``, ``true``,
    ``[1,2]``); types are checked by the schema afterwards, so ``training.max_epochs=abc`` fails
    there with the key's name. Unknown top-level keys fail here (nanoGPT's rule: no silent typos).
    Returns the applied overrides as a flat dict, and the problems found."""
    applied: dict[str, Any] = {}
    problems = []
    for ov in overrides:
        if "=" not in ov:
            problems.append(f"override {ov!r}: expected key=value")
            continue
        key, _, raw = ov.partition("=")
        key = key.strip()
        try:
            value = parse_yaml_text(raw.encode(), f"override {key}") if raw.strip() else ""
        except UserError as e:
            problems.append(str(e))
            continue
        parts = key.split(".")
        if not all(parts):
            problems.append(f"override {ov!r}: empty key segment")
            continue
        if not _known_path(parts, data):
            problems.append(f"override `{key}`: unknown key")
            continue
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
        applied[key] = value
    return applied, problems


def _known_path(parts: list[str], data: dict) -> bool:
    """An override key must name a schema field, or a key inside a free-form mapping
    (search.space.*, model.config_overrides.*, data.paths.*, data.min_rows.*)."""
    model: type[BaseModel] | None = Manifest
    for i, p in enumerate(parts):
        if model is None:
            return True  # inside a free-form mapping
        fields = model.model_fields
        if p not in fields:
            return False
        ann = fields[p].annotation
        model = _submodel(ann)
        if model is None and i < len(parts) - 1:
            # a dict-typed field (space, paths, ...): anything below is data
            return _is_mapping(ann)
    return True


def _submodel(ann) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _is_mapping(ann) -> bool:
    import typing

    if typing.get_origin(ann) is dict:
        return True
    return any(typing.get_origin(a) is dict for a in typing.get_args(ann))


def validate_data(data: dict, source: str, pre_problems: list[str] | None = None) -> Manifest:
    """Schema + cross-field rules; raises ManifestError listing every problem."""
    problems = list(pre_problems or [])
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        problems += _pydantic_problems(e)
        problems += _semantic_problems(_partial(data))
        raise ManifestError(source, problems) from None
    problems += _semantic_problems(m)
    if problems:
        raise ManifestError(source, problems)
    return m


class _Partial:
    pass


def _partial(data: dict):
    """Each top-level section validated on its own; failures become None (for cross-field rules)."""
    p = _Partial()
    for name, field in Manifest.model_fields.items():
        raw = data.get(name) if isinstance(data, dict) else None
        sub = _submodel(field.annotation)
        if raw is None and field.default_factory is not None:
            raw = {}
        try:
            if sub is not None:
                val = sub.model_validate(raw)
            else:
                val = raw if isinstance(raw, str) else None
        except ValidationError:
            val = None
        setattr(p, name, val)
    return p


class Loaded:
    """A validated manifest plus where it came from."""

    def __init__(self, manifest: Manifest, original_text: str, overrides: dict[str, Any], path: Path | None):
        self.manifest = manifest
        self.original_text = original_text
        self.overrides = overrides
        self.path = path

    def resolved(self) -> dict:
        return self.manifest.model_dump(mode="json")

    def identity(self) -> str:
        """Hash of what determines results: same manifest + overrides -> same sweep directory
        (so re-running resumes or reuses it). ``output`` is excluded: moving the root does not change results.
        Settings added to the schema later are left out while they hold their default (``LATER_DEFAULTS``),
        so a sweep started before they existed keeps its directory."""
        d = self.resolved()
        d.pop("output", None)
        for (section, key), default in LATER_DEFAULTS.items():
            if d.get(section, {}).get(key, default) == default:
                d.get(section, {}).pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# Why ``training.bf16_weights: true`` is refused where it is (the schema check and trainables.speed say it alike)
BF16_WEIGHTS_NEEDS = ("true needs bf16 precision on the fast path's own step (one process, or the workers of "
                      "strategy ddp with ddp.impl blocks; DeepSpeed's bf16 engine and FSDP already keep bf16 weights "
                      "with fp32 masters)")


# Where ``training.fp8: true`` runs (the schema check and trainables.speed.use_fp8 say it alike)
FP8_NEEDS = ("true needs the fast path's own step (a one-worker GPU trial, strategy plain, or the workers of "
             "strategy ddp with ddp.impl blocks; not the Lightning loop, DeepSpeed, FSDP or PyTorch's DDP wrapper, "
             "where FP8 is not tested)")


# Where ``training.gelu_epilogue: true`` runs (the schema check and trainables.speed.use_gelu_epilogue say it alike)
GELU_EPILOGUE_NEEDS = ("true needs the fast path's own step in one process (a one-worker GPU trial, or strategy plain), "
                       "in bf16; not the Lightning loop, DeepSpeed, FSDP or several workers, where it is not tested")


# Settings added after sweeps were already being run, with the default that behaves as before they existed.
# A new setting with a default belongs here: at that default it leaves a sweep's identity (its directory) as
# it was, so re-running an older manifest still resumes its sweep. (tests/test_manifest.py holds an identity
# computed before ``training.micro_batch`` was added.)
LATER_DEFAULTS: dict[tuple[str, str], Any] = {("training", "micro_batch"): "auto", ("training", "bf16_weights"): "auto",
                                              ("training", "fp8"): False, ("training", "fast_blocks"): True,
                                              ("training", "gelu_epilogue"): False, ("training", "cuda_graphs"): "auto",
                                              ("training", "cls_attention"): "auto"}


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Loaded:
    data, text = read_manifest_file(path)
    data = copy.deepcopy(data)
    applied, problems = apply_overrides(data, overrides or [])
    m = validate_data(data, f"manifest {path}", problems)
    return Loaded(m, text, applied, Path(path))
