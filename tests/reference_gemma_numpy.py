"""A slow, independent reference for the Gemma 3 decoder and its tokenizer, in plain numpy (float64).

Written from the architecture description, not from `llmqp.model`: it opens the GGUF itself
(`gguf.GGUFReader` + `gguf.quants.dequantize`), keeps weights in the checkpoint's ``[out, in]``
orientation, runs one head at a time with an explicit (T, T) mask, and writes RoPE with complex numbers
over the rotate-half pairs (x[i], x[i + hd/2]) — the GGUF converter does not permute gemma3 q/k rows.

Gemma 3, per layer i (local when (i + 1) % 6 != 0, llama.cpp's fixed pattern):

    h = norm(x) -> q, k, v; q, k = norm_per_head(q), norm_per_head(k); RoPE (local: base 10000,
    global: the GGUF's rope.freq_base); scores = q.k / sqrt(head_dim), causal, and for local layers only
    keys with query - key < sliding_window; x += post_attn_norm(attn @ Wo)
    h = ffn_norm(x); x += post_ffn_norm(Wdown (gelu_tanh(Wgate h) * Wup h))

with x0 = embed[ids] * sqrt(d), a final norm and the tied embedding as the LM head. norm(x) =
x / sqrt(mean(x^2) + eps) * w, where the GGUF's w already holds Gemma's (1 + weight).

Tokenizer: a real SentencePiece BPE processor (`sentencepiece` package) built from the GGUF vocabulary,
with one correction: the HF->GGUF converter wrote user-defined pieces with their ``▁`` turned back into
spaces ("pre-normalized", so llama.cpp can match them in raw text); the processor gets them with ``▁``,
as in the original tokenizer.model, because SentencePiece matches them after escaping spaces.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

LOCAL_ROPE_BASE = 10000.0
GLOBAL_EVERY = 6


@dataclasses.dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int


@dataclasses.dataclass
class GemmaRef:
    hp: dict
    weights: dict  # embed (V, d) f32; final_norm; layers: [{name: array}] with GGUF short names


def _vocab(f: dict) -> Vocab:
    return Vocab(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"],
                 f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
                 f["tokenizer.ggml.unknown_token_id"])


@functools.lru_cache(maxsize=1)
def _reader(path: str):
    import gguf

    return gguf.GGUFReader(path)  # parsing the metadata of 262k tokens takes seconds: once per path


@functools.lru_cache(maxsize=1)
def read_vocab(path: str) -> Vocab:
    return _vocab({name: field.contents() for name, field in _reader(path).fields.items()
                   if name.startswith("tokenizer.")})


@functools.lru_cache(maxsize=1)
def read_gguf(path: str) -> GemmaRef:
    import gguf

    reader = _reader(path)
    f = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    assert f["general.architecture"] == "gemma3"
    a = "gemma3."
    hp = dict(d=f[a + "embedding_length"], n_layers=f[a + "block_count"], n_heads=f[a + "attention.head_count"],
              n_kv=f[a + "attention.head_count_kv"], hd=f[a + "attention.key_length"],
              eps=f[a + "attention.layer_norm_rms_epsilon"], theta=f[a + "rope.freq_base"],
              window=f[a + "attention.sliding_window"])
    tensors = {}
    for t in reader.tensors:
        tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    layers = []
    for i in range(hp["n_layers"]):
        p = f"blk.{i}."
        # float64 once here (~0.8 GB for 270M): converting per forward would dominate a greedy decode
        layers.append({k[len(p):]: v.astype(np.float64) for k, v in tensors.items() if k.startswith(p)})
    weights = {"embed": tensors["token_embd.weight"], "final_norm": tensors["output_norm.weight"], "layers": layers}
    return GemmaRef(hp, weights)


def _norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def _rope(x, positions, base):
    """x: (T, hd) one head. Rotate-half pairs as complex numbers times exp(i * pos * base^(-2j/hd))."""
    hd = x.shape[-1]
    half = hd // 2
    freqs = base ** (-np.arange(half, dtype=np.float64) * 2 / hd)
    z = (x[:, :half] + 1j * x[:, half:]) * np.exp(1j * positions[:, None] * freqs[None, :])
    return np.concatenate([z.real, z.imag], axis=-1)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def is_local(i: int) -> bool:
    return (i + 1) % GLOBAL_EVERY != 0


def hidden_states(ref: GemmaRef, ids, past: list | None = None) -> np.ndarray:
    """(T, d) float64 hidden states after the final norm for the token ids (no BOS added).

    past: None, or a list (one entry per layer, filled on the first call) of the rotated keys and the
    values of the tokens fed before — then `ids` continue them (positions start after them)."""
    hp, w = ref.hp, ref.weights
    ids = np.asarray(ids)
    t = len(ids)
    d, hd, eps = hp["d"], hp["hd"], hp["eps"]
    group = hp["n_heads"] // hp["n_kv"]
    first = len(past[0][0][0]) if past else 0
    positions = np.arange(first, first + t, dtype=np.float64)
    qi, ki = np.arange(first, first + t)[:, None], np.arange(first + t)[None, :]
    x = w["embed"][ids].astype(np.float64) * math.sqrt(d)
    if past is not None and not past:
        past.extend(([np.zeros((0, hd))] * hp["n_kv"], [np.zeros((0, hd))] * hp["n_kv"]) for _ in w["layers"])
    for i, lw in enumerate(w["layers"]):
        g = lambda name: np.asarray(lw[name], np.float64)  # noqa: E731
        allowed = ki <= qi
        if is_local(i):
            allowed &= (qi - ki) < hp["window"]
        base = LOCAL_ROPE_BASE if is_local(i) else hp["theta"]
        h = _norm(x, lw["attn_norm.weight"], eps)
        q = h @ g("attn_q.weight").T
        k = h @ g("attn_k.weight").T
        v = h @ g("attn_v.weight").T
        keys, values = [], []
        for kv in range(hp["n_kv"]):
            kh = _norm(k[:, kv * hd:(kv + 1) * hd], lw["attn_k_norm.weight"], eps)
            keys.append(_rope(kh, positions, base))
            values.append(v[:, kv * hd:(kv + 1) * hd])
        if past is not None:
            old_keys, old_values = past[i]
            keys = [np.concatenate([a, b]) for a, b in zip(old_keys, keys)]
            values = [np.concatenate([a, b]) for a, b in zip(old_values, values)]
            past[i] = (keys, values)
        heads = []
        for head in range(hp["n_heads"]):
            qh = _rope(_norm(q[:, head * hd:(head + 1) * hd], lw["attn_q_norm.weight"], eps), positions, base)
            s = qh @ keys[head // group].T / math.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            heads.append(p @ values[head // group])
        attn = np.concatenate(heads, axis=-1) @ g("attn_output.weight").T
        x = x + _norm(attn, lw["post_attention_norm.weight"], eps)
        h = _norm(x, lw["ffn_norm.weight"], eps)
        mlp = (_gelu_tanh(h @ g("ffn_gate.weight").T) * (h @ g("ffn_up.weight").T)) @ g("ffn_down.weight").T
        x = x + _norm(mlp, lw["post_ffw_norm.weight"], eps)
    return _norm(x, w["final_norm"], eps)


def logits(ref: GemmaRef, hidden: np.ndarray) -> np.ndarray:
    """(T, V) float32 logits of the tied head (computed in float32: V x d float64 would need 1.3 GB)."""
    return hidden.astype(np.float32) @ ref.weights["embed"].T


def greedy(ref: GemmaRef, ids, n: int) -> list[int]:
    """n greedy tokens after ids (ties to the lowest id); each step feeds only the new token, with the
    earlier keys and values kept (a whole-prefix recompute costs 32x more)."""
    past: list = []
    last = hidden_states(ref, ids, past)[-1:]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits(ref, last)[0])))
        last = hidden_states(ref, out[-1:], past)
    return out


def sentencepiece_processor(ref: Vocab):
    """A SentencePiece BPE processor over the GGUF vocabulary: pieces, scores and types as stored
    (the unknown piece typed UNKNOWN, as SentencePiece requires; user-defined pieces with ▁, see the
    module docstring), byte fallback on, no normalization beyond escaping spaces to ▁ (no dummy prefix,
    whitespace kept)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    user_defined = int(pb.ModelProto.SentencePiece.USER_DEFINED)
    for i, (piece, score, kind) in enumerate(zip(ref.tokens, ref.scores, ref.types)):
        if kind == user_defined:
            piece = piece.replace(" ", "\u2581")
        sp = m.pieces.add()
        sp.piece, sp.score = piece, float(score)
        sp.type = pb.ModelProto.SentencePiece.UNKNOWN if i == ref.unk_id else int(kind)
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(ref.tokens)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id = ref.unk_id, ref.bos_id, ref.eos_id
    m.trainer_spec.pad_id = 0
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())
