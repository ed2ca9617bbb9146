"""The command line end to end on tiny models, and every bad input: one line, exit 2, nothing written."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from squeeze.calib.targets import fitting_group_size
from squeeze.cli import app
from squeeze.errors import SqueezeError
from squeeze.recipes import QuantizeStage

runner = CliRunner()
FAST = ["--eval-tokens", "1024", "--seq-len", "64", "--calib-samples", "2"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "partial" in p.name]


def test_decoder_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    result = run("quantize", tiny_llama_dir, "--mode", "per-group", "--group-size", "32", "--bits", "4", "--out", out, "--json", "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert {"model.safetensors", "config.json", "report.json", "report.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    size, acc = report["size"], report["accuracy"]
    # per block: q, o 64x64; k, v 32x64 (2 of 4 heads); gate, up 128x64; down 64x128; 2 blocks
    assert size["compressed_parameters"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    # 4-bit codes + one float16 scale per 32 weights = 4.5 bits per weight
    assert size["bits_per_weight"] == pytest.approx(4 + 16 / 32, rel=1e-6)
    assert size["linear_bytes_after"] < size["linear_bytes_before"] * 0.2
    assert acc["tokens"] == 16 * 63 and acc["windows"] == 16
    assert acc["perplexity_before"] > 1 and acc["perplexity_after"] > 1
    assert 0 <= acc["kl_divergence"] and 0 <= acc["top1_agreement"] <= 1
    assert len(report["layers"]) == 14
    assert all(0 < layer["relative_error"] < 0.5 for layer in report["layers"])
    assert "perplexity" in (out / "report.md").read_text()


def test_w8a8_static_calibrates(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--act", "per-tensor", "--out", tmp_path / "o", "--json", "-q", "--data", "bbc", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["format"] == "compressed-tensors (int-quantized)"
    assert report["settings"]["calibration"].startswith("bbc: 2 x 64")
    assert "calibrate" in report["timings_s"]


def test_encoder_end_to_end(tiny_bert_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_bert_dir, "--bits", "8", "--out", tmp_path / "e", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    acc = json.loads(result.stdout)["accuracy"]
    assert acc["perplexity_before"] is None
    assert 0.9 < acc["embedding_cosine_mean"] <= 1.0 + 1e-6


def test_table_output(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--out", tmp_path / "t", *FAST)
    assert result.exit_code == 0
    assert "bits per weight" in result.stdout and "perplexity" in result.stdout


def test_inspect(tiny_llama_dir: Path) -> None:
    result = run("inspect", tiny_llama_dir, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["bytes_fp32"] == 4 * info["params_total"]
    assert info["bytes_int4"] < info["bytes_int8"] < info["bytes_bf16"] < info["bytes_fp32"]


BAD = [
    (["quantize", "./no-such-model"], "does not exist"),
    (["quantize", "some-org/some-model"], "hub is unreachable"),
    (["quantize", "{llama}", "--mode", "per-row"], "unknown mode"),
    (["quantize", "{llama}", "--bits", "9"], "bits must be between 2 and 8"),
    (["quantize", "{llama}", "--bits", "1"], "bits must be between 2 and 8"),
    (["quantize", "{llama}", "--act", "per-channel"], "unknown activation mode"),
    (["quantize", "{llama}", "--mode", "per-group", "--group-size", "48"], "group size 48 does not divide"),
    (["quantize", "{llama}", "--mode", "per-tensor", "--group-size", "64"], "only applies to --mode per-group"),
    (["quantize", "{llama}", "--target", "*.no_such_proj"], "matches no Linear layer"),
    (["quantize", "{llama}", "--data", "no-such-corpus"], "no-such-corpus"),
    (["quantize", "{llama}", "--device", "tpu"], "unknown --device 'tpu'"),
    (["quantize", "{llama}", "--eval-tokens", "0"], "--eval-tokens must be at least 1"),
    (["quantize", "{llama}", "--method", "sgd"], "unknown quantization method 'sgd'"),
    (["quantize", "{llama}", "--method", "gptq", "--damp-percent", "0"], "damp percent must be in (0, 1]"),
    (["quantize", "{llama}", "--method", "smoothquant"], "SmoothQuant is for W8A8"),
    (["quantize", "{llama}", "--method", "awq", "--act", "per-token", "--bits", "8"], "AWQ is weight-only"),
    (["quantize", "{llama}", "--method", "awq", "--awq-grid", "1"], "AWQ grid needs at least 2"),
    (["quantize", "{llama}", "--method", "smoothquant", "--act", "per-token", "--alpha", "1.5"], "alpha must be in [0, 1]"),
    (["quantize", "{llama}", "--method", "gptq", "--data", "{tiny_text}"], "calibration"),
    (["quantize", "{llama}", "--format", "ggml"], "unknown format 'ggml'"),
    (["quantize", "{llama}", "--format", "gguf"], "writes byte-level BPE tokenizers"),
    (["quantize", "{llama}", "--dtype", "float64"], "unknown --dtype 'float64'"),
    (["quantize", "{llama}", "--format", "gptq", "--act", "per-token"], "--format gptq stores weight-only schemes"),
    (["quantize", "{llama}", "--format", "gptq", "--bits", "4", "--scale-dtype", "float32"], "float16 scales"),
    (["quantize", "{llama}", "--format", "bnb-int8", "--bits", "4"], "--format bnb-int8 is int8 symmetric per-channel"),
    (["quantize", "{llama}", "--format", "bnb-nf4", "--method", "gptq"], "use --method rtn"),
    (["quantize", "{llama}", "--format", "bnb-nf4", "--mode", "per-channel"], "blocks of 64"),
    (["quantize", "{llama}", "--format", "gptq", "--bits", "4", "--ignore", "lm_head", "--ignore", "model.layers.0.*"], "same Linear layers quantized in every block"),
    (["quantize", "{llama}", "--format", "gptq", "--bits", "4", "--ignore", "*.q_proj"], "inside the transformer blocks only, not lm_head"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_input(args: list[str], message: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    check_bad_input(args, message, tiny_llama_dir, tmp_path, monkeypatch)


def check_bad_input(args: list[str], message: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """One red line containing ``message``, exit 2, and nothing written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("Only a few words here.\n\nAnd a second short paragraph.\n")
    args = [a.replace("{llama}", str(tiny_llama_dir)).replace("{tiny_text}", str(tiny_text)) for a in args]
    result = run(*args[:2], *FAST, *args[2:], "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_group_size_error_says_what_fits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--mode", "per-group", "--group-size", "48", "--out", tmp_path / "o")
    assert "mlp.down_proj" in result.stderr or "self_attn" in result.stderr
    assert "16, 32, 64" in result.stderr


