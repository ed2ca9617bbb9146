"""HQQ: the kernel's bounds from its construction (codes on the grid, integer zero points, never a
larger magnitude-weighted squared error than round-to-nearest per group), the method on a tiny model, and
``--method hqq`` from the CLI, a recipe and Python, its checkpoint read back."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from squeeze import chain
from squeeze.chain import plan_recipe
from squeeze.cli import app
from squeeze.errors import OptionError
from squeeze.models import load_model
from squeeze.options import validate_options
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.hqq import Hqq, HqqOptions, default_magnitude_power, hqq_quantize, shrink_lp
from squeeze.quant.rtn import compute_qparams, dequantize, quantize
from squeeze.quant.scheme import QuantArgs, scheme_from_options
from squeeze.recipes import RecipeError, load_recipe

runner = CliRunner()
FAST = ["--eval-tokens", "1024", "--seq-len", "64"]


def weights(kind: str, rows: int = 96, cols: int = 256) -> torch.Tensor:
    """A random weight: Gaussian, or heavy-tailed with 1% of entries ten times larger."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=generator) * 0.02
    if kind == "outliers":
        w = torch.where(torch.rand(rows, cols, generator=generator) < 0.01, w * 10, w)
    return w


def group_args(bits: int, symmetric: bool, group_size: int = 64) -> QuantArgs:
    # squeeze's default storage: float16 scales when symmetric, float32 when asymmetric
    return QuantArgs(bits, symmetric, "group", group_size, scale_dtype="float16" if symmetric else "float32")


def squared_error(w: torch.Tensor, codes, scale, zero_point, args: QuantArgs) -> torch.Tensor:
    """Σ (W − Ŵ)² per stored scale, float32."""
    diff = dequantize(codes, scale, zero_point, args, torch.float32) - w
    if args.strategy == "group":
        diff = diff.unflatten(-1, (-1, args.group_size))
    return (diff * diff).sum(-1)


def rtn(w: torch.Tensor, args: QuantArgs):
    scale, zero_point = compute_qparams(w, args)
    return quantize(w, scale, zero_point, args), scale, zero_point


SCHEMES = [(bits, symmetric) for bits in (4, 3, 2) for symmetric in (False, True)]


@pytest.mark.parametrize("bits, symmetric", SCHEMES)
@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_output_has_rtn_shapes_dtypes_and_the_integer_grid(bits: int, symmetric: bool, strategy: str) -> None:
    w = weights("outliers")
    args = group_args(bits, symmetric) if strategy == "group" else QuantArgs(bits, symmetric, "channel", scale_dtype="float16")
    codes, scale, zero_point = hqq_quantize(w, args)
    expected = rtn(w, args)
    for got, want in zip((codes, scale, zero_point), expected):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert args.qmin <= int(codes.min()) and int(codes.max()) <= args.qmax
    assert args.qmin <= int(zero_point.min()) and int(zero_point.max()) <= args.qmax
    if symmetric:
        assert not zero_point.any()
    assert (scale > 0).all()
    # the stored scale and zero point give back exactly these codes by round-to-nearest, so a
    # consumer of the checkpoint computes what squeeze evaluated
    assert torch.equal(quantize(w, scale, zero_point, args), codes)


def importance(w: torch.Tensor, args: QuantArgs, power: float) -> torch.Tensor:
    """Each weight's share of its group's error, (|w| / mean |w| over the group)^power, grouped."""
    magnitude = w.abs().unflatten(-1, (-1, args.group_size))
    return (magnitude / magnitude.mean(-1, keepdim=True)).pow(power)


def weighted_error(w: torch.Tensor, codes, scale, zero_point, args: QuantArgs, power: float) -> torch.Tensor:
    """Σ c (W − Ŵ)² per group, c = importance(w, args, power)."""
    diff = (dequantize(codes, scale, zero_point, args, torch.float32) - w).unflatten(-1, (-1, args.group_size))
    return (importance(w, args, power) * diff * diff).sum(-1)


