"""`compile_constraint`: the cached entry point from a spec to a compiled constraint."""

from __future__ import annotations

import collections
import threading
import weakref

from llmqp.constraints.base import CompiledConstraint, ConstraintBackend, ConstraintSpec

CACHE_SIZE = 128  # compiled constraints kept per tokenizer (least recently used evicted)

_caches: "weakref.WeakKeyDictionary[object, collections.OrderedDict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def default_backend() -> ConstraintBackend:
    from llmqp.constraints.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend()


def compile_constraint(spec: ConstraintSpec, tokenizer, backend: ConstraintBackend | None = None) -> CompiledConstraint:
    """Compile `spec` for `tokenizer` (an `llmqp.model.tokenizer.Tokenizer`), or return the cached result.

    The cache is per tokenizer *object* (held weakly: it goes with the tokenizer) and keyed by
    (backend, spec); failures are not cached. Raises ConstraintError for a bad or unsupported spec."""
    backend = backend or default_backend()
    key = (backend, spec)
    with _lock:
        cache = _caches.get(tokenizer)
        if cache is None:
            cache = _caches[tokenizer] = collections.OrderedDict()
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    compiled = backend.compile(spec, tokenizer)  # outside the lock: compiles may take 100s of ms
    with _lock:
        cache[key] = compiled
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return compiled


def clear_cache() -> None:
    """Forget every compiled constraint (tokenizer tries stay cached on their tokenizers)."""
    with _lock:
        _caches.clear()
