"""Encoder-decoders (issue #17, item 3): the decoder is scored teacher-forced on the second half of
each window, the recorded reference gives what the model gives, a pass's report says how it was
scored, and what squeeze cannot do with two stacks of blocks is refused up front in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from squeeze.api import distill, quantize
from squeeze.distill.config import DistillConfig
from squeeze.errors import OptionError, SqueezeError
from squeeze.evaluate import compare_causal
from squeeze.models.tiny import tiny_model
from squeeze.passes.generate import generate_side_by_side
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.sampling import Sampling
from squeeze.runtime import Form, bench_infer
from squeeze.seq2seq import DecoderScoring, decoder_start, scoring_view, seq2seq_inputs
from squeeze.stream.reference import record_reference

SMALL = dict(data="shakespeare", eval_tokens=128, seq_len=32, calibration_samples=4, generation_prompts=0)
W8A8 = QuantizeConfig(scheme=scheme_from_options(bits=8, act="per-token"), method="smoothquant")


def _windows() -> torch.Tensor:
    return torch.randint(5, 1000, (3, 16), generator=torch.Generator().manual_seed(0))


def test_the_encoder_reads_the_first_half_and_the_decoder_predicts_the_second() -> None:
    ids = _windows()
    inputs = seq2seq_inputs(ids, start=7)
    assert torch.equal(inputs["input_ids"], ids[:, :8])
    assert torch.equal(inputs["decoder_input_ids"][:, 0], torch.full((3,), 7))
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, 8:15])
    # the decoder's logits at position j are scored against token 8 + j: the score is the
    # model's own cross-entropy on the second half
    model = tiny_model("bart", vocab_size=1000)
    with torch.no_grad():
        logits = model(**seq2seq_inputs(ids, decoder_start(model))).logits
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 8:].reshape(-1))
    scored = compare_causal(scoring_view(model), ids, batch_size=2)
    assert scored.tokens == 3 * 8
    assert scored.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-4)


@pytest.mark.parametrize("architecture", ["t5", "bart"])
def test_the_recorded_reference_gives_the_model_s_own_logits(architecture: str) -> None:
    """Recorded before a pass changes the model: the decoder's last hidden states and a copy
    without the blocks of either stack give the very logits the whole model gives."""
    model = tiny_model(architecture, vocab_size=1000)
    windows = _windows()
    recorded = record_reference(model, "seq2seq", windows, batch_size=2)
    start = decoder_start(model)
    with torch.no_grad():
        for batch in windows.split(2):
            want = DecoderScoring(model, start)(input_ids=batch).logits
            got = DecoderScoring(recorded, start)(input_ids=batch).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # changing the model does not change the record
        for p in model.parameters():
            p.mul_(0.5)
    cmp = compare_causal(DecoderScoring(model, start), windows, DecoderScoring(recorded, start), batch_size=2)
    assert cmp.kl_divergence > 0 and cmp.reference_perplexity != cmp.perplexity


def test_a_pass_report_says_how_the_decoder_was_scored(tiny_arch_dir, tmp_path: Path) -> None:
    report = quantize(str(tiny_arch_dir("t5")), tmp_path / "out", W8A8, **SMALL)
    assert report.model["kind"] == "seq2seq"
    assert report.accuracy.tokens == 4 * 16 and 0 < report.accuracy.top1_agreement <= 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "the encoder reads the first 16, the decoder is scored on the last 16" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["model"]["kind"] == "seq2seq"


def test_what_needs_one_stack_of_blocks_is_refused_up_front(tiny_arch_dir, tmp_path: Path) -> None:
    folder = str(tiny_arch_dir("bart"))
    out = tmp_path / "out"
    refusals = [
        (lambda: quantize(folder, out, W8A8, stream=True, **SMALL), OptionError, "is an encoder-decoder (two)"),
        (lambda: quantize(folder, out, QuantizeConfig(scheme=scheme_from_options(bits=4), format="gptq"), **SMALL),
         SqueezeError, "--format gptq describes one stack of blocks"),
        (lambda: quantize(folder, out, W8A8, measure_speed=True, **SMALL), OptionError, "this is an encoder-decoder"),
        (lambda: distill(folder, "layers:1", out, DistillConfig(steps=1)), SqueezeError, "is an encoder-decoder"),
        (lambda: generate_side_by_side([folder], ["hello"], Sampling()), SqueezeError, "is an encoder-decoder: squeeze generate continues text"),
        (lambda: bench_infer(folder, [Form("input", folder)]), SqueezeError, "is an encoder-decoder: prefill and decode"),
    ]
    for call, error, words in refusals:
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")) as raised:
            call()
        assert "\n" not in str(raised.value)
        assert not out.exists()
