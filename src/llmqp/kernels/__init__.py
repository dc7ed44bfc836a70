"""Native CPU kernels for the trunk, called from JAX as XLA FFI custom calls.

- `cpu_gemm.cc` multiplies a few rows (a decode step at batch B, a forward of T <= 64 positions) by a weight
  matrix packed in 64-column panels, near the memory-bandwidth bound that XLA:CPU's small-M GEMM misses
  (benchmarks/limits.py). The weights may be f32 or bf16 (`Engine(dtype="bfloat16")`: half the bytes a step
  reads; each bf16 weight is widened exactly to f32, and the activations and sums stay f32).
- `cpu_attention.cc` is the attention of a few positions per row over the f32 KV cache where it lies
  (XLA:CPU copies the whole cache into another layout every layer, or runs slow reduce fusions at batch > 1).

Both are compiled once per machine at first use, with the system's C++ compiler (``$CXX``, else ``g++``,
``-O3 -march=native``), into one library under ``<cache dir>/kernels/`` and registered with JAX.

Where it cannot be built (no compiler, another OS) or ``LLMQP_CPU_KERNELS=0`` is set, `available()` is
False, `with_packed_weights` returns the params unchanged and the trunk uses XLA's dot, as before; the
reason is in `status()`. Only JAX's CPU backend uses it: on a GPU the params are never packed.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

PANEL = 64  # columns per packed panel (the kernel's kPanel)
TARGET = "llmqp_gemm_f32"
BF16_TARGET = "llmqp_gemm_bf16"
ATTENTION_TARGET = "llmqp_attention_f32"
# Rows (batch x positions) up to which the trunk's matmuls use the kernel; above (prefill chunks), XLA's dot,
# which is compute-bound and well blocked there.
SMALL_M_MAX = 64
# Queries per row (positions of one chunk) up to which the trunks' attention over an f32 cache uses the kernel;
# longer chunks (prefill), XLA's einsums, which batch the queries into dots.
ATTENTION_MAX_T = 64
SOURCES = (Path(__file__).with_name("cpu_gemm.cc"), Path(__file__).with_name("cpu_attention.cc"))
HEADERS = (Path(__file__).with_name("parallel.h"),)

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, include: str) -> Path:
    from llmqp.model.loader import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [src.read_text() for src in SOURCES + HEADERS]
    parts = [*texts, version, include, _cpu_flags(), platform.machine()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"llmqp_gemm-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-I", include,
               "-I", str(SOURCES[0].parent), "-o", str(tmp_out), *map(str, SOURCES)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)  # atomic: a concurrent process sees the whole file or none
    return out


def _load() -> None:
    """Build (once per machine) and register the kernel; record why not where it cannot be."""
    import jax

    if os.environ.get("LLMQP_CPU_KERNELS", "1").strip() in ("0", "false", "no", "off"):
        _state.update(ok=False, reason="disabled by LLMQP_CPU_KERNELS=0")
        return
    if platform.system() != "Linux":
        _state.update(ok=False, reason=f"built only on Linux (this is {platform.system()})")
        return
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        _state.update(ok=False, reason="no C++ compiler found (set CXX or install g++)")
        return
    try:
        path = _build(compiler, jax.ffi.include_dir())
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.LlmqpGemmF32), platform="cpu")
        jax.ffi.register_ffi_target(BF16_TARGET, jax.ffi.pycapsule(lib.LlmqpGemmBF16), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.LlmqpAttentionF32), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _state.update(ok=False, reason=f"could not build or load {', '.join(src.name for src in SOURCES)}: {e}")
        warnings.warn(f"llmqp: the CPU kernels are unavailable, using XLA's dot and einsums: {e}", RuntimeWarning,
                      stacklevel=3)
        return
    _state.update(ok=True, reason=None, path=str(path), lib=lib)


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    with _lock:
        if not _state:
            _load()
        return bool(_state["ok"])


def status() -> dict:
    """{"available": bool, "reason": why not, or None, "library": the built .so, or None}."""
    ok = available()
    return {"available": ok, "reason": _state.get("reason"), "library": _state.get("path")}


def _packable(w) -> np.ndarray:
    """w as a numpy array the kernel takes: bf16 as it is, anything else as f32."""
    import ml_dtypes  # a dependency of jax

    w = np.asarray(w)
    return w if w.dtype == ml_dtypes.bfloat16 else w.astype(np.float32, copy=False)


def pack(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(K, N) f32 or bf16 -> (ceil(N / 64), K, 64) column panels of the same dtype (other dtypes: f32), zero past
    N: the kernel's weight layout (written into `out` when given: a C-contiguous array of that shape)."""
    w = _packable(w)
    k, n = w.shape
    panels = _packed_shape(w)[0]
    if out is None:
        out = np.empty(_packed_shape(w), w.dtype)
    full = n // PANEL
    out[:full] = w[:, :full * PANEL].reshape(k, full, PANEL).transpose(1, 0, 2)
    if full < panels:
        out[full] = 0.0
        out[full, :, :n - full * PANEL] = w[:, full * PANEL:]
    return out


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def huge_page_buffers(shapes: list[tuple[int, ...]], dtype=np.float32) -> list[np.ndarray]:
    """Uninitialised arrays of these shapes (f32, or `dtype`: one dtype for all), laid end to end (each 64-byte
    aligned) in one allocation that starts on a 2 MiB boundary and is advised (madvise) to be backed by
    transparent huge pages.

    Why: a step streams all the packed weights; with 4 KiB pages the hardware prefetcher stops at every page
    and the TLB misses every 4 KiB (a two-thread read of 400 MB: 20-22 GB/s, 22-26 with huge pages, on the AVX2
    machine of benchmarks/limits.py). Where the advice is not taken (another OS, THP off) they are plain
    arrays."""
    dtype = np.dtype(dtype)
    item = dtype.itemsize
    per_line = 64 // item
    sizes = [-(-math.prod(s) // per_line) * per_line for s in shapes]
    raw = np.empty(sum(sizes) + HUGE_PAGE // item, dtype)
    start = (-raw.ctypes.data % HUGE_PAGE) // item
    if platform.system() == "Linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(raw.ctypes.data + item * start), ctypes.c_size_t(item * sum(sizes)),
                         _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    out, at = [], start
    for shape, size in zip(shapes, sizes):
        out.append(raw[at:at + math.prod(shape)].reshape(shape))
        at += size
    return out


def _packed_shape(w) -> tuple[int, int, int]:
    k, n = w.shape
    return (-(-n // PANEL), k, PANEL)


def _on_cpu(a: np.ndarray):
    """`a` as a JAX array on the default device (the CPU: callers check), sharing its memory (JAX's CPU client
    aliases an aligned host buffer). Uncommitted, like `jnp.asarray`: a committed array changes the lowered
    program (its sharding), so every program would miss the persistent compile cache."""
    import jax

    return jax.device_put(a)


def pack_device(w):
    """`pack` of a (K, N) f32 or bf16 matrix (numpy or JAX), as a JAX array in huge pages (on the default device:
    call only where that is the CPU, as the kernel is)."""
    w = _packable(w)
    (buf,) = huge_page_buffers([_packed_shape(w)], w.dtype)
    return _on_cpu(pack(w, buf))


MATMULS = ("w_qkv", "w_o", "w_gate_up", "w_down")


def with_packed_weights(params: dict, raw_layers: list[dict] | None = None) -> dict:
    """params plus ``layer["packed"] = {w_qkv, w_o, w_gate_up, w_down}`` in the kernel's layout and the weights'
    dtype, where the kernel is available, JAX runs on the CPU and the weights are all f32 or all bf16; else
    params unchanged. `raw_layers`: the numpy f32 layers to pack f32 weights from (saves a copy back from the
    device). All the packed matrices lie in one huge-page allocation, in the order a step reads them."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu" or not available():
        return params
    dtypes = {layer[k].dtype if k in layer else None for layer in params["layers"] for k in MATMULS}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype not in (jnp.float32, jnp.bfloat16):
        return params
    use_raw = raw_layers is not None and dtype == jnp.float32
    srcs = [[np.asarray((raw_layers[i] if use_raw else layer)[k]) for k in MATMULS]
            for i, layer in enumerate(params["layers"])]
    bufs = iter(huge_page_buffers([_packed_shape(w) for ws in srcs for w in ws], srcs[0][0].dtype))
    layers = [dict(layer, packed={k: _on_cpu(pack(w, next(bufs))) for k, w in zip(MATMULS, ws)})
              for layer, ws in zip(params["layers"], srcs)]
    return dict(params, layers=layers)


def linear(x, w, packed):
    """x @ w, through the kernel when `packed` (w in the kernel's layout) is given and x has at most SMALL_M_MAX
    rows; XLA's dot otherwise. The trunks' one entry point to the kernel. The kernel takes x in f32 (exactly
    widened if it is not) and sums in f32; the result has x's dtype, as ``x @ w`` would for f32 or bf16 w."""
    if packed is not None and math.prod(x.shape[:-1]) <= SMALL_M_MAX:
        import jax.numpy as jnp

        return matmul(x.astype(jnp.float32), packed, w.shape[-1]).astype(x.dtype)
    return x @ w


def matmul(x, packed, n: int):
    """x (..., K) f32 @ the (K, n) matrix `packed` holds (f32 or bf16) -> (..., n) f32, through the kernel
    (trace-time: call only where `available()` is True)."""
    import jax
    import jax.numpy as jnp

    if not (packed.shape[0] - 1) * PANEL < n <= packed.shape[0] * PANEL:
        raise ValueError(f"packed weights {packed.shape} cannot give {n} columns")
    target = BF16_TARGET if packed.dtype == jnp.bfloat16 else TARGET
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32))(x, packed)


def attends(packed, q, cache) -> bool:
    """Whether a trunk layer's attention goes through `attention`: the layer's weights are packed (so the kernel
    is built and JAX runs on the CPU), the cache is f32 and the chunk has at most ATTENTION_MAX_T positions.
    q: (B, T, H, hd)."""
    import jax.numpy as jnp

    return bool(packed) and cache.dtype == jnp.float32 and q.shape[1] <= ATTENTION_MAX_T


def attention(q, k_all, v_all, q_pos, *, scale: float, softcap: float = 0.0, window: int = 0):
    """Causal attention through the kernel (trace-time: call only where `available()` is True).

    q: (B, T, H, hd) f32; k_all, v_all: (B, S, KV, hd) f32, this chunk written; q_pos: (B, T) absolute
    positions. Query p sees keys at positions <= p, and > p - window when window > 0; scores are
    ``scale * q . k``, soft-capped to ``softcap * tanh(x / softcap)`` when softcap > 0. Returns (B, T, H, hd) f32.
    Each query's result depends only on its own inputs (not on B, T or S), bit for bit."""
    import jax
    import jax.numpy as jnp

    if q.shape[2] % k_all.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads cannot share {k_all.shape[2]} key/value heads")
    return jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k_all, v_all, q_pos.astype(jnp.int32),
        scale=np.float32(scale), softcap=np.float32(softcap), window=np.int64(window))
