"""Foundation benchmark: cold start, warm start, prefill and decode throughput at batch 1.

Cold start = a fresh process with an empty cache directory: parse + dequantize the GGUF, write the cache,
compile, and produce the first token. Warm start = the same in a new process once the cache is filled.
Writes benchmarks/results/foundation.json and prints a Markdown table.

    python benchmarks/foundation.py [--model PATH] [--decode-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

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
                  "total_s": t_first - t0, "from_cache": engine.loaded_from_cache}))
"""


def _start(cache: str, model: str | None) -> dict:
    env = dict(os.environ, LLMQP_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", _START_SNIPPET, model or ""], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        cold = _start(cache, args.model)
        warm = _start(cache, args.model)

    import jax
    import numpy as np

    import llmqp

    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "jax": jax.__version__, "device": jax.devices()[0].platform},
               "cold_start": cold, "warm_start": warm, "dtypes": {}}
    for dtype in ("float32", "bfloat16"):
        engine = llmqp.Engine(args.model, dtype=dtype)
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, engine.vocab_size, size=512).tolist()
        engine.logits(prompt)  # compile
        prefill = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.logits(prompt)
            prefill.append(len(prompt) / (time.perf_counter() - t))
        story = "Write a long, detailed story about a lighthouse keeper and a storm."
        engine.generate(story, max_tokens=8)  # compile
        decode, lat = [], []
        for _ in range(args.repeats):
            r = engine.generate(story, max_tokens=args.decode_tokens)
            decode.append(r.tokens_per_second)
            lat += [s.latency_ms for s in r.steps]
        results["dtypes"][dtype] = {
            "prefill_tokens_per_s": statistics.median(prefill), "prefill_prompt_tokens": len(prompt),
            "decode_tokens_per_s": statistics.median(decode), "decode_tokens": len(r.token_ids),
            "decode_step_ms_median": statistics.median(lat),
        }
        del engine
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "foundation.json").write_text(json.dumps(results, indent=2))
    print("| measure | value |\n|---|---|")
    print(f"| cold start (empty cache, to first token) | {cold['total_s']:.1f} s |")
    print(f"| warm start (cache filled, to first token) | {warm['total_s']:.1f} s |")
    for dtype, r in results["dtypes"].items():
        print(f"| prefill, {dtype} (512 tokens) | {r['prefill_tokens_per_s']:.0f} tokens/s |")
        print(f"| decode, {dtype}, batch 1 | {r['decode_tokens_per_s']:.1f} tokens/s |")


if __name__ == "__main__":
    main()
