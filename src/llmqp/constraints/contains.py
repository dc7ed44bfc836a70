"""`contains`, enforced token by token above the grammar matcher (valid by construction).

"Some item matches S" has no context-free form that llguidance builds, so the grammar is compiled
without `contains` and `ContainsMatcher` wraps its matcher. It follows the JSON parse of the output so
far and, while an array at a `contains` place has no item that `jsonschema` validates against S, removes
every token that would close it (`]`). Each item is decided on its completed text, with `jsonschema`
and the schema's own draft (exact: S may be any schema, `$ref`s resolved against the whole schema).

Exactly where the array is must be decidable from the schema, and closing must be the only thing the
layer ever removes (so it never leaves a prefix without continuation):

  * the array is reached from the root through `properties`, `items`, `allOf` parts, `$ref`s, the
    one `anyOf`/`oneOf` option that admits arrays (objects) at its place, and `patternProperties` /
    `additionalProperties` where one schema alone governs the key (`unique.KeyStep`: no declared name
    or other pattern of the node may match it) (`places`); a node holding `contains` that is also used
    anywhere else (an option among others, `not`, a pattern another may overlap, a recursive `$ref`,
    ...) keeps its `contains`, which the grammar backend then refuses;
  * beside it: `type`, `items` (one schema, not `false`), `minItems`, and nothing that bounds the
    array's length (`maxItems`, `prefixItems`, item lists, `minContains`/`maxContains`: refused), so
    one more item can always be added until one matches S.

The same layer enforces "some member of the object fails S" (`SOME_MEMBER`, which the keyword rewrite
writes for a negated `properties` / `patternProperties` / `additionalProperties` / `propertyNames` whose
object's other keys are not known, as it writes `contains` for a negated `items`): those keywords judge
each member alone, so an object fails S exactly when one of its members, as a one-member object, does.
While no member of an object at such a place does, the tokens that close it (`}`) are removed; each
member is judged on its completed value. Beside it: `type` and `minProperties` (nothing that bounds the
object's size), so one more member can always be added.

And it enforces a number the grammar cannot describe (`SCALAR`: `{"type": "number", SCALAR: S}`, which
the keyword rewrite writes for a number-only schema with a keyword it has no exact form for -- a negated
`multipleOf`, "not an integer" --, keeping S as written): the grammar generates numbers, and the tokens
that would end one at such a place (a byte after it, or the end of the output) are removed while
`jsonschema` rejects the number against S. Its digits can always go on (a number the grammar bounds from
above may not reach a valid one: then generation runs to `max_tokens`, as below).

Where a node holding one of these keywords is also used where its place is not known (an option among
others that admit the same kind of value, a pattern two schemas may govern, a recursive `$ref`, ...), the
keyword leaves the node (the grammar then admits a superset there) and `WholeValue` checks instead the
nearest value above it whose place is known (`places(..., anchors)`): a node that applies to every value
there, reached through `properties`, `items`, `allOf`, `$ref`s -- never an option among others. When
that value ends (`}`, `]`, or a scalar's last byte), `jsonschema` decides it whole against that node,
reading the rewrite's markers as the layers do (`marker_validator`), and the token that would end it is
removed while it fails. Exact, but it cannot see ahead: a value whose beginning already rules out every
valid ending (`{"n":0` where both `oneOf` options accept 0) can only go on, and where the grammar leaves
nothing else (a closed object) `allowed()` raises ConstraintError ("cannot be completed"): never an
invalid output, sometimes none.

A negated `minItems: n+1` beside a negated `items` is one array, "at most n items, or some item fails the
items schema" (`UNLESS_AT_MOST` beside the `contains`): the layer lets it close while it has at most n.

Not done: whether S and the item schema admit a common item is not decided here; when they do not, no
output satisfies the schema and generation runs to `max_tokens` (finish_reason "length", never a
stopped invalid output; an item schema that admits no item at all leaves only `]`, and `allowed()`
raises ConstraintError). Cost: nothing outside such arrays; inside one, only the allowed tokens holding
a `]` are scanned in Python (and the item they complete validated).
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import json
import math
import re
from typing import Any

import numpy as np

from llmqp.constraints.base import Matcher
from llmqp.constraints.unique import (ITEM, _ANNOTATIONS, Text, _admits, _child_path, _key_steps, _resolve,
                                      lookup, plain_target, refuse_shared)
from llmqp.errors import ConstraintError

UNLESS_AT_MOST = "x-llmqp-unless-at-most"  # beside `contains`, written by the keyword rewrite: see ContainsArray
_BESIDE = {"type", "items", "minItems", "contains", UNLESS_AT_MOST}
SOME_MEMBER = "x-llmqp-some-member"  # written by the keyword rewrite only; see the module's docstring
_BESIDE_MEMBER = {"type", "minProperties", SOME_MEMBER}
SCALAR = "x-llmqp-scalar"  # likewise
_BESIDE_SCALAR = {"type", SCALAR, "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                  "pattern"}  # what the rewrite keeps for the grammar: only wider than the schema kept for the layer
MARKERS = (SOME_MEMBER, SCALAR)


@dataclasses.dataclass(frozen=True, eq=False)
class ContainsArray:
    """An array at a `contains` place. Each of `validators` (one per `contains` that applies there: two
    `allOf` parts may each say one) needs an item it validates, not necessarily the same item, unless the
    array has at most `exempt[i]` items (-1: always needs one). The keyword rewrite writes an exemption
    (`UNLESS_AT_MOST` beside the `contains`) for a negated `minItems: n+1` with `items: S`: "at most n
    items, or some item fails S" is then one array, whose place the layer can know, not two options."""

    validators: tuple = dataclasses.field(repr=False)
    where: str = "#"
    exempt: tuple = ()  # per validator: the item count up to which it needs no item (-1: none)

    def excused(self, i: int, count: int) -> bool:
        return i < len(self.exempt) and count <= self.exempt[i]

    def matched(self, raw: bytes) -> frozenset:
        """The indices of the validators that accept the item written `raw`."""
        try:
            value = json.loads(raw)
        except ValueError:
            return frozenset()
        return frozenset(i for i, v in enumerate(self.validators) if v.is_valid(value))

    def holds(self, items: list) -> bool:
        return all(self.excused(i, len(items)) or any(v.is_valid(item) for item in items)
                   for i, v in enumerate(self.validators))


