"""``--rotate hadamard``: the matrices are orthogonal (to float64 rounding), a rotated model computes
the same function as the original on every architecture that fits, the others are refused on the
meta model with why, and a rotated, quantized checkpoint reloads in plain transformers."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

from squeeze.chain import plan_recipe
from squeeze.cli import app
from squeeze.errors import OptionError, SqueezeError
from squeeze.formats import QUANTIZED_FORMATS
from squeeze.linears import as_linear_layers
from squeeze.models import load_model
from squeeze.models.tiny import ARCHITECTURES, save_tiny_model, tiny_model
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.hadamard import hadamard_matrix, hadamard_orders, random_hadamard
from squeeze.quant.rotate import check_rotatable, rotate_model
from squeeze.quant.scheme import scheme_from_options
from squeeze.recipes import QuantizeStage, RecipeError, load_recipe

runner = CliRunner()
FAST = ["--eval-tokens", "1024", "--seq-len", "64"]
VOCAB = 300


def rotation(n: int, seed: int = 0):
    return random_hadamard(n, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The matrices


@pytest.mark.parametrize("n", [4, 12, 20, 28, 64, 576, 10])
def test_rotations_are_orthogonal(n: int) -> None:
    q = rotation(n).matrix()
    # a product of n-term float64 sums: each entry off by a few n·2⁻⁵³
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() <= n * 2**-50
    if rotation(n).kind == "Hadamard":  # every entry ±1/√n: an outlier is spread evenly
        assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [12, 20, 24, 28, 36, 44, 48, 60, 76, 224])
def test_paley_blocks_are_hadamard(order: int) -> None:
    h = hadamard_matrix(order)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


@pytest.mark.parametrize("n", [576, 896, 1536, 2048, 3584, 5120, 64, 2])
def test_real_hidden_sizes_have_a_hadamard_matrix(n: int) -> None:
    orders = hadamard_orders(n)
    assert orders is not None and math.prod(orders) == n


def test_no_hadamard_order_falls_back_to_a_random_orthogonal_matrix() -> None:
    assert hadamard_orders(10) is None and hadamard_orders(6) is None
    assert rotation(10).kind == "random orthogonal" and "random orthogonal" in rotation(10).describe()


@pytest.mark.parametrize("n", [48, 2048])
def test_apply_is_the_product_with_the_matrix(n: int) -> None:
    """One merged block (48 = 12 ⊗ 4) or two Kronecker factors applied axis by axis (2048 = 64 ⊗ 32)."""
    x = torch.randn(5, 3, n, dtype=torch.float64)
    q = rotation(n)
    assert len(q.blocks) == (1 if n == 48 else 2)
    dense = torch.diag(q.signs) @ functools.reduce(torch.kron, q.blocks)
    assert torch.allclose(q.apply(x), x @ dense, atol=1e-12)
    assert (q.matrix().T @ q.matrix() - torch.eye(n, dtype=torch.float64)).abs().max() <= n * 2**-50


def test_the_seed_decides_the_signs() -> None:
    assert torch.equal(rotation(64, 1).matrix(), rotation(64, 1).matrix())
    assert not torch.equal(rotation(64, 1).matrix(), rotation(64, 2).matrix())


# ---------------------------------------------------------------------------------------------
# The model computes the same function


def gemma(**extra) -> torch.nn.Module:
    config = transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, **extra,
    )
    return transformers.GemmaForCausalLM(config).eval()


def llama_with_biases() -> torch.nn.Module:
    """Hidden 48 (Paley 12 ⊗ 4), heads of 12, biases on every projection (the b → b Q algebra)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def llama_odd_heads() -> torch.nn.Module:
    """Heads of 10: no Hadamard matrix, a random orthogonal one."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=10,
    )
    return transformers.LlamaForCausalLM(config).eval()


BUILT = {"gemma": gemma, "llama-biases": llama_with_biases, "llama-head-10": llama_odd_heads}
SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", *BUILT]


def build(name: str) -> torch.nn.Module:
    if name in BUILT:
        torch.manual_seed(0)
        model = BUILT[name]()
    else:
        model = tiny_model(name, VOCAB)
    with torch.no_grad():  # norms and biases away from their neutral values, so that a wrong fold shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
    as_linear_layers(model)  # as squeeze loads it: experts as Linear layers
    return model


@pytest.mark.parametrize("name", SUPPORTED)
def test_rotated_model_computes_the_same_function(name: str) -> None:
    model = build(name)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embeddings = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        result = rotate_model(model, seed=3)
        after = model(input_ids=ids).logits
    # float32 forward passes of weights rounded once from float64: far below 1e-4 of the logits' scale
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    # not vacuous: the weights moved and every norm scale became the identity
    assert not torch.allclose(model.get_input_embeddings().weight, embeddings, atol=1e-3)
    assert result.norms_folded == 2 * model.config.num_hidden_layers + 1
    assert result.untied == ("lm_head" if tied else None)
    assert model.config.tie_word_embeddings is False or not tied
    if tied:
        assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert "untied" in " ".join(result.notes(torch.bfloat16))
    assert (result.head.kind == "Hadamard") == (name != "llama-head-10")


# ---------------------------------------------------------------------------------------------
# Refusals, on the meta model (no weight read)


def meta(name: str) -> torch.nn.Module:
    """The tiny ``name`` model on the meta device: shapes only, as the pass checks it."""
    config_name, model_name, options = ARCHITECTURES[name]
    special = {f"{kind}_token_id": 0 for kind in ("pad", "bos", "eos")}
    with torch.device("meta"):
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=VOCAB, **special, **options()))
    as_linear_layers(model)
    return model


@pytest.mark.parametrize("name, why", [
    ("gpt2", "LayerNorm"), ("gpt_neox", "LayerNorm"), ("falcon", "LayerNorm"),
    ("gemma2", "sandwich"), ("gemma3", "sandwich"), ("olmo2", "post norms"), ("t5", "encoder-decoder"), ("bart", "encoder-decoder"),
])
def test_architectures_that_do_not_fit_are_refused_on_the_meta_model(name: str, why: str) -> None:
    with pytest.raises(OptionError) as caught:
        check_rotatable(meta(name))
    assert caught.value.options == ("rotate",) and why in str(caught.value) and "\n" not in str(caught.value)


def test_supported_meta_models_pass_the_check() -> None:
    for name in ("llama", "phi3", "qwen3_moe"):
        check_rotatable(meta(name))


# ---------------------------------------------------------------------------------------------
# Quantized after rotation: the checkpoint


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_in_memory_model_equals_its_reloaded_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    model, ids = loaded.model, torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    config = QuantizeConfig(scheme=scheme_from_options("per-group", 4, 32), rotate="hadamard")
    rotate_model(model, config.rotate_seed)
    result = quantize_model(model, config)
    QUANTIZED_FORMATS.get(config.format).write(model, config.scheme, result.ignored, tmp_path, tokenizer=loaded.tokenizer, dtype=torch.float32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("scheme", [
    ["--mode", "per-group", "--bits", "4", "--group-size", "32", "--no-eval"],
    ["--bits", "8", "--act", "per-token", "--generation-prompts", "0"],  # scored against the original, generation left out for time
])
def test_cli_checkpoint_reloads_in_plain_transformers(scheme: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = run("quantize", tiny_llama_dir, "--rotate", "hadamard", *scheme, "--out", out, "--json", "-q", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    if "--no-eval" not in scheme:
        assert math.isfinite(report["accuracy"]["kl_divergence"])
    assert report["settings"]["rotate"] == "hadamard" and report["settings"]["rotate_seed"] == 0
    assert any(n.startswith("rotated (seed 0)") for n in report["notes"])
    assert any(n.startswith("lm_head untied") for n in report["notes"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(load_model(str(out)).model, ids), rtol=1e-4, atol=1e-4)


def test_default_is_no_rotation() -> None:
    assert QuantizeConfig().rotate == "none" and QuantizeStage().config(None).rotate == "none"
    assert QuantizeStage(rotate="hadamard", rotate_seed=5).config(None).rotate_seed == 5
    assert QuantizeStage(rotate="hadamard").label() == "rtn-rot-w8a16"


@pytest.mark.parametrize("args, words", [
    (["--rotate", "bogus"], ["--rotate", "none or hadamard"]),
    (["--rotate", "hadamard", "--stream"], ["--stream", "--rotate hadamard"]),
])
def test_cli_refusals_name_the_flags(args: list[str], words: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, *args, "--out", tmp_path / "x", "--no-eval", *FAST)
    assert result.exit_code == 2 and all(w in result.stderr for w in words), result.output
    assert not (tmp_path / "x").exists()


def test_cli_refuses_an_architecture_before_loading(tmp_path: Path, minilm_tokenizer) -> None:
    source = save_tiny_model("gpt2", tmp_path / "gpt2", minilm_tokenizer)
    result = run("quantize", source, "--rotate", "hadamard", "--out", tmp_path / "x", "--no-eval", *FAST)
    assert result.exit_code == 2 and "--rotate hadamard cannot rotate GPT2LMHeadModel" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_cli_refuses_a_pruned_input(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "pruned"
    assert run("prune", tiny_llama_dir, "--pattern", "2:4", "--format", "dense", "--out", pruned, "-q", "--no-eval").exit_code == 0
    result = run("quantize", pruned, "--rotate", "hadamard", "--out", tmp_path / "x", "--no-eval", *FAST)
    assert result.exit_code == 2 and "pruned model (2:4)" in result.stderr and "--rotate" in result.stderr, result.output


def test_recipe_key(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - quantize: {bits: 4, mode: per-group, group_size: 32, rotate: hadamard, rotate_seed: 2}\n")
    plan_recipe(load_recipe(recipe), str(tiny_llama_dir))
    recipe.write_text("stages:\n  - quantize:\n      rotate: quarot\n")
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(recipe), str(tiny_llama_dir))
    assert any(p.startswith(f"{recipe}:2:") and "rotate:" in p for p in caught.value.problems), caught.value.problems


def test_recipe_plan_refuses_an_architecture_that_does_not_fit(tmp_path: Path, minilm_tokenizer) -> None:
    """``squeeze run --dry-run`` (plan_recipe) says so from the meta model, as the pass would."""
    source = save_tiny_model("gpt2", tmp_path / "gpt2", minilm_tokenizer)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - quantize: {bits: 8, format: bnb-int8, rotate: hadamard}\n")
    with pytest.raises(SqueezeError) as caught:
        plan_recipe(load_recipe(recipe), str(source))
    assert "cannot rotate GPT2LMHeadModel" in str(caught.value), caught.value


@pytest.mark.parametrize("args", [
    ["--method", "gptq", "--bits", "4", "--group-size", "32", "--mode", "per-group"],
    ["--method", "awq", "--group-size", "32", "--awq-grid", "3"],
    ["--method", "smoothquant", "--act", "per-token"],
    ["--method", "hqq", "--bits", "4", "--group-size", "32", "--hqq-iterations", "2"],
    ["--bits", "4", "--group-size", "32", "--mode", "per-group", "--format", "gptq"],
    ["--bits", "8", "--format", "bnb-int8"],
    ["--format", "bnb-nf4"],
])
def test_every_method_and_format_runs_on_a_rotated_model(args: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The rotation changes weight values, norms and the head only: every method and format takes the result."""
    out = tmp_path / "m"
    result = run("quantize", tiny_llama_dir, "--rotate", "hadamard", *args, "--calib-samples", "4", "--out", out, "--json", "-q", "--no-eval", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["rotate"] == "hadamard"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
