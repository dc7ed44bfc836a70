"""Constraints layer on the tiny hand-made vocabulary (llmqp.testing.tiny_tokenizer): exact allowed sets
step by step, a brute-force reference, accepts() tables, strict mode, the error contract, caching."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import regex as re_ref

from llmqp import ConstraintError
from llmqp.constraints import (ConstraintKind, Whitespace, compile_constraint, make_spec)
from llmqp.constraints.llguidance_backend import tokenizer_state
from llmqp.model.tokenizer import Tokenizer
from llmqp.testing import tiny_tokenizer, token_id, token_texts

EOS = "<|end|>"
DIGITS = {str(d) for d in range(10)}


@pytest.fixture(scope="module")
def tk():
    return tiny_tokenizer()


def compiled(tk, **kw):
    return compile_constraint(make_spec(**kw), tk)


def walk(tk, constraint, path):
    """[(allowed texts, forced texts, can_stop, is_done)] before each token of `path` and after the last."""
    m = constraint.matcher()
    steps = []
    for text in [*path, None]:
        allowed = m.allowed()
        assert allowed.dtype == np.int32 and np.all(np.diff(allowed) > 0), "ids must be sorted and unique"
        steps.append((token_texts(tk, allowed), [tk.decode([t]) for t in m.forced()], m.can_stop(), m.is_done()))
        if text is not None:
            m.accept(token_id(tk, text))
    return steps


# ------------------------------------------------------------------------------- golden, step by step
def test_regex_golden_steps(tk):
    c = compiled(tk, regex="abc?|yes")
    start = {"a", "ab", "abc", "y", "ye", "yes"}
    assert walk(tk, c, ["y", "e", "s"]) == [
        (start, [], False, False),
        ({"e"}, ["e", "s"], False, False),  # only "es" can follow: forced, one byte token each
        ({"s"}, ["s"], False, False),
        ({EOS}, [], True, True),
    ]
    assert walk(tk, c, ["ab"]) == [(start, [], False, False), ({"c", EOS}, [], True, False)]
    assert walk(tk, c, ["abc"]) == [(start, [], False, False), ({EOS}, [], True, True)]


def test_choice_golden_steps(tk):
    c = compiled(tk, choice=["yes", "no", "nope"])
    assert walk(tk, c, ["no", "p", "e"]) == [
        ({"n", "no", "y", "ye", "yes"}, [], False, False),
        ({"p", EOS}, [], True, False),  # "no" is complete, "nope" may go on
        ({"e"}, ["e"], False, False),
        ({EOS}, [], True, True),
    ]


GRAMMAR = 'start: item ("," item)*\nitem: "ab" | "no" | NUMBER\nNUMBER: /[0-9]+/\n'
GRAMMAR_AS_REGEX = r"(ab|no|[0-9]+)(,(ab|no|[0-9]+))*"


def test_grammar_golden_steps(tk):
    item_start = {"a", "ab", "n", "no", "12"} | DIGITS
    assert walk(tk, compiled(tk, grammar=GRAMMAR), ["ab", ",", "12", "3"]) == [
        (item_start, [], False, False),
        ({",", EOS}, [], True, False),
        (item_start, [], False, False),
        ({",", "12", EOS} | DIGITS, [], True, False),
        ({",", "12", EOS} | DIGITS, [], True, False),
    ]


def test_gbnf_grammar_is_converted(tk):
    gbnf = 'root ::= item ("," item)*\nitem ::= "ab" | "no" | [0-9]+\n'
    c = compiled(tk, grammar=gbnf)
    assert c.accepts("ab,12,no") and not c.accepts("ab,") and not c.accepts("abc")


# ------------------------------------------------------------------ parity with a brute-force reference
def reference_allowed(tk, pattern: str, prefix: str) -> set[str]:
    """Tokens t with prefix + text(t) still a prefix of a full match (EOS when prefix matches fully)."""
    allowed = {EOS} if re_ref.fullmatch(pattern, prefix) else set()
    for tok in range(tk.vocab_size):
        raw = tk.decode([tok], skip_special=False)
        if tok < 2 or "\ufffd" in raw:  # specials; lone non-ASCII bytes (the patterns are ASCII)
            continue
        if re_ref.fullmatch(pattern, prefix + raw, partial=True):
            allowed.add(raw)
    return allowed


@pytest.mark.parametrize("kind, value, pattern, text", [
    ("regex", r"(ab|bc)+d?", r"(ab|bc)+d?", "abbcab"),
    ("regex", r"[a-c]{2,3}(yes|no)", r"[a-c]{2,3}(yes|no)", "abcyes"),
    ("choice", ["yes", "no", "nope", "ab12"], r"yes|no|nope|ab12", "ab12"),
    ("grammar", GRAMMAR, GRAMMAR_AS_REGEX, "12,ab,no,1212"),
])
def test_allowed_equals_brute_force_reference(tk, kind, value, pattern, text):
    """Every token that keeps the text a prefix of a match is allowed, except where the constraint
    forces the next bytes: then only their canonical first token is (llguidance's forced tokens)."""
    c = compiled(tk, **{kind: value})
    m = c.matcher()
    prefix = ""
    for tok in [*tk.encode(text), None]:
        allowed, reference, forced = token_texts(tk, m.allowed()), reference_allowed(tk, pattern, prefix), m.forced()
        if forced:
            assert allowed == token_texts(tk, forced[:1]) and allowed <= reference, f"after {prefix!r}"
        else:
            assert allowed == reference, f"after {prefix!r}"
        if tok is not None:
            m.accept(tok)
            prefix += tk.decode([tok])


def test_forced_region_allows_only_the_canonical_token(tk):
    m = compiled(tk, choice=["ab12", "yes"]).matcher()
    m.accept(token_id(tk, "ab"))
    assert token_texts(tk, m.allowed()) == {"12"} and m.forced() == [token_id(tk, "12")]  # "1" is not


def _independent_verdict(spec: dict, text: str) -> bool:
    """Whether `text` satisfies `spec`, decided without the package: the `regex` package for regexes,
    choices and GRAMMAR (via GRAMMAR_AS_REGEX), `jsonschema` (+ compact serialisation) for JSON."""
    if "regex" in spec:
        return re_ref.fullmatch(spec["regex"], text) is not None
    if "choice" in spec:
        return text in spec["choice"]
    if "grammar" in spec:
        return re_ref.fullmatch(GRAMMAR_AS_REGEX, text) is not None
    try:
        value = json.loads(text)
    except ValueError:
        return False
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False) == text
    return compact and jsonschema.Draft202012Validator(spec["json_schema"]).is_valid(value)


