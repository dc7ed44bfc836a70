"""The CPU trunk kernels (llmqp.kernels): products and attention against numpy, the order contracts (a row's or
a query's result does not depend on what is computed with it), their use by both trunks, and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmqp
from llmqp import kernels
from llmqp.model import synthetic, transformer, weights

needs_kernel = pytest.mark.skipif(not kernels.available() or jax.default_backend() != "cpu",
                                  reason=f"CPU kernel unavailable: {kernels.status()['reason']}")


def test_pack_layout():
    w = np.arange(5 * 130, dtype=np.float32).reshape(5, 130)
    p = kernels.pack(w)
    assert p.shape == (3, 5, 64) and p.dtype == np.float32
    for k in range(5):
        for n in range(130):
            assert p[n // 64, k, n % 64] == w[k, n]
    assert not p[2, :, 130 - 128:].any()  # zero past N


def test_huge_page_buffers_lie_end_to_end_aligned_and_apart():
    shapes = [(3, 5, 64), (1, 7, 64), (2, 2, 64)]
    bufs = kernels.huge_page_buffers(shapes)
    assert [b.shape for b in bufs] == shapes and all(b.dtype == np.float32 and b.flags.c_contiguous for b in bufs)
    assert bufs[0].ctypes.data % kernels.HUGE_PAGE == 0 and all(b.ctypes.data % 64 == 0 for b in bufs)
    for i, b in enumerate(bufs):
        b[...] = i
    assert [float(b.min()) for b in bufs] == [0.0, 1.0, 2.0] and [float(b.max()) for b in bufs] == [0.0, 1.0, 2.0]
    w = np.random.default_rng(0).standard_normal((7, 70)).astype(np.float32)
    into = kernels.huge_page_buffers([(2, 7, 64)])[0]
    np.testing.assert_array_equal(kernels.pack(w, into), kernels.pack(w))
    # on the device without a copy, and uncommitted like jnp.asarray (a committed array lowers to another
    # program: every compile would miss the persistent cache)
    dev = kernels.pack_device(w)
    assert not dev.committed and dev.unsafe_buffer_pointer() % kernels.HUGE_PAGE == 0
    np.testing.assert_array_equal(np.asarray(dev), kernels.pack(w))


@needs_kernel
@pytest.mark.parametrize("lead,k,n", [((1,), 40, 24), ((3,), 576, 960), ((5,), 64, 130), ((16,), 33, 64),
                                      ((64,), 48, 200), ((2, 3), 70, 65), ((1, 1), 576, 3072),
                                      ((130,), 70, 65)])
def test_matmul_matches_numpy(lead, k, n):
    rng = np.random.default_rng(k * n)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(lambda a, p: kernels.matmul(a, p, n))(jnp.asarray(x), jnp.asarray(kernels.pack(w))))
    assert got.shape == (*lead, n) and got.dtype == np.float32
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@needs_kernel
def test_rows_bit_identical_whatever_the_number_of_rows():
    """The contract forced runs and draft verification rely on: row r of a product of M rows equals the same
    row computed alone (or in any other group), bit for bit."""
    rng = np.random.default_rng(0)
    k, n = 576, 960
    x = jnp.asarray(rng.standard_normal((13, k)).astype(np.float32))
    p = jnp.asarray(kernels.pack(rng.standard_normal((k, n)).astype(np.float32)))
    mm = jax.jit(lambda a: kernels.matmul(a, p, n))
    together = np.asarray(mm(x))
    alone = np.concatenate([np.asarray(mm(x[i:i + 1])) for i in range(13)])
    in_threes = np.concatenate([np.asarray(mm(x[i:i + 3])) for i in range(0, 13, 3)])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, in_threes)
    many = jnp.asarray(rng.standard_normal((70, k)).astype(np.float32)).at[:13].set(x)  # past the 64 rows of a pass
    np.testing.assert_array_equal(np.asarray(mm(many))[:13], together)


def test_matmul_rejects_a_column_count_the_panels_cannot_hold():
    p = jnp.zeros((2, 8, 64), jnp.float32)
    with pytest.raises(ValueError, match="cannot give"):
        kernels.matmul(jnp.zeros((1, 8), jnp.float32), p, 129)
    with pytest.raises(ValueError, match="cannot give"):
        kernels.matmul(jnp.zeros((1, 8), jnp.float32), p, 64)


def _attention_reference(q, k, v, pos, scale, softcap, window):
    """float64, query by query, over the visible keys only."""
    b_n, t_n, h_n, _ = q.shape
    s_n, kv_n = k.shape[1:3]
    groups = h_n // kv_n
    out = np.zeros(q.shape, np.float64)
    for b in range(b_n):
        for t in range(t_n):
            p = int(pos[b, t])
            lo, hi = (max(0, p - window + 1) if window else 0), min(p, s_n - 1)
            for h in range(h_n):
                keys = k[b, lo:hi + 1, h // groups].astype(np.float64)
                scores = keys @ q[b, t, h].astype(np.float64) * scale
                if softcap:
                    scores = softcap * np.tanh(scores / softcap)
                e = np.exp(scores - scores.max())
                out[b, t, h] = (e / e.sum()) @ v[b, lo:hi + 1, h // groups].astype(np.float64)
    return out


ATTENTION_CASES = [  # B, T, H, KV, hd, S, scale, softcap, window
    (1, 1, 9, 3, 64, 512, 0.125, 0.0, 0),     # SmolLM2 decode
    (8, 1, 9, 3, 64, 100, 0.125, 0.0, 0),     # a scheduler batch
    (2, 5, 4, 2, 16, 40, 0.25, 0.0, 0),
    (3, 4, 6, 2, 8, 30, 0.3, 5.0, 7),         # soft-capped, sliding window
    (1, 8, 4, 1, 256, 300, 0.0625, 0.0, 64),  # Gemma 3 270M's heads, a local layer
    (2, 3, 4, 2, 20, 17, 0.2, 0.0, 0),        # hd not a multiple of 16; positions past the cache
]


@needs_kernel
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}T{}H{}KV{}hd{}S{}".format(*c[:6]))
def test_attention_matches_numpy(case):
    b, t, h, kv, hd, s, scale, softcap, window = case
    rng = np.random.default_rng(hd * s + t)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, t, h, hd), (b, s, kv, hd),
                                                                             (b, s, kv, hd)))
    pos = rng.integers(0, s + 3, (b, t)).astype(np.int32)
    got = np.asarray(jax.jit(lambda *a: kernels.attention(*a, scale=scale, softcap=softcap, window=window))(
        q, k, v, pos))
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, _attention_reference(q, k, v, pos, scale, softcap, window), rtol=0,
                               atol=2e-6)


@needs_kernel
def test_attention_of_a_query_does_not_depend_on_batch_chunk_or_cache_length():
    """Bit for bit: a query's output computed in a batch of rows and a chunk of positions equals it computed
    alone, over a cache cut just past its position (the contract drafts, forced runs and the scheduler rely on)."""
    rng = np.random.default_rng(3)
    b, t, h, kv, hd, s = 3, 6, 9, 3, 64, 80
    q = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kv, hd)).astype(np.float32) for _ in range(2))
    pos = (rng.integers(10, 60, (b, 1)) + np.arange(t)).astype(np.int32)
    att = jax.jit(lambda *a: kernels.attention(*a, scale=0.125))
    together = np.asarray(att(q, k, v, pos))
    for row in range(b):
        for i in range(t):
            end = int(pos[row, i]) + 1
            alone = np.asarray(att(q[row:row + 1, i:i + 1], k[row:row + 1, :end], v[row:row + 1, :end],
                                   pos[row:row + 1, i:i + 1]))
            np.testing.assert_array_equal(alone[0, 0], together[row, i])


def test_attention_rejects_heads_that_do_not_share_evenly():
    with pytest.raises(ValueError, match="cannot share"):
        kernels.attention(jnp.zeros((1, 1, 5, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)),
                          jnp.zeros((1, 1), jnp.int32), scale=1.0)


def _llama_cfg():
    return synthetic.shape_config("qwen2.5-0.5b-like", vocab_size=96, hidden_size=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, head_dim=16, ffn_size=160, qkv_bias=False)


def _gemma_cfg():
    return synthetic.shape_config("gemma-3-270m-like", vocab_size=64, hidden_size=48, n_layers=2, n_heads=6,
                                  n_kv_heads=2, head_dim=8, ffn_size=96)


@needs_kernel
@pytest.mark.parametrize("make_cfg", [_llama_cfg, _gemma_cfg], ids=["llama", "gemma3"])
def test_trunk_uses_the_kernel_and_agrees_with_xla(make_cfg):
    cfg = make_cfg()
    raw = weights.pack_params(cfg, synthetic.random_raw(cfg))
    plain = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), raw)
    fast = kernels.with_packed_weights(plain, raw["layers"])
    assert all("packed" in layer for layer in fast["layers"])
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    start = jnp.asarray([0, 3], jnp.int32)

    def run(params):
        return transformer.forward(params, transformer.init_cache(cfg, 2, 16), tokens, start, cfg=cfg)[0]

    hlo, plain_hlo = jax.jit(run).lower(fast).as_text(), jax.jit(run).lower(plain).as_text()
    assert kernels.TARGET in hlo and kernels.TARGET not in plain_hlo
    assert kernels.ATTENTION_TARGET in hlo and kernels.ATTENTION_TARGET not in plain_hlo
    np.testing.assert_allclose(np.asarray(jax.jit(run)(fast)), np.asarray(jax.jit(run)(plain)), rtol=2e-5,
                               atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("make_cfg", [_llama_cfg, _gemma_cfg], ids=["llama", "gemma3"])
def test_prefill_through_the_kernels_does_not_depend_on_the_chunking(make_cfg):
    """A prompt prefilled in chunks of up to ATTENTION_MAX_T positions (the engine's prefill chunk with the
    kernels) gives every position the same hidden state and keys/values, bit for bit, however it is cut."""
    cfg = make_cfg()
    raw = weights.pack_params(cfg, synthetic.random_raw(cfg))
    params = kernels.with_packed_weights(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), raw),
                                         raw["layers"])
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 80).astype(np.int32)

    def prefill(cuts):
        cache, hidden = transformer.init_cache(cfg, 1, 128), []
        for a, b in zip(cuts, cuts[1:]):
            h, cache = transformer.forward_jit(params, cache, jnp.asarray(ids[None, a:b]), jnp.asarray([a], jnp.int32),
                                               cfg=cfg)
            hidden.append(np.asarray(h[0]))
        return np.concatenate(hidden), [np.asarray(c)[:, :80] for c in cache["k"] + cache["v"]]

    h64, kv64 = prefill([0, 64, 80])
    for cuts in ([0, 16, 32, 48, 64, 80], [0, 7, 40, 41, 80], [0, 1, 2, 66, 80]):
        h, kv = prefill(cuts)
        assert np.array_equal(h, h64) and all(np.array_equal(a, b) for a, b in zip(kv, kv64)), cuts


@needs_kernel
def test_forward_over_one_row_caches_equals_each_row_alone():
    """The scheduler's grouped prefill: a forward over a tuple of one-row caches (each row at its own start)
    gives every row the hidden states and keys/values of its own forward, bit for bit, and leaves the other
    positions of each cache as they were."""
    cfg = _llama_cfg()
    raw = weights.pack_params(cfg, synthetic.random_raw(cfg))
    params = kernels.with_packed_weights(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), raw),
                                         raw["layers"])
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (3, 8)).astype(np.int32)
    starts = np.asarray([0, 5, 16], np.int32)

    def filled(seed):  # a one-row cache whose positions already hold values (a prefix written earlier)
        c = transformer.init_cache(cfg, 1, 32)
        vals = np.random.default_rng(seed).standard_normal(c["k"][0].shape).astype(np.float32)
        return jax.tree_util.tree_map(lambda a: jnp.asarray(vals), c)

    alone = [transformer.forward_jit(params, filled(r), jnp.asarray(tokens[r : r + 1]),
                                     jnp.asarray(starts[r : r + 1]), cfg=cfg) for r in range(3)]
    hidden, caches = transformer.forward_jit(params, tuple(filled(r) for r in range(3)), jnp.asarray(tokens),
                                             jnp.asarray(starts), cfg=cfg)
    assert isinstance(caches, tuple) and len(caches) == 3
    for r, (h, c) in enumerate(alone):
        assert np.array_equal(np.asarray(hidden[r]), np.asarray(h[0]))
        for name in ("k", "v"):
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(caches[r][name], c[name]))


@needs_kernel
def test_dense_head_through_the_kernel_gives_every_row_its_one_row_logits():
    """The dense LM head of 2-64 rows (draft windows, scheduler batches) goes through the kernel when the head
    carries `unembed_packed`: each row's logits equal that row's alone (one row: XLA's dot), bit for bit, and
    XLA's product of all rows to float accuracy."""
    rng = np.random.default_rng(5)
    d, v = 96, 1000
    unembed = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
    head = {"unembed": unembed, "unembed_packed": kernels.pack_device(unembed)}
    hidden = jnp.asarray(rng.standard_normal((8, d)).astype(np.float32))
    dense = jax.jit(transformer.dense_logits)
    assert kernels.TARGET in jax.jit(transformer.dense_logits).lower(head, hidden).as_text()
    together = np.asarray(dense(head, hidden))
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(dense(head, hidden[i:i + 1]))[0], together[i])
    np.testing.assert_allclose(together, np.asarray(dense({"unembed": unembed}, hidden)), rtol=1e-5, atol=1e-4)


