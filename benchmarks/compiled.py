"""Fused on-device loop vs host-stepped loop vs unconstrained decoding: per-token decode time, one run.

For each model, in one process and interleaved over repetitions (median of --reps; the first,
compiling, run is discarded):
  unconstrained_host   the engine's host loop with no constraint (dense head every step)
  unconstrained_fused  the fused loop over a one-state automaton allowing every id (loop overhead only)
  host_stepped         the host loop with the constraint, forced=False (scores every step, even K == 1)
  fused_stepped        the fused loop, forced=False: the same tokens as host_stepped
  host_default         the host loop with forced runs (engine default: one multi-token forward per run)
  fused                the fused loop, forced=True: the same tokens as host_default (forced runs fed
                       whole; K == 1 skips the head; sparse head for small K, dense otherwise)
Per-token time = decode wall time (after prefill) / emitted tokens, over the workload: each item's
median over the repetitions, summed (token counts are identical across repetitions: greedy).

Models: SmolLM2-135M (real weights, real constraints: regex, choice, JSON schemas through the engine)
and a random-weight Gemma-3-270M-like shape (V = 262144) with a synthetic chain automaton over random
ids (K cycling through 1, 8, 64, 512, 4096): there is no tokenizer, so its host loop is this file's copy
of the engine's single-row loop over the same tables.

    python benchmarks/compiled.py [--models smollm2,gemma-3-270m-like] [--reps 5]
Writes benchmarks/results/compiled.json and prints a Markdown table.
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
from llmqp.compiled import run_fused, synthetic_tables, unconstrained_tables
from llmqp.compiled.api import constraint_tables
from llmqp.compiled.loop import default_sparse_threshold, prefill
from llmqp.model import transformer
from llmqp.sampling import SamplingParams

RESULTS = Path(__file__).parent / "results"
MAX_TOKENS = 48
WORKLOAD = [
    ("Name three colours, separated by commas.", dict(regex=r"[a-z]+(, [a-z]+){2}")),
    ("What is 3.5 times 12? Answer with a number.", dict(regex=r"[0-9]{1,4}(\.[0-9]{1,3})?")),
    ("Is the sky blue?", dict(choice=["Yes, it is.", "No, it is not.", "Sometimes."])),
    ("Give me a user record for Ada Lovelace, born 1815.",
     dict(json_schema={"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                        "born": {"type": "integer", "minimum": 0, "maximum": 2100}},
                       "required": ["name", "born"]})),
    ("Describe a cat as JSON.",
     dict(json_schema={"type": "object", "properties": {"legs": {"type": "integer"}, "furry": {"type": "boolean"},
                                                        "colour": {"enum": ["black", "white", "ginger"]}},
                       "required": ["legs", "furry", "colour"]})),
    ("Give me a record for the novel Dune as JSON.",
     dict(json_schema={"type": "object", "properties": {
         "title": {"type": "string", "maxLength": 40}, "author": {"type": "string", "maxLength": 40},
         "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
         "genres": {"type": "array", "items": {"enum": ["fiction", "science fiction", "fantasy", "history"]},
                    "maxItems": 3}}, "required": ["title", "author", "year", "genres"]})),
]


def _per_token(samples: list[tuple[float, int]]) -> dict:
    ms, tokens = sum(s[0] for s in samples), sum(s[1] for s in samples)
    return {"decode_ms": ms, "tokens": tokens, "ms_per_token": ms / max(tokens, 1)}


def _median_over_passes(passes: list[dict]) -> dict:
    """Per mode: for each workload item the median decode time over passes (robust to a noisy machine),
    summed over items, divided by the tokens."""
    out = {}
    for mode in passes[0]:
        items = zip(*(p[mode] for p in passes))  # per item: [(ms, tokens) per pass]
        samples = [(statistics.median(ms for ms, _ in runs), runs[0][1]) for runs in map(list, items)]
        out[mode] = _per_token(samples) | {"passes": len(passes)}
    return out


def bench_smollm2(reps: int) -> dict:
    import llmqp

    engine = llmqp.Engine()
    greedy = SamplingParams()
    tables = []
    for prompt, kw in WORKLOAD:
        t = constraint_tables(engine, kw)
        assert not isinstance(t, llmqp.compiled.Fallback), (kw, t)
        tables.append(t)
    everything = unconstrained_tables(engine.vocab_size, engine.tokenizer.eos_ids)

    def one_pass() -> dict[str, list[tuple[float, int]]]:
        runs: dict[str, list] = {m: [] for m in ("unconstrained_host", "unconstrained_fused", "host_stepped",
                                                 "fused_stepped", "host_default", "fused")}
        for (prompt, kw), tb in zip(WORKLOAD, tables):
            ids = engine.prompt_ids(prompt)
            r = engine.generate(prompt, max_tokens=MAX_TOKENS)
            runs["unconstrained_host"].append((r.decode_ms, len(r.token_ids)))
            timing: dict = {}
            out = run_fused(engine, ids, everything, greedy, MAX_TOKENS, timings=timing)
            runs["unconstrained_fused"].append((timing["decode_ms"], len(out.token_ids)))
            r = engine.generate(prompt, max_tokens=MAX_TOKENS, forced=False, **kw)
            runs["host_stepped"].append((r.decode_ms, len(r.token_ids)))
            out = run_fused(engine, ids, tb, greedy, MAX_TOKENS, forced=False, timings=timing)
            assert out.token_ids == r.token_ids, (kw, out.token_ids, r.token_ids)
            runs["fused_stepped"].append((timing["decode_ms"], len(out.token_ids)))
            r = engine.generate(prompt, max_tokens=MAX_TOKENS, **kw)
            runs["host_default"].append((r.decode_ms, len(r.token_ids)))
            out = run_fused(engine, ids, tb, greedy, MAX_TOKENS, forced=True, timings=timing)
            assert out.token_ids == r.token_ids, (kw, out.token_ids, r.token_ids)
            runs["fused"].append((timing["decode_ms"], len(out.token_ids)))
        return runs

    one_pass()  # compile everything
    passes = [one_pass() for _ in range(reps)]
    result = _median_over_passes(passes)
    result["workload"] = [{"prompt": p, "constraint": next(iter(kw)), "states": t.num_states, "max_k": t.max_k}
                          for (p, kw), t in zip(WORKLOAD, tables)]
    return result


def _host_loop(params, cfg, tables, prompt_ids, max_tokens, threshold):
    """The engine's single-row host loop (forced=False) over explicit tables; tables None: unconstrained.
    Returns (decode_ms, tokens)."""
    head = {"unembed": params["unembed"], "unembed_rows": params["unembed_rows"]}
    vocab = cfg.vocab_size
    all_ids = np.arange(vocab, dtype=np.int32)
    all_dev, all_valid = jnp.asarray(all_ids[None]), jnp.ones((1, vocab), bool)
    scalars = (jnp.asarray([0], jnp.uint32),)
    tail = (jnp.asarray([0.0], jnp.float32), jnp.asarray([0], jnp.int32), jnp.asarray([1.0], jnp.float32))
    hidden, cache = prefill(params, cfg, np.asarray(prompt_ids, np.int32), extra=max_tokens)
    hidden.block_until_ready()
    t0 = time.perf_counter()
    state, out, pos = 0, [], len(prompt_ids)
    while len(out) < max_tokens:
        if tables is not None and tables.done[state]:
            break
        row = all_ids if tables is None else tables.allowed_ids(state)
        kind = plans.PlanKind.SPARSE if len(row) <= threshold else plans.PlanKind.DENSE
        if tables is None:
            ids, valid = all_dev, all_valid
        else:
            ids, valid = (jnp.asarray(a) for a in plans.pad_allowed([row], vocab))
        index, _ = plans.score_and_select(head, hidden, ids, valid, *scalars, jnp.asarray([len(out)], jnp.int32),
                                          *tail, plan=plans.PLANS[kind], greedy=True)
        token = int(row[int(index[0])])
        if tables is not None and tables.step(state, token) == -1:
            break
        out.append(token)
        if tables is not None:
            state = tables.step(state, token)
        if len(out) < max_tokens and not (tables is not None and tables.done[state]):
            hidden, cache = transformer.decode_step(params, cache, jnp.asarray([token], jnp.int32),
                                                    jnp.asarray([pos], jnp.int32), cfg=cfg)
        pos += 1
    return (time.perf_counter() - t0) * 1e3, out


def bench_synthetic(shape: str, reps: int) -> dict:
    from llmqp.engine import device_params
    from llmqp.model import synthetic, weights

    cfg = synthetic.shape_config(shape)
    params = device_params(weights.pack_params(cfg, synthetic.random_raw(cfg)))
    eos = (0,)
    tables = synthetic_tables(cfg.vocab_size, eos, ks=(1, 8, 64, 512, 4096), length=MAX_TOKENS - 1)
    everything = unconstrained_tables(cfg.vocab_size, eos)
    threshold = default_sparse_threshold(cfg.vocab_size)
    prompt = np.random.default_rng(1).integers(1, cfg.vocab_size, size=40).astype(np.int32)

    class _Model:  # what run_fused needs from an engine
        pass

    model = _Model()
    model.params, model.config = params, cfg
    greedy = SamplingParams()

    def one_pass():
        runs = {}
        ms, toks = _host_loop(params, cfg, None, prompt, MAX_TOKENS, threshold)
        runs["unconstrained_host"] = [(ms, len(toks))]
        timing: dict = {}
        out = run_fused(model, prompt, everything, greedy, MAX_TOKENS, timings=timing)
        runs["unconstrained_fused"] = [(timing["decode_ms"], len(out.token_ids))]
        ms, host_tokens = _host_loop(params, cfg, tables, prompt, MAX_TOKENS, threshold)
        runs["host_stepped"] = [(ms, len(host_tokens))]
        out = run_fused(model, prompt, tables, greedy, MAX_TOKENS, forced=False, timings=timing)
        assert out.token_ids == host_tokens
        runs["fused_stepped"] = [(timing["decode_ms"], len(out.token_ids))]
        return runs

    one_pass()
    passes = [one_pass() for _ in range(reps)]
    result = _median_over_passes(passes)
    result["workload"] = [{"constraint": "synthetic chain", "ks": [1, 8, 64, 512, 4096], "length": MAX_TOKENS - 1}]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,gemma-3-270m-like")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "compiled.json"))
    args = ap.parse_args()
    out = {"device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}", "jax": jax.__version__,
           "cpu_count": __import__("os").cpu_count(), "max_tokens": MAX_TOKENS, "greedy": True, "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        res = bench_smollm2(args.reps) if name == "smollm2" else bench_synthetic(name, args.reps)
        res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        out["models"][name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "workload"}), flush=True)
        gc.collect()
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    modes = ["unconstrained_host", "unconstrained_fused", "host_stepped", "fused_stepped", "host_default", "fused"]
    print("\nPer-token decode time, ms (lower is better); device " + out["device"])
    print("| model | " + " | ".join(modes) + " | fused vs host (same setting) | best fused vs unconstrained host |")
    print("|---|" + "---|" * (len(modes) + 2))
    for name, res in out["models"].items():
        ms = {m: res[m]["ms_per_token"] for m in modes if m in res}
        cells = [f"{ms[m]:.2f}" if m in ms else "–" for m in modes]
        pairs = [f"{ms['host_stepped'] / ms['fused_stepped']:.2f}x (stepped)"]
        if "fused" in ms:
            pairs.append(f"{ms['host_default'] / ms['fused']:.2f}x (forced runs)")
        best = min(ms.get("fused", np.inf), ms["fused_stepped"])
        print(f"| {name} | " + " | ".join(cells) + f" | {', '.join(pairs)} | "
              f"{ms['unconstrained_host'] / best:.2f}x faster |")


if __name__ == "__main__":
    main()
