"""What every pass shares: the stopwatch, the cheap checks and text windows every pass starts
with, the prepare step (load), accuracy scoring against a reference, sparsity and speed summaries, and the
report's model line."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from squeeze.data import calibration_windows, check_source, evaluation_windows
from squeeze.device import resolve_device, resolve_dtype
from squeeze.distill.student import check_vocab_sizes
from squeeze.errors import OptionError
from squeeze.evaluate import compare_causal, compare_encoder, parameter_count, peak_rss_bytes, tensor_bytes
from squeeze.formats.compressed_tensors import checkpoint_state_dict
from squeeze.generate import GenerationAgreement, agreement, greedy_agreement, greedy_continuations, prompts_from_text
from squeeze.models import BUILTIN_MODELS, LoadedModel, ModelSource, check_output_dir, load_model, load_tokenizer, meta_model, resolve_model
from squeeze.models.output import local_inputs
from squeeze.progress import Progress
from squeeze.weightcache import reuse_dequantized
from squeeze.prune.masks import is_n_m
from squeeze.report import AccuracyReport, SparsityReport
from squeeze.runtime import Form, bench_infer
from squeeze.seq2seq import DecoderScoring, decoder_start, forward_inputs
from squeeze.stream.reference import Generation, RecordedReference, record_reference

GENERATION_PROMPTS = 8  # prompts for a pass report's generation agreement (0: none)
GENERATION_PROMPT_TOKENS = 64
GENERATION_TOKENS = 32  # greedy new tokens per prompt
SPARSE_INPUT_SHARE = 0.01  # a model with at least this share of exact zeros in its layers counts as pruned


class Stopwatch:
    """Wall time per named stage, in seconds, and the stage during which the process's peak
    resident memory was reached (the innermost, where stages nest)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._peak_stage = ""
        self._peak = 0  # the highest peak RSS seen at the end of a stage, in bytes

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        before = peak_rss_bytes()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            after = peak_rss_bytes()
            if after > before and after > self._peak:
                self._peak, self._peak_stage = after, name

    def absorb_peak(self, inner: Stopwatch) -> None:
        """Take ``inner``'s peak stage: ``inner`` timed stages within one of this watch's, and its
        stage is the more precise answer where it raised the peak as far."""
        if inner._peak_stage and inner._peak >= self._peak:
            self._peak, self._peak_stage = inner._peak, inner._peak_stage

    @property
    def peak_stage(self) -> str:
        """The stage that raised the peak RSS to where it stands now; "" if it rose outside every
        stage (or never within one)."""
        return self._peak_stage if self._peak and peak_rss_bytes() <= self._peak else ""


def eval_seq_len(config, seq_len: int) -> int:
    """``seq_len`` tokens, or fewer where the model (of this ``config``) has fewer positions."""
    limit = getattr(config, "max_position_embeddings", None)
    return min(seq_len, limit) if limit else seq_len


