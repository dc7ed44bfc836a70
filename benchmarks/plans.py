"""Plans benchmark: decode step time, dense vs sparse head, at K in {1, 8, 32, 128, 1024, 8192}.

For each model shape (SmolLM2-135M with real weights; random-weight Qwen2.5-0.5B-like and
Gemma-3-270M-like shapes) it measures, in one process and interleaved:
  trunk_ms        one decode step of the trunk (no head)
  dense_step_ms   trunk + full LM head + mask/gather + sampling at K
  sparse_step_ms  trunk + gathered-rows head + sampling at K
and reports speedup = dense/sparse against the Amdahl bound (trunk + dense head) / trunk — the speedup a
head of zero cost would give. Target: sparse reaches >= 95% of the bound at K <= 1024.

    python benchmarks/plans.py [--shapes smollm2,qwen2.5-0.5b-like,gemma-3-270m-like] [--reps 20]
Writes benchmarks/results/plans.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import plans
from llmqp.engine import device_params
from llmqp.model import loader, synthetic, transformer, weights

KS = (1, 8, 32, 128, 1024, 8192)
RESULTS = Path(__file__).parent / "results"


def _load(shape: str):
    if shape == "smollm2":
        m = loader.load()
        return m.config, device_params(m.params)
    cfg = synthetic.shape_config(shape)
    packed = weights.pack_params(cfg, synthetic.random_raw(cfg))
    return cfg, device_params(packed)


def bench_shape(shape: str, reps: int) -> dict:
    cfg, params = _load(shape)
    head = {"unembed": params["unembed"], "unembed_rows": params["unembed_rows"]}
    cache = transformer.init_cache(cfg, 1, 512)
    pos = jnp.asarray([100], jnp.int32)
    token = jnp.asarray([42], jnp.int32)
    rng = np.random.default_rng(0)
    scalars = (jnp.asarray([0], jnp.uint32), jnp.asarray([0], jnp.int32), jnp.asarray([0.0], jnp.float32),
               jnp.asarray([0], jnp.int32), jnp.asarray([1.0], jnp.float32))

    def trunk():
        nonlocal cache
        hidden, cache = transformer.decode_step(params, cache, token, pos, cfg=cfg)
        return hidden

    def step(plan, ids, valid):
        hidden = trunk()
        index, _ = plans.score_and_select(head, hidden, ids, valid, *scalars, plan=plan, greedy=True)
        return int(index[0])

    def head_only(plan, hidden, ids, valid):
        index, _ = plans.score_and_select(head, hidden, ids, valid, *scalars, plan=plan, greedy=True)
        return int(index[0])

    def timed(fn, *a):
        t = time.perf_counter()
        fn(*a)
        return (time.perf_counter() - t) * 1e3

    hidden = trunk().block_until_ready()
    rows = []
    for k in KS:
        allowed = np.sort(rng.choice(cfg.vocab_size, size=k, replace=False)).astype(np.int32)
        ids, valid = (jnp.asarray(a) for a in plans.pad_allowed([allowed], cfg.vocab_size))
        dense, sparse = plans.PLANS[plans.PlanKind.DENSE], plans.PLANS[plans.PlanKind.SPARSE]
        for _ in range(3):  # compile + warm up
            step(dense, ids, valid), step(sparse, ids, valid)
        t_trunk, t_dense, t_sparse, h_dense, h_sparse = [], [], [], [], []
        for _ in range(reps):
            t_trunk.append(timed(lambda: trunk().block_until_ready()))
            t_dense.append(timed(step, dense, ids, valid))
            t_sparse.append(timed(step, sparse, ids, valid))
            h_dense.append(timed(head_only, dense, hidden, ids, valid))
            h_sparse.append(timed(head_only, sparse, hidden, ids, valid))
        med = statistics.median
        trunk_ms, dense_ms, sparse_ms = med(t_trunk), med(t_dense), med(t_sparse)
        bound = (trunk_ms + med(h_dense)) / trunk_ms
        speedup = dense_ms / sparse_ms
        rows.append({"k": k, "k_bucket": int(ids.shape[1]), "trunk_ms": trunk_ms, "dense_head_ms": med(h_dense),
                     "sparse_head_ms": med(h_sparse), "dense_step_ms": dense_ms, "sparse_step_ms": sparse_ms,
                     "speedup": speedup, "amdahl_bound": bound, "share_of_bound": (speedup - 1) / (bound - 1)
                     if bound > 1 else 1.0, "ratio_to_bound": speedup / bound})
        print(f"{shape:>20} K={k:5d}: trunk {trunk_ms:6.2f} dense {dense_ms:6.2f} sparse {sparse_ms:6.2f} ms"
              f"  speedup {speedup:.3f} bound {bound:.3f} ({100 * speedup / bound:.1f}% of bound)", flush=True)
    return {"shape": shape, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "n_layers": cfg.n_layers, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2,qwen2.5-0.5b-like,gemma-3-270m-like")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "plans.json"))
    args = ap.parse_args()
    out = {"device": jax.devices()[0].platform, "jax": jax.__version__, "shapes": []}
    for shape in args.shapes.split(","):
        out["shapes"].append(bench_shape(shape, args.reps))
        gc.collect()
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("\n| shape | K | trunk ms | dense step ms | sparse step ms | speedup | Amdahl bound | % of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for s in out["shapes"]:
        for r in s["rows"]:
            print(f"| {s['shape']} | {r['k']} | {r['trunk_ms']:.2f} | {r['dense_step_ms']:.2f} | "
                  f"{r['sparse_step_ms']:.2f} | {r['speedup']:.3f}x | {r['amdahl_bound']:.3f}x | "
                  f"{100 * r['ratio_to_bound']:.1f}% |")


if __name__ == "__main__":
    main()