@pytest.mark.parametrize("spec, texts", [
    (dict(regex="a(b12|c)"), ["ab12", "ac", "ab1", "ab123", "a", ""]),
    (dict(choice=["ab12", "abc", "yes no"]), ["ab12", "abc", "yes no", "yes", "ab", "abcd"]),
    (dict(grammar=GRAMMAR), ["ab,12,no", "ab,", "1212", "ab12"]),
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}),
     ['{"a":"yes no","b":12}', '{"b":12}', '{"a":"abc"', '{"b":1.5}', '{}']),
])
def test_accepts_agrees_with_the_byte_path_reference(tk, spec, texts):
    """Self-consistency (backward compatibility), not correctness: accepts() walks the canonical tokens,
    and its own fallback, the package's private byte walk (the longest allowed token that spells the
    text next, at each step), must give the same verdict. Correctness is the independent check below:
    both agree with the `regex` package / `jsonschema` on every text."""
    c = compiled(tk, **spec)
    for text in texts:
        reference = c._greedy_walk(c._template.deep_copy(), text.encode(), 0)
        assert c.accepts(text) == reference, text
        assert c.accepts(text) == _independent_verdict(spec, text), text


# ----------------------------------------------------------------------------------- accepts() tables
@pytest.mark.parametrize("spec, passing, failing, prefix_only", [
    (dict(regex=r"\d{3}-[a-z]+"), ["123-abc", "000-z"], ["12-abc", "123-", "123-ABC", "123-abc "], ["12", "123-"]),
    (dict(choice=["yes", "no", "nope"]), ["yes", "no", "nope"], ["Yes", "yesno", "", "nop e"], ["ye", "nop"]),
    (dict(grammar=GRAMMAR), ["ab", "12,no,ab", "0"], ["ab,", ",ab", "abc", "ab, no"], ["ab,", "12,n"]),
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                       "required": ["a"]}),
     ['{"a":1}', '{"a":-3,"b":"x y"}'], ['{"b":"x"}', '{"a":1.5}', '{"a": 1}', '{"a":1,"b":2}', ''],
     ['{"a":1', '{"a":1,"b":"x']),
])
def test_accepts_table(tk, spec, passing, failing, prefix_only):
    c = compiled(tk, **spec)
    for text in passing:
        assert c.accepts(text), text
    for text in failing + prefix_only:
        assert not c.accepts(text), text


