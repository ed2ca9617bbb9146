"""What llama.cpp reads from a GGUF file besides the tensors: the architecture's hyperparameters,
its tensor names and layouts, and the tokenizer.

Only what squeeze can write exactly is accepted; everything else is refused in one line before
any work (:func:`check_architecture`, :func:`tokenizer_metadata`).

- Architectures: Llama and Mistral (GGUF architecture ``llama``). Their q/k projections are
  stored with llama.cpp's row order for rotary embeddings (:func:`permute_rows`), as llama.cpp's
  own converter does; transformers' GGUF loader undoes it.
- Tokenizers: byte-level BPE (GPT-2's scheme, SmolLM2's), with the pre-tokenizer split
  llama.cpp names ``gpt-2`` or ``smollm`` (digits one by one, then GPT-2's split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import gguf
import torch

from squeeze.errors import SqueezeError

# transformers' model_type -> GGUF architecture, for the architectures the writer handles
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
# tensors whose rows llama.cpp's rotary embedding reads in interleaved pairs
_PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def check_architecture(config: Any) -> None:
    """Raise SqueezeError unless the writer handles the model of ``config`` completely."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SqueezeError(
            f"--format gguf writes {', '.join(sorted(ARCHITECTURES))} models (GGUF architecture llama), not {model_type!r}; "
            "use --format compressed-tensors or gptq"
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise SqueezeError(
            f"--format gguf does not write rope scaling {rope.get('rope_type')!r} yet (only unscaled rotary embeddings); "
            "use --format compressed-tensors"
        )


def _rope(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def architecture_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """The hyperparameters llama.cpp reads for the ``llama`` architecture, from ``config``."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = _head_dim(config)
    theta = _rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def tensor_names(config: Any) -> gguf.TensorNameMap:
    """transformers' tensor names -> GGUF's, for ``config``'s architecture."""
    return gguf.get_tensor_name_map(ARCHITECTURES[config.model_type], config.num_hidden_layers)


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """The GGUF name of the transformers tensor ``hf_name`` (a bug if it has none: the architecture check ran)."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for tensor {hf_name}")
    return name


def permute_rows(name: str, rows: torch.Tensor | Any, config: Any) -> Any:
    """``rows`` (a q or k projection's weight, bias, codes or scales, first axis = output rows) in
    llama.cpp's order: within each head, rotary pairs (i, i + d/2) become neighbours (2i, 2i + 1).
    Other tensors are returned as they are."""
    kind = name.split(".")[-2] if name.count(".") >= 2 else ""
    if kind not in _PERMUTED:
        return rows
    heads = getattr(config, _PERMUTED[kind], None) or config.num_attention_heads
    shape = rows.shape
    grouped = rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
    return grouped.swapaxes(1, 2).reshape(shape)


@dataclass
class TokenizerMetadata:
    """A byte-level BPE tokenizer in GGUF's words (``tokenizer.ggml.*``)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> token id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer it splits the same way, or None."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or not byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return None


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> TokenizerMetadata:
    """The GGUF tokenizer metadata of a transformers fast ``tokenizer`` for a model of
    ``vocab_size`` embedding rows (the token list is padded to it, as llama.cpp's converter pads).
    SqueezeError when GGUF's byte-level BPE cannot express it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SqueezeError("--format gguf needs the model's fast tokenizer (tokenizer.json); this model has none")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or spec.get("normalizer") or pre is None:
        found = f"{model.get('type')} model, {(spec.get('pre_tokenizer') or {}).get('type')} pre-tokenizer, {decoder.get('type')} decoder"
        raise SqueezeError(
            "--format gguf writes byte-level BPE tokenizers split as GPT-2 or SmolLM2 split text; "
            f"this tokenizer ({found}) has no GGUF form squeeze can write"
        )
    by_id = {int(i): token for token, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    for token_id, entry in added.items():
        by_id[token_id] = entry["content"]
    if max(by_id) >= vocab_size or len(by_id) != max(by_id) + 1:
        raise SqueezeError(
            f"--format gguf: the tokenizer's ids (0..{max(by_id)}, {len(by_id)} tokens) do not fit the model's {vocab_size} embedding rows"
        )
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id in by_id:
            tokens.append(by_id[token_id])
            entry = added.get(token_id)
            types.append(gguf.TokenType.NORMAL if entry is None else gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        kind: token_id
        for kind, token_id in (
            ("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id),
        )
        if token_id is not None
    }
    probe = tokenizer("a").input_ids
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerMetadata(
        pre=pre, tokens=tokens, token_types=[int(t) for t in types], merges=merges, special=special,
        add_bos=bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        add_eos=bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
        chat_template=template if isinstance(template, str) else None,
    )
