"""Regular constraints -> a token-level automaton stored as device tables.

A regular constraint (regex, choice, a JSON schema that reduces to a finite automaton) becomes a
deterministic automaton over *token ids*: from state s, token t is allowed iff the bytes of t extend
the output to a prefix of some match, and leads to one next state. outlines-core's `Index` walks the
vocabulary through the byte-level DFA of the regex; we store the result as compressed rows (CSR):

    row_start   (S,)  int32   first entry of state s in the flat arrays
    n_allowed   (S,)  int32   K_s: allowed ids of state s (EOS included in final states)
    allowed     (E,)  int32   allowed ids, sorted within each row        E = sum_s K_s
    next_state  (E,)  int32   state after each allowed id; -1 for EOS (the generation ends)
    is_final    (S,)  bool    the output so far is a complete match
    done        (S,)  bool    nothing but EOS may follow (or nothing at all): stop without sampling

States are numbered in breadth-first order from the initial state 0. `padded_allowed()` gives the
(S, Kmax) view padded with -1.

Two details of outlines-core 0.2.14 shape the construction:
- Its `Index` drops a token whose bytes run *through* a complete match and end in a non-final state
  (e.g. "." after "1" for `[0-9]+(\\.[0-9]+)?`), and the leftmost-first DFA drops continuations of a
  completed match (`a|ab`). We index `(?:R)` followed by a sentinel character that no output contains
  (U+10FFFF), so that no proper prefix is ever a complete match; the sentinel (a token id past the
  vocabulary) marks the final states and is then removed, with the states it alone kept alive.
- It includes the EOS token in final states; we re-add EOS ourselves (every id in `eos_ids`).

Nothing here raises for a constraint that does not fit: `compile_tables` returns a `Fallback` with the
reason (not regular, too large, a tokenizer we cannot map to bytes, disagreement with the host matcher).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import weakref
from typing import Any

import numpy as np

from llmqp.model.tokenizer import gpt2_bytes_to_unicode

_SENTINEL = "\U0010FFFF"


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Why a constraint runs on the host-stepped loop instead of the fused one."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableLimits:
    """Bounds on what is compiled into device tables. Table memory is 8 bytes per entry.

    max_entries: total allowed (state, token) pairs; max_states: automaton states; max_regex_chars:
    length of the regex handed to the DFA builder (a proxy for its build time, which cannot be
    interrupted). Every state built is checked against the host matcher (`compile.mirror_host`)."""

    max_entries: int = 1 << 22
    max_states: int = 1 << 14
    max_regex_chars: int = 50_000


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ConstraintTables:
    """A token-level automaton (see the module docstring for the layout). Host-side numpy arrays."""

    row_start: np.ndarray  # (S,) int32
    n_allowed: np.ndarray  # (S,) int32
    allowed: np.ndarray  # (E,) int32
    next_state: np.ndarray  # (E,) int32, -1 for EOS
    is_final: np.ndarray  # (S,) bool
    eos_ids: tuple[int, ...]
    vocab_size: int
    description: dict = dataclasses.field(default_factory=dict)  # kind, source, regex (for manifests)
    build_ms: float = 0.0
    run_len: np.ndarray | None = None  # (S,) int32 forced-run length per state; None: the one-token chain

    @property
    def num_states(self) -> int:
        return int(self.n_allowed.shape[0])

    @property
    def num_entries(self) -> int:
        return int(self.allowed.shape[0])

    @property
    def max_k(self) -> int:
        return int(self.n_allowed.max(initial=0))

    @property
    def done(self) -> np.ndarray:
        """(S,) bool: no token other than EOS can follow (the generation stops without sampling)."""
        rows = np.repeat(np.arange(self.num_states), self.n_allowed)
        non_eos = np.bincount(rows, weights=(self.next_state >= 0), minlength=self.num_states)
        return non_eos == 0

    @property
    def forced_run_len(self) -> np.ndarray:
        """(S,) int32: how many tokens the host emits at once from each state when it feeds forced runs
        (`Matcher.forced()`); 0 where it scores. Without a recorded host value: the length of the chain
        of one-token rows starting there."""
        if self.run_len is not None:
            return self.run_len
        single = (self.n_allowed == 1) & ~self.done
        first = np.minimum(self.row_start, max(self.num_entries - 1, 0))
        first_next = np.where(self.n_allowed > 0, self.next_state[first], -1)  # (S,) next state of entry 0
        out = np.zeros(self.num_states, np.int32)
        for s in range(self.num_states):
            n, state = 0, s
            while state >= 0 and single[state] and n < 4096:
                n += 1
                state = int(first_next[state])
            out[s] = n
        return out

    def allowed_ids(self, state: int) -> np.ndarray:
        s = int(self.row_start[state])
        return self.allowed[s : s + int(self.n_allowed[state])]

    def step(self, state: int, token: int) -> int | None:
        """The state after `token`; -1 after EOS; None when `token` is not allowed in `state`."""
        ids = self.allowed_ids(state)
        i = int(np.searchsorted(ids, token))
        if i == len(ids) or ids[i] != token:
            return None
        return int(self.next_state[self.row_start[state] + i])

    def walk(self, tokens) -> int | None:
        """The state after `tokens` from the start (None as soon as one is not allowed)."""
        state = 0
        for t in tokens:
            state = self.step(state, int(t))
            if state is None or state < 0:
                return state
        return state

    def padded_allowed(self) -> tuple[np.ndarray, np.ndarray]:
        """(allowed, next_state), each (S, Kmax) int32 padded with -1."""
        s, k = self.num_states, max(self.max_k, 1)
        allowed = np.full((s, k), -1, np.int32)
        nxt = np.full((s, k), -1, np.int32)
        cols = np.arange(self.num_entries) - np.repeat(self.row_start, self.n_allowed)
        rows = np.repeat(np.arange(s), self.n_allowed)
        allowed[rows, cols] = self.allowed
        nxt[rows, cols] = self.next_state
        return allowed, nxt

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.row_start, self.n_allowed, self.allowed, self.next_state, self.is_final))


# ------------------------------------------------------------------------------------ vocabulary
_BYTE_DECODER = {c: b for b, c in gpt2_bytes_to_unicode().items()}  # token characters -> bytes
_VOCABS: "weakref.WeakKeyDictionary[object, Any]" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> dict[int, bytes] | Fallback:
    """Bytes of every non-special token id of an `llmqp` tokenizer: a byte-level BPE one (GPT-2 byte map)
    or a SentencePiece one with byte fallback (▁ is a space, ``<0xNN>`` one byte: its `token_bytes`)."""
    from llmqp.model.sp_tokenizer import SentencePieceTokenizer

    if isinstance(tokenizer, SentencePieceTokenizer):
        skip = set(tokenizer.special_ids) | set(tokenizer.eos_ids)
        return {i: tokenizer.token_bytes(i) for i in range(min(tokenizer.vocab_size, len(tokenizer.token_types)))
                if i not in skip}
    hf = tokenizer.hf
    added = hf.get_added_tokens_decoder()
    specials = set(tokenizer.special_ids) | set(tokenizer.eos_ids)
    out: dict[int, bytes] = {}
    for tok, i in hf.get_vocab(with_added_tokens=True).items():
        if i in specials or i >= tokenizer.vocab_size:
            continue
        if i in added:  # user-defined added tokens are matched as raw text
            out[i] = tok.encode("utf-8")
            continue
        try:
            out[i] = bytes(_BYTE_DECODER[c] for c in tok)
        except KeyError:
            return Fallback(f"token {i} ({tok!r}) is not byte-level BPE: cannot map the vocabulary to bytes")
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _Vocab:
    outlines: Any  # outlines_core.Vocabulary, with the sentinel token (id = vocab_size)
    first_byte: np.ndarray  # (V,) int16: first byte of each token, -1 for special / empty tokens
    token_bytes: dict  # id -> bytes of every non-special token
    byte_token: list  # byte value -> id of the single-byte token (None when the vocabulary has none)


def byte_vocabulary(tokenizer) -> _Vocab | Fallback:
    """The tokenizer's vocabulary as outlines-core wants it, plus per-token first bytes. Cached per
    tokenizer object (~0.1 s for 49k tokens)."""
    hit = _VOCABS.get(tokenizer)
    if hit is not None:
        return hit
    try:
        from outlines_core import Vocabulary
    except ImportError:
        return Fallback("outlines-core is not installed: regular constraints cannot be compiled to tables")

    by_id = token_bytes(tokenizer)
    if isinstance(by_id, Fallback):
        _VOCABS[tokenizer] = by_id
        return by_id
    by_bytes: dict[bytes, list[int]] = collections.defaultdict(list)
    first = np.full(int(tokenizer.vocab_size), -1, np.int16)
    for i, b in by_id.items():
        if b:
            by_bytes[b].append(i)
            first[i] = b[0]
    by_bytes[_SENTINEL.encode()].append(int(tokenizer.vocab_size))
    byte_token = [None] * 256
    for b, ids in by_bytes.items():
        if len(b) == 1:
            byte_token[b[0]] = min(ids)
    vocab = _Vocab(Vocabulary(int(tokenizer.eos_ids[0]), dict(by_bytes)), first, by_id, byte_token)
    _VOCABS[tokenizer] = vocab
    return vocab


# ------------------------------------------------------------------------------------ automaton
def tables_from_regex(regex: str, tokenizer, *, limits: TableLimits = TableLimits(),
                      description: dict | None = None) -> ConstraintTables | Fallback:
    """Build the token automaton of `regex` (Rust regex syntax, matched against the whole output)."""
    if len(regex) > limits.max_regex_chars:
        return Fallback(f"regex of {len(regex)} characters exceeds the limit ({limits.max_regex_chars}): too large "
                        "for the fused loop")
    vocab = byte_vocabulary(tokenizer)
    if isinstance(vocab, Fallback):
        return vocab
    from outlines_core import Index  # present: byte_vocabulary imported it

    t0 = time.perf_counter()
    try:
        index = Index(f"(?:{regex})\\x{{10FFFF}}", vocab.outlines)
    except Exception as e:  # outlines-core raises ValueError (or its own types) for what its DFA lacks
        return Fallback(f"regex cannot be compiled to a DFA ({str(e).strip() or type(e).__name__})")
    transitions = index.get_transitions()
    if len(transitions) > limits.max_states:
        return Fallback(f"automaton has {len(transitions)} states (limit {limits.max_states}): too large for the "
                        "fused loop")
    entries = sum(len(v) for v in transitions.values())
    if entries > limits.max_entries:
        return Fallback(f"automaton has {entries} (state, token) entries (limit {limits.max_entries}): too large "
                        "for the fused loop")
    built = _prune(index, transitions, tokenizer, limits)
    if isinstance(built, Fallback):
        return built
    row_start, n_allowed, allowed, nxt, final = built
    return ConstraintTables(row_start=row_start, n_allowed=n_allowed, allowed=allowed, next_state=nxt,
                            is_final=final, eos_ids=tuple(int(e) for e in tokenizer.eos_ids),
                            vocab_size=int(tokenizer.vocab_size),
                            description=dict(description or {}, regex=regex, host_exact=False),
                            build_ms=(time.perf_counter() - t0) * 1e3)


def _prune(index, transitions: dict, tokenizer, limits: TableLimits):
    sentinel = int(tokenizer.vocab_size)
    eos_ids = sorted(int(e) for e in tokenizer.eos_ids)
    sentinel_finals = set(index.get_final_states())  # reached only through the whole sentinel
    outlines_eos = int(tokenizer.eos_ids[0])
    edges: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    finals: set[int] = set()
    for state, row in transitions.items():
        if state in sentinel_finals:
            continue
        if row.get(sentinel) in sentinel_finals:
            finals.add(state)
        ids = np.fromiter(row.keys(), np.int64, len(row))
        to = np.fromiter(row.values(), np.int64, len(row))
        keep = (ids != sentinel) & (ids != outlines_eos) & ~np.isin(to, list(sentinel_finals))
        order = np.argsort(ids[keep], kind="stable")
        edges[state] = (ids[keep][order].astype(np.int32), to[keep][order])
    # Keep the states from which a final state can be reached (this drops the states that exist only
    # inside a partial sentinel), then renumber those reachable from the start, breadth first.
    reverse: dict[int, set[int]] = collections.defaultdict(set)
    for s, (_, to) in edges.items():
        for t in set(to.tolist()):
            reverse[t].add(s)
    useful, todo = set(finals), list(finals)
    while todo:
        for p in reverse.get(todo.pop(), ()):
            if p not in useful:
                useful.add(p)
                todo.append(p)
    start = index.get_initial_state()
    if start not in useful:
        return Fallback("the constraint matches no output that this vocabulary can produce")
    number = {start: 0}
    order = [start]
    for s in order:
        ids, to = edges.get(s, (np.zeros(0, np.int32), np.zeros(0, np.int64)))
        for t in to.tolist():
            if t in useful and t not in number:
                number[t] = len(order)
                order.append(t)
    rows_ids, rows_next = [], []
    for s in order:
        ids, to = edges.get(s, (np.zeros(0, np.int32), np.zeros(0, np.int64)))
        keep = np.fromiter((t in useful for t in to.tolist()), bool, len(to))
        ids, nxt = ids[keep], np.fromiter((number[t] for t in to[keep].tolist()), np.int32, int(keep.sum()))
        if s in finals:  # EOS may end the output here
            ids = np.concatenate([ids, np.asarray(eos_ids, np.int32)])
            nxt = np.concatenate([nxt, np.full(len(eos_ids), -1, np.int32)])
            o = np.argsort(ids, kind="stable")
            ids, nxt = ids[o], nxt[o]
        rows_ids.append(ids)
        rows_next.append(nxt)
    n_allowed = np.asarray([len(r) for r in rows_ids], np.int32)
    if int(n_allowed.sum()) > limits.max_entries:
        return Fallback(f"tables need {int(n_allowed.sum())} entries (limit {limits.max_entries}): too large "
                        "for the fused loop")
    row_start = np.concatenate([[0], np.cumsum(n_allowed)[:-1]]).astype(np.int32)
    allowed = np.concatenate(rows_ids).astype(np.int32) if rows_ids else np.zeros(0, np.int32)
    nxt = np.concatenate(rows_next).astype(np.int32) if rows_next else np.zeros(0, np.int32)
    final = np.asarray([s in finals for s in order], bool)
    return row_start, n_allowed, allowed, nxt, final


def tables_from_rows(rows: list[dict[int, int]], finals, *, eos_ids, vocab_size: int,
                     description: dict | None = None) -> ConstraintTables:
    """Tables from explicit rows: rows[s] maps each allowed non-EOS id to its next state; EOS is added
    to the states in `finals`. For synthetic automata (benchmarks, tests) and hand-made examples."""
    finals = set(finals)
    ids_rows, next_rows = [], []
    for s, row in enumerate(rows):
        items = sorted(row.items()) + ([(e, -1) for e in eos_ids] if s in finals else [])
        items.sort()
        ids_rows.append(np.asarray([i for i, _ in items], np.int32))
        next_rows.append(np.asarray([n for _, n in items], np.int32))
    n_allowed = np.asarray([len(r) for r in ids_rows], np.int32)
    return ConstraintTables(
        row_start=np.concatenate([[0], np.cumsum(n_allowed)[:-1]]).astype(np.int32), n_allowed=n_allowed,
        allowed=np.concatenate(ids_rows).astype(np.int32), next_state=np.concatenate(next_rows).astype(np.int32),
        is_final=np.asarray([s in finals for s in range(len(rows))], bool), eos_ids=tuple(eos_ids),
        vocab_size=int(vocab_size), description=dict(description or {}))


def unconstrained_tables(vocab_size: int, eos_ids) -> ConstraintTables:
    """One final state allowing every id: unconstrained decoding through the fused loop."""
    row = {i: 0 for i in range(vocab_size) if i not in set(eos_ids)}
    return tables_from_rows([row], {0}, eos_ids=tuple(eos_ids), vocab_size=vocab_size,
                            description={"kind": "unconstrained"})


def synthetic_tables(vocab_size: int, eos_ids, *, ks=(1, 8, 64, 512), length: int = 64,
                     seed: int = 0) -> ConstraintTables:
    """A chain automaton over random ids for shapes without a tokenizer: state i allows ks[i % len(ks)]
    random ids, all leading to state i+1; the last state is final. Benchmarks only."""
    rng = np.random.default_rng(seed)
    eos = set(eos_ids)
    pool = np.asarray([i for i in range(vocab_size) if i not in eos])
    rows = []
    for i in range(length):
        ids = rng.choice(pool, size=ks[i % len(ks)], replace=False)
        rows.append({int(t): i + 1 for t in ids})
    rows.append({})
    return tables_from_rows(rows, {length}, eos_ids=tuple(eos_ids), vocab_size=vocab_size,
                            description={"kind": "synthetic", "ks": list(ks), "length": length})
