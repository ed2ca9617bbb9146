"""A Llama-architecture model with random weights at a chosen depth and width, for memory and time.

    python benchmarks/synthetic_model.py OUT [--layers 32] [--hidden 4096] [--intermediate 14336]
        [--heads 32] [--kv-heads 8] [--max-shard-size 2GB] [--seed 0]

Writes OUT/config.json, bfloat16 safetensors shards with the standard index, and SmolLM2's
tokenizer (squeeze's built-in ``smollm2``; its vocabulary sets the embedding size), so text works
and every squeeze command runs on it. The defaults give Llama-3-8B's shapes with SmolLM2's
vocabulary. Weights are drawn tensor by tensor (normal, std 0.02; norms one) and written one shard
at a time, so making a 15 GB model needs about one shard of memory. Random weights say nothing
about accuracy: use these models for peak memory and time only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from squeeze.models import resolve_model

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in "2GB", "500MiB" or "123" (decimal and binary units, as transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MiB)")
    return int(float(match.group(1)) * UNITS[match.group(2) or ""])


def llama_config(args: argparse.Namespace, vocab: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, dtype="bfloat16",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--max-shard-size", type=parse_size, default="2GB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; remove it or choose another folder")

    source = resolve_model("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.path.parent if source.is_gguf else source.path,
                                                           **({"gguf_file": source.path.name} if source.is_gguf else {}))
    config = llama_config(args, len(tokenizer))
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in transformers.LlamaForCausalLM(config).state_dict().items()}

    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(args.seed)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in shapes.items():  # plan the shards first, so their file names know the count
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and sizes[-1] + nbytes > args.max_shard_size:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(shapes[name]).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(staging / file), metadata={"format": "pt"})
        print(f"{file}: {len(names)} tensors, {sizes[index - 1] / 1e9:.2f} GB", flush=True)
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(args.out)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{args.out}: {params / 1e9:.2f} B parameters, {sum(sizes) / 1e9:.2f} GB in {len(shards)} shards")


if __name__ == "__main__":
    main()
