"""Planner policies: given a step's context and the applicable plans ("arms"), pick the plan expected to
run fastest, and learn from the latency it measured.

Exploration never changes outputs — every plan yields the same distribution over the same allowed ids
(see `llmqp.plans`) — so a wrong or exploratory choice only costs time, never correctness.

The learning policy is `LinUCBPolicy`: one Bayesian ridge regression of head latency (ms) on
arm-specific features, tied across arms by a common intercept and batch term, choosing the arm with the
lowest *optimistic* cost (prediction minus a confidence width). Data are discounted exponentially so it
follows drift: an arm left idle sees its confidence width grow back to the prior's, and is retried once
that width exceeds how much worse it looks.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from llmqp.planner.context import FEATURE_NAMES, Roofline, StepContext
from llmqp.plans import PlanKind

# The arms the planner learns. FORCED needs no choice (it runs no head at all); AUTO is not a plan.
ARMS: tuple[str, ...] = (PlanKind.DENSE.value, PlanKind.SPARSE.value, PlanKind.SPARSE_UNION.value)
_ARM_INDEX = {name: i for i, name in enumerate(ARMS)}  # PlanKind is a str enum: its members hash as values

# The prior's spread (see `prior_std`) and the noise assumed before any measurement.
RATE_SPREAD = 10.0  # ms-per-MB and ms-per-GFLOP rates: std = 10× the roofline value
NOISE_PRIOR = 0.05  # relative step-latency jitter
MIN_SIGMA = 1e-3    # relative noise floor: keeps the prior's precision (sigma²/std²) invertible
# Robustness against outliers (GC pauses, a stray compile) while little is known: one measurement moves
# log s by at most log(3) from its current value, and its residual counts as at most `clip_sigmas`
# predictive std, the parameter part of which is capped at _MAX_CLIP_LEVERAGE noise variances.
_LOG_MAX_STEP = math.log(3.0)
_MAX_CLIP_LEVERAGE = 8.0

# Model coordinates: (owner, feature). "shared" coordinates appear in every arm's feature vector, so what
# one arm measures about the common cost (sampling, transfer) moves every arm's prediction.
COORDS: tuple[tuple[str, str], ...] = (
    ("shared", "bias"), ("shared", "batch/16"),
    ("dense", "bias"), ("dense", "dense_100mb"), ("dense", "dense_gflop"),
    ("sparse", "bias"), ("sparse", "sparse_100mb"),
    ("sparse_union", "bias"), ("sparse_union", "union_100mb"), ("sparse_union", "union_gflop"),
)
DIM = len(COORDS)
# phi(x, arm) = x[_SRC[arm]] * _MASK[arm]: one gather builds the feature vector of any set of arms.
_SRC = np.array([[FEATURE_NAMES.index(f) for _, f in COORDS] for _ in ARMS])  # (n_arms, DIM)
_MASK = np.array([[owner in ("shared", arm) for owner, _ in COORDS] for arm in ARMS], float)
_SELECT = np.zeros((len(ARMS), DIM, len(FEATURE_NAMES)))  # phi = _SELECT[arm] @ x
for _a in range(len(ARMS)):
    _SELECT[_a, np.arange(DIM), _SRC[_a]] = _MASK[_a]
# choose() needs, per arm, coef_a = P_aᵀ theta (n_features,) and Q_a = P_aᵀ A⁻¹ P_a (n_features, n_features)
# with P_a = _SELECT[a]. Both are linear in (A⁻¹, theta): one constant matrix maps them to the stacked
# [Q_0 rows; Q_1 rows; ...; coef rows] that choose() multiplies by x once.
_NF = len(FEATURE_NAMES)
_N_QUAD_ROWS = len(ARMS) * _NF
_STACK_MAP = np.zeros((len(ARMS) * _NF * _NF + len(ARMS) * _NF, DIM * DIM + DIM))
_STACK_MAP[: len(ARMS) * _NF * _NF, : DIM * DIM] = np.einsum(
    "adf,aeg->afgde", _SELECT, _SELECT).reshape(len(ARMS) * _NF * _NF, DIM * DIM)
_STACK_MAP[len(ARMS) * _NF * _NF:, DIM * DIM:] = _SELECT.transpose(0, 2, 1).reshape(len(ARMS) * _NF, DIM)


def arm_features(ctx: StepContext, arm_idx: np.ndarray | int) -> np.ndarray:
    """(len(arm_idx), DIM) — or (DIM,) for one int — the model's feature vectors of the given arms."""
    return ctx.features()[_SRC[arm_idx]] * _MASK[arm_idx]


