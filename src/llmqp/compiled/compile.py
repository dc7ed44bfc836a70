"""`compile_tables`: a constraint spec -> device tables, or the reason it runs on the host loop.

The fused loop must pick exactly the tokens the host-stepped loop picks, so its tables must allow
exactly what the host matcher allows at every step. Two facts make that more than "the regex's token
automaton":

- The host backend (llguidance) narrows the mask where the constraint forces bytes: it tokenizes the
  last token plus the forced bytes canonically and allows only the first resulting token (after "m"
  in `yes|no|maybe` it allows "ay", not "a"). So in a state with forced bytes the mask depends on the
  byte state *and the last token*; elsewhere on the byte state alone.
- Our regex for a JSON schema is our own conversion; it must describe the host's language.

So with a host `CompiledConstraint` (`reference`) the tables *mirror the host*: states are pairs
(byte-automaton state, last token if that state has forced bytes), explored breadth first; each
state's row is the host matcher's `allowed()` after one path to it, and the byte automaton (from
outlines-core) supplies the next state. A host-allowed token the byte automaton lacks means the
languages differ: a fallback, never a silent change of semantics. Without `reference` the tables are
the plain byte-level token automaton (every tokenization allowed): valid outputs, but not the host's
tokens step for step.
"""

from __future__ import annotations

import collections
import time
import weakref

import numpy as np

from llmqp.compiled.regular import spec_regex
from llmqp.compiled.tables import ConstraintTables, Fallback, TableLimits, byte_vocabulary, tables_from_regex

_CACHE_SIZE = 64  # tables kept per tokenizer (least recently used evicted)
_caches: "weakref.WeakKeyDictionary[object, collections.OrderedDict]" = weakref.WeakKeyDictionary()


def compile_tables(spec, tokenizer, *, reference=None, limits: TableLimits = TableLimits()) \
        -> ConstraintTables | Fallback:
    """Tables for `spec` (an `llmqp.constraints.ConstraintSpec`) over `tokenizer`, or a `Fallback`.

    reference: the host's `CompiledConstraint` for the same spec; when given, the tables mirror it
    exactly (see the module docstring). Never raises for a constraint that does not fit: a bad spec is
    the host compiler's to report (`ConstraintError`), anything the tables cannot express is a Fallback.
    Results are cached per tokenizer object and (spec, limits, mirrored)."""
    cache = _caches.setdefault(tokenizer, collections.OrderedDict())
    key = (spec, limits, reference is not None)
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    found = spec_regex(spec)
    if isinstance(found, Fallback):
        return found
    regex, description = found
    tables = tables_from_regex(regex, tokenizer, limits=limits, description=description)
    if not isinstance(tables, Fallback) and reference is not None:
        tables = mirror_host(tables, reference, tokenizer, limits=limits)
    cache[key] = tables
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return tables


def forced_bytes(tables: ConstraintTables, vocab) -> list[bytes]:
    """Per state, the bytes every continuation must start with (empty where two bytes, or the end, are
    possible): what the host forces there. Followed through the single-byte tokens."""
    first = vocab.first_byte
    one = np.full(tables.num_states, -1, np.int32)  # the one possible next byte, or -1
    for s in range(tables.num_states):
        if tables.is_final[s]:
            continue
        ids = tables.allowed_ids(s)
        firsts = first[ids[ids < len(first)]]
        if len(firsts) and np.all(firsts == firsts[0]) and firsts[0] >= 0:
            one[s] = firsts[0]
    out = []
    for s in range(tables.num_states):
        run, state, seen = bytearray(), s, set()
        while state >= 0 and one[state] >= 0 and state not in seen:
            seen.add(state)
            run.append(int(one[state]))
            tok = vocab.byte_token[int(one[state])]
            state = tables.step(state, tok) if tok is not None else None
            state = -1 if state is None else state
        out.append(bytes(run))
    return out


def _context_keyer(reference, tokenizer, vocab):
    """How the host's mask in a state with forced bytes F depends on the last token u.

    llguidance tokenizes bytes(u) + F canonically; when the result starts with u, the mask is decided
    by the tokens after u, otherwise by the tokenization of F alone. So states are keyed by that token
    sequence (a handful of values) rather than by u (up to the whole vocabulary after a bounded
    string). Returns key(u, F) -> hashable; with an unknown host backend, the key is u itself."""
    try:
        from llmqp.constraints.llguidance_backend import LLGuidanceConstraint, tokenizer_state

        if not isinstance(reference, LLGuidanceConstraint):
            raise TypeError
        llg = tokenizer_state(tokenizer).llg
    except (ImportError, TypeError):
        return lambda u, forced: u
    memo: dict = {}

    def key(u: int, forced: bytes):
        k = (u, forced)
        if k not in memo:
            toks = llg.tokenize_bytes(vocab.token_bytes.get(u, b"") + forced)
            memo[k] = ("after", tuple(toks[1:])) if toks[:1] == [u] else ("alone",)
        return memo[k]

    return key


