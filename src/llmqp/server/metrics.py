"""Prometheus metrics of one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                      3.0, 5.0, 10.0, 20.0, 60.0)
PLANS = ("dense", "sparse", "sparse_union", "forced", "drafted")


class Metrics:
    """requests running / waiting (set by the engine thread after every step), TTFT and inter-token
    latency as clients see them (s), output tokens by plan, constraint compile time (s), requests by
    finish reason, errors by type (the OpenAI error type or code of every error answer)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("llmqp_requests_running", "Requests holding a decode slot", registry=r)
        self.waiting = Gauge("llmqp_requests_waiting", "Requests queued for a slot", registry=r)
        self.ttft = Histogram("llmqp_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("llmqp_inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("llmqp_request_latency_seconds", "Request arrival to last token",
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tokens = Counter("llmqp_output_tokens", "Output tokens by the plan that produced them",
                              ["plan"], registry=r)
        self.compile_time = Histogram("llmqp_constraint_compile_seconds", "Constraint compile time (cache "
                                      "hits included)", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.finished = Counter("llmqp_requests_finished", "Finished engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter("llmqp_errors", "Error answers by type", ["type"], registry=r)
        self.draft_tokens = Counter("llmqp_draft_tokens", "Drafted tokens by verification outcome (accepted: "
                                    "emitted without a step of their own; rejected: rolled back)", ["result"],
                                    registry=r)
        for outcome in ("accepted", "rejected"):
            self.draft_tokens.labels(result=outcome)
        for plan in PLANS:
            self.tokens.labels(plan=plan)

    def render(self) -> bytes:
        return generate_latest(self.registry)
