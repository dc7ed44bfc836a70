"""The exceptions users see. Every user mistake raises a subclass of `LLMQPError` with a message
that names what is wrong; anything else escaping the package is a bug."""


class LLMQPError(Exception):
    """Base class of every error LLM-QP raises on purpose."""


class ModelLoadError(LLMQPError):
    """A checkpoint is missing, malformed, or of an architecture/tensor layout we do not support."""


class ConstraintError(LLMQPError):
    """A JSON schema, regex, choice list or grammar is invalid or uses something we cannot enforce.

    Raised at compile time (``Engine.constraint`` / ``Engine.generate`` before any token is produced),
    never in the middle of a generation."""


class ExportError(LLMQPError):
    """An exported artifact cannot be written or read back."""


class PromptError(LLMQPError, ValueError):
    """A prompt cannot be used: it is empty, holds text that is not valid Unicode (a lone surrogate such as
    "\\udcff"), or does not fit the model's context."""


class ChatTemplateError(PromptError):
    """The chat template cannot render these messages, or the model has none (pass raw=True for plain text)."""
