"""Text generation with squeeze's sampler, and how closely one model's generations follow another's.

``generate`` runs the model with its KV cache and draws each token with :mod:`squeeze.sampling`
from one seeded CPU generator per call, so the same seed gives every compared model the same
random stream. ``agreement`` scores continuations against reference continuations with the
maintained implementations of ROUGE (``rouge-score``) and BLEU (``sacrebleu``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from squeeze.sampling import Sampling, sample


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_token_id: int | None = None,
) -> list[int]:
    """The new token ids (at most ``max_new_tokens``; stops after ``eos_token_id``) continuing
    ``input_ids`` [1, n]; one forward per token with the KV cache, logits of the last position only."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []
    past = None
    ids = input_ids
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        token = sample(out.logits[:, -1], sampling, generator)
        new.append(int(token[0]))
        if eos_token_id is not None and new[-1] == eos_token_id:
            break
        ids = token.reshape(1, 1)
    return new


@dataclass(frozen=True)
class GenerationAgreement:
    """Candidates scored against references: ROUGE F-measures averaged over prompts (0..1),
    corpus BLEU (0..100), and the share of prompts whose texts are identical."""

    prompts: int
    rouge1: float
    rouge2: float
    rougeL: float
    bleu: float
    exact_match: float


class _WordsAndMarks:
    """Tokens for ROUGE: lowercased words (any script) and each punctuation mark. rouge-score's
    default keeps ASCII letters and digits only, so it would score text in other scripts, or a
    continuation of punctuation, as empty."""

    pattern = re.compile(r"\w+|[^\w\s]")

    def tokenize(self, text: str) -> list[str]:
        return self.pattern.findall(text.lower())


def agreement(references: list[str], candidates: list[str]) -> GenerationAgreement:
    """ROUGE-1/2/L F-measures (rouge-score, no stemming, words and punctuation marks as tokens)
    and BLEU (sacrebleu's corpus BLEU, its 13a tokenizer). A pair of empty texts scores 0 in ROUGE."""
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


def prompts_from_text(tokenizer, source: str, count: int, prompt_tokens: int) -> list[torch.Tensor]:
    """Up to ``count`` prompts of ``prompt_tokens`` tokens each, [1, prompt_tokens], cut back to
    back from the evaluation side of ``source`` (the same text every time)."""
    from squeeze.data import evaluation_windows

    windows = evaluation_windows(tokenizer, source, prompt_tokens, count * prompt_tokens)
    return [window.unsqueeze(0) for window in windows]


def greedy_agreement(
    model: nn.Module,
    reference: nn.Module,
    tokenizer,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
) -> tuple[GenerationAgreement, list[dict[str, str]]]:
    """Greedy continuations of ``model`` and ``reference`` on each prompt, scored with
    :func:`agreement`; also the texts, per prompt."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        prompt = prompt.to(device)
        texts = [
            tokenizer.decode(generate(m, prompt, max_new_tokens, eos_token_id=eos), skip_special_tokens=True)
            for m in (reference, model)
        ]
        rows.append({"prompt": tokenizer.decode(prompt[0], skip_special_tokens=True), "reference": texts[0], "candidate": texts[1]})
    scores = agreement([r["reference"] for r in rows], [r["candidate"] for r in rows])
    return scores, rows
