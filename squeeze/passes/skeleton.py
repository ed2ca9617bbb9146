"""The one shape of a compression pass: prepare → compress → evaluate → write → report.

``run_pass`` does every step but the pass's own: it checks everything cheap and loads the model
(``prepare``), runs the step's ``compress`` on the calibration batches, scores the result against
the reference, has the step write its checkpoint into a temporary folder that is published only
when everything succeeded, and assembles the report from the step's parts. Quantize and prune are
a :class:`CompressionStep` each; distillation trains instead of compressing and shares the same
evaluation and :func:`publish` tail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from squeeze import __version__
from squeeze.calib.parallel import calibration_processes, share
from squeeze.processes import local_processes
from squeeze.device import resolve_dtype
from squeeze.errors import OptionError
from squeeze.evaluate import checkpoint_bytes, peak_rss_bytes, tensor_bytes
from squeeze.formats import Written
from squeeze.formats.files import MAX_SHARD_BYTES
from squeeze.linears import has_experts, uncompressed_matrices
from squeeze.memory import PassShape, resident_bytes, streamed_bytes
from squeeze.models import ModelSource, atomic_output_dir, load_tokenizer, meta_model, resolve_model, stored_dtype
from squeeze.models.output import check_disk_space
from squeeze.passes.common import (
    GENERATION_PROMPTS, Checked, Prepared, Stopwatch, batches, check_inputs, check_speed_kind, evaluate_accuracy, model_info, prepare,
    record_input, reference_name, speed_comparison,
)
from squeeze.progress import NullProgress, Progress
from squeeze.report import AccuracyReport, LayerReport, Report, SizeReport, SparsityReport, write_report


@dataclass(frozen=True)
class RunSettings:
    """What every pass run is told besides its model, output folder and config.

    ``data`` is the evaluation text (and the calibration text unless ``calibration_data`` names
    another; the two use disjoint documents); ``eval_tokens`` is rounded down to whole windows of
    ``seq_len`` tokens; ``dtype`` is the compute dtype; ``reference`` names the model the
    evaluation compares with (default: the input itself)."""

    data: str = "wikipedia"
    calibration_data: str | None = None
    eval_tokens: int = 16384
    seq_len: int = 512
    calibration_samples: int = 128
    batch_size: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    evaluate: bool = True
    overwrite: bool = False
    trust_remote_code: bool = False
    reference: str | None = None
    measure_speed: bool = False
    generation_prompts: int = GENERATION_PROMPTS
    max_shard_size: int = MAX_SHARD_BYTES  # bytes per safetensors file written
    stream: bool = False  # one block in memory at a time (squeeze.passes.stream)
    spill_calibration: bool = False  # streamed, with the calibration activations on disk (squeeze.calib.spill)
    memory_budget: int | None = None  # bytes a streamed pass may hold the whole model in for generation (None: what is available)

    def calibration_line(self, windows: torch.Tensor | None, no_data: str) -> dict[str, Any]:
        """The report's ``calibration`` and ``calibration_tokens`` settings."""
        if windows is None:
            return {"calibration": no_data, "calibration_tokens": 0}
        return {
            "calibration": f"{self.calibration_data or self.data}: {windows.shape[0]} x {windows.shape[1]} tokens",
            "calibration_tokens": int(windows.numel()),
        }


@dataclass
class ReportParts:
    """A step's own share of the report; the skeleton adds model, timings, memory, accuracy."""

    settings: dict[str, Any]
    compressed_parameters: int
    linear_bytes_before: int
    linear_bytes_after: int
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sparsity: SparsityReport | None = None
    loading: str = ""


