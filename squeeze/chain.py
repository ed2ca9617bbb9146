"""Recipes run: plan a list of stages against the model, then run them one after another, each
stage reading what the one before wrote, and summarise them side by side.

Stages are written into ``OUT.partial/`` (each stage folder atomically, with a ``stage.json``
saying what made it), which becomes ``OUT`` with summary.json/md/png at the end; an interrupted
run keeps its finished stages and ``resume`` reuses those made from the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squeeze import compare
from squeeze.calib.blocks import all_blocks
from squeeze.data import check_source
from squeeze.distill import cache as logit_cache
from squeeze.device import resolve_device, resolve_dtype
from squeeze.distill.checkpoint import CheckpointDir, default_checkpoint_dir
from squeeze.distill.student import check_layer_map, keep_blocks, parse_student, resolve_layers, teacher_depth
from squeeze.errors import OptionError, SqueezeError, in_words, literal, recipe_spelling
from squeeze.evaluate import metric_chunk, reset_peak_rss
from squeeze.memory import PROCESS_BYTES, PassShape, block_bytes, read_in_blocks_bytes, resident_bytes, streamed_bytes
from squeeze.formats import check_format
from squeeze.models import check_output_dir, meta_model, publish_dir, resolve_model
from squeeze.models.output import keep_finished, local_inputs
from squeeze.passes.common import GENERATION_PROMPTS, reference_name
from squeeze.passes.distill import distill
from squeeze.passes.prune import PruneStep, prune
from squeeze.passes.quantize import QuantizeStep, quantize
from squeeze.passes.skeleton import CompressionStep, RunSettings
from squeeze.passes.stream import streamable_source
from squeeze.processes import Processes, start_processes, stop_processes
from squeeze.progress import NullProgress, Progress
from squeeze.prune.apply import plan_prune
from squeeze.prune.methods import PRUNE_METHODS
from squeeze.quant.apply import plan_quantize
from squeeze.quant.methods import METHODS
from squeeze.recipes import (
    DistillStage, PruneStage, QuantizeStage, Recipe, RecipeError, StageOptions, load_recipe, recipe_from_stages, stage_folder,
)
from squeeze.sizes import accelerator_memory, default_memory_budget, in_gib, parse_size

# the pass each stage runs, by its name in a recipe
PASSES: dict[str, Callable[..., Any]] = {"quantize": quantize, "prune": prune, "distill": distill}

STAGE_FILE = "stage.json"  # written into a stage folder once it is complete: what made it


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
    memory_bytes: int = 0  # estimated peak RSS holding the model whole, see _memory_estimate
    streamable: bool = False  # the stage can run one block at a time (squeeze.passes.stream)
    stream_bytes: int | None = None  # estimated peak RSS streamed, where it can stream
    stream: bool = False  # it will stream: asked for, or chosen by check_memory
    spill_bytes: int | None = None  # streamed with the calibration activations on disk, where it calibrates
    spill: bool = False  # it will stream with its calibration activations on disk: chosen by check_memory
    block_bytes: int = 0  # one block's weights in the compute dtype: the least a streamed stage holds

    @property
    def estimate(self) -> int:
        """The estimated peak RSS of the way the stage will run."""
        if self.spill and self.spill_bytes is not None:
            return self.spill_bytes
        return self.stream_bytes if self.stream and self.stream_bytes is not None else self.memory_bytes
    shapes_known: bool = True  # the input has the original's layer shapes (checked against its meta model)



def plan_recipe(recipe: Recipe, model: str, trust_remote_code: bool = False, evaluate: bool = True, dtype_bytes: int = 4) -> list[PlannedStage]:
    """Check the whole recipe against ``model`` without loading weights: each stage's options make a
    config, its layers exist with fitting shapes, teacher and student fit, text sources exist, and
    the stages are in an order that can run. RecipeError lists every problem found."""
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    original = meta_model(source)
    causal = source.kind == "causal"
    problems: list[str] = []
    checked_sources: dict[str, str | None] = {}

    def check_text(text: str, *path: Any) -> None:
        if text not in checked_sources:
            try:
                check_source(text)
                checked_sources[text] = None
            except SqueezeError as exc:
                checked_sources[text] = in_words(exc, recipe_spelling)
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
        # a stage reads a safetensors folder when the model is one, or what a prune or distill stage wrote
        input_streams = _streamable_input(source) if index == 0 else isinstance(recipe.stages[index - 1], (PruneStage, DistillStage))
        if after_quantize is not None:
            problems.append(
                f"{head}comes after stage {after_quantize + 1} (quantize); a quantized checkpoint is final, so quantize must be the last stage"
            )
        try:
            if isinstance(stage, QuantizeStage):
                after_quantize = index
                entry.config = stage.config(current)
                entry.streamable = input_streams and _streams(QuantizeStep(entry.config))
                check_format(entry.config.format, entry.config.scheme, entry.config.method, entry.config.format_options)
                if current is not None:
                    plan_quantize(current, entry.config)
                if entry.config.needs_calibration:
                    entry.calibration_tokens = stage.calib_samples * seq_len
                    check_text(stage.calib_data or recipe.data, *path, "calib_data")
            elif isinstance(stage, PruneStage):
                entry.config = stage.config()
                entry.streamable = input_streams and _streams(PruneStep(entry.config))
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
            problems.append(f"{head}{in_words(exc, recipe_spelling)}")
        if entry.config is not None:
            _memory_estimate(entry, current if current is not None else original, original, recipe, evaluate, dtype_bytes)
        planned.append(entry)
    if problems:
        raise RecipeError(problems)
    return planned


def _streamable_input(source) -> bool:
    """Whether squeeze.passes.stream reads this model (a dense or sparse-bitmask safetensors folder)."""
    try:
        streamable_source(str(source.path), source.trust_remote_code)
    except SqueezeError:
        return False
    return True


def _streams(step: CompressionStep) -> bool:
    """Whether the step's config streams (squeeze.passes.stream)."""
    try:
        step.check_stream(RunSettings())
    except SqueezeError:
        return False
    return True