def batches(windows: torch.Tensor, batch_size: int, device: str, model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """``windows`` in forward-pass batches of ``batch_size`` windows for ``model``, on ``device``
    (an encoder-decoder's cut in two: squeeze.seq2seq)."""
    for start in range(0, windows.shape[0], batch_size):
        yield forward_inputs(model, windows[start : start + batch_size].to(device))


@dataclass
class Prepared:
    """What every pass has once its cheap checks passed and the model is loaded."""

    source: ModelSource
    loaded: LoadedModel
    device: str
    plan: dict
    seq_len: int
    eval_windows: torch.Tensor | None
    calib_windows: torch.Tensor | None
    reference: torch.nn.Module | None  # what the evaluation compares with: a RecordedReference, or a whole model
    parameters: int
    memory_before: int
    disk_before: int
    linear_flops: int  # 2 · Σ out · in over every Linear layer: matmul FLOPs per token


@dataclass
class Checked:
    """What a pass knows once its cheap checks passed, before any weight is loaded: the sources,
    the meta model and the plan made on it, and the text windows, already cut."""

    source: ModelSource
    meta: torch.nn.Module
    plan: dict
    ref_source: ModelSource | None
    device: str
    compute_dtype: torch.dtype
    seq_len: int
    tokenizer: Any | None  # loaded when there is text to cut
    eval_windows: torch.Tensor | None
    calib_windows: torch.Tensor | None


def check_inputs(
    model: str,
    out: Path,
    overwrite: bool,
    device: str,
    dtype: str,
    data: str,
    calibration_data: str | None,
    evaluate: bool,
    needs_calibration: bool,
    plan: Callable[[torch.nn.Module], dict],
    eval_tokens: int,
    seq_len: int,
    calibration_samples: int,
    reference: str | None,
    resolve: Callable[[str], ModelSource],
) -> Checked:
    """Validate everything cheap (output directory, which may not hold or sit inside the input
    models' folders; device, dtype, the model and reference as ``resolve`` finds them, ``plan`` on
    the meta model, text sources) and cut the evaluation and calibration windows, so that bad
    input or too little text fails in seconds, before any load."""
    check_output_dir(out, overwrite, local_inputs(*(spec for spec in (model, reference) if spec not in BUILTIN_MODELS)))
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    source = resolve(model)
    meta = meta_model(source)
    layers = plan(meta)
    ref_source = None
    if reference is not None and evaluate:
        ref_source = resolve(reference)
        check_vocab_sizes(meta_model(ref_source).config, meta.config)
    if evaluate:
        check_source(data)
    if needs_calibration:
        check_source(calibration_data or data)
    seq_len = eval_seq_len(meta.config, seq_len)
    tokenizer = eval_windows = calib_windows = None
    if evaluate or needs_calibration:
        tokenizer = load_tokenizer(source)
        if evaluate:
            eval_windows = evaluation_windows(tokenizer, data, seq_len, eval_tokens)
        if needs_calibration:
            calib_windows = calibration_windows(tokenizer, calibration_data or data, calibration_samples, seq_len)
    return Checked(source, meta, layers, ref_source, device, compute_dtype, seq_len, tokenizer, eval_windows, calib_windows)


def prepare(
    checked: Checked,
    plan: Callable[[torch.nn.Module], dict],
    watch: Stopwatch,
    progress: Progress,
    record: Callable[[torch.nn.Module, str, Any, torch.Tensor], RecordedReference] | None = None,
) -> Prepared:
    """Load the model :func:`check_inputs` checked and ``plan`` its layers.

    The evaluation compares with the input itself, or with the named reference; with
    ``record(model, kind, tokenizer, eval_windows)`` (e.g. :func:`record_input`) that model's outputs are
    recorded here and only the record is kept. A named reference is then loaded, recorded and
    dropped before the input is loaded, so the two are never in memory together."""
    source, eval_windows = checked.source, checked.eval_windows
    reference_model: torch.nn.Module | None = None
    if checked.ref_source is not None and eval_windows is not None:
        with watch.stage("load"), progress.status(f"loading the reference {checked.ref_source.name}"):
            ref_loaded = load_model(checked.ref_source, device=checked.device, dtype=checked.compute_dtype)
        reference_model = ref_loaded.model if record is None else record(ref_loaded.model, checked.ref_source.kind, ref_loaded.tokenizer, eval_windows)
        del ref_loaded

    with watch.stage("load"), progress.status(f"loading {source.name}"):
        loaded = load_model(source, device=checked.device, dtype=checked.compute_dtype)
    net = loaded.model
    layers = plan(net)
    if checked.ref_source is None and eval_windows is not None:
        reference_model = net if record is None else record(net, source.kind, loaded.tokenizer, eval_windows)
    return Prepared(
        source=source,
        loaded=loaded,
        device=checked.device,
        plan=layers,
        seq_len=checked.seq_len,
        eval_windows=eval_windows,
        calib_windows=checked.calib_windows,
        reference=reference_model,
        parameters=parameter_count(net),
        memory_before=tensor_bytes(net),
        disk_before=sum(t.numel() * t.element_size() for t in checkpoint_state_dict(net, loaded.stored_dtype).values()),
        linear_flops=sum(2 * m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)),
    )


class SparseInput:
    """The exact zeros of a model's layers, gathered one layer at a time (a streamed model is never
    whole): how many, and the N:M patterns every layer holding zeros follows."""

    PATTERNS = ((1, 4), (2, 4), (4, 8))  # tightest first: a 1:4 layer also has at most 2 of 4

    def __init__(self) -> None:
        self.parameters = 0
        self.zeros: dict[str, int] = {}
        self.patterns = set(self.PATTERNS)

    def add(self, name: str, weight: torch.Tensor) -> None:
        zeros = int((weight == 0).sum())
        self.parameters += weight.numel()
        self.zeros[name] = zeros
        if zeros:
            # N of every M nonzero needs at least (M - N) / M zeros: below half, no pattern can hold
            possible = {(n, m) for n, m in self.patterns if zeros >= (m - n) / m * weight.numel()}
            self.patterns = {(n, m) for n, m in possible if is_n_m(weight, n, m)}

    @property
    def structure(self) -> str | None:
        """``N:M`` if every layer holding zeros follows one of the common patterns, ``unstructured``
        if the layers hold at least SPARSE_INPUT_SHARE exact zeros otherwise, None for a dense model."""
        if sum(self.zeros.values()) < SPARSE_INPUT_SHARE * self.parameters:
            return None
        for n, m in self.PATTERNS:
            if (n, m) in self.patterns:
                return f"{n}:{m}"
        return "unstructured"