class CompressionStep:
    """A pass's own step. One instance per run: it may keep what it measured between calls."""

    name: ClassVar[str]  # the report's pass_name and the stopwatch stage of ``compress``
    method: Any  # the method's registry entry (its calibration_bytes feed the memory estimate)

    @property
    def needs_calibration(self) -> bool:
        raise NotImplementedError

    def check(self, run: RunSettings) -> None:
        """Cheap checks of the config before anything is read."""

    def plan(self, model: nn.Module) -> dict:
        """The layers the step will change (validates patterns and shapes; the meta model is enough)."""
        raise NotImplementedError

    def check_tokenizer(self, tokenizer_of: Callable[[], Any], config: Any) -> None:
        """Raise SqueezeError when the output cannot hold the model's tokenizer (``tokenizer_of()``
        loads it; ``config`` is the model's); cheap, before the model is loaded."""

    def start(self, prep: Prepared) -> tuple[str, int]:
        """Note what of the input the report needs before it changes; the progress label and steps."""
        raise NotImplementedError

    def compress(self, model: nn.Module, calibration: list[dict[str, torch.Tensor]] | None, on_step: Callable[[str], None]) -> float:
        """Change ``model`` in place; return the seconds of that spent running calibration text."""
        raise NotImplementedError

    def write(self, model: nn.Module, prep: Prepared, folder: Path, max_shard_bytes: int) -> Written:
        """Write the checkpoint into ``folder``, in safetensors files of at most ``max_shard_bytes``."""
        raise NotImplementedError

    def report(self, model: nn.Module, prep: Prepared, written: Written, run: RunSettings, out: Path) -> ReportParts:
        """The step's share of the report; ``out`` is where the checkpoint will be published."""
        raise NotImplementedError

    def memory_estimate(self, model: nn.Module, prep: Prepared, run: RunSettings, streamed: bool) -> int:
        """squeeze.memory's estimate of this run's peak RSS (``model``: the input, the meta model is enough)."""
        dtype_bytes = resolve_dtype(run.dtype).itemsize
        calibration = prep.calib_windows.numel() if prep.calib_windows is not None else 0
        original = meta_model(resolve_model(run.reference, trust_remote_code=run.trust_remote_code)) if run.reference else model
        shape = PassShape(
            self.name == "quantize", self.method.calibration_bytes(model, calibration, dtype_bytes) if calibration else 0, calibration,
            prep.eval_windows.numel() if prep.eval_windows is not None else 0, prep.seq_len, prep.eval_windows is not None,
            run.reference is not None, dtype_bytes, streamed and run.spill_calibration,
        )
        return (streamed_bytes if streamed else resident_bytes)(model, original, shape)

    # Streaming (squeeze.passes.stream): the model is never whole in memory. The step sees one
    # part at a time (a block, then everything outside the blocks), before and after compression.

    def check_stream(self, run: RunSettings) -> None:
        """OptionError (naming ``stream``) when this config cannot be streamed."""
        raise OptionError(f"{{0}} does not run {self.name}", "stream")

    @property
    def blockwise(self) -> bool:
        """Whether ``compress`` walks the blocks itself (squeeze.calib.pipeline); otherwise the
        streamed pass calls ``compress_part`` for each part and ``finish_parts`` at the end."""
        raise NotImplementedError

    def observe_part(self, layers: dict[str, nn.Module]) -> None:
        """The planned layers of a part just read, before anything changes them."""

    def compress_part(self, model: nn.Module, names: tuple[str, ...], on_step: Callable[[str], None]) -> None:
        """Compress the planned layers ``names`` (all in the part that is in memory)."""
        raise NotImplementedError

    def finish_parts(self) -> float:
        """After the last ``compress_part``: what ``compress`` returns."""
        raise NotImplementedError

    def part_tensors(self, part: nn.Module, base: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one compressed ``part`` whose names start with ``base``
        (unchanged floating tensors in ``dtype``)."""
        raise NotImplementedError

    def write_config(self, model: nn.Module, prep: Prepared, folder: Path) -> list[str]:
        """After every part's tensors: config.json and tokenizer into ``folder``; the notes of :class:`Written`."""
        raise NotImplementedError


def check_run(step: CompressionStep, model: str, out: Path, run: RunSettings, resolve: Callable[[str], ModelSource]) -> Checked:
    """:func:`~squeeze.passes.common.check_inputs` with this run's settings: the checks and text
    windows a pass starts with, held whole or streamed; last, the output's disk must have room for
    the smallest checkpoint the step could write."""
    checked = check_inputs(
        model, out, run.overwrite, run.device, run.dtype, run.data, run.calibration_data, run.evaluate, step.needs_calibration,
        step.plan, run.eval_tokens, run.seq_len, run.calibration_samples, run.reference, resolve,
    )
    step.check_tokenizer(lambda: checked.tokenizer or load_tokenizer(checked.source), checked.meta.config)
    check_disk_space(out, least_output_bytes(checked.meta, checked.plan, stored_dtype(checked.source)))
    return checked


def least_output_bytes(meta: nn.Module, planned: Iterable[str], dtype: torch.dtype) -> int:
    """The fewest bytes a checkpoint of ``meta`` (the meta model is enough) can take when a step
    changes the ``planned`` layers: every tensor stored in ``dtype`` (tied ones once), but the
    planned layers' weights at one bit each, fewer than any format keeps (a sparse bitmask
    spends that on its mask alone)."""
    weights = sum(meta.get_submodule(name).weight.numel() for name in planned)
    return max(checkpoint_bytes(meta, dtype) - weights * dtype.itemsize, 0) + weights // 8


def run_pass(
    step: CompressionStep, model: str, out: Path, run: RunSettings, progress: Progress | None = None, writes: bool = True,
) -> Report | None:
    """Run ``step`` on ``model`` into ``out`` (see the module docstring); return the report, also
    written to ``out/report.json`` and ``out/report.md``. Without ``writes`` (a process that only
    helps calibrate: squeeze.passes.launch) the pass stops after ``compress`` and returns None."""
    step.check(run)
    if run.spill_calibration:
        raise OptionError("{0} keeps a streamed pass's calibration activations on disk: add {1}", "spill_calibration", "stream")
    progress = progress or NullProgress()
    watch = Stopwatch()
    out = Path(out)

    def record(reference: nn.Module, kind: str, tokenizer, windows: torch.Tensor) -> nn.Module:
        # before the step changes anything: no copy of the model it compares with is kept
        return record_input(reference, kind, windows, run.data, run.batch_size, watch, progress, tokenizer, run.generation_prompts)

    checked = check_run(step, model, out, run, lambda spec: resolve_model(spec, trust_remote_code=run.trust_remote_code))
    prep = prepare(checked, step.plan, watch, progress, record)
    if run.measure_speed:
        check_speed_kind(prep.source.kind)
    net = prep.loaded.model
    estimate = step.memory_estimate(net, prep, run, streamed=False)
    label, total = step.start(prep)
    prep.plan = {}  # the step replaces layers in place: holding them here would keep every dense weight alive
    calibration = list(batches(prep.calib_windows, run.batch_size, prep.device, net)) if prep.calib_windows is not None else None
    with watch.stage(step.name), progress.task(label, total) as advance:
        calibration_s = step.compress(net, calibration, lambda _name: advance(1))
    if calibration is not None:
        # a calibrating method interleaves running calibration text and its own work: split the time
        watch.timings["calibrate"] = calibration_s
        watch.timings[step.name] -= calibration_s
    shares = process_shares(calibration, watch)
    del calibration
    if not writes:
        return None
    if shares and prep.device == "cpu":
        # the other processes on this machine are done: their cores are free for the evaluation and writing
        torch.set_num_threads(torch.get_num_threads() * local_processes())

    accuracy = None
    if prep.eval_windows is not None and prep.reference is not None:
        accuracy = evaluate_accuracy(
            net, prep.source.kind, prep.reference, prep.eval_windows, run.data, prep.seq_len, run.batch_size, watch,
            progress, reference_name(run.reference), prep.loaded.tokenizer, run.generation_prompts,
        )
        prep.reference = None

    def assemble(folder: Path) -> Report:
        with watch.stage("save"), progress.status(f"writing {out}"):
            written = step.write(net, prep, folder, run.max_shard_size)
        parts = step.report(net, prep, written, run, out)
        size = SizeReport(
            parameters=prep.parameters, compressed_parameters=parts.compressed_parameters, disk_bytes_before=prep.disk_before,
            disk_bytes_after=sum(f.stat().st_size for f in written.files), memory_bytes_before=prep.memory_before,
            memory_bytes_after=tensor_bytes(net), linear_bytes_before=parts.linear_bytes_before, linear_bytes_after=parts.linear_bytes_after,
        )
        return step_report(
            step, model_info(model, prep.source, net), parts, size, watch, f"{prep.device}, {run.dtype} compute", estimate, accuracy, net,
            settings=shares,
        )

    speed = (model, run.data, prep.device) if run.measure_speed else None
    return publish(out, run.overwrite, assemble, watch, progress, speed)


def process_shares(calibration: list[dict[str, torch.Tensor]] | None, watch: Stopwatch) -> dict[str, Any]:
    """Under data-parallel calibration (squeeze.calib.parallel), the report's ``processes`` and
    ``per_process`` settings: each process's calibration tokens and seconds per stage so far
    (every process calls this; empty with one process)."""
    procs = calibration_processes()
    if procs.world == 1:
        return {}
    tokens = sum(batch["input_ids"].numel() for batch in share(calibration)) if calibration else 0
    shares = procs.gather_objects((tokens, {stage: round(s, 1) for stage, s in watch.timings.items()}))
    return {
        "processes": procs.world,
        "per_process": "; ".join(
            f"process {rank}: {tokens:,} calibration tokens, " + ", ".join(f"{stage} {s:g} s" for stage, s in timings.items())
            for rank, (tokens, timings) in enumerate(shares)
        ),
    }


def step_report(
    step: CompressionStep, model: dict, parts: ReportParts, size: SizeReport, watch: Stopwatch, device: str, estimate: int,
    accuracy: AccuracyReport | None, net: nn.Module, settings: dict | None = None, notes: list[str] | None = None,
) -> Report:
    """A compression pass's report from the step's parts and what the skeleton measured
    (``settings`` and ``notes`` added to the step's own); ``net`` is the model the step compressed
    (every weight matrix it left alone is listed with why)."""
    tokens = parts.settings.get("calibration_tokens", 0)
    if tokens and has_experts(net):
        # no expert is calibrated on too few tokens, so none falls back to round-to-nearest
        notes = [*(notes or []), f"every expert was calibrated on all {tokens:,} calibration tokens (the blocks' outputs kept the real routing)"]
    return Report(
        pass_name=step.name,
        model=model,
        settings={**parts.settings, **(settings or {})},
        size=size,
        timings_s=dict(watch.timings),
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_stage=watch.peak_stage,
        device=device,
        memory_estimate_bytes=estimate,
        accuracy=accuracy,
        layers=parts.layers,
        notes=parts.notes + (notes or []),
        sparsity=parts.sparsity,
        loading=parts.loading,
        uncompressed=uncompressed_matrices(net, {layer.name for layer in parts.layers}),
    )


def publish(
    out: Path, overwrite: bool, assemble: Callable[[Path], Report], watch: Stopwatch, progress: Progress,
    speed: tuple[str, str, str] | None = None,
) -> Report:
    """Write a pass's output atomically: ``assemble(folder)`` writes the checkpoint into a temporary
    folder and returns the report; with ``speed`` = (input model, text, device) the report also gets
    prefill/decode speed of input and output; then report.json/md, and the folder becomes ``out``."""
    with atomic_output_dir(out, overwrite=overwrite) as folder:
        report = assemble(folder)
        report.squeeze_version = __version__
        report.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if speed is not None:
            model, data, device = speed
            report.speed = speed_comparison(model, folder, data, device, watch, progress)
        write_report(report, folder)
    return report
