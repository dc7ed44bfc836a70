"""The state of one request inside the scheduler: its constraint matcher, what it generated, its text."""

from __future__ import annotations

import enum
import json
import time

import numpy as np

from llmqp.core.detok import IncrementalDetokenizer
from llmqp.core.request import Request
from llmqp.core.spec import DecodeSpec, FinishReason
from llmqp.errors import LLMQPError
from llmqp.results import GenerationResult, StepTrace


class Status(enum.Enum):
    WAITING = "waiting"  # queued: not tokenized, constraint not compiled
    PREFILLING = "prefilling"  # its prompt is being fed, one chunk per tick, into its own cache
    RUNNING = "running"  # holds a row of the slot cache
    FINISHED = "finished"


class Sequence:
    """Mutable per-request state. The scheduler drives it: `plan_step` (what this tick does: finish, a
    forced run, or scoring over `allowed`), `apply` (take the chosen tokens), `result`."""

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
        self.row_seq_len = 0
        self.chunks: list[tuple[int, int]] = []
        self.next_chunk = 0
        self.row_hidden = None
        self.t_prefill = 0.0
        # decoding
        self.pos = 0  # next cache position to write
        self.out: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.steps: list[StepTrace] = []
        self.finish: FinishReason | None = None
        self.error: BaseException | None = None
        self.run: list[int] | None = None  # forced tokens chosen this tick
        self.allowed: np.ndarray | None = None  # None: every token
        self.new_tokens: list[int] = []
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
        self.prompt_ids = np.asarray(ids, np.int32)
        self.eos = frozenset(engine.tokenizer.eos_ids)
        self.detok = IncrementalDetokenizer(engine.tokenizer, r.stop)
        self.pos = len(ids)
        self.chunks = self.spec.prefill_chunks(len(ids))
        self.row_seq_len = self.spec.cache_len(len(ids), r.max_tokens)

    # ------------------------------------------------------------ one tick
    def plan_step(self) -> None:
        """Decide this tick: finish (the constraint is complete), a forced run, or scoring over `allowed`."""
        self.run, self.allowed, self.new_tokens = None, None, []
        if self.matcher is None:
            return
        if self.matcher.is_done():
            self.finish = FinishReason.STOP
            return
        forced = self.request.forced
        run = self.matcher.forced() if forced else []
        if not run:
            allowed = self.matcher.allowed()
            if len(allowed) == 0:  # cannot happen with a consistent backend; never emit garbage
                raise LLMQPError("the constraint allows no token at this point")
            if len(allowed) == 1 and forced:
                run = [int(allowed[0])]
            else:
                self.allowed = allowed
                return
        self.run = list(run)

    def take_run(self, single: bool) -> None:
        """Keep the whole forced run when this row decodes alone (fed in one multi-token forward), else its
        first token (every row of a shared batch advances one token per step)."""
        if not single:
            self.run = self.run[:1]

    def apply(self, tokens: list[int], logprobs: list[float], plan: str, k: int, now: float,
              top: list[tuple[int, float]] | None = None) -> None:
        """Take this tick's tokens (a forced run, or one scored token): EOS, the constraint and max_tokens
        may end the request. `new_tokens` are the ones the trunk must still see."""
        tokens = tokens[: self.request.max_tokens - len(self.out)]
        stop_at = next((i for i, t in enumerate(tokens) if t in self.eos), None)
        kept = tokens if stop_at is None else tokens[:stop_at]
        per_token_ms = (now - self.t_last) * 1e3 / max(len(kept), 1)
        if self.matcher is not None:
            for t in tokens if stop_at is None else tokens[: stop_at + 1]:
                self.matcher.accept(t)
        self.out.extend(kept)
        self.logprobs.extend(logprobs[: len(kept)])
        if self.request.top_logprobs:
            self.top_logprobs.extend([top or []] * len(kept) if plan != "forced" else [[(t, 0.0)] for t in kept])
        self.steps.extend(StepTrace(plan, k, per_token_ms) for _ in kept)
        self.new_tokens = list(kept)
        self.t_last = now
        self.finish = self.spec.finish_after(
            sampled_eos=stop_at is not None,
            constraint_done=self.matcher is not None and self.matcher.is_done(),
            stop_string=False, n_out=len(self.out), max_tokens=self.request.max_tokens)

    def charge_feed(self, now: float) -> None:
        """Attribute a multi-token forward to the tokens of the run it fed."""
        n = len(self.new_tokens)
        if n > 1:
            extra = (now - self.t_last) * 1e3 / n
            self.steps[-n:] = [StepTrace(s.plan, s.k, s.latency_ms + extra) for s in self.steps[-n:]]
            self.t_last = now

    def text_delta(self, tokens: list[int]) -> str:
        """Detokenize this tick's tokens; a matched stop string ends the request."""
        delta = self.detok.add(tokens)
        if self.detok.stopped and self.finish is None:
            self.finish = FinishReason.STOP
        return delta

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
            top_logprobs=list(self.top_logprobs) if self.request.top_logprobs else None)

    def _constraint_holds(self, text: str) -> bool:
        if self.detok is not None and self.detok.stopped:  # cut at a stop string: check the text itself
            return bool(self.compiled.accepts(text))
        return bool(self.matcher.can_stop())

    def _is_json_constraint(self) -> bool:
        spec = getattr(self.compiled, "spec", None)
        return getattr(getattr(spec, "kind", None), "value", None) == "json_schema"
