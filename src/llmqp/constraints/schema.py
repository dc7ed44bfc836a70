"""JSON-Schema preparation that the backend does not do for us.

* `ignore_ref_siblings` drops the keywords beside a `$ref` that drafts 3-7 ignore.
* `check_keywords` rejects JSON-Schema keywords that llguidance would *silently ignore* (it already
  rejects the ones it knows it does not implement: `not`, `if`, `uniqueItems`, ...; those errors are
  located by `locate_keyword` so the message can name the place).
* `check_min_properties` rejects `minProperties` that llguidance would count wrongly (it does not keep
  keys of additional/pattern properties unique, so `{"a":1,"a":2}` would count as two properties).
* `exact_bounds` rewrites numeric bounds that llguidance would round *outward* (it reads them as doubles:
  `"maximum": 999999999999999999` let 10**18 through) into bounds it reads exactly, tightened inward.
* `close_objects` implements `strict=True`: object schemas that declare properties and say nothing about
  other properties get `"additionalProperties": false`, without breaking `allOf` / `$ref` merges.

Schemas are plain JSON values (dicts keep their key order, which is the generation order of
properties). Paths are JSON pointers (`#/properties/a/items`).
"""

from __future__ import annotations

import copy
import math
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

from llmqp.errors import ConstraintError

# Validation keywords of some JSON-Schema draft that llguidance 1.9 neither implements nor reports:
# enforcing the schema without them would accept outputs the schema rejects.
SILENTLY_IGNORED = {
    "divisibleBy": "the draft-3 form of multipleOf",
    "disallow": "draft-3 negated type",
    "extends": "draft-3 schema inheritance",
}

# Keywords whose value is one subschema, a list of subschemas, or a name -> subschema map.
_ONE = ("additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then",
        "else", "unevaluatedItems", "unevaluatedProperties")
_LIST_VALUE = ("prefixItems",)
_MAP_VALUE = ("properties", "patternProperties", "dependentSchemas")
_DEFS = ("$defs", "definitions")

# Keywords that carry no constraint (a `$ref` with only these beside it is a plain reference).
_ANNOTATIONS = {"$schema", "$id", "id", "$anchor", "$comment", "$defs", "definitions", "title",
                "description", "default", "examples", "example", "readOnly", "writeOnly", "deprecated",
                "$vocabulary", "contentMediaType", "contentEncoding"}
# Keywords that make a schema intersect its anyOf/oneOf options as one object.
_OBJECT_MERGING = {"properties", "required", "additionalProperties", "patternProperties", "allOf", "$ref",
                   "minProperties", "maxProperties", "unevaluatedProperties", "propertyNames"}
_OPENING = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


MISSING = object()  # what `walk_pointer` returns for a reference it cannot follow


