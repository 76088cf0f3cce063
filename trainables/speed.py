"""The fast training path for GPU trials: plain PyTorch on one GPU, DDP, FSDP2 or DeepSpeed on several.

Chosen by ``training.strategy`` (``auto``: this path whenever a trial asks for GPUs and CUDA is
there; the Lightning loop otherwise, so CPU trials and tests keep their behaviour). What makes it
fast, each measured in ``benchmarks/`` against the plain-PyTorch step it wraps:

- bf16 autocast (plain/DDP) or DeepSpeed's bf16 engine, TF32 for any fp32 matmul left; on one GPU process
  bf16 weights with fp32 masters (``MasterWeights``, ``training.bf16_weights``); optionally FP8 matmuls in
  the blocks' linear layers (``trainables/fp8.py``, ``training.fp8``, off by default);
- fused AdamW (``torch.optim.AdamW(fused=True)``; also under DeepSpeed, through
  ``zero_allow_untested_optimizer``: no just-in-time build of DeepSpeed's own ops);
- SDPA attention (the families build their configs with ``attn_implementation="sdpa"``);
- the family's faster form of its blocks with the same arithmetic (``Family.fast_blocks``,
  ``training.fast_blocks``; DINOv2's LayerScale folded into the projections, ``trainables/dinov2_fast.py``);
- regional ``torch.compile`` (each repeated block compiled once, ``training.compile``);
- no host stalls: batches are collated and pinned on a background thread and copied to the GPU on a
  side stream one step ahead; the loss is summed on the device and read once per epoch; no
  ``.item()`` per step; token batches are length-bucketed (padding only within a bucket, and no
  attention mask at all when a batch has no padding).

One ``Stepper`` holds model, optimizer and schedule; ``run_trial`` (the trial) and
``benchmarks/step_bench.py`` build it through the same ``prepare`` so the benchmark times the
product's own step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("sweeper.speed")

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, the MFU denominator the issue fixes
DS_DIR = "deepspeed"  # DeepSpeed's own checkpoint inside a sweeper checkpoint directory
DS_TAG = "state"


# ------------------------------------------------------------------------------------ planning


def wants_fast_path(m: dict) -> bool:
    s = m["training"].get("strategy", "auto")
    if s == "lightning":
        return False
    if s != "auto":
        return True
    return _gpus(m) > 0 and torch.cuda.is_available()


def resolve_strategy(m: dict) -> str:
    """plain | ddp | fsdp | deepspeed. One worker: plain PyTorch unless DeepSpeed is asked for by name
    (measured faster: benchmarks/results); several: DeepSpeed unless ``ddp`` or ``fsdp`` is named."""
    s = m["training"].get("strategy", "auto")
    if m["resources"]["workers"] <= 1:
        return "deepspeed" if s == "deepspeed" else "plain"
    return s if s in ("ddp", "fsdp") else "deepspeed"


def ds_settings(m: dict) -> dict:
    d = dict(m["training"].get("deepspeed") or {})
    d.setdefault("stage", 2)
    d.setdefault("offload_optimizer", False)
    d.setdefault("offload_params", False)
    d.setdefault("config", {})
    return d


def resolve_compile(knob: Any, on_gpu: bool, strategy: str, stage: int) -> bool:
    if knob is True or knob == "true":
        return True
    if knob is False or knob == "false":
        return False
    # auto: on the GPU, except under ZeRO-3 (its parameter hooks break the compiled graphs)
    return on_gpu and not (strategy == "deepspeed" and stage == 3)


def repeated_blocks(model: nn.Module, min_len: int = 2) -> nn.ModuleList | None:
    """The ModuleList (of at least ``min_len`` modules) holding most parameters: a transformer's layers."""
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= min_len:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, mod)
    return best[1] if best else None


