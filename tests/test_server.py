"""`llmqp serve`: one real server per module (the CLI in a subprocess, on a loopback port), driven by the
real `openai` client and raw HTTP. Small max_tokens and few requests keep the module short."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"
MAX_WAITING = 24
MAX_BATCH = 8
COMPILE_TIMEOUT_S = 10.0

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                   "required": ["tz"]}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`create_app` on the session's engine, served by uvicorn on a loopback port from a thread (the engine
    is shared with the tests, which only call it while the server is idle)."""

    def __init__(self, engine, **config):
        import uvicorn

        from llmqp.server import ServerConfig, create_app

        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = dict(dict(api_key=KEY, max_batch=MAX_BATCH, max_waiting=MAX_WAITING,
                           compile_timeout_s=COMPILE_TIMEOUT_S), **config)
        self.app = create_app(ServerConfig(port=self.port, **config), engine=engine)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("server did not become healthy")
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if (m["llmqp_requests_running"] == 0 and m["llmqp_requests_waiting"] == 0) or time.time() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> None:
        """What SIGINT/SIGTERM do in `llmqp serve` (uvicorn's signal handler sets should_exit)."""
        self.uvicorn.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(engine):
    s = Server(engine)
    # Warm up: the JIT shapes, and llguidance's tokenizer tables (the first compile builds them, ~2 s),
    # so that no test below trips --compile-timeout by accident.
    s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0, extra_body={"guided_regex": "[a-z ]{1,8}"})
    yield s
    s.stop()


