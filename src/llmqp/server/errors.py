"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every user mistake the server detects becomes an `APIError` before any work is queued; the app turns it
into a JSON response. `LLMQPError`s raised by the engine for a request (a bad schema, regex, prompt or
option) map to 400 `invalid_request_error`."""

from __future__ import annotations

from llmqp.errors import LLMQPError


class APIError(LLMQPError):
    """An HTTP error answer: status, OpenAI error type, the offending parameter (or None) and a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(e: LLMQPError, param: str | None = None) -> APIError:
    """A library error raised for one request -> 400 invalid_request_error with the library's message."""
    if isinstance(e, APIError):
        return e
    from llmqp.errors import ConstraintError

    code = "invalid_constraint" if isinstance(e, ConstraintError) else None
    return invalid(str(e), param=param, code=code)
