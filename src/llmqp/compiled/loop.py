"""The fused decode loop: the whole constrained generation in one `lax.while_loop`.

    prefill ─▶ hidden ─▶ EMIT ─▶ ┌─────────────────── while status == RUNNING ──────────────────────┐
                                 │ FEED: the tokens emitted last ─▶ trunk ─▶ hidden                 │
                                 │       (one token: a plain decode step; a forced run: power-of-two │
                                 │        chunks, largest first: one small while loop per size)      │
                                 │ EMIT: state ─▶ K = n_allowed[state]                               │
                                 │       forced run (forced=True, run_len > 1): walk one-token rows  │
                                 │       K == 1: the one id, no head                                 │
                                 │       K <= threshold: sparse head, else dense head (lax.cond),    │
                                 │         each a lax.switch over static K buckets W,                │
                                 │         ids = allowed[row_start[state] : +W]                      │
                                 │       shared sampler (seed, step) ─▶ token ─▶ next_state[...]     │
                                 │       stop: EOS sampled, only-EOS state, max_tokens               │
                                 └───────────────────────────────────────────────────────────────────┘

It reproduces the host-stepped loop (`Engine.generate`) token for token, for forced=False and
forced=True alike: the same prefill shapes, the same trunk chunks (one token, or a forced run split
into powers of two, largest first, as `Engine._feed` does), the same K buckets as `plans.pad_allowed`,
the same plan choice (sparse iff K <= the threshold, by default the engine's auto rule), the same
sampler with step = index of the token being generated, and the same stopping rules: stop before
sampling in a state where only EOS may follow, stop when EOS is sampled, stop at max_tokens. A K == 1
step skips the head: the shared sampler would pick index 0 with log-probability 0 anyway.

Shapes are bucketed so that one compile serves many constraints: states and table entries are padded
to powers of two, the token buffer to a power of two (max_tokens itself is a traced scalar), and only
two sets of K buckets exist (small constraints, everything else).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import sampling
from llmqp.compiled.tables import ConstraintTables
from llmqp.model import transformer
from llmqp.model.config import ModelConfig
from llmqp.plans import PLANS, PlanKind, k_buckets

RUNNING, FINISH_EOS, FINISH_DONE, FINISH_LENGTH = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedConfig:
    """Everything static about one compiled loop (hashable: a `jit` static argument).

    sparse_threshold: the largest K scored sparsely, a K bucket boundary; sparse_widths / dense_widths:
    the K buckets compiled for each plan. forced_runs: emit the host's forced runs whole (the engine's
    forced=True); feed_sizes: the trunk chunk sizes that feeding them needs (powers of two)."""

    model: ModelConfig
    greedy: bool
    sparse_threshold: int
    sparse_widths: tuple[int, ...]
    dense_widths: tuple[int, ...]
    buffer_len: int
    forced_runs: bool = False
    feed_sizes: tuple[int, ...] = (1,)

    @classmethod
    def make(cls, model: ModelConfig, *, greedy: bool, sparse_threshold: int, max_k: int, max_tokens: int,
             forced_runs: bool = False, max_run: int = 1) -> "FusedConfig":
        vocab = model.vocab_size
        buckets = k_buckets(vocab)
        # The threshold is a compile-time constant: round it down to a bucket boundary so that a planner
        # whose learned crossover drifts does not trigger a recompile per value (plans give the same
        # tokens; only which buckets run sparse moves).
        sparse_threshold = max([b for b in buckets if b <= sparse_threshold], default=0)
        # Two width sets only (small constraints, everything else), so that one compile serves many.
        small = buckets[min(3, len(buckets) - 1)]
        top = small if max_k <= small else vocab
        lows = [0] + buckets[:-1]
        sparse = tuple(b for b, lo in zip(buckets, lows) if b <= top and lo < sparse_threshold)
        dense = tuple(b for b, lo in zip(buckets, lows) if b <= top and b > sparse_threshold)
        # Feeding a run of n tokens takes chunks of the powers of two in n (as `Engine._feed` does).
        # At least 1..8 so that most constraints share one compile.
        longest = max(min(max_run, max_tokens), 8) if forced_runs else 1
        feed = tuple(1 << i for i in range(longest.bit_length()))
        return cls(model=model, greedy=greedy, sparse_threshold=int(sparse_threshold), sparse_widths=sparse,
                   dense_widths=dense, buffer_len=_pow2(max_tokens, 16), forced_runs=bool(forced_runs),
                   feed_sizes=feed)


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


SPARSE_MAX_FRACTION = 0.25  # the engine's limit: gathering more than V/4 rows never beats the dense head


def default_sparse_threshold(vocab_size: int) -> int:
    """Largest K scored sparsely when no threshold is given. The engine's planner learns the real
    crossover per (model, device) (`engine.planner.crossover_k(1, V, d)`): pass that as sparse_threshold."""
    return int(SPARSE_MAX_FRACTION * vocab_size)


def device_tables(tables: ConstraintTables, pad_width: int) -> dict[str, np.ndarray]:
    """Host tables -> padded numpy arrays for the loop. Rows are read as windows of up to
    `pad_width` entries, so the flat arrays carry that much padding (a window must never be clamped).

    row_start, n_allowed: (S_pad,) int32; allowed, next_state: (E_pad,) int32; is_final, done:
    (S_pad,) bool (done: nothing but EOS may follow); run_len: (S_pad,) int32 forced-run length. Padding
    states allow nothing and are never reached."""
    s_pad = _pow2(tables.num_states, 64)
    e_pad = _pow2(tables.num_entries + pad_width, 4096)
    out = {
        "row_start": np.zeros(s_pad, np.int32),
        "n_allowed": np.zeros(s_pad, np.int32),
        "allowed": np.zeros(e_pad, np.int32),
        "next_state": np.full(e_pad, -1, np.int32),
        "is_final": np.zeros(s_pad, bool),
        "done": np.ones(s_pad, bool),
        "run_len": np.zeros(s_pad, np.int32),
    }
    s, e = tables.num_states, tables.num_entries
    out["row_start"][:s] = tables.row_start
    out["n_allowed"][:s] = tables.n_allowed
    out["allowed"][:e] = tables.allowed
    out["next_state"][:e] = tables.next_state
    out["is_final"][:s] = tables.is_final
    out["done"][:s] = tables.done
    out["run_len"][:s] = tables.forced_run_len
    return out


def _choose(params, tables, hidden, state, step, seed, temperature, top_k, top_p, fc: FusedConfig):
    """One token for `state` from `hidden` (1, d). Returns (token, logprob, next_state)."""
    start, k = tables["row_start"][state], tables["n_allowed"][state]
    head = {"unembed": params["unembed"], "unembed_rows": params["unembed_rows"]}

    def scored(plan: PlanKind, width: int):
        def run(hidden):
            window = jax.lax.dynamic_slice(tables["allowed"], (start,), (width,))
            valid = jnp.arange(width) < k
            ids = jnp.where(valid, window, 0)[None]  # (1, W): padding id 0, a valid gather row
            logits = PLANS[plan].score(head, hidden, ids)  # (1, W) f32
            index, logprob = sampling.select(
                logits, ids, valid[None], seed[None], step[None], temperature[None], top_k[None],
                top_p[None], greedy=fc.greedy)
            return index[0], logprob[0]
        return run

    def by_bucket(plan, widths):
        branches = [scored(plan, w) for w in widths]
        if len(branches) == 1:
            return branches[0]
        bounds = jnp.asarray(widths, jnp.int32)
        # index of the first width >= K: a compare and a sum, not a search loop
        return lambda h: jax.lax.switch(jnp.sum(bounds < k).astype(jnp.int32), branches, h)

    def single(hidden):  # K == 1: the one allowed id, log-probability 0
        return jnp.int32(0), jnp.float32(0.0)

    if fc.sparse_widths and fc.dense_widths:
        sparse, dense = by_bucket(PlanKind.SPARSE, fc.sparse_widths), by_bucket(PlanKind.DENSE, fc.dense_widths)
        scored_step = lambda h: jax.lax.cond(k <= fc.sparse_threshold, sparse, dense, h)  # noqa: E731
    elif fc.sparse_widths:
        scored_step = by_bucket(PlanKind.SPARSE, fc.sparse_widths)
    else:
        scored_step = by_bucket(PlanKind.DENSE, fc.dense_widths)
    index, logprob = jax.lax.cond(k == 1, single, scored_step, hidden)
    token = tables["allowed"][start + index]
    return token, logprob, tables["next_state"][start + index]


def fused_decode(params, tables, hidden, cache, pos0, max_tokens, seed, temperature, top_k, top_p, *,
                 fc: FusedConfig):
    """The loop. hidden: (1, d) f32 after the prompt; cache: KV cache holding the prompt; pos0: int32
    position of the first generated token; max_tokens: int32 <= fc.buffer_len; seed: uint32;
    temperature, top_p: f32; top_k: int32.

    Each iteration *feeds* the tokens emitted last through the trunk (one token; or a forced run in
    power-of-two chunks, largest first, exactly like `Engine._feed`, so that hidden states are computed
    with the same shapes) and then *emits* (one scored token, or with fc.forced_runs a whole run).

    Returns a dict: tokens (L,) int32 padded with -1, logprobs (L,) f32, count int32 (tokens
    emitted, EOS excluded), state int32 (last automaton state), finish int32 (FINISH_*), final bool
    (the output so far is a complete match)."""
    length = fc.buffer_len
    choose = functools.partial(_choose, params, tables, seed=seed, temperature=temperature, top_k=top_k,
                               top_p=top_p, fc=fc)

    def after_emit(state, count, status):
        # the host's checks after applying a step: the constraint is done, or max_tokens is reached
        status = jnp.where((status == RUNNING) & tables["done"][state], FINISH_DONE, status)
        return jnp.where((status == RUNNING) & (count >= max_tokens), FINISH_LENGTH, status)

    # The emit steps see the hidden state and the small carry only: the KV cache never enters a
    # conditional (a conditional around it made XLA:CPU copy it every step: +7 ms/token on SmolLM2).
    def emit_scored(hidden, small):
        state, count, fed, tokens, logprobs, status = small
        token, logprob, nxt = choose(hidden, state, count)
        is_eos = nxt < 0
        tokens = jnp.where(is_eos, tokens, tokens.at[count].set(token))
        logprobs = jnp.where(is_eos, logprobs, logprobs.at[count].set(logprob))
        state = jnp.where(is_eos, state, nxt)
        count = count + jnp.where(is_eos, 0, 1)
        status = after_emit(state, count, jnp.where(is_eos, FINISH_EOS, status))
        return state, count, fed, tokens, logprobs, status

    def emit_run(hidden, small):
        # A run of forced tokens (the host's `forced()`): walk the one-token rows, no scoring.
        state, count, fed, tokens, logprobs, status = small
        n = jnp.minimum(tables["run_len"][state], max_tokens - count)

        def one(i, st):
            state, tokens = st
            row = tables["row_start"][state]
            return tables["next_state"][row], tokens.at[count + i].set(tables["allowed"][row])

        state, tokens = jax.lax.fori_loop(0, n, one, (state, tokens))
        count = count + n  # logprobs of forced tokens stay 0.0
        return state, count, fed, tokens, logprobs, after_emit(state, count, status)

    def emit(carry):
        cache, hidden, small = carry
        if fc.forced_runs:
            small = jax.lax.cond(tables["run_len"][small[0]] > 1, emit_run, emit_scored, hidden, small)
        else:
            small = emit_scored(hidden, small)
        return cache, hidden, small

    def feed_chunk(size: int):
        def run(cache, hidden, tokens, fed):
            chunk = jax.lax.dynamic_slice(tokens, (fed,), (size,))
            h, cache = transformer.forward(params, cache, chunk[None], (pos0 + fed)[None], cfg=fc.model)
            return cache, h[:, -1]
        return run

    def feed_while(size: int):
        def body(carry):
            cache, hidden, (state, count, fed, tokens, logprobs, status) = carry
            cache, hidden = feed_chunk(size)(cache, hidden, tokens, fed)
            return cache, hidden, (state, count, fed + size, tokens, logprobs, status)
        return lambda carry: jax.lax.while_loop(lambda c: c[2][1] - c[2][2] >= size, body, carry)

    def feed(carry):
        """Feed every emitted token not yet through the trunk. After a scored token that is exactly one
        (a plain decode step); after a forced run, power-of-two chunks, largest first. Each chunk size is
        its own (zero- or one-trip) while loop rather than a branch of a switch, for the same reason the
        cache stays out of conditionals."""
        if fc.feed_sizes == (1,):
            cache, hidden, (state, count, fed, tokens, logprobs, status) = carry
            cache, hidden = feed_chunk(1)(cache, hidden, tokens, fed)
            return cache, hidden, (state, count, fed + 1, tokens, logprobs, status)
        for size in reversed(fc.feed_sizes):
            carry = feed_while(size)(carry)
        return carry

    status0 = jnp.where(tables["done"][0], FINISH_DONE, RUNNING)
    small = (jnp.int32(0), jnp.int32(0), jnp.int32(0), jnp.full((length,), -1, jnp.int32),
             jnp.zeros((length,), jnp.float32), status0)
    # The first token comes from the prefill's hidden state; then each iteration feeds what was emitted
    # and emits again, so the trunk never runs after the last token.
    first = emit((cache, hidden, small))[2]
    small = jax.tree.map(lambda a, b: jnp.where(status0 == RUNNING, b, a), small, first)
    _, _, small = jax.lax.while_loop(lambda c: c[2][5] == RUNNING, lambda c: emit(feed(c)), (cache, hidden, small))
    state, count, _, tokens, logprobs, status = small
    return {"tokens": tokens, "logprobs": logprobs, "count": count, "state": state, "finish": status,
            "final": tables["is_final"][state]}


_fused_jit = jax.jit(fused_decode, static_argnames=("fc",))


@dataclasses.dataclass(frozen=True)
class FusedOutput:
    """What one fused run produced. finish_reason: "stop" (EOS, or nothing but EOS may follow) or
    "length"; valid: stopped in a final state. decode_ms: wall time of the loop (no prefill)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    valid: bool
    final_state: int
    decode_ms: float


