"""Streamed passes: one block in memory at a time, the resident pass's tensors and scores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.errors import OptionError
from squeeze.formats.files import dense_tensors, save_safetensors
from squeeze.models import resolve_model
from squeeze.passes.prune import prune
from squeeze.passes.quantize import quantize
from squeeze.passes.stream import lazy_model
from squeeze.prune.config import PruneConfig
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.stream import lazy as lazy_module

SMALL = dict(data="shakespeare", eval_tokens=256, seq_len=32, calibration_samples=4, generation_prompts=0)
W4 = dict(mode="per-group", bits=4, group_size=32, asym=True)
QUANTIZE = {
    "rtn": scheme_from_options(**W4),
    "hqq": scheme_from_options(**W4),
    "gptq": scheme_from_options(**W4),
    "awq": scheme_from_options(**W4),
    "smoothquant": scheme_from_options(act="per-token"),
}


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                out[k] = hashlib.sha256(f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


class BlockCounter:
    """Instruments the loader: the most transformer blocks' parameters in memory at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: set[str] = set()
        self.most = 0
        materialise, release = lazy_module.LazyModel.materialise, lazy_module.LazyModel.release
        counter = self

        def counted_materialise(lazy, names):
            materialise(lazy, names)
            counter.live |= {b for b in lazy.blocks if any(n.startswith(b + ".") for n in names)}
            counter.most = max(counter.most, len(counter.live))

        def counted_release(lazy, module, replaced=()):
            counter.live -= {b for b in lazy.blocks if lazy.model.get_submodule(b) is module}
            release(lazy, module, replaced)

        monkeypatch.setattr(lazy_module.LazyModel, "materialise", counted_materialise)
        monkeypatch.setattr(lazy_module.LazyModel, "release", counted_release)


def assert_same(resident, streamed, a: Path, b: Path) -> None:
    assert digests(b) == digests(a)
    x, y = resident.accuracy, streamed.accuracy
    for field in ("perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement"):
        assert getattr(y, field) == pytest.approx(getattr(x, field), rel=1e-5, abs=1e-7), field
    assert streamed.settings["streamed"] and [e.name for e in streamed.layers] == [e.name for e in resident.layers]


@pytest.mark.parametrize("method", list(QUANTIZE))
def test_every_quantization_method_streams_block_by_block(method: str, twelve_blocks: Path, tmp_path: Path, monkeypatch) -> None:
    config = QuantizeConfig(scheme=QUANTIZE[method], method=method)
    resident = quantize(str(twelve_blocks), tmp_path / "resident", config, **SMALL)
    counter = BlockCounter(monkeypatch)
    streamed = quantize(str(twelve_blocks), tmp_path / "streamed", config, stream=True, **SMALL)
    assert 1 <= counter.most <= 2, counter.most
    assert_same(resident, streamed, tmp_path / "resident", tmp_path / "streamed")
    assert streamed.size.linear_bytes_after == resident.size.linear_bytes_after
    assert any("no generation agreement" in n for n in streamed.notes) is False  # none asked for here


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_pruning_method_streams_block_by_block(method: str, twelve_blocks: Path, tmp_path: Path, monkeypatch) -> None:
    config = PruneConfig(method=method, sparsity=0.5, pattern="2:4" if method == "sparsegpt" else None)
    resident = prune(str(twelve_blocks), tmp_path / "resident", config, **SMALL)
    counter = BlockCounter(monkeypatch)
    streamed = prune(str(twelve_blocks), tmp_path / "streamed", config, stream=True, **SMALL)
    assert 1 <= counter.most <= 2, counter.most
    assert_same(resident, streamed, tmp_path / "resident", tmp_path / "streamed")
    assert streamed.sparsity == resident.sparsity
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"] == json.loads(
        (tmp_path / "resident" / "config.json").read_text()
    )["quantization_config"]


def test_a_chain_streams_against_the_original(twelve_blocks: Path, tmp_path: Path) -> None:
    """prune → quantize, each streamed, the quantize step scored against the original (a named reference)."""
    pruned = tmp_path / "pruned"
    prune(str(twelve_blocks), pruned, PruneConfig(method="wanda", sparsity=0.5), stream=True, evaluate=False, **{k: v for k, v in SMALL.items() if k != "eval_tokens"})
    config = QuantizeConfig(scheme=QUANTIZE["gptq"], method="gptq")
    resident = quantize(str(pruned), tmp_path / "resident", config, reference=str(twelve_blocks), **SMALL)
    streamed = quantize(str(pruned), tmp_path / "streamed", config, reference=str(twelve_blocks), stream=True, **SMALL)
    assert_same(resident, streamed, tmp_path / "resident", tmp_path / "streamed")
    assert streamed.accuracy.reference == resident.accuracy.reference
    assert streamed.sparsity == resident.sparsity and streamed.sparsity.structure == "unstructured"


def test_sharded_input_and_output_reload_in_transformers(twelve_blocks: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(twelve_blocks, dtype=torch.bfloat16)
    sharded.mkdir()
    save_safetensors(dense_tensors(model), sharded, max_shard_bytes=600_000)  # embeddings alone, then blocks
    model.config.save_pretrained(sharded)
    transformers.AutoTokenizer.from_pretrained(twelve_blocks).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) >= 3 and (sharded / "model.safetensors.index.json").exists()
    config = QuantizeConfig(scheme=QUANTIZE["rtn"], method="rtn")
    quantize(str(sharded), tmp_path / "resident", config, evaluate=False)
    report = quantize(str(sharded), tmp_path / "streamed", config, stream=True, evaluate=False, max_shard_size="100KB")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) >= 3
    assert digests(tmp_path / "streamed") == digests(tmp_path / "resident")
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)(input_ids=ids).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resident", dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(a, b) and report.size.disk_bytes_after > 0


