"""Export a fused constrained generation as a self-describing artifact directory.

    out_dir/
      manifest.json        shapes, dtypes, model config, tokenizer reference + chat template, constraint,
                           sampling settings, versions, the export-time result (a self-check)
      model.jaxexport      `jax.export.Exported.serialize()`: prefill + the fused loop + the automaton
                           tables (baked in as constants, unpadded: unlike `run_fused`, an artifact
                           serves one constraint), lowered for every platform asked for
      model.mlir           the same module as StableHLO text (for reading; not loaded)
      weights.safetensors  the trunk and head weights (the dense head's transposed copy is rebuilt at load)
      tokenizer.json       the `tokenizers` tokenizer
      run.py               a copy of `llmqp.compiled.runtime`: `python run.py DIR` needs no llmqp

The exported function is f(weights: dict[str, f32[...]], prompt_ids: i32[P], prompt_len: i32[],
seed: u32[]) -> {tokens, logprobs, count, state, finish, final}. Sampling settings and max_tokens are
constants of the artifact; the prompt (up to P tokens) and the seed are inputs. `llmqp.compiled.runtime`
runs it with JAX, numpy, tokenizers, safetensors and jinja2 only.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import sampling
from llmqp.compiled import loop
from llmqp.compiled.tables import ConstraintTables, Fallback, unconstrained_tables
from llmqp.core.spec import DEFAULT_SPEC, DecodeSpec
from llmqp.errors import ExportError
from llmqp.model import transformer

FORMAT = "llmqp-export"
FORMAT_VERSION = 1
DEFAULT_PLATFORMS = ("cpu", "cuda")
MIN_PROMPT_BUCKET = 128  # room for other prompts than the exported one (a chat template alone is ~30)


def flat_weights(params: dict) -> dict[str, np.ndarray]:
    """Params pytree -> the named tensors stored in the artifact (`unembed` is derived, see
    `params_from_flat`; a tied `unembed_rows` is `embed`)."""
    flat = {"embed": params["embed"], "final_norm": params["final_norm"]}
    if params["unembed_rows"] is not params["embed"]:
        flat["unembed_rows"] = params["unembed_rows"]
    for i, layer in enumerate(params["layers"]):  # not the CPU kernel's packed copy: artifacts use XLA's dot
        flat.update({f"layers.{i}.{k}": v for k, v in layer.items() if k != "packed"})
    return {k: np.asarray(v) for k, v in flat.items()}


def params_from_flat(flat: dict, n_layers: int) -> dict:
    """The inverse of `flat_weights` plus the derived `unembed` (given in `flat`). Trace-time only."""
    layers = [{} for _ in range(n_layers)]
    for name, value in flat.items():
        if name.startswith("layers."):
            _, i, k = name.split(".", 2)
            layers[int(i)][k] = value
    rows = flat.get("unembed_rows", flat["embed"])
    return {"embed": flat["embed"], "unembed_rows": rows, "unembed": flat["unembed"],
            "final_norm": flat["final_norm"], "layers": layers}


def make_generate_fn(cfg, tables: ConstraintTables, fc: loop.FusedConfig, *, prompt_bucket: int, max_tokens: int,
                     sampling_params: sampling.SamplingParams, sparse_threshold: int):
    """The function that is exported: prefill of a padded prompt, then the fused loop. The tables are
    closed over, unpadded (constants of the module: an artifact serves one constraint)."""
    dev = loop.device_tables(tables)
    cache_len = fc.spec.cache_len(prompt_bucket, max_tokens)

    def generate(weights, prompt_ids, prompt_len, seed):
        params = params_from_flat(weights, cfg.n_layers)
        tables_c = {k: jnp.asarray(v) for k, v in dev.items()}
        cache = transformer.init_cache(cfg, 1, cache_len, transformer.cache_dtype(params))
        hidden, cache = transformer.forward(params, cache, prompt_ids[None], jnp.zeros((1,), jnp.int32), cfg=cfg)
        last = jax.lax.dynamic_index_in_dim(hidden[0], prompt_len - 1, axis=0, keepdims=True)  # (1, d)
        return loop.fused_decode(params, tables_c, last, cache, prompt_len, jnp.int32(max_tokens), seed,
                                 jnp.float32(sampling_params.temperature), jnp.int32(sampling_params.top_k),
                                 jnp.float32(sampling_params.top_p), jnp.int32(sparse_threshold), fc=fc)

    return generate


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    directory: Path
    manifest: dict
    export_seconds: float


def export(engine, prompt, out_dir, *, regex=None, choice=None, json_schema=None, strict: bool = True,
           whitespace: str = "compact", max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
           top_k: int = 0, seed: int = 0, raw: bool = False, forced: bool = True,
           sparse_threshold: int | None = None, prompt_bucket: int | None = None, platforms=DEFAULT_PLATFORMS,
           tables: ConstraintTables | None = None, spec: DecodeSpec | None = None) -> ExportInfo:
    """Write the artifact for generating from `prompt` under the constraint (none: unconstrained).

    forced: the artifact feeds forced runs whole, like `Engine.generate(forced=True)` (default), or
    scores every step like forced=False; its tokens equal the engine's with the same setting.
    prompt_bucket: the padded prompt length P: later prompts must fit in P tokens (default: the
    engine's prefill bucket for `prompt`, at least 128). The artifact prefills P positions in one
    forward; the engine prefills in chunks of its `DecodeSpec.prefill_chunk` (256; 64 with the CPU
    kernels), so beyond that the two may differ in the last bits. spec: the decode rules (default: the
    engine's). tables: given
    tables instead of compiling the constraint (synthetic automata). Raises ExportError when the
    constraint is not regular (the reason says why) or the directory cannot be written. Takes tens of
    seconds for the default model (lowering + serialization + 0.5 GB of weights), plus one run of the
    artifact function on this machine for the self-check recorded in the manifest."""
    from llmqp.compiled.api import constraint_tables

    t_start = time.perf_counter()
    spec = spec or engine.spec
    sp = sampling.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if int(max_tokens) != max_tokens or max_tokens < 1:
        raise ExportError(f"max_tokens must be a positive integer, got {max_tokens}")
    constraint_kw = dict(regex=regex, choice=choice, json_schema=json_schema, strict=strict, whitespace=whitespace)
    if tables is None:
        if any(v is not None for v in (regex, choice, json_schema)):
            tables = constraint_tables(engine, constraint_kw)
            if isinstance(tables, Fallback):
                raise ExportError(f"cannot export: the constraint does not run fused ({tables.reason})")
        else:
            tables = unconstrained_tables(engine.config.vocab_size, engine.tokenizer.eos_ids)
    ids = np.asarray(engine.prompt_ids(prompt, raw), np.int32)
    cfg = engine.config
    fc = loop.config_for(cfg, tables, sp, max_tokens, forced=forced, spec=spec)
    bucket = int(prompt_bucket or max(fc.spec.prefill_end(len(ids)), MIN_PROMPT_BUCKET))
    if len(ids) > bucket:
        raise ExportError(f"the prompt has {len(ids)} tokens, more than prompt_bucket={bucket}")
    threshold = loop.clip_threshold(sparse_threshold, cfg.vocab_size, fc.spec)
    fn = make_generate_fn(cfg, tables, fc, prompt_bucket=bucket, max_tokens=max_tokens, sampling_params=sp,
                          sparse_threshold=threshold)

    weights = flat_weights(engine.params)
    weights_in = dict(weights, unembed=np.asarray(engine.params["unembed"]))
    specs = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights_in.items()},
             jax.ShapeDtypeStruct((bucket,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
             jax.ShapeDtypeStruct((), jnp.uint32))
    try:
        exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)
        blob = exported.serialize()
    except Exception as e:  # lowering problems are ours, but the user needs the message
        raise ExportError(f"jax.export failed: {type(e).__name__}: {e}") from e

    # Self-check: run the function once here; the manifest records what the artifact must produce.
    padded = np.zeros(bucket, np.int32)
    padded[: len(ids)] = ids
    out = jax.device_get(jax.jit(fn)({k: jnp.asarray(v) for k, v in weights_in.items()}, jnp.asarray(padded),
                                     jnp.int32(len(ids)), jnp.uint32(sp.seed)))
    result = loop.to_output(out)

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        from safetensors.numpy import save_file

        (out_dir / "model.jaxexport").write_bytes(blob)
        (out_dir / "model.mlir").write_text(exported.mlir_module())
        save_file(weights, str(out_dir / "weights.safetensors"))
        engine.tokenizer.hf.save(str(out_dir / "tokenizer.json"))
        (out_dir / "run.py").write_text((Path(__file__).parent / "runtime.py").read_text())
        manifest = _manifest(engine, prompt, raw, ids, bucket, tables, fc, sp, max_tokens, exported, weights,
                             result, constraint_kw, threshold)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    except OSError as e:
        raise ExportError(f"cannot write the artifact to {out_dir}: {e}") from None
    return ExportInfo(out_dir, manifest, time.perf_counter() - t_start)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("llmqp", "jax", "jaxlib", "numpy", "tokenizers", "safetensors", "outlines-core", "llguidance"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _manifest(engine, prompt, raw, ids, bucket, tables, fc, sp, max_tokens, exported, weights, result,
              constraint_kw, threshold) -> dict:
    tok = engine.tokenizer
    text = tok.decode(result.token_ids)
    given = {k: v for k, v in constraint_kw.items() if v is not None and k in ("regex", "choice", "json_schema")}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": "llmqp.compiled.export",
        "function": {
            "file": "model.jaxexport",
            "stablehlo": "model.mlir",
            "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "inputs": {
                "weights": "dict name -> tensor: every tensor of weights.safetensors, plus 'unembed' = "
                           "transpose of 'unembed_rows' (or of 'embed' when absent), contiguous",
                "prompt_ids": {"shape": [bucket], "dtype": "int32", "note": "prompt token ids, zero-padded"},
                "prompt_len": {"shape": [], "dtype": "int32"},
                "seed": {"shape": [], "dtype": "uint32"},
            },
            "outputs": {
                "tokens": {"shape": [fc.buffer_len], "dtype": "int32", "note": "first `count` are the output"},
                "logprobs": {"shape": [fc.buffer_len], "dtype": "float32"},
                "count": {"shape": [], "dtype": "int32"},
                "state": {"shape": [], "dtype": "int32"},
                "finish": {"shape": [], "dtype": "int32",
                           "values": {str(loop.FINISH_EOS): "eos", str(loop.FINISH_DONE): "done",
                                      str(loop.FINISH_LENGTH): "length"}},
                "final": {"shape": [], "dtype": "bool"},
            },
        },
        "weights": {
            "file": "weights.safetensors",
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in weights.items()},
            "derived": {"unembed": "transpose(unembed_rows if present else embed)"},
        },
        "model": {"config": engine.config.to_dict(), "source": str(getattr(engine, "source", ""))},
        "tokenizer": {
            "file": "tokenizer.json",
            "eos_ids": list(tok.eos_ids),
            "bos_token": tok.id_to_token(tok.bos_id) if tok.bos_id is not None else "",
            "eos_token": tok.id_to_token(tok.eos_id),
            "chat_template": tok.chat_template or _chatml(),
        },
        "prompt": {"text": prompt if isinstance(prompt, str) else None, "messages": prompt if isinstance(prompt, list)
                   else None, "raw": bool(raw), "bucket": bucket, "token_ids": [int(i) for i in ids]},
        "constraint": {**{k: v for k, v in given.items()}, **_describe(tables)},
        "sampling": {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k, "seed": sp.seed,
                     "greedy": sp.greedy},
        "max_tokens": int(max_tokens),
        "plans": {"sparse_threshold": threshold, "sparse_widths": list(fc.sparse_widths),
                  "dense_widths": list(fc.widths), "forced_runs": fc.forced_runs,
                  "feed_sizes": list(fc.feed_sizes)},
        "expected": {"token_ids": result.token_ids, "text": text, "finish_reason": result.finish_reason,
                     "valid": result.valid},
        "versions": _versions(),
        "platform_at_export": f"{sys.platform}/{jax.default_backend()}",
    }


def _describe(tables: ConstraintTables) -> dict:
    d = {k: v for k, v in tables.description.items() if isinstance(v, (str, int, float, bool, list))}
    d.update(states=tables.num_states, entries=tables.num_entries, max_k=tables.max_k,
             table_bytes=tables.nbytes())
    return d


def _chatml() -> str:
    from llmqp.model.tokenizer import CHATML_TEMPLATE

    return CHATML_TEMPLATE