@dataclasses.dataclass(frozen=True, eq=False)
class SomeMemberObject:
    """An object at a `SOME_MEMBER` place. Each of `validators` needs a member that it rejects (judged as
    a one-member object), not necessarily the same member."""

    validators: tuple = dataclasses.field(repr=False)
    where: str = "#"

    def matched(self, key: str, raw: bytes) -> frozenset:
        """The indices of the validators that reject the member `key` with the value written `raw`."""
        try:
            value = json.loads(raw)
        except ValueError:
            return frozenset()
        return frozenset(i for i, v in enumerate(self.validators) if not v.is_valid({key: value}))

    def holds(self, members: dict) -> bool:
        return all(any(not v.is_valid({k: x}) for k, x in members.items()) for v in self.validators)


# ----------------------------------------------------------------------------------- compile time
def extract(schema: Any, source: Any = None) -> tuple[Any, dict[tuple, ContainsArray | SomeMemberObject | ScalarValue]]:
    """(schema without the `contains` and `SOME_MEMBER` this module enforces, {output path: ContainsArray
    or SomeMemberObject}). The schema is copied before any change; a `contains` left in it is refused by
    the grammar backend, and so is a `SOME_MEMBER` (`check_placed`). Raises ConstraintError for a
    statically placed `contains` whose array could be bounded (an object, for `SOME_MEMBER`). `source`:
    the schema as the user wrote it, against which the kept schemas of `SCALAR` resolve their `$ref`s."""
    if not _mentions(schema, "contains") and not any(_mentions(schema, m) for m in MARKERS):
        return schema, {}
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    original = copy.deepcopy(schema)
    schema = copy.deepcopy(schema)
    twins = _twins(schema, original)
    _python_patterns(original)  # jsonschema reads it: the rewrite's regexes are in Rust's syntax
    source = original if source is None else source
    out: dict = {}
    anchored: list = []  # (node, its keyword, [(anchor node, path, where)]): checked whole at the anchors
    if "contains" in cls.VALIDATORS:  # draft 4 and earlier: `contains` is no keyword there (left to the backend)
        out.update(_extract_contains(schema, original, cls, anchored))
    for marker, place, what in ((SOME_MEMBER, _extract_some_member, "a negated object keyword"),
                                (SCALAR, _extract_scalars, "a number keyword")):
        if _mentions(schema, marker):
            found = place(schema, source, cls, anchored)
            if set(found) & set(out):
                raise ConstraintError(f"json_schema: {what} at {next(iter(found.values())).where} is not supported "
                                      "where another token-level layer may apply to the same value")
            out.update(found)
    if anchored:
        out.update(_wholes(anchored, twins, original, source, cls))
    return schema, out


_RUST_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\x\{([0-9a-fA-F]{1,6})\}")
_VALUES = ("const", "enum", "default", "examples", "example")


def python_regex(pattern: str) -> str:
    """`pattern` with Rust's `\\x{HEX}` escapes (which the keyword rewrite writes) in Python's syntax."""
    return _RUST_ESCAPE.sub(lambda m: m.group(1) + "\\U%08x" % int(m.group(2), 16), pattern)