def test_existing_output_is_refused_then_overwritten(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("quantize", tiny_llama_dir, "--out", out, *FAST)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run("quantize", tiny_llama_dir, "--out", out, "--overwrite", "-q", *FAST)
    assert result.exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()


@pytest.mark.parametrize(
    "where", ["squeeze.formats.compressed_tensors.CompressedTensors.write", "squeeze.passes.skeleton.write_report", "squeeze.passes.common.compare_causal"]
)
def test_ctrl_c_leaves_nothing(where: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    out = tmp_path / "out"
    result = run("quantize", tiny_llama_dir, "--out", out, *FAST)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_corrupt_safetensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = run("quantize", broken, "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 2 and "truncated or corrupt" in result.stderr
    assert not (tmp_path / "o").exists()


def test_corrupt_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(100))
    result = run("quantize", fake, "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "gguf" in result.stderr.lower()


def test_bfloat16_source_is_measured_and_saved_in_bfloat16(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import transformers
    from safetensors import safe_open

    source = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(source)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(source)
    out = tmp_path / "q"
    result = run("quantize", source, "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    size = json.loads(result.stdout)["size"]
    assert size["disk_bytes_before"] == 2 * size["parameters"]  # bf16: 2 bytes per weight, not 4
    assert size["linear_bytes_before"] == 2 * size["compressed_parameters"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_gptq_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run(
        "quantize", tiny_llama_dir, "--method", "gptq", "--mode", "per-group", "--group-size", "32", "--bits", "4",
        "--out", tmp_path / "g", "--json", "-q", *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["method"] == "gptq" and report["settings"]["damp_percent"] == 0.05
    assert report["settings"]["calibration_tokens"] == 2 * 64
    assert len(report["layers"]) == 14 and "quantize" in report["timings_s"]


def test_smoothquant_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run(
        "quantize", tiny_llama_dir, "--method", "smoothquant", "--act", "per-token", "--alpha", "0.8",
        "--out", tmp_path / "s", "--json", "-q", *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["alpha"] == 0.8 and report["settings"]["format"] == "compressed-tensors (int-quantized)"
    assert any("smoothed" in note for note in report["notes"])


def test_smoothquant_with_nothing_to_fold_into_needs_the_fallback(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """BERT's intermediate.dense reads a post-norm, whose output is also the residual: no fold."""
    args = ["quantize", tiny_bert_dir, "--method", "smoothquant", "--act", "per-token", "--target", "*.intermediate.dense", *FAST]
    result = run(*args, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--smooth-fallback" in result.stderr
    assert not (tmp_path / "a").exists()
    result = run(*args, "--smooth-fallback", "--out", tmp_path / "b", "-q")
    assert result.exit_code == 0 and (tmp_path / "b" / "report.json").exists()


def test_awq_end_to_end_defaults_to_w4_group_asym(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--method", "awq", "--group-size", "32", "--out", tmp_path / "a", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["scheme"].startswith("W4A16: weights int4 asym per-group(32)")
    assert report["settings"]["awq_grid"] == 20 and report["settings"]["awq_clip"] is True
    assert any(note.startswith("AWQ scaled") for note in report["notes"])


@pytest.mark.parametrize(
    "args, fmt_word, bits",
    [
        (["--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "32", "--format", "gptq"], "GPTQ", 4 + 16 / 32 + 4 / 32),
        (["--format", "bnb-int8"], "LLM.int8", 8 + 32 / 64),
        (["--format", "bnb-nf4"], "NF4", 4 + 32 / 64),
    ],
)
def test_formats_end_to_end(args: list[str], fmt_word: str, bits: float, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f"
    result = run("quantize", tiny_llama_dir, *args, "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert fmt_word in report["settings"]["format"] and (out / "model.safetensors").exists()
    # GPTQ: codes + fp16 scales + packed zeros (4 bits per 32 weights... per group) + g_idx; bnb: codes + fp32 row/block scales
    # (GPTQ's packed zero points and g_idx weigh more on this tiny model's 32-row layers)
    assert report["size"]["bits_per_weight"] == pytest.approx(bits, rel=0.1)
    assert report["accuracy"]["kl_divergence"] > 0
    if "gptq" in args:
        assert (out / "quantize_config.json").exists()
        assert all(layer["output_error"] is not None and layer["method_loss"] >= 0 for layer in report["layers"])
        assert report["timings_s"]["calibrate"] > 0


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_bfloat16_compute(method: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Calibrated methods run on a bfloat16 model; the checkpoint keeps the source's float32 tensors."""
    out = tmp_path / method
    extra = ["--act", "per-token"] if method == "smoothquant" else ["--bits", "4", "--mode", "per-group", "--group-size", "32"]
    result = run("quantize", tiny_llama_dir, "--method", method, *extra, "--dtype", "bfloat16", "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "bfloat16" in report["device"] and report["accuracy"]["kl_divergence"] >= 0
    assert 0 < report["timings_s"]["calibrate"] < report["timings_s"]["total"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_awq_picks_the_largest_group_that_fits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Group 128 does not divide the tiny model's 64-wide inputs: AWQ's default falls back to 64."""
    result = run("quantize", tiny_llama_dir, "--method", "awq", "--out", tmp_path / "a", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    assert "per-group(64)" in json.loads(result.stdout)["settings"]["scheme"]


def test_fitting_group_size() -> None:
    from torch import nn

    assert fitting_group_size({"a": nn.Linear(576, 8), "b": nn.Linear(1536, 8)}) == 64
    assert fitting_group_size({"a": nn.Linear(4096, 8), "b": nn.Linear(11008, 8)}) == 128
    with pytest.raises(SqueezeError, match="group size"):
        fitting_group_size({"a": nn.Linear(24, 8)})


def test_signed_scale_is_an_option_of_every_symmetric_scheme(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``--signed-scale`` puts symmetric weights of any format on the full grid (GGUF's default);
    with ``--asym`` it is refused in one line naming both flags, before anything is written."""
    def grid(**options) -> bool:
        return QuantizeStage(method="rtn", mode="per-group", bits=4, group_size=32, **options).config(None).scheme.weights.signed_scale

    assert grid(signed_scale=True) and not grid() and not grid(format="gptq")
    assert grid(format="gguf") and not grid(format="gguf", signed_scale=False)
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--out", str(out), "--bits", "4", "--mode", "per-group",
                                 "--group-size", "32", "--asym", "--signed-scale"])
    assert result.exit_code == 2 and not out.exists()
    assert "error: --signed-scale puts symmetric weights on the full grid" in result.stderr and "drop --signed-scale or --asym" in result.stderr
