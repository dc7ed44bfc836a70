"""Continuous batching and host overhead of the decode core (issue: one decode core).

Part 1 — batch 1, unconstrained greedy decode, before/after: the round-1 engine (the commit before the
scheduler, run from a temporary git worktree in a subprocess) against the current one, in interleaved rounds in
one run; plus the current engine's host time per step that is *not* overlapped with the device: wall time per
token minus the device time per token of the same program run back to back.

Part 2 — a mixed workload (JSON schema, regex, choice, unconstrained; prompts of mixed lengths) arriving as a
Poisson stream at three rates into one `llmqp.Scheduler(max_slots=8)`, against running the same requests one
at a time: output tok/s, p50/p99 time to first token (from arrival) and inter-token latency, and whether the
outputs are the same. Each timed run starts with an empty prefix cache and reports how many prompt tokens it
reused from it.

    python benchmarks/batching.py [--quick]      # results/batching.json (batching.quick.json)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (clear_prefix_cache, interleaved_rounds, paired_ratio_summary, quick_mode, summary,  # noqa: E402
                    warm_until_compiled, write_result)

import llmqp  # noqa: E402
from llmqp.compiled.compile_log import CompileLog  # noqa: E402

ROUND1_COMMIT = "a954563"  # the last commit before the scheduler (round 1's engine)
REPO = Path(__file__).resolve().parents[1]
PROMPT = "Tell me a long story about a cat who learns to sail."

OLD_ENGINE_SERVER = r"""
import json, sys, llmqp
engine = llmqp.Engine()
n = int(sys.argv[1])
engine.generate(%r, max_tokens=8)
print("ready", flush=True)
for line in sys.stdin:
    r = engine.generate(%r, max_tokens=n)
    print(json.dumps({"tokens": len(r.token_ids), "decode_ms": r.decode_ms, "ids": r.token_ids}), flush=True)
