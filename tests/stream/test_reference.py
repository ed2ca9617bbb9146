"""The recorded reference answers a comparison exactly as the whole uncompressed model does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from squeeze.evaluate import compare_causal, compare_encoder, metric_chunk
from squeeze.models import load_model
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.methods import METHODS
from squeeze.quant.scheme import scheme_from_options
from squeeze.stream.reference import record_reference


def _quantize_in_place(model: torch.nn.Module) -> None:
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True), method="rtn")
    METHODS.get("rtn").run(model, config, None)


def _windows(vocab: int, n: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_causal_metrics_equal_the_whole_model_s(tiny_llama_dir: Path) -> None:
    model = load_model(str(tiny_llama_dir)).model
    original = copy.deepcopy(model)
    windows = _windows(model.config.vocab_size, 5, 24)  # an odd count: the last batch is short
    recorded = record_reference(model, "causal", windows, batch_size=2)
    _quantize_in_place(model)
    want = compare_causal(model, windows, original, batch_size=2)
    got = compare_causal(model, windows, recorded, batch_size=2)
    assert want.kl_divergence > 0  # the model did change
    assert got == want  # the same floats, not merely close


def test_recording_keeps_no_block_and_stops_after_the_last(tiny_llama_dir: Path) -> None:
    model = load_model(str(tiny_llama_dir)).model
    windows = _windows(model.config.vocab_size, 2, 16)
    recorded = record_reference(model, "causal", windows, batch_size=2)
    head = recorded._head[0]
    block_params = sum(p.numel() for p in model.model.layers.parameters())
    assert block_params > 0 and not any(True for _ in head.model.layers.parameters())
    assert sum(p.numel() for p in recorded.parameters()) == 0  # the head copy is not a submodule
    assert recorded.outputs[0].shape == (2, 16, model.config.hidden_size)


def test_unrecorded_ids_are_refused(tiny_llama_dir: Path) -> None:
    model = load_model(str(tiny_llama_dir)).model
    windows = _windows(model.config.vocab_size, 2, 16)
    recorded = record_reference(model, "causal", windows, batch_size=2)
    with pytest.raises(RuntimeError, match="not recorded on these token ids"):
        recorded(input_ids=windows.flip(0))


def test_encoder_metrics_equal_the_whole_model_s(tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir)).model
    original = copy.deepcopy(model)
    windows = _windows(model.config.vocab_size, 9, 16)
    recorded = record_reference(model, "encoder", windows, batch_size=8)
    _quantize_in_place(model)
    want = compare_encoder(model, original, windows, batch_size=8)
    got = compare_encoder(model, recorded, windows, batch_size=8)
    assert want.cosine_mean < 1
    assert got == want


def test_a_recorded_model_s_logits_come_a_span_of_positions_at_a_time(tiny_llama_dir: Path) -> None:
    model = load_model(str(tiny_llama_dir)).model
    chunk = metric_chunk(2, model.config.vocab_size)
    windows = _windows(model.config.vocab_size, 2, 2 * chunk + 40)
    recorded = record_reference(model, "causal", windows, batch_size=2)
    assert recorded.slices_logits
    positions: list[int] = []
    head = recorded._head[0]
    handle = head.lm_head.register_forward_hook(lambda _m, _a, out: positions.append(out.shape[1]))
    try:
        got = compare_causal(model, windows, recorded, batch_size=2)
    finally:
        handle.remove()
    assert max(positions) <= chunk and sum(positions) == windows.shape[1] - 1  # never the whole window at once
    assert got == compare_causal(model, windows, copy.deepcopy(model), batch_size=2)
