"""LLM-QP: constrained decoding planned like a database query.

The public surface: everything users import is listed in `__all__`; other modules may change."""

from llmqp.compiled.runtime import load_exported
from llmqp.engine import Engine, Request
from llmqp.errors import ConstraintError, LLMQPError, ModelLoadError
from llmqp.model.loader import cache_dir
from llmqp.results import GenerationResult, StepTrace
from llmqp.sampling import InvalidArgument, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "ConstraintError",
    "Engine",
    "GenerationResult",
    "InvalidArgument",
    "LLMQPError",
    "ModelLoadError",
    "Request",
    "SamplingParams",
    "StepTrace",
    "cache_dir",
    "load_exported",
]
