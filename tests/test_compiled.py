"""The fused on-device loop and StableHLO export (`llmqp.compiled`).

Fast tests use the tiny hand-made vocabulary (`llmqp.testing.tiny_tokenizer`) and a tiny random Llama
written as a Hugging Face directory, loaded by the real `Engine`: the host loop, the fused loop and the
exported artifact run in seconds. Slow tests repeat the equivalence on SmolLM2.

Golden artifacts live in tests/data/golden_export/; they are backward-compatibility checks (today's
runtime reproduces what an earlier export produced), joined by an independent check of their outputs
with jsonschema / the regex package. Regenerate them only after a deliberate format change, with
`python tests/test_compiled.py --regen-golden`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import regex as re_ref

from llmqp.compiled import (ConstraintTables, Fallback, TableLimits, compile_tables, export, generate_fused,
                            load_exported, synthetic_tables, tables_from_rows)
from llmqp.compiled import api as fused_api
from llmqp.compiled import loop
from llmqp.compiled.compile import forced_bytes
from llmqp.compiled.compile_log import CompileLog
from llmqp.compiled.regular import escape_literal, spec_regex
from llmqp.compiled.runtime import ArtifactError, ArtifactInputError, compare
from llmqp.compiled.tables import byte_vocabulary, tables_from_regex
from llmqp.constraints import compile_constraint, make_spec
from llmqp.core.spec import DecodeSpec
from llmqp.errors import LLMQPError
from llmqp.model.tokenizer import CHATML_TEMPLATE
from llmqp.testing import BYTE_BASE, tiny_tokenizer, token_id, token_texts

GOLDEN = Path(__file__).parent / "data" / "golden_export"
EOS = "<|end|>"
PROMPT = "Say something."

# (constraint, prompt) pairs shared by the tiny and the real-model equivalence tests.
TINY_CASES = [
    dict(regex=r"(yes|no|maybe)"),
    dict(regex=r"[a-c]{2,6}"),
    dict(regex=r"[0-9]+(\.[0-9]+)?"),
    dict(choice=["abc", "ab", "yes", "nope", "no"]),
    dict(json_schema={"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                                        "s": {"type": "string", "maxLength": 4}},
                      "required": ["n", "s"]}),
    dict(json_schema={"type": "object", "properties": {"ok": {"type": "boolean"},
                                                        "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                 "maxItems": 3}},
                      "required": ["ok"]}),
]
SAMPLINGS = [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=5, top_p=0.9, seed=11)]


# ------------------------------------------------------------------------------------------ helpers
def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (d=32) over the tiny vocabulary, as a Hugging Face directory. Embeddings
    are scaled so that logits are O(1): sampling then differs from greedy."""
    from safetensors.numpy import save_file

    from llmqp.model import synthetic
    from llmqp.model.config import ModelConfig, RopeStyle

    tok = tiny_tokenizer()
    cfg = ModelConfig(arch="llama", name="tiny", vocab_size=tok.vocab_size, hidden_size=32, n_layers=2, n_heads=2,
                      n_kv_heads=1, head_dim=16, ffn_size=64, rope_theta=10000.0, rms_eps=1e-5,
                      rope_style=RopeStyle.ROTATE_HALF, tie_embeddings=True)
    raw = synthetic.random_raw(cfg, seed=seed)
    raw["embed"] = raw["embed"] * np.float32(0.25)
    top = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    per_layer = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
                 "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                 "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    tensors = {}
    for key, value in raw.items():
        if key in top:
            tensors[top[key]] = value
        else:
            _, i, name = key.split(".", 2)
            tensors[f"model.layers.{i}.{per_layer[name]}.weight"] = value
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "intermediate_size": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "eos_token_id": 0, "max_position_embeddings": 2048}))
    tok.hf.save(str(directory / "tokenizer.json"))
    # ChatML, so that string prompts are templated as on SmolLM2 (a model without a template needs raw=True)
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    import llmqp

    return llmqp.Engine(write_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tk():
    return tiny_tokenizer()


def satisfies(kw: dict, text: str) -> bool:
    if "regex" in kw:
        return re_ref.fullmatch(kw["regex"], text) is not None
    if "choice" in kw:
        return text in kw["choice"]
    try:
        jsonschema.validate(json.loads(text), kw["json_schema"])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def assert_same_as_host(engine, prompt, kw, sampling, max_tokens=24):
    """For forced=False and forced=True: fused loop == host loop (tokens, finish, validity, logprobs);
    and a valid output satisfies `kw`."""
    for forced in (False, True):
        fused = generate_fused(engine, prompt, max_tokens=max_tokens, forced=forced, **sampling, **kw)
        assert not isinstance(fused, Fallback), fused
        host = engine.generate(prompt, max_tokens=max_tokens, forced=forced, **sampling, **kw)
        assert fused.token_ids == host.token_ids, (forced, kw, sampling, fused.text, host.text)
        assert (fused.finish_reason, fused.valid) == (host.finish_reason, host.valid)
        # the trunk compiled inside the while loop rounds differently from the host-stepped one (~1e-5)
        np.testing.assert_allclose(fused.logprobs, host.logprobs, atol=1e-4)
    if fused.valid:
        assert satisfies(kw, fused.text), (kw, fused.text)
    else:
        assert fused.finish_reason == "length"
    return fused


def byte_path(tk, text: str) -> list[int]:
    """One single-byte token per byte of `text` (ids BYTE_BASE + b in the tiny vocabulary)."""
    return [BYTE_BASE + b for b in text.encode()]


def accepts(tables: ConstraintTables, tokens) -> bool:
    state = tables.walk(tokens)
    return state is not None and state >= 0 and bool(tables.is_final[state])


# ------------------------------------------------------------------------------------------ tables
def test_regex_tables_step_by_step(tk):
    """The byte-level automaton: every tokenization allowed, EOS exactly in final states."""
    t = tables_from_regex("abc?|yes", tk)
    start = token_texts(tk, t.allowed_ids(0))
    assert start == {"a", "ab", "abc", "y", "ye", "yes"}
    after_ab = t.step(0, token_id(tk, "ab"))
    assert token_texts(tk, t.allowed_ids(after_ab)) == {"c", EOS}
    assert t.is_final[after_ab] and not t.done[after_ab]
    after_abc = t.step(0, token_id(tk, "abc"))
    assert token_texts(tk, t.allowed_ids(after_abc)) == {EOS} and t.done[after_abc]
    assert t.step(0, token_id(tk, "b")) is None
    assert not t.is_final[0] and not t.is_final[t.step(0, token_id(tk, "y"))]


def test_tokens_through_a_complete_match_are_kept(tk):
    """outlines-core drops a token that passes a complete match and ends in a non-final state ("a"
    after "ab" for (ab)*) and prunes continuations of a match (a|ab); the sentinel construction keeps them."""
    t = tables_from_regex("(ab)*", tk)
    assert token_texts(tk, t.allowed_ids(0)) == {"a", "ab", EOS}
    after = t.step(0, token_id(tk, "ab"))
    assert token_texts(tk, t.allowed_ids(after)) == {"a", "ab", EOS}
    t = tables_from_regex("a|ab", tk)
    assert token_texts(tk, t.allowed_ids(t.step(0, token_id(tk, "a")))) == {"b", EOS}
    t = tables_from_regex(r"[0-9]+(\.[0-9]+)?", tk)
    assert "." in token_texts(tk, t.allowed_ids(t.step(0, token_id(tk, "1"))))


def test_padded_view_and_rows():
    t = tables_from_rows([{5: 1, 3: 1}, {7: 2}, {}], {1, 2}, eos_ids=(0,), vocab_size=10)
    allowed, nxt = t.padded_allowed()
    assert allowed.tolist() == [[3, 5], [0, 7], [0, -1]]
    assert nxt.tolist() == [[1, 1], [-1, 2], [-1, -1]]
    assert t.n_allowed.tolist() == [2, 2, 1] and t.done.tolist() == [False, False, True]
    assert t.walk([3, 7]) == 2 and t.walk([3, 3]) is None and accepts(t, [5]) and not accepts(t, [])
    s = synthetic_tables(1000, (0,), ks=(1, 8), length=4)
    assert s.n_allowed.tolist() == [1, 8, 1, 8, 1] and s.is_final.tolist() == [False] * 4 + [True]


@pytest.mark.parametrize("lo,hi", [(None, None), (0, None), (-5, None), (None, 5), (None, -1), (0, 99), (-5, 5),
                                   (-120, -7), (7, 1234), (-3, 0)])
def test_integer_ranges_match_the_host(tk, lo, hi):
    """Our integer regex describes the host's language exactly (leading zeros, '-0', bounds)."""
    schema = {"type": "integer", **({"minimum": lo} if lo is not None else {}),
              **({"maximum": hi} if hi is not None else {})}
    spec = make_spec(json_schema=schema)
    host = compile_constraint(spec, tk)
    ours = tables_from_regex(spec_regex(spec)[0], tk)
    for text in [str(i) for i in range(-1300, 1300, 7)] + ["-0", "00", "01", "-01", "0", "-", ""]:
        assert accepts(ours, byte_path(tk, text)) == host.accepts(text), text


def test_json_strings_and_numbers_match_the_host(tk):
    for schema, texts in [
        ({"type": "string", "maxLength": 3}, ['"a"', '""', '"abcd"', '"\\n"', '"\\u001f"', '"\\u0041"', '"\\/"',
                                              '"\x7f"', '"\\u007F"', '"\t"', '"\\"\\\\"', '"é"']),
        ({"type": "number"}, ["0", "-0", "1.5", "1.", ".5", "1e5", "1E+5", "-2.5e-3", "01"]),
        ({"enum": ["a\"b", 1, None, True]}, ['"a\\"b"', "1", "null", "true", "false"]),
        ({"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
         ["[]", "[true]", "[true,false]", "[true,true,true]", "[ true]"]),
    ]:
        spec = make_spec(json_schema=schema)
        host = compile_constraint(spec, tk)
        ours = tables_from_regex(spec_regex(spec)[0], tk)
        for text in texts:
            assert accepts(ours, byte_path(tk, text)) == host.accepts(text), (schema, text)


def test_escape_literal_is_exact(tk):
    text = 'a "q" \\ é.*+?()[]{}|^$#&-~\n'
    tables = tables_from_regex(escape_literal(text), tk)
    assert accepts(tables, byte_path(tk, text))
    assert not accepts(tables, byte_path(tk, text[:-1])) and not accepts(tables, byte_path(tk, text + "x"))


@pytest.mark.parametrize("kw", TINY_CASES + [dict(choice=["yes", "yesterday", "no"])],
                         ids=lambda kw: next(iter(kw)))
def test_mirrored_tables_equal_the_host_masks(tk, kw):
    """Random walks: at every step the table row equals the host matcher's allowed() exactly."""
    spec = make_spec(**kw)
    host = compile_constraint(spec, tk)
    tables = compile_tables(spec, tk, reference=host)
    assert isinstance(tables, ConstraintTables) and tables.description["host_exact"]
    rng = np.random.default_rng(0)
    for _ in range(40):
        matcher, state = host.matcher(), 0
        for _ in range(30):
            allowed = matcher.allowed()
            np.testing.assert_array_equal(tables.allowed_ids(state), allowed)
            assert bool(tables.done[state]) == matcher.is_done()
            if matcher.is_done():
                break
            token = int(rng.choice(allowed))
            if token in tables.eos_ids:
                break
            matcher.accept(token)
            state = tables.step(state, token)


def test_forced_bytes_follow_single_continuations(tk):
    t = tables_from_regex("abc?|yes", tk)
    forced = forced_bytes(t, byte_vocabulary(tk))
    assert forced[t.step(0, token_id(tk, "y"))] == b"es"
    assert forced[0] == b"" and forced[t.step(0, token_id(tk, "ab"))] == b""


# ------------------------------------------------------------------------------------------ fallbacks
@pytest.mark.parametrize("kw,reason", [
    (dict(grammar='start: "a" start | "b"'), "context-free grammar"),
    (dict(json_schema={"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
                       "$ref": "#/$defs/n"}), "recursive"),
    (dict(json_schema={"type": "object"}), "undeclared properties"),
    (dict(json_schema={"type": "string", "format": "date-time"}), '"format"'),
    (dict(json_schema={"type": "integer"}, whitespace="flexible"), "flexible"),
])
def test_fallback_reasons(tk, kw, reason):
    spec = make_spec(**kw)
    result = compile_tables(spec, tk, reference=compile_constraint(spec, tk))
    assert isinstance(result, Fallback) and reason in result.reason, result


def test_oversize_constraint_falls_back(tk):
    spec = make_spec(regex="[a-z]{1,40}")
    result = compile_tables(spec, tk, reference=compile_constraint(spec, tk), limits=TableLimits(max_entries=500))
    assert isinstance(result, Fallback) and "entries" in result.reason and "too large" in result.reason
    result = compile_tables(spec, tk, limits=TableLimits(max_regex_chars=5))
    assert isinstance(result, Fallback) and "characters" in result.reason and "too large" in result.reason
    result = compile_tables(spec, tk, limits=TableLimits(max_states=10))
    assert isinstance(result, Fallback) and "states" in result.reason and "too large" in result.reason


def test_generate_fused_reports_fallbacks(tiny_engine):
    r = generate_fused(tiny_engine, PROMPT, max_tokens=8, grammar='start: "a"+')
    assert isinstance(r, Fallback) and "grammar" in r.reason
    r = generate_fused(tiny_engine, PROMPT, max_tokens=8)
    assert isinstance(r, Fallback) and "no constraint" in r.reason
    r = generate_fused(tiny_engine, PROMPT, max_tokens=8, regex="[a-z]{1,40}",
                       limits=TableLimits(max_entries=500))
    assert isinstance(r, Fallback) and "too large" in r.reason
    # ...and the host loop still runs those constraints.
    assert tiny_engine.generate(PROMPT, max_tokens=8, regex="[a-z]{1,40}").token_ids


# ------------------------------------------------------------------------------------------ fused loop
@pytest.mark.parametrize("kw", TINY_CASES, ids=lambda kw: next(iter(kw)))
def test_fused_equals_host_tiny(tiny_engine, kw):
    outputs = set()
    for sampling in SAMPLINGS:
        outputs.add(assert_same_as_host(tiny_engine, PROMPT, kw, sampling).text)
        assert_same_as_host(tiny_engine, "Another prompt, longer than the first one.", kw, sampling)


def test_engine_generate_compiled(tiny_engine):
    """`Engine.generate(compiled=True)` runs the fused loop (same tokens) or says why it did not."""
    kw = dict(regex="[a-c]{2,6}", temperature=1.0, seed=2, max_tokens=10)
    fused = tiny_engine.generate(PROMPT, compiled=True, **kw)
    host = tiny_engine.generate(PROMPT, **kw)
    assert fused.compiled and not host.compiled and fused.token_ids == host.token_ids
    r = tiny_engine.generate(PROMPT, compiled="auto", grammar='start: "a" start | "b"', max_tokens=6)
    assert not r.compiled and "grammar" in r.compiled_reason and r.token_ids


def test_sampling_changes_tiny_outputs(tiny_engine):
    """The tiny model's logits are O(1): seeds matter (otherwise the equivalence tests prove little)."""
    texts = {generate_fused(tiny_engine, PROMPT, max_tokens=12, regex="[a-c]{2,10}", temperature=1.0, seed=s).text
             for s in range(6)}
    assert len(texts) >= 3


def test_max_tokens_cut_is_not_valid(tiny_engine):
    kw = dict(regex="[a-c]{20}")
    fused = assert_same_as_host(tiny_engine, PROMPT, kw, {}, max_tokens=5)
    assert fused.finish_reason == "length" and not fused.valid and len(fused.token_ids) == 5


def test_sparse_threshold_does_not_change_tokens(tiny_engine):
    kw = dict(regex="[a-z]{3,8}", temperature=1.0, seed=5, max_tokens=10)
    a = generate_fused(tiny_engine, PROMPT, sparse_threshold=0, **kw)  # every scored step dense
    b = generate_fused(tiny_engine, PROMPT, sparse_threshold=10**6, **kw)  # every scored step sparse
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


# ------------------------------------------------------------------------------------------ size classes
SAME_CLASS_SCHEMAS = [
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "s": {"type": "string", "maxLength": 4}}, "required": ["n", "s"]},
    {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 999},
                                      "t": {"type": "string", "maxLength": 3}}, "required": ["k", "t"]},
]


