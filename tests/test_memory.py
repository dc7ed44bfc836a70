"""`llmqp.core.memory`: the engine fixes glibc's mmap threshold so freed buffers go back to the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from llmqp import InvalidArgument
from llmqp.core import memory


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_applied", None)
    return monkeypatch


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("raw", ["lots", "-5", "1.5"])
def test_bad_threshold_is_a_clear_error(fresh, raw):
    fresh.setenv("LLMQP_MMAP_THRESHOLD", raw)
    with pytest.raises(InvalidArgument, match="LLMQP_MMAP_THRESHOLD"):
        memory.return_freed_memory()


def test_zero_leaves_malloc_alone(fresh):
    fresh.setenv("LLMQP_MMAP_THRESHOLD", "0")
    assert memory.return_freed_memory() == 0


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_threshold_is_applied_once(fresh):
    fresh.setenv("LLMQP_MMAP_THRESHOLD", str(2 << 20))
    assert memory.return_freed_memory() == 2 << 20
    fresh.setenv("LLMQP_MMAP_THRESHOLD", "0")  # already applied in this process: not read again
    assert memory.return_freed_memory() == 2 << 20


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_freed_buffers_leave_the_process():
    """After the threshold is set, buffers of a few MiB freed in any order are unmapped at once: the resident
    size comes back down (with glibc's own policy, the first freed 8 MiB block raises the threshold and the
    rest come from a heap that keeps them)."""
    script = """
import numpy as np
from llmqp.core import memory
assert memory.return_freed_memory() == 1 << 20

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

big = np.ones(8 << 18, np.float32)  # 8 MiB, then freed
del big
base = rss()
blocks = [np.ones((2 + i % 5) << 18, np.float32) for i in range(200)]  # 200 blocks of 2-6 MiB, ~800 MiB
keep = blocks[::7]
del blocks
grown = rss()
print(base, grown)
assert grown - base < 200, (base, grown)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
