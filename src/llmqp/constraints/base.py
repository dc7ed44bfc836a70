"""The constraint extension point: compile once, match many.

    backend.compile(spec, tokenizer) -> CompiledConstraint      (cached per spec + tokenizer)
    compiled.matcher()               -> Matcher                 (one per generation, mutable)

Error contract: anything wrong with the *spec* (bad schema / regex / grammar, unsupported keyword) raises
`llmqp.ConstraintError` from `compile`, never later. Matcher methods do not raise for user input; calling
`accept` with a token outside `allowed()` is a programming error (`ValueError`).
"""

from __future__ import annotations

import abc
import dataclasses
import enum

import numpy as np


class ConstraintKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConstraintSpec:
    """A constraint as the user gave it, normalised to a hashable value (the compile-cache key).

    `source` is the canonical text: the JSON schema serialised with sorted keys, the regex, the choices
    as a JSON list, or the grammar text. `strict` and `whitespace_flexible` only apply to JSON schemas."""

    kind: ConstraintKind
    source: str
    strict: bool = True
    whitespace_flexible: bool = False


class Matcher(abc.ABC):
    """The state of one constrained generation."""

    @abc.abstractmethod
    def allowed(self) -> np.ndarray:
        """Sorted int32 ids of the tokens allowed next (EOS included when the output may stop here)."""

    @abc.abstractmethod
    def forced(self) -> list[int]:
        """Tokens that are the only continuation from here, in order (canonical tokenization); may be empty."""

    @abc.abstractmethod
    def accept(self, token_id: int) -> None:
        """Advance past `token_id` (an EOS token ends the match)."""

    @abc.abstractmethod
    def can_stop(self) -> bool:
        """True when the text so far is a complete, valid output."""

    @abc.abstractmethod
    def is_done(self) -> bool:
        """True when no further token may be produced (the match ended or nothing else can follow)."""


class CompiledConstraint(abc.ABC):
    spec: ConstraintSpec

    @abc.abstractmethod
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the output."""

    @abc.abstractmethod
    def accepts(self, text: str) -> bool:
        """True when `text` is a complete output that satisfies the constraint."""


class ConstraintBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def compile(self, spec: ConstraintSpec, tokenizer) -> CompiledConstraint:
        """Compile `spec` for `tokenizer`; raises ConstraintError for a bad or unsupported spec."""