def _memory_estimate(entry: PlannedStage, model, original, recipe: Recipe, evaluate: bool, dtype_bytes: int) -> None:
    """Set ``entry.memory_bytes`` (resident) and, where the stage can stream, ``entry.stream_bytes``:
    rough peak RSS in bytes (squeeze.memory). Distillation holds the teacher and the student with
    its gradients and AdamW moments (4 copies, float32), the teacher's logits of one batch and the
    student's saved activations, and the evaluation's logits."""
    stage = entry.stage
    seq = min(recipe.seq_len, getattr(original.config, "max_position_embeddings", None) or recipe.seq_len)
    if isinstance(stage, DistillStage):
        config = model.config
        hidden = getattr(config, "hidden_size", 0)
        vocab = getattr(config, "vocab_size", 0)
        inter = getattr(config, "intermediate_size", 4 * hidden)
        heads = getattr(config, "num_attention_heads", 1)
        params = sum(p.numel() for p in model.parameters())
        if stage.stream_teacher:  # read one block at a time, into the cache and for the evaluation
            teacher = read_in_blocks_bytes(original, dtype_bytes)
        else:
            teacher = sum(p.numel() for p in original.parameters()) * dtype_bytes
        activations = stage.batch_size * seq * (len(all_blocks(model)) * (16 * hidden + 2 * inter + heads * seq) * 4 + vocab * 4)
        evaluation = 2 * 2 * (seq + metric_chunk(2, vocab)) * vocab * 4 if evaluate and vocab else 0
        entry.memory_bytes = PROCESS_BYTES + teacher + 16 * params + activations + evaluation
        return
    quantize = isinstance(stage, QuantizeStage)
    method_bytes = 0
    if entry.calibration_tokens:
        methods = METHODS if quantize else PRUNE_METHODS
        method_bytes = methods.get(stage.method).calibration_bytes(model, entry.calibration_tokens, dtype_bytes)
    shape = PassShape(
        quantize, method_bytes, entry.calibration_tokens, recipe.eval_tokens // seq * seq, seq, evaluate, entry.index > 0, dtype_bytes,
    )
    entry.memory_bytes = resident_bytes(model, original, shape)
    entry.block_bytes = block_bytes(model, dtype_bytes)
    if entry.streamable:
        entry.stream_bytes = streamed_bytes(model, original, shape)
        if entry.calibration_tokens:
            entry.spill_bytes = streamed_bytes(model, original, dataclasses.replace(shape, spilled=True))


