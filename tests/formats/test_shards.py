"""Sharded checkpoints in and out: --max-shard-size splits what a pass writes into safetensors
shards with the standard index, which squeeze and plain transformers read back; a sharded input
compresses to the same bytes as the same model in one file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.errors import OptionError
from squeeze.models import load_model
from squeeze.sizes import parse_size

runner = CliRunner()
QUIET = ["--no-eval", "--quiet"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor, by name: equal when two checkpoints hold the same bytes, however sharded."""
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in tensors(folder).items()}


def test_quantized_output_in_shards_reloads_everywhere(tiny_llama_dir: Path, tmp_path: Path) -> None:
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert run("quantize", tiny_llama_dir, "--bits", "8", "--out", whole, *QUIET).exit_code == 0
    result = run("quantize", tiny_llama_dir, "--bits", "8", "--out", sharded, "--max-shard-size", "40KB", *QUIET)
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3 and [p.name for p in whole.glob("*.safetensors")] == ["model.safetensors"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    for file in files:  # no shard above the bound, unless one tensor alone is larger
        with safe_open(str(sharded / file), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or (sharded / file).stat().st_size <= 40_000 + 8 * 1024
    assert digests(sharded) == digests(whole)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = load_model(str(sharded)).model(input_ids=ids).logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_pruned_dense_output_in_shards_loads_in_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = run("prune", tiny_llama_dir, "--sparsity", "0.5", "--format", "dense", "--out", out, "--max-shard-size", "0.05MB", *QUIET)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.safetensors"))) >= 3
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert 0.45 < float((weight == 0).float().mean()) < 0.55


def test_sharded_input_compresses_to_the_same_bytes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    source = tmp_path / "three-shards"
    model.save_pretrained(source, max_shard_size="200KB")
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(source)
    assert len(list(source.glob("*.safetensors"))) >= 3
    a, b = tmp_path / "from-one", tmp_path / "from-three"
    assert run("quantize", tiny_llama_dir, "--bits", "4", "--out", a, *QUIET).exit_code == 0
    assert run("quantize", source, "--bits", "4", "--out", b, *QUIET).exit_code == 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("value", ["5XB", "lots", "0", "-1GB"])
def test_a_bad_shard_size_is_one_line_and_writes_nothing(value: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = run("quantize", tiny_llama_dir, "--out", out, "--max-shard-size", value, *QUIET)
    assert result.exit_code == 2
    assert "--max-shard-size must be" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_sizes_read_like_transformers() -> None:
    assert parse_size("5GB", "s") == 5 * 10**9
    assert parse_size("500MiB", "s") == 500 * 2**20
    assert parse_size("2.5 gb", "s") == 2_500_000_000
    assert parse_size(1234, "s") == 1234
    with pytest.raises(OptionError, match="max_shard_size must be a size"):
        parse_size("5 parsecs", "max_shard_size")


def test_recipe_key_and_run_option(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_shard_size: 40KB\nstages:\n  - quantize: {bits: 8}\n")
    out = tmp_path / "run"
    result = run("run", recipe, "--model", tiny_llama_dir, "--out", out, *QUIET)
    assert result.exit_code == 0, result.output
    (stage,) = [p for p in out.iterdir() if p.is_dir()]
    assert len(list(stage.glob("*.safetensors"))) >= 3
    # the run's option overrides the recipe's key
    result = run("run", recipe, "--model", tiny_llama_dir, "--out", tmp_path / "one", "--max-shard-size", "5GB", *QUIET)
    assert result.exit_code == 0, result.output
    (stage,) = [p for p in (tmp_path / "one").iterdir() if p.is_dir()]
    assert [p.name for p in stage.glob("*.safetensors")] == ["model.safetensors"]


def test_a_bad_recipe_shard_size_names_its_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmax_shard_size: huge\nstages:\n  - quantize: {bits: 8}\n")
    result = run("run", recipe, "--model", tiny_llama_dir, "--out", tmp_path / "never", *QUIET)
    assert result.exit_code == 2
    assert f"{recipe}:2: max_shard_size: must be a size" in result.output
    assert not (tmp_path / "never").exists()
