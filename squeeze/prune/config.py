"""What a prune pass does, as one frozen value: how much, in which pattern, where, with which method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from squeeze.calib.targets import DEFAULT_IGNORE
from squeeze.errors import OptionError, SqueezeError
from squeeze.formats import PRUNED_FORMATS
from squeeze.options import MethodOptions, as_options
from squeeze.prune.masks import parse_pattern
from squeeze.prune.methods import PRUNE_METHODS

SCOPES = ("layer", "global")
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
    loses ``ramp`` less, the last ``ramp`` more, and the mean stays ``sparsity``. ``method`` names a
    registered method (squeeze.prune.methods.PRUNE_METHODS) and ``options`` holds its own options
    (its Options model, a mapping of them, or None for the defaults).
    """

    method: str = "magnitude"
    sparsity: float | None = None
    pattern: str | None = None  # N:M, e.g. "2:4"
    scope: str = "layer"  # rank weights per layer, or across all targeted layers at once (magnitude)
    layer_sparsity: tuple[tuple[str, float], ...] = ()
    sparsity_ramp: float = 0.0
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    format: str = "sparse-bitmask"  # one of squeeze.formats.PRUNED_FORMATS
    options: MethodOptions | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        method = PRUNE_METHODS.get(self.method)
        object.__setattr__(self, "options", as_options(method.Options, self.options))
        if self.scope not in SCOPES:
            raise SqueezeError(f"unknown scope {self.scope!r}; choose one of: {', '.join(SCOPES)}")
        PRUNED_FORMATS.get(self.format)  # an unknown name is an error listing the choices
        sparsity = self.sparsity
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            implied = 1 - n / m
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise OptionError(f"pattern {self.pattern} removes {implied:g} of the weights; drop {{0}} or set it to {implied:g}", "sparsity")
            sparsity = implied
            if self.scope == "global":
                raise OptionError(f"an N:M pattern ({self.pattern}) is decided inside each group of {m} weights; {{0}} global does not apply", "scope")
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
        method.check(self)
        if self.sparsity_ramp < 0:
            raise SqueezeError(f"sparsity ramp must be non-negative, got {self.sparsity_ramp:g}")
        if self.sparsity_ramp:
            _check_fraction(f"sparsity - ramp ({sparsity:g} - {self.sparsity_ramp:g})", sparsity - self.sparsity_ramp)
            _check_fraction(f"sparsity + ramp ({sparsity:g} + {self.sparsity_ramp:g})", sparsity + self.sparsity_ramp)
            if self.scope == "global":
                raise OptionError("a sparsity ramp sets each layer's sparsity; {0} global ranks all layers together", "scope")
        for layer_pattern, value in self.layer_sparsity:
            _check_fraction(f"sparsity of {layer_pattern!r}", value)

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def needs_calibration(self) -> bool:
        """Whether the method measures the layers' inputs on sample text (Wanda, SparseGPT)."""
        return PRUNE_METHODS.get(self.method).needs_calibration

    @property
    def structure(self) -> str:
        """compressed-tensors' name for the sparsity structure: ``unstructured`` or ``N:M``."""
        return self.pattern or "unstructured"