def test_an_encoder_streams_with_its_evaluation(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = QuantizeConfig(scheme=QUANTIZE["gptq"], method="gptq")
    resident = quantize(str(tiny_bert_dir), tmp_path / "resident", config, **SMALL)
    streamed = quantize(str(tiny_bert_dir), tmp_path / "streamed", config, stream=True, **SMALL)
    assert digests(tmp_path / "streamed") == digests(tmp_path / "resident")
    assert streamed.accuracy.embedding_cosine_mean == pytest.approx(resident.accuracy.embedding_cosine_mean, rel=1e-6)
    assert streamed.accuracy.embedding_cosine_min == pytest.approx(resident.accuracy.embedding_cosine_min, rel=1e-6)


@pytest.mark.parametrize("call, words", [
    (lambda m, o: prune(m, o, PruneConfig(method="magnitude", sparsity=0.5, scope="global"), stream=True), "a scope global ranking"),
    (lambda m, o: quantize(m, o, QuantizeConfig(scheme=scheme_from_options(act="per-tensor"), method="rtn"), stream=True), "static activation ranges"),
    (lambda m, o: quantize(m, o, QuantizeConfig(scheme=scheme_from_options(**W4, checkpoint="gptq"), method="rtn", format="gptq"), stream=True), "drop format gptq"),
    (lambda m, o: quantize(m, o, QuantizeConfig(scheme=QUANTIZE["rtn"], method="rtn"), stream=True, measure_speed=True), "measure_speed loads the whole model"),
])
def test_what_does_not_stream_is_named(call, words: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError) as info:
        call(str(tiny_llama_dir), tmp_path / "never")
    assert words in str(info.value)
    assert not (tmp_path / "never").exists()


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", [("quantize", "--method", "gptq", "--mode", "per-group", "--group-size", "32"), ("prune", "--method", "wanda")])
def test_cli_stream(command: tuple, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = run(*command[:1], tiny_llama_dir, *command[1:], "--stream", "--data", "shakespeare", "--eval-tokens", "256",
                 "--seq-len", "32", "--calib-samples", "4", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["streamed"] and report["accuracy"]["kl_divergence"] > 0
    # generation agreement streams too: each model read one block at a time for every new token
    assert report["accuracy"]["generation_prompts"] > 0 and 0 <= report["accuracy"]["rougeL"] <= 1
    assert any("one block at a time for every new token" in n for n in report["notes"])
    transformers.AutoModelForCausalLM.from_pretrained(out)  # loads without squeeze


def test_a_streamed_pass_scores_generation_one_block_at_a_time(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Generation agreement does not load a whole model after a streamed pass (it once did, and a
    32-block run peaked at five times its streamed memory): each model is read one block at a time
    for every new token, and the scores are those of the pass holding the model."""
    settings = {**SMALL, "generation_prompts": 2}
    config = PruneConfig(method="magnitude", sparsity=0.5)
    held = prune(str(tiny_llama_dir), tmp_path / "r", config, **settings)
    counter = BlockCounter(monkeypatch)
    streamed = prune(str(tiny_llama_dir), tmp_path / "q", config, stream=True, memory_budget=1, **settings)
    assert counter.most == 1
    assert streamed.accuracy.rouge1 is not None and streamed.accuracy.generation_prompts == 2
    for field in ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"):
        assert getattr(streamed.accuracy, field) == pytest.approx(getattr(held.accuracy, field)), field


def test_cli_stream_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--stream", "--no-eval", "--format", "gptq", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "--stream writes compressed-tensors: drop --format gptq" in result.output, result.output
    assert run("quantize", tiny_llama_dir, "--no-eval", "--quiet", "--out", tmp_path / "q").exit_code == 0
    result = run("quantize", tmp_path / "q", "--stream", "--no-eval", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "is a compressed-tensors checkpoint" in result.output, result.output
    assert not (tmp_path / "never").exists()


def test_cli_stream_bad_input_is_one_line_and_writes_nothing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    save_safetensors(dense_tensors(model), sharded, max_shard_bytes=600_000)
    model.config.save_pretrained(sharded)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    result = run("quantize", sharded, "--stream", "--no-eval", "--out", tmp_path / "never")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"missing shard {shards[-1].name}" in result.output
    result = run("quantize", tiny_llama_dir, "--stream", "--no-eval", "--memory-budget", "1MB", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "one block alone is" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "never").exists()


def test_a_streamed_model_maps_large_allocations(twelve_blocks: Path, monkeypatch) -> None:
    # glibc's default, a threshold that rises as mapped tensors are freed, lets the heap fragment
    # and the peak grow with the number of blocks: a lazy model fixes the threshold
    calls = []
    monkeypatch.setattr(lazy_module, "_MALLOPT", lambda *args: calls.append(args) or 1)
    lazy_model(resolve_model(str(twelve_blocks)), torch.float32, "cpu")
    assert calls == [(-3, lazy_module.MMAP_THRESHOLD)]
