"""Greedy generation one block at a time: the whole model's continuations, never two blocks in memory."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from squeeze.generate import greedy_continuations
from squeeze.models import load_model, resolve_model
from squeeze.passes.quantize import quantize
from squeeze.passes.stream import lazy_model
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.stream import lazy as lazy_module
from squeeze.stream.generation import streamed_greedy_continuations
from squeeze.weightcache import reuse_dequantized

from test_stream_pass import BlockCounter  # tests/stream is on the path (pytest prepends it)

SMALL = dict(data="shakespeare", eval_tokens=256, seq_len=32, calibration_samples=4, generation_prompts=0)


def prompts(seed: int) -> list[torch.Tensor]:
    """Two prompts of 12 tokens (one batch) and one of 7 (a batch of its own)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, 20000, (1, n), generator=generator) for n in (12, 7, 12)]


def whole_and_streamed(folder: Path, ids: list[torch.Tensor], eos: int | None, monkeypatch) -> tuple[list[str], list[str], BlockCounter]:
    loaded = load_model(str(folder))
    whole = greedy_continuations(loaded.model, loaded.tokenizer, ids, 10, eos)
    counter = BlockCounter(monkeypatch)
    lazy = lazy_model(resolve_model(str(folder)), torch.float32, "cpu")
    with reuse_dequantized():  # an outer scope must not keep the released blocks' weights
        streamed = streamed_greedy_continuations(lazy, loaded.tokenizer, ids, 10, eos)
    assert lazy.live == 0 and lazy.peak_parts == 2  # the outside and one block; all released after
    return whole, streamed, counter


def test_streamed_greedy_continuations_are_the_whole_models(twelve_blocks: Path, monkeypatch) -> None:
    ids = prompts(0)
    whole, streamed, counter = whole_and_streamed(twelve_blocks, ids, None, monkeypatch)
    assert counter.most == 1
    assert streamed == whole
    assert len(set(whole)) > 1 and all(whole)  # different prompts, different non-empty continuations: not vacuous


def test_a_row_stops_at_its_eos_while_the_others_go_on(twelve_blocks: Path, monkeypatch) -> None:
    ids = prompts(0)
    loaded = load_model(str(twelve_blocks))
    first = int(loaded.model(input_ids=ids[0]).logits[0, -1].argmax())  # prompt 0's first greedy token, made its EOS
    whole, streamed, _ = whole_and_streamed(twelve_blocks, ids, first, monkeypatch)
    assert streamed == whole
    assert len(loaded.tokenizer(streamed[0], add_special_tokens=False).input_ids) < len(loaded.tokenizer(streamed[2], add_special_tokens=False).input_ids)


def test_a_quantize_output_streams_its_continuations(twelve_blocks: Path, tmp_path: Path, monkeypatch) -> None:
    scheme = scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True)
    quantize(str(twelve_blocks), tmp_path / "w4", QuantizeConfig(scheme=scheme, method="rtn"), **SMALL)
    whole, streamed, counter = whole_and_streamed(tmp_path / "w4", prompts(1), None, monkeypatch)
    assert counter.most == 1
    assert streamed == whole


def test_an_untied_head_is_read_only_for_its_own_forward(minilm_tokenizer, tmp_path: Path, monkeypatch) -> None:
    """An untied head is as big as the embeddings: it is read for each token's logits and
    released again, so the embeddings, the norm and one block or the head are ever in memory."""
    config = transformers.LlamaConfig(
        vocab_size=minilm_tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "untied")
    minilm_tokenizer.save_pretrained(tmp_path / "untied")
    heads: list[bool] = []
    block = lazy_module.LazyModel.block

    def counted_block(lazy, index):  # is the head in memory while a block is?
        heads.append(not lazy.model.get_output_embeddings().weight.is_meta)
        return block(lazy, index)

    monkeypatch.setattr(lazy_module.LazyModel, "block", counted_block)
    whole, streamed, counter = whole_and_streamed(tmp_path / "untied", prompts(2), None, monkeypatch)
    assert streamed == whole and counter.most == 1
    assert len(heads) == 2 * 3 * 10 and not any(heads)  # two batches (two prompt lengths): every block for every token, never beside the head
