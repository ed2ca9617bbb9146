"""``squeeze quantize``, ``prune`` and ``distill``: one pass each, its report printed as tables or JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel

from squeeze.cli.app import (
    DataOption, DeviceOption, DtypeOption, EvalTokensOption, GenerationPromptsOption, JsonOption, MaxShardOption, MeasureSpeedOption,
    MemoryBudgetOption, ModelArg, NoEvalOption, OverwriteOption, QuietOption, SeqLenOption, StreamOption, TrustOption, app,
    at_least_one, call, err, fail, layer_shapes, model_stem, not_negative, print_report,
)
from squeeze.chain import check_pass_memory
from squeeze.cli.options import model_options, with_options
from squeeze.distill.checkpoint import default_checkpoint_dir
from squeeze.formats import PRUNED_FORMATS, QUANTIZED_FORMATS
from squeeze.passes.common import GENERATION_PROMPTS
from squeeze.passes.distill import distill as distill_pass
from squeeze.passes.prune import prune as prune_pass
from squeeze.passes.quantize import quantize as quantize_pass
from squeeze.progress import ConsoleProgress, NullProgress
from squeeze.recipes import DistillStage, PruneStage, QuantizeStage


# A pass's own options come from its recipe stage (and the stage's from the registered methods),
# listed as --help always listed them: the method's options, then format and layers; calibration
# text beside the command's --data, batch size beside its --seq-len.
CALIBRATION = ("calib_data", "calib_samples", "batch_size")


def _pass_options(stage: type[BaseModel]) -> dict[str, list]:
    """A pass stage's options, placed after the command's own ``model``, ``data`` and ``seq_len``
    (the formats' own options right after ``--format``)."""
    format_and_layers = tuple(
        name for name in ("format", *QUANTIZED_FORMATS.options(), "targets", "ignore") if name in stage.model_fields
    )
    return {
        "model": model_options(stage, exclude=CALIBRATION + format_and_layers) + model_options(stage, only=format_and_layers),
        "data": model_options(stage, only=CALIBRATION[:2]),
        "seq_len": model_options(stage, only=CALIBRATION[2:]),
    }


@app.command()
@with_options(**_pass_options(QuantizeStage))
def quantize(
    model: ModelArg,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default ./MODEL-SCHEME).")] = None,
    data: DataOption = "wikipedia",
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    measure_speed: MeasureSpeedOption = False,
    max_shard_size: MaxShardOption = "5GB",
    memory_budget: MemoryBudgetOption = None,
    stream: StreamOption = False,
    generation_prompts: GenerationPromptsOption = GENERATION_PROMPTS,
    **options: Any,
) -> None:
    """Quantize with one of the methods of --method to a compressed-tensors, GPTQ, bitsandbytes or GGUF checkpoint, with a memory and accuracy report."""
    at_least_one(
        ("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", options["batch_size"]),
        ("--calib-samples", options["calib_samples"]),
    )
    not_negative(("--generation-prompts", generation_prompts))
    method, fmt = options["method"], options["format"]
    stage = QuantizeStage(**options)
    shapes = call(layer_shapes, model, trust_remote_code) if stage.needs_shapes else None
    config = call(stage.config, shapes)
    scheme, mode = config.scheme, stage.resolved(None).mode
    if out_dir is None:
        stem = model_stem(model)
        suffix = f"{scheme.name}-{mode}" + (f"{scheme.weights.group_size}" if scheme.weights.group_size else "")
        suffix += f"-{method}" if method != QuantizeStage.model_fields["method"].default else ""
        out_dir = Path(f"{stem}-{QUANTIZED_FORMATS.get(fmt).output_name(suffix)}")
    stream, spill = call(
        check_pass_memory, stage, model, data, eval_tokens, seq_len, dtype, not no_eval, trust_remote_code, memory_budget, stream, device,
    )
    _run_pass(
        quantize_pass, model, out_dir, config, fmt, as_json, quiet,
        data=data, calibration_data=stage.calib_data, eval_tokens=eval_tokens, seq_len=seq_len,
        calibration_samples=stage.calib_samples, batch_size=stage.batch_size, device=device, dtype=dtype,
        evaluate=not no_eval, overwrite=overwrite, trust_remote_code=trust_remote_code, measure_speed=measure_speed,
        max_shard_size=max_shard_size, stream=stream, spill_calibration=spill, memory_budget=memory_budget,
        generation_prompts=generation_prompts,
    )


def _run_pass(fn, model: str, out_dir: Path, config, fmt: str, as_json: bool, quiet: bool, **options) -> None:
    """Run one pass of the API with progress on stderr; print its report as JSON or as tables."""
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, process 0 reports
    progress = NullProgress() if quiet or not main_process else ConsoleProgress(err)
    report = call(fn, model, out_dir, config, progress=progress, **options)
    if report is None:
        return
    formats = QUANTIZED_FORMATS if fn is quantize_pass else PRUNED_FORMATS
    print_report(report, out_dir, f"{formats.get(fmt).files_written.format(name=fmt)}, report.json, report.md", as_json, quiet)


def _layer_sparsity(entries: list[str]) -> dict[str, float]:
    """PATTERN=SPARSITY entries in order; a pattern given twice moves to its last place (the last match wins)."""
    parsed: dict[str, float] = {}
    for entry in entries:
        pattern, sep, value = entry.rpartition("=")
        try:
            if not sep or not pattern:
                raise ValueError
            parsed.pop(pattern, None)
            parsed[pattern] = float(value)
        except ValueError:
            fail(f"--layer-sparsity takes PATTERN=SPARSITY (for example '*.self_attn.*=0.3'), got {entry!r}")
    return parsed