def check_memory(
    plan: list[PlannedStage], memory_budget: int | str | None = None, what: str | None = None, stream: bool = False, device: str = "cpu",
) -> int | None:
    """Settle how each quantize or prune stage runs: held whole, or streamed one block at a time
    (``stream`` asks for it; a stage whose whole-model estimate is above the budget but whose
    streamed one fits gets it too, with its calibration activations spilled to disk when only
    that fits, and so does one whose model would not fit the free memory of a
    CUDA ``device``: only the current block goes to the GPU), and refuse (OptionError naming
    ``memory_budget``) a stage that fits neither way. The budget is ``memory_budget`` when given,
    else the memory available now less a margin. ``what`` names the work in the message (default:
    the stage). Returns the budget, None when there is none to check against."""
    gpu = accelerator_memory(device)
    for entry in plan:
        entry.stream = entry.streamable and (stream or gpu is not None and entry.memory_bytes > gpu)
    budget = parse_size(memory_budget, "memory_budget") if memory_budget is not None else default_memory_budget()
    if budget is None:
        return None
    for entry in plan:
        estimate = entry.stream_bytes if entry.stream else entry.memory_bytes
        if estimate is not None and estimate <= budget:
            continue
        if entry.stream_bytes is not None and entry.stream_bytes <= budget:
            entry.stream = True  # it fits one block at a time
            continue
        if entry.spill_bytes is not None and entry.spill_bytes <= budget:
            entry.stream = entry.spill = True  # it fits one block at a time with its calibration activations on disk
            continue
        name = what or f"stage {entry.index + 1} ({entry.folder})"
        limit = "the budget" if memory_budget is not None else "the memory available now less a margin"
        ways = f"{in_gib(entry.memory_bytes)} of memory held whole"
        if entry.stream_bytes is not None:
            ways += f", {in_gib(entry.stream_bytes)} one block at a time"
            if entry.spill_bytes is not None:
                ways += f", {in_gib(entry.spill_bytes)} with its calibration activations on disk"
            ways += f" (one block alone is {in_gib(entry.block_bytes)})"
        else:
            ways += " (it cannot stream: see --stream in --help)"
        raise OptionError(
            f"{literal(name)} needs about {literal(ways)} by squeeze's estimate, above {limit} ({in_gib(budget)}): "
            "free some memory, or set {0} if you know it fits",
            "memory_budget",
        )
    return budget


def check_pass_memory(
    stage: StageOptions, model: str, data: str, eval_tokens: int, seq_len: int, dtype: str, evaluate: bool,
    trust_remote_code: bool, memory_budget: int | str | None = None, stream: bool = False, device: str = "cpu",
) -> tuple[bool, bool]:
    """:func:`check_memory` for one pass run on its own, before it loads anything: whether it
    streams (asked for with ``stream``, or because only then it fits), and whether its
    calibration activations go to disk (only then it fits). A stage that does not plan is left
    to the pass, which says what is wrong in its own words."""
    if memory_budget is not None:
        parse_size(memory_budget, "memory_budget")
    try:
        _, plan = plan_run([stage], model, data, eval_tokens, seq_len, dtype, evaluate, trust_remote_code)
    except SqueezeError:
        return stream, False
    check_memory(plan, memory_budget, what=f"this {stage.pass_name} pass", stream=stream, device=device)
    return stream or plan[0].stream, plan[0].spill


