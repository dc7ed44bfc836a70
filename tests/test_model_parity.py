"""The JAX model against an independent numpy reference, the two RoPE layouts against each other,
loader error messages, and perplexity on a fixed paragraph (with deliberately broken variants).

Tests marked `slow` load the real SmolLM2-135M; the rest build tiny random checkpoints in tmp dirs."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmqp
import reference_numpy as ref
from llmqp.model import loader, transformer
from llmqp.model.config import RopeStyle
from llmqp.model.weights import unpermute_qk

DATA = Path(__file__).parent / "data"
# ~20 tokens of ordinary text.
PROMPT = "The old lighthouse keeper climbed the stairs every night, counting 112 steps to the lamp."
PARITY_TOL = 1e-3  # f32 JAX vs float64 numpy reference, max abs logit difference
PPL_THRESHOLD = 30.0  # real model ~16 on tests/data/paragraph.txt; every broken variant measured > 100


def trunk_logits(params, cfg, ids, forward=transformer.forward_jit) -> np.ndarray:
    """(T, V) f32 logits straight from the model functions: one prefill into a fresh cache + dense head."""
    cache = transformer.init_cache(cfg, 1, len(ids))
    hidden, _ = forward(params, cache, jnp.asarray([ids], jnp.int32), jnp.zeros((1,), jnp.int32), cfg=cfg)
    return np.asarray(transformer.dense_logits_jit(params, hidden))[0]


def perplexity(logits: np.ndarray, ids) -> float:
    """exp(mean next-token NLL); inf when the logits are not all finite (a blown-up forward)."""
    lg = np.asarray(logits, np.float64)
    if not np.isfinite(lg).all():
        return float("inf")
    m = lg.max(-1)
    lse = np.log(np.exp(lg - m[:, None]).sum(-1)) + m
    nll = lse[:-1] - lg[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))


@pytest.fixture(scope="module")
def ref_model():
    return ref.read_gguf(ref.default_gguf())


@pytest.fixture(scope="module")
def model_logits(request, loaded_model):
    """`Engine.logits` when the Engine exists, else the model functions on the same weights."""
    if hasattr(llmqp, "Engine"):
        return request.getfixturevalue("engine").logits
    return lambda ids: trunk_logits(loaded_model.params, loaded_model.config, list(ids))


@pytest.fixture(scope="module")
def prompt_ids(loaded_model):
    ids = loaded_model.tokenizer.encode(PROMPT)
    assert 15 <= len(ids) <= 30
    return ids


@pytest.fixture(scope="module")
def ref_logits(ref_model, prompt_ids):
    return ref.forward(ref_model.weights, ref_model.hp, prompt_ids)


# ------------------------------------------------------------------ parity with the numpy reference

@pytest.mark.slow
def test_logits_match_independent_numpy_reference(model_logits, prompt_ids, ref_logits):
    got = np.asarray(model_logits(prompt_ids))
    assert got.shape == (len(prompt_ids), ref_logits.shape[1]) and got.dtype == np.float32
    diff = np.abs(got - ref_logits)
    print(f"\nlogits vs numpy reference: T={len(prompt_ids)} max|diff|={diff.max():.3e} "
          f"mean|diff|={diff.mean():.3e} max|logit|={np.abs(ref_logits).max():.1f}")
    assert diff.max() <= PARITY_TOL
    assert (got.argmax(-1) == ref_logits.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_prefill_then_decode_steps_match_reference(loaded_model, prompt_ids, ref_logits):
    """The KV-cache path: prefill part of the prompt, decode the rest one token at a time."""
    params, cfg = loaded_model.params, loaded_model.config
    split = len(prompt_ids) // 2
    cache = transformer.init_cache(cfg, 1, 32)
    hidden, cache = transformer.forward_jit(params, cache, jnp.asarray([prompt_ids[:split]], jnp.int32),
                                            jnp.zeros((1,), jnp.int32), cfg=cfg)
    rows = [np.asarray(transformer.dense_logits_jit(params, hidden))[0]]
    for pos in range(split, len(prompt_ids)):
        h, cache = transformer.decode_step(params, cache, jnp.asarray([prompt_ids[pos]], jnp.int32),
                                           jnp.asarray([pos], jnp.int32), cfg=cfg)
        rows.append(np.asarray(transformer.dense_logits_jit(params, h)))
    got = np.concatenate(rows)
    diff = np.abs(got - ref_logits).max()
    print(f"\nprefill({split}) + {len(prompt_ids) - split} decode steps vs numpy reference: max|diff|={diff:.3e}")
    assert diff <= PARITY_TOL


@pytest.mark.slow
def test_long_prompt_matches_reference(model_logits, ref_model, paragraph_ids):
    """A prompt longer than one prefill chunk (the Engine prefills in chunks of 512 positions)."""
    ids = (paragraph_ids * 4)[:530]
    rows = list(range(0, 16)) + list(range(500, 530))  # both sides of the chunk boundary at 512
    want = ref.forward(ref_model.weights, ref_model.hp, ids, rows=rows)
    got = np.asarray(model_logits(ids))
    assert got.shape == (len(ids), want.shape[1])
    diff = np.abs(got[rows] - want)
    print(f"\nlong prompt T={len(ids)} vs numpy reference at {len(rows)} positions: max|diff|={diff.max():.3e}")
    assert diff.max() <= PARITY_TOL


# ------------------------------------------------------------------ RoPE layouts: GGUF vs Hugging Face

def _write_hf_dir(directory: Path, config: dict, tensors: dict[str, np.ndarray], tokenizer_json: Path | None,
                  tokenizer_config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}))
    return directory


def _hf_tensors(weights: dict) -> dict[str, np.ndarray]:
    """Reference-form weights ([out, in], q/k already in HF layout) -> HF tensor names."""
    out = {"model.embed_tokens.weight": weights["embed"], "model.norm.weight": weights["final_norm"]}
    if weights.get("output") is not None:
        out["lm_head.weight"] = weights["output"]
    names = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "ffn_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
             "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
    for i, layer in enumerate(weights["layers"]):
        out.update({f"model.layers.{i}.{names[k]}": v for k, v in layer.items()})
    return out


def _to_hf_layout(weights: dict, hp: dict) -> dict:
    """GGUF (adjacent-pair) q/k rows -> HF (rotate-half) rows."""
    layers = [dict(l, wq=unpermute_qk(l["wq"], hp["n_heads"]), wk=unpermute_qk(l["wk"], hp["n_kv_heads"]))
              for l in weights["layers"]]
    return dict(weights, layers=layers)


@pytest.fixture(scope="module")
def smollm_hf_dir(ref_model, loaded_model, tmp_path_factory):
    """The embedded GGUF's weights rewritten as a Hugging Face Llama directory (f32 safetensors)."""
    hp, cfg = ref_model.hp, loaded_model.config
    d = tmp_path_factory.mktemp("smollm_hf")
    loaded_model.tokenizer.hf.save(str(d / "tok.json"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size, "num_attention_heads": hp["n_heads"],
        "num_key_value_heads": hp["n_kv_heads"], "num_hidden_layers": len(ref_model.weights["layers"]),
        "vocab_size": len(ref_model.tokens), "rope_theta": hp["rope_theta"], "rms_norm_eps": hp["rms_eps"],
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    _write_hf_dir(d, config, _hf_tensors(_to_hf_layout(ref_model.weights, hp)), d / "tok.json",
                  {"eos_token": "<|im_end|>", "chat_template": loaded_model.tokenizer.chat_template})
    return d


def test_unpermute_qk_turns_adjacent_pair_rope_into_rotate_half():
    """Pure numpy: q.k scores with GGUF rows + adjacent-pair RoPE == with un-permuted rows + rotate-half."""
    rng = np.random.default_rng(0)
    n_heads, hd, d, t = 3, 8, 16, 5
    wq = rng.standard_normal((n_heads * hd, d))
    x = rng.standard_normal((t, d))
    pos = np.arange(t)
    q_adj, q_half = x @ wq.T, x @ unpermute_qk(wq, n_heads).T
    for h in range(n_heads):
        a = ref._rope(q_adj[:, h * hd:(h + 1) * hd], pos, 1e4, "adjacent")
        b = ref._rope(q_half[:, h * hd:(h + 1) * hd], pos, 1e4, "half")
        np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-10)  # same scores; layouts differ by a permutation
        np.testing.assert_allclose(np.sort(a, axis=1), np.sort(b, axis=1), atol=1e-12)


@pytest.mark.slow
def test_hf_rotate_half_path_matches_gguf_adjacent_pair_path(smollm_hf_dir, loaded_model, prompt_ids, ref_model):
    hf = loader.load(smollm_hf_dir)
    assert hf.config.rope_style is RopeStyle.ROTATE_HALF
    assert loaded_model.config.rope_style is RopeStyle.ADJACENT_PAIR
    assert hf.config.tie_embeddings and hf.config.n_kv_heads == 3 and hf.config.vocab_size == 49152
    assert hf.tokenizer.encode(PROMPT) == prompt_ids
    assert 2 in hf.tokenizer.eos_ids
    gguf_logits = trunk_logits(loaded_model.params, loaded_model.config, prompt_ids)
    hf_logits = trunk_logits(hf.params, hf.config, prompt_ids)
    diff = np.abs(hf_logits - gguf_logits).max()
    print(f"\nHF safetensors (rotate-half) vs GGUF (adjacent-pair), JAX f32: max|diff|={diff:.3e}")
    assert diff <= 1e-4
    # The same holds for the reference alone (float64): un-permuted weights + rotate-half == GGUF + adjacent.
    hf_hp = dict(ref_model.hp, rope="half")
    r = ref.forward(_to_hf_layout(ref_model.weights, ref_model.hp), hf_hp, prompt_ids[:8])
    r0 = ref.forward(ref_model.weights, ref_model.hp, prompt_ids[:8])
    assert np.abs(r - r0).max() < 1e-8


# ------------------------------------------------------------------ tiny random checkpoints

def _bytes_to_unicode() -> dict[int, str]:
    from llmqp.testing import _bytes_to_unicode as gpt2_byte_map  # the tokenizer tests check it independently

    return gpt2_byte_map()


BYTE_TOKENS = [_bytes_to_unicode()[b] for b in range(256)]
TINY_MERGES = ["h e", "l l", "he ll", "Ġ w"]
TINY_TOKENS = BYTE_TOKENS + ["he", "ll", "hell", "Ġw", "<|im_end|>"]  # 261 tokens; <|im_end|> = 260


@pytest.fixture(scope="module")
def tiny_tokenizer_json(tmp_path_factory) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(TINY_TOKENS[:-1])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in TINY_MERGES]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tk.save(str(path))
    return path


