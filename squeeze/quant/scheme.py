"""Quantization schemes as plain data, in the vocabulary of compressed-tensors.

A scheme says how weights (and optionally the inputs of a Linear layer) are mapped to integers:
how many bits, symmetric or with a zero point, and over which slice of the tensor one scale is
shared (``strategy``). The words and their meaning follow compressed-tensors, so a scheme
serialises straight into a checkpoint's ``quantization_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from squeeze.errors import OptionError, SqueezeError

Strategy = Literal["tensor", "channel", "group", "token"]
ScaleDtype = Literal["float16", "bfloat16", "float32"]
SCALE_DTYPES = ("float16", "bfloat16", "float32")

MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor is quantized.

    - ``strategy="tensor"``: one scale for the whole tensor.
    - ``"channel"``: one scale per output row of a weight ``[out, in]``.
    - ``"group"``: one scale per ``group_size`` consecutive input columns of each row.
    - ``"token"``: one scale per token of an activation (always dynamic: computed at run time).
    ``dynamic=False`` for activations means a static scale calibrated on sample text.
    """

    num_bits: int = 8
    symmetric: bool = True
    strategy: Strategy = "channel"
    group_size: int | None = None
    dynamic: bool = False
    scale_dtype: ScaleDtype | None = None  # None: the dtype of the tensor being quantized
    # symmetric only: the scale takes the sign of each slice's largest-magnitude value, which lands
    # exactly on the code qmin (llama.cpp's Q4_0 / Q8_0 grid, the one GGUF stores): a step of
    # max|x| / 2^(bits-1) instead of max|x| / (2^(bits-1) - 1/2), every code used on the side that needs it
    signed_scale: bool = False

    def __post_init__(self) -> None:
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise SqueezeError(f"unknown scale dtype {self.scale_dtype!r}; choose one of: {', '.join(SCALE_DTYPES)}")
        if not MIN_BITS <= self.num_bits <= MAX_BITS:
            raise SqueezeError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.num_bits}")
        if self.strategy not in ("tensor", "channel", "group", "token"):
            raise SqueezeError(f"unknown quantization strategy {self.strategy!r}")
        if self.strategy == "group":
            if self.group_size is None or self.group_size < 1:
                raise SqueezeError("per-group quantization needs a positive group size")
        elif self.group_size is not None:
            raise SqueezeError(f"a group size only applies to per-group quantization, not per-{self.strategy}")
        if self.strategy == "token" and not self.dynamic:
            raise SqueezeError("per-token scales are computed at run time: per-token quantization must be dynamic")
        if self.signed_scale and not self.symmetric:
            raise SqueezeError("a signed scale is a symmetric grid's: asymmetric quantization has a zero point instead")

    @property
    def qmin(self) -> int:
        """Smallest integer code: -2^(bits-1)."""
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer code: 2^(bits-1) - 1."""
        return (1 << (self.num_bits - 1)) - 1

    def to_compressed_tensors(self) -> dict:
        """This tensor's entry in a compressed-tensors ``config_groups`` scheme."""
        return {
            "num_bits": self.num_bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size,
            "dynamic": self.dynamic,
            "observer": None if self.dynamic else "minmax",
            "actorder": None,
            "block_structure": None,
            "scale_dtype": self.scale_dtype,
        }

    def describe(self) -> str:
        """Short human form, e.g. ``int4 sym per-group(64)``."""
        kind = ("sym signed-scale" if self.signed_scale else "sym") if self.symmetric else "asym"
        where = f"per-group({self.group_size})" if self.strategy == "group" else f"per-{self.strategy}"
        when = " dynamic" if self.dynamic else ""
        return f"int{self.num_bits} {kind} {where}{when}"


