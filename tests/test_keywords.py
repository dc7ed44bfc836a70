"""Keywords llguidance lacks, enforced by exact rewrites (llmqp.constraints.keywords): `not`, `if`/`then`/
`else`, `dependentRequired` / `dependencies` / `dependentSchemas`, overlapping `oneOf`; bounded flexible
whitespace; key order under strict=False; formats; the matcher's try_accept / rollback.

The reference is always `jsonschema` (an independent validator), never the package itself: accepts()
must agree with it on every instance, and random walks through the matcher that stop must produce
outputs it validates (valid by construction)."""

from __future__ import annotations

import decimal
import json
import random
import re

import jsonschema
import pytest

from llmqp import ConstraintError
from llmqp.constraints import compile_constraint, make_spec
from llmqp.constraints.llguidance_backend import WHITESPACE_MAX_RUN
from llmqp.testing import compact_json, tiny_tokenizer


@pytest.fixture(scope="module")
def tk():
    return tiny_tokenizer()


def _exact_number(text: str):
    """A JSON number with a fraction or exponent, exactly: an int where it is an integer (JSON Schema's
    integers include 1.0 and 0e5, which jsonschema takes as integers only as ints or floats), else a
    Decimal (1e999 and 2e999 are two numbers, not two floats inf)."""
    d = decimal.Decimal(text)
    return int(d) if d == d.to_integral_value() and d.adjusted() < 400 else d


def valid(schema, value) -> bool:
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema).is_valid(value)


