"""The trunk's fast paths (issue 12): small-T attention and bf16 weights against their references, and the f32
path's outputs against the ones recorded before the change."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmqp.model import synthetic, transformer, weights

DATA = Path(__file__).parent / "data"


def _tiny_cfg():
    return synthetic.shape_config("gemma-3-270m-like", vocab_size=64, hidden_size=48, n_layers=2, n_heads=6,
                                  n_kv_heads=2, head_dim=8, ffn_size=96)


def _params(cfg, dtype=jnp.float32):
    packed = weights.pack_params(cfg, synthetic.random_raw(cfg))
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(a, jnp.float32 if str(getattr(path[-1], "key", "")).endswith("norm") else dtype),
        packed)


@pytest.mark.parametrize("batch,t", [(1, 1), (3, 1), (2, 2)])
def test_small_attention_matches_einsum_attention(batch, t):
    cfg = _tiny_cfg()
    rng = np.random.default_rng(batch * 10 + t)
    s = 16
    q = jnp.asarray(rng.standard_normal((batch, t, cfg.n_heads, cfg.head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, s, cfg.n_kv_heads, cfg.head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, s, cfg.n_kv_heads, cfg.head_dim)), jnp.float32)
    q_pos = jnp.asarray(rng.integers(0, s - t, (batch, 1)) + np.arange(t)[None, :], jnp.int32)
    want = transformer._attention(q, k, v, q_pos, cfg)
    groups = cfg.n_heads // cfg.n_kv_heads
    got = transformer._attention_small(q.reshape(batch, t, cfg.n_kv_heads, groups, cfg.head_dim), k, v, q_pos,
                                       cfg).reshape(want.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # keys past each query's position must not count: changing them leaves the output alone
    later = jnp.arange(s)[None, :, None, None] > q_pos[:, -1][:, None, None, None]
    k2, v2 = jnp.where(later, 100.0, k), jnp.where(later, -100.0, v)
    got2 = transformer._attention_small(q.reshape(batch, t, cfg.n_kv_heads, groups, cfg.head_dim), k2, v2, q_pos,
                                        cfg).reshape(want.shape)
    np.testing.assert_allclose(np.asarray(got2), np.asarray(got), rtol=1e-6, atol=1e-6)


def test_decode_steps_match_one_prefill_on_both_attention_paths():
    """Feeding tokens one at a time (small-T attention) gives the hidden states of one multi-token forward
    (einsum attention), row by row, at batch 2 with different starts."""
    cfg = _tiny_cfg()
    params = _params(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    full, _ = transformer.forward(params, transformer.init_cache(cfg, 2, 16), tokens, jnp.zeros(2, jnp.int32), cfg=cfg)
    cache = transformer.init_cache(cfg, 2, 16)
    steps = []
    for i in range(8):
        h, cache = transformer.decode_step(params, cache, tokens[:, i], jnp.full((2,), i, jnp.int32), cfg=cfg)
        steps.append(h)
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_bf16_linear_accumulates_in_f32(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 40)).astype(np.float32)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    w16 = jnp.asarray(w, jnp.bfloat16)
    got = np.asarray(transformer._linear(jnp.asarray(x)[None], w16))[0]
    assert got.dtype == np.float32 and got.shape == (rows, 24)
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    want = x16 @ np.asarray(w16.astype(jnp.float32), np.float64)  # bf16-rounded operands, exact sum
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # f32 weights: exactly the plain product, as before issue 12
    np.testing.assert_array_equal(np.asarray(transformer._linear(jnp.asarray(x), jnp.asarray(w))),
                                  np.asarray(jnp.asarray(x) @ jnp.asarray(w)))


@pytest.mark.slow
def test_f32_outputs_identical_to_before(engine):
    """Greedy token ids recorded with the trunk before issue 12's changes (commit 55cfa7f)."""
    golden = json.loads((DATA / "trunk_f32_golden.json").read_text())
    assert engine.dtype == "float32"
    for prompt, ids in golden["unconstrained"].items():
        assert engine.generate(prompt, max_tokens=24).token_ids == ids, prompt
    for prompt, ids in golden["json"].items():
        assert engine.generate(prompt, max_tokens=32, json_schema=golden["json_schema"]).token_ids == ids, prompt
    logits = engine.logits(golden["logits_ids"])
    assert logits.argmax(-1).tolist() == golden["logits_argmax"]


# The documented tolerance of the bf16-weight trunk against f32 (README, "The trunk at the machine's limits"),
# on the first 256 tokens of tests/data/paragraph.txt through the same f32 head.
BF16_MAX_LOGIT_ERROR = 0.5
BF16_MAX_PERPLEXITY_CHANGE = 0.01  # relative
BF16_MIN_TOP1_AGREEMENT = 0.97


@pytest.mark.slow
@pytest.mark.parametrize("path", ["xla", "cpu_kernel"])
def test_bf16_trunk_within_documented_tolerance(loaded_model, path):
    """Both bf16 trunks: XLA's dots, and the CPU kernel's (what `Engine(dtype="bfloat16")` runs on the CPU)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    try:
        from limits import format_accuracy
    finally:
        sys.path.pop(0)
    from llmqp import kernels
    from llmqp.engine import device_params

    params16 = device_params(loaded_model.params, "bfloat16")
    if path == "cpu_kernel":
        params16 = kernels.with_packed_weights(params16)
        if "packed" not in params16["layers"][0]:
            pytest.skip(f"CPU kernel unavailable: {kernels.status()['reason']}")
    acc = format_accuracy(loaded_model.config, device_params(loaded_model.params, "float32"), params16,
                          loaded_model.tokenizer)
    assert 0 < acc["max_abs_logit_error"] < BF16_MAX_LOGIT_ERROR
    assert abs(acc["perplexity_bfloat16"] / acc["perplexity_float32"] - 1) < BF16_MAX_PERPLEXITY_CHANGE
    assert acc["top1_agreement"] >= BF16_MIN_TOP1_AGREEMENT
    assert math.isfinite(acc["perplexity_float32"])


def test_multi_token_weights_are_used_only_for_multi_token_chunks():
    cfg = _tiny_cfg()
    params = _params(cfg)
    mixed = transformer.with_multi_token_weights(params)
    bf16 = dict(params, layers=[dict(l, **mixed["layers"][i]["multi_token"]) for i, l in enumerate(params["layers"])])
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 4)), jnp.int32)
    start = jnp.asarray([0, 3], jnp.int32)

    def run(p, toks):
        return np.asarray(transformer.forward(p, transformer.init_cache(cfg, 2, 16), toks, start, cfg=cfg)[0])
    np.testing.assert_array_equal(run(mixed, tokens[:, :1]), run(params, tokens[:, :1]))  # one token: f32
    np.testing.assert_array_equal(run(mixed, tokens), run(bf16, tokens))  # a chunk: the bf16 copy
    assert not np.array_equal(run(mixed, tokens), run(params, tokens))