def plan_run(
    recipe: Recipe | str | Path | Sequence, model: str, data: str | None = None, eval_tokens: int | None = None,
    seq_len: int | None = None, dtype: str = "float32", evaluate: bool = True, trust_remote_code: bool = False,
    max_shard_size: int | str | None = None,
) -> tuple[Recipe, list[PlannedStage]]:
    """The recipe (a file, a Recipe or a list of stage options) with the run's overrides, and its
    checked plan; nothing is loaded but the model's config. RecipeError lists every problem."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = recipe_from_stages(list(recipe))
    overrides = {k: v for k, v in (("data", data), ("eval_tokens", eval_tokens), ("seq_len", seq_len)) if v is not None}
    for key in ("eval_tokens", "seq_len"):
        if key in overrides and overrides[key] < 1:
            raise OptionError(f"{{0}} must be at least 1, got {overrides[key]}", key)
    if max_shard_size is not None:
        overrides["max_shard_size"] = parse_size(max_shard_size, "max_shard_size")
    recipe = dataclasses.replace(recipe, **overrides)
    compute_dtype = resolve_dtype(dtype)
    return recipe, plan_recipe(recipe, model, trust_remote_code, evaluate, compute_dtype.itemsize)


def run_recipe(
    recipe: Recipe | str | Path | Sequence,
    model: str,
    out: Path,
    data: str | None = None,
    eval_tokens: int | None = None,
    seq_len: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    on_stage: Callable | None = None,
    generation_prompts: int = GENERATION_PROMPTS,
    max_shard_size: int | str | None = None,
    memory_budget: int | str | None = None,
    stream: bool = False,
) -> dict | None:
    """Run the stages of ``recipe`` on ``model`` in order; return the summary (also ``out/summary.json``).

    ``recipe`` is a YAML file, a Recipe, or a list of stage options (QuantizeStage, PruneStage,
    DistillStage). ``data``, ``eval_tokens``, ``seq_len`` and ``max_shard_size`` override the recipe's.
    Quantize and prune stages run one transformer block at a time with ``stream``, or where only
    that fits ``memory_budget`` (default: the memory available now less a margin); a stage that
    fits neither way is refused before anything runs (:func:`check_memory`). Stage N reads
    what stage N-1 wrote and is scored against ``model``. Stages are written into ``OUT.partial/``
    (each stage folder atomically), which becomes ``out`` with summary.json/md/png at the end. If a
    stage fails or is interrupted, the finished ones stay in ``OUT.partial`` and ``resume``
    continues from the first stage whose folder is missing or was made from other settings (a
    distill stage also continues from its checkpoints). ``on_stage(planned)`` is called as each
    stage starts or is reused. A stage's errors name its options as the recipe does (``key:``).
    Under torchrun every process calls this and runs every stage with the others (quantize and
    prune share their calibration, distill trains data-parallel); process 0 alone writes and
    returns the summary, the others return None.
    """
    procs, device = start_processes(device)
    try:
        return _run_recipe(
            recipe, model, Path(out), data, eval_tokens, seq_len, device, dtype, evaluate, overwrite, resume, trust_remote_code,
            progress if procs.main else None, on_stage if procs.main else None, generation_prompts, max_shard_size,
            memory_budget, stream, procs,
        )
    finally:
        stop_processes(procs)


def _run_recipe(
    recipe: Recipe | str | Path | Sequence, model: str, out: Path, data: str | None, eval_tokens: int | None, seq_len: int | None,
    device: str, dtype: str, evaluate: bool, overwrite: bool, resume: bool, trust_remote_code: bool, progress: Progress | None,
    on_stage: Callable | None, generation_prompts: int, max_shard_size: int | str | None, memory_budget: int | str | None,
    stream: bool, procs: Processes,
) -> dict | None:
    progress = progress or NullProgress()
    check_output_dir(out, overwrite, local_inputs(model))
    resolve_device(device)
    recipe, plan = plan_run(recipe, model, data, eval_tokens, seq_len, dtype, evaluate, trust_remote_code, max_shard_size)
    check_memory(plan, memory_budget, stream=stream, device=device)
    staging = out.parent / f"{out.name}.partial"
    if staging.exists() and not staging.is_dir():
        raise SqueezeError(f"{staging} exists and is a file")
    if resume and not staging.is_dir():
        raise SqueezeError(f"nothing to resume: {staging} does not exist")
    if staging.exists() and not resume:
        if not overwrite:
            raise OptionError(
                f"{literal(staging)} holds the stages of an unfinished run: pass {{0}} to continue it, or {{1}} to start over",
                "resume", "overwrite",
            )
    procs.barrier()  # every process has checked the staging folder as it was before process 0 changes it
    if procs.main:
        if staging.exists() and not resume:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
    procs.barrier()

    settings = {
        "model": model, "data": recipe.data, "eval_tokens": recipe.eval_tokens, "seq_len": recipe.seq_len,
        "dtype": dtype, "evaluate": evaluate, "max_shard_size": recipe.max_shard_size,
    }
    reports: list[dict] = []
    reusing = True
    try:
        for entry in plan:
            folder = staging / entry.folder
            stages = [{p.stage.pass_name: p.stage.model_dump(mode="json")} for p in plan[: entry.index + 1]]
            identity = json.loads(json.dumps({"settings": settings, "stages": stages}))  # as stage.json holds it
            done = folder / STAGE_FILE
            if reusing and done.is_file() and json.loads(done.read_text()).get("identity") == identity:
                if on_stage:
                    on_stage(entry, reused=True)
                reports.append(json.loads((folder / "report.json").read_text()))
                continue
            reusing = False
            for stale in staging.iterdir() if procs.main else ():  # this stage and every later one are made again (a distill stage may resume)
                number = int(stale.name[:2]) if stale.name[:2].isdigit() else 0
                if number > entry.index + 1 or (number == entry.index + 1 and not stale.name.endswith(".checkpoints")):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            if on_stage:
                on_stage(entry, reused=False)
            source = model if entry.index == 0 else str(staging / plan[entry.index - 1].folder)
            stage = entry.stage
            reset_peak_rss()
            common = dict(eval_tokens=recipe.eval_tokens, seq_len=recipe.seq_len, device=device, dtype=dtype, evaluate=evaluate,
                          overwrite=True, trust_remote_code=trust_remote_code, progress=progress,
                          generation_prompts=generation_prompts, max_shard_size=recipe.max_shard_size)
            run = PASSES[stage.pass_name]
            try:
                if isinstance(stage, DistillStage):
                    teacher = {"original": model, "previous": source}.get(stage.teacher, stage.teacher)
                    student = source if stage.student == "previous" else stage.student
                    checkpoints = CheckpointDir(default_checkpoint_dir(folder))
                    report = run(
                        teacher, student, folder, entry.config, data=stage.data or recipe.data, eval_data=recipe.data,
                        resume=resume and checkpoints.read_run() is not None,
                        teacher_cache=Path(stage.teacher_cache) if stage.teacher_cache else None, stream_teacher=stage.stream_teacher,
                        **common,
                    )
                else:
                    config = entry.config
                    if isinstance(stage, QuantizeStage) and not entry.shapes_known and stage.needs_shapes:
                        config = stage.config(meta_model(resolve_model(source, trust_remote_code=trust_remote_code)))
                    report = run(
                        source, folder, config, data=recipe.data, calibration_data=stage.calib_data,
                        calibration_samples=stage.calib_samples, batch_size=stage.batch_size,
                        reference=model if entry.index else None, stream=entry.stream, spill_calibration=entry.spill,
                        memory_budget=memory_budget, **common,
                    )
            except SqueezeError as exc:
                failed = f"stage {entry.index + 1} ({entry.folder}): {in_words(exc, recipe_spelling)}"
                if entry.index:
                    raise OptionError(
                        f"{literal(failed)}; the finished stages are kept in {literal(staging)}: rerun with {{0}} to continue", "resume",
                    ) from None
                raise SqueezeError(failed) from None
            if not procs.main:
                continue  # a helping process: process 0 has published the stage (its pass ended on a barrier)
            assert report is not None
            reports.append(report.to_dict())
            done.write_text(json.dumps({"identity": identity, "memory_estimate_bytes": entry.estimate}, indent=1) + "\n")
        if not procs.main:
            procs.barrier()  # until process 0 has published the whole run
            return None
        summary = compare.write_summary(
            staging, f"squeeze recipe {recipe.name}: {model}", reports, reference_name(model),
            [(e.folder, e.estimate, _against_original(e)) for e in plan],
            recipe=recipe.name, source=str(recipe.source) if recipe.source else None, description=recipe.description, settings=settings,
            stages=[{"folder": e.folder, "pass": e.stage.pass_name, "options": e.stage.model_dump(exclude_defaults=True)} for e in plan],
        )
    except BaseException:
        if procs.main:
            keep_finished(staging, STAGE_FILE, keep=lambda item: item.name.endswith(".checkpoints") and any(item.iterdir()))
        raise
    publish_dir(staging, out, overwrite)
    procs.barrier()
    return summary


def _against_original(entry: PlannedStage) -> bool:
    """A stage's report compared with its input or teacher, and that model was the original."""
    teacher = getattr(entry.stage, "teacher", None)  # distill only
    return teacher == "original" or (entry.index == 0 and teacher in (None, "previous"))
