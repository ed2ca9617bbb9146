"""Round-to-nearest math: error bounds, zero, scale shapes, agreement with compressed-tensors."""

import itertools

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.quant.rtn import compute_qparams, dequantize, fake_quantize, quantize
from squeeze.quant.scheme import QuantArgs, QuantScheme, scheme_from_options

WEIGHT_CASES = [
    QuantArgs(num_bits=bits, symmetric=sym, strategy=strategy, group_size=16 if strategy == "group" else None)
    for bits, sym, strategy in itertools.product((2, 3, 4, 8), (True, False), ("tensor", "channel", "group"))
]
NARROW_SCALE_CASES = [
    QuantArgs(num_bits=bits, symmetric=sym, strategy=strategy, group_size=16 if strategy == "group" else None,
              scale_dtype=dtype)
    for bits, sym, strategy, dtype in itertools.product(
        (4, 8), (True, False), ("channel", "group"), ("float16", "bfloat16")
    )
]


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=g)
    w[3] *= 20  # an outlier row, so per-tensor and per-channel scales differ
    w[5, :16] = 0  # an all-zero group
    w[7] = w[7].abs()  # a row with no negative values
    return w


@pytest.mark.parametrize("args", WEIGHT_CASES + NARROW_SCALE_CASES, ids=lambda a: f"{a.describe()} {a.scale_dtype}")
def test_error_at_most_half_a_scale(args: QuantArgs) -> None:
    w = _weight()
    scale, zero_point = compute_qparams(w, args)
    # a scale stored narrower is rounded down: at most (qmax - qmin) x that rounding of extra clamping
    exact, _ = compute_qparams(w, QuantArgs(args.num_bits, args.symmetric, args.strategy, args.group_size))
    if args.scale_dtype:
        assert scale.dtype == getattr(torch, args.scale_dtype)
        underflow = exact < torch.finfo(scale.dtype).tiny  # the all-zero group's placeholder scale
        assert torch.all((scale.float() <= exact) | underflow) and torch.all(scale.float() > 0.99 * exact)
    q = quantize(w, scale, zero_point, args)
    assert q.dtype == torch.int8
    assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    w_hat = dequantize(q, scale, zero_point, args, dtype=torch.float32)

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(16, dim=-1) if args.strategy == "group" else t.expand_as(w)

    stored = full(scale.float())
    clamping = (args.qmax - args.qmin) * (full(exact) - stored).clamp(min=0)
    # scale/2 exactly, plus the float rounding of the values themselves (a few ulps of |w|)
    ulps = 4 * torch.finfo(w.dtype).eps * w.abs()
    assert torch.all((w_hat - w).abs() <= stored / 2 + clamping + ulps)
    if not args.scale_dtype:
        assert torch.all(clamping == 0)


@pytest.mark.parametrize("args", WEIGHT_CASES + NARROW_SCALE_CASES, ids=lambda a: f"{a.describe()} {a.scale_dtype}")
def test_zero_is_exact(args: QuantArgs) -> None:
    w = _weight(1)
    scale, zero_point = compute_qparams(w, args)
    w_hat = dequantize(quantize(w, scale, zero_point, args), scale, zero_point, args)
    zeros = w == 0
    assert zeros.any()
    assert torch.all(w_hat[zeros] == 0)
    # and a zero anywhere in the tensor is representable: quantizing 0 gives the zero point
    zero_tensor = torch.zeros_like(w)
    assert torch.all(dequantize(quantize(zero_tensor, scale, zero_point, args), scale, zero_point, args) == 0)


@pytest.mark.parametrize(
    "strategy, shape", [("tensor", (1,)), ("channel", (24, 1)), ("group", (24, 4))]
)
def test_scale_shapes_follow_compressed_tensors(strategy: str, shape: tuple) -> None:
    args = QuantArgs(num_bits=4, strategy=strategy, group_size=16 if strategy == "group" else None)
    scale, zero_point = compute_qparams(_weight(), args)
    assert tuple(scale.shape) == shape and tuple(zero_point.shape) == shape
    assert zero_point.dtype == torch.int8


def test_per_channel_beats_per_tensor_with_an_outlier_row() -> None:
    w = _weight()
    errors = {}
    for strategy in ("tensor", "channel"):
        args = QuantArgs(num_bits=4, strategy=strategy)
        errors[strategy] = float((fake_quantize(w, args) - w).norm())
    assert errors["channel"] < errors["tensor"]


