"""The Gemma 3 decoder (architecture ``gemma3``) as pure functions over the params pytree.

Same contract as `llmqp.model.transformer.forward` (which dispatches here when ``cfg.arch == "gemma3"``):
the trunk returns final-normed hidden states, the LM head stays outside. What differs from Llama:

- the embedding rows are scaled by sqrt(d), in the embedding dtype (as Hugging Face does);
- RMSNorm multiplies by the stored weight, which already holds Gemma's ``1 + w`` (the GGUF converter
  bakes the 1 in; the Hugging Face loader adds it);
- q and k are RMS-normed per head before RoPE; attention and MLP outputs are RMS-normed again before
  their residual add ("post" norms);
- the MLP is GeGLU with the tanh-approximated GELU;
- scores are scaled by ``query_pre_attn_scalar ** -0.5`` and optionally soft-capped;
- layers in ``cfg.local_layers`` see only the last ``cfg.sliding_window`` positions and use RoPE base
  ``cfg.rope_local_theta``; the other (global) layers see every earlier position with ``cfg.rope_theta``.

Extra params per layer (beside the Llama ones): ``q_norm (hd,)``, ``k_norm (hd,)``,
``post_attn_norm (d,)``, ``post_ffn_norm (d,)``. The KV cache keeps its full length for every layer;
a local layer reads only a window of it: queries go in blocks of `LOCAL_QUERY_BLOCK`, each block
attending to its own ``block + window - 1`` keys, so a long chunk costs memory linear in its length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import kernels
from llmqp.model import exact
from llmqp.model.config import ModelConfig

# Queries per block in a local (sliding-window) layer: scores take B x H x block x (block + window - 1).
LOCAL_QUERY_BLOCK = 256


def _rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(exact.mean_square(x32) + eps)  # row-count independent (exact.py)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def _rope(x, positions, theta: float):
    """Rotate-half RoPE. x: (B, T, heads, hd); positions: (B, T)."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # float64, then rounded once
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (B, T, hd/2)
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x0, x1 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).astype(x.dtype)


def _scores(q, k, cfg: ModelConfig):
    # q: (..., T, KV, G, hd); k: (..., S, KV, hd) -> (..., KV, G, T, S) f32, scaled and soft-capped.
    s = jnp.einsum("...tkgh,...skh->...kgts", q, k, preferred_element_type=jnp.float32) * cfg.attn_scale
    if cfg.attn_softcap > 0:
        s = cfg.attn_softcap * jnp.tanh(s / cfg.attn_softcap)
    return s


def _global_attention(q, k_all, v_all, q_pos, cfg: ModelConfig):
    # q: (B, T, H, hd); k_all, v_all: (B, S, KV, hd); q_pos: (B, T) -> (B, T, H * hd).
    b, t = q.shape[:2]
    groups = cfg.n_heads // cfg.n_kv_heads
    q = q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim)
    scores = _scores(q, k_all, cfg)  # (B, KV, G, T, S)
    visible = jnp.arange(k_all.shape[1])[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_all).reshape(b, t, cfg.q_size)


def _local_attention(q, k_all, v_all, q_pos, start, cfg: ModelConfig):
    """Sliding-window attention: query p sees keys p - window < key <= p. Shapes as `_global_attention`.

    Queries are cut into blocks of at most LOCAL_QUERY_BLOCK; block j (first position s_j) reads the
    L = block + window - 1 cache rows from s_j - window + 1 on (shifted to stay inside the cache), so
    scores are B x H x T x L whatever the cache length S."""
    b, t = q.shape[:2]
    s_len = k_all.shape[1]
    window = cfg.sliding_window
    block = min(t, LOCAL_QUERY_BLOCK)
    n_blocks = -(-t // block)
    pad = n_blocks * block - t
    groups = cfg.n_heads // cfg.n_kv_heads
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(b, n_blocks, block, cfg.n_kv_heads, groups, cfg.head_dim)
    q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), mode="edge").reshape(b, n_blocks, block)
    span = min(s_len, block + window - 1)
    block_first = start[:, None] + jnp.arange(n_blocks, dtype=start.dtype)[None, :] * block  # (B, nb)
    key_first = jnp.clip(block_first - (window - 1), 0, s_len - span)  # (B, nb)

    def take(cache_row, firsts):  # (S, KV, hd), (nb,) -> (nb, span, KV, hd)
        return jax.vmap(lambda f: jax.lax.dynamic_slice_in_dim(cache_row, f, span, axis=0))(firsts)

    k_win = jax.vmap(take)(k_all, key_first)  # (B, nb, span, KV, hd)
    v_win = jax.vmap(take)(v_all, key_first)
    key_pos = key_first[..., None] + jnp.arange(span, dtype=start.dtype)  # (B, nb, span)
    delta = q_pos[..., :, None] - key_pos[..., None, :]  # (B, nb, block, span)
    visible = (delta >= 0) & (delta < window)
    scores = _scores(q, k_win, cfg)  # (B, nb, KV, G, block, span)
    scores = jnp.where(visible[:, :, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
    out = jnp.einsum("bnkgts,bnskh->bntkgh", probs, v_win)  # (B, nb, block, KV, G, hd)
    return out.reshape(b, n_blocks * block, cfg.q_size)[:, :t]


def _write_rows(cache_layer, new, start):
    # cache_layer: (B, S, KV, hd); new: (B, T, KV, hd); start: (B,) — each row writes at its own offset.
    return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (s, 0, 0)))(cache_layer, new, start)


