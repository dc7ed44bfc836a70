"""OpenAI wire format -> engine requests, and results -> OpenAI response bodies.

`parse_chat` / `parse_completion` validate a request body completely (raising `APIError` 400/404) and
return a `Job`: the engine requests it fans out to (one per prompt x `n`), plus what shaping the answer
needs. Nothing here touches the scheduler or compiles anything.

Choices: for `n` > 1 the i-th choice of a prompt runs with seed `seed + i` (so greedy choices are
identical, sampled ones differ and are reproducible). Without `seed`, a sampled request (temperature > 0)
draws a random one; greedy ones use 0. `temperature` defaults to 1.0 as in the OpenAI API."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from llmqp.server.errors import APIError, invalid
from llmqp.server.tools import ToolPlan, parse_tools

MAX_N = 64
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """One HTTP request. requests: engine request dicts (`llmqp.Request` keys), choice index order;
    `max_tokens` is None where the body gave none (the app fills it in once the prompt length is known).
    constraint: the `Engine.constraint` keyword arguments shared by every request ({} when none, or when
    `tools` gives it). tools: the tool plan (chat only). logprobs / top_logprobs: what to return per token."""

    kind: str  # "chat" | "completion"
    model: str
    requests: tuple[dict, ...]
    constraint: dict
    tools: ToolPlan | None
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    constraint_param: str | None = None  # where the constraint came from (named in its errors)
    echo_prompts: tuple[str, ...] = ()  # completions with echo=true: the prompt text per choice


# ------------------------------------------------------------------ field helpers
def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise invalid(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if not lo <= value <= hi:
        raise invalid(f"{key} must be in [{lo}, {hi}], got {value!r}", param=key)
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key} must be a boolean, got {value!r}", param=key)
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise invalid(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                      param="stop")
    return stop or None


def _unsupported(body: dict) -> None:
    """Options we do not implement are refused rather than silently ignored."""
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise invalid(f"{key} is not supported (only 0)", param=key)
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported", param="logit_bias")
    if body.get("suffix") is not None:
        raise invalid("suffix is not supported", param="suffix")


def _sampling(body: dict) -> dict:
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None:
        max_tokens = _number({key: max_tokens}, key, None, 1, 1 << 20, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    if seed is None:
        seed = secrets.randbits(31) if temperature > 0 else 0
    top_k = _number(body, "top_k", 0, -1, 1 << 20, integer=True)
    return {"max_tokens": max_tokens, "temperature": float(temperature),
            "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0)), "top_k": max(0, top_k),
            "seed": seed % (1 << 31), "stop": _stop(body)}


def _model(body: dict, served: str) -> str:
    model = body.get("model", served)
    if not isinstance(model, str):
        raise invalid("model must be a string", param="model")
    if model != served:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")
    return model


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed with stream=true", param="stream_options")
    if not isinstance(opts, dict):
        raise invalid("stream_options must be an object", param="stream_options")
    return _bool(opts, "include_usage")


# ------------------------------------------------------------------ constraints
def _constraint(body: dict) -> tuple[dict, str | None]:
    """The one constraint a body asks for, from any of the accepted spellings, as `Engine.constraint`
    keywords; raises 400 when two are given. Returns (kwargs, the parameter it came from)."""
    found: list[tuple[str, dict]] = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid('response_format.type must be "text", "json_object" or "json_schema"',
                          param="response_format")
        if rf["type"] == "json_object":
            found.append(("response_format", {"json_schema": {"type": "object"}, "strict": False}))
        elif rf["type"] == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise invalid('response_format.json_schema must be {"name", "schema", "strict"}',
                              param="response_format.json_schema")
            strict = spec.get("strict", False)
            if not isinstance(strict, bool) and strict is not None:
                raise invalid("response_format.json_schema.strict must be a boolean",
                              param="response_format.json_schema.strict")
            found.append(("response_format", {"json_schema": spec["schema"], "strict": bool(strict)}))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("structured_outputs must be an object", param="structured_outputs")
        for key, kw in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"),
                        ("grammar", "grammar")):
            if so.get(key) is not None:
                found.append((f"structured_outputs.{key}", {kw: so[key]}))
        if so.get("json_object"):
            found.append(("structured_outputs.json_object", {"json_schema": {"type": "object"}, "strict": False}))
    for key, kw in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                    ("guided_grammar", "grammar"), ("regex", "regex"), ("ebnf", "grammar")):
        if body.get(key) is not None:
            found.append((key, {kw: body[key]}))
    if len(found) > 1:
        raise invalid("give at most one constraint; got " + ", ".join(k for k, _ in found),
                      param=found[1][0])
    if not found:
        return {}, None
    param, kwargs = found[0]
    if "json_schema" in kwargs and not isinstance(kwargs["json_schema"], (dict, bool, str)):
        raise invalid(f"{param}: the schema must be a JSON object", param=param)
    return kwargs, param


# ------------------------------------------------------------------ messages
def _content_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}: only text content parts are supported", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{where} must be a string or a list of text parts", param=where)


def _messages(body: dict) -> list[dict]:
    import json

    messages = body.get("messages")
    if messages is None:
        raise invalid("missing required field: messages", param="messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise invalid(f"{where} must be an object with role system, developer, user, assistant or tool",
                          param=where)
        text = _content_text(m.get("content"), f"{where}.content")
        for call in m.get("tool_calls") or []:  # an earlier call, shown to the model as it would write it
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except (json.JSONDecodeError, TypeError):
                args = fn.get("arguments")
            text += "<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args}) + "</tool_call>"
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": text})
    return out


def _with_system(messages: list[dict], extra: str) -> list[dict]:
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + extra}] + messages[1:]
    return [{"role": "system", "content": extra}] + messages


# ------------------------------------------------------------------ entry points
def _fan_out(prompts: list, n: int, sampling: dict, *, raw: bool, top_logprobs: int) -> tuple:
    """One engine request per (prompt, choice); the constraint is added once compiled (`app._prepare`)."""
    base_seed = sampling["seed"]
    shared = {k: v for k, v in sampling.items() if k != "seed"}
    out = []
    for prompt in prompts:
        for i in range(n):
            out.append(dict(shared, prompt=prompt, raw=raw and isinstance(prompt, str), seed=(base_seed + i) % (1 << 31),
                            top_logprobs=top_logprobs))
    return tuple(out)


def parse_chat(body: Any, served: str) -> Job:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = _model(body, served)
    _unsupported(body)
    messages = _messages(body)
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    if top and not logprobs:
        raise invalid("top_logprobs needs logprobs=true", param="top_logprobs")
    constraint, param = _constraint(body)
    plan = parse_tools(body.get("tools"), body.get("tool_choice"))
    if plan is not None:
        if constraint:
            raise invalid(f"give at most one constraint; got tools (tool_choice {plan.mode}) and {param}",
                          param="tool_choice")
        messages = _with_system(messages, plan.system_prompt)
        param = "tools"  # the constraint itself is built off the event loop (`ToolPlan.constraint`)
    sampling = _sampling(body)
    requests = _fan_out([messages], n, sampling, raw=False, top_logprobs=top)
    return Job(kind="chat", model=model, requests=requests, constraint=constraint, tools=plan, stream=stream,
               include_usage=include_usage, logprobs=logprobs, top_logprobs=top, constraint_param=param)


def parse_completion(body: Any, served: str) -> Job:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = _model(body, served)
    _unsupported(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("missing required field: prompt", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                      param="prompt")
    if any(p == "" for p in prompts):
        raise invalid("prompt is empty", param="prompt")
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of not in (None, n):
        raise invalid("best_of is not supported (only equal to n)", param="best_of")
    top = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    echo = _bool(body, "echo")
    if echo and any(not isinstance(p, str) for p in prompts):
        raise invalid("echo needs text prompts", param="echo")
    constraint, param = _constraint(body)
    sampling = _sampling(body)
    if len(prompts) * n > MAX_N:
        raise invalid(f"prompts x n must be at most {MAX_N}", param="n")
    requests = _fan_out(prompts, n, sampling, raw=True, top_logprobs=top or 0)
    echoes = tuple(p for p in prompts for _ in range(n)) if echo else ()
    return Job(kind="completion", model=model, requests=requests, constraint=constraint, tools=None,
               stream=stream, include_usage=include_usage, logprobs=top is not None, top_logprobs=top or 0,
               constraint_param=param, echo_prompts=echoes)
