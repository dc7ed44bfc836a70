"""`Planner`: the learned policy of one (model, device, dtype), persisted as JSON under the cache
directory and reused across runs, plus what it learned in words (`describe`) and as a baked-in threshold
(`crossover_k`).

Files: ``cache_dir()/planner/<model>-<device>-<dtype>.json`` (unsafe characters replaced by ``_``; the
exact names are stored inside), and beside each a ``.lock`` file.

Concurrency: several engines — in one process or many — may share a state file. `save` takes an
exclusive `fcntl.flock` on the lock file, re-reads the file, and merges: what another engine wrote since
this one read the file is kept, and this engine's own updates are added on top (`merge_states`); the
result is written to a temporary file and moved into place with `os.replace`, so readers never see a
partial file and no update is lost. (Without `fcntl`, i.e. on Windows, the merge still runs but two
saves at the very same moment may race: the last one wins.)

A missing file is never an error: the planner starts from the roofline prior. A corrupt or foreign file
(not JSON, another format version or feature layout, written for another model/device/dtype) gives a
`UserWarning`, the planner starts from the prior, and the next `save` replaces the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmqp.model.loader import cache_dir
from llmqp.planner.context import StepContext, device_family, roofline_for
from llmqp.planner.policy import ARMS, BanditConfig, LinUCBPolicy, Policy, merge_states
from llmqp.plans import PlanKind, bucket_k, k_buckets

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module docstring
    fcntl = None

STATE_FORMAT = 2  # bump when the file layout changes; files of another format are replaced (with a warning)
DEFAULT_DTYPE = "float32"


def planner_dir() -> Path:
    return cache_dir() / "planner"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", name).strip("_") or "_"


def state_path(model_name: str, device_kind: str, dtype: str = DEFAULT_DTYPE) -> Path:
    return planner_dir() / f"{_safe(model_name)}-{_safe(device_kind)}-{_safe(dtype)}.json"


class _Unusable(ValueError):
    """A state file that exists but cannot be used: corrupt, another format, another key."""


def _read_state(path: Path, key: tuple[str, str, str]) -> dict | None:
    """The document at `path`, None when there is no file. Raises _Unusable (with the reason)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Unusable(f"cannot be read ({exc})") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise _Unusable(f"is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _Unusable("is not a JSON object")
    if doc.get("format") != STATE_FORMAT:
        raise _Unusable(f"has format {doc.get('format')!r}, this version reads format {STATE_FORMAT}")
    found = (doc.get("model"), doc.get("device"), doc.get("dtype"))
    if found != key:
        raise _Unusable(f"belongs to (model, device, dtype) = {found}, not {key}")
    if not isinstance(doc.get("state"), dict) or not isinstance(doc.get("config"), dict):
        raise _Unusable("has no state or config")
    return doc


def write_json_atomic(path: Path, doc) -> None:
    """Write `doc` as JSON to a temporary file beside `path`, then move it into place (readers never see a
    partial file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``<path>.lock`` for the duration of the block (a no-op without fcntl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class Planner(Policy):
    """A `LinUCBPolicy` bound to a (model, device, dtype) and its state file. Use `Planner.load`, call
    `choose`/`update` every scoring step, `save()` when a generation ends (it merges with what other
    engines saved meanwhile; see the module docstring).

    `policy` (a `LinUCBPolicy`) is public: experiments may swap in another `LinUCBPolicy` (a subclass
    that fixes or records its choices, as benchmarks/planner.py does); `save` persists its state.

    `update` ignores the first measurement of each (plan, batch, K bucket, union bucket) shape in this
    process: it includes XLA compilation (or a compile-cache load), tens to hundreds of ms that say
    nothing about the plan's speed."""

    def __init__(self, model_name: str, device_kind: str, *, dtype: str = DEFAULT_DTYPE,
                 config: BanditConfig = BanditConfig(), vocab_size: int | None = None,
                 hidden_size: int | None = None):
        """A fresh planner (roofline prior only); nothing is read or written."""
        self.model_name, self.device_kind, self.dtype = model_name, device_kind, dtype
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.policy = LinUCBPolicy(roofline_for(device_kind), config)
        self._shapes_seen: set[tuple] = set()  # per process: compiled executables do not persist in memory
        # What the file held when this planner last read or wrote it: save() merges relative to it.
        self._base_state = self.policy.state_dict()
        self._base_revision: str | None = None
        self._warned_unusable = False  # load() already said the file will be replaced

    @property
    def path(self) -> Path:
        return state_path(self.model_name, self.device_kind, self.dtype)

    @property
    def _key(self) -> tuple[str, str, str]:
        return (self.model_name, self.device_kind, self.dtype)

    @classmethod
    def load(cls, model_name: str, device_kind: str, *, dtype: str = DEFAULT_DTYPE,
             config: BanditConfig | None = None, vocab_size: int | None = None,
             hidden_size: int | None = None) -> "Planner":
        """The saved planner of (model, device, dtype), or a fresh one. `config` overrides the stored
        knobs (the learned state is kept); vocab/hidden sizes, when given, are what `describe` reports on.
        A corrupt or foreign state file gives a UserWarning and a fresh planner (never an error)."""
        fresh = cls(model_name, device_kind, dtype=dtype, config=config or BanditConfig(),
                    vocab_size=vocab_size, hidden_size=hidden_size)
        path = fresh.path
        try:
            doc = _read_state(path, fresh._key)
            if doc is None:
                return fresh
            planner = cls(model_name, device_kind, dtype=dtype, config=config or BanditConfig(**doc["config"]),
                          vocab_size=vocab_size or doc.get("vocab_size"),
                          hidden_size=hidden_size or doc.get("hidden_size"))
            planner.policy.load_state_dict(doc["state"])
        except (ValueError, KeyError, TypeError) as exc:  # _Unusable is a ValueError
            reason = f"it {exc}" if isinstance(exc, _Unusable) else f"its state is malformed ({exc!r})"
            warnings.warn(f"ignoring planner state {path}: {reason}; starting from the roofline prior "
                          "(the file is replaced at the next save)", stacklevel=2)
            fresh._warned_unusable = True
            return fresh
        planner._base_state = planner.policy.state_dict()
        planner._base_revision = doc.get("revision")
        return planner

    def save(self) -> Path:
        """Merge this planner's updates into the state file and write it atomically; returns the path.

        Under an exclusive lock: re-read the file; when another engine saved since this one last read or
        wrote it, add this planner's updates since then to that state (`merge_states`) and adopt the
        result in memory too. A corrupt or foreign file is replaced (with a UserWarning). Raises OSError
        when the cache directory is not writable."""
        path = self.path
        with _locked(path):
            own = self.policy.state_dict()
            try:
                current = _read_state(path, self._key)
            except _Unusable as exc:
                if not self._warned_unusable:
                    warnings.warn(f"replacing planner state {path}: it {exc}", stacklevel=2)
                current = None
            merged = own
            if current is not None and current.get("revision") != self._base_revision:
                try:
                    # validates shapes and values before anything is merged into this planner
                    LinUCBPolicy(self.policy.roofline, self.policy.config).load_state_dict(current["state"])
                except (ValueError, KeyError, TypeError) as exc:
                    if not self._warned_unusable:
                        warnings.warn(f"replacing planner state {path}: its state is malformed ({exc!r})",
                                      stacklevel=2)
                else:
                    merged = merge_states(current["state"], self._base_state, own, self.policy.config.discount)
                    self.policy.load_state_dict(merged)
            revision = uuid.uuid4().hex
            doc = {
                "format": STATE_FORMAT,
                "revision": revision,
                "model": self.model_name,
                "device": self.device_kind,
                "dtype": self.dtype,
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "config": dataclasses.asdict(self.policy.config),
                "state": merged,
            }
            write_json_atomic(path, doc)
            self._base_state, self._base_revision = merged, revision
            self._warned_unusable = False
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
            f"planner {self.model_name} on {self.device_kind}, {self.dtype} "
            f"({device_family(self.device_kind)} roofline prior)",
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
    """Every planner with a readable state file of this format, sorted by path."""
    planners = []
    for path in sorted(planner_dir().glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            key = (doc["model"], doc["device"], doc["dtype"])
            if doc.get("format") != STATE_FORMAT or path != state_path(*key):
                continue
            planners.append(Planner.load(*key[:2], dtype=key[2]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return planners


def reset(model_name: str | None = None, device_kind: str | None = None,
          dtype: str | None = None) -> list[Path]:
    """Delete the state files of the given model, device and/or dtype (None: any); returns the deleted
    paths. Files that cannot be read are matched by name only, and deleted when every filter is None.
    Lock files are left in place (another process may hold one)."""
    deleted = []
    for path in sorted(planner_dir().glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            model, device, kind = doc["model"], doc["device"], doc.get("dtype")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            model = device = kind = None
        if model is None:
            match = ((model_name is None or path.name.startswith(_safe(model_name) + "-"))
                     and (device_kind is None or f"-{_safe(device_kind)}-" in path.name)
                     and (dtype is None or path.name.endswith(f"-{_safe(dtype)}.json")))
        else:
            match = (model_name in (None, model)) and (device_kind in (None, device)) and (dtype in (None, kind))
        if match:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted
