"""The trunk at the machine's limits: memory bandwidth, a BLAS GEMM rate, and the engine's trunk against both.

Measured in one run, interleaved round by round (rotating order; within a round every variant is called
`--cycles` times and keeps its fastest call, the least disturbed one on a shared machine):

  bandwidth   STREAM-style kernels in numpy on arrays far bigger than the last-level cache: copy (b = a,
              2 x 4 bytes per element), triad (b = a + 3 c, as two passes: 5 x 4 bytes) and read (a . c, numpy's
              dot: 2 x 4 bytes), on 1 and 2 threads. The machine's bandwidth is the best median of these.
  blas        numpy (OpenBLAS) on the trunk's matmul shapes alone — every layer's x @ w_qkv, w_o, w_gate_up,
              w_down, f32, chained like the trunk — for M = 1, 2, 4, 8, 16, 32 rows: GFLOP/s = 2 M P / time
              (P = the matmul weights' element count).
  trunk       the engine's jitted `transformer.forward` on the real SmolLM2 params with a KV cache of S
              positions (tokens (1, T), as the executor's prefill/feed calls), T = 1 ... 32, and
              `transformer.decode_step` at batch B = 1 ... 16 (tokens (B,)); f32 and bf16 weights, and on the CPU
              f32 through `llmqp.kernels`' small-M GEMM (format float32+kernel; "float32" is XLA's dot).
  baseline    with --baseline PATH (a transformer.py of an older commit), the same trunk calls through that
              module, in the same rounds.
  accelerator where JAX's default backend is a GPU (benchmarks/gpu.sh), bandwidth and the matmul chain are
              measured there instead, as jitted JAX programs on device arrays (`limits_of` in the JSON says which);
              the XLA:CPU flag variants are skipped.
  flags       XLA:CPU compile options on the f32 forward at T = 1 and 8 (compiled with
              `.lower().compile(options)`, so they are measured side by side in one process).

Shares of the limits: at T = 1, bound = trunk weight bytes / bandwidth and share = bound / step time (with the
best kernel's bandwidth, and with the best read-only kernel's: a step only reads its weights); at
T >= 8, share = the BLAS chain's time at M = T / the forward's time (FLOPs / BLAS rate over the time). Also the
bf16 format's logit error and perplexity change against f32 on tests/data/paragraph.txt.

    python benchmarks/limits.py [--rounds 7] [--cycles 3] [--baseline OLD/transformer.py] [--quick]
Writes benchmarks/results/limits.json (+ limits.png; .quick.* with --quick) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import RESULTS, fastest_in_cycles, fmt_ratio, paired_ratio_summary, quick_mode, summary, write_result

HERE = Path(__file__).parent
T_VALUES = (1, 2, 4, 8, 16, 32)
B_VALUES = (1, 2, 4, 8, 16)
MATMULS = ("w_qkv", "w_o", "w_gate_up", "w_down")
FORMATS = ("float32", "bfloat16", "float32+bf16multi")
FLAG_VARIANTS = {
    "default": {},
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "ynn_dot_eltwise_reduce": {"xla_cpu_experimental_ynn_fusion_type":
                               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE,"
                               "LIBRARY_FUSION_TYPE_REDUCE"},
    "ynn_fused_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn_dot_ynn_off": {"xla_cpu_experimental_ynn_fusion_type": "",
                        "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "single_thread_eigen": {"xla_cpu_multi_thread_eigen": False},
}


# ------------------------------------------------------------------ bandwidth

def bandwidth_variants(mib: int) -> tuple[dict, dict]:
    """name -> callable, name -> bytes moved per call (STREAM counting: reads + writes, no write-allocate)."""
    n = mib * 2**20 // 4
    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    pool = ThreadPoolExecutor(2)

    def copy(lo, hi):
        np.copyto(b[lo:hi], a[lo:hi])

    def triad(lo, hi):
        np.multiply(c[lo:hi], np.float32(3), out=b[lo:hi])
        b[lo:hi] += a[lo:hi]

    def read(lo, hi):
        np.dot(a[lo:hi], c[lo:hi])

    def threaded(fn, k):
        if k == 1:
            return lambda: fn(0, n)
        return lambda: list(pool.map(lambda i: fn(i * n // k, (i + 1) * n // k), range(k)))

    kernels = {"copy": (copy, 2), "triad": (triad, 5), "read": (read, 2)}
    fns, nbytes = {}, {}
    for name, (fn, words) in kernels.items():
        for k in (1, 2):
            fns[f"{name}_{k}t"] = threaded(fn, k)
            nbytes[f"{name}_{k}t"] = words * 4 * n
    return fns, nbytes


def device_bandwidth_variants(mib: int) -> tuple[dict, dict]:
    """On an accelerator (JAX's default backend is not the CPU): the same STREAM kernels as jitted JAX programs
    on device arrays — copy (b = a + 1: read + write), triad (b = a + 3 c, one fused pass: 3 x 4 bytes) and
    read (a . c) — since the trunk then reads its weights from device memory, not from the host's."""
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    a = jnp.ones(n, jnp.float32)
    c = jnp.full(n, 0.5, jnp.float32)
    kernels = {"copy": (jax.jit(lambda x: x + jnp.float32(1)), (a,), 2),
               "triad": (jax.jit(lambda x, y: x + jnp.float32(3) * y), (a, c), 3),
               "read": (jax.jit(jnp.dot), (a, c), 2)}
    fns, nbytes = {}, {}
    for name, (fn, args, words) in kernels.items():
        fn(*args).block_until_ready()  # compile
        fns[f"{name}_device"] = lambda fn=fn, args=args: fn(*args).block_until_ready()
        nbytes[f"{name}_device"] = words * 4 * n
    return fns, nbytes


def on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


# ------------------------------------------------------------------ BLAS

def openblas_threads():
    """numpy's OpenBLAS `set_num_threads`, or None when numpy is linked to another BLAS."""
    import ctypes
    import glob

    libs = glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "libscipy_openblas*.so"))
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(handle, sym):
                fn = getattr(handle, sym)
                return lambda n: fn(ctypes.c_int(n))
    return None


