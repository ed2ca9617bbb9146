"""The prune pass: a frozen config and a function that zeroes weights of a model's Linear layers.

Magnitude pruning needs no data; Wanda and SparseGPT run calibration text through the model one
transformer block at a time (the pipeline GPTQ uses), pruning each block before its outputs feed
the next.
Pruned weights are set to exactly +0.0 in place; the layers stay ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.prune.masks import global_threshold, n_m_mask, parse_pattern, row_mask, threshold_masks, unstructured_mask
from squeeze.quant.targets import DEFAULT_IGNORE, check_patterns, matches, select_linears

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("layer", "global")
FORMATS = ("sparse-bitmask", "dense")
DEFAULT_SPARSITY = 0.5


def _check_fraction(what: str, value: float) -> None:
    if not 0 <= value < 1:
        raise SqueezeError(f"{what} must be in [0, 1), got {value:g}")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``targets``/``ignore`` are module-name patterns (globs or ``re:``).

    ``sparsity`` is the share of weights removed per layer (default 0.5; an N:M ``pattern`` fixes
    it at ``1 - N/M``). ``layer_sparsity`` overrides it for layers matching a pattern (the last
    matching entry wins; 0 leaves a layer dense). ``sparsity_ramp`` is a rule over depth: the
    sparsity of block ``i`` of ``L`` is ``sparsity + ramp · (2i/(L-1) - 1)``, so the first block
    loses ``ramp`` less, the last ``ramp`` more, and the mean stays ``sparsity``.
    """

    method: str = "magnitude"  # one of METHODS
    sparsity: float | None = None
    pattern: str | None = None  # N:M, e.g. "2:4"
    scope: str = "layer"  # magnitude: rank weights per layer, or across all targeted layers at once
    layer_sparsity: tuple[tuple[str, float], ...] = ()
    sparsity_ramp: float = 0.0
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    format: str = "sparse-bitmask"  # one of FORMATS
    block_size: int = 128  # SparseGPT: columns whose mask is chosen together and updated lazily
    damp_percent: float = 0.01  # SparseGPT: added to the Hessian's diagonal, as a fraction of its mean

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SqueezeError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise SqueezeError(f"unknown scope {self.scope!r}; choose one of: {', '.join(SCOPES)}")
        if self.format not in FORMATS:
            raise SqueezeError(f"unknown sparse checkpoint format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        sparsity = self.sparsity
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            implied = 1 - n / m
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise SqueezeError(f"pattern {self.pattern} removes {implied:g} of the weights; drop --sparsity or set it to {implied:g}")
            sparsity = implied
            if self.scope == "global":
                raise SqueezeError(f"an N:M pattern ({self.pattern}) is decided inside each group of {m} weights; --scope global does not apply")
            if self.sparsity_ramp:
                raise SqueezeError(f"an N:M pattern ({self.pattern}) fixes the sparsity of every layer; a sparsity ramp does not apply")
            for layer_pattern, value in self.layer_sparsity:
                if value not in (0, implied):
                    raise SqueezeError(
                        f"with pattern {self.pattern} a layer is either {implied:g} sparse or dense (0); "
                        f"got {value:g} for {layer_pattern!r}"
                    )
        sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
        _check_fraction("sparsity", sparsity)
        object.__setattr__(self, "sparsity", float(sparsity))
        if self.method == "wanda" and self.scope == "global":
            raise SqueezeError("Wanda compares weights within each output row; --scope global is for magnitude pruning")
        if self.method == "sparsegpt" and self.scope == "global":
            raise SqueezeError("SparseGPT chooses its mask block by block inside each layer; --scope global is for magnitude pruning")
        if self.block_size < 1:
            raise SqueezeError(f"SparseGPT block size must be positive, got {self.block_size}")
        if not 0 < self.damp_percent <= 1:
            raise SqueezeError(f"damp percent must be in (0, 1], got {self.damp_percent:g}")
        if self.sparsity_ramp < 0:
            raise SqueezeError(f"sparsity ramp must be non-negative, got {self.sparsity_ramp:g}")
        if self.sparsity_ramp:
            _check_fraction(f"sparsity - ramp ({sparsity:g} - {self.sparsity_ramp:g})", sparsity - self.sparsity_ramp)
            _check_fraction(f"sparsity + ramp ({sparsity:g} + {self.sparsity_ramp:g})", sparsity + self.sparsity_ramp)
            if self.scope == "global":
                raise SqueezeError("a sparsity ramp sets each layer's sparsity; --scope global ranks all layers together")
        for layer_pattern, value in self.layer_sparsity:
            _check_fraction(f"sparsity of {layer_pattern!r}", value)

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    @property
    def structure(self) -> str:
        """compressed-tensors' name for the sparsity structure: ``unstructured`` or ``N:M``."""
        return self.pattern or "unstructured"


@dataclass(frozen=True)
class LayerSparsity:
    """What pruning did to one layer."""

    name: str
    shape: tuple[int, int]
    target: float  # the sparsity asked for
    zeros: int  # weights exactly zero afterwards (pruned ones and any that were zero before)
    relative_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    max_abs_error: float  # the largest |w − ŵ| (magnitude, Wanda: the largest weight removed)
    output_error: float | None = None  # SparseGPT: ‖(W − Ŵ)X‖_F / ‖WX‖_F on the calibration inputs

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class PruneResult:
    layers: list[LayerSparsity]
    dense: list[str]  # targeted layers left dense (sparsity 0 by a per-layer rule)
    notes: list[str] = field(default_factory=list)
    calibration_s: float = 0.0


def plan_prune(model: nn.Module, config: PruneConfig) -> dict[str, tuple[nn.Linear, float]]:
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
            raise SqueezeError(f"--layer-sparsity pattern {layer_pattern!r} matches no targeted layer (names look like {next(iter(layers))!r})")
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
    """(block index, block count) of every layer inside the transformer blocks."""
    from squeeze.quant.sequential import block_list

    prefix, blocks = block_list(model)
    depth = {}
    for name in names:
        if name.startswith(prefix + "."):
            depth[name] = (int(name[len(prefix) + 1 :].split(".")[0]), len(blocks))
    return depth


def _apply_mask(name: str, linear: nn.Linear, keep: torch.Tensor, target: float) -> LayerSparsity:
    weight = linear.weight.data
    original_norm = weight.float().norm()
    removed = weight.float().masked_fill(keep, 0)
    removed_norm, max_pruned = removed.norm(), removed.abs().max()
    weight.masked_fill_(~keep, 0.0)  # +0.0: a multiply would leave -0.0 for negative weights
    return LayerSparsity(
        name=name,
        shape=(linear.out_features, linear.in_features),
        target=target,
        zeros=int((weight == 0).sum()),
        relative_error=float(removed_norm / original_norm.clamp_min(1e-30)),
        max_abs_error=float(max_pruned),
    )


def _layer_mask(scores: torch.Tensor, sparsity: float, config: PruneConfig, per_row: bool) -> torch.Tensor:
    if config.n_m is not None:
        return n_m_mask(scores, *config.n_m)
    return row_mask(scores, sparsity) if per_row else unstructured_mask(scores, sparsity)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: PruneConfig,
    batches: list[dict[str, torch.Tensor]] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place. Magnitude pruning calls ``on_step`` per layer; Wanda runs the
    calibration ``batches`` one block at a time and calls it per block."""
    plan = plan_prune(model, config)
    dense = [name for name, (_, sparsity) in plan.items() if sparsity == 0]
    plan = {name: entry for name, entry in plan.items() if entry[1] > 0}
    if config.needs_calibration:
        if not batches:
            raise SqueezeError(f"{config.method} measures the layers' input activations: it needs calibration text")
        result = _prune_calibrated(model, config, plan, batches, on_step)
    else:
        result = PruneResult(layers=_prune_magnitude(config, plan, on_step), dense=[])
    result.dense = dense
    order = {name: i for i, name in enumerate(plan)}
    result.layers.sort(key=lambda layer: order[layer.name])
    return result


def _prune_magnitude(
    config: PruneConfig, plan: dict[str, tuple[nn.Linear, float]], on_step: Callable[[str], None] | None
) -> list[LayerSparsity]:
    done: list[LayerSparsity] = []
    if config.scope == "global":
        # layers a per-layer rule gave their own sparsity are ranked alone; the rest share one threshold
        own = {name for name, _ in plan.items() if any(matches(name, p) for p, _ in config.layer_sparsity)}
        pool = [name for name in plan if name not in own]
        scores = [plan[name][0].weight.detach().float().abs() for name in pool]
        threshold, ties = global_threshold(scores, config.sparsity)
        for name, keep in zip(pool, threshold_masks(scores, threshold, ties)):
            done.append(_apply_mask(name, plan[name][0], keep, config.sparsity))
            if on_step:
                on_step(name)
        del scores
        plan = {name: plan[name] for name in own}
    for name, (linear, sparsity) in plan.items():
        keep = _layer_mask(linear.weight.detach().float().abs(), sparsity, config, per_row=False)
        done.append(_apply_mask(name, linear, keep, sparsity))
        if on_step:
            on_step(name)
    return done


def _prune_calibrated(
    model: nn.Module,
    config: PruneConfig,
    plan: dict[str, tuple[nn.Linear, float]],
    batches: list[dict[str, torch.Tensor]],
    on_block: Callable[[str], None] | None,
) -> PruneResult:
    """Wanda or SparseGPT, one transformer block at a time; each block's pruned outputs feed the next."""
    from squeeze.quant.sequential import calibrate_sequentially

    done: list[LayerSparsity] = []
    notes: list[str] = []
    prune_layers = _wanda_block if config.method == "wanda" else _sparsegpt_block

    def prune_block(block_name: str, block: nn.Module, inputs) -> None:
        targets = {name: plan[name][0] for name in plan if name.startswith(block_name + ".")}
        prune_layers(block, inputs, targets, plan, config, done, notes)

    calibration_s = calibrate_sequentially(model, batches, prune_block, on_block)
    # a targeted layer no block's forward called (or one outside the blocks) has no statistics
    leftover = {name: entry for name, entry in plan.items() if name not in {layer.name for layer in done}}
    if leftover:
        done.extend(_prune_magnitude(config, leftover, None))
        notes.append(f"magnitude pruning for {len(leftover)} layer(s) no block ran on calibration text: {', '.join(leftover)}")
    return PruneResult(layers=done, dense=[], notes=notes, calibration_s=calibration_s)


def _wanda_block(block, inputs, targets, plan, config: PruneConfig, done: list[LayerSparsity], notes: list[str]) -> None:
    from squeeze.prune.wanda import InputNormAccumulator, wanda_scores
    from squeeze.quant.sequential import run_block_observed

    norms: dict[str, InputNormAccumulator] = {}

    def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name not in norms:
            norms[name] = InputNormAccumulator(module.in_features, x.device)
        norms[name].add(x)

    run_block_observed(block, inputs, targets, observe)
    for name, linear in targets.items():
        if name in norms:
            keep = _layer_mask(wanda_scores(linear.weight, norms[name].norms), plan[name][1], config, per_row=True)
            done.append(_apply_mask(name, linear, keep, plan[name][1]))


def _sparsegpt_block(block, inputs, targets, plan, config: PruneConfig, done: list[LayerSparsity], notes: list[str]) -> None:
    from squeeze.prune.sparsegpt import sparsegpt_prune
    from squeeze.quant.apply import observe_hessians
    from squeeze.quant.gptq import relative_output_error

    # one pass over the block as it is: layers reading the same input share one Hessian
    accumulators, _, _ = observe_hessians(block, inputs, targets)
    for name, linear in targets.items():
        if name not in accumulators:
            continue
        hessian = accumulators[name].hessian
        try:
            solved = sparsegpt_prune(linear.weight, hessian, plan[name][1], config.n_m, config.block_size, config.damp_percent)
        except ArithmeticError as exc:
            raise SqueezeError(f"SparseGPT failed on {name}: {exc}; use more calibration text or a larger --damp-percent") from None
        if solved.retries:
            notes.append(f"SparseGPT raised the damping of {name} to {solved.damp:g} after {solved.retries} failed factorisation(s)")
        original = linear.weight.detach().float()
        diff = solved.weight.to(original.device) - original
        output_error = relative_output_error(diff, original, hessian)
        linear.weight.data.copy_(solved.weight)
        done.append(
            LayerSparsity(
                name=name,
                shape=(linear.out_features, linear.in_features),
                target=plan[name][1],
                zeros=int((linear.weight == 0).sum()),
                relative_error=float(diff.norm() / original.norm().clamp_min(1e-30)),
                max_abs_error=float(diff.abs().max()),
                output_error=output_error,
            )
        )
