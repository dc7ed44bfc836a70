"""End-to-end behaviour of `Engine` and the `llmqp` CLI on the real SmolLM2 model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import llmqp

pytestmark = pytest.mark.slow


def test_capital_of_france_mentions_paris(engine):
    r = engine.generate("What is the capital of France?", max_tokens=32)
    assert "Paris" in r.text
    assert r.finish_reason == "stop" and r.valid
    assert r.token_ids and all(0 <= t < engine.vocab_size for t in r.token_ids)
    assert len(r.logprobs) == len(r.token_ids) == len(r.steps)
    assert all(lp <= 0 for lp in r.logprobs)


def test_greedy_equals_argmax_of_engine_logits(engine):
    prompt = engine.prompt_ids("Name a fruit.")
    r = engine.generate("Name a fruit.", max_tokens=6)
    logits = engine.logits(prompt + r.token_ids[:-1])
    expected = logits[len(prompt) - 1 :].argmax(axis=1)
    assert r.token_ids == expected.tolist()
    # the reported log-prob is log-softmax over the whole vocabulary when unconstrained
    row = logits[len(prompt) - 1].astype(np.float64)
    lse = np.log(np.exp(row - row.max()).sum()) + row.max()
    assert r.logprobs[0] == pytest.approx(row[r.token_ids[0]] - lse, abs=1e-4)


def test_max_tokens_cuts_with_length(engine):
    r = engine.generate("Write a long story about a dragon.", max_tokens=5)
    assert len(r.token_ids) == 5 and r.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.95)
    a = engine.generate("Tell me about cats.", seed=1, **kw)
    b = engine.generate("Tell me about cats.", seed=1, **kw)
    outs = {tuple(engine.generate("Tell me about cats.", seed=s, **kw).token_ids) for s in range(2, 6)}
    assert a.token_ids == b.token_ids
    assert len(outs | {tuple(a.token_ids)}) > 1


def test_raw_prompt_skips_chat_template(engine):
    assert engine.prompt_ids("Hello", raw=True) == engine.tokenizer.encode("Hello")
    templated = engine.tokenizer.decode(engine.prompt_ids("Hello"), skip_special=False)
    assert templated.startswith("<|im_start|>system") and templated.endswith("<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert engine.tokenizer.decode(engine.prompt_ids(msgs), skip_special=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")


def test_stream_yields_the_generated_text(engine):
    gen = engine.stream("Count from one to five.", max_tokens=24)
    deltas = []
    while True:
        try:
            deltas.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert len(deltas) > 1 and "".join(deltas) == result.text


def test_batch_equals_unbatched(engine):
    requests = [
        llmqp.Request(prompt="What is the capital of France?", max_tokens=20),
        {"prompt": "Write a haiku about rain.", "max_tokens": 24, "temperature": 0.9, "seed": 3},
        {"prompt": "List three animals.", "max_tokens": 8},
        llmqp.Request(prompt="Say hi.", max_tokens=30, temperature=0.7, top_k=20, seed=11),
        {"prompt": "Why is the sky blue? Answer at length.", "max_tokens": 28},
    ]
    batched = engine.generate_batch(requests)
    for req, got in zip(requests, batched):
        req = llmqp.Request.coerce(req)
        alone = engine.generate(req.prompt, max_tokens=req.max_tokens, temperature=req.temperature,
                                top_k=req.top_k, seed=req.seed)
        assert got.token_ids == alone.token_ids
        assert got.finish_reason == alone.finish_reason
        assert np.allclose(got.logprobs, alone.logprobs, atol=1e-4)


def test_user_errors_raise_llmqp_errors(engine):
    with pytest.raises(llmqp.InvalidArgument, match="max_tokens"):
        engine.generate("hi", max_tokens=0)
    with pytest.raises(llmqp.InvalidArgument, match="plan"):
        engine.generate("hi", plan="fastest")
    with pytest.raises(llmqp.InvalidArgument, match="prompt"):
        engine.generate(42)
    with pytest.raises(llmqp.InvalidArgument, match="context"):
        engine.generate("hi", max_tokens=10**6)
    # generate_batch isolates each request: a bad one comes back as its own error result
    bad, good = engine.generate_batch([{"prompt": "hi", "colour": "red"}, {"prompt": "hi", "max_tokens": 2}])
    assert bad.finish_reason == "error" and "unknown request keys: colour" in bad.error and not bad.valid
    assert good.finish_reason == "length" and len(good.token_ids) == 2
    with pytest.raises(llmqp.InvalidArgument, match="list"):
        engine.generate_batch({"prompt": "hi"})
    with pytest.raises(llmqp.InvalidArgument, match="token ids"):
        engine.logits([engine.vocab_size])
    with pytest.raises(llmqp.ModelLoadError, match="no such file"):
        llmqp.Engine.from_pretrained("/nonexistent/model.gguf")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmqp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_cli_generate_and_info():
    r = _cli("generate", "What is the capital of France?", "--max-tokens", "16", "--trace")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "total:" in r.stderr and "finish_reason=stop" in r.stderr
    r = _cli("info")
    assert r.returncode == 0 and "49152" in r.stdout and "cache" in r.stdout


def test_cli_user_error_is_one_line_not_a_traceback():
    r = _cli("generate", "hi", "--temperature", "-1")
    assert r.returncode == 2
    assert r.stderr.strip() == "llmqp: error: temperature must be >= 0, got -1.0"
    r = _cli("generate", "hi", "--json-schema", "{not json")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid JSON" in r.stderr


def test_cli_planner_show_and_reset(tmp_path, monkeypatch):
    from llmqp.planner import Planner, StepContext
    from llmqp.plans import PlanKind

    monkeypatch.setenv("LLMQP_CACHE_DIR", str(tmp_path))
    env = dict(os.environ)
    planner = Planner.load("demo-model", "cpu", vocab_size=1000, hidden_size=64)
    ctx = StepContext(k_max=8, k_mean=8, k_union=8, batch_size=1, vocab_size=1000, hidden_size=64)
    planner.update(ctx, PlanKind.SPARSE, 0.5)
    path = planner.save()
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmqp.cli", "planner", *a], capture_output=True,
                                    text=True, env=env, timeout=120)
    shown = run("show")
    assert shown.returncode == 0 and "demo-model" in shown.stdout and "B=1" in shown.stdout
    assert run("reset", "--model", "other").stdout.startswith("removed 0")
    assert path.exists()
    assert run("reset").stdout.startswith("removed 1") and not path.exists()
    assert "no planner state" in run("show").stdout