# (schema, instances): each instance is checked against jsonschema; every table has valid and invalid ones.
CASES = {
    "not type": ({"type": ["string", "integer"], "not": {"type": "integer"}}, ["ab", 12, None, "12"]),
    "not const": ({"type": "string", "not": {"const": "ab"}}, ["ab", "abc", "a", "", "b"]),
    "not enum": ({"not": {"enum": ["ab", "yes", 1, True]}},
                 ["ab", "yes", "ye", "yesno", 1, 1.0, 2, 0.5, True, False, None, [1], {"a": 1}]),
    "not required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "not": {"required": ["a", "b"]}}, [{"a": 1}, {"b": 2}, {"a": 1, "b": 2}, {}]),
    "not minLength": ({"type": "string", "not": {"minLength": 3}}, ["", "ab", "abc", "abcd"]),
    "not maximum": ({"type": "integer", "not": {"maximum": 5}}, [4, 5, 6, 12, -3]),
    "not properties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                        "not": {"properties": {"a": {"const": 1}}}}, [{"a": 1}, {"a": 2}, {}]),
    "not anyOf": ({"type": "integer", "not": {"anyOf": [{"const": 1}, {"minimum": 10}]}}, [1, 2, 9, 10, 12]),
    "not not": ({"type": "integer", "not": {"not": {"minimum": 3}}}, [2, 3, 4]),
    "if then else": ({"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                      "required": ["kind"],
                      "if": {"properties": {"kind": {"const": "a"}}},
                      "then": {"required": ["n"]}, "else": {"not": {"required": ["n"]}}},
                     [{"kind": "a", "n": 1}, {"kind": "a"}, {"kind": "b"}, {"kind": "b", "n": 2}]),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, [{"a": 1}, {"a": 1, "b": 2}, {"b": 2}, {}]),
    "dependencies list": ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependencies": {"a": ["b"]}}, [{"a": 1}, {"a": 1, "b": 2}, {"b": 2}, {}]),
    "dependentSchemas": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "dependentSchemas": {"a": {"properties": {"b": {"minimum": 5}}, "required": ["b"]}}},
                         [{"a": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 7}, {"b": 2}]),
    # contains (llmqp.constraints.contains): a token-level layer forbids `]` until an item matches.
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 5}},
                 [[], [1], [5], [1, 7], [1, 2, 3], ["x"], [6, 1, 0]]),
    "contains objects, nested": ({"type": "object", "properties": {"v": {
        "type": "array", "items": {"type": ["integer", "array"], "items": {"type": "integer"}},
        "contains": {"type": "array", "minItems": 1}}}},
        [{"v": []}, {"v": [1, []]}, {"v": [[2]]}, {"v": [1, [1, 2], 3]}, {}, {"v": [[]]}]),
    "contains twice, in allOf parts": ({"type": "array", "items": {"enum": [1, 2, 3]},
                                        "allOf": [{"contains": {"const": 1}}, {"contains": {"const": 2}}]},
                                       [[1], [2], [1, 2], [2, 3, 1], [], [3]]),
    "contains through a $ref in items": ({"definitions": {"C": {"type": "array", "contains": {"type": "string"}}},
                                          "type": "array", "items": {"$ref": "#/definitions/C"}},
                                         [[], [["a"]], [[1]], [["a"], [1, "b"]], [["a"], []]]),
    "contains in a definition used twice": ({"$defs": {"C": {"type": "array", "contains": {"const": 1}}},
                                             "type": "object", "properties": {"a": {"$ref": "#/$defs/C"},
                                                                              "b": {"$ref": "#/$defs/C"}}},
                                            [{"a": [1], "b": [1, 2]}, {"a": [2], "b": [1]}, {"a": [1], "b": []},
                                             {}, {"b": [0, 1]}]),
    "not items (some item fails)": ({"type": "object", "properties": {"t": {
        "type": "array", "items": {"type": ["integer", "string"]}, "not": {"items": {"type": "integer"}}}}},
        [{"t": [1]}, {"t": ["a"]}, {"t": [1, "a"]}, {"t": []}, {}]),
    "oneOf numbers": ({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 10}]},
                      [-3, 0, 5, 10, 11, 12, 1.5, "x"]),
    "oneOf objects": ({"type": "object", "properties": {"r": {"type": "integer"}, "w": {"type": "integer"},
                                                        "h": {"type": "integer"}},
                       "oneOf": [{"required": ["r"]}, {"required": ["w", "h"]}]},
                      [{"r": 1}, {"w": 1, "h": 2}, {"r": 1, "w": 1, "h": 2}, {"w": 1}, {}]),
    "oneOf closed objects": ({"oneOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
         "additionalProperties": False}]}, [{"a": 1}, {"a": 1, "b": 2}, {"b": 2}, {}]),
    "uniqueItems enum": ({"type": "array", "items": {"enum": ["ab", "no", "yes"]}, "uniqueItems": True},
                         [["ab", "no"], ["ab", "ab"], [], ["yes", "no", "ab"], ["no", "yes", "no"]]),
    "uniqueItems booleans": ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 1},
                             [[True], [True, False], [False, False], []]),
    "uniqueItems strings": ({"type": "object", "properties": {"tags": {
        "type": "array", "items": {"type": "string", "maxLength": 1}, "uniqueItems": True}}},
        [{"tags": ["a", "b"]}, {"tags": ["a", "a"]}, {"tags": ["ab"]}, {"tags": []}]),
    "uniqueItems numbers": ({"type": "array", "items": {"type": "number"}, "uniqueItems": True},
                            [[1, 2], [1, 1.0], [0.5, 5e-1], [12, 1.2]]),
    "uniqueItems strings or null": ({"type": "array", "items": {"type": ["string", "null"], "maxLength": 1},
                                     "uniqueItems": True},
                                    [["a", None], [None, None], ["a", "a"], [], [None, "b", None], ["ab"]]),
    "uniqueItems strings with a pattern": ({"type": "array", "items": {"type": "string", "pattern": "^[ab]{1,2}$"},
                                            "uniqueItems": True, "minItems": 1},
                                           [["a"], ["a", "bb"], ["a", "a"], [], ["ab", "ba", "ab"], ["c"]]),
    "uniqueItems strings with a pattern and lengths": ({"type": "array", "uniqueItems": True, "items": {
        "type": "string", "pattern": "^x-", "minLength": 3, "maxLength": 4}},
        [["x-a"], ["x-ab", "x-a"], ["x-a", "x-a"], ["x-"], ["y-ab"]]),
    "uniqueItems strings or their enum": ({"type": "array", "uniqueItems": True, "items": {"anyOf": [
        {"type": "string", "minLength": 1}, {"enum": ["red", "green"]}]}},
        [["red", "blue"], ["red", "red"], [""], ["green", "x", "y"]]),
    "uniqueItems under patternProperties": ({"type": "object", "properties": {"n": {"type": "integer"}},
                                             "patternProperties": {"^t_": {"type": "array", "uniqueItems": True,
                                                                           "items": {"enum": ["a", "b"]}}}},
                                            [{"t_x": ["a", "b"]}, {"t_x": ["a", "a"]},
                                             {"n": 1, "t_y": ["b"], "t_z": ["b"]}, {"t_x": ["b"], "t_y": ["b", "b"]},
                                             {"n": 2}]),
    "uniqueItems under additionalProperties": ({"type": "object", "properties": {"id": {"type": "string"}},
                                                "additionalProperties": {"type": "array", "uniqueItems": True,
                                                                         "items": {"type": "integer"}}},
                                               [{"id": "x", "tags": [1, 2]}, {"tags": [1, 1]}, {"a": [], "b": [3, 3]},
                                                {"id": "y"}, {"a": [0], "b": [0]}]),
    "contains under additionalProperties": ({"type": "object", "additionalProperties": {
        "type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}},
        [{"a": [1]}, {"a": [2]}, {"a": [2, 1], "b": [1]}, {"a": [1], "b": []}, {}]),
    "uniqueItems integers": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                             [[0, 1], [0, 0], [-1, 1]]),
    # open items (objects that admit more keys, arrays, unbounded strings): compared when they complete
    "uniqueItems objects": ({"type": "array", "items": {"type": "object", "properties": {
        "n": {"type": "string", "maxLength": 2}, "v": {"type": "integer"}}, "required": ["n"]}, "uniqueItems": True},
        [[{"n": "a"}, {"n": "b"}], [{"n": "a"}, {"n": "a"}], [{"n": "a", "v": 1}, {"v": 1.0, "n": "a"}],
         [{"n": "a"}, {"n": "a", "x": None}], [], [{"v": 1}]]),
    # drafts 3-7 ignore the keywords beside a `$ref` (2019-09+ intersect them): the draft decides
    "draft-07: keywords beside $ref ignored": ({"$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"a": {"type": "object", "properties": {"w": {"type": "integer"}}}}, "type": "object",
        "additionalProperties": {"$ref": "#/definitions/a", "properties": {"g": {"type": "integer"}},
                                 "additionalProperties": False}},
        [{"x": {"w": 1}}, {"x": {"g": "s", "z": 1}}, {"x": {"w": "s"}}, {"x": 1}]),
    "2020-12: keywords beside $ref apply": ({"$defs": {"a": {"type": "object", "properties": {"w": {"type": "integer"}}}},
        "type": "object", "additionalProperties": {"$ref": "#/$defs/a", "properties": {"g": {"type": "integer"}},
                                                   "additionalProperties": False}},
        [{"x": {"g": 2}}, {"x": {}}, {"x": {"g": "s"}}, {"x": {"w": 1}}, {"x": 1}]),
    "uniqueItems strings or arrays": ({"type": "object", "properties": {"f": {
        "type": "array", "items": {"type": ["string", "array"]}, "uniqueItems": True}}},
        [{"f": ["a", ["a"]]}, {"f": [["a", 1], ["a", 1]]}, {"f": ["a", "a"]}, {"f": [[], [[]]]}, {"f": [1]}]),
    "oneOf discriminated": ({"oneOf": [  # disjoint by "k" (a discriminator), though not by llguidance's proof
        {"type": "object", "properties": {"k": {"const": "a"}, "x": {"type": "object", "additionalProperties": False}},
         "required": ["k"]},
        {"type": "object", "properties": {"k": {"const": "b"}, "x": {"type": "object"}}, "required": ["k"]}]},
        [{"k": "a"}, {"k": "b", "x": {"n": 1}}, {"k": "a", "x": {"n": 1}}, {"k": "c"}, {}]),
    "oneOf arrays": ({"oneOf": [{"type": "array", "items": {"type": "string"}},
                                {"type": "array", "items": {"type": "integer"}}]},
                     [[], ["a"], [1], ["a", 1], "x"]),
    "not pattern repeated class": ({"type": "string", "not": {"pattern": "^[a-f\\d]{3}$"}},
                                   ["abc", "a1f", "ab", "abcd", "abg", "", "x"]),
    "not pattern one class": ({"type": "string", "not": {"pattern": "[^a-z ]"}}, ["ab c", "", "aB", "a1", "zz"]),
    "not pattern plus": ({"type": "string", "not": {"pattern": "^\\s+$"}}, [" ", "  \t", "", "a ", " a"]),
    "not pattern word": ({"type": "string", "not": {"pattern": "ab"}}, ["ab", "xaby", "a", "ba", ""]),
    "not pattern prefix": ({"type": "string", "not": {"pattern": "^\\$[A-Z]+"}}, ["$A", "$Ab", "$", "A", "$a", ""]),
    "not pattern literal": ({"type": "string", "not": {"pattern": "^configure$"}},
                            ["configure", "configur", "configures", "x", ""]),
    "pattern with a negative look-ahead": ({"type": "string", "pattern": "^(?!@@|no)[@a-z]+$"},
                                           ["@a", "@@a", "nope", "n", "ab", "A", ""]),
    "oneOf string or pattern": ({"oneOf": [{"type": "string", "pattern": "^[0-9]{2}$"}, {"type": "string"}]},
                                ["12", "123", "1a", "", 12]),
    "oneOf disjoint patterns": ({"oneOf": [{"type": "string", "pattern": "^https?://.+$"},
                                           {"type": "string", "pattern": "^\\./.+$"}]},
                                ["http://a", "./a", "a", "https://./x", ""]),
    "uniqueItems in the array option": ({"type": "object", "properties": {"t": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"enum": ["x", "y"]}, "uniqueItems": True}]}}},
        [{"t": ["x", "x"]}, {"t": ["x", "y"]}, {"t": "x"}, {"t": []}]),
    "uniqueItems array or null": ({"type": ["array", "null"], "items": {"type": "integer"}, "uniqueItems": True},
                                  [[1, 1], [1, 2], None, "a"]),
    "oneOf discriminated objects": ({"oneOf": [  # no "type": every non-object matches both options
        {"properties": {"k": {"enum": ["a"]}, "v": {"type": "array", "items": {"type": "integer"}}}, "required": ["k"]},
        {"properties": {"k": {"enum": ["b"]}, "v": {"type": "array", "items": {"type": "string"}}}, "required": ["k"]}]},
        [{"k": "a", "v": [1]}, {"k": "b", "v": ["x"]}, {"k": "a", "v": ["x"]}, {"k": "c"}, "str", 1, None, {}]),
    "oneOf closed object": ({"oneOf": [  # one option constrains objects only: other values match it alone
        {"properties": {"k": {"enum": ["a"]}, "v": {"type": "array", "items": {"type": "integer"}}}, "required": ["k"]},
        {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"], "additionalProperties": False}]},
        [{"k": "a", "v": [1]}, {"c": 1}, {"c": 1, "k": "a"}, {"k": "a", "v": ["x"]}, "str", 1, {}]),
    "propertyNames pattern": ({"type": "object", "additionalProperties": {"type": "string"},
                               "propertyNames": {"pattern": "^[a-z0-9_-]{1,3}$"}},
                              [{"ab": "x"}, {"AB": "x"}, {"abcd": "x"}, {"a": 1}, {}]),
    "propertyNames enum": ({"additionalProperties": {"type": "integer"}, "propertyNames": {"enum": ["N", "S"]}},
                           [{"N": 1}, {"E": 1}, {"N": "x"}, "str", {"N": 1, "S": 2}]),
    "propertyNames length": ({"type": "object", "propertyNames": {"maxLength": 2}}, [{"ab": 1}, {"abc": 1}, {}]),
    "not enum arrays and objects": ({"not": {"enum": [6, "foo", [], [False], True, {"a": 12}]}},
                                    [6, 6.0, "foo", [], [False], [0], True, False, {"a": 12}, {"a": 12.0}, {"a": 1},
                                     {"a": 12, "b": 1}, {}, None]),
    "not const nested": ({"type": "object", "not": {"const": {"a": [1, {"b": None}]}}},
                         [{"a": [1, {"b": None}]}, {"a": [1, {"b": 0}]}, {"a": [1]}, {"a": [1.0, {"b": None}]}, {}]),
    "min/maxProperties closed": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                                                   "c": {"type": "integer"}, "d": {"type": "integer"}},
                                  "required": ["a"], "additionalProperties": False, "minProperties": 2,
                                  "maxProperties": 3},
                                 [{"a": 1}, {"a": 1, "b": 1}, {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1, "d": 1},
                                  {"b": 1, "c": 1}]),
    "uniqueItems false": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False}, [[1, 1], [1, 2], ["a"]]),
    # A finite node (enum, const, bounded integers, options of finite nodes) becomes the enum of the values
    # jsonschema accepts, whatever the other keywords: here "not integer" and "not multipleOf".
    "finite: enum beside not integer": ({"allOf": [{"enum": [1, 1.5, "a", [1], {"a": 1}, None]},
                                                   {"not": {"type": "integer"}}]},
                                        [1, 1.5, "a", [1], {"a": 1}, None, 2, "b"]),
    "finite: bounded integers, not multipleOf": ({"type": "integer", "minimum": 3, "maximum": 9,
                                                  "not": {"multipleOf": 2}}, [3, 4, 5, 9, 10, 1, 7]),
    "finite: oneOf of enums": ({"type": "array", "oneOf": [{"enum": [[1], [2, 4]]}, {"enum": [[1], [1, 2]]}]},
                               [[1], [2, 4], [1, 2], [3], []]),
    "finite: $ref into a not": ({"allOf": [{"enum": [{"bar": 3}, {"bar": "x"}]}, {"not": {"not": {
        "properties": {"bar": {"$ref": "#/allOf/1/not/not/properties/foo"}, "foo": {"type": "integer"}}}}}]},
        [{"bar": 3}, {"bar": "x"}, {"bar": 4}]),
    "finite node that a $ref points into": ({"properties": {  # not folded: b's target must stay
        "a": {"allOf": [{"enum": [1, 2]}, {"not": {"const": 1}}]}, "b": {"$ref": "#/properties/a/allOf/1"}}},
        [{"a": 2, "b": 5}, {"a": 1}, {"b": 1}, {"a": 3}, {}]),
    # Patterns through an automaton (llmqp.constraints.regular): complements and look-arounds, exactly.
    "not pattern (automaton)": ({"type": "string", "not": {"pattern": "^([a-z][0-9])+$"}},
                                ["a1", "a1b2", "a", "1a", "", "a1b", "ab12"]),
    "not pattern alternation": ({"type": "string", "not": {"pattern": ",,|^,|,$"}},
                                ["a,b", ",a", "a,", "a,,b", "", "ab"]),
    "look-ahead in patternProperties": ({"type": "object", "patternProperties": {"^(?!x)[a-z]+$": {"type": "integer"}},
                                         "additionalProperties": False},
                                        [{"ab": 1}, {"xa": 1}, {"ab": "s"}, {}, {"A": 1}]),
    "look-ahead after a group": ({"type": "string", "pattern": "^(?!.*--)[a-z-]+$"}, ["a-b", "a--b", "--", "ab", ""]),
    "look-ahead at the end": ({"type": "string", "maxLength": 4, "pattern": "[a-z]+(?=\\.j)"},
                              ["a.j", ".j", "a.", "xa.js", "a.jsx"]),
    "anchor inside a group": ({"type": "string", "pattern": "^(a|b$)c"}, ["ac", "bc", "b", "acx", "c"]),
    # min/maxProperties beside optional properties, other keys open: one choice per set of present ones.
    "minProperties 1, open keys": ({"type": "object",
                                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                    "patternProperties": {"^x$": {"type": "string", "maxLength": 2}},
                                    "additionalProperties": False, "minProperties": 1},
                                   [{}, {"a": 1}, {"x": "s"}, {"x": 1}, {"a": 1, "b": 2}, {"b": 2}, {"y": "s"}]),
    "maxProperties, open keys": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a"], "maxProperties": 2},
                                 [{"a": 1}, {"a": 1, "b": 2}, {"a": 1, "x": 1}, {"a": 1, "b": 2, "x": 3}, {}]),
    "minProperties 2 beside one required": ({"type": "object", "properties": {"a": {"type": "integer"},
                                                                              "b": {"type": "integer"}},
                                             "patternProperties": {"^[xy]$": {"type": "integer"}},
                                             "additionalProperties": False,
                                             "required": ["a"], "minProperties": 2, "maxProperties": 3},
                                            [{"a": 1}, {"a": 1, "b": 2}, {"a": 1, "x": 1}, {"a": 1, "b": 2, "x": 3},
                                             {"a": 1, "b": 2, "x": 3, "y": 4}, {"b": 1, "x": 2}]),
    "propertyNames enum beside properties": ({"type": "object", "properties": {"a": {"type": "integer"},
                                                                               "z": {"type": "integer"}},
                                              "additionalProperties": {"type": "string"},
                                              "propertyNames": {"enum": ["a", "b"]}},
                                             [{"a": 1}, {"b": "s"}, {"b": 1}, {"z": 1}, {"c": "s"}, {}]),
    # oneOf whose options share schemas: the shared parts need no negation.
    "oneOf sharing an open map": ({"oneOf": [
        {"type": "object", "properties": {"k": {"const": "a"}, "n": {"type": "integer"}},
         "additionalProperties": {"type": "string"}},
        {"type": "object", "properties": {"k": {"const": "b"}}, "additionalProperties": {"type": "string"}}]},
        [{"k": "a"}, {"k": "a", "n": 1}, {"n": "s"}, {}, {"x": "s"}, {"x": 1}, {"k": "b", "n": 1}]),
    "oneOf sharing an item schema": ({"oneOf": [
        {"type": "object", "properties": {"t": {"const": "a"}, "v": {"type": "array", "items": {"type": "integer"}}},
         "required": ["t"]},
        {"type": "object",
         "properties": {"t": {"enum": ["a", "b"]}, "v": {"type": "array", "items": {"type": "integer"}}},
         "required": ["t"]}]},
        [{"t": "a"}, {"t": "b", "v": [1]}, {"t": "a", "v": [1]}, {"t": "c"}, {"t": "b", "v": ["x"]}]),
    "oneOf with a $ref to a closed object": ({"$defs": {"A": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                              "additionalProperties": False}},
                                              "oneOf": [{"$ref": "#/$defs/A"},
                                                        {"type": "object", "properties": {"b": {"type": "integer"}},
                                                         "additionalProperties": False}]},
                                             [{}, {"a": 1}, {"b": 1}, {"a": 1, "b": 1}]),
    "oneOf negating only the overlapping options": ({"oneOf": [{"type": "integer", "minimum": 0},
                                                               {"type": "integer", "maximum": 10}, {"type": "string"}]},
                                                    [-3, 5, 12, "x", None, 1.5]),
    "oneOf of closed objects with a shared required key": ({"oneOf": [  # the negation keeps every property
        {"type": "object", "properties": {"t": {"const": "a"}, "x": {"type": "string"}}, "required": ["x"],
         "additionalProperties": False},
        {"type": "object", "properties": {"t": {"const": "b"}, "x": {"type": "string"}}, "required": ["x"],
         "additionalProperties": False}]},
        [{"t": "a", "x": "s"}, {"x": "s"}, {"t": "b", "x": "s"}, {"t": "c", "x": "s"}, {"t": "a"}]),
    "oneOf of a tagged union and a map": ({"oneOf": [  # disjoint: a required key's value the map rejects
        {"type": "object", "oneOf": [{"properties": {"type": {"const": "a"}}, "required": ["type"]},
                                     {"properties": {"type": {"const": "b"}}, "required": ["type"]}]},
        {"type": "object", "additionalProperties": {"enum": [False]}, "minProperties": 1, "maxProperties": 1}]},
        [{"type": "a"}, {"x": False}, {"type": False}, {}, {"type": "a", "x": False}, {"x": True}]),
    "oneOf of arrays of disjoint enums": ({"oneOf": [{"type": "array", "items": {"enum": ["a", "b"]}},
                                                     {"type": "array", "items": {"enum": ["c"]}}]},
                                          [["a"], ["c"], [], ["a", "c"], "x", ["b", "a"]]),
    "oneOf told apart type by type": ({"type": ["object", "null"], "required": ["k"], "oneOf": [
        {"properties": {"k": {"const": "a"}, "x": {"type": "array", "items": {"minLength": 2}}}},
        {"properties": {"k": {"const": "b"}, "x": {"type": "array", "items": {"maxLength": 1}}}}]},
        [{"k": "a", "x": ["ab"]}, {"k": "b", "x": ["a"]}, None, {"k": "c"}, {"k": "a", "x": ["a"]}, {"k": "a"}]),
    "optional property of an unsatisfiable definition": ({"$defs": {"U": {"type": "string", "oneOf": [
        {"type": "string"}, {"type": "string"}]}}, "type": "object",
        "properties": {"u": {"$ref": "#/$defs/U"}, "a": {"type": "integer"}}}, [{"a": 1}, {"u": "x"}, {}]),
    "recursive definition merged with a sibling": ({"$defs": {
        "A": {"type": "object", "properties": {"next": {"$ref": "#/$defs/B"}, "n": {"type": "integer"}}},
        "B": {"type": "object", "required": ["n"], "anyOf": [{"$ref": "#/$defs/A"}]}}, "$ref": "#/$defs/A"},
        [{"next": {"n": 1}}, {"next": {}}, {"next": {"n": 1, "next": {"n": "x"}}}, {"next": {"n": 1, "next": {"n": 2}}}]),
    # the merge meets itself inside its own copy (a copy in place would unroll forever)
    "recursive merge that recurs": ({"type": "object", "additionalProperties": {
        "minProperties": 1, "anyOf": [{"type": "string"}, {"$ref": "#/$defs/R"}]}, "$defs": {"R": {
            "type": "object", "additionalProperties": {"minProperties": 1, "anyOf": [{"type": "string"},
                                                                                      {"$ref": "#/$defs/R"}]}}}},
        [{"a": "x"}, {"a": {"b": "y"}}, {"a": {}}, {"a": {"b": {}}}, {"a": {"b": {"c": {"d": "e"}}}}, {"a": ""},
         {"a": {"b": {"c": {"d": {}}}}}, {"a": 1}, {}]),
    "allOf of a recursive definition": ({"$defs": {"F": {"type": "object", "properties": {
        "k": {"allOf": [{"$ref": "#/$defs/F"}, {"$ref": "#/$defs/C"}]}, "n": {"type": "integer"}}},
        "C": {"type": "object", "properties": {"n": {"maximum": 5}}}},
        "anyOf": [{"$ref": "#/$defs/F"}, {"type": "integer"}]},
        [1, {"k": 1}, {}, {"k": {"k": 2}}, {"k": {"k": 2}, "n": 9}, {"k": {"k": 2, "n": 1}}, {"k": {"k": 2, "n": 9}},
         {"k": {"k": {"k": 1, "n": 9}}}, {"k": {"k": {"k": {"k": 1, "n": 9}}}}]),
    # pattern keys that are few become declared properties: the object's keys are known, so they count
    "minProperties over a few pattern keys": ({"type": "object", "additionalProperties": False,
        "properties": {"a": {"type": "integer"}}, "patternProperties": {"^[a-c]$": {"minimum": 1}, "^(c|dd)$": {}},
        "minProperties": 2, "maxProperties": 3},
        [{"a": 1, "b": 2}, {"a": 0, "b": 2}, {"a": 1}, {"dd": 1, "c": 5}, {"c": 0, "dd": 1}, {"a": 1, "b": 1, "c": 1},
         {"a": 1, "b": 1, "c": 1, "dd": 1}, {"e": 1, "a": 1}, {"b": "x", "c": 2}]),
    "negated object over a few pattern keys": ({"type": "object", "additionalProperties": False,
        "patternProperties": {"^[xy]$": {"type": "integer"}}, "not": {"required": ["x"]}},
        [{}, {"y": 1}, {"x": 1}, {"x": 1, "y": 2}, {"y": "1"}, {"z": 1}]),
    # negated member keywords of an object whose other keys are not known: "some member fails them"
    # (the layer; keys kept short so that random walks end)
    "negated additionalProperties": ({"type": "object", "additionalProperties": False,
                                      "patternProperties": {"^[ab]+$": {"type": "boolean"}},
                                      "not": {"additionalProperties": False}},  # (some member: not empty)
                                     [{}, {"a": True}, {"a": True, "b": False}, {"c": True}]),
    "negated patternProperties": ({"type": "object", "additionalProperties": False,
                                   "patternProperties": {"^[ab]+$": {"type": "boolean"}},
                                   "not": {"patternProperties": {"^[ab]+$": {"const": True}}}},
                                  [{}, {"a": True}, {"a": False}, {"a": True, "bb": False}, {"c": False}]),
    "responses that are not only extensions": ({"type": "object", "additionalProperties": False, "patternProperties": {
        "^[0-9]{3}$": {"type": "boolean"}, "^x-[a-z]+$": {"type": "boolean"}}, "not": {
            "type": "object", "additionalProperties": False, "patternProperties": {"^x-[a-z]+$": {}}}},
        [{}, {"x-a": True}, {"200": False}, {"x-a": True, "200": True}, {"200": 1}, {"x-a": True, "x-b": False}]),
    "negated propertyNames": ({"type": "object", "additionalProperties": False,
                               "patternProperties": {"^[ab]+$": {"type": "boolean"}},
                               "not": {"propertyNames": {"maxLength": 2}}},
                              [{}, {"ab": True}, {"abb": True}, {"ab": True, "abab": False}]),
    "negated patternProperties of a property": ({"type": "object", "properties": {"m": {
        "type": "object", "additionalProperties": False, "patternProperties": {"^a[ab]*$": {"type": "boolean"}},
        "not": {"patternProperties": {"^a": {"const": True}}}}}},
        [{}, {"m": {}}, {"m": {"a": True}}, {"m": {"a": False}}, {"m": {"ab": True, "a": False}}, {"m": {"a": 1}}]),
    # ... and where the object's keys are known (a few pattern keys), written as a schema over them
    "negated propertyNames over known keys": ({"type": "object", "additionalProperties": False, "maxProperties": 2,
                                               "patternProperties": {"^[a-d]$": {"type": "integer"}},
                                               "not": {"propertyNames": {"enum": ["a", "b"]}}},
                                              [{}, {"a": 1}, {"c": 1}, {"a": 1, "d": 2}, {"a": 1, "b": 2},
                                               {"a": 1, "b": 2, "c": 3}]),
    "negated patternProperties over known keys": ({"type": "object", "additionalProperties": False,
                                                   "maxProperties": 2,
                                                   "patternProperties": {"^[a-c]$": {"type": "integer"}},
                                                   "not": {"patternProperties": {"^[ab]$": {"minimum": 5}},
                                                           "additionalProperties": False}},
                                                  [{}, {"a": 7}, {"a": 1}, {"c": 9}, {"a": 7, "b": 8}, {"b": 9, "c": 1}]),
    # numbers the grammar cannot describe: generated as numbers, each checked whole by the layer
    "not an integer": ({"type": "number", "not": {"type": "integer"}}, [1, 1.5, 2.0, -0.25, 10, "x"]),
    "oneOf of number ranges": ({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 10}]},
                               [1, 10, 10.5, 9.5, -2, "a"]),
    "not a multiple": ({"type": "integer", "minimum": 1, "not": {"multipleOf": 3}}, [1, 3, 4, 6, 0, 2.5]),
    "oneOf integer or number": ({"oneOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}]},
                                [1, 1.5, "a", 2.0, None, -3]),
    "number options in a property": ({"type": "object", "properties": {"p": {
        "type": "integer", "anyOf": [{"multipleOf": 5}, {"not": {"multipleOf": 2}}]}}},
        [{"p": 10}, {"p": 4}, {"p": 3}, {"p": 2.5}, {"p": 15}, {}]),
    # a layer keyword whose own place is not known (an option among others that admit the same kind):
    # the nearest value at a known place is checked whole when it ends (contains.WholeValue)
    "some item in one of two array options": ({"anyOf": [{"type": "array", "not": {"items": {"type": "integer"}}},
                                                          {"type": "array", "items": {"type": "string"}}]},
                                               [[], ["a"], [1], [1, "a"], [1.5], ["a", 2], 3]),
    "contains in one of two array options": ({"anyOf": [{"type": "array", "contains": {"const": 1}},
                                                         {"type": "array", "items": {"type": "string"}}]},
                                              [[1], [2, 1], ["a"], [], [2], [2, "a"], [True]]),
    "contains node also used in an option": ({"$defs": {"C": {"type": "array", "contains": {"const": 1}}},
                                              "type": "object", "properties": {"a": {"$ref": "#/$defs/C"}, "b": {
                                                  "anyOf": [{"$ref": "#/$defs/C"},
                                                            {"type": "array", "items": {"type": "string"}}]}}},
                                             [{"a": [1]}, {"a": [2]}, {"b": [1]}, {"b": ["x"]}, {"b": [2]}, {"b": []},
                                              {"a": [], "b": [1]}]),
    "oneOf of objects sharing a key": ({"oneOf": [
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}]},
        [{"n": 1}, {"n": 1.5}, {"n": "x"}, {}, {"n": 2.0}, {"n": -0.5, "m": 1}]),
    "negated additionalProperties in an option": ({"anyOf": [
        {"type": "object", "not": {"additionalProperties": False}},
        {"type": "object", "properties": {"x": {"type": "integer"}}}]}, [{}, {"x": 1}, {"x": "a"}, {"y": 1}, 2]),
    "negated multipleOf in options": ({"type": "object", "properties": {"n": {"type": "integer"}}, "oneOf": [
        {"properties": {"n": {"multipleOf": 2}}}, {"properties": {"n": {"multipleOf": 3}}}]},
        [{"n": 2}, {"n": 3}, {"n": 6}, {"n": 5}, {}, {"n": 4}]),
    "number options of a oneOf": ({"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"],
                                   "oneOf": [{"properties": {"n": {"type": "integer"}}},
                                             {"properties": {"n": {"minimum": 1}}}]},
                                  [{"n": 0}, {"n": 1}, {"n": 1.5}, {"n": 0.5}, {"n": -2}]),
    "number checked whole inside recursion": ({"$defs": {"T": {"type": "object", "properties": {
        "v": {"type": "number", "not": {"type": "integer"}}, "k": {"type": "array", "items": {"$ref": "#/$defs/T"}}}}},
        "$ref": "#/$defs/T"}, [{"v": 1.5}, {"v": 1}, {"k": [{"v": 2}]}, {"k": [{"v": 2.5}]}, {"k": [{"k": [{"v": 3}]}]},
                               {"k": [{"k": [{"v": 3.5}]}]}, {"k": [{}]}]),
    # a recursive definition negated while its own oneOf is rewritten reads it as written (not half-way)
    "recursive oneOf negated inside itself": ({"$defs": {
        "R": {"oneOf": [{"enum": ["red", "blue"]}, {"$ref": "#/$defs/S"}]},
        "S": {"oneOf": [{"type": "object", "required": ["ref"], "properties": {"ref": {"type": "string"}},
                         "additionalProperties": False},
                        {"type": "object", "patternProperties": {"^[a-z]{3}$": {"$ref": "#/$defs/R"}},
                         "additionalProperties": False, "minProperties": 1}]}}, "$ref": "#/$defs/R"},
        ["red", "x", {"ref": "primary"}, {"ref": "red"}, {"abc": "red"}, {"abc": {"ref": "x"}}, {"ref": 1}, {}]),
    # "at most n items, or some item fails S" (a negated minItems with items) is one array, at a known place
    "negated items with minItems": ({"type": "object", "properties": {"a": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 2}, {}]}}},
        [{"a": "x"}, {"a": []}, {"a": ["x"]}, {"a": ["x", "y"]}, {"a": ["x", 1]}, {"a": 1}]),
    "negated contains": ({"type": "array", "items": {"type": "integer"}, "not": {"contains": {"minimum": 5}}},
                         [[], [1, 2], [5], [1, 7], [4]]),
    # uniqueItems over numbers bounded away from zero: every prefix still has infinitely many values
    "unique nonzero integers": ({"type": "array", "items": {"type": "integer", "not": {"const": 0}},
                                 "uniqueItems": True}, [[1, 2], [1, 1], [0], [-1, 1], [-1, -1.0], []]),
    "unique positive numbers": ({"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                                 "uniqueItems": True}, [[0.5, 1], [1, 1.0], [0], [2.5, 2.5], [3]]),
    # overlapping patternProperties: split into disjoint parts with the same schemas for llguidance
    "overlapping patternProperties": ({"type": "object", "patternProperties": {
        "^x-": {"type": "string"}, "^[a-z-]+$": {"maxLength": 2}}},
        [{"x-a": "ab"}, {"x-a": "abc"}, {"x-A": "abc"}, {"ab": 1}, {"x-": 1}, {"x-b": 1}, {"q": "abc"}]),
    "overlapping patterns across allOf": ({"type": "object", "allOf": [
        {"patternProperties": {"a": {"type": "integer"}}}, {"patternProperties": {"b": {"minimum": 2}}}]},
        [{"a": 1}, {"ab": 1}, {"ab": 3}, {"b": 1}, {"b": "x"}, {"a": "x"}, {"c": "x"}]),
    "root reference beside other keywords": ({"type": "object", "properties": {
        "child": {"$ref": "#", "required": ["x"]}, "x": {"type": "integer"}}},
        [{}, {"child": {"x": 1}}, {"child": {}}, {"child": {"x": 1, "child": {}}}, {"child": {"x": 1, "child": {"x": 2}}},
         {"child": {"x": "1"}}]),
}


# strict=True closes the items' objects, and the uniqueItems layer enforces open objects only.
STRICT_REFUSED = {"uniqueItems objects"}
# Checked whole at the nearest known place (contains.WholeValue): a prefix may have no valid ending left
# (`{"n":0` under "not both multiples", in a closed object); the layer then raises rather than end invalid.
DEAD_ENDS_POSSIBLE = {"negated multipleOf in options", "oneOf of objects sharing a key", "number options of a oneOf",
                      "recursive oneOf negated inside itself", "number checked whole inside recursion"}


@pytest.mark.parametrize("name", CASES)
def test_accepts_follows_jsonschema(tk, name):
    schema, instances = CASES[name]
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    verdicts = {compact_json(v): valid(schema, v) for v in instances}
    assert True in verdicts.values() and False in verdicts.values(), "each table needs both kinds"
    assert {text: c.accepts(text) for text in verdicts} == verdicts


@pytest.mark.parametrize("name", CASES)
def test_random_walks_that_stop_are_valid(tk, name):
    """Valid by construction: random token walks through the matcher (stopping as soon as EOS is
    allowed, half of the time) produce only outputs that jsonschema validates."""
    schema = CASES[name][0]
    for strict in (False, True):
        if strict and name in STRICT_REFUSED:
            with pytest.raises(ConstraintError, match="strict=False"):
                compile_constraint(make_spec(json_schema=schema, strict=strict), tk)
            continue
        c = compile_constraint(make_spec(json_schema=schema, strict=strict), tk)
        rng = random.Random(7)
        stopped = dead = 0
        for _ in range(60):
            m, out = c.matcher(), []
            try:
                for _ in range(24):
                    allowed = m.allowed().tolist()
                    if 0 in allowed and (len(allowed) == 1 or rng.random() < 0.5):
                        m.accept(0)
                        break
                    tok = rng.choice([t for t in allowed if t != 0])
                    m.accept(tok)
                    out.append(tok)
            except ConstraintError as e:
                assert name in DEAD_ENDS_POSSIBLE and "cannot be completed" in str(e), (name, tk.decode(out), e)
                dead += 1
                continue
            if m.is_done() and m.can_stop():
                stopped += 1
                text = tk.decode(out)  # Decimal: 1e999 and 2e999 are different numbers, not two floats inf
                assert valid(schema, json.loads(text, parse_float=_exact_number)), (name, strict, text)
        assert stopped >= 5 and dead < stopped, (name, strict, stopped, dead)


def test_unique_items_step_by_step(tk):
    """The layer removes exactly the tokens that would repeat an item or open one that cannot be new."""
    from llmqp.testing import token_id, token_texts

    c = compile_constraint(make_spec(json_schema={"type": "array", "items": {"enum": ["ab", "no"]},
                                                  "uniqueItems": True}), tk)
    m = c.matcher()
    for text in ["[", '"', "ab", '"', ","]:
        m.accept(token_id(tk, text))
    assert token_texts(tk, m.allowed()) == {'"'}
    m.accept(token_id(tk, '"'))
    assert token_texts(tk, m.allowed()) == {"n", "no"}  # not "a" / "ab": "ab" is used
    with pytest.raises(ValueError):
        m.accept(token_id(tk, "ab"))
    for text in ["no", '"']:
        m.accept(token_id(tk, text))
    assert token_texts(tk, m.allowed()) == {"]"}  # a `,` would open an item with no unused value
    assert m.forced() == [token_id(tk, "]")]
    m.rollback(2)  # back to `["ab","`: the layer's state rolls back with the grammar's
    assert token_texts(tk, m.allowed()) == {"n", "no"}
    assert m.count_allowed([token_id(tk, t) for t in ["ab", '"']]) == 0
    assert m.count_allowed([token_id(tk, t) for t in ["no", '"', "]", "<|end|>"]]) == 4


def test_unique_open_items_step_by_step(tk):
    """An open item (here an object that admits more keys) is compared when it completes: every token that
    would close a repeat is removed, and the grammar's other continuations stay."""
    from llmqp.testing import token_id, token_texts

    schema = {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "string"}}},
              "uniqueItems": True}
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    m = c.matcher()
    g = compile_constraint(make_spec(json_schema={k: v for k, v in schema.items() if k != "uniqueItems"},
                                     strict=False), tk).matcher()  # the grammar alone, to compare with
    for text in ["[", "{", '"', "n", '"', ":", '"', "a", '"', "}", ",", "{", '"', "n", '"', ":", '"', "a", '"']:
        m.accept(token_id(tk, text))
        g.accept(token_id(tk, text))
    closing = {t for t in token_texts(tk, g.allowed()) if "}" in t}
    assert closing and not closing & token_texts(tk, m.allowed())  # `{"n":"a"}` again: no `}` at all
    assert token_texts(tk, m.allowed()) == token_texts(tk, g.allowed()) - closing  # `,` (one more key) stays
    with pytest.raises(ValueError):
        m.accept(token_id(tk, "}"))
    m.rollback(2)  # back to `[{"n":"a"},{"n":"`: another name completes a new item
    assert m.count_allowed([token_id(tk, t) for t in ["b", '"', "}", "]", "<|end|>"]]) == 5
    m.rollback(15)  # back to `[{`: the first item's state is gone with its tokens
    assert m.count_allowed([token_id(tk, t) for t in ['"', "n", '"', ":", '"', "a", '"', "}", "]"]]) == 9


