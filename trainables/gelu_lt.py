"""An MLP whose GELU runs inside cuBLASLt's matmul epilogues (``training.gelu_epilogue``, DINOv2).

``fc2(gelu(fc1(x)))`` as two fused matmuls a direction instead of a matmul, an elementwise pass and a matmul:

- forward, ``GELU_AUX_BIAS``: one matmul writes ``act = gelu(x W1ᵀ + b1)`` and keeps ``pre = x W1ᵀ + b1``
  for the backward (the separate GELU pass over the [rows, 4·d] activation, a read and a write, is gone);
- backward, ``DGELU``: the matmul that forms ``dy W2`` multiplies by ``gelu'(pre)`` in its epilogue (the GELU
  backward pass, three activation-sized reads and writes, is gone); ``b1``'s gradient, the rows' sum, stays
  PyTorch's.

Measured on the H100 (ViT-B/14, batch 512; benchmarks/results/gpu_2026-11-28-twelfth.md): the MLP's forward +
backward 6.65 against 7.67 ms (Inductor's erf GELU), the product's step 179.97 against 189.90 ms (40.0 % against
37.9 % MFU). cuBLASLt's DGELU_BGRAD (the bias sum in the epilogue too) ran 3.47 ms against 1.22 ms for DGELU, and
BGRADB (the bias sums in the weight-gradient matmuls) no faster than PyTorch's matmul and sum: not used.

cuBLASLt's GELU is the tanh form (PyTorch's ``gelu(approximate="tanh")``), not the erf form DINOv2 was
trained with, so this changes the numerics: off by default (the ViT-B/14 GPU manifest turns it on), and
benchmarks/curves_h100.sh (``vitb-gelu``) has its loss curve against the erf MLP: closer to it than an erf run
with another batch order.

One workspace per GPU serves every call, on the caller's (current) stream: the MLP must not run on two streams
of one device at once (the Stepper runs the blocks on one).

The kernels are cuBLASLt's own (``csrc/gelu_lt.c``, called through ctypes; the C file is built with the
system's C compiler against the CUDA toolkit's ``cublasLt.h`` the first time it is needed, in about a
second, and cached by content under ``~/.cache/sweeper``). The two matmuls are ``torch.library`` custom
ops with fake implementations, so ``torch.compile`` keeps each block one graph. On the CPU the same ops
run as plain PyTorch (the tanh GELU and its gradient), which is what the CPU tests and CPU trials use; on
CUDA they need bf16 operands (autocast), else the same plain path runs.

Tried before this (docs/gpu.md, tenth session): the same two epilogues in Triton, correct but about 40 %
slower than cuBLAS at K = 768, so the step got slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .dinov2_fast import LayerScaledLinear, with_mixin

log = logging.getLogger(__name__)

_SRC = Path(__file__).resolve().parent / "csrc" / "gelu_lt.c"
_WORKSPACE = 32 << 20  # cuBLASLt's workspace per call (PyTorch gives its own cuBLASLt calls 32 MiB on Hopper)
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_WS: dict[int, torch.Tensor] = {}
# which of cuBLASLt's heuristic choices each kernel runs (0: its first; benchmarks/mlp_lt.py times the others)
ALGO = {"lt_linear_gelu": 0, "lt_dgelu": 0, "lt_wgrad_bgradb": 0}
# fc1's weight gradient and b1's gradient in one matmul (BGRADB epilogue) instead of PyTorch's matmul and a separate
# sum over the 4·d-wide dpre. An experiment switch, off: no faster for ViT-B/14 bs 512 on an H200 (172.8 ms either
# way, fifteenth session, benchmarks/results/gpu_2026-11-28-fifteenth.md; benchmarks/step_bench.py --fc1-bgradb)
FC1_BGRADB = False


def _cuda_home() -> Path | None:
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and (Path(c) / "include" / "cublasLt.h").exists():
            return Path(c)
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include" / "cublasLt.h").exists():
        return Path(nvcc).resolve().parents[1]
    return None


def why_not_ready(device: torch.device) -> str | None:
    """Why the cuBLASLt path cannot run on ``device`` (None: it can, or the device is the CPU, where the
    plain-PyTorch form runs)."""
    if device.type != "cuda":
        return None
    if torch.version.cuda is None:
        return "this PyTorch was built without CUDA"
    if _cuda_home() is None:
        return "no CUDA toolkit with cublasLt.h found (set CUDA_HOME)"
    cc = (shlex.split(os.environ.get("CC", "cc")) or ["cc"])[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}; set CC) to build trainables/csrc/gelu_lt.c"
    return None


def library() -> ctypes.CDLL:
    """The built ``csrc/gelu_lt.c``, built on first use (per content, toolkit and compiler; a trial builds it when
    it converts its blocks, so a failure is reported then, naming the setting)."""
    global _LIB
    if _LIB is not None:  # every matmul call asks: no lock once it is loaded
        return _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        home = _cuda_home()
        if home is None:
            raise RuntimeError("training.gelu_epilogue: no CUDA toolkit with cublasLt.h found (set CUDA_HOME)")
        home = home.resolve()
        cc = shlex.split(os.environ.get("CC", "cc"))
        # the key: this source, the toolkit's cuBLASLt header (its version), where it is, and the compiler
        key = hashlib.sha256(b"\0".join([_SRC.read_bytes(), (home / "include" / "cublasLt.h").read_bytes(),
                                          str(home).encode(), " ".join(cc).encode()])).hexdigest()[:16]
        cache = Path(os.environ.get("SWEEPER_CACHE", Path.home() / ".cache" / "sweeper"))
        so = cache / f"gelu_lt-{key}.so"
        if cache.exists():  # it loads code: only from a directory that no one else can write
            st = cache.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                raise RuntimeError(f"training.gelu_epilogue: {cache} is writable by others or not ours; "
                                   "set SWEEPER_CACHE to a private directory")
        if not so.exists():
            cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                lib = next((p for p in (home / "lib64", home / "lib", home / "targets/x86_64-linux/lib",
                                        home / "targets/sbsa-linux/lib") if (p / "libcublasLt.so").exists()),
                           home / "lib64")
                cmd = [*cc, "-O2", "-shared", "-fPIC", "-pthread", str(_SRC), f"-I{home / 'include'}", f"-L{lib}",
                       "-lcublasLt", "-o", tmp]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True)
                except OSError as e:
                    raise RuntimeError(f"training.gelu_epilogue: building {_SRC.name} failed: {' '.join(cmd)}: {e}")
                if r.returncode != 0:
                    raise RuntimeError(f"training.gelu_epilogue: building {_SRC.name} failed: {' '.join(cmd)}\n"
                                       f"{r.stderr}")
                os.replace(tmp, so)  # atomic: concurrent trials each build, one file wins
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            log.info("built %s (%s)", so, " ".join(cmd))
        lib = ctypes.CDLL(str(so))
        for name in ("lt_linear_gelu", "lt_dgelu", "lt_wgrad_bgradb"):
            f = getattr(lib, name)
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_void_p, ctypes.c_size_t,
                                                                        ctypes.c_void_p, ctypes.c_int]
        lib.lt_status_string.restype = ctypes.c_char_p
        lib.lt_status_string.argtypes = [ctypes.c_int]
        _LIB = lib
        return lib


def _workspace(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _WS:
        _WS[idx] = torch.empty(_WORKSPACE, dtype=torch.uint8, device=device)
    return _WS[idx]


_NOT_SUPPORTED = 15  # CUBLAS_STATUS_NOT_SUPPORTED: no algorithm for this shape (the caller takes the plain path)
_UNSUPPORTED: set[tuple] = set()


def _call(name: str, dims: tuple[int, int, int], *tensors: torch.Tensor) -> bool:
    """Run ``name`` on the current stream. False where cuBLASLt has no algorithm for the shape (logged once per
    shape; the op then computes the plain form); any other failure raises."""
    if (name, dims) in _UNSUPPORTED:
        return False
    lib = library()
    dev = tensors[0].device
    ws = _workspace(dev)
    status = getattr(lib, name)(*dims, *(t.data_ptr() for t in tensors), ws.data_ptr(), _WORKSPACE,
                                torch.cuda.current_stream(dev).cuda_stream, ALGO[name])
    if status == _NOT_SUPPORTED and ALGO[name] == 0:
        _UNSUPPORTED.add((name, dims))
        log.warning("cuBLASLt has no %s for shape %s: PyTorch's matmul and GELU run there instead", name, dims)
        return False
    if status != 0:
        raise RuntimeError(f"cuBLASLt {name} {dims}: {lib.lt_status_string(status).decode()} ({status})")
    return True


def _lt_ok(*tensors: torch.Tensor) -> bool:
    """The cuBLASLt kernels take bf16, contiguous, 256-byte-aligned CUDA operands (the heuristic is asked without
    alignment preferences, so it assumes 256 bytes; fresh allocations have it, an offset view may not and takes
    the plain path)."""
    return all(t.is_cuda and t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 256 == 0
               for t in tensors)


@torch.library.custom_op("sweeper::lt_linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu_tanh(x wᵀ + b), x wᵀ + b)`` for x [M, d], w [f, d], b [f]."""
    torch._check(x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1] and b.shape == (w.shape[0],),
                 lambda: f"linear_gelu: x {tuple(x.shape)}, w {tuple(w.shape)}, b {tuple(b.shape)}")
    if _lt_ok(x, w, b) and w.shape[0] % 8 == 0 and x.shape[1] % 8 == 0:
        m, d, f = x.shape[0], x.shape[1], w.shape[0]
        act, pre = x.new_empty(m, f), x.new_empty(m, f)
        if not m or _call("lt_linear_gelu", (m, d, f), x, w, b, act, pre):
            return act, pre
    pre = F.linear(x, w, b)
    return F.gelu(pre, approximate="tanh"), pre


