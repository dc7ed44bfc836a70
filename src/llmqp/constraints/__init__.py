"""Constraints: JSON Schema, regex, choice and context-free grammars -> the allowed tokens at every step.

    spec = make_spec(json_schema={...})                  # or regex=, choice=, grammar=
    compiled = compile_constraint(spec, tokenizer)       # cached per (spec, tokenizer)
    m = compiled.matcher()                               # one per generation
    m.allowed() -> sorted int32 ids; m.forced(); m.accept(tok); m.can_stop(); m.is_done()
    m.try_accept(ids) -> n; m.rollback(n); m.count_allowed(ids)   # drafts: verify, then undo
    compiled.accepts(text) -> bool                       # is `text` a complete, valid output?

JSON-Schema keywords llguidance lacks are enforced exactly: `keywords.py` rewrites `not`, `if`/`then`/
`else`, `dependentRequired`/`dependentSchemas`/`dependencies`, `propertyNames`, overlapping `oneOf` and
the string `format`s of `formats.py` into keywords the grammar has; `unique.py` enforces `uniqueItems`
token by token above the grammar matcher. What neither can do exactly raises ConstraintError
(`unknown_formats="annotation"` lets non-standard format names constrain nothing instead).

Errors: `llmqp.ConstraintError` from `make_spec` / `compile_constraint` for anything wrong with the
constraint (see `base.py` for the full contract). Departures from JSON-Schema semantics that remain
(llguidance's; each one only *narrows* what is generated and accepted, never widens it): generated
object properties come in the order the schema lists them (`accepts()` with strict=False takes any
order); an integer has no fraction (`1.0` is not one); numbers with bounds have no exponent; strings use
no `\\uXXXX` escape for a printable character and no `\\/`. On maskbench these reject 0.2% of valid
instances (benchmarks/results/maskbench.json).
"""

from llmqp.constraints.base import (CompiledConstraint, ConstraintBackend, ConstraintKind, ConstraintSpec,
                                    Matcher, UnknownFormats, Whitespace)
from llmqp.constraints.compile import clear_cache, compile_constraint, default_backend
from llmqp.constraints.llguidance_backend import LLGuidanceBackend
from llmqp.constraints.spec import make_spec

__all__ = ["CompiledConstraint", "ConstraintBackend", "ConstraintKind", "ConstraintSpec", "LLGuidanceBackend",
           "Matcher", "UnknownFormats", "Whitespace", "clear_cache", "compile_constraint", "default_backend",
           "make_spec"]
