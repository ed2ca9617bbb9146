"""GPTQ and bitsandbytes checkpoints reload in their consumer libraries, with squeeze not importable.

The reload runs in a fresh interpreter through plain ``transformers.from_pretrained``: GPTQ
checkpoints through optimum + GPTQModel, bnb-int8 / bnb-nf4 through bitsandbytes. Each layer's
weight as the consumer dequantizes it must equal squeeze's, and the logits must match squeeze's
in-memory model up to the consumer's arithmetic (GPTQModel's CPU kernel dequantizes in float16;
bitsandbytes' LLM.int8() also quantizes activations), well below what quantization itself changed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from squeeze.errors import SqueezeError
from squeeze.formats import check_format, write
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4Linear, nf4_levels, nf4_quantize, pack_nibbles, unpack_nibbles
from squeeze.quant.pack import unpack_int32
from squeeze.quant.scheme import scheme_from_options

CASES = {
    # name: (format, scheme options, method, make one group all-positive so its zero point is 0)
    "gptq-w4-g32-sym": ("gptq", dict(mode="per-group", bits=4, group_size=32), "rtn", False),
    "gptq-w4-g32-signed-gptq": ("gptq", dict(mode="per-group", bits=4, group_size=32, signed_scale=True), "gptq", False),
    "gptq-w4-g32-asym-gptq": ("gptq", dict(mode="per-group", bits=4, group_size=32, asym=True), "gptq", False),
    "gptq-w4-channel-gptq": ("gptq", dict(mode="per-channel", bits=4), "gptq", False),
    "gptq-w8-channel": ("gptq", dict(mode="per-channel", bits=8), "rtn", False),
    "gptq-w4-asym-v2": ("gptq", dict(mode="per-group", bits=4, group_size=32, asym=True), "rtn", True),
    "bnb-int8": ("bnb-int8", dict(mode="per-channel", bits=8), "rtn", False),
    "bnb-int8-gptq": ("bnb-int8", dict(mode="per-channel", bits=8), "gptq", False),
    "bnb-nf4": ("bnb-nf4", dict(mode="per-group", bits=4, group_size=64), "rtn", False),
}

# Fresh interpreter, squeeze blocked: logits and every quantized layer's weight as the consumer sees it.
RELOAD = r"""
import sys, torch, transformers
sys.modules["squeeze"] = None

def consumer_weight(module):
    if hasattr(module, "dequantize_weight"):  # GPTQModel kernels dequantize to [in, out]
        w = module.dequantize_weight()
        return w.t() if tuple(w.shape) == (module.in_features, module.out_features) else w
    import bitsandbytes as bnb
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127

for job in sys.argv[1:]:
    folder, ids_file, out_file = job.split("|")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weights = {}
    for name, module in model.named_modules():
        if hasattr(module, "qweight") or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            weights[name] = consumer_weight(module).float().contiguous()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_file, weights_only=True)).logits
    torch.save({"logits": logits, "weights": weights, "classes": sorted({type(m).__name__ for m in model.modules()})}, out_file)