def test_unique_pattern_items_step_by_step(tk):
    """Strings with a pattern: the layer counts each item's unused completions on the pattern's automaton
    and removes what would leave none (here `^[ab]$`: after "a", only "b" can follow)."""
    from llmqp.testing import token_id, token_texts

    c = compile_constraint(make_spec(json_schema={"type": "array", "items": {"type": "string", "pattern": "^[ab]$"},
                                                  "uniqueItems": True}), tk)
    m = c.matcher()
    for text in ["[", '"', "a", '"', ",", '"']:
        m.accept(token_id(tk, text))
    assert token_texts(tk, m.allowed()) == {"b"}  # "a" is used
    assert m.forced() == [token_id(tk, "b")]
    for text in ["b", '"']:
        m.accept(token_id(tk, text))
    assert token_texts(tk, m.allowed()) == {"]"}  # a third item would have no unused value
    m.rollback(4)  # back to `["a"`
    assert token_texts(tk, m.allowed()) == {",", "]"}
    assert m.count_allowed([token_id(tk, t) for t in [",", '"', "a"]]) == 2


def test_contains_step_by_step(tk):
    """The layer removes exactly the tokens that close the array before an item matches."""
    from llmqp.testing import token_id, token_texts

    c = compile_constraint(make_spec(json_schema={"type": "array", "items": {"enum": ["ab", "no"]},
                                                  "contains": {"const": "no"}}), tk)
    m = c.matcher()
    g = compile_constraint(make_spec(json_schema={"type": "array", "items": {"enum": ["ab", "no"]}}),
                           tk).matcher()  # the grammar alone, to compare with
    for text in ["[", '"', "ab", '"']:
        m.accept(token_id(tk, text))
        g.accept(token_id(tk, text))
    assert token_texts(tk, g.allowed()) == {",", "]"}
    assert token_texts(tk, m.allowed()) == {","}  # `]` would close ["ab"]: no item is "no"
    assert m.forced() == [token_id(tk, ",")]
    with pytest.raises(ValueError):
        m.accept(token_id(tk, "]"))
    assert m.count_allowed([token_id(tk, t) for t in [",", '"', "no", '"', "]", "<|end|>"]]) == 6
    m.rollback(3)  # back to `[`: an empty array has no matching item either
    assert token_texts(tk, m.allowed()) == {'"'}
    assert m.count_allowed([token_id(tk, t) for t in ['"', "no", '"', "]"]]) == 4