def size_class(engine, tables, max_tokens, **sampling):
    """Everything a compiled loop is keyed on, besides the model: its static config and the table shape."""
    from llmqp.sampling import SamplingParams

    fc = loop.config_for(engine.config, tables, SamplingParams(**sampling), max_tokens, forced=True)
    return fc, loop.table_shape(tables, wide=fc.wide)


def test_second_schema_of_the_same_size_class_does_not_compile(tiny_engine):
    """Acceptance (issue 10): the tables are arguments of the compiled loop, so a different regular
    schema of the same size class runs fused without a new XLA compile — nor do a new max_tokens within
    the token buffer, a new seed or a new sparse threshold. Tokens still equal the host loop's."""
    first, second = (dict(json_schema=s) for s in SAME_CLASS_SCHEMAS)
    tables = [fused_api.constraint_tables(tiny_engine, kw) for kw in (first, second)]
    assert size_class(tiny_engine, tables[0], 200) == size_class(tiny_engine, tables[1], 200)
    assert tables[0].allowed.tolist() != tables[1].allowed.tolist()
    sampling = dict(temperature=1.0, seed=1)
    with CompileLog() as log:  # a buffer of 256 tokens: no other test compiles this loop
        generate_fused(tiny_engine, PROMPT, max_tokens=200, **sampling, **first)
    assert log.count("fused_decode") == 1, log.events  # the counter sees the loop's compile
    with CompileLog() as log:
        fused = generate_fused(tiny_engine, PROMPT, max_tokens=200, **sampling, **second)
        generate_fused(tiny_engine, PROMPT, max_tokens=150, temperature=1.0, seed=9, sparse_threshold=8, **second)
    assert log.count("fused_decode") == 0, log.events
    host = tiny_engine.generate(PROMPT, max_tokens=200, **sampling, **second)
    assert fused.token_ids == host.token_ids and fused.valid == host.valid


