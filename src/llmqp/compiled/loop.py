"""The fused decode loop: the whole constrained generation in one `lax.while_loop`.

    prefill ─▶ hidden ─▶ EMIT ─▶ ┌─────────────────── while status == RUNNING ──────────────────────┐
                                 │ FEED: the tokens emitted last ─▶ trunk ─▶ hidden                 │
                                 │       (one token: a plain decode step; a forced run: the chunks  │
                                 │        of `DecodeSpec.feed_chunks`: one small while loop a size)  │
                                 │ EMIT: state ─▶ K = n_allowed[state]                               │
                                 │       forced run (forced=True, run_len > 1): walk one-token rows  │
                                 │       else one lax.switch: K == 1: the one id, no head;           │
                                 │         K <= threshold: sparse head, else dense head, each at the │
                                 │         K bucket W of K, ids = allowed[row_start[state] : +W]     │
                                 │       shared sampler (seed, step) ─▶ token ─▶ next_state[...]     │
                                 │       stop: EOS sampled, only-EOS state, max_tokens               │
                                 └───────────────────────────────────────────────────────────────────┘

It reproduces the host-stepped loop (`Engine.generate`) token for token, for forced=False and
forced=True alike, because both read their shapes from one `DecodeSpec` (`llmqp.core.spec`): the same
prefill chunks and cache length, the same feed chunks for a forced run, the same K buckets; the same
sampler with step = index of the token being generated, and the same stopping rules: stop before
sampling in a state where only EOS may follow, stop when EOS is sampled, stop at max_tokens. The plan
(sparse iff K <= the threshold) only changes speed: both heads give the same logits. A K == 1 step
skips the head: the shared sampler would pick index 0 with log-probability 0 anyway.

The automaton tables, max_tokens, the sampling settings and the sparse threshold are *traced
arguments*, so one compiled loop serves every constraint of a size class. What is static (`FusedConfig`)
takes few values: greedy or not, forced runs or not, two sets of K buckets (small constraints with
K <= 512, everything else), two sets of feed chunk sizes, the token buffer (a power of four) — plus
the shapes of the padded tables (`table_shape`: states padded to 16384, entries to a power of four, or
straight to 4M for constraints with vocabulary-wide rows, such as any JSON string) and of the KV cache
(`DecodeSpec.cache_len`). A JSON-extraction workload therefore compiles the loop once per (greedy,
cache length) and reuses it for every new schema.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import sampling
from llmqp.compiled.tables import ConstraintTables
from llmqp.core.spec import DEFAULT_SPEC, DecodeSpec, pow2_at_least
from llmqp.model import transformer
from llmqp.model.config import ModelConfig
from llmqp.plans import PLANS, PlanKind

RUNNING, FINISH_EOS, FINISH_DONE, FINISH_LENGTH = 0, 1, 2, 3

# Table size classes (see `table_shape`). States cost 14 bytes each on the device, so every table gets the
# largest class; entries cost 8 bytes, so they are padded to a power of four, and the wide class (rows
# as wide as the vocabulary) straight to WIDE_ENTRIES (32 MB) so that every JSON schema with a string
# shares one shape.
STATE_PAD = 1 << 14
MIN_ENTRIES = 1 << 12
WIDE_ENTRIES = 1 << 22
SMALL_K_BUCKETS = 4  # constraints whose K fits the first 4 K buckets (8..512) compile the small width set
SMALL_FEED = 8  # runs up to 8 tokens compile feed sizes 1..8, longer ones 1..spec.feed_max


def _pow4_at_least(n: int, floor: int) -> int:
    out = floor
    while out < n:
        out *= 4
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedConfig:
    """Everything static about one compiled loop (hashable: a `jit` static argument). Not in here, hence
    free to change without a compile: the tables' contents, max_tokens (<= buffer_len), the seed,
    temperature, top-k, top-p and the sparse threshold.

    widths: the K buckets compiled for the dense head; sparse_widths: those the sparse head may score
    (buckets that hold some K <= spec.sparse_limit). forced_runs: emit the host's forced runs whole (the
    engine's forced=True); feed_sizes: the trunk chunk sizes that feeding them needs (powers of two)."""

    model: ModelConfig
    greedy: bool
    widths: tuple[int, ...]
    sparse_widths: tuple[int, ...]
    buffer_len: int
    forced_runs: bool = False
    feed_sizes: tuple[int, ...] = (1,)
    spec: DecodeSpec = DEFAULT_SPEC

    @classmethod
    def make(cls, model: ModelConfig, *, greedy: bool, max_k: int, max_tokens: int, forced_runs: bool = False,
             max_run: int = 1, spec: DecodeSpec = DEFAULT_SPEC) -> "FusedConfig":
        vocab = model.vocab_size
        buckets = spec.k_buckets(vocab)
        small = buckets[min(SMALL_K_BUCKETS, len(buckets)) - 1]
        widths = tuple(b for b in buckets if b <= (small if max_k <= small else vocab))
        lows = (0,) + widths[:-1]
        limit = spec.sparse_limit(vocab)
        sparse = tuple(b for b, lo in zip(widths, lows) if lo < limit)
        # Feeding a run of n tokens takes `spec.feed_chunks(n)`: powers of two up to feed_max.
        longest = min(SMALL_FEED if max_run <= SMALL_FEED else spec.feed_max, spec.feed_max) if forced_runs else 1
        feed = tuple(1 << i for i in range(longest.bit_length()))
        return cls(model=model, greedy=greedy, widths=widths, sparse_widths=sparse,
                   buffer_len=_pow4_at_least(max_tokens, 64), forced_runs=bool(forced_runs), feed_sizes=feed,
                   spec=spec)

    @property
    def wide(self) -> bool:
        """The loop compiles K buckets past the small set: its tables get the wide entries class."""
        return len(self.widths) > SMALL_K_BUCKETS


