"""Writes a tiny llama-architecture GGUF (random f32 weights, the byte-level vocabulary of
`llmqp.testing.tiny_tokenizer`) so loader and CLI tests exercise the real GGUF path in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmqp.testing import BYTE_BASE, MERGES, SPECIAL_TOKENS, _bytes_to_unicode


def tiny_vocab() -> list[str]:
    b2u = _bytes_to_unicode()
    return [*SPECIAL_TOKENS, *(b2u[b] for b in range(256)), *(left + right for left, right in MERGES)]


def write_tiny_gguf(path: Path, *, hidden_size: int = 32, n_layers: int = 2, seed: int = 0,
                    context_length: int = 256) -> Path:
    """A GGUF at `path` that `llmqp.Engine(path)` loads: 2 heads of 16 (1 KV head), FFN 64, no chat
    template, EOS `<|end|>` (id 0). Returns `path`."""
    import gguf

    tokens = tiny_vocab()
    n_heads, n_kv_heads, head_dim, ffn = 2, 1, hidden_size // 2, 2 * hidden_size
    rng = np.random.default_rng(seed)

    def w(out_dim, in_dim):  # [out, in] as numpy; the GGUF stores the reversed dims
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges([f"{left} {right}" for left, right in MERGES])
    writer.add_eos_token_id(0)
    assert BYTE_BASE == len(SPECIAL_TOKENS)
    writer.add_tensor("token_embd.weight", w(len(tokens), hidden_size) * np.float32(np.sqrt(hidden_size)))
    writer.add_tensor("output_norm.weight", np.ones(hidden_size, np.float32))
    for i in range(n_layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(hidden_size, np.float32))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(hidden_size, np.float32))
        writer.add_tensor(p + "attn_q.weight", w(n_heads * head_dim, hidden_size))
        writer.add_tensor(p + "attn_k.weight", w(n_kv_heads * head_dim, hidden_size))
        writer.add_tensor(p + "attn_v.weight", w(n_kv_heads * head_dim, hidden_size))
        writer.add_tensor(p + "attn_output.weight", w(hidden_size, n_heads * head_dim))
        writer.add_tensor(p + "ffn_gate.weight", w(ffn, hidden_size))
        writer.add_tensor(p + "ffn_up.weight", w(ffn, hidden_size))
        writer.add_tensor(p + "ffn_down.weight", w(hidden_size, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