def test_long_forced_runs_are_fed_in_spec_chunks(tiny_engine):
    """A forced run of 90 tokens is fed as spec.feed_chunks(90) = 32, 32, 16, 8, 2 — as the host loop
    feeds it — so the fused loop's tokens and log-probabilities equal the host's."""
    from llmqp.core.spec import DEFAULT_SPEC

    phrase = "the quick brown fox jumps over the lazy dog, " * 2
    kw = dict(choice=[phrase + "yes", phrase + "no"])
    tables = fused_api.constraint_tables(tiny_engine, kw)
    assert tables.forced_run_len.max() == 90 and DEFAULT_SPEC.feed_chunks(90) == [32, 32, 16, 8, 2]
    for sampling in SAMPLINGS[:2]:
        fused = assert_same_as_host(tiny_engine, PROMPT, kw, sampling, max_tokens=120)
        assert fused.valid and fused.text.startswith(phrase)


def test_size_classes_are_few():
    """States always pad to one size; entries to a power of four, wide tables straight to 4M entries."""
    def rows(n_states, k):
        return [{i: (s + 1) % n_states for i in range(1, k + 1)} for s in range(n_states)]

    small = tables_from_rows(rows(10, 3), {0}, eos_ids=(0,), vocab_size=1000)
    bigger = tables_from_rows(rows(900, 20), {0}, eos_ids=(0,), vocab_size=1000)
    assert loop.table_shape(small, wide=False) == (loop.STATE_PAD, loop.MIN_ENTRIES)
    assert loop.table_shape(bigger, wide=False) == (loop.STATE_PAD, 4 * loop.MIN_ENTRIES * 4)  # 18000 -> 64K
    assert loop.table_shape(small, wide=True) == loop.table_shape(bigger, wide=True) == \
        (loop.STATE_PAD, loop.WIDE_ENTRIES)