@pytest.mark.parametrize("bits, symmetric", SCHEMES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("power", [None, 0.0, 1.0])
def test_never_a_larger_weighted_error_than_rtn(bits: int, symmetric: bool, kind: str, power: float | None) -> None:
    """RTN's parameters are a candidate of every group's search, so per group the weighted
    Σ c (W − Ŵ)² is at most RTN's, and the fitted scales make the total strictly lower."""
    w = weights(kind)
    args = group_args(bits, symmetric)
    used = default_magnitude_power(bits) if power is None else power
    ours, theirs = hqq_quantize(w, args, magnitude_power=power), rtn(w, args)
    assert (weighted_error(w, *ours, args, used) <= weighted_error(w, *theirs, args, used)).all()
    assert weighted_error(w, *ours, args, used).sum() < weighted_error(w, *theirs, args, used).sum()


@pytest.mark.parametrize("bits, symmetric", SCHEMES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
def test_unweighted_search_lowers_every_error_measure(bits: int, symmetric: bool, kind: str) -> None:
    """With every weight counted alike (power 0) the squared error per group is at most RTN's, and
    the totals are lower in mean |W − Ŵ| and in Σ |W − Ŵ|^0.7 too."""
    w = weights(kind)
    args = group_args(bits, symmetric)
    ours, theirs = hqq_quantize(w, args, magnitude_power=0.0), rtn(w, args)
    assert (squared_error(w, *ours, args) <= squared_error(w, *theirs, args)).all()
    ours_diff = dequantize(*ours, args, torch.float32) - w
    rtn_diff = dequantize(*theirs, args, torch.float32) - w
    assert ours_diff.abs().mean() < rtn_diff.abs().mean()
    assert ours_diff.abs().pow(0.7).sum() < rtn_diff.abs().pow(0.7).sum()


@pytest.mark.parametrize("bits", [4, 3])
def test_weighting_moves_the_error_off_the_large_weights(bits: int) -> None:
    """Counting weights by magnitude trades error on the small weights of a group for less on its
    largest tenth, against the unweighted search."""
    w, args = weights("outliers"), group_args(bits, False)
    grouped = w.abs().unflatten(-1, (-1, args.group_size))
    largest = grouped >= grouped.quantile(0.9, dim=-1, keepdim=True)

    def errors(power: float) -> tuple[float, float]:
        diff = (dequantize(*hqq_quantize(w, args, magnitude_power=power), args, torch.float32) - w).unflatten(-1, (-1, args.group_size))
        square = diff * diff
        return float(square[largest].sum()), float(square[~largest].sum())

    plain, weighted = errors(0.0), errors(default_magnitude_power(bits))
    assert weighted[0] < plain[0]
    assert weighted[1] > plain[1]


def test_default_magnitude_power_by_bits() -> None:
    assert default_magnitude_power(4) == default_magnitude_power(8) == 1.5
    assert default_magnitude_power(3) == default_magnitude_power(2) == 0.5
    w, args = weights("outliers"), group_args(4, False)
    for got, want in zip(hqq_quantize(w, args), hqq_quantize(w, args, magnitude_power=1.5)):
        assert torch.equal(got, want)


def test_no_search_is_round_to_nearest() -> None:
    w, args = weights("outliers"), group_args(4, False)
    for got, want in zip(hqq_quantize(w, args, iterations=0, clip_grid=0), rtn(w, args)):
        assert torch.equal(got, want)


def test_zero_and_constant_groups_stay_exact() -> None:
    w = weights("gaussian", rows=4, cols=128)
    w[0] = 0.0
    w[1, :64] = 0.25  # a constant group: its codes are all equal, its scale undetermined by a fit
    for symmetric in (False, True):
        args = group_args(4, symmetric)
        codes, scale, zero_point = hqq_quantize(w, args)
        assert torch.isfinite(scale.float()).all()
        rebuilt = dequantize(codes, scale, zero_point, args, torch.float32)
        assert torch.equal(rebuilt[0], w[0])
        # the constant sits on the grid up to the stored scale's rounding: |code| ≤ 8 times a
        # relative 2⁻¹¹ for float16 (float32 scales: far less)
        assert (rebuilt[1, :64] - 0.25).abs().max() <= float(scale[1, 0]) * 8 * 2**-11


def test_shrink_is_a_soft_threshold() -> None:
    x = torch.linspace(-3, 3, 601)
    beta, p = 10.0, 0.7
    y = shrink_lp(x.clone(), beta, p)
    assert (y.abs() <= x.abs()).all() and (y * x >= 0).all()
    # |x| − |x|^(p−1)/β ≤ 0 exactly when |x| ≤ β^(−1/(2−p))
    threshold = beta ** (-1 / (2 - p))
    assert (y[x.abs() < threshold] == 0).all() and (y[x.abs() > threshold * 1.01] != 0).all()
    torch.testing.assert_close(y, torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12) ** (p - 1) / beta))


# ---------------------------------------------------------------------------------------------
# The method


@pytest.mark.parametrize("name, value", [
    ("hqq_iterations", -1), ("hqq_lp_norm", 0), ("hqq_lp_norm", 1.5), ("hqq_beta", 0), ("hqq_kappa", 0.5),
    ("hqq_clip_grid", -1), ("hqq_min_clip", 0), ("hqq_min_clip", 1.2), ("hqq_magnitude_power", -0.5),
])
def test_option_bounds_name_the_option(name: str, value: float) -> None:
    with pytest.raises(OptionError) as caught:
        validate_options(HqqOptions, {name: value})
    assert caught.value.options == (name,)


def stand_in(scheme, **options) -> SimpleNamespace:
    """What Hqq reads of a QuantizeConfig, without needing hqq in the method registry."""
    return SimpleNamespace(
        scheme=scheme, options=HqqOptions(**options), targets=(), ignore=("lm_head",), format="compressed-tensors", method="hqq",
    )


