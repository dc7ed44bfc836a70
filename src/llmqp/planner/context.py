"""What the planner knows about a decoding step (`StepContext`) and what it assumes before measuring
anything (`Roofline`).

Features are physical quantities in fixed units — hundreds of MB of unembedding read, GFLOP of head
matmul — so one linear model per (model, device) reads naturally: coefficients are ms per 100 MB and ms
per GFLOP, and the roofline prior is just a guess at those coefficients.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from llmqp.plans import bucket_k

F32_BYTES = 4
MB100 = 1e8  # feature unit for bytes read: 100 MB
GFLOP = 1e9  # feature unit for head matmul work

# Layout of `StepContext.features()`; the policy picks each arm's columns out of it.
FEATURE_NAMES = (
    "bias",            # 1
    "batch/16",        # rows the head runs over, / 16
    "dense_100mb",     # V·d·4 bytes: the whole unembedding, read once for the batch
    "dense_gflop",     # 2·B·V·d
    "sparse_100mb",    # B·bucket(k_max)·d·4 bytes: every row gathers its (padded) allowed rows
    "union_100mb",     # bucket(k_union)·d·4 bytes: the union's rows, gathered once
    "union_gflop",     # 2·B·bucket(k_union)·d: the (B, U) matmul
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepContext:
    """One scoring step as the planner sees it. Counts are tokens; `batch_size` is the number of rows the
    head runs over (the padded batch, scoring or not). Not validated: it is built every decode step."""

    k_max: int         # largest allowed set among the scoring rows
    k_mean: float      # mean allowed-set size (reported; the padded gather does not depend on it)
    k_union: int       # size of the union of the rows' allowed sets (= k_max when batch_size == 1)
    batch_size: int
    vocab_size: int
    hidden_size: int
    device_kind: str = "cpu"

    @classmethod
    def from_allowed(cls, allowed_rows: Sequence[np.ndarray | None], *, batch_size: int | None = None,
                     vocab_size: int, hidden_size: int, device_kind: str = "cpu") -> "StepContext":
        """From the scoring rows' sorted allowed ids (None: unconstrained, all V allowed). The union size
        costs one O(V) boolean pass, ~10–50 µs; callers that already know it should build the context
        directly."""
        ks = [vocab_size if a is None else len(a) for a in allowed_rows]
        k_max = max(ks)
        if len(ks) == 1 or k_max == vocab_size:
            k_union = k_max
        else:
            seen = np.zeros(vocab_size, bool)
            for a in allowed_rows:
                seen[a] = True
            k_union = int(np.count_nonzero(seen))
        return cls(k_max=k_max, k_mean=float(np.mean(ks)), k_union=k_union,
                   batch_size=batch_size or len(ks), vocab_size=vocab_size, hidden_size=hidden_size,
                   device_kind=device_kind)

    @functools.cached_property
    def _features(self) -> np.ndarray:
        b, v, d = self.batch_size, self.vocab_size, self.hidden_size
        k_pad = bucket_k(max(self.k_max, 1), v)
        u_pad = bucket_k(max(self.k_union, 1), v)
        return np.array((
            1.0,
            b / 16,
            v * d * F32_BYTES / MB100,
            2.0 * b * v * d / GFLOP,
            b * k_pad * d * F32_BYTES / MB100,
            u_pad * d * F32_BYTES / MB100,
            2.0 * b * u_pad * d / GFLOP,
        ))

    def features(self) -> np.ndarray:
        """(len(FEATURE_NAMES),) f64, laid out as FEATURE_NAMES. K enters through the same static buckets
        the plans pad to (`llmqp.plans.bucket_k`), since that is what a plan really reads. Computed once
        per context (cached), so `choose` then `update` on one context pays for it once."""
        return self._features


@dataclasses.dataclass(frozen=True, kw_only=True)
class Roofline:
    """A device's assumed speeds: the prior the bandit starts from. Head time of a plan is modelled as
    overhead + bytes / bandwidth + flops / throughput; gathers of scattered rows pay `gather_penalty`
    times the streaming cost of the same bytes."""

    bandwidth_gbs: float
    gflops: float
    overhead_ms: float = 0.3
    gather_penalty: float = 1.5
    union_overhead_ms: float = 0.05  # the per-row position lookup into the union

    @property
    def ms_per_100mb(self) -> float:
        return MB100 / (self.bandwidth_gbs * 1e9) * 1e3

    @property
    def ms_per_gflop(self) -> float:
        return 1e3 / self.gflops


# CPU: measured effective dense-head bandwidth on 2 cores (113 MB in ~7 ms, DESIGN.md). GPU/TPU: round
# numbers for current HBM parts; the bandit corrects them within a few dozen steps.
ROOFLINES: dict[str, Roofline] = {
    "cpu": Roofline(bandwidth_gbs=16.0, gflops=100.0, overhead_ms=0.3),
    "gpu": Roofline(bandwidth_gbs=2000.0, gflops=50_000.0, overhead_ms=0.05, union_overhead_ms=0.01),
    "tpu": Roofline(bandwidth_gbs=800.0, gflops=100_000.0, overhead_ms=0.05, union_overhead_ms=0.01),
}

_GPU_WORDS = ("gpu", "cuda", "rocm", "nvidia", "h100", "h200", "a100", "metal")


def device_family(device_kind: str) -> str:
    """"cpu", "gpu" or "tpu" from a device string such as jax's `platform` or `device_kind`
    ("NVIDIA H100 80GB HBM3"). Unknown devices count as cpu: the most conservative prior."""
    kind = device_kind.lower()
    if "tpu" in kind:
        return "tpu"
    if any(word in kind for word in _GPU_WORDS):
        return "gpu"
    return "cpu"


def roofline_for(device_kind: str) -> Roofline:
    return ROOFLINES[device_family(device_kind)]
