"""What `Scheduler.step()` returns: events, each naming its request."""

from __future__ import annotations

import dataclasses

from llmqp.results import GenerationResult, StepTrace


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """Tokens one request got in one scheduler tick (several for a forced run). `text` is the new text
    delta: "" while a multi-byte character or a possible stop-string prefix is held back; concatenating every
    delta of a request gives its `result.text`. top_logprobs: per token, [(token id, logprob)] over the
    allowed set, best first, when the request asked for them."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    steps: list[StepTrace]
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass(frozen=True)
class FinishedEvent:
    """The last event of a request. result.finish_reason: "stop" | "length" | "error" | "abort"; for
    "error", result.error holds the message and `exception` the original exception."""

    request_id: str
    result: GenerationResult
    exception: BaseException | None = None

    @property
    def error(self) -> str | None:
        return self.result.error
