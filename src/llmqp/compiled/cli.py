"""argparse-ready helpers for `llmqp export` and `llmqp run-exported` (wired by `llmqp.cli`):

    p = subparsers.add_parser("export", help=...);        add_export_arguments(p);  p.set_defaults(func=cli_export)
    p = subparsers.add_parser("run-exported", help=...);  add_run_exported_arguments(p)
    p.set_defaults(func=cli_run_exported)

Both functions return a process exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompt", help="the prompt (one user message, chat-templated unless --raw)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--regex", help="the output matches this regex (Rust regex syntax)")
    group.add_argument("--choice", action="append", help="the output is one of these (repeat the flag)")
    group.add_argument("--json-schema", help="a JSON schema: a file path or inline JSON")
    parser.add_argument("-o", "--output", required=True, help="artifact directory to write")
    parser.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="no chat template")
    parser.add_argument("--prompt-bucket", type=int, default=None,
                        help="longest prompt (tokens) the artifact accepts (default: the exported prompt's bucket)")
    parser.add_argument("--platforms", default="cpu,cuda", help="comma-separated lowering platforms")
    return parser


def _schema_arg(value: str | None):
    if value is None:
        return None
    path = Path(value)
    if not value.lstrip().startswith(("{", "[", "true", "false")) and path.is_file():
        return path.read_text()
    return value


def cli_export(args) -> int:
    from llmqp import Engine
    from llmqp.compiled.export import export
    from llmqp.errors import LLMQPError

    try:
        engine = Engine(args.model) if args.model else Engine()
        info = export(engine, args.prompt, args.output, regex=args.regex, choice=args.choice,
                      json_schema=_schema_arg(args.json_schema), max_tokens=args.max_tokens,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                      raw=args.raw, prompt_bucket=args.prompt_bucket,
                      platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()))
    except LLMQPError as e:
        print(f"llmqp: error: {e}", file=sys.stderr)
        return 2
    m = info.manifest
    print(f"wrote {info.directory} in {info.export_seconds:.1f} s: platforms {m['function']['platforms']}, "
          f"{m['constraint'].get('states', '?')} automaton states, prompt bucket {m['prompt']['bucket']} tokens")
    print(f"export-time output: {json.dumps(m['expected']['text'], ensure_ascii=False)} "
          f"({m['expected']['finish_reason']}, valid={m['expected']['valid']})")
    return 0


def add_run_exported_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from llmqp.compiled.runtime import add_arguments

    return add_arguments(parser)


def cli_run_exported(args) -> int:
    """Run an artifact; an unreadable artifact or a prompt it cannot take prints one error line (exit 2)."""
    from llmqp.compiled.runtime import run
    from llmqp.errors import LLMQPError

    try:
        return run(args)
    except LLMQPError as e:  # ArtifactError, ArtifactInputError
        print(f"llmqp: error: {e}", file=sys.stderr)
        return 2