def prior_mean(roofline: Roofline) -> np.ndarray:
    """(DIM,) coefficients that make `arm_features @ prior_mean` the roofline head time in ms."""
    per_mb, per_gflop = roofline.ms_per_100mb, roofline.ms_per_gflop
    gathered_per_mb = roofline.gather_penalty * per_mb + 0.05 * per_gflop  # 0.5 flop per gathered byte
    theta = {
        ("shared", "bias"): roofline.overhead_ms,
        ("dense", "dense_100mb"): per_mb,
        ("dense", "dense_gflop"): per_gflop,
        ("sparse", "sparse_100mb"): gathered_per_mb,
        ("sparse_union", "bias"): roofline.union_overhead_ms,
        ("sparse_union", "union_100mb"): roofline.gather_penalty * per_mb,
        ("sparse_union", "union_gflop"): per_gflop,
    }
    return np.array([theta.get(c, 0.0) for c in COORDS])


def prior_std(roofline: Roofline) -> np.ndarray:
    """(DIM,) how far (ms per feature unit) each roofline coefficient may be off: rates by RATE_SPREAD×
    their value (a roofline can misjudge how bytes and flops trade off on a device by that much; the
    device's overall speed is corrected separately), arm intercepts by the dispatch overhead, the common
    intercept by 10× that (it also carries sampling and transfer costs the roofline ignores, and every
    arm's measurements inform it)."""
    mean = prior_mean(roofline)
    std = np.array([RATE_SPREAD * mean[j] if feature != "bias" else roofline.overhead_ms
                    for j, (_, feature) in enumerate(COORDS)])
    std[COORDS.index(("shared", "bias"))] = 10 * roofline.overhead_ms
    std[COORDS.index(("shared", "batch/16"))] = roofline.overhead_ms
    return std


def _arm_key(arm) -> str | None:
    """The arm's value ("dense", ...); None for FORCED. Raises ValueError for AUTO or unknown arms."""
    value = getattr(arm, "value", arm)
    if value == PlanKind.FORCED.value:
        return None
    if value not in _ARM_INDEX:
        raise ValueError(f"the planner cannot choose plan {value!r}; arms are {', '.join(ARMS)} (and forced)")
    return value


# State fields that are discounted sums over observations: a process that applied n updates since it
# read a state `base` holds g^n·base + (its own discounted data).
_DISCOUNTED_SUMS = ("a_data", "b_data", "noise_sum", "noise_weight", "log_scale_sum", "log_scale_weight", "recent")


def merge_states(current: dict, base: dict, own: dict, discount: float) -> dict:
    """Merge two `LinUCBPolicy.state_dict()`s that grew from a common ancestor.

    `base` is the state this process read (or last wrote), `own` the state it holds now (n updates
    later), `current` what another process wrote meanwhile. The result is ``g^n·current + (own − g^n·base)``
    for the discounted sums and ``current + (own − base)`` for the counts: exactly what one policy would
    hold had it applied the other process's updates first and then this one's (the robust clipping of
    each residual aside, which depends on the state at the time). Positive semi-definite whatever
    `current` is, since both terms are. RNG state: `own`'s."""
    n = int(np.sum(own["counts"]) - np.sum(base["counts"]))
    decay = discount ** max(n, 0)
    merged = dict(own)
    for key in _DISCOUNTED_SUMS:
        cur, old, mine = (np.asarray(d[key], float) for d in (current, base, own))
        value = decay * cur + (mine - decay * old)
        merged[key] = value.tolist() if value.ndim else float(value)
    merged["counts"] = (np.asarray(current["counts"], np.int64) + np.asarray(own["counts"], np.int64)
                        - np.asarray(base["counts"], np.int64)).clip(min=0).tolist()
    return merged