def _random_weights(rng, *, vocab, d, n_layers, n_heads, n_kv, hd, ffn, bias, tied):
    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def vec(n, center=0.0, scale=0.1):
        return (center + scale * rng.standard_normal(n)).astype(np.float32)

    layers = []
    for _ in range(n_layers):
        layer = dict(attn_norm=vec(d, 1.0), wq=mat(n_heads * hd, d), wk=mat(n_kv * hd, d), wv=mat(n_kv * hd, d),
                     wo=mat(d, n_heads * hd), ffn_norm=vec(d, 1.0), w_gate=mat(ffn, d), w_up=mat(ffn, d),
                     w_down=mat(d, ffn))
        if bias:
            layer.update(bq=vec(n_heads * hd, 0, 0.5), bk=vec(n_kv * hd, 0, 0.5), bv=vec(n_kv * hd, 0, 0.5))
        layers.append(layer)
    return dict(embed=rng.standard_normal((vocab, d)).astype(np.float32), final_norm=vec(d, 1.0),
                output=None if tied else mat(vocab, d), layers=layers)


QWEN = dict(vocab=320, d=64, n_layers=2, n_heads=4, n_kv=2, hd=16, ffn=96)


def _qwen_config(**over):
    c = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": QWEN["d"],
         "intermediate_size": QWEN["ffn"], "num_attention_heads": QWEN["n_heads"],
         "num_key_value_heads": QWEN["n_kv"], "num_hidden_layers": QWEN["n_layers"],
         "vocab_size": QWEN["vocab"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False, "max_position_embeddings": 512, "eos_token_id": 260}
    c.update(over)
    return c


