"""Recipes: passes chained in one YAML file (or a Python list), validated whole before anything runs.

A recipe names its stages in order; each stage is one pass with the options of its command, spelt
as in ``squeeze quantize --help`` with underscores (``group_size``, ``calib_samples``)::

    name: prune-distill-quantize
    data: wikipedia        # evaluation text of every stage (the run's --data overrides it)
    eval_tokens: 16384
    seq_len: 512
    max_shard_size: 5GB    # largest safetensors file a stage writes (the run's --max-shard-size overrides it)
    stages:
      - prune: {method: wanda, pattern: "2:4"}
      - distill: {tokens: 2e6}               # teacher: original, student: previous (the defaults)
      - quantize: {method: gptq, bits: 4, mode: per-group, group_size: 64}

Stage N reads what stage N-1 wrote. Every stage is scored against the original model (its KL and
top-1 agreement are against the original, not against its own input), so the summary shows where
along the chain the accuracy went. The stage option models double as the CLI's option parsers, so
a recipe stage and the command line build the same config from the same words.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml
from torch import nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from squeeze.calib.targets import DEFAULT_IGNORE, fitting_group_size, select_linears
from squeeze.distill.config import DistillConfig, parse_layer_map
from squeeze.errors import OptionError, SqueezeError, in_words, recipe_spelling
from squeeze.formats import PRUNED_FORMATS, QUANTIZED_FORMATS, fixed_scheme, format_options_of
from squeeze.formats.files import MAX_SHARD_BYTES
from squeeze.options import option
from squeeze.prune.apply import PruneConfig
from squeeze.prune.config import DEFAULT_SPARSITY
from squeeze.prune.methods import PRUNE_METHODS
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.methods import METHODS
from squeeze.quant.methods.base import SchemeDefaults
from squeeze.quant.scheme import scheme_from_options
from squeeze.safe_yaml import describe, read_yaml, shown
from squeeze.sizes import parse_size


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pass_name: ClassVar[str]

    def ignored(self) -> tuple[str, ...]:
        """The layer patterns left alone: the stage's ``ignore``, else the heads (DEFAULT_IGNORE)."""
        return self.ignore if self.ignore is not None else DEFAULT_IGNORE

    def label(self) -> str:
        """Short name of what the stage does, for folder names and tables."""
        raise NotImplementedError


def _one_of(words: list[str], last: str = "or") -> str:
    return ", ".join(words[:-1]) + f" {last} {words[-1]}" if len(words) > 1 else "".join(words)


def _scheme_default(what: str, words: dict | None = None) -> str:
    """The weight scheme's default for ``what`` (mode, bits, asym) and the methods that change it,
    e.g. ``8; 4 for awq`` (values spelt by ``words`` where it has them)."""
    words = words or {}
    base = getattr(SchemeDefaults(), what)
    others: dict[Any, list[str]] = {}
    for method in METHODS:
        value = getattr(method.defaults, what)
        if value != base:
            others.setdefault(value, []).append(method.name)
    return f"{words.get(base, base)}" + "".join(f"; {words.get(v, v)} for {_one_of(n, 'and')}" for v, n in others.items())


