"""Recipes: passes chained in one YAML file (or a Python list), validated whole before anything runs.

A recipe names its stages in order; each stage is one pass with the options of its command, spelt
as in ``squeeze quantize --help`` with underscores (``group_size``, ``calib_samples``)::

    name: prune-distill-quantize
    data: wikipedia        # evaluation text of every stage (the run's --data overrides it)
    eval_tokens: 16384
    seq_len: 512
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from squeeze.errors import SqueezeError


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pass_name: ClassVar[str]

    def ignored(self) -> tuple[str, ...]:
        """The layer patterns left alone: the stage's ``ignore``, else the heads (DEFAULT_IGNORE)."""
        from squeeze.quant.targets import DEFAULT_IGNORE

        return self.ignore if self.ignore is not None else DEFAULT_IGNORE

    def label(self) -> str:
        """Short name of what the stage does, for folder names and tables."""
        raise NotImplementedError


class QuantizeStage(_Options):
    """``squeeze quantize`` options (``--format`` is ``format``, ``--target`` is ``targets``)."""

    pass_name: ClassVar[str] = "quantize"
    method: str = "rtn"
    mode: str | None = None
    bits: int | None = None
    group_size: int | None = None
    asym: bool | None = None
    act: str = "none"
    act_asym: bool = False
    scale_dtype: str = "auto"
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    true_sequential: bool = False
    awq_grid: int = 20
    awq_clip: bool = True
    alpha: float = 0.5
    smooth_fallback: bool = False
    format: str = "compressed-tensors"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] | None = None
    calib_data: str | None = None
    calib_samples: int = Field(128, ge=1)
    batch_size: int = Field(2, ge=1)

    @property
    def needs_shapes(self) -> bool:
        """The group size is left open, so the config depends on the model's layer shapes."""
        return self.resolved(None).mode == "per-group" and self.group_size is None and self.format != "bnb-nf4"

    def resolved(self, model: nn.Module | None) -> QuantizeStage:
        """The options with the method's usual defaults filled in: AWQ is W4 group-wise asymmetric,
        NF4 is 4-bit blocks of 64, a group size left open is 128 where it divides every targeted
        layer of ``model`` (else 64, 32 or 16; 128 when ``model`` is None). Explicit options win.
        ``model`` may be the meta model: only its layer shapes are read."""
        from squeeze.quant.targets import fitting_group_size, select_linears

        low_bit = self.method == "awq"
        mode, bits, group_size = self.mode, self.bits, self.group_size
        if self.format == "bnb-nf4":
            mode, bits = mode or "per-group", bits or 4
            group_size = group_size or (64 if mode == "per-group" else None)
        mode = mode or ("per-group" if low_bit else "per-channel")
        if mode == "per-group" and group_size is None:
            group_size = 128
            if model is not None:
                group_size = fitting_group_size(select_linears(model, self.targets, self.ignored()))
        return self.model_copy(update={
            "mode": mode,
            "bits": bits if bits is not None else (4 if low_bit else 8),
            "group_size": group_size,
            "asym": self.asym if self.asym is not None else low_bit,
        })

    def config(self, model: nn.Module | None):
        """The QuantizeConfig these options describe for ``model`` (see ``resolved``); SqueezeError
        if they contradict each other."""
        from squeeze.quant.apply import QuantizeConfig
        from squeeze.quant.scheme import scheme_from_options

        o = self.resolved(model)
        scheme = scheme_from_options(
            mode=o.mode, bits=o.bits, group_size=o.group_size, asym=o.asym, act=o.act, scale_dtype=o.scale_dtype,
            act_asym=o.act_asym, checkpoint=o.format,
        )
        return QuantizeConfig(
            scheme=scheme, targets=o.targets, ignore=o.ignored(), method=o.method,
            damp_percent=o.damp_percent, block_size=o.block_size, act_order=o.act_order, true_sequential=o.true_sequential,
            awq_grid=o.awq_grid, awq_clip=o.awq_clip, alpha=o.alpha, smooth_fallback=o.smooth_fallback, format=o.format,
        )

    def label(self) -> str:
        if self.format == "bnb-nf4":
            return "nf4"
        bits = self.bits if self.bits is not None else (4 if self.method == "awq" else 8)
        act = "a8" if self.act != "none" else "a16"
        return f"{self.method}-w{bits}{act}" + (f"-g{self.group_size}" if self.group_size else "")


