"""Checkpoints reload in plain transformers (squeeze not imported) with the logits squeeze computed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from squeeze.formats.compressed_tensors import checkpoint_state_dict, write_checkpoint
from squeeze.formats.files import save_safetensors
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.methods import METHODS
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.scheme import scheme_from_options

SCHEMES = {
    "w8-channel": dict(mode="per-channel", bits=8),
    "w8-tensor": dict(mode="per-tensor", bits=8),
    "w4-group32-asym": dict(mode="per-group", bits=4, group_size=32, asym=True),
    "w4-channel-sym": dict(mode="per-channel", bits=4),
    "w4-channel-asym": dict(mode="per-channel", bits=4, asym=True),
    "w3-group16-asym": dict(mode="per-group", bits=3, group_size=16, asym=True),
    "w8a8-token": dict(mode="per-channel", bits=8, act="per-token"),
    "w8a8-static": dict(mode="per-channel", bits=8, act="per-tensor"),
    "w8a8-token-asym": dict(mode="per-channel", bits=8, act="per-token", act_asym=True),
    "w8a8-static-asym": dict(mode="per-channel", bits=8, act="per-tensor", act_asym=True),
    "gptq-w4-group32": dict(mode="per-group", bits=4, group_size=32, method="gptq"),
    # the full symmetric grid: negative scales in the checkpoint, applied as they are
    "gptq-w4-group32-signed": dict(mode="per-group", bits=4, group_size=32, signed_scale=True, method="gptq"),
    "w3-group16-signed": dict(mode="per-group", bits=3, group_size=16, signed_scale=True),
    "gptq-w4-channel-asym-actorder": dict(mode="per-channel", bits=4, asym=True, method="gptq", act_order=True),
    "gptq-w8a8-static": dict(mode="per-channel", bits=8, act="per-tensor", method="gptq"),
    "awq-w4-group32-asym": dict(mode="per-group", bits=4, group_size=32, asym=True, method="awq"),
    "smoothquant-w8a8": dict(mode="per-channel", bits=8, act="per-token", method="smoothquant"),
    "smoothquant-w8a8-static": dict(mode="per-channel", bits=8, act="per-tensor", method="smoothquant"),
}

# Runs in a fresh interpreter where importing squeeze fails: the checkpoint must stand on its own.
RELOAD = r"""
import sys, torch, transformers
sys.modules["squeeze"] = None
for job in sys.argv[1:]:
    kind, folder, ids_file, out_file = job.split("|")
    cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=torch.load(ids_file, weights_only=True))
    torch.save(out.logits if kind == "causal" else out.last_hidden_state, out_file)
"""


def quantize_folder(folder: Path, options: dict, ids: torch.Tensor, kind: str = "causal"):
    cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    model = cls.from_pretrained(folder).eval()
    options = dict(options)
    method = options.pop("method", "rtn")
    method_options = {k: options.pop(k) for k in ("act_order",) if k in options}
    config = QuantizeConfig(scheme=scheme_from_options(**options), method=method, options=method_options)
    batches = None
    if config.needs_calibration:
        blockwise = METHODS.get(method).blockwise
        batches = [{"input_ids": ids}, {"input_ids": ids.flip(0)}] if blockwise else [{"input_ids": ids}]
    result = quantize_model(model, config, batches)
    return model, config, result


@pytest.fixture(scope="module")
def reloaded(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """For each scheme: (squeeze's in-memory output, the output of the checkpoint reloaded without squeeze)."""
    work = tmp_path_factory.mktemp("reload")
    jobs, expected = [], {}
    cases = [(name, "causal", tiny_llama_dir, options) for name, options in SCHEMES.items()]
    cases.append(("bert-w4-group32", "encoder", tiny_bert_dir, dict(mode="per-group", bits=4, group_size=32)))
    cases.append(("bert-gptq-w4", "encoder", tiny_bert_dir, dict(mode="per-channel", bits=4, method="gptq")))
    for name, kind, folder, options in cases:
        low = 0 if kind == "causal" else 1000
        ids = torch.randint(low, low + 1000, (2, 24), generator=torch.Generator().manual_seed(0))
        model, config, result = quantize_folder(folder, options, ids, kind)
        with torch.no_grad():
            out = model(input_ids=ids)
        expected[name] = out.logits if kind == "causal" else out.last_hidden_state
        write_checkpoint(model, config.scheme, result.ignored, work / name)
        torch.save(ids, work / f"{name}.ids.pt")
        jobs.append(f"{kind}|{work / name}|{work / name}.ids.pt|{work / name}.out.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, *jobs], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (expected[name], torch.load(work / f"{name}.out.pt", weights_only=True)) for name in expected}


@pytest.mark.parametrize("name", [*SCHEMES, "bert-w4-group32", "bert-gptq-w4"])
def test_reload_gives_squeeze_outputs(name: str, reloaded: dict) -> None:
    expected, got = reloaded[name]
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_quantization_changed_the_outputs(tiny_llama_dir: Path, reloaded: dict) -> None:
    """The reload comparison is not vacuous: quantized outputs differ from the original model's."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        base = original(input_ids=ids).logits
    for name in SCHEMES:
        assert not torch.allclose(base, reloaded[name][0], atol=1e-5), name


def test_checkpoint_layout(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    ids = torch.randint(0, 1000, (1, 8))
    model, config, result = quantize_folder(tiny_llama_dir, dict(mode="per-group", bits=4, group_size=32, asym=True), ids)
    write_checkpoint(model, config.scheme, result.ignored, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["strategy"] == "group" and weights["group_size"] == 32
    assert weights["symmetric"] is False
    assert "lm_head" in qc["ignore"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.down_proj"  # 64 x 128
        assert f.get_tensor(f"{name}.weight_packed").shape == (64, 128 * 4 // 32)
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{name}.weight_scale").shape == (64, 4)
        assert f.get_tensor(f"{name}.weight_zero_point").shape == (64 * 4 // 32, 4)  # packed along rows
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [64, 128]
    assert f"{name}.weight" not in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings, stored once
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


def test_large_checkpoints_are_sharded_with_an_index(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ids = torch.randint(0, 1000, (1, 8))
    model, config, result = quantize_folder(tiny_llama_dir, dict(mode="per-channel", bits=8), ids)
    state = checkpoint_state_dict(model)
    files = save_safetensors(state, tmp_path, max_shard_bytes=1024**2)
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert {p.name for p in files} == set(index["weight_map"].values())
