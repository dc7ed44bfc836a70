"""The engine thread: the one owner of the `llmqp.Scheduler` (which is not thread-safe).

The asyncio front never touches the scheduler. It puts commands in a thread-safe inbox (`submit`,
`abort`, `stop`); the engine thread drains the inbox, calls `step()` while there is work (and blocks on
the inbox when there is none), and hands every event to the callback its request was submitted with —
the front's callback moves it onto the event loop with `loop.call_soon_threadsafe`."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Callable

from llmqp import FinishedEvent

log = logging.getLogger("llmqp.server")


@dataclasses.dataclass(frozen=True)
class Rejected:
    """The scheduler refused a request at `add_request` (an `llmqp.InvalidArgument`); nothing ran."""

    request_id: str
    exception: Exception


@dataclasses.dataclass(frozen=True)
class Crashed:
    """`step()` raised (a bug, not a user mistake): every request in flight ends with this, and the
    scheduler is replaced by a fresh one."""

    request_id: str
    exception: Exception


class EngineWorker:
    """Runs `scheduler_factory()` on its own thread. `deliver(event)` callbacks run on that thread and
    must not block. `num_running` / `num_waiting` are read by the front for admission and metrics (the
    waiting count includes submitted requests still in the inbox)."""

    def __init__(self, scheduler_factory: Callable[[], object], *,
                 on_step: Callable[["EngineWorker"], None] | None = None,
                 on_event: Callable[[object], None] | None = None):
        self._factory = scheduler_factory
        self._on_step = on_step
        self._on_event = on_event  # sees every event, also those of requests nobody listens to any more
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable] = {}
        self._queued = 0  # adds not yet taken from the inbox
        self._lock = threading.Lock()
        self._sched = None
        self.num_running = 0
        self.num_waiting = 0
        self._thread = threading.Thread(target=self._run, name="llmqp-engine", daemon=True)
        self._ready = threading.Event()
        self._stopped = threading.Event()

    # ------------------------------------------------------------ front side (any thread)
    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def submit(self, request: dict, request_id: str, deliver: Callable) -> None:
        with self._lock:
            self._queued += 1
        self._inbox.put(("add", request_id, request, deliver))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def pending(self) -> int:
        """Requests waiting for a slot, counting those still in the inbox."""
        return self._queued + self.num_waiting

    def stop(self, timeout: float | None = None) -> None:
        """Abort whatever is still queued or running (their callbacks get the abort events), then end the
        thread. Call after the front stopped taking requests."""
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        self._sched = self._factory()
        self._ready.set()
        stopping = False
        while True:
            idle = not self._sched.has_work()
            if idle and stopping:
                break
            try:
                command = self._inbox.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                stopping |= self._handle(command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if stopping:
                for rid in list(self._sinks):
                    self._sched.abort(rid)
            if self._sched.has_work():
                self._step()
            self._publish()

    def _handle(self, command) -> bool:
        kind = command[0]
        if kind == "stop":
            return True
        if kind == "abort":
            if command[1] in self._sinks:
                self._sched.abort(command[1])
            return False
        _, rid, request, deliver = command
        with self._lock:
            self._queued -= 1
        try:
            self._sched.add_request(request, request_id=rid)
        except Exception as e:  # InvalidArgument, or anything the scheduler refuses: this request only
            deliver(Rejected(rid, e))
            return False
        self._sinks[rid] = deliver
        return False

    def _step(self) -> None:
        try:
            events = self._sched.step()
        except Exception as e:
            log.exception("scheduler step failed; ending every request in flight")
            for rid, deliver in self._sinks.items():
                deliver(Crashed(rid, e))
            self._sinks.clear()
            self._sched = self._factory()
            return
        for event in events:
            if self._on_event is not None:
                self._on_event(event)
            deliver = self._sinks.get(event.request_id)
            if deliver is None:
                continue
            if isinstance(event, FinishedEvent):
                del self._sinks[event.request_id]
            deliver(event)

    def _publish(self) -> None:
        self.num_running = self._sched.num_running
        self.num_waiting = self._sched.num_waiting
        if self._on_step is not None:
            self._on_step(self)

