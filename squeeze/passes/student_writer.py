"""The distill pass's write and report step: the trained student (dense, or pruned with its zeros
kept in the input's format), its loss curve and the report, written into ``out`` atomically."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from squeeze.distill.checkpoint import TrainingState
from squeeze.distill.config import DistillConfig
from squeeze.distill.student import StudentSpec
from squeeze.distill.trainer import autocast_for
from squeeze.evaluate import checkpoint_bytes, parameter_count, peak_rss_bytes, tensor_bytes
from squeeze.formats.files import MAX_SHARD_BYTES, dense_tensors, save_safetensors, write_config_files
from squeeze.formats import PRUNED_FORMATS
from squeeze.models import LoadedModel
from squeeze.passes.common import Stopwatch, model_info, sparsity_structure
from squeeze.passes.skeleton import publish
from squeeze.progress import Progress
from squeeze.report import AccuracyReport, Report, SizeReport, TrainingReport, plot_loss_curve


@dataclass
class Distilled:
    """A finished distillation, as the writer needs it."""

    teacher_spec: str
    student_spec: str
    spec: StudentSpec
    teacher: LoadedModel
    student: torch.nn.Module
    student_parameters: int
    config: DistillConfig
    layer_map: tuple[tuple[int, int], ...]
    masks: dict[str, torch.Tensor]  # pruned student: parameter name → keep mask
    sparse_format: str | None  # the pruned student's input format, kept for the output
    state: TrainingState
    resumed_from: int | None
    processes: int
    data: str
    eval_data: str
    training_windows: int
    seq_len: int
    teacher_cache: Path | None
    accuracy: AccuracyReport | None
    device: str
    dtype: str
    notes: list[str] = field(default_factory=list)  # what the pass itself has to say


def write_student(
    out: Path, overwrite: bool, done: Distilled, watch: Stopwatch, progress: Progress, measure_speed: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Report:
    """Save the trained student (safetensors files of at most ``max_shard_bytes``), its loss curve
    and the report into ``out``, atomically."""
    config, teacher, net, state = done.config, done.teacher, done.student, done.state
    causal = teacher.source.kind == "causal"
    stored = teacher.stored_dtype
    teacher_bytes = checkpoint_bytes(teacher.model, stored)  # the teacher may be streamed: counted, not copied
    notes = list(done.notes)
    if done.masks:
        notes.append(
            f"the student was pruned: {len(done.masks)} layer(s) kept their zeros through training "
            f"({sum(int((~m).sum()) for m in done.masks.values()):,} weights held at exactly 0)"
        )
    if done.layer_map and net.config.hidden_size != teacher.config.hidden_size:
        notes.append("the hidden-state loss trained projections onto the teacher's width; they are not part of the student")
    if not causal and (config.alpha != DistillConfig.alpha or config.temperature != DistillConfig.temperature):
        notes.append("temperature and alpha apply to language-model logits; an encoder is distilled on its embeddings")
    curve = state.curve

    def linear_bytes(model: torch.nn.Module) -> int:
        return sum(m.weight.numel() * stored.itemsize for m in model.modules() if isinstance(m, torch.nn.Linear))

    def assemble(tmp: Path) -> Report:
        with watch.stage("save"), progress.status(f"writing {out}"):
            loading = ""
            if done.masks:
                layers = {name.removesuffix(".weight"): net.get_submodule(name.removesuffix(".weight")) for name in done.masks}
                zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
                structure = sparsity_structure(layers) or "unstructured"
                sparsity = sum(zeros.values()) / sum(m.weight.numel() for m in layers.values())
                fmt = PRUNED_FORMATS.get(done.sparse_format or "dense")
                files = fmt.write(net, structure, sparsity, list(layers), tmp, teacher.tokenizer, stored, max_shard_bytes).files
                loading = fmt.loading(out, teacher.source.kind)
            else:
                write_config_files(net, tmp, None, teacher.tokenizer, stored)
                files = save_safetensors(dense_tensors(net, stored), tmp, max_shard_bytes)
            (tmp / "loss_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
            plot_loss_curve(curve, tmp / "loss_curve.png", f"distill {teacher.source.name} → {done.student_spec}")
        training = TrainingReport(
            teacher=teacher.source.name,
            student=done.student_spec,
            teacher_parameters=parameter_count(teacher.model),
            student_parameters=done.student_parameters,
            teacher_bytes=teacher_bytes,
            student_bytes=sum(f.stat().st_size for f in files),
            steps=state.step,
            tokens=state.tokens,
            train_seconds=state.train_seconds,
            processes=done.processes,
            loss_first=curve[0]["loss"] if curve else float("nan"),
            loss_last=curve[-1]["loss"] if curve else float("nan"),
            teacher_cache=str(done.teacher_cache) if done.teacher_cache else None,
            resumed_from_step=done.resumed_from,
        )
        loss_name = (
            (f"KD τ={config.temperature:g}, α={config.alpha:g}" if config.alpha > 0 else "cross-entropy only (α=0)")
            if causal
            else f"embedding {config.embedding_loss}"
        ) + (f" + hidden {config.hidden_loss} x{config.hidden_weight:g}" if config.hidden_loss else "")
        settings = {
            "scheme": f"{loss_name}; student {done.student_spec}",
            "student": done.spec.describe(),
            "loss": loss_name,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "hidden_loss": config.hidden_loss,
            "layer_map": [f"{s}:{t}" for s, t in done.layer_map],
            "steps": config.steps,
            "batch": f"{config.batch_size} windows x {config.grad_accum} accumulation x {done.processes} process(es) of {done.seq_len} tokens",
            "parallelism": "FSDP (student sharded)" if config.fsdp else ("DDP" if done.processes > 1 else "one process"),
            "optimizer": f"AdamW lr {config.lr:g} (warmup {config.warmup_steps} steps, cosine to {config.min_lr_ratio:g}x), "
            f"weight decay {config.weight_decay:g}, clip {config.max_grad_norm:g}",
            "precision": "bf16 autocast" if autocast_for(done.device, config.precision) is not contextlib.nullcontext else "fp32",
            "seed": config.seed,
            "training_data": f"{done.data}: {done.training_windows} windows of {done.seq_len} tokens (training side)",
            "evaluation_data": done.eval_data,
            "teacher_cache": (
                f"{done.teacher_cache} (per token: the teacher's {config.cache_topk} most likely tokens"
                + (f" and {config.cache_samples} draws from the rest)" if config.cache_samples else ")")
                if done.teacher_cache
                else None
            ),
        }
        size = SizeReport(
            parameters=training.teacher_parameters,
            compressed_parameters=done.student_parameters,
            disk_bytes_before=teacher_bytes,
            disk_bytes_after=training.student_bytes,
            memory_bytes_before=tensor_bytes(teacher.model),
            memory_bytes_after=tensor_bytes(net),
            linear_bytes_before=linear_bytes(teacher.model),
            linear_bytes_after=linear_bytes(net),
        )
        report = Report(
            pass_name="distill",
            model=model_info(done.teacher_spec, teacher.source, teacher.model),
            settings=settings,
            size=size,
            timings_s=dict(watch.timings),
            peak_rss_bytes=peak_rss_bytes(),
            peak_rss_stage=watch.peak_stage,
            device=f"{done.device}, {done.dtype} teacher compute",
            accuracy=done.accuracy,
            notes=notes,
            training=training,
            loading=loading,
        )
        return report

    speed = (done.teacher_spec, done.eval_data, done.device.split(",")[0]) if measure_speed else None
    return publish(out, overwrite, assemble, watch, progress, speed)