def mirror_host(byte_tables: ConstraintTables, reference, tokenizer, *,
                limits: TableLimits = TableLimits()) -> ConstraintTables | Fallback:
    """Tables whose rows are the host matcher's masks (see the module docstring).

    States are (byte state, context) where context is None without forced bytes, else how the last
    token tokenizes with them (`_context_keyer`). The check is exhaustive over the states built: each
    state's row *is* the host matcher's `allowed()` (and its forced run the host's `forced()`) walked
    along a first path to it, and every state that a second path (another parent state or another last
    token) also reaches is walked along that one too and must give the same row; a state the tables
    cannot mirror is a Fallback saying why. Cost: one or two host `allowed()` per state, replaying one
    path each (description: states_checked, second_path_checks, mirror_ms)."""
    t0 = time.perf_counter()
    vocab = byte_vocabulary(tokenizer)
    forced = forced_bytes(byte_tables, vocab)
    context = _context_keyer(reference, tokenizer, vocab)
    eos = np.asarray(byte_tables.eos_ids, np.int64)
    index = {(0, None): 0}
    paths: list[list[int]] = [[]]
    byte_of = [0]
    second: dict[int, list[int]] = {}  # state -> a second path into it (another parent or last token)
    rows_ids, rows_next, finals = [], [], []
    runs: list[list[int]] = []  # the host's forced() tokens per state
    entries = 0

    def host_row(path):
        matcher = reference.matcher()
        for t in path:
            matcher.accept(t)
        allowed = np.asarray(matcher.allowed(), np.int64)
        return allowed, ([] if matcher.is_done() else list(matcher.forced()))

    i = -1
    while i + 1 < len(paths):
        i += 1
        byte_state = byte_of[i]
        host, ff = host_row(paths[i])
        runs.append(ff)
        row = byte_tables.allowed_ids(byte_state).astype(np.int64)
        row_next = byte_tables.next_state[byte_tables.row_start[byte_state]:][: len(row)]
        pos = np.minimum(np.searchsorted(row, host), max(len(row) - 1, 0))
        ok = (row[pos] == host) if len(row) else np.zeros(len(host), bool)
        if not np.all(ok):
            return Fallback(f"the host allows tokens {host[~ok][:5].tolist()} after {len(paths[i])} tokens "
                            "that the regex automaton does not: the constraint's regular form differs from "
                            "the host's")
        next_bytes = row_next[pos].astype(np.int64)  # -1 for EOS
        children = np.full(len(host), -1, np.int32)
        for j, (t, nb) in enumerate(zip(host.tolist(), next_bytes.tolist())):
            if nb < 0:
                continue
            key = (nb, context(t, forced[nb]) if forced[nb] else None)
            child = index.get(key)
            if child is None:
                child = index[key] = len(paths)
                paths.append(paths[i] + [t])
                byte_of.append(nb)
                if len(paths) > limits.max_states:
                    return Fallback(f"mirroring the host needs more than {limits.max_states} states: too large "
                                    "for the fused loop")
            elif child not in second:  # (i, t) is seen once: this path differs from the first one
                second[child] = paths[i] + [t]
            children[j] = child
        rows_ids.append(host.astype(np.int32))
        rows_next.append(children)
        finals.append(bool(np.isin(eos, host).any()))
        entries += len(host)
        if entries > limits.max_entries:
            return Fallback(f"tables need more than {limits.max_entries} entries: too large for the fused loop")
    # Every state with a second way in is checked along it: the host's mask and forced run there must
    # equal the row built from the first path (the mask depends on the table state alone).
    for state, path in second.items():
        allowed, ff = host_row(path)
        if not np.array_equal(allowed, rows_ids[state]) or ff != runs[state]:
            return Fallback(f"the host's mask after {len(path)} tokens depends on more than the automaton state "
                            f"(state {state} reached by two paths, masks differ): the tables cannot mirror it")
    # A forced run must be the chain of one-token rows the fused loop walks.
    for state, ff in enumerate(runs):
        s = state
        for t in ff:
            if s < 0 or len(rows_ids[s]) != 1 or int(rows_ids[s][0]) != t:
                return Fallback(f"the host's forced run {ff} at state {state} is not a chain of one-token states")
            s = int(rows_next[s][0])
    n_allowed = np.asarray([len(r) for r in rows_ids], np.int32)
    return ConstraintTables(
        row_start=np.concatenate([[0], np.cumsum(n_allowed)[:-1]]).astype(np.int32), n_allowed=n_allowed,
        allowed=np.concatenate(rows_ids).astype(np.int32), next_state=np.concatenate(rows_next).astype(np.int32),
        is_final=np.asarray(finals, bool), eos_ids=byte_tables.eos_ids, vocab_size=byte_tables.vocab_size,
        description=dict(byte_tables.description, host_exact=True, byte_states=byte_tables.num_states,
                         states_checked=len(paths), second_path_checks=len(second),
                         mirror_ms=round((time.perf_counter() - t0) * 1e3, 1)),
        build_ms=byte_tables.build_ms + (time.perf_counter() - t0) * 1e3,
        run_len=np.asarray([len(ff) for ff in runs], np.int32))


def shortest_paths(tables: ConstraintTables, max_states: int | None = None) -> dict[int, list[int]]:
    """One shortest token path from the start to each state (breadth first; lowest ids first)."""
    paths = {0: []}
    order = [0]
    for s in order:
        if max_states is not None and len(paths) >= max_states:
            break
        ids = tables.allowed_ids(s)
        nxt = tables.next_state[tables.row_start[s] : tables.row_start[s] + len(ids)]
        for t, n in zip(ids.tolist(), nxt.tolist()):
            if n >= 0 and n not in paths:
                paths[n] = paths[s] + [t]
                order.append(n)
    return paths