@app.command()
@with_options(**_pass_options(PruneStage))
def prune(
    model: ModelArg,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default ./MODEL-METHOD-SPARSITY).")] = None,
    data: DataOption = "wikipedia",
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    measure_speed: MeasureSpeedOption = False,
    max_shard_size: MaxShardOption = "5GB",
    memory_budget: MemoryBudgetOption = None,
    stream: StreamOption = False,
    generation_prompts: GenerationPromptsOption = GENERATION_PROMPTS,
    **options: Any,
) -> None:
    """Prune (magnitude, Wanda or SparseGPT; unstructured or N:M) to a sparse checkpoint, with a memory and accuracy report."""
    at_least_one(("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", options["batch_size"]))
    not_negative(("--calib-samples", options["calib_samples"]), ("--generation-prompts", generation_prompts))
    stage = PruneStage(**options | {"layer_sparsity": _layer_sparsity(options["layer_sparsity"])})
    config = call(stage.config)
    fmt = stage.format
    if out_dir is None:
        stem = model_stem(model)
        amount = config.pattern.replace(":", "of") if config.pattern else f"{round(100 * (config.sparsity or 0))}"
        out_dir = Path(f"{stem}-{stage.method}-{amount}{PRUNED_FORMATS.get(fmt).suffix}")
    stream, spill = call(
        check_pass_memory, stage, model, data, eval_tokens, seq_len, dtype, not no_eval, trust_remote_code, memory_budget, stream, device,
    )
    _run_pass(
        prune_pass, model, out_dir, config, fmt, as_json, quiet,
        data=data, calibration_data=stage.calib_data, eval_tokens=eval_tokens, seq_len=seq_len,
        calibration_samples=stage.calib_samples, batch_size=stage.batch_size, device=device, dtype=dtype,
        evaluate=not no_eval, overwrite=overwrite, trust_remote_code=trust_remote_code, measure_speed=measure_speed,
        max_shard_size=max_shard_size, stream=stream, spill_calibration=spill, memory_budget=memory_budget,
        generation_prompts=generation_prompts,
    )


@app.command()
@with_options(
    # teacher, student and data are the command's own, worded for it; the cache is a folder
    eval_data=model_options(
        DistillStage, exclude=("teacher", "student", "data", "batch_size"), overrides={"teacher_cache": {"annotation": Optional[Path]}},
    ),
    seq_len=model_options(DistillStage, only=("batch_size",)),
)
def distill(
    teacher: Annotated[str, typer.Argument(help="The model to imitate: built-in name, HF directory, .gguf file or hub id.")],
    student: Annotated[str, typer.Argument(help="layers:K (K evenly spaced teacher blocks, teacher weights), layers:I,J,... (those blocks), depth:F (that share of the blocks, e.g. depth:0.5), width:F (hidden/MLP sizes x F, random init), or a model path (e.g. a squeeze prune output: its zeros are kept).")],
    data: Annotated[str, typer.Option(help="Training text (its training side) and, unless --eval-data, evaluation text (its held-out side): wikipedia, bbc, shakespeare, or a .txt file/folder.")] = "wikipedia",
    eval_data: Annotated[Optional[str], typer.Option(help="Evaluation text, if not the held-out side of --data.")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Where checkpoints go (default OUT.checkpoints; removed when the run finishes).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint; ends with the weights an uninterrupted run would have.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard the student, its gradients and AdamW moments over the processes (FSDP) instead of replicating it (DDP).")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default ./TEACHER-distill-STUDENT).")] = None,
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Teacher compute dtype: float32, bfloat16 or float16 (the student trains in float32).")] = "float32",
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    measure_speed: MeasureSpeedOption = False,
    max_shard_size: MaxShardOption = "5GB",
    **options: Any,
) -> None:
    """Distill TEACHER into STUDENT (temperature KD + cross-entropy, or embedding loss for encoders); resumable; runs under torchrun."""
    at_least_one(
        ("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", options["batch_size"]),
        ("--grad-accum", options["grad_accum"]),
    )
    teacher_cache = options.pop("teacher_cache")
    # the command line's values are checked by DistillConfig, in its words, not by pydantic's bounds
    stage = DistillStage.model_construct(teacher=teacher, student=student, data=data, teacher_cache=None, **options)
    config = call(stage.config, seq_len, int(os.environ.get("WORLD_SIZE", "1")), fsdp)
    if out_dir is None:
        out_dir = Path(f"{model_stem(teacher)}-distill-{model_stem(student).replace(':', '').replace(',', '-')}")
    main_process = os.environ.get("RANK", "0") == "0"
    progress = ConsoleProgress(err) if main_process and not quiet else NullProgress()
    checkpoints = checkpoint_dir or default_checkpoint_dir(out_dir)
    hint = f"; continue from the last checkpoint in {checkpoints} with --resume" if stage.checkpoint_every else ""
    report = call(
        distill_pass, teacher, student, out_dir, config, interrupted=f"interrupted; the output is written whole or not at all{hint}", data=data,
        eval_data=eval_data, eval_tokens=eval_tokens, seq_len=seq_len, device=device, dtype=dtype, evaluate=not no_eval,
        overwrite=overwrite, resume=resume, checkpoint_dir=checkpoint_dir, teacher_cache=teacher_cache,
        trust_remote_code=trust_remote_code, progress=progress, measure_speed=measure_speed, max_shard_size=max_shard_size,
        stream_teacher=stage.stream_teacher,
    )
    if report is None:
        return
    print_report(report, out_dir, "safetensors, config.json, report.json, report.md, loss_curve.json/png", as_json, quiet)
