"""`llmqp serve` under load: requests/s, output tokens/s, TTFT and inter-token latency at concurrency 1, 4, 16.

Workload (mixed, as clients send it): chat requests cycling through a JSON schema (response_format), a
regex, a choice, a required tool call and an unconstrained answer; temperature 0.7 with a per-request seed;
max_tokens 32 (48 for tool calls). Every request is streamed (TTFT and inter-token latency are measured
by the client, from the SSE chunks; tokens per chunk come from the `llmqp.tokens` trace) and asks for the
usage chunk, so output tokens are counted from the server's usage, per request.

The server is the real `llmqp serve` CLI in a subprocess on a loopback port (one model load; JIT shapes
warmed by one untimed pass at each concurrency). At each concurrency C, `--requests-per-level`
requests (at least 2C) are sent by C client tasks; a level is repeated `--rounds` times, levels
interleaved round by round. Reported per level: requests/s and output tokens/s (median over rounds, with
the spread), and p50/p99 of TTFT and inter-token latency over every request/gap of every round.

llama-cpp-python's OpenAI server on the same GGUF is not measured: `llama_cpp` is not installed where this
was written (and is no dependency); the result records whether it is installed.

    python benchmarks/serve.py [--rounds 3] [--requests-per-level 16] [--quick]
Writes benchmarks/results/serve.json (serve.quick.json with --quick), serve.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, fmt_spread, quick_mode, summary, write_result

MODEL = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
KINDS = ("json", "regex", "choice", "tool", "free")


def request_body(i: int, max_tokens: int) -> dict:
    kind = KINDS[i % len(KINDS)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Request {i}: answer briefly."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    if kind == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    elif kind == "regex":
        body["guided_regex"] = r"[0-9]{3}-[0-9]{4}"
    elif kind == "choice":
        body["guided_choice"] = ["alpha", "beta", "gamma"]
    elif kind == "tool":
        body.update(tools=[WEATHER], tool_choice="required", max_tokens=max_tokens + 16)
    return body


async def one_request(client, body: dict) -> dict:
    """Stream one request; client-side TTFT (s), inter-token gaps (s, a chunk's gap split over its tokens)
    and the server's usage count of output tokens."""
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            n = len(chunk["choices"][0].get("llmqp", {}).get("tokens", []))
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - start
                gaps.extend([0.0] * (n - 1))
            else:
                gaps.extend([(now - last) / n] * n)
            last = now
    return {"ttft_s": first, "gaps_s": gaps, "tokens": tokens, "latency_s": time.perf_counter() - start}


async def run_level(base: str, key: str | None, concurrency: int, n_requests: int, offset: int,
                    max_tokens: int) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(request_body(offset + i, max_tokens))
    results = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=1200,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker():
            while not queue.empty():
                body = queue.get_nowait()
                results.append(await one_request(client, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "requests": len(results), "tokens": tokens, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "ttft_s": [r["ttft_s"] for r in results if r["ttft_s"] is not None],
            "gaps_s": [g for r in results for g in r["gaps_s"]]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llmqp(port: int, max_batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "llmqp.cli", "serve", "--port", str(port), "--max-batch",
                             str(max_batch), "--max-waiting", "256", "--log-level", "warning"])
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    return proc


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited while starting")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def measure(base: str, levels: list[int], rounds: int, per_level: int, max_tokens: int) -> dict:
    out = {}
    for c in levels:  # warm-up: the batch shapes of this concurrency, untimed
        asyncio.run(run_level(base, None, c, max(c, 5), 10_000 + 100 * c, max_tokens))
    samples = {c: [] for c in levels}
    offset = 0
    for r in range(rounds):
        for j in range(len(levels)):
            c = levels[(r + j) % len(levels)]
            n = max(per_level, 2 * c)
            samples[c].append(asyncio.run(run_level(base, None, c, n, offset, max_tokens)))
            offset += n
            s = samples[c][-1]
            print(f"  round {r} concurrency {c}: {s['requests']} requests in {s['wall_s']:.1f} s, "
                  f"{s['tokens_per_s']:.1f} tok/s", flush=True)
    for c in levels:
        runs = samples[c]
        ttft = [t for s in runs for t in s["ttft_s"]]
        gaps = [g for s in runs for g in s["gaps_s"]]
        out[str(c)] = {
            "requests_per_s": summary([s["requests_per_s"] for s in runs]),
            "output_tokens_per_s": summary([s["tokens_per_s"] for s in runs]),
            "ttft_ms": {"p50": percentile_ms(ttft, 50), "p99": percentile_ms(ttft, 99), "n": len(ttft)},
            "itl_ms": {"p50": percentile_ms(gaps, 50), "p99": percentile_ms(gaps, 99), "n": len(gaps)},
            "requests": sum(s["requests"] for s in runs), "output_tokens": sum(s["tokens"] for s in runs),
        }
    return out


def plot(levels: list[int], results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, res in results.items():
        xs = [c for c in levels if str(c) in res]
        tps = [res[str(c)]["output_tokens_per_s"] for c in xs]
        axes[0].errorbar(xs, [t["median"] for t in tps],
                         yerr=[[t["median"] - t["q1"] for t in tps], [t["q3"] - t["median"] for t in tps]],
                         marker="o", capsize=3, label=name)
        for ax, key in ((axes[1], "ttft_ms"), (axes[2], "itl_ms")):
            ax.plot(xs, [res[str(c)][key]["p50"] for c in xs], marker="o", label=f"{name} p50")
            ax.plot(xs, [res[str(c)][key]["p99"] for c in xs], marker="x", linestyle="--", label=f"{name} p99")
    for ax, title in zip(axes, ("output tokens/s (median, IQR)", "time to first token (ms)",
                                "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("llmqp serve, mixed constrained workload (streamed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def table(levels: list[int], results: dict) -> str:
    rows = ["| server | clients | requests/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        for c in levels:
            r = res[str(c)]
            rows.append(f"| {name} | {c} | {fmt_spread(r['requests_per_s'], 2)} | "
                        f"{fmt_spread(r['output_tokens_per_s'])} | {r['ttft_ms']['p50']:.0f} / "
                        f"{r['ttft_ms']['p99']:.0f} | {r['itl_ms']['p50']:.0f} / {r['itl_ms']['p99']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests-per-level", type=int, default=16, help="requests per level and round (>= 2C)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 1 round, concurrency 1 and 4, 16 tokens")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    levels = [1, 4] if quick else [1, 4, 16]
    rounds, max_tokens = (1, 16) if quick else (args.rounds, args.max_tokens)
    per_level = 4 if quick else args.requests_per_level

    port = free_port()
    proc = start_llmqp(port, args.max_batch)
    try:
        print(f"llmqp serve on port {port}", flush=True)
        results = {"llmqp": measure(f"http://127.0.0.1:{port}", levels, rounds, per_level, max_tokens)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    llama = ("installed (the side-by-side run is not written yet: it was never installable here to test)"
             if importlib.util.find_spec("llama_cpp") else "not installed: side-by-side run skipped")
    doc = {"workload": {"kinds": list(KINDS), "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
                        "levels": levels, "rounds": rounds, "requests_per_level": per_level,
                        "max_batch": args.max_batch},
           "results": results, "llama_cpp_python": llama, "cpu_count": os.cpu_count()}
    write_result("serve", doc, quick=quick)
    plot(levels, results, RESULTS / ("serve.quick.png" if quick else "serve.png"))
    print(table(levels, results))


if __name__ == "__main__":
    main()