@pytest.fixture(scope="module")
def qwen_weights():
    return _random_weights(np.random.default_rng(1), bias=True, tied=False, **QWEN)


def test_tiny_qwen2_hf_dir_matches_reference(tmp_path, tiny_tokenizer_json, qwen_weights):
    d = _write_hf_dir(tmp_path / "qwen", _qwen_config(), _hf_tensors(qwen_weights), tiny_tokenizer_json)
    m = loader.load(d)
    cfg = m.config
    assert (cfg.arch, cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_style) == ("qwen2", True, False, RopeStyle.ROTATE_HALF)
    assert m.tokenizer.encode("hello world<|im_end|>", parse_special=True)[-1] == 260 and 260 in m.tokenizer.eos_ids
    ids = [5, 300, 17, 260, 44, 2, 99, 123, 7, 318, 64, 0, 250]
    hp = dict(n_heads=QWEN["n_heads"], n_kv_heads=QWEN["n_kv"], head_dim=QWEN["hd"], rope_theta=1e6,
              rms_eps=1e-6, rope="half")
    want = ref.forward(qwen_weights, hp, ids)
    got = trunk_logits(m.params, cfg, ids)
    diff = np.abs(got - want).max()
    print(f"\ntiny Qwen2 (biases, untied head, rotate-half) vs numpy reference: max|diff|={diff:.3e} "
          f"(max|logit|={np.abs(want).max():.1f})")
    assert diff <= 1e-4 * max(1.0, np.abs(want).max())
    engine_diff = np.abs(llmqp.Engine.from_pretrained(d, use_cache=False).logits(ids) - want).max()
    assert engine_diff <= 1e-4 * max(1.0, np.abs(want).max())
    # The biases and the untied head matter: dropping either changes the reference visibly.
    no_bias = dict(qwen_weights, layers=[{k: v for k, v in l.items() if k[0] != "b"} for l in qwen_weights["layers"]])
    assert np.abs(ref.forward(no_bias, hp, ids) - want).max() > 100 * diff
    tied = dict(qwen_weights, output=None)
    assert np.abs(ref.forward(tied, hp, ids) - want).max() > 100 * diff


