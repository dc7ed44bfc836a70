"""Draft and verify: drafts never change outputs, the constraint never accepts a token it would not accept step
by step, rollback paths run (a proposer that is wrong at random positions), the draft planner learns and
persists, and results report drafted / accepted tokens.

The randomized identity cases run on a tiny random GGUF (seconds); the extraction case uses the real model
(marked slow)."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

import llmqp
from llmqp.core import drafts
from llmqp.core.drafts import Lookup, PromptLookup, TextLookup
from llmqp.planner.drafts import DRAFT_ARMS, DraftPlanner, context_key
from tiny_gguf import write_tiny_gguf

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 12},
                                           "c": {"enum": ["red", "green", "blue"]}},
          "required": ["a", "b", "c"]}
GRAMMAR = 'start: "(" item ("," item)* ")"\nitem: /[a-z]{1,5}/'
VARIANTS = [
    dict(),
    dict(regex="[a-z ]{4,40}"),
    dict(choice=["alpha beta", "gamma delta epsilon", "zeta"]),
    dict(json_schema=SCHEMA),
    dict(grammar=GRAMMAR),
    dict(temperature=0.9, seed=11),
    dict(json_schema=SCHEMA, temperature=1.0, seed=4),
    dict(regex="(ab|cd)+e", temperature=1.0, seed=3),
    dict(temperature=0.8, top_k=30, top_p=0.9, seed=5, stop=["e"]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llmqp.Engine(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context_length=4096))


@pytest.fixture
def wrong_drafts(monkeypatch):
    """A proposer that is wrong at random positions: half of its tokens are a random token of the context
    (often allowed, rarely what the model picks), so drafts are cut by the constraint, rejected in verification
    and rolled back at random places."""
    rng = random.Random(1234)
    real = Lookup.propose

    def propose(self, draft):
        t = real(self, draft)
        if t is None or rng.random() < 0.5:
            return rng.choice(self.tokens.context)
        return t

    monkeypatch.setattr(Lookup, "propose", propose)


def _requests(n: int, rng: random.Random, draft: str) -> list[llmqp.Request]:
    words = "the quick brown fox jumps over a lazy dog ( red , green ) and 12 more words alpha gamma".split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
        out.append(llmqp.Request(prompt=prompt, raw=True, max_tokens=rng.randint(4, 28), draft=draft,
                                 **VARIANTS[i % len(VARIANTS)]))
    return out


def _fields(r):
    return (r.token_ids, r.text, r.finish_reason, r.valid, r.value, r.error)


def _replay(engine, request: llmqp.Request, result) -> None:
    """Every output token through a fresh matcher: each one allowed where it was emitted."""
    kinds = request.constraint_kinds()
    if not kinds:
        return
    m = engine.constraint(**request.constraint_kw()).matcher()
    for t in result.token_ids:
        assert t in set(m.allowed().tolist())
        m.accept(t)
    if result.finish_reason == "stop" and not request.stop:
        assert m.can_stop()


def test_prompt_lookup_continues_the_longest_most_recent_ngram():
    ctx = [1, 2, 3, 9, 2, 3, 7, 5, 2, 3]
    look = PromptLookup(ctx)
    assert look.propose(ctx) == 7  # (2, 3) last seen before the end followed by 7
    assert look.propose([5, 1, 2, 3]) == 9  # the 3-gram (1, 2, 3) wins over the 2-gram
    assert look.propose([42]) is None
    look.extend([7])
    assert look.propose(look.context) == 5  # (3, 7) -> 5


class _Bytes:
    """A toy tokenizer: one token per word piece of VOCAB, bytes as written (a leading space is part of it)."""
    VOCAB = ["{", '"', ":", ",", " ", "Marie", " Marie", " Cur", "ie", " was", " born", " in", " 1867", "Text",
             " Warsaw", "Warsaw", "name", "}"]

    def token_bytes(self, i):
        return self.VOCAB[i].encode()

    def encode(self, text):
        out = []
        while text:  # greedy longest match, as a BPE would give here
            i = max((i for i, w in enumerate(self.VOCAB) if text.startswith(w)), key=lambda i: len(self.VOCAB[i]))
            out.append(i)
            text = text[len(self.VOCAB[i]):]
        return out


def test_text_lookup_continues_a_copy_whose_first_token_differs_from_the_prompts():
    tok = _Bytes()
    ids = lambda *words: [tok.VOCAB.index(w) for w in words]  # noqa: E731
    prompt = ids("Text", ":", " Marie", " Cur", "ie", " was", " born", " in", " 1867", " in", " Warsaw")
    out = ids("{", '"', "name", '"', ":", '"', "Marie")  # "Marie" here, " Marie" in the prompt
    ctx = prompt + out
    assert PromptLookup(ctx).propose(ctx) != ids(" Cur")[0]  # token ids: '"', 'Marie' never occurred
    look = TextLookup(ctx, tok.token_bytes, tok.encode)
    assert look.propose([]) == ids(" Cur")[0]
    assert look.propose(ids(" Cur")) == ids("ie")[0]  # served from the same continuation
    assert look.propose(ids(" Cur", "ie")) == ids(" was")[0]
    assert look.propose(ids(" Cur", "ie", " born")) == ids(" in")[0]  # left it: matched again (" born")
    # the last token of a continuation cut by run_bytes is never proposed (it may be half a word)
    short = TextLookup(ctx, tok.token_bytes, tok.encode, run_bytes=6)
    assert short.propose([]) == ids(" Cur")[0]
    assert short.cache[2] == ids(" Cur")  # " Curie" cut after 6 bytes: "ie" may be "ie..." in truth
    assert TextLookup(ids("Text", ":"), tok.token_bytes, tok.encode).propose([]) is None
    # the combined proposer: a token n-gram of length >= 2 first, else text, else a 1-gram
    both = Lookup(ctx, tok.token_bytes, tok.encode)
    assert both.propose([]) == ids(" Cur")[0]
    assert both.propose(ids(" Cur")) == ids("ie")[0]


def test_draft_planner_tries_every_arm_then_keeps_the_cheapest(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQP_CACHE_DIR", str(tmp_path))
    p = DraftPlanner("m", "cpu")
    key = context_key("lookup", "json_schema", 0.9, 1)
    cost = {0: 30.0, 1: 20.0, 3: 12.0, 7: 16.0}
    rng = random.Random(0)
    picks = []
    for _ in range(200):
        arm = p.choose(key)
        picks.append(arm)
        p.update(key, arm, cost[arm] * (1 + 0.05 * rng.random()))
    assert set(picks[:2 * len(DRAFT_ARMS)]) == set(DRAFT_ARMS)  # each arm tried first
    assert picks[-50:].count(3) > 40 and p.best(key) == 3
    p.save()
    q = DraftPlanner.load("m", "cpu")
    assert q.best(key) == 3
    q.path.write_text("not json")
    with pytest.warns(UserWarning):
        assert DraftPlanner.load("m", "cpu").best(key) is None


def test_draft_option_is_validated(tiny):
    with pytest.raises(llmqp.InvalidArgument, match="draft"):
        tiny.generate("x", raw=True, draft="always")


def test_drafts_never_change_outputs_at_batch_one(tiny, wrong_drafts):
    reqs = _requests(18, random.Random(7), "none")
    for r in reqs:
        off = tiny.generate_batch([r])[0]
        for mode in ("forced", "lookup", "auto"):
            on = tiny.generate_batch([dataclasses.replace(r, draft=mode)])[0]
            assert _fields(on) == _fields(off), (mode, r)
            np.testing.assert_allclose(on.logprobs, off.logprobs, atol=1e-4)
            _replay(tiny, r, on)
    # the wrong proposer made rollbacks happen
    on = [tiny.generate_batch([dataclasses.replace(r, draft="lookup")])[0] for r in reqs]
    assert sum(x.rejected_tokens for x in on) > 10 and sum(x.accepted_tokens for x in on) > 0


def test_drafts_never_change_outputs_in_a_scheduler_batch(tiny, wrong_drafts):
    rng = random.Random(3)
    base = _requests(14, rng, "none")
    alone = [tiny.generate_batch([r])[0] for r in base]
    for seed in range(2):
        mixed = [dataclasses.replace(r, draft=random.Random(seed * 100 + i).choice(["none", "forced", "lookup", "auto"]))
                 for i, r in enumerate(base)]
        sched = llmqp.Scheduler(tiny, max_slots=4)
        order = list(range(len(mixed)))
        random.Random(seed).shuffle(order)
        results, pending = {}, [(str(i), mixed[i]) for i in order]
        r2 = random.Random(seed)
        while pending or sched.has_work():
            while pending and (r2.random() < 0.4 or not sched.has_work()):
                rid, req = pending.pop(0)
                sched.add_request(req, request_id=rid)
            for e in sched.step():
                if isinstance(e, llmqp.FinishedEvent):
                    results[e.request_id] = e.result
        for i, a in enumerate(alone):
            assert _fields(results[str(i)]) == _fields(a), (seed, i)
            _replay(tiny, base[i], results[str(i)])


def test_streamed_text_with_drafts_equals_the_result(tiny):
    r = dict(prompt="the the the the the the the", raw=True, max_tokens=40, draft="lookup")
    chunks = []
    gen = tiny.stream(**r)
    try:
        while True:
            chunks.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert "".join(chunks) == result.text
    assert result.drafts and all(0 <= d.accepted <= d.drafted for d in result.drafts)
    assert sum(s.drafted for s in result.steps) == result.accepted_tokens


@pytest.mark.slow
def test_extraction_drafts_accept_copied_spans_with_identical_output(engine):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                               "city": {"type": "string"}},
              "required": ["name", "email", "city"]}
    prompt = ("Extract name, email and city as JSON from: 'Contact Margaret Hamilton-Smith at "
              "margaret.hamilton@apollo-guidance.example.org, she lives in Cambridge, Massachusetts.'")
    off = engine.generate(prompt, json_schema=schema, max_tokens=80, draft="none")
    on = engine.generate(prompt, json_schema=schema, max_tokens=80, draft="lookup")
    assert _fields(on) == _fields(off)
    assert on.accepted_tokens >= 5  # the email and the name are copied from the prompt
    json.loads(on.text)
    m = engine.constraint(json_schema=schema).matcher()
    for t in on.token_ids:
        m.accept(t)
    assert m.can_stop()


def test_lossy_margin_mode_is_opt_in_and_reports_what_it_did_not_verify(tiny):
    with pytest.raises(llmqp.InvalidArgument, match="amortize"):
        tiny.generate("x", raw=True, amortize="margin", draft="none")
    with pytest.raises(llmqp.InvalidArgument, match="amortize_lambda"):
        tiny.generate("x", raw=True, amortize="margin", amortize_lambda=2)
    prompt = "one two three four one two three four one two three four one two"
    exact = tiny.generate(prompt, raw=True, max_tokens=40, draft="lookup")
    assert exact.unverified_tokens == 0 and "unverified" not in {s.plan for s in exact.steps}
    lossy = tiny.generate(prompt, raw=True, max_tokens=40, draft="lookup", amortize="margin", amortize_tau=0.0)
    assert lossy.unverified_tokens > 0
    assert sum(s.plan == "unverified" for s in lossy.steps) == lossy.unverified_tokens
    checked = [d for d in lossy.drafts if d.checked]
    assert checked and lossy.disagreement_rate is not None and 0 <= lossy.disagreement_rate <= 1
    # an unreachable threshold never skips verification
    strict = tiny.generate(prompt, raw=True, max_tokens=40, draft="lookup", amortize="margin", amortize_tau=1e9)
    assert strict.unverified_tokens == 0 and strict.token_ids == exact.token_ids