@pytest.mark.parametrize("schema, texts", [
    ({"type": "string", "maxLength": 8, "pattern": "^[a-z]*(?<!q)$"},  # a look-behind
     ['"abc"', '"abq"', '""', '"ab1"', '"abcdefghij"', '"q"', "5"]),
    ({"type": "object", "properties": {"re": {"type": "string", "format": "regex"}}},
     ['{"re":"a+"}', '{"re":"(a"}', '{"re":"*"}', "{}", '{"re":"[a-z]{2}"}', '{"re":1}']),
    ({"type": "object", "properties": {"host": {"type": "string", "pattern": "^(?!-)[a-z0-9-]{1,9}(?<!-)$"}}},
     ['{"host":"ab-c"}', '{"host":"-ab"}', '{"host":"ab-"}', '{"host":"a"}', '{"host":"A"}']),
    ({"type": "array", "items": {"anyOf": [  # options that both admit objects: only one may have "fqdn"
        {"type": "object", "required": ["address"], "properties": {"address": {"type": "string"}},
         "additionalProperties": False},
        {"type": "object", "required": ["fqdn"], "additionalProperties": False,
         "properties": {"fqdn": {"type": "string", "maxLength": 12, "pattern": "^[a-z.]+(?<!\\.)$"}}}]}},
     ['[{"fqdn":"a.b"}]', '[{"fqdn":"a."}]', '[{"address":"a."}]', '[{"address":"x"},{"fqdn":"c.d."}]']),
    ({"type": "string", "maxLength": 6, "not": {"pattern": "^(a+)\\1$"}},  # a back-reference
     ['"aa"', '"aaaa"', '"aaa"', '"ab"', '""']),
    ({"type": "string", "maxLength": 6, "not": {"pattern": "^[a&&b]+$"}},  # a class of a, & and b (as ECMA)
     ['"ab"', '"a&"', '"xy"', '"a"']),
])
def test_strings_checked_whole(tk, schema, texts):
    """A string the grammar cannot describe exactly (a look-behind, the regex format) is generated under a
    wider pattern and checked whole by the layer: the closing quote only where jsonschema (formats
    asserted) accepts the string."""
    from llmqp.testing import token_texts

    checker = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    verdicts = {t: checker.is_valid(json.loads(t)) for t in texts}
    assert True in verdicts.values() and False in verdicts.values()
    assert {t: c.accepts(t) for t in texts} == verdicts
    for text, ok in verdicts.items():  # token by token: the last quote is removed exactly where invalid
        head, quote = text.rsplit('"', 1) if '"' in text else (None, None)
        if head is None or not (text.endswith('"') or text.endswith('"}')):
            continue
        m = c.matcher()
        if m.count_allowed(tk.encode(head)) < len(tk.encode(head)):
            assert not ok, text  # the wider pattern already excludes it
            continue
        for tok in tk.encode(head):
            m.accept(tok)
        closing = {t for t in token_texts(tk, m.allowed()) if t.startswith('"')}
        assert ('"' in closing or '"}' in closing) == ok, (text, sorted(closing)[:5])


