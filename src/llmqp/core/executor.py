"""The model executor: the device side of the scheduler — slot KV cache, prefill chunks, batched decode steps,
multi-token feeds and the scoring call. Holds no request logic; the scheduler tells it what to run.

The slot cache is one KV cache of shape (B, S, KV, hd) per layer: B is a power of two <= max_slots (it
doubles when a request needs a slot and shrinks by half when at most half the rows are live, so a lone
request decodes at batch 1 as cheaply as before), S a power of two from `DecodeSpec.cache_len` (grown by
doubling when a longer request joins). Every row has its own position. A joining request is prefilled into
its own one-row cache, one chunk per call, then inserted into a free row between decode steps; no shape
depends on the batch composition, so the compiled programs are bounded by
(log2 max_slots + 1) x (number of S buckets) x {decode, insert, gather} plus the prefill chunk widths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import plans as plans_mod
from llmqp import sampling
from llmqp.core.spec import DecodeSpec, pow2_at_least
from llmqp.model import transformer


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert_row(cache, row_cache, slot):
    # cache: (B, S, KV, hd) per layer; row_cache: (1, S, KV, hd); slot: int32 scalar.
    return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice(c, r.astype(c.dtype), (slot, 0, 0, 0)),
                        cache, row_cache)


@functools.partial(jax.jit, static_argnames=("batch", "seq_len"))
def _resize(cache, order, *, batch: int, seq_len: int):
    """Rows `order` (batch,) of `cache` (rows past its batch read as zeros), padded or cut to seq_len."""
    def one(c):
        rows = jnp.take(c, order, axis=0, mode="fill", fill_value=0)
        s = c.shape[1]
        if seq_len > s:
            rows = jnp.pad(rows, ((0, 0), (0, seq_len - s), (0, 0), (0, 0)))
        return rows[:, :seq_len]
    return jax.tree.map(one, cache)


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "seq_len", "dtype"))
def _zero_cache(*, cfg, batch: int, seq_len: int, dtype):
    # One dispatch for the whole cache (eager jnp.zeros per layer costs a dispatch each).
    return transformer.init_cache(cfg, batch, seq_len, dtype)


@jax.jit
def _set_row(hidden, row, slot):
    return hidden.at[slot].set(row)


@functools.partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache",))
def _decode_then_greedy(params, head, cache, tokens, positions, ids, valid, *, cfg, plan):
    """A decode step and the next greedy dense choice of every row in one program: when every live row is
    unconstrained and greedy, the next tick's scoring is already known when the trunk finishes, so the host
    waits for one dispatch per token instead of two. Same head and sampler as `score_and_select`."""
    hidden, cache = transformer.decode_step(params, cache, tokens, positions, cfg=cfg)
    zeros = jnp.zeros(tokens.shape, jnp.int32)
    index, logprob = sampling.select(plan.score(head, hidden, ids), ids, valid, zeros.astype(jnp.uint32), zeros,
                                     zeros.astype(jnp.float32), zeros, jnp.ones(tokens.shape, jnp.float32),
                                     greedy=True)
    return hidden, cache, index, logprob


class ModelExecutor:
    """Runs the trunk and the head for the scheduler. `engine` provides params, config and head."""

    def __init__(self, engine, spec: DecodeSpec, max_slots: int):
        self.engine = engine
        self.spec = spec
        self.cfg = engine.config
        self.params = engine.params
        self.max_slots = pow2_at_least(max_slots)
        self.dtype = self.params["embed"].dtype
        self.batch = 0  # rows in the slot cache (0: none allocated)
        self.seq_len = 0
        self.cache = None
        self.hidden = None  # (batch, d): each live row's hidden state after its last fed token
        self.slots: list[str | None] = []  # request id per row
        # (index, logprob) of every row's next greedy dense choice, computed with the last decode step; None
        # when the rows changed since (a row inserted, the batch reshaped) or the step did not compute it.
        self.next_greedy = None

    # ------------------------------------------------------------ slots
    def free_slot(self, rid: str) -> None:
        self.slots[self.slots.index(rid)] = None

    def live_rows(self) -> int:
        return sum(s is not None for s in self.slots)

    def ensure_seq_len(self, seq_len: int) -> None:
        if seq_len > self.seq_len and self.cache is not None:
            self.cache = _resize(self.cache, jnp.arange(self.batch), batch=self.batch, seq_len=seq_len)
        self.seq_len = max(self.seq_len, seq_len)

    def insert(self, rid: str, row_cache, row_hidden, row_seq_len: int) -> int:
        """Place a prefilled request into a free row (growing the batch if none is free). Returns the row."""
        self.ensure_seq_len(row_seq_len)
        if row_seq_len < self.seq_len:
            row_cache = _resize(row_cache, jnp.zeros(1, jnp.int32), batch=1, seq_len=self.seq_len)
        if self.cache is None:  # the first row: its own cache becomes the slot cache, no copy
            self.cache, self.hidden = row_cache, row_hidden
            self.batch, self.slots, self.next_greedy = 1, [rid], None
            return 0
        if None not in self.slots:
            self._rebatch(list(range(self.batch)), pow2_at_least(self.batch + 1))
        slot = self.slots.index(None)
        self.next_greedy = None
        self.cache = _insert_row(self.cache, row_cache, jnp.int32(slot))
        self.hidden = _set_row(self.hidden, row_hidden[0], jnp.int32(slot))
        self.slots[slot] = rid
        return slot

    def compact(self) -> dict[str, int] | None:
        """Halve the batch (repeatedly) while at most half of its rows are live. Returns the new row of every
        live request when rows moved, else None."""
        live = [i for i, s in enumerate(self.slots) if s is not None]
        target = pow2_at_least(len(live))
        if not live:
            self.batch, self.cache, self.hidden, self.slots = 0, None, None, []
            self.next_greedy = None
            return {}
        if target >= self.batch:
            return None
        self._rebatch(live, target)
        return {rid: i for i, rid in enumerate(self.slots) if rid is not None}

    def _rebatch(self, rows: list[int], batch: int) -> None:
        self.next_greedy = None
        order = np.full(batch, self.batch + 1, np.int32)  # out of range: a zero row
        order[: len(rows)] = rows
        order_dev = jnp.asarray(order)
        if self.cache is None:
            self.cache = _zero_cache(cfg=self.cfg, batch=batch, seq_len=self.seq_len, dtype=self.dtype)
            self.hidden = jnp.zeros((batch, self.cfg.hidden_size), jnp.float32)
        else:
            self.cache = _resize(self.cache, order_dev, batch=batch, seq_len=self.seq_len)
            self.hidden = jnp.take(self.hidden, order_dev, axis=0, mode="fill", fill_value=0)
        self.slots = [self.slots[r] for r in rows] + [None] * (batch - len(rows))
        self.batch = batch

    # ------------------------------------------------------------ prefill
    def new_row_cache(self, seq_len: int):
        return _zero_cache(cfg=self.cfg, batch=1, seq_len=seq_len, dtype=self.dtype)

    def prefill_chunk(self, row_cache, prompt: np.ndarray, start: int, width: int):
        """Feed prompt[start : start + width] (zero-padded to `width`) into a one-row cache.
        Returns (hidden (1, width, d), cache)."""
        chunk = prompt[start : start + width]
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(chunk)] = chunk
        return transformer.forward_jit(self.params, row_cache, jnp.asarray(tokens),
                                       jnp.asarray([start], jnp.int32), cfg=self.cfg)

    # ------------------------------------------------------------ decode
    def decode(self, tokens: np.ndarray, positions: np.ndarray, all_ids=None) -> None:
        """One token per row (free rows get token 0 at position 0: harmless, the row is rewritten whole when
        a request is inserted). all_ids: the (ids, valid) of every-token-allowed rows, when every live row
        is unconstrained and greedy: the next greedy dense choice is then computed in the same program."""
        if all_ids is None:
            self.next_greedy = None
            self.hidden, self.cache = transformer.decode_step(self.params, self.cache, jnp.asarray(tokens),
                                                              jnp.asarray(positions), cfg=self.cfg)
            return
        self.hidden, self.cache, index, logprob = _decode_then_greedy(
            self.params, self.engine.head, self.cache, jnp.asarray(tokens), jnp.asarray(positions), *all_ids,
            cfg=self.cfg, plan=self.engine.plans[plans_mod.PlanKind.DENSE])
        self.next_greedy = (index, logprob)

    def feed_run(self, tokens: list[int], pos: int) -> None:
        """Feed a run of tokens of the single row at batch 1, in the spec's power-of-two chunks."""
        self.next_greedy = None
        i = 0
        for size in self.spec.feed_chunks(len(tokens)):
            start = jnp.asarray([pos + i], jnp.int32)
            if size == 1:
                self.hidden, self.cache = transformer.decode_step(
                    self.params, self.cache, jnp.asarray(tokens[i : i + 1], jnp.int32), start, cfg=self.cfg)
            else:
                h, self.cache = transformer.forward_jit(self.params, self.cache,
                                                        jnp.asarray([tokens[i : i + size]], jnp.int32), start,
                                                        cfg=self.cfg)
                self.hidden = h[:, -1]
            i += size

    # ------------------------------------------------------------ scoring
    def score(self, kind, ids, valid, seeds, steps, temps, top_ks, top_ps, union, greedy: bool,
              want_logits: bool):
        """Score and sample every row of the batch with plan `kind` (a PlanKind). Returns numpy (index (B,),
        logprob (B,), logits (B, K) or None)."""
        head = self.engine.head
        plan = self.engine.plans[kind]
        if want_logits:
            index, logprob, logits = plans_mod.score_select_logits(
                head, self.hidden, ids, valid, seeds, steps, temps, top_ks, top_ps, union, plan=plan, greedy=greedy)
            index, logprob, logits = jax.device_get((index, logprob, logits))
            return index, logprob, logits
        index, logprob = plans_mod.score_and_select(head, self.hidden, ids, valid, seeds, steps, temps, top_ks,
                                                    top_ps, union, plan=plan, greedy=greedy)
        index, logprob = jax.device_get((index, logprob))
        return index, logprob, None
