"""`DecodeSpec`: every shape bucket, threshold and stop rule of decoding, written down once.

The host loop (the scheduler), the fused on-device loop, `llmqp export` and the benchmarks all read these
rules from a spec object; none restates them. Shapes are bucketed so the number of compiled programs stays
small and bounded:

- prefill runs in chunks of at most `prefill_chunk` positions, each padded to a power of two
  >= `prefill_min_bucket` (so at most log2(prefill_chunk / prefill_min_bucket) + 1 chunk shapes), ending at
  multiples of `prefill_chunk`; a prompt whose first positions come from the prefix cache starts at a
  multiple of `prefix_block`;
- the KV cache holds a power of two >= `min_cache` positions per row (grown by doubling, never past the
  model's context rounded up);
- the decode batch is a power of two <= `max_slots`;
- the allowed set K of a scored step is padded to a bucket `k_base * k_growth**i`, or the vocabulary;
- a run of forced (or drafted) tokens is fed in power-of-two chunks, largest first, at most `feed_max` each.

This module imports nothing from the engine, the scheduler or the fused loop, so all of them can import it.
"""

from __future__ import annotations

import dataclasses
import enum


class FinishReason(str, enum.Enum):
    """Why a request ended. STOP: EOS sampled, a stop string matched, or the constraint allows nothing more.
    LENGTH: `max_tokens` reached. ERROR: the request failed on its own (its constraint or input); the other
    requests go on. ABORT: the caller aborted it."""

    STOP = "stop"
    LENGTH = "length"
    ERROR = "error"
    ABORT = "abort"


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """The decode rules shared by every path. Frozen and hashable (usable as a `jit` static argument).

    prefill_chunk: longest prompt chunk fed in one forward (a joining request stalls the running rows for at
    most one chunk). min_cache: smallest KV cache length per row. sparse_max_fraction: steps whose allowed
    set exceeds this share of the vocabulary only consider the dense plan — gathering that many rows never
    beats the full head and would materialise B x K x d floats. feed_max: the largest multi-token chunk a
    forced run is fed in (and the longest window a draft is verified in). draft_lookup_len: the draft length of
    draft="lookup" (draft="auto" lets the planner choose among `planner.drafts.DRAFT_ARMS`). prefix_block: the
    granularity (positions) at which the prefix cache keeps and reuses prompt prefixes (`llmqp.core.prefix`).
    shared_feed_positions: in a batch of B live rows, a row feeds at most shared_feed_positions // B tokens a
    tick (`feed_width`) unless its request asked for drafts outright (draft="lookup"): every row's forward is
    padded to the widest piece, so one row's long draft or forced run is paid for by every row. On the 2-core
    CPU each position past the first ~8 of a forward costs ~1.3 ms against ~16 ms for a one-token step
    (`benchmarks/limits.py`); 16 lets 8 rows feed 2 tokens each (a tick ~1.3 decode steps), and measured
    1.2x the throughput of the old cap (feed_max / B, full drafts) on `benchmarks/batching.py`'s workload."""

    prefill_chunk: int = 256
    prefill_min_bucket: int = 16
    min_cache: int = 512
    k_base: int = 8
    k_growth: int = 4
    sparse_max_fraction: float = 0.25
    feed_max: int = 32
    draft_lookup_len: int = 7
    prefix_block: int = 16
    shared_feed_positions: int = 16

    def __post_init__(self):
        for name in ("prefill_chunk", "prefill_min_bucket", "min_cache", "feed_max", "prefix_block",
                     "shared_feed_positions"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"DecodeSpec.{name} must be a power of two, got {v}")

    # ------------------------------------------------------------ prefill and cache
    def prefill_chunks(self, n: int, start: int = 0) -> list[tuple[int, int]]:
        """[(start, padded width)] of the chunks a prompt of n tokens is prefilled in, from position `start`
        (0, or past a prefix taken from the prefix cache): each ends at the next multiple of `prefill_chunk`
        or at n."""
        out, pos, c = [], start, self.prefill_chunk
        while pos < n:
            end = min(n, (pos // c + 1) * c)
            out.append((pos, pow2_at_least(end - pos, self.prefill_min_bucket)))
            pos = end
        return out

    def prefill_widths(self) -> list[int]:
        """Every padded width a prefill chunk can take: the powers of two from prefill_min_bucket to
        prefill_chunk."""
        out, w = [], self.prefill_min_bucket
        while w <= self.prefill_chunk:
            out.append(w)
            w *= 2
        return out

    def prefill_end(self, n: int) -> int:
        """The last cache position (exclusive) that prefilling n tokens writes, padding included."""
        start, width = self.prefill_chunks(n)[-1]
        return start + width

    def cache_len(self, prompt_len: int, max_new: int) -> int:
        """Cache length (positions per row) for a prompt that will grow by max_new tokens."""
        return pow2_at_least(max(self.prefill_end(prompt_len), prompt_len + max_new), self.min_cache)

    # ------------------------------------------------------------ batch and K buckets
    @staticmethod
    def batch_bucket(n: int) -> int:
        return pow2_at_least(n)

    def k_buckets(self, vocab_size: int) -> list[int]:
        out, k = [], self.k_base
        while k < vocab_size:
            out.append(k)
            k *= self.k_growth
        return out + [vocab_size]

    def bucket_k(self, k: int, vocab_size: int) -> int:
        return next(b for b in self.k_buckets(vocab_size) if b >= k)

    def sparse_limit(self, vocab_size: int) -> int:
        """The largest allowed-set size a sparse plan may score."""
        return int(self.sparse_max_fraction * vocab_size)

    def applicable_plans(self, k_max: int, k_union: int, batch: int, vocab_size: int) -> list[str]:
        """Plan names ("dense", "sparse", "sparse_union") worth considering for a scoring step."""
        limit = self.sparse_limit(vocab_size)
        arms = ["dense"]
        if k_max <= limit:
            arms.append("sparse")
        if batch > 1 and k_union <= limit:
            arms.append("sparse_union")
        return arms

    # ------------------------------------------------------------ feeding runs
    def feed_width(self, batch: int) -> int:
        """The most tokens a row feeds in one tick in a batch of `batch` rows: feed_max alone, else
        shared_feed_positions // batch (at least 1)."""
        return self.feed_max if batch <= 1 else max(1, min(self.feed_max, self.shared_feed_positions // batch))

    def feed_chunks(self, n: int) -> list[int]:
        """Chunk sizes (powers of two, largest first, each <= feed_max) that feed a run of n tokens."""
        out = []
        while n > 0:
            size = min(1 << (n.bit_length() - 1), self.feed_max)
            out.append(size)
            n -= size
        return out

    # ------------------------------------------------------------ stop rules
    @staticmethod
    def finish_after(*, sampled_eos: bool, constraint_done: bool, stop_string: bool, n_out: int,
                     max_tokens: int) -> FinishReason | None:
        """The stop rule, in order: EOS sampled, the constraint allows nothing but EOS, a stop string
        matched -> STOP; max_tokens generated -> LENGTH; else None (go on)."""
        if sampled_eos or constraint_done or stop_string:
            return FinishReason.STOP
        if n_out >= max_tokens:
            return FinishReason.LENGTH
        return None


DEFAULT_SPEC = DecodeSpec()
