"""Tiny random models of every architecture in squeeze.models.tiny, saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from squeeze.models.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_arch_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer):
    """``tiny_arch_dir(architecture)`` → the folder of that tiny model (built on first use)."""
    made: dict[str, Path] = {}

    def folder(architecture: str) -> Path:
        if architecture not in made:
            made[architecture] = save_tiny_model(architecture, tmp_path_factory.mktemp(architecture), minilm_tokenizer)
        return made[architecture]

    return folder
