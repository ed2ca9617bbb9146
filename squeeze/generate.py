"""Text generation with squeeze's sampler, and how closely one model's generations follow another's.

``generate`` runs the model with its KV cache and draws each token with :mod:`squeeze.sampling`
from one seeded CPU generator per call, so the same seed gives every compared model the same
random stream. ``agreement`` scores continuations against reference continuations with the
maintained implementations of ROUGE (``rouge-score``) and BLEU (``sacrebleu``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from squeeze.data import evaluation_windows
from squeeze.errors import SqueezeError
from squeeze.sampling import Sampling, sample
from squeeze.weightcache import reuse_dequantized

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_token_id: int | None = None,
) -> list[int]:
    """The new token ids (at most ``max_new_tokens``; the last is ``eos_token_id`` if it was drawn)
    continuing ``input_ids`` [1, n] (on the model's device).

    One forward per token with the KV cache, asking for the logits of the last position only
    (``logits_to_keep=1``) when the model's forward takes that argument. Draws come from one CPU
    generator seeded with ``seed`` per call, so every model given the same seed and prompt sees the
    same random stream.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate takes one prompt, input_ids [1, n]; got shape {tuple(input_ids.shape)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    last_only = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    with reuse_dequantized():  # each token runs every layer on one row: dequantizing would cost more
        return _generate(model, input_ids, max_new_tokens, sampling, generator, eos_token_id, last_only)


def _generate(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, generator: torch.Generator,
    eos_token_id: int | None, last_only: dict[str, int],
) -> list[int]:
    new: list[int] = []
    past = None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, **cache_arguments(model, past), **last_only)
        past = returned_cache(out)
        token = sample(out.logits[:, -1], sampling, generator)
        new.append(int(token[0]))
        if eos_token_id is not None and new[-1] == eos_token_id:
            break
        ids = token.reshape(1, 1)
    return new


def cache_arguments(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The forward arguments that pass ``cache`` (None: start one) to ``model``: transformers 5.24
    renamed ``past_key_values`` to ``cache`` and warns on the old name; older releases know only it."""
    try:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        name = "past_key_values"
    return {name: cache, "use_cache": True}


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward returned, under either name (see :func:`cache_arguments`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward names ``logits_to_keep`` (transformers >= 4.50 causal LMs do;
    a catch-all ``**kwargs`` does not count, since it may pass the argument somewhere that fails)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False


@dataclass(frozen=True)
class GenerationAgreement:
    """Candidates scored against references: ROUGE F-measures averaged over prompts (0..1),
    corpus BLEU (0..100), and the share of prompts whose texts are identical (0..1).

    ``tokens`` is the number of new tokens asked of each model per prompt (fewer where one stopped
    at EOS); 0 when the texts were scored without generating them (:func:`agreement`).
    """

    prompts: int
    rouge1: float
    rouge2: float
    rougeL: float
    bleu: float
    exact_match: float
    tokens: int = 0


class _WordsAndMarks:
    """Tokens for ROUGE: lowercased words (any script) and each punctuation mark. rouge-score's
    default keeps ASCII letters and digits only, so it would score text in other scripts, or a
    continuation of punctuation, as empty."""

    pattern = re.compile(r"\w+|[^\w\s]")

    def tokenize(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower())


def agreement(references: list[str], candidates: list[str]) -> GenerationAgreement:
    """How closely ``candidates`` follow ``references`` (one pair per prompt).

    ROUGE-1/2/L F-measures come from rouge-score (no stemming) with words in any script and each
    punctuation mark as tokens, averaged over pairs; BLEU is sacrebleu's corpus BLEU (its 13a
    tokenizer, default exponential smoothing). Empty texts do not fail; as the libraries define it,
    a pair with an empty side scores ROUGE 0, even two empty texts (which still count as an exact
    match). Corpus BLEU is 0 when the candidates hold no 4-gram at all (all shorter than 4 tokens),
    even if every text is identical.
    Raises ValueError unless there are as many candidates as references, at least one.
    """
    # heavy optional scorers, imported only when agreement is measured
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(references) != len(candidates) or not references:
        raise ValueError("agreement needs as many candidates as references, at least one")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=_WordsAndMarks())
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for reference, candidate in zip(references, candidates):
        scores = scorer.score(reference, candidate)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = len(references)
    bleu = sacrebleu.corpus_bleu(candidates, [references]).score
    return GenerationAgreement(
        prompts=n, rouge1=totals["rouge1"] / n, rouge2=totals["rouge2"] / n, rougeL=totals["rougeL"] / n,
        bleu=min(float(bleu), 100.0), exact_match=sum(r == c for r, c in zip(references, candidates)) / n,
    )


def prompts_from_text(
    tokenizer: PreTrainedTokenizerBase, source: str, count: int, prompt_tokens: int
) -> list[torch.Tensor]:
    """Up to ``count`` prompts of ``prompt_tokens`` tokens each, int64 [1, prompt_tokens], cut back
    to back from the evaluation side of ``source`` (the same text every time).

    A source too small for ``count`` prompts gives fewer; SqueezeError if not even one fits.
    """
    if count < 1 or prompt_tokens < 1:
        raise SqueezeError(f"need at least 1 prompt of at least 1 token, got {count} of {prompt_tokens} tokens")
    windows = evaluation_windows(tokenizer, source, prompt_tokens, count * prompt_tokens)
    return [window.unsqueeze(0) for window in windows]


def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    on_prompt: Callable[[int], None] | None = None,
) -> list[str]:
    """``model``'s greedy continuation of each prompt [1, n] (at most ``max_new_tokens`` tokens,
    stopping after ``eos_token_id``), decoded without special tokens; ``on_prompt(k)`` as each
    batch of ``k`` prompts is done (prompts of one length go together: :func:`greedy_ids`).

    Generate a reference's continuations once with this and score any number of models against
    them with :func:`agreement`.
    """
    device = next(model.parameters()).device
    with reuse_dequantized():
        ids = greedy_ids(model, [p.to(device) for p in prompts], max_new_tokens, eos_token_id, on_batch=on_prompt)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


@torch.inference_mode()
def greedy_ids(
    model: nn.Module,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The greedy new token ids of each prompt [1, n] (on the model's device), at most
    ``max_new_tokens``, each cut after its ``eos_token_id``.

    Prompts of equal length (squeeze's generation-agreement prompts all are) run as one batch
    without padding (no row sees a pad or another row's tokens), and each new token runs the
    weights once for the whole batch; prompts of other lengths form batches of their own.
    ``on_token(1)`` after each new token of a batch, ``on_batch(k)`` after a batch of ``k`` prompts."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"each prompt is input_ids [1, n]; got shape {tuple(prompt.shape)}")
        by_length.setdefault(prompt.shape[1], []).append(index)
    new: list[list[int]] = [[] for _ in prompts]
    for rows in by_length.values():
        batch = torch.cat([prompts[i] for i in rows])
        for row, ids in zip(rows, _greedy_batch(model, batch, max_new_tokens, eos_token_id, on_token)):
            new[row] = ids
        if on_batch:
            on_batch(len(rows))
    return new


def _greedy_batch(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None, on_token: Callable[[int], None] | None,
) -> list[list[int]]:
    """Greedy new tokens for each row of ``ids`` [b, n] (no padding), each row cut after its EOS."""
    rows = ids.shape[0]
    new: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    past = None
    last_only = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, **cache_arguments(model, past), **last_only)
        past = returned_cache(out)
        tokens = out.logits[:, -1].argmax(dim=-1)
        chosen = tokens.tolist()  # one device sync per step, not one per row
        for row in range(rows):
            if not done[row]:
                new[row].append(chosen[row])
                done[row] = eos_token_id is not None and new[row][-1] == eos_token_id
        if on_token:
            on_token(1)
        if all(done):
            break
        ids = tokens.reshape(rows, 1)
    return new


def greedy_agreement(
    model: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    on_prompt: Callable[[int], None] | None = None,
) -> tuple[GenerationAgreement, list[dict[str, str]]]:
    """Greedy continuations of ``model`` and ``reference`` on each prompt [1, n], scored with
    :func:`agreement` (references first); also the texts, per prompt: prompt, reference, candidate.

    Each model continues each prompt once, at most ``max_new_tokens`` tokens, stopping after
    ``eos_token_id`` (default: the tokenizer's EOS id, if it has one). When ``model`` is
    ``reference`` its continuations are generated once and used on both sides. ``on_prompt(1)``
    after each continuation.
    """
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    references = greedy_continuations(reference, tokenizer, prompts, max_new_tokens, eos, on_prompt)
    candidates = (
        references if model is reference else greedy_continuations(model, tokenizer, prompts, max_new_tokens, eos, on_prompt)
    )
    rows = [
        {"prompt": tokenizer.decode(prompt[0], skip_special_tokens=True), "reference": ref, "candidate": cand}
        for prompt, ref, cand in zip(prompts, references, candidates)
    ]
    scores = dataclasses.replace(agreement(references, candidates), tokens=max_new_tokens)
    return scores, rows
