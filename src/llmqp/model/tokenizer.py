"""Tokenizer: byte-level BPE built from GGUF metadata or loaded from tokenizer.json, plus the chat
template. Uses the `tokenizers` package only (transformers' GGUF path imports torch)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from llmqp.errors import ModelLoadError
from llmqp.model.chat import ChatTemplating, check_unicode

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` name (as llama.cpp defines them).
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "", None):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2 regex with every digit split on its own
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_REGEX), behavior="isolated"), byte_level])
    if pre == "qwen2":
        return pt.Sequence([pt.Split(Regex(_QWEN2_REGEX), behavior="isolated"), byte_level])
    raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported "
                         "(supported: default, gpt2, smollm, llama-bpe, qwen2)")


class Tokenizer(ChatTemplating):
    """Text <-> token ids for one model. `eos_ids` end a generation; `special_ids` never appear in
    text produced by `decode` unless asked."""

    def __init__(self, hf_tokenizer, *, eos_ids, bos_id=None, chat_template=None, vocab_size=None,
                 add_bos: bool = False):
        self.hf = hf_tokenizer
        self.add_bos = bool(add_bos) and bos_id is not None  # raw prompts start with BOS
        self.eos_ids = tuple(sorted(set(int(i) for i in eos_ids)))
        if not self.eos_ids:
            raise ModelLoadError("tokenizer has no end-of-sequence token")
        self.eos_id = self.eos_ids[0]
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.vocab_size = vocab_size or hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = tuple(sorted(
            i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special))
        self._template = None
        self._plain = None  # a copy of `hf` that encodes special-token strings as text
        self._bytes: list[bytes] | None = None

    # ------------------------------------------------------------ construction
    @classmethod
    def from_gguf_reader(cls, reader, vocab_size=None) -> "Tokenizer":
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, processors

        def field(k, default=None):
            f = reader.fields.get(k)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens = field("tokenizer.ggml.tokens")
        merges = field("tokenizer.ggml.merges") or []
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
        tk = HFTokenizer(bpe)
        tk.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", "default"))
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        # CONTROL (3) and USER_DEFINED (4) tokens are matched whole, never split by BPE.
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t == 3])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == 4])
        eos = field("tokenizer.ggml.eos_token_id")
        eot = field("tokenizer.ggml.eot_token_id")
        eos_ids = [i for i in (eos, eot) if i is not None]
        return cls(tk, eos_ids=eos_ids, bos_id=field("tokenizer.ggml.bos_token_id"),
                   chat_template=field("tokenizer.chat_template"), vocab_size=vocab_size or len(tokens),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, directory: Path, vocab_size=None) -> "Tokenizer":
        tk = read_tokenizer_json(directory)
        tcfg = _read_json(directory / "tokenizer_config.json")
        gen = _read_json(directory / "generation_config.json")
        mcfg = _read_json(directory / "config.json")
        eos_ids = []
        for src in (gen.get("eos_token_id"), mcfg.get("eos_token_id")):
            eos_ids += src if isinstance(src, list) else [src] if src is not None else []
        eos_tok = tcfg.get("eos_token")
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
        if eos_tok and tk.token_to_id(eos_tok) is not None:
            eos_ids.append(tk.token_to_id(eos_tok))
        if "<|im_end|>" in tk.get_vocab():  # ChatML models end a turn with it
            eos_ids.append(tk.token_to_id("<|im_end|>"))
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tk, eos_ids=eos_ids, bos_id=mcfg.get("bos_token_id"), chat_template=template,
                   vocab_size=vocab_size, add_bos=bool(tcfg.get("add_bos_token", False)))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_meta.json").write_text(json.dumps({
            "eos_ids": list(self.eos_ids), "bos_id": self.bos_id, "chat_template": self.chat_template,
            "vocab_size": self.vocab_size, "add_bos": self.add_bos}))

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")), eos_ids=meta["eos_ids"],
                   bos_id=meta["bos_id"], chat_template=meta["chat_template"], vocab_size=meta["vocab_size"],
                   add_bos=meta.get("add_bos", False))

    # ------------------------------------------------------------ use
    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. With parse_special=False (the default) text that looks like a control token
        (`<|im_end|>`) is encoded as plain text; only `parse_special=True` turns such strings into the
        control tokens. Raises PromptError for text that is not valid Unicode (a lone surrogate)."""
        check_unicode(text)
        if parse_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self.hf.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for in generated text (b"" for special tokens and ids without text)."""
        if self._bytes is None:
            self._bytes = _byte_level_table(self)
        i = int(i)
        return self._bytes[i] if 0 <= i < len(self._bytes) else b""


def _byte_level_table(tokenizer) -> list[bytes]:
    """Per id, the bytes of a byte-level BPE token (GPT-2 byte-to-unicode map reversed); special tokens
    give b"", added plain-text tokens their UTF-8 text."""
    byte_encoder = gpt2_bytes_to_unicode()
    decoder = {c: b for b, c in byte_encoder.items()}
    added = tokenizer.hf.get_added_tokens_decoder()
    special = set(tokenizer.special_ids) | set(tokenizer.eos_ids)
    table = []
    for i in range(tokenizer.vocab_size):
        if i in special:
            table.append(b"")
            continue
        tok = tokenizer.hf.id_to_token(i)
        if tok is None:
            table.append(b"")
        elif i in added:
            table.append(tok.encode("utf-8"))
        else:
            table.append(bytes(decoder[c] for c in tok) if all(c in decoder for c in tok) else tok.encode())
    return table


@functools.lru_cache(maxsize=None)
def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tokenizer_json(directory: Path):
    """The `tokenizers.Tokenizer` of a Hugging Face directory's tokenizer.json; ModelLoadError when it is
    missing or unreadable."""
    from tokenizers import Tokenizer as HFTokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no tokenizer.json")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be read by the tokenizers package ({e})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