class _QuantizeOptions(_Options):
    """``squeeze quantize`` options every method shares (``--format`` is ``format``, ``--target``
    is ``targets``); :class:`QuantizeStage` adds the options of every registered method."""

    pass_name: ClassVar[str] = "quantize"
    method: str = option(
        "rtn", f"{_one_of([m.summary for m in METHODS])}; "
        f"{_one_of([m.name for m in METHODS if m.blockwise], 'and')} calibrate block by block.",
    )
    mode: str | None = option(
        None, "Weight scales: per-tensor, per-channel (per output row) or per-group "
        f"(default {_scheme_default('mode')}).",
    )
    bits: int | None = option(None, f"Weight bits, 2..8 (default {_scheme_default('bits')}).")
    group_size: int | None = option(
        None, "Input columns per scale with --mode per-group (default 128 where it divides every targeted layer, else 64, 32 or 16).",
    )
    asym: bool | None = option(
        None, "Asymmetric weights (scale and zero point); default "
        f"{_scheme_default('asym', {False: 'symmetric', True: 'asymmetric'})}.", flag="--asym/--sym",
    )
    signed_scale: bool | None = option(
        None, "Symmetric weights on the full grid: a signed scale puts each group's largest weight on the code -2^(bits-1), so all "
        "2^bits codes are used (llama.cpp's and auto-round's grid). Default: on for --format gguf only.", flag="--signed-scale/--no-signed-scale",
    )
    act: str = option("none", "Activations: none (W*A16), per-token (dynamic) or per-tensor (static, calibrated).")
    act_asym: bool = option(False, "Asymmetric activations (scale and zero point).", flag="--act-asym")
    scale_dtype: str = option(
        "auto", "Storage type of weight scales: auto (float16; float32 for --asym weight-only), float16, bfloat16 or float32.",
    )
    format: str = option(
        "compressed-tensors", f"Checkpoint format: {', '.join(f.summary for f in QUANTIZED_FORMATS)}.", flag="--format",
    )
    targets: tuple[str, ...] = option((), "Quantize only Linear layers matching this glob or re:regex (repeatable).", flag="--target")
    ignore: tuple[str, ...] | None = option(
        None, "Leave matching layers in full precision (repeatable) (default: lm_head and classifier heads).",
    )
    calib_data: str | None = option(None, "Calibration text for static activation scales (default: the --data text).")
    calib_samples: int = option(128, "Calibration windows of --seq-len tokens (the calibrated methods and static activation scales).", ge=1)
    batch_size: int = option(2, "Windows per forward pass.", ge=1)
    rotate: str = option(
        "none", "Rotate before quantizing: none, or hadamard (seeded randomised Hadamard rotations of the residual stream and "
        "each head's values, fused into the weights; RMSNorm decoders such as Llama, Qwen, Mistral).",
    )
    rotate_seed: int = option(0, "Seed of the random signs of --rotate hadamard.")

    def _scheme_options(self) -> tuple[str, int, int | None, bool]:
        """Mode, bits, group size and asymmetry with what the format fixes and the method's
        defaults filled in; the group size stays open (None) where the model's shapes decide it."""
        defaults = METHODS.get(self.method).defaults if self.method in METHODS else SchemeDefaults()
        mode, bits, group_size, asym = self.mode, self.bits, self.group_size, self.asym
        if self.format in QUANTIZED_FORMATS:
            try:
                fmt = QUANTIZED_FORMATS.get(self.format).with_options(format_options_of(self, self.format))
            except OptionError:  # config() words it; here the format's defaults shape the scheme
                fmt = QUANTIZED_FORMATS.get(self.format)
            mode, bits, group_size, asym = fmt.fill_scheme(mode, bits, group_size, asym)
        bits = bits if bits is not None else defaults.bits
        return mode or defaults.mode, bits, group_size, asym if asym is not None else defaults.asym

    @property
    def needs_shapes(self) -> bool:
        """The group size is left open, so the config depends on the model's layer shapes."""
        mode, _, group_size, _ = self._scheme_options()
        return mode == "per-group" and group_size is None

    def resolved(self, model: nn.Module | None) -> QuantizeStage:
        """The options with the usual defaults filled in: the method's scheme (AWQ is W4 group-wise
        asymmetric), the scheme a format fixes (NF4 is 4-bit blocks of 64), a group size left open
        is 128 where it divides every targeted layer of ``model`` (else 64, 32 or 16; 128 when
        ``model`` is None). Explicit options win. ``model`` may be the meta model: only its layer
        shapes are read."""
        mode, bits, group_size, asym = self._scheme_options()
        if mode == "per-group" and group_size is None:
            group_size = 128
            if model is not None:
                group_size = fitting_group_size(select_linears(model, self.targets, self.ignored()))
        return self.model_copy(update={"mode": mode, "bits": bits, "group_size": group_size, "asym": asym})

    def config(self, model: nn.Module | None) -> QuantizeConfig:
        """The QuantizeConfig these options describe for ``model`` (see ``resolved``); SqueezeError
        if they contradict each other (the format is checked by the pass, squeeze.formats.check_format)."""
        method = METHODS.get(self.method)  # an unknown name first: the scheme's defaults depend on it
        o = self.resolved(model)
        scheme = scheme_from_options(
            mode=o.mode, bits=o.bits, group_size=o.group_size, asym=o.asym, act=o.act, scale_dtype=o.scale_dtype,
            act_asym=o.act_asym, checkpoint=o.format, signed_scale=o.signed_scale,
        )
        options = {name: getattr(o, name) for name in method.Options.model_fields}
        format_options = format_options_of(o, o.format)
        QUANTIZED_FORMATS.get(o.format).with_options(format_options)  # its options checked before the method's
        return QuantizeConfig(
            scheme=scheme, targets=o.targets, ignore=o.ignored(), method=o.method, options=options, format=o.format,
            format_options=format_options, rotate=o.rotate, rotate_seed=o.rotate_seed,
        )

    def label(self) -> str:
        fixed = fixed_scheme(self.format)
        if fixed is not None:
            return fixed.label
        bits = self.bits if self.bits is not None else self._scheme_options()[1]
        act = "a8" if self.act != "none" else "a16"
        rotated = "-rot" if self.rotate != "none" else ""
        return f"{self.method}{rotated}-w{bits}{act}" + (f"-g{self.group_size}" if self.group_size else "")


