"""The decoder-only transformer (Llama / Qwen2 family) as pure functions over a params pytree.
Gemma 3 has its own trunk in `llmqp.model.gemma`; `forward` dispatches on ``cfg.arch``.

Layout decisions (measured on XLA:CPU, see DESIGN.md):
- f32 matmul weights are stored ``[in, out]`` and used as ``x @ W``; q/k/v and gate/up are fused so
  each layer issues three dots instead of seven.
- Layers are a Python list, unrolled under `jit`: `lax.scan` over stacked layers ran 2x slower.
- The LM head is *not* part of the trunk: `forward` returns final-normed hidden states and the plans
  decide how much of the vocabulary to score (`dense_logits` / `sparse_logits`).

Params pytree::

    embed        (V, d)          token embedding rows
    unembed_rows (V, d)          unembedding rows, gathered by sparse plans (== embed when tied)
    unembed      (d, V)          the same matrix transposed, for the dense head
    unembed_packed [optional]    ``unembed`` in `llmqp.kernels`' panel layout (the engine's head dict only)
    final_norm   (d,)
    layers[i]:   attn_norm (d,), w_qkv (d, q+2kv), b_qkv (q+2kv,) [qkv_bias only], w_o (q, d),
                 ffn_norm (d,), w_gate_up (d, 2F), w_down (F, d),
                 multi_token [optional, `with_multi_token_weights`]: {w_qkv, w_o, w_gate_up, w_down} in bf16
                 packed [optional, `llmqp.kernels.with_packed_weights`]: the same four matrices (f32 or bf16) in
                 the CPU kernel's panel layout, used for products of up to `kernels.SMALL_M_MAX` rows

KV cache pytree: ``{"k": [ (B, S, KV, hd) per layer ], "v": [...]}`` — fixed size S, written in place
(the cache argument is donated).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import kernels
from llmqp.model import exact
from llmqp.model import gemma
from llmqp.model.config import ModelConfig, RopeStyle


def init_cache(cfg: ModelConfig, batch: int, seq_len: int, dtype=jnp.float32) -> dict:
    """A zeroed KV cache of `seq_len` positions for `batch` rows."""
    shape = (batch, seq_len, cfg.n_kv_heads, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)],
    }


def cache_dtype(params):
    """The KV cache's dtype for these params: f32 where the products run through the CPU kernels (packed
    weights, f32 or bf16: the kernels' attention reads an f32 cache), else the embedding's dtype."""
    layers = params.get("layers") or [{}]
    return jnp.float32 if "packed" in layers[0] else params["embed"].dtype


def rms_norm(x, weight, eps: float):
    # Normalise in f32 whatever the compute dtype: bf16 variance is too coarse.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(exact.mean_square(x32) + eps)  # row-count independent (exact.py)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions, head_dim: int, theta: float):
    """cos, sin of shape positions.shape + (1, head_dim // 2): one angle per rotated pair."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def apply_rope(x, cos, sin, style: RopeStyle):
    """Rotate x: (B, T, heads, hd) by the per-position angles."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    if style is RopeStyle.ADJACENT_PAIR:
        pairs = x32.reshape(*x.shape[:-1], half, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)
    else:
        x0, x1 = x32[..., :half], x32[..., half:]
        out = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.astype(x.dtype)


def _write_rows(cache_layer, new, start):
    # cache_layer: (B, S, KV, hd); new: (B, T, KV, hd); start: (B,) — each row writes at its own offset.
    return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (s, 0, 0)))(cache_layer, new, start)


# Where the CPU kernel does not run it (`kernels.attends`): rows of B >= 2 with up to this many query positions
# each use `_attention_small` (multiply + reduce over the
# cache where it lies); everything else `_attention` (two einsums, which XLA:CPU lowers to dots after copying
# K and V of the whole cache into a (B, KV)-major layout, every layer). Measured on 2 loaded cores (30 layers,
# S=512, the cache write included, fastest of 15 interleaved calls): decode at B=8 47 vs 347 ms and 58 vs 276 ms
# in two runs; at B=1 the two are within the noise (8.9 vs 16.8 and 12.2 vs 11.0 ms), so B=1 keeps the
# einsums and its results stay bit-identical to the trunk before this change; at T=4, B=1 the einsums win.
SMALL_ATTENTION_MAX_T = 2


def _attention(q, k_all, v_all, q_pos, cfg: ModelConfig):
    # q: (B, T, H, hd); k_all, v_all: (B, S, KV, hd) with this chunk written; q_pos: (B, T) absolute positions.
    b, t = q.shape[:2]
    groups = cfg.n_heads // cfg.n_kv_heads
    q = q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_all, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(cfg.head_dim))
    key_pos = jnp.arange(k_all.shape[1])
    visible = key_pos[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_all)
    return out.reshape(b, t, cfg.q_size)


def _attention_small(q, k_all, v_all, q_pos, cfg: ModelConfig):
    """Attention of a few positions per row, written as multiply + reduce over the cache in its own layout.

    q: (B, T, KV, G, hd); k_all, v_all: (B, S, KV, hd) with this chunk written; q_pos: (B, T). Returns
    (B, T, KV, G, hd). Each product is reduced inside one fusion that reads the cache where it lies; dots
    (einsums) over it would need a (B, KV)-major copy of K and V first, and XLA:CPU makes one every layer,
    either as a transpose or, when a dot reads the updated cache directly, as a copy of the donated buffer
    to keep it alive beside the in-place update."""
    k32, v32 = k_all.astype(jnp.float32), v_all.astype(jnp.float32)  # a bf16 cache is summed in f32
    scores = jnp.sum(q.astype(jnp.float32)[:, :, None] * k32[:, None, :, :, None, :], axis=-1)  # (B, T, S, KV, G)
    scores = scores * (1.0 / math.sqrt(cfg.head_dim))
    visible = jnp.arange(k_all.shape[1])[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[..., None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=2)
    return jnp.sum(probs[..., None] * v32[:, None, :, :, None, :], axis=2).astype(v_all.dtype)  # (B, T, KV, G, hd)


# A params pytree made by `with_multi_token_weights` carries a second copy of the matmul weights (bf16) that
# forwards of at least this many positions per row use; one-token steps keep the f32 weights.
MULTI_TOKEN_MIN_T = 2


def with_multi_token_weights(params, dtype=jnp.bfloat16) -> dict:
    """params plus every layer's matmul weights converted to `dtype` under ``layer["multi_token"]``.

    `forward` then runs chunks of >= MULTI_TOKEN_MIN_T positions per row (prefill, forced runs, verify
    forwards) on those weights and one-token steps (decode, at any batch) on the f32 ones: the format that is
    faster at each shape (benchmarks/limits.py). Costs the copy's memory (+212 MB for SmolLM2 in bf16). Lossy
    where it is used — logit error and perplexity change in the README — and it breaks the equality of a
    T-position forward with T one-token steps that draft-and-verify and forced runs rely on for identical
    outputs, so no engine default uses it."""
    layers = [dict(layer, multi_token={k: layer[k].astype(dtype) for k in ("w_qkv", "w_o", "w_gate_up", "w_down")})
              for layer in params["layers"]]
    return dict(params, layers=layers)


def _linear(x, w, packed=None):
    """x: (..., in) f32 @ w: (in, out) f32 or bf16 -> (..., out) f32.

    `packed`: the same f32 matrix in `llmqp.kernels`' panel layout (``layer["packed"]``, present where that
    CPU kernel is built): products of up to `kernels.SMALL_M_MAX` rows go through the kernel, which sums every
    output element in the same order whatever the number of rows (so T positions at once give the hidden
    states of T one-token steps, bit for bit). Otherwise f32 weights: a plain f32 product. bf16 weights: the
    activations are rounded to bf16 and the product accumulates in f32 (YNNPACK's bf16 GEMM on XLA:CPU). A
    one-row product is padded to two rows: for a single row XLA:CPU converts the whole bf16 matrix to f32
    first (measured ~10x slower than two rows)."""
    if packed is not None:
        return kernels.linear(x, w, packed)
    if w.dtype == jnp.float32:
        return x @ w
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, x.shape[-1]).astype(w.dtype)
    if rows == 1:
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    y = jnp.dot(x2, w, preferred_element_type=jnp.float32)[:rows]
    return y.reshape(*lead, w.shape[-1])


def forward(params, cache, tokens, start, *, cfg: ModelConfig):
    """Run the trunk on a chunk of tokens and write their keys/values into the cache.

    tokens: (B, T) int32; start: (B,) int32 position of tokens[:, 0] in each row.
    Returns (hidden: (B, T, d) f32 after the final norm, cache). Positions past a row's real length may
    hold padding: their cache entries are overwritten before any later query can see them, because a
    query at position p only attends to keys at positions <= p and position p is written first.
    The caller guarantees start + T <= S (dynamic_update_slice would otherwise clamp the offset).

    `cache` may also be a tuple of B one-row caches (the scheduler's prompts prefilling side by side): the
    products then run on all B x T positions at once and each row writes and attends to its own cache, so
    no cache is copied into a stacked one and out again (Llama-style trunks; returns the tuple)."""
    if cfg.arch == "gemma3":
        if isinstance(cache, tuple):
            raise ValueError("gemma.forward takes one stacked cache, not a tuple of one-row caches")
        return gemma.forward(params, cache, tokens, start, cfg=cfg)
    row_caches = cache if isinstance(cache, tuple) else None
    x = params["embed"][tokens].astype(jnp.float32)  # (B, T, d)
    b, t = tokens.shape
    q_pos = start[:, None] + jnp.arange(t, dtype=start.dtype)[None, :]  # (B, T)
    cos, sin = rope_angles(q_pos, cfg.head_dim, cfg.rope_theta)
    new_k, new_v = [], []
    for i, layer in enumerate(params["layers"]):
        mats = layer["multi_token"] if t >= MULTI_TOKEN_MIN_T and "multi_token" in layer else layer
        packed = layer.get("packed", {}) if mats is layer else {}
        h = rms_norm(x, layer["attn_norm"], cfg.rms_eps)
        qkv = _linear(h, mats["w_qkv"], packed.get("w_qkv"))
        if cfg.qkv_bias:
            qkv = qkv + layer["b_qkv"]
        q = qkv[..., : cfg.q_size].reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = qkv[..., cfg.q_size : cfg.q_size + cfg.kv_size].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = qkv[..., cfg.q_size + cfg.kv_size :].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        q = apply_rope(q, cos, sin, cfg.rope_style)
        k = apply_rope(k, cos, sin, cfg.rope_style)
        if row_caches is None:
            attn, k_all, v_all = _attend(q, k, v, cache["k"][i], cache["v"][i], start, q_pos, packed, cfg)
            new_k.append(k_all)
            new_v.append(v_all)
        else:  # each row against its own cache
            outs = [_attend(q[r : r + 1], k[r : r + 1], v[r : r + 1], c["k"][i], c["v"][i], start[r : r + 1],
                            q_pos[r : r + 1], packed, cfg) for r, c in enumerate(row_caches)]
            attn = jnp.concatenate([o[0] for o in outs], axis=0)
            new_k.append([o[1] for o in outs])
            new_v.append([o[2] for o in outs])
        x = x + _linear(attn, mats["w_o"], packed.get("w_o"))
        h = rms_norm(x, layer["ffn_norm"], cfg.rms_eps)
        gate_up = _linear(h, mats["w_gate_up"], packed.get("w_gate_up"))
        gate, up = gate_up[..., : cfg.ffn_size], gate_up[..., cfg.ffn_size :]
        x = x + _linear(jax.nn.silu(gate) * up, mats["w_down"], packed.get("w_down"))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_eps)
    if row_caches is not None:
        return hidden, tuple({"k": [layer[r] for layer in new_k], "v": [layer[r] for layer in new_v]}
                             for r in range(len(row_caches)))
    return hidden, {"k": new_k, "v": new_v}


def _attend(q, k, v, cache_k, cache_v, start, q_pos, packed, cfg: ModelConfig):
    """Write one layer's new keys/values (B, T, KV, hd) at each row's `start` and attend to the cache.
    Returns (attention output (B, T, q_size), updated cache_k, cache_v)."""
    b, t = q.shape[:2]
    k_all = _write_rows(cache_k, k.astype(cache_k.dtype), start)
    v_all = _write_rows(cache_v, v.astype(cache_v.dtype), start)
    if kernels.attends(packed, q, k_all):
        attn = kernels.attention(q, k_all, v_all, q_pos, scale=1.0 / math.sqrt(cfg.head_dim)).reshape(
            b, t, cfg.q_size)
    elif b > 1 and t <= SMALL_ATTENTION_MAX_T:
        groups = cfg.n_heads // cfg.n_kv_heads
        attn = _attention_small(q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim), k_all, v_all, q_pos,
                                cfg).reshape(b, t, cfg.q_size)
    else:
        attn = _attention(q, k_all, v_all, q_pos, cfg)
    return attn, k_all, v_all


def dense_logits(params, hidden):
    """hidden: (..., d) -> logits (..., V) f32 over the whole vocabulary.

    With ``params["unembed_packed"]`` (the engine adds it where the CPU kernel runs), products of 2 to
    `kernels.SMALL_M_MAX` rows — draft windows, scheduler batches — go through `llmqp.kernels`: 2x faster than
    XLA's dot at 8 rows, and every row's logits equal those of the same row alone, bit for bit. One f32 row stays
    on XLA's dot: as fast, and the same bits. bf16 weights go through the kernel at every row count (XLA:CPU
    widens the whole bf16 matrix for one row): f32 activations, each weight widened exactly, f32 sums."""
    w = params["unembed"]
    packed = params.get("unembed_packed")
    rows = math.prod(hidden.shape[:-1])
    if packed is not None and (rows > 1 or w.dtype != jnp.float32):
        return kernels.linear(hidden.astype(jnp.float32), w, packed)
    return (hidden.astype(w.dtype) @ w).astype(jnp.float32)


# Up to this many gathered rows (a K bucket) the sparse head is bit-identical to the dense one; above it,
# the faster einsum agrees to ~1e-6 relative (log-probs within ~2e-5).
EXACT_SPARSE_MAX_K = 512


def sparse_logits(params, hidden, ids):
    """hidden: (B, d); ids: (B, K) int32 (padding may be any valid id) -> logits (B, K) f32.

    Gathers only the K unembedding rows that can be chosen: cost O(B*K*d) instead of O(B*V*d)."""
    rows = params["unembed_rows"][ids]  # (B, K, d)
    if "unembed_packed" in params and rows.dtype != jnp.float32:
        # bf16 rows where the dense head is the CPU kernel's (f32 activations, exactly widened weights): the same
        # products here, so that the two heads agree
        rows = rows.astype(jnp.float32)
    h = hidden.astype(rows.dtype)
    if ids.shape[1] <= EXACT_SPARSE_MAX_K:
        # A multiply + reduce over d: XLA:CPU sums each logit in the same order as the dense head's
        # matrix-vector product, so at batch 1 sparse and dense logits agree bit for bit (an einsum differs
        # by ~2e-5 at |logit| ~ 30). Measured: as fast as the einsum up to K ~ 1k, 5x slower at 8k.
        return jnp.sum((h[:, None, :] * rows).astype(jnp.float32), axis=-1)
    return jnp.einsum("bd,bkd->bk", h, rows).astype(jnp.float32)


# Jitted entry points. `cfg` is static (hashable); the cache is donated so it is updated in place.
forward_jit = jax.jit(forward, static_argnames=("cfg",), donate_argnames=("cache",))
dense_logits_jit = jax.jit(dense_logits)
sparse_logits_jit = jax.jit(sparse_logits)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, cache, tokens, positions, *, cfg: ModelConfig):
    """One decode step. tokens: (B,) int32; positions: (B,). Returns (hidden (B, d) f32, cache)."""
    hidden, cache = forward(params, cache, tokens[:, None], positions, cfg=cfg)
    return hidden[:, 0], cache
