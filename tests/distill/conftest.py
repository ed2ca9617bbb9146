"""Fixtures for distillation: a 4-block tiny Llama and a small training text."""

from __future__ import annotations

from pathlib import Path

import pytest

from squeeze.data import load_documents


@pytest.fixture(scope="session")
def tiny_llama4_dir(make_tiny_llama) -> Path:
    """A 4-block, hidden-64 random Llama with tied embeddings and the MiniLM tokenizer."""
    return make_tiny_llama(4, 1)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 60 BBC articles as one .txt file: enough for a few dozen 32-token windows each side."""
    out = tmp_path_factory.mktemp("text") / "news.txt"
    out.write_text("\n\n".join(load_documents("bbc")[:60]))
    return out
