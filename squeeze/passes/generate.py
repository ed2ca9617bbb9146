"""``squeeze generate``: the prompts, and every model's continuation of them side by side."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from squeeze.device import resolve_device, resolve_dtype
from squeeze.distill.student import check_vocab_sizes
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.generate import generate
from squeeze.models import KIND_NAMES, load_model, meta_model, resolve_model
from squeeze.progress import NullProgress, Progress
from squeeze.runtime import accelerate
from squeeze.sampling import Sampling


def read_prompts(prompt: str | None, prompts: Path | None) -> list[str]:
    """The prompts of ``squeeze generate``: ``prompt``, or one per non-empty line of the file ``prompts``."""
    if (prompt is None) == (prompts is None):
        raise OptionError("give {0} TEXT or {1} FILE (one prompt per line)", "prompt", "prompts")
    if prompt is not None:
        if not prompt.strip():
            raise OptionError("{0} is empty", "prompt")
        return [prompt]
    path = Path(prompts)
    if not path.is_file():
        raise SqueezeError(f"prompts file {path} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise SqueezeError(f"prompts file {path} is not UTF-8 text") from None
    if not lines:
        raise SqueezeError(f"prompts file {path} has no prompts")
    return lines


def generate_side_by_side(
    models: list[str],
    prompts: list[str],
    sampling: Sampling,
    max_new_tokens: int = 64,
    seed: int = 0,
    chat: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    kernels: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Continue every prompt with every model, with one sampler and one seed for all: greedy at
    temperature 0, else the same random stream per prompt for each model. ``chat`` wraps each
    prompt in the tokenizer's chat template. ``kernels`` runs quantized checkpoints on integer
    kernels (faster; float rounding differs from the pass's evaluation)."""
    progress = progress or NullProgress()
    if max_new_tokens < 1:
        raise OptionError(f"{{0}} must be at least 1, got {max_new_tokens}", "max_new_tokens")
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    sources = [resolve_model(spec, trust_remote_code=trust_remote_code) for spec in models]
    for source in sources:
        if source.kind != "causal":
            raise SqueezeError(f"{source.spec} is {KIND_NAMES[source.kind]}: squeeze generate continues text with causal LMs")
    first = meta_model(sources[0]).config
    for source in sources[1:]:
        check_vocab_sizes(first, meta_model(source).config)
    labels = [spec if models.count(spec) == 1 else f"{spec} ({i + 1})" for i, spec in enumerate(models)]
    outputs: dict[str, list[dict]] = {}
    for label, spec, source in zip(labels, models, sources):
        with progress.status(f"loading {source.name}"):
            loaded = load_model(source, device=device, dtype=compute_dtype)
        if kernels:
            accelerate(loaded.model)
        tokenizer = loaded.tokenizer
        rows = []
        for index, text in enumerate(prompts):
            if chat:
                if not getattr(tokenizer, "chat_template", None):
                    raise OptionError(f"{literal(spec)} has no chat template; drop {{0}}", "chat")
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
                ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
            else:
                ids = tokenizer(text, return_tensors="pt").input_ids
            start = time.perf_counter()
            with progress.status(f"{source.name}: prompt {index + 1} of {len(prompts)}"):
                new = generate(loaded.model, ids.to(device), max_new_tokens, sampling, seed=seed + index, eos_token_id=tokenizer.eos_token_id)
            seconds = time.perf_counter() - start
            rows.append({"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new), "tokens_per_s": len(new) / seconds})
        outputs[label] = rows
        del loaded
    return {
        "models": models, "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
        "seed": seed, "max_new_tokens": max_new_tokens, "chat": chat, "kernels": kernels,
        "prompts": [{"prompt": p, "outputs": {label: outputs[label][i] for label in labels}} for i, p in enumerate(prompts)],
    }
