"""squeeze.passes.evaluate.evaluate_model: cheap checks before any weights load, one scoring path with and
without a reference, and what the eval command prints (table, --quiet). The CLI's JSON and its
agreement with a pass report are tested in test_cli_generate.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.cli.infer import _eval_table
from squeeze.passes import evaluate
from squeeze.passes.evaluate import evaluate_model
from squeeze.errors import SqueezeError

runner = CliRunner()


@pytest.mark.parametrize(
    "model, reference, data, message",
    [
        ("/no/such/model", None, None, "does not exist"),
        ("{llama}", "/no/such/model", None, "does not exist"),
        ("{llama}", None, "/no/such/file.txt", "/no/such/file.txt"),
        ("{llama}", "{llama}", "wikipedia|/no/such/file.txt", "/no/such/file.txt"),  # the second source too
        ("{bert}", None, None, "give reference MODEL"),  # a Python caller's words (the CLI says --reference)
        ("{bert}", "{llama}", None, "is not"),
        ("{llama}", None, "", "at least one text source"),
    ],
)
def test_bad_input_fails_before_loading(
    tiny_llama_dir: Path, tiny_bert_dir: Path, small_text: Path, monkeypatch, model, reference, data, message,
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the cheap checks")

    monkeypatch.setattr(evaluate, "load_model", no_loading)
    paths = {"llama": tiny_llama_dir, "bert": tiny_bert_dir}
    sources = [str(small_text)] if data is None else [s for s in data.split("|") if s]
    with pytest.raises(SqueezeError, match=message.replace(".", r"\.")):
        evaluate_model(model.format(**paths), reference and reference.format(**paths), sources, eval_tokens=64, seq_len=32)


def test_one_scoring_path_with_and_without_reference(tiny_llama_dir: Path, tiny_llama4_dir: Path, small_text: Path) -> None:
    alone = evaluate_model(str(tiny_llama_dir), data=[str(small_text)], eval_tokens=64, seq_len=32)
    against = evaluate_model(
        str(tiny_llama_dir), str(tiny_llama4_dir), [str(small_text)], eval_tokens=64, seq_len=32, generation_prompts=0,
    )
    row, compared = alone.rows[0], against.rows[0]
    assert (row.windows, row.seq_len, row.tokens) == (2, 32, 2 * 31)  # each window predicts its tokens 1..L-1
    assert row.kl_divergence is None and row.perplexity_before is None
    assert compared.perplexity_after == pytest.approx(row.perplexity_after, rel=1e-6)
    assert compared.kl_divergence > 0 and 0 <= compared.top1_agreement <= 1 and compared.rougeL is None
    assert against.kind == "causal" and against.seconds > 0 and against.peak_rss_bytes > 0
    assert against.to_dict()["rows"][0]["perplexity_change"] == pytest.approx(compared.perplexity_change)


def test_table_and_quiet(tiny_llama_dir: Path, tiny_bert_dir: Path, small_text: Path) -> None:
    def rendered(model: str) -> str:
        console = Console(record=True, width=200)
        console.print(_eval_table(evaluate_model(model, model, [str(small_text)], eval_tokens=64, seq_len=32, generation_prompts=0)))
        return console.export_text()

    causal = rendered(str(tiny_llama_dir))
    for column in ("perplexity", "reference perplexity", "change", "KL (nats/token)", "top-1", "100.00%", "+0.00%"):
        assert column in causal, column
    encoder = rendered(str(tiny_bert_dir))
    assert "cosine mean" in encoder and "1.00000" in encoder and "perplexity" not in encoder
    quiet = runner.invoke(app, ["eval", str(tiny_llama_dir), "--data", str(small_text), "--eval-tokens", "64", "--seq-len", "32", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stdout == ""