def _bf16(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.bfloat16))


def test_pack_keeps_bf16_weights_in_the_same_layout():
    w = _bf16(np.random.default_rng(0).standard_normal((5, 130)))
    p = kernels.pack(w)
    assert p.shape == (3, 5, 64) and p.dtype == w.dtype
    np.testing.assert_array_equal(p.view(np.uint16), kernels.pack(w.astype(np.float32)).astype(w.dtype).view(np.uint16))
    bufs = kernels.huge_page_buffers([(3, 5, 64), (1, 7, 64), (2, 3, 64)], w.dtype)
    assert all(b.dtype == w.dtype for b in bufs)
    assert bufs[0].ctypes.data % kernels.HUGE_PAGE == 0 and all(b.ctypes.data % 64 == 0 for b in bufs)
    dev = kernels.pack_device(w)
    assert dev.dtype == jnp.bfloat16 and not dev.committed
    np.testing.assert_array_equal(np.asarray(dev).view(np.uint16), p.view(np.uint16))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 64])
def test_bf16_matmul_is_the_f32_kernel_on_exactly_widened_weights(rows):
    """bf16 weights are widened exactly and summed like f32 ones: the same bits as the f32 kernel on the
    widened matrix, whatever the number of rows (the contract draft verification relies on holds too)."""
    rng = np.random.default_rng(rows)
    k, n = 200, 130
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    w16 = _bf16(rng.standard_normal((k, n)))
    mm = jax.jit(lambda a, p: kernels.matmul(a, p, n))
    assert kernels.BF16_TARGET in mm.lower(x, jnp.asarray(kernels.pack(w16))).as_text()
    got = np.asarray(mm(x, jnp.asarray(kernels.pack(w16))))
    np.testing.assert_array_equal(got, np.asarray(mm(x, jnp.asarray(kernels.pack(w16.astype(np.float32))))))
    alone = np.concatenate([np.asarray(mm(x[i:i + 1], jnp.asarray(kernels.pack(w16)))) for i in range(rows)])
    np.testing.assert_array_equal(got, alone)
    want = np.asarray(x, np.float64) @ w16.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_mixed_weight_dtypes_are_not_packed():
    p = {"layers": [{"w_qkv": jnp.zeros((2, 2)), "w_o": jnp.zeros((2, 2), jnp.bfloat16),
                     "w_gate_up": jnp.zeros((2, 2)), "w_down": jnp.zeros((2, 2))}]}
    assert kernels.with_packed_weights(p) is p


