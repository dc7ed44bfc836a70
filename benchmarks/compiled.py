"""Fused on-device loop vs host loop, unconstrained and constrained; and what a new schema costs.

Part 1 — per-token decode time (decode wall time after prefill / emitted tokens), greedy, for six modes
measured round by round in rotating order (`common.interleaved_rounds`), each round running the whole
workload once per mode:
  unconstrained_host   the engine's host loop, no constraint (dense head every step)
  unconstrained_fused  the fused loop over a one-state automaton allowing every id: fusion alone
  host_stepped         the host loop with the constraint, forced=False (every token scored)
  fused_stepped        the fused loop, forced=False
  host_default         the host loop with forced runs (the engine default)
  fused                the fused loop, forced=True
Each fused mode must give exactly the tokens of its host mode (checked on the first, warm-up round), so
every pair is timed on the same tokens. Reported: per mode the median ms/token over rounds with its IQR
and bootstrap 95% CI; the paired ratios that separate the two gains — fusion (host / fused, with and
without a constraint) and the constraint inside the fused loop (unconstrained fused / constrained fused).

Part 2 — a new schema: JSON schemas never seen by the process (fresh field names), each run once with
`generate_fused` end to end: tables built (byte automaton + host mirror), XLA compilations counted
(`CompileLog`), the fused run; the same request on the host loop for comparison. The first schema of a
size class may compile the loop (or load it from JAX's persistent cache); the later ones must not.

Models: SmolLM2-135M (real weights, real constraints) and optionally a random-weight Gemma-3-270M-like
shape (V = 262144) with a synthetic chain automaton (part 1 only, stepped modes; its host loop is this
file's single-row loop over the same tables, as there is no tokenizer).

    python benchmarks/compiled.py [--models smollm2[,gemma-3-270m-like]] [--rounds 5] [--quick]
Writes benchmarks/results/compiled.json (compiled.quick.json with --quick) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (fmt_spread, interleaved_rounds, paired_ratio_summary, quick_mode, summary,  # noqa: E402
                    warm_until_compiled, write_result)

from llmqp import plans  # noqa: E402
from llmqp.compiled import Fallback, generate_fused, run_fused, synthetic_tables, unconstrained_tables  # noqa: E402
from llmqp.compiled.api import constraint_tables  # noqa: E402
from llmqp.compiled.compile_log import CompileLog  # noqa: E402
from llmqp.compiled.loop import default_sparse_threshold, prefill  # noqa: E402
from llmqp.model import transformer  # noqa: E402
from llmqp.sampling import SamplingParams  # noqa: E402

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
MODES = ["unconstrained_host", "unconstrained_fused", "host_stepped", "fused_stepped", "host_default", "fused"]
PAIRS = [("unconstrained_host", "unconstrained_fused"), ("host_stepped", "fused_stepped"), ("host_default", "fused")]
# Part 2: extraction schemas, each new to the process (distinct field names: no table cache hit).
NEW_SCHEMA_SUBJECTS = [("a person", "full_name", "age"), ("a city", "city_name", "population"),
                       ("a book", "book_title", "pages"), ("a company", "company_name", "employees"),
                       ("a river", "river_name", "length_km"), ("a mountain", "peak_name", "height_m")]


def _rounds_summary(samples: dict[str, list[float]], tokens: dict[str, int]) -> dict:
    out = {m: {"ms_per_token": summary(v), "tokens": tokens[m]} for m, v in samples.items()}
    ratios = {f"{host}/{fused}": paired_ratio_summary(samples[host], samples[fused]) for host, fused in PAIRS
              if host in samples and fused in samples}
    if "unconstrained_fused" in samples and "fused" in samples:
        ratios["unconstrained_fused/fused"] = paired_ratio_summary(samples["unconstrained_fused"], samples["fused"])
    if "unconstrained_fused" in samples and "fused_stepped" in samples:
        ratios["unconstrained_fused/fused_stepped"] = paired_ratio_summary(samples["unconstrained_fused"],
                                                                           samples["fused_stepped"])
    return {"modes": out, "ratios": ratios, "rounds": len(next(iter(samples.values())))}


# ------------------------------------------------------------------------------------------ SmolLM2
def smollm2_modes(engine, workload, tables):
    """mode -> fn() running the workload once, returning (decode ms, tokens, [token ids per item])."""
    greedy = SamplingParams()
    everything = unconstrained_tables(engine.vocab_size, engine.tokenizer.eos_ids)

    def host(constrained: bool, forced: bool):
        def run():
            ms, ids = 0.0, []
            for prompt, kw in workload:
                r = engine.generate(prompt, max_tokens=MAX_TOKENS, forced=forced, **(kw if constrained else {}))
                ms += r.decode_ms
                ids.append(r.token_ids)
            return ms, ids
        return run

    def fused(tables_of, forced: bool):
        def run():
            ms, ids = 0.0, []
            for (prompt, _), tb in zip(workload, tables_of):
                timing: dict = {}
                out = run_fused(engine, engine.prompt_ids(prompt), tb, greedy, MAX_TOKENS, forced=forced,
                                sparse_threshold=engine.planner.crossover_k(1, engine.vocab_size,
                                                                            engine.config.hidden_size),
                                timings=timing)
                ms += timing["decode_ms"]
                ids.append(out.token_ids)
            return ms, ids
        return run

    return {"unconstrained_host": host(False, True), "unconstrained_fused": fused([everything] * len(workload), True),
            "host_stepped": host(True, False), "fused_stepped": fused(tables, False),
            "host_default": host(True, True), "fused": fused(tables, True)}


def timed_rounds(modes: dict, rounds: int) -> dict:
    """Warm-up round (compiles; checks that each fused mode gives its host mode's tokens), then
    `rounds` interleaved rounds of ms/token."""
    first = {m: fn() for m, fn in modes.items()}
    # The host modes draft (draft="auto"): a fresh planner's first choices compile new forward widths.
    for m, fn in modes.items():
        if "host" in m:
            warm_until_compiled(fn, max_calls=4)
    for host, fused in PAIRS:
        if host in first and fused in first:
            assert first[host][1] == first[fused][1], (host, fused, first[host][1], first[fused][1])
    tokens = {m: sum(len(t) for t in out[1]) for m, out in first.items()}

    def per_token(mode):
        def run():
            ms, ids = modes[mode]()
            assert sum(len(t) for t in ids) == tokens[mode], mode  # greedy: the same tokens every round
            return ms / max(tokens[mode], 1)
        return run

    samples = interleaved_rounds({m: per_token(m) for m in modes}, min_rounds=rounds, max_rounds=rounds)
    return _rounds_summary(samples, tokens)


def new_schemas(engine, count: int) -> dict:
    """Part 2: `count` never-seen extraction schemas through generate_fused, then the host loop."""
    rows = []
    for subject, name_key, number_key in NEW_SCHEMA_SUBJECTS[:count]:
        schema = {"type": "object", "properties": {name_key: {"type": "string", "maxLength": 24},
                                                   number_key: {"type": "integer", "minimum": 0}},
                  "required": [name_key, number_key]}
        prompt = f"Give me a record for {subject} as JSON."
        t0 = time.perf_counter()
        tables = constraint_tables(engine, dict(json_schema=schema))
        t1 = time.perf_counter()
        assert not isinstance(tables, Fallback), tables
        with CompileLog() as log:
            fused = generate_fused(engine, prompt, max_tokens=MAX_TOKENS, json_schema=schema,
                                   sparse_threshold=engine.planner.crossover_k(1, engine.vocab_size,
                                                                               engine.config.hidden_size))
        t2 = time.perf_counter()
        host = engine.generate(prompt, max_tokens=MAX_TOKENS, json_schema=schema)
        t3 = time.perf_counter()
        assert fused.token_ids == host.token_ids, (schema, fused.text, host.text)
        rows.append({"subject": subject, "states": tables.num_states, "entries": tables.num_entries,
                     "tables_ms": (t1 - t0) * 1e3, "mirror_ms": tables.description.get("mirror_ms"), "fused_total_ms": (t2 - t0) * 1e3,
                     "fused_decode_ms": fused.decode_ms, "loop_compiles": log.count("fused_decode"),
                     "compile_s": log.seconds(), "host_total_ms": (t3 - t2) * 1e3, "tokens": len(fused.token_ids),
                     "valid": fused.valid, "text": fused.text})
        print(f"  new schema {subject}: tables {rows[-1]['tables_ms']:.0f} ms, fused total "
              f"{rows[-1]['fused_total_ms']:.0f} ms ({rows[-1]['loop_compiles']} loop compiles, "
              f"{rows[-1]['compile_s']:.1f} s compiling), host {rows[-1]['host_total_ms']:.0f} ms", flush=True)
    later = rows[1:]
    return {"schemas": rows, "later_loop_compiles": sum(r["loop_compiles"] for r in later),
            "later_fused_total_ms": summary([r["fused_total_ms"] for r in later]) if later else None,
            "later_tables_ms": summary([r["tables_ms"] for r in later]) if later else None,
            "later_host_total_ms": summary([r["host_total_ms"] for r in later]) if later else None}


def bench_smollm2(rounds: int, quick: bool) -> dict:
    import llmqp

    engine = llmqp.Engine()
    # Part 2 first, so that its first schema meets a loop this process has not compiled yet.
    fresh = new_schemas(engine, 2 if quick else 5)
    workload = WORKLOAD[:3] if quick else WORKLOAD
    tables = []
    for _, kw in workload:
        t = constraint_tables(engine, kw)
        assert not isinstance(t, Fallback), (kw, t)
        tables.append(t)
    result = timed_rounds(smollm2_modes(engine, workload, tables), rounds)
    result["new_schemas"] = fresh
    result["workload"] = [{"prompt": p, "constraint": next(iter(kw)), "states": t.num_states, "max_k": t.max_k}
                          for (p, kw), t in zip(workload, tables)]
    return result


# ------------------------------------------------------------------------------------------ synthetic
def _host_loop(params, cfg, tables, prompt_ids, max_tokens, threshold):
    """A single-row host loop (forced=False) over explicit tables, as the engine's is; tables None:
    unconstrained. Returns (decode_ms, tokens)."""
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


def bench_synthetic(shape: str, rounds: int) -> dict:
    from common import device_params

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

    def fused(tb):
        def run():
            timing: dict = {}
            out = run_fused(model, prompt, tb, greedy, MAX_TOKENS, forced=False, timings=timing)
            return timing["decode_ms"], [out.token_ids]
        return run

    def host(tb):
        def run():
            ms, toks = _host_loop(params, cfg, tb, prompt, MAX_TOKENS, threshold)
            return ms, [toks]
        return run

    modes = {"unconstrained_host": host(None), "unconstrained_fused": fused(everything),
             "host_stepped": host(tables), "fused_stepped": fused(tables)}
    result = timed_rounds(modes, rounds)
    result["workload"] = [{"constraint": "synthetic chain", "ks": [1, 8, 64, 512, 4096], "length": MAX_TOKENS - 1}]
    return result


# ------------------------------------------------------------------------------------------ report
def print_tables(out: dict) -> None:
    print("\nPer-token decode time, ms: median (IQR) over rounds; device " + str(jax.devices()[0]))
    print("| model | rounds | " + " | ".join(MODES) + " |")
    print("|---|---|" + "---|" * len(MODES))
    for name, res in out["models"].items():
        cells = [fmt_spread(res["modes"][m]["ms_per_token"], 2) if m in res["modes"] else "–" for m in MODES]
        print(f"| {name} | {res['rounds']} | " + " | ".join(cells) + " |")
    print("\nPaired ratios (median, bootstrap 95% CI over rounds): fusion = host / fused; constraint = "
          "unconstrained fused / constrained fused")
    for name, res in out["models"].items():
        for key, r in res["ratios"].items():
            print(f"  {name}: {key} = {r['value']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
        if "new_schemas" in res:
            ns = res["new_schemas"]
            first = ns["schemas"][0]
            print(f"  {name}: first new schema {first['fused_total_ms'] / 1e3:.1f} s end to end "
                  f"({first['loop_compiles']} loop compiles, {first['compile_s']:.1f} s compiling); later schemas: "
                  f"{ns['later_loop_compiles']} loop compiles, fused end to end "
                  f"{fmt_spread(ns['later_fused_total_ms'], 0)} ms (tables {fmt_spread(ns['later_tables_ms'], 0)} ms), "
                  f"host loop {fmt_spread(ns['later_host_total_ms'], 0)} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--rounds", "--reps", dest="rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 3 workload items, 2 new schemas, 2 rounds")
    ap.add_argument("--out", default=None, help="write the JSON here instead of results/compiled[.quick].json")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    rounds = 2 if quick else args.rounds
    out = {"max_tokens": MAX_TOKENS, "greedy": True, "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        res = bench_smollm2(rounds, quick) if name == "smollm2" else bench_synthetic(name, rounds)
        res["bench_seconds"] = round(time.perf_counter() - t0, 1)
        out["models"][name] = res
        print(name, "done in", res["bench_seconds"], "s", flush=True)
        gc.collect()
    if args.out:  # only there: never over results/compiled.json
        import json

        from common import machine

        Path(args.out).write_text(json.dumps({"machine": machine(), "quick": quick, **out}, indent=2))
    else:
        write_result("compiled", out, quick=quick)
    print_tables(out)


if __name__ == "__main__":
    main()
