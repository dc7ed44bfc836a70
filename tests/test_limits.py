"""benchmarks/limits.py's measuring pieces on tiny inputs (the full run is `make bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
limits = pytest.importorskip("limits")
sys.path.pop(0)

from llmqp.model import synthetic, transformer, weights  # noqa: E402


def _tiny():
    cfg = synthetic.shape_config("gemma-3-270m-like", vocab_size=64, hidden_size=48, n_layers=2, n_heads=6,
                                 n_kv_heads=2, head_dim=8, ffn_size=96)
    params = jax.tree_util.tree_map(jnp.asarray, weights.pack_params(cfg, synthetic.random_raw(cfg)))
    return cfg, params


def test_bandwidth_kernels_move_the_bytes_they_count():
    fns, nbytes = limits.bandwidth_variants(1)  # 1 MiB arrays
    assert set(fns) == {f"{k}_{t}t" for k in ("copy", "triad", "read") for t in (1, 2)}
    for name, fn in fns.items():
        fn()
        assert nbytes[name] in (2 * 2**20, 5 * 2**20)


def test_blas_chain_counts_the_trunk_matmul_params():
    cfg, params = _tiny()
    run, n = limits.blas_chain(cfg, 4, np.random.default_rng(0), threads=1)
    assert run().shape == (4, cfg.hidden_size) and np.isfinite(run()).all()
    assert n == sum(int(np.prod(params["layers"][i][k].shape)) for i in range(cfg.n_layers) for k in limits.MATMULS)


@pytest.mark.parametrize("decode,batch,t", [(False, 1, 4), (True, 2, 1)])
def test_trunk_call_runs_the_engine_entry_points(decode, batch, t):
    cfg, params = _tiny()
    run = limits.trunk_call(transformer, params, cfg, batch, t, 32, decode=decode)
    run()  # donated cache carried over calls
    run()


def test_trunk_call_with_xla_options_compiles_them():
    cfg, params = _tiny()
    run = limits.trunk_call(transformer, params, cfg, 1, 2, 32, decode=False,
                            options=limits.FLAG_VARIANTS["ynn_off"])
    run()


def test_trunk_bytes_counts_matmuls_and_norms_not_embeddings():
    cfg, params = _tiny()
    d, f = cfg.hidden_size, cfg.ffn_size
    per_layer = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + d * 2 * f + f * d + 2 * d
    assert limits.trunk_bytes(params) == 4 * (cfg.n_layers * per_layer + d)


def test_products_call_chains_every_packed_matrix_of_a_step():
    from llmqp import kernels

    _, params = _tiny()
    packed = kernels.with_packed_weights(params)
    if "packed" not in packed["layers"][0]:
        pytest.skip(f"the CPU kernel is not available: {kernels.status()['reason']}")
    out = np.asarray(limits.products_call(packed)())
    # every product's input is ones, so the chain ends with the column sums of the last layer's down matrix
    w_down = np.asarray(params["layers"][-1]["w_down"], np.float64)
    np.testing.assert_allclose(out[0], w_down.sum(axis=0), rtol=1e-5, atol=1e-5)