def _python_patterns(schema: Any) -> None:
    """In place: every `pattern` and `patternProperties` key of `schema` in Python's syntax."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                node["pattern"] = python_regex(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                node["patternProperties"] = {python_regex(k): v for k, v in node["patternProperties"].items()}
            stack.extend(v for k, v in node.items() if k not in _VALUES)


def _twins(a: Any, b: Any, out: dict | None = None) -> dict:
    """{id(node of a): the same node of b}, for two equal JSON trees."""
    out = {} if out is None else out
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, dict):
            out[id(x)] = y
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            stack.extend(zip(x, y))
    return out


def _wholes(anchored: list, twins: dict, original: Any, source: Any, cls) -> dict:
    """The WholeValue checks of the uses whose place is not known (the nodes lose their keyword: the
    grammar then admits a superset there, and the whole value at the anchor is checked instead)."""
    checker = marker_validator(cls, original, source)
    by_path: dict[tuple, list] = {}
    for node, keyword, uses in anchored:
        for anchor, path, where in uses:
            nodes = by_path.setdefault(path, [])
            if not any(n is anchor for n, _ in nodes):
                nodes.append((anchor, where))
    refuse_shared(by_path, "not")
    for node, keyword, _ in anchored:
        node.pop(keyword, None)
        if keyword == "contains":
            node.pop(UNLESS_AT_MOST, None)
    return {WHOLE + path: WholeValue(validators=tuple(checker.evolve(schema=twins[id(n)]) for n, _ in nodes),
                                     where=nodes[0][1])
            for path, nodes in by_path.items()}


def marker_validator(cls, original: Any, source: Any):
    """A `jsonschema` validator (of `cls`'s draft) for the rewritten schema `original` that reads the
    rewrite's markers as the layers enforce them: `SCALAR` and `SOME_MEMBER` (their schemas resolve in
    `source`, as written, with formats asserted) and `contains` beside `UNLESS_AT_MOST`."""
    import jsonschema

    written = cls(source, format_checker=cls.FORMAT_CHECKER)
    contains = cls.VALIDATORS.get("contains") or jsonschema.Draft202012Validator.VALIDATORS["contains"]

    def scalar(validator, value, instance, schema):
        if isinstance(instance, decimal.Decimal) or not written.evolve(schema=value).is_valid(instance):
            yield jsonschema.ValidationError("the value fails the schema the layer checks it against")

    def some_member(validator, value, instance, schema):
        if isinstance(instance, dict):
            member = written.evolve(schema=value)
            if all(member.is_valid({k: v}) for k, v in instance.items()):
                yield jsonschema.ValidationError("no member fails the negated keywords")

    def unless_short(validator, value, instance, schema):
        n = schema.get(UNLESS_AT_MOST)
        if isinstance(instance, list) and isinstance(n, int) and not isinstance(n, bool) and len(instance) <= n:
            return
        yield from contains(validator, value, instance, schema)

    extended = jsonschema.validators.extend(cls, {SCALAR: scalar, SOME_MEMBER: some_member, "contains": unless_short})
    return extended(original)


WHOLE = (None,)  # key prefix of a WholeValue's path in the layer's table (no output path holds None)


@dataclasses.dataclass(frozen=True, eq=False)
class WholeValue:
    """The value at a known place above uses of a layer keyword whose own place is not known (an option
    among others that admit the same kind, a pattern two schemas may govern, a recursive `$ref`, ...):
    each of `validators` (`marker_validator`, on the node that applies there) decides it whole when it
    ends, and the token that would end it is removed while one rejects it. Exact, like the other checks;
    but unlike them it cannot see ahead, so a value whose beginning already rules out every valid ending
    (two `oneOf` options both matched) can only go on: to `max_tokens`, or, where the grammar allows
    nothing but the ending, to a ConstraintError from `allowed()`."""

    validators: tuple = dataclasses.field(repr=False)
    where: str = "#"
    _views: dict = dataclasses.field(default_factory=dict, repr=False)

    def holds(self, value: Any) -> bool:
        try:
            return all(v.is_valid(value) for v in self.validators)
        except Exception:  # noqa: BLE001 - one jsonschema cannot decide (a number it cannot compare, a $ref
            return False  # it resolves otherwise than the grammar did): rejected, never a crash mid-output

    def valid(self, raw: bytes) -> bool:
        try:
            value = json.loads(raw, parse_float=exact_number)
        except (ValueError, RecursionError):
            return False
        return self.holds(value)

    def scalar(self, kind: str, other: "ScalarValue | None") -> "ScalarValue":
        """A scalar (`kind` "string" or "number": any other scalar) at this place, as the SCALAR check of
        `scan` reads it: this check and `other`'s (a SCALAR at the same place), if any."""
        key = (kind, id(other))
        if key not in self._views:
            parts = (self,) if other is None else (self, other.validator)
            self._views[key] = ScalarValue(validator=_AllValid(parts), where=self.where, kind=kind,
                                           integer=other.integer if other else False,
                                           max_length=other.max_length if other else None)
        return self._views[key]

    is_valid = holds  # (as a validator, for _AllValid)


class _AllValid:
    def __init__(self, parts: tuple):
        self.parts = parts

    def is_valid(self, value: Any) -> bool:
        return all(p.is_valid(value) for p in self.parts)


def _anchor(anchored: list, keyword: str, anchors: dict, nodes: dict, usable) -> None:
    """Record the uses whose place is not known of the nodes `usable` accepts, at their anchors."""
    for key, uses in anchors.items():
        node = nodes.get(key)
        if node is not None and usable(node):
            anchored.append((node, keyword, uses))


def _marker_nodes(schema: Any, keyword: str) -> dict:
    from llmqp.constraints.keywords import _schema_nodes  # (keywords imports this module)

    return {id(node): node for node in _schema_nodes(schema) if keyword in node}


def _extract_some_member(schema: Any, source: Any, cls, anchored: list) -> dict:
    anchors: dict = {}
    placed, elsewhere = places(schema, SOME_MEMBER, "object", anchors)

    def usable(node: dict) -> bool:
        return _refs_resolve(source, node[SOME_MEMBER]) and not any(_mentions(node[SOME_MEMBER], m) for m in MARKERS)

    _anchor(anchored, SOME_MEMBER, anchors, _marker_nodes(schema, SOME_MEMBER), usable)
    found: dict[tuple, list] = {}
    for key, uses in placed.items():
        node = uses[0][0]
        if (key in elsewhere and key not in anchors) or not usable(node):
            continue  # left: check_placed refuses it
        extra = set(node) - _ANNOTATIONS - _BESIDE_MEMBER
        if extra:
            raise ConstraintError(f"json_schema: a negated object keyword at {uses[0][2]} is not supported beside "
                                  f"{sorted(extra)}: only type and minProperties (an object that can always "
                                  "take one more member)")
        for _, path, where in uses:
            found.setdefault(path, []).append((node, where))
    if not found:
        return {}
    refuse_shared(found, "not")
    root = cls(source)
    objects = {path: SomeMemberObject(validators=tuple(root.evolve(schema=node[SOME_MEMBER]) for node, _ in nodes),
                                      where=nodes[0][1])
               for path, nodes in found.items()}
    for nodes in found.values():
        for node, _ in nodes:
            node.pop(SOME_MEMBER, None)
    return objects


@dataclasses.dataclass(frozen=True, eq=False)
class ScalarValue:
    """A number (`kind` "number") or a string ("string") at a `SCALAR` place: `validator` decides it
    whole. `integer`: the grammar writes integers there (so `0` and `-0` cannot grow: the layer takes
    them only where they are valid)."""

    validator: Any = dataclasses.field(repr=False)
    where: str = "#"
    integer: bool = False
    kind: str = "number"
    max_length: int | None = None  # strings: the grammar's maxLength there (a string that long can only close)

    def valid(self, raw: bytes) -> bool:
        try:
            return self.holds(json.loads(raw, parse_float=exact_number))
        except ValueError:  # not a number yet
            return False

    def holds(self, value: Any) -> bool:
        if isinstance(value, decimal.Decimal):
            return False  # no int or float says it exactly (1e-400, an integer of thousands of digits)
        try:
            return bool(self.validator.is_valid(value))
        except (ArithmeticError, TypeError, OverflowError):  # one jsonschema cannot decide
            return False


