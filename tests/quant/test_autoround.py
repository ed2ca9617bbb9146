"""AutoRound: the kernel's bounds from its construction (codes on the grid, round-to-nearest at the
start, pruned weights kept at zero, never a higher measured loss than round-to-nearest), the method
on a tiny model, and ``--method autoround`` from the CLI, a recipe and Python, its checkpoint
reloaded by plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from typer.testing import CliRunner

from squeeze.chain import plan_recipe
from squeeze.cli import app
from squeeze.errors import OptionError
from squeeze.formats import QUANTIZED_FORMATS
from squeeze.models import load_model
from squeeze.options import validate_options
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.autoround import fake_quantize, learn_rounding, round_to_nearest, round_weight
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods.autoround import AutoRound, AutoRoundOptions
from squeeze.quant.rtn import compute_qparams, dequantize, quantize
from squeeze.quant.scheme import QuantArgs, scheme_from_options
from squeeze.recipes import QuantizeStage, RecipeError, load_recipe

runner = CliRunner()
FAST = ["--eval-tokens", "256", "--seq-len", "32", "--calib-samples", "4", "--generation-prompts", "0"]


def args_for(bits: int, symmetric: bool, strategy: str, group_size: int = 32) -> QuantArgs:
    # squeeze's default storage: float16 scales when symmetric, float32 when asymmetric
    return QuantArgs(
        bits, symmetric, strategy, group_size if strategy == "group" else None,
        scale_dtype="float16" if symmetric else "float32",
    )


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on a shared CPU a second thread costs far more in waiting than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCHEMES = [(bits, symmetric, strategy) for bits in (2, 3, 4) for symmetric in (True, False) for strategy in ("group", "channel")]


class Block(nn.Module):
    """A small MLP block with a residual, the shape of a transformer block's second half."""

    def __init__(self, width: int = 64, inner: int = 128) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up = nn.Linear(width, inner)
        self.down = nn.Linear(inner, width, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(inner, width, generator=generator) * 0.1)
            self.down.weight.copy_(torch.randn(width, inner, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def block_problem(block: Block, batches: int = 6):
    """Random inputs, the block's original outputs, and AutoRound's loss over fake weights."""
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(16, 64, generator=generator) for _ in range(batches)]
    with torch.no_grad():
        targets = [block(x) for x in inputs]

    def loss(fake: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        output = torch.func.functional_call(block, {f"{n}.weight": w for n, w in fake.items()}, (inputs[index],))
        return F.mse_loss(output, targets[index])

    return loss, inputs, targets


def weights_of(block: Block) -> dict[str, torch.Tensor]:
    return {"up": block.up.weight.detach(), "down": block.down.weight.detach()}


def rtn(w: torch.Tensor, args: QuantArgs):
    scale, zero_point = compute_qparams(w, args)
    return quantize(w, scale, zero_point, args), scale, zero_point


# ---------------------------------------------------------------------------------------------
# The kernel


@pytest.mark.parametrize("bits, symmetric, strategy", SCHEMES)
def test_start_is_round_to_nearest_exactly(bits: int, symmetric: bool, strategy: str) -> None:
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    args = args_for(bits, symmetric, strategy)
    start = round_to_nearest(w, args)
    got, want = round_weight(w, start, args), rtn(w, args)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    # the forward the optimisation sees is what the checkpoint will hold
    assert torch.equal(fake_quantize(w, start, args), dequantize(*want, args, torch.float32))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [None, "float16"])
def test_start_is_round_to_nearest_in_bfloat16_too(symmetric: bool, scale_dtype: str | None) -> None:
    """RTN computes the range and ``w / s + z`` in the weight's dtype; so does the final rounding."""
    w = (torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    args = QuantArgs(4, symmetric, "group", 32, scale_dtype=scale_dtype)
    for a, b in zip(round_weight(w, round_to_nearest(w, args), args), rtn(w, args)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("bits, symmetric, strategy", SCHEMES)
def test_codes_stay_on_the_grid_whatever_the_parameters(bits: int, symmetric: bool, strategy: str) -> None:
    """Offsets and clip factors at and beyond the ends of their ranges: codes are integers in
    [qmin, qmax], zero points too, and the forward equals the dequantized codes."""
    generator = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 128, generator=generator) * 0.02
    args = args_for(bits, symmetric, strategy)
    rounding = round_to_nearest(w, args)
    with torch.no_grad():
        rounding.offset.copy_(torch.rand(w.shape, generator=generator) - 0.5)
        for clip in (rounding.clip_max, rounding.clip_min):
            if clip is not None:
                clip.copy_(0.5 + 0.5 * torch.rand(clip.shape, generator=generator))
    codes, scale, zero_point = round_weight(w, rounding, args)
    assert codes.dtype == torch.int8 and args.qmin <= int(codes.min()) and int(codes.max()) <= args.qmax
    assert args.qmin <= int(zero_point.min()) and int(zero_point.max()) <= args.qmax
    assert (scale > 0).all() and (not symmetric or not zero_point.any())
    torch.testing.assert_close(fake_quantize(w, rounding, args), dequantize(codes, scale, zero_point, args, torch.float32), rtol=0, atol=0)
    # an offset moves a code by at most one step from round-to-nearest's on the same grid
    assert ((codes.float() - quantize(w, scale, zero_point, args).float()).abs() <= 1).all()


def test_no_iterations_is_round_to_nearest() -> None:
    block = Block()
    loss, _, _ = block_problem(block)
    args = args_for(4, True, "group")
    learned = learn_rounding(weights_of(block), args, loss, 6, iterations=0)
    assert learned.step == 0 and learned.loss == learned.rtn_loss
    for name, w in weights_of(block).items():
        for a, b in zip(round_weight(w, learned.rounding[name], args), rtn(w, args)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bits, symmetric, strategy", [(3, True, "group"), (2, False, "group"), (4, False, "channel")])
def test_learned_rounding_lowers_the_block_output_error(bits: int, symmetric: bool, strategy: str) -> None:
    block = Block()
    loss, inputs, targets = block_problem(block)
    args = args_for(bits, symmetric, strategy)
    learned = learn_rounding(weights_of(block), args, loss, len(inputs), iterations=60, batch=2, seed=3)
    assert learned.loss < learned.rtn_loss and learned.step > 0
    # measured again from the rounded codes, on every batch: below round-to-nearest's
    for name, w in weights_of(block).items():
        assert torch.equal(fake_quantize(w, learned.rounding[name], args), dequantize(*round_weight(w, learned.rounding[name], args), args, torch.float32))
    ours = {n: dequantize(*round_weight(w, learned.rounding[n], args), args, torch.float32) for n, w in weights_of(block).items()}
    theirs = {n: dequantize(*rtn(w, args), args, torch.float32) for n, w in weights_of(block).items()}
    total = lambda fake: sum(float(loss(fake, i)) for i in range(len(inputs)))  # noqa: E731
    assert total(ours) < total(theirs)
    # the parameters stay in their ranges
    for rounding in learned.rounding.values():
        assert rounding.offset.abs().max() <= 0.5
        for clip in (rounding.clip_max, rounding.clip_min):
            if clip is not None:
                assert 0.5 <= float(clip.min()) and float(clip.max()) <= 1.0


def test_a_step_that_cannot_help_keeps_round_to_nearest() -> None:
    """A loss that round-to-nearest already minimises: the kept parameters are RTN's."""
    block = Block()
    args = args_for(4, True, "group")
    reference = {n: dequantize(*rtn(w, args), args, torch.float32) for n, w in weights_of(block).items()}
    loss = lambda fake, index: sum(((fake[n] - reference[n]) ** 2).sum() for n in fake)  # noqa: E731
    learned = learn_rounding(weights_of(block), args, loss, 2, iterations=5, lr=0.4)
    assert learned.step == 0 and learned.loss == learned.rtn_loss == 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_weights_stay_zero(symmetric: bool) -> None:
    block = Block()
    with torch.no_grad():
        block.up.weight[:, ::3] = 0.0  # pruned inputs
        block.down.weight[5] = 0.0  # a pruned row: a whole group of zeros
    loss, inputs, _ = block_problem(block)
    args = args_for(3, symmetric, "group")
    learned = learn_rounding(weights_of(block), args, loss, len(inputs), iterations=30, batch=2, lr=0.1)
    assert learned.step > 0
    for name, w in weights_of(block).items():
        rebuilt = dequantize(*round_weight(w, learned.rounding[name], args), args, torch.float32)
        assert (rebuilt[w == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# The method


@pytest.mark.parametrize("name, value", [
    ("autoround_iters", -1), ("autoround_lr", 0), ("autoround_lr", 2.0), ("autoround_batch", 0), ("autoround_seed", -1),
])
def test_option_bounds_name_the_option(name: str, value: float) -> None:
    with pytest.raises(OptionError) as caught:
        validate_options(AutoRoundOptions, {name: value})
    assert caught.value.options == (name,)


def stand_in(scheme, **options) -> SimpleNamespace:
    """What AutoRound reads of a QuantizeConfig."""
    return SimpleNamespace(
        scheme=scheme, options=AutoRoundOptions(**options), targets=(), ignore=("lm_head",), format="compressed-tensors",
        method="autoround",
    )


def test_check_refuses_activations_and_per_tensor_scales() -> None:
    with pytest.raises(OptionError) as caught:
        AutoRound().check(stand_in(scheme_from_options("per-group", 4, 32, act="per-token")))
    assert caught.value.options == ("act",)
    with pytest.raises(OptionError) as caught:
        AutoRound().check(stand_in(scheme_from_options("per-tensor", 4)))
    assert caught.value.options == ("mode",)
    AutoRound().check(stand_in(scheme_from_options("per-channel", 3, asym=True)))


def calibration(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 1000, (2, 16), generator=generator)} for _ in range(3)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_run_quantizes_every_block_and_its_checkpoint_reloads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    model = loaded.model
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)  # both kinds of flag, to see each kept
    flags = {n: p.requires_grad for n, p in model.named_parameters() if not n.endswith("proj.weight")}
    config = QuantizeConfig(scheme=scheme_from_options("per-group", 3, 32), method="autoround", options={"autoround_iters": 8})
    result = quantize_model(model, config, calibration())
    assert len(result.quantized) == len(result.layers) == 14 and result.ignored == ["lm_head"]
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in result.quantized)
    assert result.calibration_s > 0 and any(n.startswith("AutoRound: block-output error") for n in result.notes)
    # the model's own parameters neither gained gradients nor lost their flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and any(flags.values())
    assert all(p.grad is None for p in model.parameters())
    QUANTIZED_FORMATS.get(config.format).write(model, config.scheme, result.ignored, tmp_path, tokenizer=loaded.tokenizer, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(9))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_learning_beats_round_to_nearest_on_the_calibration_text(tiny_llama_dir: Path) -> None:
    """The same model and text, 0 and 30 steps: the learned model's logits are closer to the original's."""
    original = load_model(str(tiny_llama_dir)).model
    batches = calibration()
    ids = torch.cat([b["input_ids"] for b in batches])
    reference = logits(original, ids)
    gaps = []
    for iterations in (0, 30):
        model = load_model(str(tiny_llama_dir)).model
        options = {"autoround_iters": iterations, "autoround_batch": 2}
        quantize_model(model, QuantizeConfig(scheme=scheme_from_options("per-group", 2, 32), method="autoround", options=options), batches)
        gaps.append(float(F.mse_loss(logits(model, ids), reference)))
    assert gaps[1] < gaps[0]


def test_model_target_starts_like_the_block_target_and_then_corrects_earlier_blocks(tiny_llama_dir: Path) -> None:
    """Block 0 sees the same inputs and targets either way (same codes); from block 1 on the model
    target is the unquantized model's output, not the unquantized block's on quantized inputs."""
    codes = {}
    for model_target in (True, False):
        model = load_model(str(tiny_llama_dir)).model
        options = {"autoround_iters": 6, "autoround_model_target": model_target}
        quantize_model(model, QuantizeConfig(scheme=scheme_from_options("per-group", 2, 32), method="autoround", options=options), calibration())
        codes[model_target] = [model.model.layers[i].mlp.down_proj.weight_codes.clone() for i in (0, 1)]
    assert torch.equal(codes[True][0], codes[False][0])
    assert not torch.equal(codes[True][1], codes[False][1])


# ---------------------------------------------------------------------------------------------
# Through the registry: the CLI, recipes and Python


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("stream", [False, True])
def test_cli_checkpoint_reloads_in_plain_transformers(stream: bool, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    extra = ["--stream"] if stream else []
    result = run("quantize", tiny_llama_dir, "--method", "autoround", "--autoround-iters", "4", *extra, "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = report["settings"]
    # the method's default scheme: W4 per-group symmetric, the group size resolved from the model
    assert settings["method"] == "autoround" and settings["scheme"].startswith("W4A16: weights int4 sym per-group(")
    assert settings["autoround_iters"] == 4 and settings["autoround_lr"] is None and settings["autoround_clip"] is True
    assert len(report["layers"]) == 14 and bool(settings.get("streamed")) == stream
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(load_model(str(out)).model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--autoround-lr", "0"], "--autoround-lr"),
    (["--act", "per-token"], "--act"),
    (["--mode", "per-tensor"], "--mode"),
])
def test_cli_errors_name_the_flag(args: list[str], words: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--method", "autoround", *args, "--out", tmp_path / "x", *FAST)
    assert result.exit_code == 2 and words in result.stderr, result.output
    assert not (tmp_path / "x").exists()


def test_recipe_stage_validates(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "stages:\n  - quantize: {method: autoround, bits: 3, group_size: 32, autoround_iters: 50, autoround_lr: 0.02,"
        " autoround_batch: 2, autoround_clip: false, autoround_seed: 1, autoround_model_target: false}\n"
    )
    plan_recipe(load_recipe(recipe), str(tiny_llama_dir))
    stage = QuantizeStage(method="autoround", autoround_iters=50, autoround_clip=False)
    assert stage.config(None).options.settings() == {
        "autoround_iters": 50, "autoround_lr": None, "autoround_batch": 1, "autoround_clip": False, "autoround_seed": 0,
        "autoround_model_target": True,
    }


def test_recipe_option_error_names_the_key(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - quantize:\n      method: autoround\n      autoround_batch: 0\n")
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(recipe), str(tiny_llama_dir))
    assert any(
        p.startswith(f"{recipe}:2:") and "autoround_batch:" in p and "at least one batch" in p for p in caught.value.problems
    ), caught.value.problems


def test_python_config_takes_a_mapping_of_options() -> None:
    config = QuantizeConfig(scheme=scheme_from_options("per-group", 4, 32), method="autoround", options={"autoround_iters": 2})
    assert isinstance(config.options, AutoRoundOptions) and config.options.autoround_iters == 2
    with pytest.raises(OptionError) as caught:
        QuantizeConfig(scheme=scheme_from_options("per-group", 4, 32, act="per-token"), method="autoround")
    assert caught.value.options == ("act",)


def test_signed_scales_learn_a_clip_factor_on_each_end() -> None:
    """With signed scales the scale comes from the larger end: each end has its own clip factor,
    and clipping the larger one below the other hands the code qmin to the other end's sign."""
    signed = QuantArgs(4, True, "group", 8, scale_dtype="float32", signed_scale=True)
    balanced = QuantArgs(4, True, "group", 8, scale_dtype="float32")
    w = torch.tensor([[1.0, -0.8, 0.3, -0.2, 0.1, 0.5, -0.4, 0.0]])
    assert round_to_nearest(w, balanced).clip_min is None  # one factor on max|w|
    rounding = round_to_nearest(w, signed)
    assert rounding.clip_min is not None and rounding.clip_max is not None
    codes, scale, _ = round_weight(w, rounding, signed)
    assert float(scale) == pytest.approx(1.0 / signed.qmin) and int(codes[0, 0]) == signed.qmin  # 1.0 on -8
    with torch.no_grad():
        rounding.clip_max.fill_(0.7)  # the positive end, clipped to 0.7, is now below 0.8
    codes, scale, _ = round_weight(w, rounding, signed)
    assert float(scale) == pytest.approx(-0.8 / signed.qmin) and int(codes[0, 1]) == signed.qmin  # -0.8 on -8
    assert int(codes[0, 0]) == signed.qmax  # 1.0 clipped to the top code
