"""``squeeze eval --stream``: each model read one block at a time, quantize outputs decoded layer by
layer, the scores of the models held whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.passes.evaluate import evaluate_model
from squeeze.passes.prune import prune
from squeeze.passes.quantize import quantize
from squeeze.prune.config import PruneConfig
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.stream import lazy as lazy_module

from test_stream_pass import BlockCounter  # tests/stream is on the path (pytest prepends it)

SMALL = dict(data="shakespeare", eval_tokens=256, seq_len=32, calibration_samples=4, generation_prompts=0)
EVAL = dict(data=["shakespeare"], eval_tokens=256, seq_len=32, generation_prompts=0)
OUTPUTS = {
    "w4-g32-sym-gptq": QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32), method="gptq"),
    "w4-g32-asym": QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True), method="rtn"),
    "w4-g32-signed": QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32, signed_scale=True), method="rtn"),
    "w8a8-static": QuantizeConfig(scheme=scheme_from_options(act="per-tensor"), method="rtn"),
    "w8a8-token-asym": QuantizeConfig(scheme=scheme_from_options(act="per-token", act_asym=True), method="rtn"),
}
SCORES = ("perplexity_after", "perplexity_before", "kl_divergence", "top1_agreement")


@pytest.fixture(scope="module")
def outputs(twelve_blocks: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("stream-eval")
    folders = {}
    for name, config in OUTPUTS.items():
        quantize(str(twelve_blocks), work / name, config, **SMALL)
        folders[name] = work / name
    prune(str(twelve_blocks), work / "wanda", PruneConfig(method="wanda", sparsity=0.5), **SMALL)
    folders["wanda-sparse-bitmask"] = work / "wanda"
    return folders


@pytest.mark.parametrize("name", [*OUTPUTS, "wanda-sparse-bitmask"])
def test_a_streamed_evaluation_scores_what_the_whole_model_scores(name: str, outputs: dict, twelve_blocks: Path, monkeypatch) -> None:
    held = evaluate_model(str(outputs[name]), str(twelve_blocks), **EVAL)
    counter = BlockCounter(monkeypatch)
    streamed = evaluate_model(str(outputs[name]), str(twelve_blocks), stream=True, **EVAL)
    assert counter.most == 1  # one block of one model at a time
    assert streamed.rows[0].kl_divergence > 1e-6  # the output differs from its reference: the comparison is not vacuous
    for score in SCORES:
        assert getattr(streamed.rows[0], score) == pytest.approx(getattr(held.rows[0], score), rel=1e-5, abs=1e-7), score
    assert streamed.rows[0].rouge1 is None and not any("generation agreement" in n for n in streamed.notes)  # none asked for


def test_a_streamed_evaluation_scores_generation_one_block_at_a_time(outputs: dict, twelve_blocks: Path, monkeypatch) -> None:
    settings = dict(EVAL, generation_prompts=2)
    held = evaluate_model(str(outputs["w4-g32-asym"]), str(twelve_blocks), **settings)
    counter = BlockCounter(monkeypatch)
    streamed = evaluate_model(str(outputs["w4-g32-asym"]), str(twelve_blocks), stream=True, **settings)
    assert counter.most == 1
    assert streamed.rows[0].generation_prompts == 2 and any("generation agreement" in n for n in streamed.notes)
    for field in ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"):
        assert getattr(streamed.rows[0], field) == pytest.approx(getattr(held.rows[0], field)), field


def test_every_source_is_scored_in_one_read_of_each_model(outputs: dict, twelve_blocks: Path, monkeypatch) -> None:
    """Two text sources: each block of each model is read once (its windows of both sources run
    through it together), and each source's row is the one its evaluation held whole gives."""
    sources = dict(EVAL, data=["shakespeare", "wikipedia"])
    held = evaluate_model(str(outputs["w4-g32-asym"]), str(twelve_blocks), **sources)
    reads: list[str] = []
    materialise = lazy_module.LazyModel.materialise

    def counted(lazy, names):
        reads.extend(b for b in lazy.blocks if any(n.startswith(b + ".") for n in names))
        materialise(lazy, names)

    monkeypatch.setattr(lazy_module.LazyModel, "materialise", counted)
    streamed = evaluate_model(str(outputs["w4-g32-asym"]), str(twelve_blocks), stream=True, **sources)
    assert len(reads) == 2 * 12 and len(set(reads)) == 12  # twelve blocks, each once in each model
    assert [r.data for r in streamed.rows] == ["shakespeare", "wikipedia"]
    assert streamed.rows[0].kl_divergence != pytest.approx(streamed.rows[1].kl_divergence, rel=1e-3)  # two texts, two scores
    for ours, theirs in zip(streamed.rows, held.rows):
        for score in SCORES:
            assert getattr(ours, score) == pytest.approx(getattr(theirs, score), rel=1e-5, abs=1e-7), score