def config_for(cfg: ModelConfig, tables: ConstraintTables, sampling_params: sampling.SamplingParams,
               max_tokens: int, *, forced: bool, sparse_threshold: int | None) -> FusedConfig:
    threshold = default_sparse_threshold(cfg.vocab_size) if sparse_threshold is None else int(sparse_threshold)
    return FusedConfig.make(cfg, greedy=sampling_params.greedy, sparse_threshold=threshold, max_k=tables.max_k,
                            max_tokens=max_tokens, forced_runs=forced,
                            max_run=int(tables.forced_run_len.max(initial=0)))


_DEVICE_TABLES: "weakref.WeakKeyDictionary[ConstraintTables, dict]" = weakref.WeakKeyDictionary()


def _on_device(tables: ConstraintTables, pad_width: int) -> dict:
    """Padded tables on the device, cached per tables object and pad width."""
    per = _DEVICE_TABLES.setdefault(tables, {})
    if pad_width not in per:
        per[pad_width] = jax.tree.map(jnp.asarray, device_tables(tables, pad_width))
    return per[pad_width]


def run_fused(engine, prompt_ids, tables: ConstraintTables, sampling_params: sampling.SamplingParams, max_tokens: int,
              *, forced: bool = True, sparse_threshold: int | None = None, timings: dict | None = None) -> FusedOutput:
    """Generate with the fused loop. engine: an `llmqp.Engine` or anything with .params and .config.
    prompt_ids: token ids (already templated). forced: feed the host's forced runs whole (the engine's
    forced=True) or score every step (forced=False); either way the tokens equal the host loop's with
    the same setting. timings, when a dict, receives prefill_ms/decode_ms (decode: the loop alone)."""
    cfg = engine.config
    fc = config_for(cfg, tables, sampling_params, max_tokens, forced=forced, sparse_threshold=sparse_threshold)
    dev = _on_device(tables, max(fc.sparse_widths + fc.dense_widths))
    ids = np.asarray(prompt_ids, np.int32)
    t0 = time.perf_counter()
    hidden, cache = prefill(engine.params, cfg, ids, extra=max_tokens)
    hidden.block_until_ready()
    t1 = time.perf_counter()
    out = _fused_jit(engine.params, dev, hidden, cache, jnp.int32(len(ids)), jnp.int32(max_tokens),
                     jnp.uint32(sampling_params.seed), jnp.float32(sampling_params.temperature),
                     jnp.int32(sampling_params.top_k), jnp.float32(sampling_params.top_p), fc=fc)
    out = jax.device_get(out)
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3)
    return to_output(out, decode_ms=(t2 - t1) * 1e3)


