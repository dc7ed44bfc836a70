"""Foundation benchmark: cold start, warm start, prefill and decode throughput at batch 1.

Cold start = a fresh process with an empty cache directory: parse + dequantize the GGUF, write the
cache, compile, and produce the first token. Warm start = the same in a new process once the cache is
filled (median of several). Prefill is measured *through generation*: the wall time of
`generate(prompt, raw=True, max_tokens=1)` — time to first token, everything included (tokenization,
prefill, the first head + sampling) — for several prompt lengths, interleaved over rounds; prefill
tokens/s = prompt tokens / that time. Decode = generated tokens / decode time of `generate(...,
max_tokens=N)` (prefill excluded), interleaved over rounds. Medians with IQR.

    python benchmarks/foundation.py [--model PATH] [--rounds 5] [--quick]
Writes benchmarks/results/foundation.json (foundation.quick.json with --quick), prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (clear_prefix_cache, fmt_spread, interleaved_rounds, quick_mode, summary, warm_until_compiled,
                    write_result)

HERE = Path(__file__).parent
PROMPT_LENGTHS = (32, 128, 512)
STORY = "Write a long, detailed story about a lighthouse keeper and a storm."

_START_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import llmqp
t_import = time.perf_counter()
engine = llmqp.Engine(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None)
t_load = time.perf_counter()
engine.generate("Hi", max_tokens=1)
t_first = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "first_token_s": t_first - t_load,
                  "total_s": t_first - t0}))
"""


def _start(cache: str, model: str | None) -> dict:
    env = dict(os.environ, LLMQP_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", _START_SNIPPET, model or ""], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _prompt_of_length(tokenizer, n_tokens: int) -> str:
    """Plain text of about n_tokens tokens (the exact count used is what the result reports)."""
    base = (HERE.parent / "tests" / "data" / "paragraph.txt").read_text()
    ids = tokenizer.encode(base)
    ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]
    return tokenizer.decode(ids)


def bench_dtype(model, dtype: str, rounds: int, decode_tokens: int) -> dict:
    import llmqp

    engine = llmqp.Engine(model, dtype=dtype)
    prompts = {n: _prompt_of_length(engine.tokenizer, n) for n in PROMPT_LENGTHS}
    prompt_tokens = {}

    def first_token(n):
        def run():
            clear_prefix_cache(engine)  # time the prefill, not a copy of an earlier round's
            t = time.perf_counter()
            r = engine.generate(prompts[n], raw=True, max_tokens=1)
            ms = (time.perf_counter() - t) * 1e3
            prompt_tokens[n] = r.prompt_tokens
            return ms
        return run

    for n in PROMPT_LENGTHS:  # compile each prompt bucket once
        first_token(n)()
    ttft = interleaved_rounds({str(n): first_token(n) for n in PROMPT_LENGTHS}, min_rounds=rounds,
                              max_rounds=rounds)
    # compile the decode step and every forward width the draft planner tries first
    warmup = warm_until_compiled(lambda: engine.generate(STORY, max_tokens=decode_tokens))
    decoded = []

    def decode():
        r = engine.generate(STORY, max_tokens=decode_tokens)
        decoded.append(len(r.token_ids))
        return r.tokens_per_second

    tps = interleaved_rounds({"decode": decode}, min_rounds=rounds, max_rounds=rounds)["decode"]
    prefill = {}
    for n in PROMPT_LENGTHS:
        ms = summary(ttft[str(n)])
        tokens = prompt_tokens[n]
        prefill[str(n)] = {"prompt_tokens": tokens, "time_to_first_token_ms": ms,
                           "prefill_tokens_per_s": summary([tokens / (v / 1e3) for v in ttft[str(n)]])}
    return {"prefill": prefill, "decode_tokens_per_s": summary(tps), "decode_tokens": decoded,
            "decode_max_tokens": decode_tokens, "decode_warmup": warmup}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--bf16-decode-tokens", type=int, default=32, help="bf16 decodes slowly on XLA:CPU")
    ap.add_argument("--warm-starts", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 rounds, short decodes, no bf16")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    rounds = 2 if quick else args.rounds
    warm_starts = 1 if quick else args.warm_starts

    with tempfile.TemporaryDirectory() as cache:
        cold = _start(cache, args.model)
        warm = [_start(cache, args.model) for _ in range(warm_starts)]
    results = {"cold_start": cold, "warm_starts": warm,
               "warm_start_total_s": statistics.median(w["total_s"] for w in warm), "dtypes": {}}
    results["dtypes"]["float32"] = bench_dtype(args.model, "float32", rounds, 16 if quick else args.decode_tokens)
    if not quick:
        results["dtypes"]["bfloat16"] = bench_dtype(args.model, "bfloat16", max(3, rounds - 2),
                                                    args.bf16_decode_tokens)
    write_result("foundation", results, quick=quick)
    print(f"| measure | value ({rounds} interleaved rounds; median (IQR)) |\n|---|---|")
    print(f"| cold start (empty cache, fresh process, to first token) | {cold['total_s']:.1f} s |")
    print(f"| warm start (cache filled, fresh process, to first token; median of {warm_starts}) | "
          f"{results['warm_start_total_s']:.1f} s |")
    for dtype, r in results["dtypes"].items():
        for n, p in r["prefill"].items():
            print(f"| {dtype}: time to first token, {p['prompt_tokens']}-token prompt | "
                  f"{fmt_spread(p['time_to_first_token_ms'], 0)} ms = {p['prefill_tokens_per_s']['median']:.0f} "
                  f"prompt tokens/s |")
        print(f"| {dtype}: decode, batch 1, {max(r['decode_tokens'])} tokens per run | "
              f"{fmt_spread(r['decode_tokens_per_s'])} tokens/s |")


if __name__ == "__main__":
    main()
