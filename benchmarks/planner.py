"""Planner benchmark: total decode time of a mixed workload under every static plan, the planner
(plan="auto") starting cold and warm, and the per-step oracle.

Workload: 16 requests mixing JSON-schema extraction, regexes, choices and unconstrained prompts, run at
batch sizes 1, 4 and 16 (max_tokens 32). Every plan produces identical tokens, so the sequence of scoring
steps is the same in every run and can be compared step by step:

  wall_ms        measured wall time of the whole run (prefill included: identical for every plan)
  head_ms        sum of the measured plan-dependent part of every scoring step (score + sample)
  modelled_ms    common_ms + head_ms, where common_ms (trunk, masks, prefill: plan-independent) is the
                 median over static runs of wall_ms - head_ms; this removes the trunk's run-to-run noise
  oracle         common_ms + sum over steps of the cheapest plan's head time at that step (in hindsight,
                 from the static runs' measurements)

Writes benchmarks/results/planner.json and planner.png, prints a Markdown table.
    python benchmarks/planner.py [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import llmqp
from llmqp.planner import Planner, Policy
from llmqp.plans import PlanKind

HERE = Path(__file__).parent
REGEXES = [r"\(\d{3}\) \d{3}-\d{4}", r"[A-Z][a-z]+ [A-Z][a-z]+", r"20\d\d-[01]\d-[0-3]\d", r"#[0-9a-f]{6}"]
CHOICES = [["positive", "negative", "neutral"], ["yes", "no"], ["red", "green", "blue", "yellow"],
           ["Paris", "London", "Berlin", "Madrid", "Rome"]]
FREE = ["Tell me a fact about octopuses.", "Describe the moon in one sentence.",
        "Give a tip for learning to cook.", "What is a prime number?"]


def workload(max_tokens: int) -> list[dict]:
    tasks = json.loads((HERE / "data" / "extraction.json").read_text())
    # Grouped by kind: batches of 4 are homogeneous (the plan choice differs between them), the batch of
    # 16 mixes everything (an unconstrained row needs the full head, which then serves every row).
    reqs = [dict(prompt=tasks[i]["prompt"], json_schema=tasks[i]["schema"], max_tokens=max_tokens) for i in range(4)]
    reqs += [dict(prompt=f"Write a value matching {r}", regex=r, max_tokens=max_tokens) for r in REGEXES]
    reqs += [dict(prompt=f"Choose one of: {', '.join(c)}.", choice=c, max_tokens=max_tokens) for c in CHOICES]
    reqs += [dict(prompt=p, max_tokens=max_tokens) for p in FREE]
    return reqs


class Recording(Policy):
    """Delegates to a planner and records every scoring step's (plan, head latency)."""

    def __init__(self, inner: Planner):
        self.inner = inner
        self.steps: list[tuple[str, float]] = []

    def choose(self, ctx, arms):
        return self.inner.choose(ctx, arms)

    def update(self, ctx, arm, latency_ms):
        self.steps.append((arm.value, latency_ms))
        self.inner.update(ctx, arm, latency_ms)

    def predict_ms(self, ctx, arms):
        return self.inner.predict_ms(ctx, arms)

    def save(self):
        return self.inner.save()


def run(engine, reqs, batch: int, plan: str, policy: Recording):
    engine._planner = policy
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(reqs), batch):
        outs += engine.generate_batch(reqs[i : i + batch], plan=plan)
    wall = (time.perf_counter() - t0) * 1e3
    return {"wall_ms": wall, "head_ms": sum(ms for _, ms in policy.steps), "steps": list(policy.steps),
            "tokens": [r.token_ids for r in outs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16")
    args = ap.parse_args()
    engine = llmqp.Engine()
    reqs = workload(args.max_tokens)
    model, device = engine.config.name, engine.device_kind
    results = {"model": model, "device": engine.device, "requests": len(reqs), "max_tokens": args.max_tokens,
               "batches": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        statics = ["dense", "sparse"] + (["sparse_union"] if batch > 1 else [])
        # compile every shape this batch size meets, with a throwaway planner
        for plan in statics:
            run(engine, reqs, batch, plan, Recording(Planner(model, device)))
        cold = Recording(Planner(model, device))  # fresh: the roofline prior only
        runs = {"auto (cold)": run(engine, reqs, batch, "auto", cold)}
        shared = Recording(Planner(model, device))
        shared.inner = cold.inner  # warm = what the cold run learned, plus the static runs below
        for plan in statics:
            shared.steps = []
            runs[plan] = run(engine, reqs, batch, plan, shared)
        shared.steps = []
        runs["auto (warm)"] = run(engine, reqs, batch, "auto", shared)
        baseline = runs[statics[0]]["tokens"]
        assert all(r["tokens"] == baseline for r in runs.values()), "plans disagree on tokens"
        n_steps = {len(r["steps"]) for r in runs.values()}
        assert len(n_steps) == 1, n_steps
        common = statistics.median(runs[p]["wall_ms"] - runs[p]["head_ms"] for p in statics)
        oracle_head = sum(min(runs[p]["steps"][i][1] for p in statics) for i in range(n_steps.pop()))
        table = {}
        for name, r in runs.items():
            plans_used = {}
            for plan, _ in r["steps"]:
                plans_used[plan] = plans_used.get(plan, 0) + 1
            table[name] = {"wall_ms": r["wall_ms"], "head_ms": r["head_ms"], "modelled_ms": common + r["head_ms"],
                           "plans_used": plans_used}
        table["oracle"] = {"wall_ms": None, "head_ms": oracle_head, "modelled_ms": common + oracle_head,
                           "plans_used": {}}
        best_static = min(statics, key=lambda p: table[p]["modelled_ms"])
        oracle_ms = table["oracle"]["modelled_ms"]
        for row in table.values():
            row["vs_oracle"] = row["modelled_ms"] / oracle_ms
        results["batches"][str(batch)] = {"common_ms": common, "best_static": best_static, "runs": table}
        print(f"B={batch}: " + ", ".join(f"{k} {v['modelled_ms']:.0f} ms" for k, v in table.items()), flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "planner.json").write_text(json.dumps(results, indent=2))
    print("\n| batch | run | modelled total ms | wall ms | head ms | vs oracle | plans used (scoring steps) |")
    print("|---|---|---|---|---|---|---|")
    for batch, b in results["batches"].items():
        for name, r in b["runs"].items():
            wall = f"{r['wall_ms']:.0f}" if r["wall_ms"] is not None else "–"
            used = ", ".join(f"{k} {v}" for k, v in sorted(r["plans_used"].items()))
            print(f"| {batch} | {name} | {r['modelled_ms']:.0f} | {wall} | {r['head_ms']:.0f} | "
                  f"{r['vs_oracle']:.3f} | {used} |")
    _plot(results, HERE / "results" / "planner.png")


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    batches = list(results["batches"])
    names = ["dense", "sparse", "sparse_union", "auto (cold)", "auto (warm)", "oracle"]
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.6))
    for ax, batch in zip(axes if len(batches) > 1 else [axes], batches):
        runs = results["batches"][batch]["runs"]
        shown = [n for n in names if n in runs]
        head = [runs[n]["head_ms"] for n in shown]
        colors = {"auto (cold)": "#4a90d9", "auto (warm)": "#1f5fa8", "oracle": "#2a2"}
        ax.bar(range(len(shown)), head, color=[colors.get(n, "#999") for n in shown])
        ax.set_xticks(range(len(shown)), [n.replace(" ", "\n") for n in shown], fontsize=7)
        ax.set_title(f"batch {batch}: plan-dependent time")
        ax.set_ylabel("head + sampling, ms (whole workload)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
