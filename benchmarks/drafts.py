"""Amortized queries: draft and verify on the JSON extraction workload, greedy, batch 1.

Workload: benchmarks/data/extraction.json (12 chat prompts, each with a JSON schema; the outputs copy names,
numbers and places from the prompt), plus a free-form workload where drafts mostly fail (unconstrained
stories). Modes (`draft=` / `forced=` of `Engine.generate`):

  none            constrained, draft="none", forced=True — the engine's behaviour before drafts (baseline)
  forced          draft="forced": a sampled token and the forced run after it go through one forward
  lookup_only     draft="lookup", forced=False: prompt lookup alone (compare with none_unforced: forced=False
                  follows the model's own tokenization, not the constraint's canonical one)
  none_unforced   draft="none", forced=False: the reference for lookup_only
  both            draft="lookup", forced=True: forced runs and prompt lookup
  auto            draft="auto" (the default): the draft planner chooses the length per step
  unconstrained / unconstrained_lookup / unconstrained_auto: the same prompts without a schema
  freeform_none / freeform_auto: free-form prompts, drafts off / auto

Per mode and round: output tokens/s = generated tokens / decode time (prefill excluded), and tokens per trunk
pass (generated tokens / forwards the scheduler ran after prefill). Rounds interleave the modes in rotating
order; reported: median with IQR, ratio to the baseline paired by round with a bootstrap 95% CI, and whether
every mode gave the same tokens as its reference. The draft planner starts from a fresh state file (a
temporary cache directory), and warm-up rounds let it learn before timing (reported separately).

    python benchmarks/drafts.py [--rounds 5] [--max-tokens 96] [--quick]
    python benchmarks/drafts.py --lossy [--rounds 3]   # amortize="margin" at tau 1 and 4: speed vs disagreement
Writes benchmarks/results/drafts.json (+ drafts.png) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import (RESULTS, fmt_ratio, fmt_spread, interleaved_runs, paired_ratio_summary, quick_mode, summary,
                    write_result)

HERE = Path(__file__).parent
MODES = {
    "none": dict(constrained=True, draft="none", forced=True),
    "forced": dict(constrained=True, draft="forced", forced=True),
    "lookup_only": dict(constrained=True, draft="lookup", forced=False),
    "none_unforced": dict(constrained=True, draft="none", forced=False),
    "both": dict(constrained=True, draft="lookup", forced=True),
    "auto": dict(constrained=True, draft="auto", forced=True),
    "unconstrained": dict(constrained=False, draft="none", forced=True),
    "unconstrained_lookup": dict(constrained=False, draft="lookup", forced=True),
    "unconstrained_auto": dict(constrained=False, draft="auto", forced=True),
    "freeform_none": dict(constrained=False, draft="none", forced=True, freeform=True),
    "freeform_auto": dict(constrained=False, draft="auto", forced=True, freeform=True),
}
REFERENCE = {"forced": "none", "both": "none", "auto": "none", "lookup_only": "none_unforced",
             "unconstrained_lookup": "unconstrained", "unconstrained_auto": "unconstrained",
             "freeform_auto": "freeform_none"}
FREEFORM = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
            "Explain in a few paragraphs why the sky is blue.",
            "Describe your ideal weekend in detail.",
            "Write a poem about autumn leaves."]


def run_one(engine, prompt: str, mode: dict, schema, max_tokens: int) -> dict:
    import llmqp

    sched = llmqp.Scheduler(engine, max_slots=1)
    kw = {"json_schema": schema} if mode["constrained"] else {}
    extra = {k: mode[k] for k in ("amortize", "amortize_tau", "amortize_lambda") if k in mode}
    sched.add_request(dict(prompt=prompt, max_tokens=max_tokens, draft=mode["draft"], forced=mode["forced"], **kw,
                           **extra))
    result = None
    while sched.has_work():
        for e in sched.step():
            if isinstance(e, llmqp.FinishedEvent):
                result = e.result
    engine.save_planner()
    passes = sched.stats["decode_steps"] + sched.stats["feeds"]
    return {"tokens": len(result.token_ids), "decode_ms": result.decode_ms, "passes": passes,
            "drafted": result.drafted_tokens, "accepted": result.accepted_tokens, "ids": list(result.token_ids),
            "valid": bool(result.valid), "unverified": result.unverified_tokens,
            "checked": sum(d.drafted for d in result.drafts if d.checked),
            "disagreed": sum(d.disagreed for d in result.drafts if d.checked)}


def run_mode(engine, tasks, mode: dict, max_tokens: int) -> dict:
    rows = ([run_one(engine, p, mode, None, max_tokens) for p in FREEFORM] if mode.get("freeform") else
            [run_one(engine, t["prompt"], mode, t["schema"], max_tokens) for t in tasks])
    tokens = sum(r["tokens"] for r in rows)
    ms = sum(r["decode_ms"] for r in rows)
    return {"tokens": tokens, "tokens_per_s": tokens / (ms / 1e3), "passes": sum(r["passes"] for r in rows),
            "drafted": sum(r["drafted"] for r in rows), "accepted": sum(r["accepted"] for r in rows),
            "valid": sum(r["valid"] for r in rows), "outputs": [r["ids"] for r in rows],
            "unverified": sum(r["unverified"] for r in rows), "checked": sum(r["checked"] for r in rows),
            "disagreed": sum(r["disagreed"] for r in rows)}


LOSSY_MODES = {
    "none": MODES["none"],
    "exact_lookup": dict(constrained=True, draft="lookup", forced=True),
    "lossy_tau1": dict(constrained=True, draft="lookup", forced=True, amortize="margin", amortize_tau=1.0),
    "lossy_tau4": dict(constrained=True, draft="lookup", forced=True, amortize="margin", amortize_tau=4.0),
}


def run_lossy(engine, tasks, max_tokens: int, rounds: int, quick: bool) -> None:
    """The lossy amortized query (amortize="margin") at two thresholds: speed beside measured disagreement —
    the sampled checks' rate and, against exact decoding, the share of outputs and of token positions that
    differ."""
    for mode in LOSSY_MODES.values():
        run_mode(engine, tasks, mode, max_tokens)
    runs, tps = interleaved_runs(lambda n: run_mode(engine, tasks, LOSSY_MODES[n], max_tokens), LOSSY_MODES,
                                 rounds=rounds)
    exact = runs["none"][0]["outputs"]
    out = {}
    for name, rs in runs.items():
        outs = rs[0]["outputs"]
        diff_pos = sum(sum(a != b for a, b in zip(o, e)) + abs(len(o) - len(e)) for o, e in zip(outs, exact))
        out[name] = {**LOSSY_MODES[name], "tokens_per_s": summary(tps[name]),
                     "vs_none": paired_ratio_summary(tps[name], tps["none"]), "tokens": rs[0]["tokens"],
                     "unverified_tokens": rs[0]["unverified"],
                     "checked_disagreement_rate": rs[0]["disagreed"] / rs[0]["checked"] if rs[0]["checked"] else None,
                     "outputs_differing_from_exact": sum(o != e for o, e in zip(outs, exact)),
                     "token_positions_differing": diff_pos / max(sum(len(e) for e in exact), 1),
                     "valid": rs[0]["valid"]}
    write_result("drafts_lossy", {"model": engine.config.name, "prompts": len(tasks), "max_tokens": max_tokens,
                                  "rounds": rounds, "modes": out}, quick=quick)
    print("| mode | tokens/s | vs none (95% CI) | unverified tokens | checked disagreement | outputs differing "
          "from exact | valid |")
    print("|---|---|---|---|---|---|---|")
    for name, s in out.items():
        rate = "—" if s["checked_disagreement_rate"] is None else f"{s['checked_disagreement_rate']:.0%}"
        print(f"| {name} | {fmt_spread(s['tokens_per_s'])} | {fmt_ratio(s['vs_none'])}"
              f" | {s['unverified_tokens']} | {rate} | {s['outputs_differing_from_exact']} / {len(tasks)} | "
              f"{s['valid']} |")


def plot(summaries: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'llmqp[bench]')")
        return
    names = list(summaries)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].barh(names, [summaries[n]["tokens_per_pass"] for n in names], color="tab:blue")
    ax[0].set_xlabel("output tokens per trunk pass")
    ax[1].barh(names, [summaries[n]["tokens_per_s"]["median"] for n in names], color="tab:green")
    ax[1].set_xlabel("output tokens/s (median)")
    for a in ax:
        a.invert_yaxis()
    fig.suptitle("Draft and verify, SmolLM2-135M, greedy, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup-rounds", type=int, default=2, help="untimed rounds (compiles; the planner learns)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 3 prompts, 32 tokens, 1+1 rounds")
    ap.add_argument("--lossy", action="store_true", help="only the lossy amortize='margin' comparison "
                    "(results/drafts_lossy.json)")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    n_prompts, max_tokens, rounds, warmup = ((3, 32, 1, 1) if quick else
                                             (args.prompts, args.max_tokens, args.rounds, args.warmup_rounds))
    # A fresh planner state, so the numbers do not depend on what earlier runs taught it (XLA's compile cache
    # is kept: compiling is not what this measures).
    xla_cache = None
    try:
        from llmqp.model.loader import cache_dir

        xla_cache = cache_dir()
    except ImportError:
        pass
    tmp = tempfile.mkdtemp(prefix="llmqp-drafts-")
    os.environ["LLMQP_CACHE_DIR"] = tmp
    if xla_cache is not None:
        for sub in ("models", "xla"):
            if (xla_cache / sub).exists() and not (Path(tmp) / sub).exists():
                (Path(tmp) / sub).symlink_to(xla_cache / sub)
    import llmqp

    tasks = json.loads((HERE / "data" / "extraction.json").read_text())[:n_prompts]
    engine = llmqp.Engine()
    if args.lossy:
        run_lossy(engine, tasks, max_tokens, rounds, quick)
        return
    t0 = time.perf_counter()
    for _ in range(warmup):
        for mode in MODES.values():
            run_mode(engine, tasks, mode, max_tokens)
    warm_s = time.perf_counter() - t0
    runs, tps = interleaved_runs(lambda n: run_mode(engine, tasks, MODES[n], max_tokens), MODES, rounds=rounds)
    summaries = {}
    for name, rs in runs.items():
        base = "freeform_none" if MODES[name].get("freeform") else (
            "unconstrained" if not MODES[name]["constrained"] else "none")
        ref = REFERENCE.get(name)
        summaries[name] = {
            **{k: v for k, v in MODES[name].items()},
            "tokens_per_s": summary(tps[name]),
            "vs_baseline": paired_ratio_summary(tps[name], tps[base]), "baseline": base,
            "tokens": rs[0]["tokens"], "passes": rs[0]["passes"],
            "tokens_per_pass": rs[0]["tokens"] / max(rs[0]["passes"], 1),
            "drafted": rs[0]["drafted"], "accepted": rs[0]["accepted"],
            "acceptance": rs[0]["accepted"] / max(rs[0]["drafted"], 1),
            "valid": rs[0]["valid"],
            "identical_to": ref, "identical": None if ref is None else all(
                r["outputs"] == runs[ref][0]["outputs"] for r in rs),
        }
    drafted_planner = engine.draft_planner.stats
    out = {"model": engine.config.name, "device": engine.device, "prompts": len(tasks), "max_tokens": max_tokens,
           "rounds": rounds, "warmup_rounds": warmup, "warmup_seconds": warm_s, "modes": summaries,
           "draft_planner_state": drafted_planner,
           "auto_over_none": summaries["auto"]["vs_baseline"],
           "freeform_auto_over_none": summaries["freeform_auto"]["vs_baseline"]}
    write_result("drafts", out, quick=quick)
    if not quick:
        plot(summaries, RESULTS / "drafts.png")
    print(f"| mode | tokens/s, median (IQR), {rounds} rounds | vs baseline (95% CI) | tokens per pass | "
          f"drafted / accepted | same tokens as |")
    print("|---|---|---|---|---|---|")
    for name, s in summaries.items():
        same = "—" if s["identical_to"] is None else f"{s['identical_to']}: {'yes' if s['identical'] else 'NO'}"
        print(f"| {name} | {fmt_spread(s['tokens_per_s'])} | {fmt_ratio(s['vs_baseline'])} vs {s['baseline']} | {s['tokens_per_pass']:.2f} | {s['drafted']} / "
              f"{s['accepted']} | {same} |")


if __name__ == "__main__":
    main()
