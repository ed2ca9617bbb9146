"""The report's derived numbers and its renderings."""

import json

import pytest
import torch
from rich.console import Console

from squeeze.evaluate import reset_peak_rss
from squeeze.passes.common import Stopwatch
from squeeze.report import AccuracyReport, LayerReport, Report, SizeReport, to_markdown, to_rich, write_report


def make_report() -> Report:
    size = SizeReport(
        parameters=1000,
        compressed_parameters=800,
        disk_bytes_before=4000,
        disk_bytes_after=1300,
        memory_bytes_before=4000,
        memory_bytes_after=1700,
        linear_bytes_before=3200,
        linear_bytes_after=500,
    )
    accuracy = AccuracyReport(data="wikipedia", windows=2, seq_len=8, tokens=14, perplexity_before=10.0,
                              perplexity_after=10.5, kl_divergence=0.01, top1_agreement=0.9)
    layers = [LayerReport(f"layer{i}", (4, 8), 0.01 * i, 0.1) for i in range(12)]
    return Report("quantize", {"name": "tiny"}, {"scheme": "W4A16"}, size, {"load": 1.0, "quantize": 2.0},
                  123456789, "cpu", accuracy, layers)


def test_derived_numbers() -> None:
    data = make_report().to_dict()
    assert data["size"]["bits_per_weight"] == pytest.approx(8 * 500 / 800)
    assert data["size"]["model_bits_per_weight"] == pytest.approx(8 * 1300 / 1000)
    assert data["size"]["disk_ratio"] == pytest.approx(4000 / 1300)
    assert data["size"]["linear_ratio"] == pytest.approx(500 / 3200)
    assert data["accuracy"]["perplexity_change"] == pytest.approx(0.05)
    assert data["timings_s"]["total"] == pytest.approx(3.0)


def test_files_and_renderings(tmp_path) -> None:
    report = make_report()
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["peak_rss_bytes"] == 123456789
    markdown = (tmp_path / "report.md").read_text()
    assert all(f"| layer{i} |" in markdown for i in range(12))  # every layer in the file
    assert "+5.00%" in markdown and "| perplexity | 10.000 |" in markdown
    console = Console(record=True, width=150)
    console.print(to_rich(report, worst_layers=3))
    text = console.export_text()
    assert "layer11" in text and "layer10" in text and "layer9" in text and "layer8 " not in text
    bits_row = next(line for line in text.splitlines() if "bits per weight (compressed" in line)
    assert "5.00" in bits_row  # 8 bits x 500 bytes / 800 weights


def test_markdown_without_accuracy() -> None:
    report = make_report()
    report.accuracy = None
    assert "perplexity" not in to_markdown(report)


def test_uncompressed_matrices_are_listed_one_line_per_kind() -> None:
    report = make_report()
    router = "MixtralTopKRouter is not a Linear layer"
    report.uncompressed = {
        "model.embed_tokens.weight": "embedding",
        **{f"model.layers.{i}.mlp.gate.weight": router for i in range(3)},
    }
    markdown = to_markdown(report)
    assert "## Weight matrices left uncompressed" in markdown
    assert f"- `model.layers.*.mlp.gate.weight` (3): {router}" in markdown
    assert "- `model.embed_tokens.weight` (1): embedding" in markdown
    assert json.loads(json.dumps(report.to_dict()))["uncompressed"]["model.layers.2.mlp.gate.weight"] == router


def test_the_stopwatch_names_the_stage_that_set_the_peak() -> None:
    """The report says which stage raised the peak RSS (the streamed GPTQ row's 11 GiB was
    generation's, which no stage timing showed): the innermost stage that raised it."""
    if not reset_peak_rss():
        pytest.fail("this test needs /proc/self/clear_refs (Linux)")
    watch = Stopwatch()
    with watch.stage("small"):
        small = torch.ones(2**20)  # 4 MiB
    with watch.stage("outer"), watch.stage("big"):
        big = torch.ones(2**27)  # 512 MiB, touched
    with watch.stage("after"):
        del big
    assert watch.peak_stage == "big" and set(watch.timings) == {"small", "outer", "big", "after"}
    report = make_report()
    report.peak_rss_stage = watch.peak_stage
    assert "(reached while big)" in to_markdown(report) and json.loads(json.dumps(report.to_dict()))["peak_rss_stage"] == "big"
    outside = torch.ones(2**28)  # 1 GiB outside every stage: no stage set the peak now
    assert watch.peak_stage == "" and small.sum() > 0 and outside.sum() > 0


def test_a_stage_timed_by_an_inner_stopwatch_takes_the_peak() -> None:
    """A streamed pass times its per-block evaluation and writing on a second watch, within the
    compress stage: the inner stage is the one named."""
    if not reset_peak_rss():
        pytest.fail("this test needs /proc/self/clear_refs (Linux)")
    outer, inner = Stopwatch(), Stopwatch()
    with outer.stage("quantize"), inner.stage("evaluate"):
        held = torch.ones(2**27)
    assert outer.peak_stage == "quantize"
    outer.absorb_peak(inner)
    assert outer.peak_stage == "evaluate" and held.sum() > 0
