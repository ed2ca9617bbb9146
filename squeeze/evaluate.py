"""Accuracy and memory numbers: perplexity, KL, token agreement, embedding similarity, bytes, RSS.

One implementation, used by every pass report and by ``squeeze eval``.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


METRIC_BYTES = 16 * 2**20  # a vocabulary-wide float32 tensor of one span of positions, at most


def metric_chunk(rows: int, vocab: int) -> int:
    """Positions per log-softmax over the vocabulary for batches of ``rows`` windows: as many as
    keep a float32 [rows, positions, vocab] tensor within METRIC_BYTES, one at least (42 for
    SmolLM2's 49,152 tokens and two windows, 16 for Llama-3's 128,256). The scores take about five
    such tensors at once; a fixed 128 positions made them 250 MB for SmolLM2 and 650 MB for
    Llama-3, the peak of a streamed pass."""
    return max(1, METRIC_BYTES // (rows * vocab * 4))


def _vocab(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


@dataclass(frozen=True)
class CausalComparison:
    """A causal LM scored on evaluation windows, optionally against a reference model.

    ``perplexity = exp(mean next-token negative log-likelihood)`` over ``tokens`` predicted
    tokens; ``kl_divergence`` is the mean over tokens of KL(reference ‖ model) in nats;
    ``top1_agreement`` the fraction of positions where both models' most likely token is the same.
    """

    tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True)
class EncoderComparison:
    """An encoder's mean-pooled embeddings compared with a reference's, per evaluation window."""

    windows: int
    tokens: int
    cosine_mean: float
    cosine_min: float


def window_batches(windows: torch.Tensor, batch_size: int):
    """``windows`` [n, L] in consecutive batches of ``batch_size`` (the last may be shorter)."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def model_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the model's parameters' device, or what a stand-in model (one with
    no parameters of its own, squeeze.stream.reference) says."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else getattr(model, "input_device", torch.device("cpu"))


class _BatchLogits:
    """One batch's logits, a span of positions at a time. A model that can compute the logits of
    chosen positions alone (``slices_logits``, then ``logits_at``: a recorded model, whose head is
    cheap to rerun) is asked
    span by span, so the batch's logits over the whole vocabulary never exist at once; any other
    model runs once, and its logits are sliced."""

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.whole = None if getattr(model, "slices_logits", False) else model(input_ids=ids).logits

    def span(self, positions: slice) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[:, positions]
        return self.model.logits_at(self.ids, positions)


@torch.no_grad()
def compare_causal(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 2,
    on_batch: Callable[[int], None] | None = None,
) -> CausalComparison:
    """Score ``model`` (and ``reference``, in the same pass over the data) on token ``windows`` [n, L].

    Each window predicts its tokens 1..L-1 from the ones before (an encoder-decoder's view,
    squeeze.seq2seq.DecoderScoring, its second half); windows do not overlap.
    """
    device = model_device(model)
    nll_sum = ref_nll_sum = kl_sum = 0.0
    agree = tokens = 0
    for batch in window_batches(windows, batch_size):
        ids = batch.to(device)
        logits = _BatchLogits(model, ids)
        ref_logits = _BatchLogits(reference, ids) if reference is not None else None
        # a causal LM predicts every token but the first; a decoder seen through
        # squeeze.seq2seq.DecoderScoring the second half of the window
        first = model.first_target(ids.shape[1]) if hasattr(model, "first_target") else 1
        targets = ids[:, first:]
        # a vocabulary-wide float copy of every position at once is the memory peak of a run:
        # take log-softmax over a bounded number of positions at a time instead
        chunk = metric_chunk(ids.shape[0], _vocab(model) or _vocab(reference) or 2**17)
        for start in range(0, targets.shape[1], chunk):
            span = slice(start, min(start + chunk, targets.shape[1]))
            target = targets[:, span].reshape(-1)
            logprobs = F.log_softmax(logits.span(span).float(), dim=-1).flatten(0, 1)
            nll_sum += float(F.nll_loss(logprobs, target, reduction="sum"))
            if ref_logits is not None:
                ref_logprobs = F.log_softmax(ref_logits.span(span).float(), dim=-1).flatten(0, 1)
                ref_nll_sum += float(F.nll_loss(ref_logprobs, target, reduction="sum"))
                kl_sum += float(F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="sum"))
                agree += int((logprobs.argmax(-1) == ref_logprobs.argmax(-1)).sum())
            tokens += target.numel()
        del logits, ref_logits
        if on_batch:
            on_batch(batch.shape[0])
    if tokens == 0:
        raise ValueError("no evaluation tokens")
    if reference is None:
        return CausalComparison(tokens=tokens, perplexity=math.exp(nll_sum / tokens))
    return CausalComparison(
        tokens=tokens,
        perplexity=math.exp(nll_sum / tokens),
        reference_perplexity=math.exp(ref_nll_sum / tokens),
        kl_divergence=kl_sum / tokens,
        top1_agreement=agree / tokens,
    )


def mean_pooled(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the last hidden state averaged over tokens (sentence-transformers' pooling)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.last_hidden_state.float().mean(dim=1)


@torch.no_grad()
def compare_encoder(
    model: nn.Module,
    reference: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> EncoderComparison:
    """Cosine similarity of ``model``'s mean-pooled embeddings to ``reference``'s on each window."""
    device = model_device(model)
    cosines = []
    for batch in window_batches(windows, batch_size):
        ids = batch.to(device)
        cosines.append(F.cosine_similarity(mean_pooled(model, ids), mean_pooled(reference, ids), dim=-1))
        if on_batch:
            on_batch(batch.shape[0])
    cos = torch.cat(cosines)
    return EncoderComparison(
        windows=windows.shape[0],
        tokens=windows.numel(),
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
    )


def _identity(tensor: torch.Tensor) -> int:
    """What tells shared tensors apart: their storage, or on the meta device (no storage) the tensor object."""
    return id(tensor) if tensor.is_meta else tensor.untyped_storage().data_ptr()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each shared storage counted once (on the
    meta device: what they would hold)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if _identity(tensor) in seen:
            continue
        seen.add(_identity(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def parameter_count(model: nn.Module) -> int:
    """Number of distinct weights (tied parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if _identity(p) in seen:
            continue
        seen.add(_identity(p))
        total += p.numel()
    return total


def checkpoint_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's tensors in a checkpoint that stores the floating ones in ``dtype``,
    tied tensors once; the tensors may be on the meta device."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if _identity(tensor) in seen:
            continue
        seen.add(_identity(tensor))
        total += tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (or since ``reset_peak_rss``), in bytes.

    Linux: ``VmHWM`` of /proc/self/status, this program's own peak; ``getrusage``'s maximum also
    carries the peak of the process it was started from (fork, then exec), so a small command
    started by a large one would report the large one's memory. Elsewhere ``getrusage``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new peak RSS measurement (Linux: /proc/self/clear_refs), so that each stage of a
    recipe reports its own peak; False where the system cannot, and the peak stays the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
