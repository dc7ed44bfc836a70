"""LLM-QP: constrained decoding planned like a database query.

The public surface: everything users import is listed in `__all__`; other modules may change."""

from llmqp.compiled.runtime import load_exported
from llmqp.core.events import FinishedEvent, TokenEvent
from llmqp.core.request import ContextLengthError, Request
from llmqp.core.scheduler import Scheduler
from llmqp.core.spec import DecodeSpec
from llmqp.engine import Engine
from llmqp.errors import ChatTemplateError, ConstraintError, LLMQPError, ModelLoadError, PromptError
from llmqp.model.loader import cache_dir
from llmqp.results import GenerationResult, StepTrace
from llmqp.sampling import InvalidArgument, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "ChatTemplateError",
    "ConstraintError",
    "ContextLengthError",
    "DecodeSpec",
    "FinishedEvent",
    "PromptError",
    "Scheduler",
    "TokenEvent",
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
