"""The CPU trunk kernel (llmqp.kernels): its products against numpy, the row-order contract (a row's result
does not depend on how many rows are computed with it), its use by both trunks, and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@needs_kernel
@pytest.mark.parametrize("lead,k,n", [((1,), 40, 24), ((3,), 576, 960), ((5,), 64, 130), ((16,), 33, 64),
                                      ((64,), 48, 200), ((2, 3), 70, 65), ((1, 1), 576, 3072)])
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


def test_matmul_rejects_a_column_count_the_panels_cannot_hold():
    p = jnp.zeros((2, 8, 64), jnp.float32)
    with pytest.raises(ValueError, match="cannot give"):
        kernels.matmul(jnp.zeros((1, 8), jnp.float32), p, 129)
    with pytest.raises(ValueError, match="cannot give"):
        kernels.matmul(jnp.zeros((1, 8), jnp.float32), p, 64)


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

    hlo = jax.jit(run).lower(fast).as_text()
    assert kernels.TARGET in hlo and kernels.TARGET not in jax.jit(run).lower(plain).as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(run)(fast)), np.asarray(jax.jit(run)(plain)), rtol=2e-5,
                               atol=2e-5)


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
    on = kernels.available() and jax.default_backend() == "cpu" and engine.dtype == "float32"
    assert all(("packed" in layer) == on for layer in engine.params["layers"])


@pytest.mark.slow
def test_info_says_which_trunk_matmuls_run(capsys):
    from llmqp.cli import main

    assert main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("trunk matmuls"))
    on = kernels.available() and jax.default_backend() == "cpu"
    assert ("CPU kernel" in line) == on and ("XLA's dot" in line)