class PruneStage(_Options):
    """``squeeze prune`` options; ``layer_sparsity`` maps a layer pattern to its sparsity."""

    pass_name: ClassVar[str] = "prune"
    method: str = "magnitude"
    sparsity: float | None = None
    pattern: str | None = None
    scope: str = "layer"
    layer_sparsity: dict[str, float] = {}
    sparsity_ramp: float = 0.0
    block_size: int = 128
    damp_percent: float = 0.01
    format: str = "sparse-bitmask"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] | None = None
    calib_data: str | None = None
    calib_samples: int = Field(128, ge=0)
    batch_size: int = Field(2, ge=1)

    def config(self):
        from squeeze.prune.apply import PruneConfig

        return PruneConfig(
            method=self.method, sparsity=self.sparsity, pattern=self.pattern, scope=self.scope,
            layer_sparsity=tuple(self.layer_sparsity.items()), sparsity_ramp=self.sparsity_ramp, targets=self.targets,
            ignore=self.ignored(), format=self.format,
            block_size=self.block_size, damp_percent=self.damp_percent,
        )

    def label(self) -> str:
        amount = self.pattern.replace(":", "of") if self.pattern else f"{round(100 * (self.sparsity or 0.5))}"
        return f"{self.method}-{amount}"


class DistillStage(_Options):
    """``squeeze distill`` options. ``teacher`` is ``original`` (the recipe's model), ``previous``
    (what the stage before wrote) or a model; ``student`` is ``previous`` or a student spec
    (``layers:K``, ``depth:F``, ``width:F``) or a model. ``data`` is the training text (default:
    the recipe's data)."""

    pass_name: ClassVar[str] = "distill"
    teacher: str = "original"
    student: str = "previous"
    data: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    steps: int | None = Field(None, ge=1)
    tokens: float | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    hidden_loss: str | None = None
    hidden_weight: float = 1.0
    layer_map: str | None = None
    embedding_loss: str = "cosine"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    teacher_cache: str | None = None
    cache_topk: int = 16
    cache_samples: int = 48
    batch_size: int = Field(4, ge=1)

    DEFAULT_STEPS: ClassVar[int] = 100

    def config(self, seq_len: int, processes: int = 1, fsdp: bool = False):
        """The DistillConfig; ``tokens`` becomes whole optimizer steps of ``batch_size ·
        grad_accum · processes`` windows of ``seq_len`` tokens."""
        from squeeze.distill.config import DistillConfig, parse_layer_map

        if self.steps is not None and self.tokens is not None:
            raise SqueezeError("give steps or tokens, not both")
        steps = self.steps if self.steps is not None else self.DEFAULT_STEPS
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
RECIPE_KEYS = ("name", "description", "data", "eval_tokens", "seq_len", "stages")


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


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``2e6`` as a number (YAML 1.1 wants ``2.0e+6``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"),
)


def _record_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            _record_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1  # point at the key, not its value
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, path + (index,), lines)


