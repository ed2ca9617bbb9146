"""The prune pass on a tiny Llama: options validated early, exact sparsity, Wanda block by block."""

from pathlib import Path

import pytest
import torch
import transformers

from squeeze.errors import OptionError, SqueezeError, cli_spelling, in_words
from squeeze.prune.apply import PruneConfig, plan_prune, prune_model
from squeeze.prune.masks import is_n_m


def load(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 1000, (2, 16), generator=g)} for _ in range(2)]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sparsity=1.0), "sparsity must be in [0, 1)"),
        (dict(sparsity=-0.1), "sparsity must be in [0, 1)"),
        (dict(pattern="2:4", sparsity=0.6), "pattern 2:4 removes 0.5"),
        (dict(pattern="2:4", scope="global"), "--scope global does not apply"),
        (dict(method="wanda", scope="global"), "Wanda compares weights within each output row"),
        (dict(method="obs"), "unknown pruning method"),
        (dict(scope="model"), "unknown scope"),
        (dict(format="csr"), "unknown sparse checkpoint format"),
        (dict(sparsity=0.5, sparsity_ramp=0.6), "sparsity - ramp"),
        (dict(sparsity=0.8, sparsity_ramp=0.3), "sparsity + ramp"),
        (dict(pattern="2:4", layer_sparsity=(("*.q_proj", 0.3),)), "either 0.5 sparse or dense"),
        (dict(layer_sparsity=(("*.q_proj", 1.5),)), "sparsity of '*.q_proj' must be in [0, 1)"),
    ],
)
def test_bad_configs(options: dict, message: str) -> None:
    with pytest.raises(SqueezeError) as error:
        PruneConfig(**options)
    assert message in in_words(error.value, cli_spelling)


def test_pattern_sets_the_sparsity() -> None:
    assert PruneConfig(pattern="2:4").sparsity == 0.5
    assert PruneConfig(pattern="1:4").sparsity == 0.75
    assert PruneConfig().sparsity == 0.5


def test_n_m_needs_m_to_divide_the_inputs(tiny_llama_dir: Path) -> None:
    with pytest.raises(SqueezeError, match="divisible by 48"):
        plan_prune(load(tiny_llama_dir), PruneConfig(pattern="2:48"))


def test_per_layer_rules(tiny_llama_dir: Path) -> None:
    model = load(tiny_llama_dir)
    config = PruneConfig(sparsity=0.5, sparsity_ramp=0.2, layer_sparsity=(("*.mlp.*", 0.3), ("model.layers.1.mlp.down_proj", 0.0)))
    plan = {name: sparsity for name, (_, sparsity) in plan_prune(model, config).items()}
    assert plan["model.layers.0.self_attn.q_proj"] == pytest.approx(0.3)  # ramp: first block 0.5 - 0.2
    assert plan["model.layers.1.self_attn.q_proj"] == pytest.approx(0.7)  # last block 0.5 + 0.2
    assert plan["model.layers.0.mlp.up_proj"] == 0.3
    assert plan["model.layers.1.mlp.down_proj"] == 0.0
    result = prune_model(model, config)
    assert result.dense == ["model.layers.1.mlp.down_proj"]
    assert (model.model.layers[1].mlp.down_proj.weight != 0).all()
    with pytest.raises(SqueezeError, match="matches no targeted layer"):
        plan_prune(model, PruneConfig(layer_sparsity=(("*.no_such", 0.1),)))


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_magnitude_per_layer_is_exact(tiny_llama_dir: Path, sparsity: float) -> None:
    model, original = load(tiny_llama_dir), load(tiny_llama_dir)
    result = prune_model(model, PruneConfig(sparsity=sparsity))
    assert len(result.layers) == 14
    for layer in result.layers:
        weight = model.get_submodule(layer.name).weight
        before = original.get_submodule(layer.name).weight
        assert layer.zeros == int((weight == 0).sum()) == round(sparsity * weight.numel())
        assert not torch.signbit(weight[weight == 0]).any()  # +0.0, not -0.0
        kept = weight != 0
        assert torch.equal(weight[kept], before[kept])  # survivors untouched
        assert before[~kept].abs().max() <= before[kept].abs().min()
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # ignored by default


