"""Loading checkpoints into the params pytree of `llmqp.model.transformer`.

Two sources: a llama- or gemma3-architecture GGUF file (any quantization the `gguf` package dequantizes)
and a local Hugging Face directory (config.json + *.safetensors) for Llama, Qwen2 and Gemma 3 (text). Both go through the same
"raw" form — numpy arrays in the checkpoint's own ``[out, in]`` orientation — whose every key and shape
is checked against the config *before* anything is copied (`check_raw`), then `pack_params` transposes
explicitly to ``[in, out]`` and fuses q/k/v and gate/up.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from llmqp.errors import ModelLoadError
from llmqp.model.config import ModelConfig, RopeStyle

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
BIAS_KEYS = ("bq", "bk", "bv")
GEMMA_NORM_KEYS = ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")  # Gemma 3's extra per-layer norms


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The raw (checkpoint-orientation) shape of every tensor a config needs, by raw key."""
    d, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    shapes = {"embed": (v, d), "final_norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["output"] = (v, d)
    for i in range(cfg.n_layers):
        layer = {
            "attn_norm": (d,), "wq": (cfg.q_size, d), "wk": (cfg.kv_size, d), "wv": (cfg.kv_size, d),
            "wo": (d, cfg.q_size), "ffn_norm": (d,), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
        }
        if cfg.qkv_bias:
            layer.update(bq=(cfg.q_size,), bk=(cfg.kv_size,), bv=(cfg.kv_size,))
        if cfg.arch == "gemma3":
            layer.update(q_norm=(cfg.head_dim,), k_norm=(cfg.head_dim,), post_attn_norm=(d,), post_ffn_norm=(d,))
        shapes.update({f"layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def check_raw(cfg: ModelConfig, raw: dict[str, tuple[str, tuple[int, ...]]], source: str,
              checkpoint_name=lambda key: key) -> None:
    """raw maps raw key -> (checkpoint tensor name, shape). Raises ModelLoadError naming every problem;
    `checkpoint_name(key)` gives the name a missing tensor would have in the checkpoint."""
    want = expected_shapes(cfg)
    problems = []
    for key, shape in want.items():
        if key not in raw:
            problems.append(f"missing tensor {checkpoint_name(key)!r}")
        elif tuple(raw[key][1]) != shape:
            problems.append(f"tensor {raw[key][0]!r} has shape {tuple(raw[key][1])}, expected {shape}")
    for key, (name, _) in raw.items():
        if key not in want:
            problems.append(f"unexpected tensor {name!r} (not used by a {cfg.arch} model with this config)")
    if problems:
        raise ModelLoadError(f"{source}: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


def pack_params(cfg: ModelConfig, raw: dict[str, np.ndarray], dtype=np.float32) -> dict:
    """Raw numpy tensors ([out, in]) -> params pytree of numpy arrays ([in, out], fused)."""
    def t(a):  # explicit transpose to [in, out], contiguous for XLA:CPU
        return np.ascontiguousarray(np.asarray(a, np.float32).T).astype(dtype)

    layers = []
    for i in range(cfg.n_layers):
        g = lambda k: raw[f"layers.{i}.{k}"]  # noqa: E731
        layer = {
            "attn_norm": np.asarray(g("attn_norm"), np.float32),
            "w_qkv": t(np.concatenate([g("wq"), g("wk"), g("wv")], axis=0)),
            "w_o": t(g("wo")),
            "ffn_norm": np.asarray(g("ffn_norm"), np.float32),
            "w_gate_up": t(np.concatenate([g("w_gate"), g("w_up")], axis=0)),
            "w_down": t(g("w_down")),
        }
        if cfg.qkv_bias:
            layer["b_qkv"] = np.concatenate([g("bq"), g("bk"), g("bv")]).astype(dtype)
        if cfg.arch == "gemma3":
            layer.update({k: np.asarray(g(k), np.float32) for k in GEMMA_NORM_KEYS})
        layers.append(layer)
    embed = np.asarray(raw["embed"], np.float32).astype(dtype)
    rows = embed if cfg.tie_embeddings else np.asarray(raw["output"], np.float32).astype(dtype)
    return {
        "embed": embed,
        "unembed_rows": rows,
        "unembed": np.ascontiguousarray(rows.T),
        "final_norm": np.asarray(raw["final_norm"], np.float32),
        "layers": layers,
    }


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the HF->GGUF q/k row permutation: adjacent-pair RoPE layout -> rotate-half layout."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


# ---------------------------------------------------------------- GGUF

_GGUF_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "output": "output.weight"}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
    "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up", "ffn_down.weight": "w_down",
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_ffn_norm",
}
# Gemma 3 GGUFs name no pattern of local/global layers: llama.cpp hard-codes that every 6th is global.
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # the local layers' RoPE base, likewise not in the GGUF


def _raw_key(name: str, global_names: dict, layer_names: dict, layer_prefix: str) -> str:
    """Checkpoint tensor name -> raw key; an unknown name is returned as is (check_raw reports it)."""
    for key, global_name in global_names.items():
        if name == global_name:
            return key
    if name.startswith(layer_prefix):
        index, _, rest = name[len(layer_prefix):].partition(".")
        if index.isdigit() and rest in layer_names:
            return f"layers.{index}.{layer_names[rest]}"
    return name


def _checkpoint_name(key: str, global_names: dict, layer_names: dict, layer_prefix: str) -> str:
    if key in global_names:
        return global_names[key]
    _, i, short = key.split(".", 2)
    return layer_prefix.format(i=i) + {v: k for k, v in layer_names.items()}[short]


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _gguf_config(reader, arch: str, path: Path, tensors: dict) -> ModelConfig:
    def field(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    scaling = field("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelLoadError(f"{path}: RoPE scaling {scaling!r} is not supported")
    if field("final_logit_softcapping") is not None:
        raise ModelLoadError(f"{path}: final logit soft-capping is not supported")
    n_heads = int(field("attention.head_count"))
    d = int(field("embedding_length"))
    n_layers = int(field("block_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    head_dim = int(field("attention.key_length", d // n_heads))
    common = dict(
        arch=arch,
        name=str(_field(reader, "general.name", path.stem)),
        vocab_size=int(field("vocab_size", len(tokens))),
        hidden_size=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(field("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_size=int(field("feed_forward_length")),
        rope_theta=float(field("rope.freq_base", 10000.0)),
        rms_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        max_position=int(field("context_length", 8192)),
    )
    if arch == "llama":
        # The HF->GGUF converter permuted llama q/k rows into the adjacent-pair RoPE layout.
        return ModelConfig(rope_style=RopeStyle.ADJACENT_PAIR, **common)
    # gemma3: q/k rows are not permuted (llama.cpp runs it with NEOX, i.e. rotate-half, RoPE). As in
    # llama.cpp, scores are scaled by 1/sqrt(head_dim) except for the 27B model (62 layers), whose
    # query_pre_attn_scalar is d / n_heads.
    window = int(field("attention.sliding_window", 0))
    every = int(field("attention.sliding_window_pattern", GEMMA3_GLOBAL_EVERY))
    return ModelConfig(
        rope_style=RopeStyle.ROTATE_HALF,
        sliding_window=window,
        local_layers=tuple(i for i in range(n_layers) if window and (i + 1) % every) if every else (),
        rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        query_pre_attn_scalar=float(d // n_heads if n_layers == 62 else head_dim),
        attn_softcap=float(field("attn_logit_softcapping", 0.0) or 0.0),
        **common,
    )


def read_gguf(path: str | Path):
    """Open a GGUF file. Returns (cfg, raw arrays, reader). The reader is returned so the tokenizer can be
    built from the same parse (opening a GGUF costs seconds)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/struct errors on non-GGUF input
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "gemma3"):
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported in GGUF form "
                             "(supported: 'llama', 'gemma3')")
    tensors = {t.name: t for t in reader.tensors}
    cfg = _gguf_config(reader, arch, path, tensors)
    index = {}
    for name, t in tensors.items():
        key = _raw_key(name, _GGUF_GLOBAL_NAMES, _GGUF_LAYER_NAMES, "blk.")
        index[key] = (name, tuple(int(x) for x in reversed(list(t.shape))))
    check_raw(cfg, index, str(path), lambda key: _checkpoint_name(
        key, _GGUF_GLOBAL_NAMES, _GGUF_LAYER_NAMES, "blk.{i}."))
    raw = {}
    for key, (name, _) in index.items():
        t = tensors[name]
        try:
            raw[key] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise ModelLoadError(f"{path}: tensor {name!r} uses quantization {t.tensor_type.name}, "
                                 "which the gguf package cannot dequantize") from None
    return cfg, raw, reader


# ---------------------------------------------------------------- Hugging Face safetensors

_HF_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                    "output": "lm_head.weight"}
_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Gemma3ForCausalLM": "gemma3"}
_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _safetensors_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, begin, end) read from the header, without loading any data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        out[name] = (meta["dtype"], tuple(meta["shape"]), base + b, base + e)
    return out


def _read_safetensor(path: Path, dtype: str, shape, begin: int, end: int) -> np.ndarray:
    if dtype not in _ST_DTYPES:
        raise ModelLoadError(f"{path}: tensor dtype {dtype} is not supported (F32, F16, BF16, F64)")
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=begin, shape=(end - begin,))
    a = mm.view(_ST_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":  # numpy has no bfloat16: widen the bits to f32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


# Gemma 3 names its norms differently: "post_attention_layernorm" is the norm *after* attention there.
_HF_GEMMA3_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo", "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm", "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm", "post_feedforward_layernorm.weight": "post_ffn_norm",
    "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
}
_GEMMA3_NORMS = ("attn_norm", "ffn_norm") + GEMMA_NORM_KEYS


def _hf_gemma3_fields(c: dict, cfg_path: Path, n_layers: int, head_dim: int) -> dict:
    """The gemma3-only ModelConfig fields of a Gemma3ForCausalLM config.json (transformers 4 or 5 keys)."""
    rope = c.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    for scaling in (c.get("rope_scaling"), full, sliding):
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ModelLoadError(f"{cfg_path}: RoPE scaling {scaling} is not supported")
    if c.get("final_logit_softcapping"):
        raise ModelLoadError(f"{cfg_path}: final logit soft-capping is not supported")
    if c.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ModelLoadError(f"{cfg_path}: hidden_activation {c['hidden_activation']!r} is not supported")
    window = int(c.get("sliding_window") or 0)
    if c.get("layer_types"):
        local = tuple(i for i, kind in enumerate(c["layer_types"]) if kind == "sliding_attention")
    else:
        every = int(c.get("sliding_window_pattern", GEMMA3_GLOBAL_EVERY))
        local = tuple(i for i in range(n_layers) if (i + 1) % every)
    return dict(
        rope_theta=float(c.get("rope_theta", full.get("rope_theta", 1e6))),
        rope_local_theta=float(c.get("rope_local_base_freq", sliding.get("rope_theta", GEMMA3_LOCAL_ROPE_THETA))),
        sliding_window=window, local_layers=local if window else (),
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or head_dim),
        attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
    )


def read_hf_config(directory: Path) -> ModelConfig:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        c = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
    archs = c.get("architectures") or []
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
    if arch is None:
        raise ModelLoadError(f"{cfg_path}: architectures {archs} not supported "
                             f"(supported: {', '.join(_HF_ARCHS)})")
    # transformers >= 5 keeps rope settings in "rope_parameters"; older configs use top-level keys.
    rope = c.get("rope_parameters") or {}
    for scaling in (c.get("rope_scaling"), rope) if arch != "gemma3" else ():  # gemma3: _hf_gemma3_fields
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ModelLoadError(f"{cfg_path}: RoPE scaling {scaling} is not supported")
    try:
        n_heads = int(c["num_attention_heads"])
        d = int(c["hidden_size"])
        head_dim = int(c.get("head_dim") or d // n_heads)
        fields = dict(
            rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),  # the HF default for llama and qwen2
        )
        if arch == "gemma3":
            fields.update(_hf_gemma3_fields(c, cfg_path, int(c["num_hidden_layers"]), head_dim),
                          tie_embeddings=bool(c.get("tie_word_embeddings", True)))  # gemma3's default
        return ModelConfig(
            arch=arch,
            name=str(c.get("_name_or_path") or directory.name),
            vocab_size=int(c["vocab_size"]),
            hidden_size=d,
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            ffn_size=int(c["intermediate_size"]),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_style=RopeStyle.ROTATE_HALF,
            qkv_bias=True if arch == "qwen2" else bool(c.get("attention_bias", False)),
            max_position=int(c.get("max_position_embeddings", 8192)),
            **fields,
        )
    except KeyError as e:
        raise ModelLoadError(f"{cfg_path}: missing required key {e.args[0]!r}") from None
    except ValueError as e:
        raise ModelLoadError(f"{cfg_path}: {e}") from None


def read_hf(directory: str | Path):
    """Load a Hugging Face directory. Returns (cfg, raw arrays)."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    layer_names = _HF_GEMMA3_LAYER_NAMES if cfg.arch == "gemma3" else _HF_LAYER_NAMES
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors files")
    index, where = {}, {}
    tied_head = None
    for f in files:
        for name, (dt, shape, b, e) in _safetensors_index(f).items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                tied_head = (f, dt, shape, b, e)  # some tied checkpoints still store the head: must be equal
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some exports include
            key = _raw_key(name, _HF_GLOBAL_NAMES, layer_names, "model.layers.")
            index[key] = (name, shape)
            where[key] = (f, dt, shape, b, e)
    check_raw(cfg, index, str(directory), lambda key: _checkpoint_name(
        key, _HF_GLOBAL_NAMES, layer_names, "model.layers.{i}."))
    raw = {key: _read_safetensor(*where[key]) for key in index}
    if cfg.arch == "gemma3":  # Gemma's RMSNorm scales by (1 + weight); the GGUF converter bakes the 1 in
        for key in raw:
            if key == "final_norm" or key.rsplit(".", 1)[-1] in _GEMMA3_NORMS:
                raw[key] = raw[key] + np.float32(1.0)
    if tied_head is not None and not np.array_equal(_read_safetensor(*tied_head), raw["embed"]):
        raise ModelLoadError(f"{directory}: config.json says tie_word_embeddings but lm_head.weight differs "
                             "from model.embed_tokens.weight")
    return cfg, raw
