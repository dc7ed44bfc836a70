"""Count XLA compilations, by function name: the check that a new constraint reused a compiled loop.

    with CompileLog() as log:
        run_fused(engine, ids, tables, sampling_params, 64)
    log.count("fused_decode"), log.seconds("fused_decode")

JAX reports every backend compilation (a persistent-cache hit included: it still builds an
executable) as the monitoring event `/jax/core/compile/backend_compile_duration` with the jitted
function's name; a listener records them while the block runs. Not thread-aware: compilations made by
other threads during the block are counted too.
"""

from __future__ import annotations

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileLog:
    """A context manager recording (function name, seconds) of every XLA compilation while it is open."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []

    def _listener(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.events.append((str(kwargs.get("fun_name", "")), float(duration_secs)))

    def __enter__(self) -> "CompileLog":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)

    def count(self, name: str = "") -> int:
        """Compilations whose function name contains `name` (all of them for "")."""
        return sum(1 for fun, _ in self.events if name in fun)

    def seconds(self, name: str = "") -> float:
        return sum(s for fun, s in self.events if name in fun)
