"""LLM-QP: constrained decoding planned like a database query."""

from llmqp.errors import ConstraintError, LLMQPError, ModelLoadError

__all__ = ["ConstraintError", "LLMQPError", "ModelLoadError"]
