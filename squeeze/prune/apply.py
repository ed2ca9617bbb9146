"""The prune pass as a library call: plan each layer's sparsity, then prune with the config's method.

Magnitude pruning needs no data; Wanda and SparseGPT run calibration text through the model one
transformer block at a time (the pipeline GPTQ uses), pruning each block before its outputs feed
the next. Pruned weights are set to exactly +0.0 in place; the layers stay ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from squeeze.calib.blocks import block_stacks
from squeeze.calib.targets import check_patterns, matches, select_linears
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.prune.config import PruneConfig
from squeeze.prune.layers import Plan, PruneResult
from squeeze.prune.methods import PRUNE_METHODS

__all__ = ["PruneConfig", "PruneResult", "plan_prune", "prune_model"]


def plan_prune(model: nn.Module, config: PruneConfig) -> Plan:
    """Each targeted layer and the sparsity it gets; validates patterns and N:M divisibility
    (cheap: run it on the meta model before loading weights)."""
    layers = select_linears(model, config.targets, config.ignore)
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.device.type != "meta"}
    tied = [name for name, layer in layers.items() if layer.weight.device.type != "meta" and layer.weight.data_ptr() in embeddings]
    if tied:
        raise SqueezeError(
            f"{', '.join(tied)} shares its weight with the input embeddings (tied); pruning it would prune the "
            "embeddings too: leave it out (it is ignored by default) or untie the weights first"
        )
    if config.n_m is not None:
        m = config.n_m[1]
        bad = {name: layer.in_features for name, layer in layers.items() if layer.in_features % m}
        if bad:
            shown = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise SqueezeError(
                f"pattern {config.pattern} needs input dimensions divisible by {m}; "
                f"{shown} ha{'s' if len(bad) == 1 else 've'} {', '.join(map(str, sorted(set(bad.values()))))}"
            )
    check_patterns(pattern for pattern, _ in config.layer_sparsity)
    for layer_pattern, _ in config.layer_sparsity:
        if not any(matches(name, layer_pattern) for name in layers):
            example = next(iter(layers))
            raise OptionError(
                f"{{0}} pattern {literal(repr(layer_pattern))} matches no targeted layer (names look like {literal(repr(example))})",
                "layer_sparsity",
            )
    depth = _block_depth(model, list(layers)) if config.sparsity_ramp else {}
    plan = {}
    for name, layer in layers.items():
        sparsity = config.sparsity
        if name in depth:
            index, count = depth[name]
            sparsity += config.sparsity_ramp * (2 * index / max(count - 1, 1) - 1)
        for layer_pattern, value in config.layer_sparsity:
            if matches(name, layer_pattern):
                sparsity = value
        plan[name] = (layer, float(sparsity))
    return plan


def _block_depth(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """(block index, block count) of every layer inside the transformer blocks (of its own stack,
    in an encoder-decoder)."""
    depth = {}
    for prefix, blocks in block_stacks(model):
        for name in names:
            if name.startswith(prefix + "."):
                depth[name] = (int(name[len(prefix) + 1 :].split(".")[0]), len(blocks))
    return depth


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: PruneConfig,
    batches: list[dict[str, torch.Tensor]] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with ``config.method``. ``batches`` are the calibration inputs
    (``model(**batch)``) of the methods that read text; ``on_step`` is called per layer or per
    block (``PRUNE_METHODS.get(config.method).steps`` says how often)."""
    method = PRUNE_METHODS.get(config.method)
    plan = plan_prune(model, config)
    dense = [name for name, (_, sparsity) in plan.items() if sparsity == 0]
    plan = {name: entry for name, entry in plan.items() if entry[1] > 0}
    if method.needs_calibration and not batches:
        raise SqueezeError(f"{config.method} measures the layers' input activations: it needs calibration text")
    result = method.run(model, config, plan, batches, on_step)
    result.dense = dense
    order = {name: i for i, name in enumerate(plan)}
    result.layers.sort(key=lambda layer: order[layer.name])
    return result
