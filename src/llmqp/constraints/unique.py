"""`uniqueItems`, enforced token by token above the grammar matcher (valid by construction).

A context-free grammar cannot say "no two items are equal", so the grammar is compiled without
`uniqueItems` and `UniqueMatcher` wraps its matcher. It follows the JSON parse of the output so far (a
byte-level scanner with a path stack) and, at each step, removes from the grammar's allowed set every
token that would

  * complete an item equal (JSON equality: 1 == 1.0, "a" == "\\u0061") to an earlier item of the
    same unique array, or
  * leave the item in progress, or the item a `,` opens, without any completion that is still unused
    (e.g. `[true,false,` or, with `"maxLength": 2`, `["ab","ab` where only `"` can follow).

so every prefix the engine sees can still be completed to a valid output, and every output that stops
is valid. Exactly where the array is, and what its items are, must be decidable from the schema:

  * the array is reached from the root through `properties`, `items`, `anyOf`/`oneOf` options that
    alone admit arrays (objects) at their place (plain `$ref`s followed), and `patternProperties` /
    `additionalProperties` whose keys no other schema of the node governs (`KeyStep`: a pattern that
    no declared name and no other pattern of the node can match), so its place in the output names it;
    a `uniqueItems: true` anywhere else (in one of several options that admit arrays, `allOf`,
    overlapping patterns, a recursive `$ref`, ...), or where two registered places may name one array,
    is refused with ConstraintError;
  * its items are scalars: an `enum`/`const` of scalars, `boolean`, `null`, a `string` (or `["string",
    "null"]`) with at most `minLength`/`maxLength`, a `string` with a `pattern` (and lengths: an item in
    progress is kept while the pattern's automaton counts a completion no earlier item took,
    `regular.Completions`), an `anyOf` of one such schema and `enum`s it covers, or an unbounded
    `integer`/`number`; or *open* values,
    every prefix of which has infinitely many completions: objects that admit additional properties (no
    `additionalProperties`/`patternProperties`/`propertyNames`/`maxProperties`, and not `strict=True`,
    which closes them), arrays without `maxItems`/`prefixItems`/`contains`, unbounded strings and
    numbers (a `type` list of these kinds). An open item is checked when it completes (compared as a
    parsed value: key order, `1` = `1.0`): where it would repeat an earlier item the layer removes the
    completing token, and the grammar still has another (one more key, item, character or digit).
    Items with a `format` llguidance enforces itself, numeric bounds, closed objects or bounded arrays
    are refused (whether an unused completion exists would not be decidable here).

Cost: nothing outside unique arrays; inside one, the candidates that can complete or open an item are
re-scanned in Python (inside a string item only the tokens holding a `"`; inside an open compound item
only those with enough closing brackets to complete it).
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import json
import re
from decimal import Decimal
from typing import Any

import numpy as np

from llmqp.constraints import regular
from llmqp.constraints.base import Matcher
from llmqp.constraints.keywords import _patterns_disjoint
from llmqp.constraints.schema import MISSING, walk_pointer
from llmqp.errors import ConstraintError

_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)  # no rounding
ITEM = ("[]",)  # the path step into an array's items (object keys are plain strings)
_ANNOTATIONS = {"$schema", "$id", "id", "$anchor", "$comment", "$defs", "definitions", "title",
                "description", "default", "examples", "example", "readOnly", "writeOnly", "deprecated"}
_SCALAR_KEYS = {"string": {"minLength", "maxLength"}, "integer": set(), "number": set(), "boolean": set(),
                "null": set()}


@dataclasses.dataclass(frozen=True)
class KeyStep:
    """A path step into the values of an object's keys that one schema alone governs:
    `patternProperties[pattern]` for keys that match `pattern` (and no declared name: `_key_steps`
    makes sure none can), or `additionalProperties` (`pattern` None) for keys outside `names` that
    match none of `others`, the node's patterns."""

    pattern: str | None
    names: frozenset = frozenset()
    others: tuple = ()

    def matches(self, key: Any) -> bool:
        if not isinstance(key, str):
            return False
        if self.pattern is not None:
            return _regex(self.pattern).search(key) is not None
        return key not in self.names and not any(_regex(p).search(key) for p in self.others)


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str):
    return re.compile(pattern)


def _key_steps(node: dict, key: str) -> list[tuple[KeyStep | None, Any, str]]:
    """(step, subschema, where) for the values `patternProperties` / `additionalProperties` of `node`
    govern; step None where the place is not known: a pattern that a declared name or another pattern
    of the node may also match (two schemas would govern one key), or one Python reads otherwise or not."""
    props, patterns = node.get("properties"), node.get("patternProperties")
    names = frozenset(props) if isinstance(props, dict) else frozenset()
    patterns = tuple(patterns) if isinstance(patterns, dict) else ()
    readable = all(_readable(p) for p in patterns)
    if key == "additionalProperties":
        value = node[key]
        return [(KeyStep(None, names, patterns) if readable else None, value, "/additionalProperties")]
    out = []
    for pattern, sub in node[key].items():
        alone = readable and not any(_regex(pattern).search(n) for n in names) and \
            all(_patterns_disjoint(pattern, other) for other in patterns if other != pattern)
        out.append((KeyStep(pattern) if alone else None, sub, f"/patternProperties/{pattern}"))
    return out