def compile_blocks(model: nn.Module, *, hooks_outside: bool = False, cudagraphs: bool = False) -> int:
    """Regional compilation: each repeated block compiled in place (one graph reused by all,
    seconds instead of minutes, state_dict keys unchanged). ``hooks_outside``: only each block's
    ``forward`` is compiled, so module hooks added later (FSDP's gathers and reductions) run
    around the graph rather than inside it. ``cudagraphs``: the graphs replayed as CUDA graphs
    (Inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"`` turns on), one launch per
    graph instead of one per kernel; ``use_cudagraphs`` says when."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    opts = {"options": {"triton.cudagraphs": True}} if cudagraphs else {}
    blocks = repeated_blocks(model)
    if blocks is None:
        model.compile(**opts)
        return 1
    for b in blocks:
        if hooks_outside:
            b.forward = torch.compile(b.forward, **opts)
        else:
            b.compile(**opts)
    return len(blocks)


def use_cudagraphs(*, fp8_layers: int, compile_: bool, device: torch.device, bf16_weights: bool,
                   blocks: bool, knob: Any = "auto") -> bool:
    """Whether the compiled blocks replay as CUDA graphs (``training.cuda_graphs``: ``auto`` with
    ``training.fp8``, ``true`` without it too, ``false`` never): compiled, on CUDA, with
    ``training.bf16_weights`` on (the default there), where the model has repeated blocks to compile (``blocks``:
    a whole model compiled as one graph would hand out its predictions as graph outputs, which the next
    iteration overwrites). Both run only on the fast path's own step: one
    process, or the blocks reducer's workers, whose all-reduces are issued between the blocks' graphs
    (on the fp32 gradient buffers, which no graph owns).

    Why FP8: its per-tensor scaling adds an amax and a cast kernel for each operand of each linear layer
    (Qwen2.5-0.5B bs 16: 2,645 kernels a step against 1,421), and at small steps the host could not launch
    them as fast as the GPU ran them: the step was host-bound and its time moved with the host's (H100,
    2026-11-28: product 120.8 ms in rounds of 113-129 ms against 110.7 ms for the plain loop; with CUDA graphs
    90.1 against 90.6 ms, rounds within 0.5 %, and faster than bf16's 97.5 ms). Without FP8 the step is
    GPU-bound and CUDA graphs changed nothing (97.0 against 97.5 ms), so ``auto`` leaves them off there
    (docs/gpu.md). Smaller steps without FP8 can be host-bound too: ViT-S/14 at batch 256 on an H200 ran
    45.7 ms a step in rounds of 42-47 ms, and 35.8 ms with graphs (2026-11-28); ``true`` is for those.

    Why bf16 weights: a CUDA graph's outputs live in memory its next replay overwrites. A weight gradient
    that autograd installs as ``.grad`` straight from the backward graph's output is such an output, so
    with micro-batches (gradient accumulation) the next micro-batch's replay would overwrite the first one's
    gradients (pytorch/pytorch#169545; silently wrong sums in some versions). With bf16 weights each block's
    gradients are added into fp32 buffers as soon as the block's backward is done and ``.grad`` dropped
    (``MasterWeights``), so no graph output outlives its micro-batch, and ``Stepper`` starts a new graph
    iteration (``cudagraph_mark_step_begin``) before each micro-batch's forward, each memory try's and each
    evaluation batch's."""
    if knob is False:
        return False
    return (knob is True or bool(fp8_layers)) and compile_ and device.type == "cuda" and bf16_weights and blocks


# ------------------------------------------------------------------------------------ data path


def _to_device(batch, device, non_blocking=True):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _pin(batch):
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()  # itself when already pinned (make_collate's pin)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(b) for b in batch)
    return batch


def _record(batch, stream):
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            _record(b, stream)


def batch_units(batch) -> tuple[int, int]:
    """(samples, tokens) of a batch from shapes alone (no device sync); tokens = samples for images."""
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    n = int(first.shape[0])
    if first.dtype == torch.long and first.ndim == 2:
        return n, int(first.numel())
    return n, n


def slice_rows(batch, start: int, stop: int):
    """Rows ``start:stop`` of a batch (tensors sliced along dim 0, in tuples, lists and dicts; None kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_rows(b, start, stop) for b in batch)
    if isinstance(batch, dict):
        return {k: slice_rows(v, start, stop) for k, v in batch.items()}
    return batch


def resolve_micro(knob: Any, batch_size: int) -> int:
    """``training.micro_batch`` as rows per forward/backward: an int means at most that many, the largest
    divisor of the batch that is (equal micro-batches, so each is weighted alike); ``auto`` starts from
    the whole batch (``Stepper.fit_micro_batch`` may lower it)."""
    bs = max(1, int(batch_size))
    if knob in (None, "auto"):
        return bs
    cap = max(1, min(int(knob), bs))
    return max(d for d in range(1, cap + 1) if bs % d == 0)


def index_batches(n: int, bs: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                  drop_last: bool = False, lengths: list[int] | None = None) -> list[list[int]]:
    """Index lists for one epoch, this rank's share. With ``lengths``: length bucketing (windows
    of 64 batches sorted by length, then the batches shuffled), so padding stays within a bucket."""
    g = torch.Generator()
    g.manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if world > 1:
        per = n // world  # every rank the same number of steps (collectives stay in step)
        order = order[rank::world][:per]
    if lengths is not None and shuffle:
        win = bs * 64
        order = [i for s in range(0, len(order), win) for i in sorted(order[s:s + win], key=lambda j: lengths[j])]
    batches = [order[s:s + bs] for s in range(0, len(order), bs)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < bs:
        batches.pop()  # fixed shapes for the compiled graphs
    if lengths is not None and shuffle:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def make_collate(family, dataset, pin: bool = False) -> tuple[Callable[[list[int]], Any], list[int] | None]:
    """A collate taking a list of indices, and the examples' lengths when the data is tokens.

    ``pin`` (a CUDA trial's training batches): a ``TensorDataset``'s rows are gathered straight into pinned
    memory, ready for the side stream's copy, instead of into a new pageable tensor that ``Prefetcher`` then
    copies into pinned memory. At ViT-B/14 batch 512 that is one pass over 308 MB a batch instead of two, and
    the pinned blocks come back from PyTorch's host allocator instead of a new pageable tensor's fresh memory
    each batch. On an H200 machine the old way held the step beside it back by 19 ms (loader 0.90× of the
    resident step, now 0.99×), though alone it fed batches as fast (``benchmarks/loader_bench.py``); the fresh
    memory's page faults are the likeliest cause, not an established one (docs/gpu.md)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # TensorDataset: one gather per tensor, not a Python loop over rows
        if pin:
            def gather_pinned(idx):
                i = torch.as_tensor(idx)
                return tuple(torch.index_select(t, 0, i, out=torch.empty((len(i), *t.shape[1:]), dtype=t.dtype,
                                                                          pin_memory=True))
                             for t in tensors)

            return gather_pinned, None
        return (lambda idx: tuple(t[torch.as_tensor(idx)] for t in tensors)), None
    ids = getattr(dataset, "ids", None)
    if ids is not None and hasattr(dataset, "labels"):  # qwen TokenDataset
        pad = dataset.pad_id
        labels = dataset.labels
        lengths = [len(x) for x in ids]

        def collate_tokens(idx):
            n = max(lengths[i] for i in idx)
            full = all(lengths[i] == n for i in idx)
            out = torch.full((len(idx), n), pad, dtype=torch.long)
            mask = None if full else torch.zeros((len(idx), n), dtype=torch.long)
            for r, i in enumerate(idx):
                out[r, : lengths[i]] = torch.tensor(ids[i])
                if mask is not None:
                    mask[r, : lengths[i]] = 1
            # no mask when nothing is padded: SDPA then runs its causal kernel with no mask build
            return out, mask, labels[torch.as_tensor(idx)]

        return collate_tokens, lengths
    return (lambda idx: family.collate([dataset[i] for i in idx])), None


class Prefetcher:
    """Iterates batches made on a background thread (collate + pin), each copied to the device on a
    side stream one step ahead of its use."""

    def __init__(self, collate, batches: list[list[int]], device: torch.device, depth: int = 4):
        self.collate, self.batches, self.device, self.depth = collate, batches, device, depth
        self.cuda = device.type == "cuda"

    def __len__(self):
        return len(self.batches)

    def __iter__(self) -> Iterator:
        q: queue.Queue = queue.Queue(self.depth)
        end = object()
        stop = threading.Event()

        def work():
            try:
                for idx in self.batches:
                    if stop.is_set():
                        return
                    b = self.collate(idx)
                    q.put(_pin(b) if self.cuda else b)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                q.put(e)
            q.put(end)

        th = threading.Thread(target=work, daemon=True)
        th.start()
        stream = torch.cuda.Stream(self.device) if self.cuda else None

        def fetch():
            b = q.get()
            if b is end:
                return end
            if isinstance(b, BaseException):
                raise b
            if stream is None:
                return b
            with torch.cuda.stream(stream):
                return _to_device(b, self.device)

        try:
            nxt = fetch()
            while nxt is not end:
                cur = nxt
                if stream is not None:
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    _record(cur, torch.cuda.current_stream(self.device))
                nxt = fetch()
                yield cur
        finally:
            stop.set()
            while th.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    th.join(0.05)


# ------------------------------------------------------------------------------------ the step


class LossModule(nn.Module):
    """What DDP and DeepSpeed wrap: forward(batch) -> the family's loss."""

    def __init__(self, family, model: nn.Module, hp, cast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.family, self.hp, self.cast_dtype = family, hp, cast_dtype

    def cast(self, batch):
        # DeepSpeed's bf16 engine holds bf16 weights: images must match; labels and ids stay
        if self.cast_dtype is None:
            return batch
        return type(batch)(b.to(self.cast_dtype) if isinstance(b, torch.Tensor) and b.is_floating_point() and b.ndim >= 4
                           else b for b in batch)

    def forward(self, batch):
        return self.family.loss(self.model, self.cast(batch), self.hp)


def param_groups(model: nn.Module, weight_decay: float, master: "MasterWeights | None" = None) -> list[dict]:
    """AdamW's groups: weight decay for matrices, none for vectors; with ``master`` (bf16 weights) over
    the fp32 masters, in the same order as without, so optimizer state dicts carry over."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if master is not None:
            p = master.masters[master.index[id(p)]]
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def matmul_params(model: nn.Module) -> int:
    """Parameters in matmuls (Linear and Conv weights), embeddings excluded: N of the MFU formula."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            n += mod.weight.numel()
    return n


def flops_per_unit(family_name: str, model: nn.Module, seq: int) -> float:
    """Training FLOPs per token (Qwen: 6N + 12·L·d·T) or per image (DINOv2: forward × 3)."""
    cfg = model.backbone.config
    n = matmul_params(model)
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    if family_name == "dinov2_classifier":
        T = (cfg.image_size // cfg.patch_size) ** 2 + 1
        return 3 * (2 * n + 4 * L * d * T) * T
    return 6 * n + 12 * L * d * seq


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs torch.distributed even for one process (a one-worker DeepSpeed trial)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(port))):
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def _gpus(m: dict) -> float:
    g = m["resources"]["gpus"]
    return (1.0 if torch.cuda.is_available() else 0.0) if g == "auto" else float(g)


def block_groups(named_params: list[tuple[str, nn.Parameter]]) -> list[list[nn.Parameter]]:
    """Parameters grouped by block: the name up to its first layer index (``model.layers.3``), else
    the owning module (``model.embed_tokens``), in the model's order."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in named_params:
        parts = name.split(".")
        digit = next((i for i, x in enumerate(parts) if x.isdigit()), None)
        groups.setdefault(".".join(parts[: digit + 1] if digit is not None else parts[:-1]), []).append(p)
    return list(groups.values())


def broadcast_from_rank0(module: nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers, as DDP's constructor does."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def shard_fsdp(root: nn.Module, model: nn.Module, bf16: bool, blocks_per_unit: int = 1,
               fp32_root: bool = False) -> int:
    """ZeRO-3 sharding with FSDP2 (``training.strategy: fsdp``): each run of ``blocks_per_unit``
    repeated blocks is one ``fully_shard`` unit (its weights all-gathered just before its forward and
    again before its backward, its gradients reduce-scattered as soon as its backward is done, with the
    next unit's gather prefetched), then ``root`` (the ``LossModule`` whose forward the step calls: the
    families call ``model.backbone`` and ``model.head`` directly, not ``model``) for what is left
    (embeddings, final norm, head: gathered for the whole forward and backward). Each rank keeps
    1/world of the fp32 weights, gradients and AdamW state.

    bf16: FSDP's mixed precision. The weights are gathered in bf16 and the gradients reduced in fp32,
    with the fp32 master weights in the optimizer; the residual stream is bf16. Qwen2.5-1.5B's loss
    over 14 steps on the same batch: 8.132 at the first step against 8.112 for DDP under autocast,
    then within the spread of DDP's own runs (benchmarks/results/gpu_2026-11-27.md). ``fp32_root``:
    the root's weights stay fp32 and the blocks' inputs are not cast, so the residual stream stays
    fp32 under autocast as on one GPU (the first steps' losses equal DDP's); measured slower on
    2×H200: 0.711 against 0.907 of twice the one-GPU product at 4 blocks per unit.

    Blocks compiled beforehand (``compile_blocks(hooks_outside=True)``) stay compiled, FSDP's hooks
    running around the graphs. Call after ``broadcast_from_rank0`` and before building the optimizer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not bf16:
        mp = root_mp = MixedPrecisionPolicy()
    elif fp32_root:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        root_mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    else:
        mp = root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(repeated_blocks(model) or ())
    units = [blocks[i:i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    for j, u in enumerate(units):
        # the last unit's backward comes right after its forward: its weights stay gathered in between
        fully_shard(u if len(u) > 1 else u[0], mp_policy=mp, reshard_after_forward=j < len(units) - 1)
    fully_shard(root, mp_policy=root_mp)
    return len(units) + 1


class BlockHooks:
    """Gradient hooks per block (``block_groups``): ``on_block(gi)`` runs once a step, when the last
    gradient of block ``gi`` has been accumulated. ``arm()`` before a step's backward; gradients
    accumulated while disarmed (a memory probe, a backward outside ``Stepper.step``) are ignored."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], on_block: Callable[[int], None]):
        self.groups = block_groups(named_params)
        self.on_block = on_block
        self.left = [0] * len(self.groups)
        self.armed = False
        # The hook reaches this object through a weak reference. A hook lives in the parameter's C++
        # gradient accumulator, which the garbage collector cannot see into: with a bound method the
        # cycle parameter -> hook -> self -> groups -> parameter was never collected, and every trial on a
        # reused actor left its whole model on the GPU (benchmarks/results: 2.5 MB a trial for the
        # packing benchmark's small model; 2 GB of fp32 weights a trial for Qwen2.5-0.5B).
        ref = weakref.ref(self)
        for gi, g in enumerate(self.groups):
            for p in g:
                p.register_post_accumulate_grad_hook(functools.partial(_block_hook, ref, gi))

    def arm(self) -> None:
        self.left = [len(g) for g in self.groups]
        self.armed = True

    def _ready(self, gi: int, p: nn.Parameter) -> None:
        if not self.armed:
            return
        self.left[gi] -= 1
        if not self.left[gi]:
            self.on_block(gi)


def _block_hook(ref: "weakref.ref[BlockHooks]", gi: int, p: nn.Parameter) -> None:
    hooks = ref()
    if hooks is not None:
        hooks._ready(gi, p)


class BlockAllReduce:
    """Data-parallel gradient averaging without DistributedDataParallel's buckets
    (``training.ddp.impl: blocks``).

    DDP copies every gradient into its bucket before the all-reduce (``mul_out`` into the bucket, since
    the optimizer sets gradients to None each step): a read and a write of all 6.2 GB of Qwen2.5-1.5B's
    fp32 gradients, 5 ms of a 171 ms two-GPU step on H100s (the profile in
    benchmarks/results/gpu_profile_h100x2_2026-11-27_q15-ddp-b500.txt). Here each block's gradients
    are all-reduced where they lie, in one coalesced NCCL group, as soon as the block's last gradient
    has been accumulated during the backward, so the communication overlaps the rest of the backward
    as DDP's does, without the copy. The model stays unwrapped (the compiled blocks are the one-GPU
    ones). ``finish()`` waits for the reductions before clipping and the optimizer step.

    Every rank issues its reductions in the order its blocks complete, which is the same on every
    rank for the same model and batch shapes (the property DDP's ``static_graph`` also assumes). A
    block with a parameter left without a gradient is reduced in ``finish()`` with zeros in its place.
    NCCL averages (``ReduceOp.AVG``); gloo, which has no AVG, sums and divides.

    With ``master`` (``training.bf16_weights``) the model's weights are bf16 and their gradients are
    taken block by block into fp32 buffers (``MasterWeights``, whose hooks were registered before these,
    so a block is in its buffers when these hooks see it done): the buffers are what is averaged, in
    fp32 as without bf16 weights, after the last micro-batch has been added in. The masters are
    broadcast from rank 0 as well, and the bf16 weights rounded from them."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], module: nn.Module, world: int,
                 master: "MasterWeights | None" = None):
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _coalescing_manager

        self.hooks = BlockHooks(named_params, self._reduce)
        self.groups = self.hooks.groups
        self.dist, self.world, self.coalesced = dist, world, _coalescing_manager
        self.master = master
        self.grad_of = master.grad_of if master is not None else (lambda q: q.grad)
        self.avg = dist.get_backend() == "nccl"
        self.op = dist.ReduceOp.AVG if self.avg else dist.ReduceOp.SUM
        broadcast_from_rank0(module)
        if master is not None:
            with torch.no_grad():
                for m in master.masters:
                    dist.broadcast(m.data, src=0)
                torch._foreach_copy_(master.work, master.masters)
        self.done = [False] * len(self.groups)
        self.pending: list = []

    def arm(self) -> None:
        self.hooks.arm()
        self.done = [False] * len(self.groups)
        self.pending = []

    def _reduce(self, gi: int) -> None:
        with self.coalesced(async_ops=True) as cm:
            for q in self.groups[gi]:
                self.dist.all_reduce(self.grad_of(q), op=self.op)
        self.pending.append(cm)
        self.done[gi] = True

    def finish(self) -> None:
        """After the backward: reduce what the hooks did not, wait for every reduction (the current
        stream waits; the host does not), and average where the backend only sums."""
        self.hooks.armed = False
        for gi, g in enumerate(self.groups):
            if not self.done[gi]:  # (with bf16 weights, ``MasterWeights.flush`` has taken this block already)
                for q in g:
                    if self.grad_of(q) is None:
                        if self.master is not None:
                            self.master.zero_grad_of(q)
                        else:
                            q.grad = torch.zeros_like(q)
                self._reduce(gi)
        for cm in self.pending:
            cm.wait()
        self.pending = []
        if not self.avg and self.world > 1:
            torch._foreach_div_([self.grad_of(q) for g in self.groups for q in g], float(self.world))


class EarlyNorm:
    """The gradients' global L2 norm, summed while the backward runs instead of in a pass after it.

    Parameters are grouped by block (the embedding, each decoder layer, ...); when the last gradient
    of a group has been accumulated, that group's squared norm is taken on a side CUDA stream, so
    reading the gradients (memory-bound) overlaps the rest of the backward's matmuls (compute-bound)
    instead of costing its own pass over every gradient before the optimizer step (Qwen2.5-1.5B: 6.2 GB
    of fp32 gradients, about 2 ms at the H100's bandwidth, 1.3 % of the step in the 2026-11-26
    profile; a gain not yet shown in a same-run A/B: ``step_bench.py --modes product,product-late-norm``,
    benchmarks/results/gpu_2026-11-27.md). ``total()`` joins the streams
    and adds the groups up; a group whose gradients did not all arrive (a parameter unused this
    step) is summed there, on the main stream. One process only: under DDP a gradient is final only
    after its bucket's all-reduce. Without CUDA (the tests) the groups are summed inside the hooks."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], device: torch.device,
                 grad_of: Callable[[nn.Parameter], torch.Tensor | None] | None = None):
        self.hooks = BlockHooks(named_params, self._block_norm)
        # where a parameter's gradient is. With MasterWeights, the fp32 buffer of a bf16 weight: its hooks
        # were registered first, so a block's gradients are in the buffers when this one's hooks see it done
        self.grad_of = grad_of or (lambda q: q.grad)
        self.groups = self.hooks.groups
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.sq: list[torch.Tensor | None] = [None] * len(self.groups)

    def arm(self) -> None:
        self.hooks.arm()
        self.sq = [None] * len(self.groups)

    @staticmethod
    def _sq(grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(grads)).float().square().sum()

    def _block_norm(self, gi: int) -> None:
        grads = [g for g in map(self.grad_of, self.groups[gi]) if g is not None]
        if self.stream is None:
            self.sq[gi] = self._sq(grads)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            self.sq[gi] = self._sq(grads)

    def total(self) -> torch.Tensor:
        """The global norm of this step's gradients (as ``get_total_norm``, up to summation order)."""
        self.hooks.armed = False
        parts = []
        if self.stream is not None:
            main = torch.cuda.current_stream(self.stream.device)
            main.wait_stream(self.stream)
        for g, s in zip(self.groups, self.sq):
            if s is None:
                grads = [x for x in map(self.grad_of, g) if x is not None]
                if not grads:
                    continue
                s = self._sq(grads)
            elif self.stream is not None:
                s.record_stream(main)  # made on the side stream, read and freed on the main one
            parts.append(s)
        dev = self.stream.device if self.stream is not None else torch.device("cpu")
        return torch.stack(parts).sum().sqrt() if parts else torch.zeros((), device=dev)


class MasterWeights:
    """``training.bf16_weights``: the model computes with bf16 weights, and AdamW updates fp32 master
    copies of them (what DeepSpeed's bf16 engine and Megatron do; Apex called it O2).

    Under autocast alone the weights are fp32: every forward casts each weight to bf16 again, and the
    residual stream between the blocks is fp32 (an fp32 embedding or norm weight promotes it), so the
    memory-bound kernels (norms, residual adds) move twice the bytes. Here the model's parameters are
    bf16 and so is the stream. The matmuls see the same bf16 operands as under autocast; what differs is
    the rounding of the elementwise results in between (docs/gpu.md: the loss curves of both over the
    same steps).

    - The masters are the original ``nn.Parameter`` objects, in the model's order: the optimizer, its
      state dict (by position) and the checkpoints (``state_dict``, the masters by name) are those of
      a run without this, so either can resume the other.
    - Gradients: when the backward has finished a block (``BlockHooks``: the embedding, one decoder
      layer, ...), that block's bf16 gradients are added into fp32 buffers in one ``foreach`` call
      (copied for a step's first micro-batch) and dropped, so accumulation over micro-batches is in
      fp32 and only one block's bf16 gradients are held at a time. A block's buffers are one
      allocation made at its first gradients of a step and let go after the update, so they are not
      held through the forward, as autocast's fp32 gradients are not (held for good, they put 6 GB on
      the 1.5B step's peak). EarlyNorm, whose hooks come after these, reads the fp32 sums. ``arm()``
      before each backward; ``flush()`` after it takes the blocks whose hooks did not all fire (a weight
      without a gradient). ``finish()`` hands the buffers to the masters (None for a
      weight that got no gradient this step, as ``zero_grad(set_to_none=True)`` leaves it).
    - ``publish()`` after the optimizer step: the masters rounded into the bf16 weights, one pass, and
      the step's fp32 gradient buffers let go.

    A first version took each weight's gradient in its own hook: 290 Python calls and kernel launches
    per backward for Qwen2.5-0.5B, and the bs-16 step ran 0.90 of plain autocast's on the H100."""

    def __init__(self, model: nn.Module):
        self.masters: list[nn.Parameter] = []
        self.work: list[nn.Parameter] = []
        made: dict[int, nn.Parameter] = {}
        for _, mod in model.named_modules(remove_duplicate=False):
            for pname, p in list(mod._parameters.items()):
                if p is None or not p.is_floating_point():
                    continue
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
                    self.masters.append(p)
                    self.work.append(made[id(p)])
                setattr(mod, pname, made[id(p)])
        self.index = {id(w): i for i, w in enumerate(self.work)}
        self.buf: list[torch.Tensor | None] = [None] * len(self.work)
        self.seen: list[bool] = [False] * len(self.work)
        self.hooks = BlockHooks([(n, w) for n, w in model.named_parameters() if w.requires_grad], self._take_block)
        self.block_idx = [[self.index[id(w)] for w in g] for g in self.hooks.groups]
        self.block_sizes = [[self.masters[i].numel() for i in idx] for idx in self.block_idx]

    def named_masters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The master of every parameter name the model has (its ``state_dict`` names)."""
        return {n: self.masters[self.index[id(w)]] for n, w in model.named_parameters(remove_duplicate=False)
                if id(w) in self.index}

    def begin(self) -> None:
        """A step starts: each weight's next gradient is copied into its buffer, not added (and bf16
        gradients a backward outside a step left behind, a memory try's, are dropped)."""
        self.seen = [False] * len(self.work)
        for w in self.work:
            w.grad = None

    def arm(self) -> None:
        self.hooks.arm()

    def _take_block(self, gi: int) -> None:
        idx = self.block_idx[gi]
        fresh, more = [], []
        for i in idx:
            if self.work[i].grad is not None:
                (more if self.seen[i] else fresh).append(i)
        if fresh and self.buf[fresh[0]] is None:  # the block's first gradients this step: one allocation
            flat = torch.empty(sum(self.block_sizes[gi]), dtype=torch.float32, device=self.masters[idx[0]].device)
            for i, v in zip(idx, flat.split(self.block_sizes[gi])):
                self.buf[i] = v.view_as(self.masters[i])
        with torch.no_grad():
            if fresh:
                torch._foreach_copy_([self.buf[i] for i in fresh], [self.work[i].grad for i in fresh])
            if more:
                torch._foreach_add_([self.buf[i] for i in more], [self.work[i].grad for i in more])
        for i in fresh:
            self.seen[i] = True
        for i in idx:
            self.work[i].grad = None

    def flush(self) -> None:
        """After a backward: the blocks whose hooks did not all fire (a weight without a gradient)."""
        self.hooks.armed = False
        for gi, left in enumerate(self.hooks.left):
            if left:
                self.hooks.left[gi] = 0
                self._take_block(gi)

    def zero_grad_of(self, w: nn.Parameter) -> None:
        """A zero fp32 gradient for bf16 weight ``w`` this step (a data-parallel rank whose batch gave it none
        still takes part in the block's reduction)."""
        i = self.index[id(w)]
        self.buf[i] = torch.zeros_like(self.masters[i])
        self.seen[i] = True

    def grad_of(self, w: nn.Parameter) -> torch.Tensor | None:
        """The fp32 gradient accumulated so far this step for bf16 weight ``w`` (EarlyNorm reads these)."""
        i = self.index.get(id(w))
        if i is None:
            return w.grad
        return self.buf[i] if self.seen[i] else None

    def finish(self) -> None:
        for i, m in enumerate(self.masters):
            if m.requires_grad:
                m.grad = self.buf[i] if self.seen[i] else None

    @torch.no_grad()
    def publish(self) -> None:
        torch._foreach_copy_(self.work, self.masters)
        self.release()

    def release(self) -> None:
        """The step's fp32 gradient buffers go (the masters' ``.grad`` too: ``zero_grad`` sets them to None)."""
        self.buf = [None] * len(self.work)


def one_fast_process(strategy: str, world: int, ddp_impl: str = "blocks") -> bool:
    """A trial whose processes each run the fast path's own step on unwrapped blocks: one process (not the
    Lightning loop or DeepSpeed), or the data-parallel workers of ``strategy: ddp`` with ``ddp.impl: blocks``
    (``BlockAllReduce`` averages the gradients where they lie; PyTorch's DDP wrapper, FSDP and DeepSpeed
    own the gradients themselves). Where ``training.bf16_weights`` and ``training.fp8`` apply. The manifest
    check says the same before the sweep starts (``sweeper.manifest._not_one_fast_process``)."""
    if strategy in ("deepspeed", "lightning"):
        return False
    return world == 1 or (strategy == "ddp" and ddp_impl == "blocks")


def uses_bf16_weights(knob: Any, *, on_cuda: bool, strategy: str, world: int, precision: str,
                      ddp_impl: str = "blocks") -> bool:
    """Whether ``training.bf16_weights`` (``knob``) applies: the fast path's own step (``one_fast_process``), in
    bf16 mixed precision; ``auto`` only on CUDA. ``true`` where it cannot apply is a UserError. The trial's
    Stepper and the packing probe (``sweeper.packing.probe_peak_bytes``) both ask here."""
    fits = one_fast_process(strategy, world, ddp_impl) and precision == "bf16-mixed"
    if knob is True and not fits:
        from sweeper.errors import UserError

        from sweeper.manifest import BF16_WEIGHTS_NEEDS

        raise UserError(f"training.bf16_weights: {BF16_WEIGHTS_NEEDS}, but this trial runs precision {precision}, "
                        f"strategy {strategy}{_impl(strategy, world, ddp_impl)}, {world} worker(s)")
    return fits and (knob is True or (knob == "auto" and on_cuda))


def use_fast_blocks(knob: bool, family, model: nn.Module, *, strategy: str = "plain", stage: int | None = None) -> int:
    """``training.fast_blocks``: the family's faster form of its blocks (``Family.fast_blocks``; DINOv2:
    ``trainables.dinov2_fast``; applied through ``transform_blocks``). Not under DeepSpeed ZeRO-3, which
    partitions each parameter and gathers it only for its own module's forward (the folded layer reads the
    LayerScale module's)."""
    if not knob or (strategy == "deepspeed" and stage == 3):
        return 0
    n = family.fast_blocks(model)
    if n:
        log.info("fast blocks: %d of the model's blocks (training.fast_blocks)", n)
    return n


def _impl(strategy: str, world: int, ddp_impl: str) -> str:
    return f" (ddp.impl {ddp_impl})" if strategy == "ddp" and world > 1 else ""


def use_fp8(knob: bool, model: nn.Module, device: torch.device, *, strategy: str = "plain", world: int = 1,
            ddp_impl: str = "blocks") -> int:
    """``training.fp8``: the repeated blocks' linear layers made ``trainables.fp8.Float8Linear`` (before the
    blocks are compiled or their weights swapped for bf16). Returns how many. A device that cannot multiply
    in FP8, or a trial that does not run the fast path's own step (``one_fast_process``: the Lightning loop,
    DeepSpeed, FSDP or PyTorch's DDP wrapper, not tested with FP8), is a UserError naming the field. Each
    data-parallel rank scales by its own operands' largest magnitudes (the weights, averaged and identical on
    every rank, get the same scale everywhere). Applied through ``transform_blocks``."""
    if not knob:
        return 0
    from sweeper.errors import UserError
    from sweeper.manifest import FP8_NEEDS

    from .fp8 import convert_blocks, fp8_ready

    if not one_fast_process(strategy, world, ddp_impl):
        raise UserError(f"training.fp8: {FP8_NEEDS}, but this trial runs strategy {strategy}"
                        f"{_impl(strategy, world, ddp_impl)}, {world} worker(s)")
    why = fp8_ready(device)
    if why:
        raise UserError(f"training.fp8: {why}")
    n = convert_blocks(repeated_blocks(model, min_len=1))
    log.info("FP8 matmuls in %d linear layers of the blocks (training.fp8)", n)
    return n


def use_gelu_epilogue(knob: bool, family, model: nn.Module, device: torch.device, *, strategy: str = "plain",
                      world: int = 1, ddp_impl: str = "blocks") -> int:
    """``training.gelu_epilogue``: the blocks' GELU MLPs made ``trainables.gelu_lt.GeluEpilogueMLP`` (GELU, in
    its tanh form, inside cuBLASLt's matmul epilogues). Returns how many. Refused, naming the field, for a
    family without such MLPs, together with ``training.fp8``, off the fast path's own step in one process (the
    MLP's forward reads its linear layers' weights itself, which DeepSpeed ZeRO-3 gathers only for their own
    forward; several workers are not tested), and on a CUDA machine that cannot build the kernels. Applied
    through ``transform_blocks``."""
    if not knob:
        return 0
    from sweeper.errors import UserError
    from sweeper.manifest import GELU_EPILOGUE_NEEDS

    from .gelu_lt import convert_layers, library, why_not_ready

    if not family.info.gelu_mlp:
        raise UserError(f"training.gelu_epilogue: {family.info.name} has no GELU MLP (DINOv2's blocks have one)")
    if not one_fast_process(strategy, world, ddp_impl) or world > 1:
        raise UserError(f"training.gelu_epilogue: {GELU_EPILOGUE_NEEDS}, but this trial runs strategy {strategy}"
                        f"{_impl(strategy, world, ddp_impl)}, {world} worker(s)")
    why = why_not_ready(device)
    if why:
        raise UserError(f"training.gelu_epilogue: {why}")
    if device.type == "cuda":
        try:
            library()  # built now: a compiler's complaint is the trial's one message, not a traceback mid-step
        except (RuntimeError, OSError) as e:
            msg = str(e) if str(e).startswith("training.gelu_epilogue") else \
                f"training.gelu_epilogue: loading the cuBLASLt kernels failed: {e}"
            raise UserError(f"{msg}\n(set training.gelu_epilogue: false to train with PyTorch's GELU instead)") from None
    n = convert_layers(repeated_blocks(model, min_len=1))
    log.info("GELU (tanh form) in the matmul epilogues of %d blocks' MLPs (training.gelu_epilogue)", n)
    return n


# ``training.cls_attention: auto`` without CUDA graphs: the kernels only where a micro-batch's rows × heads reach
# this. Each call launches its Triton kernels from Python (about 3 launches and a custom op's dispatch a layer),
# while the GPU time they save grows with the batch. Measured on one H200 (2026-11-28, eighteenth session):
# ViT-B/14 at 512 rows (6,144) 4.5-4.9 ms faster a step; at 128 rows (1,536), where the product's step was
# bound by that machine's host, 3.8-6.8 ms slower (the plain loop, with less host work, no slower). With the
# blocks replayed as CUDA graphs no launch is the host's: ViT-S/14 at 256 rows (1,536) 1 ms faster.
CLS_ATTENTION_MIN_ROWS_HEADS = 3072


def use_cls_attention(knob: Any, family, model: nn.Module, device: torch.device, *, rows: int | None = None,
                      cudagraphs: bool = False, strategy: str = "plain", stage: int | None = None) -> bool:
    """``training.cls_attention``: the model's attention by ``trainables.cls_attn`` (the CLS token outside the
    tiles). ``auto``: for a family with a CLS token on CUDA with Triton, where the blocks replay as CUDA graphs
    or ``rows`` (the micro-batch; None: not known) × heads reaches ``CLS_ATTENTION_MIN_ROWS_HEADS``. ``true``:
    wherever the family has a CLS token; for one without, a UserError naming the field (the manifest check says
    the same), and on CUDA without Triton too. On a CPU it does nothing. Per call, a shape or dtype the kernels
    do not take (a patch count that is not a multiple of the tile, fp32) runs PyTorch's SDPA instead
    (``cls_attn.attention_forward``). Where it turns the kernels on, DINOv2's q, k and v projections become one
    matmul whose output the kernels read in place (``cls_attn.FusedQKVAttention``), except under DeepSpeed
    ZeRO-3, which gathers each parameter only for its own module's forward, and FSDP (its sharded parameters
    not tested with it)."""
    if knob is False:
        return False
    from sweeper.errors import UserError

    if not family.info.cls_token:
        if knob is True:
            raise UserError(f"training.cls_attention: {family.info.name} has no CLS token "
                            "(DINOv2's sequences start with one)")
        return False
    if device.type != "cuda":
        return False
    from . import cls_attn

    if cls_attn.triton is None:
        if knob is True:
            raise UserError("training.cls_attention: Triton is not installed (it comes with PyTorch's CUDA wheels); "
                            "set it to auto or false for PyTorch's SDPA")
        return False
    heads = int(getattr(model.backbone.config, "num_attention_heads", 1))
    if knob == "auto" and not cudagraphs and rows is not None and rows * heads < CLS_ATTENTION_MIN_ROWS_HEADS:
        log.info("attention: PyTorch's SDPA (training.cls_attention auto: %d rows × %d heads is under %d without "
                 "CUDA graphs; true forces trainables/cls_attn.py)", rows, heads, CLS_ATTENTION_MIN_ROWS_HEADS)
        return False
    fused = cls_attn.use(model.backbone, fuse=strategy != "fsdp" and not (strategy == "deepspeed" and stage == 3))
    log.info("attention with the CLS token outside the tiles (training.cls_attention %s, trainables/cls_attn.py); "
             "q, k and v as one matmul in %d layers", knob, fused)
    return True


def transform_blocks(family, model: nn.Module, device: torch.device, *, fast_blocks: bool, fp8: bool,
                     gelu_epilogue: bool = False, strategy: str = "plain", world: int = 1, stage: int | None = None,
                     ddp_impl: str = "blocks", cls_attention: Any = False, rows: int | None = None
                     ) -> tuple[int, int, int]:
    """The changes a trial makes to its blocks before compiling them, in their one order: the family's fast
    blocks, the GELU epilogue MLPs (which take the fast blocks' folded layer), then FP8 (which takes plain
    ``nn.Linear`` only, so layers the fast blocks replaced stay bf16; the manifest refuses FP8 with the GELU
    epilogues). Returns (blocks made fast, MLPs with GELU epilogues, layers made FP8). The trial's Stepper, the
    packing probe and the step benchmark's plain loop all call this, so the three hold the same model. The
    attention kernel (``training.cls_attention``, ``use_cls_attention``) is chosen here for the other two callers;
    the Stepper passes ``False`` and chooses it once it knows whether its blocks replay as CUDA graphs (the plain
    loop then takes the Stepper's choice as true or false)."""
    if gelu_epilogue and fp8:
        from sweeper.errors import UserError

        raise UserError("training.gelu_epilogue: not with training.fp8 (the MLP's first layer would be FP8's)")
    use_cls_attention(cls_attention, family, model, device, rows=rows, strategy=strategy, stage=stage)
    return (use_fast_blocks(fast_blocks, family, model, strategy=strategy, stage=stage),
            use_gelu_epilogue(gelu_epilogue, family, model, device, strategy=strategy, world=world, ddp_impl=ddp_impl),
            use_fp8(fp8, model, device, strategy=strategy, world=world, ddp_impl=ddp_impl))


def _smaller_divisor(m: int, n: int) -> int:
    """The largest divisor of ``n`` that is at most half of ``m`` (at least 1)."""
    return max(d for d in range(1, max(1, m // 2) + 1) if n % d == 0)


def _add_weighted(total: torch.Tensor | None, loss: torch.Tensor, w: float) -> torch.Tensor:
    d = loss.detach() if w == 1.0 else loss.detach() * w
    return d if total is None else total + d


class MicroBatchError(torch.OutOfMemoryError):
    """``training.micro_batch: auto`` found no micro-batch that fits, not even 1 row."""


def largest_fitting(try_rows: Callable[[int], str | None], start: int, n: int,
                    release: Callable[[], None]) -> tuple[int, list[str]]:
    """The largest number of rows, from ``start`` down through divisors of ``n`` (each at most half the
    last), for which ``try_rows(rows)`` returns None (else why that many did not fit); ``release()``
    between tries. Returns it and, for each size that did not fit, why. Shared by a trial's
    ``micro_batch: auto`` (``Stepper.fit_micro_batch``) and the packing probe (``sweeper.packing``)."""
    failed: list[str] = []
    m = start
    while True:
        why = try_rows(m)
        if why is None:
            return m, failed
        failed.append(f"{m} rows: {why}")
        if m == 1:
            raise MicroBatchError("not even a micro-batch of 1 row fits in GPU memory (" + "; ".join(failed) + ")")
        release()
        m = _smaller_divisor(m, n)


class Stepper:
    """Model + optimizer + schedule for one strategy; ``step(batch)`` is one optimizer step."""

    def __init__(self, family, model: nn.Module, hp, *, strategy: str, device: torch.device, precision: str,
                 grad_clip: float, total_steps: int, step_offset: int = 0, compile_: bool = False,
                 ds: dict | None = None, world: int = 1, ddp: dict | None = None, fsdp: dict | None = None,
                 micro_batch: int | None = None, bf16_weights: Any = False, fp8: bool = False,
                 fast_blocks: bool = False, gelu_epilogue: bool = False, cuda_graphs: Any = "auto",
                 cls_attention: Any = False):
        from sweeper.manifest import DDPSpec, FSDPSpec

        from .base import cosine_with_warmup

        self.family, self.model, self.hp, self.strategy, self.device = family, model, hp, strategy, device
        self.bf16 = precision == "bf16-mixed"
        if precision not in ("bf16-mixed", "32-true"):
            from sweeper.errors import UserError

            raise UserError(f"training.precision {precision!r}: the fast path takes bf16 or fp32 "
                            "(use training.strategy: lightning for fp16)")
        self.grad_clip = float(grad_clip or 0.0)
        # rows per forward/backward; a batch of more rows is split and its gradients accumulated
        # (``training.micro_batch``; ``fit_micro_batch`` lowers it to what fits in GPU memory)
        self.micro = int(micro_batch or hp.batch_size)
        self.shrink_on_oom = False  # set by choose_micro_batch for micro_batch: auto (see step)
        self.micro_failed: list[str] = []  # the micro-batch sizes that did not fit, and why
        self._updating = False
        self.probe_peak: tuple[int, int, int | None] | None = None  # (rows, peak bytes, budget) of the last try that ran
        self.fsdp = strategy == "fsdp" and world > 1
        self.ds = ds or {}
        self.stage = int(self.ds.get("stage", 2)) if strategy == "deepspeed" else None
        ddp_spec = DDPSpec(**(ddp or {}))  # the manifest's defaults for a caller that passes none
        self.fast_blocks, self.gelu_epilogue, self.fp8 = transform_blocks(
            family, model, device, fast_blocks=fast_blocks, fp8=fp8, gelu_epilogue=gelu_epilogue, strategy=strategy,
            world=world, stage=self.stage, ddp_impl=ddp_spec.impl)
        on_cuda = device.type == "cuda"
        masters = uses_bf16_weights(bf16_weights, on_cuda=on_cuda, strategy=strategy, world=world, precision=precision,
                                    ddp_impl=ddp_spec.impl)
        self.cudagraphs = use_cudagraphs(fp8_layers=self.fp8, compile_=bool(compile_), device=device,
                                         bf16_weights=masters, blocks=repeated_blocks(model) is not None,
                                         knob=cuda_graphs)
        # the attention kernel, now that it is known whether the host launches the blocks' kernels
        self.cls_attention = use_cls_attention(cls_attention, family, model, device, rows=self.micro,
                                               cudagraphs=bool(self.cudagraphs), strategy=strategy, stage=self.stage)
        self.compiled = compile_blocks(model, hooks_outside=self.fsdp, cudagraphs=self.cudagraphs) if compile_ else 0
        # the parts outside the blocks (DINOv2: embeddings, final norm, pooling), not under FSDP's hooks
        self.compiled_rest = family.compile_rest(model) if compile_ and not self.fsdp else 0
        if self.cudagraphs:
            log.info("CUDA graphs for the %d compiled blocks (training.cuda_graphs %s%s, bf16 weights on CUDA)",
                     self.compiled, cuda_graphs, " with training.fp8" if self.fp8 else "")
        self.engine = None
        self.reducer: BlockAllReduce | None = None
        self.loss_mod = LossModule(family, model, hp, torch.bfloat16 if (strategy == "deepspeed" and self.bf16) else None)
        offload_opt = strategy == "deepspeed" and self.ds.get("offload_optimizer")
        self.fused_opt = bool(on_cuda and not offload_opt)
        if self.fsdp:  # the weights become DTensor shards: before the optimizer is built over them
            self.loss_mod.to(device)
            broadcast_from_rank0(self.loss_mod)
            spec = FSDPSpec(**(fsdp or {}))
            self.fsdp_units = shard_fsdp(self.loss_mod, model, self.bf16, spec.blocks_per_unit, spec.fp32_root)
        self.master: MasterWeights | None = None
        if masters:
            self.loss_mod.to(device)  # the masters stay where the weights are now
            self.master = MasterWeights(model)
            log.info("bf16 weights, fp32 masters in the optimizer (training.bf16_weights)")
        self.opt = torch.optim.AdamW(param_groups(model, hp.weight_decay, self.master), lr=hp.lr, betas=(0.9, 0.95),
                                     fused=self.fused_opt or None)
        sched_fn = cosine_with_warmup(max(1, total_steps), hp.warmup_ratio)
        self.step_offset = step_offset
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: sched_fn(s + step_offset))
        if strategy == "deepspeed":
            import deepspeed

            _ensure_process_group(device)
            self.engine, _, _, _ = deepspeed.initialize(model=self.loss_mod, optimizer=self.opt,
                                                        config=self.ds_config(self.micro, max(1, hp.batch_size // self.micro)))
            self.fwd = self.engine
        elif strategy == "ddp" and world > 1 and ddp_spec.impl == "blocks":
            self.loss_mod.to(device)
            self.fwd = self.loss_mod
            # with bf16 weights the reductions average the fp32 gradient buffers (MasterWeights' hooks, registered
            # first, have moved a finished block's gradients there), and every rank starts from rank 0's masters
            self.reducer = BlockAllReduce([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                          self.loss_mod, world, self.master)
        elif strategy == "ddp" and world > 1:
            self.loss_mod.to(device)
            self.fwd = nn.parallel.DistributedDataParallel(
                self.loss_mod, device_ids=[device.index] if on_cuda else None,
                gradient_as_bucket_view=True, static_graph=True, bucket_cap_mb=ddp_spec.bucket_cap_mb)
            if ddp_spec.comm_hook == "bf16":
                if on_cuda:
                    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                    self.fwd.register_comm_hook(None, default_hooks.bf16_compress_hook)
                else:
                    log.warning("training.ddp.comm_hook bf16 needs NCCL (GPU workers): gradients go uncompressed")
        else:
            self.loss_mod.to(device)
            self.fwd = self.loss_mod
        self.params = ([p for p in self.master.masters if p.requires_grad] if self.master is not None
                       else [p for p in model.parameters() if p.requires_grad])
        # the clip norm summed during the backward (one process, fused AdamW: see EarlyNorm)
        self.early_norm = (EarlyNorm([(n, p) for n, p in model.named_parameters() if p.requires_grad], device,
                                     self.master.grad_of if self.master is not None else None)
                           if (self.grad_clip and self.fused_opt and self.fwd is self.loss_mod and self.reducer is None
                               and not self.fsdp)
                           else None)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if (self.bf16 and self.engine is None)
                         else contextlib.nullcontext())

    def clip(self) -> None:
        """Gradient clipping by global norm, as ``clip_grad_norm_`` (same coefficient, same result).

        With the fused AdamW the scaling is done inside the optimizer kernel: the clip factor goes in
        as the optimizer's ``grad_scale`` (the divisor ``GradScaler`` uses for unscaling, applied
        per element as the kernel reads each gradient), so only the norm costs a pass over the
        gradients. The separate ``grads *= coef`` pass read and wrote every gradient once more:
        about 7 ms of a 157 ms Qwen2.5-1.5B step on an H100 (the 4.3 % product/plain gap of
        2026-11-22). The norm itself is summed during the backward where it can be (``EarlyNorm``:
        one process). Without a fused optimizer: ``clip_grad_norm_`` itself."""
        if not self.fused_opt:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=self.device.type == "cuda")
            return
        if self.early_norm is not None:
            norm = self.early_norm.total()
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            if not grads:
                return
            norm = nn.utils.get_total_norm(grads, foreach=True)
            if hasattr(norm, "full_tensor"):  # FSDP: the norm of this rank's shards, summed over ranks
                norm = norm.full_tensor()
        # clip_grad_norm_: grads *= min(1, max_norm / (norm + 1e-6)); here: grads /= max(1, (norm + 1e-6) / max_norm)
        self.opt.grad_scale = torch.clamp((norm.float() + 1e-6) / self.grad_clip, min=1.0)

    def ds_config(self, micro_batch: int, accumulation: int = 1) -> dict:
        # ZeRO's reduce and all-gather buckets: 5e8 elements, but never more than the model's trainable parameters.
        # DeepSpeed allocates a whole bucket each step; 5e8 fp32 elements (2 GB) for a model of a few million
        # parameters cost a ViT-S/14 trial GPU memory and a CPU trial most of its time (the tiny Qwen's
        # DeepSpeed test step: 78 of 110 s in torch.empty, tests/test_speed.py). Qwen2.5-0.5B and larger keep
        # about 5e8, as measured on the GPUs. ``ds.config`` may still set either.
        n = sum(p.numel() for p in self.loss_mod.parameters() if p.requires_grad)
        bucket = int(min(5e8, max(1, n)))
        zero: dict[str, Any] = {"stage": self.stage, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if self.ds.get("offload_optimizer"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.ds.get("offload_params"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
               "bf16": {"enabled": self.bf16}, "zero_optimization": zero,
               "gradient_clipping": self.grad_clip, "zero_allow_untested_optimizer": True,
               "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
        for k, v in (self.ds.get("config") or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        return cfg

    @property
    def inner(self) -> nn.Module:
        """The family's model (weights as the engine holds them)."""
        return self.engine.module.model if self.engine is not None else self.model

    def parts(self, batch) -> list[tuple[Any, float]]:
        """The micro-batches of a batch and each one's weight (its share of the rows). The families'
        losses are means over rows, so the weighted sum of the micro-batches' losses is the batch's."""
        n = batch_units(batch)[0]
        if n <= self.micro:
            return [(batch, 1.0)]
        return [(slice_rows(batch, s, min(s + self.micro, n)), (min(s + self.micro, n) - s) / n)
                for s in range(0, n, self.micro)]

    def _no_sync(self, last: bool):
        """Gradients of all but a batch's last micro-batch stay local: no all-reduce, no reduce-scatter."""
        if self.fsdp:
            self.loss_mod.set_requires_gradient_sync(last)
        elif not last and isinstance(self.fwd, nn.parallel.DistributedDataParallel):
            return self.fwd.no_sync()
        return contextlib.nullcontext()

    def step(self, batch) -> torch.Tensor:
        """One optimizer step over ``batch``, in micro-batches of ``self.micro`` rows when it has more
        (gradients accumulated; the data-parallel reduction, the clip norm and the update once, after
        the last). Returns the batch's loss, on the device.

        With ``shrink_on_oom`` (``micro_batch: auto`` on one process), a step whose forward or backward
        runs out of GPU memory (a batch wider than the one tried before the first step, memory taken by
        a neighbour) is run again in micro-batches half as large: the weights are untouched until the
        update, and the half-accumulated gradients are dropped. Running out during the update itself is
        raised as it is."""
        while True:
            try:
                return self._step(batch)
            except torch.OutOfMemoryError:
                if not (self.shrink_on_oom and not self._updating and self.micro > 1):
                    raise
            # out of the except block, so the failed step's frames (its activations) are freed
            self.opt.zero_grad(set_to_none=True)
            if self.master is not None:
                self.master.begin()
                self.master.release()
            before = self.micro
            self.micro = _smaller_divisor(self.micro, self.hp.batch_size)
            self.micro_failed.append(f"{before} rows: out of memory in a step")
            log.warning("out of GPU memory in a step at micro-batch %d: going on with %d", before, self.micro)
            self._release(reset_compiled=True)

    def _release(self, reset_compiled: bool) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if reset_compiled and self.compiled:
            # a static graph for the new size (otherwise dynamo marks the batch dimension dynamic)
            from torch import _dynamo

            _dynamo.reset()

    def _step(self, batch) -> torch.Tensor:
        self._updating = False  # True from the clip on: an error then is not the forward's or backward's
        parts = self.parts(batch)
        last_i = len(parts) - 1
        total = None
        if self.engine is not None:
            for i, (b, w) in enumerate(parts):
                # DeepSpeed reduces and steps at the boundary it is told of (not by counting micro-steps,
                # so a short batch of fewer micro-batches stays right); the weights are applied here
                self.engine.set_gradient_accumulation_boundary(i == last_i)
                loss = self.engine(b)
                self.engine.backward(loss * w if w != 1.0 else loss, scale_wrt_gas=False)
                total = _add_weighted(total, loss, w)
            self.engine.step()
        else:
            total = self.gradients(parts)
            self._updating = True
            if self.grad_clip:
                self.clip()
            self.opt.step()
            if self.master is not None:
                self.master.publish()
            self._updating = False
            self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return total

    def gradients(self, parts: list) -> torch.Tensor:
        """The forward and backward of a batch's micro-batches (``parts(batch)``), gradients accumulated,
        averaged over the data-parallel ranks (after the last micro-batch) and, with bf16 weights, handed to
        the fp32 masters as their ``.grad``: everything of a step but the clip and the update. Not under
        DeepSpeed (its engine does this itself). Returns the batch's loss."""
        last_i = len(parts) - 1
        total = None
        if self.master is not None:
            self.master.begin()
        for i, (b, w) in enumerate(parts):
            last = i == last_i
            self._graph_iteration()
            with self._no_sync(last) if last_i else contextlib.nullcontext():
                with self.autocast:
                    loss = self.fwd(b)
                if last and self.reducer is not None:
                    self.reducer.arm()
                elif last and self.early_norm is not None:
                    self.early_norm.arm()
                if self.master is not None:
                    self.master.arm()
                (loss * w if w != 1.0 else loss).backward()
                if self.master is not None:
                    self.master.flush()
            total = _add_weighted(total, loss, w)
        if self.reducer is not None:
            self.reducer.finish()
        if self.master is not None:
            self.master.finish()
        return total

    def _graph_iteration(self) -> None:
        """With CUDA graphs (``use_cudagraphs``): a new iteration for PyTorch's CUDA graph trees before a
        forward, so its replays may overwrite the previous forward's and backward's graph outputs. Nothing of
        those is held by then: losses and predictions are computed outside the blocks, and the gradients
        were taken into the fp32 buffers block by block (``MasterWeights``)."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def fit_micro_batch(self, batch, budget_bytes: int | None = None) -> tuple[int, list[str]]:
        """``training.micro_batch: auto``: the largest micro-batch (a divisor of the batch's rows, from the
        whole batch down) whose forward and backward fit, tried on ``batch`` (the epoch's longest).
        Until the optimizer has state, room for it (AdamW's two fp32 moments per weight) is held during
        the try, so the first update cannot be what runs out. A try fails when CUDA runs out of memory
        or its peak passes ``budget_bytes`` (the trial's share of the GPU, with a margin). Weights and
        optimizer are left as they were; the gradients are dropped. Returns the micro-batch and, for each
        size that did not fit, why. One process only: under data parallelism one rank running out while
        the others go on would stall their collectives."""
        n = batch_units(batch)[0]
        reserve = 0 if self.opt.state else sum(2 * p.numel() * 4 for p in self.params)
        cuda = self.device.type == "cuda"
        m, failed = largest_fitting(
            lambda rows: self._try_rows(slice_rows(batch, 0, rows) if rows < n else batch, reserve, budget_bytes, cuda),
            n, n, lambda: self._release(reset_compiled=True))
        self.micro = m
        self.micro_failed.extend(failed)
        return m, failed

    def _try_rows(self, b, reserve: int, budget: int | None, cuda: bool) -> str | None:
        """One forward and backward of ``b`` with ``reserve`` bytes held: None if it fit, else why not."""
        why = None
        hold = loss = None
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            hold = torch.empty(reserve, dtype=torch.uint8, device=self.device) if (reserve and cuda) else None
            if self.master is not None:  # gradients taken into fp32 block by block, as in a step
                self.master.begin()
                self.master.arm()
            self._graph_iteration()
            with self.autocast:
                loss = self.fwd(b)
            loss.backward()
            del loss
            if self.master is not None:
                self.master.flush()
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                self.probe_peak = (batch_units(b)[0], peak, budget)
                if budget and peak > budget:
                    why = f"peak {peak / 2**30:.1f} GiB over the budget of {budget / 2**30:.1f} GiB"
        except torch.OutOfMemoryError:
            why = "out of memory"
        hold = loss = None  # the graph (activations) of a backward that ran out goes with the loss
        self.opt.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.begin()  # the bf16 gradients of a backward that ran out
            self.master.release()
        return why

    @torch.no_grad()
    def evaluate(self, loader, splits) -> dict:
        m = self.inner
        m.eval()
        outs = []
        if self.fsdp:  # eval calls the model, not the LossModule whose hook gathers the non-block weights
            self.loss_mod.unshard()
        try:
            for batch in loader:
                self._graph_iteration()
                with self.autocast:
                    outs.append(self.family.eval_batch(m, self.loss_mod.cast(batch)))
        finally:
            m.train()
            if self.fsdp:
                self.loss_mod.reshard()
        if not outs:
            return {}
        rows = [i for b in getattr(loader, "batches", ()) for i in b]  # the split's rows in the order evaluated
        back = torch.argsort(torch.as_tensor(rows)) if rows else None  # row i of the split is t[back[i]]
        out = {}
        for k in outs[0]:
            t = torch.cat([o[k] for o in outs])
            t = (t.float() if t.is_floating_point() else t).cpu()
            out[k] = t if back is None else t[back]
        return self.family.metrics(out, splits)

    # -------------------------------------------------------------- checkpoints
    def full_state_dict(self) -> dict | None:
        """The model's weights on CPU, on rank 0 (a collective under ZeRO-3 and FSDP: every rank calls it)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.loss_mod, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k[len("model."):]: v for k, v in sd.items()} or None
        if self.engine is not None and self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            if sd is None:
                return None
            prefix = "model."
            return {k[len(prefix):]: v.detach().cpu() for k, v in sd.items() if k.startswith(prefix)}
        sd = self.inner.state_dict()
        if self.master is not None:  # the fp32 masters, not their bf16 roundings
            sd.update(self.master.named_masters(self.inner))
        return {k: v.detach().cpu() for k, v in sd.items()}

    def full_optimizer_state(self) -> dict | None:
        """The optimizer state for a sweeper checkpoint, on rank 0 (a collective under FSDP: every rank
        calls it). FSDP's is keyed by parameter name (``get_optimizer_state_dict``), gathered from the
        shards; DeepSpeed keeps its own (``save_engine``): None."""
        if self.engine is not None:
            return None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.loss_mod, self.opt,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True)) or None
        return self.opt.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        """The counterpart of ``full_optimizer_state`` (every rank reads the same checkpoint)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.loss_mod, self.opt, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(state)

    def save_engine(self, ck_dir: str) -> None:
        """DeepSpeed's own sharded checkpoint (every rank writes its partition)."""
        self.engine.save_checkpoint(os.path.join(ck_dir, DS_DIR), tag=DS_TAG)

    def load_engine(self, ck_dir: str) -> bool:
        """DeepSpeed's own checkpoint in ``ck_dir``, loaded with ``weights_only`` (``restricted_ds_load``)."""
        path = os.path.join(ck_dir, DS_DIR)
        if not os.path.isdir(path):
            return False
        with restricted_ds_load(self.engine):
            self.engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        return True


def _ds_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files hold besides tensors and containers (ZeRO's optimizer state: the
    loss scaler, the stage, the fp32 fragments' addresses); found by loading the files DeepSpeed 0.19 wrote on this
    machine with ``weights_only`` (tests/test_pickle_canary.py::test_deepspeed_resume_refuses_a_planted_pickle)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def restricted_ds_load(engine):
    """While DeepSpeed loads its checkpoint, its checkpoint engine reads every file with ``torch.load(...,
    weights_only=True)`` and only ``_ds_safe_globals`` besides: DeepSpeed's own engine unpickles everything
    (``weights_only=False``), so a planted file in a checkpoint dir would run code in the trial. (Its files are not
    in the checkpoint's CHECKSUMS.json: each rank writes its own after rank 0 has installed the checkpoint; and a
    checksum list guards against damage, not against someone who can rewrite it too.) A file that needs anything
    else is refused with one line naming it (sweeper's own loader, ``checkpoint.torch_load_weights_only``)."""
    from sweeper.checkpoint import torch_load_weights_only
    from sweeper.errors import IntegrityError

    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not callable(getattr(ce, "load", None)):
        yield
        return
    safe = _ds_safe_globals()

    def load(path, map_location=None):
        return torch_load_weights_only(path, map_location, IntegrityError, safe_globals=safe)

    ce.load = load  # an instance attribute over the class's method, removed after
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del ce.load


# ------------------------------------------------------------------------------------ prepare


@dataclass
class Prepared:
    family: Any
    hp: Any
    splits: Any
    stepper: Stepper
    device: torch.device
    rank: int
    world: int
    seed: int
    strategy: str
    steps_per_epoch: int
    init_report: dict
    start_epoch: int
    resumed_from: str | None
    flops_unit: float | None = None

    def longest_batch(self):
        """The first epoch's batch of the longest rows (its padded shape is the epoch's largest), on
        the device: what ``training.micro_batch: auto`` must fit."""
        m_train = self.splits.get("train", "fit")
        collate, lengths = make_collate(self.family, m_train)
        b = index_batches(len(m_train), self.hp.batch_size, shuffle=True, seed=self.seed * 7919 + 1,
                          rank=self.rank, world=self.world, drop_last=True, lengths=lengths)
        idx = max(b, key=lambda x: max(lengths[i] for i in x)) if lengths else b[0]
        return _to_device(collate(idx), self.device, non_blocking=False)

    def train_loader(self, epoch_seed: int) -> Prefetcher:
        m_train = self.splits.get("train", "fit")
        collate, lengths = make_collate(self.family, m_train, pin=self.device.type == "cuda")
        b = index_batches(len(m_train), self.hp.batch_size, shuffle=True, seed=epoch_seed, rank=self.rank,
                          world=self.world, drop_last=True, lengths=lengths)
        return Prefetcher(collate, b, self.device)

    def eval_loader(self, batch_size: int, *, by_length: bool = True) -> Prefetcher:
        """The selection split's batches. Token data comes sorted by length (``by_length``), so a batch
        pads only to its own longest row (4.8 % of the tokens against 26.4 % in the split's order, on
        the packing sweep's data); ``evaluate`` puts the outputs back in the split's order (from the
        batches' index lists) before the metrics."""
        ds = self.splits.get("val_select", "select")
        collate, lengths = make_collate(self.family, ds)
        order = list(range(len(ds)))
        if by_length and lengths is not None:
            order.sort(key=lengths.__getitem__)
        return Prefetcher(collate, [order[s:s + batch_size] for s in range(0, len(order), batch_size)], self.device)


def _dist_info(use_ray_train: bool) -> tuple[int, int, int]:
    if use_ray_train:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    return 0, 1, 0


def prepare(config: dict, spec, reporter=None, *, use_ray_train: bool = False) -> Prepared:
    """Everything a trial (or the benchmark) needs before the first step, built once, the same way."""
    from sweeper import checkpoint as ckpt_mod
    from sweeper.transfer import apply_transfer
    from sweeper.trial import _check_coverage, _hparams

    from . import registry
    from .base import cached_splits, resolve_precision, seed_everything

    m = spec.manifest
    family = registry.get(m["trainable"])
    training = m["training"]
    init_from, transfer, seed = spec.init_from or m.get("init_from"), spec.transfer, spec.seed
    if spec.init_from is None and m.get("init_from"):
        transfer = m.get("init_transfer", "compatible")
    run = config.get("_run")
    if isinstance(run, dict):
        seed, init_from, transfer = run["seed"], run["init_from"], run.get("transfer", transfer)
        config = dict(run["hp"])
    seed = training["seed"] if seed is None else seed
    seed_everything(seed, training["deterministic"])
    hp = _hparams(config, family)
    rank, world, local_rank = _dist_info(use_ray_train)
    on_gpu = torch.cuda.is_available() and _gpus(m) > 0
    if on_gpu:
        if use_ray_train:
            import ray.train.torch

            device = ray.train.torch.get_device()
        else:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed reads it for its device

    splits = cached_splits(family, m["data"], m["model"])
    _check_coverage(splits, m["data"]["min_rows"])
    strategy = resolve_strategy(m)
    ds = ds_settings(m)
    # Large shapes are built straight on the GPU (a 7B random init on the CPU takes minutes)
    build_ctx = torch.device(device) if (on_gpu and not m["model"].get("path")) else contextlib.nullcontext()
    with build_ctx:
        model = family.build_model(m["model"], splits, hp)
    init_report: dict = {}
    if init_from:
        src = ckpt_mod.load_weights_file(init_from)
        init_report = apply_transfer(model, src, transfer, family.info.backbone_prefix)

    # resume: the newest checkpoint of this trial that verifies
    start_epoch, opt_state, resumed = 0, None, None
    cands = reporter.restore_candidates() if (reporter is not None and hasattr(reporter, "restore_candidates")) else []
    if cands:
        best, _ = ckpt_mod.latest_valid_checkpoint([Path(c) for c in cands])
        if best is not None:
            loaded = ckpt_mod.load_checkpoint(best)
            if not (strategy == "deepspeed" and (Path(best) / DS_DIR).is_dir()):
                model.load_state_dict(loaded.model_state)
                # optimizer state keyed by name (fsdp) or by position (plain, ddp): only into its own kind
                if (loaded.state.get("strategy") == "fsdp") == (strategy == "fsdp" and world > 1):
                    opt_state = loaded.optimizer_state
                elif loaded.optimizer_state:
                    log.info("checkpoint %s is from strategy %s: weights only, the optimizer starts afresh",
                             best, loaded.state.get("strategy"))
            start_epoch = int(loaded.state.get("epoch", 0))
            resumed = str(best)

    precision = resolve_precision(training["precision"], on_gpu, family.info)
    max_epochs = spec.max_epochs or training["max_epochs"]
    n_train = len(splits.get("train", "fit")) // world
    steps_per_epoch = max(1, n_train // hp.batch_size) if n_train >= hp.batch_size else 1
    if training.get("limit_train_batches"):
        steps_per_epoch = min(steps_per_epoch, training["limit_train_batches"])
    try:
        flops_unit = flops_per_unit(family.info.name, model, m["data"].get("max_length", 0))
    except Exception:  # noqa: BLE001 - MFU is informative only
        flops_unit = None
    compile_ = resolve_compile(training.get("compile", "auto"), on_gpu, strategy, int(ds["stage"]))
    clip = (hp.grad_clip if hp.grad_clip is not None else training["grad_clip"]) or 0.0
    stepper = Stepper(family, model, hp, strategy=strategy, device=device, precision=precision, grad_clip=clip,
                      total_steps=steps_per_epoch * max_epochs, step_offset=steps_per_epoch * start_epoch,
                      compile_=compile_, ds=ds, world=world, ddp=m["training"].get("ddp"),
                      fsdp=m["training"].get("fsdp"), micro_batch=resolve_micro(training.get("micro_batch"), hp.batch_size),
                      bf16_weights=training.get("bf16_weights", "auto"), fp8=bool(training.get("fp8", False)),
                      fast_blocks=bool(training.get("fast_blocks", True)),
                      gelu_epilogue=bool(training.get("gelu_epilogue", False)),
                      cuda_graphs=training.get("cuda_graphs", "auto"),
                      cls_attention=training.get("cls_attention", "auto"))
    if resumed and strategy == "deepspeed":
        if not stepper.load_engine(resumed):  # a checkpoint from another strategy: weights only
            stepper.inner.load_state_dict({k: v for k, v in ckpt_mod.load_checkpoint(resumed).model_state.items()},
                                          strict=False)
    elif opt_state is not None:
        stepper.load_optimizer_state(opt_state)
        for g in stepper.opt.param_groups:
            g["lr"] = hp.lr
    if resumed:
        log.info("resumed from %s at epoch %d", resumed, start_epoch)
    return Prepared(family, hp, splits, stepper, device, rank, world, seed, strategy, steps_per_epoch,
                    init_report, start_epoch, resumed, flops_unit)


def choose_micro_batch(p: Prepared, m: dict) -> bool:
    """``training.micro_batch: auto`` on one CUDA process without DeepSpeed: the micro-batch that fits
    (``Stepper.fit_micro_batch`` on the epoch's longest batch, within the trial's share of the GPU), and
    a step that runs out later shrinks it again. Elsewhere the whole batch (an int was applied by
    ``prepare``). Returns whether it tried (one forward and backward, which also compiles the blocks)."""
    st = p.stepper
    tried = (m["training"].get("micro_batch", "auto") == "auto" and st.device.type == "cuda" and p.world == 1
             and st.engine is None and not st.fsdp)
    if tried:
        share = _gpus(m)
        capped = 0 < share < 1
        if capped:
            # a packed trial's tries stop at its share of the card: running out there is its own
            # error, not its neighbours' (without the cap a try grows until the whole card is full)
            torch.cuda.set_per_process_memory_fraction(share, st.device)
        try:
            st.fit_micro_batch(p.longest_batch(), gpu_budget_bytes(st.device, share))
        finally:
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0, st.device)
        st.shrink_on_oom = True
    if st.micro < p.hp.batch_size:
        log.info("micro-batch %d x %d = batch %d%s", st.micro, -(-p.hp.batch_size // st.micro),
                 p.hp.batch_size, f" (did not fit: {'; '.join(st.micro_failed)})" if st.micro_failed else "")
    return tried


def gpu_budget_bytes(device: torch.device, gpus: float) -> int:
    """What a trial may fill: 90 % of the memory free to this process (what it holds included), and of its
    share of the card (``resources.gpus`` below 1: packed trials leave their neighbours' share alone)."""
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    if 0 < gpus < 1:
        usable = min(usable, int(total * gpus))
    return int(usable * 0.9)


# ------------------------------------------------------------------------------------ the trial


def _report(reporter, metrics: dict, ck: str | None, shard: bool) -> None:
    from sweeper.trial import TrainReporter

    if shard and isinstance(reporter, TrainReporter):
        reporter.report(metrics, ck, every_rank=True)  # each rank its shard; Ray Train merges them
    else:
        reporter.report(metrics, ck)


def run_trial(config: dict, spec, reporter, *, use_ray_train: bool = False) -> dict:
    """A trial on the fast path: same reports, checkpoints and NaN handling as the Lightning loop."""
    from sweeper import checkpoint as ckpt_mod
    from sweeper.trial import FAILED_KEY

    t0 = time.perf_counter()
    m = spec.manifest
    training = m["training"]
    p = prepare(config, spec, reporter, use_ray_train=use_ray_train)
    st = p.stepper
    max_epochs = spec.max_epochs or training["max_epochs"]
    every = int(training.get("checkpoint_every", 1))
    flops_unit = p.flops_unit
    timing = {"train_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0}
    first_step = None
    first_step_unix = None
    if p.start_epoch < max_epochs:
        # the micro-batch try is a training forward and backward (and compiles, as a first step would):
        # it counts as training, and training starts with it
        tp = time.perf_counter()
        tp_unix = time.time()
        if choose_micro_batch(p, m):
            first_step, first_step_unix = tp, tp_unix
            timing["train_s"] += time.perf_counter() - tp
    last: dict = {}
    limit = training.get("limit_train_batches")
    for epoch in range(p.start_epoch + 1, max_epochs + 1):
        te = time.perf_counter()
        loss_sum, nsteps, samples, tokens = None, 0, 0, 0
        for i, batch in enumerate(p.train_loader(p.seed * 7919 + epoch)):
            if limit and i >= limit:
                break
            if first_step is None:
                first_step = time.perf_counter()
                first_step_unix = time.time()  # comparable with the driver's clock (start-up figures)
            l = st.step(batch)
            loss_sum = l.float() if loss_sum is None else loss_sum + l.float()
            nsteps += 1
            s, t = batch_units(batch)
            samples, tokens = samples + s, tokens + t
        train_loss = float(loss_sum) / nsteps if nsteps else float("nan")  # the one sync of the epoch
        dt = time.perf_counter() - te
        timing["train_s"] += dt
        tv = time.perf_counter()
        metrics = st.evaluate(p.eval_loader(training["eval_batch_size"]), p.splits)
        timing["eval_s"] += time.perf_counter() - tv
        metrics["train_loss"] = train_loss
        now = time.perf_counter()
        metrics.update(epoch=epoch, phase=spec.phase, time_startup_s=(first_step or now) - t0,
                       first_step_unix=first_step_unix if first_step is not None else time.time(),
                       time_train_s=timing["train_s"], time_eval_s=timing["eval_s"], strategy=p.strategy,
                       world=p.world, train_samples_per_s=samples * p.world / dt if dt else 0.0,
                       micro_batch=st.micro)
        if tokens != samples:
            metrics["train_tokens_per_s"] = tokens * p.world / dt if dt else 0.0
        if flops_unit and p.device.type == "cuda" and dt:
            metrics["mfu"] = flops_unit * tokens / dt / PEAK_BF16
        if p.init_report and epoch == p.start_epoch + 1:
            metrics["transfer_copied"] = len(p.init_report.get("copied", []))
            metrics["transfer_skipped"] = len(p.init_report.get("skipped", []))
        if not torch.isfinite(torch.tensor(train_loss)):
            metrics[FAILED_KEY] = f"training loss became {train_loss} in epoch {epoch}"
            metrics[m["selection"]["metric"]] = float("inf") if m["selection"]["mode"] == "min" else float("-inf")
            _report(reporter, metrics, None, False)
            return metrics
        due = bool(every) and (epoch % every == 0 or epoch >= max_epochs)
        tc = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="sweeper-ckpt-")
        try:
            ck = os.path.join(tmp, "ckpt")
            wrote = False
            if due:
                sd = st.full_state_dict()  # collective under ZeRO-3 and FSDP
                opt = st.full_optimizer_state()  # collective under FSDP
                if p.rank == 0:
                    ckpt_mod.write_checkpoint(ck, sd, opt, {
                        "epoch": epoch, "global_step": epoch * p.steps_per_epoch, "metrics": metrics,
                        "trainable": p.family.info.name, "phase": spec.phase, "seed": p.seed, "config": config,
                        "strategy": p.strategy, "world": p.world,
                        "transfer": {k: p.init_report[k] for k in ("rule", "copied", "skipped")} if p.init_report else None})
                    wrote = True
                if st.engine is not None:
                    st.save_engine(ck)
                    wrote = True
            timing["ckpt_s"] += time.perf_counter() - tc
            metrics["time_ckpt_s"] = timing["ckpt_s"]
            metrics["time_wall_s"] = time.perf_counter() - t0
            last = metrics
            _report(reporter, metrics, ck if wrote else None, shard=st.engine is not None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return last