def prefill_shapes(n: int, extra: int) -> tuple[list[tuple[int, int]], int]:
    """The engine's prefill bucketing for one row of n prompt tokens that will grow by `extra`:
    ([(chunk start, padded width)], cache length). Same shapes as the host, hence the same numbers."""
    from llmqp.engine import MIN_CACHE, PREFILL_CHUNK

    starts = list(range(0, n, PREFILL_CHUNK))
    chunks = [(s, _pow2(min(PREFILL_CHUNK, n - s), 16)) for s in starts]
    cache_len = _pow2(max(starts[-1] + chunks[-1][1], n + extra), MIN_CACHE)
    return chunks, cache_len


def prefill(params, cfg: ModelConfig, ids: np.ndarray, *, extra: int):
    """Run one prompt through the trunk as the engine does. Returns (hidden (1, d), cache)."""
    n = len(ids)
    if n + extra > cfg.max_position:
        from llmqp.sampling import InvalidArgument

        raise InvalidArgument(f"prompt + max_tokens ({n + extra} tokens) exceeds the model's context of "
                              f"{cfg.max_position} tokens")
    chunks, cache_len = prefill_shapes(n, extra)
    cache = transformer.init_cache(cfg, 1, cache_len, params["embed"].dtype)
    hidden = None
    for start, width in chunks:
        tokens = np.zeros((1, width), np.int32)
        chunk = ids[start : start + width]
        tokens[0, : len(chunk)] = chunk
        h, cache = transformer.forward_jit(params, cache, jnp.asarray(tokens), jnp.zeros((1,), jnp.int32) + start,
                                           cfg=cfg)
        if start <= n - 1 < start + width:
            hidden = h[:, n - 1 - start]
    return hidden, cache


def to_output(out: dict, decode_ms: float = 0.0) -> FusedOutput:
    count = int(out["count"])
    state = int(out["state"])
    finish = int(out["finish"])
    final = bool(out["final"])
    stopped = finish in (FINISH_EOS, FINISH_DONE)  # FINISH_LENGTH otherwise
    return FusedOutput(token_ids=[int(t) for t in out["tokens"][:count]],
                       logprobs=[float(x) for x in out["logprobs"][:count]],
                       finish_reason="stop" if stopped else "length", valid=stopped and final,
                       final_state=state, decode_ms=decode_ms)
