"""Planner benchmark: the plan-dependent time (head + sampling) of a mixed workload under every static
plan, the planner (plan="auto") starting cold and warm, and the per-step oracle — and the total beside.

Workload "score" (the one every run is measured on): 16 requests mixing JSON-schema extraction,
regexes, choices and unconstrained prompts, at batch sizes 1, 4 and 16 (max_tokens 32). Workload
"train" has other prompts, schemas, regexes and choices: the *warm* planner learns on it (one pass at
the same batch size) before it is scored, so warm is not scored on what it trained on.

How each run is steered, through public API only: every run uses plan="auto", and the engine's planner
(`engine.planner`) gets a policy per run — a fixed arm for the static plans (dense everywhere, sparse
wherever applicable, sparse_union wherever applicable), a fresh `LinUCBPolicy` for cold, a trained one
for warm. The policy records the scheduler's measured plan-dependent time of every scoring step (score
+ sample, ms). Every plan produces identical tokens, so the scoring steps align across runs.

  head_ms       sum over scoring steps of the measured head + sampling time: what the planner controls
  oracle        per step, the cheapest plan's median head time over the rounds, summed (in hindsight)
  regret        (head_ms − oracle) / oracle, per round; median and IQR over rounds
  wall_ms       the whole run (prefill, trunk, masks included: ~90% of it is plan-independent)

Rounds run every variant once, in rotating order. Where auto's head time exceeds the best static plan's
(median of the paired per-round difference > 0), the table says so.

Writes benchmarks/results/planner.json and planner.png, prints a Markdown table.
    python benchmarks/planner.py [--max-tokens 32] [--rounds 3] [--quick]
"""

from __future__ import annotations

import json
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import bootstrap_ci, quick_mode, summary, write_result

import llmqp
from llmqp.planner import LinUCBPolicy, roofline_for
from llmqp.plans import PlanKind

HERE = Path(__file__).parent
SCORE = dict(
    tasks=range(0, 4),
    regexes=[r"\(\d{3}\) \d{3}-\d{4}", r"[A-Z][a-z]+ [A-Z][a-z]+", r"20\d\d-[01]\d-[0-3]\d", r"#[0-9a-f]{6}"],
    choices=[["positive", "negative", "neutral"], ["yes", "no"], ["red", "green", "blue", "yellow"],
             ["Paris", "London", "Berlin", "Madrid", "Rome"]],
    free=["Tell me a fact about octopuses.", "Describe the moon in one sentence.",
          "Give a tip for learning to cook.", "What is a prime number?"])
TRAIN = dict(
    tasks=range(4, 8),
    regexes=[r"[A-Z]{3}-\d{4}", r"\d{1,3}(\.\d{1,3}){3}", r"[a-z]+@[a-z]+\.(com|org)", r"v\d+\.\d+\.\d+"],
    choices=[["cat", "dog", "bird"], ["true", "false"], ["north", "south", "east", "west"],
             ["small", "medium", "large", "extra large"]],
    free=["Name a famous painting.", "Why is the sky blue?", "Suggest a name for a boat.",
          "Explain what a compiler does."])


def workload(spec: dict, max_tokens: int) -> list[dict]:
    tasks = json.loads((HERE / "data" / "extraction.json").read_text())
    # Grouped by kind: batches of 4 are homogeneous (the plan choice differs between them), a batch of 16
    # mixes everything (an unconstrained row needs the full head, which then serves every row).
    reqs = [dict(prompt=tasks[i]["prompt"], json_schema=tasks[i]["schema"], max_tokens=max_tokens)
            for i in spec["tasks"]]
    reqs += [dict(prompt=f"Write a value matching {r}", regex=r, max_tokens=max_tokens) for r in spec["regexes"]]
    reqs += [dict(prompt=f"Choose one of: {', '.join(c)}.", choice=c, max_tokens=max_tokens)
             for c in spec["choices"]]
    reqs += [dict(prompt=p, max_tokens=max_tokens) for p in spec["free"]]
    return reqs