def test_string_at_its_max_length_must_be_valid(tk):
    """A string checked whole that reaches the grammar's maxLength can only close: the layer takes the
    token that fills it only where the string is then valid (no dead end at `"qqq`)."""
    from llmqp.testing import token_id

    c = compile_constraint(make_spec(json_schema={"type": "string", "maxLength": 3, "pattern": "^[a-z]*(?<!q)$"}),
                           tk)
    m = c.matcher()
    for tok in tk.encode('"qq'):
        m.accept(tok)
    allowed = m.allowed().tolist()
    assert token_id(tk, "q") not in allowed and token_id(tk, "a") in allowed
    assert c.accepts('"qqa"') and not c.accepts('"qqq"')


def test_some_member_step_by_step(tk):
    """A negated patternProperties: the layer removes the tokens that close the object until a member
    fails the negated keywords (here: a value that is not true), and only those."""
    from llmqp.testing import token_id, token_texts

    base = {"type": "object", "additionalProperties": False, "patternProperties": {"^a+$": {"type": "boolean"}}}
    c = compile_constraint(make_spec(json_schema={**base, "not": {"patternProperties": {"^a+$": {"const": True}}}}),
                           tk)
    assert [type(a).__name__ for a in c.contains_arrays.values()] == ["SomeMemberObject"]
    m, g = c.matcher(), compile_constraint(make_spec(json_schema=base), tk).matcher()
    for tok in tk.encode('{"a":true'):
        m.accept(tok)
        g.accept(tok)
    assert "}" in token_texts(tk, g.allowed())
    assert token_texts(tk, m.allowed()) == token_texts(tk, g.allowed()) - {"}"}
    with pytest.raises(ValueError):
        m.accept(token_id(tk, "}"))
    rest = tk.encode(',"aa":false}') + [token_id(tk, "<|end|>")]
    assert m.count_allowed(rest) == len(rest)
    assert not c.accepts('{"a":true}') and c.accepts('{"a":true,"aa":false}') and not c.accepts("{}")
    m = c.matcher()  # a repeated key replaces its member: a witness it overwrites is gone
    for tok in tk.encode('{"a":false,"a":true'):
        m.accept(tok)
    assert "}" not in token_texts(tk, m.allowed())


@pytest.mark.parametrize("schema, text", [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, '["a","\\u0061"]'),
    ({"type": "array", "items": {"type": "number"}, "uniqueItems": True}, "[1,10e-1]"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[0,-0]"),
    ({"type": "array", "items": {"type": "object"}, "uniqueItems": True}, '[{"a":1,"b":[2]},{"b":[2.0],"a":1}]'),
    ({"type": "array", "items": {"type": "array"}, "uniqueItems": True}, '[[1,{"x":null}],[1,{"x":null}]]'),
])
def test_unique_items_use_json_equality(tk, schema, text):
    """Items equal as JSON values but written differently are repeats (jsonschema agrees)."""
    c = compile_constraint(make_spec(json_schema=schema), tk)
    assert not valid(schema, json.loads(text)) and not c.accepts(text)
    m = c.matcher()
    tokens = tk.encode(text)
    assert m.count_allowed(tokens) < len(tokens)  # the matcher refuses the repeat too


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"k": {"type": "integer"}}, "oneOf": [  # a string with a back-reference
        {"properties": {"k": {"const": 1}, "s": {"type": "string", "not": {"pattern": "^(a)\\1$"}}}},
        {"properties": {"k": {"const": 2}}}, {"properties": {"k": {"const": 3}, "s": {"const": "x"}}}]}, "pattern"),
    ({"type": "array", "items": {"type": "object", "additionalProperties": False}, "uniqueItems": True},
     "uniqueItems"),  # items: closed objects (a repeat could be forced)
    ({"type": "array", "items": {"type": "array", "maxItems": 2}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": {"type": "string", "pattern": "^(a)\\1"}, "uniqueItems": True},
     "uniqueItems"),  # a back-reference: its completions are not counted
    ({"type": "array", "items": {"type": "string", "pattern": "^[ab]$"}, "uniqueItems": True, "minItems": 3},
     "uniqueItems"),  # only two distinct items exist
    ({"anyOf": [{"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                {"type": "array", "items": {"type": "string"}}]},
     "uniqueItems"),  # two options admit arrays: which one an array matches is not decidable from its place
    ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 3}, "uniqueItems"),
    ({"type": "object", "properties": {"tags": {"type": "array"}}, "patternProperties": {"^ta": {
        "type": "array", "items": {"type": "string"}, "uniqueItems": True}}},
     "uniqueItems"),  # `tags` is governed by both `properties` and the pattern
    ({"type": "object", "patternProperties": {"^a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                                              "b$": {"type": "array", "items": {"type": "integer"}}}},
     "uniqueItems"),  # a key like "ab" matches both patterns
    ({"type": "object", "allOf": [
        {"properties": {"x": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}},
        {"additionalProperties": {"type": "array", "items": {"type": "integer", "maximum": 3}, "uniqueItems": True}}]},
     "uniqueItems"),  # `x` is additional to the second part: two schemas for one array
    ({"type": "array", "contains": {"type": "integer"}, "maxItems": 3}, "contains"),  # could fill up unmatched
    ({"type": "array", "prefixItems": [{"type": "string"}], "contains": {"type": "integer"}}, "contains"),
    ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, "contains"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 3}, "uniqueItems": True}, "contains"),
    ({"$defs": {"U": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "type": "object",
      "properties": {"a": {"$ref": "#/$defs/U"},
                     "b": {"anyOf": [{"$ref": "#/$defs/U"}, {"type": "array", "items": {"type": "string"}}]}}},
     "uniqueItems"),  # (its keyword is removed for the layer: `b` would lose it)
    ({"type": "array", "contains": {"$ref": "#/$defs/missing"}}, "contains"),  # jsonschema could not decide
    ({"type": "object", "maxProperties": 2, "not": {"propertyNames": {"maxLength": 2}}}, "propertyNames"),
    ({"type": "object", "properties": {"a": {}}, "propertyNames": {"pattern": "^a"}}, "propertyNames"),
])
def test_inexpressible_keywords_are_refused(tk, schema, keyword):
    with pytest.raises(ConstraintError, match=f'"{keyword}"'):
        compile_constraint(make_spec(json_schema=schema, strict=False), tk)


@pytest.mark.parametrize("schema, instances", [
    ({"oneOf": [{"format": "uuid"}, {"pattern": "^\\$[A-Z]+"}]},
     ["123e4567-e89b-12d3-a456-426614174000", "$ABC", 5, "xyz", None, "$abc"]),
    ({"type": "string", "oneOf": [{"format": "ipv4"}, {"format": "ipv6"}]}, ["10.0.0.1", "::1", "fe80::1", "host"]),
])
def test_one_of_formats_told_apart_by_their_shapes(tk, schema, instances):
    """oneOf options with formats llguidance enforces itself are disjoint where a superset pattern of each
    format (a uuid is hex and dashes, an IPv6 address has a colon) shares no string with the other
    option's: then oneOf is anyOf among strings, and non-strings (valid against both) are refused.
    Checked against jsonschema with formats asserted, as MaskBench's labels are."""
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    verdicts = {compact_json(v): checker.is_valid(v) for v in instances}
    assert True in verdicts.values() and False in verdicts.values()
    assert {text: c.accepts(text) for text in verdicts} == verdicts


def test_deep_rewrites_stay_within_the_backends_nesting_limit(tk):
    """`not` of a value nested 60 deep is rewritten past the 128 levels llguidance's JSON reader takes;
    deep parts move into definitions (schema.shallow), and the result is exact."""
    from llmqp.constraints.schema import DEPTH_LIMIT, shallow

    value: object = 1
    for _ in range(60):
        value = {"a": value}
    schema = {"type": "object", "not": {"const": value}}
    c = compile_constraint(make_spec(json_schema=schema), tk)
    other = json.loads(json.dumps(value).replace("1", "2"))
    for instance in (value, other, {"a": 1}, {}):
        assert c.accepts(compact_json(instance)) == valid(schema, instance)
    deep = {"anyOf": [{"properties": {"a": {"anyOf": [{"x": 1}]}}}]}
    for _ in range(30):
        deep = {"anyOf": [{"properties": {"a": deep}}]}
    assert len(json.dumps(shallow(deep))) > len(json.dumps(deep))  # moved into $defs, referenced
    assert _depth(shallow(deep)) <= DEPTH_LIMIT < _depth(deep)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("pattern", ["^ab?$", "^[a/]{2,3}$", "^a[ab]+$", "^\\d", "ab", "aab", "^[^ab]*$", "[^a]",
                                     "^$", "^/b$"])
def test_pattern_complement_is_exact(tk, pattern):
    """Every string over a small alphabet (length <= 5): the complement matches exactly when the pattern,
    searched as ECMA-262 does (`$` is the end), does not."""
    from itertools import product

    from llmqp.constraints.keywords import _complement_pattern

    c = compile_constraint(make_spec(json_schema={"type": "string", "pattern": _complement_pattern(pattern)}), tk)
    ecma = re.compile(pattern[:-1] + "\\Z" if pattern.endswith("$") else pattern)
    for n in range(6):
        for chars in product("ab/1", repeat=n):
            text = "".join(chars)
            assert c.accepts(json.dumps(text)) == (ecma.search(text) is None), text


@pytest.mark.parametrize("pattern", ["^([ab][1/])+$", "^a..$", "a$|^b", ",,|^,|,$", "^(?!ab)[ab1]+$",
                                     "^(?!.*(a1|/b)).*1$", "^[^/]+/[^/]+$", "b(?=1)", "^(a|b$)1", "(^a|b)/",
                                     "^\\d+\\s?$", "^(?=.{2,3}$)[ab]+1?$"])
def test_regular_language_rewrites_are_exact(tk, pattern):
    """`regular.complement` and `regular.without_lookaround` against Python's own search (ECMA-262's `$`:
    the end), on every string over a small alphabet up to length 5."""
    from itertools import product

    from llmqp.constraints import regular

    search = re.compile(pattern.replace("$", "\\Z"))
    outs = [(False, regular.without_lookaround(pattern))]
    if "(?" not in pattern:
        outs.append((True, regular.complement(pattern)))
    for negated, out in outs:
        assert out is not None and out.startswith("^") and out.endswith("$"), (pattern, out)
        # read by llguidance (Rust's regex syntax), as the grammar will
        c = compile_constraint(make_spec(json_schema={"type": "string", "pattern": out}), tk)
        for n in range(6):
            for chars in product("ab1/ \n", repeat=n) if n < 5 else product("ab1/", repeat=n):
                text = "".join(chars)
                assert c.accepts(json.dumps(text)) == ((search.search(text) is None) == negated), (out, text)


