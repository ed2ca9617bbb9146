"""Streaming one block at a time works for the architectures whose weights squeeze reshapes on
loading: GPT-2's Conv1D (transposed as it is read) and per-expert mixture-of-experts layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from squeeze.api import prune, quantize
from squeeze.prune.config import PruneConfig
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options

SMALL = dict(data="shakespeare", eval_tokens=128, seq_len=32, calibration_samples=4, generation_prompts=0)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _same(a: Path, b: Path) -> None:
    x, y = _tensors(a), _tensors(b)
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_gpt2_prunes_streamed_as_held(method: str, tiny_arch_dir, tmp_path: Path) -> None:
    config = PruneConfig(method=method, format="dense")
    held = prune(str(tiny_arch_dir("gpt2")), tmp_path / "held", config, **SMALL)
    streamed = prune(str(tiny_arch_dir("gpt2")), tmp_path / "streamed", config, stream=True, **SMALL)
    _same(tmp_path / "held", tmp_path / "streamed")
    assert streamed.accuracy.kl_divergence == pytest.approx(held.accuracy.kl_divergence, rel=1e-6)


def test_moe_quantizes_streamed_as_held(tiny_arch_dir, tmp_path: Path) -> None:
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32), method="gptq")
    held = quantize(str(tiny_arch_dir("qwen3_moe")), tmp_path / "held", config, **SMALL)
    streamed = quantize(str(tiny_arch_dir("qwen3_moe")), tmp_path / "streamed", config, stream=True, **SMALL)
    _same(tmp_path / "held", tmp_path / "streamed")
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in _tensors(tmp_path / "streamed")
    assert any(n.startswith("every expert was calibrated on all") for n in held.notes + streamed.notes)
    assert streamed.accuracy.kl_divergence == pytest.approx(held.accuracy.kl_divergence, rel=1e-6)


def test_a_checkpoint_with_older_names_streams(tiny_arch_dir, tmp_path: Path) -> None:
    """Mixtral's checkpoints keep the ``block_sparse_moe`` names transformers renames to ``mlp`` on
    loading: streaming reads them under those names too."""
    stored = _tensors(tiny_arch_dir("mixtral"))
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in stored)
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32), method="rtn")
    quantize(str(tiny_arch_dir("mixtral")), tmp_path / "held", config, **SMALL)
    quantize(str(tiny_arch_dir("mixtral")), tmp_path / "streamed", config, stream=True, **SMALL)
    _same(tmp_path / "held", tmp_path / "streamed")
