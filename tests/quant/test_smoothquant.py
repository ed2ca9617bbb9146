"""SmoothQuant: smoothing alone leaves the model's function unchanged; with outliers it beats plain W8A8."""

import copy
import re
from pathlib import Path

import pytest
import torch
import transformers

from squeeze.errors import OptionError, cli_spelling
from squeeze.evaluate import compare_causal
from squeeze.quant.apply import QuantizeConfig, plan_quantize, quantize_model
from squeeze.quant.scheme import scheme_from_options
from squeeze.calib.folds import find_folds, fold_scales
from squeeze.calib.pipeline import capture_block_inputs
from squeeze.quant.rtn import fake_quantize
from squeeze.quant.smoothquant import alpha_search, smoothing_factors


def llama_with_outliers(folder: Path) -> torch.nn.Module:
    """The tiny Llama with a few activation channels 40x larger than the rest, like real LLMs have."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[[3, 17, 40]] *= 40
    return model


def ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, length), generator=torch.Generator().manual_seed(seed))


def test_factors_follow_the_formula() -> None:
    act = torch.tensor([4.0, 1.0, 0.0])
    w1 = torch.tensor([[1.0, -2.0, 1.0], [0.5, 1.0, 1.0]])
    w2 = torch.tensor([[-4.0, 1.0, 1.0]])
    s = smoothing_factors(act, [w1, w2], alpha=0.5)
    # column maxima of |W| over both layers: 4, 2, 1
    assert torch.allclose(s[:2], torch.tensor([(4.0 ** 0.5) / (4.0 ** 0.5), (1.0 ** 0.5) / (2.0 ** 0.5)]))
    assert s[2] == 1.0  # a channel that never fires is left alone


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_alone_keeps_the_output(tiny_llama_dir: Path, alpha: float) -> None:
    model = llama_with_outliers(tiny_llama_dir)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    calls = capture_block_inputs(model, [{"input_ids": x}])
    for index, layer in enumerate(model.model.layers):
        hidden = calls.first[0][0] if index == 0 else layer_input
        found = find_folds(layer, hidden, calls.for_block(index)[0])
        with torch.no_grad():
            layer_input = layer(hidden, **calls.for_block(index)[0])
        norms = [f for f in found.folds if f.kind == "norm"]
        assert [f.prev for f in norms] == ["input_layernorm", "post_attention_layernorm"]
        for fold in found.folds:
            linears = [layer.get_submodule(n) for n in fold.linears]
            act = torch.rand(linears[0].in_features) * 10
            fold_scales(layer.get_submodule(fold.prev), linears, smoothing_factors(act, [m.weight for m in linears], alpha), fold.kind)
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_alpha_search_never_loses_to_no_smoothing_or_a_fixed_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, [3, 20]] *= 50  # outlier channels
    weights = [torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g) * 0.05]
    scheme = scheme_from_options(bits=8, act="per-token")
    act_max = x.abs().amax(dim=0)

    def error(factors: torch.Tensor) -> float:
        xq = fake_quantize(x / factors, scheme.input_activations)
        return sum(float((x @ w.T - xq @ fake_quantize(w * factors, scheme.weights).T).square().sum()) for w in weights)

    factors, alpha, best = alpha_search(x, act_max, weights, scheme.weights, scheme.input_activations, (0.2, 0.5, 0.8))
    assert alpha in (0.2, 0.5, 0.8)  # with outliers some smoothing helps
    assert best == pytest.approx(error(factors), rel=1e-5)
    assert best <= error(torch.ones(64)) and all(best <= error(smoothing_factors(act_max, weights, a)) for a in (0.2, 0.5, 0.8))
    # no smoothing is always a candidate: with no alphas to try, the factors are ones
    plain = torch.randn(512, 64, generator=g)
    factors, alpha, _ = alpha_search(plain, plain.abs().amax(dim=0), weights, scheme.weights, scheme.input_activations, ())
    assert alpha is None and torch.equal(factors, torch.ones(64))


def test_alpha_search_beats_plain_w8a8_and_says_what_it_chose(tiny_llama_dir: Path) -> None:
    original = llama_with_outliers(tiny_llama_dir)
    scheme = scheme_from_options(bits=8, act="per-token")
    plain = copy.deepcopy(original)
    quantize_model(plain, QuantizeConfig(scheme=scheme))
    searched = copy.deepcopy(original)
    config = QuantizeConfig(scheme=scheme, method="smoothquant", options={"alpha_search": True})
    result = quantize_model(searched, config, [{"input_ids": ids(seed=1)}])
    evaluation = ids(seed=2)
    assert compare_causal(searched, evaluation, original).kl_divergence < 0.7 * compare_causal(plain, evaluation, original).kl_divergence
    assert any(re.search(r"alpha searched per fold: [0-9.]+ to [0-9.]+, median [0-9.]+", n) for n in result.notes), result.notes


def test_smoothquant_beats_plain_w8a8_with_outliers(tiny_llama_dir: Path) -> None:
    original = llama_with_outliers(tiny_llama_dir)
    scheme = scheme_from_options(bits=8, act="per-token")
    plain = copy.deepcopy(original)
    quantize_model(plain, QuantizeConfig(scheme=scheme))
    smooth = copy.deepcopy(original)
    result = quantize_model(smooth, QuantizeConfig(scheme=scheme, method="smoothquant"), [{"input_ids": ids(seed=1)}])
    evaluation = ids(seed=2)
    kl_plain = compare_causal(plain, evaluation, original).kl_divergence
    kl_smooth = compare_causal(smooth, evaluation, original).kl_divergence
    assert kl_smooth < 0.7 * kl_plain
    # q/k/v, gate/up and down in both blocks; o_proj has no exact fold (grouped-query attention)
    assert len(result.layers) == 14 and any("smoothed 12 of 14" in n for n in result.notes)
    assert "SmoothQuant folded mlp.up_proj -> mlp.down_proj (linear) in 2 block(s)" in result.notes
    assert any(n.startswith("SmoothQuant skipped the fold self_attn.q_proj -> self_attn.o_proj in 2 block(s): not exact") for n in result.notes)


def test_post_norm_encoder_folds_only_the_value_path(tiny_bert_dir: Path) -> None:
    """BERT's norms feed the residual too, so they never fold; its value -> output.dense does."""
    model = transformers.AutoModel.from_pretrained(tiny_bert_dir).eval()
    config = QuantizeConfig(scheme=scheme_from_options(bits=8, act="per-token"), method="smoothquant")
    result = quantize_model(model, config, [{"input_ids": ids()}])
    assert "SmoothQuant folded attention.self.value -> attention.output.dense (linear) in 2 block(s)" in result.notes
    assert any(n.startswith("SmoothQuant skipped the fold attention.output.LayerNorm -> intermediate.dense") for n in result.notes)


def test_no_fold_into_the_quantized_layers_is_refused_before_compressing(tiny_llama_dir: Path) -> None:
    """Only o_proj quantized, and grouped-query attention: nothing folds into it in block 0."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = scheme_from_options(bits=8, act="per-token")
    config = QuantizeConfig(scheme=scheme, method="smoothquant", targets=("*.o_proj",))
    plan_quantize(model, config)  # nothing to see before loading: the folds are proven on the weights
    with pytest.raises(OptionError) as error:
        quantize_model(model, config, [{"input_ids": ids()}])
    assert re.search(r"cannot fold into model.layers.0 .*--smooth-fallback", error.value.render(cli_spelling))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fallback = QuantizeConfig(scheme=scheme, method="smoothquant", targets=("*.o_proj",), options={"smooth_fallback": True})
    result = quantize_model(model, fallback, [{"input_ids": ids()}])
    assert any("without smoothing" in n for n in result.notes)


def test_smoothquant_needs_quantized_activations() -> None:
    with pytest.raises(OptionError, match="SmoothQuant is for W8A8") as error:
        QuantizeConfig(scheme=scheme_from_options(bits=8), method="smoothquant")
    assert "add --act per-token" in error.value.render(cli_spelling)
