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
from squeeze.quant.smoothquant import fold_smoothing, smoothing_factors, smoothing_groups


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
    for layer in model.model.layers:
        groups = smoothing_groups(layer)
        assert [g.norm for g in groups] == ["input_layernorm", "post_attention_layernorm"]
        for group in groups:
            linears = [layer.get_submodule(n) for n in group.linears]
            act = torch.rand(linears[0].in_features) * 10
            fold_smoothing(layer.get_submodule(group.norm), linears, smoothing_factors(act, [m.weight for m in linears], alpha))
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


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
    # q/k/v, gate/up and down in both blocks; v -> o is skipped (grouped-query attention), and said so
    assert len(result.layers) == 14 and any("smoothed 12 of 14" in n for n in result.notes)
    assert any("v_proj -> self_attn.o_proj" in n and "grouped-query" in n for n in result.notes)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_every_fold_keeps_the_output(tiny_llama_dir: Path, kv_heads: int) -> None:
    """norm -> q/k/v, v -> o (when every head has its own values), norm -> gate/up, up -> down."""
    import transformers

    from squeeze.quant.awq import fold_groups, fold_scales

    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    config.num_key_value_heads = kv_heads
    model = transformers.LlamaForCausalLM(config).eval()
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        for layer in model.model.layers:
            groups, _ = fold_groups(layer)
            expected = 4 if kv_heads == config.num_attention_heads else 3
            assert len(groups) == expected
            for group in groups:
                linears = [layer.get_submodule(n) for n in group.linears]
                act = torch.rand(linears[0].in_features) * 10
                fold_scales(layer.get_submodule(group.prev), linears, smoothing_factors(act, [m.weight for m in linears], 0.5))
        after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_post_norm_encoder_cannot_be_folded(tiny_bert_dir: Path) -> None:
    model = transformers.AutoModel.from_pretrained(tiny_bert_dir).eval()
    config = QuantizeConfig(scheme=scheme_from_options(bits=8, act="per-token"), method="smoothquant")
    for check in (plan_quantize, lambda m, c: quantize_model(m, c, [{"input_ids": ids()}])):
        with pytest.raises(OptionError) as error:
            check(model, config)
        assert re.search(r"cannot fold into encoder.layer.0 .*--smooth-fallback", error.value.render(cli_spelling))
    fallback = QuantizeConfig(scheme=config.scheme, method="smoothquant", options={"smooth_fallback": True})
    result = quantize_model(model, fallback, [{"input_ids": ids()}])
    assert any("without smoothing" in n for n in result.notes)


def test_smoothquant_needs_quantized_activations() -> None:
    with pytest.raises(OptionError, match="SmoothQuant is for W8A8") as error:
        QuantizeConfig(scheme=scheme_from_options(bits=8), method="smoothquant")
    assert "add --act per-token" in error.value.render(cli_spelling)
