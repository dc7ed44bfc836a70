"""Physical plans for one logical decoding step: score the allowed tokens, then sample among them.

Every plan returns logits over the *same* allowed ids in the *same* (sorted, padded) order, so the shared
sampler (`llmqp.sampling.select`) picks the same token whatever the plan:

- dense:  full LM head ``hidden @ unembed`` over the vocabulary, then the allowed ids are read out of it
          (equivalently: everything else masked to -inf).
- sparse: gather only the K allowed rows of the unembedding matrix and score those: O(K·d) not O(V·d).
- sparse_union (batches): gather the union U of the rows' allowed ids once, score ``hidden @ rows[U].T``
          (B, U), then read each row's ids out of it — one gather instead of B.
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
    SPARSE_UNION = "sparse_union"
    FORCED = "forced"
    AUTO = "auto"


# Static K buckets: the decode spec's (8·4^i, then the vocabulary itself). Imported lazily: llmqp.core
# (the scheduler) imports this module.
def k_buckets(vocab_size: int) -> list[int]:
    from llmqp.core.spec import DEFAULT_SPEC

    return DEFAULT_SPEC.k_buckets(vocab_size)


def bucket_k(k: int, vocab_size: int) -> int:
    from llmqp.core.spec import DEFAULT_SPEC

    return DEFAULT_SPEC.bucket_k(k, vocab_size)


def union_inputs(allowed_rows: list[np.ndarray], ids: np.ndarray, vocab_size: int):
    """For sparse_union: the sorted union of the rows' allowed ids padded to a bucket (U,), and for every
    (row, slot) of `ids` its position in the union (B, K) (padding slots point at position 0)."""
    union = np.unique(np.concatenate(allowed_rows)).astype(np.int32)
    union_pad = np.zeros(bucket_k(len(union), vocab_size), np.int32)
    union_pad[: len(union)] = union
    positions = np.zeros(ids.shape, np.int32)
    for r, a in enumerate(allowed_rows):
        positions[r, : len(a)] = np.searchsorted(union, a)
    return union_pad, positions


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
    def score(self, head: dict, hidden, ids, union=None):
        """hidden: (B, d) f32; ids: (B, K) int32 -> logits (B, K) f32. Traced inside `jit`.
        union: (union_ids (U,), positions (B, K)) from `union_inputs`, used by sparse_union only."""


@dataclasses.dataclass(frozen=True)
class DensePlan(Plan):
    kind: PlanKind = PlanKind.DENSE

    def score(self, head, hidden, ids, union=None):
        full = transformer.dense_logits(head, hidden)  # (B, V)
        return jnp.take_along_axis(full, ids, axis=1)


@dataclasses.dataclass(frozen=True)
class SparsePlan(Plan):
    kind: PlanKind = PlanKind.SPARSE

    def score(self, head, hidden, ids, union=None):
        return transformer.sparse_logits(head, hidden, ids)


@dataclasses.dataclass(frozen=True)
class SparseUnionPlan(Plan):
    kind: PlanKind = PlanKind.SPARSE_UNION

    def score(self, head, hidden, ids, union=None):
        union_ids, positions = union
        rows = head["unembed_rows"][union_ids]  # (U, d)
        shared = (hidden.astype(rows.dtype) @ rows.T).astype(jnp.float32)  # (B, U)
        return jnp.take_along_axis(shared, positions, axis=1)


@dataclasses.dataclass(frozen=True)
class ShardedSparsePlan(Plan):
    """The sparse plan over a vocabulary split across a mesh (`llmqp.sharding`): each device gathers and
    scores only the allowed ids in its own vocabulary range; a psum combines them."""

    mesh: object = None
    kind: PlanKind = PlanKind.SPARSE

    def score(self, head, hidden, ids, union=None):
        from llmqp.sharding import sharded_sparse_logits

        return sharded_sparse_logits(head, hidden, ids, self.mesh)


@dataclasses.dataclass(frozen=True)
class ShardedDensePlan(Plan):
    """The dense plan over a vocabulary split across a mesh: every device scores its own columns; only the
    allowed (B, K) values are read out of the sharded (B, V) logits."""

    mesh: object = None
    kind: PlanKind = PlanKind.DENSE

    def score(self, head, hidden, ids, union=None):
        from llmqp.sharding import sharded_dense_logits

        return jnp.take_along_axis(sharded_dense_logits(head, hidden, self.mesh), ids, axis=1)


def sharded_plans(mesh) -> dict[PlanKind, Plan]:
    """The plans of an engine whose vocabulary is sharded over `mesh`."""
    return {PlanKind.DENSE: ShardedDensePlan(mesh), PlanKind.SPARSE: ShardedSparsePlan(mesh),
            PlanKind.SPARSE_UNION: SparseUnionPlan()}


PLANS: dict[PlanKind, Plan] = {PlanKind.DENSE: DensePlan(), PlanKind.SPARSE: SparsePlan(),
                               PlanKind.SPARSE_UNION: SparseUnionPlan()}


@functools.partial(jax.jit, static_argnames=("plan", "greedy"))
def score_and_select(head, hidden, ids, valid, seed, step, temperature, top_k, top_p, union=None, *,
                     plan: Plan, greedy: bool):
    """Score the allowed ids with `plan` and choose one per row. head: {"unembed", "unembed_rows"}.
    Returns (index into ids: (B,) int32, logprob over the allowed set: (B,) f32)."""
    logits = plan.score(head, hidden, ids, union)
    return sampling.select(logits, ids, valid, seed, step, temperature, top_k, top_p, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("plan", "greedy"))
def score_select_logits(head, hidden, ids, valid, seed, step, temperature, top_k, top_p, union=None, *,
                        plan: Plan, greedy: bool):
    """`score_and_select`, also returning the allowed logits (B, K) f32 (for reporting top log-probs)."""
    logits = plan.score(head, hidden, ids, union)
    index, logprob = sampling.select(logits, ids, valid, seed, step, temperature, top_k, top_p, greedy=greedy)
    return index, logprob, logits