def test_magnitude_global_ranks_all_layers_together(tiny_llama_dir: Path) -> None:
    model, original = load(tiny_llama_dir), load(tiny_llama_dir)
    result = prune_model(model, PruneConfig(sparsity=0.5, scope="global"))
    zeros = sum(layer.zeros for layer in result.layers)
    total = sum(layer.numel for layer in result.layers)
    assert zeros == round(0.5 * total)
    pruned = torch.cat([original.get_submodule(l.name).weight[model.get_submodule(l.name).weight == 0].abs() for l in result.layers])
    kept = torch.cat([model.get_submodule(l.name).weight[model.get_submodule(l.name).weight != 0].abs() for l in result.layers])
    assert pruned.max() <= kept.min()
    assert len({round(l.sparsity, 3) for l in result.layers}) > 1  # layers end up unequally sparse


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_holds_everywhere(tiny_llama_dir: Path, method: str) -> None:
    model = load(tiny_llama_dir)
    result = prune_model(model, PruneConfig(method=method, pattern="2:4"), batches())
    for layer in result.layers:
        weight = model.get_submodule(layer.name).weight
        assert is_n_m(weight, 2, 4) and layer.sparsity == 0.5


def test_wanda_prunes_each_row_and_differs_from_magnitude(tiny_llama_dir: Path) -> None:
    wanda, magnitude = load(tiny_llama_dir), load(tiny_llama_dir)
    prune_model(wanda, PruneConfig(method="wanda", sparsity=0.5), batches())
    prune_model(magnitude, PruneConfig(sparsity=0.5))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        weight = wanda.get_submodule(name).weight
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()
    # layer 1 sees layer 0's pruned output; in any case the activation weighting changes the choice
    assert not torch.equal(wanda.model.layers[1].mlp.down_proj.weight == 0, magnitude.model.layers[1].mlp.down_proj.weight == 0)


def test_wanda_needs_calibration(tiny_llama_dir: Path) -> None:
    with pytest.raises(SqueezeError, match="needs calibration text"):
        prune_model(load(tiny_llama_dir), PruneConfig(method="wanda"), [])


def test_a_head_tied_to_the_embeddings_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(SqueezeError, match="shares its weight with the input embeddings"):
        plan_prune(load(tiny_llama_dir), PruneConfig(ignore=()))


def test_sparsegpt_true_sequential_recalibrates_later_layers(tiny_llama_dir: Path) -> None:
    """q/k/v see the same inputs either way; o_proj's change once q/k/v are pruned; every layer is
    still pruned to its target."""
    weights = {}
    for true_sequential in (True, False):
        model = load(tiny_llama_dir)
        config = PruneConfig(method="sparsegpt", sparsity=0.5, options={"block_size": 32, "true_sequential": true_sequential})
        result = prune_model(model, config, batches())
        assert len(result.layers) == 14 and all(layer.sparsity == pytest.approx(0.5, abs=1e-9) for layer in result.layers)
        attention = model.model.layers[0].self_attn
        weights[true_sequential] = (attention.q_proj.weight.clone(), attention.o_proj.weight.clone())
    assert torch.equal(weights[True][0], weights[False][0])
    assert not torch.equal(weights[True][1], weights[False][1])


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_pass(tiny_llama_dir: Path, pattern) -> None:
    model, original = load(tiny_llama_dir), load(tiny_llama_dir)
    result = prune_model(model, PruneConfig(method="sparsegpt", sparsity=None if pattern else 0.5, pattern=pattern, options={"block_size": 32}), batches())
    assert len(result.layers) == 14
    for layer in result.layers:
        weight = model.get_submodule(layer.name).weight
        assert layer.zeros == int((weight == 0).sum()) and layer.sparsity == pytest.approx(0.5, abs=1e-9)
        assert 0 < layer.output_error < 1 and layer.relative_error > 0
        if pattern:
            assert is_n_m(weight, 2, 4)
    # survivors move to make up for the pruned weights (unlike Wanda)
    name = result.layers[0].name
    kept = model.get_submodule(name).weight != 0
    assert not torch.equal(model.get_submodule(name).weight[kept], original.get_submodule(name).weight[kept])
    with pytest.raises(OptionError) as error:
        PruneConfig(method="sparsegpt", scope="global")
    assert "--scope global is for magnitude" in error.value.render(cli_spelling)