QuantizeStage = create_model(
    "QuantizeStage", __base__=_QuantizeOptions, __module__=__name__,
    __doc__="``squeeze quantize`` options: the common ones and every quantization method's own (``damp_percent``, ...).",
    **METHODS.fields(reserved=_QuantizeOptions.model_fields),
    **QUANTIZED_FORMATS.fields(reserved=_QuantizeOptions.model_fields),
)


class _PruneOptions(_Options):
    """``squeeze prune`` options every method shares; ``layer_sparsity`` maps a layer pattern to its
    sparsity. :class:`PruneStage` adds the options of every registered method."""

    pass_name: ClassVar[str] = "prune"
    method: str = option(
        "magnitude", f"{_one_of([m.summary for m in PRUNE_METHODS])}; "
        f"{_one_of([m.name for m in PRUNE_METHODS if m.needs_calibration], 'and')} calibrate block by block.",
    )
    sparsity: float | None = option(None, "Share of weights removed per layer, in [0, 1) (default 0.5; an N:M pattern sets it).")
    pattern: str | None = option(None, "N:M structure, e.g. 2:4 or 4:8: keep N of every M consecutive input weights.")
    scope: str = option("layer", "magnitude: rank weights per layer, or across all targeted layers at once (global).")
    layer_sparsity: dict[str, float] = option(
        {}, "PATTERN=SPARSITY for matching layers, repeatable, the last match wins; 0 leaves a layer dense.",
    )
    sparsity_ramp: float = option(
        0.0, "Rule over depth: the first block gets sparsity - ramp, the last sparsity + ramp, linear between.",
    )
    format: str = option(
        "sparse-bitmask", f"{', '.join(f.summary for f in PRUNED_FORMATS)}.", flag="--format",
    )
    targets: tuple[str, ...] = option((), "Prune only Linear layers matching this glob or re:regex (repeatable).", flag="--target")
    ignore: tuple[str, ...] | None = option(None, "Leave matching layers dense (repeatable) (default: lm_head and classifier heads).")
    calib_data: str | None = option(None, "Calibration text for Wanda and SparseGPT (default: the --data text).")
    calib_samples: int = option(128, "Wanda, SparseGPT: calibration windows of --seq-len tokens.", ge=0)
    batch_size: int = option(2, "Windows per forward pass.", ge=1)

    def config(self) -> PruneConfig:
        options = {name: getattr(self, name) for name in PRUNE_METHODS.get(self.method).Options.model_fields}
        return PruneConfig(
            method=self.method, sparsity=self.sparsity, pattern=self.pattern, scope=self.scope,
            layer_sparsity=tuple(self.layer_sparsity.items()), sparsity_ramp=self.sparsity_ramp, targets=self.targets,
            ignore=self.ignored(), format=self.format, options=options,
        )

    def label(self) -> str:
        amount = self.pattern.replace(":", "of") if self.pattern else f"{round(100 * (self.sparsity or DEFAULT_SPARSITY))}"
        return f"{self.method}-{amount}"


PruneStage = create_model(
    "PruneStage", __base__=_PruneOptions, __module__=__name__,
    __doc__="``squeeze prune`` options: the common ones and every pruning method's own (``block_size``, ...).",
    **PRUNE_METHODS.fields(reserved=_PruneOptions.model_fields),
)


