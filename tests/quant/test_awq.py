"""AWQ: folding keeps the function; the searches never lose to plain RTN; the pass beats RTN with outliers."""

import copy
from pathlib import Path

import pytest
import torch
import transformers

from squeeze.errors import OptionError, cli_spelling
from squeeze.evaluate import compare_causal
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.calib.folds import find_folds, fold_scales
from squeeze.calib.pipeline import capture_block_inputs
from squeeze.quant.awq import apply_clip, awq_clip_search, awq_scale_search
from squeeze.quant.methods import METHODS
from squeeze.quant.rtn import fake_quantize
from squeeze.quant.scheme import QuantArgs, scheme_from_options

W4_G32 = QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
OUTLIERS = [3, 17, 40]


def ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, length), generator=torch.Generator().manual_seed(seed))


def llama(folder: Path, kv_heads: int | None = None, outliers: bool = False) -> torch.nn.Module:
    """The tiny Llama; ``kv_heads=4`` rebuilds it without grouped-query attention so v_proj → o_proj folds."""
    if kv_heads is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    else:
        config = transformers.LlamaConfig.from_pretrained(folder, num_key_value_heads=kv_heads)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    if outliers:  # a few activation channels 40x larger than the rest, like real LLMs have
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.data[OUTLIERS] *= 40
    return model.eval()


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float((x @ weight.T - x @ approx.T).square().sum())


def outlier_inputs(n: int = 1024, width: int = 64) -> torch.Tensor:
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    x[:, OUTLIERS] *= 50
    return x


LLAMA_FOLDS = ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]


def block_folds(model: torch.nn.Module, index: int = 0):
    """The folds proven in block ``index`` of the tiny Llama on one batch."""
    calls = capture_block_inputs(model, [{"input_ids": ids()}])
    hidden, _ = calls.first[0]
    return find_folds(model.model.layers[index], hidden, calls.for_block(index)[0])


def test_folds_skip_grouped_query_attention(tiny_llama_dir: Path) -> None:
    """With grouped-query attention v_proj gives fewer channels than o_proj reads: no fold, not
    even a candidate; with a value head per query head it folds."""
    found = block_folds(llama(tiny_llama_dir))
    assert [f.prev for f in found.folds] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    assert "self_attn.v_proj -> self_attn.o_proj" not in found.skipped
    # the candidates with a nonlinearity between them were tried and refused
    assert set(found.skipped) == {"self_attn.q_proj -> self_attn.o_proj", "mlp.gate_proj -> mlp.down_proj"}
    found = block_folds(llama(tiny_llama_dir, kv_heads=4))
    assert [f.prev for f in found.folds] == LLAMA_FOLDS
    assert found.folds[0].linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@pytest.mark.parametrize("prev", LLAMA_FOLDS)
def test_folding_alone_keeps_the_output(tiny_llama_dir: Path, prev: str) -> None:
    model = llama(tiny_llama_dir, kv_heads=4, outliers=True)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    for index, layer in enumerate(model.model.layers):
        fold = next(f for f in block_folds(model, index).folds if f.prev == prev)
        linears = [layer.get_submodule(n) for n in fold.linears]
        scales = torch.exp(torch.randn(linears[0].in_features, generator=torch.Generator().manual_seed(1)))
        fold_scales(layer.get_submodule(prev), linears, scales, fold.kind)
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("duo_scaling", [False, True])
def test_scale_search_keeps_rtn_when_channels_are_equal(duo_scaling: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (256, 64), generator=generator).float() * 2 - 1  # |x| = 1 everywhere
    weight = torch.randn(32, 64, generator=generator)
    if duo_scaling:  # equal relative magnitudes too, or the weights' term would prefer some columns
        weight = weight.sign() * 0.1
    scales, error, ratio = awq_scale_search(x, [weight], W4_G32, duo_scaling=duo_scaling)
    assert ratio == 0.0 and torch.equal(scales, torch.ones(64))
    assert error == pytest.approx(output_error(x, weight, fake_quantize(weight, W4_G32)), rel=1e-4)


