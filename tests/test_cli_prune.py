"""``squeeze prune`` end to end on tiny models, prune → quantize, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from squeeze.models import load_model
from squeeze.prune.masks import is_n_m
from test_cli import FAST, check_bad_input, run


@pytest.fixture(scope="module")
def wanda_2_4(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prune") / "wanda24"
    result = run("prune", tiny_llama_dir, "--method", "wanda", "--pattern", "2:4", "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_prune_report(wanda_2_4: tuple[Path, dict]) -> None:
    out, report = wanda_2_4
    assert report == json.loads((out / "report.json").read_text())
    sp, size = report["sparsity"], report["size"]
    assert sp["structure"] == "2:4" and sp["sparsity"] == 0.5 and sp["zeros"] == sp["parameters"] // 2
    assert sp["nonzeros"] == sp["parameters"] - sp["zeros"]
    assert sp["sparse_bytes"] < sp["dense_bytes"] and sp["sparse_ratio"] == pytest.approx(sp["sparse_bytes"] / sp["dense_bytes"])
    # every pruned weight is one multiply-add fewer per token: 2 FLOPs
    assert sp["linear_flops_dense"] - sp["linear_flops_sparse"] == 2 * sp["zeros"]
    assert size["linear_bytes_after"] == sp["sparse_bytes"] and size["disk_bytes_after"] < size["disk_bytes_before"]
    assert len(report["layers"]) == 14 and all(layer["sparsity"] == 0.5 for layer in report["layers"])
    assert report["settings"]["calibration"].startswith("wikipedia: 2 x 64")
    assert "calibrate" in report["timings_s"] and report["accuracy"]["perplexity_after"] > 1
    md = (out / "report.md").read_text()
    assert "Loading without squeeze" in md and "np.unpackbits" in md and "| sparsity | nonzeros |" in md


def test_pruned_checkpoint_reloads_with_the_pattern(wanda_2_4: tuple[Path, dict]) -> None:
    out, report = wanda_2_4
    model = load_model(str(out)).model
    for layer in report["layers"]:
        assert is_n_m(model.get_submodule(layer["name"]).weight, 2, 4)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_prune_then_quantize_keeps_zeros_and_pattern(wanda_2_4: tuple[Path, dict], tmp_path: Path, method: str) -> None:
    pruned, prune_report = wanda_2_4
    out = tmp_path / method
    options = ["--bits", "4", "--mode", "per-group", "--group-size", "32"] + (["--asym"] if method == "rtn" else [])
    result = run("quantize", pruned, "--method", method, *options, "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sparsity"]["structure"] == "2:4"
    assert report["sparsity"]["zeros"] >= prune_report["sparsity"]["zeros"]
    assert all(layer["sparsity"] >= 0.5 for layer in report["layers"])
    assert any("are still exactly zero after quantization" in note and "are not" not in note for note in report["notes"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["sparsity_structure"] == "2:4" and config["sparsity_config"]["format"] == "dense"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    # what the consumer sees: plain transformers, squeeze blocked, dequantizes to zeros in the pattern
    names = [layer["name"] for layer in prune_report["layers"]]
    code = (
        "import sys, torch, transformers, json\n"
        "sys.modules['squeeze'] = None\n"
        "dequantized = transformers.CompressedTensorsConfig(dequantize=True)\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32, quantization_config=dequantized)\n"
        f"names = {names!r}\n"
        "w = {n: model.get_submodule(n).weight.detach() for n in names}\n"
        "print(json.dumps({n: [int((t == 0).sum()), t.numel(), bool(((t != 0).reshape(-1, 4).sum(-1) <= 2).all())] for n, t in w.items()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        zeros, numel, pattern_holds = seen[name]
        assert pattern_holds and zeros >= numel // 2, name


def test_magnitude_dense_format_and_encoder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bert"
    result = run("prune", tiny_bert_dir, "--sparsity", "0.3", "--format", "dense", "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sparsity"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert report["accuracy"]["embedding_cosine_mean"] > 0.5
    assert report["settings"]["calibration"].startswith("none")
    state = load_file(out / "model.safetensors")
    assert not any(key.endswith(".bitmask") for key in state)
    weight = state[f"{report['layers'][0]['name']}.weight"]
    assert (weight == 0).float().mean() == pytest.approx(0.3, abs=1e-3)


def test_wanda_on_the_encoder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    result = run("prune", tiny_bert_dir, "--method", "wanda", "--pattern", "4:8", "--out", tmp_path / "b", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sparsity"]["structure"] == "4:8"


def test_global_scope_and_rules_in_the_report(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run(
        "prune", tiny_llama_dir, "--scope", "global", "--layer-sparsity", "*.o_proj=0", "--out", tmp_path / "g",
        "--json", "-q", "--no-eval", *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy"] is None
    assert report["settings"]["layer_sparsity"] == ["*.o_proj=0"]
    assert not any(layer["name"].endswith("o_proj") for layer in report["layers"])
    assert any("left dense" in note for note in report["notes"])


def test_sparsegpt_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("prune", tiny_llama_dir, "--method", "sparsegpt", "--pattern", "2:4", "--block-size", "32", "--out", tmp_path / "s", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["block_size"] == 32 and report["sparsity"]["sparsity"] == 0.5
    assert all(0 < layer["output_error"] < 1 for layer in report["layers"])
    assert "output error" in (tmp_path / "s" / "report.md").read_text()


BAD = [
    (["prune", "{llama}", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["prune", "{llama}", "--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    (["prune", "{llama}", "--pattern", "2:48"], "needs input dimensions divisible by 48"),
    (["prune", "{llama}", "--pattern", "two:four"], "is not N:M"),
    (["prune", "{llama}", "--method", "wanda", "--calib-samples", "0"], "needs calibration text"),
    (["prune", "{llama}", "--method", "wanda", "--calib-data", "{tiny_text}"], "calibration"),
    (["prune", "{llama}", "--method", "wanda", "--scope", "global"], "Wanda compares weights within each output row"),
    (["prune", "{llama}", "--method", "obs"], "unknown pruning method"),
    (["prune", "{llama}", "--method", "sparsegpt", "--damp-percent", "0"], "damp percent must be in (0, 1]"),
    (["prune", "{llama}", "--method", "sparsegpt", "--calib-samples", "0"], "needs calibration text"),
    (["prune", "{llama}", "--layer-sparsity", "0.3"], "--layer-sparsity takes PATTERN=SPARSITY"),
    (["prune", "{llama}", "--layer-sparsity", "*.nothing=0.3"], "matches no targeted layer"),
    (["prune", "{llama}", "--layer-sparsity", "re:[=0.3"], "not a valid regular expression"),
    (["prune", "{llama}", "--ignore", "re:("], "not a valid regular expression"),
    (["prune", "{llama}", "--format", "csr"], "unknown sparse checkpoint format"),
    (["prune", "./no-such-model"], "does not exist"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_input(args: list[str], message: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    check_bad_input(args, message, tiny_llama_dir, tmp_path, monkeypatch)


def test_generation_prompts_zero_skips_the_agreement(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    result = run("prune", tiny_llama_dir, "--method", "magnitude", "--out", tmp_path / "p", "--generation-prompts", "0", "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    accuracy = json.loads(result.stdout)["accuracy"]
    assert accuracy["rouge1"] is None and accuracy["kl_divergence"] > 0
    check_bad_input(["prune", "{llama}", "--generation-prompts", "-1"], "--generation-prompts must not be negative", tiny_llama_dir, tmp_path, monkeypatch)
