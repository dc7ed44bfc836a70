"""Prompts and result rules that a new user trips over: a template-less model, raw BOS, lone surrogates,
the `valid` rule for cut generations — on the tiny GGUF (seconds)."""

from __future__ import annotations

import pytest

import llmqp
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llmqp.Engine(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


def test_model_without_chat_template_needs_raw(tiny):
    assert not tiny.tokenizer.has_chat_template
    with pytest.raises(llmqp.ChatTemplateError, match="no chat template.*raw=True"):
        tiny.generate("hello", max_tokens=2)
    with pytest.raises(llmqp.ChatTemplateError):
        tiny.generate([{"role": "user", "content": "hello"}], max_tokens=2)
    assert tiny.generate("hello", raw=True, max_tokens=2).token_ids
    # in a batch the same mistake is that row's error result
    bad, good = tiny.generate_batch([{"prompt": "hello", "max_tokens": 2},
                                     {"prompt": "hello", "raw": True, "max_tokens": 2}])
    assert bad.finish_reason == "error" and "chat template" in bad.error and good.finish_reason == "length"


def test_raw_prompt_gets_bos_when_the_model_expects_one(tiny, monkeypatch):
    tk = tiny.tokenizer
    plain = tiny.prompt_ids("hello", raw=True)
    assert plain == tk.encode("hello")
    monkeypatch.setattr(tk, "bos_id", 1)
    monkeypatch.setattr(tk, "add_bos", True)
    assert tiny.prompt_ids("hello", raw=True) == [1] + plain


def test_lone_surrogate_is_a_prompt_error_not_a_type_error(tiny):
    with pytest.raises(llmqp.PromptError, match="surrogate"):
        tiny.generate("a\udcff", raw=True, max_tokens=2)
    assert isinstance(llmqp.PromptError("x"), llmqp.LLMQPError)
    with pytest.raises(llmqp.PromptError, match="empty"):
        tiny.generate("", raw=True, max_tokens=2)


def test_generation_cut_by_max_tokens_is_never_valid(tiny):
    r = tiny.generate("hello", raw=True, max_tokens=2)
    assert r.finish_reason == "length" and r.valid is False  # unconstrained too (round 1 said True)
    r = tiny.generate("hello", raw=True, max_tokens=2, regex="[a-z]{5,9}")
    assert r.finish_reason == "length" and not r.valid and r.value is None
    r = tiny.generate("hello", raw=True, max_tokens=40, choice=["yes", "no"])
    assert r.finish_reason == "stop" and r.valid and r.text in ("yes", "no")


def test_context_length_error(tiny):
    with pytest.raises(llmqp.ContextLengthError, match="context of 256 tokens"):
        tiny.generate("hello", raw=True, max_tokens=300)
    assert issubclass(llmqp.ContextLengthError, llmqp.InvalidArgument)


def test_fixed_plan_neither_loads_nor_saves_the_planner(tiny, tmp_path, monkeypatch):
    from llmqp.planner import state_path

    monkeypatch.setenv("LLMQP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiny, "_planner", None)
    r = tiny.generate("hello", raw=True, max_tokens=6, regex="[a-z]{1,6}", plan="sparse")
    assert r.token_ids and {s.plan for s in r.steps} <= {"sparse", "forced"}
    assert tiny._planner is None  # round 1 loaded it and taught it the fixed plan's latencies
    assert not state_path(tiny.config.name, tiny.device_kind, "float32").exists()
    tiny.generate("hello", raw=True, max_tokens=6, regex="[a-z]{1,6}")  # plan="auto" does use it
    assert tiny._planner is not None
