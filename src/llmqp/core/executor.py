"""The model executor: the device side of the scheduler — slot KV cache, prefill chunks, batched decode steps,
multi-token feeds and the scoring call. Holds no request logic; the scheduler tells it what to run.

The slot cache is one KV cache of shape (B, S, KV, hd) per layer: B is a power of two <= max_slots (it
doubles when a request needs a slot and shrinks by half when at most half the rows are live, so a lone
request decodes at batch 1 as cheaply as before), S a power of two from `DecodeSpec.cache_len` (grown by
doubling when a longer request joins). Every row has its own position. A joining request is prefilled into
its own one-row cache, one chunk per call (several prompts' chunks in one forward where the scheduler
groups them, each row against its own cache), then inserted into a free row between decode steps; no shape
depends on the batch composition, so the compiled programs are bounded by
(log2 max_slots + 1) x (number of S buckets) x ({decode, insert, resize} + multi-token feed widths 2..feed_max)
plus the prefill chunk widths (and the (rows, width) of grouped chunks: rows x width <= prefill_chunk), and
the gather of scored positions per (B, width, row bucket).
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
    # hidden: (B, T, d); the inserted row's state goes to its first position
    return hidden.at[slot, 0].set(row)


@jax.jit
def _at_position(hidden, r, t):
    # hidden: (R, T, d) -> (1, d): row r, position t (one dispatch; indexing eagerly costs several)
    return jax.lax.dynamic_slice(hidden, (r, t, 0), (1, 1, hidden.shape[2]))[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches",))
def _prefill_rows(params, caches, tokens, starts, *, cfg):
    """One forward over the prefill chunks of several one-row caches (tokens (R, T), starts (R,)). A Llama-style
    trunk takes the caches as they are (each row writes and attends to its own, updated in place); Gemma's
    forward takes one stacked cache, so its caches are stacked, fed and split again (two copies of each)."""
    if cfg.arch != "gemma3":
        return transformer.forward(params, tuple(caches), tokens, starts, cfg=cfg)
    cache = jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=0), *caches)
    hidden, cache = transformer.forward(params, cache, tokens, starts, cfg=cfg)
    return hidden, tuple(jax.tree.map(lambda c, r=r: c[r : r + 1], cache) for r in range(len(caches)))


@jax.jit
def _gather_rows(hidden, slots, ts):
    # hidden: (B, T, d) -> (R, d): the positions the scoring step reads (a row's window of drafted positions)
    return hidden[slots, ts]


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
        self.dtype = transformer.cache_dtype(self.params)
        self.batch = 0  # rows in the slot cache (0: none allocated)
        self.seq_len = 0
        self.cache = None
        self.hidden = None  # (batch, T, d): every row's hidden states at the positions the last forward fed
        self.row_end = np.zeros(0, np.int32)  # per row: how many positions of `hidden` it fed (its end)
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
            self.cache, self.hidden = row_cache, row_hidden[:, None]
            self.batch, self.slots, self.next_greedy = 1, [rid], None
            self.row_end = np.ones(1, np.int32)
            return 0
        if None not in self.slots:
            self._rebatch(list(range(self.batch)), pow2_at_least(self.batch + 1))
        slot = self.slots.index(None)
        self.next_greedy = None
        self.cache = _insert_row(self.cache, row_cache, np.int32(slot))
        self.hidden = _set_row(self.hidden, row_hidden[0], np.int32(slot))
        self.row_end[slot] = 1
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
            self.hidden = jnp.zeros((batch, 1, self.cfg.hidden_size), jnp.float32)
        else:
            self.cache = _resize(self.cache, order_dev, batch=batch, seq_len=self.seq_len)
            self.hidden = jnp.take(self.hidden, order_dev, axis=0, mode="fill", fill_value=0)
        ends = np.ones(batch, np.int32)
        ends[: len(rows)] = self.row_end[rows]
        self.row_end = ends
        self.slots = [self.slots[r] for r in rows] + [None] * (batch - len(rows))
        self.batch = batch

    # ------------------------------------------------------------ prefill
    def new_row_cache(self, seq_len: int):
        return _zero_cache(cfg=self.cfg, batch=1, seq_len=seq_len, dtype=self.dtype)

    def prefill_rows(self, row_caches: list, prompts: list, starts: list[int], width: int):
        """One forward over a chunk of each prompt: prompts[r][starts[r] : starts[r] + width] (zero-padded to
        `width`) into row_caches[r] (one-row caches of one length, donated). Returns (hidden (R, width, d), the
        R caches). Only for a trunk that computes every row alone (the scheduler's `_prefill_group`)."""
        tokens = np.zeros((len(prompts), width), np.int32)
        for r, (prompt, start) in enumerate(zip(prompts, starts)):
            chunk = prompt[start : start + width]
            tokens[r, : len(chunk)] = chunk
        starts = np.asarray(starts, np.int32)
        if len(row_caches) == 1:
            hidden, cache = transformer.forward_jit(self.params, row_caches[0], tokens, starts, cfg=self.cfg)
            return hidden, (cache,)
        return _prefill_rows(self.params, tuple(row_caches), tokens, starts, cfg=self.cfg)

    def compile_prefill(self, seq_len: int, grouped: bool) -> int:
        """Run once (so compile) every prefill forward shape for one-row caches of `seq_len` positions: each chunk
        width, and with `grouped` every (rows >= 2, width) with rows x width <= prefill_chunk. Returns how many
        shapes ran. Which grouped shapes a run needs depends on when requests arrive, so a warm-up that replays
        a workload may miss some; this covers them all."""
        shapes = [(rows, w) for w in self.spec.prefill_widths() for rows in range(1, self.spec.prefill_chunk // w + 1)
                  if rows == 1 or grouped]
        for rows, w in shapes:
            zeros = np.zeros(w, np.int32)
            hidden, _ = self.prefill_rows([self.new_row_cache(seq_len) for _ in range(rows)], [zeros] * rows,
                                          [0] * rows, w)
            hidden.block_until_ready()
        return len(shapes)

    @staticmethod
    def prompt_end(hidden, r: int, t: int):
        """The hidden state (1, d) at row r, position t of a prefill forward's (R, T, d): a prompt's last token."""
        return _at_position(hidden, np.int32(r), np.int32(t))

    # ------------------------------------------------------------ decode
    def feed(self, pieces: dict[str, tuple[list[int], int]], all_ids=None) -> None:
        """One forward over every live row: pieces[rid] = (tokens, position of the first). The width T is a
        power of two >= the longest piece (shorter pieces are padded: the padding writes cache positions past
        the row's end, which are overwritten before any query can see them; free rows write at position 0 and
        are rewritten whole on insert). T == 1 is a plain decode step; all_ids: the (ids, valid) of
        every-token-allowed rows, when every live row is unconstrained and greedy — the next greedy dense
        choice is then computed in the same program (`next_greedy`)."""
        width = pow2_at_least(max(len(p) for p, _ in pieces.values()))
        need = max(start + width for _, start in pieces.values())
        if need > self.seq_len:
            self.ensure_seq_len(pow2_at_least(need))
        tokens = np.zeros((self.batch, width), np.int32)
        starts = np.zeros(self.batch, np.int32)
        ends = np.ones(self.batch, np.int32)
        for slot, rid in enumerate(self.slots):
            if rid is None:
                continue
            piece, start = pieces[rid]
            tokens[slot, : len(piece)] = piece
            starts[slot], ends[slot] = start, len(piece)
        self.row_end = ends
        self.next_greedy = None
        if width > 1:
            self.hidden, self.cache = transformer.forward_jit(self.params, self.cache, jnp.asarray(tokens),
                                                              jnp.asarray(starts), cfg=self.cfg)
        elif all_ids is None:
            hidden, self.cache = transformer.decode_step(self.params, self.cache, jnp.asarray(tokens[:, 0]),
                                                         jnp.asarray(starts), cfg=self.cfg)
            self.hidden = hidden[:, None]
        else:
            hidden, self.cache, index, logprob = _decode_then_greedy(
                self.params, self.engine.head, self.cache, jnp.asarray(tokens[:, 0]), jnp.asarray(starts),
                *all_ids, cfg=self.cfg, plan=self.engine.plans[plans_mod.PlanKind.DENSE])
            self.hidden = hidden[:, None]
            self.next_greedy = (index, logprob)

    def rows_hidden(self, rows: list[tuple[int, int]], padded: int):
        """The hidden states at [(slot, offset from the row's end)] (offset 0: its last fed position), padded
        to `padded` rows: (padded, d)."""
        slots = np.zeros(padded, np.int32)
        ts = np.zeros(padded, np.int32)
        for j, (slot, back) in enumerate(rows):
            slots[j], ts[j] = slot, self.row_end[slot] - 1 - back
        if self.hidden.shape[1] == 1 and padded == self.batch and all(
                slot == j and back == 0 for j, (slot, back) in enumerate(rows)) and len(rows) == padded:
            return self.hidden[:, 0]
        return _gather_rows(self.hidden, jnp.asarray(slots), jnp.asarray(ts))

    # ------------------------------------------------------------ scoring
    def score(self, hidden, kind, ids, valid, seeds, steps, temps, top_ks, top_ps, union, greedy: bool,
              want_logits: bool):
        """Score and sample the rows of `hidden` (R, d) with plan `kind` (a PlanKind). Returns numpy (index
        (R,), logprob (R,), logits (R, K) or None)."""
        head = self.engine.head
        plan = self.engine.plans[kind]
        if want_logits:
            index, logprob, logits = plans_mod.score_select_logits(
                head, hidden, ids, valid, seeds, steps, temps, top_ks, top_ps, union, plan=plan, greedy=greedy)
            index, logprob, logits = jax.device_get((index, logprob, logits))
            return index, logprob, logits
        index, logprob = plans_mod.score_and_select(head, hidden, ids, valid, seeds, steps, temps, top_ks,
                                                    top_ps, union, plan=plan, greedy=greedy)
        index, logprob = jax.device_get((index, logprob))
        return index, logprob, None