def exact_number(text: str) -> int | float | decimal.Decimal:
    """A JSON number with a fraction or exponent as jsonschema should see it: an int where it is an
    integer (`7786E314` is one; as a float it would be inf, which is no integer), a float where one is
    close (finite, and not 0 for a number that is not), else the Decimal (a layer rejects it)."""
    try:
        d = decimal.Decimal(text)
    except decimal.InvalidOperation:  # an exponent past what Decimal takes
        return decimal.Decimal("NaN")
    if d.adjusted() > 4000:
        return d
    if d == d.to_integral_value():
        return int(d)
    f = float(d)
    return f if math.isfinite(f) and f != 0 else d


def _extract_scalars(schema: Any, source: Any, cls, anchored: list) -> dict:
    found: dict[tuple, list] = {}
    nodes = _marker_nodes(schema, SCALAR)
    for kind, types in (("number", ("number", "integer")), ("string", ("string",))):
        anchors: dict = {}
        placed, elsewhere = places(schema, SCALAR, kind, anchors)

        def usable(node: dict) -> bool:
            return _refs_resolve(source, node[SCALAR]) and not any(_mentions(node[SCALAR], m) for m in MARKERS) \
                and not set(node) - _ANNOTATIONS - _BESIDE_SCALAR and node.get("type") in types and \
                _formats_checked(source, node[SCALAR], cls.FORMAT_CHECKER)

        _anchor(anchored, SCALAR, anchors, {k: v for k, v in nodes.items() if v.get("type") in types}, usable)
        for key, uses in placed.items():
            node = uses[0][0]
            if (key in elsewhere and key not in anchors) or not usable(node):
                continue  # left: check_placed refuses it
            for _, path, where in uses:
                found.setdefault(path, []).append((node, where))
    if not found:
        return {}
    refuse_shared(found, "not")
    root = cls(source, format_checker=cls.FORMAT_CHECKER)  # formats asserted, as the grammar does elsewhere
    values = {}
    for path, nodes in found.items():
        parts = [node[SCALAR] for node, _ in nodes]
        kinds = {"string" if node["type"] == "string" else "number" for node, _ in nodes}
        if len(kinds) > 1:
            raise ConstraintError(f"json_schema: a string or number keyword at {nodes[0][1]} is not supported where "
                                  "one value may be either")
        limits = [node["maxLength"] for node, _ in nodes if isinstance(node.get("maxLength"), int)]
        values[path] = ScalarValue(validator=root.evolve(schema=parts[0] if len(parts) == 1 else {"allOf": parts}),
                                   where=nodes[0][1], integer=all(node["type"] == "integer" for node, _ in nodes),
                                   kind=kinds.pop(), max_length=min(limits) if limits else None)
    for nodes in found.values():
        for node, _ in nodes:
            node.pop(SCALAR, None)
    return values


def _formats_checked(root: Any, schema: Any, checker) -> bool:
    """Does `checker` (jsonschema's) check every standard `format` that `schema` uses (through its local
    `$ref`s too)? One it lacks (a package it needs is not installed) it would pass as an annotation."""
    from llmqp.constraints import formats

    stack, seen = [schema], set()
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            name = node.get("format")
            if isinstance(name, str) and formats.is_standard(name) and name not in checker.checkers:
                return False
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#") and ref not in seen:
                seen.add(ref)
                stack.append(_resolve(root, ref))
            stack.extend(v for k, v in node.items() if k not in ("$ref", "enum", "const"))
        elif isinstance(node, list):
            stack.extend(node)
    return True


def check_placed(schema: Any) -> None:
    """ConstraintError for a `SOME_MEMBER` or `SCALAR` that `extract` could not place (llguidance would
    ignore it)."""
    from llmqp.constraints.schema import walk

    for node, path in walk(schema):
        if SCALAR in node:
            raise ConstraintError(f"json_schema: a number keyword at {path} (a negated multipleOf or type, a "
                                  "look-around, a format, ...) is not supported here: only numbers (strings) "
                                  "reached from the root through properties, items and the one anyOf/oneOf "
                                  "option that admits them there are enforced")
        if SOME_MEMBER in node:
            raise ConstraintError(f"json_schema: a negated object keyword (properties, patternProperties, "
                                  f"additionalProperties or propertyNames) at {path} is not supported here: "
                                  "only objects reached from the root through properties, items and the one "
                                  "anyOf/oneOf option that admits objects there are enforced")


def _extract_contains(schema: Any, original: Any, cls, anchored: list) -> dict:
    anchors: dict = {}
    placed, elsewhere = places(schema, "contains", "array", anchors)
    _anchor(anchored, "contains", anchors, _marker_nodes(schema, "contains"),
            lambda node: _refs_resolve(original, node["contains"]))
    found: dict[tuple, list] = {}
    for key, uses in placed.items():
        if key in elsewhere and key not in anchors:
            continue  # also used where its place is not known: left (refused by the backend)
        node = uses[0][0]
        extra = set(node) - _ANNOTATIONS - _BESIDE
        types = node.get("type", "array")
        where = uses[0][2]
        if extra or node.get("items") is False or not isinstance(node.get("items", {}), dict) or \
                not (types == "array" or (isinstance(types, list) and "array" in types)):
            raise ConstraintError(f'json_schema: keyword "contains" at {where} is not supported beside '
                                  f'{sorted(extra) or "items that bound the array or a type other than array"}'
                                  ": only type, minItems and one items schema (an array that can always take "
                                  "one more item)")
        if not _refs_resolve(original, node["contains"]):
            continue  # jsonschema could not decide an item: left (refused by the backend)
        for _, path, where in uses:
            found.setdefault(path, []).append((node, where))
    if not found:
        return {}
    refuse_shared(found, "contains")
    root = cls(original)
    arrays = {}
    for path, nodes in found.items():
        arrays[path] = ContainsArray(validators=tuple(root.evolve(schema=node["contains"]) for node, _ in nodes),
                                     where=nodes[0][1], exempt=tuple(_exemption(node) for node, _ in nodes))
    for path, nodes in found.items():
        for node, _ in nodes:
            node.pop("contains", None)
            node.pop(UNLESS_AT_MOST, None)
    return arrays


