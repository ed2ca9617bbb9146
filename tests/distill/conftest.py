"""Fixtures for distillation: a 4-block tiny Llama, a small training text, and a fast run helper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from squeeze.data import load_documents


@pytest.fixture(scope="session")
def tiny_llama4_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer) -> Path:
    """A 4-block, hidden-64 random Llama with tied embeddings and the MiniLM tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=minilm_tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_llama4")
    model.save_pretrained(out, safe_serialization=True)
    minilm_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 60 BBC articles as one .txt file: enough for a few dozen 32-token windows each side."""
    out = tmp_path_factory.mktemp("text") / "news.txt"
    out.write_text("\n\n".join(load_documents("bbc")[:60]))
    return out