def chain_inputs(cfg, m: int, rng) -> tuple[np.ndarray, list[dict], int]:
    """The trunk's matmul chain inputs at M rows: x (M, d) and per layer w_qkv, w_o, w_gate_up, w_down (f32,
    scaled so values stay finite), plus the matmul weights' element count."""
    d, f = cfg.hidden_size, cfg.ffn_size
    shapes = {"w_qkv": (d, cfg.q_size + 2 * cfg.kv_size), "w_o": (cfg.q_size, d), "w_gate_up": (d, 2 * f),
              "w_down": (f, d)}
    layers = [{k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.3 / np.sqrt(s[0]))
               for k, s in shapes.items()} for _ in range(cfg.n_layers)]
    x0 = rng.standard_normal((m, d), dtype=np.float32)
    return x0, layers, sum(int(np.prod(s)) for s in shapes.values()) * cfg.n_layers


def matmul_chain(x, layers, cfg):
    """Per layer x @ w_qkv, attn @ w_o, x @ w_gate_up, act @ w_down (linear), on numpy or JAX arrays."""
    for w in layers:
        qkv = x @ w["w_qkv"]
        x = x + qkv[:, : cfg.q_size] @ w["w_o"]
        gu = x @ w["w_gate_up"]
        x = x + gu[:, : cfg.ffn_size] @ w["w_down"]
    return x


def blas_chain(cfg, m: int, rng, threads: int):
    """numpy's trunk matmul chain (`matmul_chain`) at M rows, on `threads` OpenBLAS threads."""
    x0, layers, n_params = chain_inputs(cfg, m, rng)
    set_threads = openblas_threads()

    def run():
        if set_threads is not None:
            set_threads(threads)
        return matmul_chain(x0, layers, cfg)
    return run, n_params


def device_blas_chain(cfg, m: int, rng):
    """The same matmul chain as `blas_chain`, jitted on the accelerator (its BLAS: cuBLAS on a GPU), f32."""
    import functools

    import jax

    x0, layers, n_params = chain_inputs(cfg, m, rng)
    x0, layers = jax.device_put((x0, layers))
    chain = jax.jit(functools.partial(matmul_chain, cfg=cfg))
    chain(x0, layers).block_until_ready()  # compile
    return (lambda: chain(x0, layers).block_until_ready()), n_params


# ------------------------------------------------------------------ trunk

