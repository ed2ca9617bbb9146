"""squeeze bench-infer and --measure-speed on tiny models (speeds are only checked to be measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeeze.api import quantize
from squeeze.cli import app
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.runtime import Form, bench_infer, default_forms

runner = CliRunner()


@pytest.fixture(scope="module")
def w8a8_dir(tiny_llama_dir: Path, small_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speed") / "w8a8"
    config = QuantizeConfig(scheme=scheme_from_options(bits=8, act="per-token"))
    quantize(str(tiny_llama_dir), out, config, data=str(small_text), eval_tokens=256, seq_len=32, evaluate=False)
    return out


def test_forms_and_ratios(tiny_llama_dir: Path, w8a8_dir: Path, small_text: Path) -> None:
    forms = default_forms(str(tiny_llama_dir), [str(w8a8_dir)])
    assert [f.label for f in forms] == ["fp32", "bf16", "W8A8 w8a8"]
    result = bench_infer(
        str(tiny_llama_dir), forms, data=str(small_text), prefill_tokens=32, decode_tokens=4, repeats=1,
        agreement_prompts=2, agreement_tokens=4, isolate=False,
    )
    fp32, bf16, w8a8 = result.forms
    assert "int8 x int8" in w8a8.runs_on and "bfloat16" in bf16.runs_on
    assert result.ratios(fp32) == {"prefill": 1.0, "decode": 1.0, "weights": 1.0, "peak_rss": 1.0}
    # int8 Linear weights (+ fp32 scales) against fp32: the blocks shrink, the tied embedding does not
    assert w8a8.weight_bytes < fp32.weight_bytes and bf16.weight_bytes == pytest.approx(fp32.weight_bytes / 2, rel=0.01)
    assert fp32.agreement is None and 0 <= w8a8.agreement["rougeL"] <= 1 and 0 <= w8a8.agreement["bleu"] <= 100
    assert all(len(c) <= 4 for c in w8a8.continuations)
    data = result.to_dict()
    assert data["forms"][2]["ratios_vs_fp32"]["weights"] < 1 and "continuations" not in data["forms"][2]


def test_a_form_agrees_with_itself(tiny_llama_dir: Path, small_text: Path) -> None:
    forms = [Form("fp32", str(tiny_llama_dir)), Form("again", str(tiny_llama_dir))]
    result = bench_infer(
        str(tiny_llama_dir), forms, data=str(small_text), prefill_tokens=32, decode_tokens=2, repeats=1,
        agreement_prompts=2, agreement_tokens=6, isolate=False,
    )
    assert result.forms[1].agreement["rougeL"] == 1.0 and result.forms[1].agreement["bleu"] == pytest.approx(100)


def test_cli_runs_each_form_in_its_own_process(tiny_llama_dir: Path, w8a8_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = runner.invoke(app, [
        "bench-infer", str(tiny_llama_dir), "--compare", str(w8a8_dir), "--no-bf16", "--prefill-tokens", "32",
        "--decode-tokens", "2", "--repeats", "1", "--prompts", "1", "--new-tokens", "2", "--data", str(small_text),
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [f["label"] for f in data["forms"]] == ["fp32", "W8A8 w8a8"]
    assert all(f["peak_rss_bytes"] > f["weight_bytes"] for f in data["forms"])
    again = runner.invoke(app, ["bench-infer", str(tiny_llama_dir), "--data", str(small_text), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compare", "/nonexistent/model"], "does not exist"),
        (["--prefill-tokens", "250"], "exceed the model's 256 positions"),
        (["--repeats", "0"], "at least 1"),
    ],
)
def test_bad_input_fails_before_loading(tiny_llama_dir: Path, small_text: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench-infer", str(tiny_llama_dir), "--data", str(small_text), *args])
    assert result.exit_code == 2 and message in result.output


def test_encoders_are_refused(tiny_bert_dir: Path) -> None:
    result = runner.invoke(app, ["bench-infer", str(tiny_bert_dir)])
    assert result.exit_code == 2 and "encoder" in result.output


def test_measure_speed_adds_the_numbers_to_the_report(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = runner.invoke(app, [
        "quantize", str(tiny_llama_dir), "--bits", "4", "--mode", "per-group", "--group-size", "32", "--data", str(small_text),
        "--eval-tokens", "64", "--seq-len", "32", "--out", str(out), "--measure-speed", "--json",
    ])
    assert result.exit_code == 0, result.output
    speed = json.loads((out / "report.json").read_text())["speed"]
    assert [f["label"] for f in speed["forms"]] == ["input", "output"]
    assert "_weight_int4pack_mm" in speed["forms"][1]["runs_on"]
    assert "decode tokens/s" in (out / "report.md").read_text()