def default_sparse_threshold(vocab_size: int, spec: DecodeSpec = DEFAULT_SPEC) -> int:
    """Largest K scored sparsely when no threshold is given: the spec's sparse limit. The engine's planner
    learns the real crossover per (model, device) (`engine.planner.crossover_k(1, V, d)`): pass that as
    sparse_threshold."""
    return spec.sparse_limit(vocab_size)


def table_shape(tables: ConstraintTables, wide: bool) -> tuple[int, int]:
    """(states, entries) the tables are padded to for the loop: the size class. wide: the loop compiles the
    vocabulary-wide K buckets (tables whose rows may be that wide)."""
    states = max(STATE_PAD, pow2_at_least(tables.num_states))
    entries = max(tables.num_entries, 1)
    return states, (max(WIDE_ENTRIES, _pow4_at_least(entries, MIN_ENTRIES)) if wide
                    else _pow4_at_least(entries, MIN_ENTRIES))


def device_tables(tables: ConstraintTables, shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Host tables -> padded numpy arrays for the loop (shape: (states, entries); None: no padding, as
    the exporter bakes them in).

    row_start, n_allowed: (S_pad,) int32; allowed, next_state: (E_pad,) int32; is_final, done:
    (S_pad,) bool (done: nothing but EOS may follow); run_len: (S_pad,) int32 forced-run length. Padding
    states allow nothing and are never reached. A row is read as a window of its K bucket, gathered
    with clipped indices (entries past the row are masked), so the flat arrays need no tail padding."""
    s, e = tables.num_states, tables.num_entries
    s_pad, e_pad = shape if shape is not None else (s, max(e, 1))
    out = {
        "row_start": np.zeros(s_pad, np.int32),
        "n_allowed": np.zeros(s_pad, np.int32),
        "allowed": np.zeros(e_pad, np.int32),
        "next_state": np.full(e_pad, -1, np.int32),
        "is_final": np.zeros(s_pad, bool),
        "done": np.ones(s_pad, bool),
        "run_len": np.zeros(s_pad, np.int32),
    }
    out["row_start"][:s] = tables.row_start
    out["n_allowed"][:s] = tables.n_allowed
    out["allowed"][:e] = tables.allowed
    out["next_state"][:e] = tables.next_state
    out["is_final"][:s] = tables.is_final
    out["done"][:s] = tables.done
    out["run_len"][:s] = tables.forced_run_len
    return out


def _choose(params, tables, hidden, state, step, seed, temperature, top_k, top_p, sparse_threshold,
            fc: FusedConfig):
    """One token for `state` from `hidden` (1, d). Returns (token, logprob, next_state)."""
    start, k = tables["row_start"][state], tables["n_allowed"][state]
    head = {name: params[name] for name in ("unembed", "unembed_rows", "unembed_packed") if name in params}

    def scored(plan: PlanKind, width: int):
        def run(hidden):
            valid = jnp.arange(width) < k
            window = jnp.take(tables["allowed"], start + jnp.arange(width), mode="clip")
            ids = jnp.where(valid, window, 0)[None]  # (1, W): padding id 0, a valid gather row
            logits = PLANS[plan].score(head, hidden, ids)  # (1, W) f32
            index, logprob = sampling.select(
                logits, ids, valid[None], seed[None], step[None], temperature[None], top_k[None],
                top_p[None], greedy=fc.greedy)
            return index[0], logprob[0]
        return run

    def single(hidden):  # K == 1: the one allowed id, log-probability 0
        return jnp.int32(0), jnp.float32(0.0)

    # One switch: [single] + sparse per bucket + dense per bucket. The bucket of K is the first width
    # >= K: a compare and a sum, not a search loop.
    branches = [single] + [scored(PlanKind.SPARSE, w) for w in fc.sparse_widths] + \
        [scored(PlanKind.DENSE, w) for w in fc.widths]
    bucket = jnp.sum(jnp.asarray(fc.widths, jnp.int32) < k).astype(jnp.int32)
    sparse = k <= sparse_threshold  # the host clips the threshold to the spec's sparse limit
    branch = jnp.where(k == 1, 0, jnp.where(sparse, 1 + bucket, 1 + len(fc.sparse_widths) + bucket))
    index, logprob = jax.lax.switch(branch, branches, hidden)
    token = tables["allowed"][start + index]
    return token, logprob, tables["next_state"][start + index]


def fused_decode(params, tables, hidden, cache, pos0, max_tokens, seed, temperature, top_k, top_p,
                 sparse_threshold, *, fc: FusedConfig):
    """The loop. tables: `device_tables` arrays (traced: any contents of that shape); hidden: (1, d) f32
    after the prompt; cache: KV cache holding the prompt; pos0: int32 position of the first generated
    token; max_tokens: int32 <= fc.buffer_len; seed: uint32; temperature, top_p: f32; top_k: int32;
    sparse_threshold: int32, the largest K scored sparsely (at most spec.sparse_limit).

    Each iteration *feeds* the tokens emitted last through the trunk (one token; or a forced run in the
    chunks of `DecodeSpec.feed_chunks`, as the host loop feeds it, so that hidden states are computed
    with the same shapes) and then *emits* (one scored token, or with fc.forced_runs a whole run).

    Returns a dict: tokens (L,) int32 padded with -1, logprobs (L,) f32, count int32 (tokens
    emitted, EOS excluded), state int32 (last automaton state), finish int32 (FINISH_*), final bool
    (the output so far is a complete match)."""
    length = fc.buffer_len
    choose = functools.partial(_choose, params, tables, seed=seed, temperature=temperature, top_k=top_k,
                               top_p=top_p, sparse_threshold=sparse_threshold, fc=fc)

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
        (a plain decode step); after a forced run, `spec.feed_chunks(n)`: powers of two, largest first,
        at most feed_max each — which is what greedy loops over the sizes in descending order produce.
        Each chunk size is its own while loop rather than a branch of a switch, for the same reason the
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
    "length"; valid: stopped in a final state (the tables' verdict; `generate_fused` also replays the
    tokens through the host matcher). decode_ms: wall time of the loop (no prefill)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    valid: bool
    final_state: int
    decode_ms: float


def config_for(cfg: ModelConfig, tables: ConstraintTables, sampling_params: sampling.SamplingParams,
               max_tokens: int, *, forced: bool, spec: DecodeSpec = DEFAULT_SPEC) -> FusedConfig:
    return FusedConfig.make(cfg, greedy=sampling_params.greedy, max_k=tables.max_k, max_tokens=max_tokens,
                            forced_runs=forced, max_run=int(tables.forced_run_len.max(initial=0)), spec=spec)


def clip_threshold(sparse_threshold: int | None, vocab_size: int, spec: DecodeSpec = DEFAULT_SPEC) -> int:
    """The threshold the loop applies: the given one (default: the spec's sparse limit), never above the
    spec's sparse limit (no sparse branch is compiled beyond it)."""
    limit = spec.sparse_limit(vocab_size)
    return limit if sparse_threshold is None else max(0, min(int(sparse_threshold), limit))


_DEVICE_CACHE_SIZE = 8  # padded tables kept on the device (a wide one is 32 MB), least recently used evicted
_device_tables: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def _on_device(tables: ConstraintTables, shape: tuple[int, int]) -> dict:
    """Padded tables on the device, cached per tables object and shape."""
    key = (id(tables), shape)
    hit = _device_tables.get(key)
    if hit is not None and hit[0] is tables:
        _device_tables.move_to_end(key)
        return hit[1]
    arrays = jax.tree.map(jnp.asarray, device_tables(tables, shape))
    _device_tables[key] = (tables, arrays)
    while len(_device_tables) > _DEVICE_CACHE_SIZE:
        _device_tables.popitem(last=False)
    return arrays


def run_fused(engine, prompt_ids, tables: ConstraintTables, sampling_params: sampling.SamplingParams, max_tokens: int,
              *, forced: bool = True, sparse_threshold: int | None = None, timings: dict | None = None,
              spec: DecodeSpec | None = None) -> FusedOutput:
    """Generate with the fused loop. engine: an `llmqp.Engine` or anything with .params and .config.
    prompt_ids: token ids (already templated). forced: feed the host's forced runs whole (the engine's
    forced=True) or score every step (forced=False); either way the tokens equal the host loop's with
    the same setting. sparse_threshold: largest K scored sparsely (default and cap: spec.sparse_limit;
    it changes speed, never tokens, and never triggers a compile). timings, when a dict, receives
    prefill_ms/decode_ms (decode: the loop alone). spec: the decode rules (default: the engine's, so
    the prompt is prefilled in the host loop's chunks). Compiles the loop only for a new size class (see
    the module docstring)."""
    spec = spec or getattr(engine, "spec", DEFAULT_SPEC)
    cfg = engine.config
    fc = config_for(cfg, tables, sampling_params, max_tokens, forced=forced, spec=spec)
    dev = _on_device(tables, table_shape(tables, wide=fc.wide))
    threshold = clip_threshold(sparse_threshold, cfg.vocab_size, spec)
    ids = np.asarray(prompt_ids, np.int32)
    t0 = time.perf_counter()
    hidden, cache = prefill(engine.params, cfg, ids, extra=max_tokens, spec=spec)
    hidden.block_until_ready()
    t1 = time.perf_counter()
    out = _fused_jit(_loop_params(engine), dev, hidden, cache, jnp.int32(len(ids)), jnp.int32(max_tokens),
                     jnp.uint32(sampling_params.seed), jnp.float32(sampling_params.temperature),
                     jnp.int32(sampling_params.top_k), jnp.float32(sampling_params.top_p), jnp.int32(threshold),
                     fc=fc)
    out = jax.device_get(out)
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3)
    return to_output(out, decode_ms=(t2 - t1) * 1e3)


def _loop_params(engine) -> dict:
    """The params the loop runs on: the engine's, plus its packed unembedding where it has one, so that the
    loop's heads score as the host loop's do (`transformer.dense_logits` / `sparse_logits` decide where it is
    used: a bf16 head at every row count, an f32 one never for the loop's one row)."""
    packed = getattr(engine, "head", {}).get("unembed_packed")
    return engine.params if packed is None else dict(engine.params, unembed_packed=packed)


def prefill(params, cfg: ModelConfig, ids: np.ndarray, *, extra: int, spec: DecodeSpec = DEFAULT_SPEC):
    """Run one prompt through the trunk in the spec's chunks (`spec.prefill_chunks`), into a cache of
    `spec.cache_len(n, extra)` positions: the host loop's shapes, hence its numbers. Returns (hidden
    (1, d) of the last prompt token, cache)."""
    n = len(ids)
    if n + extra > cfg.max_position:
        from llmqp.sampling import InvalidArgument

        raise InvalidArgument(f"prompt + max_tokens ({n + extra} tokens) exceeds the model's context of "
                              f"{cfg.max_position} tokens")
    cache = transformer.init_cache(cfg, 1, spec.cache_len(n, extra), transformer.cache_dtype(params))
    hidden = None
    for start, width in spec.prefill_chunks(n):
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