@pytest.mark.parametrize("args", WEIGHT_CASES[:12], ids=lambda a: a.describe())
def test_matches_compressed_tensors(args: QuantArgs) -> None:
    """The consumer library computes the same codes from our scales, and the same scales from min/max."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _weight(2)
    ct_args = QuantizationArgs(**{k: v for k, v in args.to_compressed_tensors().items() if v is not None})
    scale, zero_point = compute_qparams(w, args)
    if args.strategy == "tensor":
        lo, hi = torch.aminmax(w)
        lo, hi = lo.reshape(1), hi.reshape(1)
    elif args.strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        lo, hi = w.unflatten(-1, (4, 16)).amin(-1), w.unflatten(-1, (4, 16)).amax(-1)
    ct_scale, ct_zero_point = calculate_qparams(lo, hi, ct_args)
    assert torch.allclose(scale, ct_scale)
    assert torch.equal(zero_point.to(torch.int32), ct_zero_point.to(torch.int32))
    q = quantize(w, scale, zero_point, args)
    ct_q = ct_quantize(w, scale, zero_point, ct_args, dtype=torch.int8)
    assert torch.equal(q, ct_q)
    assert torch.allclose(dequantize(q, scale, zero_point, args), ct_dequantize(ct_q, scale, zero_point, ct_args))


def test_dynamic_per_token_activation_scales() -> None:
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    x[0, 1] *= 100
    args = QuantArgs(num_bits=8, strategy="token", dynamic=True)
    scale, _ = compute_qparams(x, args)
    assert scale.shape == (2, 5, 1)
    err = (fake_quantize(x, args) - x).abs()
    assert torch.all(err <= scale / 2 + 4 * torch.finfo(x.dtype).eps * x.abs())
    # the outlier token does not inflate the other tokens' scales
    assert scale[0, 0, 0] < scale[0, 1, 0] / 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=1), "bits must be between 2 and 8"),
        (dict(bits=9), "bits must be between 2 and 8"),
        (dict(mode="per-row"), "unknown mode"),
        (dict(mode="per-channel", group_size=64), "only applies to --mode per-group"),
        (dict(act="per-group"), "unknown activation mode"),
        (dict(act_asym=True), "--act-asym needs quantized activations"),
    ],
)
def test_impossible_options(kwargs: dict, message: str) -> None:
    with pytest.raises(SqueezeError, match=message):
        scheme_from_options(**kwargs)


def test_scheme_names_and_formats() -> None:
    assert scheme_from_options(bits=8).name == "W8A16"
    assert scheme_from_options(bits=4, mode="per-group", group_size=64).name == "W4A16"
    w8a8 = scheme_from_options(bits=8, act="per-token")
    assert w8a8.name == "W8A8" and w8a8.checkpoint_format == "int-quantized"
    assert scheme_from_options(bits=4).checkpoint_format == "pack-quantized"
    assert scheme_from_options(mode="per-group").weights.group_size == 128
    with pytest.raises(SqueezeError):
        QuantScheme(weights=QuantArgs(strategy="token", dynamic=True))


@pytest.mark.parametrize("bits", [3, 4])
def test_the_signed_grid_rounds_closer_than_the_balanced_one(bits: int) -> None:
    """``signed_scale``: a step of max|w| / 2^(bits-1) instead of max|w| / (2^(bits-1) - 1/2),
    every code used on the side of the largest weight; on Gaussian weights that is a smaller
    mean squared rounding error (the reason auto-round and llama.cpp use it)."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(bits))
    errors = {}
    for signed in (False, True):
        args = QuantArgs(num_bits=bits, strategy="group", group_size=64, signed_scale=signed)
        scale, zero = compute_qparams(w, args)
        codes = quantize(w, scale, zero, args)
        assert codes.min() >= args.qmin and codes.max() <= args.qmax
        errors[signed] = float((dequantize(codes, scale, zero, args) - w).pow(2).mean())
        if signed:
            assert (scale < 0).any() and (scale > 0).any()
            assert (codes == args.qmin).sum() >= scale.numel()  # each group's largest weight is the code qmin
    assert errors[True] < 0.95 * errors[False], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_dequantize_is_the_expanded_formula(dtype: torch.dtype) -> None:
    # the grouped path never expands scale and zero point to the weight's shape, and gives the same bits
    args = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=16)
    q = torch.randint(-8, 8, (6, 64), dtype=torch.int8)
    scale, zero = torch.rand(6, 4) + 0.01, torch.randint(-8, 8, (6, 4), dtype=torch.int8)
    expanded = (q.to(dtype) - zero.repeat_interleave(16, dim=1).to(dtype)) * scale.repeat_interleave(16, dim=1).to(dtype)
    got = dequantize(q, scale, zero, args, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, expanded)
