"""`llmqp serve`: an OpenAI-compatible HTTP server on the step-level scheduler.

An asyncio front (FastAPI on uvicorn) validates and prepares requests; one engine thread owns the
`llmqp.Scheduler` and streams events back. See `app` (routes), `protocol` (wire format), `tools`
(function calling), `worker` (the engine thread), `metrics` (Prometheus), `cli` (the command)."""

from llmqp.server.app import create_app
from llmqp.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