@dataclass(frozen=True)
class QuantScheme:
    """Weights and (optionally) input activations of the targeted Linear layers."""

    weights: QuantArgs = field(default_factory=QuantArgs)
    input_activations: QuantArgs | None = None

    def __post_init__(self) -> None:
        if self.weights.strategy == "token":
            raise SqueezeError("weights cannot be quantized per-token; use per-channel or per-group")
        act = self.input_activations
        if act is not None and act.strategy not in ("token", "tensor"):
            raise SqueezeError("activations are quantized per-token (dynamic) or per-tensor (static)")

    @property
    def name(self) -> str:
        """Conventional short name: W8A16, W4A16, W8A8..."""
        act_bits = self.input_activations.num_bits if self.input_activations else 16
        return f"W{self.weights.num_bits}A{act_bits}"

    @property
    def checkpoint_format(self) -> str:
        """compressed-tensors format: int-quantized when activations are quantized, else pack-quantized.

        This follows what vLLM expects: weight-only integer checkpoints are packed into int32
        words, W8A8 checkpoints keep int8 weights as they are.
        """
        return "int-quantized" if self.input_activations is not None else "pack-quantized"

    def describe(self) -> str:
        """Human form of the whole scheme."""
        act = self.input_activations.describe() if self.input_activations else "none"
        return f"{self.name}: weights {self.weights.describe()}, activations {act}"


ModeName = Literal["per-tensor", "per-channel", "per-group"]
ActName = Literal["none", "per-token", "per-tensor"]

MODES: dict[str, Strategy] = {"per-tensor": "tensor", "per-channel": "channel", "per-group": "group"}
ACTS = ("none", "per-token", "per-tensor")


def scheme_from_options(
    mode: str = "per-channel",
    bits: int = 8,
    group_size: int | None = None,
    asym: bool = False,
    act: str = "none",
    act_bits: int = 8,
    scale_dtype: str | None = "auto",
    act_asym: bool = False,
    checkpoint: str = "compressed-tensors",
    signed_scale: bool | None = None,
) -> QuantScheme:
    """Build a scheme from the CLI's words (``--mode``, ``--bits``, ``--group-size``, ``--asym``, ``--act``).

    ``act_asym`` gives activations a zero point too (a help for skewed inputs such as the
    SiLU-gated input of ``down_proj``). ``group_size`` defaults to 128 for per-group. ``scale_dtype="auto"`` stores weight scales as
    float16, as GPTQ and AWQ checkpoints do (4.25 rather than 4.5 bits per int4 weight at group
    size 64), except for asymmetric weight-only schemes: transformers dequantizes those at load
    time in the scales' own dtype, so float16 scales would make the reloaded model differ from
    the one squeeze evaluated; they keep float32 scales. GPTQ checkpoints (``checkpoint="gptq"``)
    always store float16 scales. GGUF files (``checkpoint="gguf"``) store symmetric weights on
    llama.cpp's grid, with signed scales (see QuantArgs.signed_scale); ``signed_scale=True`` puts
    symmetric weights of any format on that grid, ``False`` keeps the balanced one even in GGUF.
    Raises SqueezeError for impossible combinations.
    """
    if mode not in MODES:
        raise SqueezeError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if act not in ACTS:
        raise SqueezeError(f"unknown activation mode {act!r}; choose one of: {', '.join(ACTS)}")
    strategy = MODES[mode]
    if strategy == "group" and group_size is None:
        group_size = 128
    if strategy != "group" and group_size is not None:
        raise SqueezeError(f"--group-size only applies to --mode per-group, not {mode}")
    if signed_scale and asym:
        raise OptionError("{0} puts symmetric weights on the full grid; asymmetric weights have a zero point: drop {0} or {1}", "signed_scale", "asym")
    if scale_dtype == "auto":
        scale_dtype = "float32" if asym and act == "none" and checkpoint == "compressed-tensors" else "float16"
    weights = QuantArgs(
        num_bits=bits, symmetric=not asym, strategy=strategy, group_size=group_size, scale_dtype=scale_dtype,
        signed_scale=(checkpoint == "gguf" and not asym) if signed_scale is None else signed_scale,
    )
    if act_asym and act == "none":
        raise SqueezeError("--act-asym needs quantized activations: add --act per-token or --act per-tensor")
    activations = None
    if act == "per-token":
        activations = QuantArgs(num_bits=act_bits, symmetric=not act_asym, strategy="token", dynamic=True)
    elif act == "per-tensor":
        activations = QuantArgs(num_bits=act_bits, symmetric=not act_asym, strategy="tensor", dynamic=False)
    return QuantScheme(weights=weights, input_activations=activations)
