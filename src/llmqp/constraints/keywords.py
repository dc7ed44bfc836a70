"""Exact rewrites of the JSON-Schema keywords llguidance lacks into keywords it has.

llguidance compiles a JSON schema to a grammar but has no `not`, `if`/`then`/`else`, `dependencies` /
`dependentRequired` / `dependentSchemas`, and no `oneOf` whose options it cannot prove disjoint. Each of
these is a boolean combination of schemas, and the negation of most single keywords is again a schema
llguidance knows (`not {"minLength": 3}` is `{"type": "string", "maxLength": 2}`; `not {"required":
["a"]}` is `{"type": "object", "properties": {"a": false}}`; a string outside a finite set is a regex
built from the set's trie). So `rewrite()` turns every such keyword into `allOf` / `anyOf` of plain
schemas with *the same set of valid instances*:

    not S                    -> allOf: [negate(S)]
    if I then T else E       -> allOf: [anyOf: [negate(I), T], anyOf: [I, E]]
    dependentRequired a: [b] -> allOf: [anyOf: [{properties: {a: false}}, {required: [a, b]}]]
    dependentSchemas a: S    -> allOf: [anyOf: [{properties: {a: false}}, allOf: [{required: [a]}, S]]]
    oneOf [A, B, C]          -> anyOf: [allOf: [A, negate(B), negate(C)], allOf: [negate(A), B, negate(C)], ...]

Three more exact forms widen what can be negated or compiled:

  * a node whose instances are a small finite set (an `enum`/`const` of its own or of an `allOf` part,
    bounded integers, `anyOf`/`oneOf` of such nodes) and that needs a rewrite becomes the `enum` of the
    values `jsonschema` accepts against the node as written (`_Rewriter._fold_finite`): any keyword
    beside it, `not` of "integer" or `multipleOf` included, is then decided value by value;
  * patterns go through finite automata (`llmqp.constraints.regular`): the complement of any regular
    pattern, and look-aheads right after a leading `^` (or trailing), become plain regexes;
  * `min/maxProperties` beside optional properties become choices of which of them are present.

The grammar then enforces them exactly, token by token (valid by construction). A negation this module
cannot express exactly (`not` of a `format`, of `multipleOf` or "integer" over unbounded numbers, of
`contains`/open `additionalProperties` -- "some key" has no schema form -- a recursive `$ref`, ...)
raises `ConstraintError` naming the keyword and its place; nothing is approximated. `not items: S`
becomes `contains: {not: S}` ("some item fails S"), left with every `contains` (whose subschemas are not
rewritten: `jsonschema` decides them) to the token-level layer (`llmqp.constraints.contains`). `oneOf` options are only rewritten when `rewrite(..., one_of=True)` is asked for (the
backend asks after llguidance failed to prove them disjoint), so schemas that compiled before keep
their grammar. `uniqueItems: false` (no constraint) is dropped, and so is a `format` on a schema that
admits no strings (formats constrain strings only); `uniqueItems: true` is left for the token-level
layer (`llmqp.constraints.unique`).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import re
from typing import Any

import llguidance

from llmqp.constraints import contains, formats, regular
from llmqp.constraints.base import UnknownFormats
from llmqp.constraints.schema import MISSING, _escape, walk_pointer
from llmqp.errors import ConstraintError

TYPES = ("null", "boolean", "object", "array", "number", "string")  # "integer" is a part of "number"
_MAX_CHOICES = 64  # min/maxProperties of a closed object: at most this many choices of present properties
MAX_REWRITTEN_CHARS = 400_000  # a rewrite that grows the schema past this is refused (llguidance would choke)

_ANNOTATIONS = {"$schema", "$id", "id", "$anchor", "$comment", "$defs", "definitions", "title",
                "description", "default", "examples", "example", "readOnly", "writeOnly", "deprecated",
                "$vocabulary", "contentMediaType", "contentEncoding", "discriminator"}
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keywords that constrain instances (any other keyword is an annotation: its negation is `false`).
_VALIDATION = {"type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
               "maxLength", "minLength", "pattern", "items", "additionalItems", "prefixItems", "maxItems", "minItems",
               "uniqueItems", "contains", "maxContains", "minContains", "maxProperties", "minProperties", "required",
               "properties", "patternProperties", "additionalProperties", "dependencies", "dependentRequired",
               "dependentSchemas", "propertyNames", "if", "then", "else", "allOf", "anyOf", "oneOf", "not", "$ref",
               "$dynamicRef", "$recursiveRef", "format", "unevaluatedItems", "unevaluatedProperties",
               "contentSchema", "divisibleBy", "disallow", "extends"}
_KEY_TYPE = {**dict.fromkeys(("items", "additionalItems", "prefixItems", "minItems", "maxItems", "uniqueItems",
                              "contains", "minContains", "maxContains", "unevaluatedItems"), "array"),
             **dict.fromkeys(("pattern", "minLength", "maxLength", "format"), "string"),
             **dict.fromkeys(("multipleOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"), "number"),
             **dict.fromkeys(("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
                              "minProperties", "maxProperties", "dependencies", "dependentRequired",
                              "dependentSchemas", "unevaluatedProperties"), "object")}
_ONE = ("additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then",
        "else", "unevaluatedItems", "unevaluatedProperties")
_MAP = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")


class _Unsupported(Exception):
    """A negation (or rewrite) that has no exact equivalent here: `keyword` is what cannot be negated."""

    def __init__(self, keyword: str, why: str):
        super().__init__(why)
        self.keyword, self.why = keyword, why


def rewrite(schema: Any, *, one_of: bool = False, unknown_formats: UnknownFormats = UnknownFormats.REFUSE,
            some_item: bool = True) -> Any:
    """A copy of `schema` without `not`, `if`/`then`/`else`, `dependencies`, `dependentRequired`,
    `dependentSchemas`, `uniqueItems: false`, the `format`s llguidance lacks (`formats.PATTERNS` become
    `pattern`s; with `unknown_formats=ANNOTATION` non-standard ones are dropped) and, with
    `one_of=True`, without `oneOf`, accepting exactly the same instances. Raises ConstraintError when a
    keyword has no exact rewrite (or names a format outside the enforced set). With `some_item`, a
    negated `items` may become `contains`, negated member keywords `contains.SOME_MEMBER`, and a
    number- or string-only node with a keyword that has no exact form `contains.SCALAR` (which only the
    token-level layer enforces, where the value's place is known); without it, they are refused."""
    if not isinstance(schema, dict):
        return schema
    root = copy.deepcopy(schema)
    rewriter = _Rewriter(root, one_of, UnknownFormats(unknown_formats))
    rewriter.some_item = some_item
    try:
        out = rewriter.node(root, "#")
        # $ref targets the walk does not reach as schemas (`#/definitions/group/x`: `group` is no keyword)
        done: set = set()
        while todo := [r for r in _local_refs(out) if r not in done]:
            for ref in todo:
                done.add(ref)
                target = walk_pointer(out, ref)
                if isinstance(target, dict) and id(target) not in rewriter.visited:
                    rewriter.node(target, ref)
    except _Unsupported as e:
        raise ConstraintError(f'json_schema: keyword "{e.keyword}" at {rewriter.where} is not supported: '
                              f"{e.why}") from None
    _inline_false_refs(out)
    if rewriter.changed and len(json.dumps(out)) > MAX_REWRITTEN_CHARS:
        raise ConstraintError(f'json_schema: keyword "{rewriter.first_keyword}" at {rewriter.first_where} is '
                              "not supported here: its exact rewrite is too large")
    return out


def _inline_false_refs(schema: Any) -> None:
    """Replace, in place, each local `$ref` to a schema the rewrite made unsatisfiable (`false`, or an
    `allOf` holding `false`) by `allOf: [false]`: llguidance refuses a reference to an unsatisfiable
    definition even where it is optional (a property that may be absent), but takes `false` there."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                target = walk_pointer(schema, ref)
                if target is False or (isinstance(target, dict) and isinstance(target.get("allOf"), list)
                                       and any(x is False for x in target["allOf"])):
                    del node["$ref"]
                    node["allOf"] = [*node.get("allOf", []), False]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _local_refs(schema: Any) -> list[str]:
    refs, stack = [], [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
                refs.append(node["$ref"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return list(dict.fromkeys(refs))


def needs_rewrite(schema: Any, *, one_of: bool = False) -> bool:
    keys = {"not", "if", "then", "else", "dependencies", "dependentRequired", "dependentSchemas", "propertyNames",
            "minProperties", "maxProperties"}
    if one_of:
        keys.add("oneOf")
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if keys & node.keys() or node.get("uniqueItems") is False or \
                    regular.needs_rewrite(node.get("pattern")) or \
                    (isinstance(node.get("patternProperties"), dict) and
                     any(regular.needs_rewrite(k) for k in node["patternProperties"])) or \
                    ("format" in node and (_formats_cannot_apply(node) or (isinstance(node["format"], str)
                                            and node["format"] not in _NATIVE_AS_IS))):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


_NATIVE_AS_IS = formats.NATIVE - formats.EXTRA_KEYWORDS.keys()  # formats handed to llguidance unchanged


class _Rewriter:
    def __init__(self, root: dict, one_of: bool, unknown_formats: UnknownFormats = UnknownFormats.REFUSE):
        self.root, self.one_of, self.unknown_formats = root, one_of, unknown_formats
        # The schema as given, and each of its nodes' copy by the id of the node (nodes are rewritten in
        # place): finite nodes are checked against their original form.
        self._originals: dict = {}
        self.original = copy.deepcopy(root, self._originals)
        self._validator = None
        self.visited: set[int] = set()  # ids of the nodes walked
        self.busy: set[int] = set()  # ids of the nodes being rewritten (in place: their content is in flux)
        self.where = "#"
        self.changed = False
        self.first_keyword = self.first_where = None
        self.some_item = True  # a negated `items` may become `contains` (negated member keywords SOME_MEMBER)
        self.sizes_bounded = False  # negating inside an object whose size is bounded
        self.scalars = 0  # numbers written for the layer to check (contains.SCALAR)

    # ------------------------------------------------------------------------------ the tree walk
    def node(self, node: Any, path: str) -> Any:
        if not isinstance(node, dict):
            return node
        # A schema of numbers only (or strings only), as the user wrote it, with a keyword that has no
        # exact form here (or whose rewrite needs the layer's number check somewhere inside): the grammar
        # generates any number (string), and the token-level layer checks each one whole against the
        # schema (`llmqp.constraints.contains.SCALAR`) where its place is known.
        before = self.scalars
        try:
            out = self._node(node, path)
        except _Unsupported as e:
            if e.why.startswith("unknown format") or not self._wrap_number(node):
                raise
            self._at(e.keyword, path)
            return node
        if self.scalars > before:
            self._wrap_number(node)
        return out

    def _wrap_number(self, node: dict) -> bool:
        """Make `node` (a node of the schema as given, admitting numbers only, or strings only) a number
        (string) the layer checks against its original form. False (node unchanged) where it is not such
        a node."""
        original = self._originals.get(id(node))
        types = _possible_types(original, self.plain) if isinstance(original, dict) else None
        if not self.some_item or not types or not (types <= {"number", "integer"} or types == {"string"}):
            return False
        node.clear()
        if types == {"string"}:
            node.update({"type": "string", contains.SCALAR: original})
            node.update({k: original[k] for k in ("minLength", "maxLength")
                         if isinstance(original.get(k), int) and not isinstance(original[k], bool)})
            # and its pattern without look-around (only wider), so that the grammar keeps to its shape
            wider = regular.without_assertions(original.get("pattern"))
            if wider is not None and regular.needs_rewrite(wider):
                wider = regular.without_lookaround(wider)
            if wider is not None and not regular.has_backreference(wider):
                node["pattern"] = wider
        else:
            node.update({"type": "number" if "number" in types else "integer", contains.SCALAR: original})
            # its own bounds too, so that the grammar does not start numbers the layer could never end
            node.update({k: original[k] for k in _BOUND_KEYS if k in original and
                         (_is_number(original[k]) or isinstance(original[k], bool))})
        self.scalars += 1
        return True

    def _node(self, node: dict, path: str) -> Any:
        self.visited.add(id(node))
        self.busy.add(id(node))
        try:
            return self._walk(node, path)
        finally:
            self.busy.discard(id(node))

    def _walk(self, node: dict, path: str) -> Any:
        if self._fold_finite(node, path):
            return node if node["enum"] else False
        for key in list(node):
            value = node[key]
            here = f"{path}/{_escape(key)}"
            if key == "not" or (key == "oneOf" and self.one_of):
                continue  # negated as written (not of not is the schema itself); rewritten after, in `own`
            if key == "contains":
                continue  # decided by jsonschema on each item (llmqp.constraints.contains), never by the grammar
            if key in _ONE or (key == "items" and isinstance(value, (dict, bool))):
                node[key] = self.node(value, here)
            elif key in _MAP and isinstance(value, dict):
                node[key] = {k: self.node(v, f"{here}/{_escape(k)}") for k, v in value.items()}
            elif (key in _LIST or key == "items") and isinstance(value, list):
                node[key] = [self.node(v, f"{here}/{i}") for i, v in enumerate(value)]
            elif key == "dependencies" and isinstance(value, dict):
                node[key] = {k: self.node(v, f"{here}/{_escape(k)}") for k, v in value.items()}
        return self.own(node, path)

    def own(self, node: dict, path: str) -> dict:
        """Rewrite the keywords of `node` itself (its subschemas are already rewritten, except `not` and
        rewritten `oneOf` options: they are negated as written, and the results rewritten in turn)."""
        if node.get("uniqueItems") is False:
            del node["uniqueItems"]
        extra: list = []
        if "format" in node:
            self._format(node, path, extra)
        if "propertyNames" in node:
            self._property_names(node, path)
        if regular.needs_rewrite(node.get("pattern")):
            parts = _split_lookahead(node["pattern"]) if node["pattern"].startswith(_LOOKAHEAD) else None
            if parts is not None:  # ^(?!X)Y: ^Y, and not ^X (each alternative of X)
                node["pattern"], excluded = parts
                extra.extend({"pattern": p} for p in excluded)
                if node["pattern"] == "^":
                    del node["pattern"]
            elif (plain := regular.without_lookaround(node["pattern"])) is not None:
                node["pattern"] = plain
            if self.some_item and regular.needs_rewrite(node.get("pattern")) and \
                    regular.without_lookaround(node["pattern"]) is None:
                # a string the layer checks whole (see node()); else llguidance refuses the look-around
                raise _Unsupported("pattern", f"the look-around of /{node['pattern'][:60]}/ has no regular form here")
        if self.some_item and regular.has_backreference(node.get("pattern")):
            # a string the layer checks whole (see node()); llguidance has no back-references
            self._at("pattern", path)
            raise _Unsupported("pattern", f"the back-reference of /{node['pattern'][:60]}/ has no regular form")
        if isinstance(node.get("patternProperties"), dict) and \
                any(regular.needs_rewrite(k) for k in node["patternProperties"]):
            renamed = {k: (regular.without_lookaround(k) or k) if regular.needs_rewrite(k) else k
                       for k in node["patternProperties"]}
            if len(set(renamed.values())) == len(renamed):  # else left to llguidance, which refuses it
                node["patternProperties"] = {renamed[k]: v for k, v in node["patternProperties"].items()}
        types = _types_of(node)
        if node.get("additionalProperties") is False and node.get("patternProperties") and \
                ("minProperties" in node or "maxProperties" in node or "not" in node) and _expand_finite_patterns(node):
            self._at("patternProperties", path)
        closed = _closed_keys(node)
        bounded = "maxProperties" in node  # (counting below removes it)
        if closed is not None and ("minProperties" in node or "maxProperties" in node):
            self._count_properties(node, closed, extra)
        elif ("minProperties" in node or "maxProperties" in node) and isinstance(node.get("properties"), dict):
            self._count_open_properties(node, extra)
        if "not" in node:
            self._at("not", f"{path}/not")
            extra.append(self.node(self._negate_sized(bounded, node.pop("not"), types, keys=closed), f"{path}/not"))
        if "if" in node:
            self._at("if", f"{path}/if")
            cond, then, other = node.pop("if"), node.pop("then", True), node.pop("else", True)
            if then is not True:
                extra.append({"anyOf": [self._negate_sized(bounded, cond, types), then]})
            if other is not True:
                extra.append({"anyOf": [cond, other]})
        else:
            node.pop("then", None)  # without `if`, `then` and `else` have no effect
            node.pop("else", None)
        for key in ("dependencies", "dependentRequired", "dependentSchemas"):
            if isinstance(node.get(key), dict):
                self._at(key, f"{path}/{key}")
                for name, dep in node.pop(key).items():
                    absent = {"properties": {name: False}}
                    if isinstance(dep, list):
                        extra.append({"anyOf": [absent, {"required": [name, *dep]}]})
                    else:
                        extra.append({"anyOf": [absent, {"allOf": [{"required": [name]}, dep]}]})
        split = None
        required = frozenset(n for n in node.get("required", []) if isinstance(n, str)) \
            if isinstance(node.get("required"), list) else frozenset()
        if self.one_of and isinstance(node.get("oneOf"), list) and \
                not _provably_disjoint(node["oneOf"], self.plain, _possible_types(node, self.plain), required):
            split = _split_objects(node["oneOf"], self.plain)
        if split is not None:
            self._at("oneOf", f"{path}/oneOf")
            node.pop("oneOf")
            extra.append(self.node(split, f"{path}/oneOf"))
        elif self.one_of and isinstance(node.get("oneOf"), list) and \
                not _provably_disjoint(node["oneOf"], self.plain, _possible_types(node, self.plain), required):
            self._at("oneOf", f"{path}/oneOf")
            options = node.pop("oneOf")
            context = _possible_types(node, self.plain)
            try:
                exactly_one = self._exactly_one(options, context, closed, types, required)
            except _Unsupported:
                # Options that overlap in one JSON type only (say null, where no keyword applies) may
                # still be told apart type by type: "exactly one" within each type the node admits.
                exactly_one = _any([self._exactly_one(options, kind, closed, kind, required, typed=True)
                                    for kind in _kinds(context)], None)
            extra.append(self.node(exactly_one, f"{path}/oneOf"))
        elif self.one_of and isinstance(node.get("oneOf"), list):  # disjoint options: oneOf is anyOf
            extra.append({"anyOf": [self.node(o, f"{path}/oneOf/{i}") for i, o in enumerate(node.pop("oneOf"))]})
        if extra:
            node["allOf"] = [*node.get("allOf", []), *extra]
        return node

    def _exactly_one(self, options: list, context: frozenset | None, closed: list | None, types: frozenset | None,
                     required: frozenset = frozenset(), typed: bool = False) -> Any:
        """anyOf over the options of (the option, the negation of each other option that may overlap it),
        among instances of the JSON types `context` (`typed`: each branch also says `type`)."""
        branches = []
        for i, option in enumerate(options):
            own_types = _possible_types(option, self.plain)
            if context is not None and own_types is not None and not _overlap(own_types, context):
                continue  # no instance of the node matches this option
            # An option provably disjoint from this one (among the node's instances) fails wherever this
            # one holds: only the others need negating.
            rivals = [other for j, other in enumerate(options)
                      if j != i and not _disjoint(option, other, self.plain, context=context, required=required)]
            # Among the instances of `option` (and of `node`), only their keys can be "other keys".
            keys = _closed_keys(self.plain(option)) or closed
            option_types = _types_of(self.plain(option)) if isinstance(self.plain(option), dict) else None
            if option_types is not None and types is not None:
                option_types &= types
            plain = self.plain(option) if isinstance(self.plain(option), dict) else {}
            # The option first: llguidance orders an object's properties by the order of the merged parts,
            # and the generated order should be the option's own.
            parts = ([{"type": sorted(context)[0]}] if typed else []) + [option]
            branches.append(_all(parts + [self.negate(other, option_types or types, keys=keys,
                                                      props=plain.get("properties"), items=plain.get("items"),
                                                      context=plain or None)
                                          for other in rivals]))
        return _any(branches, None)

    def _fold_finite(self, node: dict, path: str) -> bool:
        """A node whose instances are a finite set of values (an `enum`/`const` of its own, of an
        `allOf` part or `$ref` target, or of every `anyOf`/`oneOf` option; `type` null or boolean)
        and that uses a keyword needing a rewrite, becomes `{"enum": [the values it accepts]}`: each
        value is checked against the node as given with `jsonschema` (references resolved in the
        whole document). Exact by construction; skipped (False) where a `format` could be involved
        (`jsonschema` checks formats only with optional libraries), where a `$ref` from outside the
        node points inside it, or when the values are more than FINITE_MAX."""
        original = self._originals.get(id(node))
        if original is None:
            return False  # a node the rewrite made (its keywords may belong to another draft)
        values = _finite_values(node, self.plain)
        if values is None or not needs_rewrite(original, one_of=True):
            return False
        text = json.dumps(original)
        if '"format"' in text or ('"$ref"' in text and '"format"' in json.dumps(self.original)):
            return False
        inside = path + "/"
        if {r for r in _local_refs(self.original) if r.startswith(inside)} != \
                {r for r in _local_refs(original) if r.startswith(inside)}:
            return False  # refs from elsewhere point into the node (those from inside it go with it)
        checker = self._checker(original)
        if checker is None:  # without jsonschema the node is rewritten keyword by keyword, or refused
            return False
        try:
            kept = [v for v in values if checker.is_valid(v)]
        except Exception:  # noqa: BLE001 - a schema jsonschema cannot evaluate: take the keyword-by-keyword path
            return False
        self._at("enum", path)
        node.clear()
        node["enum"] = kept
        return True

    def _count_properties(self, node: dict, names: list, extra: list) -> None:
        """min/maxProperties of a closed object, as choices of which optional properties are present
        (llguidance counts only where every listed property is required). Left in place when the
        choices would be too many (then llguidance decides)."""
        required = {n for n in node.get("required", []) if isinstance(n, str)}
        if not required <= set(names):
            return
        optional = [n for n in names if n not in required]
        low = node.get("minProperties", 0)
        high = node.get("maxProperties", len(names))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            return
        need, allow = low - len(required), high - len(required)
        parts = []
        if need > 0:
            if need > len(optional) or math.comb(len(optional), need) > _MAX_CHOICES:
                return
            parts.append({"anyOf": [{"required": list(c)} for c in itertools.combinations(optional, need)]})
        if allow < len(optional):
            absent = len(optional) - max(allow, 0)
            if allow < 0 or math.comb(len(optional), absent) > _MAX_CHOICES:
                return
            parts.append({"anyOf": [{"properties": dict.fromkeys(c, False)}
                                    for c in itertools.combinations(optional, absent)]})
        node.pop("minProperties", None)
        node.pop("maxProperties", None)
        extra.extend(parts)

    def _count_open_properties(self, node: dict, extra: list) -> None:
        """min/maxProperties of an object whose other keys stay open, beside optional declared
        properties (llguidance counts only where every declared property is required): one choice per
        set T of optional properties present, each listing the others as absent (`false`), so that
        llguidance counts exactly. With `maxProperties`, T runs over the sets of at most the allowed
        count; otherwise T is "at least these" of size `need` -- plus exact sets of size `need - 1`
        completed by one more key beside them (one key needs no uniqueness). Left in place (llguidance
        or `check_min_properties` refuses) when `need - 2` or fewer optional properties would call for
        two or more other keys, whose uniqueness the grammar does not keep, or past _MAX_CHOICES."""
        names = [n for n in node["properties"] if node["properties"][n] is not False]
        required = [n for n in dict.fromkeys(node.get("required", [])) if isinstance(n, str)]
        optional = [n for n in names if n not in required]
        low, high = node.get("minProperties"), node.get("maxProperties")
        if not optional or not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (low, high)):
            return
        need = (low or 0) - len(required)
        allow = None if high is None else high - len(required)
        choices: list = []
        if allow is not None:
            if allow < 0:
                return
            for size in range(min(allow, len(optional)) + 1):
                if need - size >= 2:
                    return  # two or more other keys would be needed
                for present in itertools.combinations(optional, size):
                    branch = {"required": required + list(present),
                              "properties": {n: False for n in optional if n not in present},
                              "maxProperties": high}
                    if need - size == 1:
                        branch["minProperties"] = low
                    choices.append(branch)
                    if len(choices) > _MAX_CHOICES:
                        return
        elif need <= 0:
            node.pop("minProperties", None)
            return
        else:
            if need >= 2:
                return  # no optional property present: two or more other keys would be needed
            choices = [{"required": [n]} for n in optional]  # need == 1: one optional one, or another key
            choices.append({"required": required, "properties": dict.fromkeys(optional, False), "minProperties": low})
        node.pop("minProperties", None)
        node.pop("maxProperties", None)
        extra.append({"anyOf": choices})

    def _property_names(self, node: dict, path: str) -> None:
        """`propertyNames` of an object whose only other property keyword is `additionalProperties`:
        names from an enum become `properties`, a `pattern` (or a length range) becomes the one
        `patternProperties` regex (both unanchored searches), and other keys are closed."""
        names = self.plain(node["propertyNames"])
        if names is True or names == {}:
            del node["propertyNames"]
            return
        self.where = f"{path}/propertyNames"
        enum = [names["const"]] if isinstance(names, dict) and "const" in names else \
            names.get("enum") if isinstance(names, dict) else None
        if isinstance(enum, list) and isinstance(node.get("properties"), dict) and \
                not node.get("patternProperties") and names.get("type", "string") == "string" and \
                not (set(names) - _ANNOTATIONS - {"enum", "const", "type"}):
            # Only the listed names: each keeps its own schema (declared, or additionalProperties'),
            # declared names outside the list become `false`, and other keys are closed.
            allowed = [v for v in dict.fromkeys(enum) if isinstance(v, str) and
                       ("const" not in names or "enum" not in names or any(_eq(v, w) for w in names["enum"]))]
            value = node.get("additionalProperties", True)
            props = node["properties"]
            node["properties"] = {**{k: (v if k in allowed else False) for k, v in props.items()},
                                  **{k: value for k in allowed if k not in props}}
            node["additionalProperties"] = False
            del node["propertyNames"]
            return
        if node.get("properties") or node.get("patternProperties") or not isinstance(names, dict):
            raise _Unsupported("propertyNames", "only beside additionalProperties (no properties or "
                                                "patternProperties) is it rewritten exactly")
        keys = set(names) - _ANNOTATIONS
        value = node.get("additionalProperties", True)
        if names.get("type", "string") != "string" or not keys <= {"type", "enum", "const", "pattern", "minLength",
                                                                     "maxLength"}:
            raise _Unsupported("propertyNames", "only names given by type string, enum/const, pattern or a "
                                                "length range are rewritten")
        if "enum" in keys or "const" in keys:
            values = [names["const"]] if "const" in names else names["enum"]
            if not isinstance(values, list) or keys & {"pattern", "minLength", "maxLength"}:
                raise _Unsupported("propertyNames", "an enum beside other name keywords")
            node["properties"] = {v: value for v in dict.fromkeys(values) if isinstance(v, str)}
        elif "pattern" in keys:
            if keys & {"minLength", "maxLength"}:
                raise _Unsupported("propertyNames", "a pattern beside a length range")
            node["patternProperties"] = {names["pattern"]: value}
        else:
            low, high = names.get("minLength", 0), names.get("maxLength", "")
            node["patternProperties"] = {f"^[\\s\\S]{{{low},{high}}}$": value}
        node["additionalProperties"] = False
        del node["propertyNames"]

    def _format(self, node: dict, path: str, extra: list) -> None:
        """Replace `format` by the keywords that enforce it (see `formats`), or refuse it."""
        name = node["format"]
        if isinstance(name, str) and name in formats.ALIASES:
            name = node["format"] = formats.canonical(name)
        if _formats_cannot_apply(node):
            del node["format"]
        elif isinstance(name, str) and name in formats.PATTERNS:
            del node["format"]
            if "pattern" in node:
                extra.append({"pattern": formats.pattern(name)})
            else:
                node["pattern"] = formats.pattern(name)
        elif isinstance(name, str) and name in formats.NATIVE:
            extra.extend([dict(formats.EXTRA_KEYWORDS[name])] if name in formats.EXTRA_KEYWORDS else [])
        elif self.unknown_formats is UnknownFormats.ANNOTATION and not formats.is_standard(name):
            del node["format"]  # an annotation, as JSON Schema 2019-09+ and jsonschema read it
        else:
            self.where = f"{path}/format"
            raise _Unsupported("format", _format_refusal(name))

    def _at(self, keyword: str, where: str) -> None:
        self.where = where
        self.changed = True
        if self.first_keyword is None:
            self.first_keyword, self.first_where = keyword, where

    # --------------------------------------------------------------------------------- negation
    def negate(self, schema: Any, types: frozenset | None, refs: tuple = (), keys: list | None = None,
               props: dict | None = None, items: Any = None, context: Any = None) -> Any:
        """A schema whose valid instances are exactly those `schema` rejects, among the instances of
        the surrounding schema: `types` are the JSON types it allows (None: all), `keys` the only
        property names its objects may have (None: any), `props` its property schemas (their types narrow
        the negation of a property's schema), `items` its arrays' item schema, `context` the surrounding
        schema itself (where its additional/pattern properties equal those of `schema`, only its declared
        keys can break them). Raises _Unsupported."""
        if schema is True or schema == {}:
            return False
        if schema is False:
            return True
        if not isinstance(schema, dict):
            raise _Unsupported("not", f"{schema!r} is not a schema")
        if any(m in schema for m in contains.MARKERS):
            raise _Unsupported("not", "negating a keyword only the token-level layer enforces")
        branches: list = []
        names, context_props = keys, props if isinstance(props, dict) else {}
        own_types = _possible_types(schema, self.plain)
        if types is not None and own_types is not None and not _overlap(types, own_types):
            return True  # every instance of the surrounding schema has another type than `schema` allows
        # A keyword about one type holds for every other type: among `types`, only theirs can fail.
        keys = {k for k in set(schema) - _ANNOTATIONS
                if types is None or k not in _KEY_TYPE or _overlap(types, {_KEY_TYPE[k]})}
        if "$ref" in keys:
            ref = schema["$ref"]
            if ref in refs:
                raise _Unsupported("$ref", f"negating the recursive reference {ref!r}")
            branches.append(self.negate(self.resolve(ref), types, refs + (ref,), names, props, items))
            keys.discard("$ref")
        if "type" in keys:
            try:
                branches.append(_negate_type(schema["type"], types))
            except _Unsupported:
                if not self.some_item:
                    raise
                # "a number with a fraction": numbers the layer checks whole (contains.SCALAR)
                branches.append(_negate_type(schema["type"], types, fraction={
                    "type": "number", contains.SCALAR: {"not": {"type": "integer"}}}))
                self.scalars += 1
            keys.discard("type")
        if "enum" in keys or "const" in keys:
            values = list(schema["enum"]) if "enum" in schema else []
            if "const" in schema:
                values = [schema["const"]] if "enum" not in schema else [v for v in values if _eq(v, schema["const"])]
            branches.append(_negate_values(values, types))
            keys -= {"enum", "const"}
        if "required" in keys:
            required = schema["required"]  # (not `names`: those are the surrounding objects' keys)
            branches.append({"anyOf": [{"type": "object", "properties": {n: False}} for n in dict.fromkeys(required)]}
                            if required else False)
            keys.discard("required")
        if "propertyNames" in keys and names is not None:
            rejected = self._names_rejected(schema["propertyNames"], names)
            if rejected is not None:  # the object's keys are known: some key the names schema rejects is present
                branches.extend({"type": "object", "required": [n]} for n in rejected)
                keys.discard("propertyNames")
        member_keys = keys & {"properties", "additionalProperties", "patternProperties", "propertyNames"}
        if member_keys and self.some_item and not self.sizes_bounded and (
                "propertyNames" in member_keys or not self._members_known(schema, member_keys, names, context)):
            # Some member fails these keywords (each judges a member alone): the token-level layer
            # enforces it where the object's place is known (`llmqp.constraints.contains.SOME_MEMBER`);
            # elsewhere the backend refuses it.
            written = self._originals.get(id(schema), schema)  # as the user wrote it, where it is theirs
            branches.append({"type": "object", contains.SOME_MEMBER: {
                k: copy.deepcopy(written[k] if k in written else schema[k]) for k in sorted(member_keys)}})
            keys -= member_keys
        if keys & {"properties", "additionalProperties", "patternProperties"}:
            props = schema.get("properties", {})
            if not isinstance(props, dict):
                raise _Unsupported("properties", "not an object")
            outside = [k for k in names if k not in props] if names is not None else None
            if "patternProperties" in keys and names is not None:
                # The object's keys are known: one that a pattern finds (and `props` does not declare)
                # breaks that pattern's schema; one no pattern finds breaks `additionalProperties` (below).
                patterns = schema["patternProperties"]
                if not isinstance(patterns, dict):
                    raise _Unsupported("patternProperties", "not an object")
                try:
                    found = {k: [p for p in patterns if re.search(p, k)] for k in outside}
                except re.error:
                    raise _Unsupported("patternProperties", "a pattern Python cannot read") from None
                for k, matching in found.items():
                    for p in matching:
                        negated = self._negate_in(patterns[p], context_props.get(k), refs)
                        branches.append({"type": "object", "required": [k]} if negated is True else
                                        {"type": "object", "required": [k], "properties": {k: negated}})
                outside = [k for k, matching in found.items() if not matching]
            elif "patternProperties" in keys or ("additionalProperties" in keys and names is None):
                ctx = self.plain(context)
                patterns = schema.get("patternProperties") or {}
                if not self._members_known(schema, keys, names, context):
                    raise _Unsupported("additionalProperties" if "additionalProperties" in keys
                                       else "patternProperties",
                                       "negating additional or pattern properties of an object whose other keys "
                                       "are not known")
                # The surrounding objects' undeclared keys obey the same additional/pattern schemas, so only
                # the keys they declare and `schema` does not can break them: a key no pattern matches breaks
                # `additionalProperties` (below); one a pattern matches obeys it there too (the same patterns).
                try:
                    outside = [k for k in ctx.get("properties", {}) if k not in props and
                               not any(re.search(p, k) for p in patterns)]
                except re.error:
                    raise _Unsupported("patternProperties", "a pattern Python cannot read") from None
            extra = schema.get("additionalProperties", True)
            if extra is not True and extra != {}:  # a key outside `props`, with a value `extra` rejects
                for k in outside or []:
                    negated = self._negate_in(extra, context_props.get(k), refs)
                    branches.append({"type": "object", "required": [k]} if negated is True else
                                    {"type": "object", "required": [k], "properties": {k: negated}})
            branches.append({"anyOf": [{"type": "object", "required": [name],
                                        "properties": {name: self._negate_in(sub, self._value_context(
                                            name, context_props, context), refs)}}
                                       for name, sub in props.items() if sub is not True and sub != {}
                                       and (names is None or name in names)]})  # others cannot be present
            keys -= {"properties", "additionalProperties", "patternProperties"}
        if "items" in keys and isinstance(schema["items"], (dict, bool)):
            mine, theirs = self.plain(schema["items"]), self.plain(items)
            if mine is True or mine == {} or (items is not None and _same(mine, theirs)):
                keys.discard("items")  # every array (of the surrounding schema) satisfies it
            elif items is not None and _disjoint(mine, theirs, self.plain):
                # The surrounding schema's items never satisfy `mine` (disjoint types, values, ...): any
                # item is a counterexample.
                branches.append({"type": "array", "minItems": 1})
                keys.discard("items")
            elif self.some_item:
                # Some item fails `mine`: a `contains`, which the token-level layer enforces where the
                # array's place is known (`llmqp.constraints.contains`); elsewhere the backend refuses it.
                branches.append({"type": "array", "minItems": 1} if mine is False else
                                {"type": "array", "contains": {"not": schema["items"]}})
                keys.discard("items")
        if "contains" in keys and not keys & {"minContains", "maxContains"}:
            # No item matches it: every item fails it.
            contained = self.plain(schema["contains"])
            branches.append({"type": "array"} if contained is False else
                            {"type": "array", "maxItems": 0} if contained is True or contained == {} else
                            {"type": "array", "items": {"not": schema["contains"]}})
            keys.discard("contains")
        for key, neg in (("minLength", ("string", "maxLength", -1)), ("maxLength", ("string", "minLength", 1)),
                         ("minItems", ("array", "maxItems", -1)), ("maxItems", ("array", "minItems", 1)),
                         ("minProperties", ("object", "maxProperties", -1)),
                         ("maxProperties", ("object", "minProperties", 1))):
            if key in keys:
                kind, other, step = neg
                bound = schema[key] + step
                branches.append({"type": kind, other: bound} if bound >= 0 else False)
                keys.discard(key)
        branches.extend(_negate_bounds(schema, keys))
        if "pattern" in keys:
            complement = _complement_pattern(schema["pattern"])
            if complement is None:
                raise _Unsupported("pattern", f"the complement of /{str(schema['pattern'])[:60]}/ has no regex "
                                              "form here (only sequences of character classes, anchored at the "
                                              "start, or one class or word anywhere)")
            branches.append({"type": "string", "pattern": complement})
            keys.discard("pattern")
        # Their parts apply to the same instance: the surrounding schema's facts hold for them too.
        here = dict(keys=names, props=context_props or None, items=items, context=context)
        if "anyOf" in keys:
            branches.append(_all([self.negate(s, types, refs, **here) for s in schema["anyOf"]]))
            keys.discard("anyOf")
        if "allOf" in keys:
            branches.append({"anyOf": [self.negate(s, types, refs, **here) for s in schema["allOf"]]})
            keys.discard("allOf")
        if "oneOf" in keys:  # none of them, or two at once
            opts = schema["oneOf"]
            pairs = [{"allOf": [opts[i], opts[j]]} for i in range(len(opts)) for j in range(i + 1, len(opts))]
            branches.append({"anyOf": [_all([self.negate(s, types, refs, **here) for s in opts]), *pairs]})
            keys.discard("oneOf")
        if "not" in keys:
            branches.append(schema["not"])
            keys.discard("not")
        if "if" in keys:
            cond = schema["if"]
            then, other = schema.get("then", True), schema.get("else", True)
            branches.append({"anyOf": [_all([cond, self.negate(then, types, refs)]),
                                       _all([self.negate(cond, types, refs), self.negate(other, types, refs)])]})
            keys -= {"if", "then", "else"}
        keys -= {"then", "else"}
        for key in ("dependentRequired", "dependencies"):
            if key in keys:
                for name, dep in schema[key].items():
                    if not isinstance(dep, list):
                        raise _Unsupported(key, "negating a schema dependency")
                    branches.extend({"type": "object", "required": [name], "properties": {d: False}} for d in dep)
                keys.discard(key)
        if schema.get("uniqueItems") is False or schema.get("uniqueItems") is None:
            keys.discard("uniqueItems")
        if "format" in keys and self.unknown_formats is UnknownFormats.ANNOTATION and \
                not formats.is_standard(schema["format"]):
            keys.discard("format")  # an annotation: it holds for every instance
        if "multipleOf" in keys and self.some_item:  # numbers the layer checks whole (contains.SCALAR)
            branches.append({"type": "number", contains.SCALAR: {"not": {"multipleOf": schema["multipleOf"]}}})
            self.scalars += 1
            keys.discard("multipleOf")
        left = sorted(keys & _VALIDATION)
        if left:
            raise _Unsupported(left[0], f'negating "{left[0]}" has no exact schema form here')
        return _any(_contains_unless_short(branches), types)

    def _names_rejected(self, names_schema: Any, names: list) -> list | None:
        """The `names` that `jsonschema` rejects against `names_schema` (a propertyNames schema), or None
        where it cannot tell here (a format, which is checked otherwise; a schema it cannot evaluate)."""
        if '"format"' in json.dumps(names_schema):
            return None
        try:
            checker = self._checker(names_schema)
            return None if checker is None else [n for n in names if not checker.is_valid(n)]
        except Exception:  # noqa: BLE001 - a schema jsonschema cannot evaluate
            return None

    def _checker(self, schema: Any):
        """A `jsonschema` validator for `schema`, a part of the schema as given (its `$ref`s resolve in
        the whole document), or None without jsonschema."""
        try:
            from jsonschema.validators import validator_for
        except ImportError:
            return None
        if self._validator is None:
            self._validator = validator_for(self.original)(self.original)
        return self._validator.evolve(schema=schema)

    def _negate_sized(self, bounded: bool, schema: Any, types: frozenset | None, **kwargs) -> Any:
        """negate() of a subschema of an object node whose size is `bounded` (maxProperties): there "some
        member fails" is not written, since the layer could not always add the member it needs."""
        outer, self.sizes_bounded = self.sizes_bounded, bounded
        try:
            return self.negate(schema, types, **kwargs)
        finally:
            self.sizes_bounded = outer

    def _members_known(self, schema: dict, keys: set, names: list | None, context: Any) -> bool:
        """Can negate() write the negation of `schema`'s properties / patternProperties /
        additionalProperties (those in `keys`) as a schema? Only where the keys that could break them are
        known: the surrounding objects' own keys (`names`), or their additional and pattern properties
        are the same as `schema`'s."""
        if not isinstance(schema.get("properties", {}), dict) or names is not None:
            return True  # negate() refuses it, or writes it over the known keys
        if not ("patternProperties" in keys or "additionalProperties" in keys):
            return True
        ctx = self.plain(context)
        patterns = schema.get("patternProperties") or {}
        return isinstance(ctx, dict) and isinstance(patterns, dict) and \
            _same(ctx.get("additionalProperties", True), schema.get("additionalProperties", True)) and \
            _same(ctx.get("patternProperties") or {}, patterns) and isinstance(ctx.get("properties", {}), dict)

    def _value_context(self, name: str, context_props: dict, context: Any) -> Any:
        """The schema the surrounding objects give the value at key `name`: its declared one, else its
        `additionalProperties` where no pattern property could match (None: unknown)."""
        if name in context_props:
            return context_props[name]
        ctx = self.plain(context)
        if isinstance(ctx, dict) and not ctx.get("patternProperties"):
            extra = ctx.get("additionalProperties", True)
            return None if extra is True else extra
        return None

    def _negate_in(self, schema: Any, context: Any, refs: tuple) -> Any:
        """negate(schema) among the instances of `context` (a property's schema in the surrounding one)."""
        context = self.plain(context)
        if context is not None and _same(self.plain(schema), context):
            return False  # every instance of the context satisfies it
        if not isinstance(context, dict):
            return self._negate_sized(False, schema, None, refs=refs)
        return self._negate_sized("maxProperties" in context, schema, _possible_types(context, self.plain), refs=refs,
                                  keys=_closed_keys(context), props=context.get("properties"),
                                  items=context.get("items"), context=context)

    def plain(self, node: Any) -> Any:
        """`node`, or the target of a plain `$ref` (one with nothing beside it)."""
        seen = 0
        while isinstance(node, dict) and "$ref" in node and not (set(node) - _ANNOTATIONS - {"$ref"}) and seen < 32:
            try:
                node = self.resolve(node["$ref"])
            except _Unsupported:
                return node
            seen += 1
        return node

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _Unsupported("$ref", f"only local references can be negated, not {ref!r}")
        node = walk_pointer(self.root, ref)
        if node is MISSING:
            raise _Unsupported("$ref", f"unresolvable reference {ref!r}")
        if id(node) in self.busy and id(node) in self._originals:
            # A reference back into a node being rewritten (recursion): read it as written, not half-way
            # through its rewrite (a `oneOf` taken out to be rewritten would leave `{}`, any value).
            return self._originals[id(node)]
        return node


# ------------------------------------------------------------------------------------------ helpers

FINITE_MAX = 1000  # a finite node with more values than this is rewritten keyword by keyword


def _finite_values(node: Any, plain, depth: int = 0, seen: tuple = ()) -> list | None:
    """Values that include every instance of `node` (its `enum`/`const`, those of an `allOf` part or a
    `$ref` target, the union over `anyOf`/`oneOf` options, `null` or the booleans for `type`), or None
    when the instances are not known to be a small finite set."""
    if not isinstance(node, dict) or depth > 16:
        return None
    found: list[list] = []
    if "const" in node:
        found.append([node["const"]])
    if isinstance(node.get("enum"), list):
        found.append(list(node["enum"]))
    if node.get("type") in ("null", "boolean"):
        found.append([None] if node["type"] == "null" else [False, True])
    if node.get("type") == "integer":  # bounded integers (a superset: the bounds are checked after)
        lows = [v for k in ("minimum", "exclusiveMinimum") if _is_number(v := node.get(k))]
        highs = [v for k in ("maximum", "exclusiveMaximum") if _is_number(v := node.get(k))]
        if lows and highs and max(highs) - min(lows) <= FINITE_MAX:
            found.append(list(range(math.floor(min(lows)), math.ceil(max(highs)) + 1)))
    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in seen:
        target = plain({"$ref": ref})
        if target is not None and not (isinstance(target, dict) and target.get("$ref") == ref):
            sub = _finite_values(target, plain, depth + 1, seen + (ref,))
            if sub is not None:
                found.append(sub)
    for part in node.get("allOf", []) if isinstance(node.get("allOf"), list) else []:
        sub = _finite_values(part, plain, depth + 1, seen)
        if sub is not None:
            found.append(sub)
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options:
            subs = [_finite_values(o, plain, depth + 1, seen) for o in options]
            if all(sub is not None for sub in subs):
                found.append([v for sub in subs for v in sub])
    if not found:
        return None
    values: list = []
    for v in min(found, key=len):
        if not any(_eq(v, w) and type(v) is type(w) for w in values):
            values.append(v)
    return values if len(values) <= FINITE_MAX else None


def _same(a: Any, b: Any) -> bool:
    """Are `a` and `b` the same JSON value (1 and true differ; key order does not matter)?"""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _types_of(node: dict) -> frozenset | None:
    t = node.get("type")
    if isinstance(t, str):
        t = [t]
    if not isinstance(t, list):
        return None
    return frozenset(x for x in t if isinstance(x, str))


def _possible_types(node: Any, plain, depth: int = 0) -> frozenset | None:
    """The JSON types an instance of `node` can have (plain `$ref`s followed; `type`, `enum`/`const`
    values, the union over anyOf/oneOf options, the intersection over allOf parts), or None when
    any type may be."""
    node = plain(node)
    if node is False:
        return frozenset()
    if not isinstance(node, dict) or depth > 16:
        return None
    found = [_types_of(node)]
    values = _values(node)
    if values is not None:
        found.append(frozenset(_type_name(v) for v in values))
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            options = [_possible_types(o, plain, depth + 1) for o in node[key]]
            if all(o is not None for o in options):
                found.append(frozenset().union(*options))
    if isinstance(node.get("allOf"), list):
        found.extend(_possible_types(o, plain, depth + 1) for o in node["allOf"])
    known = [f for f in found if f is not None]
    if not known:
        return None
    out = set(known[0])
    for other in known[1:]:  # "integer" is a part of "number"
        out = {t if t == u else "integer" for t in out for u in other if t == u or {t, u} == {"integer", "number"}}
    return frozenset(out)


def _overlap(a: frozenset | set, b: frozenset | set) -> bool:
    """Do the JSON types `a` and `b` share an instance ("integer" is a part of "number")?"""
    return bool(a & b) or ("integer" in a and "number" in b) or ("number" in a and "integer" in b)


def _eq(a: Any, b: Any) -> bool:
    """JSON equality (1 == 1.0, True != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _any(branches: list, types: frozenset | None) -> Any:
    """anyOf of `branches` without the impossible ones (False, or a type outside `types`)."""
    kept = []
    for b in branches:
        if b is False or (isinstance(b, dict) and ("anyOf" in b and b["anyOf"] == [])):
            continue
        if b is True:
            return True
        if isinstance(b, dict) and types is not None and isinstance(b.get("type"), str):
            if not _overlap(types, {b["type"]}):
                continue
        if isinstance(b, dict) and set(b) == {"anyOf"}:
            kept.extend(x for x in b["anyOf"] if x is not False)
        else:
            kept.append(b)
    if not kept:
        return False
    return kept[0] if len(kept) == 1 else {"anyOf": kept}


def _contains_unless_short(branches: list) -> list:
    """`branches` (options of an anyOf) with "some item fails S" and "at most n items" (from a negated
    `items` and `minItems: n+1`) made one option, "some item fails S unless there are at most n items"
    (`contains.UNLESS_AT_MOST`): the same arrays, as one array option whose place the layer can know."""
    some = [b for b in branches if isinstance(b, dict) and set(b) == {"type", "contains"} and b["type"] == "array"]
    short = [b for b in branches if isinstance(b, dict) and set(b) == {"type", "maxItems"} and b["type"] == "array"
             and isinstance(b["maxItems"], int) and not isinstance(b["maxItems"], bool)]
    if len(some) != 1 or not short:
        return branches
    merged = {**some[0], contains.UNLESS_AT_MOST: max(b["maxItems"] for b in short)}
    return [merged if b is some[0] else b for b in branches if not any(b is x for x in short)]


def _format_refusal(name: Any) -> str:
    if not isinstance(name, str):
        return f"format must be a string, not {json.dumps(name)[:40]}"
    if formats.is_standard(name):
        return f'the format "{name}" has no exact regular form here'
    enforced = sorted(formats.NATIVE | formats.PATTERNS.keys() | formats.ALIASES.keys())
    return (f'unknown format "{name}" (enforced: {", ".join(enforced)}; '
            'unknown_formats="annotation" treats non-standard formats as annotations)')


def _formats_cannot_apply(node: dict) -> bool:
    """True when `node` only admits non-strings: every JSON-Schema format (and every unknown one, an
    annotation) constrains strings only, so a `format` here constrains nothing (`{"type": "integer",
    "format": "int32"}` accepts every integer, as `jsonschema` does)."""
    t = node.get("type")
    types = [t] if isinstance(t, str) else t
    return isinstance(types, list) and bool(types) and "string" not in types


def _closed_keys(node: Any) -> list | None:
    """The only property names an object valid against `node` may have, or None when others may come."""
    if isinstance(node, dict) and node.get("additionalProperties") is False and not node.get("patternProperties"):
        props = node.get("properties")
        return list(props) if isinstance(props, dict) else []
    return None


_MAX_EXPANDED_KEYS = 64  # properties a closed object may have after _expand_finite_patterns


def _expand_finite_patterns(node: dict) -> bool:
    """Turn, in place, the `patternProperties` of `node` into declared `properties` when every pattern
    finds only a few names (`^[a-f]$`): each name gets the schemas of the patterns that find it (and of
    its declaration, if any) -- what JSON Schema asks of such a key -- so the object's keys are known,
    which counting (`minProperties`) and negation need. False (node unchanged) otherwise."""
    props = node.get("properties", {})
    if not isinstance(props, dict) or not isinstance(node["patternProperties"], dict):
        return False
    found: dict[str, list] = {}
    for pattern, schema in node["patternProperties"].items():
        words = regular.finite_words(pattern, _MAX_EXPANDED_KEYS)
        if words is None:
            return False
        for word in words:
            found.setdefault(word, []).append(schema)
    if len(found.keys() | props.keys()) > _MAX_EXPANDED_KEYS:
        return False
    merged = dict(props)
    for word, schemas in found.items():
        parts = ([merged[word]] if word in merged else []) + [copy.deepcopy(x) for x in schemas]
        merged[word] = parts[0] if len(parts) == 1 else {"allOf": parts}
    node["properties"] = merged
    del node["patternProperties"]
    return True


def _all(parts: list) -> Any:
    """allOf of `parts`: False when one is False, without the True ones."""
    if any(p is False for p in parts):
        return False
    kept = [p for p in parts if p is not True and p != {}]
    if not kept:
        return True
    return kept[0] if len(kept) == 1 else {"allOf": kept}


def _negate_type(value: Any, types: frozenset | None, fraction: Any = None) -> Any:
    """The values (of `types`) that are not of type `value`. Negating "integer" among numbers needs "a
    number with a fraction", which has no schema form: the schema `fraction` says it, or _Unsupported."""
    given = {value} if isinstance(value, str) else set(value)
    others = [t for t in TYPES if t != "number" and t not in given and (types is None or t in types)]
    if "number" not in given:
        if "integer" in given:
            if types is None or "number" in types:
                if fraction is None:
                    raise _Unsupported("type", 'negating "integer" needs "a number with a fraction", which has '
                                               "no schema form")
                return {"anyOf": [{"type": others}, fraction]} if others else fraction
        elif types is None or "number" in types:
            others.append("number")
        elif "integer" in types:
            others.append("integer")
    return {"type": others} if others else False


def _negate_values(values: list, types: frozenset | None) -> Any:
    """Every JSON value (of `types`) that is not JSON-equal to one of `values`."""
    branches: list = []
    for t in TYPES:
        if types is not None and not _overlap(types, {t}):
            continue
        mine = [v for v in values if _type_name(v) == t]
        if not mine:
            branches.append({"type": t})
        elif t == "null":
            continue
        elif t == "boolean":
            rest = [b for b in (False, True) if b not in mine]
            if rest:
                branches.append({"enum": rest})
        elif t == "string":
            branches.append({"type": "string", "pattern": "^" + _complement_regex(mine) + "$"})
        elif t == "number":
            points = sorted({float(v) if not float(v).is_integer() else int(v) for v in mine})
            branches.append({"type": "number", "exclusiveMaximum": points[0]})
            branches.extend({"type": "number", "exclusiveMinimum": lo, "exclusiveMaximum": hi}
                            for lo, hi in zip(points, points[1:]))
            branches.append({"type": "number", "exclusiveMinimum": points[-1]})
        elif t == "array":
            branches.append(_all([_not_equal_array(v) for v in mine]))
        else:
            branches.append(_all([_not_equal_object(v) for v in mine]))
    return _any(branches, None)


def _not_equal_array(value: list) -> Any:
    """Every array that is not JSON-equal to `value`: another length, or another item somewhere."""
    n = len(value)
    parts: list = [{"type": "array", "maxItems": n - 1}] if n else []
    parts.append({"type": "array", "minItems": n + 1})
    for i, item in enumerate(value):
        parts.append({"type": "array", "minItems": i + 1, "prefixItems": [True] * i + [_negate_values([item], None)]})
    return _any(parts, None)


def _not_equal_object(value: dict) -> Any:
    """Every object that is not JSON-equal to `value`: a key missing, another value at a key, or a key
    more (its names are declared, so the extra key is another one)."""
    names = list(value)
    parts: list = [{"type": "object", "properties": {k: False}} for k in names]
    parts.extend({"type": "object", "required": [k], "properties": {k: _negate_values([value[k]], None)}}
                 for k in names)
    parts.append({"type": "object", "required": names, "properties": dict.fromkeys(names, True),
                  "minProperties": len(names) + 1})
    return _any(parts, None)


def _negate_bounds(schema: dict, keys: set) -> list:
    """Negations of the numeric bounds and consumes their keys from `keys`. Draft 4's boolean
    exclusiveMinimum/Maximum make minimum/maximum strict."""
    out = []
    low_strict = schema.get("exclusiveMinimum") is True
    high_strict = schema.get("exclusiveMaximum") is True
    if "minimum" in keys:
        out.append({"type": "number", ("maximum" if low_strict else "exclusiveMaximum"): schema["minimum"]})
    if "maximum" in keys:
        out.append({"type": "number", ("minimum" if high_strict else "exclusiveMinimum"): schema["maximum"]})
    for key, other in (("exclusiveMinimum", "maximum"), ("exclusiveMaximum", "minimum")):
        if key in keys and not isinstance(schema[key], bool):
            out.append({"type": "number", other: schema[key]})
    keys -= {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
    return out


def _regex_char(c: str) -> str:
    return c if c.isascii() and c.isalnum() else "\\x{%x}" % ord(c)


def _complement_regex(words: list[str]) -> str:
    """A regex (Rust syntax, to be anchored) matching exactly the strings that are not in `words`."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}  # end marker

    def other(node: dict) -> str:
        alts = [] if "" in node else [""]
        chars = sorted(c for c in node if c)
        for c in chars:
            alts.append(_regex_char(c) + other(node[c]))
        if chars:
            alts.append("[^" + "".join(_regex_char(c) for c in chars) + "][\\s\\S]*")
        else:
            alts.append("[\\s\\S]+")
        return "(?:" + "|".join(alts) + ")"

    return other(trie)


def _complement_pattern(pattern: Any) -> str | None:
    """An anchored regex for the strings `pattern` does not find (`_complement_linear`'s small form for
    sequences of character classes, else `regular.complement`'s), or None."""
    if not isinstance(pattern, str):
        return None
    return _complement_linear(pattern) or regular.complement(pattern)


def _complement_linear(pattern: Any) -> str | None:
    """An anchored regex for the strings `pattern` does not match (ECMA-262 search semantics: `$` is the
    end of the string, as in Rust's regex; Python's `$` would also match before a final newline), or
    None when `pattern` is not one of the shapes handled: a sequence of character classes (literals,
    `[...]`, `\\d`/`\\s`/`\\w`, no `.`) with fixed counts, the last one with any count, anchored at the
    start (and maybe the end); or, unanchored, one class or one literal word."""
    parsed = _linear(pattern)
    if parsed is None:
        return None
    at_start, items, at_end = parsed
    anything = "[\\s\\S]*"
    if not at_start:
        if at_end or not items:
            return None
        if len(items) == 1 and items[0][2] == 1:  # contains one character of the class
            return f"^{items[0][1]}*$"
        if len(items) <= 8 and all(low == high == 1 and cls.startswith("\\x{") for cls, _, low, high in items):
            return "^" + _not_containing([cls for cls, _, _, _ in items]) + "$"  # <= ~12 kB of regex
        return None
    fixed, last = items, None
    if items and (at_end or items[-1][2] != items[-1][3]):
        fixed, last = items[:-1], items[-1]
    if any(low != high for _, _, low, high in fixed):
        return None
    if not at_end and last is not None:  # a prefix: only the last class's minimum count matters
        fixed, last = fixed + [(last[0], last[1], last[2], last[2])], None
    singles = [(cls, neg) for cls, neg, low, _ in fixed for _ in range(low)]
    if not at_end and not singles:
        return None  # matches every string: the complement is empty
    alts, prefix = [], ""
    for cls, neg in singles:  # too short here, or another character here
        alts.append(f"{prefix}(?:{neg}{anything})?")
        prefix += cls
    if at_end and last is None:
        alts.append(f"{prefix}[\\s\\S]+")  # too long
    elif at_end:
        cls, neg, low, high = last
        inner = ([f"[\\s\\S]{{0,{low - 1}}}"] if low > 0 else []) + \
            ([f"[\\s\\S]{{{high + 1},}}"] if high is not None else []) + [f"{anything}{neg}{anything}"]
        alts.append(prefix + "(?:" + "|".join(inner) + ")")
    return "^(?:" + "|".join(alts) + ")$"


def _linear(pattern: Any) -> tuple[bool, list, bool] | None:
    """(anchored at the start, [(class, complement class, min count, max count or None)], anchored at
    the end) for a pattern that is a plain sequence of character classes, or None."""
    import re._parser as sre  # the parser of the `re` module, whose reading jsonschema's `pattern` follows

    if not isinstance(pattern, str) or "(?" in pattern or any(op in pattern for op in ("&&", "--", "~~")):
        return None  # flags, look-around; Rust's class set operations (literal characters elsewhere)
    try:
        tokens = list(sre.parse(pattern))
    except (re.error, RecursionError, OverflowError):
        return None
    at_start = bool(tokens) and tokens[0] == (sre.AT, sre.AT_BEGINNING)
    at_end = bool(tokens) and tokens[-1] == (sre.AT, sre.AT_END)
    items = []
    for op, arg in tokens[int(at_start):len(tokens) - int(at_end)]:
        low = high = 1
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = arg
            high = None if high == sre.MAXREPEAT else high
            if len(body) != 1:
                return None
            op, arg = body[0]
        cls = _render_class(op, arg, sre)
        if cls is None:
            return None
        items.append((cls[0], cls[1], low, high))
    return at_start, items, at_end


_CATEGORIES = {"CATEGORY_DIGIT": "\\d", "CATEGORY_NOT_DIGIT": "\\D", "CATEGORY_SPACE": "\\s",
               "CATEGORY_NOT_SPACE": "\\S", "CATEGORY_WORD": "\\w", "CATEGORY_NOT_WORD": "\\W"}


def _render_class(op, arg, sre) -> tuple[str, str] | None:
    """(class, complement class) in Rust regex syntax, code points written out, or None."""
    if op is sre.LITERAL:
        return "\\x{%x}" % arg, "[^\\x{%x}]" % arg
    if op is sre.NOT_LITERAL:
        return "[^\\x{%x}]" % arg, "\\x{%x}" % arg
    if op is sre.IN:
        items, negated = list(arg), False
    elif op is sre.CATEGORY:
        items, negated = [(op, arg)], False
    else:
        return None
    if items and items[0][0] is sre.NEGATE:
        items, negated = items[1:], True
    parts = []
    for kind, value in items:
        if kind is sre.LITERAL:
            parts.append("\\x{%x}" % value)
        elif kind is sre.RANGE:
            parts.append("\\x{%x}-\\x{%x}" % value)
        elif kind is sre.CATEGORY and str(value) in _CATEGORIES:
            parts.append(_CATEGORIES[str(value)])
        else:
            return None
    inner = "".join(parts)
    if not inner:
        return None
    return ("[^" if negated else "[") + inner + "]", ("[" if negated else "[^") + inner + "]"


_LOOKAHEAD = "^(?!"


def _split_lookahead(pattern: str) -> tuple[str, list[str]] | None:
    """For `^(?!X)Y`: ("^Y", [complement of ^A for each alternative A of X]), or None when X has an
    alternative whose complement `_complement_pattern` cannot build (the pattern is then left to
    llguidance, which refuses look-around)."""
    depth, i, in_class = 1, len(_LOOKAHEAD), False
    cuts, start = [], len(_LOOKAHEAD)
    while i < len(pattern) and depth:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "]":
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 1:
            cuts.append(pattern[start:i])
            start = i + 1
        i += 1
    if depth:
        return None
    cuts.append(pattern[start:i - 1])
    rest = "^" + pattern[i:]
    if rest.startswith(_LOOKAHEAD) or any(op in rest for op in ("[[", "&&", "--", "~~")):
        return None  # a second look-ahead; Rust's nested classes and set operations read differently
    excluded = [_complement_pattern("^" + alt) for alt in cuts]
    if any(e is None for e in excluded):
        return None
    return rest, excluded


def _not_containing(word: list[str]) -> str:
    """A regex (to be anchored) for the strings without `word` (a list of one-character regexes, each
    `\\x{..}`) as a substring: the states of its Knuth-Morris-Pratt automaton, eliminated one by one."""
    n = len(word)
    symbols = list(dict.fromkeys(word))
    other = "[^" + "".join(symbols) + "]"

    def step(state: int, sym: str) -> int:  # longest prefix of `word` that is a suffix of word[:state] + sym
        text = word[:state] + [sym]
        for k in range(min(len(text), n), -1, -1):
            if text[len(text) - k:] == word[:k]:
                return k
        return 0

    # edges[i][j]: regex for one step i -> j (states 0..n-1 live; n = the word was seen: dropped)
    edges: dict = {(i, j): [] for i in range(n) for j in range(n)}
    for i in range(n):
        for sym in symbols:
            j = step(i, sym)
            if j < n:
                edges[(i, j)].append(sym)
        edges[(i, 0)].append(other)
    label = {k: ("(?:" + "|".join(v) + ")" if len(v) > 1 else v[0]) if v else None for k, v in edges.items()}
    start, final = "s", "f"
    label[(start, 0)] = ""
    for i in range(n):
        label[(i, final)] = ""
    states = list(range(n))
    for q in states:
        loop = label.get((q, q))
        loop_re = f"(?:{loop})*" if loop else ""
        sources = [a for a in [start, *states] if a != q and label.get((a, q)) is not None]
        targets = [b for b in [*states, final] if b != q and label.get((q, b)) is not None]
        for a in sources:
            for b in targets:
                path = f"{_group(label[(a, q)])}{loop_re}{_group(label[(q, b)])}"
                old = label.get((a, b))
                label[(a, b)] = path if old is None else f"(?:{old}|{path})"
        for key in [k for k in label if q in k]:
            del label[key]
        states = [x for x in states if x != q]
    return label.get((start, final)) or ""


def _group(regex: str) -> str:
    return regex if len(regex) <= 1 or regex.startswith("\\x{") and regex.count("\\x{") == 1 else f"(?:{regex})"


def _negate_class(cls: str) -> str:
    """The character class of every character `cls` (one class as `_CLASS` matches it) does not match."""
    if cls.startswith("[^"):
        return "[" + cls[2:]
    if cls.startswith("["):
        return "[^" + cls[1:]
    if cls.startswith("\\") and cls[1] in "dDsSwW":
        return "\\" + cls[1].swapcase()
    return "[^" + cls + "]"


def _provably_disjoint(options: list, plain=lambda node: node, context: frozenset | None = None,
                       required: frozenset = frozenset()) -> bool:
    """True when no instance (of the JSON types `context`, None: any; objects having the keys `required`)
    can match two of `options` (pairwise `_disjoint`; `plain` resolves plain `$ref`s). Conservative:
    False when unsure."""
    return all(_disjoint(options[i], options[j], plain, context=context, required=required)
               for i in range(len(options)) for j in range(i + 1, len(options)))


def _kinds(context: frozenset | None) -> list[frozenset]:
    """The JSON types of `context` (None: all), one set each ("integer" alone where "number" is not)."""
    out = []
    for t in TYPES:
        if context is None or t in context:
            out.append(frozenset({t}))
        elif t == "number" and "integer" in context:
            out.append(frozenset({"integer"}))
    return out


def _disjoint(a: Any, b: Any, plain, depth: int = 0, context: frozenset | None = None,
              required: frozenset = frozenset()) -> bool:
    """No instance matches both `a` and `b`, by one keyword of each (every keyword of a schema must hold,
    so one pair that cannot hold together is a proof): disjoint JSON types, disjoint `enum`/`const`
    values, or a discriminator -- a property both require, whose schemas are disjoint, in schemas of
    which one admits objects only."""
    a, b = plain(a), plain(b)
    if not isinstance(a, dict) or not isinstance(b, dict) or depth > 8:
        return False
    ta, tb = _types_of(a), _types_of(b)
    if context is not None and context <= {"object"}:  # only objects are instances here
        ta = frozenset({"object"}) if ta is None else ta & {"object"}
    pa, pb = _possible_types(a, plain), _possible_types(b, plain)
    if pa is not None and pb is not None and not _overlap(pa, pb):
        return True
    if ((ta is not None and ta <= {"string"}) or (tb is not None and tb <= {"string"}) or
            (context is not None and context <= {"string"})) and \
            any(_patterns_disjoint(x, y) for x in _string_shapes(a) for y in _string_shapes(b)):
        return True
    va, vb = _values(a), _values(b)
    if va is not None and vb is not None:
        return not any(_eq(x, y) for x in va for y in vb)
    for values, other in ((va, b), (vb, a)):
        if values is not None and _fails_all(other, values):
            return True
    for values, types in ((va, tb), (vb, ta)):
        if values is not None and types is not None:
            return not any(_overlap({_type_name(v)}, types) for v in values)
    if (ta is not None and ta <= {"object"}) or (tb is not None and tb <= {"object"}):
        pa, pb = a.get("properties"), b.get("properties")
        ra, rb = a.get("required"), b.get("required")
        if required:  # keys every instance here has (the surrounding schema requires them)
            ra = [*(ra if isinstance(ra, list) else []), *required]
            rb = [*(rb if isinstance(rb, list) else []), *required]
        if isinstance(pa, dict) and isinstance(pb, dict) and isinstance(ra, list) and isinstance(rb, list) and \
                any(name in pa and name in pb and _disjoint(pa[name], pb[name], plain, depth + 1)
                    for name in set(ra) & set(rb) if isinstance(name, str)):
            return True
        if _key_conflict(a, b, plain, depth, required) or _key_conflict(b, a, plain, depth, required):
            return True
    for x, y in ((a, b), (b, a)):  # x lies within the union of its options: each disjoint from y suffices
        options = x.get("anyOf") if isinstance(x.get("anyOf"), list) else x.get("oneOf")
        if isinstance(options, list) and options and \
                all(_disjoint(o, y, plain, depth + 1, context) for o in options):
            return True
    for x, y in ((a, b), (b, a)):  # x lies within each of its allOf parts: one disjoint from y suffices
        parts = x.get("allOf")
        if isinstance(parts, list) and \
                any(_disjoint(p, y, plain, depth + 1, context, required) for p in parts):
            return True
    return False


# Patterns that every string of a format llguidance enforces itself matches (supersets of its regexes:
# enough to prove two options disjoint, never used to enforce anything).
_FORMAT_SHAPES = {"uuid": "^[0-9a-fA-F-]{36}$", "ipv4": "^[0-9.]{7,15}$", "ipv6": "^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*$",
                  "hostname": "^[a-zA-Z0-9.-]+$", "email": "@", "duration": "^P"}


def _string_shapes(schema: dict) -> list[str]:
    """Patterns each of which every string valid against `schema` matches: its `pattern`, and the exact
    pattern (formats.PATTERNS) or a superset (_FORMAT_SHAPES) of its `format`."""
    out = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
    name = schema.get("format")
    if isinstance(name, str) and name in formats.PATTERNS:
        out.append(formats.pattern(name))
    elif isinstance(name, str) and name in _FORMAT_SHAPES:
        out.append(_FORMAT_SHAPES[name])
    return out


def _key_conflict(x: dict, y: dict, plain, depth: int, required: frozenset = frozenset()) -> bool:
    """An object valid against `x` has a key whose value `y` rejects: a key `x` requires that `y` forbids
    (`false`, or closed objects without it), or whose schemas in both are disjoint (in `y`, its property
    schema, or `additionalProperties` where no pattern property can apply)."""
    own, px = x.get("required"), x.get("properties") if isinstance(x.get("properties"), dict) else {}
    py = y.get("properties") if isinstance(y.get("properties"), dict) else {}
    for name in [*(own if isinstance(own, list) else []), *required]:
        if not isinstance(name, str):
            continue
        if name in py:
            theirs = py[name]
        elif not y.get("patternProperties") and "additionalProperties" in y:
            theirs = y["additionalProperties"]
        elif isinstance(y.get("patternProperties"), dict) and "\n" not in name:
            try:  # (a name without a newline: Python's `$` reads as ECMA-262's there)
                matching = [p for p in y["patternProperties"] if re.search(p, name)]
            except (re.error, TypeError):
                continue
            if len(matching) == 1:
                theirs = y["patternProperties"][matching[0]]
            elif not matching and "additionalProperties" in y:
                theirs = y["additionalProperties"]
            else:
                continue
        else:
            continue
        if plain(theirs) is False or (name in px and _disjoint(px[name], theirs, plain, depth + 1)):
            return True
    return False


_SCALAR_ONLY = {"type", "enum", "const", "pattern", "minLength", "maxLength", "format", "minimum", "maximum",
                "multipleOf"}


def _fails_all(schema: dict, values: list) -> bool:
    """True when `jsonschema` (formats checked) rejects every one of `values` against `schema`, a schema
    of scalar keywords only (no subschema, no reference: its meaning is the same in every draft). A
    value jsonschema rejects is no instance, so an option of `values` is disjoint from `schema`."""
    if set(schema) - _ANNOTATIONS - _SCALAR_ONLY or len(values) > 64 or \
            ("format" in schema and schema["format"] not in formats.NATIVE | formats.PATTERNS.keys()):
        return False  # a format enforced here only (others are refused, or annotations)
    try:
        from jsonschema import Draft202012Validator, FormatChecker

        checker = Draft202012Validator(schema, format_checker=FormatChecker())
        return not any(checker.is_valid(v) for v in values)
    except Exception:  # noqa: BLE001 - not provable here
        return False


@functools.lru_cache(maxsize=1024)
def _patterns_disjoint(a: str, b: str) -> bool:
    """True when no string matches both patterns: llguidance's regex engine proves the intersection
    empty (any other answer, an error included, is "not proven")."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "string", "allOf": [{"pattern": a}, {"pattern": b}]}, overrides={"lenient": False})
        error = llguidance.LLMatcher.validate_grammar(grammar, None)
    except (ValueError, TypeError):
        return False
    return "Regex is empty" in (error or "")


_OBJECT_ONLY = {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
                "maxProperties", "propertyNames", "dependencies", "dependentRequired", "dependentSchemas"}


def _split_objects(options: list, plain) -> dict | None:
    """oneOf `options` as an anyOf, when no object matches two of them (a discriminator: a property
    both require with disjoint schemas; or one is closed and the other requires a key it lacks) and
    every option either admits objects only (`type: object`) or constrains objects only (then it admits
    every other value: with two or more such options no other value matches exactly one). None when
    this does not hold (or is not proven)."""
    resolved = [plain(o) for o in options]
    if len(resolved) < 2 or not all(isinstance(o, dict) for o in resolved):
        return None
    vacuous = 0
    for o in resolved:
        keys = set(o) - _ANNOTATIONS
        if _types_of(o) == frozenset({"object"}):
            continue
        if "type" in keys or not keys <= _OBJECT_ONLY:
            return None
        vacuous += 1
    if not all(_objects_disjoint(resolved[i], resolved[j], plain) for i in range(len(resolved))
               for j in range(i + 1, len(resolved))):
        return None
    branches = [_all([{"type": "object"}, o]) for o in options]
    if vacuous == 1:  # the one option that constrains objects only is the only one other values match
        branches.append({"type": [t for t in TYPES if t != "object"]})
    return {"anyOf": branches}


def _objects_disjoint(a: dict, b: dict, plain) -> bool:
    """No object matches both `a` and `b` (conservative)."""
    for x, y in ((a, b), (b, a)):
        px, py = x.get("properties"), y.get("properties")
        rx, ry = x.get("required"), y.get("required")
        if not isinstance(rx, list):
            continue
        if isinstance(py, dict) and any(isinstance(n, str) and py.get(n) is False for n in rx):
            return True  # x requires a key y forbids
        if _closed_keys(y) is not None and any(isinstance(n, str) and n not in _closed_keys(y) for n in rx):
            return True  # x requires a key closed y cannot have
        if isinstance(px, dict) and isinstance(py, dict) and isinstance(ry, list):
            if any(isinstance(n, str) and n in px and n in py and _disjoint(px[n], py[n], plain)
                   for n in set(rx) & set(ry) if isinstance(n, str)):
                return True
    return False


def _values(node: dict) -> list | None:
    if "const" in node:
        return [node["const"]]
    if isinstance(node.get("enum"), list):
        return list(node["enum"])
    return None


# ------------------------------------------------------------------------------------ property order
def _fit(option: Any, root: Any, value: dict) -> tuple[int, int]:
    """(-required keys `value` lacks, keys of `value` declared) by `option` and its parts."""
    declared, required = set(), set()
    for part in _parts(option, root):
        if isinstance(part.get("properties"), dict):
            declared.update(part["properties"])
        if isinstance(part.get("required"), list):
            required.update(n for n in part["required"] if isinstance(n, str))
    return -len(required - value.keys()), len(declared & value.keys())

def reorder(value: Any, schema: Any, root: Any = None, depth: int = 0) -> Any:
    """`value` with the keys of every object put in the order `schema` declares them (declared names
    first, in the order of the schema's `properties` and then of its `allOf`/`anyOf`/`oneOf` parts and
    `$ref` targets; other keys after, in their own order). The grammar generates that order, so
    `accepts()` tries this form when the text as written is rejected: JSON-Schema validity does not
    depend on key order, so this never accepts an invalid value."""
    root = schema if root is None else root
    if depth > 64:
        return value
    if isinstance(value, list):
        items = _parts(schema, root)
        sub = next((p["items"] for p in items if isinstance(p.get("items"), dict)), None)
        return [reorder(v, sub, root, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    declared: dict[str, Any] = {}
    patterns: list[tuple[str, Any]] = []
    extra = None
    for part in _parts(schema, root, value):
        if isinstance(part.get("properties"), dict):
            for name, sub in part["properties"].items():
                declared.setdefault(name, sub)
        if isinstance(part.get("patternProperties"), dict):
            patterns.extend(part["patternProperties"].items())
        if extra is None and isinstance(part.get("additionalProperties"), dict):
            extra = part["additionalProperties"]
    keys = [k for k in declared if k in value] + [k for k in value if k not in declared]
    return {k: reorder(value[k], declared[k] if k in declared else _pattern_schema(patterns, k, extra), root,
                       depth + 1) for k in keys}


def _pattern_schema(patterns: list[tuple[str, Any]], key: str, extra: Any) -> Any:
    """The schema of the first pattern property `key` matches (Python's `re` reading the pattern: only
    for ordering keys, never for validity), else `extra`."""
    for pattern, sub in patterns:
        try:
            if re.search(pattern, key):
                return sub
        except (re.error, TypeError):
            continue
    return extra


def _parts(schema: Any, root: Any, value: Any = None) -> list[dict]:
    """`schema` and every schema merged into it or offered beside it (allOf, anyOf, oneOf, local $ref
    targets), depth first, `schema` first. Given an object `value`, of each anyOf/oneOf only the option
    that declares most of its keys (and requires none it lacks) is taken: the grammar orders the keys
    by the option the value matches."""
    out, stack, seen = [], [schema], set()
    while stack:
        node = stack.pop(0)
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        children = []
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            target = walk_pointer(root, node["$ref"])  # (a _Rewriter would copy the whole root first)
            if target is not MISSING:
                children.append(target)
        for key in ("allOf", "anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                if key == "allOf" or not isinstance(value, dict) or len(node[key]) < 2:
                    children.extend(node[key])
                else:
                    children.append(max(node[key], key=lambda option: _fit(option, root, value)))
        for key in ("then", "else"):
            if isinstance(node.get(key), dict):
                children.append(node[key])
        stack[:0] = children
    return out


# ------------------------------------------------------------------------------- recursive merges
def inline_merged_refs(schema: Any, ref: str, memo: dict | None = None) -> int:
    """Rewrite, in place, every use of the local reference `ref` that llguidance would intersect with
    something else -- a `$ref` beside other keywords, an `allOf` part, an `anyOf`/`oneOf` option of a
    schema with other keywords -- into a reference to a new definition holding the merge
    (`allOf: [copy of the target, the other keywords]`); the other keywords of a schema with options move
    into each option. llguidance refuses to intersect a reference whose definition is still being
    compiled ("circular references with sibling keys"); the new definition gives it the target's keywords
    to intersect instead, and a merge met again inside its own copy (the same reference with the same
    keywords, as in a recursive definition) points back at it, so recursion stays finite. A reference
    means its target and `{S, anyOf: [A, B]}` means `anyOf: [S and A, S and B]` (`oneOf` alike), so the
    schema accepts the same instances. `memo` (merge key -> new reference) carries over between calls
    on the same schema. Returns the number of uses rewritten (0: nothing to do, or a target this cannot
    copy)."""
    memo = {} if memo is None else memo
    target = walk_pointer(schema, ref)
    if not isinstance(target, dict) or not isinstance(schema, dict):
        return 0
    if ref.strip("#/") == "":
        body = {k: v for k, v in target.items() if k not in _DOCUMENT_KEYS}
    elif _DOCUMENT_KEYS & target.keys() - {"definitions", "$defs"}:
        return 0  # a target with its own base URI: its references would resolve elsewhere in a copy
    else:
        body = target
    body = copy.deepcopy(body)  # as it is before the walk below rewrites it
    if not isinstance(schema.setdefault("$defs", {}), dict):
        return 0
    done = 0
    seen: set[int] = set()

    def is_ref(node: Any) -> bool:
        return isinstance(node, dict) and node.get("$ref") == ref and not (set(node) - _ANNOTATIONS - {"$ref"})

    def constraints(node: dict) -> dict:
        return {k: v for k, v in node.items() if k not in _ANNOTATIONS}

    def merged(rest: dict) -> str:
        key = (ref, json.dumps(rest, sort_keys=True))
        if key not in memo:
            name = f"llmqp-merged-{len(memo)}"
            while name in schema["$defs"]:
                name += "-"
            memo[key] = f"#/$defs/{name}"
            definition = {"allOf": [copy.deepcopy(body), copy.deepcopy(rest)]} if rest else copy.deepcopy(body)
            schema["$defs"][name] = definition
            visit(definition)
        return memo[key]

    def rewrite_node(node: dict) -> bool:
        nonlocal done
        annotations = {k: v for k, v in node.items() if k in _ANNOTATIONS}
        if node.get("$ref") == ref and set(node) - _ANNOTATIONS - {"$ref"}:
            rest = constraints(node)
            del rest["$ref"]
        elif isinstance(node.get("allOf"), list) and any(is_ref(part) for part in node["allOf"]):
            rest = constraints(node)
            others = [part for part in node["allOf"] if not is_ref(part)]
            rest["allOf"] = others
            if not others:
                del rest["allOf"]
        else:
            for key in ("anyOf", "oneOf"):
                options = node.get(key)
                if isinstance(options, list) and any(is_ref(o) for o in options):
                    rest = constraints(node)
                    del rest[key]
                    if not rest:
                        return False
                    options = [{"$ref": merged(rest)} if is_ref(o) else {"allOf": [o, copy.deepcopy(rest)]}
                               for o in options]
                    node.clear()
                    node.update(annotations)
                    node[key] = options
                    done += 1
                    return True
            return False
        target_ref = merged(rest)
        node.clear()
        node.update(annotations)
        node["$ref"] = target_ref
        done += 1
        return True

    def visit(node: Any) -> None:
        for part in _schema_nodes(node, seen):
            rewrite_node(part)

    visit(schema)
    return done


def _schema_nodes(schema: Any, seen: set | None = None):
    """Every dict of `schema` once (ids in `seen`), outside `const`/`enum` values, parents first; a node
    may be changed when it is yielded (its children are read after)."""
    seen = set() if seen is None else seen
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict) and id(node) not in seen:
            seen.add(id(node))
            yield node
            stack.extend(v for k, v in node.items() if k not in ("const", "enum"))


# Keywords of a schema document (not of the instances): left out of a copy of the root.
_DOCUMENT_KEYS = {"$schema", "$id", "id", "definitions", "$defs"}


def disjoint_patterns(schema: Any) -> int:
    """Split, in place, the `patternProperties` that llguidance would have to intersect while they
    overlap: llguidance requires the patterns of an object (its own and those of every schema merged
    with it -- `allOf` parts, `anyOf`/`oneOf` options, local `$ref` targets) to be disjoint. JSON Schema
    gives a key that several patterns find the schemas of all of them, so each object's patterns are
    replaced by the parts of `regular.pattern_atoms` over all the patterns of its merge: a part's schema
    is (the `allOf` of) the schemas of that object's own patterns that find it, and parts none of its
    own patterns find are left to its `additionalProperties`, as before. Every key then meets the same
    schemas, so the schema accepts the same instances. Returns the number of objects rewritten (0:
    nothing overlaps, or the patterns are outside `regular`)."""
    if not isinstance(schema, dict):
        return 0
    nodes = list(_schema_nodes(schema))

    def merge(node: dict) -> list[dict]:
        out, todo, met = [], [node], set()
        while todo:
            part = todo.pop()
            if not isinstance(part, dict) or id(part) in met:
                continue
            met.add(id(part))
            out.append(part)
            ref = part.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                todo.append(walk_pointer(schema, ref))
            for key in ("allOf", "anyOf", "oneOf"):
                if isinstance(part.get(key), list):
                    todo.extend(part[key])
        return out

    done = 0
    for node in nodes:
        owners = [m for m in merge(node) if isinstance(m.get("patternProperties"), dict) and m["patternProperties"]]
        patterns = sorted({p for m in owners for p in m["patternProperties"]})
        if len(patterns) < 2 or all(_patterns_disjoint(a, b) for a, b in itertools.combinations(patterns, 2)):
            continue
        atoms = regular.pattern_atoms(tuple(patterns))
        if atoms is None:
            continue
        for owner in owners:
            own = owner["patternProperties"]
            split = {}
            for found_by, regex in atoms:
                schemas = [own[patterns[i]] for i in sorted(found_by) if patterns[i] in own]
                if schemas:
                    split[regex] = schemas[0] if len(schemas) == 1 else {"allOf": schemas}
            owner["patternProperties"] = split
            done += 1
    return done
