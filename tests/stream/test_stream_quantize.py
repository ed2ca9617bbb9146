"""Streaming quantization: one block in memory at a time, the same tensors as the resident pass."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from squeeze.errors import OptionError
from squeeze.passes.quantize import quantize
from squeeze.passes.stream_quantize import check_streamable, stream_quantize
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                out[k] = hashlib.sha256(f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_streamed_tensors_equal_the_resident_pass_s(method: str, make_tiny_llama, tmp_path: Path) -> None:
    model = make_tiny_llama(12, 3)
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True), method=method)
    quantize(str(model), tmp_path / "resident", config, evaluate=False)
    lazy = []
    report = stream_quantize(str(model), tmp_path / "streamed", config, max_shard_size="60KB", lazy_model=lazy)
    assert lazy[0].peak_parts == 1  # one block (or the part outside the blocks) at a time
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 3
    assert digests(tmp_path / "streamed") == digests(tmp_path / "resident")
    assert report.settings["streamed"] and len(report.layers) == 12 * 7
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)(input_ids=ids).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resident", dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_what_does_not_stream_is_named() -> None:
    scheme = scheme_from_options(mode="per-group", bits=4, group_size=32)
    with pytest.raises(OptionError, match="stream runs the methods that read no text"):
        check_streamable(QuantizeConfig(scheme=scheme, method="gptq"), evaluate=False)
    with pytest.raises(OptionError, match="does not evaluate yet"):
        check_streamable(QuantizeConfig(scheme=scheme, method="rtn"), evaluate=True)
    with pytest.raises(OptionError, match="stream writes only compressed-tensors: drop format gptq"):
        check_streamable(QuantizeConfig(scheme=scheme, method="rtn", format="gptq"), evaluate=False)


def run(*args: object):
    from typer.testing import CliRunner

    from squeeze.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_stream(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = run("quantize", tiny_llama_dir, "--stream", "--no-eval", "--method", "hqq", "--group-size", "32", "--out", out)
    assert result.exit_code == 0, result.output
    assert "streamed block by block" in (out / "report.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    transformers.AutoModelForCausalLM.from_pretrained(out)  # loads without squeeze


@pytest.mark.parametrize("extra, words", [
    ((), "--stream does not evaluate yet: add --no-eval"),
    (("--no-eval", "--method", "gptq"), "--stream runs the methods that read no text"),
    (("--no-eval", "--format", "gptq"), "--stream writes only compressed-tensors: drop --format gptq"),
])
def test_cli_stream_refusals(extra: tuple, words: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--stream", *extra, "--out", tmp_path / "never")
    assert result.exit_code == 2 and words in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_stream_refuses_a_quantized_input(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert run("quantize", tiny_llama_dir, "--no-eval", "--quiet", "--out", tmp_path / "q").exit_code == 0
    result = run("quantize", tmp_path / "q", "--stream", "--no-eval", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "--stream reads a folder of unquantized safetensors weights" in result.output, result.output
    assert not (tmp_path / "never").exists()
