"""The user-facing `Engine`: load a model once, then generate (optionally constrained) or score.

The engine holds the model (params, tokenizer, planner) and turns prompts into token ids; decoding itself is
the scheduler's (`llmqp.core.Scheduler`): `generate`, `stream` and `generate_batch` are thin clients of it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from llmqp.core import memory
from llmqp.core.events import FinishedEvent, TokenEvent
from llmqp.core.prefix import PrefixCache
from llmqp.core.request import ContextLengthError, Request
from llmqp.core.scheduler import Scheduler
from llmqp.core.spec import DEFAULT_SPEC, DecodeSpec, pow2_at_least
from llmqp.errors import ChatTemplateError, PromptError
from llmqp import kernels
from llmqp import plans as plans_mod
from llmqp.model import loader, transformer
from llmqp.planner import Planner
from llmqp.planner.drafts import DraftPlanner
from llmqp.plans import PlanKind
from llmqp.results import GenerationResult
from llmqp.sampling import InvalidArgument

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


def device_params(packed: dict, dtype: str = "float32") -> dict:
    """Numpy params (`llmqp.model.weights.pack_params` layout) -> device arrays. Norm weights stay f32;
    a tied unembedding keeps one device copy."""
    jdtype = jnp.float32 if dtype == "float32" else jnp.bfloat16

    def to_device(path, x):
        norm = any(str(getattr(p, "key", "")).endswith("_norm") for p in path)  # every RMSNorm weight
        return jnp.asarray(x, jnp.float32 if norm else jdtype)

    params = jax.tree_util.tree_map_with_path(to_device, packed)
    if packed["unembed_rows"] is packed["embed"]:
        params["unembed_rows"] = params["embed"]
    return params


class Engine:
    """A loaded model ready to generate.

    `Engine()` loads the embedded SmolLM2-135M-Instruct (first call dequantizes and caches it under
    `llmqp.cache_dir()`); `Engine.from_pretrained(path)` loads a llama GGUF file or a Hugging Face
    directory (Llama, Qwen2). dtype "float32" (default) or "bfloat16" for the weights. `spec` holds the
    decode rules (buckets, thresholds) every path shares (default: `DecodeSpec()`, prefilling in chunks of
    64 where the CPU kernels run). prefix_cache_blocks: how many blocks of prompt prefixes
    (`spec.prefix_block` positions each) to keep for later prompts that start the same way
    (`llmqp.core.prefix`; 0: none); kept only where the CPU kernels make a prefix's keys/values the same bits
    however it was prefilled. devices: a device count or a 1-D
    `jax.sharding.Mesh` to spread the model over (`llmqp.sharding`: the vocabulary matrices split, each
    device scoring only the allowed ids in its range; the trunk replicated) — identical tokens to one device."""

    def __init__(self, model: str | Path | None = None, *, dtype: str = "float32", use_cache: bool = True,
                 spec: DecodeSpec | None = None, devices=None, prefix_cache_blocks: int = 256):
        if dtype not in ("float32", "bfloat16"):
            raise InvalidArgument(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        _enable_compile_cache()
        memory.return_freed_memory()
        t0 = time.perf_counter()
        loaded = loader.load(model, use_cache=use_cache)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.dtype = dtype
        self.params = device_params(loaded.params, dtype)
        # The CPU trunk kernel (llmqp.kernels) where it is built; a sharded engine replicates its packed copy
        # with the rest of the trunk, so it computes the same hidden states as one device.
        self.params = kernels.with_packed_weights(self.params, loaded.params["layers"])
        self.trunk_kernel = any("packed" in layer for layer in self.params["layers"])
        if spec is None:
            # With the CPU kernels, prompts are prefilled in chunks the kernels take (<= 64 positions): 1.26x
            # faster than XLA's 256-position chunks here, a joining request stalls running rows 4x less, and
            # every position's keys/values are the same bits however the prompt is chunked.
            spec = dataclasses.replace(DEFAULT_SPEC, prefill_chunk=kernels.ATTENTION_MAX_T) \
                if self.trunk_kernel else DEFAULT_SPEC
        self.spec = spec
        # Prompt prefixes already prefilled, reused bit for bit: only where the trunk computes every position
        # alone (the CPU kernels take whole prefill chunks), see llmqp.core.prefix.
        if int(prefix_cache_blocks) < 0:
            raise InvalidArgument(f"prefix_cache_blocks must be >= 0, got {prefix_cache_blocks}")
        self.prefix_cache = PrefixCache(spec.prefix_block, int(prefix_cache_blocks)) \
            if self.trunk_kernel and spec.prefill_chunk <= kernels.ATTENTION_MAX_T and prefix_cache_blocks else None
        self.mesh = None
        self.plans = dict(plans_mod.PLANS)
        if devices is not None:
            from llmqp.sharding import place_params

            self.params, self.mesh = place_params(self.params, devices)
            self.plans = plans_mod.sharded_plans(self.mesh)
        self.head = {"unembed": self.params["unembed"], "unembed_rows": self.params["unembed_rows"]}
        if self.trunk_kernel and self.mesh is None:  # the dense head through the CPU kernel too (dense_logits)
            self.head["unembed_packed"] = kernels.pack_device(self.params["unembed"])
        self._planner: Planner | None = None
        self._draft_planner: DraftPlanner | None = None
        self.feed_shapes: set[tuple] = set()  # (batch, width, cache length) of the forwards compiled so far
        self.load_seconds = time.perf_counter() - t0
        self.loaded_from_cache = loaded.from_cache
        self.all_ids = np.arange(self.config.vocab_size, dtype=np.int32)
        self.all_ids.setflags(write=False)

    @property
    def device_kind(self) -> str:
        return jax.devices()[0].device_kind

    @property
    def planner(self) -> Planner:
        """The plan="auto" policy for this (model, device, dtype): a contextual bandit over measured head
        latencies, loaded from the cache directory on first use and saved after every generation that used
        it. Its exploration never changes outputs (every plan is equivalent), only latency. Generations with a
        fixed plan neither load nor save it."""
        if self._planner is None:
            self._planner = Planner.load(self.config.name, self.device_kind, dtype=self.dtype,
                                         vocab_size=self.vocab_size, hidden_size=self.config.hidden_size)
        return self._planner

    @property
    def draft_planner(self) -> DraftPlanner:
        """The draft="auto" policy: which draft length wins per step context, learned from latency per
        emitted token, persisted beside the plan planner."""
        if self._draft_planner is None:
            # Keyed by the trunk too: the CPU kernel changes what a multi-token forward costs against a step.
            trunk = self.dtype + ("+cpu_kernel" if self.trunk_kernel else "")
            self._draft_planner = DraftPlanner.load(self.config.name, self.device_kind, trunk)
        return self._draft_planner

    def save_planner(self) -> None:
        """Persist what the planners learned (a no-op when they were never used)."""
        for planner in (self._planner, self._draft_planner):
            if planner is not None:
                try:
                    planner.save()
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
        """Token ids for a prompt. A string is one user message through the model's chat template unless
        raw=True (then it is plain text, with BOS first when the model expects one); a list of
        {"role", "content"} messages always uses the template. Only the template inserts control tokens: text
        that looks like one (`<|im_end|>`) inside a message or a raw prompt is encoded as plain text.
        Raises ChatTemplateError when a template is needed and the model has none, PromptError for an empty
        prompt or text that is not valid Unicode, InvalidArgument for a prompt of the wrong type."""
        tk = self.tokenizer
        if isinstance(prompt, str):
            if raw:
                ids = ([tk.bos_id] if tk.add_bos else []) + tk.encode(prompt)
            else:
                ids = self._chat_ids([{"role": "user", "content": prompt}])
        elif isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            if raw:
                raise InvalidArgument("raw=True needs a string prompt, not a list of messages")
            ids = self._chat_ids(prompt)
        else:
            raise InvalidArgument("prompt must be a string or a list of {'role': str, 'content': str} dicts")
        if not ids or (tk.add_bos and raw and len(ids) == 1):
            raise PromptError("the prompt is empty")
        return ids

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.has_chat_template:
            raise ChatTemplateError(f"{self.config.name} has no chat template: pass raw=True to use the prompt "
                                    "as plain text")
        return self.tokenizer.encode_chat(messages)

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raises ContextLengthError when prompt + max_tokens does not fit the model's context."""
        if prompt_tokens + max_tokens > self.config.max_position:
            raise ContextLengthError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                f"{self.config.max_position} tokens")

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
        added: the ids are used as given. The analysis / debugging entry point (it computes the full head at
        every position: not how generation prefills)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise InvalidArgument("token_ids is empty")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.vocab_size})")
        self.check_context(len(ids), 0)
        ids = ids.astype(np.int32)
        cache = transformer.init_cache(self.config, 1, self.spec.cache_len(len(ids), 0),
                                       transformer.cache_dtype(self.params))
        hiddens = []
        for start, width in self.spec.prefill_chunks(len(ids)):
            chunk = ids[start : start + width]
            tokens = np.zeros((1, width), np.int32)
            tokens[0, : len(chunk)] = chunk
            hidden, cache = transformer.forward_jit(self.params, cache, jnp.asarray(tokens),
                                                    jnp.asarray([start], jnp.int32), cfg=self.config)
            hiddens.append(hidden[0, : len(chunk)])
        out = transformer.dense_logits_jit(self.head, jnp.concatenate(hiddens, axis=0))
        return np.asarray(out, dtype=np.float32)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, raw: bool = False, json_schema=None, regex=None, choice=None,
                 grammar=None, strict: bool = True, whitespace: str = "compact", plan: str = "auto",
                 forced: bool = True, compiled: bool | str = False, stop: list[str] | None = None,
                 top_logprobs: int = 0, draft: str = "auto", amortize: str = "none", amortize_tau: float = 3.0,
                 amortize_lambda: float = 0.5, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate one completion (a scheduler with one slot, driven to the end).

        Constraints: at most one of json_schema (dict, JSON string or Pydantic model class), regex, choice
        (list of strings), grammar (Lark; GBNF accepted). plan: "auto" (the default: learned per step) |
        "dense" | "sparse" — every plan gives the same tokens, only speed differs. forced=True emits tokens
        that the constraint forces without scoring them, feeding a run of them through one multi-token
        forward. compiled=True (or "auto") runs regular constraints (regex, choice, JSON schemas that reduce
        to a finite automaton) in the fused on-device loop — one `lax.while_loop`, no host round trip per
        token, identical tokens — and otherwise falls back to the host loop with `compiled=False` and
        `compiled_reason` set in the result. draft: "auto" (default: the planner chooses how many tokens to
        draft per step, by prompt lookup, verified in one multi-token forward), "none", "forced" or "lookup"
        (`llmqp.core.drafts`) — outputs are identical whatever the choice; the result's `drafts` reports drafted and accepted tokens.
        amortize="margin" (lossy, opt-in; see `Request`) may emit confident lookup drafts without verification
        (`result.unverified_tokens`, `result.disagreement_rate`). stop: strings that end the generation (cut from
        the text).
        on_text receives text deltas as they are produced. Raises what went wrong (ConstraintError,
        PromptError, InvalidArgument...) instead of returning an error result."""
        request = Request(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, raw=raw, json_schema=json_schema, regex=regex, choice=choice,
                          grammar=grammar, strict=strict, whitespace=whitespace, plan=plan, forced=forced,
                          compiled=compiled, stop=stop, top_logprobs=top_logprobs, draft=draft,
                          amortize=amortize, amortize_tau=amortize_tau, amortize_lambda=amortize_lambda)
        for event in (events := _Single(self, request)):
            if on_text is not None and event.text:
                on_text(event.text)
        return events.result

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Like `generate`, but yields text deltas as they are produced; returns the GenerationResult
        as the generator's return value. Their concatenation equals `result.text`."""
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(Request)}
        if unknown:
            raise InvalidArgument(f"unknown stream() options: {', '.join(sorted(unknown))}")
        for event in (events := _Single(self, Request.coerce(dict(kwargs, prompt=prompt)))):
            if event.text:
                yield event.text
        return events.result

    def generate_batch(self, requests, *, plan: str | None = None, forced: bool | None = None,
                       max_slots: int | None = None) -> list[GenerationResult]:
        """Generate several completions with continuous batching: each request (an `llmqp.Request` or a dict
        with the same keys) has its own prompt, constraint, sampling settings and max_tokens. Results come
        back in request order and equal what `generate` gives for each request alone. A request that fails
        on its own (a bad schema, a prompt too long, a bad option) comes back with finish_reason="error" and
        `error` set; the others are unaffected. plan / forced, when given, override every request's own.
        max_slots: rows decoded at once (default: the number of requests, at most 32)."""
        if isinstance(requests, (Request, dict)) or not hasattr(requests, "__iter__"):
            raise InvalidArgument("requests must be a list of llmqp.Request or dicts")
        items = list(requests)
        if not items:
            return []
        overrides = {k: v for k, v in (("plan", plan), ("forced", forced)) if v is not None}
        reqs: list[Request | Exception] = []
        for item in items:
            try:
                r = Request.coerce(item)
                reqs.append(dataclasses.replace(r, **overrides) if overrides else r)
            except Exception as e:  # noqa: BLE001 - reported as that row's error result
                reqs.append(e)
        slots = max_slots or min(pow2_at_least(len(items)), 32)
        events = self._drive(Scheduler(self, max_slots=slots), reqs)
        while True:
            try:
                next(events)
            except StopIteration as done:
                return [event.result for event in done.value]

    def _drive(self, scheduler: Scheduler, requests: list):
        """Add the requests, step the scheduler until all are finished, yield each TokenEvent; returns the
        FinishedEvents in request order (invalid requests become error results without running)."""
        finished: dict[str, FinishedEvent] = {}
        order = []
        for i, r in enumerate(requests):
            rid = f"{i}"
            order.append(rid)
            try:
                if isinstance(r, Exception):
                    raise r
                scheduler.add_request(r, request_id=rid)
            except Exception as e:  # noqa: BLE001
                finished[rid] = FinishedEvent(rid, GenerationResult(text="", token_ids=[], finish_reason="error",
                                                                    valid=False, error=str(e)), e)
        try:
            while scheduler.has_work():
                for event in scheduler.step():
                    if isinstance(event, TokenEvent):
                        yield event
                    else:
                        finished[event.request_id] = event
        finally:
            self.save_planner()
        return [finished[rid] for rid in order]

    def applicable_plans(self, k_max: int, k_union: int, batch: int) -> list[PlanKind]:
        """The plans worth considering for a step (the spec's rule)."""
        return [PlanKind(a) for a in self.spec.applicable_plans(k_max, k_union, batch, self.vocab_size)]

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


class _Single:
    """One request through a one-slot scheduler: iterating yields its TokenEvents; afterwards `result` holds
    the GenerationResult. A request that failed re-raises its original exception at the end."""

    def __init__(self, engine: Engine, request: Request):
        self._events = engine._drive(Scheduler(engine, max_slots=1), [request])
        self.result: GenerationResult | None = None

    def __iter__(self):
        finished = yield from self._events
        if finished[0].exception is not None:
            raise finished[0].exception
        self.result = finished[0].result
