"""What a quantize pass does, as one frozen value: the scheme, the layers, the method and its options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from squeeze.calib.targets import DEFAULT_IGNORE
from squeeze.options import MethodOptions, as_options
from squeeze.quant.methods import METHODS
from squeeze.quant.rotate import check_rotation
from squeeze.quant.scheme import QuantScheme


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize and how. ``targets``/``ignore`` are module-name patterns (globs or ``re:``).

    ``method`` names a registered method (squeeze.quant.methods.METHODS) and ``options`` holds its
    own options: its Options model, or a mapping of them (validated here, defaults filled in),
    or None for the defaults. ``format`` is the checkpoint format the pass writes and
    ``format_options`` that format's own options (``gguf_type``...; a mapping, None for its
    defaults); the pass checks both (squeeze.formats), the config only carries them. ``rotate`` is "none" or "hadamard": rotations
    fused into the weights before the method runs (squeeze.quant.rotate), their signs drawn from
    ``rotate_seed``.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    method: str = "rtn"
    options: MethodOptions | Mapping[str, Any] | None = None
    format: str = "compressed-tensors"
    format_options: Mapping[str, Any] | None = None
    rotate: str = "none"
    rotate_seed: int = 0

    def __post_init__(self) -> None:
        check_rotation(self.rotate)
        method = METHODS.get(self.method)
        object.__setattr__(self, "options", as_options(method.Options, self.options))
        method.check(self)

    @property
    def needs_calibration(self) -> bool:
        """Whether the method reads sample text (GPTQ, AWQ, SmoothQuant, static activation scales)."""
        return METHODS.get(self.method).needs_calibration(self)
