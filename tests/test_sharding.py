"""`llmqp.sharding`: the vocabulary split over simulated CPU devices gives the tokens and logits of one device.

Multi-device checks run in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=4
(the flag must be set before JAX initialises; this test process keeps its single device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llmqp
from llmqp import sharding

N_DEVICES = 4


def run_with_devices(script: str, n: int = N_DEVICES, timeout: int = 600) -> dict:
    """Run `script` in a fresh Python with n simulated CPU devices; it prints one JSON object last."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A greedy decode of the tiny random Llama (vocabulary 272 = 4 x 68) at the model level: the trunk from
# `transformer`, the head either on one device or over the mesh. Sparse steps score an allowed set that
# changes every step and spans every device's range.
MODEL_LEVEL = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from llmqp import sharding
    from llmqp.model import synthetic, transformer, weights
    from llmqp.model.config import ModelConfig, RopeStyle

    assert len(jax.devices()) == 4
    cfg = ModelConfig(arch="llama", name="tiny", vocab_size=272, hidden_size=32, n_layers=2, n_heads=2,
                      n_kv_heads=1, head_dim=16, ffn_size=64, rope_theta=10000.0, rms_eps=1e-5,
                      rope_style=RopeStyle.ROTATE_HALF, tie_embeddings=False)
    raw = synthetic.random_raw(cfg, seed=3)
    raw["output"] = raw["output"] * np.float32(4.0)  # logits O(10): a wrong shard would change the argmax
    packed = weights.pack_params(cfg, raw)
    prompt = np.array([[5, 17, 42, 99, 130, 201, 250, 271]], np.int32)

    def allowed_at(step):
        ids = np.arange(step % 5, cfg.vocab_size, 7, dtype=np.int32)  # ~39 ids, in all four ranges
        return jnp.asarray(ids[None, :])

    def decode(params, head_fn, steps=10):
        cache = transformer.init_cache(cfg, 1, 64)
        hidden, cache = transformer.forward_jit(params, cache, jnp.asarray(prompt), jnp.zeros(1, jnp.int32), cfg=cfg)
        h, pos, tokens, logits = hidden[:, -1], prompt.shape[1], [], []
        for step in range(steps):
            ids = allowed_at(step)
            scores = np.asarray(head_fn(params, h, ids))  # (1, K)
            token = int(np.asarray(ids)[0, int(np.argmax(scores[0]))])
            tokens.append(token)
            logits.append(scores[0].tolist())
            h, cache = transformer.decode_step(params, cache, jnp.asarray([token], jnp.int32),
                                               jnp.asarray([pos], jnp.int32), cfg=cfg)
            pos += 1
        return tokens, logits

    one = jax.tree_util.tree_map(jnp.asarray, packed)
    placed, mesh = sharding.place_params(packed, 4)
    dense_one = jax.jit(lambda p, h, ids: jnp.take_along_axis(transformer.dense_logits(p, h), ids, axis=1))
    dense_mesh = jax.jit(lambda p, h, ids: jnp.take_along_axis(sharding.sharded_dense_logits(p, h, mesh), ids,
                                                               axis=1))
    sparse_one = jax.jit(transformer.sparse_logits)
    sparse_mesh = jax.jit(lambda p, h, ids: sharding.sharded_sparse_logits(p, h, ids, mesh))
    # Unconstrained: the full vocabulary, dense.
    full_one = jax.jit(transformer.dense_logits)
    full_mesh = jax.jit(lambda p, h: sharding.sharded_dense_logits(p, h, mesh))

    out = {}
    for name, f1, fn in [("dense", dense_one, dense_mesh), ("sparse", sparse_one, sparse_mesh)]:
        t1, l1 = decode(one, f1)
        tn, ln = decode(placed, fn)
        out[name] = {"tokens_one": t1, "tokens_mesh": tn,
                     "max_diff": float(max(np.abs(np.array(a) - np.array(b)).max() for a, b in zip(l1, ln)))}
    h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32), dtype=np.float32))
    out["full_diff"] = float(np.abs(np.asarray(full_one(one, h)) - np.asarray(full_mesh(placed, h))).max())
    out["shards"] = {k: sorted({str(s.device) for s in placed[k].addressable_shards}).__len__()
                     for k in ("embed", "unembed_rows", "unembed")}
    out["shard_shapes"] = {k: [list(s.data.shape) for s in placed[k].addressable_shards][:1]
                           for k in ("embed", "unembed_rows", "unembed", "final_norm")}
    out["trunk_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(placed["layers"]))
    print(json.dumps(out))
"""


def test_model_level_greedy_over_four_devices_equals_one():
    out = run_with_devices(MODEL_LEVEL)
    for plan in ("dense", "sparse"):
        assert out[plan]["tokens_mesh"] == out[plan]["tokens_one"], plan
        assert len(set(out[plan]["tokens_one"])) > 1  # a real decode, not one token repeated
        assert out[plan]["max_diff"] <= 1e-4, plan
    assert out["full_diff"] <= 1e-4
    # The vocabulary matrices live in four quarter shards; the rest is replicated.
    assert out["shards"] == {"embed": 4, "unembed_rows": 4, "unembed": 4}
    assert out["shard_shapes"] == {"embed": [[68, 32]], "unembed_rows": [[68, 32]], "unembed": [[32, 68]],
                                   "final_norm": [[32]]}
    assert out["trunk_replicated"] is True


def test_sparse_head_masks_ids_outside_each_range_exactly():
    """Ids at the shard boundaries, repeated ids and a whole row inside one shard: the psum of masked
    partial scores equals the single-device multiply-reduce bit for bit."""
    out = run_with_devices("""
        import json
        import jax, jax.numpy as jnp, numpy as np
        from llmqp import sharding
        from llmqp.model import transformer
        rng = np.random.default_rng(1)
        rows = rng.standard_normal((64, 8), dtype=np.float32)
        params = {"embed": rows, "unembed_rows": rows, "unembed": np.ascontiguousarray(rows.T), "final_norm":
                  np.ones(8, np.float32), "layers": []}
        placed, mesh = sharding.place_params(params, 4)
        hidden = jnp.asarray(rng.standard_normal((3, 8), dtype=np.float32))
        ids = jnp.asarray([[0, 15, 16, 31, 32, 47, 48, 63], [16, 16, 16, 17, 18, 19, 20, 21],
                           [63, 0, 63, 0, 5, 40, 22, 50]], jnp.int32)
        got = np.asarray(sharding.sharded_sparse_logits(placed, hidden, ids, mesh))
        want = np.asarray(transformer.sparse_logits(params, hidden, ids))
        print(json.dumps({"equal": bool(np.array_equal(got, want)), "tied": placed["unembed_rows"] is placed["embed"]}))
    """)
    assert out == {"equal": True, "tied": True}


def test_place_params_rejects_impossible_layouts():
    rows = np.zeros((10, 4), np.float32)
    params = {"embed": rows, "unembed_rows": rows, "unembed": rows.T, "final_norm": np.ones(4, np.float32),
              "layers": []}
    with pytest.raises(llmqp.InvalidArgument, match="JAX sees 1"):
        sharding.place_params(params, 2)  # this process has one CPU device
    with pytest.raises(llmqp.InvalidArgument, match="positive integer"):
        sharding.place_params(params, 0)
    out = run_with_devices("""
        import json
        import numpy as np
        import llmqp
        from llmqp import sharding
        rows = np.zeros((10, 4), np.float32)
        params = {"embed": rows, "unembed_rows": rows, "unembed": rows.T, "final_norm": np.ones(4, np.float32),
                  "layers": []}
        try:
            sharding.place_params(params, 4)
            print(json.dumps({"error": None}))
        except llmqp.InvalidArgument as e:
            print(json.dumps({"error": str(e)}))
    """)
    assert out["error"] == "the vocabulary (10 tokens) must split evenly over 4 devices"


ENGINE_LEVEL = """
    import gc, json
    import numpy as np
    import llmqp
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    prompt = "Extract the person as JSON: Ada Lovelace, 36."

    def runs(engine):
        out = {plan: engine.generate(prompt, json_schema=schema, max_tokens=12, plan=plan, forced=False)
               for plan in ("dense", "sparse")}
        return out, np.asarray(engine.logits(engine.prompt_ids(prompt)))

    # One engine at a time: four devices on the CPU hold four copies of the trunk (~4.3 GB), and the two
    # engines together once pushed a CI machine's memory to its end.
    one = llmqp.Engine()
    a, logits_one = runs(one)
    del one
    gc.collect()
    b, logits_four = runs(llmqp.Engine(devices=4))
    out = {plan: {"same_tokens": a[plan].token_ids == b[plan].token_ids, "n": len(a[plan].token_ids),
                  "logprob_diff": float(np.abs(np.array(a[plan].logprobs) - np.array(b[plan].logprobs)).max())}
           for plan in a}
    out["logits_diff"] = float(np.abs(logits_one - logits_four).max())
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_engine_on_four_devices_equals_one():
    """`Engine(devices=4)`: the engine's sharded dense and sparse plans against one device, through the
    scheduler, with every token scored (forced=False) so each plan scores every step."""
    out = run_with_devices(ENGINE_LEVEL, timeout=900)
    for plan in ("dense", "sparse"):
        assert out[plan]["same_tokens"] and out[plan]["n"] > 0, plan
        assert out[plan]["logprob_diff"] <= 1e-4, plan
    assert out["logits_diff"] <= 1e-4