def test_scale_search_beats_rtn_on_outlier_channels() -> None:
    x = outlier_inputs()
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(32, 64, generator=generator), torch.randn(16, 64, generator=generator)]
    rtn = sum(output_error(x, w, fake_quantize(w, W4_G32)) for w in weights)
    scales, error, ratio = awq_scale_search(x, weights, W4_G32)
    assert 0 < ratio < 1 and error < rtn
    assert scales[OUTLIERS].min() > scales.median()  # the loud channels are the protected ones
    # the reported error is the one the definition gives (the search computes it through xᵀx)
    direct = sum(output_error(x, w, fake_quantize(w * scales, W4_G32) / scales) for w in weights)
    assert error == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("args", [W4_G32, QuantArgs(num_bits=3, symmetric=True, strategy="channel")])
def test_clip_search_never_increases_a_group_error(args: QuantArgs) -> None:
    x = outlier_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    group_size = args.group_size or 64

    def group_errors(approx: torch.Tensor) -> torch.Tensor:
        xg = x.unflatten(-1, (-1, group_size))
        delta = (weight - approx).unflatten(-1, (-1, group_size))
        return torch.einsum("ngk,ogk->nog", xg, delta).square().sum(dim=0)

    clip_values = awq_clip_search(x, weight, args)
    max_abs = weight.unflatten(-1, (-1, group_size)).abs().amax(dim=-1)
    assert clip_values.shape == max_abs.shape
    assert (clip_values <= max_abs).all() and (clip_values >= 0.5 * max_abs - 1e-6).all()
    assert (clip_values < max_abs).any()
    clipped = group_errors(fake_quantize(apply_clip(weight, clip_values, args.group_size), args))
    unclipped = group_errors(fake_quantize(weight, args))
    assert (clipped <= unclipped * (1 + 1e-4)).all()
    assert clipped.sum() < unclipped.sum()


def test_awq_beats_rtn_with_outliers(tiny_llama_dir: Path) -> None:
    original = llama(tiny_llama_dir, outliers=True)
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True), method="awq")
    rtn = copy.deepcopy(original)
    quantize_model(rtn, QuantizeConfig(scheme=config.scheme))
    awq = copy.deepcopy(original)
    result = quantize_model(awq, config, [{"input_ids": ids(n=4, length=64, seed=s)} for s in (1, 2)])
    evaluation = ids(n=4, length=64, seed=3)
    kl_rtn = compare_causal(rtn, evaluation, original).kl_divergence
    kl_awq = compare_causal(awq, evaluation, original).kl_divergence
    assert kl_awq < 0.7 * kl_rtn
    assert len(result.layers) == 14 and result.ignored == ["lm_head"]
    assert any(n.startswith("AWQ scaled") for n in result.notes)
    assert any(n.startswith("AWQ folded input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj (norm)") for n in result.notes)
    assert any(n.startswith("AWQ skipped the fold self_attn.q_proj -> self_attn.o_proj in 2 block(s): not exact") for n in result.notes)


def test_awq_is_weight_only(tiny_llama_dir: Path) -> None:
    config = QuantizeConfig(scheme=scheme_from_options(bits=8, act="per-token"))
    with pytest.raises(OptionError, match="AWQ is weight-only") as error:
        METHODS.get("awq").check(config)
    assert "--method smoothquant" in error.value.render(cli_spelling)
    with pytest.raises(OptionError, match="AWQ is weight-only"):
        QuantizeConfig(scheme=config.scheme, method="awq")


def test_post_norm_encoder_folds_no_norm(tiny_bert_dir: Path) -> None:
    """BERT's norms feed the residual too: AWQ never scales through them, and says so."""
    model = transformers.AutoModel.from_pretrained(tiny_bert_dir).eval()
    config = QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True), method="awq")
    result = quantize_model(model, config, [{"input_ids": ids()}])
    assert len(result.layers) == 12
    assert not any(n.startswith("AWQ folded") and "LayerNorm ->" in n for n in result.notes)
    assert any(n.startswith("AWQ skipped the fold attention.output.LayerNorm -> intermediate.dense in 2 block(s)") for n in result.notes)
