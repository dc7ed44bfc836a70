"""Prefix cache: the keys and values of prompt prefixes already prefilled, reused by later prompts.

Serving traffic repeats prefixes (a chat template's system prompt, a shared context, few-shot examples).
Where the engine's trunk computes a position's keys and values from the tokens up to it alone, bit for bit
(the CPU kernels: per-row GEMMs, a per-query attention, norms summed in a fixed order; see
`llmqp.model.exact` and `tests/test_kernels.py`), copying them from an earlier prompt gives exactly what
prefilling would: outputs do not depend on what was cached. Elsewhere (XLA's prefill dots, a GPU, bf16) a
position's bits depend on the chunk it was computed in, so the engine keeps no prefix cache there.

Blocks are `block` positions long (`DecodeSpec.prefix_block`, 16: a prompt that diverges from a cached one
recomputes at most 15 shared positions; prefill chunks hold several blocks), aligned at multiples of
`block`, and keyed by a hash of every token up to the block's end, so a hit for block j implies the whole
prefix matches. A prompt reuses its longest run of cached blocks from position 0 that leaves at least one
token to prefill (the last prompt token's hidden state starts decoding) and is prefilled from there. Least
recently used blocks are dropped past `capacity` blocks.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading

import jax
import jax.numpy as jnp
import numpy as np


def _key(ids: np.ndarray, end: int) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids[:end], dtype=np.int32).tobytes(), digest_size=16).digest()


@functools.partial(jax.jit, static_argnames=("size",))
def _read(cache, start, *, size: int):
    """Positions [start, start + size) of a one-row cache, every layer."""
    return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, start, size, axis=1), cache)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _write(cache, blocks, start):
    """Write the consecutive `blocks` (a tuple of blocks, each a cache pytree `block` positions long) into a
    one-row cache from position `start`, in one program. Called with runs of 1, 2, 4, ... blocks, so the
    programs compiled stay a handful per cache length."""
    def one(c, *bs):
        run = bs[0] if len(bs) == 1 else jnp.concatenate(bs, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(c, run.astype(c.dtype), start, axis=1)
    return jax.tree.map(one, cache, *blocks)


class PrefixCache:
    """LRU map from token prefixes (multiples of `block` long) to their cache blocks. Thread-safe."""

    def __init__(self, block: int, capacity: int):
        if block < 1 or capacity < 1:
            raise ValueError(f"PrefixCache needs block >= 1 and capacity >= 1, got {block}, {capacity}")
        self.block, self.capacity = int(block), int(capacity)
        self._blocks: collections.OrderedDict[bytes, dict] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.stats = collections.Counter()  # lookups, hit_tokens, stored_blocks, evicted_blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def reuse(self, ids: np.ndarray, row_cache) -> tuple[int, dict]:
        """Copy the longest cached prefix of `ids` (leaving at least one token) into `row_cache` (a one-row
        cache, donated). Returns (positions filled, the cache)."""
        ids = np.asarray(ids)
        found = []
        with self._lock:
            self.stats["lookups"] += 1
            for end in range(self.block, len(ids), self.block):  # end <= len(ids) - 1
                key = _key(ids, end)
                block = self._blocks.get(key)
                if block is None:
                    break
                self._blocks.move_to_end(key)
                found.append(block)
        j = 0
        while j < len(found):  # in runs of the largest power of two that is left: one call per run
            n = 1 << ((len(found) - j).bit_length() - 1)
            row_cache = _write(row_cache, tuple(found[j : j + n]), np.int32(j * self.block))
            j += n
        filled = len(found) * self.block
        self.stats["hit_tokens"] += filled
        return filled, row_cache

    def store(self, ids: np.ndarray, row_cache, start: int, end: int | None = None) -> None:
        """Keep the blocks of `row_cache` that [start, end) (default: one block) prefilled with the prompt
        `ids`: only whole blocks of real prompt tokens, aligned at multiples of `block`."""
        ids = np.asarray(ids)
        end = min(len(ids), start + self.block if end is None else end)
        for b in range(-(-start // self.block) * self.block, end - self.block + 1, self.block):
            self._store_block(ids, row_cache, b)

    def _store_block(self, ids: np.ndarray, row_cache, start: int) -> None:
        key = _key(ids, start + self.block)
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return
        block = _read(row_cache, np.int32(start), size=self.block)
        with self._lock:
            self._blocks[key] = block
            self.stats["stored_blocks"] += 1
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
                self.stats["evicted_blocks"] += 1

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