def test_special_tokens_never_spell_text(tk):
    """llguidance would offer the special token <|end|> where the text '<|end|>' is forced; the
    matcher never does (the engine does not decode special tokens to text), so such a constraint
    fails loudly instead of ending the output early."""
    c = compiled(tk, regex=r"x?<\|end\|>")
    m = c.matcher()
    assert token_texts(tk, m.allowed()) == {"x", "<"}  # not forced yet: '<' spells it as text
    m.accept(token_id(tk, "x"))  # now '<|end|>' is forced, and llguidance forces the special token
    with pytest.raises(ConstraintError, match="special token"):
        m.allowed()
    # Where the text is not forced, the name is spelled with ordinary tokens, and accepts() agrees.
    c = compiled(tk, regex=r"(<\|end\|>|<\|x)*")
    assert c.accepts("<|end|><|x") and not c.accepts("<|end|><|")
    m = c.matcher()
    for tok in [token_id(tk, ch) for ch in "<|end|>"]:
        assert tok in m.allowed()
        m.accept(tok)
    assert m.can_stop() and 0 in m.allowed()


# -------------------------------------------------------------------------------------- matcher verbs
def test_matcher_rejects_tokens_outside_the_allowed_set(tk):
    m = compiled(tk, regex="ab").matcher()
    with pytest.raises(ValueError, match="EOS"):
        m.accept(0)
    m = compiled(tk, regex="ab").matcher()
    with pytest.raises(ValueError, match="not allowed"):
        m.accept(token_id(tk, "y"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compiled(tk, regex="ab").matcher().accept(tk.vocab_size)


def test_eos_ends_the_match(tk):
    m = compiled(tk, regex="ab|abc").matcher()
    m.accept(token_id(tk, "ab"))
    assert m.can_stop() and not m.is_done()
    m.accept(0)
    assert m.is_done() and m.can_stop() and m.allowed().size == 0 and m.forced() == []
    with pytest.raises(ValueError):
        m.accept(token_id(tk, "c"))


UTF8_LEAD_BYTES = [*range(0x80), *range(0xC2, 0xF5)]  # bytes that can start a UTF-8 character


def any_text_ids(vocab_size: int) -> set[int]:
    """What `.*` (dot-all) allows first on the tiny vocabulary: EOS, every merge, every byte token that
    can start a character (not <|pad|>, not continuation bytes), cut at the model's vocab_size."""
    ids = {0} | {2 + b for b in UTF8_LEAD_BYTES} | set(range(258, 266))
    return {i for i in ids if i < vocab_size}


def test_special_tokens_are_never_allowed(tk):
    m = compiled(tk, regex=r"[\s\S]*").matcher()  # any text at all
    assert set(m.allowed().tolist()) == any_text_ids(tk.vocab_size)  # EOS: the empty output is complete


def test_matchers_are_independent(tk):
    c = compiled(tk, choice=["yes", "no"])
    m1, m2 = c.matcher(), c.matcher()
    m1.accept(token_id(tk, "yes"))
    assert m1.can_stop() and token_texts(tk, m2.allowed()) == {"y", "ye", "yes", "n", "no"}


@pytest.mark.parametrize("model_vocab", [300, 262])
def test_mask_is_sized_by_the_model_vocabulary(model_vocab):
    """The model may pad its vocabulary past the tokenizer's (ids never allowed) or stop short of it
    (ids the model cannot produce are cut from the mask); ids always stay < vocab_size."""
    base = tiny_tokenizer()
    tk = Tokenizer(base.hf, eos_ids=[0], vocab_size=model_vocab)
    m = compile_constraint(make_spec(regex=r"[\s\S]*"), tk).matcher()
    allowed = m.allowed()
    assert m.vocab_size == model_vocab and set(allowed.tolist()) == any_text_ids(model_vocab)


# ---------------------------------------------------------------------------------------- JSON options
OBJ = {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_strict_generates_only_declared_properties(tk):
    strict, lenient = compiled(tk, json_schema=OBJ), compiled(tk, json_schema=OBJ, strict=False)
    assert strict.accepts('{"a":1}') and lenient.accepts('{"a":1}')
    assert not strict.accepts('{"a":1,"b":2}') and lenient.accepts('{"a":1,"b":2}')
    assert not strict.accepts('{"b":2}') and lenient.accepts('{"b":2}')


@pytest.mark.parametrize("schema, ok, extra", [
    # allOf inheritance through $ref: the merge point is closed, the parts are not
    ({"allOf": [{"$ref": "#/$defs/base"}, {"properties": {"b": {"type": "string"}}}],
      "$defs": {"base": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
     ['{"a":1,"b":"x"}', '{"b":"x"}'], '{"a":1,"c":1}'),
    # a plain anyOf: each option is closed on its own
    ({"anyOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     ['{"a":1}', '{"b":2}'], '{"a":1,"z":1}'),
    # a recursive schema: the root is closed, so every level is
    ({"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}}},
     ['{"v":1,"kids":[{"v":2}]}'], '{"v":1,"kids":[{"v":2,"x":1}]}'),
    # a shared definition used as a plain reference
    ({"type": "object", "properties": {"p": {"$ref": "#/definitions/pt"}, "q": {"$ref": "#/definitions/pt"}},
      "definitions": {"pt": {"type": "object", "properties": {"x": {"type": "number"}}}}},
     ['{"p":{"x":1},"q":{}}'], '{"p":{"x":1,"y":2}}'),
])
def test_strict_closes_merged_and_referenced_objects(tk, schema, ok, extra):
    strict, lenient = compiled(tk, json_schema=schema), compiled(tk, json_schema=schema, strict=False)
    for text in ok:
        assert strict.accepts(text) and lenient.accepts(text), text
    assert lenient.accepts(extra) and not strict.accepts(extra)


@pytest.mark.parametrize("schema, text", [
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "integer"}},
     '{"a":1,"z":2}'),  # the author said what other properties may be: kept
    ({"type": "object"}, '{"x":[1]}'),  # a free-form object stays free-form
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, '{"x1":1,"y":true}'),
])
def test_strict_keeps_explicitly_open_objects(tk, schema, text):
    assert compiled(tk, json_schema=schema).accepts(text)


def test_whitespace_compact_by_default_flexible_on_request(tk):
    compact = compiled(tk, json_schema=OBJ)
    flexible = compiled(tk, json_schema=OBJ, whitespace="flexible")
    assert compact.spec.whitespace is Whitespace.COMPACT and flexible.spec.whitespace is Whitespace.FLEXIBLE
    for text in ('{"a": 1}', '{\n  "a" : 1\n}'):
        assert flexible.accepts(text) and not compact.accepts(text)
    assert compact.accepts('{"a":1}') and flexible.accepts('{"a":1}')


def test_json_schema_input_forms_are_equivalent(tk):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        label: str | None = None

    as_dict = make_spec(json_schema=Point.model_json_schema())
    assert make_spec(json_schema=Point) == as_dict
    assert make_spec(json_schema=json.dumps(Point.model_json_schema())) == as_dict
    c = compile_constraint(as_dict, tk)
    assert c.accepts('{"x":1}') and c.accepts('{"x":1,"label":null}') and c.accepts('{"x":1,"label":"p"}')
    assert not c.accepts('{"x":1,"other":2}') and not c.accepts('{"label":"p"}')


def test_strict_closes_pydantic_nested_models(tk):
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):
        city: str

    class Person(pydantic.BaseModel):
        name: str
        home: Address | None = None  # anyOf [$ref, null]
        work: Address = pydantic.Field(description="office")  # $ref beside an annotation
        past: list[Address] = []

    c = compile_constraint(make_spec(json_schema=Person), tk)
    lenient = compile_constraint(make_spec(json_schema=Person, strict=False), tk)
    base = '{"name":"a","work":{"city":"x"}'
    assert c.accepts(base + "}") and c.accepts(base + ',"past":[{"city":"y"}]}')
    for extra in ('{"name":"a","home":{"city":"x","z":1},"work":{"city":"x"}}', base + ',"z":1}',
                  '{"name":"a","work":{"city":"x","z":1}}', base + ',"past":[{"city":"y","z":1}]}'):
        assert lenient.accepts(extra) and not c.accepts(extra), extra


def test_property_order_follows_the_schema(tk):
    """The departure from JSON-Schema semantics behind every maskbench false rejection: order is fixed."""
    a, b = {"type": "integer"}, {"type": "integer"}
    c = compiled(tk, json_schema={"type": "object", "properties": {"a": a, "b": b}})
    assert c.accepts('{"a":1,"b":2}') and not c.accepts('{"b":2,"a":1}')
    assert compiled(tk, json_schema={"type": "object", "properties": {"b": b, "a": a}}).accepts('{"b":2,"a":1}')


@pytest.mark.parametrize("schema, valid_but_rejected, accepted", [
    ({"type": "integer"}, "1.0", "-0"),
    ({"type": "number", "maximum": 1000}, "1e2", "100.5"),
    ({"type": "string"}, '"\\u0041"', '"\\n"'),
])
def test_other_departures_only_narrow(tk, schema, valid_but_rejected, accepted):
    c = compiled(tk, json_schema=schema)
    assert not c.accepts(valid_but_rejected) and c.accepts(accepted)


# ------------------------------------------------------------------------------------ error contract
@pytest.mark.parametrize("spec, message", [
    (dict(regex="a(b"), r"(?s)regex: .*unclosed group"),
    (dict(regex=r"(a)\1"), "backreferences are not supported"),
    (dict(regex="(?=a)a"), "look-around"),
    (dict(json_schema={"type": "strin"}), "Invalid type: strin"),
    (dict(json_schema={"type": "object", "properties": []}), "properties must be an object"),
    (dict(json_schema={"type": "array", "uniqueItems": True}), r'keyword "uniqueItems" at # is not supported'),
    (dict(json_schema={"properties": {"tags": {"type": "array", "contains": {"type": "integer"},
                                               "maxItems": 3}}}),  # could fill up unmatched
     r'"contains" at #/properties/tags'),
    # keywords rewritten exactly (llmqp.constraints.keywords) name what has no exact form, and where:
    (dict(json_schema={"if": {"pattern": "^(ab)\\1"}, "then": {"minLength": 2}}), '"pattern" at #/if '),  # not regular
    (dict(json_schema={"type": "object", "maxProperties": 3, "not": {"propertyNames": {"maxLength": 3}}}),
     '"propertyNames" at #/not'),  # "some key" in an object of bounded size: the layer could get stuck
    (dict(json_schema={"type": "integer", "divisibleBy": 2}), '"divisibleBy" at #'),
    (dict(json_schema={"properties": {"x": {"extends": {"type": "string"}}}}), '"extends" at #/properties/x'),
    (dict(json_schema={"type": "string", "format": "path"}),
     '"format" at #/format is not supported: unknown format "path"'),
    (dict(json_schema={"type": "object", "properties": {"s": {"pattern": "(?<=a)b"}}}),  # not only strings there
     "look-around"),
    (dict(json_schema={"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2}),
     '"minProperties" at #'),
    (dict(json_schema={"$ref": "https://example.com/schema.json"}), "example.com"),
    (dict(json_schema={"x-guidance": {"lenient": True}, "type": "string"}), "x-guidance"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(json_schema=[1, 2]), "must be an object"),
    (dict(json_schema=False), "no output satisfies it"),
    (dict(json_schema={"type": "object", "properties": {"a": False}, "required": ["a"]}), "unsatisfiable"),
    (dict(json_schema={"type": "number", "minimum": float("nan")}), "not serialisable"),
    (dict(grammar="start: foo\n"), r'grammar: at 1\(8\): unknown name: "foo"'),
    (dict(grammar='start: "a" | \n  x: (\n'), r"grammar: 2\(7\): Expected token"),
    (dict(grammar='root ::= "a" (x'), "GBNF"),
    (dict(grammar="  "), "grammar is empty"),
    (dict(choice=[]), "at least one"),
    (dict(choice=["a", 1]), "list of strings"),
    (dict(choice="ab"), "list of strings"),
    (dict(), "exactly one"),
    (dict(regex="a", choice=["a"]), "exactly one"),
    (dict(json_schema={}, whitespace="pretty"), "compact"),
])
def test_error_contract(tk, spec, message):
    with pytest.raises(ConstraintError, match=message):
        compile_constraint(make_spec(**spec), tk)


def test_error_names_the_keyword_llguidance_reports(tk):
    with pytest.raises(ConstraintError) as info:
        compiled(tk, json_schema={"properties": {"a": {"type": "array", "items": {"uniqueItems": True}}}})
    assert '"uniqueItems" at #/properties/a/items' in str(info.value)


def test_true_schema_is_any_json(tk):
    c = compiled(tk, json_schema=True)
    assert c.accepts('{"a":[1,null]}') and c.accepts('"x"') and not c.accepts("{")


def test_ignorable_keywords_compile(tk):
    """Annotations and unknown (non-JSON-Schema) keys change nothing in JSON-Schema semantics either."""
    schema = {"title": "t", "description": "d", "$comment": "c", "examples": [1], "deprecated": True,
              "x-vendor": {"any": "thing"}, "nullable": True, "type": "integer"}
    c = compiled(tk, json_schema=schema, strict=False)
    assert c.accepts("12") and not c.accepts("null")


# ------------------------------------------------------------------------------------------- caching
def test_compile_is_cached_per_spec_and_tokenizer(tk):
    spec = make_spec(regex="ab+")
    assert compile_constraint(spec, tk) is compile_constraint(make_spec(regex="ab+"), tk)
    other = tiny_tokenizer()
    assert compile_constraint(spec, other) is not compile_constraint(spec, tk)
    assert tokenizer_state(tk) is tokenizer_state(tk)  # the trie is built once per tokenizer
    assert make_spec(regex="ab+", strict=False, whitespace="flexible") == spec  # JSON-only options ignored


def test_spec_is_hashable_and_keeps_property_order():
    spec = make_spec(json_schema={"properties": {"b": {}, "a": {}}})
    assert spec.kind is ConstraintKind.JSON_SCHEMA and hash(spec) == hash(make_spec(json_schema=spec.source))
    assert spec.source.index('"b"') < spec.source.index('"a"')