"""


def _quantize(folder: Path, fmt: str, options: dict, method: str, positive_group: bool, ids: torch.Tensor):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    if positive_group:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[:8, :32].abs_()  # min 0 → zero point 0 (v1 cannot store it)
            original.model.layers[0].mlp.up_proj.weight[:8, :32].abs_()
    config = QuantizeConfig(scheme=scheme_from_options(checkpoint=fmt, **options), method=method, format=fmt)
    batches = [{"input_ids": ids}, {"input_ids": ids.flip(0)}] if method == "gptq" else None
    result = quantize_model(model, config, batches)
    return model, original, config, result


@pytest.fixture(scope="module")
def reloaded(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("reload-gptq-bnb")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    jobs, cases = [], {}
    for name, (fmt, options, method, positive) in CASES.items():
        model, original, config, result = _quantize(tiny_llama_dir, fmt, options, method, positive, ids)
        with torch.no_grad():
            expected, before = model(input_ids=ids).logits, original(input_ids=ids).logits
        ours = {n: m.dequantized_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, NF4Linear))}
        written = write(fmt, model, config.scheme, result.ignored, work / name, dtype=torch.float32)
        cases[name] = {"expected": expected, "before": before, "ours": ours, "notes": written.notes, "folder": work / name}
        jobs.append(f"{work / name}|{work / 'ids.pt'}|{work / name}.out.pt")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, *jobs], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in cases:
        cases[name]["got"] = torch.load(work / f"{name}.out.pt", weights_only=True)
    return cases


@pytest.mark.parametrize("name", list(CASES))
def test_consumer_dequantizes_squeeze_weights(name: str, reloaded: dict) -> None:
    case = reloaded[name]
    got = case["got"]["weights"]
    assert set(got) == set(case["ours"]) and len(got) == 14  # every block Linear, nothing else
    for layer, ours in case["ours"].items():
        if name.startswith("gptq"):
            # GPTQModel dequantizes in float16: equal to squeeze's weight rounded to float16
            assert torch.allclose(got[layer], ours.half().float(), rtol=2e-3, atol=1e-6), layer
        else:
            assert torch.allclose(got[layer], ours, rtol=1e-6, atol=1e-7), layer


@pytest.mark.parametrize("name", list(CASES))
def test_consumer_logits_match_squeeze(name: str, reloaded: dict) -> None:
    case = reloaded[name]
    got, expected, before = case["got"]["logits"], case["expected"], case["before"]
    consumer_error = (got - expected).abs().max()
    quantization_change = (expected - before).abs().max()
    assert quantization_change > 1e-3  # the comparison is not vacuous
    if name.startswith("bnb-int8"):
        # LLM.int8() quantizes activations per row at run time (squeeze's W8A16 evaluation does not):
        # on this tiny model that is as large as the int8 weights' own change, so bound it relatively
        assert (got - expected).norm() / expected.norm() < 0.01
    else:
        # float16 dequantization (GPTQModel) and bitsandbytes' CPU 4-bit kernel cost a little
        assert consumer_error < 0.1 * quantization_change, (float(consumer_error), float(quantization_change))


def test_consumer_modules_are_quantized(reloaded: dict) -> None:
    assert "TorchAtenLinear" in " ".join(reloaded["gptq-w4-g32-sym"]["got"]["classes"]) or any(
        "Quant" in c for c in reloaded["gptq-w4-g32-sym"]["got"]["classes"]
    )
    assert "Linear8bitLt" in reloaded["bnb-int8"]["got"]["classes"]
    assert "Linear4bit" in reloaded["bnb-nf4"]["got"]["classes"]


def test_gptq_layout(reloaded: dict) -> None:
    case = reloaded["gptq-w4-g32-sym"]
    folder = case["folder"]
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is True
    assert qc["desc_act"] is False and qc["format"] == "gptq"
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == qc
    name = "model.layers.0.mlp.down_proj"  # 64 out x 128 in
    with safe_open(folder / "model.safetensors", "pt") as f:
        qweight, qzeros = f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.qzeros")
        scales, g_idx = f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.g_idx")
        assert "lm_head.weight" not in f.keys()
    assert qweight.shape == (128 // 8, 64) and qweight.dtype == torch.int32
    assert qzeros.shape == (4, 64 // 8) and scales.shape == (4, 64) and scales.dtype == torch.float16
    assert g_idx.tolist() == [i // 32 for i in range(128)]
    # v1 stores zero − 1: a symmetric 4-bit zero point of 8 is stored as 7 in every nibble
    assert (unpack_int32(qzeros, 4, 64) + 8 == 7).all()
    # codes unpack along the input dimension and dequantize to the weight squeeze evaluated
    codes = unpack_int32(qweight.t().contiguous(), 4, 128).float()  # [out, in], signed
    weight = codes * scales.float().t().repeat_interleave(32, dim=1)
    assert torch.allclose(weight, case["ours"][name], rtol=1e-6, atol=1e-7)


def test_zero_point_zero_is_written_as_gptq_v2(reloaded: dict) -> None:
    case = reloaded["gptq-w4-asym-v2"]
    assert json.loads((case["folder"] / "quantize_config.json").read_text())["format"] == "gptq_v2"
    assert any("gptq_v2" in note for note in case["notes"])
    assert json.loads((reloaded["gptq-w4-g32-asym-gptq"]["folder"] / "quantize_config.json").read_text())["format"] == "gptq"


def test_bnb_configs(reloaded: dict) -> None:
    int8 = json.loads((reloaded["bnb-int8"]["folder"] / "config.json").read_text())["quantization_config"]
    nf4 = json.loads((reloaded["bnb-nf4"]["folder"] / "config.json").read_text())["quantization_config"]
    assert int8["quant_method"] == nf4["quant_method"] == "bitsandbytes"
    assert int8["load_in_8bit"] and not int8["load_in_4bit"] and nf4["load_in_4bit"] and nf4["bnb_4bit_quant_type"] == "nf4"
    assert "lm_head" in int8["llm_int8_skip_modules"]
    assert any("LLM.int8" in note for note in reloaded["bnb-int8"]["notes"])


def test_nf4_matches_bitsandbytes_quantizer() -> None:
    """squeeze's NF4 codes, block maxima and byte packing equal bitsandbytes' own quantize_4bit."""
    import bitsandbytes.functional as bnbf

    weight = torch.randn(48, 200, generator=torch.Generator().manual_seed(1))  # 9600 values: 150 blocks
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    codes, absmax = nf4_quantize(weight, 64)
    assert torch.equal(pack_nibbles(codes).reshape(-1), packed.reshape(-1))
    assert torch.allclose(absmax, state.absmax)
    assert torch.allclose(state.code.float(), nf4_levels())  # the same 16 levels
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), codes.numel()), codes)
    dequantized = bnbf.dequantize_4bit(packed, state)
    ours = NF4Linear(codes, absmax, (48, 200), None).dequantized_weight()
    assert torch.allclose(ours, dequantized, atol=1e-7)


@pytest.mark.parametrize(
    "fmt, options, method, message",
    [
        ("gptq", dict(mode="per-channel", bits=8, act="per-token"), "rtn", "weight-only"),
        ("gptq", dict(mode="per-channel", bits=3), "rtn", "not 3-bit"),
        ("gptq", dict(mode="per-tensor", bits=4), "rtn", "per-channel or per-group"),
        ("gptq", dict(mode="per-channel", bits=4, scale_dtype="float32"), "rtn", "float16 scales"),
        ("bnb-int8", dict(mode="per-channel", bits=4), "rtn", "int8 symmetric per-channel"),
        ("bnb-int8", dict(mode="per-channel", bits=8, asym=True), "rtn", "int8 symmetric per-channel"),
        ("bnb-nf4", dict(mode="per-group", bits=4, group_size=64), "gptq", "--method rtn"),
        ("bnb-nf4", dict(mode="per-channel", bits=4), "rtn", "blocks of 64"),
        ("safetensors", dict(), "rtn", "unknown format"),
    ],
)
def test_impossible_format_combinations(fmt: str, options: dict, method: str, message: str) -> None:
    with pytest.raises(SqueezeError, match=message):
        check_format(fmt, scheme_from_options(checkpoint=fmt, **options), method)
