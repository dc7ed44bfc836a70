"""`llmqp batch INPUT.jsonl -o OUTPUT.jsonl`: the arguments and the entry point (registered in llmqp.cli)."""

from __future__ import annotations

import argparse
import sys

from llmqp.batch.rows import BatchConfig


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    from llmqp.cli import _add_model_arg, add_generation_arguments

    p.add_argument("input", metavar="INPUT.jsonl",
                   help="one JSON object per line: 'prompt' (or the template's fields), optional 'id' and "
                        "optional per-row 'json_schema' / 'regex' / 'choice' / 'grammar'")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl",
                   help="appended row by row; re-running the same command resumes it")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE|JSON", help="every row's constraint (unless the row has its own)")
    c.add_argument("--regex", help="constrain every row to a full match of this regular expression")
    c.add_argument("--choice", action="append", help="constrain every row to one of these strings (repeatable)")
    c.add_argument("--grammar", metavar="FILE|GRAMMAR", help="constrain every row to this grammar (Lark syntax)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-field", default="prompt", help="the row field holding the prompt (default: prompt)")
    src.add_argument("--template", help="build each prompt from the row's fields, e.g. 'Extract the person: {text}'")
    add_generation_arguments(p)
    p.add_argument("--raw", action="store_true", help="use prompts as raw text (no chat template)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Data, one engine per actor (needs: pip install 'llmqp[ray]')")
    p.add_argument("--address", default=None,
                   help="with --ray: the cluster to join (default: a local cluster, or RAY_ADDRESS)")
    p.add_argument("--actors", type=int, default=1, help="with --ray: engines (actors) to run (default 1)")
    _add_model_arg(p)
    p.add_argument("--devices", type=int, default=None,
                   help="spread the model over N devices (vocabulary sharded; see llmqp.sharding)")


def config_from_args(args) -> BatchConfig:
    """The `BatchConfig` the arguments describe. Raises LLMQPError for an unreadable schema or grammar and
    InvalidArgument for bad values."""
    from llmqp.cli import _read_grammar, _read_json_schema

    constraint = {}
    if args.json_schema is not None:
        constraint["json_schema"] = _read_json_schema(args.json_schema)
    elif args.regex is not None:
        constraint["regex"] = args.regex
    elif args.choice is not None:
        constraint["choice"] = tuple(args.choice)
    elif args.grammar is not None:
        constraint["grammar"] = _read_grammar(args.grammar)
    return BatchConfig(prompt_field=args.prompt_field, template=args.template, max_tokens=args.max_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                       raw=args.raw, strict=not args.no_strict, whitespace=args.whitespace, plan=args.plan,
                       forced=not args.no_forced, draft=args.draft, max_batch=args.max_batch, **constraint)


def cli_batch(args) -> int:
    config = config_from_args(args)
    progress = False if args.no_progress else None
    if args.ray:
        from llmqp.ray import run_batch_ray

        summary = run_batch_ray(args.input, args.output, config, model=args.model, dtype=args.dtype,
                                devices=args.devices, address=args.address, actors=args.actors,
                                progress=progress)
    else:
        from llmqp import Engine
        from llmqp.batch.runner import run_batch

        config.check()  # option mistakes before the model loads
        engine = Engine(args.model, dtype=args.dtype, devices=args.devices)
        summary = run_batch(engine, args.input, args.output, config, progress=progress)
    print(f"llmqp batch: {summary.describe()}", file=sys.stderr)
    return 0
