"""The planner: a contextual bandit that picks the physical plan of each decoding step.

Per scoring step the engine builds a `StepContext` (K statistics, batch, vocabulary and hidden size),
asks `planner.choose(ctx, arms)` for one of the applicable plans, runs it, and reports the measured head
latency with `planner.update(ctx, arm, ms)`; at the end of a generation `planner.save()` persists what
was learned for the (model, device) under ``cache_dir()/planner``.

Exploration never changes outputs: every plan gives the same distribution over the same allowed ids, so
the planner's choices — exploratory or wrong — only move latency.
"""

from llmqp.planner.context import FEATURE_NAMES, ROOFLINES, Roofline, StepContext, device_family, roofline_for
from llmqp.planner.policy import ARMS, BanditConfig, LinUCBPolicy, Policy, RooflinePolicy
from llmqp.planner.store import Planner, planner_dir, reset, saved, state_path

__all__ = [
    "ARMS",
    "BanditConfig",
    "FEATURE_NAMES",
    "LinUCBPolicy",
    "Planner",
    "Policy",
    "ROOFLINES",
    "Roofline",
    "RooflinePolicy",
    "StepContext",
    "device_family",
    "planner_dir",
    "reset",
    "roofline_for",
    "saved",
    "state_path",
]
