"""The user-facing `Engine`: load a model once, then generate (optionally constrained) or score.

The host-stepped decode loop lives here: prefill → [constraint mask → plan → sample → trunk step]*.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from llmqp import plans as plans_mod
from llmqp.errors import LLMQPError
from llmqp.model import loader, transformer
from llmqp.planner import Planner, StepContext
from llmqp.plans import PlanKind
from llmqp.results import GenerationResult, StepTrace
from llmqp.sampling import InvalidArgument, SamplingParams

PREFILL_CHUNK = 512  # longest prompt chunk run in one forward
MIN_CACHE = 512
# Steps whose allowed set exceeds this share of the vocabulary only consider the dense plan: a gather that
# large is never cheaper than the full head and would materialise B x K x d floats.
SPARSE_MAX_FRACTION = 0.25

_compile_cache_ready = False


def _enable_compile_cache() -> None:
    """Persist XLA executables under the cache dir so warm starts skip compilation."""
    global _compile_cache_ready
    if _compile_cache_ready:
        return
    _compile_cache_ready = True
    try:
        path = loader.cache_dir() / "xla"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError):
        pass  # no persistent cache: only slower starts


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _chunks_end(n: int) -> int:
    """The last cache position (exclusive) a prompt of n tokens writes, padding included."""
    last_start = (n - 1) // PREFILL_CHUNK * PREFILL_CHUNK
    return last_start + _pow2_at_least(n - last_start, 16)


def device_params(packed: dict, dtype: str = "float32") -> dict:
    """Numpy params (`llmqp.model.weights.pack_params` layout) -> device arrays. Norm weights stay f32;
    a tied unembedding keeps one device copy."""
    jdtype = jnp.float32 if dtype == "float32" else jnp.bfloat16

    def to_device(path, x):
        norm = any(getattr(p, "key", None) in ("attn_norm", "ffn_norm", "final_norm") for p in path)
        return jnp.asarray(x, jnp.float32 if norm else jdtype)

    params = jax.tree_util.tree_map_with_path(to_device, packed)
    if packed["unembed_rows"] is packed["embed"]:
        params["unembed_rows"] = params["embed"]
    return params


class Engine:
    """A loaded model ready to generate.

    `Engine()` loads the embedded SmolLM2-135M-Instruct (first call dequantizes and caches it under
    `llmqp.cache_dir()`); `Engine.from_pretrained(path)` loads a llama GGUF file or a Hugging Face
    directory (Llama, Qwen2). dtype "float32" (default) or "bfloat16" for the weights."""

    def __init__(self, model: str | Path | None = None, *, dtype: str = "float32", use_cache: bool = True):
        if dtype not in ("float32", "bfloat16"):
            raise InvalidArgument(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        _enable_compile_cache()
        t0 = time.perf_counter()
        loaded = loader.load(model, use_cache=use_cache)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.dtype = dtype
        self.params = device_params(loaded.params, dtype)
        self.head = {"unembed": self.params["unembed"], "unembed_rows": self.params["unembed_rows"]}
        self._planner: Planner | None = None
        self.load_seconds = time.perf_counter() - t0
        self.loaded_from_cache = loaded.from_cache
        self._all_ids = np.arange(self.config.vocab_size, dtype=np.int32)
        # Unconstrained steps reuse one device copy of "every id allowed".
        self._all_ids_dev = jnp.asarray(self._all_ids[None, :])
        self._all_valid_dev = jnp.ones((1, self.config.vocab_size), bool)

    @property
    def device_kind(self) -> str:
        return jax.devices()[0].device_kind

    @property
    def planner(self) -> Planner:
        """The plan="auto" policy for this (model, device): a contextual bandit over measured head
        latencies, loaded from the cache directory on first use and saved after every generation.
        Its exploration never changes outputs (every plan is equivalent), only latency."""
        if self._planner is None:
            self._planner = Planner.load(self.config.name, self.device_kind, vocab_size=self.vocab_size,
                                         hidden_size=self.config.hidden_size)
        return self._planner

    def save_planner(self) -> None:
        if self._planner is not None:
            try:
                self._planner.save()
            except OSError:
                pass  # a read-only cache only loses what was learned

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Engine":
        return cls(path, **kwargs)

    @property
    def device(self) -> str:
        d = jax.devices()[0]
        return f"{d.platform}:{d.device_kind}"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt. A string is treated as one user message and wrapped in the model's chat
        template unless raw=True; a list of {"role", "content"} messages always uses the template."""
        if isinstance(prompt, str):
            text = prompt if raw else self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in prompt):
            if raw:
                raise InvalidArgument("raw=True needs a string prompt, not a list of messages")
            text = self.tokenizer.apply_chat_template(prompt)
        else:
            raise InvalidArgument("prompt must be a string or a list of {'role', 'content'} dicts")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidArgument("the prompt is empty")
        return ids

    # ------------------------------------------------------------------ constraints
    def constraint(self, *, json_schema=None, regex=None, choice=None, grammar=None, strict: bool = True,
                   whitespace: str = "compact"):
        """Compile a constraint for this model's tokenizer (cached). Raises ConstraintError for a bad spec.
        The result's `accepts(text)` tells whether `text` is a complete, valid output."""
        from llmqp.constraints import compile_constraint, make_spec

        spec = make_spec(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar, strict=strict,
                         whitespace=whitespace)
        return compile_constraint(spec, self.tokenizer)

    # ------------------------------------------------------------------ scoring
    def logits(self, token_ids) -> np.ndarray:
        """Next-token logits at every position: float32 array [len(token_ids), vocab].

        Row t scores the token that would follow token_ids[:t+1]. No chat template, no special tokens
        added: the ids are used as given. The analysis / debugging entry point."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise InvalidArgument("token_ids is empty")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.vocab_size})")
        hidden, _ = self._prefill([ids.astype(np.int32)], [0], keep_all=True)
        out = transformer.dense_logits_jit(self.head, hidden)
        return np.asarray(out, dtype=np.float32)

    def _prefill(self, prompts: list[np.ndarray], extra: list[int], keep_all: bool = False):
        """Run each prompt (one per batch row) through the trunk on its own, in chunks of at most
        PREFILL_CHUNK positions padded to power-of-two buckets, then stack the rows' caches: prefill cost
        follows each row's own length, not the longest row's. Returns (hidden, cache): hidden is (n, d) for
        a single row with keep_all, else (Bb, d) — each row's last prompt position (Bb = rows rounded up to
        a power of two; the extra rows are zero)."""
        lengths = [len(p) for p in prompts]
        need = max(n + e for n, e in zip(lengths, extra))
        if need > self.config.max_position:
            raise InvalidArgument(f"prompt + max_tokens ({need} tokens) exceeds the model's context of "
                                  f"{self.config.max_position} tokens")
        padded_end = max(_chunks_end(n) for n in lengths)
        cache_len = _pow2_at_least(max(padded_end, need), MIN_CACHE)
        dtype = self.params["embed"].dtype
        caches, last, hiddens = [], [], []
        for prompt in prompts:
            cache = transformer.init_cache(self.config, 1, cache_len, dtype)
            for start in range(0, len(prompt), PREFILL_CHUNK):
                chunk = prompt[start : start + PREFILL_CHUNK]
                tokens = np.zeros((1, _pow2_at_least(len(chunk), 16)), np.int32)
                tokens[0, : len(chunk)] = chunk
                hidden, cache = transformer.forward_jit(self.params, cache, jnp.asarray(tokens),
                                                        jnp.asarray([start], jnp.int32), cfg=self.config)
                if keep_all:
                    hiddens.append(hidden[0, : len(chunk)])
            last.append(hidden[0, len(chunk) - 1])
            caches.append(cache)
        if keep_all:
            return jnp.concatenate(hiddens, axis=0), caches[0]
        batch = _pow2_at_least(len(prompts))
        if batch == 1:
            return last[0][None], caches[0]
        pad = [transformer.init_cache(self.config, batch - len(prompts), cache_len, dtype)] if batch > len(prompts) else []
        cache = jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=0), *caches, *pad)
        return jnp.stack(last + [jnp.zeros_like(last[0])] * (batch - len(prompts))), cache

    def _feed(self, cache, tokens: list[int], pos: int):
        """Feed one row's tokens at positions pos.. through the trunk in power-of-two chunks (no padding,
        so every chunk fits the cache exactly). Returns (hidden of the last token (1, d), cache)."""
        hidden = None
        i = 0
        while i < len(tokens):
            size = 1 << (len(tokens) - i).bit_length() - 1
            chunk = jnp.asarray([tokens[i : i + size]], jnp.int32)
            start = jnp.asarray([pos + i], jnp.int32)
            if size == 1:
                hidden, cache = transformer.decode_step(self.params, cache, chunk[:, 0], start, cfg=self.config)
            else:
                h, cache = transformer.forward_jit(self.params, cache, chunk, start, cfg=self.config)
                hidden = h[:, -1]
            i += size
        return hidden, cache

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, raw: bool = False, json_schema=None, regex=None, choice=None,
                 grammar=None, strict: bool = True, whitespace: str = "compact", plan: str = "auto",
                 forced: bool = True, compiled: bool | str = False,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate one completion.

        Constraints: at most one of json_schema (dict, JSON string or Pydantic model class), regex, choice
        (list of strings), grammar (Lark; GBNF accepted). plan: "auto" (the default: learned per step) |
        "dense" | "sparse" — every plan gives the same tokens, only speed differs. forced=True emits tokens
        that the constraint forces without scoring them, feeding a run of them through one multi-token
        forward. compiled=True (or "auto") runs regular constraints (regex, choice, JSON schemas that reduce
        to a finite automaton) in the fused on-device loop — one `lax.while_loop`, no host round trip per
        token, identical tokens — and otherwise falls back to this host loop with `compiled=False` and
        `compiled_reason` set in the result. on_text receives text deltas as they are produced."""
        if compiled not in (False, True, "auto"):
            raise InvalidArgument(f"compiled must be False, True or 'auto', got {compiled!r}")
        reason = None
        if compiled:
            from llmqp import compiled as fused

            out = fused.generate_fused(
                self, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                seed=seed, raw=raw, json_schema=json_schema, regex=regex, choice=choice, grammar=grammar,
                strict=strict, whitespace=whitespace, forced=forced,
                sparse_threshold=self.planner.crossover_k(1, self.vocab_size, self.config.hidden_size))
            if not isinstance(out, fused.Fallback):
                if on_text is not None and out.text:
                    on_text(out.text)
                return dataclasses.replace(out, compiled=True)
            reason = out.reason
        request = Request(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, raw=raw, json_schema=json_schema, regex=regex, choice=choice,
                          grammar=grammar, strict=strict, whitespace=whitespace)
        events = self._decode([request], plan=plan, forced=forced, stream=on_text is not None)
        while True:
            try:
                delta = next(events)
            except StopIteration as stop:
                return dataclasses.replace(stop.value[0], compiled_reason=reason)
            on_text(delta)

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Like `generate`, but yields text deltas as they are produced; returns the GenerationResult
        as the generator's return value."""
        plan, forced = kwargs.pop("plan", "auto"), kwargs.pop("forced", True)
        results = yield from self._decode([Request.coerce(dict(kwargs, prompt=prompt))], plan=plan,
                                          forced=forced, stream=True)
        return results[0]

    def generate_batch(self, requests, *, plan: str = "auto", forced: bool = True) -> list[GenerationResult]:
        """Generate several completions in one batch: each request (an `llmqp.Request` or a dict with the
        same keys) has its own prompt, constraint, sampling settings and max_tokens. Results come back in
        request order and equal what `generate` gives for each request alone. Rows that finish stop
        consuming compute: the batch is compacted to the next power of two as rows finish."""
        if isinstance(requests, (Request, dict)) or not hasattr(requests, "__iter__"):
            raise InvalidArgument("requests must be a list of llmqp.Request or dicts")
        reqs = [Request.coerce(r) for r in requests]
        if not reqs:
            return []
        events = self._decode(reqs, plan=plan, forced=forced, stream=False)
        while True:
            try:
                next(events)
            except StopIteration as stop:
                return stop.value

    def _resolve_plan(self, plan) -> PlanKind:
        try:
            kind = PlanKind(plan)
        except ValueError:
            raise InvalidArgument(f"plan must be one of auto, dense, sparse, sparse_union; got {plan!r}") from None
        if kind is PlanKind.FORCED:
            raise InvalidArgument("plan='forced' cannot be chosen: forced steps happen by themselves "
                                  "whenever the constraint allows exactly one token")
        return kind

    def applicable_plans(self, k_max: int, k_union: int, batch: int) -> list[PlanKind]:
        """The plans worth considering for a step. Gathering more than a quarter of the vocabulary per row
        is never cheaper than the dense head (and would materialise B×K×d floats), so such steps —
        unconstrained rows among them — run dense."""
        limit = SPARSE_MAX_FRACTION * self.vocab_size
        arms = [PlanKind.DENSE]
        if k_max <= limit:
            arms.append(PlanKind.SPARSE)
        if batch > 1 and k_union <= limit:
            arms.append(PlanKind.SPARSE_UNION)
        return arms

    def choose_plan(self, plan: PlanKind, k_max: int, k_union: int, batch: int) -> PlanKind:
        """The plan a scoring step runs under a fixed `plan`: that one when applicable, else the cheapest
        applicable by bytes of unembedding read (plan="auto" asks the planner instead)."""
        arms = self.applicable_plans(k_max, k_union, batch)
        if plan in arms:
            return plan
        d = self.config.hidden_size
        cost = {PlanKind.DENSE: self.vocab_size * d, PlanKind.SPARSE: batch * k_max * d,
                PlanKind.SPARSE_UNION: k_union * d}
        return min(arms, key=lambda a: cost[a])

    def _decode(self, requests: list["Request"], *, plan, forced: bool, stream: bool):
        """The host-stepped decode loop for a batch of requests (one row each). A generator: yields text
        deltas of row 0 when stream is set, returns the list of GenerationResults in request order.

        Each step every active row gets exactly one token — forced (the constraint allows one token: no
        scoring) or scored under the step's plan — and one batched trunk step feeds them. With a single
        active row, a whole run of forced tokens is fed through one multi-token forward instead."""
        plan_kind = self._resolve_plan(plan)
        rows = [_Row(i, r, self) for i, r in enumerate(requests)]  # compiles constraints: errors surface now
        t0 = time.perf_counter()
        hidden, cache = self._prefill([r.prompt_ids for r in rows], [r.request.max_tokens for r in rows])
        hidden.block_until_ready()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        for slot, row in enumerate(rows):
            row.slot, row.prefill_ms = slot, prefill_ms
            row.t_start = row.t_last = time.perf_counter()
        batch = hidden.shape[0]
        active = list(rows)
        while active:
            # 1. what each row does this step: a forced run, or scoring over its allowed ids
            scoring = []
            for row in active:
                row.plan_step(forced, single=len(active) == 1)
                if row.finish is None and row.run is None:
                    scoring.append(row)
            if scoring:
                self._score(scoring, hidden, batch, plan_kind)
            # 2. apply the tokens: EOS, max_tokens and is_done end a row
            for row in active:
                row.apply_step()
            if stream and rows[0].out_text_delta():
                yield rows[0].take_text_delta()
            live = [r for r in active if r.finish is None]
            # 3. compact the batch when at most half of it is still live
            if live and len(live) <= batch // 2:
                new_batch = _pow2_at_least(len(live))
                order = jnp.asarray([r.slot for r in live] + [live[0].slot] * (new_batch - len(live)))
                cache = jax.tree.map(lambda a: jnp.take(a, order, axis=0), cache)
                hidden = jnp.take(hidden, order, axis=0)
                for slot, row in enumerate(live):
                    row.slot = slot
                batch = new_batch
            active = live
            # 4. feed the new tokens through the trunk
            if len(active) == 1 and len(active[0].new_tokens) > 1:
                row = active[0]
                hidden, cache = self._feed(cache, row.new_tokens, row.pos)
                row.pos += len(row.new_tokens)
                hidden.block_until_ready()
                row.charge_forced_feed()
            elif active:
                tokens = np.zeros(batch, np.int32)
                positions = np.zeros(batch, np.int32)
                for row in active:
                    tokens[row.slot], positions[row.slot] = row.new_tokens[0], row.pos
                    row.pos += 1
                hidden, cache = transformer.decode_step(self.params, cache, jnp.asarray(tokens),
                                                        jnp.asarray(positions), cfg=self.config)
        if stream and rows[0].out_text_delta():
            yield rows[0].take_text_delta()
        self.save_planner()
        return [row.result() for row in rows]

    def _score(self, scoring: list["_Row"], hidden, batch: int, plan_kind: PlanKind) -> None:
        """Choose one token for every scoring row with one plan; records the plan, K and timing."""
        allowed = {row.slot: (self._all_ids if row.allowed is None else row.allowed) for row in scoring}
        ks = [len(a) for a in allowed.values()]
        k_max = max(ks)
        if batch == 1 or k_max > SPARSE_MAX_FRACTION * self.vocab_size:
            k_union = k_max  # the union plan is not applicable: skip the O(B*K) union
        else:
            k_union = len(np.unique(np.concatenate(list(allowed.values()))))
        ctx = StepContext(k_max=k_max, k_mean=sum(ks) / len(ks), k_union=k_union, batch_size=batch,
                          vocab_size=self.vocab_size, hidden_size=self.config.hidden_size,
                          device_kind=self.device_kind)
        if plan_kind is PlanKind.AUTO:
            kind = self.planner.choose(ctx, self.applicable_plans(k_max, k_union, batch))
        else:
            kind = self.choose_plan(plan_kind, k_max, k_union, batch)
        rows_ids = [allowed.get(slot, self._all_ids[:1]) for slot in range(batch)]
        ids_np = None
        if k_max == self.vocab_size and batch == 1:
            ids, valid = self._all_ids_dev, self._all_valid_dev
        else:
            ids_np, valid_np = plans_mod.pad_allowed(rows_ids, self.vocab_size)
            for slot in range(batch):
                if slot not in allowed:
                    valid_np[slot] = False
                    valid_np[slot, 0] = True
            ids, valid = jnp.asarray(ids_np), jnp.asarray(valid_np)
        union = None
        if kind is PlanKind.SPARSE_UNION:
            union_ids, positions = plans_mod.union_inputs(rows_ids, ids_np, self.vocab_size)
            union = (jnp.asarray(union_ids), jnp.asarray(positions))
        seeds = np.zeros(batch, np.uint32)
        steps = np.zeros(batch, np.int32)
        temps = np.zeros(batch, np.float32)
        top_ks = np.zeros(batch, np.int32)
        top_ps = np.ones(batch, np.float32)
        for row in scoring:
            sp = row.sampling
            seeds[row.slot], steps[row.slot], temps[row.slot] = sp.seed, len(row.out), sp.temperature
            top_ks[row.slot], top_ps[row.slot] = sp.top_k, sp.top_p
        greedy = all(row.sampling.greedy for row in scoring)
        hidden.block_until_ready()  # the trunk is shared by every plan: time only what the plan changes
        t0 = time.perf_counter()
        index, logprob = plans_mod.score_and_select(
            self.head, hidden, ids, valid, jnp.asarray(seeds), jnp.asarray(steps), jnp.asarray(temps),
            jnp.asarray(top_ks), jnp.asarray(top_ps), union, plan=plans_mod.PLANS[kind], greedy=greedy)
        index, logprob = np.asarray(index), np.asarray(logprob)
        head_ms = (time.perf_counter() - t0) * 1e3
        self.planner.update(ctx, kind, head_ms)  # fixed plans teach the planner too
        for row in scoring:
            row.scored(int(allowed[row.slot][index[row.slot]]), float(logprob[row.slot]), kind,
                       len(allowed[row.slot]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """One generation request for `Engine.generate_batch` (the keyword arguments of `Engine.generate`)."""

    prompt: Any
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    raw: bool = False
    json_schema: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    strict: bool = True
    whitespace: str = "compact"

    @classmethod
    def coerce(cls, value) -> "Request":
        if isinstance(value, Request):
            return value
        if not isinstance(value, dict):
            raise InvalidArgument(f"a request must be an llmqp.Request or a dict, got {type(value).__name__}")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"unknown request keys: {', '.join(sorted(unknown))}")
        if "prompt" not in value:
            raise InvalidArgument("a request needs a 'prompt'")
        return cls(**value)

    def constraint_kw(self) -> dict:
        return dict(json_schema=self.json_schema, regex=self.regex, choice=self.choice, grammar=self.grammar,
                    strict=self.strict, whitespace=self.whitespace)


class _Row:
    """Mutable state of one request inside the decode loop."""

    def __init__(self, index: int, request: Request, engine: Engine):
        if int(request.max_tokens) != request.max_tokens or request.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be a positive integer, got {request.max_tokens}")
        self.request = request
        self.engine = engine
        self.sampling = SamplingParams(temperature=request.temperature, top_p=request.top_p,
                                       top_k=request.top_k, seed=request.seed)
        kw = request.constraint_kw()
        kinds = [k for k in ("json_schema", "regex", "choice", "grammar") if kw[k] is not None]
        if len(kinds) > 1:
            raise InvalidArgument(f"give at most one constraint, got {', '.join(kinds)}")
        self.compiled = engine.constraint(**kw) if kinds else None
        self.matcher = self.compiled.matcher() if self.compiled is not None else None
        self.prompt_ids = np.asarray(engine.prompt_ids(request.prompt, request.raw), np.int32)
        self.eos = set(engine.tokenizer.eos_ids)
        self.pos = len(self.prompt_ids)
        self.out: list[int] = []
        self.logprobs: list[float] = []
        self.steps: list[StepTrace] = []
        self.finish: str | None = None
        self.slot = 0
        self.prefill_ms = 0.0
        self.t_last = 0.0
        self.t_start = time.perf_counter()
        self.run: list[int] | None = None  # forced tokens this step
        self.allowed: np.ndarray | None = None  # None: every token
        self.new_tokens: list[int] = []
        self.emitted = ""
        self._pending_scored = None

    def plan_step(self, forced: bool, single: bool) -> None:
        """Decide this step: finish, a forced run (several tokens only when `single`), or scoring."""
        self.run, self.allowed, self._pending_scored = None, None, None
        if self.matcher is None:
            return
        if self.matcher.is_done():
            self.finish = "stop"
            return
        run = self.matcher.forced() if forced else []
        if not run:
            allowed = self.matcher.allowed()
            if len(allowed) == 0:  # cannot happen with a consistent backend; never emit garbage
                raise LLMQPError("the constraint allows no token at this point")
            if len(allowed) == 1 and forced:
                run = [int(allowed[0])]
            else:
                self.allowed = allowed
                return
        self.run = list(run) if single else list(run[:1])

    def scored(self, token: int, logprob: float, kind: PlanKind, k: int) -> None:
        self._pending_scored = (token, logprob, kind, k)

    def apply_step(self) -> None:
        self.new_tokens = []
        if self.finish is not None:
            return
        now = time.perf_counter()
        if self.run is not None:
            run = self.run[: self.request.max_tokens - len(self.out)]
            stop_at = next((i for i, t in enumerate(run) if t in self.eos), None)
            tokens = run if stop_at is None else run[:stop_at]
            per_token_ms = (now - self.t_last) * 1e3 / max(len(tokens), 1)
            for t in tokens:
                self.matcher.accept(t)
            self.out.extend(tokens)
            self.logprobs.extend([0.0] * len(tokens))
            self.steps.extend(StepTrace(PlanKind.FORCED.value, 1, per_token_ms) for _ in tokens)
            self.new_tokens = tokens
            if stop_at is not None:
                self.matcher.accept(run[stop_at])
                self.finish = "stop"
        else:
            token, logprob, kind, k = self._pending_scored
            if self.matcher is not None:
                self.matcher.accept(token)
            if token in self.eos:
                self.finish = "stop"
            else:
                self.out.append(token)
                self.logprobs.append(logprob)
                self.steps.append(StepTrace(kind.value, k, (now - self.t_last) * 1e3))
                self.new_tokens = [token]
        self.t_last = now
        if self.finish is None:
            if self.matcher is not None and self.matcher.is_done():
                self.finish = "stop"
            elif len(self.out) >= self.request.max_tokens:
                self.finish = "length"

    def charge_forced_feed(self) -> None:
        """Attribute the multi-token forward of this step's forced run to the run's own tokens."""
        now = time.perf_counter()
        n = len(self.new_tokens)
        extra_ms = (now - self.t_last) * 1e3 / n
        self.steps[-n:] = [StepTrace(s.plan, s.k, s.latency_ms + extra_ms) for s in self.steps[-n:]]
        self.t_last = now

    def out_text_delta(self) -> bool:
        text = self.engine.tokenizer.decode(self.out)
        self._text = text
        return len(text) > len(self.emitted) and text.startswith(self.emitted) and not text.endswith("\ufffd")

    def take_text_delta(self) -> str:
        delta = self._text[len(self.emitted):]
        self.emitted = self._text
        return delta

    def result(self) -> GenerationResult:
        text = self.engine.tokenizer.decode(self.out)
        finish = self.finish or "length"
        valid = True if self.matcher is None else (finish == "stop" and self.matcher.can_stop())
        value = None
        if self.request.json_schema is not None and valid:
            value = json.loads(text)
        decode_ms = (self.t_last - self.t_start) * 1e3
        return GenerationResult(text=text, token_ids=list(self.out), finish_reason=finish, valid=valid,
                                value=value, logprobs=list(self.logprobs), steps=list(self.steps),
                                prompt_tokens=len(self.prompt_ids), prefill_ms=self.prefill_ms,
                                decode_ms=max(decode_ms, 0.0))
