"""Batch extraction throughput: `llmqp batch` vs a Python loop over `Engine.generate`, and Ray with 1 and 2 actors.

Workload: N rows built from benchmarks/data/extraction.json (12 prompts with their JSON schemas, cycled;
each row carries its own schema and a distinct record number), greedy, `--max-tokens` per row. Modes:
  loop        for each row: engine.generate(prompt, json_schema=...)            (one request at a time)
  batch       llmqp.batch.run_batch: the scheduler, --max-batch rows in flight   (continuous batching)
  ray-1       llmqp batch --ray, 1 actor  (local cluster, num_cpus = the machine's cores)
  ray-2       llmqp batch --ray, 2 actors
loop and batch share one engine, warmed up first (compile excluded); every Ray mode starts its own actors,
so its wall time includes the actors' engine load and compile (reported apart as time to the first row).
Rows/s = rows / wall; output tok/s = generated tokens (counted per row) / wall. Outputs of batch and ray
are checked equal to the loop's (greedy).

    python benchmarks/batch.py [--rows 200] [--max-tokens 64] [--max-batch 8] [--modes loop,batch,ray-1,ray-2]
Writes benchmarks/results/batch.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import llmqp
from llmqp.batch import BatchConfig, run_batch

HERE = Path(__file__).parent


def make_rows(n: int) -> list[dict]:
    tasks = json.loads((HERE / "data" / "extraction.json").read_text())
    return [{"id": i, "prompt": f"{tasks[i % len(tasks)]['prompt']} (record {i})",
             "json_schema": tasks[i % len(tasks)]["schema"]} for i in range(n)]


def read_rows(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def run_loop(engine, rows, max_tokens: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    out, tokens = {}, 0
    for row in rows:
        r = engine.generate(row["prompt"], json_schema=row["json_schema"], max_tokens=max_tokens)
        tokens += len(r.token_ids)
        out[row["id"]] = {"text": r.text, "valid": r.valid, "finish_reason": r.finish_reason}
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": len(rows), "output_tokens": tokens}, out


def run_mode_batch(engine, src: Path, workdir: Path, config: BatchConfig) -> tuple[dict, dict]:
    dst = workdir / "batch.jsonl"
    summary = run_batch(engine, src, dst, config, progress=False)
    out = {k: {"text": r["text"], "valid": r["valid"], "finish_reason": r["finish_reason"]}
           for k, r in read_rows(dst).items()}
    return {"wall_s": summary.seconds, "rows": summary.done, "output_tokens": summary.output_tokens}, out


def run_mode_ray(src: Path, workdir: Path, config: BatchConfig, actors: int) -> tuple[dict, dict]:
    from llmqp.ray import import_ray, run_batch_ray

    ray = import_ray()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        dst = workdir / f"ray{actors}.jsonl"
        # Time to the first row: actor start, engine load, compile. Measured by polling the output file.
        import threading

        first = {}

        def watch(t0=time.perf_counter()):
            while "t" not in first and not first.get("stop"):
                if dst.exists() and dst.stat().st_size > 0:
                    first["t"] = time.perf_counter() - t0
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        summary = run_batch_ray(src, dst, config, actors=actors, progress=False)
        first["stop"] = True
    finally:
        ray.shutdown()
    out = {k: {"text": r["text"], "valid": r["valid"], "finish_reason": r["finish_reason"]}
           for k, r in read_rows(dst).items()}
    return {"wall_s": summary.seconds, "rows": summary.done, "output_tokens": summary.output_tokens,
            "first_row_s": first.get("t")}, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--modes", default="loop,batch,ray-1,ray-2")
    args = ap.parse_args()
    modes = args.modes.split(",")
    rows = make_rows(args.rows)
    config = BatchConfig(max_tokens=args.max_tokens, max_batch=args.max_batch)
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        src = workdir / "in.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if "loop" in modes or "batch" in modes:
            engine = llmqp.Engine()
            warm = workdir / "warm.jsonl"
            warm.write_text("".join(json.dumps(dict(r, id=f"w{i}")) + "\n" for i, r in enumerate(make_rows(12))))
            run_batch(engine, warm, workdir / "warm-out.jsonl", config, progress=False)  # compile shapes
            run_loop(engine, rows[:2], args.max_tokens)
            if "loop" in modes:
                results["loop"], outputs["loop"] = run_loop(engine, rows, args.max_tokens)
                print("loop", results["loop"], flush=True)
            if "batch" in modes:
                results["batch"], outputs["batch"] = run_mode_batch(engine, src, workdir, config)
                print("batch", results["batch"], flush=True)
            del engine
        for mode in modes:
            if mode.startswith("ray-"):
                results[mode], outputs[mode] = run_mode_ray(src, workdir, config, int(mode.split("-")[1]))
                print(mode, results[mode], flush=True)
    for r in results.values():
        r["rows_per_s"] = r["rows"] / r["wall_s"]
        r["output_tokens_per_s"] = r["output_tokens"] / r["wall_s"]
    reference = outputs.get("loop") or outputs.get("batch")
    same = {mode: out == reference for mode, out in outputs.items()}
    base = results.get("loop", {}).get("rows_per_s")
    for r in results.values():
        r["speedup_vs_loop"] = r["rows_per_s"] / base if base else None
    valid = {mode: sum(o["valid"] for o in out.values()) for mode, out in outputs.items()}
    report = {"model": "SmolLM2-135M-Instruct (embedded)", "cpu_cores": os.cpu_count(), "rows": args.rows,
              "max_tokens": args.max_tokens, "max_batch": args.max_batch, "modes": results,
              "valid_rows": valid, "outputs_equal_loop": same}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "batch.json").write_text(json.dumps(report, indent=2))
    print("| mode | rows/s | output tok/s | vs loop | wall s | first row s | outputs = loop |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        first = r.get("first_row_s")
        print(f"| {mode} | {r['rows_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
              f"{r['speedup_vs_loop'] or 0:.2f}x | {r['wall_s']:.1f} | "
              f"{'' if first is None else f'{first:.1f}'} | {same[mode]} |")


if __name__ == "__main__":
    main()