class Policy(abc.ABC):
    """Chooses a plan per step and learns from measured latencies. `arms` are the plans applicable to the
    step (the caller decides applicability); `choose` returns one of those very objects."""

    @abc.abstractmethod
    def choose(self, ctx: StepContext, arms: Sequence[PlanKind]) -> PlanKind:
        """The arm to run. FORCED, when offered, always wins (no head at all). Raises ValueError for AUTO,
        an unknown arm, or no arms. Must be cheap: it runs every decode step."""

    @abc.abstractmethod
    def update(self, ctx: StepContext, arm: PlanKind, latency_ms: float) -> None:
        """Record that `arm` took `latency_ms` (head time; ms) on `ctx`. FORCED and non-finite latencies
        are ignored."""

    @abc.abstractmethod
    def predict_ms(self, ctx: StepContext, arms: Sequence[PlanKind]) -> np.ndarray:
        """(len(arms),) predicted head latency in ms — the point estimate, no exploration."""


@functools.lru_cache(maxsize=64)
def _resolve_arms(arms: tuple) -> tuple[int | None, np.ndarray | None]:
    """(the position in `arms` of the arm to return without deciding — FORCED, or the only arm — or None)
    and the indices into ARMS of the arms to decide among. Cached: the engine offers the same few arm
    lists over and over."""
    if not arms:
        raise ValueError("choose() needs at least one applicable plan")
    keys = [_arm_key(a) for a in arms]
    if None in keys:
        return keys.index(None), None
    if len(arms) == 1:
        return 0, None
    return None, np.array([_ARM_INDEX[k] for k in keys])


def _learnable_indices(arms: Sequence[PlanKind]) -> np.ndarray:
    keys = [_arm_key(a) for a in arms]
    if None in keys:
        raise ValueError("forced steps run no head: there is no latency to predict")
    return np.array([_ARM_INDEX[k] for k in keys], dtype=np.intp)


@dataclasses.dataclass(frozen=True)
class RooflinePolicy(Policy):
    """The prior alone: the plan with the fewest modelled milliseconds. Learns nothing."""

    roofline: Roofline

    def choose(self, ctx, arms):
        fixed, idx = _resolve_arms(tuple(arms))
        if fixed is not None:
            return arms[fixed]
        return arms[int(np.argmin(arm_features(ctx, idx) @ prior_mean(self.roofline)))]

    def update(self, ctx, arm, latency_ms):
        pass  # nothing to learn: the roofline is fixed

    def predict_ms(self, ctx, arms):
        idx = _learnable_indices(arms)
        return arm_features(ctx, idx) @ prior_mean(self.roofline)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BanditConfig:
    """Knobs of `LinUCBPolicy`. Hashable; stored with the learned state."""

    discount: float = 0.98      # per observed step: data from 1/(1-discount) = 50 steps ago weighs 1/e
    alpha: float = 1.0          # confidence width, in noise standard deviations
    probe_rate: float = 0.0     # chance per step of a uniformly drawn non-greedy arm; off by default: the
                                # discounted data already widens an idle arm's bounds back to the prior
    prior_weight: float = 1.0   # scales the prior's precision: 1 = the roofline is trusted to `prior_std`
    max_optimism: float = 5.0   # never hope an arm runs more than this many times faster than predicted:
                                # the Gaussian prior's wide tails would otherwise try a 10x-worse arm
    clip_sigmas: float = 5.0    # residuals beyond this many predictive std (GC pauses...) are clipped
    seed: int = 0