def _write_tiny_gguf(path: Path, weights: dict, *, arch="llama", n_heads, n_kv, theta=1e4, eps=1e-5):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    d = weights["embed"].shape[1]
    w.add_block_count(len(weights["layers"]))
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_feed_forward_length(weights["layers"][0]["w_gate"].shape[0])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS)
    w.add_token_merges(TINY_MERGES)
    w.add_token_types([1] * (len(TINY_TOKENS) - 1) + [3])
    w.add_eos_token_id(len(TINY_TOKENS) - 1)

    def add(name, a, quant=True):
        a = np.ascontiguousarray(a, np.float32)
        if quant and a.ndim == 2:  # exercise dequantization: Q8_0 blocks along the input dimension
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", weights["embed"])
    add("output_norm.weight", weights["final_norm"])
    if weights.get("output") is not None:
        add("output.weight", weights["output"])
    names = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
             "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
             "w_up": "ffn_up.weight", "w_down": "ffn_down.weight"}
    for i, layer in enumerate(weights["layers"]):
        for k, v in layer.items():
            add(f"blk.{i}.{names[k]}", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_llama_gguf_matches_reference(tmp_path):
    """A random Q8_0 llama GGUF (GQA, untied head) through llmqp vs the reference reading the same file."""
    weights = _random_weights(np.random.default_rng(2), vocab=len(TINY_TOKENS), d=64, n_layers=2, n_heads=4,
                              n_kv=1, hd=16, ffn=128, bias=False, tied=False)
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", weights, n_heads=4, n_kv=1)
    m = loader.load(path, use_cache=False)
    assert m.config.rope_style is RopeStyle.ADJACENT_PAIR and not m.config.tie_embeddings
    assert m.config.n_kv_heads == 1 and m.config.vocab_size == len(TINY_TOKENS)
    assert m.tokenizer.encode("hello world<|im_end|>", parse_special=True) == [258, 111, 259, 111, 114, 108, 100, 260]
    assert m.tokenizer.eos_ids == (260,)
    r = ref.read_gguf(str(path))
    ids = [3, 258, 100, 260, 7, 70, 259, 1, 255]
    want = ref.forward(r.weights, r.hp, ids)
    got = trunk_logits(m.params, m.config, ids)
    diff = np.abs(got - want).max()
    print(f"\ntiny llama GGUF (Q8_0, adjacent-pair) vs numpy reference: max|diff|={diff:.3e}")
    assert diff <= 1e-4 * max(1.0, np.abs(want).max())


# ------------------------------------------------------------------ malformed checkpoints

def _qwen_dir(tmp_path, tokenizer_json, weights, *, config=None, drop=(), replace=None, extra=None):
    tensors = _hf_tensors(weights)
    for k in drop:
        del tensors[k]
    tensors.update(replace or {})
    tensors.update(extra or {})
    return _write_hf_dir(tmp_path / "bad", config or _qwen_config(), tensors, tokenizer_json)


def _load_error(path) -> str:
    with pytest.raises(llmqp.ModelLoadError) as e:
        loader.load(path, use_cache=False)
    return str(e.value)


def test_error_wrong_shape_tensor(tmp_path, tiny_tokenizer_json, qwen_weights):
    name = "model.layers.1.self_attn.q_proj.weight"
    msg = _load_error(_qwen_dir(tmp_path, tiny_tokenizer_json, qwen_weights,
                                replace={name: np.zeros((64, 32), np.float32)}))
    assert name in msg and "(64, 32)" in msg and "(64, 64)" in msg


def test_error_missing_tensor(tmp_path, tiny_tokenizer_json, qwen_weights):
    msg = _load_error(_qwen_dir(tmp_path, tiny_tokenizer_json, qwen_weights,
                                drop=["model.layers.1.mlp.down_proj.weight"]))
    assert "missing" in msg and "layers.1" in msg and "down" in msg


def test_error_missing_bias_and_untied_head(tmp_path, tiny_tokenizer_json, qwen_weights):
    msg = _load_error(_qwen_dir(tmp_path, tiny_tokenizer_json, qwen_weights,
                                drop=["model.layers.0.self_attn.k_proj.bias", "lm_head.weight"]))
    assert "missing tensor 'lm_head.weight'" in msg
    assert "missing tensor 'model.layers.0.self_attn.k_proj.bias'" in msg


def test_error_unexpected_tensor(tmp_path, tiny_tokenizer_json, qwen_weights):
    msg = _load_error(_qwen_dir(tmp_path, tiny_tokenizer_json, qwen_weights,
                                extra={"model.layers.0.mlp.extra_proj.weight": np.zeros((4, 4), np.float32)}))
    assert "model.layers.0.mlp.extra_proj.weight" in msg


def test_error_unsupported_architecture(tmp_path, tiny_tokenizer_json, qwen_weights):
    msg = _load_error(_qwen_dir(tmp_path, tiny_tokenizer_json, qwen_weights,
                                config=_qwen_config(architectures=["GPT2LMHeadModel"], model_type="gpt2")))
    assert "GPT2LMHeadModel" in msg and "not supported" in msg


def test_error_config_missing_key(tmp_path, tiny_tokenizer_json, qwen_weights):
    config = _qwen_config()
    del config["num_hidden_layers"]
    msg = _load_error(_qwen_dir(tmp_path, tiny_tokenizer_json, qwen_weights, config=config))
    assert "num_hidden_layers" in msg


def test_error_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a GGUF file at all\n" * 100)
    msg = _load_error(path)
    assert "GGUF" in msg and str(path) in msg


def test_error_unsupported_gguf_architecture(tmp_path):
    weights = _random_weights(np.random.default_rng(3), vocab=len(TINY_TOKENS), d=32, n_layers=1, n_heads=2,
                              n_kv=2, hd=16, ffn=32, bias=False, tied=True)
    path = _write_tiny_gguf(tmp_path / "gpt2.gguf", weights, arch="gpt2", n_heads=2, n_kv=2)
    msg = _load_error(path)
    assert "gpt2" in msg and "not supported" in msg


def test_error_wrong_kind_of_path(tmp_path):
    assert "no such file" in _load_error(tmp_path / "nope.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    assert ".gguf" in _load_error(other)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "config.json" in _load_error(empty)


LLAMA_TINY = dict(vocab=len(TINY_TOKENS), d=32, n_layers=1, n_heads=2, n_kv=1, hd=16, ffn=64)


def _llama_config(**over):
    c = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
         "vocab_size": LLAMA_TINY["vocab"], "rms_norm_eps": 1e-6}
    c.update(over)
    return c


def test_llama_untied_head_when_config_omits_tie_word_embeddings(tmp_path, tiny_tokenizer_json):
    weights = _random_weights(np.random.default_rng(5), bias=False, tied=False, **LLAMA_TINY)
    d = _write_hf_dir(tmp_path / "llama", _llama_config(), _hf_tensors(weights), tiny_tokenizer_json)
    m = loader.load(d)
    ids = [1, 2, 3, 4, 5]
    hp = dict(n_heads=2, n_kv_heads=1, head_dim=16, rope_theta=1e4, rms_eps=1e-6, rope="half")
    assert np.abs(trunk_logits(m.params, m.config, ids) - ref.forward(weights, hp, ids)).max() <= 1e-4


def test_rope_parameters_form_of_config(tmp_path, tiny_tokenizer_json, qwen_weights):
    config = _qwen_config(rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
    del config["rope_theta"]
    d = _write_hf_dir(tmp_path / "qwen", config, _hf_tensors(qwen_weights), tiny_tokenizer_json)
    assert loader.load(d).config.rope_theta == 1e6


def test_error_tokenizer_larger_than_model_vocab(tmp_path, tiny_tokenizer_json):
    weights = _random_weights(np.random.default_rng(6), bias=False, tied=True, **dict(LLAMA_TINY, vocab=200))
    d = _write_hf_dir(tmp_path / "llama", _llama_config(vocab_size=200, tie_word_embeddings=True),
                      _hf_tensors(weights), tiny_tokenizer_json)
    assert "vocab" in _load_error(d)


# ------------------------------------------------------------------ perplexity on a fixed paragraph

@pytest.fixture(scope="module")
def paragraph_ids(loaded_model):
    ids = loaded_model.tokenizer.encode((DATA / "paragraph.txt").read_text().strip())
    assert 120 <= len(ids) <= 200
    return ids


@pytest.mark.slow
def test_perplexity_on_fixed_paragraph(model_logits, paragraph_ids):
    ppl = perplexity(model_logits(paragraph_ids), paragraph_ids)
    print(f"\nperplexity on tests/data/paragraph.txt ({len(paragraph_ids)} tokens): {ppl:.2f} "
          f"(threshold {PPL_THRESHOLD})")
    assert ppl < PPL_THRESHOLD


def _map_layers(params, f):
    return dict(params, layers=[f(dict(layer)) for layer in params["layers"]])


def _skip_rms_normalisation():
    """A copy of the model's `forward` whose RMSNorm applies the gain only (no normalisation).

    Built as a new function object over patched globals: JAX caches traces per function object, so
    monkeypatching `transformer.rms_norm` in place would leak the broken trace into later tests."""
    f = transformer.forward
    broken = types.FunctionType(f.__code__, {**f.__globals__, "rms_norm": lambda x, w, eps: x * w},
                                "forward_without_rms_normalisation", f.__defaults__, f.__closure__)
    broken.__kwdefaults__ = f.__kwdefaults__
    return jax.jit(broken, static_argnames=("cfg",))


BROKEN = {
    "rope rotate-half on GGUF weights": lambda p, c: (p, dataclasses.replace(c, rope_style=RopeStyle.ROTATE_HALF), None),
    "RMSNorm without normalisation": lambda p, c: (p, c, _skip_rms_normalisation()),
    "RMSNorm eps 1.0 instead of 1e-5": lambda p, c: (p, dataclasses.replace(c, rms_eps=1.0), None),
    "norm gains dropped (all ones)": lambda p, c: (
        _map_layers(dict(p, final_norm=np.ones_like(p["final_norm"])),
                    lambda l: dict(l, attn_norm=np.ones_like(l["attn_norm"]), ffn_norm=np.ones_like(l["ffn_norm"]))),
        c, None),
    "attention output weight transposed": lambda p, c: (
        _map_layers(p, lambda l: dict(l, w_o=np.ascontiguousarray(l["w_o"].T))), c, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(BROKEN))
def test_perplexity_threshold_catches_broken_forward(variant, loaded_model, paragraph_ids):
    params, cfg, forward = BROKEN[variant](loaded_model.params, loaded_model.config)
    ppl = perplexity(trunk_logits(params, cfg, paragraph_ids, forward or transformer.forward_jit), paragraph_ids)
    print(f"\nperplexity with {variant}: {ppl:.1f} (threshold {PPL_THRESHOLD})")
    assert ppl > PPL_THRESHOLD
