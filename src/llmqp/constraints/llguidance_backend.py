"""The llguidance backend: Earley parser + derivative-based lexer over a token trie.

Measured on the SmolLM2 tokenizer (49152 tokens, benchmarks/maskbench.py): ~2 ms median compile for
real-world JSON schemas, tens of µs per mask; building the tokenizer's trie (`LLTokenizer`) costs
~0.4 s and is done once per `Tokenizer` object (kept in a weak dictionary keyed by it).

Behaviour worth knowing (llguidance's, kept): where the constraint forces the next bytes, only their
canonical first token is allowed (`forced()[0]`), not every token that spells a prefix of them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import weakref
from typing import ClassVar

import llguidance
import numpy as np

from llmqp.constraints import contains, keywords, schema as schema_tools, unique
from llmqp.constraints.base import CompiledConstraint, ConstraintBackend, ConstraintKind, ConstraintSpec, Matcher
from llmqp.errors import ConstraintError


# ------------------------------------------------------------------------------------- tokenizer side
class _TokenizerState:
    """What llguidance needs to know about one `llmqp.model.tokenizer.Tokenizer`."""

    def __init__(self, tokenizer):
        self.vocab_size = int(tokenizer.vocab_size)  # the model's: masks and ids are sized by it
        self.eos_ids = tuple(int(i) for i in tokenizer.eos_ids)
        # The model may pad its vocabulary past the tokenizer's (ids without text: never allowed) or,
        # rarely, stop short of it (ids the model cannot produce: cut from every mask).
        hf_size = tokenizer.hf.get_vocab_size(with_added_tokens=True)
        self.llg = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=max(self.vocab_size, hf_size),
                                          eos_token=list(self.eos_ids))
        self.mask_words = (self.llg.vocab_size + 31) // 32  # what llguidance writes
        self.padded_words = self.mask_words + (self.mask_words & 1)  # so that an int64 view fits
        self.all_ids = np.arange(self.vocab_size, dtype=np.int32)  # all_ids[mask bits] -> sorted ids
        # Special tokens are never allowed as text (EOS only as the end, when the output may stop).
        # llguidance would offer one where forced text spells its name (`<|im_start|>`), but the
        # engine does not decode special tokens into text.
        self.special_ids = frozenset(int(i) for i in tokenizer.special_ids) | frozenset(self.eos_ids)
        self.special_names = tuple(name for name in (tokenizer.id_to_token(i) for i in sorted(self.special_ids))
                                   if name)
        keep = np.zeros(self.padded_words * 32, dtype=bool)
        keep[:self.vocab_size] = True
        keep[sorted(self.special_ids)] = False
        self.keep_words = np.packbits(keep, bitorder="little").view(np.int32)
        self.eos_bits = [(e >> 5, np.uint32(1 << (e & 31)).view(np.int32)) for e in self.eos_ids]
        self._by_bytes: tuple[dict[bytes, int], int] | None = None
        self._token_bytes: tuple | None = None

    def token_bytes(self) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """(bytes of every id (b"" for special ones), holds a `"` or `\\` per id, characters per id);
        built on first use (~0.1 s for 49k tokens), for the uniqueItems layer."""
        if self._token_bytes is None:
            raw = [b"" if tok in self.special_ids or tok >= self.llg.vocab_size or self.llg.is_special_token(tok)
                   else self.llg.decode_bytes([tok]) for tok in range(self.vocab_size)]
            has_quote = np.array([b'"' in r or b"\\" in r for r in raw], dtype=bool)
            char_len = np.array([len(r.decode("utf-8", errors="replace")) for r in raw], dtype=np.int32)
            self._token_bytes = (raw, has_quote, char_len)
        return self._token_bytes

    def tokens_by_bytes(self) -> tuple[dict[bytes, int], int]:
        """{token bytes: id} for the non-special tokens, and the longest token's length; built on first
        use (~0.1 s for 49k tokens)."""
        if self._by_bytes is None:
            table: dict[bytes, int] = {}
            for tok in range(min(self.vocab_size, self.llg.vocab_size)):
                if not self.llg.is_special_token(tok):
                    raw = self.llg.decode_bytes([tok])
                    if raw:
                        table.setdefault(raw, tok)
            self._by_bytes = (table, max(map(len, table), default=1))
        return self._by_bytes


_TOKENIZERS: "weakref.WeakKeyDictionary[object, _TokenizerState]" = weakref.WeakKeyDictionary()


def tokenizer_state(tokenizer) -> _TokenizerState:
    """The llguidance view of `tokenizer`, built once per tokenizer object (~0.4 s for 49k tokens)."""
    state = _TOKENIZERS.get(tokenizer)
    if state is None:
        state = _TOKENIZERS[tokenizer] = _TokenizerState(tokenizer)
    return state


# ---------------------------------------------------------------------------------------------- matcher
_EMPTY = np.zeros(0, dtype=np.int32)
_EMPTY.setflags(write=False)
_SPARSE_WORDS = 2  # masks with at most this many non-zero 64-bit words are converted in Python
_DENSE_CACHE_SIZE = 8  # other id arrays remembered per matcher, keyed by the bitmask


class LLGuidanceMatcher(Matcher):
    """llguidance's matcher behind the `Matcher` verbs.

    Rollback: llguidance 1.9's own `rollback` is wrong after a mask was computed at a position that is
    then rolled back past (measured: compute the mask inside `{"w":4`, roll back to the start, feed
    `{"r":7` -- the next mask misses `}`; tests/test_keywords.py replays such sequences). So a rollback
    past a position whose mask was computed restores a copy of the matcher taken at or before the
    target (one every CHECKPOINT_EVERY tokens, taken when a mask is computed once the matcher has been
    used for drafts: after its first `try_accept` or `rollback`) and feeds the remaining tokens again;
    other rollbacks use llguidance's. Cost for drafts: a `deep_copy` (~0.1-0.2 ms on long outputs) per
    CHECKPOINT_EVERY tokens, and a replay of at most that many tokens per such rollback (the first one
    may replay the whole output); none for a matcher that only `accept`s."""

    CHECKPOINT_EVERY = 32

    def __init__(self, template: llguidance.LLMatcher, state: _TokenizerState):
        self._template = template  # never advanced: position 0 for restores
        self._m = template.deep_copy()
        self._state = state
        self.vocab_size = state.vocab_size
        self.eos_ids = state.eos_ids
        # bit i of word w: token 32*w + i (little-endian words, so the int64 view reads 64 at a time)
        self._mask = np.zeros(state.padded_words, dtype=np.int32)
        self._mask64 = self._mask.view(np.int64)
        self._mask_ptr = self._mask.ctypes.data  # looked up once: the attribute costs ~1.5 µs
        self._dense: dict[bytes, np.ndarray] = {}
        self._ended = False
        self._tokens: list[int] = []  # tokens fed to llguidance (EOS excluded): what a restore replays
        self._eos_recorded = False
        self._checkpoints: list[tuple[int, llguidance.LLMatcher]] = []  # (position, copy), increasing
        self._masked_max = 0  # the furthest position whose mask this matcher object computed
        self._drafting = False  # try_accept or rollback was called: keep checkpoints from now on

    def _computing_mask(self) -> None:
        pos = len(self._tokens)
        if pos > self._masked_max:
            self._masked_max = pos
        last = self._checkpoints[-1][0] if self._checkpoints else 0
        if self._drafting and pos - last >= self.CHECKPOINT_EVERY:
            self._checkpoints.append((pos, self._m.deep_copy()))

    def allowed(self) -> np.ndarray:
        """Sorted int32 ids (read-only: the array may be shared with earlier calls)."""
        if self._ended:
            return _EMPTY
        mask = self._mask
        self._computing_mask()
        self._m.unsafe_compute_mask_ptr(self._mask_ptr, 4 * self._state.mask_words)
        if self._m.is_error():
            raise ConstraintError(f"constraint backend failed mid-generation: {self._m.get_error()}")
        np.bitwise_and(mask, self._state.keep_words, out=mask)
        if self._m.is_accepting():
            for word, bit in self._state.eos_bits:
                mask[word] |= bit
        words64 = self._mask64
        if np.count_nonzero(words64) <= _SPARSE_WORDS:  # forced steps, keys, punctuation: read bit by bit
            ids = []
            for w in words64.nonzero()[0].tolist():
                bits = int(words64[w]) & 0xFFFFFFFFFFFFFFFF
                while bits:
                    low = bits & -bits
                    ids.append(64 * w + low.bit_length() - 1)
                    bits ^= low
            if not ids and not self._m.is_stopped():
                raise ConstraintError("no ordinary token can continue: the constraint requires text that spells "
                                      f"a special token ({', '.join(self._state.special_names[:4])}, ...), "
                                      "which is never generated")
            return np.array(ids, dtype=np.int32)
        # Dense masks (inside a JSON string: ~49k ids) repeat step after step; converting one costs
        # ~35 µs, looking it up ~3 µs.
        key = mask.tobytes()
        ids = self._dense.get(key)
        if ids is None:
            bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:self.vocab_size]
            ids = self._state.all_ids[bits.view(bool)]
            ids.setflags(write=False)
            if len(self._dense) >= _DENSE_CACHE_SIZE:
                self._dense.pop(next(iter(self._dense)))
            self._dense[key] = ids
        return ids

    def forced(self) -> list[int]:
        if self._ended or self._m.is_stopped():
            return []
        self._computing_mask()
        forced = self._m.compute_ff_tokens()
        for i, tok in enumerate(forced):
            if tok >= self.vocab_size or tok in self._state.special_ids:
                return forced[:i]
        return forced

    def accept(self, token_id: int) -> None:
        token_id = int(token_id)
        if self._ended:
            raise ValueError(f"token {token_id} after the end of the match")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token {token_id} is outside the vocabulary (size {self.vocab_size})")
        if token_id in self.eos_ids:
            if not self._m.is_accepting():
                raise ValueError(f"EOS token {token_id} before the output is complete")
            self._end(token_id)
            return
        if token_id in self._state.special_ids or not self._m.consume_token(token_id):
            raise ValueError(f"token {token_id} is not allowed here ({self._m.get_error()})")
        self._tokens.append(token_id)

    def try_accept(self, token_ids) -> int:
        self._drafting = True
        if self._ended:
            return 0
        tokens = [int(t) for t in token_ids]
        plain = next((i for i, t in enumerate(tokens)
                      if not 0 <= t < self.vocab_size or t in self._state.special_ids), len(tokens))
        n = self._m.try_consume_tokens(tokens[:plain]) if plain else 0
        self._tokens.extend(tokens[:n])
        if n == plain < len(tokens) and tokens[plain] in self.eos_ids and self._m.is_accepting():
            self._end(tokens[plain])
            n += 1
        return n

    def _end(self, eos: int) -> None:
        # llguidance records an EOS only when the grammar could still go on (not when it has stopped).
        self._eos_recorded = not self._m.is_stopped()
        self._m.consume_token(eos)
        self._ended = True

    def rollback(self, n: int) -> None:
        n = int(n)
        self._drafting = True
        accepted = len(self._tokens) + self._ended
        if not 0 <= n <= accepted:
            raise ValueError(f"cannot roll back {n} tokens: {accepted} were accepted")
        if not n:
            return
        eos_in_backend = self._ended and self._eos_recorded
        target = accepted - n  # tokens kept (EOS excluded: it is always the last one)
        if self._masked_max <= target:
            backend_n = len(self._tokens) - target + eos_in_backend
            if backend_n and (not self._m.rollback(backend_n) or self._m.is_error()):
                raise ValueError(f"constraint backend could not roll back {n} tokens ({self._m.get_error()})")
        else:
            while self._checkpoints and self._checkpoints[-1][0] > target:
                self._checkpoints.pop()
            start, base = self._checkpoints[-1] if self._checkpoints else (0, self._template)
            self._m = base.deep_copy()
            if target > start and self._m.try_consume_tokens(self._tokens[start:target]) != target - start:
                raise ValueError(f"constraint backend could not replay {target - start} tokens "
                                 f"({self._m.get_error()})")
            self._masked_max = start
        del self._tokens[target:]
        self._ended = False

    def can_stop(self) -> bool:
        return self._ended or (self._m.is_accepting() and not self._m.is_error())

    def is_done(self) -> bool:
        return self._ended or self._m.is_stopped()


# ----------------------------------------------------------------------------------------- compiled
@dataclasses.dataclass(frozen=True, eq=False)
class LLGuidanceConstraint(CompiledConstraint):
    spec: ConstraintSpec
    grammar: str  # the llguidance grammar (JSON), after strict-mode rewriting
    compile_ms: float
    _template: llguidance.LLMatcher = dataclasses.field(repr=False)
    _state: _TokenizerState = dataclasses.field(repr=False)
    unique_arrays: dict = dataclasses.field(default_factory=dict, repr=False)  # output path -> UniqueArray
    contains_arrays: dict = dataclasses.field(default_factory=dict, repr=False)  # output path -> ContainsArray

    def matcher(self) -> Matcher:
        inner = LLGuidanceMatcher(self._template, self._state)
        if self.unique_arrays:
            inner = unique.UniqueMatcher(inner, self.unique_arrays, *self._state.token_bytes())
        if self.contains_arrays:
            inner = contains.ContainsMatcher(inner, self.contains_arrays, self._state.token_bytes()[0])
        return inner

    def accepts(self, text: str) -> bool:
        if not self.unique_arrays and not self.contains_arrays:
            return self._accepts_any_order(text)
        try:
            value = json.loads(text)
            exact = json.loads(text, parse_float=contains.exact_number) if self.contains_arrays else value
        except ValueError:
            return False
        return unique.check_value(value, self.unique_arrays) and \
            contains.check_value(exact, self.contains_arrays) and self._accepts_any_order(text)

    def _accepts_any_order(self, text: str) -> bool:
        if self._accepts(text):
            return True
        if self.spec.kind is not ConstraintKind.JSON_SCHEMA or self.spec.strict:
            return False
        # JSON-Schema semantics: a valid object's keys may come in any order; the grammar generates the
        # schema's order, so check the same value with its keys in that order (never widens: validity
        # does not depend on key order).
        try:
            value = json.loads(text)
        except ValueError:
            return False
        compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if text != compact:  # only compact texts (no duplicate keys, no whitespace to bound) are reordered
            return False
        ordered_text = json.dumps(keywords.reorder(value, json.loads(self.spec.source)), separators=(",", ":"),
                                  ensure_ascii=False)
        if ordered_text != compact and self._accepts(ordered_text):
            return True
        # An invalid value is rejected in every key order (the grammar accepts no invalid instance):
        # `jsonschema` says so at once, where the search below would try orders until its budget ends.
        if not self._may_be_valid(text):
            return False
        # Search the key orders the grammar allows, byte by byte (a byte-level vocabulary has no
        # canonical-token restriction), within a budget: never accepts an invalid value, may reject.
        walker = _OrderSearch(self._byte_template())
        return walker.value(value) is not None and walker.m.is_accepting()

    def _may_be_valid(self, text: str) -> bool:
        """False only where `jsonschema` (formats as annotations) rejects the value; True where it
        accepts it or cannot decide (a remote `$ref`, a number it cannot compare, no jsonschema)."""
        checker = _CHECKERS.get(self, False)
        if checker is False:
            try:
                from jsonschema.validators import validator_for

                schema = json.loads(self.spec.source)
                checker = validator_for(schema)(schema)
            except Exception:  # noqa: BLE001 - no jsonschema, or a schema it cannot read: no shortcut
                checker = None
            _CHECKERS[self] = checker
        if checker is None:
            return True
        try:
            return bool(checker.is_valid(json.loads(text, parse_float=contains.exact_number)))
        except Exception:  # noqa: BLE001 - a $ref it cannot resolve, a comparison it cannot make
            return True

    def _byte_template(self) -> llguidance.LLMatcher:
        template = _BYTE_TEMPLATES.get(self)
        if template is None:
            template = _BYTE_TEMPLATES[self] = llguidance.LLMatcher(_byte_tokenizer(), self.grammar, log_level=0)
        return template.deep_copy()

    def _accepts(self, text: str) -> bool:
        m = self._template.deep_copy()
        if any(name in text for name in self._state.special_names):
            # The tokenizer would read these names as special tokens, which a matcher never allows.
            return self._greedy_walk(m, text.encode("utf-8"), 0)
        tokens = self._state.llg.tokenize_str(text)
        consumed = m.try_consume_tokens(tokens)
        if consumed == len(tokens):
            return m.is_accepting()
        # llguidance checks bytes, but where the grammar forces bytes it allows only their canonical
        # tokens, which can differ from how the tokenizer splits the whole text. Resume one token
        # back along any path the matcher allows: the longest allowed token that spells the text next.
        if consumed:
            m.rollback(1)
            consumed -= 1
        return self._greedy_walk(m, text.encode("utf-8"), len(self._state.llg.decode_bytes(tokens[:consumed])))

    def _greedy_walk(self, m: llguidance.LLMatcher, raw: bytes, pos: int) -> bool:
        by_bytes, longest = self._state.tokens_by_bytes()
        mask = np.zeros(self._state.mask_words, dtype=np.int32)
        while pos < len(raw):
            m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            for length in range(min(longest, len(raw) - pos), 0, -1):
                tok = by_bytes.get(raw[pos:pos + length])
                if tok is not None and (mask[tok >> 5] >> (tok & 31)) & 1:
                    break
            else:
                return False
            m.consume_token(tok)
            pos += length
        return m.is_accepting()


# ------------------------------------------------------------------------------- key-order search
_BYTE_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CHECKERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # constraint -> jsonschema validator (or None)
_SEARCH_BUDGET = 20_000  # bytes fed (with rollbacks) before the order search gives up (then: rejected)


def _byte_tokenizer() -> llguidance.LLTokenizer:
    """An LLTokenizer whose tokens are the 256 single bytes (id = byte + 1; id 0 is the EOS)."""
    global _BYTES_LLTOK
    if _BYTES_LLTOK is None:
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        from llmqp.model.tokenizer import gpt2_bytes_to_unicode

        b2u = gpt2_bytes_to_unicode()
        vocab = {"<|eos|>": 0, **{b2u[b]: b + 1 for b in range(256)}}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken("<|eos|>", special=True, normalized=False)])
        _BYTES_LLTOK = llguidance.LLTokenizer(hf.to_str(), n_vocab=257, eos_token=[0])
    return _BYTES_LLTOK


_BYTES_LLTOK = None


class _OrderSearch:
    """Feeds a JSON value's compact text to a byte-level matcher, trying its objects' keys in every
    order the grammar allows (depth first, with rollback). `value()` returns the bytes fed, or None
    (and rolls back) when no order fits or the budget is spent."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.m, self.budget = matcher, _SEARCH_BUDGET

    def feed(self, data: bytes) -> int | None:
        self.budget -= len(data)
        if self.budget < 0:
            return None
        tokens = [b + 1 for b in data]
        n = self.m.try_consume_tokens(tokens)
        if n < len(tokens):
            if n:
                self.m.rollback(n)
            return None
        return n

    def undo(self, n: int) -> None:
        if n:
            self.m.rollback(n)

    def value(self, value) -> int | None:
        if isinstance(value, dict):
            opened = self.feed(b"{")
            if opened is None:
                return None
            rest = self.members(value, list(value), first=True)
            if rest is None:
                self.undo(opened)
                return None
            return opened + rest
        if isinstance(value, list):
            total = self.feed(b"[")
            if total is None:
                return None
            for i, item in enumerate(value):
                sep = self.feed(b",") if i else 0
                n = self.value(item) if sep is not None else None
                if n is None:
                    self.undo(total + (sep or 0))
                    return None
                total += sep + n
            end = self.feed(b"]")
            if end is None:
                self.undo(total)
                return None
            return total + end
        return self.feed(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))

    def members(self, obj: dict, keys: list, first: bool) -> int | None:
        if not keys:
            return self.feed(b"}")
        for key in keys:
            head = self.feed((b"" if first else b",") + json.dumps(key, ensure_ascii=False).encode("utf-8") + b":")
            if head is None:
                continue
            body = self.value(obj[key])
            if body is not None:
                rest = self.members(obj, [k for k in keys if k != key], first=False)
                if rest is not None:
                    return head + body + rest
                self.undo(body)
            self.undo(head)
            if self.budget < 0:
                return None
        return None


