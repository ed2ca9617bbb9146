"""The integer-kernel runtime: checkpoints read back exactly, kernels compute what the reference computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from squeeze.api import quantize
from squeeze.data import evaluation_windows
from squeeze.evaluate import compare_causal
from squeeze.models import load_model
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.scheme import scheme_from_options
from squeeze.quant.apply import QuantizeConfig
from squeeze.formats.compressed_tensors import load_quantized
from squeeze.runtime import Int4PackedLinear, Int8DynamicLinear, Int8WeightLinear, accelerate, measure_speed
from squeeze.runtime.kernels import _cuda_int4_tiles, int_mm_is_fast


def _layer(scheme, in_features: int = 256, out_features: int = 96, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    return QuantizedLinear.from_linear(linear, scheme)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("integer_mm", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_dynamic_is_the_reference_arithmetic(rows: int, integer_mm: bool) -> None:
    """Both products, _int_mm's int32 and the float32 one used where _int_mm is slow."""
    layer = _layer(scheme_from_options(bits=8, act="per-token"))
    assert Int8DynamicLinear.supports(layer)
    fast = Int8DynamicLinear(layer)
    fast.integer_mm = integer_mm
    x = torch.randn(2, rows, 256) * torch.linspace(0.1, 5, 256)  # uneven channels, as real activations
    # int32 accumulation is exact: only float rounding order differs from dequantize-then-matmul
    assert _relative_error(fast(x), layer(x)) < 1e-5


def test_int8_dynamic_says_which_product_this_cpu_runs() -> None:
    fast = Int8DynamicLinear(_layer(scheme_from_options(bits=8, act="per-token")))
    on_avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert fast.integer_mm == on_avx512 == int_mm_is_fast(torch.device("cpu"))
    assert fast.kernel == (Int8DynamicLinear.kernel if on_avx512 else Int8DynamicLinear.float_kernel)
    assert int_mm_is_fast(torch.device("cuda"))


@pytest.mark.parametrize(
    ("in_features", "out_features", "tiles"),
    [(2048, 5632, 8), (576, 576, 4), (960, 2560, 4), (96, 64, 2), (48, 64, None), (576, 36, None)],
)
def test_cuda_int4_pack_takes_the_widest_tiling_the_layer_allows(in_features: int, out_features: int, tiles: int | None) -> None:
    """CUDA's pack wants the input width a multiple of 16 inner tiles (8, 4 or 2) and the output a
    multiple of 8; SmolLM2's 576 takes 4 tiles, which a fixed 8 refused."""
    assert _cuda_int4_tiles(in_features, out_features) == tiles


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("rows", [1, 40])
def test_int4_pack_matches_the_dequantized_weight(group_size: int, asym: bool, rows: int) -> None:
    layer = _layer(scheme_from_options(mode="per-group", bits=4, group_size=group_size, asym=asym))
    assert Int4PackedLinear.supports(layer)
    fast = Int4PackedLinear(layer)
    x = torch.randn(rows, 256)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    # bfloat16 activations and scales: about 2^-8 relative per product
    assert _relative_error(fast(x), expected) < 1e-2


@pytest.mark.parametrize("rows", [1, 40])
def test_int8_weight_pack_matches_the_dequantized_weight(rows: int) -> None:
    layer = _layer(scheme_from_options(bits=8))
    assert Int8WeightLinear.supports(layer) and not Int8DynamicLinear.supports(layer)
    fast = Int8WeightLinear(layer)
    x = torch.randn(rows, 256)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert _relative_error(fast(x), expected) < 1e-2


def test_unsupported_schemes_keep_the_reference_forward() -> None:
    for scheme in (
        scheme_from_options(bits=8, act="per-token", act_asym=True),
        scheme_from_options(mode="per-group", bits=4, group_size=16),
        scheme_from_options(mode="per-tensor", bits=8),
    ):
        layer = _layer(scheme)
        assert not any(k.supports(layer) for k in (Int8DynamicLinear, Int4PackedLinear, Int8WeightLinear)), scheme.describe()


def _quantized(folder: Path, out: Path, small_text: Path, **options) -> Path:
    config = QuantizeConfig(scheme=scheme_from_options(**options))
    quantize(str(folder), out, config, data=str(small_text), eval_tokens=256, seq_len=32, calibration_samples=4)
    return out


def test_read_back_checkpoint_reproduces_the_pass_report(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    import json

    out = _quantized(tiny_llama_dir, tmp_path / "w4", small_text, mode="per-group", bits=4, group_size=32, asym=True)
    report = json.loads((out / "report.json").read_text())["accuracy"]
    model = load_quantized(out, "causal")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14  # 2 blocks x 7; the head is ignored
    original = load_model(str(tiny_llama_dir))
    windows = evaluation_windows(original.tokenizer, str(small_text), 32, 256)
    again = compare_causal(model, windows, original.model)
    assert again.kl_divergence == pytest.approx(report["kl_divergence"], rel=1e-5, abs=1e-9)
    assert again.perplexity == pytest.approx(report["perplexity_after"], rel=1e-6)


@pytest.mark.parametrize(
    "options, kernel, dtype",
    [
        ({"bits": 8, "act": "per-token"}, Int8DynamicLinear, torch.float32),
        ({"mode": "per-group", "bits": 4, "group_size": 32}, Int4PackedLinear, torch.bfloat16),
        ({"bits": 8}, Int8WeightLinear, torch.bfloat16),
    ],
)
def test_accelerated_model_agrees_with_the_reference(
    tiny_llama_dir: Path, small_text: Path, tmp_path: Path, options: dict, kernel: type, dtype: torch.dtype
) -> None:
    out = _quantized(tiny_llama_dir, tmp_path / "q", small_text, **options)
    reference = load_quantized(out, "causal")
    fast = load_quantized(out, "causal")
    done = accelerate(fast)
    label = kernel.kernel if kernel is not Int8DynamicLinear or int_mm_is_fast(torch.device("cpu")) else kernel.float_kernel
    assert done.kernels == {label: 14} and done.reference_layers == 0
    assert done.compute_dtype == dtype and next(fast.parameters()).dtype == dtype
    windows = evaluation_windows(load_model(str(tiny_llama_dir)).tokenizer, str(small_text), 32, 128)
    cmp = compare_causal(fast, windows, reference)
    assert cmp.kl_divergence < (1e-6 if dtype == torch.float32 else 1e-2)
    prefill, decode = measure_speed(fast, windows[:1], decode_tokens=4, repeats=1)
    assert prefill > 0 and decode > 0


def test_not_a_quantized_checkpoint(tiny_llama_dir: Path) -> None:
    from squeeze.errors import SqueezeError

    with pytest.raises(SqueezeError, match="not a compressed-tensors quantized checkpoint"):
        load_quantized(tiny_llama_dir, "causal")
