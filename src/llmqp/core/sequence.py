"""The state of one request inside the scheduler: its constraint matcher, what it generated, its text."""

from __future__ import annotations

import enum
import json
import time

import numpy as np

from llmqp.core.detok import IncrementalDetokenizer
from llmqp.core.drafts import Lookup
from llmqp.core.request import Request
from llmqp.core.spec import DecodeSpec, FinishReason, pow2_at_least
from llmqp.errors import ConstraintError, LLMQPError
from llmqp.results import DraftTrace, GenerationResult, StepTrace

SKIP = "skip"  # a window position whose draft token is certain (forced): not scored
DONE = "done"  # the window's last position when the constraint allows nothing after the draft
FORCED = "forced"
UNVERIFIED = "unverified"  # the StepTrace plan of a token emitted from a draft without verification
UNVERIFIED_CHECK_EVERY = 4  # amortize="margin": every 4th unverified draft is scored to measure disagreement


class Status(enum.Enum):
    WAITING = "waiting"  # queued: not tokenized, constraint not compiled
    PREFILLING = "prefilling"  # its prompt is being fed, one chunk per tick, into its own cache
    RUNNING = "running"  # holds a row of the slot cache
    FINISHED = "finished"


class Sequence:
    """Mutable per-request state. The scheduler drives it: `prepare` (the constraint's certain tokens, a
    draft, the window to score), `next_piece` (what to feed), `verify` (take the scores), `result`."""

    def __init__(self, rid: str, request: Request, spec: DecodeSpec):
        self.rid = rid
        self.request = request
        self.spec = spec
        self.sampling = request.sampling_params()
        self.status = Status.WAITING
        self.matcher = None
        self.compiled = None  # the compiled constraint, once admitted
        self.prompt_ids: np.ndarray | None = None
        self.detok: IncrementalDetokenizer | None = None
        self.eos: frozenset[int] = frozenset()
        # prefill progress
        self.row_cache = None
        self.prefilled = None  # the last prompt position's hidden state while it waits for a free row
        self.row_seq_len = 0
        self.chunks: list[tuple[int, int]] = []
        self.next_chunk = 0
        self.prefill_passed = 0  # ticks in a row its prefill could have run a chunk and did not
        self.t_prefill = 0.0
        # decoding
        self.pos = 0  # next cache position to write
        self.out: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.steps: list[StepTrace] = []
        self.finish: FinishReason | None = None
        self.error: BaseException | None = None
        # drafts and feeding (see "one tick")
        self.lookup: Lookup | None = None
        self.feed_queue: list[int] = []
        self.segments: list[int] = []  # lengths of the confirmed segments at the head of feed_queue
        self.window: list | None = None
        self.window_len = 1
        self.draft: list[int] = []
        self.certain: list[bool] = []
        self.draft_k = 0
        self.unverified = False  # this draft is emitted without verification (amortize="margin")
        self.check = False  # ... but scored anyway, to measure disagreement
        self.n_unverified = 0
        self.last_margin = 0.0  # top-2 log-prob margin of the last scored token (amortize="margin")
        self.last_disagreement: float | None = None
        self.last_accepted = 0  # speculative tokens the last verification accepted
        self.last_drafted = 0  # ... of how many drafted
        self.last_k = 0  # allowed-set size of the last scored token
        self.draft_lossy = False
        self.drafts: list[DraftTrace] = []
        self.accept_rate = 0.5
        self.delta_parts: list[str] = []
        self.emitted = 0
        self.constraint_kind = "none"
        self.draft_ctx: str | None = None  # the draft planner's context key when it chose this draft's length
        self.draft_ms_since: float | None = None
        self.draft_compiled = False
        self.t_added = time.perf_counter()
        self.t_start = self.t_last = 0.0
        self.prefill_ms = 0.0
        self.compiled_reason: str | None = None
        self.text_parts: list[str] = []

    # ------------------------------------------------------------ admission
    def admit(self, engine) -> None:
        """Tokenize the prompt and compile the constraint. Raises LLMQPError for this request's own mistakes."""
        r = self.request
        if isinstance(r.prompt, (list, tuple)) and r.prompt and isinstance(r.prompt[0], int):
            ids = [int(t) for t in r.prompt]
            if min(ids) < 0 or max(ids) >= engine.vocab_size:
                from llmqp.sampling import InvalidArgument

                raise InvalidArgument(f"prompt token ids must be in [0, {engine.vocab_size})")
        else:
            ids = engine.prompt_ids(r.prompt, r.raw)
        if not ids:
            from llmqp.errors import PromptError

            raise PromptError("the prompt is empty")
        engine.check_context(len(ids), r.max_tokens)
        if r.constraint is not None:
            self.compiled = r.constraint
        elif r.constraint_kinds():
            self.compiled = engine.constraint(**r.constraint_kw())
        self.matcher = self.compiled.matcher() if self.compiled is not None else None
        if self.compiled is not None:
            kind = getattr(getattr(self.compiled, "spec", None), "kind", None)
            self.constraint_kind = getattr(kind, "value", "other")
        self.prompt_ids = np.asarray(ids, np.int32)
        self.eos = frozenset(engine.tokenizer.eos_ids)
        self.detok = IncrementalDetokenizer(engine.tokenizer, r.stop)
        self.pos = len(ids)
        if r.draft in ("auto", "lookup"):
            self.lookup = Lookup(ids, engine.tokenizer.token_bytes, engine.tokenizer.encode)
        self.chunks = self.spec.prefill_chunks(len(ids))
        self.row_seq_len = self.spec.cache_len(len(ids), r.max_tokens)

    # ------------------------------------------------------------ one tick
    # A row's life between ticks: `feed_queue` holds tokens the trunk has not seen yet — confirmed ones (a
    # sampled token, a forced run) then the draft; the scheduler feeds it in pieces (`next_piece`), one forward
    # per tick. Once it is empty, the last `len(window)` fed positions hold the hidden states that predict
    # each draft token and the token after the draft: `window[i]` is the allowed set to score position i over
    # (None: every token), SKIP when draft[i] is certain (forced: not scored), DONE when the constraint
    # allows nothing after the draft. `verify` takes the scores, keeps the longest agreeing prefix plus the
    # sampler's token at the first disagreement, and rolls the matcher and `pos` back past the rest.

    @property
    def ready(self) -> bool:
        """Prepared and fully fed: its window can be scored this tick."""
        return self.window is not None and not self.feed_queue

    def prepare(self, choose_k, width: int | None = None) -> None:
        """After the confirmed tokens: emit the constraint's certain run (fed with them), then draft up to
        choose_k() speculative tokens (lookup + the forced runs between them) and set the window the next
        scoring verifies, at most `width` positions (default `feed_max`). choose_k is called only when a draft
        is possible."""
        self.window, self.draft, self.certain = None, [], []
        self.draft_k, self.unverified, self.check = 0, False, False
        if self.finish is not None:
            return
        m = self.matcher
        if m is not None:
            self._emit_certain()
            if self.finish is not None:
                return
        room = min(self.request.max_tokens - len(self.out) - 1, (width or self.spec.feed_max) - 1)
        window: list = []
        # A fresh row (nothing to feed) is scored on its prefill hidden state: no draft then.
        if room > 0 and self.feed_queue and self.lookup is not None:
            first = self.lookup.propose([])
            if first is not None and first not in self.eos:
                arm = choose_k()
                self.unverified = arm < 0
                self.draft_k = abs(arm)
                # The forward's width is a power of two: a draft fills the width its length needs (the
                # padding would be computed anyway), within the room max_tokens and feed_max leave.
                queued = len(self.feed_queue)
                target = min(pow2_at_least(queued + abs(arm)), queued + room) if arm else queued
                n_spec = 0
                while queued + len(self.draft) < target:
                    t = first if n_spec == 0 else self.lookup.propose(self.draft)
                    if t is None or t in self.eos:
                        break
                    allowed = None
                    try:
                        if m is not None:
                            allowed = m.allowed()
                            i = int(np.searchsorted(allowed, t))
                            if i >= len(allowed) or allowed[i] != t:
                                break
                            m.accept(t)
                        window.append(allowed)
                        self.draft.append(t)
                        self.certain.append(False)
                        n_spec += 1
                        if m is not None:
                            if m.is_done():
                                break
                            for r in self._certain_tokens(room - len(self.draft)):
                                m.accept(r)
                                window.append(SKIP)
                                self.draft.append(r)
                                self.certain.append(True)
                            if m.is_done():
                                break
                    except ConstraintError:
                        # The draft led where a token-level layer leaves no token (a value that can no
                        # longer become valid): it is speculative, so drop it all and go on undrafted.
                        m.rollback(len(self.draft))  # (each draft token was accepted before it was appended)
                        window.clear()
                        self.draft.clear()
                        self.certain.clear()
                        break
        if m is None:
            window.append(None)
        elif m.is_done():
            window.append(DONE)
        else:
            allowed = m.allowed()
            if len(allowed) == 0:  # cannot happen with a consistent backend; never emit garbage
                raise LLMQPError("the constraint allows no token at this point")
            window.append(allowed)
        if self.unverified:
            if not any(not c for c in self.certain):
                self.unverified = False
            else:
                self.n_unverified += 1
                self.check = self.n_unverified % UNVERIFIED_CHECK_EVERY == 1
                if not self.check:  # emitted without scoring
                    window = [SKIP if not c else w for c, w in zip(self.certain, window)] + window[len(self.draft):]
        self.window = window
        self.feed_queue.extend(self.draft)
        self.window_len = len(window)

    def _certain_tokens(self, limit: int) -> list[int]:
        """The constraint's forced run from here (forced=True), at most `limit` tokens; not accepted yet."""
        if not self.request.forced or limit <= 0 or self.matcher.is_done():
            return []
        run = list(self.matcher.forced())
        if not run:
            allowed = self.matcher.allowed()
            if len(allowed) == 1 and int(allowed[0]) not in self.eos:
                run = [int(allowed[0])]
        return run[:limit]

    def _emit_certain(self) -> None:
        """Emit the constraint's forced runs from the current state (they go to the trunk with the
        confirmed tokens before them)."""
        m = self.matcher
        while self.finish is None:
            if m.is_done():
                self.finish = FinishReason.STOP
                return
            run = self._certain_tokens(self.request.max_tokens - len(self.out))
            if not run:
                return
            for t in run:
                m.accept(t)
            self._emit(run, [0.0] * len(run), [FORCED] * len(run), [1] * len(run), None, drafted=False)

    def next_piece(self, batch: int) -> tuple[list[int], int]:
        """The tokens to feed this tick (one forward per tick). With draft="none" the confirmed tokens go as
        before drafts existed: each segment (a sampled token, a forced run) in the power-of-two pieces of
        `DecodeSpec.feed_chunks` at batch 1, one token per tick in a shared batch. Otherwise the queue is cut
        from its end: the last piece holds at least the whole window (the last confirmed token and the draft)
        — a sampled token and the forced run after it go through one forward — and the earlier pieces at most
        `DecodeSpec.feed_width(batch)` tokens each."""
        q = self.feed_queue
        if self.request.draft != "none":
            cap = self.spec.feed_width(batch)
            tail = max(len(self.draft) + 1, min(cap, len(q)))
            head = len(q) - tail
            n = len(q) if head <= 0 else min(self.spec.feed_chunks(head)[0], cap)
        else:
            n = 1 if batch > 1 else self.spec.feed_chunks(self.segments[0])[0]
        piece, self.feed_queue = q[:n], q[n:]
        left = n
        while left and self.segments:
            take = min(left, self.segments[0])
            left -= take
            self.segments[0] -= take
            if self.segments[0] == 0:
                self.segments.pop(0)
        start = self.pos
        self.pos += n
        return piece, start

    def verify(self, chosen: dict) -> None:
        """Take the scores of the window's positions ({i: (token, logprob, plan, K, top alternatives, top-2
        margin)}): accept the draft's longest prefix the sampler agrees with (certain tokens need no score), then
        the sampler's own token at the first disagreement (or after the whole draft); roll back the rest."""
        draft, certain, window = self.draft, self.certain, self.window
        accepted, bonus, disagreed = 0, None, 0
        for i, entry in enumerate(window):
            if i < len(draft):
                if certain[i] or self.unverified or chosen[i][0] == draft[i]:
                    if self.unverified and not certain[i] and i in chosen and chosen[i][0] != draft[i]:
                        disagreed += 1
                    accepted += 1
                    continue
                bonus = i
                break
            if entry is not DONE:
                bonus = i
        rejected = len(draft) - accepted
        if rejected and self.matcher is not None:
            self.matcher.rollback(rejected)
        self.pos -= rejected
        n_spec = sum(1 for c in certain if not c)
        self.last_disagreement = None
        self.last_accepted = sum(1 for i in range(accepted) if not certain[i])
        self.last_drafted = sum(1 for c in certain if not c)
        if n_spec:
            acc_spec = sum(1 for i in range(accepted) if not certain[i])
            self.drafts.append(DraftTrace(n_spec, acc_spec, self.draft_k, unverified=self.unverified,
                                          checked=self.check, disagreed=disagreed))
            if self.check:
                self.last_disagreement = disagreed / n_spec
            if not self.unverified:
                self.accept_rate = 0.7 * self.accept_rate + 0.3 * (acc_spec / n_spec)
        self.window, self.draft, self.certain = None, [], []
        self.feed_queue = []
        tokens, logprobs, plans, ks, tops, drafted = [], [], [], [], [], []
        for i in range(accepted):
            tokens.append(draft[i])
            if certain[i]:
                logprobs.append(0.0), plans.append(FORCED), ks.append(1), tops.append(None)
            elif self.unverified:
                logprobs.append(0.0), plans.append(UNVERIFIED), ks.append(1), tops.append(None)
            else:
                tok, lp, plan, k, top, _ = chosen[i]
                logprobs.append(lp), plans.append(plan), ks.append(k), tops.append(top)
            drafted.append(not certain[i])
        # the tokens of the draft are in the matcher already; the sampler's own token is not
        n_drafted = len(tokens)
        if bonus is not None:
            tok, lp, plan, k, top, self.last_margin = chosen[bonus]
            self.last_k = k
            tokens.append(tok), logprobs.append(lp), plans.append(plan), ks.append(k), tops.append(top)
            drafted.append(False)
        self._emit(tokens, logprobs, plans, ks, tops, drafted=drafted, in_matcher=n_drafted,
                   fed=n_drafted)
        if bonus is None and self.finish is None:
            self.finish = self.spec.finish_after(sampled_eos=False, constraint_done=True, stop_string=False,
                                                 n_out=len(self.out), max_tokens=self.request.max_tokens)

    def _emit(self, tokens, logprobs, plans, ks, tops, *, drafted, in_matcher: int = None, fed: int = 0) -> None:
        """Append tokens to the output one at a time, as step-by-step decoding would: EOS, a stop string or
        max_tokens end the request at that token. The first `in_matcher` tokens are in the matcher already
        (default: all of them), the first `fed` ones in the KV cache; the others are queued for the trunk."""
        if in_matcher is None:
            in_matcher = len(tokens)
        if isinstance(drafted, bool):
            drafted = [drafted] * len(tokens)
        now = time.perf_counter()
        per_token_ms = (now - self.t_last) * 1e3 / max(len(tokens), 1)
        self.t_last = now
        new_segment = True
        for j, t in enumerate(tokens):
            if self.finish is not None:
                break
            if t in self.eos:
                if self.matcher is not None and j >= in_matcher:
                    self.matcher.accept(t)
                self.finish = FinishReason.STOP
                break
            if self.matcher is not None and j >= in_matcher:
                self.matcher.accept(t)
            self.out.append(t)
            self.logprobs.append(logprobs[j])
            if self.request.top_logprobs:
                self.top_logprobs.append([(t, 0.0)] if plans[j] == FORCED else (tops[j] or []))
            self.steps.append(StepTrace(plans[j], ks[j], per_token_ms, drafted[j]))
            self.lookup_extend(t)
            if j >= fed:
                self.feed_queue.append(t)
                if new_segment:
                    self.segments.append(0)
                    new_segment = False
                self.segments[-1] += 1
            self.delta_parts.append(self.detok.add([t]))
            if self.detok.stopped:
                self.finish = FinishReason.STOP
                break
            self.finish = self.spec.finish_after(
                sampled_eos=False,
                constraint_done=self.matcher is not None and j == len(tokens) - 1 and self.matcher.is_done(),
                stop_string=False, n_out=len(self.out), max_tokens=self.request.max_tokens)

    def lookup_extend(self, t: int) -> None:
        if self.lookup is not None:
            self.lookup.extend((t,))

    def take_events(self):
        """(tokens, text delta, first index) emitted since the last call."""
        start = self.emitted
        self.emitted = len(self.out)
        delta = "".join(self.delta_parts)
        self.delta_parts = []
        return start, delta

    # ------------------------------------------------------------ the end
    def fail(self, exc: BaseException) -> None:
        self.finish = FinishReason.ERROR
        self.error = exc

    def result(self) -> GenerationResult:
        finish = self.finish or FinishReason.LENGTH
        text = self.detok.text if self.detok is not None else ""
        valid = finish is FinishReason.STOP and (self.matcher is None or self._constraint_holds(text))
        value = None
        if valid and (self.request.json_schema is not None or self._is_json_constraint()):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:  # cannot happen for an output the schema accepted
                valid = False
        decode_ms = (self.t_last - self.t_start) * 1e3 if self.t_start else 0.0
        return GenerationResult(
            text=text, token_ids=list(self.out), finish_reason=finish.value, valid=valid, value=value,
            logprobs=list(self.logprobs), steps=list(self.steps),
            prompt_tokens=0 if self.prompt_ids is None else len(self.prompt_ids), prefill_ms=self.prefill_ms,
            decode_ms=max(decode_ms, 0.0), compiled_reason=self.compiled_reason,
            error=None if self.error is None else str(self.error),
            top_logprobs=list(self.top_logprobs) if self.request.top_logprobs else None,
            drafts=list(self.drafts))

    def _constraint_holds(self, text: str) -> bool:
        if self.detok is not None and self.detok.stopped:  # cut at a stop string: check the text itself
            return bool(self.compiled.accepts(text))
        return bool(self.matcher.can_stop())

    def _is_json_constraint(self) -> bool:
        spec = getattr(self.compiled, "spec", None)
        return getattr(getattr(spec, "kind", None), "value", None) == "json_schema"
