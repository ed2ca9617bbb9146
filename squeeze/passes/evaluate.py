"""``squeeze eval``: score a model (and, against a reference, how far it moved) on text sources,
with the scoring the pass reports use."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from squeeze.data import check_source, evaluation_windows
from squeeze.device import resolve_device, resolve_dtype
from squeeze.distill.student import check_vocab_sizes
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.evaluate import compare_causal, peak_rss_bytes
from squeeze.models import KIND_NAMES, load_model, meta_model, resolve_model
from squeeze.passes.common import GENERATION_PROMPTS, Stopwatch, eval_seq_len, evaluate_accuracy
from squeeze.progress import NullProgress, Progress
from squeeze.report import AccuracyReport
from squeeze.seq2seq import scoring_view
from squeeze.weightcache import reuse_dequantized


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
) -> EvalResult:
    """Perplexity of ``model`` on each text source and, against ``reference``, KL, top-1 agreement
    and generation agreement (causal LMs), the same of the decoder on each window's second half
    (encoder-decoders, squeeze.seq2seq) or embedding cosine (encoders): the implementation the
    pass reports use, on the same evaluation windows for the same source, tokens and window length."""
    progress = progress or NullProgress()
    watch = Stopwatch()
    if not data:
        raise OptionError("give at least one text source ({0})", "data")
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    ref_source = None
    if reference is not None:
        ref_source = resolve_model(reference, trust_remote_code=trust_remote_code)
        if ref_source.kind != source.kind:
            raise SqueezeError(f"{model} is {KIND_NAMES[source.kind]} but the reference {reference} is not")
        check_vocab_sizes(meta_model(ref_source).config, meta_model(source).config)
    elif source.kind == "encoder":
        raise OptionError(f"{literal(model)} is an encoder: it has no perplexity; give {{0}} MODEL to compare its embeddings with", "reference")
    for name in data:
        check_source(name)
    start = time.perf_counter()
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