def test_fused_config_takes_its_rules_from_the_spec(tiny_engine):
    """K buckets, the sparse limit and feed chunk sizes come from the DecodeSpec given."""
    from llmqp.sampling import SamplingParams

    cfg = tiny_engine.config
    tables = fused_api.constraint_tables(tiny_engine, dict(json_schema=SAME_CLASS_SCHEMAS[0]))
    spec = DecodeSpec(k_base=4, k_growth=2, sparse_max_fraction=0.1, feed_max=4)
    fc = loop.config_for(cfg, tables, SamplingParams(), 24, forced=True, spec=spec)
    assert tables.max_k > 32 and fc.widths == tuple(spec.k_buckets(cfg.vocab_size))  # past the 4th bucket: all
    assert max(lo for lo in (0,) + fc.sparse_widths[:-1]) < spec.sparse_limit(cfg.vocab_size) <= fc.sparse_widths[-1]
    assert fc.feed_sizes == (1, 2, 4)  # runs of 6 tokens, chunks of at most feed_max = 4
    assert loop.clip_threshold(10**6, cfg.vocab_size, spec) == spec.sparse_limit(cfg.vocab_size)
    out = loop.run_fused(tiny_engine, tiny_engine.prompt_ids(PROMPT), tables, SamplingParams(), 24, spec=spec)
    default = loop.run_fused(tiny_engine, tiny_engine.prompt_ids(PROMPT), tables, SamplingParams(), 24)
    assert out.token_ids == default.token_ids  # other buckets and feed chunks, the same tokens