def _exemption(node: dict) -> int:
    n = node.get(UNLESS_AT_MOST, -1)
    return n if isinstance(n, int) and not isinstance(n, bool) else -1


def _refs_resolve(root: Any, schema: Any) -> bool:
    """Whether every `$ref` `schema` reaches (through the definitions it names, too) is a local pointer
    into `root` (no remote reference: jsonschema would try to fetch it)."""
    stack, seen = [schema], set()
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                target = _resolve(root, ref) if ref.startswith("#") else None
                if target is None:
                    return False
                stack.append(target)
            stack.extend(v for k, v in node.items() if k not in ("$ref", "enum", "const"))
        elif isinstance(node, list):
            stack.extend(node)
    return True


_BOTH = frozenset({"array", "object"})


def places(root: Any, keyword: str, kind: str = "array",
           anchors: dict | None = None) -> tuple[dict[int, list], set[int]]:
    """Where the nodes holding `keyword` apply to the output: ({id(node): [(node, output path, where)]}
    for every use whose place is known, {id(node)} for nodes also used where it is not).

    A node's place is known when it is reached from the root through `properties` (of objects),
    `items` (one schema, of arrays), `allOf` parts, `$ref`s, `anyOf`/`oneOf` options that alone admit
    arrays (objects) there -- for those values only --, and `patternProperties` / `additionalProperties`
    whose keys no other schema of the node governs (a `KeyStep` in the path). Any other route (`not`,
    `if`, `contains`, a pattern a declared name or another pattern may match, an option among several,
    a recursive `$ref` seen again) is a use whose place is not known: a layer cannot enforce such a
    node, and must not remove its keyword. With `anchors`, each such use is also recorded there as
    {id(node): [(anchor node, output path, where)]}: the nearest node above it that applies to every
    value at a known place (reached from the root through `properties`, `items`, `allOf` parts, `$ref`s
    and patterns alone at their keys, never through an option among others), whose whole value the
    layer can check instead (`WholeValue`)."""
    placed: dict[int, list] = {}
    elsewhere: set[int] = set()
    every = _BOTH | {kind}  # the kinds of value whose place is followed
    seen_static: set = set()
    seen_dynamic: set = set()

    def unplaced(node: dict, anchor: tuple | None) -> None:
        elsewhere.add(id(node))
        if anchors is not None and anchor is not None:
            uses = anchors.setdefault(id(node), [])
            if not any(a[0] is anchor[0] and a[1] == anchor[1] for a in uses):
                uses.append(anchor)

    def dynamic(node: Any, anchor: tuple | None = None) -> None:
        stack = [node]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or (id(node), anchor and id(anchor[0]), anchor and anchor[1]) in seen_dynamic:
                continue
            seen_dynamic.add((id(node), anchor and id(anchor[0]), anchor and anchor[1]))
            if keyword in node:
                unplaced(node, anchor)
            stack.extend(_subschemas(root, node))

    def static(node: Any, path: tuple, kinds: frozenset, refs: tuple, where: str, anchor: tuple | None = None,
               whole: bool = True) -> None:
        """`whole`: `node` applies to every value at `path` (of any JSON type), so it may be an anchor."""
        if not isinstance(node, dict):
            return
        state = (id(node), path, kinds, whole)
        if state in seen_static:
            return
        seen_static.add(state)
        if whole:  # this node applies to every value here: its whole value can be checked
            anchor = (node, path, where)
        if isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            target = _resolve(root, ref) if ref.startswith("#") else None
            if ref in refs or target is None:
                dynamic(target, anchor)  # recursion: infinitely many places
            else:
                static(target, path, kinds, refs + (ref,), ref, anchor, whole)
        if keyword in node:
            if "$ref" in node:
                elsewhere.add(id(node))  # beside a $ref: ignored by drafts up to 7
            elif kind in kinds:
                placed.setdefault(id(node), []).append((node, path, where))
            elif _admits(root, node, kind):
                unplaced(node, anchor)  # arrays (objects) here may or may not match this option
        for key, value in node.items():
            if key == "$ref":
                continue
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    if "object" in kinds:
                        static(sub, path + (name,), every, refs, f"{where}/properties/{name}")
                    else:
                        dynamic(sub, anchor)
            elif key == "items" and isinstance(value, dict):
                if "array" in kinds:
                    static(value, path + (ITEM,), every, refs, f"{where}/items")
                else:
                    dynamic(value, anchor)
            elif key == "allOf" and isinstance(value, list):
                for i, part in enumerate(value):
                    static(part, path, kinds, refs, f"{where}/allOf/{i}", anchor, whole)
            elif key in ("anyOf", "oneOf") and isinstance(value, list):
                for i, option in enumerate(value):
                    owns = frozenset(k for k in kinds if _admits(root, option, k) and
                                     not any(_admits(root, o, k) for j, o in enumerate(value) if j != i))
                    if owns:
                        static(option, path, owns, refs, f"{where}/{key}/{i}", anchor, whole and len(value) == 1)
                    shared = {k for k in kinds - owns if _admits(root, option, k)}
                    if shared == {"object"}:  # objects here may match another option: by some keys, only this
                        keyed(option, [o for j, o in enumerate(value) if j != i], path, refs, f"{where}/{key}/{i}",
                              anchor)
                    elif shared:
                        dynamic(option, anchor)  # values of another kind here may match it, or another option
            elif key in ("patternProperties", "additionalProperties") and isinstance(value, dict) and \
                    "object" in kinds:
                for step, sub, sub_where in _key_steps(node, key):
                    if step is None:
                        dynamic(sub, anchor)  # a key two schemas may govern: not a known place
                    else:
                        static(sub, path + (step,), every, refs, where + sub_where)
            elif key not in ("definitions", "$defs"):  # definitions apply only through a $ref
                for sub in _children(key, value):
                    dynamic(sub, anchor)

    def keyed(option: Any, others: list, path: tuple, refs: tuple, where: str, anchor: tuple | None) -> None:
        """An option among others that admit objects: the place of a property it declares is still known
        where every other option forbids that key (an object that has it can match only this option)."""
        seen = 0
        while isinstance(option, dict) and isinstance(option.get("$ref"), str) and \
                not (set(option) - _ANNOTATIONS - {"$ref"}) and seen < 32:
            ref = option["$ref"]
            target = _resolve(root, ref) if ref.startswith("#") else None
            if ref in refs or not isinstance(target, dict):
                dynamic(target, anchor)
                return
            option, refs, where, seen = target, refs + (ref,), ref, seen + 1
        if not isinstance(option, dict):
            return
        for key, value in option.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    if all(_forbids_key(root, o, name) for o in others):
                        static(sub, path + (name,), every, refs, f"{where}/properties/{name}")
                    else:
                        dynamic(sub, anchor)
            elif key == "allOf" and isinstance(value, list):  # each part holds for the option's objects
                for i, part in enumerate(value):
                    keyed(part, others, path, refs, f"{where}/allOf/{i}", anchor)
            elif key not in ("definitions", "$defs"):
                if key == keyword:
                    unplaced(option, anchor)  # on the option itself: objects here may match another option
                for sub in ([_resolve(root, value)] if key == "$ref" and isinstance(value, str) and
                            value.startswith("#") else _children(key, value)):
                    dynamic(sub, anchor)

    static(root, (), every, (), "#")
    return placed, elsewhere


