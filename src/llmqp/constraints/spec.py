"""User input -> `ConstraintSpec`: one constraint kind, validated for shape, normalised to a hashable key."""

from __future__ import annotations

import json
from typing import Any

from llmqp.constraints.base import ConstraintKind, ConstraintSpec, UnknownFormats, Whitespace
from llmqp.errors import ConstraintError


def make_spec(*, json_schema: Any = None, regex: str | None = None, choice: list[str] | None = None,
              grammar: str | None = None, strict: bool = True,
              whitespace: Whitespace | str = Whitespace.COMPACT,
              unknown_formats: UnknownFormats | str = UnknownFormats.REFUSE) -> ConstraintSpec:
    """Normalise exactly one of the four constraint kinds into a `ConstraintSpec`.

    json_schema: a dict (or `True`/`False`), a JSON string, or a Pydantic model class.
    regex: matched against the whole output (Rust `regex` syntax: no look-around, no back-references).
    choice: the output is exactly one of these strings.
    grammar: a context-free grammar in Lark syntax (llguidance dialect); GBNF is converted.
    strict (JSON only): True generates only the properties the schema declares (every object schema
        that declares properties and says nothing about additional ones is closed); False follows
        JSON-Schema semantics (undeclared properties allowed wherever the schema allows them).
    whitespace (JSON only): "compact" (default) or "flexible".
    unknown_formats (JSON only): "refuse" (default: a `format` outside the enforced set raises
        ConstraintError) or "annotation" (a non-standard format name constrains nothing, as JSON Schema
        2019-09+ and `jsonschema` read it; see `llmqp.constraints.formats`).

    Raises ConstraintError when zero or several kinds are given or the value has the wrong shape.
    Does not compile anything: schema/regex/grammar errors surface from `compile_constraint`."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                               ("grammar", grammar)) if v is not None}
    if len(given) != 1:
        raise ConstraintError("give exactly one of json_schema=, regex=, choice=, grammar= "
                              f"(got {', '.join(given) or 'none'})")
    try:
        whitespace = Whitespace(whitespace)
    except ValueError:
        raise ConstraintError(f"whitespace must be 'compact' or 'flexible', not {whitespace!r}") from None
    flexible = whitespace is Whitespace.FLEXIBLE
    try:
        unknown_formats = UnknownFormats(unknown_formats)
    except ValueError:
        raise ConstraintError(f"unknown_formats must be 'refuse' or 'annotation', not {unknown_formats!r}") from None
    if json_schema is not None:
        source = json.dumps(_schema_value(json_schema), separators=(",", ":"), ensure_ascii=False)
        return ConstraintSpec(kind=ConstraintKind.JSON_SCHEMA, source=source, strict=bool(strict),
                              whitespace_flexible=flexible, unknown_formats=unknown_formats)
    if regex is not None:
        if not isinstance(regex, str):
            raise ConstraintError(f"regex must be a string, not {type(regex).__name__}")
        return ConstraintSpec(kind=ConstraintKind.REGEX, source=regex)
    if choice is not None:
        if isinstance(choice, str) or not all(isinstance(c, str) for c in choice):
            raise ConstraintError("choice must be a list of strings")
        choices = list(choice)
        if not choices:
            raise ConstraintError("choice must list at least one string")
        return ConstraintSpec(kind=ConstraintKind.CHOICE, source=json.dumps(choices, ensure_ascii=False))
    if not isinstance(grammar, str):
        raise ConstraintError(f"grammar must be a string (Lark or GBNF), not {type(grammar).__name__}")
    if not grammar.strip():
        raise ConstraintError("grammar is empty")
    return ConstraintSpec(kind=ConstraintKind.GRAMMAR, source=grammar)


def _schema_value(json_schema: Any) -> dict | bool:
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        try:
            return json_schema.model_json_schema()  # a Pydantic v2 model class
        except Exception as e:  # Pydantic raises its own errors for models it cannot describe
            raise ConstraintError(f"json_schema: {json_schema.__name__}.model_json_schema() failed: {e}") from None
    if isinstance(json_schema, (str, bytes)):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema: not valid JSON ({e})") from None
    if not isinstance(json_schema, (dict, bool)):
        raise ConstraintError("json_schema must be an object (dict), a boolean, a JSON string or a "
                              f"Pydantic model class, not {type(json_schema).__name__}")
    try:  # the spec must be plain JSON: reject NaN, sets, objects ... now rather than at compile time
        json.dumps(json_schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"json_schema: not serialisable as JSON ({e})") from None
    return json_schema