def test_prefill_uses_the_spec_chunks(tiny_engine):
    """A prompt longer than one prefill chunk: the fused prefill (chunks of spec.prefill_chunk) gives the
    last hidden state of one long forward."""
    ids = np.asarray((tiny_engine.prompt_ids(PROMPT) * 12)[:150], np.int32)
    spec = DecodeSpec(prefill_chunk=32)
    assert len(spec.prefill_chunks(len(ids))) == 5
    chunked, cache = loop.prefill(tiny_engine.params, tiny_engine.config, ids, extra=8, spec=spec)
    whole, _ = loop.prefill(tiny_engine.params, tiny_engine.config, ids, extra=8)
    assert cache["k"][0].shape[1] == spec.cache_len(len(ids), 8)  # (B, positions, kv heads, head dim)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-4)


# ------------------------------------------------------------------------------------------ host replay
def test_replay_on_host_checks_every_token(tk):
    kw = dict(regex="[a-c]{2,6}")
    reference = compile_constraint(make_spec(**kw), tk)
    ab = [token_id(tk, "ab")]
    assert fused_api.replay_on_host(reference, ab, "stop") == (True, None)
    assert fused_api.replay_on_host(reference, ab, "length") == (False, None)  # cut: never valid
    valid, problem = fused_api.replay_on_host(reference, [token_id(tk, "a")], "stop")
    assert not valid and "incomplete" in problem
    valid, problem = fused_api.replay_on_host(reference, [token_id(tk, "yes")], "stop")
    assert not valid and "rejects token 0" in problem


def test_wrong_tables_are_caught_by_the_host_replay(tiny_engine, monkeypatch):
    """Tables that stop after "a" for [a-c]{2,6} (a table bug): generate_fused reports a Fallback naming
    the host replay instead of a wrong valid=True, and the engine reruns the request on the host loop."""
    a = token_id(tiny_engine.tokenizer, "a")
    wrong = tables_from_rows([{a: 1}, {}], {1}, eos_ids=tiny_engine.tokenizer.eos_ids,
                             vocab_size=tiny_engine.config.vocab_size)
    monkeypatch.setattr(fused_api, "compile_tables", lambda *args, **kwargs: wrong)
    kw = dict(regex="[a-c]{2,6}", max_tokens=8)
    result = generate_fused(tiny_engine, PROMPT, **kw)
    assert isinstance(result, Fallback) and "host replay" in result.reason and "incomplete" in result.reason
    rerun = tiny_engine.generate(PROMPT, compiled=True, **kw)
    assert not rerun.compiled and "host replay" in rerun.compiled_reason
    assert rerun.token_ids == tiny_engine.generate(PROMPT, **kw).token_ids