def _readable(pattern: Any) -> bool:
    """Whether Python's `re` reads `pattern` as llguidance's Rust regex does (as far as checked here)."""
    if not isinstance(pattern, str) or any(op in pattern for op in regular._RUST_AMBIGUOUS):
        return False
    try:
        _regex(pattern)
    except re.error:
        return False
    return True


def lookup(arrays: dict, path: tuple):
    """The layer's entry for the array at output `path` (object keys and ITEM), or None: registered paths
    may hold KeyStep steps, which match keys by pattern."""
    spec = arrays.get(path)
    if spec is not None:
        return spec
    for registered, value in arrays.items():
        if len(registered) == len(path) and any(isinstance(s, KeyStep) for s in registered) and \
                all(a == b or (isinstance(a, KeyStep) and a.matches(b)) for a, b in zip(registered, path)):
            return value
    return None


def refuse_shared(arrays: dict, keyword: str) -> None:
    """ConstraintError when one output array could be at two registered paths (a KeyStep may match a
    key that another path names, or two patterns may match one key): `lookup` would find one of them."""
    keyed = [p for p in arrays if any(isinstance(s, KeyStep) for s in p)]
    for a in keyed:
        for b in arrays:
            if a != b and _may_share(a, b):
                raise ConstraintError(f'json_schema: keyword "{keyword}" is not supported where two schemas may '
                                      "govern the same array (one through patternProperties or "
                                      "additionalProperties)")