class LinUCBPolicy(Policy):
    """Discounted linear UCB for cost minimisation, warm-started from a roofline prior.

    Model: latency_ms = phi(ctx, arm)·theta + noise, the noise *relative*: its std is sigma·w with
    w = max(predicted ms, s·overhead), since timing jitter grows with the time measured (a 40 ms step
    jitters by more than a 0.5 ms one). Weighted ridge posterior theta ~ N(A⁻¹b, sigma²A⁻¹),
    A = sigma²·diag(1/(s·prior_std)²) + sum_t g^(T-t) phi_t phi_tᵀ / w_t², b likewise around the prior
    mean s·theta0. The prior never decays; the data do (g = `discount`), so an idle arm's bounds widen
    back to the prior's and it is retried when the world may have changed.

    Keeping the prior honest: its spread is wide (rates ±10×, intercepts ± the dispatch overhead); the
    common intercept's is wider still, so the first measurement of any arm calibrates the level of all of
    them while the roofline's *differences* between arms stand until measured; and s, the device's
    measured/roofline speed ratio (discounted geometric mean), rescales the prior, so a device the
    roofline misjudges by a constant factor costs a few steps, not hundreds.

    sigma: discounted RMS of relative predictive residuals, each divided by its predictive variance factor
    so early miscalibration does not pass for noise. Residuals beyond `clip_sigmas` predictive std are
    clipped before they enter the regression (GC pauses, a stray compile).

    Choice: argmin over arms of max(pred − alpha·sigma·sqrt(phiᵀA⁻¹phi), pred / max_optimism); with
    probability `probe_rate` (0 by default) a uniformly drawn other arm. Deterministic given the config's
    seed and the call sequence. Cost: `choose` ~10–20 µs of small numpy ops; `update` one 10×10 inverse.
    """

    def __init__(self, roofline: Roofline, config: BanditConfig = BanditConfig()):
        self.roofline, self.config = roofline, config
        self.theta0 = prior_mean(roofline)
        # theta's prior covariance sigma²·A0⁻¹ must stay diag((s·prior_std)²) in ms whatever sigma and s
        # are: A0 is rebuilt from them on every refresh.
        self._prior_precision = config.prior_weight / prior_std(roofline) ** 2
        self.a_data = np.zeros((DIM, DIM))
        self.b_data = np.zeros(DIM)
        # relative noise variance: discounted mean of squared relative residuals, seeded with 3 pseudo-
        # residuals at NOISE_PRIOR
        self.noise_sum = 3.0 * NOISE_PRIOR**2
        self.noise_weight = 3.0
        self.log_scale_sum = 0.0      # log s: discounted mean of log(measured / roofline), ...
        self.log_scale_weight = 1.0   # ... with one pseudo-observation at s = 1
        self.counts = np.zeros(len(ARMS), np.int64)   # observations per arm, ever
        self.recent = np.zeros(len(ARMS))             # discounted observations per arm
        self.rng = np.random.default_rng(config.seed)
        self._refresh()

    # -- the per-step API -------------------------------------------------------------------------------

    def choose(self, ctx, arms):
        fixed, idx = _resolve_arms(tuple(arms))
        if fixed is not None:
            return arms[fixed]
        x = ctx.features()
        # In feature space, all arms at once: prediction coef_a·x and squared width xᵀ Q_a x (see _refresh).
        y = self._stacked @ x  # (n_arms·n_features + n_arms,)
        predicted = y[_N_QUAD_ROWS:]
        width = np.sqrt(y[:_N_QUAD_ROWS].reshape(len(ARMS), _NF) @ x)
        optimistic = np.maximum(predicted - self._alpha_sigma * width, predicted * self._min_fraction)
        best = int(optimistic[idx].argmin())
        if self.config.probe_rate and self.rng.random() < self.config.probe_rate:
            other = int(self.rng.integers(len(idx) - 1))
            best = other + (other >= best)
        return arms[best]

    def update(self, ctx, arm, latency_ms):
        key = _arm_key(arm)
        if key is None or not math.isfinite(latency_ms):
            return
        i = _ARM_INDEX[key]
        phi = arm_features(ctx, i)
        predicted = float(phi @ self.theta)
        weight = max(predicted, self.scale * self.roofline.overhead_ms)  # the noise's scale here, ms
        phi_w = phi / weight
        leverage = float(phi_w @ self.a_inv @ phi_w)  # parameter variance of this prediction / noise variance
        limit = self.config.clip_sigmas * self.sigma * math.sqrt(1.0 + min(leverage, _MAX_CLIP_LEVERAGE))
        residual = min(max((latency_ms - predicted) / weight, -limit), limit)  # relative
        g = self.config.discount
        self.noise_sum = g * self.noise_sum + residual * residual / (1.0 + leverage)
        self.noise_weight = g * self.noise_weight + 1.0
        log_scale = self.log_scale_sum / self.log_scale_weight
        log_ratio = math.log(max(latency_ms, 1e-6) / float(phi @ self.theta0))
        log_ratio = min(max(log_ratio, log_scale - _LOG_MAX_STEP), log_scale + _LOG_MAX_STEP)
        self.log_scale_sum = g * self.log_scale_sum + log_ratio
        self.log_scale_weight = g * self.log_scale_weight + 1.0
        self.a_data *= g
        self.a_data += np.outer(phi_w, phi_w)
        self.b_data *= g
        self.b_data += phi_w * (predicted / weight + residual)
        self.counts[i] += 1
        self.recent *= g
        self.recent[i] += 1.0
        self._refresh()

    def predict_ms(self, ctx, arms):
        idx = _learnable_indices(arms)
        return arm_features(ctx, idx) @ self.theta

    # -- state ------------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        self.sigma = max(math.sqrt(self.noise_sum / self.noise_weight), MIN_SIGMA)
        self.scale = math.exp(self.log_scale_sum / self.log_scale_weight)
        a0 = (self.sigma / self.scale) ** 2 * self._prior_precision  # (DIM,) the prior's diagonal of A
        a = self.a_data.copy()
        a.flat[:: DIM + 1] += a0
        self.a_inv = np.linalg.inv(a)
        self.theta = self.a_inv @ (a0 * self.scale * self.theta0 + self.b_data)
        stacked = _STACK_MAP @ np.concatenate([self.a_inv.ravel(), self.theta])
        self._stacked = stacked.reshape(-1, _NF)  # (n_arms·n_features + n_arms, n_features)
        self._alpha_sigma = self.config.alpha * self.sigma
        self._min_fraction = 1.0 / self.config.max_optimism

    def state_dict(self) -> dict:
        """JSON-ready learned state (config and roofline are stored by the caller)."""
        return {
            "coords": [list(c) for c in COORDS],
            "arms": list(ARMS),
            "a_data": self.a_data.tolist(),
            "b_data": self.b_data.tolist(),
            "noise_sum": self.noise_sum,
            "noise_weight": self.noise_weight,
            "log_scale_sum": self.log_scale_sum,
            "log_scale_weight": self.log_scale_weight,
            "counts": self.counts.tolist(),
            "recent": self.recent.tolist(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output. Raises ValueError (state left untouched) when it was written for
        another feature layout or is malformed."""
        if state.get("coords") != [list(c) for c in COORDS] or state.get("arms") != list(ARMS):
            raise ValueError("planner state has another feature layout")
        a_data = np.asarray(state["a_data"], float)
        b_data = np.asarray(state["b_data"], float)
        counts = np.asarray(state["counts"], np.int64)
        recent = np.asarray(state["recent"], float)
        if (a_data.shape != (DIM, DIM) or b_data.shape != (DIM,) or counts.shape != (len(ARMS),)
                or recent.shape != (len(ARMS),) or not np.all(np.isfinite(a_data))
                or not np.all(np.isfinite(b_data))):
            raise ValueError("planner state has wrong shapes or non-finite values")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        noise_sum, noise_weight = float(state["noise_sum"]), float(state["noise_weight"])
        log_scale_sum, log_scale_weight = float(state["log_scale_sum"]), float(state["log_scale_weight"])
        if not (noise_sum > 0 and noise_weight > 0 and log_scale_weight > 0 and math.isfinite(log_scale_sum)):
            raise ValueError("planner state has a bad noise or scale estimate")
        self.a_data, self.b_data, self.counts, self.recent, self.rng = a_data, b_data, counts, recent, rng
        self.noise_sum, self.noise_weight = noise_sum, noise_weight
        self.log_scale_sum, self.log_scale_weight = log_scale_sum, log_scale_weight
        self._refresh()