def load_recipe(path: Path | str) -> Recipe:
    """Read and check a recipe file; RecipeError naming file and line for anything wrong in it."""
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SqueezeError(f"cannot read recipe {path}: {exc}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError([f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return parse_recipe(data, source=path, lines=lines, default_name=path.stem)


def parse_recipe(data: Any, source: Path | None = None, lines: dict[tuple, int] | None = None, default_name: str = "recipe") -> Recipe:
    """A Recipe from the plain data of a YAML file; every problem is collected, then raised together."""
    probe = Recipe(stages=(), source=source, lines=lines or {})
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError([f"{probe.where()}a recipe is a mapping with a 'stages' list, e.g. stages: [{{quantize: {{method: gptq}}}}]"])
    for key in data:
        if key not in RECIPE_KEYS:
            problems.append(f"{probe.where(key)}unknown key {key!r}{_did_you_mean(str(key), RECIPE_KEYS)}; a recipe has {', '.join(RECIPE_KEYS)}")
    settings: dict[str, Any] = {}
    for key, kind, check in (
        ("name", str, None), ("description", str, None), ("data", str, None),
        ("eval_tokens", int, lambda v: v >= 1), ("seq_len", int, lambda v: v >= 1),
    ):
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (check and not check(value)):
            problems.append(f"{probe.where(key)}{key} must be {'a positive integer' if kind is int else 'text'}, got {value!r}")
        else:
            settings[key] = value
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
                f"{probe.where('stages', index, pass_name)}stage {index + 1}: unknown pass {pass_name!r}"
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
        return None, [f"{recipe.where(*path)}{head}: options must be a mapping of option: value, got {options!r}"]
    try:
        return cls(**options), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = error["loc"][0] if error["loc"] else ""
            where = recipe.where(*path, key)
            if error["type"] == "extra_forbidden":
                fields = [name for name in cls.model_fields]
                problems.append(f"{where}{head}: unknown option {key!r}{_did_you_mean(str(key), fields)}")
            else:
                problems.append(f"{where}{head}: {key}: {error['msg'].lower()}, got {error['input']!r}")
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
            problems.append(f"stage {index + 1}: {stage!r} is not a pass (QuantizeStage, PruneStage, DistillStage or {{'quantize': {{...}}}})")
            continue
        if stage is not None:
            built.append(stage)
    if problems:
        raise RecipeError(problems)
    return Recipe(stages=tuple(built), name=name, **settings)


def stage_folder(index: int, stage: StageOptions) -> str:
    """``01-prune-wanda-2of4``: the stage's folder inside the run's output directory."""
    return f"{index + 1:02d}-{stage.pass_name}-{stage.label()}"


@dataclass
class PlannedStage:
    """One stage as it will run: its input, what it reads, and about how much memory it needs."""

    index: int  # 0-based
    stage: StageOptions
    folder: str
    input: str  # "original" or the folder of the stage before
    config: Any  # QuantizeConfig, PruneConfig or DistillConfig (a quantize group size left open is settled on the real input)
    teacher: str | None = None  # distill: "original", "previous" or a model
    student: str | None = None  # distill: "previous" or a student spec
    calibration_tokens: int = 0
    training_tokens: int = 0
    evaluation_tokens: int = 0
    memory_bytes: int = 0  # estimated peak RSS, see _memory_estimate
    shapes_known: bool = True  # the input has the original's layer shapes (checked against its meta model)


PROCESS_BYTES = 700 * 2**20  # python + torch + transformers before any model is loaded


def plan_recipe(recipe: Recipe, model: str, trust_remote_code: bool = False, evaluate: bool = True, dtype_bytes: int = 4) -> list[PlannedStage]:
    """Check the whole recipe against ``model`` without loading weights: each stage's options make a
    config, its layers exist with fitting shapes, teacher and student fit, text sources exist, and
    the stages are in an order that can run. RecipeError lists every problem found."""
    from squeeze.data import load_documents
    from squeeze.distill.student import check_layer_map, keep_blocks, parse_student, resolve_layers, teacher_depth
    from squeeze.distill import cache as logit_cache
    from squeeze.models import meta_model, resolve_model
    from squeeze.prune.apply import plan_prune
    from squeeze.quant.apply import plan_layers

    source = resolve_model(model, trust_remote_code=trust_remote_code)
    original = meta_model(source)
    causal = source.kind == "causal"
    problems: list[str] = []
    checked_sources: dict[str, str | None] = {}

    def check_text(text: str, *path: Any) -> None:
        if text not in checked_sources:
            try:
                load_documents(text)
                checked_sources[text] = None
            except SqueezeError as exc:
                checked_sources[text] = str(exc)
        if checked_sources[text] is not None:
            problems.append(f"{recipe.where(*path)}{checked_sources[text]}")

    if evaluate:
        check_text(recipe.data, "data")
    # windows are capped at the model's positions, as the passes cap them
    seq_len = min(recipe.seq_len, getattr(original.config, "max_position_embeddings", None) or recipe.seq_len)
    evaluation_tokens = recipe.eval_tokens // seq_len * seq_len if evaluate else 0
    planned: list[PlannedStage] = []
    current: Any = original  # meta model of the current stage's input; None where a stage makes shapes we cannot know yet
    after_quantize = None
    for index, stage in enumerate(recipe.stages):
        path = ("stages", index, stage.pass_name)
        head = f"{recipe.where(*path)}stage {index + 1} ({stage.pass_name}): "
        entry = PlannedStage(index, stage, stage_folder(index, stage), "original" if index == 0 else planned[-1].folder, None)
        entry.shapes_known = current is not None
        entry.evaluation_tokens = evaluation_tokens
        if after_quantize is not None:
            problems.append(
                f"{head}comes after stage {after_quantize + 1} (quantize); a quantized checkpoint is final, so quantize must be the last stage"
            )
        try:
            if isinstance(stage, QuantizeStage):
                after_quantize = index
                entry.config = stage.config(current)
                if current is not None:
                    plan_layers(current, entry.config)
                if entry.config.needs_calibration:
                    entry.calibration_tokens = stage.calib_samples * seq_len
                    check_text(stage.calib_data or recipe.data, *path, "calib_data")
            elif isinstance(stage, PruneStage):
                entry.config = stage.config()
                if current is not None:
                    plan_prune(current, entry.config)
                if entry.config.needs_calibration:
                    if stage.calib_samples < 1:
                        raise SqueezeError(f"{stage.method} needs calibration text: calib_samples must be at least 1")
                    entry.calibration_tokens = stage.calib_samples * seq_len
                    check_text(stage.calib_data or recipe.data, *path, "calib_data")
            else:
                entry.teacher, entry.student = stage.teacher, stage.student
                entry.config = stage.config(seq_len)
                entry.training_tokens = entry.config.steps * stage.batch_size * stage.grad_accum * seq_len
                check_text(stage.data or recipe.data, *path, "data")
                if stage.teacher == "original":
                    teacher_meta = original
                elif stage.teacher == "previous":
                    teacher_meta = current
                else:
                    teacher_meta = meta_model(resolve_model(stage.teacher, trust_remote_code=trust_remote_code))
                if stage.student == "previous":
                    if index == 0:
                        raise SqueezeError("the first stage has no previous model to train: name a student (layers:K, depth:F, width:F or a model)")
                    student_meta = current
                else:
                    spec = parse_student(stage.student)
                    student_meta = None
                    if spec.kind == "model":
                        student_meta = meta_model(resolve_model(spec.model, trust_remote_code=trust_remote_code))
                    elif spec.kind == "layers" and teacher_meta is not None:
                        spec = resolve_layers(spec, teacher_depth(teacher_meta))
                        student_meta = keep_blocks(teacher_meta, spec.layers)
                if teacher_meta is not None and student_meta is not None:
                    check_layer_map(entry.config.layer_map, teacher_depth(student_meta), teacher_depth(teacher_meta))
                if stage.teacher_cache is not None:
                    logit_cache.check_cache_use(Path(stage.teacher_cache), entry.config, causal)
                current = student_meta
        except SqueezeError as exc:
            problems.append(f"{head}{exc}")
        if entry.config is not None:
            entry.memory_bytes = _memory_estimate(entry, current if current is not None else original, original, recipe, evaluate, dtype_bytes)
        planned.append(entry)
    if problems:
        raise RecipeError(problems)
    return planned


def _memory_estimate(entry: PlannedStage, model, original, recipe: Recipe, evaluate: bool, dtype_bytes: int) -> int:
    """A rough peak RSS in bytes: the models held at once, plus the largest activations.

    Quantize and prune hold the input and the original (the reference) and, while calibrating, the
    inputs and outputs of one block for every calibration window, plus (GPTQ, SparseGPT) one
    in_features² Hessian per Linear of a block. Distillation holds the teacher and the student with
    its gradients and AdamW moments (4 copies, float32), the teacher's logits of one batch and the
    student's saved activations. Evaluation adds the logits of two models for one batch of two and
    their log-softmax. Memory freed after calibration mostly stays with the process (the allocator
    keeps it), so calibration and evaluation add up. On SmolLM2 (prune-distill-quantize, 128 x 512
    calibration tokens) the estimates were 33% over, 6% over and 6% under the measured peaks of the
    three stages; every recipe summary shows both.
    """
    from squeeze.quant.sequential import block_list

    config = model.config
    hidden = getattr(config, "hidden_size", 0)
    vocab = getattr(config, "vocab_size", 0)
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = getattr(config, "num_attention_heads", 1)
    seq = min(recipe.seq_len, getattr(original.config, "max_position_embeddings", None) or recipe.seq_len)
    params = sum(p.numel() for p in model.parameters())
    original_params = sum(p.numel() for p in original.parameters())
    evaluation = 3 * 2 * 2 * seq * vocab * 4 if evaluate else 0
    stage = entry.stage
    if isinstance(stage, DistillStage):
        teacher = original_params * dtype_bytes
        blocks = len(block_list(model)[1])
        activations = stage.batch_size * seq * (blocks * (16 * hidden + 2 * inter + heads * seq) * 4 + vocab * 4)
        return PROCESS_BYTES + teacher + 16 * params + activations + evaluation
    held = (params + (original_params if evaluate else 0)) * dtype_bytes
    calibration = 0
    if entry.calibration_tokens:
        calibration = 2 * entry.calibration_tokens * hidden * dtype_bytes
        if stage.method in ("gptq", "sparsegpt"):
            _, blocks = block_list(model)
            linears = [m for m in blocks[0].modules() if hasattr(m, "in_features")] if len(blocks) else []
            calibration += sum(m.in_features**2 * 4 for m in linears)
        if stage.method == "awq":
            calibration += entry.calibration_tokens * inter * dtype_bytes
    codes = params if isinstance(stage, QuantizeStage) else 0  # integer codes, one byte per weight, beside the float weights
    return PROCESS_BYTES + held + codes + calibration + evaluation
