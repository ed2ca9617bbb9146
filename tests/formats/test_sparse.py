"""Pruned checkpoints: the sparse-bitmask layout, its size, and reloading without squeeze."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from squeeze.formats import write_pruned_checkpoint
from squeeze.formats.sparse import LOADING_SNIPPET, bitmask_bytes, bitmask_tensors, decode_bitmask_state
from squeeze.models import load_model
from squeeze.prune.apply import PruneConfig, prune_model


def sparse_weight(rows: int = 9, cols: int = 21, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g)
    return (w * (torch.rand(rows, cols, generator=g) > 0.5)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_round_trip_and_layout(dtype: torch.dtype) -> None:
    w = sparse_weight(dtype=dtype)
    tensors = bitmask_tensors("layer", w)
    assert tensors["layer.shape"].tolist() == [9, 21]
    assert tensors["layer.bitmask"].dtype == torch.uint8 and tensors["layer.bitmask"].shape == (9, 3)
    # bit j % 8 of byte j // 8, little-endian bit order
    byte = int(tensors["layer.bitmask"][2, 1])
    assert [(byte >> bit) & 1 for bit in range(8)] == (w[2, 8:16] != 0).int().tolist()
    assert torch.equal(tensors["layer.compressed"], w[w != 0])
    counts = (w != 0).sum(dim=1)
    assert tensors["layer.row_offsets"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    decoded = decode_bitmask_state(tensors)
    assert list(decoded) == ["layer.weight"] and torch.equal(decoded["layer.weight"], w)
    assert bitmask_bytes(w) == sum(t.numel() * t.element_size() for t in tensors.values())


def test_compressed_tensors_unpacks_our_bitmask() -> None:
    from compressed_tensors.utils import unpack_bitmasks

    w = sparse_weight()
    tensors = bitmask_tensors("x", w)
    assert torch.equal(unpack_bitmasks(tensors["x.bitmask"], [9, 21]), w != 0)


def test_half_sparse_float32_takes_at_most_55_percent() -> None:
    w = sparse_weight(576, 1536)
    assert bitmask_bytes(w) / (w.numel() * 4) <= 0.55


@pytest.fixture(scope="module")
def pruned(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("pruned")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    result = prune_model(model, PruneConfig(pattern="2:4"))
    names = [layer.name for layer in result.layers]
    folders = {}
    for fmt in ("sparse-bitmask", "dense"):
        folders[fmt] = work / fmt
        write_pruned_checkpoint(model, fmt, "2:4", 0.5, names, folders[fmt], tokenizer)
    return {"model": model, "names": names, "folders": folders, "work": work}


def test_sparse_file_is_smaller_and_described(pruned: dict) -> None:
    sparse = load_file(pruned["folders"]["sparse-bitmask"] / "model.safetensors")
    dense = load_file(pruned["folders"]["dense"] / "model.safetensors")
    name = pruned["names"][0]
    assert f"{name}.weight" not in sparse and f"{name}.bitmask" in sparse
    layer_dense = sum(dense[f"{n}.weight"].numel() * 4 for n in pruned["names"])
    layer_sparse = sum(sparse[f"{n}.{part}"].numel() * sparse[f"{n}.{part}"].element_size()
                       for n in pruned["names"] for part in ("compressed", "bitmask", "row_offsets", "shape"))
    # half the values, one bit per weight, 8 bytes per row of offsets: 57% for these 64-wide rows
    assert layer_sparse == sum(bitmask_bytes(dense[f"{n}.weight"]) for n in pruned["names"])
    assert layer_sparse < 0.58 * layer_dense
    config = json.loads((pruned["folders"]["sparse-bitmask"] / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == "sparse-bitmask"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert sorted(config["sparsity_config"]["targets"]) == sorted(pruned["names"])


def test_squeeze_loads_the_sparse_checkpoint(pruned: dict) -> None:
    loaded = load_model(str(pruned["folders"]["sparse-bitmask"])).model
    for name, tensor in pruned["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# Fresh interpreter, squeeze blocked: the dense checkpoint through from_pretrained, the sparse one
# through the snippet squeeze writes into report.md.
RELOAD = r"""
import sys, torch, transformers
sys.modules["squeeze"] = None
dense_folder, sparse_snippet, out_file = sys.argv[1:]
dense = transformers.AutoModelForCausalLM.from_pretrained(dense_folder).eval()
scope = {}
exec(open(sparse_snippet).read(), scope)
ids = torch.arange(1, 17).reshape(2, 8)
with torch.no_grad():
    torch.save({
        "dense": dense.state_dict(), "sparse": scope["model"].state_dict(),
        "dense_logits": dense(ids).logits, "sparse_logits": scope["model"].eval()(ids).logits,
    }, out_file)
"""


def test_reload_without_squeeze(pruned: dict) -> None:
    work = pruned["work"]
    snippet = work / "load.py"
    snippet.write_text(LOADING_SNIPPET.format(folder=pruned["folders"]["sparse-bitmask"], auto_class="AutoModelForCausalLM"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(pruned["folders"]["dense"]), str(snippet), str(work / "out.pt")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(work / "out.pt", weights_only=True)
    expected = pruned["model"].state_dict()
    for which in ("dense", "sparse"):
        for name in pruned["names"]:
            assert torch.equal(got[which][f"{name}.weight"], expected[f"{name}.weight"]), (which, name)
    with torch.no_grad():
        logits = pruned["model"](torch.arange(1, 17).reshape(2, 8)).logits
    torch.testing.assert_close(got["dense_logits"], logits)
    torch.testing.assert_close(got["sparse_logits"], logits)