def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def trunk_call(mod, params, cfg, batch: int, t: int, seq_len: int, *, decode: bool, options=None):
    """A blocking callable running one jitted trunk call (cache donated and carried over calls)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(batch * 100 + t)
    dtype = mod.cache_dtype(params) if hasattr(mod, "cache_dtype") else params["embed"].dtype  # (older trunks)
    cache = mod.init_cache(cfg, batch, seq_len, dtype)
    start = jnp.asarray(rng.integers(seq_len // 4, seq_len // 2, batch), jnp.int32)
    if decode:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
        fn = mod.decode_step
    else:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, t)), jnp.int32)
        fn = mod.forward_jit
    if options:
        fn = jax.jit(mod.forward, static_argnames=("cfg",), donate_argnames=("cache",)).lower(
            params, cache, tokens, start, cfg=cfg).compile(options)
        call = lambda c: fn(params, c, tokens, start)  # noqa: E731
    else:
        call = lambda c: fn(params, c, tokens, start, cfg=cfg)  # noqa: E731
    box = {"cache": cache}

    def run():
        hidden, box["cache"] = call(box["cache"])
        hidden.block_until_ready()
    run()  # compile
    return run


def products_call(params):
    """A blocking callable running the kernel products of a one-token step alone, in one jitted program, and
    returning the last product (1, d). Every layer's four packed matrices (q/k/v, o, gate/up, down) run on one
    row, in the step's order. Each product's input is the previous one's output, cut to the next matrix's K,
    times 0, plus 1: a finite input, and a data dependence so that XLA runs them one after another, as the step
    does. What the step costs beyond it is the rest of the trunk: norms, RoPE, the cache write, attention,
    residual adds, the executor and dispatch."""
    import jax
    import jax.numpy as jnp

    from llmqp import kernels

    packed = [layer["packed"][k] for layer in params["layers"] for k in kernels.MATMULS]
    widths = [layer[k].shape[-1] for layer in params["layers"] for k in kernels.MATMULS]  # N of each product

    @jax.jit
    def chain(packed, x):
        for w, n in zip(packed, widths):
            x = x[:, : w.shape[1]] * 0.0 + 1.0
            x = kernels.matmul(x, w, n)
        return x

    x0 = jnp.ones((1, max(w.shape[1] for w in packed)), jnp.float32)

    def run():
        return chain(packed, x0).block_until_ready()
    run()  # compile
    return run


def trunk_bytes(params) -> int:
    """Bytes of every trunk weight a one-token step reads (matmuls and norms; not the embedding table, nor the
    multi-token copy of `transformer.with_multi_token_weights`)."""
    return int(sum(v.nbytes for layer in params["layers"] for k, v in layer.items()
                   if k not in ("multi_token", "packed"))
               + params["final_norm"].nbytes)


def format_accuracy(cfg, params32, params16, tokenizer) -> dict:
    """bf16 weights against f32 on a fixed paragraph: logits through the same f32 head. `params16` packed for
    the CPU kernel (`kernels.with_packed_weights`) measures the engine's bf16 path on the CPU (f32 activations,
    bf16 weights widened exactly); unpacked, XLA's bf16 dots (activations rounded to bf16 too)."""
    import jax.numpy as jnp

    from llmqp import kernels
    from llmqp.model import transformer

    ids = tokenizer.encode((HERE.parent / "tests" / "data" / "paragraph.txt").read_text())[:256]
    tokens = jnp.asarray([ids], jnp.int32)
    start = jnp.zeros((1,), jnp.int32)
    out = {}
    for name, p in (("float32", params32), ("bfloat16", params16)):
        cache = transformer.init_cache(cfg, 1, 512, transformer.cache_dtype(p))
        # packed params: in the chunks the engine prefills in with the kernels, so that the kernels run (a
        # forward of more than kernels.SMALL_M_MAX positions takes XLA's dot)
        width = kernels.ATTENTION_MAX_T if "packed" in p["layers"][0] else len(ids)
        hidden = []
        for a in range(0, len(ids), width):
            h, cache = transformer.forward_jit(p, cache, tokens[:, a:a + width], start + a, cfg=cfg)
            hidden.append(h[0])
        out[name] = np.asarray(transformer.dense_logits(params32, jnp.concatenate(hidden)), np.float64)
    ref, low = out["float32"], out["bfloat16"]

    def ppl(logits):
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]
        return float(np.exp(nll.mean()))
    err = np.abs(ref - low)
    return {"tokens": len(ids), "max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean()),
            "logit_scale_std": float(ref.std()), "top1_agreement": float((ref.argmax(-1) == low.argmax(-1)).mean()),
            "perplexity_float32": ppl(ref), "perplexity_bfloat16": ppl(low)}


# ------------------------------------------------------------------ end to end, before / after