def _may_share(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if not isinstance(x, KeyStep):
            x, y = y, x
        if not isinstance(x, KeyStep) or y == ITEM:
            return False  # two names, or a name and the items
        if isinstance(y, str):
            if not x.matches(y):
                return False
        elif x.pattern is not None and y.pattern is not None:
            if _patterns_disjoint(x.pattern, y.pattern):
                return False
        elif (x.pattern is None and y.pattern in x.others) or (y.pattern is None and x.pattern in y.others):
            return False  # a node's additional properties and one of its patterns
    return True


@dataclasses.dataclass(frozen=True)
class UniqueArray:
    """A unique array's items: a finite `domain` of values (enum, const, boolean, null, empty string),
    an infinite scalar kind ("string", "integer", "number"), or "open" values (compared when complete)."""

    kind: str  # "finite" | "string" | "integer" | "number" | "open" (see `_open`)
    domain: tuple = ()  # (key, texts) per value of a finite domain: its identity and its JSON spellings
    max_length: int | None = None  # strings
    nullable: bool = False  # strings: `null` is an item too (`"type": ["string", "null"]`)
    pattern: str | None = None  # strings: a `pattern` (counted by `completions()`)
    min_length: int = 0  # strings with a pattern

    def completions(self):
        """The completion counter of a string item's pattern (regular.Completions), or None."""
        return regular.Completions.of(self.pattern) if self.pattern is not None else None


# ----------------------------------------------------------------------------------- compile time
def extract(schema: Any) -> tuple[Any, dict[tuple, UniqueArray]]:
    """(schema without the `uniqueItems: true` this module enforces, {output path: UniqueArray}).
    Raises ConstraintError for a `uniqueItems: true` it cannot enforce exactly. The schema is copied
    before any change."""
    if not _mentions_unique(schema):
        return schema, {}
    import copy

    schema = copy.deepcopy(schema)
    found: dict[tuple, UniqueArray] = {}
    nodes: dict[int, dict] = {}
    _walk(schema, schema, (), (), found, nodes)
    for node, path in _every_unique(schema):
        if id(node) not in nodes:
            raise ConstraintError(f'json_schema: keyword "uniqueItems" at {path} is not supported here: only '
                                  "arrays reached from the root through properties, items and the one anyOf/"
                                  "oneOf option that admits arrays there (not allOf, additional or pattern "
                                  "properties, options that share arrays, or a recursive $ref) are enforced")
    from llmqp.constraints.contains import places

    placed, elsewhere = places(schema, "uniqueItems")
    for key in nodes:  # its keyword is removed below: every use of the node must be a registered array
        if key in elsewhere or any(path not in found for _, path, _ in placed.get(key, [])):
            where = placed[key][0][2] if placed.get(key) else "?"
            raise ConstraintError(f'json_schema: keyword "uniqueItems" at {where} is not supported here: its '
                                  "node is also used where the layer cannot name the array (an option among "
                                  "others, not, additional properties, a recursive $ref, ...)")
    refuse_shared(found, "uniqueItems")
    for node in nodes.values():
        del node["uniqueItems"]
    return schema, found


def _walk(root, node, path: tuple, refs: tuple, found: dict, nodes: dict) -> None:
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and not (set(node) - _ANNOTATIONS - {"$ref"}):
        ref = node["$ref"]
        if ref in refs:
            return  # a cycle: uniqueItems inside it stays unregistered and is refused by `extract`
        refs = refs + (ref,)
        node = _resolve(root, ref)
    if not isinstance(node, dict):
        return
    if node.get("uniqueItems") is True:
        kind = _item_kind(root, node, path)
        if found.get(path, kind) != kind:  # two schemas (a node and its option) describe this array's items
            raise ConstraintError('json_schema: keyword "uniqueItems" is not supported where two schemas give '
                                  "the same unique array different items")
        found[path] = kind
        nodes[id(node)] = node
    if isinstance(node.get("properties"), dict):
        for name, sub in node["properties"].items():
            _walk(root, sub, path + (name,), refs, found, nodes)
    if isinstance(node.get("items"), dict):
        _walk(root, node["items"], path + (ITEM,), refs, found, nodes)
    for key in ("patternProperties", "additionalProperties"):
        if isinstance(node.get(key), dict):
            for step, sub, _ in _key_steps(node, key):
                if step is not None and isinstance(sub, dict):
                    _walk(root, sub, path + (step,), refs, found, nodes)
    for key in ("anyOf", "oneOf"):  # an option that alone admits arrays (or objects) owns this place's
        options = node.get(key)    # arrays (objects): a valid output's array here must match it
        if not isinstance(options, list):
            continue
        for kind in ("array", "object"):
            owners = [o for o in options if _admits(root, o, kind)]
            if len(owners) == 1:
                _walk(root, owners[0], path, refs, found, nodes)


def plain_target(root, node):
    """`node`, or the target of a plain `$ref` (nothing beside it), followed up to 32 times."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and \
            not (set(node) - _ANNOTATIONS - {"$ref"}) and seen < 32:
        node, seen = _resolve(root, node["$ref"]), seen + 1
    return node


def _admits(root, node, kind: str) -> bool:
    """False only when `node` (a plain `$ref` followed) provably admits no value of JSON type `kind`."""
    node = plain_target(root, node)
    if node is False:
        return False
    if not isinstance(node, dict):
        return True
    t = node.get("type")
    kinds = {kind, "integer"} if kind == "number" else {kind}  # an integer is a number
    if isinstance(t, str):
        return t in kinds
    if isinstance(t, list):
        return bool(kinds & set(t))
    if "enum" in node or "const" in node:
        values = [node["const"]] if "const" in node else node["enum"]
        return isinstance(values, list) and any(_kind_of(v) == kind for v in values)
    return True


def _kind_of(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "literal"
    if isinstance(value, (int, float)):
        return "number"
    return {list: "array", dict: "object", str: "string"}.get(type(value), "other")


def _where(step) -> str:
    if step == ITEM:
        return "/items"
    if isinstance(step, KeyStep):
        return "/additionalProperties" if step.pattern is None else f"/patternProperties/{step.pattern}"
    return f"/properties/{step}"


def _item_kind(root, node: dict, path: tuple) -> UniqueArray:
    where = "#" + "".join(_where(p) for p in path)
    extra = set(node) - _ANNOTATIONS - {"type", "items", "minItems", "maxItems", "uniqueItems"}
    types = node.get("type", "array")
    if extra or not (types == "array" or (isinstance(types, list) and "array" in types)):
        raise ConstraintError(f'json_schema: keyword "uniqueItems" at {where} is not supported beside '
                              f'{sorted(extra) or "a type other than array"}')
    items = node.get("items")
    seen = 0
    while isinstance(items, dict) and "$ref" in items and not (set(items) - _ANNOTATIONS - {"$ref"}) and seen < 32:
        items, seen = _resolve(root, items["$ref"]), seen + 1
    items = _without_subsumed_options(root, items)
    why = None
    kind = None
    if not isinstance(items, dict):
        why = "items that may be any JSON value"
    elif "enum" in items or "const" in items:
        values = [items["const"]] if "const" in items else items["enum"]
        if set(items) - _ANNOTATIONS - {"enum", "const", "type"} or \
                not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            why = "items that are not an enum of scalars"
        else:
            kind = _finite(values)
    elif isinstance(items.get("type"), list) and sorted(items["type"]) == ["null", "string"] and \
            not set(items) - _ANNOTATIONS - {"type", "minLength", "maxLength"}:
        kind = _finite(["", None]) if items.get("maxLength") == 0 else \
            UniqueArray(kind="string", max_length=items.get("maxLength"), nullable=True)
    else:
        t = items.get("type")
        keys = set(items) - _ANNOTATIONS - {"type"}
        if (not isinstance(t, str) or t not in _SCALAR_KEYS or keys - _SCALAR_KEYS[t]) and _open(root, items):
            kind = UniqueArray(kind="open")
        elif t in ("integer", "number") and keys and _away_from_zero(root, items):
            kind = UniqueArray(kind=t)
        elif t == "string" and "pattern" in keys and not keys - {"pattern", "minLength", "maxLength"}:
            kind = _pattern_strings(items)
            if kind is None:
                why = f"string items with this pattern ({json.dumps(items['pattern'])[:60]}): only patterns " \
                      "without look-behind, back-references or flags are counted"
        elif not isinstance(t, str) or t not in _SCALAR_KEYS or keys - _SCALAR_KEYS[t]:
            why = f"items of this kind ({json.dumps(items)[:60]}): only enums of scalars, booleans, null, " \
                  "strings with at most pattern/minLength/maxLength, unbounded integers/numbers, and open values " \
                  "(objects that admit additional properties, arrays without maxItems, unbounded strings)"
            if items.get("additionalProperties") is False and "object" in (t if isinstance(t, list) else [t]):
                why += "; strict=True closes objects that declare properties: strict=False keeps them open"
        elif t == "boolean":
            kind = _finite([False, True])
        elif t == "null":
            kind = _finite([None])
        elif t == "string" and items.get("maxLength") == 0:
            kind = _finite([""])
        else:
            kind = UniqueArray(kind=t, max_length=items.get("maxLength") if t == "string" else None)
    if why:
        raise ConstraintError(f'json_schema: keyword "uniqueItems" at {where} is not supported for {why}')
    if kind.pattern is not None and \
            int(node.get("minItems", 0)) > kind.completions().count("", kind.min_length, kind.max_length):
        raise ConstraintError(f'json_schema: keyword "uniqueItems" at {where}: minItems {node["minItems"]} '
                              "exceeds the distinct strings the items' pattern and lengths allow")
    if kind.kind == "finite" and int(node.get("minItems", 0)) > len(kind.domain):
        raise ConstraintError(f'json_schema: keyword "uniqueItems" at {where}: minItems {node["minItems"]} '
                              f"exceeds the {len(kind.domain)} distinct values the items allow: no output "
                              "satisfies it")
    return kind


def _without_subsumed_options(root, items):
    """Items that are an `anyOf` of one schema and `enum`/`const` options whose every value that schema
    accepts (`jsonschema` decides) are that schema: the same values, so the same unique items.
    Anything else is returned as it is."""
    if not isinstance(items, dict) or not isinstance(items.get("anyOf"), list) or set(items) - _ANNOTATIONS - {"anyOf"}:
        return items
    options = []
    for option in items["anyOf"]:
        seen = 0
        while isinstance(option, dict) and isinstance(option.get("$ref"), str) and \
                not (set(option) - _ANNOTATIONS - {"$ref"}) and seen < 32:
            option, seen = _resolve(root, option["$ref"]), seen + 1
        options.append(option)
    finite = [o for o in options if isinstance(o, dict) and ("enum" in o or "const" in o) and
              not set(o) - _ANNOTATIONS - {"enum", "const", "type"}]
    rest = [o for o in options if not any(o is f for f in finite)]
    if len(rest) != 1 or not finite or not isinstance(rest[0], dict) or '"format"' in json.dumps(rest[0]) or \
            '"$ref"' in json.dumps(rest[0]):
        return items
    try:
        from jsonschema.validators import validator_for

        whole = validator_for(root)(root)
        covers = whole.evolve(schema=rest[0])
        for option in finite:
            values = [option["const"]] if "const" in option else option["enum"]
            own = whole.evolve(schema=option)  # (a value its own `type` rejects is no instance)
            if not isinstance(values, list) or not all(covers.is_valid(v) for v in values if own.is_valid(v)):
                return items
    except Exception:  # noqa: BLE001 - a schema jsonschema cannot evaluate: keep the items as they are
        return items
    return rest[0]


_BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def _away_from_zero(root, items: dict) -> bool:
    """Whether `items` (a number or integer schema) admits a union of rays away from zero: every value
    it admits is in some `(a, +inf)` / `[a, +inf)` with a > 0 (or `(0, +inf)`), or the mirror image.
    Then, as for an unbounded number, every prefix the grammar admits has infinitely many completions
    of distinct value (more digits move away from zero, and stay in the ray). Read: the node's bounds,
    `allOf` parts and `anyOf` options made of bounds (and `type: number/integer`), plain `$ref`s."""
    rays = _intervals(root, items, 0)
    if rays is None:
        return False
    for lo, lo_open, hi, hi_open in rays:
        if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_open or hi_open))):
            continue  # empty
        up = hi is None and lo is not None and (lo > 0 or (lo == 0 and lo_open))
        down = lo is None and hi is not None and (hi < 0 or (hi == 0 and hi_open))
        if not (up or down):
            return False
    return True


def _intervals(root, node, depth: int) -> list[tuple] | None:
    """The values `node` admits as a union of intervals (lo, lo_open, hi, hi_open; None: unbounded),
    or None for a keyword other than bounds, `type` number/integer, `allOf`, `anyOf` and plain `$ref`."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and \
            not (set(node) - _ANNOTATIONS - {"$ref"}) and seen < 32:
        node, seen = _resolve(root, node["$ref"]), seen + 1
    if not isinstance(node, dict) or depth > 8 or \
            set(node) - _ANNOTATIONS - {"type", "allOf", "anyOf", *_BOUNDS} or \
            node.get("type", "number") not in ("number", "integer") or \
            not all(isinstance(node[k], (int, float)) and not isinstance(node[k], bool)
                    for k in _BOUNDS if k in node):
        return None
    lo, lo_open, hi, hi_open = None, False, None, False
    for key, low in (("minimum", True), ("exclusiveMinimum", True), ("maximum", False), ("exclusiveMaximum", False)):
        if key not in node:
            continue
        value, strict = Decimal(repr(node[key])), key.startswith("exclusive")
        if low and (lo is None or value > lo or (value == lo and strict)):
            lo, lo_open = value, strict
        elif not low and (hi is None or value < hi or (value == hi and strict)):
            hi, hi_open = value, strict
    out = [(lo, lo_open, hi, hi_open)]
    if not isinstance(node.get("allOf", []), list):
        return None
    for part in node.get("allOf", []):
        inner = _intervals(root, part, depth + 1)
        if inner is None:
            return None
        out = [_meet(a, b) for a in out for b in inner]
    if "anyOf" in node:
        if not isinstance(node["anyOf"], list):
            return None
        options = []
        for option in node["anyOf"]:
            inner = _intervals(root, option, depth + 1)
            if inner is None:
                return None
            options.extend(inner)
        out = [_meet(a, b) for a in out for b in options]
    return out


def _meet(a: tuple, b: tuple) -> tuple:
    lo, lo_open = a[0], a[1]
    if b[0] is not None and (lo is None or b[0] > lo or (b[0] == lo and b[1])):
        lo, lo_open = b[0], b[1]
    hi, hi_open = a[2], a[3]
    if b[2] is not None and (hi is None or b[2] < hi or (b[2] == hi and b[3])):
        hi, hi_open = b[2], b[3]
    return lo, lo_open, hi, hi_open


def _pattern_strings(items: dict) -> UniqueArray | None:
    """Unique strings with a `pattern` (and min/maxLength): whether an item in progress still has an
    unused completion is counted on the pattern's automaton (`regular.Completions`)."""
    low, high = items.get("minLength", 0), items.get("maxLength")
    if not isinstance(items["pattern"], str) or not isinstance(low, int) or \
            not (high is None or isinstance(high, int)) or regular.Completions.of(items["pattern"]) is None:
        return None
    return UniqueArray(kind="string", max_length=high, pattern=items["pattern"], min_length=low)


# Keywords an open item may carry, per JSON type (beside `type` and annotations): none bounds the value's
# completions (an object can take one more additional key, an array one more item, a string one more
# character, a number one more digit).
_OPEN_KEYS = {"object": {"properties", "required", "minProperties"}, "array": {"items", "minItems"},
              "string": {"minLength"}, "number": set()}


def _open(root, node, depth: int = 0) -> bool:
    """Whether every prefix of a value `node` admits, in the grammar, has infinitely many completions: an
    object that admits additional properties, an array without an upper bound, an unbounded string or
    number, or a `type` list of these (its keywords allowed for each listed type)."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and \
            not (set(node) - _ANNOTATIONS - {"$ref"}) and seen < 32:
        node, seen = _resolve(root, node["$ref"]), seen + 1
    if not isinstance(node, dict) or depth > 8:
        return False
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not types or not all(t in _OPEN_KEYS for t in types):
        return False
    keys = set(node) - _ANNOTATIONS - {"type"}
    if keys - set().union(*(_OPEN_KEYS[t] for t in types)):
        return False
    if "items" in node and not (node["items"] is True or isinstance(node["items"], dict)):
        return False  # `items: false` (or a list: tuple items) bounds the array
    if "properties" in node and not isinstance(node["properties"], dict):
        return False
    return True


def _finite(values: list) -> UniqueArray:
    domain: dict = {}
    for v in values:
        texts = {json.dumps(v, ensure_ascii=False), json.dumps(v)}
        if isinstance(v, float) and v.is_integer():
            texts.add(str(int(v)))
        domain.setdefault(value_key(v), set()).update(texts)
    return UniqueArray(kind="finite", domain=tuple((k, tuple(sorted(t))) for k, t in domain.items()))


def _resolve(root, ref: str):
    node = walk_pointer(root, ref)
    return None if node is MISSING else node


def _mentions_unique(schema) -> bool:
    return any(True for _ in _every_unique(schema))


def _every_unique(schema):
    stack = [(schema, "#")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if node.get("uniqueItems") is True:
                yield node, path
            stack.extend((v, f"{path}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}/{i}") for i, v in enumerate(node))


def value_key(value: Any):
    """A hashable identity under JSON equality (1 == 1.0 == 1e0; True != 1)."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float, Decimal)):
        return ("num", Decimal(repr(value) if isinstance(value, float) else value).normalize(_EXACT))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("arr", tuple(value_key(v) for v in value))
    if isinstance(value, dict):
        return ("obj", frozenset((k, value_key(v)) for k, v in value.items()))
    return ("json", json.dumps(value, sort_keys=True))


def _text_key(raw: bytes):
    """value_key of a complete JSON value as written (numbers compared exactly, not via float)."""
    text = raw.decode("utf-8")
    c = text[:1]
    if c in "{[":  # an open item, compared as a parsed value (numbers exactly)
        return value_key(json.loads(text, parse_float=Decimal, parse_int=Decimal))
    if c == '"':
        return ("str", json.loads(text))
    if c in "tfn":
        return value_key(json.loads(text))
    try:
        return ("num", Decimal(text).normalize(_EXACT))
    except decimal.DecimalException:
        return ("text", text)


def arrays_hold(value: Any, arrays: dict, holds, path: tuple = ()) -> bool:
    """True when holds(arrays[path], items) for every array of `value` at a path in `arrays` (a layer's
    check of a whole value, for accepts())."""
    if isinstance(value, list):
        spec = lookup(arrays, path)
        if spec is not None and not holds(spec, value):
            return False
        return all(arrays_hold(v, arrays, holds, path + (ITEM,)) for v in value)
    if isinstance(value, dict):
        return all(arrays_hold(v, arrays, holds, path + (k,)) for k, v in value.items())
    return True


def _distinct(spec: UniqueArray, items: list) -> bool:
    keys = [value_key(v) for v in items]
    return len(set(keys)) == len(keys)


def check_value(value: Any, arrays: dict[tuple, UniqueArray]) -> bool:
    """True when every array at a unique path of `value` has distinct items (for accepts())."""
    return arrays_hold(value, arrays, _distinct)


# ----------------------------------------------------------------------------------------- runtime
_WS = frozenset(b" \t\n\r")
_SCALAR_START = frozenset(b"-0123456789tfn")
_SCALAR_BYTES = frozenset(b"-+.0123456789eEtrufalsn")


@dataclasses.dataclass(frozen=True)
class _Frame:
    kind: str  # "o" object, "a" array
    path: tuple
    spec: UniqueArray | None = None  # a unique array
    used: frozenset = frozenset()  # keys of its completed items
    key: str | None = None  # objects: the last key read
    expect_key: bool = True  # objects: the next string is a key
    item_start: int | None = None  # unique arrays: the offset of the object/array item in progress


@dataclasses.dataclass(frozen=True)
class ScanState:
    """The JSON parse of the output so far, at byte offset `pos` (immutable: states are kept per token for
    rollback)."""

    stack: tuple = ()
    lex: bytes | None = None  # the scalar being read (a string starts with `"`), or None
    escaped: bool = False
    pos: int = 0

    def top_unique(self) -> _Frame | None:
        return self.stack[-1] if self.stack and self.stack[-1].spec is not None else None

    def open_item(self) -> int | None:
        """How many closing brackets complete the innermost object/array item in progress of a unique
        array (None when there is none)."""
        for depth, frame in enumerate(reversed(self.stack)):
            if frame.spec is not None and frame.item_start is not None:
                return depth
        return None


class Text:
    """The output `out[:base] + data`, sliced without copying `out` whole (an item is short, the output
    may be long). Shared with the contains layer."""

    def __init__(self, out: bytes, data: bytes, base: int):
        self.out, self.data, self.base = out, data, base

    def slice(self, start: int, end: int) -> bytes:
        if start >= self.base:
            return self.data[start - self.base:end - self.base]  # (the token's own bytes)
        return bytes(self.out[start:self.base]) + self.data[:max(0, end - self.base)]


def scan(state: ScanState, data: bytes, arrays: dict[tuple, UniqueArray], out: bytes = b"") -> ScanState | None:
    """`state` after the bytes `data` (`out`: the output before them), or None when they complete an item
    that repeats an earlier one of its unique array. Assumes `data` is what the grammar allows
    (well-formed JSON so far)."""
    stack, lex, escaped, pos = state.stack, state.lex, state.escaped, state.pos
    text = Text(out, data, pos)
    for b in data:
        pos += 1  # the offset after this byte
        if lex is not None and lex[:1] == b'"':
            lex += bytes((b,))
            if escaped:
                escaped = False
            elif b == 0x5C:
                escaped = True
            elif b == 0x22:
                stack = _complete(stack, lex)
                if stack is None:
                    return None
                lex = None
            continue
        if lex is not None:
            if b in _SCALAR_BYTES:
                lex += bytes((b,))
                continue
            stack = _complete(stack, lex)
            if stack is None:
                return None
            lex = None
        if b in _WS or b == 0x3A:  # whitespace, `:`
            continue
        if b == 0x2C:  # `,`
            if stack and stack[-1].kind == "o":
                stack = stack[:-1] + (dataclasses.replace(stack[-1], expect_key=True),)
            continue
        if b in (0x7B, 0x5B):  # `{` `[`
            if stack and stack[-1].spec is not None and stack[-1].item_start is None:
                stack = stack[:-1] + (dataclasses.replace(stack[-1], item_start=pos - 1),)  # an open item
            path = _child_path(stack)
            stack = stack + ((_Frame("o", path),) if b == 0x7B else (_Frame("a", path, lookup(arrays, path)),))
            continue
        if b in (0x7D, 0x5D):  # `}` `]`
            stack = stack[:-1]
            if stack and stack[-1].kind == "o":
                stack = stack[:-1] + (dataclasses.replace(stack[-1], expect_key=False),)
            elif stack and stack[-1].spec is not None and stack[-1].item_start is not None:
                stack = _complete(stack, text.slice(stack[-1].item_start, pos))
                if stack is None:
                    return None
            continue
        lex = bytes((b,))  # `"` or the first byte of a number / literal
    return ScanState(stack, lex, escaped, pos)


def _child_path(stack: tuple) -> tuple:
    if not stack:
        return ()
    top = stack[-1]
    return top.path + ((top.key,) if top.kind == "o" else (ITEM,))


def _complete(stack: tuple, raw: bytes) -> tuple | None:
    if not stack:
        return stack
    top = stack[-1]
    if top.kind == "o":
        if top.expect_key:
            return stack[:-1] + (dataclasses.replace(top, key=json.loads(raw), expect_key=False),)
        return stack
    if top.spec is None:
        return stack
    key = _text_key(raw)
    if key in top.used:
        return None
    return stack[:-1] + (dataclasses.replace(top, used=top.used | {key}, item_start=None),)


def viable(state: ScanState, opening: bool) -> bool:
    """Whether the innermost unique array's item in progress (or, with `opening`, the item a `,` or `[`
    just opened) still has a completion that is unused."""
    top = state.top_unique()
    if top is None:
        return True
    spec, raw = top.spec, state.lex
    if raw is None:
        if not opening:
            return True
        if spec.pattern is not None:
            return spec.completions().count("", spec.min_length, spec.max_length) > _taken("", top.used)
        return spec.kind != "finite" or any(k not in top.used for k, _ in spec.domain)
    text = raw.decode("utf-8", errors="ignore")
    if spec.pattern is not None:
        content = None if state.escaped or text[:1] != '"' else _content(raw)
        if content is None:
            return True  # inside an escape sequence: decided once the character is complete
        return spec.completions().count(content, spec.min_length, spec.max_length) > _taken(content, top.used)
    if spec.kind == "finite":
        return any(k not in top.used and any(t.startswith(text) for t in texts) for k, texts in spec.domain)
    if spec.kind == "integer":
        return not (text in ("0", "-0") and ("num", Decimal(0)) in top.used)
    if spec.kind == "string" and spec.nullable and text[:1] == "n":  # `null`: one value
        return ("null",) not in top.used
    if spec.kind == "string" and spec.max_length is not None and not state.escaped:
        try:
            content = json.loads(text + '"')
        except ValueError:
            return True  # inside an escape sequence: the grammar bounds the length
        return not (len(content) >= spec.max_length and ("str", content) in top.used)
    return True


def _content(lex: bytes) -> str | None:
    """The text of the string in progress `lex` (from its `"`), or None inside an escape sequence."""
    try:
        return json.loads(lex.decode("utf-8", errors="ignore") + '"')
    except ValueError:
        return None


def _taken(prefix: str, used: frozenset) -> int:
    """How many earlier string items start with `prefix`."""
    return sum(k[0] == "str" and k[1].startswith(prefix) for k in used)


def _prefix_taken(lex: bytes, used: frozenset) -> bool:
    """Whether an earlier string item starts with the string item in progress (`lex`, from its `"`);
    True when that cannot be told (an escape in progress)."""
    content = _content(lex)
    return content is None or _taken(content, used) > 0


class UniqueMatcher(Matcher):
    """A grammar matcher plus the uniqueItems layer. The verbs keep their contract: `allowed()` is the
    grammar's set minus what the layer excludes (never empty while the output can go on; otherwise
    ConstraintError), `forced()` stops at the first token the layer would exclude, `accept` raises
    ValueError for an excluded token, `rollback` restores the scan state too."""

    def __init__(self, inner: Matcher, arrays: dict[tuple, UniqueArray], token_bytes: list[bytes],
                 has_quote: np.ndarray, char_len: np.ndarray):
        self._inner, self._arrays = inner, arrays
        self._bytes, self._has_quote, self._char_len = token_bytes, has_quote, char_len
        self.vocab_size, self.eos_ids = inner.vocab_size, inner.eos_ids
        self._states = [ScanState()]  # one per accepted token (+ the start)
        self._out = bytearray()  # the output's bytes (open items are sliced from it)
        self._closes = None
        if any(spec.kind == "open" for spec in arrays.values()):  # closing brackets per id
            self._closes = np.array([t.count(b"}") + t.count(b"]") for t in token_bytes] + [0], dtype=np.int32)

    def _next(self, tok: int) -> ScanState | None:
        state = self._states[-1]
        if tok in self.eos_ids:
            return state
        data = self._bytes[tok] if tok < len(self._bytes) else b""
        nxt = scan(state, data, self._arrays, self._out)
        if nxt is None:
            return None
        opened = bool(data) and data.rstrip(b" \t\n\r")[-1:] in (b",", b"[")
        return nxt if viable(nxt, opened) else None

    def _candidates(self, base: np.ndarray, state: ScanState) -> np.ndarray:
        """The ids of `base` the layer could exclude: those that can complete or open an item."""
        top, depth = state.top_unique(), state.open_item()
        check = np.zeros(base.size, dtype=bool)
        if depth is not None:  # an open object/array item completes only with `depth` closing brackets
            check |= self._closes[np.minimum(base, len(self._closes) - 1)] >= depth
        if top is None:
            return base[check]
        if state.lex is not None and state.lex[:1] == b'"' and top.spec.kind in ("string", "open") and \
                not state.escaped:
            # Inside a string item only a `"` completes it, and only reaching maxLength leaves a single
            # completion: other tokens cannot fail.
            ids = np.minimum(base, len(self._has_quote) - 1)
            quote = self._has_quote[ids]
            if top.spec.max_length is not None:
                try:
                    length = len(json.loads(state.lex.decode("utf-8") + '"'))
                    quote = quote | (length + self._char_len[ids] >= top.spec.max_length)
                except ValueError:
                    quote = np.ones_like(quote)
            if top.spec.pattern is not None and _prefix_taken(state.lex, top.used):
                quote = np.ones_like(quote)  # an earlier item starts with this one: any token may exhaust it
            check |= quote
        else:
            check[:] = True
        return base[check]

    def allowed(self) -> np.ndarray:
        base = self._inner.allowed()
        state = self._states[-1]
        if base.size == 0 or (state.top_unique() is None and state.open_item() is None):
            return base
        bad = [t for t in self._candidates(base, state).tolist() if self._next(t) is None]
        if not bad:
            return base
        kept = np.setdiff1d(base, np.asarray(bad, dtype=base.dtype), assume_unique=True)
        if kept.size == 0:
            raise ConstraintError("uniqueItems: no token continues the output without repeating an item "
                                  "(the constraint cannot be completed from here)")
        return kept

    def forced(self) -> list[int]:
        out, states = [], self._states[-1]
        for tok in self._inner.forced():
            nxt = self._next_from(states, tok)
            if nxt is None:
                break
            out.append(tok)
            states = nxt
        state = self._states[-1]
        if not out and (state.top_unique() is not None or state.open_item() is not None):
            allowed = self.allowed()  # the layer may leave one token where the grammar allows several
            if allowed.size == 1 and int(allowed[0]) not in self.eos_ids:
                out = [int(allowed[0])]
        return out

    def _next_from(self, state: ScanState, tok: int) -> ScanState | None:
        saved = self._states
        self._states = [state]
        try:
            return self._next(tok)
        finally:
            self._states = saved

    def _push(self, tok: int, state: ScanState) -> None:
        self._states.append(state)
        if tok not in self.eos_ids and tok < len(self._bytes):
            self._out += self._bytes[tok]

    def accept(self, token_id: int) -> None:
        token_id = int(token_id)
        self._inner.accept(token_id)  # raises ValueError for a token the grammar does not allow
        nxt = self._next(token_id)
        if nxt is None:
            self._inner.rollback(1)
            raise ValueError(f"token {token_id} is not allowed here (it would repeat an item of a unique array)")
        self._push(token_id, nxt)

    def try_accept(self, token_ids) -> int:
        n = 0
        for tok in token_ids:  # the grammar first: the scan assumes bytes the grammar allows
            if self._inner.try_accept([int(tok)]) != 1:
                break
            nxt = self._next(int(tok))
            if nxt is None:
                self._inner.rollback(1)
                break
            self._push(int(tok), nxt)
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