def _forbids_key(root: Any, node: Any, name: str) -> bool:
    """No object valid against `node` (a plain `$ref` followed) has the key `name`: it admits no objects,
    or is closed without it."""
    node = plain_target(root, node)
    if node is False:
        return True
    if not isinstance(node, dict):
        return False
    if not _admits(root, node, "object"):
        return True
    if isinstance(node.get("allOf"), list) and any(_forbids_key(root, part, name) for part in node["allOf"]):
        return True
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    if name in props:
        return props[name] is False
    if node.get("additionalProperties") is not False or "\n" in name:
        return False
    patterns = node.get("patternProperties") or {}
    try:
        return isinstance(patterns, dict) and not any(re.search(p, name) for p in patterns)
    except (re.error, TypeError):
        return False


_SCHEMA_KEYS = {"additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then",
                "else", "unevaluatedItems", "unevaluatedProperties", "items", "properties", "patternProperties",
                "dependentSchemas", "dependencies", "allOf", "anyOf", "oneOf", "prefixItems"}


def _children(key: str, value: Any) -> list:
    if key not in _SCHEMA_KEYS:
        return []
    if isinstance(value, dict) and key in ("properties", "patternProperties", "dependentSchemas", "dependencies"):
        return [v for v in value.values() if isinstance(v, dict)]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return [value] if isinstance(value, dict) else []


def _subschemas(root: Any, node: dict) -> list:
    out = []
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str):
            target = _resolve(root, value) if value.startswith("#") else None
            if isinstance(target, dict):
                out.append(target)
        elif key not in ("definitions", "$defs"):
            out.extend(_children(key, value))
    return out


def _mentions(schema, keyword: str = "contains") -> bool:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if keyword in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def check_value(value: Any, arrays: dict, path: tuple = ()) -> bool:
    """True when every array at a contains path of `value` has an item that satisfies it, every object
    at a `SOME_MEMBER` path a member that fails it, every number at a `SCALAR` path and every value at a
    WholeValue path is valid (accepts())."""
    whole = lookup(arrays, WHOLE + path)
    if whole is not None and not whole.holds(value):
        return False
    if isinstance(value, dict):
        spec = lookup(arrays, path)
        if isinstance(spec, SomeMemberObject) and not spec.holds(value):
            return False
        return all(check_value(v, arrays, path + (k,)) for k, v in value.items())
    if isinstance(value, list):
        spec = lookup(arrays, path)
        if isinstance(spec, ContainsArray) and not spec.holds(value):
            return False
        return all(check_value(v, arrays, path + (ITEM,)) for v in value)
    if isinstance(value, (int, float, decimal.Decimal, str)) and not isinstance(value, bool):
        spec = lookup(arrays, path)
        if isinstance(spec, ScalarValue) and (spec.kind == "string") == isinstance(value, str):
            return spec.holds(value)
    return True


# ----------------------------------------------------------------------------------------- runtime
_WS = frozenset(b" \t\n\r")
_SCALAR_BYTES = frozenset(b"-+.0123456789eEtrufalsn")
_LONGEST_TOKEN = 128  # characters a token may add to a string (SmolLM2's longest token has 81 bytes; a longer
# one is only not checked ahead: the value it ends is still checked when it closes)


@dataclasses.dataclass(frozen=True)
class _Frame:
    kind: str  # "o" object, "a" array
    path: tuple
    spec: ContainsArray | SomeMemberObject | None = None  # an array (object) at a contains (SOME_MEMBER) place
    satisfied: frozenset = frozenset()  # the spec's validators some completed item satisfies
    item_start: int | None = None  # offset of the item (member value) in progress, at a place
    key: str | None = None  # objects: the last key read
    verdicts: tuple = ()  # objects at a place: (key, validators its member fails), the last member per key
    expect_key: bool = True  # objects: the next string is a key
    count: int = 0  # arrays at a place: items completed
    whole: WholeValue | None = None  # the value is at a WholeValue's place: checked when it closes
    start: int = 0  # offset of its `{` / `[`


@dataclasses.dataclass(frozen=True)
class ScanState:
    """The JSON parse of the output so far, at byte offset `pos` (immutable: kept per token)."""

    stack: tuple = ()
    lex: bytes | None = None  # the scalar being read (a string starts with `"`), or None
    escaped: bool = False
    pos: int = 0
    scalar: ScalarValue | None = None  # the number or string being read is at a SCALAR place: its check


