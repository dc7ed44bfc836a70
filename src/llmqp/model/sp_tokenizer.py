"""SentencePiece-style tokenizer (Gemma): a `tokenizers` BPE with byte fallback, built from a GGUF's
``tokenizer.ggml.{tokens,scores,token_type}`` the way Hugging Face's GemmaConverter builds it from the
SentencePiece model, so that llguidance (which reads ``hf.to_str()``) builds masks on it.

How it reproduces SentencePiece's BPE encoder:

- spaces become ``▁`` (normalizer) — no dummy prefix, no whitespace folding;
- user-defined pieces (runs of newlines, spaces, tabs, HTML tags) match whole before BPE;
  control pieces (``<bos>``, ``<start_of_turn>``, ...) too, only when ``parse_special=True``;
- merges: every split of a normal piece into two normal pieces, ranked by the merged piece's score
  (highest first) — SentencePiece merges the adjacent pair whose result scores best;
- a character no piece covers becomes its UTF-8 bytes as ``<0xNN>`` tokens.

Token types are SentencePiece's (as GGUF stores them): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from llmqp.errors import ModelLoadError
from llmqp.model.chat import ChatTemplating, check_unicode
from llmqp.model.tokenizer import _read_json, read_tokenizer_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # ▁, SentencePiece's escaped space
KIND = "sentencepiece"  # written in the saved metadata: tells `load` which tokenizer class reads it


def _merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging over the normal pieces."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    ranked.sort()  # best score first; equal scores by the parts' ids, as HF's converter orders them
    return [(left, right) for _, _, _, left, right in ranked]


def _byte_value(piece: str) -> int:
    return int(piece[3:5], 16)  # "<0xNN>"


class SentencePieceTokenizer(ChatTemplating):
    """Text <-> token ids for a SentencePiece-vocabulary model (Gemma 3). Same surface as
    `llmqp.model.tokenizer.Tokenizer`: `encode`, `decode`, `token_bytes`, `apply_chat_template`, `hf`."""

    def __init__(self, hf_tokenizer, *, token_types: bytes, eos_ids, bos_id, add_bos: bool,
                 chat_template: str | None, vocab_size: int | None = None):
        self.hf = hf_tokenizer
        self.token_types = bytes(token_types)  # one SentencePiece type per id
        self.eos_ids = tuple(sorted(set(int(i) for i in eos_ids)))
        if not self.eos_ids:
            raise ModelLoadError("tokenizer has no end-of-sequence token")
        self.eos_id = self.eos_ids[0]
        self.bos_id = None if bos_id is None else int(bos_id)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        self.vocab_size = int(vocab_size or len(self.token_types))
        self.special_ids = tuple(i for i, t in enumerate(self.token_types) if t in (CONTROL, UNKNOWN, UNUSED))
        self._template = None
        self._special_lock = threading.Lock()  # `encode` flips hf.encode_special_tokens per call

    # ------------------------------------------------------------ construction
    @classmethod
    def from_vocab(cls, tokens: list[str], scores: list[float], types: list[int], *, eos_ids, bos_id,
                   unk_id: int | None, add_bos: bool, chat_template: str | None = None,
                   vocab_size: int | None = None) -> "SentencePieceTokenizer":
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers

        if not (len(tokens) == len(scores) == len(types)):
            raise ModelLoadError(f"tokenizer vocabulary is inconsistent: {len(tokens)} tokens, "
                                 f"{len(scores)} scores, {len(types)} types")
        if len(set(tokens)) != len(tokens):
            raise ModelLoadError("tokenizer vocabulary has duplicate pieces")
        if sum(1 for t in types if t == BYTE) != 256:
            raise ModelLoadError("SentencePiece vocabulary without the 256 <0xNN> byte pieces "
                                 "(byte fallback) is not supported")
        # GGUF stores user-defined pieces with their ▁ turned into spaces ("pre-normalized" by the
        # converter for llama.cpp); the tokenizer gets them back as in the SentencePiece model, and
        # matches them in the normalized text, as SentencePiece does (this differs from matching the raw
        # text only where the text itself holds a ▁).
        tokens = [p.replace(" ", SPACE) if t == USER_DEFINED else p for p, t in zip(tokens, types)]
        unk = tokens[unk_id] if unk_id is not None else None
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_merges(tokens, scores, types),
                         unk_token=unk, fuse_unk=True, byte_fallback=True)
        tk = HFTokenizer(bpe)
        tk.normalizer = normalizers.Replace(" ", SPACE)
        tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
        # Matched whole before BPE: control pieces in the raw text, user-defined ones after normalization.
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t in (CONTROL, UNKNOWN, UNUSED)])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=True)
                       for i, t in enumerate(types) if t == USER_DEFINED])
        return cls(tk, token_types=bytes(int(t) for t in types), eos_ids=eos_ids, bos_id=bos_id,
                   add_bos=add_bos, chat_template=chat_template, vocab_size=vocab_size)

    @classmethod
    def from_gguf_reader(cls, reader, vocab_size: int | None = None) -> "SentencePieceTokenizer":
        """From a GGUF whose ``tokenizer.ggml.model`` is "llama" (SentencePiece)."""
        def field(k, default=None):
            f = reader.fields.get(k)
            return default if f is None else f.contents()

        tokens = field("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("GGUF has no tokenizer.ggml.tokens")
        scores = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        eos = field("tokenizer.ggml.eos_token_id")
        eot = field("tokenizer.ggml.eot_token_id")
        if eot is None and "<end_of_turn>" in tokens:  # Gemma ends a chat turn with it
            eot = tokens.index("<end_of_turn>")
        return cls.from_vocab(tokens, scores, types, eos_ids=[i for i in (eos, eot) if i is not None],
                              bos_id=field("tokenizer.ggml.bos_token_id"),
                              unk_id=field("tokenizer.ggml.unknown_token_id"),
                              add_bos=bool(field("tokenizer.ggml.add_bos_token", True)),
                              chat_template=field("tokenizer.chat_template"),
                              vocab_size=vocab_size or len(tokens))

    @classmethod
    def from_hf_dir(cls, directory: Path, vocab_size: int | None = None) -> "SentencePieceTokenizer":
        """From a Hugging Face Gemma directory: tokenizer.json as it is (its added tokens give the control
        and user-defined pieces, ``<0xNN>`` pieces are bytes); BOS/EOS from config.json,
        generation_config.json and tokenizer_config.json; the template from tokenizer_config.json or
        chat_template.jinja."""
        import re

        directory = Path(directory)
        tk = read_tokenizer_json(directory)
        size = tk.get_vocab_size(with_added_tokens=True)
        types = bytearray([NORMAL]) * size
        for token, i in tk.get_vocab(with_added_tokens=True).items():
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = BYTE
        for i, added in tk.get_added_tokens_decoder().items():
            types[i] = CONTROL if added.special else USER_DEFINED
        mcfg, gen, tcfg = (_read_json(directory / n) for n in ("config.json", "generation_config.json",
                                                                "tokenizer_config.json"))
        eos_ids = []
        for src in (mcfg.get("eos_token_id"), gen.get("eos_token_id")):
            eos_ids += src if isinstance(src, list) else [src] if src is not None else []
        if "<end_of_turn>" in tk.get_vocab(with_added_tokens=True):
            eos_ids.append(tk.token_to_id("<end_of_turn>"))
        template = tcfg.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        return cls(tk, token_types=bytes(types), eos_ids=eos_ids,
                   bos_id=mcfg.get("bos_token_id", gen.get("bos_token_id")),
                   add_bos=bool(tcfg.get("add_bos_token", True)), chat_template=template, vocab_size=vocab_size)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_meta.json").write_text(json.dumps({
            "kind": KIND, "eos_ids": list(self.eos_ids), "bos_id": self.bos_id, "add_bos": self.add_bos,
            "chat_template": self.chat_template, "vocab_size": self.vocab_size,
            "token_types": "".join(map(str, self.token_types))}))  # one digit per id

    @classmethod
    def load(cls, directory: Path) -> "SentencePieceTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        if meta.get("kind") != KIND:
            raise ModelLoadError(f"{directory}: not a saved SentencePiece tokenizer")
        return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")),
                   token_types=bytes(int(c) for c in meta["token_types"]), eos_ids=meta["eos_ids"],
                   bos_id=meta["bos_id"], add_bos=meta["add_bos"], chat_template=meta["chat_template"],
                   vocab_size=meta["vocab_size"])

    # ------------------------------------------------------------ use
    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, without BOS (the engine adds it when `add_bos`). With parse_special=False
        a control-token name in the text (``<bos>``, ``<start_of_turn>``) is plain text."""
        check_unicode(text)
        with self._special_lock:
            self.hf.encode_special_tokens = not parse_special
            return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for: b"" for control/unknown/unused tokens, one byte for a
        byte-fallback ``<0xNN>`` token, the piece with ▁ as a space otherwise."""
        i = int(token_id)
        kind = self.token_types[i] if 0 <= i < len(self.token_types) else CONTROL
        if kind in (CONTROL, UNKNOWN, UNUSED):
            return b""
        piece = self.hf.id_to_token(i)
        if kind == BYTE:
            return bytes([_byte_value(piece)])
        return piece.replace(SPACE, " ").encode("utf-8")

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))