_E2E_SNIPPET = r"""
import json, sys, time
import os
import llmqp
tasks, max_tokens, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
engine = llmqp.Engine(dtype=os.environ.get("LLMQP_E2E_DTYPE", "float32"))
def one(constrained):
    tokens, ms, outputs = 0, 0.0, []
    for t in tasks:
        r = engine.generate(t["prompt"], max_tokens=max_tokens, **({"json_schema": t["schema"]} if constrained else {}))
        tokens += len(r.token_ids); ms += r.decode_ms; outputs.append(list(r.token_ids))
    return tokens / (ms / 1e3), outputs
def batch():
    t0 = time.perf_counter()
    rs = engine.generate_batch([{"prompt": t["prompt"], "max_tokens": max_tokens} for t in tasks * 2])
    return sum(len(r.token_ids) for r in rs) / (time.perf_counter() - t0), [list(r.token_ids) for r in rs]
one(False); one(True); batch()  # compile
out = {"unconstrained": [], "constrained": [], "batch": [], "outputs": {}}
for _ in range(rounds):
    for name, fn in (("unconstrained", lambda: one(False)), ("constrained", lambda: one(True)), ("batch", batch)):
        tps, outputs = fn()
        out[name].append(tps); out["outputs"][name] = outputs
print("E2E" + json.dumps(out))
"""


_LLAMA_SNIPPET = r"""
import json, os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # see benchmarks/gemma.py: spinning threads collapse when shared
import llama_cpp
tasks, max_tokens, rounds, path = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
grammars = [llama_cpp.LlamaGrammar.from_json_schema(json.dumps(t["schema"]), verbose=False) for t in tasks]
def one(constrained):
    tokens, seconds = 0, 0.0
    for t, g in zip(tasks, grammars):
        llm.reset()  # no prompt reuse across calls: every prompt is prefilled, as ours are
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages=[{"role": "user", "content": t["prompt"]}], max_tokens=max_tokens,
                                       temperature=0.0, grammar=g if constrained else None)
        wall = time.perf_counter() - t0
        prefill = llama_cpp.llama_perf_context(llm.ctx).t_p_eval_ms / 1e3
        tokens += r["usage"]["completion_tokens"]; seconds += wall - prefill
    return tokens / seconds
one(False); one(True)  # warm up
out = {"unconstrained": [], "constrained": []}
for _ in range(rounds):
    for name in out:
        out[name].append(one(name == "constrained"))
print("E2E" + json.dumps(out))
"""


def e2e(before_src: str, after_src: str, rounds: int, inner_rounds: int, n_prompts: int, max_tokens: int,
        dtypes: tuple[str, str] = ("float32", "float32")) -> dict:
    """Greedy generation tok/s of two source trees (or one tree with two weight dtypes, `Engine(dtype=...)`),
    each in its own processes, alternating process by process: unconstrained and JSON-Schema-constrained at
    batch 1 (decode tokens / decode time), and generate_batch of 2 x n_prompts unconstrained requests (tokens /
    wall time, prefill included). Also whether the two sides generate the same tokens."""
    import json
    import subprocess
    import sys

    tasks = json.loads((HERE / "data" / "extraction.json").read_text())[:n_prompts]
    trees = {"before": before_src, "after": after_src}
    tree_dtype = {"before": dtypes[0], "after": dtypes[1]}
    samples = {tree: {"unconstrained": [], "constrained": [], "batch": []} for tree in trees}
    llama = importlib.util.find_spec("llama_cpp") is not None
    if llama:  # llama.cpp on the same GGUF, its own processes in the same alternation
        from llmqp.model.loader import default_model_path

        gguf = str(default_model_path())
        samples["llamacpp"] = {"unconstrained": [], "constrained": []}
    outputs = {}
    for r in range(rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for tree in (order + ("llamacpp",) if llama else order):
            if tree == "llamacpp":
                proc = subprocess.run([sys.executable, "-c", _LLAMA_SNIPPET, json.dumps(tasks), str(max_tokens),
                                       str(inner_rounds), gguf], capture_output=True, text=True, check=True)
                doc = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("E2E"))[3:])
                for k in samples[tree]:
                    samples[tree][k].extend(doc[k])
                print(f"e2e round {r + 1}/{rounds}: llama.cpp done, load {os.getloadavg()[0]:.1f}", flush=True)
                continue
            env = dict(os.environ, PYTHONPATH=trees[tree], LLMQP_E2E_DTYPE=tree_dtype[tree])
            proc = subprocess.run([sys.executable, "-c", _E2E_SNIPPET, json.dumps(tasks), str(max_tokens),
                                   str(inner_rounds)], env=env, capture_output=True, text=True, check=True)
            doc = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("E2E"))[3:])
            for k in samples[tree]:
                samples[tree][k].extend(doc[k])
            outputs[tree] = doc["outputs"]
            print(f"e2e round {r + 1}/{rounds}: {tree} done, load {os.getloadavg()[0]:.1f}", flush=True)
    result = {"trees": trees, "dtypes": tree_dtype, "prompts": len(tasks), "max_tokens": max_tokens,
              "processes_per_tree": rounds, "rounds_per_process": inner_rounds,
              "identical_tokens": {k: outputs["before"][k] == outputs["after"][k] for k in outputs["before"]},
              "identical_outputs_share": {k: float(np.mean([a == b for a, b in zip(outputs["before"][k],
                                                                                   outputs["after"][k])]))
                                          for k in outputs["before"]}}
    for k in ("unconstrained", "constrained", "batch"):
        result[k] = {tree: summary(samples[tree][k]) for tree in trees}
        result[k]["after_vs_before"] = paired_ratio_summary(samples["after"][k], samples["before"][k])
    if llama:
        result["llamacpp"] = {
            "version": importlib.metadata.version("llama-cpp-python"), "gguf": Path(gguf).name, "n_threads": 2,
            "what": "create_chat_completion, greedy, same prompts and max_tokens; constrained = its JSON-schema "
                    "grammar (LlamaGrammar.from_json_schema); decode tok/s = tokens / (wall - llama.cpp's prompt-eval "
                    "time); llama.cpp reads the GGUF's 4-bit weights as they are, we dequantize them to f32",
            **{k: summary(v) for k, v in samples["llamacpp"].items()},
            "after_over_llamacpp": {k: paired_ratio_summary(samples["after"][k], samples["llamacpp"][k])
                                    for k in ("unconstrained", "constrained")},
            "before_over_llamacpp": {k: paired_ratio_summary(samples["before"][k], samples["llamacpp"][k])
                                     for k in ("unconstrained", "constrained")}}
    else:
        result["llamacpp"] = "llama-cpp-python not installed (pip install 'llmqp[llamacpp]'): not measured"
    return result