def sparsity_structure(layers: dict[str, torch.nn.Module]) -> str | None:
    """:attr:`SparseInput.structure` of these layers."""
    sparse = SparseInput()
    for name, module in layers.items():
        sparse.add(name, module.weight)
    return sparse.structure


def sparsity_report(
    structure: str, target: float, layers: list[tuple[int, int]], linear_flops: int, dense_bytes: int | None = None, sparse_bytes: int | None = None,
) -> SparsityReport:
    """From (parameters, zeros) per sparse layer: totals, and FLOPs with those zeros skipped."""
    parameters = sum(p for p, _ in layers)
    zeros = sum(z for _, z in layers)
    return SparsityReport(
        structure=structure,
        target=target,
        parameters=parameters,
        zeros=zeros,
        dense_bytes=dense_bytes,
        sparse_bytes=sparse_bytes,
        linear_flops_dense=linear_flops,
        linear_flops_sparse=linear_flops - 2 * zeros,
    )


def check_speed_kind(kind: str) -> None:
    """Speed is measured on causal LMs only; an OptionError naming ``measure_speed`` otherwise."""
    if kind != "causal":
        what = "an encoder-decoder" if kind == "seq2seq" else "an encoder"
        raise OptionError("{0} measures prefill and decode of causal LMs; this is " + what, "measure_speed")


