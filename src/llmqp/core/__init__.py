"""The decode core: one spec of the decode rules, and the step-level scheduler every entry point drives."""

from llmqp.core.spec import DEFAULT_SPEC, DecodeSpec, FinishReason, pow2_at_least

__all__ = ["DEFAULT_SPEC", "DecodeSpec", "FinishReason", "pow2_at_least"]
