"""A GELU MLP (``fc2(gelu(fc1(x)))``, exact erf GELU) whose GELU runs inside the matmuls' epilogues: DINOv2's
fast blocks on CUDA (``training.fast_blocks``).

PyTorch runs a GELU MLP as separate passes over the 4×-wide hidden activation (at ViT-B/14 batch 512: 131,584
rows × 3,072, 0.8 GB in bf16). Forward: the first matmul writes ``h``, then a fused elementwise kernel reads
``h`` and writes ``g = gelu(h)``. Backward: the second layer's input-gradient matmul writes ``dg``, a kernel
reads ``dg`` and ``h`` and writes ``dh = dg ∘ gelu'(h)``, and a reduction reads them again for the first
layer's bias gradient. The H100 profile put those GELU passes at 22 ms of a 192 ms step
(``benchmarks/results/gpu_profile_h100_2026-11-27_vitb-bs512-splitattn.txt``). Here two Triton matmuls take
them into their epilogues:

- ``fc1_gelu``: ``h = x W1ᵀ + b1`` and ``g = gelu(h)`` from the same accumulator, both written once;
- ``fc2_dgelu``: ``dh = (dy W2) ∘ gelu'(h)``, reading ``h`` in the epilogue, plus each row-tile's column sums
  of ``dh`` (the bias gradient, summed over the tiles afterwards: deterministic, no atomics).

The other matmuls (``g W2ᵀ``, and the weight and input gradients) stay cuBLAS. The arithmetic is the
unfused path's: ``h`` rounded to the working dtype before ``gelu`` is taken of it, ``dg`` rounded before it
is multiplied by ``gelu'(h)`` (the same erf forms as PyTorch's), fp32 accumulation throughout; only the
order of the matmuls' partial sums differs. ``tests/test_gelu_mlp.py`` checks both kernels and the module
against PyTorch in Triton's interpreter on the CPU, and on CUDA where there is one.

Used only where it can run: a CUDA tensor in bf16 or fp16 (autocast's dtype, or the input's), Triton
importable, ``fc1`` a plain ``nn.Linear`` with a bias (``training.fp8`` makes it a ``Float8Linear``, which
then runs as it is) and an exact GELU between the layers. Otherwise the module runs its own ``forward``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton ships with CUDA builds of PyTorch; CPU builds may lack it (then the module's own forward runs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None



def interpreting() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on the CPU: the tests use it."""
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    _SQRT1_2 = tl.constexpr(0.7071067811865476)
    _INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
    # Hopper-sized tiles (the shapes here: K 768 or 384, N 3072 or 1536, M a batch of 257-token images).
    # The tests pass one small config through ``_CONFIG_OVERRIDE`` (the interpreter runs each tile in numpy).
    _CONFIGS = [
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BM": 256, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    ]
    _MIN_BM = 64  # the smallest BM any config (or a test's) uses: the bias-gradient partials have cdiv(M, 64) rows

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's (row tile, column tile), in groups of GROUP_M row tiles (neighbouring programs share
        the weight's columns in L2)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        return pid_m, pid_n

    @triton.jit
    def _to(v, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
        """``v`` (fp32) in ``dtype``, rounded to nearest even. Triton's interpreter (3.9) truncates fp32 to bf16,
        so there (``INTERP_BF16``) the rounding is done on the bits first and the cast is then exact."""
        if INTERP_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _matmul(a_ptr, b_ptr, M, N, K, sam, sak, sbk, sbn, pid_m, pid_n,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                UPCAST: tl.constexpr):
        """fp32 ``A[rows, :] @ B[:, cols]`` for A (M, K) and B (K, N) given by strides. Rows past M read row
        ``r % M`` (stores mask them), so only K needs masking, and only when BK does not divide it (EVEN_K)."""
        rm = (pid_m * BM + tl.arange(0, BM)) % M
        rn = (pid_n * BN + tl.arange(0, BN)) % N
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm[:, None] * sam + rk[None, :] * sak
        b_ptrs = b_ptr + rk[:, None] * sbk + rn[None, :] * sbn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                left = K - k * BK
                a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0.0)
            if UPCAST:  # Triton's interpreter multiplies bf16 wrongly (3.9); fp32 holds bf16 exactly
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK * sak
            b_ptrs += BK * sbk
        return acc

    @triton.jit
    def _fc1_gelu_kernel(x_ptr, w_ptr, b_ptr, h_ptr, g_ptr, M, N, K, sxm, sxk, swn, swk,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
        acc = _matmul(x_ptr, w_ptr, M, N, K, sxm, sxk, swk, swn, pid_m, pid_n, BM, BN, BK, EVEN_K, UPCAST)  # x (M,K) @ Wᵀ (K,N)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        h = _to(acc + bias[None, :], h_ptr.dtype.element_ty, UPCAST)
        hf = h.to(tl.float32)  # gelu of the rounded h, as the unfused path takes it
        g = 0.5 * hf * (1.0 + tl.erf(hf * _SQRT1_2))
        offs = rm[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(h_ptr + offs, h, mask=mask)
        tl.store(g_ptr + offs, _to(g, g_ptr.dtype.element_ty, UPCAST), mask=mask)

    @triton.jit
    def _fc2_dgelu_kernel(dy_ptr, w_ptr, h_ptr, dh_ptr, db_ptr, M, N, K, sdm, sdk, swk, swn,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                          EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
        acc = _matmul(dy_ptr, w_ptr, M, N, K, sdm, sdk, swk, swn, pid_m, pid_n, BM, BN, BK, EVEN_K, UPCAST)  # dy (M,K) @ W2 (K,N)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        offs = rm[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dg = _to(acc, dh_ptr.dtype.element_ty, UPCAST).to(tl.float32)  # rounded, as the unfused matmul writes it
        cdf = 0.5 * (1.0 + tl.erf(h * _SQRT1_2))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        dh = tl.where(mask, dg * (cdf + h * pdf), 0.0)
        tl.store(dh_ptr + offs, _to(dh, dh_ptr.dtype.element_ty, UPCAST), mask=mask)
        tl.store(db_ptr + pid_m * N + rn, tl.sum(dh, axis=0), mask=rn < N)

    @triton.jit
    def _tile_of(tile, num_m, in_group, GROUP_M: tl.constexpr):
        first_m = (tile // in_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % in_group) % size_m, (tile % in_group) // size_m

    @triton.jit
    def _fc1_gelu_tma(x_ptr, w_ptr, b_ptr, h_ptr, g_ptr, M, N, K,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      NUM_SMS: tl.constexpr, UPCAST: tl.constexpr):
        """Persistent (one program per SM, tiles strided over them), operands and results through TMA
        descriptors (out-of-range rows and K read as zero, and are not written)."""
        x_d = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        w_d = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        h_d = tl.make_tensor_descriptor(h_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        g_d = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        in_group = GROUP_M * num_n
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, num_m, in_group, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                a = x_d.load([pid_m * BM, ki * BK])
                b = w_d.load([pid_n * BN, ki * BK])
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b.T, acc)
            rn = pid_n * BN + tl.arange(0, BN)
            bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            h = _to(acc + bias[None, :], h_ptr.dtype.element_ty, UPCAST)
            h_d.store([pid_m * BM, pid_n * BN], h)
            hf = h.to(tl.float32)
            g_d.store([pid_m * BM, pid_n * BN], _to(0.5 * hf * (1.0 + tl.erf(hf * _SQRT1_2)), g_ptr.dtype.element_ty, UPCAST))

    @triton.jit
    def _fc2_dgelu_tma(dy_ptr, w_ptr, h_ptr, dh_ptr, db_ptr, M, N, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       NUM_SMS: tl.constexpr, UPCAST: tl.constexpr):
        dy_d = tl.make_tensor_descriptor(dy_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        w_d = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
        h_d = tl.make_tensor_descriptor(h_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        dh_d = tl.make_tensor_descriptor(dh_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        in_group = GROUP_M * num_n
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, num_m, in_group, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(k_tiles):
                a = dy_d.load([pid_m * BM, ki * BK])
                b = w_d.load([ki * BK, pid_n * BN])
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            h = h_d.load([pid_m * BM, pid_n * BN]).to(tl.float32)  # rows past M read 0: dh 0 there
            dg = _to(acc, dh_ptr.dtype.element_ty, UPCAST).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.erf(h * _SQRT1_2))
            pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
            dh = dg * (cdf + h * pdf)
            dh_d.store([pid_m * BM, pid_n * BN], _to(dh, dh_ptr.dtype.element_ty, UPCAST))
            rn = pid_n * BN + tl.arange(0, BN)
            tl.store(db_ptr + pid_m * N + rn, tl.sum(dh, axis=0), mask=rn < N)

    _TMA_CONFIGS = [
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        triton.Config({"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BM": 256, "BN": 128, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    ]
    _upcast = lambda name: triton.heuristics({"UPCAST": lambda a: interpreting() and a[name].dtype == torch.bfloat16})  # noqa: E731
    _fc1_gelu_tma_plain = _upcast("x_ptr")(_fc1_gelu_tma)
    _fc2_dgelu_tma_plain = _upcast("dy_ptr")(_fc2_dgelu_tma)
    _fc1_gelu_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K"])(_fc1_gelu_tma_plain)
    _fc2_dgelu_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K"], reset_to_zero=["db_ptr"])(
        _fc2_dgelu_tma_plain)

    def _heuristics(a_name):
        return triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0,
                                  "UPCAST": lambda a: interpreting() and a[a_name].dtype == torch.bfloat16})

    _fc1_gelu_plain = _heuristics("x_ptr")(_fc1_gelu_kernel)
    _fc2_dgelu_plain = _heuristics("dy_ptr")(_fc2_dgelu_kernel)
    _fc1_gelu_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_fc1_gelu_plain)
    # the bias-gradient partials: a config with a larger BM writes fewer rows, so autotuning zeroes them between tries
    _fc2_dgelu_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"], reset_to_zero=["db_ptr"])(
        _fc2_dgelu_plain)

_CONFIG_OVERRIDE: dict | None = None  # tests: {"BM":..., "BN":..., "BK":..., "GROUP_M":...}, no autotuning
KERNELS = "tma"  # "tma": persistent, TMA descriptors (Hopper); "pointer": plain loads (the benchmark compares both)


def _alloc(size: int, alignment: int, stream):
    """Scratch for the kernels' device-side TMA descriptors (Triton asks through ``triton.set_allocator``)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _launch(name: str, M: int, N: int, *args):
    # TMA wants 16-byte row strides: K and N multiples of 8 in bf16 (ViT's 768, 3072, 1536 are)
    tma = KERNELS == "tma" and args[7] % 8 == 0 and N % 8 == 0
    if tma:
        triton.set_allocator(_alloc)
        args = args[:8]  # the 5 tensors (contiguous) and M, N, K: the descriptors carry the strides
    plain = globals()[f"_{name}_tma_plain" if tma else f"_{name}_plain"]
    tuned = globals()[f"_{name}_tma_tuned" if tma else f"_{name}_tuned"]
    sms = 4 if interpreting() else torch.cuda.get_device_properties(args[0].device).multi_processor_count
    extra = {"NUM_SMS": sms} if tma else {}

    def grid(meta):
        tiles = triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])
        return (min(sms, tiles),) if tma else (tiles,)

    if _CONFIG_OVERRIDE is not None or interpreting():
        cfg = _CONFIG_OVERRIDE or {"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 4}
        plain[grid(cfg)](*args, **cfg, **extra)
    else:
        tuned[grid](*args, **extra)


@torch.library.custom_op("sweeper::fc1_gelu", mutates_args=())
def fc1_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x wᵀ + b`` and ``gelu(h)`` for x (M, K), w (N, K), b (N), all one dtype."""
    x, w = x.contiguous(), w.contiguous()
    M, K = x.shape
    N = w.shape[0]
    h = x.new_empty(M, N)
    g = x.new_empty(M, N)
    _launch("fc1_gelu", M, N, x, w, b, h, g, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1))
    return h, g


@fc1_gelu.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("sweeper::fc2_dgelu", mutates_args=())
def fc2_dgelu(dy: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dh = (dy w) ∘ gelu'(h)`` for dy (M, K), w (K, N) (the second layer's weight), h (M, N); and the fp32
    column sums of ``dh`` (the first layer's bias gradient)."""
    dy, w, h = dy.contiguous(), w.contiguous(), h.contiguous()
    M, K = dy.shape
    N = w.shape[1]
    dh = torch.empty_like(h)
    parts = torch.zeros(triton.cdiv(M, _MIN_BM), N, device=dy.device, dtype=torch.float32)
    _launch("fc2_dgelu", M, N, dy, w, h, dh, parts, M, N, K, dy.stride(0), dy.stride(1), w.stride(0), w.stride(1))
    return dh, parts.sum(0)


@fc2_dgelu.register_fake
def _(dy, w, h):
    return torch.empty_like(h), h.new_empty(h.shape[1], dtype=torch.float32)


class _GeluMLP(torch.autograd.Function):
    """``gelu(x w1ᵀ + b1) w2ᵀ + b2`` for x (M, K), all one dtype; the GELU in the Triton matmuls' epilogues."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h, g = torch.ops.sweeper.fc1_gelu(x, w1, b1)
        ctx.save_for_backward(x, w1, h, g, w2)
        return torch.addmm(b2, g, w2.t())

    @staticmethod
    def backward(ctx, dy):
        x, w1, h, g, w2 = ctx.saved_tensors
        dy = dy.contiguous()
        dh, db1 = torch.ops.sweeper.fc2_dgelu(dy, w2, h)
        return dh @ w1, dh.t() @ x, db1.to(w1.dtype), dy.t() @ g, dy.sum(0)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The fused MLP over the last dimension of ``x``, everything in ``x``'s dtype."""
    lead = x.shape[:-1]
    y = _GeluMLP.apply(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)
    return y.view(*lead, w2.shape[0])


def is_exact_gelu(fn) -> bool:
    """Whether ``fn`` computes PyTorch's exact (erf) GELU (not the tanh approximation, not another activation)."""
    t = torch.linspace(-6, 6, 97, dtype=torch.float64)
    try:
        return bool(torch.allclose(fn(t), F.gelu(t), rtol=0, atol=1e-12))
    except Exception:  # noqa: BLE001 - an activation that cannot take this tensor is not one to fuse
        return False


class GeluMLP(nn.Module):
    """Mixed into an MLP module's class (``convert``) in place: ``forward`` runs the fused kernels where they
    can run (module docstring) and the original ``forward`` otherwise. ``_fc2_weights`` gives the second
    layer's effective weight and bias (a ``LayerScaledLinear`` folds its scale into them)."""

    def forward(self, hidden_state):
        fc1, fc2 = self.fc1, self.fc2
        dev = hidden_state.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden_state.dtype
        if (triton is None or not (hidden_state.is_cuda or interpreting()) or dt not in (torch.bfloat16, torch.float16)
                or type(fc1) is not nn.Linear or fc1.bias is None or fc2.bias is None
                or not isinstance(fc2, nn.Linear)):
            return super().forward(hidden_state)
        w2, b2 = fc2.effective() if hasattr(fc2, "effective") else (fc2.weight, fc2.bias)
        with torch.autocast(dev, enabled=False):
            return gelu_mlp(hidden_state.to(dt), fc1.weight.to(dt), fc1.bias.to(dt), w2.to(dt), b2.to(dt))


_CLASSES: dict[type, type] = {}


def convert(mlp: nn.Module, activation_attrs=("activation", "activation_fn")) -> bool:
    """Make ``mlp`` (``fc1``, an exact-GELU activation under one of ``activation_attrs``, ``fc2``) a ``GeluMLP``
    in place. Returns whether it did (an MLP of another form is left alone)."""
    act = next((getattr(mlp, a) for a in activation_attrs if hasattr(mlp, a)), None)
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if (isinstance(mlp, GeluMLP) or act is None or not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear)
            or not is_exact_gelu(act)):
        return False
    orig = type(mlp)
    if orig not in _CLASSES:
        _CLASSES[orig] = type(f"GeluFused{orig.__name__}", (GeluMLP, orig), {})
    mlp.__class__ = _CLASSES[orig]
    return True
