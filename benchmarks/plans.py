"""Plans benchmark: decode step time at batch 1, dense vs sparse head, at K in {1, 8, 32, 128, 1024, 8192}.

For each model shape (SmolLM2-135M with real weights; random-weight Qwen2.5-0.5B-like and
Gemma-3-270M-like shapes) it measures, interleaved round by round (rotating order):
  trunk_ms        one decode step of the trunk alone (no head): the floor a free head would reach
  dense_ms        trunk + full LM head + gather of the K allowed logits + sampling
  sparse_ms       trunk + gathered-rows head over the K allowed ids + sampling
A round calls trunk, dense and sparse in turn `--burst` times (default 5; order rotated) and keeps,
per variant, its fastest call: on a machine shared with other jobs the fastest step is the least
disturbed one, and the three are sampled in the same second. It reports, beside speedup =
dense / sparse and the Amdahl bound dense / trunk, the measure a skeptic
computes: the share of the achievable gain that sparse captures,
    captured = (dense − sparse) / (dense − trunk)
(1 = the head costs nothing; 0 = no gain). Rounds repeat until the 95% confidence interval of the
median gain (dense − sparse, paired per round) is narrower than half the gain, or a round limit; the
noise band (that interval) and the CI of `captured` are printed and stored.

    python benchmarks/plans.py [--shapes smollm2,qwen2.5-0.5b-like,gemma-3-270m-like] [--quick]
Writes benchmarks/results/plans.json (plans.quick.json with --quick) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc

import jax.numpy as jnp
import numpy as np

from common import bootstrap_ci, device_params, fastest_in_cycles, quick_mode, summary, write_result
from llmqp import plans
from llmqp.model import loader, synthetic, transformer, weights

KS = (1, 8, 32, 128, 1024, 8192)


def _load(shape: str):
    if shape == "smollm2":
        m = loader.load()
        return m.config, device_params(m.params)
    cfg = synthetic.shape_config(shape)
    return cfg, device_params(weights.pack_params(cfg, synthetic.random_raw(cfg)))


def _gain_resolved(samples: dict[str, list[float]]) -> bool:
    gain = np.subtract(samples["dense"], samples["sparse"])
    lo, hi = bootstrap_ci(gain)
    return (hi - lo) < 0.5 * abs(float(np.median(gain)))


def bench_shape(shape: str, min_rounds: int, max_rounds: int, burst: int) -> dict:
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
        return hidden.block_until_ready()

    def step(plan, ids, valid):
        index, _ = plans.score_and_select(head, trunk(), ids, valid, *scalars, plan=plan, greedy=True)
        return int(index[0])  # the host needs the token: the engine's step ends the same way

    dense, sparse = plans.PLANS[plans.PlanKind.DENSE], plans.PLANS[plans.PlanKind.SPARSE]
    rows = []
    for k in KS:
        allowed = np.sort(rng.choice(cfg.vocab_size, size=k, replace=False)).astype(np.int32)
        ids, valid = (jnp.asarray(a) for a in plans.pad_allowed([allowed], cfg.vocab_size))
        for _ in range(3):  # compile + warm up
            step(dense, ids, valid), step(sparse, ids, valid)
        variants = {"trunk": trunk, "dense": lambda: step(dense, ids, valid), "sparse": lambda: step(sparse, ids, valid)}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(max_rounds):
            for name, ms in fastest_in_cycles(variants, burst).items():
                samples[name].append(ms)
            if r + 1 >= min_rounds and _gain_resolved(samples):
                break
        t, d, s = (np.asarray(samples[n]) for n in ("trunk", "dense", "sparse"))
        gain, achievable = d - s, d - t  # paired per round
        boot = np.random.default_rng(2).integers(0, len(d), size=(2000, len(d)))
        captured_boot = np.median(gain[boot], axis=1) / np.median(achievable[boot], axis=1)
        row = {
            "k": k, "k_bucket": int(ids.shape[1]), "rounds": len(d),
            "trunk_ms": summary(t), "dense_ms": summary(d), "sparse_ms": summary(s),
            "gain_ms": summary(gain), "achievable_gain_ms": summary(achievable),
            "speedup": float(np.median(d) / np.median(s)), "amdahl_bound": float(np.median(d) / np.median(t)),
            "captured_share": float(np.median(gain) / np.median(achievable)),
            "captured_share_ci95": [float(v) for v in np.quantile(captured_boot, [0.025, 0.975])],
        }
        row["noise_band_ms"] = row["gain_ms"]["ci95"]
        rows.append(row)
        lo, hi = row["captured_share_ci95"]
        print(f"{shape:>20} K={k:5d} ({len(d)} rounds): trunk {np.median(t):6.2f} dense {np.median(d):6.2f} "
              f"sparse {np.median(s):6.2f} ms  gain {np.median(gain):5.2f} ms (95% CI "
              f"{row['noise_band_ms'][0]:.2f}..{row['noise_band_ms'][1]:.2f}) of {np.median(achievable):5.2f}"
              f" achievable: captured {100 * row['captured_share']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]",
              flush=True)
    return {"shape": shape, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "n_layers": cfg.n_layers, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2,qwen2.5-0.5b-like,gemma-3-270m-like")
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=60)
    ap.add_argument("--burst", type=int, default=5, help="each sample: the fastest of this many steps")
    ap.add_argument("--quick", action="store_true", help="CI-sized: SmolLM2 only, 3-6 rounds")
    ap.add_argument("--name", default="plans", help="results/<name>.json")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    shapes = ["smollm2"] if quick else args.shapes.split(",")
    min_rounds, max_rounds = (3, 6) if quick else (args.min_rounds, args.max_rounds)
    out = {"sample": f"per round and variant, the fastest of {args.burst} calls interleaved with the other "
                     "variants' calls", "stop_rule": "rounds until the 95% CI of the median paired gain (dense - sparse) is narrower "
                        f"than half the gain, {min_rounds}..{max_rounds} rounds", "shapes": []}
    for shape in shapes:
        out["shapes"].append(bench_shape(shape, min_rounds, max_rounds, args.burst))
        gc.collect()
        write_result(args.name, out, quick=quick)  # after every shape: a long run is never all lost
    print("\n| shape | K | rounds | trunk ms | dense step ms | sparse step ms | gain ms (95% CI) | speedup | "
          "Amdahl bound | captured share of the achievable gain (95% CI) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in out["shapes"]:
        for r in s["rows"]:
            lo, hi = r["noise_band_ms"]
            clo, chi = r["captured_share_ci95"]
            print(f"| {s['shape']} | {r['k']} | {r['rounds']} | {r['trunk_ms']['median']:.1f} | "
                  f"{r['dense_ms']['median']:.1f} | {r['sparse_ms']['median']:.1f} | "
                  f"{r['gain_ms']['median']:.2f} ({lo:.2f}–{hi:.2f}) | {r['speedup']:.3f}x | "
                  f"{r['amdahl_bound']:.3f}x | {100 * r['captured_share']:.0f}% ({100 * clo:.0f}–{100 * chi:.0f}%) |")


if __name__ == "__main__":
    main()
