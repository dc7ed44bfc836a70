"""`DraftPlanner`: how many tokens to draft at a step (`draft="auto"`), learned from measured latency.

Arms are draft lengths (0 = no draft, 1, 3, 7: with the token fed before them, windows of 2, 4, 8 positions;
a draft fills the power-of-two width of the forward it needs). The context is what the scheduler can observe before it
drafts: the proposer ("lookup"), the constraint kind, the row's recent acceptance rate (an exponential
average, in four buckets), the decode batch and the allowed-set size K of the last scored token (bucketed). The cost of a step is its wall time divided by
the tokens it emitted — latency per accepted token, the quantity drafts exist to lower. Per (context, arm)
the planner keeps a discounted mean and count and picks the arm with the lowest lower confidence bound
(UCB for costs); every arm is tried `min_tries` times first. Exploration never changes outputs (drafts are
verified), only speed.

Persisted like the plan planner, beside it: ``cache_dir()/planner/<model>-<device>-<dtype>.drafts.json``,
written atomically under the same kind of lock; a corrupt or foreign file gives a warning and a fresh start.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from llmqp.planner.store import _locked, state_path, write_json_atomic

DRAFT_ARMS = (0, 1, 3, 7)  # at least this many drafted tokens, filled up to the forward's power-of-two width
# With amortize="margin" (lossy, opt-in) the arms also include drafts taken without verification, written
# as negative lengths (-4: draft 4 tokens and emit them unverified).
LOSSY_ARMS = DRAFT_ARMS + (-1, -3, -7)
FORMAT = 1


def acceptance_bucket(rate: float) -> int:
    return min(3, int(rate * 4))


def k_bucket(k: int) -> str:
    """The allowed-set size of the last scored token, coarsely: forced-like, small, large."""
    return "k1" if k <= 1 else "k64" if k <= 64 else "k4k" if k <= 4096 else "kV"


def context_key(proposer: str, constraint: str, acceptance: float, batch: int, k: int = 0) -> str:
    return f"{proposer}|{constraint}|a{acceptance_bucket(acceptance)}|b{min(batch, 16)}|{k_bucket(k)}"


class DraftPlanner:
    """choose(key) -> draft length; update(key, arm, ms_per_token). See the module docstring."""

    def __init__(self, model_name: str, device_kind: str, dtype: str = "float32", *, min_tries: int = 2,
                 explore: float = 0.5, discount: float = 0.995):
        self.model_name, self.device_kind, self.dtype = model_name, device_kind, dtype
        self.min_tries, self.explore, self.discount = min_tries, explore, discount
        self.stats: dict[str, dict[str, list[float]]] = {}  # key -> arm -> [count, mean, sq mean]
        self._dirty: dict[str, dict[str, list[float]]] = {}

    @property
    def path(self) -> Path:
        base = state_path(self.model_name, self.device_kind, self.dtype)
        return base.with_name(base.stem + ".drafts.json")

    def choose(self, key: str, arms=DRAFT_ARMS) -> int:
        table = self.stats.get(key, {})
        for arm in arms:
            if table.get(str(arm), (0,))[0] < self.min_tries - 0.5:  # (counts are discounted)
                return arm
        total = sum(table[str(a)][0] for a in arms)

        def bound(arm):
            n, mean, sq = table[str(arm)]
            spread = math.sqrt(max(sq - mean * mean, 0.0)) + 0.05 * mean
            return mean - self.explore * spread * math.sqrt(math.log(total + 1) / n)
        return min(arms, key=bound)

    def choose_lossy(self, key: str, lam: float, arms=LOSSY_ARMS) -> int:
        """amortize="margin": minimise lam * latency + (1 - lam) * quality_loss, latency per token relative to
        arm 0 (no draft) in this context, quality_loss the measured rate at which unverified tokens disagree
        with exact decoding (0 for verified arms)."""
        table = self.stats.get(key, {})
        for arm in arms:
            if table.get(str(arm), (0,))[0] < self.min_tries - 0.5:
                return arm
        ref = max(table[str(0)][1], 1e-9)
        quality = self.stats.get(key + "|quality", {})

        def cost(arm):
            q = quality.get(str(arm), (0, 0.0))[1] if arm < 0 else 0.0
            return lam * table[str(arm)][1] / ref + (1 - lam) * q
        return min(arms, key=cost)

    def update_quality(self, key: str, arm: int, disagreement_rate: float) -> None:
        """A sampled check of an unverified draft: the share of its tokens exact decoding would not emit."""
        self.update(key + "|quality", arm, disagreement_rate)

    def update(self, key: str, arm: int, ms_per_token: float) -> None:
        if not (ms_per_token >= 0 and math.isfinite(ms_per_token)):
            return
        for table in (self.stats, self._dirty):
            entry = table.setdefault(key, {}).setdefault(str(arm), [0.0, 0.0, 0.0])
            n = entry[0] * self.discount + 1
            w = 1.0 / n
            entry[1] += w * (ms_per_token - entry[1])
            entry[2] += w * (ms_per_token * ms_per_token - entry[2])
            entry[0] = n

    def best(self, key: str) -> int | None:
        """The arm with the lowest measured mean in this context (None before any measurement)."""
        table = self.stats.get(key)
        if not table:
            return None
        return int(min(table, key=lambda a: table[a][1]))

    # ------------------------------------------------------------ persistence
    @classmethod
    def load(cls, model_name: str, device_kind: str, dtype: str = "float32") -> "DraftPlanner":
        planner = cls(model_name, device_kind, dtype)
        try:
            doc = json.loads(planner.path.read_text())
            if doc.get("format") != FORMAT or doc.get("key") != [model_name, device_kind, dtype]:
                raise ValueError("another format or model")
            planner.stats = {k: {a: [float(x) for x in v] for a, v in t.items()} for k, t in doc["stats"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"ignoring draft planner state {planner.path}: {exc}; starting fresh", stacklevel=2)
        return planner

    def save(self) -> Path | None:
        """Merge this process's updates into the file (other engines' updates are kept)."""
        if not self._dirty:
            return None
        path = self.path
        with _locked(path):
            current: dict = {}
            try:
                doc = json.loads(path.read_text())
                if doc.get("format") == FORMAT and doc.get("key") == [self.model_name, self.device_kind, self.dtype]:
                    current = doc["stats"]
            except (OSError, ValueError, KeyError, TypeError):
                current = {}
            for key, table in self._dirty.items():
                for arm, (n, mean, sq) in table.items():
                    old = current.setdefault(key, {}).get(arm)
                    if old is None:
                        current[key][arm] = [n, mean, sq]
                    else:
                        total = old[0] + n
                        current[key][arm] = [total, (old[0] * old[1] + n * mean) / total,
                                             (old[0] * old[2] + n * sq) / total]
            doc = {"format": FORMAT, "key": [self.model_name, self.device_kind, self.dtype], "stats": current}
            write_json_atomic(path, doc)
            self.stats = {k: {a: list(v) for a, v in t.items()} for k, t in current.items()}
            self._dirty = {}
        return path
