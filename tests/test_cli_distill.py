"""squeeze distill on the command line: the options, and every bad input (one line, exit 2, nothing written)."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from squeeze.cli import app

FAST = ["--seq-len", "32", "--eval-tokens", "256", "--batch-size", "2"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_tokens_set_the_steps(tiny_llama_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    from squeeze.data import load_documents

    text.write_text("\n\n".join(load_documents("bbc")[:30]))
    result = run("distill", tiny_llama_dir, "layers:1", "--data", text, "--tokens", "200", *FAST, "--out", tmp_path / "o", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["training"]["steps"] == 4  # ceil(200 / (2 windows x 32 tokens))
    assert report["pass_name"] == "distill" and report["settings"]["student"] == "1 teacher blocks [1]"


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    """A tiny Llama with a 1,000-token vocabulary: not the teacher's."""
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)  # fmt: skip
    out = tmp_path_factory.mktemp("other_vocab")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    minilm_tokenizer.save_pretrained(out)
    return out


BAD = [
    (["{llama}", "layers:3"], "more blocks than the teacher has (2)"),
    (["{llama}", "layers:0,5"], "the teacher has blocks 0..1"),
    (["{llama}", "width:2"], "width:F takes a factor"),
    (["{llama}", "{other}"], "different vocabularies"),
    (["{llama}", "{bert}"], "is a causal model but student"),
    (["{llama}", "/no/such/student"], "does not exist"),
    (["/no/such/teacher", "layers:1"], "does not exist"),
    (["{llama}", "layers:1", "--data", "{tiny_text}"], "not enough text"),
    (["{llama}", "layers:1", "--steps", "3", "--tokens", "100"], "not both"),
    (["{llama}", "layers:1", "--alpha", "1.5"], "alpha"),
    (["{llama}", "layers:1", "--temperature", "0"], "temperature"),
    (["{llama}", "layers:1", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["{llama}", "layers:1", "--hidden-loss", "l1"], "unknown --hidden-loss 'l1'"),
    (["{llama}", "layers:1", "--hidden-loss", "cosine", "--layer-map", "0:7"], "out of range"),
    (["{llama}", "layers:1", "--layer-map", "0:1"], "--hidden-loss"),
    (["{llama}", "layers:1", "--resume"], "nothing to resume"),
    (["{llama}", "layers:1", "--alpha", "0", "--teacher-cache", "{cache}"], "no teacher logits to cache"),
    (["{llama}", "layers:1", "--hidden-loss", "mse", "--teacher-cache", "{cache}"], "live teacher"),
    (["{bert}", "layers:1", "--teacher-cache", "{cache}"], "encoder"),
    (["{llama}", "layers:1", "--teacher-cache", "{llama}"], "not a squeeze teacher cache"),
    (["{llama}", "layers:1", "--device", "cuda:7"], "cuda"),
    (["{llama}", "layers:1", "--checkpoint-every", "1", "--checkpoint-dir", "{tiny_text}"], "is a file"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input(args, message, tiny_llama_dir, tiny_bert_dir, other_vocab_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("Only a few words here.\n\nAnd a second short paragraph.\n")
    names = {"{llama}": tiny_llama_dir, "{bert}": tiny_bert_dir, "{other}": other_vocab_dir, "{tiny_text}": tiny_text, "{cache}": tmp_path / "cache"}
    args = [str(names.get(a, a)) for a in args]
    out = tmp_path / "out"
    result = run("distill", *args, *FAST, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists() and not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_existing_output_is_not_overwritten(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = run("distill", tiny_llama_dir, "layers:1", *FAST, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "mine.txt").read_text() == "keep"
