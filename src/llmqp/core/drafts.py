"""Draft proposers: cheap guesses of the next tokens, verified by the scheduler in one multi-token forward.

Two proposers feed a draft, and a draft combines them:

- the constraint's *forced run* (tokens the constraint allows alone; `forced=True`): certain, never scored;
- *prompt lookup* (vLLM's ``ngram`` method): continue the longest n-gram at the end of the context (prompt
  and output so far) that occurred earlier in the context with what followed it there.

A draft is built token by token (`Sequence.prepare`): a lookup token, then the forced run that the
constraint imposes after it, then the next lookup token, ...; it is cut at the first token the constraint
rejects, at EOS and at the draft length the planner chose. The proposers never decide what is emitted:
verification scores every drafted position with the plan and the sampler a step-by-step decode would use
and keeps the longest prefix it agrees with, so outputs are identical with drafts on or off.

Modes (`draft=` on `generate` and `Request`): "none" feeds tokens as before drafts existed (a sampled token,
then the forced run after it, each in its own forward); "forced" feeds a sampled token and the forced run
after it in one forward; "lookup" adds a prompt-lookup draft of `DecodeSpec.draft_lookup_len` tokens at every
step; "auto" (the default) lets the draft planner choose the lookup draft's length per step (0 included).
"""

from __future__ import annotations

DRAFT_MODES = ("auto", "none", "forced", "lookup")


class PromptLookup:
    """An n-gram index over one request's context (prompt + confirmed output), updated in O(n_max) per token.

    `index[n-gram]` is the position right after that n-gram's most recent occurrence whose continuation is
    known. `propose(tail)` looks up the longest suffix of `tail` (n = n_max .. n_min) and returns the token
    that followed it, or None."""

    def __init__(self, context, n_max: int = 3, n_min: int = 1):
        self.n_max, self.n_min = n_max, n_min
        self.context: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(context)

    def extend(self, tokens) -> None:
        ctx, index = self.context, self.index
        for t in tokens:
            p = len(ctx)
            # n-grams ending at p - 1 now have a known continuation (the token at p)
            for n in range(self.n_min, self.n_max + 1):
                if p - n >= 0:
                    index[tuple(ctx[p - n : p])] = p
            ctx.append(int(t))

    def propose(self, tail: list[int]) -> int | None:
        """The token that followed the longest suffix of `tail` (the context plus draft tokens so far)."""
        for n in range(min(self.n_max, len(tail)), self.n_min - 1, -1):
            at = self.index.get(tuple(tail[-n:]))
            if at is not None:
                return self.context[at]
        return None
