"""`Planner`: the learned policy of one (model, device), persisted as JSON under the cache directory and
reused across runs, plus what it learned in words (`describe`) and as a baked-in threshold (`crossover_k`).

Files: ``cache_dir()/planner/<model>-<device>.json`` (unsafe characters replaced by ``_``; the exact
names are stored inside). A missing, corrupt or outdated file is never an error: the planner starts
again from the roofline prior (a corrupt file also gives a warning).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmqp.model.loader import cache_dir
from llmqp.planner.context import StepContext, device_family, roofline_for
from llmqp.planner.policy import ARMS, BanditConfig, LinUCBPolicy, Policy
from llmqp.plans import PlanKind, bucket_k, k_buckets

STATE_FORMAT = 1  # bump when the file layout changes; older files are then ignored


def planner_dir() -> Path:
    return cache_dir() / "planner"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", name).strip("_") or "_"


def state_path(model_name: str, device_kind: str) -> Path:
    return planner_dir() / f"{_safe(model_name)}-{_safe(device_kind)}.json"


class Planner(Policy):
    """A `LinUCBPolicy` bound to a (model, device) and its state file. Use `Planner.load`, call
    `choose`/`update` every scoring step, `save()` when a generation ends.

    `update` ignores the first measurement of each (plan, batch, K bucket, union bucket) shape in this
    process: it includes XLA compilation (or a compile-cache load), tens to hundreds of ms that say
    nothing about the plan's speed."""

    def __init__(self, model_name: str, device_kind: str, *, config: BanditConfig = BanditConfig(),
                 vocab_size: int | None = None, hidden_size: int | None = None):
        """A fresh planner (roofline prior only); nothing is read or written."""
        self.model_name, self.device_kind = model_name, device_kind
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.policy = LinUCBPolicy(roofline_for(device_kind), config)
        self._shapes_seen: set[tuple] = set()  # per process: compiled executables do not persist in memory

    @property
    def path(self) -> Path:
        return state_path(self.model_name, self.device_kind)

    @classmethod
    def load(cls, model_name: str, device_kind: str, *, config: BanditConfig | None = None,
             vocab_size: int | None = None, hidden_size: int | None = None) -> "Planner":
        """The saved planner of (model, device), or a fresh one. `config` overrides the stored knobs
        (the learned state is kept); vocab/hidden sizes, when given, are what `describe` reports on."""
        fresh = cls(model_name, device_kind, config=config or BanditConfig(), vocab_size=vocab_size,
                    hidden_size=hidden_size)
        path = fresh.path
        if not path.is_file():
            return fresh
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != STATE_FORMAT:
                return fresh
            stored = BanditConfig(**doc["config"])
            planner = cls(model_name, device_kind, config=config or stored,
                          vocab_size=vocab_size or doc.get("vocab_size"),
                          hidden_size=hidden_size or doc.get("hidden_size"))
            planner.policy.load_state_dict(doc["state"])
            return planner
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"ignoring unreadable planner state {path}: {exc}", stacklevel=2)
            return fresh

    def save(self) -> Path:
        """Write the state atomically (a concurrent reader sees the old or the new file); returns the path."""
        doc = {
            "format": STATE_FORMAT,
            "model": self.model_name,
            "device": self.device_kind,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "config": dataclasses.asdict(self.policy.config),
            "state": self.policy.state_dict(),
        }
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # -- Policy, delegated ------------------------------------------------------------------------------

    def choose(self, ctx: StepContext, arms: Sequence[PlanKind]) -> PlanKind:
        return self.policy.choose(ctx, arms)

    def update(self, ctx: StepContext, arm: PlanKind, latency_ms: float) -> None:
        self.vocab_size, self.hidden_size = ctx.vocab_size, ctx.hidden_size
        v = ctx.vocab_size
        shape = (getattr(arm, "value", arm), ctx.batch_size, v, bucket_k(max(ctx.k_max, 1), v),
                 bucket_k(max(ctx.k_union, 1), v) if arm == PlanKind.SPARSE_UNION else 0)
        if shape not in self._shapes_seen:
            self._shapes_seen.add(shape)
            return
        self.policy.update(ctx, arm, latency_ms)

    def predict_ms(self, ctx: StepContext, arms: Sequence[PlanKind]) -> np.ndarray:
        return self.policy.predict_ms(ctx, arms)

    # -- what it learned --------------------------------------------------------------------------------

    def _context(self, k: int, union: int, batch: int, vocab: int, hidden: int) -> StepContext:
        return StepContext(k_max=k, k_mean=float(k), k_union=min(union, vocab), batch_size=batch,
                           vocab_size=vocab, hidden_size=hidden, device_kind=self.device_kind)

    def crossover_k(self, batch_size: int, vocab_size: int, hidden_size: int) -> int:
        """The K from which dense is predicted no slower than per-row sparse when every row allows K
        tokens: run sparse while K < crossover_k, dense from it on. vocab_size + 1 when sparse is
        predicted to win for every K. Exact for the planner's model: K enters only through the static
        buckets (`llmqp.plans.k_buckets`), so only bucket values are scanned."""
        arms = [PlanKind.DENSE, PlanKind.SPARSE]
        lower = 0  # largest K known to favour sparse
        for k in k_buckets(vocab_size):
            dense_ms, sparse_ms = self.predict_ms(self._context(k, k, batch_size, vocab_size, hidden_size), arms)
            if dense_ms <= sparse_ms:
                return lower + 1
            lower = k
        return vocab_size + 1

    def _best_by_k(self, batch: int, vocab: int, hidden: int, union_of) -> str:
        """'plan K ≤ a · plan K ≤ b · ...': the predicted best arm over the K buckets."""
        arms = [PlanKind.DENSE, PlanKind.SPARSE] + ([PlanKind.SPARSE_UNION] if batch > 1 else [])
        segments: list[list] = []  # [arm, last K]
        for k in k_buckets(vocab):
            pred = self.predict_ms(self._context(k, union_of(k), batch, vocab, hidden), arms)
            best = arms[int(np.argmin(pred))].value
            if segments and segments[-1][0] == best:
                segments[-1][1] = k
            else:
                segments.append([best, k])
        parts, lower = [], 0
        for arm, upper in segments:
            if lower == 0:
                parts.append(f"{arm} K ≤ {upper}")
            elif upper == vocab:
                parts.append(f"{arm} K > {lower}")
            else:
                parts.append(f"{arm} {lower} < K ≤ {upper}")
            lower = upper
        return " · ".join(parts)

    def describe(self, batch_sizes: Sequence[int] = (1, 4, 16)) -> str:
        """A few lines: observations per arm, noise, and for each batch size where the predicted best plan
        changes with K (rows sharing their allowed ids, and disjoint rows) and the sparse/dense crossover."""
        p = self.policy
        counts = ", ".join(f"{arm} {int(n)}" for arm, n in zip(ARMS, p.counts))
        lines = [
            f"planner {self.model_name} on {self.device_kind} ({device_family(self.device_kind)} roofline prior)",
            f"  state: {self.path}",
            f"  observations: {int(p.counts.sum())} ({counts}); timing noise ≈ {100 * p.sigma:.2g}%; "
            f"measured/roofline ≈ {p.scale:.2g}×; memory ≈ {1 / (1 - p.config.discount):.0f} steps",
        ]
        if not self.vocab_size or not self.hidden_size:
            lines.append("  (no step seen yet: vocabulary and hidden size unknown, no crossover to report)")
            return "\n".join(lines)
        v, d = self.vocab_size, self.hidden_size
        lines.append(f"  predicted best head plan by K, every row allowed K tokens (V={v}, d={d}):")
        for b in batch_sizes:
            if b == 1:
                lines.append(f"    {'B=1:':<20}{self._best_by_k(1, v, d, lambda k: k)}")
                continue
            lines.append(f"    {f'B={b}, shared ids:':<20}{self._best_by_k(b, v, d, lambda k: k)}")
            lines.append(f"    {f'B={b}, disjoint ids:':<20}{self._best_by_k(b, v, d, lambda k, b=b: b * k)}")
        crossings = ", ".join(f"B={b}: {self.crossover_k(b, v, d)}" for b in batch_sizes)
        lines.append(f"  per-row sparse beats dense while K < crossover: {crossings}")
        return "\n".join(lines)


def saved() -> list[Planner]:
    """Every planner with a readable state file, sorted by path."""
    planners = []
    for path in sorted(planner_dir().glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            planners.append(Planner.load(doc["model"], doc["device"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return planners


def reset(model_name: str | None = None, device_kind: str | None = None) -> list[Path]:
    """Delete the state files of the given model and/or device (None: any); returns the deleted paths.
    Files that cannot be read are matched by name only, and deleted when both filters are None."""
    deleted = []
    for path in sorted(planner_dir().glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            model, device = doc["model"], doc["device"]
        except (OSError, ValueError, KeyError, TypeError):
            model = device = None
        if model is None:
            match = ((model_name is None or path.name.startswith(_safe(model_name) + "-"))
                     and (device_kind is None or path.name.endswith("-" + _safe(device_kind) + ".json")))
        else:
            match = (model_name in (None, model)) and (device_kind in (None, device))
        if match:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted
