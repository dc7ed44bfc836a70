"""What a generation returns."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class StepTrace:
    """One emitted token: the plan that chose it, the allowed-set size K (the vocabulary size when
    unconstrained) and the wall time from the previous token to this one, in ms (trunk + mask + head +
    sampling; a forced run's time is split evenly over its tokens)."""

    plan: str
    k: int
    latency_ms: float
    drafted: bool = False  # the token came from a verified draft (accepted), not from a one-token step


@dataclasses.dataclass(frozen=True)
class DraftTrace:
    """One verification: `drafted` speculative tokens were fed in one forward with the row's last token,
    `accepted` of them matched what step-by-step decoding chooses (the rest were rolled back); `length` is the
    draft length chosen (the planner's arm), `proposer` what proposed them."""

    drafted: int
    accepted: int
    length: int
    proposer: str = "lookup"
    unverified: bool = False  # amortize="margin": emitted without verification (accepted == drafted)
    checked: bool = False  # an unverified draft that was scored anyway, to measure disagreement
    disagreed: int = 0  # checked: how many of its tokens exact decoding would not have emitted

    @property
    def rejected(self) -> int:
        return self.drafted - self.accepted


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """text: the generated text (special tokens removed). value: the parsed JSON for json_schema
    constraints, else None. token_ids: generated ids, the final EOS excluded (a stop string's tokens are kept
    here, its text is cut from `text`). finish_reason: "stop" (EOS, a stop string, or the constraint allows
    nothing more), "length" (max_tokens reached), "error" (this request failed on its own: `error` says why)
    or "abort". valid: True exactly when finish_reason is "stop" and, for a constrained request, the output
    satisfies the constraint — a generation cut by max_tokens is never valid, constrained or not.
    logprobs: per token, log-probability under the model's f32 softmax at temperature 1 renormalised over the
    allowed set (the whole vocabulary when unconstrained; 0.0 for forced tokens) — the model's distribution
    restricted to what the constraint allows, not the temperature/top-k/top-p-warped one that was sampled.
    top_logprobs: per token, [(token id, logprob)] of the best alternatives over the same set, when asked.
    compiled: whether the fused on-device loop produced it; compiled_reason: why a requested fused run fell
    back to the host-stepped loop."""

    text: str
    token_ids: list[int]
    finish_reason: str
    valid: bool
    value: Any = None
    logprobs: list[float] = dataclasses.field(default_factory=list)
    steps: list[StepTrace] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    compiled: bool = False  # ran in the fused on-device loop
    compiled_reason: str | None = None  # why compiled=True/"auto" fell back to the host loop
    error: str | None = None  # finish_reason == "error": what went wrong
    top_logprobs: list[list[tuple[int, float]]] | None = None
    drafts: list[DraftTrace] = dataclasses.field(default_factory=list)  # one per verified draft

    @property
    def drafted_tokens(self) -> int:
        return sum(d.drafted for d in self.drafts)

    @property
    def accepted_tokens(self) -> int:
        return sum(d.accepted for d in self.drafts)

    @property
    def rejected_tokens(self) -> int:
        return self.drafted_tokens - self.accepted_tokens

    @property
    def unverified_tokens(self) -> int:
        """Tokens taken without verification (amortize="margin"); the only tokens that may differ from exact
        decoding. Their StepTrace plan is "unverified"."""
        return sum(d.drafted for d in self.drafts if d.unverified)

    @property
    def disagreement_rate(self) -> float | None:
        """Measured on the checked unverified drafts: the share of their tokens exact decoding would not have
        emitted at that position (None when nothing was checked)."""
        checked = [d for d in self.drafts if d.checked]
        n = sum(d.drafted for d in checked)
        return sum(d.disagreed for d in checked) / n if n else None

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def trace_summary(self) -> str:
        """A compact per-plan summary of `steps`: count, K range and mean step latency."""
        by_plan: dict[str, list[StepTrace]] = {}
        for s in self.steps:
            by_plan.setdefault(s.plan, []).append(s)
        lines = []
        for plan, steps in sorted(by_plan.items()):
            ks = [s.k for s in steps]
            mean = sum(s.latency_ms for s in steps) / len(steps)
            lines.append(f"{plan:>7}: {len(steps):4d} steps  K {min(ks)}..{max(ks)}  mean {mean:.2f} ms/step")
        if self.drafts:
            lines.append(f"  drafts: {len(self.drafts)} verified, {self.drafted_tokens} tokens drafted, "
                         f"{self.accepted_tokens} accepted ({self.accepted_tokens / max(self.drafted_tokens, 1):.0%})")
        total = sum(s.latency_ms for s in self.steps)
        lines.append(f"  total: {len(self.steps):4d} tokens in {total:.1f} ms  (prefill {self.prefill_ms:.1f} ms,"
                     f" {self.prompt_tokens} prompt tokens)")
        return "\n".join(lines)