def chat(server, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", [{"role": "user", "content": "Say hello."}])
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return server.client.chat.completions.create(**kw)


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return server.http.post(path, content=data, headers={"Content-Type": "application/json"}, **kw)


# ---------------------------------------------------------------------- health, models, auth
@pytest.mark.slow
def test_cli_serve_health_models_and_sigterm(tmp_path):
    """`llmqp serve` itself: /health answers 503 while the model loads, then 200 (no key needed); the key
    guards /v1/models; SIGTERM shuts down cleanly (uvicorn re-raises the signal once shutdown is complete, so
    the status is -SIGTERM; no traceback)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "llmqp.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=dict(os.environ, LLMQP_API_KEY=KEY), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and 200 not in seen:
            assert proc.poll() is None, proc.stdout.read()
            try:
                seen.append(httpx.get(base + "/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert seen and seen[0] == 503 and seen[-1] == 200 and set(seen) == {503, 200}
        assert httpx.get(base + "/v1/models").status_code == 401
        models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()


@pytest.mark.slow
def test_cli_serve_bad_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmqp.cli", "serve", "--model", str(tmp_path / "none.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("llmqp: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_warm_up_compiles_every_prefill_shape_before_health(tmp_path, caplog):
    """`llmqp serve --warm-up`: the flag reaches the config, and the server compiles every prefill shape
    (`Scheduler.warm_up`) before /health answers 200 (a tiny random model keeps it short)."""
    import argparse
    import logging

    import llmqp
    from llmqp.server.cli import add_serve_arguments, config_from_args
    from tiny_gguf import write_tiny_gguf

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--warm-up"])).warm_up
    assert not config_from_args(parser.parse_args([])).warm_up
    tiny = llmqp.Engine(write_tiny_gguf(tmp_path / "tiny.gguf"))
    expected = 7 if llmqp.Scheduler(tiny)._group_prefill else 5  # widths 16..64 and 4 groups; 16..256 alone
    with caplog.at_level(logging.INFO, logger="llmqp.server"):
        s = Server(tiny, warm_up=True)
    try:
        assert httpx.get(s.base + "/health").status_code == 200
        assert f"compiled {expected} prefill shapes ahead" in caplog.text
    finally:
        s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required(server, headers):
    for method, path in (("get", "/v1/models"), ("post", "/v1/chat/completions"), ("get", "/metrics")):
        r = getattr(httpx, method)(server.base + path, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)


# ---------------------------------------------------------------------- chat, streaming, completions
@pytest.mark.slow
def test_plain_and_streamed_chat_agree(server):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    plain = chat(server, messages=msgs, max_tokens=16)
    assert plain.object == "chat.completion" and plain.model == MODEL
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 0

    chunks = list(chat(server, messages=msgs, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # Raw SSE: ends with [DONE]; every token chunk carries its plan trace.
    with server.http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    bodies = [json.loads(line[6:]) for line in lines[:-1]]
    traced = [t for b in bodies for t in b["choices"][0].get("llmqp", {}).get("tokens", [])]
    assert len(traced) == 6
    assert all(t["plan"] in ("dense", "sparse", "sparse_union", "forced") and t["k"] > 0 and t["latency_ms"] >= 0
               for t in traced)


@pytest.mark.slow
def test_completions_endpoint(server):
    r = server.client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stop=["\n"])
    assert r.object == "text_completion" and r.choices[0].text
    assert "\n" not in r.choices[0].text
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stop=["\n"], stream=True)
        if c.choices)
    assert streamed == r.choices[0].text
    two = server.client.completions.create(model=MODEL, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=4,
                                           temperature=0, extra_body={"regex": r" [0-9a-z]{1,3}"})
    assert [c.index for c in two.choices] == [0, 1]
    assert all(re.fullmatch(r" [0-9a-z]{1,3}", c.text) for c in two.choices)


@pytest.mark.slow
def test_output_equals_engine_generate(server, engine):
    """Server output equals Engine.generate for the same request and seed, greedy and seeded."""
    msgs = [{"role": "user", "content": "Write a short line about the sea."}]
    for temperature, seed in ((0.0, 0), (0.9, 1234)):
        got = chat(server, messages=msgs, max_tokens=12, temperature=temperature, seed=seed, top_p=0.95)
        want = engine.generate(msgs, max_tokens=12, temperature=temperature, seed=seed, top_p=0.95)
        assert got.choices[0].message.content == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
    got = chat(server, messages=msgs, max_tokens=40, temperature=0.7, seed=5,
               response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                       "strict": True}})
    want = engine.generate(msgs, max_tokens=40, temperature=0.7, seed=5, json_schema=PERSON, strict=True)
    assert got.choices[0].message.content == want.text
    raw = server.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10,
                                           temperature=0.8, seed=3)
    assert raw.choices[0].text == engine.generate("Once upon a time", raw=True, max_tokens=10, temperature=0.8,
                                                  seed=3).text


@pytest.mark.slow
def test_n_choices_use_consecutive_seeds(server):
    msgs = [{"role": "user", "content": "Name an animal."}]
    both = chat(server, messages=msgs, n=2, temperature=1.0, seed=40, max_tokens=8)
    assert [c.index for c in both.choices] == [0, 1]
    for i, c in enumerate(both.choices):
        alone = chat(server, messages=msgs, temperature=1.0, seed=40 + i, max_tokens=8)
        assert c.message.content == alone.choices[0].message.content


@pytest.mark.slow
def test_logprobs_over_the_allowed_set(server):
    import math

    r = chat(server, logprobs=True, top_logprobs=5, max_tokens=1, extra_body={"guided_regex": "[ab]"})
    entry = r.choices[0].logprobs.content[0]
    assert entry.token in ("a", "b")
    assert sorted(t.token for t in entry.top_logprobs) == ["a", "b"]  # only the allowed tokens
    assert math.isclose(sum(math.exp(t.logprob) for t in entry.top_logprobs), 1.0, rel_tol=1e-4)
    assert math.isclose(entry.logprob, max(t.logprob for t in entry.top_logprobs), abs_tol=1e-5)  # greedy: top
    free = chat(server, logprobs=True, top_logprobs=3, max_tokens=3)
    for e in free.choices[0].logprobs.content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token


# ---------------------------------------------------------------------- constraints and tools
@pytest.mark.slow
def test_parse_returns_a_pydantic_instance(server):
    from typing import Literal

    class City(pydantic.BaseModel):
        name: Literal["Paris", "Lyon", "Nice"]
        country: Literal["France", "Italy"]
        capital: bool

    r = server.client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, City)


@pytest.mark.slow
@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_object"}},
    {"extra_body": {"guided_json": PERSON}},
    {"extra_body": {"structured_outputs": {"json": PERSON}}},
    {"extra_body": {"guided_choice": ["red", "green", "blue"]}},
    {"extra_body": {"structured_outputs": {"regex": r"[A-Z]{3}-[0-9]{2}"}}},
    {"extra_body": {"ebnf": 'root ::= "yes" | "no"'}},
    {"extra_body": {"guided_grammar": 'start: "x" NUM\nNUM: /[0-9]{2}/'}},
], ids=["json_object", "guided_json", "structured_json", "guided_choice", "structured_regex", "ebnf", "lark"])
def test_constraint_spellings(server, body):
    r = chat(server, max_tokens=40, messages=[{"role": "user", "content": "Answer."}], **body)
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    extra = body.get("extra_body", {})
    if "response_format" in body:  # any object: the model may go on until max_tokens
        assert isinstance(json.loads(text), dict) if finish == "stop" else text.startswith("{")
        return
    assert finish == "stop", text
    if False:
        pass
    elif "guided_json" in extra or "json" in extra.get("structured_outputs", {}):
        jsonschema.validate(json.loads(text), PERSON)
    elif "guided_choice" in extra:
        assert text in ("red", "green", "blue")
    elif "structured_outputs" in extra:
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", text)
    elif "ebnf" in extra:
        assert text in ("yes", "no")
    else:
        assert re.fullmatch(r"x[0-9]{2}", text)


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tool_calls_validate(server, tool_choice, stream):
    msgs = [{"role": "user", "content": "What's the weather in Paris, and the time in Tokyo?"}]
    r = chat(server, messages=msgs, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=60, stream=stream)
    if stream:
        chunks = list(r)
        calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert len(calls) == 1
        name, arguments = calls[0].function.name, calls[0].function.arguments
    else:
        message = r.choices[0].message
        finish = r.choices[0].finish_reason
        assert message.content is None and len(message.tool_calls) == 1
        name, arguments = message.tool_calls[0].function.name, message.tool_calls[0].function.arguments
    assert finish == "tool_calls"
    if isinstance(tool_choice, dict):
        assert name == "get_time"
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}[name]
    jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.slow
def test_tool_choice_auto_and_none(server):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    auto = chat(server, messages=msgs, tools=[WEATHER], tool_choice="auto", max_tokens=40)
    choice = auto.choices[0]
    if choice.message.tool_calls:  # the model chose to call: the call is constrained
        assert choice.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    else:
        assert choice.message.content and not choice.message.content.startswith("<")
    none = chat(server, messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


# ---------------------------------------------------------------------- bad requests
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    ("bad_schema", dict(GOOD, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}), 400, "uniqueItems"),
    ("bad_regex", dict(GOOD, guided_regex="(unclosed"), 400, "regex"),
    ("bad_grammar", dict(GOOD, guided_grammar="start: undefined_rule"), 400, "grammar"),
    ("bad_tool_schema", dict(GOOD, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "format": "bogus"}}}}}],
        tool_choice="required"), 400, "'f'"),
    ("two_constraints", dict(GOOD, guided_regex="a", response_format={"type": "json_object"}), 400, "at most one"),
    ("tools_and_constraint", dict(GOOD, guided_regex="a", tools=[WEATHER], tool_choice="required"), 400,
     "at most one"),
    ("temperature", dict(GOOD, temperature=3.5), 400, "temperature"),
    ("top_p", dict(GOOD, top_p=-1), 400, "top_p"),
    ("n_zero", dict(GOOD, n=0), 400, "n must"),
    ("max_tokens_zero", dict(GOOD, max_tokens=0), 400, "max_tokens"),
    ("top_logprobs", dict(GOOD, logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("stop_type", dict(GOOD, stop=5), 400, "stop"),
    ("missing_messages", {"model": MODEL}, 400, "messages"),
    ("bad_role", dict(GOOD, messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    ("unknown_tool_choice", dict(GOOD, tools=[WEATHER], tool_choice={"type": "function",
                                                                     "function": {"name": "nope"}}), 400, "nope"),
    ("penalty", dict(GOOD, presence_penalty=1.0), 400, "presence_penalty"),
    ("unknown_model", dict(GOOD, model="gpt-4o"), 404, "does not exist"),
    ("too_long_prompt", dict(GOOD, messages=[{"role": "user", "content": "word " * 9000}]), 400, "context length"),
    ("prompt_plus_max_tokens", dict(GOOD, max_tokens=8190), 400, "context length"),
    ("n_over_waiting", dict(GOOD, n=MAX_WAITING + MAX_BATCH + 1), 429, "waiting"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,body,status,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error(server, name, body, status, needle):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]
    if name.startswith(("too_long", "prompt_plus")):
        assert err["code"] == "context_length_exceeded"
    if status == 400:
        assert err["type"] == "invalid_request_error"


@pytest.mark.slow
def test_malformed_bodies_and_size_limit(server):
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = post(server, "/v1/chat/completions", data)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    huge = json.dumps(dict(GOOD, messages=[{"role": "user", "content": "x" * (5 * 1024 * 1024)}]))
    r = post(server, "/v1/chat/completions", huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert server.http.get("/v1/nothing-here").status_code == 404
    # ... and the server keeps serving.
    assert chat(server, max_tokens=3).choices[0].message.content


@pytest.mark.slow
def test_slow_compile_times_out_without_stalling_decoding(engine, server):
    """A constraint that compiles for longer than the compile time limit gets 400; a stream already decoding
    keeps its pace meanwhile (compiles run in a thread pool, never in the decode loop). Its own server, with a
    0.5 s limit: the constraint below takes seconds (llguidance's cost grows faster than linearly in the
    number of choices), on an idle machine as on a busy one."""
    own = Server(engine, compile_timeout_s=0.5)
    choices = [f"option {i} with some padding text to make it long" for i in range(40000)]
    gaps, result = [], {}

    def slow():
        result["r"] = post(own, "/v1/chat/completions", dict(GOOD, guided_choice=choices))

    try:
        stream = own.http.stream("POST", "/v1/chat/completions", json=dict(
            GOOD, max_tokens=60, temperature=0, stream=True, messages=[{"role": "user", "content": "Tell a story."}]))
        with stream as r:
            t = threading.Thread(target=slow)
            last, started = time.perf_counter(), False
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if started:
                    gaps.append(now - last)
                else:
                    t.start()
                    started = True
                last = now
            t.join()
    finally:
        own.stop()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "constraint_compile_timeout"
    assert max(gaps) < 2.0, max(gaps)


# ---------------------------------------------------------------------- disconnects and load
@pytest.mark.slow
def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics().get('llmqp_requests_finished_total{finish_reason="abort"}', 0.0)
    with server.http.stream("POST", "/v1/chat/completions", json=dict(
            GOOD, max_tokens=400, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Write a very long essay."}])) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    m = server.wait_idle()
    assert m["llmqp_requests_running"] == 0
    assert m['llmqp_requests_finished_total{finish_reason="abort"}'] == before + 1


def _load_job(i: int, base: str) -> tuple[str, dict, bool, str]:
    """(kind, body, stream, check) for the i-th request of the mixed workload."""
    kind = ["json", "regex", "choice", "tool", "free", "bad", "json", "regex"][i % 8]
    msgs = [{"role": "user", "content": f"Request {i}: give an answer."}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 16, "temperature": 0.7 if i % 3 else 0, "seed": i}
    if kind == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    elif kind == "regex":
        body["guided_regex"] = r"[0-9]{3}-[0-9]{4}"
    elif kind == "choice":
        body["guided_choice"] = ["alpha", "beta", "gamma"]
    elif kind == "tool":
        body.update(tools=[WEATHER], tool_choice="required", max_tokens=40)
    elif kind == "bad":
        body["response_format"] = {"type": "nonsense"} if i % 2 else {"type": "json_schema", "json_schema": {
            "name": "b", "schema": {"type": "array", "uniqueItems": True}}}
    stream = i % 2 == 1
    disconnect = i in (9, 19, 39, 55)  # a few streaming clients go away early
    return kind, body, stream, disconnect


def _run_load_job(i: int, base: str) -> tuple[str, str]:
    kind, body, stream, disconnect = _load_job(i, base)
    body["stream"] = stream
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
        if kind == "bad":
            r = http.post("/v1/chat/completions", json=body)
            return kind, "ok" if r.status_code == 400 and "error" in r.json() else f"bad: {r.status_code}"
        if stream:
            text, finish, calls = "", None, []
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return kind, f"status {r.status_code}"
                for n, line in enumerate(r.iter_lines()):
                    if disconnect and n >= 3:
                        return kind, "disconnected"
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    calls += choice["delta"].get("tool_calls") or []
                    finish = choice["finish_reason"] or finish
            message = {"content": text or None, "tool_calls": calls or None}
        else:
            r = http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return kind, f"status {r.status_code}: {r.text}"
            message, finish = r.json()["choices"][0]["message"], r.json()["choices"][0]["finish_reason"]
    if finish == "length":
        return kind, "ok"  # cut by max_tokens: nothing to validate
    text = message["content"]
    if kind == "json":
        jsonschema.validate(json.loads(text), PERSON)
    elif kind == "regex":
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text), text
    elif kind == "choice":
        assert text in ("alpha", "beta", "gamma"), text
    elif kind == "tool":
        assert finish == "tool_calls"
        jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]),
                            WEATHER["function"]["parameters"])
    return kind, "ok"


@pytest.mark.slow
def test_load_mixed_requests(server):
    """64 mixed requests at concurrency 16 (constrained and free, streamed and not, some clients leaving
    early, some bad): every good one completes and validates, every bad one gets 400, no slot leaks."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda i: _run_load_job(i, server.base), range(64)))
    problems = [(i, o) for i, o in enumerate(outcomes) if o[1] not in ("ok", "disconnected")]
    assert not problems, problems
    assert sum(o[1] == "disconnected" for o in outcomes) >= 3
    assert sum(o[0] == "bad" for o in outcomes) == 8
    m = server.wait_idle()
    assert m["llmqp_requests_running"] == 0 and m["llmqp_requests_waiting"] == 0
    assert m['llmqp_output_tokens_total{plan="forced"}'] > 0
    # drafts (draft="auto" by default) are counted by outcome; accepted ones never exceed the output tokens
    accepted, rejected = (m[f'llmqp_draft_tokens_total{{result="{r}"}}'] for r in ("accepted", "rejected"))
    assert accepted >= 0 and rejected >= 0
    assert accepted <= sum(v for k, v in m.items() if k.startswith("llmqp_output_tokens_total"))
    assert chat(server, max_tokens=3).choices[0].message.content  # still serving


@pytest.mark.slow
def test_shutdown_lets_running_requests_finish(engine, server):
    """Graceful shutdown (what SIGINT/SIGTERM trigger): uvicorn stops taking connections, a stream already
    running finishes with [DONE], the engine thread ends and nothing is left running."""
    own = Server(engine)
    lines: list[str] = []

    def consume():
        with own.http.stream("POST", "/v1/chat/completions", json=dict(GOOD, max_tokens=20, temperature=0,
                                                                        stream=True)) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.time() + 60
    while not any(line.startswith("data: {") for line in lines) and time.time() < deadline:
        time.sleep(0.02)
    worker = own.app.state.worker
    own.stop()
    t.join(30)
    assert not own.thread.is_alive() and not t.is_alive()
    assert lines[-1] == "data: [DONE]"
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
    assert finishes[-1] in ("stop", "length")
    assert not worker._thread.is_alive() and worker.num_running == 0


# ---------------------------------------------------------------------- quick: the wire format alone
def test_protocol_constraint_spellings_and_fan_out():
    from llmqp.server import protocol
    from llmqp.server.errors import APIError

    msgs = [{"role": "user", "content": "x"}]
    for extra, want in (({"guided_regex": "a+"}, {"regex": "a+"}), ({"ebnf": "root ::= \"a\""}, {"grammar": "root ::= \"a\""}),
                        ({"structured_outputs": {"choice": ["a", "b"]}}, {"choice": ["a", "b"]}),
                        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                                     "strict": True}}},
                         {"json_schema": PERSON, "strict": True}),
                        ({"response_format": {"type": "text"}}, {})):
        job = protocol.parse_chat(dict(GOOD, messages=msgs, **extra), MODEL)
        assert job.constraint == want
    job = protocol.parse_chat(dict(GOOD, n=3, seed=10, temperature=0.5), MODEL)
    assert [r["seed"] for r in job.requests] == [10, 11, 12]
    assert all(r["max_tokens"] == 2 and r["temperature"] == 0.5 for r in job.requests)
    with pytest.raises(APIError) as e:
        protocol.parse_chat(dict(GOOD, guided_regex="a", guided_choice=["b"]), MODEL)
    assert e.value.status == 400 and "at most one constraint" in e.value.message
    with pytest.raises(APIError) as e:
        protocol.parse_chat(dict(GOOD, model="other"), MODEL)
    assert e.value.status == 404 and e.value.code == "model_not_found"
    job = protocol.parse_completion({"model": MODEL, "prompt": ["a", [1, 2]], "n": 2, "max_tokens": 3}, MODEL)
    assert [r["prompt"] for r in job.requests] == ["a", "a", [1, 2], [1, 2]]
    assert [r["raw"] for r in job.requests] == [True, True, False, False]


def test_tool_plans_and_call_parsing():
    from llmqp.server.errors import APIError
    from llmqp.server.tools import parse_call, parse_tools

    assert parse_tools(None, None) is None and parse_tools([WEATHER], "none") is None
    required = parse_tools([WEATHER, TIME], "required")
    schema = required.constraint()["json_schema"]
    call = {"name": "get_time", "arguments": {"tz": "UTC"}}
    jsonschema.validate(call, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {"city": "Paris", "unit": "celsius"}}, schema)
    parsed = parse_call(json.dumps(call), required)
    assert parsed["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'} and parsed["type"] == "function"
    named = parse_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert [t.name for t in named.tools] == ["get_weather"] and named.mode == "required"
    auto = parse_tools([WEATHER], None)
    assert auto.mode == "auto"
    assert parse_call("It is sunny.", auto) is None
    assert parse_call('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
                      "</tool_call>", auto)["function"]["name"] == "get_weather"
    for tools, choice in (([WEATHER, WEATHER], "auto"), ([{"type": "function"}], "auto"), ([WEATHER], "sometimes"),
                          (None, "required")):
        with pytest.raises(APIError):
            parse_tools(tools, choice)
