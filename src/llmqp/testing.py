"""Test helpers that ship with the package, so unit tests run in seconds without the real model.

`tiny_tokenizer()` is a hand-made byte-level BPE: two special tokens, the 256 single bytes, and a few
merges. Its ids are fixed, so tests can name tokens by their text:

    id 0      <|end|>   (special, the EOS)
    id 1      <|pad|>   (special, never allowed by a constraint)
    id 2+b    the single byte b (b = 0..255), e.g. "a" is 2 + 97 = 99
    id 258+   the merges, in MERGES order: "ab", "abc", "bc", "ye", "yes", "no", "12", "{\""
"""

from __future__ import annotations

from llmqp.model.tokenizer import Tokenizer, gpt2_bytes_to_unicode

SPECIAL_TOKENS = ("<|end|>", "<|pad|>")
MERGES = (("a", "b"), ("ab", "c"), ("b", "c"), ("y", "e"), ("ye", "s"), ("n", "o"), ("1", "2"), ("{", '"'))
BYTE_BASE = len(SPECIAL_TOKENS)


_bytes_to_unicode = gpt2_bytes_to_unicode  # GPT-2's byte -> printable character map


def tiny_tokenizer() -> Tokenizer:
    """A fresh `Tokenizer` over the tiny vocabulary above (EOS `<|end|>` = 0, vocab_size 266).

    Pre-tokenization is GPT-2's (words, numbers, punctuation runs split apart), so merges apply inside
    those pieces only. Usable by every constraint backend (it serialises like any `tokenizers` BPE)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[b2u[b]] = BYTE_BASE + b
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=list(MERGES), ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Tokenizer(hf, eos_ids=[0])


def token_id(tokenizer: Tokenizer, text: str) -> int:
    """The id of the single token whose text is `text` (a special token's name, or plain text)."""
    if text in SPECIAL_TOKENS:
        return SPECIAL_TOKENS.index(text)
    b2u = _bytes_to_unicode()
    tok = tokenizer.hf.token_to_id("".join(b2u[b] for b in text.encode("utf-8")))
    if tok is None:
        raise KeyError(f"no single token for {text!r}")
    return tok


def token_texts(tokenizer: Tokenizer, ids) -> set[str]:
    """The texts of `ids` (special tokens by name): readable sets for golden tests."""
    out = set()
    for i in ids:
        i = int(i)
        out.add(SPECIAL_TOKENS[i] if i < BYTE_BASE else tokenizer.decode([i], skip_special=False))
    return out


# ------------------------------------------------------------------------------------- maskbench data
def maskbench_dir():
    """Where the maskbench data lives: `$LLMQP_MASKBENCH_DIR`, else `<repository root>/../shared/data/maskbench`
    (2,778 JSONSchemaBench schemas with test instances), the repository root found from this file's own
    location (`src/llmqp/testing.py` in a checkout), never from an absolute path."""
    import os
    from pathlib import Path

    if os.environ.get("LLMQP_MASKBENCH_DIR"):
        return Path(os.environ["LLMQP_MASKBENCH_DIR"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "maskbench"


def maskbench_files(directory=None) -> list:
    """Sorted paths of the maskbench schema files (empty when the directory is absent)."""
    from pathlib import Path

    root = Path(directory) if directory else maskbench_dir()
    return sorted(root.glob("*.json")) if root.is_dir() else []


def compact_json(value) -> str:
    """The compact serialisation the constraint layer produces by default (keys in the value's order)."""
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
