"""``squeeze bench-infer``: prefill and decode speed, memory and greedy-generation agreement of a
model in fp32 and bf16 and of its compressed forms, measured side by side in one run.

Each form runs in a fresh process (spawned), so its peak RSS is its own and no allocator state or
warm cache carries over from the form before. Quantized compressed-tensors checkpoints run on the
integer kernels of :mod:`squeeze.runtime.kernels`.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from squeeze.data import evaluation_windows
from squeeze.device import machine, resolve_device
from squeeze.distill.student import check_vocab_sizes
from squeeze.errors import SqueezeError
from squeeze.evaluate import tensor_bytes
from squeeze.formats.compressed_tensors import quantization_scheme
from squeeze.generate import agreement, generate, prompts_from_text
from squeeze.models import KIND_NAMES, is_quantized_folder, load_model, load_tokenizer, meta_model, resolve_model
from squeeze.runtime.kernels import accelerate
from squeeze.runtime.measure import RssSampler, measure_speed
from squeeze.sampling import Sampling


@dataclass(frozen=True)
class Form:
    """One way of running a model: which checkpoint, in which dtype, on which kernels."""

    label: str
    spec: str
    dtype: str = "float32"
    kernels: bool = True  # quantized layers on integer kernels (else the dequantize-per-call reference)


@dataclass
class FormResult:
    label: str
    spec: str
    runs_on: str  # dtype and kernels, in words
    weight_bytes: int
    peak_rss_bytes: int
    load_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    continuations: list[list[int]] = field(default_factory=list)  # greedy new tokens per agreement prompt
    texts: list[str] = field(default_factory=list)
    agreement: dict | None = None  # vs the first form: rouge1/rouge2/rougeL/bleu/exact_match


@dataclass
class InferBench:
    """Everything ``bench-infer`` measured. Ratios are against the first form (fp32)."""

    model: str
    device: str
    prefill_tokens: int
    decode_tokens: int
    repeats: int
    agreement_prompts: int
    agreement_tokens: int
    data: str
    machine: str
    forms: list[FormResult]

    def ratios(self, form: FormResult) -> dict[str, float]:
        base = self.forms[0]
        return {
            "prefill": form.prefill_tokens_per_s / base.prefill_tokens_per_s,
            "decode": form.decode_tokens_per_s / base.decode_tokens_per_s,
            "weights": form.weight_bytes / base.weight_bytes,
            "peak_rss": form.peak_rss_bytes / base.peak_rss_bytes,
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, form in zip(data["forms"], self.forms):
            entry["ratios_vs_" + self.forms[0].label] = self.ratios(form)
            entry.pop("continuations")
        return data


def _measure(form: Form, device: str, prompt: list[int], agreement_prompts: list[list[int]], new_tokens: int,
             decode_tokens: int, repeats: int, eos_token_id: int | None) -> FormResult:
    """Load ``form`` and measure it (runs in a child process)."""
    with RssSampler() as rss:
        start = time.perf_counter()
        source = resolve_model(form.spec)
        loaded = load_model(source, device=device, dtype=getattr(torch, form.dtype))
        model = loaded.model
        runs_on = form.dtype
        if is_quantized_folder(source.path):
            if form.kernels:
                done = accelerate(model)
                runs_on = f"{str(done.compute_dtype).removeprefix('torch.')}; {done.describe()}"
            else:
                runs_on += "; dequantize-per-call reference"
        load_seconds = time.perf_counter() - start
        ids = torch.tensor([prompt], device=device)
        prefill, decode = measure_speed(model, ids, decode_tokens, repeats)
        continuations = [
            generate(model, torch.tensor([p], device=device), new_tokens, Sampling(), eos_token_id=eos_token_id)
            for p in agreement_prompts
        ]
        texts = [loaded.tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
    return FormResult(
        label=form.label, spec=form.spec, runs_on=runs_on, weight_bytes=tensor_bytes(model), peak_rss_bytes=rss.peak,
        load_seconds=load_seconds, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode,
        continuations=continuations, texts=texts,
    )


def default_forms(model: str, compare: list[str], bf16: bool = True) -> list[Form]:
    """fp32 and bf16 of ``model``, then each compared checkpoint (quantized ones on integer kernels)."""
    forms = [Form("fp32", model, "float32")]
    if bf16:
        forms.append(Form("bf16", model, "bfloat16"))
    for spec in compare:
        source = resolve_model(spec)
        name = Path(spec.rstrip("/")).name
        if is_quantized_folder(source.path):
            scheme = quantization_scheme(source.path)
            forms.append(Form(f"{scheme.name} {name}", spec, "float32"))
        else:
            forms.append(Form(name, spec, "float32"))
    return forms


def bench_infer(
    model: str,
    forms: list[Form],
    data: str = "wikipedia",
    prefill_tokens: int = 512,
    decode_tokens: int = 128,
    repeats: int = 3,
    agreement_prompts: int = 8,
    agreement_tokens: int = 32,
    device: str = "cpu",
    isolate: bool = True,
    on_form=None,
) -> InferBench:
    """Measure every form on the same prompt (``prefill_tokens`` of ``data``'s evaluation text) and
    the same agreement prompts; the first form is the reference for ratios and agreement.

    ``isolate`` runs each form in its own spawned process (clean peak RSS); False runs them here.
    """
    for name, value in (("prefill tokens", prefill_tokens), ("decode tokens", decode_tokens), ("repeats", repeats)):
        if value < 1:
            raise SqueezeError(f"{name} must be at least 1, got {value}")
    if agreement_prompts < 0 or agreement_tokens < 1:
        raise SqueezeError("agreement prompts must be at least 0 and agreement tokens at least 1")
    device = resolve_device(device)
    base = resolve_model(model)
    if base.kind != "causal":
        raise SqueezeError(f"{model} is {KIND_NAMES[base.kind]}: prefill and decode speed are measured on causal LMs (use squeeze eval)")
    base_config = meta_model(base).config
    positions = getattr(base_config, "max_position_embeddings", None)
    if positions and prefill_tokens + decode_tokens > positions:
        raise SqueezeError(f"{prefill_tokens} + {decode_tokens} tokens exceed the model's {positions} positions")
    for form in forms[1:]:
        source = resolve_model(form.spec)
        if source.kind != "causal":
            raise SqueezeError(f"{form.spec} is not a causal LM")
        check_vocab_sizes(base_config, meta_model(source).config)
    tokenizer = load_tokenizer(base)
    prompt = evaluation_windows(tokenizer, data, prefill_tokens, prefill_tokens)[0].tolist()
    prompts = [p[0].tolist() for p in prompts_from_text(tokenizer, data, agreement_prompts, 64)] if agreement_prompts else []
    eos = tokenizer.eos_token_id
    args = (device, prompt, prompts, agreement_tokens, decode_tokens, repeats, eos)
    results: list[FormResult] = []
    for form in forms:
        if isolate:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(_measure, form, *args).result()
        else:
            result = _measure(form, *args)
        results.append(result)
        if on_form:
            on_form(result)
    reference = results[0]
    for result in results[1:]:
        if prompts:
            result.agreement = asdict(agreement(reference.texts, result.texts))
    return InferBench(
        model=model, device=device, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, repeats=repeats,
        agreement_prompts=len(prompts), agreement_tokens=agreement_tokens, data=data, machine=machine() + (f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""),
        forms=results,
    )