def walk_pointer(root: Any, ref: str) -> Any:
    """The node a local reference (`#/definitions/x`, percent- and ~-escaped) points at in `root`, or
    MISSING when it is not local or leads nowhere."""
    if not ref.startswith("#"):
        return MISSING
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def subschemas(node: Any, path: str) -> Iterator[tuple[str, Any, str]]:
    """(relation, child, child_path) for every subschema directly inside `node`.

    relation: "value" (an independent position: a property value, items, ...), "all" (an allOf
    branch), "any" (an anyOf/oneOf option), "def" (a definition, only reachable through $ref)."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = f"{path}/{_escape(key)}"
        if key in _ONE or (key == "items" and isinstance(value, (dict, bool))):
            yield "value", value, here
        elif (key in _LIST_VALUE or key == "items") and isinstance(value, list):
            for i, child in enumerate(value):
                yield "value", child, f"{here}/{i}"
        elif key in _MAP_VALUE and isinstance(value, dict):
            for name, child in value.items():
                yield "value", child, f"{here}/{_escape(name)}"
        elif key == "dependencies" and isinstance(value, dict):
            for name, child in value.items():
                if isinstance(child, (dict, bool)):
                    yield "value", child, f"{here}/{_escape(name)}"
        elif key in ("allOf", "anyOf", "oneOf") and isinstance(value, list):
            relation = "all" if key == "allOf" else "any"
            for i, child in enumerate(value):
                yield relation, child, f"{here}/{i}"
        elif key in _DEFS and isinstance(value, dict):
            for name, child in value.items():
                yield "def", child, f"{here}/{_escape(name)}"


def walk(schema: Any) -> Iterator[tuple[dict, str]]:
    """Every dict subschema of `schema` (root first, then depth-first) with its path."""
    return walk_from(schema, "#")


def walk_from(schema: Any, path: str) -> Iterator[tuple[dict, str]]:
    """`walk` of a subschema found at `path`."""
    stack = [(schema, path)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            yield node, path
            stack.extend((child, p) for _, child, p in reversed(list(subschemas(node, path))))


def walk_reached(schema: Any) -> Iterator[tuple[dict, str]]:
    """`walk`, and the subschemas reached only through a local `$ref` to a place no keyword names
    (`#/definitions/group/x`: `group` is no keyword), each once."""
    seen: set = set()
    todo = [(schema, "#")]
    while todo:
        for node, path in walk_from(*todo.pop()):
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield node, path
            ref = node.get("$ref")
            target = walk_pointer(schema, ref) if isinstance(ref, str) else MISSING
            if isinstance(target, dict) and id(target) not in seen:
                todo.append((target, ref))


_LEGACY_DRAFT = re.compile(r"json-schema\.org/draft-0?[3-7]/schema")


def ignore_ref_siblings(schema: Any) -> Any:
    """Drafts 3 to 7 (the root's `$schema` says which) ignore every keyword beside a `$ref` (`jsonschema`
    does too); llguidance, like drafts 2019-09+, would intersect them with the target. Returns a copy
    without them (annotations and definitions stay), or `schema` itself for other drafts."""
    if not isinstance(schema, dict) or not isinstance(schema.get("$schema"), str) or \
            not _LEGACY_DRAFT.search(schema["$schema"]):
        return schema
    schema = copy.deepcopy(schema)
    for node, _ in walk(schema):  # (a node's children are listed after it is changed: dropped ones are skipped)
        if isinstance(node.get("$ref"), str):
            for key in [k for k in node if k != "$ref" and k not in _ANNOTATIONS and k not in _DEFS]:
                del node[key]
    return schema


def check_keywords(schema: Any) -> None:
    """Raise ConstraintError naming the first keyword that llguidance would silently ignore."""
    for node, path in walk(schema):
        for key in node:
            if key in SILENTLY_IGNORED:
                raise ConstraintError(f'json_schema: keyword "{key}" at {path} ({SILENTLY_IGNORED[key]}) '
                                      "is not supported")


def check_min_properties(schema: Any) -> None:
    """Raise ConstraintError for a `minProperties` that needs two or more distinct keys beyond the
    required ones while other keys stay open: llguidance would count a repeated key twice."""
    for node, path in walk(schema):
        minimum = node.get("minProperties")
        if not isinstance(minimum, int) or isinstance(minimum, bool):
            continue
        required = node.get("required") if isinstance(node.get("required"), list) else []
        closed = node.get("additionalProperties") is False and not node.get("patternProperties")
        if not closed and minimum - len(set(required)) >= 2:
            raise ConstraintError(f'json_schema: keyword "minProperties" at {path} ({minimum} with '
                                  f"{len(set(required))} required) is not supported: keys of additional "
                                  "properties are not kept unique, so the count cannot be enforced")


# llguidance turns numeric bounds into a regex through doubles and 64-bit integers: a bound is exact only
# where it is a double, and no range regex is built past about 9.2e18 (it fails, or for integers near
# -2**63 overflows). Bounds past EXACT_BOUND_LIMIT are tightened to it (a subset: only numbers of more than 19
# digits are lost) or, where that would widen the range (a minimum above it), refused.
EXACT_BOUND_LIMIT = 2**63 - 1024  # the largest double below 2**63
_SAFE_INTEGER = 2**53


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integers_only(node: dict) -> bool:
    t = node.get("type")
    types = [t] if isinstance(t, str) else t if isinstance(t, list) else None
    return types is not None and "integer" in types and "number" not in types


def _needs_exact(v: Any) -> bool:
    """Would llguidance read bound `v` other than exactly (or fail on it)?"""
    if abs(v) > EXACT_BOUND_LIMIT:
        return True
    return isinstance(v, int) and abs(v) > _SAFE_INTEGER and int(float(v)) != v


def _needs_care(node: dict, side: str) -> bool:
    """Would llguidance read `node`'s "maximum" / "exclusiveMaximum" (side "Maximum"; or the minimum ones)
    other than exactly? Exclusive bounds on integers are shifted by one in doubles, wrong from 2**53 on."""
    inclusive, exclusive = node.get(side.lower()), node.get("exclusive" + side)
    strict = exclusive if _is_number(exclusive) else inclusive if exclusive is True else None
    return any(_is_number(v) and _needs_exact(v) for v in (inclusive, exclusive)) or \
        (_is_number(strict) and _integers_only(node) and abs(strict) >= _SAFE_INTEGER // 2)


def _down(v: int | float) -> int | float:
    """The largest double <= v (as an int where v is one)."""
    d = float(v)
    if d > v:
        d = math.nextafter(d, -math.inf)
    return int(d) if isinstance(v, int) else d


def exact_bounds(schema: Any) -> Any:
    """A copy of `schema` whose numeric bounds llguidance enforces as written, or tightened inward:

    * on integer-only nodes exclusive bounds become inclusive ones (`exclusiveMaximum: e` -> `maximum:
      ceil(e) - 1`: llguidance subtracted one in doubles, so `exclusiveMaximum: 10**18` let 10**18 through);
    * an integer bound past 2**53 that is no double is rounded inward to the nearest double (an integer);
    * bounds past +-EXACT_BOUND_LIMIT are tightened to it; a minimum above it (or a maximum below minus it)
      has no exact form and is refused with ConstraintError.

    Only the bounds that need it change (`_needs_care`); `schema` itself is returned when none does. Draft 4's
    boolean `exclusiveMaximum` is resolved first where its bound changes."""
    if not any(_needs_care(node, side) for node, _ in walk_reached(schema) for side in ("Maximum", "Minimum")):
        return schema
    schema = copy.deepcopy(schema)
    for node, path in list(walk_reached(schema)):
        for side, sign in (("Maximum", 1), ("Minimum", -1)):
            if not _needs_care(node, side):
                continue
            inclusive, exclusive = node.get(side.lower()), node.get("exclusive" + side)
            if isinstance(exclusive, bool):  # draft 4: the flag makes the bound strict
                exclusive, inclusive = (inclusive if exclusive else None), (None if exclusive else inclusive)
            elif not _is_number(exclusive):
                exclusive = None
            if not _is_number(inclusive):
                inclusive = None
            # in "maximum" terms (sign -1 mirrors a minimum): the tightest of the two
            hi_inc = None if inclusive is None else sign * inclusive
            hi_exc = None if exclusive is None else sign * exclusive
            if _integers_only(node) and hi_exc is not None:
                as_inc = math.ceil(hi_exc) - 1
                hi_inc, hi_exc = (as_inc if hi_inc is None else min(hi_inc, as_inc)), None
            if hi_inc is not None and hi_exc is not None:
                if hi_inc < hi_exc:
                    hi_exc = None
                else:
                    hi_inc = None
            value = hi_inc if hi_inc is not None else hi_exc
            if value < -EXACT_BOUND_LIMIT:
                raise ConstraintError(f'json_schema: keyword "{side.lower()}" at {path}: a bound beyond '
                                      f"+-{EXACT_BOUND_LIMIT} that would exclude every number of up to 19 digits "
                                      "is not supported (the grammar's number ranges stop there)")
            if value > EXACT_BOUND_LIMIT:
                value, hi_exc = EXACT_BOUND_LIMIT, None  # inclusive: still inside the bound as written
            elif _needs_exact(value):
                rounded = _down(value)  # an upper bound (mirrored for a minimum): inward is down
                if rounded < value:
                    hi_exc = None  # below an exclusive bound: the rounded value itself is inside
                value = rounded
            node.pop(side.lower(), None)
            node.pop("exclusive" + side, None)
            if hi_exc is not None:
                node["exclusive" + side] = sign * value
            else:
                node[side.lower()] = sign * value
    return schema


def locate_keyword(schema: Any, keyword: str) -> str | None:
    """The path of the first subschema that uses `keyword`, or None."""
    return next((path for node, path in walk(schema) if keyword in node), None)


# ------------------------------------------------------------------------------------------ strict mode
def close_objects(schema: Any) -> Any:
    """A copy of `schema` in which every object schema that declares properties (or required names)
    and says nothing about other properties also forbids them (`"additionalProperties": false`).

    Never closes a schema that is merged with another (an allOf branch, a `$ref` target used beside
    other keywords, an anyOf option of an object schema): closing it would forbid the properties the
    other side declares. The merge point itself is closed instead, after declaring (as `{}`, appended
    in discovery order) every property its parts declare. Free-form objects (`{"type": "object"}`)
    stay open. Documents with references this function cannot resolve are returned unchanged.
    The result accepts a subset of what `schema` accepts."""
    if not isinstance(schema, dict):
        return schema
    schema = copy.deepcopy(schema)
    nodes = {path: node for node, path in walk(schema)}
    resolver = _Resolver(schema, nodes)
    merged: set[str] = set()
    standalone: set[str] = set()
    todo = [("#", False)]
    seen: set[tuple[str, bool]] = set()
    while todo:  # graph search over (path, is_merged) states; refs may point anywhere (cycles too)
        path, is_merged = todo.pop()
        if (path, is_merged) in seen:
            continue
        seen.add((path, is_merged))
        node = nodes.get(path)
        if not isinstance(node, dict):
            continue
        (merged if is_merged else standalone).add(path)
        merges_options = is_merged or bool(_OBJECT_MERGING & node.keys())
        for relation, child, child_path in subschemas(node, path):
            if relation == "value":
                todo.append((child_path, is_merged))  # a merged node's property values merge too
            elif relation == "all":
                todo.append((child_path, True))
            elif relation == "any":
                todo.append((child_path, merges_options))
        if "$ref" in node:
            target = resolver.resolve(node["$ref"])
            if target is None:
                return schema  # unmodified so far: the search only reads
            todo.append((target, is_merged or not _is_plain_ref(node)))
    for path in standalone - merged:
        node = nodes[path]
        if _is_plain_ref(node) or not _OBJECT_MERGING & node.keys():
            continue  # a plain reference's target, a plain anyOf's options are closed on their own
        names = _declared_names(node, resolver)
        if names is None or not names:
            continue
        props = node.setdefault("properties", {})
        if isinstance(props, dict):
            for name in names:
                props.setdefault(name, {})
            node["additionalProperties"] = False
    return schema


def _is_plain_ref(node: dict) -> bool:
    return "$ref" in node and not (node.keys() - _ANNOTATIONS - {"$ref"})


def _declared_names(node: dict, resolver: "_Resolver") -> list[str] | None:
    """Property names declared by `node` and everything merged into it, in discovery order; None when
    some part already says what other properties may be (the author decided: leave it alone)."""
    names: dict[str, None] = {}
    stack, seen = [node], set()
    while stack:
        part = stack.pop(0)
        if not isinstance(part, dict) or id(part) in seen:
            continue
        seen.add(id(part))
        if any(k in part for k in _OPENING):
            return None
        if isinstance(part.get("properties"), dict):
            names.update(dict.fromkeys(part["properties"]))
        if isinstance(part.get("required"), list):
            names.update(dict.fromkeys(n for n in part["required"] if isinstance(n, str)))
        stack.extend(part.get("allOf") or [])
        # The options of a merged part merge too; `node` itself has object keywords (it declares
        # names), so its options merge with it as well (see `merges_options` in close_objects).
        stack.extend((part.get("anyOf") or []) + (part.get("oneOf") or []))
        if "$ref" in part:  # `node` is never a plain reference here
            stack.append(resolver.nodes.get(resolver.resolve(part["$ref"]) or ""))
    return list(names)


class _Resolver:
    """Local JSON-pointer references (`#`, `#/definitions/x`); anything else is unresolvable."""

    def __init__(self, root: dict, nodes: dict[str, dict]):
        self.root, self.nodes = root, nodes

    def resolve(self, ref: Any) -> str | None:
        if not isinstance(ref, str) or not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
            return None
        tokens = [urllib.parse.unquote(t).replace("~1", "/").replace("~0", "~") for t in ref[2:].split("/")] \
            if len(ref) > 1 else []
        path = "#" + "".join("/" + _escape(t) for t in tokens)
        return path if path in self.nodes else None


# llguidance reads a schema with serde_json, which refuses JSON nested more than 128 deep ("recursion limit
# exceeded"); exact rewrites of deep values (`not` of a nested `const`, ...) can pass that.
DEPTH_LIMIT = 120
_CHUNK = 48


def _height(value: Any) -> int:
    """How deeply `value` nests as JSON (a scalar: 0, `{}`: 1)."""
    if isinstance(value, dict):
        return 1 + max((_height(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_height(v) for v in value), default=0)
    return 0


def shallow(schema: Any) -> Any:
    """`schema`, or when it nests past DEPTH_LIMIT, a copy in which deep subschemas are moved into the
    root's `$defs` and referenced (`{"$ref": "#/$defs/..."}` accepts what the node accepts), so that no
    part nests more than about _CHUNK levels. Left as it is where moving could change a meaning: a
    nested `$id` (a base URI for relative refs) or a `$ref` pointing into a node that would move."""
    if not isinstance(schema, dict) or _height(schema) <= DEPTH_LIMIT:
        return schema
    nodes = list(walk(schema))
    if any(isinstance(node.get(k), str) for node, _ in nodes[1:] for k in ("$id", "id")):
        return schema
    targets = {node["$ref"] for node, _ in nodes if isinstance(node.get("$ref"), str)}
    schema = copy.deepcopy(schema)
    defs = schema.setdefault("$defs", {}) if isinstance(schema.get("$defs", {}), dict) else None
    if defs is None:
        return schema
    counter = [0]

    def movable(path: str) -> bool:
        return not any(t == path or t.startswith(path + "/") for t in targets)

    def visit(node: dict, path: str) -> None:  # children first, then the tallest moved until `node` is short
        children = [(child, p) for _, child, p in subschemas(node, path) if isinstance(child, dict)]
        for child, p in children:
            visit(child, p)
        height = _height(node)
        for child, p in sorted(children, key=lambda c: -_height(c[0])):
            if height <= _CHUNK:
                break
            if not movable(p) or _height(child) < 2:
                continue
            name = f"__llmqp_deep{counter[0]}"
            counter[0] += 1
            defs[name] = dict(child)
            child.clear()
            child["$ref"] = f"#/$defs/{name}"
            height = _height(node)

    visit(schema, "#")  # (definitions too: `subschemas` lists them)
    return schema