# ------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cycles", type=int, default=3, help="calls per variant per round (fastest kept)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mib", type=int, default=512, help="STREAM array size, MiB each")
    ap.add_argument("--baseline", default=None, help="transformer.py of an older commit to measure beside")
    ap.add_argument("--no-flags", action="store_true", help="skip the XLA flag variants")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2 rounds, small arrays, T<=8, B<=2, no flags")
    ap.add_argument("--e2e-before", default=None, metavar="SRC",
                    help="only the end-to-end comparison: this src/ directory (an older checkout) against --e2e-after")
    ap.add_argument("--e2e-after", default=str(HERE.parent / "src"), metavar="SRC")
    ap.add_argument("--e2e-processes", type=int, default=4, help="processes per tree (alternating)")
    ap.add_argument("--e2e-dtypes", default="float32,float32", metavar="BEFORE,AFTER",
                    help="Engine(dtype=...) of each side, e.g. float32,bfloat16 with --e2e-before and --e2e-after "
                         "the same tree: the weight formats end to end (results/limits_e2e_dtypes.json)")
    args = ap.parse_args()
    quick = quick_mode(args.quick)
    if args.e2e_before:
        dtypes = tuple(d.strip() for d in args.e2e_dtypes.split(","))
        if len(dtypes) != 2 or any(d not in ("float32", "bfloat16") for d in dtypes):
            ap.error(f"--e2e-dtypes takes two of float32, bfloat16 separated by a comma, got {args.e2e_dtypes!r}")
        doc = e2e(args.e2e_before, args.e2e_after, 2 if quick else args.e2e_processes, 1 if quick else 2,
                  2 if quick else 4, 24 if quick else 64, dtypes=dtypes)
        write_result("limits_e2e" if dtypes[0] == dtypes[1] else "limits_e2e_dtypes", doc, quick=quick)
        print("\n| greedy SmolLM2 | before: tok/s (IQR) | after: tok/s (IQR) | after / before (95% CI) | "
              "same tokens |\n|---|---|---|---|---|")
        for k in ("unconstrained", "constrained", "batch"):
            b, a, ratio = doc[k]["before"], doc[k]["after"], doc[k]["after_vs_before"]
            print(f"| {k} | {b['median']:.1f} ({b['q1']:.1f}–{b['q3']:.1f}) | {a['median']:.1f} "
                  f"({a['q1']:.1f}–{a['q3']:.1f}) | {ratio['value']:.2f}x ({ratio['ci95'][0]:.2f}–"
                  f"{ratio['ci95'][1]:.2f}) | {doc['identical_tokens'][k]} "
                  f"({doc['identical_outputs_share'][k]:.0%} of outputs) |")
        if isinstance(doc["llamacpp"], dict):
            for k in ("unconstrained", "constrained"):
                m, ratio = doc["llamacpp"][k], doc["llamacpp"]["after_over_llamacpp"][k]
                label = "JSON grammar" if k == "constrained" else "unconstrained"
                print(f"| llama.cpp, {label} | | {m['median']:.1f} ({m['q1']:.1f}–{m['q3']:.1f}) | "
                      f"after / llama.cpp {fmt_ratio(ratio)} | |")
        return
    rounds, cycles = (2, 1) if quick else (args.rounds, args.cycles)
    t_values = tuple(t for t in T_VALUES if t <= 8) if quick else T_VALUES
    b_values = tuple(b for b in B_VALUES if b <= 2) if quick else B_VALUES
    mib = 64 if quick else args.mib

    from llmqp import kernels
    from llmqp.engine import _enable_compile_cache, device_params
    from llmqp.model import loader, transformer

    _enable_compile_cache()  # the engine's persistent XLA cache: a rerun skips most of the ~50 compiles
    loaded = loader.load()
    cfg = loaded.config
    params = {"float32": device_params(loaded.params, "float32"), "bfloat16": device_params(loaded.params, "bfloat16")}
    # f32 one-token steps, bf16 weights for multi-token chunks (transformer.with_multi_token_weights)
    params["float32+bf16multi"] = transformer.with_multi_token_weights(params["float32"])
    formats = FORMATS
    if not on_accelerator() and kernels.available():  # products of <= SMALL_M_MAX rows in llmqp.kernels
        params["float32+kernel"] = kernels.with_packed_weights(params["float32"], loaded.params["layers"])
        params["bfloat16+kernel"] = kernels.with_packed_weights(params["bfloat16"])  # Engine(dtype="bfloat16")
        formats = FORMATS + ("float32+kernel", "bfloat16+kernel")
    print(f"CPU kernel: {kernels.status()}", flush=True)
    rng = np.random.default_rng(0)

    accelerator = on_accelerator()
    if accelerator:  # the limits of the device the trunk runs on; arrays far bigger than its cache
        mib = max(mib, 1024)
        bw_fns, bw_bytes = device_bandwidth_variants(mib)
    else:
        bw_fns, bw_bytes = bandwidth_variants(mib)
    blas = {}
    for m in t_values:
        if accelerator:
            blas[f"1t:M={m}"], matmul_params = device_blas_chain(cfg, m, rng)
            continue
        for threads in (1, 2):
            blas[f"{threads}t:M={m}"], matmul_params = blas_chain(cfg, m, rng, threads)

    variants: dict[str, callable] = {}
    variants.update({f"bw:{k}": f for k, f in bw_fns.items()})
    variants.update({f"blas{k}": f for k, f in blas.items()})
    modules = {"": transformer}
    if args.baseline:
        modules["baseline:"] = load_module(args.baseline, "baseline_transformer")
    for prefix, mod in modules.items():
        for fmt in (("float32",) if prefix else formats):
            if fmt == "float32+bf16multi":  # one-token steps are float32's programs: measured there
                for t in t_values[1:]:
                    variants[f"{fmt}:T={t}"] = trunk_call(mod, params[fmt], cfg, 1, t, args.seq_len, decode=False)
                continue
            for t in t_values:
                variants[f"{prefix}{fmt}:T={t}"] = trunk_call(mod, params[fmt], cfg, 1, t, args.seq_len, decode=False)
            for b in b_values:
                variants[f"{prefix}{fmt}:decode B={b}"] = trunk_call(mod, params[fmt], cfg, b, 1, args.seq_len,
                                                                       decode=True)
            if not prefix and "packed" in params[fmt]["layers"][0]:
                variants[f"{fmt}:products T=1"] = products_call(params[fmt])
    if not (quick or args.no_flags or accelerator):  # the flags are XLA:CPU's
        for name, options in FLAG_VARIANTS.items():
            for t in (1, 8):
                variants[f"flags:{name}:T={t}"] = trunk_call(transformer, params["float32"], cfg, 1, t, args.seq_len,
                                                            decode=False, options=options)

    samples: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        best = fastest_in_cycles({k: variants[k] for k in order}, cycles)
        for k, v in best.items():
            samples[k].append(v)
        print(f"round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)

    for k in [k for k in samples if k.startswith("float32:") and (k.endswith(":T=1") or "decode" in k)]:
        samples["float32+bf16multi:" + k.split(":", 1)[1]] = samples[k]
    ms = {k: summary(v) for k, v in samples.items()}
    med = {k: v["median"] for k, v in ms.items()}
    bandwidth = {k: summary([bw_bytes[k] / (x / 1e3) / 1e9 for x in samples[f"bw:{k}"]]) for k in bw_fns}
    best_bw_name = max(bandwidth, key=lambda k: bandwidth[k]["median"])
    bw_gbs = bandwidth[best_bw_name]["median"]
    # The read-only kernels' best: a one-token step only reads its weights, and on a few cores a pure read
    # stream runs well below the copy kernel's read + write count (per-core limits on misses in flight).
    read_names = [k for k in bandwidth if k.startswith("read")]
    read_bw_name = max(read_names, key=lambda k: bandwidth[k]["median"]) if read_names else None
    for m in t_values:  # the BLAS rate at M: the thread count with the faster median
        samples[f"blas:M={m}"] = min((samples[f"blas{k}t:M={m}"] for k in (1, 2) if f"blas{k}t:M={m}" in samples),
                                     key=np.median)
        ms[f"blas:M={m}"] = summary(samples[f"blas:M={m}"])
    blas_rate = {m: summary([2 * m * matmul_params / (x / 1e3) / 1e9 for x in samples[f"blas:M={m}"]])
                 for m in t_values}

    import jax

    results = {"limits_of": (f"the accelerator ({jax.devices()[0].device_kind}): jitted JAX copy/triad/read and "
                             "matmul chain on device arrays") if accelerator else
               "the host: numpy STREAM kernels and numpy's OpenBLAS matmul chain",
               "seq_len": args.seq_len, "rounds": rounds, "cycles": cycles, "stream_mib": mib,
               "bandwidth_gbs": bandwidth, "bandwidth_best": {"kernel": best_bw_name, "gbs": bw_gbs},
               "blas_gflops": {str(m): v for m, v in blas_rate.items()},
               "matmul_params": matmul_params, "times_ms": ms, "formats": {}}
    for prefix in modules:
        for fmt in (("float32",) if prefix else formats):
            key = f"{prefix}{fmt}"
            nbytes = trunk_bytes(params[fmt])
            bound_ms = nbytes / (bw_gbs * 1e9) * 1e3
            one = samples[f"{key}:T=1"]
            per_t = {}
            for t in t_values:
                s = samples[f"{key}:T={t}"]
                entry = {"ms": ms[f"{key}:T={t}"], "ms_per_position": float(np.median(s)) / t,
                         "vs_one_token": paired_ratio_summary(s, one)}
                if t >= 8:
                    entry["blas_share"] = paired_ratio_summary(samples[f"blas:M={t}"], s)
                per_t[str(t)] = entry
            read = {}
            if read_bw_name:  # per round: the step's time over the bytes / that round's read bandwidth
                read_bound = [nbytes / (bw_bytes[read_bw_name] / (x / 1e3)) * 1e3 for x in samples[f"bw:{read_bw_name}"]]
                read = {"read_bandwidth_kernel": read_bw_name,
                        "read_bound_ms": float(np.median(read_bound)),
                        "one_token_vs_read_bound": paired_ratio_summary(one, read_bound)}
            products = {}
            if f"{key}:products T=1" in samples:  # the step split: its kernel products alone, and the rest
                prod = samples[f"{key}:products T=1"]
                products = {"products_one_token": {
                    "ms": ms[f"{key}:products T=1"],
                    "share_of_step": paired_ratio_summary(prod, one),
                    "rest_ms": float(np.median(np.asarray(one) - np.asarray(prod))),
                    **({"vs_read_bound": paired_ratio_summary(prod, read_bound)} if read_bw_name else {})}}
            results["formats"][key] = {
                "weight_bytes": nbytes, "bandwidth_bound_ms": bound_ms,
                "one_token_vs_bound": float(np.median(one)) / bound_ms, **read, **products,
                "forward": per_t,
                "decode": {str(b): {"ms": ms[f"{key}:decode B={b}"],
                                    "ms_per_row": med[f"{key}:decode B={b}"] / b} for b in b_values},
            }
    if args.baseline:
        results["baseline_path"] = args.baseline
        results["speedup_vs_baseline"] = {
            **{f"T={t}": paired_ratio_summary(samples[f"baseline:float32:T={t}"], samples[f"float32:T={t}"])
               for t in t_values},
            **{f"decode B={b}": paired_ratio_summary(samples[f"baseline:float32:decode B={b}"],
                                                     samples[f"float32:decode B={b}"]) for b in b_values}}
    if not (quick or args.no_flags or accelerator):
        results["flags"] = {name: {f"T={t}": {"ms": ms[f"flags:{name}:T={t}"],
                                              "vs_default": paired_ratio_summary(samples[f"flags:{name}:T={t}"],
                                                                                 samples[f"flags:default:T={t}"])}
                                   for t in (1, 8)} | {"options": opts}
                            for name, opts in FLAG_VARIANTS.items()}
    results["format_accuracy"] = format_accuracy(cfg, params["float32"], params["bfloat16"], loaded.tokenizer)
    if "bfloat16+kernel" in params:
        results["format_accuracy_bf16_kernel"] = format_accuracy(cfg, params["float32"], params["bfloat16+kernel"],
                                                                 loaded.tokenizer)
    try:
        import llama_cpp  # noqa: F401
        results["llama_cpp"] = "installed: measured beside ours end to end (--e2e-before, results/limits_e2e.json)"
    except ImportError:
        results["llama_cpp"] = "not installed"
    write_result("limits", results, quick=quick)
    plot(results, t_values, RESULTS / ("limits.quick.png" if quick else "limits.png"))
    print_tables(results, t_values, b_values)


def plot(results: dict, t_values, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'llmqp[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ts = list(t_values)
    for key, f in results["formats"].items():
        ax.plot(ts, [f["forward"][str(t)]["ms_per_position"] for t in ts], marker="o", label=f"trunk, {key}")
    blas_ms = [results["times_ms"][f"blas:M={t}"]["median"] / t for t in ts]
    blas_label = "device matmuls only, f32" if results["limits_of"].startswith("the accelerator") else \
        "numpy/OpenBLAS matmuls only, f32"
    ax.plot(ts, blas_ms, marker="s", linestyle="--", label=blas_label)
    bound = results["formats"]["float32"]["bandwidth_bound_ms"]
    ax.plot(ts, [bound / t for t in ts], linestyle=":", color="k", label="f32 weights / bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("positions per forward (T)")
    ax.set_ylabel("ms per position (median)")
    ax.set_title("SmolLM2-135M trunk cost per position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def print_tables(results: dict, t_values, b_values) -> None:
    bw = results["bandwidth_best"]
    print(f"\nbandwidth {bw['gbs']:.1f} GB/s ({bw['kernel']}); BLAS GFLOP/s: " + ", ".join(
        f"M={m} {v['median']:.0f}" for m, v in results["blas_gflops"].items()))
    print("\n| weights | T | ms (IQR) | ms / position | vs T=1 | share of limit |\n|---|---|---|---|---|---|")
    for key, f in results["formats"].items():
        for t in t_values:
            e = f["forward"][str(t)]
            if t == 1:
                share = f"bound {f['bandwidth_bound_ms']:.1f} ms: {f['one_token_vs_bound']:.2f}x the bound"
                if "read_bound_ms" in f:
                    r = f["one_token_vs_read_bound"]
                    share += (f"; read bound {f['read_bound_ms']:.1f} ms: {r['value']:.2f}x "
                              f"({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f})")
            elif "blas_share" in e:
                share = f"BLAS {e['blas_share']['value']:.2f}"
            else:
                share = ""
            print(f"| {key} | {t} | {e['ms']['median']:.1f} ({e['ms']['q1']:.1f}–{e['ms']['q3']:.1f}) | "
                  f"{e['ms_per_position']:.1f} | {e['vs_one_token']['value']:.2f} | {share} |")
    for key, f in results["formats"].items():
        if "products_one_token" in f:
            p = f["products_one_token"]
            vs = f", {p['vs_read_bound']['value']:.2f}x the read bound" if "vs_read_bound" in p else ""
            print(f"{key}: the one-token step's kernel products alone {p['ms']['median']:.1f} ms{vs}, "
                  f"{p['share_of_step']['value']:.0%} of the step; the rest {p['rest_ms']:.1f} ms")
    print("\n| weights | decode batch | ms (IQR) | ms / row |\n|---|---|---|---|")
    for key, f in results["formats"].items():
        for b in b_values:
            e = f["decode"][str(b)]
            print(f"| {key} | {b} | {e['ms']['median']:.1f} ({e['ms']['q1']:.1f}–{e['ms']['q3']:.1f}) | "
                  f"{e['ms_per_row']:.1f} |")
    if "speedup_vs_baseline" in results:
        print("\nspeedup vs baseline: " + ", ".join(f"{k} {v['value']:.2f}x" for k, v in
                                                   results["speedup_vs_baseline"].items()))
    if "flags" in results:
        print("\nflags (vs default, same rounds): " + "; ".join(
            f"{n}: T=1 {v['T=1']['vs_default']['value']:.2f}, T=8 {v['T=8']['vs_default']['value']:.2f}"
            for n, v in results["flags"].items()))
    print("\nbf16 (XLA) vs f32:", results["format_accuracy"])
    if "format_accuracy_bf16_kernel" in results:
        print("bf16 (CPU kernel) vs f32:", results["format_accuracy_bf16_kernel"])


if __name__ == "__main__":
    main()
