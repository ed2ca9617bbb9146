"""GPTQ kernel: what the algorithm promises, checked on matrices where the answer is known."""

import pytest
import torch

from squeeze.calib.observers import HessianAccumulator, observe_hessians
from squeeze.calib.pipeline import capture_block_inputs
from squeeze.quant.gptq import gptq_quantize, search_clip
from squeeze.quant.rtn import compute_qparams, dequantize, quantize
from squeeze.quant.scheme import QuantArgs

SCHEMES = [
    QuantArgs(num_bits=4, strategy="channel", scale_dtype="float16"),
    QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
    QuantArgs(num_bits=3, strategy="tensor"),
    QuantArgs(num_bits=8, strategy="channel"),
]


def correlated_inputs(n: int = 1024, dim: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * 0.3 + torch.eye(dim)
    return torch.randn(n, dim, generator=g) @ mix


def weight(out: int = 48, dim: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed))


def test_hessian_accumulates_2_over_n_x_xt_in_any_batching() -> None:
    x = correlated_inputs()
    acc = HessianAccumulator(128)
    for chunk in x.split([100, 400, 524]):
        acc.add(chunk.reshape(2, -1, 128) if chunk.shape[0] % 2 == 0 else chunk)
    assert acc.rows == 1024
    assert torch.allclose(acc.hessian, 2 * x.T @ x / 1024, rtol=1e-4, atol=1e-3)


ORDERS = {"in order": {}, "act-order": {"act_order": True}, "group-aware": {"act_order": True, "group_aware": True}}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("args", SCHEMES, ids=lambda a: a.describe())
def test_uncorrelated_inputs_reduce_to_round_to_nearest(args: QuantArgs, order: str) -> None:
    """With a diagonal Hessian no error is pushed to other columns: GPTQ is exactly RTN, in any order."""
    w = weight()
    hessian = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5)
    solved = gptq_quantize(w, hessian, args, damp_percent=1e-6, **ORDERS[order])
    scale, zero_point = compute_qparams(w, args)
    assert torch.equal(solved.codes, quantize(w, scale, zero_point, args))
    assert torch.equal(solved.scale, scale)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("args", SCHEMES[:3], ids=lambda a: a.describe())
def test_output_error_below_round_to_nearest(args: QuantArgs, order: str) -> None:
    x = correlated_inputs()
    w = weight()
    acc = HessianAccumulator(128)
    acc.add(x)
    solved = gptq_quantize(w, acc.hessian, args, block_size=64, **ORDERS[order])
    scale, zero_point = compute_qparams(w, args)
    w_rtn = dequantize(quantize(w, scale, zero_point, args), scale, zero_point, args, torch.float32)
    w_gptq = dequantize(solved.codes, solved.scale, solved.zero_point, args, torch.float32)
    rtn_error = ((x @ (w - w_rtn).T) ** 2).mean()
    gptq_error = ((x @ (w - w_gptq).T) ** 2).mean()
    assert gptq_error < 0.8 * rtn_error
    assert int(solved.codes.min()) >= args.qmin and int(solved.codes.max()) <= args.qmax
    assert solved.retries == 0 and solved.loss > 0


def test_singular_hessian_raises_the_damping() -> None:
    x = correlated_inputs(n=16)  # 16 samples of 128 dims: H has rank 16
    acc = HessianAccumulator(128)
    acc.add(x)
    hessian = acc.hessian.clone()
    # a slightly indefinite 2x2 corner: small damping cannot fix it, a larger one can
    hessian[0, 1] = hessian[1, 0] = 1.05 * float(torch.sqrt(hessian[0, 0] * hessian[1, 1]))
    solved = gptq_quantize(weight(), hessian, SCHEMES[0], damp_percent=1e-4)
    assert solved.retries > 0 and solved.damp == pytest.approx(1e-4 * 10**solved.retries)


def test_hopeless_hessian_is_reported() -> None:
    hessian = -torch.eye(128)
    with pytest.raises(ArithmeticError, match="not positive definite"):
        gptq_quantize(weight(), hessian, SCHEMES[0])


def test_dead_inputs_give_zero_weights() -> None:
    x = correlated_inputs()
    x[:, 5] = 0
    acc = HessianAccumulator(128)
    acc.add(x)
    solved = gptq_quantize(weight(), acc.hessian, SCHEMES[0])
    w_hat = dequantize(solved.codes, solved.scale, solved.zero_point, SCHEMES[0], torch.float32)
    assert torch.all(w_hat[:, 5] == 0)


