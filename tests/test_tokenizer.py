"""The embedded model's tokenizer: exact round trips, and ids identical to an independent, slow byte-level
BPE written here from the GGUF's own vocabulary and merges (`tokenizer.ggml.tokens` / `.merges`)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import regex

import reference_numpy as ref

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# SmolLM ("smollm" in llama.cpp): every numeric character on its own, then the GPT-2 pattern.
DIGIT = regex.compile(r"\p{N}")
GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

ROUND_TRIP = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they? We'd've known. IT'S LOUD.",
    "naïve café résumé — Zürich, São Paulo, Kraków, Ærøskøbing",
    "Привет, мир! Ελληνικά. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया",
    "日本語のテキスト、中文文本和한국어 텍스트。",
    "emoji: 😀🎉🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ✨",
    "digits 0123456789 3.14159 -42 1,000,000 2024-06-01 ٣٤٥ ²½ Ⅻ",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n\tif (x != y && z >= 0) return;",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\nand \r\n CRLF and  double  spaces",
    " \n \t ",
    "          ",
    "a\u00a0non-breaking\u2009thin\u3000ideographic space",
    "zero\u200bwidth and combining e\u0301 and \U0001d49c math",
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    '{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "n": null}',
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "....,,,;;;!!!???---___===+++***///\\\\\\|||~~~```",
    "\x00\x01\x7f control bytes \x1b[31m",
]

SPECIAL = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|im_start|>",
    "a <|im_end|> b",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class SlowBPE:
    """Rank-ordered byte-level BPE straight from the GGUF metadata; slow and obvious on purpose."""

    def __init__(self, tokens, token_types, merges):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()
        specials = sorted((t for t, ty in zip(tokens, token_types) if ty == 3), key=len, reverse=True)
        self.special_split = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self.specials = set(specials)

    def pretokenize(self, text: str) -> list[str]:
        words = []
        for piece in regex.split(r"(\p{N})", text):
            if piece:
                words += GPT2.findall(piece) if not DIGIT.fullmatch(piece) else [piece]
        return words

    @functools.lru_cache(maxsize=None)
    def bpe(self, word: str) -> tuple[int, ...]:
        parts = [self.byte_map[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.vocab[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.special_split.split(text):
            if chunk in self.specials:
                ids.append(self.vocab[chunk])
            elif chunk:
                for word in self.pretokenize(chunk):
                    ids += self.bpe(word)
        return ids


@pytest.fixture(scope="module")
def gguf_vocab():
    return ref.read_gguf(ref.default_gguf())


@pytest.fixture(scope="module")
def slow_bpe(gguf_vocab):
    assert gguf_vocab.pre == "smollm"
    return SlowBPE(gguf_vocab.tokens, gguf_vocab.token_types, gguf_vocab.merges)


@pytest.fixture(scope="module")
def tok(loaded_model):
    return loaded_model.tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SPECIAL)
def test_special_tokens_are_single_ids_and_round_trip(tok, text, gguf_vocab):
    ids = tok.encode(text, parse_special=True)  # the chat template's path; user text keeps them as text
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert ids.count(gguf_vocab.tokens.index(s)) == text.count(s)
    assert tok.decode(ids, skip_special=False) == text
    plain = tok.decode(ids)  # special tokens dropped by default
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert s not in plain


def test_special_token_ids_match_gguf(tok, gguf_vocab):
    assert tok.encode("<|im_end|>", parse_special=True) == [2] and gguf_vocab.tokens[2] == "<|im_end|>"
    assert 2 not in tok.encode("<|im_end|>")  # plain text by default
    assert tok.eos_id == 2 and 2 in tok.eos_ids
    assert set(tok.special_ids) == {i for i, t in enumerate(gguf_vocab.token_types) if t == 3}
    assert tok.vocab_size == len(gguf_vocab.tokens) == 49152


def _corpus() -> list[str]:
    texts = ROUND_TRIP + SPECIAL + [(Path(__file__).parent / "data" / "paragraph.txt").read_text()]
    for pattern in ("src/llmqp/**/*.py", "README.md", "tests/*.py"):  # real code and prose
        texts += [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob(pattern))[:40]]
    return texts


def test_ids_match_independent_bpe_from_gguf_vocab(tok, slow_bpe):
    corpus = _corpus()
    n_tokens = 0
    for text in corpus:
        want = slow_bpe.encode(text)
        got = tok.encode(text, parse_special=True)
        if got != want:
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            pytest.fail(f"ids differ at {k} for {text[:60]!r}: got {got[k:k + 5]} "
                        f"{[tok.id_to_token(i) for i in got[k:k + 5]]}, independent BPE {want[k:k + 5]}")
        n_tokens += len(got)
        if "<|" not in text:
            assert tok.decode(got) == text
    print(f"\nindependent BPE agrees on {len(corpus)} texts, {n_tokens} tokens")
    assert n_tokens > 5000


def test_digits_are_split_one_per_token(tok, slow_bpe):
    ids = tok.encode("year 2024 and 1234567")
    digit_tokens = [tok.id_to_token(i) for i in ids if any(c.isdigit() for c in tok.id_to_token(i))]
    assert digit_tokens == list("2024") + list("1234567")
    assert ids == slow_bpe.encode("year 2024 and 1234567")