def scan(state: ScanState, data: bytes, out: bytes, arrays: dict[tuple, ContainsArray],
         wholes: dict | None = None) -> ScanState | None:
    """`state` after the bytes `data` (`out` is the output before them), or None when they close an
    array at a contains place none of whose items matches (end a value a check rejects). Assumes `data`
    is what the grammar allows. `wholes`: {output path: WholeValue}."""
    stack, lex, escaped, pos, scalar = state.stack, state.lex, state.escaped, state.pos, state.scalar
    text = Text(out, data, pos)
    for b in data:
        if lex is not None and lex[:1] == b'"':
            lex += bytes((b,))
            if escaped:
                escaped = False
            elif b == 0x5C:
                escaped = True
            elif b == 0x22:
                if scalar is not None and not scalar.valid(lex):
                    return None  # closes a string its place's schema rejects
                stack = _complete(stack, text, pos + 1, lex)
                lex = scalar = None
            pos += 1
            continue
        if lex is not None:
            if b in _SCALAR_BYTES:
                lex += bytes((b,))
                pos += 1
                continue
            if scalar is not None and not scalar.valid(lex):
                return None  # ends a number its place's schema rejects
            stack = _complete(stack, text, pos, lex)
            lex = scalar = None
        if b in _WS or b == 0x3A:  # whitespace, `:`
            pass
        elif b == 0x2C:  # `,`
            if stack and stack[-1].kind == "o":
                stack = stack[:-1] + (dataclasses.replace(stack[-1], expect_key=True),)
        elif b in (0x7B, 0x5B):  # `{` `[`
            stack = _start_item(stack, pos)
            path = _child_path(stack)
            spec = lookup(arrays, path)
            if spec is not None and isinstance(spec, SomeMemberObject) != (b == 0x7B):
                spec = None  # the place's layer is for the other kind of value
            stack = stack + (_Frame("o" if b == 0x7B else "a", path, spec,
                                    whole=lookup(wholes, path) if wholes else None, start=pos),)
        elif b in (0x7D, 0x5D):  # `}` `]`
            top = stack[-1]
            if top.spec is not None and len(top.satisfied) < len(top.spec.validators) and not (
                    isinstance(top.spec, ContainsArray) and
                    all(i in top.satisfied or top.spec.excused(i, top.count) for i in range(len(top.spec.validators)))):
                return None
            if top.whole is not None and not top.whole.valid(text.slice(top.start, pos + 1)):
                return None
            stack = _complete_composite(stack[:-1], text, pos + 1)
        else:
            if not (stack and stack[-1].kind == "o" and stack[-1].expect_key):
                path = _child_path(stack)
                spec = lookup(arrays, path)  # a value (not a key) starts
                scalar = spec if isinstance(spec, ScalarValue) and (spec.kind == "string") == (b == 0x22) else None
                whole = lookup(wholes, path) if wholes else None
                if whole is not None:
                    scalar = whole.scalar("string" if b == 0x22 else "number", scalar)
            stack = _start_item(stack, pos)
            lex = bytes((b,))  # `"` or the first byte of a number / literal
        pos += 1
    if scalar is not None and scalar.integer and lex in (b"0", b"-0") and not scalar.valid(lex):
        return None  # an integer 0 cannot grow into a valid one
    if scalar is not None and scalar.max_length is not None and lex is not None and not escaped and \
            scalar.kind == "string" and _string_length(lex) >= scalar.max_length and not scalar.valid(lex + b'"'):
        return None  # a string at its maxLength can only close, and this one may not
    return ScanState(stack, lex, escaped, pos, scalar if lex is not None else None)


def _string_length(lex: bytes) -> int:
    """Characters of the JSON string in progress `lex` (its opening quote and what follows, complete
    escapes), or -1 where it does not read yet (a UTF-8 character cut by the token)."""
    try:
        return len(json.loads(lex + b'"'))
    except ValueError:
        return -1


def _start_item(stack: tuple, pos: int) -> tuple:
    """A value starts at `pos` (or, in an object, a key)."""
    if stack and stack[-1].spec is not None and stack[-1].item_start is None and \
            not (stack[-1].kind == "o" and stack[-1].expect_key):
        return stack[:-1] + (dataclasses.replace(stack[-1], item_start=pos),)
    return stack


def _complete(stack: tuple, text: Text, end: int, raw: bytes) -> tuple:
    """A scalar ended at `end`: an object key, an object value or an array item."""
    if not stack:
        return stack
    top = stack[-1]
    if top.kind == "o" and top.expect_key:
        return stack[:-1] + (dataclasses.replace(top, key=json.loads(raw), expect_key=False),)
    return _item_done(stack, text, end)


def _complete_composite(stack: tuple, text: Text, end: int) -> tuple:
    """An object or array ended at `end`: the value of its parent's key, or an item of its parent."""
    if not stack:
        return stack
    top = stack[-1]
    if top.kind == "o":
        stack = stack[:-1] + (dataclasses.replace(top, expect_key=False),)
    return _item_done(stack, text, end)


def _item_done(stack: tuple, text: Text, end: int) -> tuple:
    """An item (member value) ended at `end`."""
    top = stack[-1]
    if top.spec is None:
        return stack
    raw = text.slice(top.item_start, end)
    if top.kind == "o":
        # A repeated key replaces the earlier member (as a JSON parser reads it): its verdict goes too.
        verdicts = tuple(v for v in top.verdicts if v[0] != top.key) + ((top.key, top.spec.matched(top.key, raw)),)
        satisfied = frozenset().union(*(m for _, m in verdicts))
        return stack[:-1] + (dataclasses.replace(top, satisfied=satisfied, verdicts=verdicts, item_start=None),)
    satisfied = top.satisfied
    if len(satisfied) < len(top.spec.validators):
        satisfied = satisfied | top.spec.matched(raw)
    return stack[:-1] + (dataclasses.replace(top, satisfied=satisfied, item_start=None, count=top.count + 1),)