def test_mirror_checks_every_state_with_a_second_path(tk):
    """Every state reached by two paths is re-walked along the second one (the description counts them)."""
    spec = make_spec(regex="[a-c]{2,6}")
    tables = compile_tables(spec, tk, reference=compile_constraint(spec, tk))
    d = tables.description
    assert d["states_checked"] == tables.num_states
    # each of the states after 1..5 characters is reached by "a" + ... and by a longer token ("ab", "abc")
    assert d["second_path_checks"] >= tables.num_states - 2


# ------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def tiny_artifact(tiny_engine, tmp_path_factory):
    kw = TINY_CASES[4]
    directory = tmp_path_factory.mktemp("export") / "artifact"
    info = export(tiny_engine, PROMPT, directory, max_tokens=24, prompt_bucket=128, **kw)
    return directory, info, kw


def test_exported_artifact_equals_fused_and_host(tiny_engine, tiny_artifact):
    directory, info, kw = tiny_artifact
    gen = load_exported(directory)
    assert gen.check() == []
    for prompt in (PROMPT, "Another prompt, longer than the first one."):
        fused = generate_fused(tiny_engine, prompt, max_tokens=24, **kw)
        got = gen.generate(prompt)
        assert got.token_ids == fused.token_ids and got.text == fused.text
        assert (got.finish_reason, got.valid) == (fused.finish_reason, fused.valid)
    with pytest.raises(ValueError, match="at most 128"):
        gen.generate("x" * 500)


def test_artifact_is_self_describing(tiny_artifact):
    directory, info, _ = tiny_artifact
    names = {p.name for p in directory.iterdir()}
    assert {"manifest.json", "model.jaxexport", "model.mlir", "weights.safetensors", "tokenizer.json",
            "run.py"} <= names
    m = json.loads((directory / "manifest.json").read_text())
    assert m["function"]["platforms"] == ["cpu", "cuda"]
    assert m["constraint"]["host_exact"] and m["constraint"]["states"] > 1
    assert m["tokenizer"]["chat_template"] and m["versions"]["jax"]
    assert m["function"]["inputs"]["prompt_ids"]["shape"] == [128]
    mlir = (directory / "model.mlir").read_text()
    # The constraint lives in the module: the loop, the plan switch, and windows read out of the tables.
    assert "stablehlo.while" in mlir and "stablehlo.case" in mlir and "stablehlo.dynamic_slice" in mlir


def test_artifact_runs_without_llmqp(tiny_artifact, tmp_path):
    """run.py (a copy of llmqp.compiled.runtime) needs JAX and tokenizers only: with llmqp made unimportable
    it runs, and its errors derive from Exception."""
    directory, info, _ = tiny_artifact
    code = ("import json, sys; sys.modules['llmqp'] = None; sys.path.insert(0, sys.argv[1]); import run; "
            "r = run.load_exported(sys.argv[1]).generate(); print(json.dumps([r.token_ids, sorted({m.split('.')[0] "
            "for m, v in sys.modules.items() if v is not None} & {'llmqp', 'llguidance', 'outlines_core'}), "
            "run.ArtifactError.__mro__[1].__name__]))")
    out = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    tokens, forbidden, base = json.loads(out.stdout.strip().splitlines()[-1])
    assert tokens == info.manifest["expected"]["token_ids"] and forbidden == [] and base == "Exception"


