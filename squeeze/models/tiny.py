"""Tiny random models of every architecture squeeze supports, built from transformers' own config
classes: two blocks, hidden size 64. No download; the coverage tests and the coverage benchmark
(benchmarks/arch_coverage.py) run every method over them.

Each entry keeps what makes its architecture different (Gemma's sliding-window layers and
sandwich norms, Phi-3's fused projections, GPT-2's Conv1D, Falcon's parallel attention,
mixture-of-experts routing, encoder-decoders) and shrinks the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from squeeze.errors import SqueezeError

HIDDEN = 64
LAYERS = 2


def _decoder(**extra: Any) -> dict[str, Any]:
    sizes = dict(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return {**sizes, **extra}


# name → (config class, model class, config keyword arguments); vocab size and pad token are added
ARCHITECTURES: dict[str, tuple[str, str, Callable[[], dict[str, Any]]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", lambda: _decoder(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", lambda: _decoder(sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda: _decoder()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda: _decoder(head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        lambda: _decoder(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        lambda: _decoder(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", lambda: _decoder()),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", lambda: _decoder()),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", lambda: dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256)),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        lambda: dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                     max_position_embeddings=256, use_parallel_residual=True),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        lambda: dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, parallel_attn=True,
                     new_decoder_architecture=False, multi_query=True, bias=False, alibi=False),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        lambda: _decoder(num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        lambda: _decoder(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                         decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        lambda: dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                     max_position_embeddings=256),
    ),
    "modernbert": (
        "ModernBertConfig",
        "ModernBertModel",
        lambda: dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                     max_position_embeddings=256, global_attn_every_n_layers=2, local_attention=16),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        lambda: dict(d_model=HIDDEN, d_ff=128, d_kv=16, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0),
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        lambda: dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256),
    ),
}


def tiny_model(architecture: str, vocab_size: int, pad_token_id: int | None = 0, seed: int = 0) -> torch.nn.Module:
    """A random ``architecture`` model (a key of :data:`ARCHITECTURES`) in eval mode, float32."""
    if architecture not in ARCHITECTURES:
        raise SqueezeError(f"unknown tiny architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")
    config_name, model_name, options = ARCHITECTURES[architecture]
    special = {f"{kind}_token_id": pad_token_id for kind in ("bos", "eos", "cls", "sep")}
    config = getattr(transformers, config_name)(vocab_size=vocab_size, pad_token_id=pad_token_id, **special, **options())
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # random init leaves norms at their neutral value; perturb them so that a wrong fold shows
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name.lower():
                param.add_(torch.randn_like(param) * 0.2)
    return model


def save_tiny_model(architecture: str, out: Path, tokenizer: transformers.PreTrainedTokenizerBase, seed: int = 0) -> Path:
    """:func:`tiny_model` with ``tokenizer``'s vocabulary, saved in ``out`` (safetensors) with the tokenizer."""
    model = tiny_model(architecture, tokenizer.vocab_size, tokenizer.pad_token_id, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
