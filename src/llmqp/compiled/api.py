"""Engine-facing entry points of the fused path.

`Engine.generate(..., compiled=True|"auto")` is meant to be one call:

    result = llmqp.compiled.generate_fused(self, prompt, max_tokens=..., temperature=..., ..., regex=...)
    if isinstance(result, llmqp.compiled.Fallback):
        ...  # host loop with forced=False, report compiled=False and result.reason

or, in two steps (tables are cached per tokenizer and spec):

    tables = llmqp.compiled.constraint_tables(self, constraint_kw)      # ConstraintTables | Fallback
    out = llmqp.compiled.run_fused(self, prompt_ids, tables, sampling_params, max_tokens)

`generate_fused` does not trust the tables alone: it replays the fused loop's tokens through the host
matcher (llguidance) before it reports the result, and returns a `Fallback` if the host rejects a token
or disagrees about whether the output is complete (a table bug: the caller reruns on the host loop).
"""

from __future__ import annotations

import json

from llmqp.compiled.compile import compile_tables
from llmqp.compiled.loop import clip_threshold, run_fused
from llmqp.compiled.tables import ConstraintTables, Fallback, TableLimits
from llmqp.results import GenerationResult, StepTrace
from llmqp.sampling import SamplingParams

_KINDS = ("json_schema", "regex", "choice", "grammar")


def constraint_tables(engine, constraint_kw: dict, *, limits: TableLimits = TableLimits()) \
        -> ConstraintTables | Fallback:
    """Device tables for the constraint in `constraint_kw` (keys of `Engine.generate`: json_schema,
    regex, choice, grammar, strict, whitespace), mirroring the engine's host matcher, or the Fallback
    reason. Raises ConstraintError for a bad spec, exactly as the host path would."""
    return _tables_and_reference(engine, constraint_kw, limits)[0]


def _tables_and_reference(engine, constraint_kw: dict, limits: TableLimits):
    """(tables or Fallback, the host's CompiledConstraint)."""
    from llmqp.constraints import compile_constraint, make_spec

    kw = {k: constraint_kw.get(k) for k in _KINDS}
    spec = make_spec(**kw, strict=constraint_kw.get("strict", True),
                     whitespace=constraint_kw.get("whitespace", "compact"))
    reference = compile_constraint(spec, engine.tokenizer)
    return compile_tables(spec, engine.tokenizer, reference=reference, limits=limits), reference


def replay_on_host(reference, token_ids: list[int], finish_reason: str) -> tuple[bool, str | None]:
    """Walk the host matcher (`reference.matcher()`) through a fused output. Returns (valid, problem):
    valid: the output stopped ("stop") and the host matcher can stop there; problem: None, or why the
    host disagrees with the tables (a token it rejects; an output the tables call complete and the host
    does not). Cost: one `accept` per token, no masks."""
    matcher = reference.matcher()
    for i, token in enumerate(token_ids):
        try:
            matcher.accept(int(token))
        except ValueError as e:
            return False, f"the host matcher rejects token {i} ({token}) of the fused output: {e}"
    complete = bool(matcher.can_stop())
    if finish_reason == "stop" and not complete:
        return False, "the fused loop stopped where the host matcher says the output is incomplete"
    return finish_reason == "stop" and complete, None


def generate_fused(engine, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int = 0, raw: bool = False, json_schema=None, regex=None, choice=None,
                   grammar=None, strict: bool = True, whitespace: str = "compact", forced: bool = True,
                   sparse_threshold: int | None = None, limits: TableLimits = TableLimits()) \
        -> GenerationResult | Fallback:
    """Generate with the fused on-device loop, or return a `Fallback` (with the reason) when the
    constraint is not regular, too large, or absent (unconstrained decoding stays on the host loop).

    Same arguments and same tokens as `Engine.generate` with the same `forced` setting (forced=True
    feeds forced runs through one multi-token forward, forced=False scores every step). The result's
    `steps` carry the plan and K of every token; their latency is the loop's mean per-token time (the
    loop runs without returning to the host). `valid` is True only when the host matcher, replaying the
    tokens, agrees that the output is complete; when it disagrees at all, the result is a Fallback
    (its reason says what the host rejected). Raises what the host path raises for bad arguments or
    specs."""
    from llmqp.sampling import InvalidArgument

    if int(max_tokens) != max_tokens or max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be a positive integer, got {max_tokens}")
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    kw = dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, strict=strict,
              whitespace=whitespace)
    given = [k for k in _KINDS if kw[k] is not None]
    if not given:
        return Fallback("no constraint: unconstrained decoding runs on the host loop")
    tables, reference = _tables_and_reference(engine, kw, limits)
    if isinstance(tables, Fallback):
        return tables
    ids = engine.prompt_ids(prompt, raw)
    timings: dict = {}
    out = run_fused(engine, ids, tables, sp, max_tokens, forced=forced, sparse_threshold=sparse_threshold,
                    timings=timings)
    valid, problem = replay_on_host(reference, out.token_ids, out.finish_reason)
    if problem is not None or valid != out.valid:
        return Fallback(f"fused output failed the host replay ({problem or 'validity differs'}): the tables "
                        "do not mirror the host matcher for this constraint")
    text = engine.tokenizer.decode(out.token_ids)
    threshold = clip_threshold(sparse_threshold, engine.config.vocab_size)  # as the loop applied it
    per_token = timings["decode_ms"] / max(len(out.token_ids), 1)
    steps = []
    state = 0
    for t in out.token_ids:
        k = int(tables.n_allowed[state])
        steps.append(StepTrace("forced" if k == 1 and forced else "sparse" if k <= threshold else "dense", k,
                               per_token))
        state = tables.step(state, t)
    value = json.loads(text) if json_schema is not None and valid else None
    return GenerationResult(text=text, token_ids=out.token_ids, finish_reason=out.finish_reason, valid=valid,
                            value=value, logprobs=out.logprobs, steps=steps, prompt_tokens=len(ids),
                            prefill_ms=timings["prefill_ms"], decode_ms=timings["decode_ms"])
