"""``squeeze eval``: score a model (and, against a reference, how far it moved) on text sources,
with the scoring the pass reports use."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from squeeze.data import check_source, evaluation_windows
from squeeze.device import resolve_device, resolve_dtype
from squeeze.distill.student import check_vocab_sizes
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.evaluate import compare_causal, parameter_count, peak_rss_bytes
from squeeze.formats.compressed_tensors import quantization_scheme
from squeeze.memory import PROCESS_BYTES
from squeeze.models import KIND_NAMES, ModelSource, load_model, load_tokenizer, meta_model, resolve_model
from squeeze.passes.common import GENERATION_PROMPTS, Stopwatch, eval_seq_len, evaluate_accuracy
from squeeze.passes.stream import (
    comparison_batches, fits_whole, lazy_model, stream_states, streamable_source, streamed_generation_agreement,
)
from squeeze.progress import NullProgress, Progress
from squeeze.report import AccuracyReport
from squeeze.seq2seq import scoring_view
from squeeze.sizes import in_gib, parse_size
from squeeze.stream.reference import Handover, RecordedReference, stand_in_blocks
from squeeze.weightcache import reuse_dequantized


# the loading's transient copies and the evaluation's activations on top of the models held whole:
# a 1.71 B model against its W4 quantize output peaked 12% above the two models' bytes and the
# process (benchmarks/README.md#stream_eval)
HELD_MARGIN = 1.15


@dataclass
class EvalResult:
    """``squeeze eval``: one AccuracyReport per text source, the numbers a pass report gives."""

    model: str
    reference: str | None
    kind: str
    device: str
    rows: list[AccuracyReport]
    seconds: float
    peak_rss_bytes: int
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            entry = dataclasses.asdict(row)
            entry["perplexity_change"] = row.perplexity_change
            rows.append(entry)
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "rows"}, "rows": rows}


def evaluate_model(
    model: str,
    reference: str | None = None,
    data: list[str] | tuple[str, ...] = ("wikipedia",),
    eval_tokens: int = 16384,
    seq_len: int = 512,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    generation_prompts: int = GENERATION_PROMPTS,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    stream: bool = False,
    memory_budget: int | str | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on each text source and, against ``reference``, KL, top-1 agreement
    and generation agreement (causal LMs), the same of the decoder on each window's second half
    (encoder-decoders, squeeze.seq2seq) or embedding cosine (encoders): the implementation the
    pass reports use, on the same evaluation windows for the same source, tokens and window length.

    ``stream``: neither model is ever held whole. Each is read once, one block at a time over
    every source's windows (GGUF files, safetensors folders, sparse-bitmask prune outputs and
    compressed-tensors quantize outputs, squeeze.passes.stream), and scored from its last block's
    states through its own head: the same numbers. For generation agreement each model is read
    once more for every new token, one block at a time (squeeze.stream.generation). Chosen by itself when the models held whole would not
    fit ``memory_budget`` (default: the memory available, squeeze.sizes) and both can stream."""
    progress = progress or NullProgress()
    watch = Stopwatch()
    if not data:
        raise OptionError("give at least one text source ({0})", "data")
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    budget = parse_size(memory_budget, "memory_budget") if memory_budget is not None else None
    find = (lambda spec: streamable_source(spec, trust_remote_code, quantized=True)) if stream else (
        lambda spec: resolve_model(spec, trust_remote_code=trust_remote_code)
    )
    source = find(model)
    ref_source = None
    if reference is not None:
        ref_source = find(reference)
        if ref_source.kind != source.kind:
            raise SqueezeError(f"{model} is {KIND_NAMES[source.kind]} but the reference {reference} is not")
        check_vocab_sizes(meta_model(ref_source).config, meta_model(source).config)
    elif source.kind == "encoder":
        raise OptionError(f"{literal(model)} is an encoder: it has no perplexity; give {{0}} MODEL to compare its embeddings with", "reference")
    for name in data:
        check_source(name)
    notes = []
    if not stream:
        held = PROCESS_BYTES + sum(_held_bytes(s, compute_dtype.itemsize) for s in (source, ref_source) if s is not None)
        whole = int(held * HELD_MARGIN)
        if not fits_whole(whole, budget, device) and _streamable(source, ref_source, trust_remote_code):
            stream = True
            notes.append(f"streamed by itself: the models held whole need about {in_gib(whole)}, more than the memory budget or the GPU's memory")
    start = time.perf_counter()
    if stream:
        rows = _streamed_rows(
            source, ref_source, data, eval_tokens, seq_len, batch_size, device, compute_dtype, watch, progress, reference, generation_prompts,
        )
        return EvalResult(
            model=model, reference=reference, kind=source.kind, device=f"{device}, {dtype}", rows=rows,
            seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
            notes=[*notes, "streamed: one block of one model in memory at a time"]
            + (["generation agreement: each model read one block at a time for every new token"] if ref_source and generation_prompts and source.kind == "causal" else []),
        )
    with progress.status(f"loading {source.name}"):
        loaded = load_model(source, device=device, dtype=compute_dtype)
    ref_model = None
    if ref_source is not None:
        with progress.status(f"loading the reference {ref_source.name}"):
            ref_model = load_model(ref_source, device=device, dtype=compute_dtype).model
    length = eval_seq_len(loaded.config, seq_len)
    rows = []
    for name in data:
        windows = evaluation_windows(loaded.tokenizer, name, length, eval_tokens)
        if ref_model is None:
            with progress.task(f"evaluating on {name}", windows.shape[0]) as advance, reuse_dequantized():
                cmp = compare_causal(scoring_view(loaded.model), windows, batch_size=batch_size, on_batch=advance)
            rows.append(AccuracyReport(data=name, windows=windows.shape[0], seq_len=length, tokens=cmp.tokens, perplexity_after=cmp.perplexity))
        else:
            rows.append(evaluate_accuracy(
                loaded.model, source.kind, ref_model, windows, name, length, batch_size, watch, progress,
                reference, loaded.tokenizer, generation_prompts,
            ))
    return EvalResult(
        model=model, reference=reference, kind=source.kind, device=f"{device}, {dtype}", rows=rows,
        seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
    )


