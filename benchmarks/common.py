"""Shared helpers for the benchmarks: interleaved repeats, medians with their spread, result JSON.

Every benchmark reports the median of repeated, interleaved measurements together with its spread —
the interquartile range of the samples and a bootstrap 95% confidence interval of the median — so a
reader can tell an effect from noise. Variants are measured round by round in rotating order, so slow
drift (another job starting on the machine, thermal throttling) hits every variant alike.

`--quick` (or LLMQP_BENCH_QUICK=1) shrinks every benchmark to a CI-sized run; its numbers are only a
smoke test and are written to `results/<name>.quick.json`, never over the full results.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def quick_mode(argv_flag: bool = False) -> bool:
    return argv_flag or os.environ.get("LLMQP_BENCH_QUICK", "") not in ("", "0")


def timed_ms(fn: Callable, *args) -> float:
    """Wall time of fn(*args) in ms (fn must block until its result is ready)."""
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1e3


def fastest_in_cycles(variants: dict[str, Callable[[], object]], cycles: int) -> dict[str, float]:
    """One round of fine-grained interleaving: `cycles` times, call every variant once (order rotated
    each cycle); per variant, the fastest of its calls, in ms. On a machine shared with other jobs the
    fastest call is the least disturbed one, and all variants are sampled in the same short window."""
    names = list(variants)
    best = {n: float("inf") for n in names}
    for c in range(cycles):
        for i in range(len(names)):
            name = names[(c + i) % len(names)]
            best[name] = min(best[name], timed_ms(variants[name]))
    return best


def bootstrap_ci(samples: Sequence[float], stat: Callable = np.median, *, level: float = 0.95,
                 n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `stat` over the samples (resampled with replacement)."""
    x = np.asarray(samples, float)
    if len(x) < 2:
        return (float(x[0]), float(x[0])) if len(x) else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    boots = stat(x[rng.integers(0, len(x), size=(n_boot, len(x)))], axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summary(samples: Sequence[float]) -> dict:
    """Median, quartiles, IQR, bootstrap 95% CI of the median, n, and the samples themselves."""
    x = np.asarray(samples, float)
    q1, med, q3 = (float(v) for v in np.quantile(x, [0.25, 0.5, 0.75]))
    lo, hi = bootstrap_ci(x)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "ci95": [lo, hi], "n": int(len(x)),
            "samples": [float(v) for v in x]}


def paired_ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """The ratio median(num)/median(den) with a bootstrap 95% CI that resamples *rounds* (pairs), so
    the drift common to both sides of a round cancels."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    point = float(np.median(num) / np.median(den))
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(num), size=(2000, len(num)))
    boots = np.median(num[idx], axis=1) / np.median(den[idx], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"value": point, "ci95": [float(lo), float(hi)]}


def interleaved_rounds(variants: dict[str, Callable[[], float]], *, min_rounds: int, max_rounds: int,
                       resolved: Callable[[dict[str, list[float]]], bool] | None = None) -> dict[str, list[float]]:
    """Run every variant once per round, in an order rotated each round; each call returns one sample.
    Stops after `max_rounds`, or earlier — once `min_rounds` are done — when `resolved(samples)` is
    true (e.g. the noise band of the effect is smaller than the effect)."""
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max_rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(variants[name]())
        if r + 1 >= min_rounds and resolved is not None and resolved(samples):
            break
    return samples


def clear_prefix_cache(engine) -> None:
    """Empty the engine's prefix cache (`llmqp.core.prefix`), where it keeps one: a measurement of prefill
    must not find its prompt, or a prompt sharing its start, already prefilled by an earlier round."""
    if getattr(engine, "prefix_cache", None) is not None:
        engine.prefix_cache.clear()


def warm_until_compiled(fn: Callable[[], object], *, max_calls: int = 6) -> dict:
    """Call fn() until one call compiles nothing (XLA compilations counted by `CompileLog`), at most
    `max_calls` times. A fresh engine's draft planner tries each draft length a few times first, and each new
    forward width compiles once (seconds on a GPU): a timed run must not pay for that. Returns {"calls": n,
    "compile_s": seconds spent compiling, "compiled_nothing_at_end": bool}."""
    from llmqp.compiled.compile_log import CompileLog

    total, calls, quiet = 0.0, 0, False
    while calls < max_calls and not quiet:
        with CompileLog() as log:
            fn()
        calls += 1
        total += log.seconds()
        quiet = log.count() == 0
    return {"calls": calls, "compile_s": total, "compiled_nothing_at_end": quiet}


def interleaved_runs(run: Callable[[str], dict], names, *, rounds: int, key: str = "tokens_per_s"):
    """`interleaved_rounds` over the variants `names`, keeping each run's whole result (`run(name)` returns
    a dict): ({name: [result per round]}, {name: [result[key] per round]})."""
    runs: dict[str, list[dict]] = {name: [] for name in names}

    def measure(name):
        def one_round():
            r = run(name)
            runs[name].append(r)
            return r[key]
        return one_round

    samples = interleaved_rounds({n: measure(n) for n in names}, min_rounds=rounds, max_rounds=rounds)
    return runs, samples


def fmt_ratio(r: dict) -> str:
    """'1.23x (1.10–1.31)' for a `paired_ratio_summary` dict."""
    return f"{r['value']:.2f}x ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f})"


def fmt_spread(s: dict, digits: int = 1) -> str:
    """'12.3 (IQR 11.9–12.8)' for a `summary` dict."""
    return f"{s['median']:.{digits}f} (IQR {s['q1']:.{digits}f}–{s['q3']:.{digits}f})"


def machine() -> dict:
    """What the numbers were measured on, and how busy it was."""
    import jax

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "device": str(jax.devices()[0]),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "git_commit": commit, "git_dirty": dirty,
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def write_result(name: str, doc: dict, *, quick: bool) -> Path:
    """Write results/<name>.json (results/<name>.quick.json for a quick run), machine info included."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps({"machine": machine(), "quick": quick, **doc}, indent=2))
    print(f"wrote {path}", flush=True)
    return path


def device_params(packed: dict) -> dict:
    """Numpy params (`llmqp.model.weights.pack_params` layout) -> f32 device arrays; a tied unembedding
    keeps one device copy. (For the synthetic shapes, which no Engine loads.)"""
    import jax
    import jax.numpy as jnp

    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), packed)
    if packed["unembed_rows"] is packed["embed"]:
        params["unembed_rows"] = params["embed"]
    return params