def test_a_quantize_output_streams_as_squeeze_holds_it(outputs: dict, monkeypatch) -> None:
    """Without a reference: the perplexity alone, its quantized layers decoded one block at a time."""
    held = evaluate_model(str(outputs["w4-g32-asym"]), **EVAL)
    counter = BlockCounter(monkeypatch)
    streamed = evaluate_model(str(outputs["w4-g32-asym"]), stream=True, **EVAL)
    assert counter.most == 1
    assert streamed.rows[0].perplexity_after == pytest.approx(held.rows[0].perplexity_after, rel=1e-5)


def test_a_budget_too_small_for_the_models_whole_streams_by_itself(outputs: dict, twelve_blocks: Path) -> None:
    held = evaluate_model(str(outputs["w4-g32-sym-gptq"]), str(twelve_blocks), **EVAL)
    assert not held.notes
    streamed = evaluate_model(str(outputs["w4-g32-sym-gptq"]), str(twelve_blocks), memory_budget="1MB", **EVAL)
    assert streamed.notes[0].startswith("streamed by itself: the models held whole need about")
    assert streamed.rows[0].kl_divergence == pytest.approx(held.rows[0].kl_divergence, rel=1e-5)


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_eval_stream(outputs: dict, twelve_blocks: Path, tmp_path: Path) -> None:
    result = run("eval", outputs["w4-g32-asym"], "--reference", twelve_blocks, "--stream", "--data", "shakespeare", "--eval-tokens", "256",
                 "--seq-len", "32", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"][0]["kl_divergence"] > 0 and "streamed: one block of one model in memory at a time" in report["notes"]
    table = run("eval", outputs["w4-g32-asym"], "--stream", "--data", "shakespeare", "--eval-tokens", "256", "--seq-len", "32")
    assert table.exit_code == 0 and "streamed: one block" in " ".join(table.output.split())


def test_cli_eval_stream_refuses_what_it_cannot_read_in_one_line(twelve_blocks: Path, tmp_path: Path) -> None:
    gptq = tmp_path / "gptq"
    assert run("quantize", twelve_blocks, "--format", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "32", "--no-eval",
               "--quiet", "--out", gptq).exit_code == 0
    result = run("eval", gptq, "--stream", "--data", "shakespeare", "--eval-tokens", "256", "--seq-len", "32")
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "error: --stream reads GGUF files and folders of safetensors weights" in line and line.endswith("gptq is a gptq checkpoint")
    result = run("eval", twelve_blocks, "--memory-budget", "lots", "--data", "shakespeare")
    assert result.exit_code == 2 and "--memory-budget" in result.output


def test_a_dense_prune_output_still_streams_into_a_pass(twelve_blocks: Path, tmp_path: Path) -> None:
    """A ``--format dense`` prune output carries a sparsity-only compressed-tensors config: dense
    weights, which a streamed pass reads as it reads any model."""
    assert run("prune", twelve_blocks, "--format", "dense", "--no-eval", "--quiet", "--out", tmp_path / "dense").exit_code == 0
    assert "quantization_config" in json.loads((tmp_path / "dense" / "config.json").read_text())
    result = run("quantize", tmp_path / "dense", "--stream", "--no-eval", "--quiet", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    streamed = evaluate_model(str(tmp_path / "dense"), stream=True, **EVAL)
    assert streamed.rows[0].perplexity_after == pytest.approx(evaluate_model(str(tmp_path / "dense"), **EVAL).rows[0].perplexity_after, rel=1e-5)


def test_an_encoder_streams_against_its_reference(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """An encoder's embeddings, read one block at a time, compare with its reference's as held."""
    prune(str(tiny_bert_dir), tmp_path / "p", PruneConfig(method="magnitude", sparsity=0.5), **SMALL)
    held = evaluate_model(str(tmp_path / "p"), str(tiny_bert_dir), **EVAL)
    streamed = evaluate_model(str(tmp_path / "p"), str(tiny_bert_dir), stream=True, **EVAL)
    assert streamed.kind == "encoder" and 0 < held.rows[0].embedding_cosine_mean < 1
    for score in ("embedding_cosine_mean", "embedding_cosine_min"):
        assert getattr(streamed.rows[0], score) == pytest.approx(getattr(held.rows[0], score), rel=1e-5), score
