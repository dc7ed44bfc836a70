"""Draft proposers: cheap guesses of the next tokens, verified by the scheduler in one multi-token forward.

Two proposers feed a draft, and a draft combines them:

- the constraint's *forced run* (tokens the constraint allows alone; `forced=True`): certain, never scored;
- *prompt lookup* (`Lookup`): continue what followed, earlier in the context (prompt and output so far), the
  context's end. By token ids (vLLM's ``ngram`` method, `PromptLookup`) when an n-gram of two or more tokens
  matches, else by text (`TextLookup`: the longest suffix of the text, tokenized where it occurred before —
  a copied value whose first token differs from the prompt's, `Marie` for ` Marie`, still continues), else
  by the last token alone.

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

from llmqp.errors import LLMQPError

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

    def propose(self, tail: list[int], n_min: int | None = None) -> int | None:
        """The token that followed the longest suffix of `tail` (the context plus draft tokens so far), of at
        least `n_min` tokens (default: the index's)."""
        for n in range(min(self.n_max, len(tail)), (n_min or self.n_min) - 1, -1):
            at = self.index.get(tuple(tail[-n:]))
            if at is not None:
                return self.context[at]
        return None


class TextLookup:
    """Prompt lookup over bytes rather than token ids: continue the longest suffix of the context's text
    (prompt + confirmed output + draft) that occurred earlier in the confirmed text, by tokenizing what
    followed it there.

    Token n-grams miss the commonest copy in extraction: a value's first token is seldom a prompt token
    (`"Marie` is `"`, `Marie` in the output but ` Marie` in the prompt), so the ids that follow never match
    an n-gram of the prompt even though the text does. Matching text finds ` Curie was ...` after `Marie`;
    its tokens are the guess. The last token of a continuation may be cut mid-word, so it is not proposed.
    One continuation serves the draft tokens that follow it (cached); a draft that leaves it recomputes."""

    def __init__(self, context, token_bytes, encode, *, min_match: int = 2, max_match: int = 48,
                 run_bytes: int = 48):
        self.token_bytes, self.encode = token_bytes, encode
        self.min_match, self.max_match, self.run_bytes = min_match, max_match, run_bytes
        self.text = bytearray()
        self.cache: tuple | None = None  # (len(text), draft it was computed for, continuation tokens)
        self.extend(context)

    def extend(self, tokens) -> None:
        tb = self.token_bytes
        for t in tokens:
            self.text += tb(int(t))

    def match(self, query: bytes) -> tuple[int, int]:
        """(end of the most recent earlier occurrence of the longest suffix of `query`, its length), or
        (-1, 0). A suffix that occurs has every shorter suffix occurring too, so lengths grow until one fails."""
        hay, end, at, best = self.text, len(self.text) - 1, -1, 0
        n = self.min_match
        while n <= len(query):
            p = hay.rfind(query[-n:], 0, end)
            if p < 0:
                break
            at, best = p + n, n
            n += 1
        return at, best

    def propose(self, draft: list[int]) -> int | None:
        """The next draft token after the context and `draft`, or None when nothing matches."""
        c = self.cache
        if c is not None and c[0] == len(self.text) and tuple(draft[: len(c[1])]) == c[1]:
            extra, run = draft[len(c[1]):], c[2]
            if len(extra) < len(run) and list(run[: len(extra)]) == extra:
                return run[len(extra)]
        tb = self.token_bytes
        query = (bytes(self.text[-self.max_match:]) + b"".join(tb(t) for t in draft))[-self.max_match:]
        at, n = self.match(query)
        run: list[int] = []
        if n:
            chunk = bytes(self.text[at : at + self.run_bytes])
            cut = at + self.run_bytes < len(self.text)
            text = chunk.decode("utf-8", errors="ignore")
            if text:
                try:
                    run = list(self.encode(text))
                except (LLMQPError, ValueError):  # text the tokenizer refuses: no guess, never an error
                    run = []
                if cut:
                    run = run[:-1]
        self.cache = (len(self.text), tuple(draft), run)
        return run[0] if run else None


class Lookup:
    """The lookup proposer a request drafts from: a token n-gram of length >= 2 (the strongest evidence: the
    model has been copying token for token), else the text match, else a token 1-gram."""

    def __init__(self, context, token_bytes=None, encode=None):
        self.tokens = PromptLookup(context)
        self.text = TextLookup(context, token_bytes, encode) if token_bytes is not None and encode else None

    def extend(self, tokens) -> None:
        self.tokens.extend(tokens)
        if self.text is not None:
            self.text.extend(tokens)

    def propose(self, draft: list[int]) -> int | None:
        tail = self.tokens.context[-self.tokens.n_max :] + list(draft)
        t = self.tokens.propose(tail, n_min=2)
        if t is None and self.text is not None:
            t = self.text.propose(list(draft))
        return t if t is not None else self.tokens.propose(tail[-1:])