def test_regular_language_refusals():
    from llmqp.constraints import regular

    assert regular.complement("^(a)\\1$") is None  # back-reference
    assert regular.complement("^[a&&b]$") is None  # read otherwise by Rust
    assert regular.without_lookaround("a(?!b)c") is None  # a look-ahead not after the leading ^
    assert regular.without_lookaround("(?<=a)b") is None  # look-behind
    assert regular.needs_rewrite("^(?!x)y") and regular.needs_rewrite("^(a|b$)c")
    assert not regular.needs_rewrite("^[^$]+$") and not regular.needs_rewrite("^a$|^b$")


@pytest.mark.parametrize("patterns", [("a", "c"), ("^x-", "^[a-z-]+$", "-$"), ("^a", "b$", "ab")])
def test_pattern_atoms_split_exactly(patterns):
    """`regular.pattern_atoms`: disjoint parts that together find what the patterns find, each found by
    exactly the patterns it says (against Python's own search, every string up to length 4)."""
    from itertools import product

    from llmqp.constraints import regular

    atoms = regular.pattern_atoms(patterns)
    assert atoms is not None
    compiled = [(found_by, re.compile(contains_python(regex))) for found_by, regex in atoms]
    for n in range(5):
        for chars in product("abcx-", repeat=n):
            text = "".join(chars)
            found_by = frozenset(i for i, p in enumerate(patterns) if re.search(p, text))
            parts = [f for f, r in compiled if r.search(text)]
            assert parts == ([found_by] if found_by else []), (text, parts)


def contains_python(regex: str) -> str:
    from llmqp.constraints.contains import python_regex

    return python_regex(regex)


def test_back_references_are_found():
    from llmqp.constraints import regular

    assert regular.has_backreference("^(a)\\1$") and regular.has_backreference("(?P<x>a)(?P=x)")
    assert not regular.has_backreference("^a\\d\\\\1$") and not regular.has_backreference(None)


def test_whole_value_step_by_step(tk):
    """A layer keyword whose place is not known (here "not an integer" in one of two options that admit
    objects with the key) is checked on the nearest value at a known place: the token that would close
    it is removed while that value fails the schema, and the grammar's other continuations stay."""
    from llmqp.testing import token_id, token_texts

    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"],
              "oneOf": [{"properties": {"n": {"type": "integer"}}}, {"properties": {"n": {"minimum": 1}}}]}
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    from llmqp.constraints.contains import WholeValue
    assert any(isinstance(v, WholeValue) for v in c.contains_arrays.values())
    m = c.matcher()
    for text in ["{", '"', "n", '"', ":", "1"]:  # 1: an integer, and >= 1: both options match
        m.accept(token_id(tk, text))
    allowed = token_texts(tk, m.allowed())
    assert "}" not in allowed and "," in allowed and "2" in allowed
    with pytest.raises(ValueError):
        m.accept(token_id(tk, "}"))
    for text in [".", "5", "}"]:  # 1.5: only "minimum 1"
        m.accept(token_id(tk, text))
    assert m.can_stop()
    m.rollback(3)
    m.accept(token_id(tk, ","))  # more members do not help `{"n":1,...}`: still both options
    assert c.accepts('{"n":0}') and c.accepts('{"n":2.5}') and not c.accepts('{"n":3}')


def test_overlapping_pattern_properties_are_split(tk):
    from llmqp.constraints import keywords

    schema = {"type": "object", "allOf": [{"patternProperties": {"^a": {"type": "integer"}}},
                                          {"patternProperties": {"b$": {"minimum": 2}, "^a": {"maximum": 9}}}]}
    split = json.loads(json.dumps(schema))
    assert keywords.disjoint_patterns(split) == 2
    parts = [set(part["patternProperties"]) for part in split["allOf"]]
    assert len(parts[0] | parts[1]) == 3 and parts[0] < parts[1] | parts[0]  # one partition, shared by both
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    for value in ({"ab": 2}, {"ab": 1}, {"ab": 10}, {"a": 10}, {"xb": 1}, {"xb": 3}, {"a": 1.5}):
        assert c.accepts(compact_json(value)) == valid(schema, value), value
    # a word anywhere and its complement: parts too long for llguidance to prove disjoint, refused by name
    with pytest.raises(ConstraintError, match="/a/ and /additionalProperties/ are not disjoint"):
        compile_constraint(make_spec(json_schema={"type": "object", "patternProperties": {
            "a": {"type": "integer"}, "additionalProperties": False}}), tk)


@pytest.mark.parametrize("items, enforced", [
    ({"type": "integer", "minimum": 1}, True), ({"type": "integer", "exclusiveMaximum": 0}, True),
    ({"type": "number", "minimum": 0.5}, True), ({"type": "integer", "not": {"enum": [0]}}, True),
    ({"type": "integer", "minimum": 0}, False),  # `0` cannot grow: a repeat could be forced
    ({"type": "number", "maximum": 0}, False), ({"type": "integer", "minimum": 1, "maximum": 9}, False),
    ({"type": "number", "minimum": -1}, False),
])
def test_unique_numbers_away_from_zero(tk, items, enforced):
    schema = {"type": "array", "items": items, "uniqueItems": True}
    if not enforced:
        with pytest.raises(ConstraintError, match="uniqueItems"):
            compile_constraint(make_spec(json_schema=schema), tk)
        return
    c = compile_constraint(make_spec(json_schema=schema), tk)
    for value in ([1, 2], [2, 2], [2, 2.0], [-1, -2], [-3, -3], [0.5, 0.75]):
        assert c.accepts(compact_json(value)) == valid(schema, value), value


def test_bounded_numbers_have_no_exponent(tk):
    """The uniqueItems layer's rays (more digits move away from zero) rely on llguidance writing bounded
    numbers without an exponent (`5e-1` would have only finitely many completions)."""
    for schema in ({"type": "number", "exclusiveMinimum": 0}, {"type": "integer", "minimum": 1},
                   {"type": "number", "maximum": -0.5}):
        c = compile_constraint(make_spec(json_schema=schema), tk)
        assert not any(c.accepts(t) for t in ("5e-1", "5E-1", "-5e-1", "1e2", "-1e2")), schema


def test_finite_words_of_a_pattern():
    """`regular.finite_words`: every string the pattern finds, checked against Python's search over all
    short strings of the pattern's letters; None for infinitely many or too many."""
    import itertools
    import re

    from llmqp.constraints import regular

    for pattern in ["^[a-c]$", "^(ab|c)?$", "^x(y|zz)$", "^$", "^[0-2][0-1]$", "^(a|b)(a|b)?$"]:
        words = regular.finite_words(pattern)
        letters = sorted(set("".join(words)) | {"q"})
        every = ["".join(t) for n in range(4) for t in itertools.product(letters, repeat=n)]
        assert list(words) == sorted(w for w in every if re.search(pattern, w) and not w.endswith("\n")), pattern
    assert regular.finite_words("a") is None  # search: any text around it
    assert regular.finite_words("^a+$") is None
    assert regular.finite_words("^[a-z]{2}$") is None  # 676 > 64
    assert regular.finite_words("^\\d$") is None  # Unicode digits: not enumerated
    assert regular.finite_words("^[a&&b]$") is None


def test_finite_rewrite_needs_the_original_node(tk):
    """A node the rewrite made (negations mix drafts' keywords) is never folded: only schema nodes as the
    user wrote them are checked with jsonschema; and a `format` keeps the keyword-by-keyword path."""
    from llmqp.constraints import keywords

    schema = {"allOf": [{"enum": ["a", "b"]}, {"not": {"const": "a"}}]}
    assert keywords.rewrite(schema) == {"enum": ["b"]}
    with_format = {"allOf": [{"enum": ["2020-01-01", "x"]}, {"not": {"format": "date"}}]}
    with pytest.raises(ConstraintError, match='"format"'):
        keywords.rewrite(with_format, some_item=False)
    c = compile_constraint(make_spec(json_schema=with_format), tk)  # a string the layer checks whole instead
    assert c.accepts('"x"') and not c.accepts('"2020-01-01"')


def test_oneof_of_objects_is_an_anyof_inside_an_object_schema():
    """The surrounding `type: object` makes a discriminator a proof even when the options say no type."""
    from llmqp.constraints.keywords import _provably_disjoint

    options = [{"properties": {"k": {"const": "a"}}, "required": ["k"]},
               {"properties": {"k": {"const": "b"}}, "required": ["k"]}]
    assert not _provably_disjoint(options)  # a string matches both
    assert _provably_disjoint(options, context=frozenset({"object"}))
    # values jsonschema rejects against a scalar-only option (formats checked) are disjoint from it
    assert _provably_disjoint([{"format": "uri"}, {"enum": [".", "a b"]}])
    assert not _provably_disjoint([{"format": "uri"}, {"enum": [".", "http://a"]}])
    assert not _provably_disjoint([{"format": "color"}, {"enum": ["x"]}])  # not enforced here: no proof
    tagged = {"type": "object", "oneOf": [{"properties": {"k": {"const": "a"}}, "required": ["k"]},
                                          {"properties": {"k": {"const": "b"}}, "required": ["k"]}]}
    assert _provably_disjoint([tagged, {"type": "object", "additionalProperties": {"type": "boolean"}}])
    assert _provably_disjoint([tagged, {"type": "object", "properties": {"x": {}}, "additionalProperties": False}])
    assert not _provably_disjoint([tagged, {"type": "object", "additionalProperties": {"type": "string"}}])


def test_oneof_of_a_format_and_values_it_rejects(tk):
    """Formats asserted (as jsonschema's FormatChecker does): "." is no URI, so the options are disjoint."""
    schema = {"type": "string", "oneOf": [{"format": "uri"}, {"enum": ["."]}]}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    c = compile_constraint(make_spec(json_schema=schema), tk)
    verdicts = {json.dumps(v): checker.is_valid(v) for v in ["http://a.b/c", ".", "x", "./a"]}
    assert True in verdicts.values() and False in verdicts.values()
    assert {text: c.accepts(text) for text in verdicts} == verdicts


def test_recursive_merge_is_inlined(tk):
    """llguidance alone refuses the schema ("circular references with sibling keys"); a copy of the
    definition merged in its place compiles to the same instances."""
    import llguidance

    from llmqp.constraints import keywords

    schema = CASES["recursive definition merged with a sibling"][0]
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"lenient": False})
    assert "circular references" in (llguidance.LLMatcher.validate_grammar(grammar, None) or "")
    assert compile_constraint(make_spec(json_schema=schema, strict=False), tk).accepts('{"next":{"n":1}}')
    # a merge met again inside its own copy becomes one new definition that refers to itself
    recurring = CASES["recursive merge that recurs"][0]
    grammar = llguidance.LLMatcher.grammar_from_json_schema(recurring, overrides={"lenient": False})
    assert "circular references" in (llguidance.LLMatcher.validate_grammar(grammar, None) or "")
    merged = json.loads(json.dumps(recurring))
    assert keywords.inline_merged_refs(merged, "#/$defs/R") == 3  # the root's, R's, and the copy's own
    assert sorted(merged["$defs"]) == ["R", "llmqp-merged-0"]
    assert merged["additionalProperties"]["anyOf"][1] == {"$ref": "#/$defs/llmqp-merged-0"}
    assert "circular" not in (llguidance.LLMatcher.validate_grammar(
        llguidance.LLMatcher.grammar_from_json_schema(merged, overrides={"lenient": False}), None) or "")


def test_flexible_whitespace_is_bounded(tk):
    c = compile_constraint(make_spec(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}},
                                     whitespace="flexible"), tk)
    limit = " " * WHITESPACE_MAX_RUN
    assert c.accepts('{\n  "a": 1\n}') and c.accepts("{" + limit + '"a":1}')
    assert not c.accepts("{" + limit + ' "a":1}')
    m = c.matcher()  # the model cannot loop on whitespace: after the maximum run, only `"` or `}`
    m.accept(tk.encode("{")[0])
    for _ in range(WHITESPACE_MAX_RUN):
        m.accept(tk.encode(" ")[0])
    assert tk.encode(" ")[0] not in m.allowed().tolist()


