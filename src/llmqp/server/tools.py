"""Function calling on a constrained decoder: `tools` + `tool_choice` -> a constraint, and the output back
to `tool_calls`.

- `"required"` or a named function: the whole output is one JSON object `{"name": ..., "arguments": ...}`
  whose `name` is a declared function (the named one) and whose `arguments` satisfy that function's
  `parameters` schema — enforced as a JSON schema, so the call always validates.
- `"auto"` (the default when tools are given): a Lark grammar lets the model either answer in free text
  (which may not start with `<`) or emit `<tool_call>{"name": ..., "arguments": ...}</tool_call>`; once it
  starts a call, the call is constrained exactly like `"required"` (llguidance's `%json` inside Lark).
- `"none"`: the tools are not shown and never called.

One call per response (`parallel_tool_calls` is accepted but at most one call is produced). Arguments are
generated in strict mode whatever `function.strict` says (objects closed to their declared properties):
every such call also satisfies the non-strict schema, and a small model otherwise pads calls with keys
copied from the schema. The tools are
described to the model in a system message (the prompt format below); SmolLM2 was not trained on it, so
`auto` mostly answers in text — the constraint only guarantees that a call, when made, is well formed."""

from __future__ import annotations

import dataclasses
import json
import secrets

from llmqp.server.errors import invalid

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# llguidance's options inside `%json`, pinned like the engine's own JSON compiles (no keyword ignored).
_STRICT_JSON = {"lenient": False, "coerce_one_of": False, "whitespace_flexible": False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolPlan:
    """What the request's tools turn into. mode: "auto" | "required" (named counts as required with one
    tool). system_prompt: prepended to the chat."""

    mode: str
    tools: tuple[Tool, ...]
    system_prompt: str

    def constraint(self) -> dict:
        """Keyword arguments for `Engine.constraint` (may raise ConstraintError: call it off the event
        loop, after `check_tool_schemas`)."""
        if self.mode == "required":
            return {"json_schema": calls_schema(self.tools), "strict": True}
        return {"grammar": auto_grammar(self.tools)}


def parse_tools(tools, tool_choice) -> ToolPlan | None:
    """Validate `tools` / `tool_choice` (raising APIError 400) and build the plan; None when no tool may
    be called (`tools` absent or empty, or `tool_choice` "none")."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise invalid("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise invalid("tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    parsed: list[Tool] = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise invalid(f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "_-" for c in name):
            raise invalid(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", param=where)
        if any(p.name == name for p in parsed):
            raise invalid(f"{where}: duplicate function name {name!r}", param=where)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise invalid(f"{where}.function.parameters must be a JSON schema object", param=where)
        parsed.append(Tool(name=name, description=str(f.get("description") or ""), parameters=params))
    if not parsed:
        if tool_choice not in (None, "none"):
            raise invalid("tool_choice needs at least one tool", param="tool_choice")
        return None
    if tool_choice is None:
        tool_choice = "auto"
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        chosen = [t for t in parsed if t.name == name]
        if not chosen:
            raise invalid(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return _plan("required", tuple(chosen))
    if tool_choice in ("auto", "required"):
        return _plan(tool_choice, tuple(parsed))
    raise invalid('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                  '{"name": ...}}', param="tool_choice")


def call_schema(tool: Tool) -> dict:
    """The JSON schema of one call: the function's name as a constant, its parameters as `arguments`."""
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def calls_schema(tools: tuple[Tool, ...]) -> dict:
    schemas = [call_schema(t) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _plan(mode: str, tools: tuple[Tool, ...]) -> ToolPlan:
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                   ensure_ascii=False) for t in tools)
    if mode == "required":
        prompt = ("You can call these functions:\n" + listing + "\nAnswer with one function call as JSON: "
                  '{"name": <function name>, "arguments": <arguments object>}.')
    else:
        prompt = ("You can call these functions:\n" + listing + f"\nTo call one, answer only with {CALL_OPEN}"
                  '{"name": <function name>, "arguments": <arguments object>}' + f"{CALL_CLOSE}. "
                  "Otherwise answer the user in text.")
    return ToolPlan(mode=mode, tools=tools, system_prompt=prompt)


def auto_grammar(tools: tuple[Tool, ...]) -> str:
    """Lark (llguidance dialect): free text not starting with '<', or one tagged call whose JSON is the
    calls schema. The schema is first put through the engine's own JSON pipeline (keyword checks, rewrites,
    strict closing — raising ConstraintError for what the backend cannot enforce), so a call made in auto
    mode is held to exactly what `json_schema=` would enforce."""
    from llmqp.constraints import make_spec
    from llmqp.constraints.llguidance_backend import LLGuidanceBackend
    from llmqp.errors import ConstraintError

    # (grammar, the schema it was built from, [checks the layer enforces beyond the grammar, ...])
    built = LLGuidanceBackend()._grammar(make_spec(json_schema=calls_schema(tools), strict=True))
    schema = built[1]
    if any(built[2:]):  # e.g. uniqueItems, which the backend checks outside llguidance's grammar
        raise ConstraintError('tools: a function whose parameters need checks beyond the grammar (such as '
                              '"uniqueItems") cannot be called with tool_choice "auto"; use "required" or name it')
    schema = dict(schema, **{"x-guidance": _STRICT_JSON})
    return ("start: TEXT | call\n"
            "TEXT: /[^<][\\s\\S]*/\n"
            f"call: {json.dumps(CALL_OPEN)} %json {json.dumps(schema, ensure_ascii=False)} {json.dumps(CALL_CLOSE)}\n")


def check_tool_schemas(engine, plan: ToolPlan) -> None:
    """Compile each function's parameters as a json_schema so a bad one fails with the engine's own
    ConstraintError message (naming the keyword and its location), prefixed with the function name."""
    from llmqp.errors import ConstraintError

    for t in plan.tools:
        try:
            engine.constraint(json_schema=t.parameters, strict=True)
        except ConstraintError as e:
            raise ConstraintError(f"tools: function {t.name!r} parameters: {e}") from None


def parse_call(text: str, plan: ToolPlan) -> dict | None:
    """The tool call in a finished output, as an OpenAI `tool_calls` entry; None when the output is text
    (auto mode) or not a complete call (cut by max_tokens)."""
    body = text.strip()
    if plan.mode == "auto":
        if not (body.startswith(CALL_OPEN) and body.endswith(CALL_CLOSE)):
            return None
        body = body[len(CALL_OPEN):-len(CALL_CLOSE)]
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not any(t.name == call.get("name") for t in plan.tools):
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": call["name"],
                         "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}}


def may_be_call(text_so_far: str, plan: ToolPlan) -> bool:
    """Streaming, auto mode: whether the output so far could still become a call (then it is held back)."""
    if plan.mode != "auto":
        return True
    s = text_so_far.lstrip()
    return CALL_OPEN.startswith(s) or s.startswith(CALL_OPEN)