class ContainsMatcher(Matcher):
    """A matcher (the grammar's, or the uniqueItems layer) plus the contains layer. The verbs keep their
    contract: `allowed()` is the inner set minus the tokens that close an array at a contains place
    with no matching item (never empty: another item can always follow), `forced()` stops at such a
    token, `accept` raises ValueError for it, `rollback` restores the scan state too."""

    def __init__(self, inner: Matcher, arrays: dict[tuple, ContainsArray], token_bytes: list[bytes]):
        self._wholes = {path[len(WHOLE):]: spec for path, spec in arrays.items() if path[:len(WHOLE)] == WHOLE}
        arrays = {path: spec for path, spec in arrays.items() if path[:len(WHOLE)] != WHOLE}
        self._inner, self._arrays, self._bytes = inner, arrays, token_bytes
        self.vocab_size, self.eos_ids = inner.vocab_size, inner.eos_ids
        closers = (b"]", b"}") if self._wholes or any(isinstance(a, SomeMemberObject) for a in arrays.values()) \
            else (b"]",)
        self._may_close = np.array([any(c in t for c in closers) for t in token_bytes] + [False], dtype=bool)
        self._scalars = bool(self._wholes) or any(isinstance(a, ScalarValue) for a in arrays.values())
        if self._scalars:  # tokens that may end a number (a byte no number has), or a string (a quote)
            self._may_end = np.array([any(b not in _SCALAR_BYTES for b in t) for t in token_bytes] + [False],
                                     dtype=bool)
            self._digit = np.array([any(0x30 <= b <= 0x39 for b in t) for t in token_bytes] + [False], dtype=bool)
            self._quote = np.array([b'"' in t for t in token_bytes] + [False], dtype=bool)
        self._states = [ScanState()]  # one per accepted token (+ the start)
        self._out = bytearray()  # the output's bytes

    def _next(self, state: ScanState, tok: int) -> ScanState | None:
        if tok in self.eos_ids:  # the output ends: so does a number in progress (a root number)
            return None if state.scalar is not None and not state.scalar.valid(state.lex) else state
        data = self._bytes[tok] if tok < len(self._bytes) else b""
        return scan(state, data, self._out, self._arrays, self._wholes)

    def allowed(self) -> np.ndarray:
        base = self._inner.allowed()
        if base.size == 0:
            return base
        state = self._states[-1]
        # Only a `]` (`}`) closes an array (object); one at a place can also be opened and closed by the
        # same token (`[]`), so every allowed closing token is checked while any such place can be reached.
        index = np.minimum(base, len(self._may_close) - 1)
        may = self._may_close[index]
        if self._scalars:
            if state.scalar is not None and state.scalar.kind == "string":  # what closes it is checked
                may = may | self._quote[index]
                if state.scalar.max_length is not None and not state.escaped and \
                        _string_length(state.lex) + _LONGEST_TOKEN >= state.scalar.max_length:
                    may = np.ones_like(may)  # and what fills it up
            elif state.scalar is not None:  # a number at a place is being read: what ends it is checked
                may = may | self._may_end[index] | self._digit[index] | np.isin(base, list(self.eos_ids))
            elif state.lex is None:  # one may start (and end) within a token
                may = may | self._digit[index] | self._quote[index]
        candidates = base[may]
        bad = [t for t in candidates.tolist() if self._next(state, t) is None]
        if not bad:
            return base
        kept = np.setdiff1d(base, np.asarray(bad, dtype=base.dtype), assume_unique=True)
        if kept.size == 0:
            raise ConstraintError("constraint layer: every token the grammar allows here would end a value "
                                  "the schema rejects (an array without a matching item, an object without a "
                                  "member its negated keywords reject, a scalar or string jsonschema rejects): "
                                  "the output so far cannot be completed")
        return kept

    def forced(self) -> list[int]:
        out, state = [], self._states[-1]
        try:
            for tok in self._inner.forced():
                nxt = self._next(state, tok)
                if nxt is None:
                    break
                out.append(tok)
                self._out += self._bytes[tok] if tok not in self.eos_ids and tok < len(self._bytes) else b""
                state = nxt
        finally:
            del self._out[self._states[-1].pos:]
        if not out and any(f.spec is not None for f in self._states[-1].stack):
            allowed = self.allowed()  # the layer may leave one token where the grammar allows several
            if allowed.size == 1 and int(allowed[0]) not in self.eos_ids:
                out = [int(allowed[0])]
        return out

    def _push(self, tok: int, nxt: ScanState) -> None:
        del self._out[self._states[-1].pos:]
        if tok not in self.eos_ids and tok < len(self._bytes):
            self._out += self._bytes[tok]
        self._states.append(nxt)

    def accept(self, token_id: int) -> None:
        token_id = int(token_id)
        self._inner.accept(token_id)  # raises ValueError for a token the grammar does not allow
        nxt = self._next(self._states[-1], token_id)
        if nxt is None:
            self._inner.rollback(1)
            raise ValueError(f"token {token_id} is not allowed here (it closes an array that has no item "
                             "matching its contains schema, or an object no member of which fails its negated "
                             "keywords)")
        self._push(token_id, nxt)

    def try_accept(self, token_ids) -> int:
        n = 0
        for tok in token_ids:  # the inner matcher first: the scan assumes bytes it allows
            tok = int(tok)
            if self._inner.try_accept([tok]) != 1:
                break
            nxt = self._next(self._states[-1], tok)
            if nxt is None:
                self._inner.rollback(1)
                break
            self._push(tok, nxt)
            n += 1
        return n

    def rollback(self, n: int) -> None:
        n = int(n)
        self._inner.rollback(n)
        if n:
            del self._states[-n:]
            del self._out[self._states[-1].pos:]

    def can_stop(self) -> bool:
        return self._inner.can_stop()

    def is_done(self) -> bool:
        return self._inner.is_done()