def test_key_order_is_free_when_not_strict(tk):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                               "c": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                      "y": {"type": "integer"}}}}}
    lenient = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    strict = compile_constraint(make_spec(json_schema=schema), tk)
    swapped = '{"c":{"y":1,"x":2},"b":"no","a":1}'
    assert valid(schema, json.loads(swapped))
    assert lenient.accepts(swapped) and lenient.accepts('{"b":"no","a":1}')
    assert not lenient.accepts('{"b":1,"a":1}')  # reordering never widens: b must still be a string
    assert not strict.accepts(swapped) and strict.accepts('{"a":1,"b":"no","c":{"x":2,"y":1}}')


FORMATS = {  # each instance's verdict comes from jsonschema's FormatChecker (format extras installed)
    "date-time": ["2024-01-02T03:04:05Z", "2024-01-02t03:04:05.25+01:30", "2024-02-29T00:00:00z",
                  "2023-02-29T00:00:00Z", "2024-13-02T03:04:05Z", "2024-01-02T23:59:60Z", "2024-01-02T03:04:05",
                  "0000-01-01T00:00:00Z"],
    "date": ["2024-01-02", "2024-02-29", "2000-02-29", "1900-02-29", "2023-02-29", "2024-04-31", "2024-1-2",
             "0000-01-01"],
    "time": ["03:04:05Z", "23:59:59.5-08:00", "25:04:05Z", "23:59:60Z", "03:04:05"],
    "email": ["ada@example.com", "ada.example.com"],
    "idn-email": ["ada@example.com", "ädä@bêta", "ada.example.com"],
    "uuid": ["123e4567-e89b-12d3-a456-426655440000", "123e4567-e89b-12d3-a456"],
    "uri": ["https://example.com/a?b=1#c", "urn:isbn:0451450523", "not a uri", "/relative"],
    "uri-reference": ["https://example.com/a?b=1", "../a/b?c#d", "//example.com", "", "#frag",
                      "http://[::1]:8080/", "a b", "%zz", "http://ex.com/ü"],
    "iri": ["http://ex.com/ü?q=1", "urn:a", "ü", "http://ex.com/a b"],
    "iri-reference": ["http://ex.com/ü", "ü/ö", "", "a b", "%zz"],
    "ipv4": ["192.168.0.1", "192.168.0.256", "01.2.3.4"],
    "ipv6": ["2001:db8::1", "::", "2001:db8:::1", "1:2:3:4:5:6:7:8:9"],
    "hostname": ["example.com", "a" * 63 + ".com", "-bad-.com", "a" * 64 + ".com",
                 ".".join(["a" * 50] * 5), ".".join(["a" * 50] * 5)[:253]],
    "duration": ["P1Y2M3DT4H5M6S", "PT1H", "P1W", "P", "1Y"],
    "json-pointer": ["", "/a~1b/0", "/", "/a~2", "a"],
    "relative-json-pointer": ["0", "1/a~0", "0#", "10/x", "01", "100", "", "#", "1#/a"],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_follow_jsonschema_format_checker(tk, fmt):
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    if fmt not in checker.checkers:
        pytest.skip(f"jsonschema cannot check {fmt!r} here (install jsonschema[format])")
    schema = {"type": "string", "format": fmt}
    c = compile_constraint(make_spec(json_schema=schema), tk)
    verdicts = {v: checker.conforms(v, fmt) for v in FORMATS[fmt]}
    assert True in verdicts.values() and False in verdicts.values(), "each table needs both kinds"
    assert {v: c.accepts(json.dumps(v, ensure_ascii=False)) for v in verdicts} == verdicts


def test_format_beside_a_pattern_and_on_other_types(tk):
    """The format's pattern is intersected with the schema's own; non-strings are not constrained."""
    c = compile_constraint(make_spec(json_schema={"pattern": "^2", "format": "date", "maxLength": 10},
                                     strict=False), tk)
    assert [c.accepts(json.dumps(v)) for v in ["2024-02-29", "1999-01-01", "2023-02-29", 7, None]] == \
        [True, False, False, True, True]


@pytest.mark.parametrize("fmt", ["int32", "url", "path", "unknown"])
def test_unknown_format_is_refused_unless_annotation(tk, fmt):
    schema = {"type": "object", "properties": {"a": {"type": "string", "format": fmt}}, "required": ["a"]}
    with pytest.raises(ConstraintError, match=f'"format" at #/properties/a/format .*unknown format "{fmt}"'):
        compile_constraint(make_spec(json_schema=schema), tk)
    c = compile_constraint(make_spec(json_schema=schema, unknown_formats="annotation"), tk)
    for value in ({"a": "anything at all"}, {"a": ""}, {"a": 1}):  # as jsonschema (with formats) reads it
        checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        assert c.accepts(compact_json(value)) == checker.is_valid(value), value


@pytest.mark.parametrize("string", [
    {"type": "string", "format": "regex"},  # standard, not regular
    {"type": "string", "format": "idn-hostname"},
    {"type": "string", "not": {"format": "date"}},
])
def test_standard_formats_without_exact_form(tk, string):
    """Checked whole by the layer (jsonschema's format checker) where the string's place is known, under
    either policy; where it is not (an option among others), the value at the nearest known place is."""
    checker = jsonschema.Draft202012Validator(string, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for policy in ("refuse", "annotation"):
        c = compile_constraint(make_spec(json_schema=string, unknown_formats=policy), tk)
        for value in ["(a", "a+", "xn--bcher-kva.example", "-a", "2024-01-02", "2024-13-02", "ok"]:
            assert c.accepts(json.dumps(value)) == checker.is_valid(value), (value, string)
        nested = {"type": "object", "properties": {"k": {"type": "integer"}}, "oneOf": [
            {"properties": {"k": {"const": 1}, "s": string}, "required": ["s"]},
            {"properties": {"k": {"const": 2}, "s": {"const": 5}}}]}
        c = compile_constraint(make_spec(json_schema=nested, unknown_formats=policy), tk)
        whole = jsonschema.Draft202012Validator(nested, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        for value in ({"k": 1, "s": "(a"}, {"k": 1, "s": "a+"}, {"k": 1, "s": "2024-01-02"}, {"k": 1, "s": "ok"},
                      {"k": 2, "s": 5}, {"k": 1, "s": 5}, {"k": 2}):
            assert c.accepts(compact_json(value)) == whole.is_valid(value), (value, string)


def test_formats_are_rewritten_where_only_a_ref_reaches(tk):
    """`#/definitions/group/d`: `group` is no keyword, so only the reference reaches `d` as a schema."""
    schema = {"definitions": {"group": {"d": {"type": "string", "format": "date"}}}, "$ref": "#/definitions/group/d"}
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for value in ("2024-02-29", "2023-02-29"):
        assert c.accepts(json.dumps(value)) == checker.is_valid(value)


def _base64(value: str) -> bool:
    import base64
    import binascii

    try:
        base64.b64decode(value, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


def test_openapi_byte_is_padded_base64(tk):
    """OpenAPI's `byte` (base64, RFC 4648): exactly what Python's strict decoder takes."""
    c = compile_constraint(make_spec(json_schema={"type": "string", "format": "byte"}), tk)
    values = ["", "QQ==", "QR==", "QUI=", "QUJD", "SGVsbG8gd29ybGQ=", "QUJDRA=", "QUJDRA", "Q===", "====",
              "QUJD\nRA==", "QU JD", "-_ab", "ab+/cd==", "not base64", "-----BEGIN CERTIFICATE-----"]
    verdicts = {v: _base64(v) for v in values}
    assert True in verdicts.values() and False in verdicts.values()
    assert {v: c.accepts(json.dumps(v)) for v in values} == verdicts


@pytest.mark.parametrize("fmt", ["password", "binary"])
def test_openapi_formats_without_a_constraint_take_any_string(tk, fmt):
    c = compile_constraint(make_spec(json_schema={"type": "string", "format": fmt}), tk)
    assert all(c.accepts(json.dumps(v, ensure_ascii=False)) for v in ["", "hunter2", "a b\n\u00e9\"", "\u0000"])
    assert not c.accepts("1")


@pytest.mark.parametrize("alias, fmt", [("host-name", "hostname"), ("ip-address", "ipv4")])
def test_draft3_format_names_are_their_later_formats(tk, alias, fmt):
    c = compile_constraint(make_spec(json_schema={"type": "string", "format": alias}), tk)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    if fmt not in checker.checkers:
        pytest.skip(f"jsonschema cannot check {fmt!r} here (install jsonschema[format])")
    verdicts = {v: checker.conforms(v, fmt) for v in FORMATS[fmt]}
    assert {v: c.accepts(json.dumps(v)) for v in verdicts} == verdicts


@pytest.mark.parametrize("schema", [{"type": "string", "format": "int32"}, {"format": "int64"}])
def test_numeric_openapi_formats_on_strings_are_refused(tk, schema):
    """int32 on a string has no defined meaning (on numbers every format is an annotation)."""
    with pytest.raises(ConstraintError, match='unknown format "int'):
        compile_constraint(make_spec(json_schema=schema), tk)
    number = compile_constraint(make_spec(json_schema={"type": "integer", "format": "int32"}), tk)
    assert number.accepts(str(2**40))  # as jsonschema reads it


def test_unknown_format_under_not_is_an_annotation(tk):
    schema = {"type": "string", "not": {"format": "url", "maxLength": 2}}  # not (maxLength 2)
    c = compile_constraint(make_spec(json_schema=schema, unknown_formats="annotation"), tk)
    assert [c.accepts(json.dumps(v)) for v in ["ab", "abc"]] == [valid(schema, v) for v in ["ab", "abc"]]


def test_try_accept_and_rollback(tk):
    c = compile_constraint(make_spec(json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                                  "required": ["a"]}), tk)
    m = c.matcher()
    tokens = tk.encode('{"a":12}') + [0]
    start = m.allowed().tolist()
    assert m.count_allowed(tokens) == len(tokens) and m.allowed().tolist() == start  # did not advance
    assert m.try_accept(tokens) == len(tokens) and m.is_done() and m.allowed().size == 0
    m.rollback(2)  # EOS and `}`
    assert not m.can_stop() and tk.encode("}")[0] in m.allowed().tolist()
    m.rollback(len(tokens) - 2)
    assert m.allowed().tolist() == start
    draft = tk.encode('{"a":1x}')
    n = m.try_accept(draft)
    assert tk.decode(draft[:n]) == '{"a":1'  # stops at the first token the constraint refuses
    with pytest.raises(ValueError):
        m.rollback(n + 1)
    m.rollback(n)
    for tok in tokens:  # still a working matcher
        m.accept(tok)
    assert m.can_stop()


@pytest.mark.slow
@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8, "not": {"enum": ["yes", "no"]}}},
     "required": ["answer"]},
    {"type": "object", "properties": {"n": {"oneOf": [{"type": "integer", "minimum": 0},
                                                      {"type": "integer", "maximum": 10}]}}, "required": ["n"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": {"type": "string", "maxLength": 12}},
     "required": ["kind"], "if": {"properties": {"kind": {"const": "cat"}}}, "then": {"required": ["name"]},
     "else": {"not": {"required": ["name"]}}},
    {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "maxLength": 8}},
     "dependentRequired": {"city": ["zip"]}, "required": ["city"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "uniqueItems": True, "minItems": 3}}, "required": ["colors"]},
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "uniqueItems": True, "minItems": 4,
     "maxItems": 6},
    {"type": "array", "items": {"type": "string", "pattern": "^[a-c]{1,2}$"}, "uniqueItems": True, "minItems": 4,
     "maxItems": 6},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                      "at": {"type": "string", "format": "time", "maxLength": 14}},
     "required": ["day", "at"]},
    {"type": "object", "properties": {"ref": {"type": "string", "format": "uri-reference", "maxLength": 16},
                                      "ptr": {"type": "string", "format": "json-pointer", "maxLength": 8}},
     "required": ["ref", "ptr"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10, "not": {"pattern": "^\\s*$"}}},
     "required": ["name"]},
    {"type": "object", "properties": {"id": {"type": "string", "maxLength": 10, "pattern": "^(?!.*--)[a-z-]+$"},
                                      "n": {"type": "integer", "minimum": 1, "maximum": 9, "not": {"multipleOf": 2}}},
     "required": ["id", "n"]},
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 6}, "b": {"type": "integer"}},
     "additionalProperties": {"type": "integer"}, "minProperties": 1, "maxProperties": 2,
     "propertyNames": {"enum": ["a", "b", "c"]}},
    # numbers and strings the token-level layer checks whole
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000,
                                                "not": {"type": "integer"}}}, "required": ["price"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 99, "not": {"multipleOf": 2}}},
     "required": ["n"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10, "pattern": "^[a-z]+(?<!x)$"}},
     "required": ["name"]},
    {"type": "object", "properties": {"re": {"type": "string", "format": "regex", "maxLength": 12}}, "required": ["re"]},
])
def test_generation_validates(engine, schema):
    """Real model, few tokens: whenever it stops, the output validates (uniqueItems: a small model
    repeats list items readily, so the layer is exercised)."""
    r = engine.generate("Answer in JSON. Repeat yourself.", json_schema=schema, max_tokens=40)
    assert r.finish_reason == "stop", r.text  # greedy; every schema here bounds its output
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER  # formats are asserted where jsonschema can
    assert r.valid and jsonschema.Draft202012Validator(schema, format_checker=checker).is_valid(json.loads(r.text)), \
        r.text


