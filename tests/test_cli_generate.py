"""squeeze eval and squeeze generate from the command line: generation agreement in pass reports,
evaluation sources and encoders, one-line errors, seeded side-by-side generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squeeze.cli import app

runner = CliRunner()


def test_pass_report_has_generation_agreement(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = runner.invoke(app, [
        "quantize", str(tiny_llama_dir), "--bits", "4", "--mode", "per-group", "--group-size", "32",
        "--data", str(small_text), "--eval-tokens", "64", "--seq-len", "32", "--out", str(out), "-q",
    ])
    assert result.exit_code == 0, result.output
    accuracy = json.loads((out / "report.json").read_text())["accuracy"]
    assert accuracy["generation_prompts"] == 8 and accuracy["generation_tokens"] == 32
    assert 0 <= accuracy["rougeL"] <= 1 and 0 <= accuracy["bleu"] <= 100
    assert "generation agreement" in (out / "report.md").read_text()
    # squeeze eval gives the numbers of the report: one implementation, the same windows
    evaluated = runner.invoke(app, [
        "eval", str(out), "--reference", str(tiny_llama_dir), "--data", str(small_text), "--eval-tokens", "64",
        "--seq-len", "32", "--json",
    ])
    assert evaluated.exit_code == 0, evaluated.output
    row = json.loads(evaluated.stdout)["rows"][0]
    for key in ("perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement", "rougeL", "bleu"):
        assert row[key] == pytest.approx(accuracy[key], rel=1e-6, abs=1e-9), key


def test_eval_sources_and_encoders(tiny_llama_dir: Path, tiny_bert_dir: Path, small_text: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1])
    two = runner.invoke(app, [
        "eval", str(tiny_llama_dir), "--data", str(small_text), "--data", str(other), "--eval-tokens", "64", "--seq-len", "32", "--json",
    ])
    assert two.exit_code == 0, two.output
    rows = json.loads(two.stdout)["rows"]
    assert [r["data"] for r in rows] == [str(small_text), str(other)] and rows[0]["kl_divergence"] is None
    assert rows[0]["perplexity_after"] != rows[1]["perplexity_after"]
    itself = runner.invoke(app, [
        "eval", str(tiny_llama_dir), "--reference", str(tiny_llama_dir), "--data", str(small_text), "--eval-tokens", "64",
        "--seq-len", "32", "--generation-prompts", "2", "--json",
    ])
    row = json.loads(itself.stdout)["rows"][0]
    assert abs(row["kl_divergence"]) < 1e-6 and row["top1_agreement"] == 1.0 and row["exact_match"] == 1.0
    encoder = runner.invoke(app, [
        "eval", str(tiny_bert_dir), "--reference", str(tiny_bert_dir), "--data", str(small_text), "--eval-tokens", "64", "--seq-len", "32", "--json",
    ])
    assert encoder.exit_code == 0, encoder.output
    assert json.loads(encoder.stdout)["rows"][0]["embedding_cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    alone = runner.invoke(app, ["eval", str(tiny_bert_dir), "--data", str(small_text)])
    assert alone.exit_code == 2 and "give --reference" in alone.output
    mixed = runner.invoke(app, ["eval", str(tiny_bert_dir), "--reference", str(tiny_llama_dir), "--data", str(small_text)])
    assert mixed.exit_code == 2 and "is not" in mixed.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "/no/such/model"], "does not exist"),
        (["eval", "{model}", "--reference", "/no/such/model"], "does not exist"),
        (["eval", "{model}", "--data", "/no/such/file.txt"], "/no/such/file.txt"),
        (["generate", "{model}"], "--prompt TEXT or --prompts FILE"),
        (["generate", "{model}", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "{model}", "--prompt", "hi", "--top-p", "2"], "top-p"),
        (["generate", "{model}", "--prompts", "/no/such/prompts.txt"], "does not exist"),
        (["generate", "{model}", "--prompt", "hi", "--compare", "/no/such/model"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(tiny_llama_dir: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, [a.format(model=tiny_llama_dir) for a in args])
    assert result.exit_code == 2 and message in result.output


def test_generate_side_by_side_same_seed_same_text(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the weather today\n\nstock markets fell\n")
    args = ["generate", str(tiny_llama_dir), "--compare", str(copy), "--prompts", str(prompts),
            "--max-new-tokens", "6", "--temperature", "1.5", "--top-k", "40", "--top-p", "0.9", "--seed", "4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["prompt"] for p in data["prompts"]] == ["the weather today", "stock markets fell"]
    texts = [[o["text"] for o in p["outputs"].values()] for p in data["prompts"]]
    assert all(len(t) == 2 and t[0] == t[1] for t in texts)  # two copies of one model, one random stream
    assert texts[0][0] != texts[1][0]
    again = json.loads(runner.invoke(app, args).stdout)
    assert [[o["text"] for o in p["outputs"].values()] for p in again["prompts"]] == texts
    reseeded = json.loads(runner.invoke(app, [*args[:-2], "5", "--json"]).stdout)
    assert [[o["text"] for o in p["outputs"].values()] for p in reseeded["prompts"]] != texts
    twice = json.loads(runner.invoke(app, ["generate", str(tiny_llama_dir), "--compare", str(tiny_llama_dir), "--prompt", "hi",
                                          "--max-new-tokens", "2", "--json"]).stdout)
    assert len(twice["prompts"][0]["outputs"]) == 2
    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0 and "temperature 1.5, top-k 40, top-p 0.9" in table.output