def speed_comparison(model: str, written: Path, data: str, device: str, watch: Stopwatch, progress: Progress) -> dict:
    """``measure_speed``: prefill/decode tokens/s and memory of the input (fp32) and the checkpoint
    just written (quantized layers on integer kernels), each in its own process, as ``squeeze bench-infer``."""
    forms = [Form("input", model), Form("output", str(written))]
    # bench-infer's 512 + 128 tokens, or what fits a model with fewer positions
    positions = getattr(meta_model(resolve_model(model)).config, "max_position_embeddings", None) or 640
    prefill, decode = min(512, positions // 2), min(128, positions // 4)
    with watch.stage("measure speed"), progress.status("measuring prefill and decode speed"):
        return bench_infer(
            model, forms, data=data, prefill_tokens=prefill, decode_tokens=decode, repeats=2, agreement_prompts=0, device=device,
        ).to_dict()


def model_info(spec: str, source: ModelSource, net: torch.nn.Module) -> dict:
    """The report's model line: how the user named it, its name, kind and architecture."""
    return {"spec": spec, "name": source.name, "kind": source.kind, "architecture": type(net).__name__}


def encoder_batch_size(batch_size: int) -> int:
    """Windows per batch when comparing encoders' embeddings (cheap per window: at least 8)."""
    return max(batch_size, 8)


def record_input(
    model: torch.nn.Module, kind: str, windows: torch.Tensor, data: str, batch_size: int, watch: Stopwatch,
    progress: Progress, tokenizer=None, generation_prompts: int = 0,
) -> RecordedReference:
    """What :func:`evaluate_accuracy` needs of ``model`` (see squeeze.stream.reference), recorded
    now, so that the pass may then change ``model`` in place without keeping a copy."""
    size = encoder_batch_size(batch_size) if kind == "encoder" else batch_size
    with watch.stage("evaluate"), progress.task(f"recording the input's outputs on {data}", windows.shape[0]) as advance:
        recorded = record_reference(model, kind, windows, size, on_batch=advance)
    if kind == "causal" and generation_prompts and tokenizer is not None:
        label = f"greedy continuations of {generation_prompts} prompts, the input"
        with watch.stage("generate"), progress.task(label, generation_prompts) as advance:
            prompts = prompts_from_text(tokenizer, data, generation_prompts, GENERATION_PROMPT_TOKENS)
            texts = greedy_continuations(model, tokenizer, prompts, GENERATION_TOKENS, tokenizer.eos_token_id, advance)
        recorded.generation = Generation(prompts, texts)
    return recorded


def generation_agreement(model, reference, tokenizer, data: str, prompts: int, watch: Stopwatch, progress: Progress) -> dict:
    """ROUGE/BLEU of ``model``'s greedy continuations against ``reference``'s, as AccuracyReport
    fields; a :class:`RecordedReference` brings its continuations, recorded on the same prompts."""
    recorded = reference.generation if isinstance(reference, RecordedReference) else None
    continuations = prompts if recorded is not None or model is reference else 2 * prompts
    with watch.stage("generate"), progress.task(f"greedy continuations of {prompts} prompts", continuations) as advance:
        if recorded is not None:
            candidates = greedy_continuations(model, tokenizer, recorded.prompts, GENERATION_TOKENS, tokenizer.eos_token_id, advance)
            scores = dataclasses.replace(agreement(recorded.continuations, candidates), tokens=GENERATION_TOKENS)
        else:
            windows = prompts_from_text(tokenizer, data, prompts, GENERATION_PROMPT_TOKENS)
            scores, _ = greedy_agreement(model, reference, tokenizer, windows, GENERATION_TOKENS, on_prompt=advance)
    return generation_fields(scores)


def generation_fields(scores: GenerationAgreement) -> dict:
    """``scores`` as the AccuracyReport fields of generation agreement."""
    return {
        "generation_prompts": scores.prompts, "generation_tokens": GENERATION_TOKENS, "rouge1": scores.rouge1,
        "rouge2": scores.rouge2, "rougeL": scores.rougeL, "bleu": scores.bleu, "exact_match": scores.exact_match,
    }


def reference_name(reference: str | None) -> str | None:
    """How a report names the model it was compared with: ``original (NAME)``."""
    return f"original ({Path(reference).name or reference})" if reference else None


def evaluate_accuracy(
    model: torch.nn.Module,
    kind: str,
    reference: torch.nn.Module,
    windows: torch.Tensor,
    data: str,
    seq_len: int,
    batch_size: int,
    watch: Stopwatch,
    progress: Progress,
    compared_with: str | None = None,
    tokenizer=None,
    generation_prompts: int = 0,
) -> AccuracyReport:
    """Score ``model`` against ``reference`` on ``windows`` (an encoder-decoder's decoder on the
    second half of each, squeeze.seq2seq); for causal LMs with ``generation_prompts`` also the agreement of their greedy continuations (GENERATION_TOKENS each) on prompts from ``data``."""
    if kind == "seq2seq":
        # the decoder, teacher-forced on the second half of each window (squeeze.seq2seq)
        start = decoder_start(model)
        model, reference = DecoderScoring(model, start), DecoderScoring(reference, start)
    with reuse_dequantized():  # the model is held whole: its quantized layers dequantize once, not per batch
        return _evaluate_accuracy(
            model, kind, reference, windows, data, seq_len, batch_size, watch, progress, compared_with, tokenizer, generation_prompts,
        )


def _evaluate_accuracy(
    model: torch.nn.Module, kind: str, reference: torch.nn.Module, windows: torch.Tensor, data: str, seq_len: int,
    batch_size: int, watch: Stopwatch, progress: Progress, compared_with: str | None, tokenizer, generation_prompts: int,
) -> AccuracyReport:
    if kind in ("causal", "seq2seq"):
        with watch.stage("evaluate"), progress.task(f"evaluating on {data}", windows.shape[0]) as advance:
            cmp = compare_causal(model, windows, reference, batch_size=batch_size, on_batch=advance)
        generation = {}
        if kind == "causal" and generation_prompts and tokenizer is not None:
            generation = generation_agreement(model, reference, tokenizer, data, generation_prompts, watch, progress)
        return AccuracyReport(
            **generation,
            data=data,
            windows=windows.shape[0],
            seq_len=seq_len,
            tokens=cmp.tokens,
            perplexity_before=cmp.reference_perplexity,
            perplexity_after=cmp.perplexity,
            kl_divergence=cmp.kl_divergence,
            top1_agreement=cmp.top1_agreement,
            reference=compared_with,
        )
    with watch.stage("evaluate"), progress.task(f"evaluating on {data}", windows.shape[0]) as advance:
        enc = compare_encoder(model, reference, windows, batch_size=encoder_batch_size(batch_size), on_batch=advance)
    return AccuracyReport(
        data=data,
        windows=enc.windows,
        seq_len=seq_len,
        tokens=enc.tokens,
        embedding_cosine_mean=enc.cosine_mean,
        embedding_cosine_min=enc.cosine_min,
        reference=compared_with,
    )
