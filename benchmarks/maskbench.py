"""MaskBench: coverage, correctness and mask cost of the constraint layer on 2,778 real-world JSON schemas.

For every schema in ../shared/data/maskbench (JSONSchemaBench format) and the SmolLM2 tokenizer:
  * compile it with strict=False (JSON-Schema semantics) and strict=True: compiled, or ConstraintError
    (anything else is counted as a crash; the target is zero); coverage is measured with the default
    `unknown_formats="refuse"`; schemas refused only for a non-standard format are compiled again with
    `unknown_formats="annotation"` and their instances checked, reported apart;
  * check every test instance, serialised compactly with keys in the instance's order, with
    `accepts()`: a valid instance rejected is a false rejection, an invalid one accepted a false
    acceptance (strict=True is only checked for false acceptances: it rejects extra properties on purpose);
  * walk the canonical tokens of every valid instance through a matcher and time `allowed()` at each
    step (µs per token, including bitmask -> sorted ids), split by how the schema is enforced (plain
    grammar / exact keyword rewrite / uniqueItems layer: the plain steps are the same-run baseline).
Writes benchmarks/results/maskbench.json and prints a summary.

    python benchmarks/maskbench.py [--data DIR] [--limit N] [--no-mask-timing]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _reason(message: str) -> str:
    """A short category for an error message (for the histogram of why schemas do not compile)."""
    m = re.search(r'unknown format "([^"]*)"', message)
    if m:
        return f"format {m.group(1)[:30]} (non-standard)"
    m = re.search(r'the format "([^"]*)" has no exact', message)
    if m:
        return f"format {m.group(1)} (standard, no exact form)"
    m = re.search(r'unsupported keyword "([^"]+)"', message) or re.search(r'keyword "([^"]+)"', message)
    if m:
        return f"keyword {m.group(1)}"
    m = re.search(r"Unknown format: (\S+)", message)
    if m:
        return "format (unknown to the backend)"
    if "oneOf" in message:
        return "oneOf (options not provably disjoint)"
    return re.sub(r"\s+", " ", message.split("(backend:")[0])[:70]


def _stats_us(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * 1e6
    return {"count": int(a.size), "median_us": round(float(np.median(a)), 1),
            "p90_us": round(float(np.percentile(a, 90)), 1), "p99_us": round(float(np.percentile(a, 99)), 1),
            "max_us": round(float(a.max()), 1), "mean_us": round(float(a.mean()), 1)}


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"count": int(a.size), "median_ms": round(float(np.median(a)), 2),
            "p90_ms": round(float(np.percentile(a, 90)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 1), "total_s": round(float(a.sum()) / 1e3, 1)}


def _by_k(seconds: list[float], ks: list[int]) -> dict:
    """Median and p99 µs per bucket of K (the number of allowed ids), with the share of steps."""
    s, k = np.asarray(seconds) * 1e6, np.asarray(ks)
    out = {}
    for name, lo, hi in (("K=1", 1, 1), ("K<=128", 2, 128), ("K<=4096", 129, 4096), ("K>4096", 4097, 1 << 30)):
        sel = s[(k >= lo) & (k <= hi)]
        if sel.size:
            out[name] = {"share": round(sel.size / s.size, 3), "median_us": round(float(np.median(sel)), 1),
                         "p99_us": round(float(np.percentile(sel, 99)), 1)}
    return out


def _check_annotation(case: dict, name: str, tokenizer, out: dict) -> None:
    """Compile `case` with unknown_formats="annotation" and check its instances into `out`."""
    from llmqp import ConstraintError
    from llmqp.constraints import compile_constraint, make_spec
    from llmqp.testing import compact_json

    try:
        compiled = compile_constraint(make_spec(json_schema=case["schema"], strict=False,
                                                unknown_formats="annotation"), tokenizer)
    except ConstraintError:
        return
    out["compiled"] += 1
    for test in case["tests"]:
        ok = compiled.accepts(compact_json(test["data"]))
        out["valid" if test["valid"] else "invalid"] += 1
        if ok != test["valid"]:
            out["false_rej" if test["valid"] else "false_acc"].append({"schema": name, "valid": test["valid"]})


def run(data_dir: str | None, limit: int | None, mask_timing: bool) -> dict:
    from llmqp import ConstraintError
    from llmqp.constraints import compile_constraint, keywords, make_spec
    from llmqp.model import loader
    from llmqp.testing import compact_json, maskbench_dir, maskbench_files

    data_dir = data_dir or str(maskbench_dir())
    files = maskbench_files(data_dir)[:limit]
    if not files:
        sys.exit(f"no maskbench data in {data_dir}")
    t0 = time.perf_counter()
    tokenizer = loader.load().tokenizer
    t_tok = time.perf_counter()
    compile_constraint(make_spec(regex="x"), tokenizer)  # builds the tokenizer trie, outside the timings
    trie_s = time.perf_counter() - t_tok

    compiled_n = {"lenient": 0, "strict": 0}
    reasons: collections.Counter = collections.Counter()
    crashes: list[dict] = []
    compile_ms: list[float] = []
    valid_n = invalid_n = 0
    false_rej: list[dict] = []
    false_acc: list[dict] = []
    strict_false_acc: list[dict] = []
    strict_valid_acc = strict_valid_n = 0
    mask_s: list[float] = []
    mask_k: list[int] = []
    annotation = {"compiled": 0, "valid": 0, "invalid": 0, "false_rej": [], "false_acc": []}
    mask_kind: list[str] = []  # "plain", "rewrite" (not, oneOf, if, ... rewritten) or "unique" (uniqueItems layer)
    for path in files:
        case = json.loads(path.read_text())
        rewritten = keywords.needs_rewrite(case["schema"], one_of=True)
        compiled = {}
        for mode in ("lenient", "strict"):
            try:
                start = time.perf_counter()
                spec = make_spec(json_schema=case["schema"], strict=mode == "strict")
                compiled[mode] = compile_constraint(spec, tokenizer)
                if mode == "lenient":
                    compile_ms.append((time.perf_counter() - start) * 1e3)
                compiled_n[mode] += 1
            except ConstraintError as e:
                if mode == "lenient":
                    reasons[_reason(str(e))] += 1
                    if "unknown format" in str(e):
                        _check_annotation(case, path.name, tokenizer, annotation)
            except Exception as e:  # a bug: the contract says ConstraintError or success
                crashes.append({"schema": path.name, "mode": mode, "error": f"{type(e).__name__}: {e}"[:300]})
        for test in case["tests"]:
            text = compact_json(test["data"])
            if "lenient" in compiled:
                ok = compiled["lenient"].accepts(text)
                if test["valid"]:
                    valid_n += 1
                    if not ok:
                        false_rej.append({"schema": path.name, "text": text[:160]})
                else:
                    invalid_n += 1
                    if ok:
                        false_acc.append({"schema": path.name, "text": text[:160]})
            if "strict" in compiled:
                ok = compiled["strict"].accepts(text)
                if test["valid"]:
                    strict_valid_n += 1
                    strict_valid_acc += ok
                elif ok:
                    strict_false_acc.append({"schema": path.name, "text": text[:160]})
            if mask_timing and test["valid"] and "lenient" in compiled:
                matcher = compiled["lenient"].matcher()
                for tok in tokenizer.encode(text) + [tokenizer.eos_id]:
                    start = time.perf_counter()
                    allowed = matcher.allowed()
                    mask_s.append(time.perf_counter() - start)
                    mask_k.append(int(allowed.size))
                    mask_kind.append("unique" if getattr(compiled["lenient"], "unique_arrays", None)
                                     else "rewrite" if rewritten else "plain")
                    if tok not in allowed:  # a false rejection: stop this walk
                        break
                    matcher.accept(tok)

    total = len(files)
    return {
        "benchmark": "maskbench",
        "data": "../shared/data/maskbench" if Path(data_dir).resolve() == maskbench_dir().resolve() else data_dir,
        "backend": "llguidance",
        "tokenizer": "SmolLM2-135M-Instruct (vocab 49152)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "schemas": total,
        "coverage": {"compiled": compiled_n["lenient"], "rate": round(compiled_n["lenient"] / total, 4),
                     "compiled_strict": compiled_n["strict"],
                     "rate_strict": round(compiled_n["strict"] / total, 4),
                     "target_rate": 0.95},
        "not_compiled_reasons": dict(reasons.most_common()),
        "crashes": crashes,
        "unknown_formats_annotation": {
            "what": 'schemas refused for a non-standard format, compiled with unknown_formats="annotation"',
            "compiled": annotation["compiled"],
            "coverage_rate_with_option": round((compiled_n["lenient"] + annotation["compiled"]) / total, 4),
            "instances": {"valid": annotation["valid"], "invalid": annotation["invalid"]},
            "false_rejections": len(annotation["false_rej"]), "false_acceptances": len(annotation["false_acc"]),
            "examples": (annotation["false_acc"] + annotation["false_rej"])[:10]},
        "instances": {"valid": valid_n, "invalid": invalid_n},
        "false_rejections": {"count": len(false_rej), "rate": round(len(false_rej) / max(valid_n, 1), 5),
                             "target_rate_max": 0.002, "examples": false_rej[:20]},
        "false_acceptances": {"count": len(false_acc), "rate": round(len(false_acc) / max(invalid_n, 1), 5),
                              "target": 0, "examples": false_acc[:20]},
        "strict_mode": {"false_acceptances": len(strict_false_acc), "examples": strict_false_acc[:10],
                        "valid_instances_accepted": strict_valid_acc, "valid_instances": strict_valid_n,
                        "note": "strict=True rejects properties a schema does not declare, so valid instances "
                                "that carry them are rejected on purpose"},
        "compile_time": _stats_ms(compile_ms),
        "mask_cost_per_token": {**_stats_us(mask_s),
                                "allowed_k_median": int(np.median(mask_k)) if mask_k else None,
                                "by_k": _by_k(mask_s, mask_k),
                                # the same run, split by how the schema is enforced: "plain" schemas are
                                # the ones every earlier version compiled the same way (the baseline)
                                "by_enforcement": {kind: _stats_us([t for t, k in zip(mask_s, mask_kind) if k == kind])
                                                   for kind in ("plain", "rewrite", "unique")},
                                "before_issue_14": {"median_us": 28.4, "p99_us": 807.1, "note": "same benchmark, "
                                                    "commit e8830f8 (rewrites absent), another run on this machine"},
                                "what": "Matcher.allowed(): llguidance bitmask + sorted int32 ids, "
                                        "one call per token of each valid instance (+ EOS)"},
        "tokenizer_trie_build_s": round(trie_s, 3),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="maskbench directory (default <repository>/../shared/data/maskbench)")
    ap.add_argument("--limit", type=int, default=None, help="first N schemas only")
    ap.add_argument("--no-mask-timing", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "maskbench.json"))
    args = ap.parse_args()
    result = run(args.data, args.limit, not args.no_mask_timing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    cov, fr, fa, mc = (result["coverage"], result["false_rejections"], result["false_acceptances"],
                       result["mask_cost_per_token"])
    print(f"schemas {result['schemas']}: compiled {cov['compiled']} ({cov['rate']:.1%}), strict {cov['rate_strict']:.1%}; "
          f"crashes {len(result['crashes'])}")
    print(f"valid {result['instances']['valid']}: false rejections {fr['count']} ({fr['rate']:.2%}); "
          f"invalid {result['instances']['invalid']}: false acceptances {fa['count']}; "
          f"strict false acceptances {result['strict_mode']['false_acceptances']}")
    ann = result["unknown_formats_annotation"]
    print(f'with unknown_formats="annotation": +{ann["compiled"]} schemas ({ann["coverage_rate_with_option"]:.1%}); '
          f'false rejections {ann["false_rejections"]}, false acceptances {ann["false_acceptances"]} '
          f'on their {ann["instances"]["valid"] + ann["instances"]["invalid"]} instances')
    print(f"compile ms: median {result['compile_time'].get('median_ms')} p99 {result['compile_time'].get('p99_ms')} "
          f"max {result['compile_time'].get('max_ms')}")
    if mc.get("count"):
        print(f"mask µs/token: median {mc['median_us']} p99 {mc['p99_us']} (n={mc['count']}, K median "
              f"{mc['allowed_k_median']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
