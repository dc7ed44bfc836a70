"""Host memory: buffers the engine frees go back to the operating system.

XLA:CPU allocates every buffer with the C library's malloc. glibc serves requests below its mmap threshold
from heaps that keep freed memory for reuse, and it raises that threshold (up to 32 MiB) whenever a larger
mapped block is freed; from then on, KV caches, prefill row caches and logits of a few MiB each come from
those heaps, which grow with every new batch shape and rarely shrink. Measured on SmolLM2 (one
`generate_batch` of 30 MaskBench schemas): the process grew from 1.6 to 5.7 GB and to 7.2 GB after a second
batch (2.7 GB after `malloc_trim`); with the threshold fixed at 1 MiB it stayed at 3.0-3.1 GB, and decode
speed did not change beyond the noise (batch-16 JSON generation, six alternating rounds in one process: ratio
1.02). A long-running server or test session otherwise holds tens of GB it no longer uses.

`LLMQP_MMAP_THRESHOLD` sets the threshold in bytes (default 1 MiB); 0 leaves the C library's own policy.
Elsewhere than glibc (no `mallopt`) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from llmqp.sampling import InvalidArgument

DEFAULT_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_applied: int | None = None


def return_freed_memory() -> int:
    """Fix glibc's mmap threshold once per process (see the module docstring). Returns the threshold set, or 0
    when nothing was changed (disabled, or no glibc). An invalid `LLMQP_MMAP_THRESHOLD` raises InvalidArgument."""
    global _applied
    if _applied is not None:
        return _applied
    raw = os.environ.get("LLMQP_MMAP_THRESHOLD", "").strip()
    try:
        threshold = int(raw) if raw else DEFAULT_MMAP_THRESHOLD
    except ValueError:
        raise InvalidArgument(f"LLMQP_MMAP_THRESHOLD must be a number of bytes, got {raw!r}") from None
    if threshold < 0:
        raise InvalidArgument(f"LLMQP_MMAP_THRESHOLD must be >= 0, got {threshold}")
    _applied = 0
    if threshold:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return 0
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            _applied = threshold
    return _applied
