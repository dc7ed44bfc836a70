"""Random-weight models of real shapes, for benchmarks and tests (no checkpoint needed).

The weights are scaled so activations stay O(1) through the layers; the outputs are meaningless but the
compute and memory traffic are exactly those of the real architecture."""

from __future__ import annotations

import numpy as np

from llmqp.model.config import ModelConfig, RopeStyle

# Shapes from the issues; plain Llama blocks (no Gemma-specific norms/soft-capping): same cost profile.
SHAPES = {
    "qwen2.5-0.5b-like": dict(vocab_size=151936, hidden_size=896, n_layers=24, n_heads=14, n_kv_heads=2,
                              head_dim=64, ffn_size=4864, rope_theta=1e6, qkv_bias=True, arch="qwen2"),
    "gemma-3-270m-like": dict(vocab_size=262144, hidden_size=640, n_layers=18, n_heads=4, n_kv_heads=1,
                              head_dim=256, ffn_size=2048, rope_theta=1e4, arch="llama"),
}


def shape_config(name: str, **overrides) -> ModelConfig:
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    kw = dict(SHAPES[name], name=name, rms_eps=1e-6, rope_style=RopeStyle.ROTATE_HALF, tie_embeddings=True)
    kw.update(overrides)
    return ModelConfig(**kw)


def random_raw(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Raw ([out, in]) tensors with the keys `llmqp.model.weights.pack_params` expects."""
    rng = np.random.default_rng(seed)

    def w(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim), dtype=np.float32) * np.float32(1 / np.sqrt(in_dim))

    d = cfg.hidden_size
    raw = {"embed": rng.standard_normal((cfg.vocab_size, d), dtype=np.float32),
           "final_norm": np.ones(d, np.float32)}
    if not cfg.tie_embeddings:
        raw["output"] = w(cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        raw.update({p + "attn_norm": np.ones(d, np.float32), p + "ffn_norm": np.ones(d, np.float32),
                    p + "wq": w(cfg.q_size, d), p + "wk": w(cfg.kv_size, d), p + "wv": w(cfg.kv_size, d),
                    p + "wo": w(d, cfg.q_size), p + "w_gate": w(cfg.ffn_size, d), p + "w_up": w(cfg.ffn_size, d),
                    p + "w_down": w(d, cfg.ffn_size)})
        if cfg.qkv_bias:
            raw.update({p + "bq": 0.02 * rng.standard_normal(cfg.q_size, dtype=np.float32),
                        p + "bk": 0.02 * rng.standard_normal(cfg.kv_size, dtype=np.float32),
                        p + "bv": 0.02 * rng.standard_normal(cfg.kv_size, dtype=np.float32)})
    return raw