"""


def old_engine(max_tokens: int):
    """A subprocess running round 1's engine; returns (call, close) or None when git cannot provide it."""
    tmp = Path(tempfile.mkdtemp(prefix="llmqp-round1-"))
    try:
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), ROUND1_COMMIT], cwd=REPO,
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"round-1 engine unavailable ({e}); part 1 compares nothing", flush=True)
        return None
    env = dict(os.environ, PYTHONPATH=str(tmp / "tree" / "src"))
    proc = subprocess.Popen([sys.executable, "-c", OLD_ENGINE_SERVER % (PROMPT, PROMPT), str(max_tokens)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
    assert proc.stdout.readline().strip() == "ready"

    def call() -> dict:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    def close():
        proc.stdin.close()
        proc.wait(timeout=60)
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=REPO, capture_output=True)

    return call, close


def part1(engine: llmqp.Engine, quick: bool) -> dict:
    max_tokens = 48 if quick else 128
    old = old_engine(max_tokens)
    engine.generate(PROMPT, max_tokens=8)
    outputs = {}

    def new() -> float:
        r = engine.generate(PROMPT, max_tokens=max_tokens)
        outputs["new"] = r.token_ids
        return len(r.token_ids) / (r.decode_ms / 1e3)

    variants = {"current": new}
    if old is not None:
        def before() -> float:
            r = old[0]()
            outputs["round1"] = r["ids"]
            return r["tokens"] / (r["decode_ms"] / 1e3)
        variants["round1"] = before
    samples = interleaved_rounds(variants, min_rounds=3 if quick else 7, max_rounds=3 if quick else 7)
    if old is not None:
        old[1]()
    out = {"max_tokens": max_tokens, "tokens_per_s": {k: summary(v) for k, v in samples.items()}}
    if "round1" in samples:
        out["speedup_vs_round1"] = paired_ratio_summary(samples["current"], samples["round1"])
        out["same_tokens_as_round1"] = outputs["new"] == outputs["round1"]
    out["host_overhead"] = host_overhead(engine, max_tokens)
    return out


def host_overhead(engine: llmqp.Engine, max_tokens: int) -> dict:
    """Wall ms per decode token through `generate` minus device ms per token of the very program the
    scheduler runs for such a step (the decode step fused with the greedy dense choice), run back to back."""
    import jax
    import jax.numpy as jnp

    from llmqp.core import executor as ex_mod
    from llmqp.plans import PlanKind
    walls, devices = [], []
    ids = jnp.arange(engine.vocab_size, dtype=jnp.int32)[None]
    valid = jnp.ones((1, engine.vocab_size), bool)
    for _ in range(5):
        r = engine.generate(PROMPT, max_tokens=max_tokens)
        walls.append(r.decode_ms / len(r.token_ids))
        cache = ex_mod._zero_cache(cfg=engine.config, batch=1, seq_len=engine.spec.cache_len(40, max_tokens),
                                   dtype=engine.params["embed"].dtype)
        tok, pos = jnp.zeros(1, jnp.int32), jnp.full(1, 40, jnp.int32)
        out = ex_mod._decode_then_greedy(engine.params, engine.head, cache, tok, pos, ids, valid, cfg=engine.config,
                                         plan=engine.plans[PlanKind.DENSE])
        jax.block_until_ready(out)
        cache = out[1]
        t0 = time.perf_counter()
        for i in range(max_tokens):
            h, cache, idx, lp = ex_mod._decode_then_greedy(engine.params, engine.head, cache, tok, pos + i, ids, valid,
                                                           cfg=engine.config, plan=engine.plans[PlanKind.DENSE])
        jax.block_until_ready((h, idx))
        devices.append((time.perf_counter() - t0) * 1e3 / max_tokens)
    over = [w - d for w, d in zip(walls, devices)]
    return {"wall_ms_per_token": summary(walls), "device_ms_per_token": summary(devices),
            "host_not_overlapped_ms_per_token": summary(over)}


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"]}
FILLER = ("The committee met on Tuesday to discuss the budget, the new library wing, parking, and the "
          "schedule of the summer festival. ")


def workload(n: int, seed: int = 0) -> list[llmqp.Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = FILLER * rng.choice([0, 1, 4, 12])  # ~0 / 25 / 100 / 300 extra prompt tokens
        kind = i % 4
        if kind == 0:
            out.append(llmqp.Request(prompt=context + f"Extract the person as JSON: Dr. Lee Park, {20 + i}, lives in Oslo.",
                                     json_schema=SCHEMA, max_tokens=48))
        elif kind == 1:
            out.append(llmqp.Request(prompt=context + "Give today's date in ISO format.",
                                     regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", max_tokens=16))
        elif kind == 2:
            out.append(llmqp.Request(prompt=context + "Is the sky blue? Answer yes, no or maybe.",
                                     choice=["yes", "no", "maybe"], max_tokens=8))
        else:
            out.append(llmqp.Request(prompt=context + f"Write two sentences about the number {i}.", max_tokens=40))
    return out


def run_stream(engine, requests, arrivals: list[float], max_slots: int) -> dict:
    """Feed requests at their arrival offsets (s) into one scheduler; per request: arrival, token times."""
    sched = llmqp.Scheduler(engine, max_slots=max_slots)
    t0 = time.perf_counter()
    nxt = 0
    times: dict[str, list[tuple[float, int]]] = {}
    results = {}
    while nxt < len(requests) or sched.has_work():
        now = time.perf_counter() - t0
        while nxt < len(requests) and arrivals[nxt] <= now:
            sched.add_request(requests[nxt], request_id=str(nxt))
            nxt += 1
        if not sched.has_work():
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        for e in sched.step():
            t = time.perf_counter() - t0
            if isinstance(e, llmqp.TokenEvent) and e.token_ids:
                times.setdefault(e.request_id, []).append((t, len(e.token_ids)))
            elif isinstance(e, llmqp.FinishedEvent):
                results[e.request_id] = e.result
    end = time.perf_counter() - t0
    ttft, itl = [], []
    for i in range(len(requests)):
        ts = times.get(str(i), [])
        if ts:
            ttft.append((ts[0][0] - arrivals[i]) * 1e3)
            for (a, _), (b, n) in zip(ts, ts[1:]):
                itl.extend([(b - a) * 1e3 / n] * n)
    tokens = sum(len(r.token_ids) for r in results.values())
    return {"output_tokens": tokens, "wall_s": end, "tok_per_s": tokens / end,
            "ttft_ms": {"p50": float(np.percentile(ttft, 50)), "p99": float(np.percentile(ttft, 99))},
            "itl_ms": {"p50": float(np.percentile(itl, 50)), "p99": float(np.percentile(itl, 99))},
            "ids": {k: r.token_ids for k, r in results.items()},
            "errors": [r.error for r in results.values() if r.finish_reason == "error"]}


def _hit_tokens(engine) -> int:
    return engine.prefix_cache.stats["hit_tokens"] if engine.prefix_cache is not None else 0


def _cold_prefix_cache(engine) -> int:
    """Empty the engine's prefix cache; returns its hit counter (to subtract)."""
    clear_prefix_cache(engine)
    return _hit_tokens(engine)


def part2(engine, quick: bool) -> dict:
    n = 8 if quick else 32
    reqs = workload(n)
    # Warm-up: XLA compiles are not what we measure. Every prefill shape is compiled explicitly (which prompts
    # share a prefill forward depends on arrival times); the decode side (batch sizes, feed widths, gathers,
    # heads) compiles on first use, so each timed run below is first replayed, untimed, until a replay compiles
    # nothing (`warm_until_compiled`, at most 2 replays for the streams), and the timed run counts what it
    # still compiled.
    llmqp.Scheduler(engine, max_slots=8).warm_up()

    def one_at_a_time() -> dict:
        # each request alone, back to back (the arrival pattern cannot matter). Every run starts with an empty
        # prefix cache (llmqp.core.prefix) and fills it as it goes, so no run inherits another one's prompts.
        hits = _cold_prefix_cache(engine)
        t0 = time.perf_counter()
        seq_ids, seq_tokens, seq_ttft = {}, 0, []
        for i, r in enumerate(reqs):
            ts = time.perf_counter()
            first = None
            sched = llmqp.Scheduler(engine, max_slots=1)
            sched.add_request(r, request_id=str(i))
            while sched.has_work():
                for e in sched.step():
                    if isinstance(e, llmqp.TokenEvent) and e.token_ids and first is None:
                        first = time.perf_counter()
                    elif isinstance(e, llmqp.FinishedEvent):
                        seq_ids[str(i)] = e.result.token_ids
                        seq_tokens += len(e.result.token_ids)
            seq_ttft.append(((first or time.perf_counter()) - ts) * 1e3)
        seq_wall = time.perf_counter() - t0
        return {"output_tokens": seq_tokens, "wall_s": seq_wall, "tok_per_s": seq_tokens / seq_wall,
                "service_ttft_ms": {"p50": float(np.percentile(seq_ttft, 50))},
                "prompt_tokens": sum(len(engine.prompt_ids(r.prompt, r.raw)) for r in reqs),
                "prefix_cache_hit_tokens": _hit_tokens(engine) - hits, "ids": seq_ids}

    warm = warm_until_compiled(one_at_a_time, max_calls=3)
    with CompileLog() as log:
        sequential = one_at_a_time()
    sequential.update(warm_up=warm, compiles_while_timed=log.count())
    seq_ids, seq_wall = sequential.pop("ids"), sequential["wall_s"]
    capacity = n / seq_wall  # requests/s the one-at-a-time loop sustains
    rates = {"low": 0.5 * capacity, "medium": 2 * capacity, "high": 16 * capacity}
    out = {"requests": n, "max_slots": 8, "sequential": sequential, "rates": {}}
    rng = np.random.default_rng(0)
    for name, rate in rates.items():
        arrivals = list(np.cumsum(rng.exponential(1 / rate, size=n)))

        def stream(arrivals=arrivals) -> dict:
            hits = _cold_prefix_cache(engine)
            res = run_stream(engine, reqs, arrivals, max_slots=8)
            res["prefix_cache_hit_tokens"] = _hit_tokens(engine) - hits
            return res

        warm = warm_until_compiled(stream, max_calls=2)
        with CompileLog() as log:
            res = stream()
        res.update(warm_up=warm, compiles_while_timed=log.count())
        ids = res.pop("ids")
        res["same_outputs_as_sequential"] = ids == seq_ids
        res["rate_req_per_s"] = rate
        res["throughput_vs_sequential"] = res["tok_per_s"] / sequential["tok_per_s"]
        out["rates"][name] = res
        print(name, json.dumps({k: v for k, v in res.items()}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    quick = quick_mode(ap.parse_args().quick)
    engine = llmqp.Engine()
    doc = {"part1_batch1_unconstrained": part1(engine, quick)}
    print(json.dumps(doc["part1_batch1_unconstrained"], indent=1)[:3000], flush=True)
    doc["part2_mixed_poisson"] = part2(engine, quick)
    write_result("batching", doc, quick=quick)


if __name__ == "__main__":
    main()