def _two_row_forward(cfg, seed: int):
    """The jitted forward of 2 rows x 6 random tokens (starting at positions 0 and 3) on a fresh cache of the
    params' cache dtype: params -> (hidden, cache)."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    start = jnp.asarray([0, 3], jnp.int32)

    def run(params):
        cache = transformer.init_cache(cfg, 2, 16, transformer.cache_dtype(params))
        return transformer.forward(params, cache, tokens, start, cfg=cfg)
    return jax.jit(run)


@needs_kernel
def test_bf16_llama_trunk_is_the_f32_trunk_on_widened_weights():
    """`Engine(dtype="bfloat16")` on the CPU: the trunk's products take the bf16 panels (half the bytes a step
    reads), activations stay f32 and the cache is f32, so it computes exactly what the f32 trunk computes on
    the bf16-rounded weights."""
    from llmqp.engine import device_params

    cfg = _llama_cfg()
    raw = weights.pack_params(cfg, synthetic.random_raw(cfg))
    p16 = kernels.with_packed_weights(device_params(raw, "bfloat16"))
    assert all(layer["packed"][k].dtype == jnp.bfloat16 for layer in p16["layers"] for k in kernels.MATMULS)
    assert transformer.cache_dtype(p16) == jnp.float32
    widened = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                     {k: v for k, v in p16.items() if k != "layers"})
    widened["layers"] = [{k: jnp.asarray(v, jnp.float32) for k, v in layer.items() if k != "packed"}
                         for layer in p16["layers"]]
    p32 = kernels.with_packed_weights(widened)
    run = _two_row_forward(cfg, 4)
    hlo = run.lower(p16).as_text()
    assert kernels.BF16_TARGET in hlo and kernels.ATTENTION_TARGET in hlo
    (h16, c16), (h32, c32) = run(p16), run(p32)
    np.testing.assert_array_equal(np.asarray(h16), np.asarray(h32))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(c16), jax.tree_util.tree_leaves(c32)))


@needs_kernel
def test_bf16_gemma_trunk_uses_the_kernel_and_agrees_with_xla():
    from llmqp.engine import device_params

    cfg = _gemma_cfg()
    raw = weights.pack_params(cfg, synthetic.random_raw(cfg))
    plain = device_params(raw, "bfloat16")
    fast = kernels.with_packed_weights(plain)
    run = _two_row_forward(cfg, 1)
    assert kernels.BF16_TARGET in run.lower(fast).as_text()
    np.testing.assert_allclose(np.asarray(run(fast)[0]), np.asarray(run(plain)[0]), rtol=0.05, atol=0.05)


@needs_kernel
def test_bf16_dense_head_through_the_kernel_agrees_with_sparse_and_with_each_row_alone():
    """bf16 heads go through the kernel at every row count (XLA:CPU widens the whole bf16 matrix for one row);
    the sparse head then widens its gathered rows, so the two give the same logits, bit for bit."""
    rng = np.random.default_rng(6)
    d, v = 96, 1000
    unembed = jnp.asarray(rng.standard_normal((d, v)), jnp.bfloat16)
    head = {"unembed": unembed, "unembed_rows": unembed.T, "unembed_packed": kernels.pack_device(unembed)}
    hidden = jnp.asarray(rng.standard_normal((8, d)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, v, (8, 64)), jnp.int32)  # a K bucket, as the engine pads to (XLA's reduce
    # over other widths may sum in another order, for f32 heads too)
    dense, sparse = jax.jit(transformer.dense_logits), jax.jit(transformer.sparse_logits)
    assert kernels.BF16_TARGET in dense.lower(head, hidden[:1]).as_text()
    together = np.asarray(dense(head, hidden))
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(dense(head, hidden[i:i + 1]))[0], together[i])
        np.testing.assert_array_equal(np.asarray(sparse(head, hidden[i:i + 1], ids[i:i + 1]))[0],
                                      together[i][np.asarray(ids[i])])
    np.testing.assert_array_equal(np.asarray(sparse(head, hidden, ids)),
                                  np.take_along_axis(together, np.asarray(ids), 1))
    want = np.asarray(hidden, np.float64) @ np.asarray(unembed.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(together, want, rtol=1e-4, atol=1e-3)


def test_disabled_by_environment_falls_back_with_a_reason():
    code = ("from llmqp import kernels; import jax.numpy as jnp; s = kernels.status(); "
            "p = {'layers': [{'w_qkv': jnp.zeros((2, 2))}]}; "
            "print(s['available'], s['reason'], kernels.with_packed_weights(p) is p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LLMQP_CPU_KERNELS="0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False disabled by LLMQP_CPU_KERNELS=0 True"


@pytest.mark.slow
def test_engine_trunk_carries_packed_weights_where_the_kernel_is_built(engine):
    on = kernels.available() and jax.default_backend() == "cpu"
    assert all(("packed" in layer) == on for layer in engine.params["layers"])
    # ... and then prefills in chunks the kernels take (else the spec's default)
    assert engine.spec.prefill_chunk == (kernels.ATTENTION_MAX_T if on else llmqp.DecodeSpec().prefill_chunk)


@pytest.mark.slow
def test_info_says_which_trunk_matmuls_run(capsys):
    from llmqp.cli import main

    assert main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("trunk matmuls"))
    on = kernels.available() and jax.default_backend() == "cpu"
    assert ("CPU kernel" in line) == on and ("XLA's dot" in line)


@pytest.mark.slow
@needs_kernel
def test_bf16_engine_runs_the_kernels_and_keeps_its_equalities():
    """`Engine(dtype="bfloat16")` on the CPU: bf16 panels in the trunk and the head, an f32 cache, and on the
    real model the equalities that depend on the heads: dense and sparse choose the same tokens, and the fused
    loop gives the host loop's. (A batch row equals the row alone because every product and attention of a row
    does not depend on the others: the bf16 kernel tests above, as for f32; a second engine's batch programs
    would cost the suite ~20 s more.)"""
    import json

    bf16 = llmqp.Engine(dtype="bfloat16")
    assert bf16.trunk_kernel and bf16.head["unembed_packed"].dtype == jnp.bfloat16
    assert all(layer["packed"][k].dtype == jnp.bfloat16 for layer in bf16.params["layers"] for k in kernels.MATMULS)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    req = dict(prompt="Describe a person as JSON.", json_schema=schema, max_tokens=40, forced=False)
    dense, sparse = bf16.generate(**req, plan="dense"), bf16.generate(**req, plan="sparse")
    assert dense.token_ids == sparse.token_ids and dense.finish_reason == "stop"
    assert set(json.loads(dense.text)) == {"name", "age"}
    # the fused on-device loop scores like the host loop (one sampled run: each setting compiles its own loop)
    kw = dict(regex=r"[a-z]{3,12}( [a-z]{3,12}){0,3}", max_tokens=16, temperature=1.0, seed=4)
    fused, host = bf16.generate("Name a few birds.", compiled=True, **kw), bf16.generate("Name a few birds.", **kw)
    assert fused.compiled and fused.token_ids == host.token_ids
    # same heads (without the packed unembedding the loop's log-probs were up to 0.015 off the host's)
    assert np.max(np.abs(np.subtract(fused.logprobs, host.logprobs))) <= 1e-4
