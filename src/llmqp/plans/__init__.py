"""Physical plans for one logical decoding step: score the allowed tokens, then sample among them.

Every plan returns logits over the *same* allowed ids in the *same* (sorted, padded) order, so the shared
sampler (`llmqp.sampling.select`) picks the same token whatever the plan:

- dense:  full LM head ``hidden @ unembed`` over the vocabulary, then the allowed ids are read out of it
          (equivalently: everything else masked to -inf).
- sparse: gather only the K allowed rows of the unembedding matrix and score those: O(K·d) not O(V·d).
- forced: one allowed token — no scoring at all (the engine feeds runs of forced tokens through one
          multi-token forward). It has no `score`: it is decided before any head runs.

K is padded to a few static buckets so each (plan, bucket) compiles once, in a fraction of a second: the
head is jitted apart from the trunk.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import sampling
from llmqp.model import transformer


class PlanKind(str, enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    FORCED = "forced"
    AUTO = "auto"


# Static K buckets: 8·4^i, then the vocabulary itself.
def k_buckets(vocab_size: int) -> list[int]:
    out, k = [], 8
    while k < vocab_size:
        out.append(k)
        k *= 4
    return out + [vocab_size]


def bucket_k(k: int, vocab_size: int) -> int:
    return next(b for b in k_buckets(vocab_size) if b >= k)


def pad_allowed(allowed_rows: list[np.ndarray], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad each row's sorted allowed ids to one bucket. Returns ids: (B, Kb) int32 (padding 0, a valid
    row index for the gather) and valid: (B, Kb) bool."""
    kb = bucket_k(max(len(a) for a in allowed_rows), vocab_size)
    ids = np.zeros((len(allowed_rows), kb), np.int32)
    valid = np.zeros((len(allowed_rows), kb), bool)
    for r, a in enumerate(allowed_rows):
        ids[r, : len(a)] = a
        valid[r, : len(a)] = True
    return ids, valid


class Plan(abc.ABC):
    kind: PlanKind

    @abc.abstractmethod
    def score(self, head: dict, hidden, ids):
        """hidden: (B, d) f32; ids: (B, K) int32 -> logits (B, K) f32. Traced inside `jit`."""


@dataclasses.dataclass(frozen=True)
class DensePlan(Plan):
    kind: PlanKind = PlanKind.DENSE

    def score(self, head, hidden, ids):
        full = transformer.dense_logits(head, hidden)  # (B, V)
        return jnp.take_along_axis(full, ids, axis=1)


@dataclasses.dataclass(frozen=True)
class SparsePlan(Plan):
    kind: PlanKind = PlanKind.SPARSE

    def score(self, head, hidden, ids):
        return transformer.sparse_logits(head, hidden, ids)


PLANS: dict[PlanKind, Plan] = {PlanKind.DENSE: DensePlan(), PlanKind.SPARSE: SparsePlan()}


@functools.partial(jax.jit, static_argnames=("plan", "greedy"))
def score_and_select(head, hidden, ids, valid, seed, step, temperature, top_k, top_p, *, plan: Plan,
                     greedy: bool):
    """Score the allowed ids with `plan` and choose one per row. head: {"unembed", "unembed_rows"}.
    Returns (index into ids: (B,) int32, logprob over the allowed set: (B,) f32)."""
    logits = plan.score(head, hidden, ids)
    return sampling.select(logits, ids, valid, seed, step, temperature, top_k, top_p, greedy=greedy)