def test_check_refuses_activations_and_per_tensor_scales() -> None:
    with pytest.raises(OptionError) as caught:
        Hqq().check(stand_in(scheme_from_options("per-group", 4, 32, asym=True, act="per-token")))
    assert caught.value.options == ("act",)
    with pytest.raises(OptionError) as caught:
        Hqq().check(stand_in(scheme_from_options("per-tensor", 4)))
    assert caught.value.options == ("mode",)
    Hqq().check(stand_in(scheme_from_options("per-channel", 4)))
    assert not Hqq().needs_calibration(stand_in(scheme_from_options("per-group", 4, 32)))


def test_run_replaces_every_targeted_linear(tiny_llama_dir: Path) -> None:
    model = load_model(str(tiny_llama_dir)).model
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = stand_in(scheme_from_options("per-group", 3, 32, asym=True), hqq_iterations=5)
    method = Hqq()
    label, total = method.steps(model, method.plan(model, config))
    steps: list[str] = []
    result = method.run(model, config, None, steps.append)
    assert label == "hqq, layer by layer" and total == len(steps) == len(result.quantized) == 14
    assert result.ignored == ["lm_head"] and result.calibration_s == 0
    args = config.scheme.weights
    for name in result.quantized:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear)
        w = original[name]
        power = default_magnitude_power(args.num_bits)
        ours = weighted_error(w, layer.weight_codes, layer.weight_scale, layer.weight_zero_point, args, power)
        assert (ours <= weighted_error(w, *rtn(w, args), args, power)).all()


# ---------------------------------------------------------------------------------------------
# Through the registry: the CLI, recipes and Python


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_end_to_end_and_the_checkpoint_reads_back(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "h"
    result = run("quantize", tiny_llama_dir, "--method", "hqq", "--bits", "3", "--group-size", "32", "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = report["settings"]
    assert settings["method"] == "hqq" and settings["scheme"].startswith("W3A16: weights int3 asym per-group(32)")
    assert settings["hqq_iterations"] == 20 and settings["hqq_lp_norm"] == 0.7
    assert "calibrate" not in report["timings_s"] and len(report["layers"]) == 14
    # the checkpoint holds exactly the kernel's codes, scales and zero points
    source = load_model(str(tiny_llama_dir)).model
    loaded = load_model(str(out)).model
    args = scheme_from_options("per-group", 3, 32, asym=True).weights
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        codes, scale, zero_point = hqq_quantize(source.get_submodule(name).weight, args)
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scale, scale)
        assert torch.equal(layer.weight_zero_point, zero_point)


def test_cli_gptq_format(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    result = run(
        "quantize", tiny_llama_dir, "--method", "hqq", "--bits", "4", "--group-size", "32", "--format", "gptq",
        "--hqq-iterations", "3", "--out", out, "--json", "-q", *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "GPTQ" in report["settings"]["format"] and report["settings"]["hqq_iterations"] == 3
    assert (out / "quantize_config.json").exists()


@pytest.mark.parametrize("args, words", [
    (["--hqq-lp-norm", "1.5"], "--hqq-lp-norm"),
    (["--act", "per-token"], "--act"),
    (["--mode", "per-tensor"], "--mode"),
])
def test_cli_errors_name_the_flag(args: list[str], words: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--method", "hqq", *args, "--out", tmp_path / "x", *FAST)
    assert result.exit_code == 2 and words in result.stderr, result.output
    assert not (tmp_path / "x").exists()


def test_recipe_stage(tmp_path: Path, tiny_llama_dir: Path, small_text: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - quantize: {method: hqq, bits: 3, group_size: 32, hqq_iterations: 4, hqq_magnitude_power: 0}\n")
    summary = chain.run_recipe(recipe, str(tiny_llama_dir), tmp_path / "out", data=str(small_text), seq_len=32, eval_tokens=256)
    report = json.loads((tmp_path / "out" / summary["stages"][0]["folder"] / "report.json").read_text())
    assert report["settings"]["method"] == "hqq" and report["settings"]["hqq_iterations"] == 4
    assert report["settings"]["hqq_magnitude_power"] == 0
    assert "int3 asym per-group(32)" in report["settings"]["scheme"]


def test_recipe_option_error_names_the_key(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - quantize:\n      method: hqq\n      hqq_kappa: 0.5\n")
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(recipe), str(tiny_llama_dir))
    assert any(p.startswith(f"{recipe}:2:") and "hqq_kappa:" in p for p in caught.value.problems), caught.value.problems


def test_python_config_takes_a_mapping_of_options() -> None:
    config = QuantizeConfig(scheme=scheme_from_options("per-group", 4, 32, asym=True), method="hqq", options={"hqq_iterations": 2})
    assert isinstance(config.options, HqqOptions) and config.options.hqq_iterations == 2
    with pytest.raises(OptionError) as caught:
        QuantizeConfig(scheme=scheme_from_options("per-group", 4, 32), method="hqq", options={"hqq_beta": -1})
    assert caught.value.options == ("hqq_beta",)