# ---------------------------------------------------------------------------------------------- backend
_ONE_OF_UNPROVEN = "oneOf constraints are not supported"
WHITESPACE_MAX_RUN = 20  # whitespace="flexible": at most this many whitespace characters between two tokens
WHITESPACE_PATTERN = f"[\\x20\\x0A\\x0D\\x09]{{0,{WHITESPACE_MAX_RUN}}}"
_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[(.*?)\]')
_OVERLAPPING = re.compile(r"patternProperty regexes /.*/ and /.*/ are not disjoint")
_CIRCULAR = re.compile(r"circular references with sibling keys are not supported: \S*?(#\S*)")
_INLINE_ROUNDS = 8  # rounds of keywords.inline_merged_refs before a circular merge is refused


@dataclasses.dataclass(frozen=True)
class LLGuidanceBackend(ConstraintBackend):
    """Compiles specs with llguidance. JSON schemas: strict mode and the keyword checks of
    `llmqp.constraints.schema` run first; llguidance's own options are pinned so that no unsupported
    keyword is ever ignored (`lenient: false`) and `oneOf` is never loosened to `anyOf` unless the
    options are provably disjoint (`coerce_one_of: false`)."""

    name: ClassVar[str] = "llguidance"

    def compile(self, spec: ConstraintSpec, tokenizer) -> LLGuidanceConstraint:
        try:
            return self._compile(spec, tokenizer, some_item=True)
        except ConstraintError as e:
            if not any(m in str(e) for m in ('keyword "contains"', "a negated object keyword", "a number keyword")):
                raise
        # A negated `items` became a `contains` at a place the layer cannot name (an option among
        # others, ...): try the other exact rewrites without it (which may refuse the negation).
        return self._compile(spec, tokenizer, some_item=False)

    def _compile(self, spec: ConstraintSpec, tokenizer, some_item: bool) -> LLGuidanceConstraint:
        state = tokenizer_state(tokenizer)
        start = time.perf_counter()
        grammar, source_schema, arrays, with_contains = self._grammar(spec, some_item=some_item)
        template = llguidance.LLMatcher(state.llg, grammar, log_level=0)
        one_of, inlined, merges, overlap_error = False, [], {}, ""
        while template.is_error():
            error = template.get_error()
            circular = _CIRCULAR.search(error)
            if _ONE_OF_UNPROVEN in error and not one_of and keywords.needs_rewrite(source_schema, one_of=True):
                # llguidance could not prove some oneOf's options disjoint: enforce "exactly one"
                # exactly, as anyOf over (one option and the negation of every other).
                one_of = True
                grammar, source_schema, arrays, with_contains = self._grammar(spec, one_of=True, some_item=some_item)
                if inlined:
                    merges = {}
                    for ref in inlined:
                        keywords.inline_merged_refs(source_schema, ref, merges)
                if overlap_error:
                    keywords.disjoint_patterns(source_schema)
                if inlined or overlap_error:
                    grammar = self._from_schema(source_schema, spec)
            elif not overlap_error and _OVERLAPPING.search(error) and keywords.disjoint_patterns(source_schema):
                # Overlapping patternProperties (llguidance requires them disjoint): split them into
                # disjoint parts with the same schemas (see `keywords.disjoint_patterns`) and compile again.
                overlap_error = error
                grammar = self._from_schema(source_schema, spec)
            elif circular and len(inlined) < _INLINE_ROUNDS and \
                    keywords.inline_merged_refs(source_schema, circular.group(1), merges):
                # A recursive definition merged with other keywords: merge a copy of it instead (the
                # same instances, see `keywords.inline_merged_refs`) and compile again.
                inlined.append(circular.group(1))
                grammar = self._from_schema(source_schema, spec)
            else:
                break
            template = llguidance.LLMatcher(state.llg, grammar, log_level=0)
        if template.is_error():
            error = template.get_error()
            if overlap_error and "patternProperty regexes" in error:
                error = overlap_error  # the parts were not proven disjoint either: name the patterns as written
            raise ConstraintError(self._explain(spec, error, source_schema))
        if spec.kind is ConstraintKind.JSON_SCHEMA and template.get_grammar_warnings():
            # A warning from the JSON compiler means an approximation; we promise exact semantics.
            raise ConstraintError(self._explain(spec, "; ".join(template.get_grammar_warnings()), source_schema))
        compile_ms = (time.perf_counter() - start) * 1e3
        return LLGuidanceConstraint(spec=spec, grammar=grammar, compile_ms=compile_ms,
                                    _template=template, _state=state, unique_arrays=arrays,
                                    contains_arrays=with_contains)

    def _grammar(self, spec: ConstraintSpec, one_of: bool = False,
                 some_item: bool = True) -> tuple[str, object, dict, dict]:
        """(llguidance grammar, the schema it was built from, the unique arrays and the contains arrays
        the token-level layers enforce)."""
        if spec.kind is ConstraintKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(spec.source), None, {}, {}
        if spec.kind is ConstraintKind.CHOICE:
            choices = json.loads(spec.source)
            # One literal per choice; a literal Lark string is JSON-quoted, so any text is safe.
            lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
            return llguidance.LLMatcher.grammar_from_lark(lark), None, {}, {}
        if spec.kind is ConstraintKind.GRAMMAR:
            try:
                return llguidance.grammar_from("grammar", spec.source), None, {}, {}
            except ValueError as e:  # GBNF that does not convert
                raise ConstraintError(f"grammar: {e}") from None
        schema = json.loads(spec.source)
        if schema is False:
            raise ConstraintError("json_schema: the schema is `false`: no output satisfies it")
        if schema is True:
            schema = {}
        if "x-guidance" in schema:
            raise ConstraintError('json_schema: "x-guidance" options are not accepted; use '
                                  "strict= and whitespace= instead")
        schema = schema_tools.ignore_ref_siblings(schema)
        source = schema  # as written (the token-level layers check numbers against it)
        schema_tools.check_keywords(schema)
        if keywords.needs_rewrite(schema, one_of=one_of):
            # before closing: `not` must see the open schema
            schema = keywords.rewrite(schema, one_of=one_of, unknown_formats=spec.unknown_formats,
                                      some_item=some_item)
        if spec.strict:
            schema = schema_tools.close_objects(schema)
        schema_tools.check_min_properties(schema)
        schema, with_contains = contains.extract(schema, source)  # first: uniqueItems beside contains is then refused
        contains.check_placed(schema)
        schema, arrays = unique.extract(schema)
        schema = schema_tools.exact_bounds(schema)  # last: the rewrites above may add bounds
        if set(arrays) & {p for p, a in with_contains.items() if isinstance(a, contains.ContainsArray)}:
            raise ConstraintError('json_schema: keyword "contains" beside "uniqueItems" on the same array is not '
                                  "supported (the two layers together could leave no token)")
        try:
            return self._from_schema(schema, spec), schema, arrays, with_contains
        except ValueError as e:
            raise ConstraintError(f"json_schema: {e}") from None

    def _from_schema(self, schema, spec: ConstraintSpec) -> str:
        """llguidance's grammar for a (rewritten) schema, nested no deeper than its JSON reader takes."""
        return llguidance.LLMatcher.grammar_from_json_schema(schema_tools.shallow(schema),
                                                             overrides=self._options(spec))

    @staticmethod
    def _options(spec: ConstraintSpec) -> dict:
        options = {"whitespace_flexible": spec.whitespace_flexible, "lenient": False, "coerce_one_of": False}
        if spec.whitespace_flexible:
            options["whitespace_pattern"] = WHITESPACE_PATTERN
        return options

    @staticmethod
    def _explain(spec: ConstraintSpec, error: str, schema) -> str:
        error = error.strip()
        if spec.kind is not ConstraintKind.JSON_SCHEMA:
            return f"{spec.kind.value}: {error}"
        found = _UNIMPLEMENTED.search(error)
        if found:
            keys = [k.strip().strip('"') for k in found.group(1).split(",")]
            where = [f'"{k}" at {schema_tools.locate_keyword(schema, k) or "?"}' for k in keys]
            return f"json_schema: unsupported keyword {', '.join(where)} (backend: {error})"
        return f"json_schema: {error}"