def _streamed_rows(
    source: ModelSource, ref_source: ModelSource | None, data: list[str] | tuple[str, ...], eval_tokens: int, seq_len: int,
    batch_size: int, device: str, compute_dtype: torch.dtype, watch: Stopwatch, progress: Progress, reference: str | None,
    generation_prompts: int,
) -> list[AccuracyReport]:
    """``evaluate_model``'s rows with each model read one block at a time, once for every text
    source: each block runs on the windows of all the sources before the next block is read (a
    record answers any of its batches by their token ids, squeeze.stream.reference). Generation
    agreement reads each model again for every new token (squeeze.stream.generation)."""
    tokenizer = load_tokenizer(source)
    length = eval_seq_len(meta_model(source).config, seq_len)
    windows = {name: evaluation_windows(tokenizer, name, length, eval_tokens) for name in data}
    batches = [batch for name in data for batch in comparison_batches(windows[name], source.kind, batch_size, device)]
    sources = ", ".join(data)
    with watch.stage("evaluate"):
        ours = _streamed_record(source, batches, compute_dtype, device, progress, f"{source.name} on {sources}, block by block")
        theirs = None
        if ref_source is not None:
            theirs = _streamed_record(ref_source, batches, compute_dtype, device, progress, f"the reference on {sources}, block by block")
    rows = []
    for name in data:
        if theirs is None:
            with progress.task(f"evaluating on {name}", windows[name].shape[0]) as advance:
                cmp = compare_causal(ours, windows[name], batch_size=batch_size, on_batch=advance)
            rows.append(AccuracyReport(data=name, windows=windows[name].shape[0], seq_len=length, tokens=cmp.tokens, perplexity_after=cmp.perplexity))
        else:
            row = evaluate_accuracy(ours, source.kind, theirs, windows[name], name, length, batch_size, watch, progress, reference)
            if source.kind == "causal" and generation_prompts:
                generation = streamed_generation_agreement(
                    source, ref_source, tokenizer, name, generation_prompts, compute_dtype, device, watch, progress,
                )
                row = dataclasses.replace(row, **generation)
            rows.append(row)
    return rows


def _streamed_record(
    source: ModelSource, batches: list[torch.Tensor], compute_dtype: torch.dtype, device: str, progress: Progress, label: str,
) -> RecordedReference:
    """``source``'s outputs on ``batches``: its last block's states, run one block at a time, and its head."""
    lazy = lazy_model(source, compute_dtype, device)
    states = stream_states(lazy, source.kind, batches, progress, label)
    lazy.materialise_outside("output")
    return states.record(stand_in_blocks(lazy.model, Handover()))


def _streamable(source: ModelSource, ref_source: ModelSource | None, trust_remote_code: bool) -> bool:
    """Whether both models can be read one block at a time (see streamable_source)."""
    try:
        for found in (source, ref_source):
            if found is not None:
                streamable_source(found.spec, trust_remote_code, quantized=True)
    except SqueezeError:
        return False
    return True


def _held_bytes(source: ModelSource, dtype_bytes: int) -> int:
    """The memory ``source`` takes held whole for the evaluation: its parameters in the compute
    dtype, and for a quantize output its int8 codes besides (its layers keep both while the
    evaluation runs, squeeze.weightcache)."""
    parameters = parameter_count(meta_model(source))
    quantized = not source.is_gguf and quantization_scheme(source.path) is not None
    return parameters * (dtype_bytes + (1 if quantized else 0))