def test_true_sequential_recalibrates_later_layers(tiny_llama_dir) -> None:
    """q/k/v see the same inputs either way; o_proj's inputs change once q/k/v are quantized."""
    import transformers

    from squeeze.quant.apply import QuantizeConfig, quantize_model
    from squeeze.quant.scheme import scheme_from_options

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    codes = {}
    for true_sequential in (True, False):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        config = QuantizeConfig(scheme=scheme_from_options(bits=3), method="gptq", options={"true_sequential": true_sequential})
        quantize_model(model, config, [{"input_ids": ids}])
        layer = model.model.layers[0]
        codes[true_sequential] = (layer.self_attn.q_proj.weight_codes, layer.self_attn.o_proj.weight_codes)
    assert torch.equal(codes[True][0], codes[False][0])
    assert not torch.equal(codes[True][1], codes[False][1])


def test_each_layer_gets_the_hessian_of_its_own_inputs(tiny_llama_dir) -> None:
    """q/k/v (one tensor) share a Hessian; every other layer's is 2/n Σ xxᵀ of exactly its inputs,
    even when the allocator hands a later input of the same shape a freed tensor's address."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, [{"input_ids": ids}, {"input_ids": ids.flip(0)}]).first
    block = model.model.layers[0]
    modules = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n, m in modules.items()]
    try:
        accumulators, _, order, _ = observe_hessians(block, inputs, modules)
    finally:
        for h in hooks:
            h.remove()
    assert order[:3] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert accumulators["self_attn.q_proj"] is accumulators["self_attn.v_proj"]
    assert accumulators["mlp.gate_proj"] is accumulators["mlp.up_proj"]
    assert accumulators["mlp.gate_proj"] is not accumulators["self_attn.q_proj"]
    for name, xs in seen.items():
        x = torch.cat(xs).float()
        assert torch.allclose(accumulators[name].hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6), name


def test_observing_the_first_input_only_cuts_each_call_short_with_the_same_hessian(tiny_llama_dir) -> None:
    """True-sequential GPTQ observes one group per pass: q/k/v's Hessian is the full pass's, the
    later layers are not reached (the pass says it was cut short), and a pass whose first group is
    the block's last layer runs to the end."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, [{"input_ids": ids}, {"input_ids": ids.flip(0)}]).first
    block = model.model.layers[0]
    modules = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    full = observe_hessians(block, inputs, modules)
    first = observe_hessians(block, inputs, modules, first_input_only=True)
    assert full.complete and not first.complete
    assert first.order == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert torch.equal(first.accumulators["self_attn.q_proj"].hessian, full.accumulators["self_attn.q_proj"].hessian)
    assert first.accumulators["self_attn.q_proj"].rows == full.accumulators["self_attn.q_proj"].rows
    last = observe_hessians(block, inputs, {"mlp.down_proj": modules["mlp.down_proj"]}, first_input_only=True)
    assert last.complete and last.order == ["mlp.down_proj"]
    assert torch.equal(last.accumulators["mlp.down_proj"].hessian, full.accumulators["mlp.down_proj"].hessian)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("args", SCHEMES[:3], ids=lambda a: a.describe())
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_weights_stay_zero_and_the_rest_still_compensates(args: QuantArgs, order: str, pattern: str) -> None:
    from squeeze.prune.masks import is_n_m, n_m_mask, unstructured_mask

    x = correlated_inputs()
    w = weight()
    keep = n_m_mask(w.abs(), 2, 4) if pattern == "2:4" else unstructured_mask(w.abs(), 0.5)
    w = w * keep
    acc = HessianAccumulator(128)
    acc.add(x)
    solved = gptq_quantize(w, acc.hessian, args, block_size=64, zeros=w == 0, **ORDERS[order])
    w_gptq = dequantize(solved.codes, solved.scale, solved.zero_point, args, torch.float32)
    assert (w_gptq[~keep] == 0).all()
    if pattern == "2:4":
        assert is_n_m(w_gptq, 2, 4)
    scale, zero_point = compute_qparams(w, args)
    w_rtn = dequantize(quantize(w, scale, zero_point, args), scale, zero_point, args, torch.float32)
    assert ((x @ (w - w_gptq).T) ** 2).mean() < ((x @ (w - w_rtn).T) ** 2).mean()
    # without the mask the error updates fill the pruned positions in
    unmasked = gptq_quantize(w, acc.hessian, args, block_size=64, **ORDERS[order])
    assert (dequantize(unmasked.codes, unmasked.scale, unmasked.zero_point, args, torch.float32)[~keep] != 0).any()


