"""Choosing a token among the allowed ones — the one sampler every plan shares.

Inputs are logits over a row's allowed ids in one fixed order (sorted ids, padded to a bucket). The
random draw is Gumbel-max with noise keyed by (seed, step, *token id*), so a token's noise does not
depend on where it sits in the padded vector. Hence dense and sparse plans — which produce the same
allowed logits — pick the same token for the same seed.

Sampling pipeline (the order of transformers' warpers and vLLM's sampler):

1. restrict to the allowed set (padding and disallowed ids get probability 0);
2. divide the logits by the temperature;
3. top-k: keep exactly ``min(top_k, K)`` entries — the k largest scaled logits, ties at the cutoff broken
   by the *lower token id* (the rank order is "higher logit first, then lower id");
4. renormalise over those k entries, then top-p: keep the shortest prefix of that rank order whose
   renormalised mass reaches ``top_p`` (always at least one entry; ties again broken by lower id);
5. draw from the kept entries, proportionally to their scaled probabilities (Gumbel-max).

``temperature == 0`` skips 2–5: argmax, ties to the lowest id.

What the reported log-probability means: ``log p(token)`` under the f32 softmax of the **unscaled**
logits renormalised over the **allowed set** — temperature 1, no top-k / top-p — i.e. the model's own
distribution restricted to what the constraint allows. It is *not* the probability under the warped
distribution the token was drawn from, so it is the same whatever the temperature, top-k or top-p.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llmqp.errors import LLMQPError


class InvalidArgument(LLMQPError, ValueError):
    """A parameter value a user passed is out of range."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """temperature 0 means greedy (argmax; ties go to the lowest token id). top_k 0 and top_p 1.0 disable
    those filters. seed makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise InvalidArgument(f"top_k must be a non-negative integer, got {self.top_k}")
        if int(self.seed) != self.seed or not (0 <= self.seed < 2**32):
            raise InvalidArgument(f"seed must be an integer in [0, 2**32), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _token_noise(seed, step, ids):
    # Gumbel noise per (seed, step, token id): O(K) threefry hashes, independent of position.
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, minval=1e-10, maxval=1.0))(keys)
    return -jnp.log(-jnp.log(u))


def _select_row(logits, ids, valid, seed, step, temperature, top_k, top_p, greedy: bool):
    # logits, ids, valid: (K,) — one row. Returns (index into the row, log-prob over the allowed set).
    logits = jnp.where(valid, logits, -jnp.inf)
    logprobs = jax.nn.log_softmax(logits)
    greedy_index = jnp.argmax(logits).astype(jnp.int32)  # first maximum: ids are sorted, so the lowest id
    if greedy:  # static: every row is greedy, skip the noise entirely
        return greedy_index, logprobs[greedy_index]
    n_valid = valid.sum()
    scaled = jnp.where(valid, logits / jnp.maximum(temperature, 1e-6), -jnp.inf)
    # Rank order: higher scaled logit first, ties to the lower token id; padding (-inf) last.
    order = jnp.lexsort((ids, -scaled))  # (K,) positions, best first
    ordered = scaled[order]
    rank_range = jnp.arange(logits.shape[0])
    k = jnp.where(top_k > 0, jnp.minimum(top_k, n_valid), n_valid)
    in_top_k = rank_range < k
    # Renormalise over the top-k entries, then top-p on that distribution.
    probs_top_k = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf))
    mass_before = jnp.cumsum(probs_top_k) - probs_top_k
    in_top_p = (mass_before < top_p) | (top_p >= 1.0) | (rank_range == 0)
    keep_sorted = in_top_k & in_top_p & (rank_range < n_valid)
    keep = jnp.zeros_like(valid).at[order].set(keep_sorted)
    noisy = jnp.where(keep, scaled + _token_noise(seed, step, ids), -jnp.inf)
    index = jnp.where(temperature > 0, jnp.argmax(noisy).astype(jnp.int32), greedy_index)
    return index, logprobs[index]


@functools.partial(jax.jit, static_argnames=("greedy",))
def select(logits, ids, valid, seed, step, temperature, top_k, top_p, *, greedy: bool):
    """Batched token choice. logits: (B, K) f32; ids: (B, K) int32; valid: (B, K) bool; seed: (B,) uint32;
    step: (B,) int32; temperature, top_p: (B,) f32; top_k: (B,) int32.
    greedy (static) promises every row has temperature 0; otherwise rows with temperature 0 still take
    the argmax. Filters follow the module docstring: top-k (exactly k, ties to the lower id), renormalise,
    then top-p. Returns (index: (B,) int32 into K, logprob: (B,) f32 of that token under the temperature-1
    softmax over the allowed set — not the warped distribution it was drawn from)."""
    return jax.vmap(functools.partial(_select_row, greedy=greedy))(
        logits, ids, valid, seed, step, temperature, top_k, top_p)
