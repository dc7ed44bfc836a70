"""A constraint spec -> one regex (Rust `regex` syntax) for the same language as the host matcher, or the
reason it has none.

- regex: used as given. choice: an alternation of the literal strings.
- JSON schema (compact whitespace only): a converter for the subset that is regular and whose text the
  host backend (llguidance, compact separators) produces in exactly one way we can write down:
  objects with declared properties in declaration order and no other properties, arrays of one item
  schema with optional length bounds, strings with length bounds, integers with optional bounds,
  unbounded numbers, booleans, null, enum / const, anyOf / oneOf, type lists and non-recursive local
  `$ref`. Everything else (free-form objects or arrays, recursion, formats, patterns, bounded numbers,
  allOf, ...) is reported as a `Fallback` naming the keyword.
- grammars are context-free: always a fallback.

The host's JSON text rules reproduced here were read off llguidance 1.9 (see tests/test_compiled.py,
which checks them against the host matcher): strings exclude raw U+0000-U+001F and U+007F and allow
the escapes \\" \\\\ \\b \\f \\n \\r \\t and \\u00XX for control characters; integers are
`-?(0|[1-9][0-9]*)`; numbers add an optional fraction and exponent; bounded integers never have a
leading zero and allow "-0" only when both bounds are given and straddle zero.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llmqp.compiled.tables import Fallback

# One character of a JSON string body as the host writes it.
_STRING_CHAR = r'(?:[^"\\\x00-\x1F\x7F]|\\["\\bfnrt]|\\u00[01][0-9a-fA-F]|\\u007[fF])'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_ANNOTATIONS = {"$schema", "$id", "id", "$comment", "$defs", "definitions", "title", "description", "default",
                "examples", "example", "readOnly", "writeOnly", "deprecated", "$anchor"}
_MAX_ENUM_FLOAT_DIGITS = 17


class _NotRegular(Exception):
    pass


def escape_literal(text: str) -> str:
    """A regex matching exactly `text`: alphanumerics and spaces as themselves, everything else as
    \\x{HEX} (valid in every Rust-regex context, unlike some backslash escapes)."""
    return "".join(c if (c.isascii() and (c.isalnum() or c == " ")) else f"\\x{{{ord(c):X}}}" for c in text)


def spec_regex(spec) -> tuple[str, dict] | Fallback:
    """(regex, description) for an `llmqp.constraints.ConstraintSpec`, or a Fallback."""
    kind = getattr(spec.kind, "value", spec.kind)
    description = {"kind": kind, "source": spec.source}
    if kind == "regex":
        return spec.source, description
    if kind == "choice":
        choices = json.loads(spec.source)
        return "(?:" + "|".join(escape_literal(c) for c in choices) + ")", description
    if kind == "grammar":
        return Fallback("a context-free grammar is not a regular constraint: the fused loop runs finite "
                        "automata only")
    if spec.whitespace_flexible:
        return Fallback("whitespace='flexible' JSON is not compiled to tables (only compact JSON is)")
    schema = json.loads(spec.source)
    if spec.strict and isinstance(schema, dict):
        from llmqp.constraints import schema as schema_tools

        schema = schema_tools.close_objects(schema)
    try:
        regex = _JsonRegex(schema).of(schema, "#", ())
    except _NotRegular as e:
        return Fallback(f"json_schema: {e}")
    description.update(strict=spec.strict, whitespace="compact")
    return regex, description


# ------------------------------------------------------------------------------------------ JSON
def _json_literal(value: Any) -> str:
    def dump(v):
        if isinstance(v, float):
            if v.is_integer() and abs(v) < 2**53:
                return str(int(v))
            r = repr(v)
            if "e" in r or "inf" in r or "nan" in r:
                raise _NotRegular(f"enum/const number {v!r} has no fixed text form")
            return r
        if isinstance(v, dict):
            return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dump(x) for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ",".join(dump(x) for x in v) + "]"
        return json.dumps(v, ensure_ascii=False)

    return escape_literal(dump(value))


def _alt(options: list[str]) -> str:
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def _same_length_range(lo: str, hi: str) -> str:
    """Decimal strings of len(lo) digits between lo and hi (inclusive, equal lengths)."""
    if lo == hi:
        return lo
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return lo[0] + _same_length_range(lo[1:], hi[1:])
    n = len(lo) - 1
    parts = [lo[0] + _same_length_range(lo[1:], "9" * n)]
    if int(lo[0]) + 1 <= int(hi[0]) - 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{n}}}")
    parts.append(hi[0] + _same_length_range("0" * n, hi[1:]))
    return "(?:" + "|".join(parts) + ")"


def _natural_range(lo: int, hi: int | None) -> str:
    """Canonical decimal (no leading zeros) of the integers in [lo, hi], lo >= 0; hi None: unbounded."""
    parts = []
    if lo == 0:
        parts.append("0")
        lo = 1
    if hi is not None and lo > hi:
        return _alt(parts) if parts else "(?:[^\\x00-\\x{10FFFF}])"
    digits = len(str(lo))
    top = len(str(hi)) if hi is not None else digits
    for d in range(digits, top + 1):
        a = max(lo, 10 ** (d - 1))
        b = 10**d - 1 if hi is None else min(hi, 10**d - 1)
        if a <= b:
            parts.append(_same_length_range(str(a), str(b)))
    if hi is None:
        parts.append(f"[1-9][0-9]{{{digits},}}")
    return _alt(parts)


def _integer_regex(node: dict) -> str:
    lo, hi = node.get("minimum"), node.get("maximum")
    xlo, xhi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    for name, v in (("minimum", lo), ("maximum", hi), ("exclusiveMinimum", xlo), ("exclusiveMaximum", xhi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise _NotRegular(f'"{name}": {v!r} is not a finite number (draft-4 boolean form not compiled)')
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    if xlo is not None:
        lo = max(lo if lo is not None else -math.inf, math.floor(xlo) + 1)
    if xhi is not None:
        hi = min(hi if hi is not None else math.inf, math.ceil(xhi) - 1)
    if lo is None and hi is None:
        return _INTEGER
    if lo is not None and hi is not None and lo > hi:
        raise _NotRegular("integer bounds leave no value")
    parts = []
    if lo is None or lo < 0:  # negative part: "-" then the magnitudes
        neg_hi = None if lo is None else -lo  # largest magnitude
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        if lo is not None and hi is not None and hi >= 0:
            neg_lo = 0  # both bounds straddle zero: the host also writes "-0"
        if neg_hi is None or neg_lo <= neg_hi:
            parts.append("-" + _natural_range(neg_lo, neg_hi))
    if hi is None or hi >= 0:
        parts.append(_natural_range(max(lo, 0) if lo is not None else 0, hi))
    return _alt(parts)


class _JsonRegex:
    def __init__(self, root):
        self.root = root

    def resolve(self, ref: str, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _NotRegular(f'"$ref" {ref!r} at {path} is not a local reference')
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise _NotRegular(f'"$ref" {ref!r} at {path} does not resolve')
            node = node[part]
        return node

    def of(self, node, path: str, refs: tuple) -> str:
        if node is True or node == {}:
            raise _NotRegular(f"{path} allows any JSON value (not regular)")
        if node is False:
            raise _NotRegular(f"{path} allows no value")
        if not isinstance(node, dict):
            raise _NotRegular(f"{path} is not a schema")
        keys = set(node) - _ANNOTATIONS
        if "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise _NotRegular(f'recursive "$ref" {ref!r} at {path} (not regular)')
            if keys - {"$ref"}:
                raise _NotRegular(f'"$ref" beside other keywords at {path} is not compiled to tables')
            return self.of(self.resolve(ref, path), ref, refs + (ref,))
        if "const" in node:
            return _json_literal(node["const"])
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise _NotRegular(f'"enum" at {path} is not a non-empty list')
            return _alt([_json_literal(v) for v in node["enum"]])
        for combinator in ("anyOf", "oneOf"):
            if combinator in node:
                if keys - {combinator}:
                    raise _NotRegular(f'"{combinator}" beside other keywords at {path} is not compiled to tables')
                return _alt([self.of(o, f"{path}/{combinator}/{i}", refs) for i, o in enumerate(node[combinator])])
        if "allOf" in node:
            if len(node["allOf"]) == 1 and keys == {"allOf"}:
                return self.of(node["allOf"][0], f"{path}/allOf/0", refs)
            raise _NotRegular(f'"allOf" at {path} is not compiled to tables')
        types = node.get("type")
        if types is None:
            raise _NotRegular(f"{path} has no type (any JSON value: not regular)")
        types = [types] if isinstance(types, str) else list(types)
        return _alt([self.typed(t, node, path, refs) for t in types])

    def typed(self, t: str, node: dict, path: str, refs: tuple) -> str:
        allowed = {"string": {"minLength", "maxLength"}, "integer": {"minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum"}, "number": set(), "boolean": set(), "null": set(),
                   "object": {"properties", "required", "additionalProperties"},
                   "array": {"items", "minItems", "maxItems"}}
        if t not in allowed:
            raise _NotRegular(f'unknown type {t!r} at {path}')
        own = {k for k in node if k not in _ANNOTATIONS and k != "type"}
        every = set().union(*allowed.values())
        extra = (own - every) | {k for k in own & every if k not in allowed[t] and not _belongs_elsewhere(k, node)}
        if extra:
            raise _NotRegular(f'keyword "{sorted(extra)[0]}" at {path} is not compiled to tables')
        if t == "string":
            lo, hi = int(node.get("minLength", 0)), node.get("maxLength")
            rep = f"{{{lo},}}" if hi is None else f"{{{lo},{int(hi)}}}"
            return '"' + _STRING_CHAR + (rep if rep != "{0,}" else "*") + '"'
        if t == "integer":
            return _integer_regex(node)
        if t == "number":
            return _NUMBER
        if t == "boolean":
            return "(?:true|false)"
        if t == "null":
            return "null"
        if t == "array":
            return self.array(node, path, refs)
        return self.object(node, path, refs)

    def array(self, node: dict, path: str, refs: tuple) -> str:
        if not isinstance(node.get("items"), dict):
            raise _NotRegular(f"array at {path} without one item schema is not compiled to tables")
        item = self.of(node["items"], f"{path}/items", refs)
        lo, hi = int(node.get("minItems", 0)), node.get("maxItems")
        if hi is not None and int(hi) == 0:
            return r"\[\]"
        more = "*" if hi is None and lo <= 1 else f"{{{max(lo - 1, 0)},}}" if hi is None else \
            f"{{{max(lo - 1, 0)},{int(hi) - 1}}}"
        body = f"{item}(?:,{item}){more}"
        return r"\[" + (f"(?:{body})?" if lo == 0 else body) + r"\]"

    def object(self, node: dict, path: str, refs: tuple) -> str:
        props = node.get("properties", {})
        if node.get("additionalProperties", True) is not False:
            raise _NotRegular(f"object at {path} allows undeclared properties (not regular)")
        required = set(node.get("required", []))
        if required - set(props):
            raise _NotRegular(f"object at {path} requires undeclared properties")
        items = [(escape_literal(json.dumps(k, ensure_ascii=False)) + ":"
                  + self.of(v, f"{path}/properties/{k}", refs), k in required) for k, v in props.items()]
        if not items:
            return r"\{\}"
        # The first property written is j (everything before it optional, absent); after it each
        # property is ",kv" — mandatory when required.
        options = []
        for j, (kv, req) in enumerate(items):
            tail = "".join(f",{kv2}" if req2 else f"(?:,{kv2})?" for kv2, req2 in items[j + 1 :])
            options.append(kv + tail)
            if req:
                break
        else:
            options.append("")  # every property optional: {} too
        return r"\{" + _alt(options) + r"\}"


def _belongs_elsewhere(keyword: str, node: dict) -> bool:
    """A keyword of another listed type is fine in a type-list schema (`"type": ["string", "null"]`)."""
    types = node.get("type")
    return isinstance(types, list) and len(types) > 1
