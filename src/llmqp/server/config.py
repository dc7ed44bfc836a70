"""`ServerConfig`: every knob of `llmqp serve`, in one frozen object (the CLI builds it, the app reads it)."""

from __future__ import annotations

import dataclasses

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """model: a .gguf file or Hugging Face directory (None: the embedded SmolLM2-135M-Instruct).
    model_name: the id `/v1/models` lists and requests must name (None: derived from `model`).
    max_batch: scheduler slots (requests decoded together). max_waiting: requests (counting each of `n`
    choices) allowed to wait for a slot; beyond it, 429. compile_timeout_s: limit on compiling one
    request's constraint; beyond it, 400 with code `constraint_compile_timeout`. max_body_bytes: larger
    request bodies get 413 before they are parsed. default_max_tokens: used when a request gives neither
    `max_tokens` nor `max_completion_tokens` (always capped by the context left after the prompt).
    api_key: when set, every endpoint but /health needs `Authorization: Bearer <api_key>`.
    compile_workers: threads that compile constraints (a timed-out compile keeps its thread until it ends).
    shutdown_timeout_s: on SIGINT/SIGTERM, how long running requests may finish before they are aborted.
    warm_up: compile every prefill shape (`Scheduler.warm_up`) before /health reports ready, so the first burst
    of requests does not wait for XLA compiles."""

    model: str | None = None
    model_name: str | None = None
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_waiting: int = 64
    compile_timeout_s: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    default_max_tokens: int = 512
    api_key: str | None = None
    compile_workers: int = 2
    shutdown_timeout_s: float = 30.0
    warm_up: bool = False

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        from pathlib import Path

        path = Path(self.model)
        return path.stem if path.suffix == ".gguf" else path.name
