"""`Request`: one generation request, as `Engine.generate` takes it keyword by keyword, and its validation."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmqp.core.drafts import DRAFT_MODES
from llmqp.errors import PromptError
from llmqp.sampling import InvalidArgument, SamplingParams



class ContextLengthError(PromptError, InvalidArgument):
    """The prompt plus max_tokens does not fit the model's context."""


CONSTRAINT_KINDS = ("json_schema", "regex", "choice", "grammar")
PLAN_NAMES = ("auto", "dense", "sparse", "sparse_union")
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """One generation request (the keyword arguments of `Engine.generate`).

    prompt: a string (one user message through the chat template; plain text with raw=True), a list of
    {"role", "content"} messages, or a list of token ids (used as given). At most one constraint of
    json_schema / regex / choice / grammar, or `constraint`: an already compiled constraint from
    `Engine.constraint(...)`. stop: strings that end the generation (not included in the text).
    plan: "auto" | "dense" | "sparse" | "sparse_union" (every plan gives the same tokens). forced: emit tokens
    the constraint forces without scoring them. compiled: True / "auto" runs regular constraints in the fused
    on-device loop when the request has the scheduler to itself. top_logprobs: how many alternatives (over
    the allowed set) to report per token, 0..20. draft: "auto" (the planner chooses a draft length per step),
    "none" (no drafts beyond the forced runs), "forced" (a sampled token and the forced run after it in one
    forward) or "lookup" (always draft by prompt lookup); drafts are verified, so the tokens are the same
    whatever the choice (`llmqp.core.drafts`). amortize="margin" (lossy, opt-in): when the last scored token's
    top-2 log-prob margin is at least amortize_tau (nats), a lookup draft may be emitted *without
    verification*; the draft planner then minimises amortize_lambda * latency + (1 - amortize_lambda) *
    measured disagreement (sampled checks); results count the unverified tokens."""

    prompt: Any
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    raw: bool = False
    json_schema: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    strict: bool = True
    whitespace: str = "compact"
    stop: list[str] | None = None
    plan: str = "auto"
    forced: bool = True
    compiled: bool | str = False
    top_logprobs: int = 0
    draft: str = "auto"
    amortize: str = "none"
    amortize_tau: float = 3.0
    amortize_lambda: float = 0.5
    constraint: Any = None

    @classmethod
    def coerce(cls, value) -> "Request":
        """An `llmqp.Request` as is, or one built from a dict with the same keys; raises InvalidArgument for
        anything else, unknown keys or a missing prompt."""
        if isinstance(value, Request):
            return value
        if not isinstance(value, dict):
            raise InvalidArgument(f"a request must be an llmqp.Request or a dict, got {type(value).__name__}")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"unknown request keys: {', '.join(sorted(unknown))}")
        if "prompt" not in value:
            raise InvalidArgument("a request needs a 'prompt'")
        return cls(**value)

    def constraint_kw(self) -> dict:
        return dict(json_schema=self.json_schema, regex=self.regex, choice=self.choice, grammar=self.grammar,
                    strict=self.strict, whitespace=self.whitespace)

    def constraint_kinds(self) -> list[str]:
        return [k for k in CONSTRAINT_KINDS if getattr(self, k) is not None]

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    def validate(self) -> None:
        """Check every option value (cheap: no tokenizing, no constraint compile). Raises InvalidArgument."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.sampling_params()
        kinds = self.constraint_kinds()
        if len(kinds) + (self.constraint is not None) > 1:
            raise InvalidArgument(f"give at most one constraint, got {', '.join(kinds + ['constraint'] * (self.constraint is not None))}")
        if self.plan not in PLAN_NAMES:
            raise InvalidArgument(f"plan must be one of {', '.join(PLAN_NAMES)}; got {self.plan!r}")
        if self.compiled not in (False, True, "auto"):
            raise InvalidArgument(f"compiled must be False, True or 'auto', got {self.compiled!r}")
        if self.draft not in DRAFT_MODES:
            raise InvalidArgument(f"draft must be one of {', '.join(DRAFT_MODES)}; got {self.draft!r}")
        if self.amortize not in ("none", "margin"):
            raise InvalidArgument(f"amortize must be 'none' or 'margin', got {self.amortize!r}")
        if self.amortize == "margin" and self.draft not in ("auto", "lookup"):
            raise InvalidArgument("amortize='margin' takes lookup drafts: use draft='auto' or 'lookup'")
        if not (isinstance(self.amortize_tau, (int, float)) and self.amortize_tau >= 0):
            raise InvalidArgument(f"amortize_tau must be a number >= 0, got {self.amortize_tau!r}")
        if not (isinstance(self.amortize_lambda, (int, float)) and 0 <= self.amortize_lambda <= 1):
            raise InvalidArgument(f"amortize_lambda must be in [0, 1], got {self.amortize_lambda!r}")
        if self.whitespace not in ("compact", "flexible"):
            raise InvalidArgument(f"whitespace must be 'compact' or 'flexible', got {self.whitespace!r}")
        if self.stop is not None:
            if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
                raise InvalidArgument("stop must be a list of non-empty strings")
        if (isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int)
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidArgument(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        p = self.prompt
        if not (isinstance(p, str) or _is_messages(p) or _is_token_ids(p)):
            raise InvalidArgument("prompt must be a string, a list of {'role', 'content'} dicts or a list of token ids")
        if self.raw and not isinstance(p, str):
            raise InvalidArgument("raw=True needs a string prompt")


def _is_messages(p) -> bool:
    return (isinstance(p, list) and len(p) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in p))


def _is_token_ids(p) -> bool:
    return (isinstance(p, (list, tuple)) and len(p) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p))