@linear_gelu.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("sweeper::lt_dgelu", mutates_args=())
def dgelu(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``(dy w2) ∘ gelu_tanh'(pre)``; dy [M, e], w2 [e, f]."""
    torch._check(dy.dim() == 2 and w2.dim() == 2 and dy.shape[1] == w2.shape[0]
                 and pre.shape == (dy.shape[0], w2.shape[1]),
                 lambda: f"dgelu: dy {tuple(dy.shape)}, w2 {tuple(w2.shape)}, pre {tuple(pre.shape)}")
    if _lt_ok(dy, w2, pre) and w2.shape[1] % 8 == 0 and dy.shape[1] % 8 == 0:
        m, e, f = dy.shape[0], dy.shape[1], w2.shape[1]
        dpre = dy.new_empty(m, f)
        if not m or _call("lt_dgelu", (m, e, f), dy, w2, pre, dpre, dpre):
            return dpre
    return torch.ops.aten.gelu_backward(dy @ w2, pre, approximate="tanh")


@dgelu.register_fake
def _(dy, w2, pre):
    return dy.new_empty(dy.shape[0], w2.shape[1])


@torch.library.custom_op("sweeper::lt_wgrad_bgradb", mutates_args=())
def wgrad_bgradb(dz: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's weight and bias gradients ``(dzᵀ x, dz summed over rows)``; dz [M, o], x [M, i]."""
    torch._check(dz.dim() == 2 and x.dim() == 2 and dz.shape[0] == x.shape[0],
                 lambda: f"wgrad_bgradb: dz {tuple(dz.shape)}, x {tuple(x.shape)}")
    if _lt_ok(dz, x) and x.shape[1] % 8 == 0 and dz.shape[1] % 8 == 0:
        m, i, o = dz.shape[0], x.shape[1], dz.shape[1]
        dw, db = dz.new_empty(o, i), dz.new_empty(o)
        if m and _call("lt_wgrad_bgradb", (m, i, o), dz, x, dw, db, db):
            return dw, db
    return dz.t() @ x, dz.sum(0, dtype=torch.float32).to(dz.dtype)


@wgrad_bgradb.register_fake
def _(dz, x):
    return dz.new_empty(dz.shape[1], x.shape[1]), dz.new_empty(dz.shape[1])


class _GeluMLP(torch.autograd.Function):
    """``y = gelu_tanh(x W1ᵀ + b1) W2ᵀ + b2`` on 2-D operands of one dtype, with the fused backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        act, pre = linear_gelu(x, w1, b1)
        ctx.save_for_backward(x, w1, w2, pre, act)
        return F.linear(act, w2, b2)

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, pre, act = ctx.saved_tensors
        dy = dy.contiguous()
        dpre = dgelu(dy, w2, pre)
        # the bias sums by PyTorch (Inductor fuses them): cuBLASLt's DGELU_BGRAD and BGRADB epilogues, which sum
        # inside the matmuls, were slower (benchmarks/results/gpu_2026-11-28-twelfth.md)
        if FC1_BGRADB:
            dw1, db1 = wgrad_bgradb(dpre, x)
        else:
            dw1, db1 = dpre.t() @ x, dpre.sum(0, dtype=torch.float32).to(dpre.dtype)
        return dpre @ w1, dw1, db1, dy.t() @ act, dy.sum(0, dtype=torch.float32).to(dy.dtype)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The MLP on ``x [..., d]``, in autocast's dtype where autocast is on (as ``F.linear`` would be)."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        y = _GeluMLP.apply(x.reshape(-1, shape[-1]).to(dt).contiguous(), w1.to(dt), b1.to(dt), w2.to(dt), b2.to(dt))
    return y.reshape(*shape[:-1], y.shape[-1])


class GeluEpilogueMLP(nn.Module):
    """A DINOv2 MLP (``fc1``, GELU, ``fc2``) whose forward is ``gelu_mlp``; ``fc2`` may be the fast blocks'
    ``LayerScaledLinear`` (its scale folded into the weight it hands over). Parameters and state dict are the
    original module's."""

    def forward(self, hidden_state):
        w2, b2 = _effective(self.fc2)
        return gelu_mlp(hidden_state, self.fc1.weight, self.fc1.bias, w2, b2)


def _effective(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return linear.folded() if isinstance(linear, LayerScaledLinear) else (linear.weight, linear.bias)


def convertible(mlp: nn.Module) -> bool:
    """An MLP of exactly ``fc1`` → erf or tanh GELU → ``fc2``, both linear layers with a bias."""
    children = dict(mlp.named_children())
    fc1, fc2 = children.pop("fc1", None), children.pop("fc2", None)
    # the activation's attribute: ``activation`` in transformers 5.17, ``activation_fn`` in 5.24
    act = next(iter(children.values())) if len(children) == 1 else None
    gelu = type(act).__name__ in ("GELUActivation", "GELU", "GELUTanh", "NewGELUActivation", "PytorchGELUTanh")
    return (type(fc1) is nn.Linear and type(fc2) in (nn.Linear, LayerScaledLinear) and gelu
            and fc1.bias is not None and fc2.bias is not None)


def _mlps(blocks: nn.ModuleList | None):
    """The blocks' MLPs that ``convertible`` takes and that are not converted yet."""
    for layer in blocks or []:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and not isinstance(mlp, GeluEpilogueMLP) and convertible(mlp):
            yield mlp


def tanh_layers(blocks: nn.ModuleList | None) -> int:
    """The same function as ``convert_layers`` gives, in plain PyTorch: each convertible MLP's activation
    replaced by ``nn.GELU(approximate="tanh")``. For evaluating weights that a trial trained with
    ``training.gelu_epilogue`` off the trial (the export's test report), where the kernels are not needed and the
    machine may have no toolkit. Returns how many changed."""
    n = 0
    for mlp in _mlps(blocks):
        name = next(k for k, _ in mlp.named_children() if k not in ("fc1", "fc2"))
        setattr(mlp, name, nn.GELU(approximate="tanh"))
        n += 1
    return n


def convert_layers(blocks: nn.ModuleList | None) -> int:
    """Make the MLP of every block in ``blocks`` a ``GeluEpilogueMLP``, in place (after the fast blocks' fold,
    before compiling). Returns how many changed."""
    n = 0
    for mlp in _mlps(blocks):
        mlp.__class__ = with_mixin(GeluEpilogueMLP, type(mlp))
        n += 1
    return n