_PEOPLE = {"type": "object", "properties": {"people": {
    "type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
                               "required": ["name"]}, "uniqueItems": True, "minItems": 2, "maxItems": 3}},
    "required": ["people"]}


@pytest.mark.slow
def test_generation_with_unique_objects(engine):
    """Real model, greedy, uniqueItems on objects that admit more keys (strict=False): the output stops
    and validates; where the model repeats an item, the layer keeps the repeat from closing (here it
    adds a key), so no stopped output has two equal items."""
    r = engine.generate("Answer in JSON. Repeat yourself.", json_schema=_PEOPLE, strict=False, max_tokens=80)
    assert r.finish_reason == "stop" and r.valid and valid(_PEOPLE, json.loads(r.text)), r.text
    r = engine.generate("Answer in JSON. List the same person twice: Bob and Bob.", json_schema=_PEOPLE,
                        strict=False, max_tokens=40)
    start = r.text.index("[") + 1
    _, end = json.JSONDecoder().raw_decode(r.text, start)  # the first item, complete
    first = r.text[start:end]
    assert r.text.count(first[:-1]) >= 2, r.text  # the model wrote the first item's keys again ...
    assert r.text.count(first) == 1, r.text  # ... and the layer kept it from closing there
    assert r.finish_reason == "stop" or not r.valid, r.text


_COLORS = {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                       "contains": {"const": "blue"}}}, "required": ["colors"]}
_SCORES = {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9},
                                                       "not": {"items": {"maximum": 5}}}}, "required": ["scores"]}


_RESPONSES = {"type": "object", "properties": {"responses": {
    "type": "object", "additionalProperties": False, "patternProperties": {
        "^[0-9]{3}$": {"type": "string", "maxLength": 12}, "^x-[a-z]{1,6}$": {"type": "string", "maxLength": 8}},
    "not": {"additionalProperties": False, "patternProperties": {"^x-[a-z]{1,6}$": {}}}}}, "required": ["responses"]}


# oneOf over objects that may share keys: "seconds is not an integer >= 900" in the first option has no
# known place (either option may govern the object), so the whole `auth` value is checked when it closes
_AUTH = {"type": "object", "properties": {"auth": {"oneOf": [
    {"type": "object", "properties": {"key": {"type": "string", "maxLength": 8}}, "required": ["key"]},
    {"type": "object", "properties": {"seconds": {"type": "integer", "minimum": 900}}, "required": ["seconds"]}]}},
    "required": ["auth"], "additionalProperties": False}


@pytest.mark.slow
@pytest.mark.parametrize("prompt, schema, stops", [
    ("The API answers 200 with OK.", _RESPONSES, True),  # negated object keywords: some key is no extension
    ("Vendor extension x-id is abc.", _RESPONSES, False),  # greedy writes only x- keys: `}` stays removed
    ("Favourite colors: blue and red.", _COLORS, True),
    ("The scores were 8 and 9.", _SCORES, True),  # `not items`: some item above 5
    ("List the colors red, red, green.", _COLORS, False),  # greedy repeats red/green: never "blue"
])
def test_generation_with_contains(engine, prompt, schema, stops):
    """Real model, greedy: the layer keeps `]` away until an item matches, so a stopped output validates;
    an array the model never satisfies runs into max_tokens and is reported invalid, never stopped."""
    r = engine.generate("Answer in JSON. " + prompt, json_schema=schema, max_tokens=60)
    assert (r.finish_reason == "stop") == stops, r.text
    if stops:
        assert r.valid and valid(schema, json.loads(r.text)), r.text
    else:
        assert r.finish_reason == "length" and not r.valid and r.value is None, r.text


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["Authenticate with the key abc.", "Authenticate for 1000 seconds."])
def test_generation_with_whole_value_checks(engine, prompt):
    """Real model, greedy, strict=False (open objects: the two options may share keys): a stopped output
    validates; the whole `auth` object is what the layer checks (contains.WholeValue)."""
    from llmqp.constraints.contains import WholeValue

    assert any(isinstance(v, WholeValue) for v in
               engine.constraint(json_schema=_AUTH, strict=False).contains_arrays.values())
    r = engine.generate("Answer in JSON. " + prompt, json_schema=_AUTH, strict=False, max_tokens=60)
    assert r.finish_reason == "stop" and r.valid and valid(_AUTH, json.loads(r.text)), r.text


def test_accepts_reorders_keys_by_pattern_properties(tk):
    """strict=False: the keys of an object reached through patternProperties are put in the order its
    schema declares (the grammar's), so a valid instance written in another order is accepted."""
    schema = {"type": "object", "patternProperties": {"^p-": {  # optional keys: too many orders to search
        "type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(12)},
        "additionalProperties": False}}, "additionalProperties": False}
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    value = {"p-a": {f"k{i}": i for i in reversed(range(12))}}
    assert valid(schema, value) and c.accepts(compact_json(value))
    value["p-a"]["k3"] = "x"
    assert not valid(schema, value) and not c.accepts(compact_json(value))


def test_key_order_search_follows_the_grammar(tk):
    """Where the schema's parts declare keys in different orders, accepts() (strict=False) searches the
    orders the grammar allows; it still rejects what jsonschema rejects."""
    schema = {"anyOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
         "required": ["a", "b"], "additionalProperties": False},
        {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"},
                                          "c": {"type": "integer"}}, "required": ["c"], "additionalProperties": False}]}
    c = compile_constraint(make_spec(json_schema=schema, strict=False), tk)
    for value in ({"a": 1, "b": 2, "c": 3}, {"c": 3, "a": 1}, {"b": 2, "a": 1}, {"c": 3, "a": "x", "b": 2},
                  {"a": 1, "c": 3, "d": 4}):
        assert c.accepts(compact_json(value)) == valid(schema, value), value


# Every matcher layered above the grammar (uniqueItems) and every rewrite keeps the draft-and-verify
# contract: any mix of try_accept / rollback leaves the matcher where a fresh replay of the same
# accepted tokens would be.
LAYERED = {name: CASES[name][0] for name in CASES
           if name.startswith(("uniqueItems", "contains", "not", "oneOf", "if"))}


def _state(m) -> tuple:
    return m.allowed().tolist(), m.can_stop(), m.is_done(), m.forced()


@pytest.mark.parametrize("name", LAYERED)
def test_try_accept_rollback_equals_replay(tk, name, seed=11):
    c = compile_constraint(make_spec(json_schema=LAYERED[name], strict=False), tk)
    rng = random.Random(seed)
    for _ in range(6):
        m, accepted = c.matcher(), []
        for _ in range(30):
            if accepted and rng.random() < 0.35:
                n = rng.randint(1, len(accepted))
                m.rollback(n)
                del accepted[-n:]
            else:
                draft, probe = [], c.matcher()  # a draft that is allowed for a while, then maybe not
                for tok in accepted:
                    probe.accept(tok)
                for _ in range(rng.randint(1, 6)):
                    allowed = probe.allowed().tolist()
                    if not allowed:
                        break
                    tok = rng.choice(allowed) if rng.random() < 0.85 else rng.randrange(tk.vocab_size)
                    draft.append(tok)
                    if tok not in allowed:
                        break
                    probe.accept(tok)
                n = m.try_accept(draft)
                assert n <= len(draft)
                accepted.extend(draft[:n])
            if rng.random() < 0.5:  # masks computed at some positions only (llguidance's rollback differs)
                continue
            fresh = c.matcher()
            for tok in accepted:
                fresh.accept(tok)
            assert _state(m) == _state(fresh), (name, tk.decode([t for t in accepted if t != 0]))
        with pytest.raises(ValueError):
            m.rollback(len(accepted) + 1)


_BIG = [10**18 - 1, 10**18, 2**53 + 1, 2**53, 2**63 - 1, 2**63, 10**20, -(10**18 - 1), -(2**53 + 1), -(2**63)]


@pytest.mark.parametrize("kind", ["integer", "number"])
@pytest.mark.parametrize("key", ["maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum"])
def test_large_numeric_bounds_never_let_a_number_through(tk, kind, key):
    """llguidance reads bounds as doubles (`maximum: 10**18 - 1` let 10**18 through): bounds are rewritten
    to ones it reads exactly, tightened inward (schema.exact_bounds), or refused where no inward form exists."""
    values = sorted({b + d for b in _BIG for d in (-2, -1, 0, 1, 2)} | {0, 5, -5})
    for bound in _BIG:
        schema = {"type": kind, key: bound}
        try:
            c = compile_constraint(make_spec(json_schema=schema), tk)
        except ConstraintError:
            assert (key.endswith("inimum") and bound > 0) or (key.endswith("aximum") and bound < 0), schema
            continue
        accepted = [v for v in values if c.accepts(str(v))]
        assert all(valid(schema, v) for v in accepted), (schema, [v for v in accepted if not valid(schema, v)])
        if abs(bound) < 2**53:  # doubles whose neighbours are doubles too: exact
            assert accepted == [v for v in values if valid(schema, v)], schema


def test_int64_range_compiles_and_rounds_inward(tk):
    schema = {"type": "object", "properties": {"v": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}},
              "required": ["v"]}
    c = compile_constraint(make_spec(json_schema=schema), tk)
    assert c.accepts('{"v":0}') and c.accepts('{"v":-9223372036854774784}') and c.accepts('{"v":9223372036854774784}')
    assert not c.accepts('{"v":9223372036854775808}') and not c.accepts('{"v":-9223372036854775809}')
    draft4 = {"type": "integer", "maximum": 10**18, "exclusiveMaximum": True}  # draft 4's flag
    c = compile_constraint(make_spec(json_schema={"$schema": "http://json-schema.org/draft-04/schema#", **draft4}), tk)
    assert c.accepts(str(10**18 - 128)) and not c.accepts(str(10**18))


def test_bounds_are_made_exact_where_only_a_ref_reaches(tk):
    schema = {"definitions": {"group": {"n": {"type": "integer", "maximum": 10**18 - 1}}},
              "type": "object", "properties": {"a": {"$ref": "#/definitions/group/n"}}, "required": ["a"]}
    c = compile_constraint(make_spec(json_schema=schema), tk)
    assert c.accepts('{"a":5}') and not c.accepts('{"a":1000000000000000000}')
    huge = {"type": "number", "minimum": 0, "maximum": 1.79769e308}  # tightened to the range the grammar has
    c = compile_constraint(make_spec(json_schema={"anyOf": [huge]}), tk)
    assert c.accepts("0.5") and c.accepts("9223372036854774784") and not c.accepts("-1")