class DistillStage(_Options):
    """``squeeze distill`` options. ``teacher`` is ``original`` (the recipe's model), ``previous``
    (what the stage before wrote) or a model; ``student`` is ``previous`` or a student spec
    (``layers:K``, ``depth:F``, ``width:F``) or a model. ``data`` is the training text (default:
    the recipe's data)."""

    pass_name: ClassVar[str] = "distill"
    teacher: str = "original"
    student: str = "previous"
    data: str | None = None
    temperature: float = Field(
        DistillConfig.temperature, description="KD temperature τ: both distributions are softened by it; the KD term is scaled by τ².",
    )
    alpha: float = Field(DistillConfig.alpha, description="Weight of the KD term; 1 - alpha weighs next-token cross-entropy (0: plain training).")
    steps: int | None = Field(None, ge=1, description=f"Optimizer steps (default {DistillConfig.steps} unless --tokens).")
    tokens: float | None = Field(None, ge=1, description="Training tokens instead of --steps (e.g. 2e6); rounded up to whole steps.")
    grad_accum: int = Field(DistillConfig.grad_accum, ge=1, description="Forward passes accumulated per optimizer step.")
    lr: float = Field(DistillConfig.lr, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(DistillConfig.weight_decay, description="AdamW weight decay on Linear matrices (not norms, biases, embeddings).")
    warmup: float = Field(DistillConfig.warmup, description="Share of the steps with linear warmup; cosine decay after.")
    min_lr_ratio: float = Field(DistillConfig.min_lr_ratio, description="Learning rate at the last step, as a share of --lr.")
    max_grad_norm: float = Field(DistillConfig.max_grad_norm, description="Gradient clipping norm (0: off).")
    seed: int = Field(DistillConfig.seed, description="Seed for data order and initialisation: the same seed gives the same student.")
    precision: str = Field(DistillConfig.precision, description="auto (bf16 autocast on CUDA with bf16, else fp32), fp32 or bf16.")
    hidden_loss: str | None = Field(
        DistillConfig.hidden_loss, description="Also match hidden states: cosine or mse (learned projections if the widths differ).",
    )
    hidden_weight: float = Field(DistillConfig.hidden_weight, description="Weight of the hidden-state loss.")
    layer_map: str | None = Field(None, description="STUDENT:TEACHER block pairs for the hidden loss, e.g. 0:1,1:3 (default: each kept "
                                  "block to its origin).")
    embedding_loss: str = Field(DistillConfig.embedding_loss, description="Encoders: loss between mean-pooled embeddings, cosine or mse.")
    checkpoint_every: int = Field(DistillConfig.checkpoint_every, description="Write a resumable checkpoint every N optimizer steps (0: none).")
    keep_checkpoints: int = Field(DistillConfig.keep_checkpoints, description="Checkpoints kept (the newest).")
    eval_every: int = Field(
        DistillConfig.eval_every, description="Held-out perplexity (encoders: cosine) on 8 windows every N steps (0: only at the end).",
    )
    teacher_cache: str | None = Field(None, description="Folder of the teacher's top-k logits: made on first use, then training reads it "
                                      "instead of running the teacher.")
    cache_topk: int = Field(
        DistillConfig.cache_topk, description="Teacher cache: the teacher's most likely tokens stored per position (exact log-probabilities).",
    )
    cache_samples: int = Field(
        DistillConfig.cache_samples, description="Teacher cache: draws per position from the teacher's distribution off those tokens "
        "(an unbiased estimate of the rest; 0: top-k only, a lower bound).",
    )
    stream_teacher: bool = Field(False, description="Never hold the teacher whole: read it one block at a time to build the teacher cache "
                                 "and for the evaluation (a causal teacher, with a teacher cache).")
    batch_size: int = Field(DistillConfig.batch_size, ge=1, description="Windows per forward pass, per process.")

    def config(self, seq_len: int, processes: int = 1, fsdp: bool = False):
        """The DistillConfig; ``tokens`` becomes whole optimizer steps of ``batch_size ·
        grad_accum · processes`` windows of ``seq_len`` tokens."""
        if self.steps is not None and self.tokens is not None:
            raise OptionError("give {0} or {1}, not both", "steps", "tokens")
        if self.tokens is not None and not self.tokens >= 1:  # model_construct (the CLI) skips the bound
            raise OptionError(f"{{0}} must be at least 1, got {self.tokens:g}", "tokens")
        steps = self.steps if self.steps is not None else DistillConfig.steps
        if self.tokens is not None:
            steps = -(-int(self.tokens) // (self.batch_size * self.grad_accum * processes * seq_len))
        return DistillConfig(
            temperature=self.temperature, alpha=self.alpha, steps=steps, batch_size=self.batch_size,
            grad_accum=self.grad_accum, lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup,
            min_lr_ratio=self.min_lr_ratio, max_grad_norm=self.max_grad_norm, seed=self.seed, precision=self.precision,
            hidden_loss=self.hidden_loss, hidden_weight=self.hidden_weight,
            layer_map=parse_layer_map(self.layer_map) if self.layer_map else (), embedding_loss=self.embedding_loss,
            checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints, eval_every=self.eval_every,
            cache_topk=self.cache_topk, cache_samples=self.cache_samples, fsdp=fsdp,
        )

    def label(self) -> str:
        student = "" if self.student == "previous" else "-" + re.sub(r"[^A-Za-z0-9.]+", "", self.student.replace(":", ""))[:24]
        return "kd" + student


StageOptions = Union[QuantizeStage, PruneStage, DistillStage]
STAGE_TYPES: dict[str, type[_Options]] = {cls.pass_name: cls for cls in (PruneStage, DistillStage, QuantizeStage)}
RECIPE_KEYS = ("name", "description", "data", "eval_tokens", "seq_len", "max_shard_size", "stages")


@dataclass(frozen=True)
class Recipe:
    """Stages in order plus the evaluation settings every stage shares. ``lines`` maps a key path
    (``("stages", 0, "prune", "sparsity")``) to its line in ``source``, for error messages."""

    stages: tuple[StageOptions, ...]
    name: str = "recipe"
    description: str = ""
    data: str = "wikipedia"
    eval_tokens: int = 16384
    seq_len: int = 512
    max_shard_size: int = MAX_SHARD_BYTES  # bytes
    source: Path | None = None
    lines: dict[tuple, int] = field(default_factory=dict, compare=False)

    def where(self, *path: Any) -> str:
        """``file:line: `` for the deepest part of ``path`` the file has ("" for a recipe built in Python)."""
        if self.source is None:
            return ""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return f"{self.source}:{self.lines[path[:end]]}: "
        return f"{self.source}: "


class RecipeError(SqueezeError):
    """Every problem found in a recipe, one per line, each with the file and line it is on."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = "" if len(problems) == 1 else f"the recipe has {len(problems)} problems:\n"
        super().__init__(head + "\n".join(problems))


def load_recipe(path: Path | str) -> Recipe:
    """Read and check a recipe file; RecipeError naming file and line for anything wrong in it,
    before anything too deep or too large (aliases of aliases) is built."""
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SqueezeError(f"cannot read recipe {path}: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})"]) from None
    try:
        data, lines = read_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError([describe(exc, text, path)]) from None
    return parse_recipe(data, source=path, lines=lines, default_name=path.stem)


def parse_recipe(data: Any, source: Path | None = None, lines: dict[tuple, int] | None = None, default_name: str = "recipe") -> Recipe:
    """A Recipe from the plain data of a YAML file; every problem is collected, then raised together."""
    probe = Recipe(stages=(), source=source, lines=lines or {})
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError([f"{probe.where()}a recipe is a mapping with a 'stages' list, e.g. stages: [{{quantize: {{method: gptq}}}}]"])
    for key in data:
        if key not in RECIPE_KEYS:
            problems.append(f"{probe.where(key)}unknown key {shown(key)}{_did_you_mean(str(key), RECIPE_KEYS)}; a recipe has {', '.join(RECIPE_KEYS)}")
    settings: dict[str, Any] = {}
    for key, kind, check in (
        ("name", str, None), ("description", str, None), ("data", str, None),
        ("eval_tokens", int, lambda v: v >= 1), ("seq_len", int, lambda v: v >= 1),
    ):
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (check and not check(value)):
            problems.append(f"{probe.where(key)}{key} must be {'a positive integer' if kind is int else 'text'}, got {shown(value)}")
        else:
            settings[key] = value
    if "max_shard_size" in data:
        try:
            settings["max_shard_size"] = parse_size(data["max_shard_size"], "max_shard_size")
        except OptionError as exc:
            problems.append(f"{probe.where('max_shard_size')}{in_words(exc, recipe_spelling)}")
    raw_stages = data.get("stages")
    stages: list[StageOptions] = []
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append(f"{probe.where('stages')}'stages' must be a non-empty list of passes (prune, distill, quantize)")
        raw_stages = []
    for index, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or len(raw) != 1:
            problems.append(
                f"{probe.where('stages', index)}stage {index + 1} must be one pass with its options, e.g. '- quantize: {{method: gptq}}'"
            )
            continue
        (pass_name, options), = raw.items()
        if pass_name not in STAGE_TYPES:
            problems.append(
                f"{probe.where('stages', index, pass_name)}stage {index + 1}: unknown pass {shown(pass_name)}"
                f"{_did_you_mean(str(pass_name), STAGE_TYPES)}; passes are {', '.join(STAGE_TYPES)}"
            )
            continue
        stage, stage_problems = build_stage(pass_name, options if options is not None else {}, probe, ("stages", index, pass_name))
        problems += stage_problems
        if stage is not None:
            stages.append(stage)
    if problems:
        raise RecipeError(problems)
    return Recipe(stages=tuple(stages), name=settings.pop("name", default_name), source=source, lines=lines or {}, **settings)


def build_stage(pass_name: str, options: Any, recipe: Recipe, path: tuple) -> tuple[StageOptions | None, list[str]]:
    """The stage's option model, or the problems with its options (unknown keys, wrong types)."""
    cls = STAGE_TYPES[pass_name]
    index = path[1] if len(path) > 1 else 0
    head = f"stage {index + 1} ({pass_name})"
    if not isinstance(options, dict):
        return None, [f"{recipe.where(*path)}{head}: options must be a mapping of option: value, got {shown(options)}"]
    try:
        return cls.model_validate(options), []  # not cls(**options): a key may be a number
    except ValidationError as exc:
        problems, seen = [], set()
        for error in exc.errors():
            key = error["loc"][0] if error["loc"] else ""
            if key in seen:  # one problem per option, not one per item of a long list
                continue
            seen.add(key)
            where = recipe.where(*path, key)
            if error["type"] in ("extra_forbidden", "invalid_key"):
                fields = [name for name in cls.model_fields]
                problems.append(f"{where}{head}: unknown option {shown(key)}{_did_you_mean(str(key), fields)}")
            else:
                problems.append(f"{where}{head}: {key}: {error['msg'].lower()}, got {shown(error['input'])}")
        return None, problems


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def recipe_from_stages(stages: list, name: str = "recipe", **settings: Any) -> Recipe:
    """A Recipe from Python: stage objects, e.g. ``[PruneStage(method="wanda", pattern="2:4"),
    QuantizeStage(method="gptq", bits=4, mode="per-group")]``, or mappings as in a YAML file
    (``{"prune": {"method": "wanda"}}``); RecipeError lists every problem."""
    if not stages:
        raise RecipeError(["a recipe needs at least one stage"])
    probe = Recipe(stages=())
    built: list[StageOptions] = []
    problems: list[str] = []
    for index, stage in enumerate(stages):
        if isinstance(stage, dict) and len(stage) == 1 and next(iter(stage)) in STAGE_TYPES:
            (pass_name, options), = stage.items()
            stage, found = build_stage(pass_name, options if options is not None else {}, probe, ("stages", index, pass_name))
            problems += found
        elif not isinstance(stage, _Options):
            problems.append(f"stage {index + 1}: {shown(stage)} is not a pass (QuantizeStage, PruneStage, DistillStage or {{'quantize': {{...}}}})")
            continue
        if stage is not None:
            built.append(stage)
    if problems:
        raise RecipeError(problems)
    return Recipe(stages=tuple(built), name=name, **settings)


def stage_folder(index: int, stage: StageOptions) -> str:
    """``01-prune-wanda-2of4``: the stage's folder inside the run's output directory."""
    return f"{index + 1:02d}-{stage.pass_name}-{stage.label()}"