def test_group_aware_order_keeps_groups_together_most_energy_first() -> None:
    from squeeze.quant.gptq import _group_aware_order

    diagonal = torch.rand(96, generator=torch.Generator().manual_seed(3))
    order = _group_aware_order(diagonal, 32)
    assert sorted(order.tolist()) == list(range(96))
    groups = order.reshape(3, 32) // 32
    assert (groups == groups[:, :1]).all()  # each run of 32 is one whole group
    maxima = diagonal.reshape(3, 32).amax(dim=1)
    assert maxima[groups[:, 0]].tolist() == sorted(maxima.tolist(), reverse=True)
    for run in order.reshape(3, 32):
        assert diagonal[run].tolist() == sorted(diagonal[run].tolist(), reverse=True)


def test_group_aware_scales_come_from_the_updated_weights() -> None:
    """Static act-order groups take their scales from the original weight; group-aware ones from the
    weight as the earlier columns' errors left it, so they differ where errors moved the weight."""
    x, w = correlated_inputs(), weight()
    acc = HessianAccumulator(128)
    acc.add(x)
    args = SCHEMES[1]
    static = gptq_quantize(w, acc.hessian, args, act_order=True, block_size=64)
    aware = gptq_quantize(w, acc.hessian, args, act_order=True, group_aware=True, block_size=64)
    original, _ = compute_qparams(w, QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32))
    assert torch.equal(static.scale, original)
    assert not torch.equal(aware.scale, original)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_clip_search_never_loses_to_min_max_and_stays_on_the_grid(symmetric: bool, bits: int) -> None:
    """Each row's chosen range has a weighted rounding error no larger than min/max's (which it
    is with 0 steps), and its codes and zero points stay in range."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 64, generator=gen) * torch.rand(64, 1, generator=gen)
    x[:, 3] *= 8  # an outlier column per row: the case clipping exists for
    importance = torch.rand(64, generator=gen)
    args = QuantArgs(num_bits=bits, symmetric=symmetric, strategy="channel")

    def weighted_error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = quantize(x, scale, zero, args)
        assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
        return ((x - dequantize(q, scale, zero, args, torch.float32)) ** 2 * importance).sum(dim=1)

    plain = compute_qparams(x, args)
    off = search_clip(x, importance, args, 0)
    assert torch.equal(off[0], plain[0]) and torch.equal(off[1], plain[1])
    searched = search_clip(x, importance, args, 20)
    base, found = weighted_error(*plain), weighted_error(*searched)
    assert bool((found <= base + 1e-6).all())
    if bits < 8:
        assert float(found.sum()) < float(base.sum())  # the search found improvements
    assert int(searched[1].min()) >= args.qmin and int(searched[1].max()) <= args.qmax


def test_gptq_with_clip_search_keeps_the_layout_and_lowers_the_output_error() -> None:
    x = correlated_inputs()
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    weight[:, :4] *= 6
    hessian = 2 * x.t() @ x / x.shape[0]
    args = QuantArgs(num_bits=4, symmetric=True, strategy="group", group_size=32)
    errors = {}
    for steps in (0, 20):
        result = gptq_quantize(weight, hessian, args, act_order=True, group_aware=True, clip_steps=steps)
        assert result.scale.shape == (32, 4) and result.codes.shape == weight.shape
        diff = dequantize(result.codes, result.scale, result.zero_point, args, torch.float32) - weight
        errors[steps] = float(((diff @ hessian) * diff).sum())
    assert errors[20] < errors[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_refitting_each_tried_range_never_loses_to_the_plain_search(symmetric: bool, bits: int) -> None:
    """A refitted candidate is the least-squares scale of its codes, then rounded again with it:
    each step can only lower the weighted error, so the search can only do better."""
    gen = torch.Generator().manual_seed(10 + bits)
    x = torch.randn(64, 64, generator=gen) * torch.rand(64, 1, generator=gen)
    x[:, 5] *= 6
    importance = torch.rand(64, generator=gen)
    args = QuantArgs(num_bits=bits, symmetric=symmetric, strategy="channel")

    def weighted_error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = quantize(x, scale, zero, args)
        return ((x - dequantize(q, scale, zero, args, torch.float32)) ** 2 * importance).sum(dim=1)

    plain = weighted_error(*search_clip(x, importance, args, 16))
    refitted_scale, refitted_zero = search_clip(x, importance, args, 16, refit=True)
    refitted = weighted_error(refitted_scale, refitted_zero)
    assert bool((refitted <= plain * (1 + 1e-5)).all())
    assert float(refitted.sum()) < float(plain.sum())  # and does, somewhere
    assert int(refitted_zero.min()) >= args.qmin and int(refitted_zero.max()) <= args.qmax
