"""The constraint extension point: compile once, match many.

    make_spec(json_schema=|regex=|choice=|grammar=) -> ConstraintSpec   (validated, hashable)
    backend.compile(spec, tokenizer) -> CompiledConstraint              (cached per spec + tokenizer)
    compiled.matcher()               -> Matcher                         (one per generation, mutable)

Error contract: anything wrong with the *spec* (bad schema / regex / grammar, unsupported keyword) raises
`llmqp.ConstraintError` from `make_spec` or `compile`, never later. Matcher methods do not raise for user
input; calling `accept` with a token outside `allowed()` is a programming error (`ValueError`). A backend
that hits an internal resource limit in the middle of a generation raises `ConstraintError` from
`allowed()` rather than return a mask it cannot vouch for.
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


class Whitespace(str, enum.Enum):
    """Whitespace a JSON output may contain between tokens."""

    COMPACT = "compact"  # none: `{"a":1,"b":[2,3]}`, the same form as json.dumps(separators=(",", ":"))
    FLEXIBLE = "flexible"  # JSON whitespace between tokens, at most WHITESPACE_MAX_RUN (20) characters in a row


class UnknownFormats(str, enum.Enum):
    """What a JSON-Schema `format` outside the enforced set does (`llmqp.constraints.formats`)."""

    REFUSE = "refuse"  # ConstraintError naming the format and its place (the default)
    ANNOTATION = "annotation"  # a non-standard name (`url`, `path`, ...) constrains nothing, as in JSON
    #                            Schema 2019-09+ and `jsonschema`; standard formats without an exact form stay refused


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConstraintSpec:
    """A constraint as the user gave it, normalised to a hashable value (the compile-cache key).

    `source` is the canonical text: the JSON schema serialised compactly *with its key order kept*
    (property order in `properties` is the order the output uses), the regex, the choices as a JSON
    list, or the grammar text. `strict`, `whitespace_flexible` and `unknown_formats` only apply to JSON
    schemas.
    Build one with `llmqp.constraints.make_spec`, which validates the input."""

    kind: ConstraintKind
    source: str
    strict: bool = True
    whitespace_flexible: bool = False
    unknown_formats: UnknownFormats = UnknownFormats.REFUSE

    @property
    def whitespace(self) -> Whitespace:
        return Whitespace.FLEXIBLE if self.whitespace_flexible else Whitespace.COMPACT


class Matcher(abc.ABC):
    """The state of one constrained generation. Not thread-safe; one per generation."""

    vocab_size: int  # ids in `allowed()` / `forced()` are < vocab_size (the model's vocabulary)
    eos_ids: tuple[int, ...]

    @abc.abstractmethod
    def allowed(self) -> np.ndarray:
        """Sorted int32 ids of the tokens allowed next (EOS included when the output may stop here).

        # allowed: (K,) int32, K >= 1 until the match has ended; empty once an EOS was accepted."""

    @abc.abstractmethod
    def forced(self) -> list[int]:
        """Tokens that are the only continuation from here, in order (canonical tokenization); may be empty.

        Does not advance the matcher: `accept` each of them. Never contains EOS."""

    @abc.abstractmethod
    def accept(self, token_id: int) -> None:
        """Advance past `token_id` (an EOS token ends the match). Raises ValueError for a token that
        `allowed()` would not contain; the matcher is unusable afterwards."""

    @abc.abstractmethod
    def try_accept(self, token_ids) -> int:
        """Accept the longest prefix of `token_ids` that the constraint allows, one token at a time as
        `accept` would (an EOS ends the match and nothing after it is taken); returns its length.
        Never raises for a disallowed token: it stops there. Undo with `rollback(n)` (draft-and-verify)."""

    @abc.abstractmethod
    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (an EOS included). Raises ValueError when fewer than `n`
        were accepted. Does not undo an error state: a matcher that raised from `accept` stays unusable."""

    def count_allowed(self, token_ids) -> int:
        """How many leading tokens of `token_ids` the constraint allows from here, without advancing."""
        n = self.try_accept(token_ids)
        self.rollback(n)
        return n

    @abc.abstractmethod
    def can_stop(self) -> bool:
        """True when the text so far is a complete, valid output."""

    @abc.abstractmethod
    def is_done(self) -> bool:
        """True when no further token but EOS may be produced (the match ended or nothing else can follow)."""


class CompiledConstraint(abc.ABC):
    spec: ConstraintSpec

    @abc.abstractmethod
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the output (cheap: a copy of a compiled template)."""

    @abc.abstractmethod
    def accepts(self, text: str) -> bool:
        """True when `text` is a complete output that satisfies the constraint.

        Walks the text's canonical tokens (special-token strings are plain text here) through a fresh
        matcher and asks whether it may stop; a prefix of a valid output is *not* accepted."""


class ConstraintBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def compile(self, spec: ConstraintSpec, tokenizer) -> CompiledConstraint:
        """Compile `spec` for `tokenizer`; raises ConstraintError for a bad or unsupported spec."""
