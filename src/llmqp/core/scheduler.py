"""`Scheduler`: the one decode loop. Requests come in with `add_request`, `step()` advances every one of them
by one tick and returns events; `generate`, `stream`, `generate_batch`, the server and `llmqp batch` are all
clients of it (vLLM's `EngineCore.step()`, JetStream's prefill -> insert -> generate).

One tick:
  1. admission: waiting requests, as many as there are free rows (one while every row is taken), are
     tokenized and their constraints compiled (a failure ends that request alone), then prefilled one chunk
     per tick into their own caches: the oldest request's chunk, and where the trunk computes every row
     alone (the CPU kernels) other prompts' chunks beside it in the same forward, within one chunk's
     positions (`_prefill_group`). A prompt that shares a chunk-long prefix with one still prefilling waits
     for it and takes those positions from the prefix cache. After its last chunk a request is inserted into
     a free row of the slot cache and takes part in this tick's scoring (or, every row taken, in the tick
     after one frees);
  2. one scoring call for every window position of every row whose tokens are all fed (plan: the
     planner's, or the rows' common fixed plan), copying back only the chosen ids and their log-probs; a row
     verifies its draft (`Sequence.verify`: the longest prefix the sampler agrees with, plus the sampler's
     token; the rest rolled back);
  3. host work for every such row — the constraint's forced run, the next draft (its length from the draft
     planner), the allowed sets of the drafted positions — while the device still finishes (JAX dispatch is
     asynchronous);
  4. one forward feeds every live row's next piece (its sampled token, forced run and draft; width the next
     power of two of the longest piece; a plain decode step when every piece is one token) and is dispatched
     before the host detokenizes and builds events.
Rows that finish or are aborted free their row at once; the batch halves when at most half of it is live.
Not thread-safe: one thread owns a scheduler.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import jax
import numpy as np

from llmqp import kernels
from llmqp import plans as plans_mod
from llmqp.core.events import FinishedEvent, TokenEvent
from llmqp.core.executor import ModelExecutor
from llmqp.core.request import Request
from llmqp.core.sequence import DONE, SKIP, Sequence, Status
from llmqp.core.spec import DecodeSpec, FinishReason, pow2_at_least
from llmqp.planner.drafts import DRAFT_ARMS, LOSSY_ARMS, context_key
from llmqp.planner import StepContext
from llmqp.plans import PlanKind
from llmqp.sampling import InvalidArgument

_ids = itertools.count()


class Scheduler:
    """Continuous batching over `max_slots` decode rows (rounded up to a power of two).

    add_request(request, request_id=None) -> id: validates the options (InvalidArgument at once for bad
    values); tokenizing and compiling the constraint happen inside `step()`, where a failure becomes that
    request's error result. abort(id) ends a request and frees its row. step() -> [TokenEvent |
    FinishedEvent]."""

    def __init__(self, engine, max_slots: int = 8, *, spec: DecodeSpec | None = None):
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or not 1 <= max_slots <= 256:
            raise InvalidArgument(f"max_slots must be an integer in [1, 256], got {max_slots!r}")
        self.engine = engine
        self.spec = spec or engine.spec
        self.executor = ModelExecutor(engine, self.spec, max_slots)
        prefix = getattr(engine, "prefix_cache", None)  # usable where its blocks tile this spec's prefill chunks
        self._prefix = prefix if prefix is not None and self.spec.prefill_chunk % prefix.block == 0 else None
        self.max_slots = self.executor.max_slots
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []  # admitted, prefilling or prefilled and waiting for a row
        # Several prompts' chunks share one prefill forward only where every row is computed alone, bit for
        # bit (the CPU kernels): elsewhere a position's bits would depend on the rows beside it.
        self._group_prefill = bool(getattr(engine, "trunk_kernel", False)) and getattr(engine, "mesh", None) is None \
            and self.spec.prefill_chunk <= kernels.ATTENTION_MAX_T
        self._running: dict[str, Sequence] = {}
        self._pending: list = []  # events produced outside step() (aborts)
        self._known: set[str] = set()
        self._all_ids: dict[int, tuple] = {}
        self.stats = collections.Counter()  # ticks, prefill_chunks, prefill_forwards, decode_steps, feeds

    # ------------------------------------------------------------ the client API
    def add_request(self, request, request_id: str | None = None) -> str:
        request = Request.coerce(request)
        request.validate()
        rid = str(request_id) if request_id is not None else f"req-{next(_ids)}"
        if rid in self._known:
            raise InvalidArgument(f"request id {rid!r} is already in use")
        self._known.add(rid)
        self._waiting.append(Sequence(rid, request, self.spec))
        return rid

    def abort(self, request_id: str) -> bool:
        """End a request now (its FinishedEvent, finish_reason "abort", comes with the next step) and free its
        row. False when the id is unknown or already finished."""
        seq = self._find(request_id)
        if seq is None:
            return False
        if seq.status is Status.WAITING:
            self._waiting.remove(seq)
        elif seq.status is Status.PREFILLING:
            self._prefilling.remove(seq)
        else:
            del self._running[seq.rid]
            self.executor.free_slot(seq.rid)
        seq.finish = FinishReason.ABORT
        self._pending.extend(self._finish_events(seq))
        return True

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._pending)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def warm_up(self, seq_len: int | None = None) -> int:
        """Compile ahead the prefill programs this scheduler may use for prompts whose cache holds `seq_len`
        positions (default: the smallest, `DecodeSpec.min_cache`): every chunk width and, where prompts share
        prefill forwards, every (rows, width) group — which groups form depends on arrival times, so the first
        burst of a server or benchmark would otherwise pay seconds of XLA compiles. Returns the number of
        shapes; those already compiled cost one forward each."""
        if seq_len is None:
            seq_len = self.spec.min_cache
        if (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < self.spec.min_cache
                or seq_len & (seq_len - 1)):
            raise InvalidArgument(f"seq_len must be a power of two >= {self.spec.min_cache} (a cache length), "
                                  f"got {seq_len!r}")
        return self.executor.compile_prefill(seq_len, self._group_prefill)

    def step(self) -> list:
        events, self._pending = self._pending, []
        self.stats["ticks"] += 1
        if self._fused_candidate():
            self._run_fused(self._waiting.popleft(), events)
            return events
        self._admit(events)
        if self._running:
            self._decode_tick(events)
        return events

    # ------------------------------------------------------------ admission and prefill
    def _admit(self, events: list) -> None:
        # Prefilled requests take free rows first (in the order they finished prefilling).
        for seq in [s for s in self._prefilling if s.prefilled is not None]:
            if len(self._running) == self.max_slots:
                break
            self._prefilling.remove(seq)
            self._insert(seq)
        # As many requests prefill as there are free rows, or one while every row is taken: that one is then
        # ready for the first row that frees instead of leaving that row empty for the ticks of its prefill.
        while self._waiting and len(self._prefilling) < max(1, self.max_slots - len(self._running)):
            seq = self._waiting.popleft()
            try:
                seq.admit(self.engine)
            except Exception as e:  # this request's own failure: it alone ends
                seq.fail(e)
                events.extend(self._finish_events(seq))
                continue
            if seq.request.compiled and seq.compiled_reason is None:
                seq.compiled_reason = ("the fused loop runs a request that has the scheduler to itself; "
                                       "this one shared it with other requests")
            seq.status = Status.PREFILLING
            self._prefilling.append(seq)
        for seq in self._prefilling:
            if seq.row_cache is None and seq.prefilled is None and not self._waits_for_prefix(seq):
                self._start_prefill(seq)
        group = self._prefill_group()
        if not group:
            return
        chunks = [seq.chunks[seq.next_chunk] for seq in group]
        width = max(w for _, w in chunks)
        hidden, caches = self.executor.prefill_rows([seq.row_cache for seq in group],
                                                    [seq.prompt_ids for seq in group], [st for st, _ in chunks], width)
        self.stats["prefill_chunks"] += len(group)
        self.stats["prefill_forwards"] += 1
        for r, (seq, (start, w), cache) in enumerate(zip(group, chunks, caches)):
            seq.row_cache = cache
            if self._prefix is not None:
                self._prefix.store(seq.prompt_ids, seq.row_cache, start, start + w)
            seq.next_chunk += 1
            if seq.next_chunk < len(seq.chunks):
                continue
            seq.prefilled = self.executor.prompt_end(hidden, r, len(seq.prompt_ids) - 1 - start)
            if len(self._running) < self.max_slots:  # else it waits, prefilled, for the next free row
                self._prefilling.remove(seq)
                self._insert(seq)

    def _waits_for_prefix(self, seq: Sequence) -> bool:
        """Whether `seq` should wait before it starts prefilling: a prompt that is still prefilling shares at
        least one prefill chunk of its prefix (a shared context, few-shot examples) and has not computed all of
        the shared part yet. Started together, both would compute those positions; `seq` waits only until the
        other's chunks have passed them (each chunk is stored in the prefix cache as it completes), not for the
        rest of a long prompt that merely starts like it (a shared system prompt)."""
        if self._prefix is None:
            return False
        for other in self._prefilling:
            if other is seq:
                return False  # only requests admitted before it hold it back
            if other.row_cache is None or other.prefilled is not None:
                continue
            n = min(len(seq.prompt_ids), len(other.prompt_ids))
            if n < self.spec.prefill_chunk:
                continue
            differ = np.flatnonzero(seq.prompt_ids[:n] != other.prompt_ids[:n])
            shared = int(differ[0]) if differ.size else n
            if shared < self.spec.prefill_chunk:
                continue
            computed = other.chunks[other.next_chunk][0]  # the other's positions before its next chunk
            if computed < shared - shared % self._prefix.block:
                return True
        return False

    def _start_prefill(self, seq: Sequence) -> None:
        seq.row_cache = self.executor.new_row_cache(max(seq.row_seq_len, self.executor.seq_len))
        seq.t_prefill = time.perf_counter()
        if self._prefix is not None:  # cached blocks of the prompt's prefix: the same bits as prefilling
            filled, seq.row_cache = self._prefix.reuse(seq.prompt_ids, seq.row_cache)
            if filled:
                seq.chunks = self._chunks_after(seq, filled)
            self.stats["prefix_hit_tokens"] += filled

    def _prefill_group(self) -> list[Sequence]:
        """The requests whose next prefill chunk runs in this tick's forward. First the one with the fewest
        prompt positions left (the oldest among equals), so a short prompt is not queued behind every chunk of
        a long one; but the oldest prefilling request never waits two ticks in a row, so a long prompt still
        advances at least every other tick however many short ones arrive. Then, where the trunk computes
        every row alone (the CPU kernels), others whose chunks fit beside it within one chunk's positions
        (rows x the widest chunk <= prefill_chunk) and whose caches have its length. A tick's prefill then
        never costs more than one chunk's time, however many prompts share it; short prompts (or the tails
        after a prefix-cache hit) are admitted several per tick."""
        todo = [seq for seq in self._prefilling if seq.row_cache is not None and seq.prefilled is None]
        if not todo:
            return []
        if todo[0].prefill_passed:
            lead = todo[0]
        else:
            lead = min(todo, key=lambda s: len(s.prompt_ids) - s.chunks[s.next_chunk][0])  # min keeps the oldest
        group = [lead]
        if self._group_prefill:
            self._fill_group(group, [seq for seq in todo if seq is not lead])
        chosen = {id(seq) for seq in group}
        for seq in todo:
            seq.prefill_passed = 0 if id(seq) in chosen else seq.prefill_passed + 1
        return group

    def _fill_group(self, group: list[Sequence], others: list[Sequence]) -> None:
        """Add to `group` the requests of `others` (in order) whose next chunks fit beside its chunks."""
        length = group[0].row_cache["k"][0].shape[1]
        width = group[0].chunks[group[0].next_chunk][1]
        for seq in others:
            wider = max(width, seq.chunks[seq.next_chunk][1])
            if ((len(group) + 1) * wider <= self.spec.prefill_chunk and seq.row_cache["k"][0].shape[1] == length
                    and all(s.chunks[s.next_chunk][0] + wider <= length for s in group + [seq])):
                group.append(seq)
                width = wider

    def _insert(self, seq: Sequence) -> None:
        """Place a prefilled request (its cache and `prefilled` hidden state) into a free row."""
        row_hidden = seq.prefilled
        self.executor.insert(seq.rid, seq.row_cache, row_hidden, seq.row_cache["k"][0].shape[1])
        seq.row_cache = seq.prefilled = None
        row_hidden.block_until_ready()
        now = time.perf_counter()
        seq.prefill_ms = (now - seq.t_prefill) * 1e3
        seq.t_start = seq.t_last = now
        seq.status = Status.RUNNING
        self._running[seq.rid] = seq

    def _chunks_after(self, seq: Sequence, filled: int) -> list[tuple[int, int]]:
        """The prefill chunks of a prompt whose first `filled` positions came from the prefix cache. Where the
        first chunk's padding would run past the row's cache, prefilling restarts at the chunk boundary
        below `filled` instead (the positions in between are computed again, to the same bits)."""
        chunks = self.spec.prefill_chunks(len(seq.prompt_ids), filled)
        if max(s + w for s, w in chunks) <= seq.row_cache["k"][0].shape[1]:
            return chunks
        return self.spec.prefill_chunks(len(seq.prompt_ids), filled - filled % self.spec.prefill_chunk)

    # ------------------------------------------------------------ one decode tick
    def _decode_tick(self, events: list) -> None:
        seqs = list(self._running.values())
        batch = self.executor.batch
        for seq in seqs:  # rows just inserted: their certain tokens, their first window
            if seq.window is None and seq.finish is None:
                self._prepare(seq, batch)
        scoring = [s for s in seqs if s.finish is None and s.ready]
        chosen = self._score(scoring) if scoring else {}
        now = time.perf_counter()
        for seq in scoring:
            try:
                seq.verify(chosen[seq.rid])
                if seq.draft_ctx is not None and seq.draft_ms_since is not None:
                    self._learn_draft(seq, now)
                self._prepare(seq, batch)
            except Exception as e:  # this request's own failure (its constraint): it alone ends
                seq.fail(e)
        self._feed(seqs)
        for seq in seqs:
            start, delta = seq.take_events()
            if start < len(seq.out) or delta:
                events.append(TokenEvent(
                    seq.rid, seq.out[start:], delta, seq.logprobs[start:], seq.steps[start:],
                    seq.top_logprobs[start:] if seq.request.top_logprobs else None))
            if seq.finish is not None:
                if seq.rid in self._running:
                    del self._running[seq.rid]
                    self.executor.free_slot(seq.rid)
                events.extend(self._finish_events(seq))

    def _prepare(self, seq: Sequence, batch: int) -> None:
        """The row's next certain tokens and draft (its length from the request's draft mode)."""
        r = seq.request
        seq.draft_ctx = None
        lossy = r.amortize == "margin" and seq.last_margin >= r.amortize_tau
        # draft="auto" drafts within the width a shared batch leaves a row (DecodeSpec.feed_width): the widest
        # row pads every row's forward. An explicit draft="lookup" drafts its full length.
        width = self.spec.feed_width(batch) if r.draft == "auto" else self.spec.feed_max

        def choose_k() -> int:
            if r.draft == "lookup":
                return -self.spec.draft_lookup_len if lossy else self.spec.draft_lookup_len
            arms = tuple(a for a in (LOSSY_ARMS if lossy else DRAFT_ARMS) if abs(a) < width)
            if arms == (0,):
                return 0  # no room for a draft: nothing to choose, nothing to learn
            key = context_key("lookup", seq.constraint_kind, seq.accept_rate, batch, seq.last_k)
            seq.draft_ctx = key
            if lossy:
                return self.engine.draft_planner.choose_lossy(key + "|lossy", r.amortize_lambda, arms)
            return self.engine.draft_planner.choose(key, arms)
        seq.draft_lossy = lossy
        try:
            seq.prepare(choose_k, width)
        except Exception as e:
            seq.fail(e)
            return
        seq.draft_ms_since = time.perf_counter() if seq.draft_ctx is not None else None

    def _learn_draft(self, seq: Sequence, now: float) -> None:
        """Latency per emitted token of the step that verified a planner-chosen draft length."""
        if seq.draft_k and not seq.last_drafted:
            return  # the constraint cut the draft before its first token: no draft was measured
        emitted = seq.last_accepted + 1
        arm = -seq.draft_k if seq.unverified else seq.draft_k
        key = seq.draft_ctx + "|lossy" if seq.request.amortize == "margin" and seq.draft_lossy else seq.draft_ctx
        planner = self.engine.draft_planner
        if not seq.draft_compiled:  # a new forward width compiled in this step: its time says nothing
            planner.update(key, arm, (now - seq.draft_ms_since) * 1e3 / emitted)
        if seq.last_disagreement is not None:
            planner.update_quality(key, arm, seq.last_disagreement)

    def _feed(self, seqs: list[Sequence]) -> None:
        """Send every live row's next piece to the trunk (one forward, asynchronously)."""
        for seq in seqs:
            if seq.finish is not None and seq.rid in self._running:
                del self._running[seq.rid]
                self.executor.free_slot(seq.rid)
        live = [s for s in seqs if s.finish is None]
        ex = self.executor
        ex.compact()
        if not live:
            return
        pieces = {seq.rid: seq.next_piece(ex.batch) for seq in live}
        width = max(len(p) for p, _ in pieces.values())
        shape = (ex.batch, pow2_at_least(width), ex.seq_len)
        seen = self.engine.feed_shapes
        new_shape = shape not in seen
        seen.add(shape)
        for seq in live:
            seq.draft_compiled = new_shape
        fast = width == 1 and all(s.matcher is None and s.sampling.greedy and not s.request.top_logprobs
                                  and not s.feed_queue for s in live)
        ex.feed(pieces, self._all_ids_for(ex.batch) if fast else None)
        self.stats["decode_steps" if width == 1 else "feeds"] += 1

    def _score(self, scoring: list[Sequence]) -> dict:
        """One head call for every window position to score. Returns {rid: {position: (token, logprob, plan,
        K, top alternatives, top-2 log-prob margin)}} (the margin only when the request's amortize mode needs
        it, else 0)."""
        engine, ex = self.engine, self.executor
        vocab = engine.vocab_size
        rows = []  # (seq, position in its window, allowed ids or None)
        for seq in scoring:
            for i, entry in enumerate(seq.window):
                if entry is SKIP or entry is DONE:
                    continue
                rows.append((seq, i, entry))
        out: dict = {seq.rid: {} for seq in scoring}
        if not rows:
            return out
        batch = pow2_at_least(len(rows))
        slot_of = {seq.rid: ex.slots.index(seq.rid) for seq in scoring}
        unconstrained = all(a is None for _, _, a in rows)
        ks = [vocab if a is None else len(a) for _, _, a in rows]
        k_max = max(ks)
        limit = self.spec.sparse_limit(vocab)
        if batch == 1 or k_max > limit:
            k_union = k_max  # the union plan is not applicable: skip the O(B*K) union
        else:
            k_union = len(np.unique(np.concatenate([engine.all_ids if a is None else a for _, _, a in rows])))
        arms = [PlanKind(a) for a in self.spec.applicable_plans(k_max, k_union, batch, vocab)]
        all_greedy = all(seq.sampling.greedy and not seq.request.top_logprobs for seq in scoring)
        if (ex.next_greedy is not None and unconstrained and arms == [PlanKind.DENSE] and all_greedy
                and batch == ex.batch and all(len(seq.window) == 1 for seq in scoring)):
            # computed with the trunk step that produced `hidden` (see ModelExecutor.feed)
            index, logprob = jax.device_get(ex.next_greedy)
            ex.next_greedy = None
            for seq in scoring:
                slot = slot_of[seq.rid]
                out[seq.rid][0] = (int(index[slot]), float(logprob[slot]), PlanKind.DENSE.value, vocab, None, 0.0)
            return out
        requested = {seq.request.plan for seq, _, _ in rows}
        ctx = None
        if len(arms) == 1:
            kind = arms[0]
        elif requested != {"auto"} and len(requested) == 1:
            kind = engine.choose_plan(PlanKind(requested.pop()), k_max, k_union, batch)
        else:
            ctx = StepContext(k_max=k_max, k_mean=sum(ks) / len(ks), k_union=k_union, batch_size=batch,
                              vocab_size=vocab, hidden_size=engine.config.hidden_size,
                              device_kind=engine.device_kind)
            kind = engine.planner.choose(ctx, arms)
        rows_ids = None
        if unconstrained:
            ids, valid = self._all_ids_for(batch)
        else:
            # Padding rows get a one-id placeholder; their choice is ignored.
            rows_ids = [engine.all_ids if a is None else a for _, _, a in rows]
            rows_ids += [engine.all_ids[:1]] * (batch - len(rows))
            ids, valid = plans_mod.pad_allowed(rows_ids, vocab)
        union = None
        if kind is PlanKind.SPARSE_UNION:
            union = plans_mod.union_inputs(rows_ids, ids, vocab)
        seeds = np.zeros(batch, np.uint32)
        steps = np.zeros(batch, np.int32)
        temps = np.zeros(batch, np.float32)
        top_ks = np.zeros(batch, np.int32)
        top_ps = np.ones(batch, np.float32)
        for j, (seq, i, _) in enumerate(rows):
            sp = seq.sampling
            seeds[j], steps[j], temps[j] = sp.seed, len(seq.out) + i, sp.temperature
            top_ks[j], top_ps[j] = sp.top_k, sp.top_p
        greedy = all(seq.sampling.greedy for seq in scoring)
        want_logits = any(seq.request.top_logprobs or seq.request.amortize != "none" for seq in scoring)
        hidden = ex.rows_hidden([(slot_of[seq.rid], seq.window_len - 1 - i) for seq, i, _ in rows], batch)
        if ctx is not None:  # the planner measures: time only what the plan changes (the trunk is shared)
            hidden.block_until_ready()
        t0 = time.perf_counter()
        index, logprob, logits = ex.score(hidden, kind, ids, valid, seeds, steps, temps, top_ks, top_ps, union,
                                          greedy, want_logits)
        head_ms = (time.perf_counter() - t0) * 1e3
        if ctx is not None:
            engine.planner.update(ctx, kind, head_ms)
        for j, (seq, i, allowed) in enumerate(rows):
            row_ids = engine.all_ids if allowed is None else allowed
            k = len(row_ids)
            top, margin = None, 0.0
            if seq.request.top_logprobs or seq.request.amortize != "none":
                row = np.asarray(logits[j][:k], np.float64)
                lp = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
                best = np.argsort(-lp, kind="stable")
                if seq.request.top_logprobs:
                    top = [(int(row_ids[b]), float(lp[b])) for b in best[: seq.request.top_logprobs]]
                margin = float(lp[best[0]] - lp[best[1]]) if k > 1 else float("inf")
            out[seq.rid][i] = (int(row_ids[index[j]]), float(logprob[j]), kind.value, k, top, margin)
        return out

    def _all_ids_for(self, batch: int):
        if batch not in self._all_ids:
            vocab = self.engine.vocab_size
            ids = np.broadcast_to(self.engine.all_ids, (batch, vocab))
            self._all_ids[batch] = (jax.device_put(ids), jax.device_put(np.ones((batch, vocab), bool)))
        return self._all_ids[batch]

    # ------------------------------------------------------------ the fused on-device loop
    def _fused_candidate(self) -> bool:
        if self._running or self._prefilling or len(self._waiting) != 1:
            return False
        r = self._waiting[0].request
        return bool(r.compiled) and self._waiting[0].compiled_reason is None

    def _run_fused(self, seq: Sequence, events: list) -> None:
        """Run a request that has the scheduler to itself in the fused loop, or put it back on the host loop
        with the reason (`compiled_reason`)."""
        from llmqp import compiled as fused

        r = seq.request
        reason = None
        if r.stop:
            reason = "stop strings are matched on the host loop"
        elif r.top_logprobs:
            reason = "top_logprobs are reported by the host loop"
        elif r.constraint is not None:
            reason = "a precompiled constraint object runs on the host loop"
        elif not isinstance(r.prompt, str) and not (isinstance(r.prompt, list) and r.prompt
                                                      and isinstance(r.prompt[0], dict)):
            reason = "token-id prompts run on the host loop"
        if reason is None:
            try:
                out = fused.generate_fused(
                    self.engine, r.prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                    top_k=r.top_k, seed=r.seed, raw=r.raw, json_schema=r.json_schema, regex=r.regex,
                    choice=r.choice, grammar=r.grammar, strict=r.strict, whitespace=r.whitespace, forced=r.forced,
                    sparse_threshold=self.engine.planner.crossover_k(1, self.engine.vocab_size,
                                                                     self.engine.config.hidden_size))
            except Exception as e:
                seq.fail(e)
                events.extend(self._finish_events(seq))
                return
            if isinstance(out, fused.Fallback):
                reason = out.reason
            else:
                out = dataclasses.replace(out, compiled=True)
                if out.token_ids:
                    events.append(TokenEvent(seq.rid, list(out.token_ids), out.text, list(out.logprobs),
                                             list(out.steps)))
                seq.status = Status.FINISHED
                self._known.discard(seq.rid)
                events.append(FinishedEvent(seq.rid, out))
                return
        seq.compiled_reason = reason
        self._waiting.appendleft(seq)
        self._admit(events)
        if self._running:
            self._decode_tick(events)

    # ------------------------------------------------------------ helpers
    def _finish_events(self, seq: Sequence) -> list:
        """The request's last events: the text still held back (an incomplete character, a possible
        stop-string prefix), then its FinishedEvent."""
        seq.status = Status.FINISHED
        self._known.discard(seq.rid)
        out = []
        if seq.detok is not None:
            rest = seq.detok.finish()
            if rest:
                out.append(TokenEvent(seq.rid, [], rest, [], [], [] if seq.request.top_logprobs else None))
        return out + [FinishedEvent(seq.rid, seq.result(), seq.error)]

    def _find(self, rid: str) -> Sequence | None:
        for seq in self._prefilling:
            if seq.rid == rid:
                return seq
        if rid in self._running:
            return self._running[rid]
        return next((s for s in self._waiting if s.rid == rid), None)
