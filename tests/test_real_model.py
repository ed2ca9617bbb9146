"""End to end on the real built-in models (SmolLM2-135M, MiniLM): the truth the tiny models can't tell."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.formats.compressed_tensors import write_checkpoint
from squeeze.models import load_model
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.scheme import scheme_from_options

pytestmark = pytest.mark.real_model

RELOAD = r"""
import sys, torch, transformers
sys.modules["squeeze"] = None  # the checkpoint must load without squeeze
folder, ids_file, out_file = sys.argv[1:]
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_file, weights_only=True)).logits, out_file)
"""


def test_smollm2_w4_checkpoint_reloads_in_plain_transformers(tmp_path: Path) -> None:
    loaded = load_model("smollm2")
    ids = loaded.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=64))
    result = quantize_model(loaded.model, config)
    assert len(result.quantized) == 30 * 7 and result.ignored == ["lm_head"]
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
    write_checkpoint(loaded.model, config.scheme, result.ignored, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(reloaded, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(reloaded.argmax(-1), expected.argmax(-1))
    weights = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert weights < 0.45 * 4 * 134_515_008  # embeddings stay fp32; all 210 block Linears are int4


def test_smollm2_cli_w8_per_channel_is_near_lossless(tmp_path: Path) -> None:
    out = tmp_path / "w8"
    result = CliRunner().invoke(
        app, ["quantize", "smollm2", "--out", str(out), "--json", "-q", "--eval-tokens", "2048", "--seq-len", "256"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    acc, size = report["accuracy"], report["size"]
    assert acc["windows"] == 8 and acc["tokens"] == 8 * 255
    assert abs(acc["perplexity_change"]) < 0.01
    assert acc["top1_agreement"] > 0.9
    # int8 codes + one fp32 scale per 576- or 1536-wide row
    assert 8.0 < size["bits_per_weight"] < 8.1
    assert size["linear_bytes_after"] <= 0.26 * size["linear_bytes_before"]


def test_minilm_cli_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["quantize", "minilm", "--out", str(tmp_path / "m"), "--json", "-q", "--act", "per-token",
         "--eval-tokens", "4096", "--seq-len", "128", "--data", "bbc"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["kind"] == "encoder"
    assert report["settings"]["format"] == "compressed-tensors (int-quantized)"
    assert report["accuracy"]["embedding_cosine_mean"] > 0.95


def test_smollm2_gguf_teacher_distills_into_a_student_plain_transformers_loads(tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = CliRunner().invoke(
        app,
        ["distill", "smollm2", "layers:15", "--data", "bbc", "--steps", "2", "--seq-len", "64", "--batch-size", "2",
         "--eval-tokens", "256", "--out", str(out), "--json", "-q"],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    training, acc = report["training"], report["accuracy"]
    assert training["teacher_parameters"] == 134_515_008
    # 15 of 30 blocks; embeddings (tied head) and final norm whole
    assert 0.55 < training["student_parameters"] / training["teacher_parameters"] < 0.65
    assert acc["perplexity_before"] < 40 and acc["perplexity_after"] > acc["perplexity_before"]
    ids = load_model("smollm2").tokenizer("The capital of France is", return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = load_model(str(out)).model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, rtol=1e-4, atol=1e-4)


def test_smollm2_gguf_streams_the_weights_the_resident_load_has() -> None:
    """The streamed reader dequantizes and reorders each GGUF tensor as transformers' whole-file load does."""
    from squeeze.models import meta_model, resolve_model
    from squeeze.packages import SMOLLM2
    from squeeze.stream.gguf import GGUFTensors

    source = resolve_model(str(SMOLLM2.root() / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert source.is_gguf
    tensors = GGUFTensors(source.path, meta_model(source))
    state = load_model(source).model.state_dict()
    names = [n for n in state if n.startswith(("model.layers.0.", "model.layers.29.", "model.norm", "model.embed_tokens"))]
    assert len(names) == 2 * 9 + 2 and all(n in tensors for n in names)
    for name, tensor in tensors.read(names).items():
        assert torch.equal(tensor, state[name]), name