def broken_copy(tmp_path, how: str) -> Path:
    """A copy of a golden artifact, broken in one way."""
    import shutil

    directory = tmp_path / how
    shutil.copytree(GOLDEN / "json_greedy", directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if how == "missing module":
        (directory / "model.jaxexport").unlink()
    elif how == "corrupt module":
        (directory / "model.jaxexport").write_bytes(b"not a flatbuffer")
    elif how == "corrupt manifest":
        (directory / "manifest.json").write_text('{"format": "llmqp-export", "format_ver')
    elif how == "manifest missing a field":
        del manifest["function"]
        (directory / "manifest.json").write_text(json.dumps(manifest))
    elif how == "version mismatch":
        manifest["format_version"] = 99
        (directory / "manifest.json").write_text(json.dumps(manifest))
    elif how == "corrupt weights":
        (directory / "weights.safetensors").write_bytes(b"\x00" * 16)
    return directory


@pytest.mark.parametrize("how,message", [
    ("no such directory", "no such artifact directory"), ("missing module", "model.jaxexport is missing"),
    ("corrupt module", "not a readable serialized module"), ("corrupt manifest", "no readable manifest.json"),
    ("manifest missing a field", "corrupt manifest.json"), ("version mismatch", "format version 99"),
    ("corrupt weights", "cannot load the artifact"),
])
def test_artifact_loading_errors_are_llmqp_errors(tmp_path, capsys, how, message):
    """Each way an artifact can be unreadable raises ArtifactError (an LLMQPError), and `llmqp
    run-exported` prints exactly one line for it."""
    from llmqp.cli import main

    directory = tmp_path / "absent" if how == "no such directory" else broken_copy(tmp_path, how)
    with pytest.raises(ArtifactError, match=message) as info:
        load_exported(directory)
    assert isinstance(info.value, LLMQPError)
    capsys.readouterr()
    assert main(["run-exported", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmqp: error: ") and message in err


def test_artifact_input_errors(capsys):
    from llmqp.cli import main

    gen = load_exported(GOLDEN / "json_greedy")
    with pytest.raises(ArtifactInputError, match="at most 64") as info:
        gen.generate("x" * 500)
    assert isinstance(info.value, LLMQPError) and isinstance(info.value, ValueError)
    with pytest.raises(ArtifactInputError, match="seed"):
        gen.generate(seed=-1)
    capsys.readouterr()
    assert main(["run-exported", str(GOLDEN / "json_greedy"), "--prompt", "x" * 500]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 64" in err


# ------------------------------------------------------------------------------------------ golden
GOLDEN_SPECS = {
    "json_greedy": dict(kw=TINY_CASES[4], sampling={}, runs=[(None, None), ("Another prompt.", None)]),
    "regex_sampled": dict(kw=dict(regex="(yes|no|maybe)( [a-c]{1,5})?"), sampling=dict(temperature=1.0, seed=0),
                          runs=[(None, None), (None, 1), (None, 2), ("Another prompt.", 3)]),
}


def golden_runs(gen, runs) -> list[dict]:
    out = []
    for prompt, seed in runs:
        r = gen.generate(prompt, seed=seed)
        out.append({"prompt": prompt, "seed": seed, "token_ids": r.token_ids, "text": r.text,
                    "finish_reason": r.finish_reason, "valid": r.valid})
    return out


def check_golden(gen, expected: list[dict]) -> list[str]:
    """Differences between stored expected runs and the artifact's outputs now (empty: all match)."""
    problems = []
    for run in expected:
        got = gen.generate(run["prompt"], seed=run["seed"])
        problems += [f"prompt={run['prompt']!r} seed={run['seed']}: {p}" for p in compare(run, got)]
    return problems


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_backward_compat_golden_artifact_reproduces(name):
    """Backward compatibility, not correctness: artifacts stored by an earlier version (serialized module +
    weights) still load with today's runtime and produce the outputs they produced then. The package is
    compared with its own past here; `test_golden_outputs_satisfy_their_constraint` checks those outputs
    independently."""
    directory = GOLDEN / name
    gen = load_exported(directory)
    expected = json.loads((directory / "expected.json").read_text())
    assert check_golden(gen, expected["runs"]) == []
    assert gen.check() == []


def independent_verdict(constraint: dict, text: str) -> bool:
    """Whether `text` satisfies an artifact's constraint, decided by `jsonschema` / the `regex` package alone
    (no llmqp, no llguidance)."""
    if "json_schema" in constraint:
        schema = constraint["json_schema"]
        schema = json.loads(schema) if isinstance(schema, str) else schema
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if "regex" in constraint:
        return re_ref.fullmatch(constraint["regex"], text) is not None
    return text in constraint["choice"]


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden_outputs_satisfy_their_constraint(name):
    """Independent check of the golden artifacts: every output the artifact calls valid satisfies its
    constraint according to jsonschema / the regex package, and every output it calls invalid was cut
    by max_tokens. The constraint is read from the manifest and compared with the test's own spec."""
    directory = GOLDEN / name
    gen = load_exported(directory)
    kind = gen.manifest["constraint"]["kind"]
    constraint = {kind: gen.manifest["constraint"][kind]}
    assert constraint == GOLDEN_SPECS[name]["kw"]
    runs = json.loads((directory / "expected.json").read_text())["runs"]
    outputs = [gen.generate(run["prompt"], seed=run["seed"]) for run in runs] + [gen.generate(seed=s) for s in range(4)]
    assert any(r.valid for r in outputs)
    for r in outputs:
        if r.valid:
            assert independent_verdict(constraint, r.text), r
        else:
            assert r.finish_reason == "length", r


def test_backward_compat_checker_detects_different_output():
    """Like jax's test_detect_different_output: a changed token, text or flag must be reported."""
    directory = GOLDEN / "json_greedy"
    gen = load_exported(directory)
    runs = json.loads((directory / "expected.json").read_text())["runs"]
    changed = json.loads(json.dumps(runs))
    changed[0]["token_ids"][-1] += 1
    problems = check_golden(gen, changed)
    assert len(problems) == 1 and "token_ids" in problems[0]
    changed = json.loads(json.dumps(runs))
    changed[1]["valid"] = not changed[1]["valid"]
    changed[1]["text"] += " "
    problems = check_golden(gen, changed)
    assert len(problems) == 2 and {"valid", "text"} == {p.split(": ")[1].split(":")[0] for p in problems}


def test_cli_helpers(capsys):
    import argparse

    from llmqp.compiled.cli import add_export_arguments, add_run_exported_arguments, cli_run_exported

    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        ["Pick one.", "--choice", "a", "--choice", "b", "-o", "out", "--max-tokens", "8"])
    assert args.choice == ["a", "b"] and args.output == "out" and args.platforms == "cpu,cuda"
    parser = add_run_exported_arguments(argparse.ArgumentParser())
    directory = str(GOLDEN / "json_greedy")
    assert cli_run_exported(parser.parse_args([directory, "--check"])) == 0
    capsys.readouterr()
    assert cli_run_exported(parser.parse_args([directory, "--json", "--prompt", "Another prompt."])) == 0
    expected = json.loads((GOLDEN / "json_greedy" / "expected.json").read_text())["runs"][1]
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected["token_ids"]
    assert cli_run_exported(parser.parse_args([str(GOLDEN)])) == 2  # not an artifact: an error, not a crash


def regenerate_golden() -> None:
    import tempfile

    import llmqp

    with tempfile.TemporaryDirectory() as tmp:
        engine = llmqp.Engine(write_tiny_model(Path(tmp) / "model"))
        for name, spec in GOLDEN_SPECS.items():
            directory = GOLDEN / name
            info = export(engine, PROMPT, directory, max_tokens=24, prompt_bucket=64, **spec["kw"],
                          **spec["sampling"])
            gen = load_exported(directory)
            runs = golden_runs(gen, spec["runs"])
            (directory / "expected.json").write_text(json.dumps({"runs": runs}, indent=1, ensure_ascii=False))
            print(name, info.manifest["expected"]["text"], [r["text"] for r in runs])


# ------------------------------------------------------------------------------------------ SmolLM2
REAL_CASES = [
    ("Is the sky blue? Answer yes or no.", dict(choice=["yes", "no"])),
    ("What is 12 times 11? Answer with a number.", dict(regex=r"[0-9]+(\.[0-9]+)?")),
    ("Name a colour.", dict(regex=r"[A-Z][a-z]{2,10}")),
    ("Give me a user record for Ada Lovelace, born 1815.",
     dict(json_schema={"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                        "born": {"type": "integer", "minimum": 0, "maximum": 2100}},
                       "required": ["name", "born"]})),
    ("Describe a cat as JSON.",
     dict(json_schema={"type": "object", "properties": {"legs": {"type": "integer"}, "furry": {"type": "boolean"},
                                                        "colour": {"enum": ["black", "white", "ginger"]}},
                       "required": ["legs", "furry", "colour"]})),
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt,kw", REAL_CASES, ids=[next(iter(kw)) for _, kw in REAL_CASES])
def test_fused_equals_host_smollm2(engine, prompt, kw):
    for sampling in (dict(), dict(temperature=1.0, seed=7)):
        assert_same_as_host(engine, prompt, kw, sampling, max_tokens=32)


EXTRACTION_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                      "country": {"type": "string", "maxLength": 24}},
     "required": ["city", "country"]},
]


@pytest.mark.slow
def test_second_extraction_schema_does_not_compile_smollm2(engine):
    """Acceptance (issue 10) on SmolLM2: two different JSON schemas with strings (rows as wide as the
    vocabulary) share one compiled loop; the second runs fused with no XLA compile and the host's tokens."""
    prompts = ["Give me a record for a person as JSON.", "Give me a record for a city as JSON."]
    kws = [dict(json_schema=s) for s in EXTRACTION_SCHEMAS]
    tables = [fused_api.constraint_tables(engine, kw) for kw in kws]
    assert size_class(engine, tables[0], 48) == size_class(engine, tables[1], 48)
    assert engine.prompt_ids(prompts[0]) != engine.prompt_ids(prompts[1])
    generate_fused(engine, prompts[0], max_tokens=48, **kws[0])  # compiles the class, unless already done
    with CompileLog() as log:
        fused = generate_fused(engine, prompts[1], max_tokens=48, **kws[1])
    assert log.count("fused_decode") == 0, log.events
    host = engine.generate(prompts[1], max_tokens=48, **kws[1])
    assert fused.token_ids == host.token_ids and fused.valid == host.valid
    if fused.valid:
        jsonschema.validate(json.loads(fused.text), EXTRACTION_SCHEMAS[1])


@pytest.mark.slow
def test_exported_smollm2_equals_host(engine, tmp_path):
    prompt, kw = REAL_CASES[3]
    info = export(engine, prompt, tmp_path / "a", max_tokens=32, **kw)
    host = engine.generate(prompt, max_tokens=32, forced=False, **kw)
    assert info.manifest["expected"]["token_ids"] == host.token_ids
    gen = load_exported(tmp_path / "a")
    assert gen.generate().token_ids == host.token_ids
    other = "Give me a user record for Alan Turing, born 1912."
    assert gen.generate(other).token_ids == engine.generate(other, max_tokens=32, forced=False, **kw).token_ids


if __name__ == "__main__":
    if "--regen-golden" in sys.argv:
        regenerate_golden()
    else:
        print(__doc__)
