"""Generation with the KV cache, seeded sampling, ROUGE/BLEU agreement, prompts and greedy agreement.

The command-line side (squeeze eval, squeeze generate) is tested in test_cli_generate.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from squeeze.data import evaluation_windows
from squeeze.errors import SqueezeError
from squeeze.generate import agreement, generate, greedy_agreement, greedy_continuations, prompts_from_text
from squeeze.sampling import Sampling

PROMPT = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: for a hidden-32 model, waking a thread pool per op costs more than the
    op (on a 2-core runner, 20x slower per token)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama(vocab_size: int, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(minilm_tokenizer) -> transformers.LlamaForCausalLM:
    return _tiny_llama(minilm_tokenizer.vocab_size, seed=0)


@pytest.fixture(scope="module")
def other_model(minilm_tokenizer) -> transformers.LlamaForCausalLM:
    return _tiny_llama(minilm_tokenizer.vocab_size, seed=1)


def _greedy_without_cache(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The argmax continuation, recomputing the whole sequence for every token."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward does not take ``logits_to_keep`` (as older or custom models)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = False):
        return self.inner(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)


def test_greedy_with_cache_equals_full_recompute(model) -> None:
    # and the cache goes by the name the installed transformers takes: no deprecation warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert generate(model, PROMPT, 8, Sampling()) == _greedy_without_cache(model, PROMPT, 8)


def test_models_without_logits_to_keep(model) -> None:
    wrapped = _NoLogitsToKeep(model)
    assert generate(wrapped, PROMPT, 6, Sampling()) == generate(model, PROMPT, 6, Sampling())
    hot = Sampling(temperature=1.0)
    assert generate(wrapped, PROMPT, 6, hot, seed=3) == generate(model, PROMPT, 6, hot, seed=3)


def test_seeded_sampling_repeats_and_seeds_differ(model) -> None:
    hot = Sampling(temperature=1.0)
    with torch.no_grad():
        flat = torch.softmax(model(input_ids=PROMPT).logits[0, -1], -1).max()
    # a random tiny model is nearly uniform over 30k tokens, so two independent streams of 12
    # draws agree with probability well below (max p)^12
    assert flat < 0.01
    first = generate(model, PROMPT, 12, hot, seed=1)
    assert len(first) == 12
    assert generate(model, PROMPT, 12, hot, seed=1) == first
    assert generate(model, PROMPT, 12, hot, seed=2) != first


def test_stops_at_end_of_text(model) -> None:
    greedy = generate(model, PROMPT, 6, Sampling())
    stop = greedy[2]
    assert generate(model, PROMPT, 6, Sampling(), eos_token_id=stop) == greedy[: greedy.index(stop) + 1]
    assert generate(model, PROMPT, 0, Sampling()) == []


def test_generate_takes_one_prompt(model) -> None:
    with pytest.raises(ValueError, match=r"\[1, n\]"):
        generate(model, PROMPT.expand(2, -1), 2, Sampling())


def test_agreement_scores() -> None:
    same = agreement(["the cat sat on the mat", "a b c"], ["the cat sat on the mat", "a b c"])
    assert same.rouge1 == same.rouge2 == same.rougeL == 1.0 and same.exact_match == 1.0
    assert same.bleu == pytest.approx(100) and same.prompts == 2 and same.tokens == 0
    other = agreement(["the cat sat on the mat"], ["dogs run fast everywhere today"])
    assert other.rouge1 == other.rouge2 == other.rougeL == other.exact_match == 0.0
    assert other.bleu == pytest.approx(0, abs=1e-6)
    # 3 of 4 unigrams shared both ways: ROUGE-1 F = 0.75; bigrams: "the cat", "cat sat" of 3 each → 2/3;
    # longest common subsequence "the cat sat", 3 of 4 → 0.75
    partial = agreement(["the cat sat down"], ["the cat sat up"])
    assert partial.rouge1 == pytest.approx(0.75) and partial.rouge2 == pytest.approx(2 / 3)
    assert partial.rougeL == pytest.approx(0.75) and 0 < partial.bleu < 100
    # unequal lengths: 2 shared unigrams, precision 2/2, recall 2/4 → F = 2/3
    assert agreement(["the cat sat down"], ["the cat"]).rouge1 == pytest.approx(2 / 3)
    # averaged over prompts: (1 + 0) / 2
    assert agreement(["a b", "c d"], ["a b", "e f"]).rouge1 == pytest.approx(0.5)
    with pytest.raises(ValueError):
        agreement(["a"], [])
    with pytest.raises(ValueError):
        agreement([], [])


def test_agreement_of_empty_texts() -> None:
    both = agreement([""], [""])
    assert both.rouge1 == both.rouge2 == both.rougeL == 0.0 and both.bleu == 0.0 and both.exact_match == 1.0
    one = agreement(["the cat sat on the mat"], [""])
    assert one.rouge1 == one.rougeL == 0.0 and one.bleu == 0.0 and one.exact_match == 0.0


def test_agreement_counts_words_in_any_script() -> None:
    from rouge_score import rouge_scorer

    # rouge-score's own tokenizer keeps only [a-z0-9]: Cyrillic text scores 0 against itself and
    # "café" becomes "caf"; agreement() passes a tokenizer that keeps every script
    default = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert default.score("Привет мир", "Привет мир")["rouge1"].fmeasure == 0.0
    assert agreement(["Привет мир"], ["Привет мир"]).rouge1 == 1.0
    assert agreement(["Привет мир"], ["Привет друг"]).rouge1 == pytest.approx(0.5)
    assert agreement(["café"], ["cafe"]).rouge1 == 0.0


def test_prompts_from_text(minilm_tokenizer, small_text: Path) -> None:
    prompts = prompts_from_text(minilm_tokenizer, str(small_text), 3, 16)
    windows = evaluation_windows(minilm_tokenizer, str(small_text), 16, 48)
    assert len(prompts) == 3 and all(p.shape == (1, 16) and p.dtype == torch.long for p in prompts)
    assert torch.equal(torch.cat(prompts), windows)
    assert all(torch.equal(a, b) for a, b in zip(prompts, prompts_from_text(minilm_tokenizer, str(small_text), 3, 16)))
    # more than the evaluation side holds: what fits, not an error
    available = evaluation_windows(minilm_tokenizer, str(small_text), 512).shape[0]
    assert 1 <= len(prompts_from_text(minilm_tokenizer, str(small_text), available + 100, 512)) == available
    with pytest.raises(SqueezeError, match="at least 1 prompt"):
        prompts_from_text(minilm_tokenizer, str(small_text), 0, 16)


def test_greedy_agreement(model, other_model, minilm_tokenizer) -> None:
    prompts = [PROMPT, PROMPT[:, :3], torch.tensor([[101, 7592]])]
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        itself, rows = greedy_agreement(model, model, minilm_tokenizer, prompts, 5)
    finally:
        hook.remove()
    assert len(calls) == 3 * 5  # one greedy pass per prompt, used on both sides
    assert itself.exact_match == 1.0 and itself.prompts == 3 and itself.tokens == 5
    assert [r["reference"] for r in rows] == [r["candidate"] for r in rows]
    assert rows[1]["prompt"] == minilm_tokenizer.decode(PROMPT[0, :3], skip_special_tokens=True)

    scores, rows = greedy_agreement(other_model, model, minilm_tokenizer, prompts, 5)
    references = greedy_continuations(model, minilm_tokenizer, prompts, 5)
    candidates = greedy_continuations(other_model, minilm_tokenizer, prompts, 5)
    assert [r["reference"] for r in rows] == references and [r["candidate"] for r in rows] == candidates
    assert references[0] == minilm_tokenizer.decode(generate(model, PROMPT, 5, Sampling()), skip_special_tokens=True)
    assert scores == dataclasses.replace(agreement(references, candidates), tokens=5)
    # progress after every batch of continuations: three prompts of three lengths, two models
    advanced: list[int] = []
    greedy_agreement(other_model, model, minilm_tokenizer, prompts, 2, on_prompt=advanced.append)
    assert advanced == [1] * 6

    # an explicit end-of-text id: the first greedy token of prompt 0 stops that continuation at once
    first = generate(model, PROMPT, 1, Sampling())[0]
    _, rows = greedy_agreement(model, model, minilm_tokenizer, prompts[:1], 5, eos_token_id=first)
    assert rows[0]["reference"] == minilm_tokenizer.decode([first], skip_special_tokens=True)


def test_prompts_of_one_length_run_as_one_batch(model, minilm_tokenizer) -> None:
    # four prompts of six tokens and one of three: two batches, each token one forward per batch,
    # and every continuation the one that prompt gets alone
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1000, 5000, (1, 6), generator=g) for _ in range(4)] + [PROMPT[:, :3]]
    calls, advanced = [], []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        texts = greedy_continuations(model, minilm_tokenizer, prompts, 7, on_prompt=advanced.append)
    finally:
        hook.remove()
    assert len(calls) == 2 * 7 and advanced == [4, 1]
    alone = [minilm_tokenizer.decode(generate(model, p, 7, Sampling()), skip_special_tokens=True) for p in prompts]
    assert texts == alone