def forward(params, cache, tokens, start, *, cfg: ModelConfig):
    """`llmqp.model.transformer.forward` for ``cfg.arch == "gemma3"``: (hidden (B, T, d) f32, cache)."""
    dtype = params["embed"].dtype
    eps = cfg.rms_eps
    scale = jnp.asarray(math.sqrt(cfg.hidden_size), dtype)  # rounded to the embedding dtype, as HF does
    x = (params["embed"][tokens] * scale).astype(jnp.float32)  # (B, T, d)
    b, t = tokens.shape
    q_pos = start[:, None] + jnp.arange(t, dtype=start.dtype)[None, :]  # (B, T)
    local = frozenset(cfg.local_layers)
    new_k, new_v = [], []
    for i, layer in enumerate(params["layers"]):
        h = _rms_norm(x, layer["attn_norm"], eps).astype(dtype)
        packed = layer.get("packed", {})
        qkv = kernels.linear(h, layer["w_qkv"], packed.get("w_qkv"))
        q = qkv[..., : cfg.q_size].reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = qkv[..., cfg.q_size : cfg.q_size + cfg.kv_size].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = qkv[..., cfg.q_size + cfg.kv_size :].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        theta = cfg.rope_local_theta if i in local else cfg.rope_theta
        q = _rope(_rms_norm(q, layer["q_norm"], eps), q_pos, theta)
        k = _rope(_rms_norm(k, layer["k_norm"], eps), q_pos, theta)
        k_all = _write_rows(cache["k"][i], k.astype(cache["k"][i].dtype), start)
        v_all = _write_rows(cache["v"][i], v.astype(cache["v"][i].dtype), start)
        new_k.append(k_all)
        new_v.append(v_all)
        if kernels.attends(packed, q, k_all):
            attn = kernels.attention(q, k_all, v_all, q_pos, scale=cfg.attn_scale, softcap=cfg.attn_softcap,
                                     window=cfg.sliding_window if i in local else 0).reshape(b, t, cfg.q_size)
        elif i in local:
            attn = _local_attention(q, k_all, v_all, q_pos, start, cfg)
        else:
            attn = _global_attention(q, k_all, v_all, q_pos, cfg)
        attn_out = kernels.linear(attn.astype(dtype), layer["w_o"], packed.get("w_o"))
        x = x + _rms_norm(attn_out.astype(jnp.float32), layer["post_attn_norm"], eps)
        h = _rms_norm(x, layer["ffn_norm"], eps).astype(dtype)
        gate_up = kernels.linear(h, layer["w_gate_up"], packed.get("w_gate_up"))
        gate, up = gate_up[..., : cfg.ffn_size], gate_up[..., cfg.ffn_size :]
        mlp_out = kernels.linear(jax.nn.gelu(gate, approximate=True) * up, layer["w_down"], packed.get("w_down"))
        x = x + _rms_norm(mlp_out.astype(jnp.float32), layer["post_ffn_norm"], eps)
    hidden = _rms_norm(x, params["final_norm"], eps)
    return hidden, {"k": new_k, "v": new_v}
