"""Run an exported llmqp artifact with JAX, numpy, tokenizers, safetensors and jinja2 alone.

No constraint backend, no llmqp model code: the decode loop, the model and the automaton are all in
the serialized module (see `llmqp.compiled.export`). This file imports nothing from llmqp, and the
exporter copies it into the artifact as `run.py`, so an artifact runs where llmqp is not installed:

    python DIR/run.py DIR [--prompt TEXT] [--seed N] [--json]

From Python: `load_exported(DIR).generate(prompt=None)`; prompt None reuses the exported prompt.

Errors: an unreadable artifact (missing directory or file, corrupt manifest, module or weights, a
format version or platform this runtime does not run) raises `ArtifactError`; a prompt the artifact
cannot take raises `ArtifactInputError` (also a ValueError). Where llmqp is importable both derive from
`llmqp.LLMQPError`, so `llmqp run-exported` prints them as one line; inside an artifact they derive from
Exception.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    from llmqp.errors import LLMQPError as _Base
except ImportError:  # running as run.py inside an artifact, without llmqp
    _Base = Exception

FORMAT = "llmqp-export"
FORMAT_VERSION = 1


class ArtifactError(_Base):
    """The directory is not a readable artifact of a format version this runtime knows."""


class ArtifactInputError(ValueError, _Base):
    """A prompt or seed this artifact cannot take (empty, longer than its prompt bucket, ...)."""


@dataclasses.dataclass(frozen=True)
class ExportedResult:
    """text: decoded output (special tokens removed); finish_reason: "stop" or "length"; valid: the
    output is complete under the exported constraint."""

    text: str
    token_ids: list[int]
    finish_reason: str
    valid: bool
    logprobs: list[float]


class ExportedGenerator:
    """A loaded artifact. Loading reads ~all of the weights into device memory once; `generate` runs
    the exported function (compiled on first call per process)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ArtifactError(f"{self.directory}: no such artifact directory")
        try:
            self.manifest = json.loads((self.directory / "manifest.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{self.directory}: no readable manifest.json ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{self.directory}: manifest.json is not an {FORMAT} manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{self.directory}: format version {self.manifest.get('format_version')!r}; this "
                                f"runtime reads version {FORMAT_VERSION}")
        try:
            self._load()
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as e:  # a manifest missing a field, or of the wrong type
            raise ArtifactError(f"{self.directory}: corrupt manifest.json ({type(e).__name__}: {e})") from None
        except Exception as e:  # unreadable or corrupt module, weights or tokenizer file
            raise ArtifactError(f"{self.directory}: cannot load the artifact ({type(e).__name__}: {e})") from None
        self._template = None

    def _load(self) -> None:
        from jax import export as jax_export
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        fn = self.manifest["function"]
        for name in (fn["file"], self.manifest["weights"]["file"], self.manifest["tokenizer"]["file"]):
            if not (self.directory / name).is_file():
                raise ArtifactError(f"{self.directory}: {name} is missing")
        try:
            self.exported = jax_export.deserialize(bytearray((self.directory / fn["file"]).read_bytes()))
        except Exception as e:  # noqa: BLE001 - flatbuffers and jax raise assorted types on a corrupt file
            raise ArtifactError(f"{self.directory}: {fn['file']} is not a readable serialized module "
                                f"({type(e).__name__}: {e})") from None
        if jax.default_backend() not in self.exported.platforms:
            raise ArtifactError(f"artifact lowered for {list(self.exported.platforms)}, this machine runs "
                                f"{jax.default_backend()}")
        weights = load_file(str(self.directory / self.manifest["weights"]["file"]))
        expected = self.manifest["weights"]["tensors"]
        if set(weights) != set(expected):
            raise ArtifactError(f"weights.safetensors holds {sorted(set(weights) ^ set(expected))[:5]} "
                                "differently from the manifest")
        for name, meta in expected.items():
            if list(weights[name].shape) != meta["shape"] or str(weights[name].dtype) != meta["dtype"]:
                raise ArtifactError(f"tensor {name}: {weights[name].shape} {weights[name].dtype}, manifest says "
                                    f"{meta['shape']} {meta['dtype']}")
        rows = weights.get("unembed_rows", weights["embed"])
        weights["unembed"] = np.ascontiguousarray(rows.T)
        self._weights = {k: jax.device_put(v) for k, v in weights.items()}
        self.tokenizer = Tokenizer.from_file(str(self.directory / self.manifest["tokenizer"]["file"]))
        self.bucket = int(fn["inputs"]["prompt_ids"]["shape"][0])
        self._call = jax.jit(self.exported.call)
        # "eos" and "done" both stop: the output ended where the constraint allows it to
        self._finish_names = {code: "length" if name == "length" else "stop"
                              for code, name in fn["outputs"]["finish"]["values"].items()}

    # ------------------------------------------------------------------ prompts
    def render(self, messages: list[dict]) -> str:
        """The chat template stored in the manifest, rendered like the exporting engine did."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ArtifactInputError(f"the chat template rejected the messages: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.manifest["tokenizer"]["chat_template"])
        tok = self.manifest["tokenizer"]
        return self._template.render(messages=messages, add_generation_prompt=True, bos_token=tok["bos_token"],
                                     eos_token=tok["eos_token"])

    def prompt_ids(self, prompt=None) -> list[int]:
        """Token ids for `prompt` (a string: one user message, templated unless the export was raw; a
        list of {"role", "content"} messages), or the exported prompt's ids when None."""
        if prompt is None:
            return list(self.manifest["prompt"]["token_ids"])
        if isinstance(prompt, str):
            text = prompt if self.manifest["prompt"]["raw"] else self.render([{"role": "user", "content": prompt}])
        else:
            text = self.render(list(prompt))
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------ generation
    def generate(self, prompt=None, *, seed: int | None = None) -> ExportedResult:
        """Run the artifact. seed None uses the exported seed (it only matters when sampling)."""
        ids = self.prompt_ids(prompt)
        if not ids:
            raise ArtifactInputError("the prompt is empty")
        if len(ids) > self.bucket:
            raise ArtifactInputError(f"the prompt has {len(ids)} tokens; this artifact takes at most {self.bucket}")
        if seed is not None and not 0 <= int(seed) < 2**32:
            raise ArtifactInputError(f"seed must be in [0, 2**32), got {seed}")
        padded = np.zeros(self.bucket, np.int32)
        padded[: len(ids)] = ids
        seed = self.manifest["sampling"]["seed"] if seed is None else int(seed)
        out = jax.device_get(self._call(self._weights, jnp.asarray(padded), jnp.int32(len(ids)), jnp.uint32(seed)))
        count = int(out["count"])
        tokens = [int(t) for t in out["tokens"][:count]]
        finish = self._finish_names.get(str(int(out["finish"])), "length")
        return ExportedResult(text=self.tokenizer.decode(tokens, skip_special_tokens=True), token_ids=tokens,
                              finish_reason=finish, valid=finish == "stop" and bool(out["final"]),
                              logprobs=[float(x) for x in out["logprobs"][:count]])

    def check(self) -> list[str]:
        """Differences between a run on the exported prompt and the export-time result recorded in the
        manifest (empty when they agree): the artifact's golden self-test."""
        return compare(self.manifest["expected"], self.generate())


def compare(expected: dict, got: ExportedResult) -> list[str]:
    """Field-by-field differences between an expected result (manifest "expected" form) and `got`."""
    problems = []
    for name in ("token_ids", "text", "finish_reason", "valid"):
        if expected[name] != getattr(got, name):
            problems.append(f"{name}: expected {expected[name]!r}, got {getattr(got, name)!r}")
    return problems


def load_exported(directory) -> ExportedGenerator:
    """Load an artifact directory written by `llmqp export` / `llmqp.compiled.export`."""
    return ExportedGenerator(directory)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("directory", help="artifact directory written by `llmqp export`")
    parser.add_argument("--prompt", default=None, help="a new prompt (default: the exported one)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the exported one)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--check", action="store_true",
                        help="run the exported prompt and compare with the export-time result")
    return parser


def run(args) -> int:
    """Run an artifact from parsed arguments (see `add_arguments`); prints the text or JSON. Exit code 0,
    or 1 when --check finds a difference."""
    gen = load_exported(args.directory)
    if args.check:
        problems = gen.check()
        print("\n".join(problems) if problems else "ok: matches the export-time result")
        return 1 if problems else 0
    result = gen.generate(args.prompt, seed=args.seed)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), ensure_ascii=False))
    else:
        print(result.text)
        if not result.valid:
            print(f"[finish_reason={result.finish_reason}, valid=False]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
