"""The user-facing `Engine`: load a model once, then generate (optionally constrained) or score.

The host-stepped decode loop lives here: prefill → [constraint mask → plan → sample → trunk step]*.
"""

from __future__ import annotations

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
from llmqp.plans import PlanKind
from llmqp.results import GenerationResult, StepTrace
from llmqp.sampling import InvalidArgument, SamplingParams

PREFILL_CHUNK = 512  # longest prompt chunk run in one forward
MIN_CACHE = 512
# Below this many allowed tokens `plan="auto"` scores sparsely. Measured on SmolLM2/CPU: sparse still wins
# at K=8192 (DESIGN.md); above V/4 the gather stops paying for itself on every shape we measured.
AUTO_SPARSE_MAX_FRACTION = 0.25

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
        self.load_seconds = time.perf_counter() - t0
        self.loaded_from_cache = loaded.from_cache
        self._all_ids = np.arange(self.config.vocab_size, dtype=np.int32)
        # Unconstrained steps reuse one device copy of "every id allowed".
        self._all_ids_dev = jnp.asarray(self._all_ids[None, :])
        self._all_valid_dev = jnp.ones((1, self.config.vocab_size), bool)

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
        hidden = self._prefill(ids.astype(np.int32), extra=0, keep_all=True)[0]
        out = transformer.dense_logits_jit(self.head, hidden)
        return np.asarray(out, dtype=np.float32)

    def _prefill(self, ids: np.ndarray, extra: int, keep_all: bool = False):
        """Run the prompt through the trunk in bucketed chunks. Returns (hidden, cache, cache_len) where
        hidden is (n, d) for keep_all or the last position's (1, d)."""
        n = len(ids)
        chunks = [(s, ids[s : s + PREFILL_CHUNK]) for s in range(0, n, PREFILL_CHUNK)]
        last_len = _pow2_at_least(len(chunks[-1][1]), 16)
        cache_len = _pow2_at_least(max(chunks[-1][0] + last_len, n + extra), MIN_CACHE)
        if n + extra > self.config.max_position:
            raise InvalidArgument(f"prompt ({n} tokens) + max_tokens ({extra}) exceeds the model's context "
                                  f"of {self.config.max_position} tokens")
        cache = transformer.init_cache(self.config, 1, cache_len, self.params["embed"].dtype)
        hiddens = []
        for start, chunk in chunks:
            padded = np.zeros((1, _pow2_at_least(len(chunk), 16)), np.int32)
            padded[0, : len(chunk)] = chunk
            hidden, cache = transformer.forward_jit(self.params, cache, jnp.asarray(padded),
                                                    jnp.asarray([start], jnp.int32), cfg=self.config)
            hiddens.append(hidden[0, : len(chunk)] if keep_all else hidden[:, len(chunk) - 1])
        hidden = jnp.concatenate(hiddens, axis=0) if keep_all else hiddens[-1]
        return hidden, cache, cache_len

    def _feed(self, cache, tokens: list[int], pos: int):
        """Feed tokens at positions pos.. through the trunk in power-of-two chunks (no padding, so each
        chunk fits the cache exactly). Returns (hidden of the last token (1, d), cache)."""
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
                 forced: bool = True, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate a completion. See the README for every option.

        Constraints: at most one of json_schema (dict, JSON string or Pydantic model class), regex, choice
        (list of strings), grammar (Lark; GBNF accepted). plan: "auto" | "dense" | "sparse" — all give the
        same tokens, only speed differs. forced=True feeds runs of forced tokens through one multi-token
        forward without scoring. on_text receives text deltas as they are produced (streaming)."""
        events = self._run(prompt, max_tokens=max_tokens, sampling=SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed), raw=raw,
            constraint_kw=dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar,
                               strict=strict, whitespace=whitespace), plan=plan, forced=forced)
        while True:
            try:
                delta = next(events)
            except StopIteration as stop:
                return stop.value
            if on_text is not None and delta:
                on_text(delta)

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Like `generate`, but yields text deltas as they are produced."""
        result = yield from self._run_kw(prompt, **kwargs)
        return result

    def _run_kw(self, prompt, *, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=0, raw=False,
                json_schema=None, regex=None, choice=None, grammar=None, strict=True, whitespace="compact",
                plan="auto", forced=True):
        return self._run(prompt, max_tokens=max_tokens, sampling=SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed), raw=raw,
            constraint_kw=dict(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar,
                               strict=strict, whitespace=whitespace), plan=plan, forced=forced)

    def _resolve_plan(self, plan) -> PlanKind:
        try:
            kind = PlanKind(plan)
        except ValueError:
            raise InvalidArgument(f"plan must be 'auto', 'dense' or 'sparse', got {plan!r}") from None
        if kind is PlanKind.FORCED:
            raise InvalidArgument("plan='forced' cannot be chosen: forced steps happen by themselves "
                                  "whenever the constraint allows exactly one token")
        return kind

    def choose_plan(self, plan: PlanKind, k: int) -> PlanKind:
        """The plan a step with K allowed tokens runs under `plan`."""
        if plan is not PlanKind.AUTO:
            return plan
        return PlanKind.SPARSE if k <= AUTO_SPARSE_MAX_FRACTION * self.vocab_size else PlanKind.DENSE

    def _run(self, prompt, *, max_tokens: int, sampling: SamplingParams, raw: bool, constraint_kw: dict,
             plan, forced: bool):
        """Generator: yields text deltas, returns the GenerationResult."""
        if int(max_tokens) != max_tokens or max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be a positive integer, got {max_tokens}")
        plan_kind = self._resolve_plan(plan)
        kinds = [k for k in ("json_schema", "regex", "choice", "grammar") if constraint_kw[k] is not None]
        if len(kinds) > 1:
            raise InvalidArgument(f"give at most one constraint, got {', '.join(kinds)}")
        compiled = self.constraint(**constraint_kw) if kinds else None
        matcher = compiled.matcher() if compiled is not None else None
        ids = np.asarray(self.prompt_ids(prompt, raw), np.int32)

        t0 = time.perf_counter()
        hidden, cache, cache_len = self._prefill(ids, extra=max_tokens)
        hidden.block_until_ready()
        prefill_ms = (time.perf_counter() - t0) * 1e3

        eos = set(self.tokenizer.eos_ids)
        out: list[int] = []
        logprobs: list[float] = []
        steps: list[StepTrace] = []
        pos = len(ids)  # position of the next token to feed
        finish = "length"
        seed_arr = jnp.asarray([sampling.seed], jnp.uint32)
        temp_arr = jnp.asarray([sampling.temperature], jnp.float32)
        topk_arr = jnp.asarray([sampling.top_k], jnp.int32)
        topp_arr = jnp.asarray([sampling.top_p], jnp.float32)
        emitted_text = ""
        t_decode = time.perf_counter()
        t_last = t_decode
        while len(out) < max_tokens:
            if matcher is not None and matcher.is_done():
                finish = "stop"
                break
            run = matcher.forced() if (matcher is not None and forced) else []
            allowed = None
            if matcher is not None and not run:
                allowed = matcher.allowed()
                if len(allowed) == 0:  # cannot happen with a consistent backend; never emit garbage
                    raise LLMQPError("the constraint allows no token at this point")
                if len(allowed) == 1 and forced:
                    run = [int(allowed[0])]
            if run:
                run = run[: max_tokens - len(out)]
                stop_at = next((i for i, t in enumerate(run) if t in eos), None)
                eos_token = run[stop_at] if stop_at is not None else None
                if stop_at is not None:
                    run = run[:stop_at]
                for t in run:
                    matcher.accept(t)
                out.extend(run)
                logprobs.extend([0.0] * len(run))
                if stop_at is not None:
                    matcher.accept(eos_token)
                    finish = "stop"
                elif len(out) < max_tokens and not matcher.is_done():
                    hidden, cache = self._feed(cache, run, pos)
                    hidden.block_until_ready()
                pos += len(run)
                now = time.perf_counter()
                steps.extend(StepTrace(PlanKind.FORCED.value, 1, (now - t_last) * 1e3 / max(len(run), 1))
                             for _ in run)
                t_last = now
            else:
                row = self._all_ids if allowed is None else allowed
                kind = self.choose_plan(plan_kind, len(row))
                if allowed is None:
                    ids_pad, valid = self._all_ids_dev, self._all_valid_dev
                else:
                    ids_pad, valid = (jnp.asarray(a) for a in plans_mod.pad_allowed([row], self.vocab_size))
                index, logprob = plans_mod.score_and_select(
                    self.head, hidden, ids_pad, valid, seed_arr,
                    jnp.asarray([len(out)], jnp.int32), temp_arr, topk_arr, topp_arr,
                    plan=plans_mod.PLANS[kind], greedy=sampling.greedy)
                token = int(row[int(index[0])])
                logprobs.append(float(logprob[0]))
                now = time.perf_counter()
                steps.append(StepTrace(kind.value, len(row), (now - t_last) * 1e3))
                t_last = now
                if token in eos:
                    if matcher is not None:
                        matcher.accept(token)
                    finish = "stop"
                    logprobs.pop()  # the EOS is not part of the output
                    steps.pop()
                    break
                out.append(token)
                if matcher is not None:
                    matcher.accept(token)
                if len(out) < max_tokens and not (matcher is not None and matcher.is_done()):
                    hidden, cache = transformer.decode_step(self.params, cache, jnp.asarray([token], jnp.int32),
                                                            jnp.asarray([pos], jnp.int32), cfg=self.config)
                pos += 1
            text = self.tokenizer.decode(out)
            if not text.endswith("\ufffd") and len(text) > len(emitted_text) and text.startswith(emitted_text):
                yield text[len(emitted_text):]
                emitted_text = text
            if finish == "stop":
                break
        decode_ms = (time.perf_counter() - t_decode) * 1e3
        text = self.tokenizer.decode(out)
        if len(text) > len(emitted_text) and text.startswith(emitted_text):
            yield text[len(emitted_text):]
        if matcher is not None and finish == "length" and matcher.is_done():
            finish = "stop"
        valid = True if matcher is None else (finish == "stop" and matcher.can_stop())
        value = None
        if compiled is not None and constraint_kw["json_schema"] is not None and valid:
            value = json.loads(text)
        return GenerationResult(text=text, token_ids=out, finish_reason=finish, valid=valid, value=value,
                                logprobs=logprobs, steps=steps, prompt_tokens=len(ids), prefill_ms=prefill_ms,
                                decode_ms=decode_ms)
