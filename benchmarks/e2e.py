"""End-to-end JSON extraction: output tokens/s, unconstrained vs constrained under each plan.

Workload: benchmarks/data/extraction.json (12 prompts, each with a JSON schema). Modes, in one run:
  unconstrained        the same prompts, no constraint
  dense                constrained, plan="dense", every token scored (forced=False)
  sparse               constrained, plan="sparse", every token scored (forced=False)
  sparse+forced        constrained, plan="sparse", forced runs fed through one multi-token forward
  auto+forced          constrained, plan="auto" (the default)
Output tokens/s = generated tokens / decode time (prefill excluded; it is identical in every mode).

    python benchmarks/e2e.py [--max-tokens 128] [--repeats 2]
Writes benchmarks/results/e2e.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import llmqp

HERE = Path(__file__).parent
MODES = {
    "unconstrained": dict(constrained=False, plan="auto", forced=True),
    "dense": dict(constrained=True, plan="dense", forced=False),
    "sparse": dict(constrained=True, plan="sparse", forced=False),
    "sparse+forced": dict(constrained=True, plan="sparse", forced=True),
    "auto+forced": dict(constrained=True, plan="auto", forced=True),
}


def run_mode(engine, tasks, mode: dict, max_tokens: int) -> dict:
    tokens, decode_ms, valid, stopped = 0, 0.0, 0, 0
    outputs = []
    for task in tasks:
        kw = {"json_schema": task["schema"]} if mode["constrained"] else {}
        r = engine.generate(task["prompt"], max_tokens=max_tokens, plan=mode["plan"], forced=mode["forced"], **kw)
        tokens += len(r.token_ids)
        decode_ms += r.decode_ms
        valid += r.valid
        stopped += r.finish_reason == "stop"
        outputs.append(r.token_ids)
    return {"tokens": tokens, "decode_ms": decode_ms, "tokens_per_s": tokens / (decode_ms / 1e3),
            "valid": valid, "stopped": stopped, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tasks = json.loads((HERE / "data" / "extraction.json").read_text())
    engine = llmqp.Engine()
    for mode in MODES.values():  # compile every shape once before timing
        run_mode(engine, tasks[:2], mode, 16)
    runs = {name: [] for name in MODES}
    for _ in range(args.repeats):  # interleave modes so drift hits them alike
        for name, mode in MODES.items():
            runs[name].append(run_mode(engine, tasks, mode, args.max_tokens))
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                         "tokens": rs[0]["tokens"], "valid": rs[0]["valid"], "stopped": rs[0]["stopped"],
                         "prompts": len(tasks)}
    # Forced runs follow the constraint's canonical tokenization, so compare plans at equal `forced`.
    same = (runs["dense"][0]["outputs"] == runs["sparse"][0]["outputs"]
            and runs["sparse+forced"][0]["outputs"] == runs["auto+forced"][0]["outputs"])
    base = summary["unconstrained"]["tokens_per_s"]
    for s in summary.values():
        s["ratio_vs_unconstrained"] = s["tokens_per_s"] / base
    out = {"model": engine.config.name, "device": engine.device, "max_tokens": args.max_tokens,
           "identical_tokens_across_plans": same, "modes": summary}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "e2e.json").write_text(json.dumps(out, indent=2))
    print("| mode | output tokens/s | vs unconstrained | tokens | valid / stopped |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['tokens_per_s']:.1f} | {s['ratio_vs_unconstrained']:.2f}x | {s['tokens']} | "
              f"{s['valid']}/{s['stopped']} of {s['prompts']} |")
    print(f"\nidentical tokens across plans (dense = sparse, sparse+forced = auto+forced): {same}")


if __name__ == "__main__":
    main()