class Steered(LinUCBPolicy):
    """A LinUCB policy (so the planner can save it) that records every scoring step's (plan, ms) and,
    with `fixed`, always picks that arm where it applies (else dense)."""

    def __init__(self, device_kind: str, fixed: PlanKind | None = None):
        super().__init__(roofline_for(device_kind))
        self.fixed = fixed
        self.steps: list[tuple[str, float]] = []

    def choose(self, ctx, arms):
        if self.fixed is None:
            return super().choose(ctx, arms)
        for arm in (PlanKind.FORCED, self.fixed, PlanKind.DENSE):
            if arm in arms:
                return arm
        return arms[0]

    def update(self, ctx, arm, latency_ms):
        self.steps.append((getattr(arm, "value", arm), latency_ms))
        super().update(ctx, arm, latency_ms)


def run(engine, reqs, batch: int, policy: Steered) -> dict:
    engine.planner.policy = policy
    policy.steps = []
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(reqs), batch):
        outs += engine.generate_batch(reqs[i: i + batch], plan="auto")
    wall = (time.perf_counter() - t0) * 1e3
    return {"wall_ms": wall, "head_ms": sum(ms for _, ms in policy.steps), "steps": list(policy.steps),
            "tokens": [list(r.token_ids) for r in outs]}


def bench_batch(engine, score, train, batch: int, rounds: int) -> dict:
    device = engine.device_kind
    statics = [PlanKind.DENSE, PlanKind.SPARSE] + ([PlanKind.SPARSE_UNION] if batch > 1 else [])
    for plan in statics:  # compile every shape the scored workload meets at this batch size
        run(engine, score, batch, Steered(device, plan))
    names = [p.value for p in statics] + ["auto (cold)", "auto (warm)"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if name == "auto (warm)":
                policy = Steered(device)
                run(engine, train, batch, policy)  # learn on the other workload first
            else:
                policy = Steered(device, None if name == "auto (cold)" else PlanKind(name))
            runs[name].append(run(engine, score, batch, policy))
    baseline = runs[names[0]][0]["tokens"]
    assert all(x["tokens"] == baseline for rs in runs.values() for x in rs), "plans disagree on tokens"
    n_steps = {len(x["steps"]) for rs in runs.values() for x in rs}
    assert len(n_steps) == 1, f"scoring steps differ between runs: {n_steps}"
    n_steps = n_steps.pop()
    # per step and static plan: the median head time over rounds; the oracle takes the cheapest
    per_step = {p.value: np.median([[ms for _, ms in x["steps"]] for x in runs[p.value]], axis=0) for p in statics}
    oracle_choice = [min(per_step, key=lambda p: per_step[p][i]) for i in range(n_steps)]
    oracle_head = float(sum(per_step[p][i] for i, p in enumerate(oracle_choice)))
    table = {}
    for name, rs in runs.items():
        head = [x["head_ms"] for x in rs]
        used: dict[str, int] = {}
        for plan, _ in rs[-1]["steps"]:
            used[plan] = used.get(plan, 0) + 1
        table[name] = {"head_ms": summary(head), "wall_ms": summary([x["wall_ms"] for x in rs]),
                       "regret": summary([h / oracle_head - 1 for h in head]), "plans_used": used}
    oracle_used: dict[str, int] = {}
    for p in oracle_choice:
        oracle_used[p] = oracle_used.get(p, 0) + 1
    best_static = min((p.value for p in statics), key=lambda p: table[p]["head_ms"]["median"])
    losses = []
    for name in ("auto (cold)", "auto (warm)"):
        for p in statics:
            diff = np.subtract(table[name]["head_ms"]["samples"], table[p.value]["head_ms"]["samples"])
            if np.median(diff) > 0:
                lo, hi = bootstrap_ci(diff)
                losses.append({"auto": name, "static": p.value, "extra_head_ms": float(np.median(diff)),
                               "ci95": [lo, hi], "outside_noise": bool(lo > 0),
                               "relative": float(np.median(diff) / table[p.value]["head_ms"]["median"])})
    return {"scoring_steps": n_steps, "oracle_head_ms": oracle_head, "oracle_plans_used": oracle_used,
            "best_static": best_static, "runs": table, "auto_loses_to_static": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CI-sized: batch 4 only, 16 tokens, 1 round")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    batches = [4] if quick else [int(b) for b in args.batches.split(",")]
    max_tokens, rounds = (16, 1) if quick else (args.max_tokens, args.rounds)
    engine = llmqp.Engine()
    # Planner files of these experiments go to a scratch directory, not the user's cache (weights and
    # compiled programs were already located above).
    scratch = tempfile.TemporaryDirectory()
    os.environ["LLMQP_CACHE_DIR"] = scratch.name
    score, train = workload(SCORE, max_tokens), workload(TRAIN, max_tokens)
    results = {"model": engine.config.name, "device": engine.device, "requests": len(score),
               "max_tokens": max_tokens, "rounds": rounds, "batches": {}}
    for batch in batches:
        b = bench_batch(engine, score, train, batch, rounds)
        results["batches"][str(batch)] = b
        print(f"B={batch}: oracle {b['oracle_head_ms']:.0f} ms; " + ", ".join(
            f"{k} {v['head_ms']['median']:.0f} ms" for k, v in b["runs"].items()), flush=True)
        write_result("planner", results, quick=quick)  # after every batch size: a long run is never all lost
    print(f"\n| batch | run | head + sampling ms, median (IQR) over {rounds} rounds | regret vs oracle, median "
          "(IQR) | wall s, median | plans used (scoring steps) |")
    print("|---|---|---|---|---|---|")
    for batch, b in results["batches"].items():
        for name, r in b["runs"].items():
            h, g = r["head_ms"], r["regret"]
            used = ", ".join(f"{k} {v}" for k, v in sorted(r["plans_used"].items()))
            print(f"| {batch} | {name} | {h['median']:.0f} ({h['q1']:.0f}–{h['q3']:.0f}) | "
                  f"{100 * g['median']:+.1f}% ({100 * g['q1']:+.1f} to {100 * g['q3']:+.1f}) | "
                  f"{r['wall_ms']['median'] / 1e3:.1f} | {used} |")
        used = ", ".join(f"{k} {v}" for k, v in sorted(b["oracle_plans_used"].items()))
        print(f"| {batch} | oracle | {b['oracle_head_ms']:.0f} | 0 | – | {used} |")
    print("\nwhere auto loses to a static plan (median extra head ms, 95% CI):")
    for batch, b in results["batches"].items():
        for loss in b["auto_loses_to_static"]:
            print(f"  B={batch}: {loss['auto']} vs {loss['static']}: +{loss['extra_head_ms']:.0f} ms "
                  f"({100 * loss['relative']:+.1f}%, CI {loss['ci95'][0]:.0f}..{loss['ci95'][1]:.0f}"
                  f"{'' if loss['outside_noise'] else ', within noise'})")
    _plot(results, HERE / "results" / ("planner.quick.png" if quick else "planner.png"))


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    batches = list(results["batches"])
    names = ["dense", "sparse", "sparse_union", "auto (cold)", "auto (warm)"]
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        b = results["batches"][batch]
        shown = [n for n in names if n in b["runs"]]
        med = [b["runs"][n]["head_ms"]["median"] for n in shown] + [b["oracle_head_ms"]]
        lo = [b["runs"][n]["head_ms"]["q1"] for n in shown] + [b["oracle_head_ms"]]
        hi = [b["runs"][n]["head_ms"]["q3"] for n in shown] + [b["oracle_head_ms"]]
        colors = {"auto (cold)": "#4a90d9", "auto (warm)": "#1f5fa8"}
        labels = shown + ["oracle"]
        ax.bar(range(len(labels)), med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], capsize=3,
               color=[colors.get(n, "#2a2" if n == "oracle" else "#999") for n in labels])
        ax.set_xticks(range(len(labels)), [n.replace(" ", "\n") for n in labels], fontsize=7)
        ax.set_title(f"batch {batch}: head + sampling (IQR bars)")
        ax.set_ylabel("ms, whole workload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
