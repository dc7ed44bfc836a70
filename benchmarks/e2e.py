"""End-to-end JSON extraction: output tokens/s, unconstrained vs constrained under each plan.

Workload: benchmarks/data/extraction.json (12 prompts, each with a JSON schema), greedy. Variants:
  unconstrained        the same prompts, no constraint
  dense                constrained, plan="dense", every token scored (forced=False)
  sparse               constrained, plan="sparse", every token scored (forced=False)
  sparse+forced        constrained, plan="sparse", forced runs fed through one multi-token forward
  auto+forced          constrained, plan="auto" (the default)
One round runs every variant over all prompts, variants in an order rotated each round; >= 5 rounds.
Per variant and round: output tokens/s = generated tokens / decode time (prefill excluded; it is the
same in every variant). Reported: the median over rounds with its IQR, the ratio to unconstrained
(paired by round, with a bootstrap 95% CI), and the tokens each variant generates (unconstrained output
is longer: it runs to max_tokens more often).

    python benchmarks/e2e.py [--max-tokens 128] [--rounds 5] [--quick]
Writes benchmarks/results/e2e.json (e2e.quick.json with --quick) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import fmt_ratio, fmt_spread, interleaved_runs, paired_ratio_summary, quick_mode, summary, write_result

import llmqp

HERE = Path(__file__).parent
VARIANTS = {
    "unconstrained": dict(constrained=False, plan="auto", forced=True),
    "dense": dict(constrained=True, plan="dense", forced=False),
    "sparse": dict(constrained=True, plan="sparse", forced=False),
    "sparse+forced": dict(constrained=True, plan="sparse", forced=True),
    "auto+forced": dict(constrained=True, plan="auto", forced=True),
}


def run_variant(engine, tasks, variant: dict, max_tokens: int) -> dict:
    tokens, decode_ms, valid, stopped, outputs = 0, 0.0, 0, 0, []
    for task in tasks:
        kw = {"json_schema": task["schema"]} if variant["constrained"] else {}
        r = engine.generate(task["prompt"], max_tokens=max_tokens, plan=variant["plan"], forced=variant["forced"],
                            **kw)
        tokens += len(r.token_ids)
        decode_ms += r.decode_ms
        valid += bool(r.valid)
        stopped += r.finish_reason == "stop"
        outputs.append(list(r.token_ids))
    return {"tokens": tokens, "decode_ms": decode_ms, "tokens_per_s": tokens / (decode_ms / 1e3),
            "valid": valid, "stopped": stopped, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=12, help="use the first N prompts")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 3 prompts, 32 tokens, 2 rounds")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    n_prompts, max_tokens, rounds = (3, 32, 2) if quick else (args.prompts, args.max_tokens, args.rounds)
    tasks = json.loads((HERE / "data" / "extraction.json").read_text())[:n_prompts]
    engine = llmqp.Engine()
    for variant in VARIANTS.values():  # compile every shape once before timing
        run_variant(engine, tasks[:2], variant, 16)
    runs, tps = interleaved_runs(lambda n: run_variant(engine, tasks, VARIANTS[n], max_tokens), VARIANTS,
                                 rounds=rounds)
    # Greedy decoding is deterministic: every round of a variant must give the same tokens.
    deterministic = all(r["outputs"] == rs[0]["outputs"] for rs in runs.values() for r in rs)
    # Forced runs follow the constraint's canonical tokenization, so compare plans at equal `forced`.
    same = (runs["dense"][0]["outputs"] == runs["sparse"][0]["outputs"]
            and runs["sparse+forced"][0]["outputs"] == runs["auto+forced"][0]["outputs"])
    summary_by_variant = {}
    for name, rs in runs.items():
        summary_by_variant[name] = {
            "tokens_per_s": summary(tps[name]),
            "vs_unconstrained": paired_ratio_summary(tps[name], tps["unconstrained"]),
            "tokens": rs[0]["tokens"], "valid": rs[0]["valid"], "stopped": rs[0]["stopped"],
            "decode_ms": summary([r["decode_ms"] for r in rs]),
        }
    out = {"model": engine.config.name, "device": engine.device, "prompts": len(tasks), "max_tokens": max_tokens,
           "rounds": rounds, "identical_tokens_across_plans": same, "deterministic_across_rounds": deterministic,
           "variants": summary_by_variant}
    write_result("e2e", out, quick=quick)
    print(f"| variant | output tokens/s, median (IQR) over {rounds} rounds | vs unconstrained (95% CI) | "
          f"tokens per round | valid / stopped |")
    print("|---|---|---|---|---|")
    for name, s in summary_by_variant.items():
        print(f"| {name} | {fmt_spread(s['tokens_per_s'])} | {fmt_ratio(s['vs_unconstrained'])} | {s['tokens']} | "
              f"{s['valid']} / {s['stopped']} of {len(tasks)} |")
    print(f"\nidentical tokens across plans (dense = sparse, sparse+forced = auto+forced): {same}; "
          f"same tokens in every round: {deterministic}")


if __name__ == "__main__":
    main()
