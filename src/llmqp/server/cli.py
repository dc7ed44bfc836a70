"""`llmqp serve`: arguments and entry point (registered by `llmqp.cli`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmqp.errors import LLMQPError, ModelLoadError


def add_serve_arguments(p) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face directory "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: from --model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (scheduler slots)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests allowed to wait for a slot; beyond, clients get 429")
    p.add_argument("--compile-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a request's constraint may take to compile; beyond, 400")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens when a request gives none (capped by the context left)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $LLMQP_API_KEY, else no key)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGINT/SIGTERM, seconds running requests may finish before they are aborted")
    p.add_argument("--warm-up", action="store_true",
                   help="compile every prefill shape before /health reports ready (the first burst then waits for "
                        "no XLA compile; ~30 s on the first start, ~10 s once in the compile cache)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def config_from_args(args):
    from llmqp.server.config import ServerConfig

    if args.model is not None and not Path(args.model).exists():
        raise ModelLoadError(f"--model: no such file or directory: {args.model}")
    for name, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-waiting", args.max_waiting, 0), ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--default-max-tokens", args.default_max_tokens, 1)):
        if value < low:
            raise LLMQPError(f"{name} must be >= {low}, got {value}")
    if args.port > 65535:
        raise LLMQPError(f"--port must be <= 65535, got {args.port}")
    if args.compile_timeout <= 0:
        raise LLMQPError(f"--compile-timeout must be > 0, got {args.compile_timeout}")
    return ServerConfig(model=args.model, model_name=args.model_name, dtype=args.dtype, host=args.host,
                        port=args.port, max_batch=args.max_batch, max_waiting=args.max_waiting,
                        compile_timeout_s=args.compile_timeout, max_body_bytes=args.max_body_bytes,
                        default_max_tokens=args.default_max_tokens,
                        api_key=args.api_key or os.environ.get("LLMQP_API_KEY") or None,
                        shutdown_timeout_s=args.shutdown_timeout, warm_up=args.warm_up)


def cli_serve(args) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn stops taking connections, lets running requests finish for up
    to --shutdown-timeout, then the engine thread aborts what is left). Returns 2 if the model fails to
    load."""
    try:
        import uvicorn
    except ImportError:
        raise LLMQPError("llmqp serve needs the server extra: pip install 'llmqp[server]'") from None
    from llmqp.server.app import create_app

    config = config_from_args(args)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=config.shutdown_timeout_s,
                                           lifespan="on"))
    failed: list[str] = []

    def on_load_error(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app.state.on_load_error = on_load_error
    server.run()
    if failed:
        raise ModelLoadError(failed[0])
    if not server.started:
        print(f"llmqp: error: could not start the server on {config.host}:{config.port}", file=sys.stderr)
        return 2
    return 0
