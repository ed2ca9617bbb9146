"""A compression pass in one process, or in every process torchrun started.

Under ``torchrun --nproc-per-node N`` each process runs the same pass on the same model and
calibration text. The block-by-block calibration is shared (squeeze.calib.parallel): each
process runs its share of the calibration batches through the current block, the statistics are
combined across processes, and each process solves its share of every layer's rows. Process 0
alone evaluates, writes the checkpoint and the report; the others stop after compressing and
wait for it, so a failure anywhere ends every process and leaves no output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from squeeze.calib.parallel import data_parallel
from squeeze.errors import OptionError, literal
from squeeze.passes.skeleton import CompressionStep, RunSettings, run_pass
from squeeze.passes.stream import stream_pass
from squeeze.processes import Processes, start_processes, stop_processes
from squeeze.progress import NullProgress, Progress
from squeeze.report import Report


def check_processes(step: CompressionStep, run: RunSettings, procs: Processes) -> None:
    """OptionError when the pass cannot share its calibration among ``procs``, before anything is read."""
    if procs.world == 1:
        return
    method = step.method
    if step.needs_calibration and not getattr(method, "data_parallel", True):
        raise OptionError(
            f"{literal(method.name)} cannot share its calibration among processes yet: run it as one process (without torchrun), "
            "or choose another {0}", "method",
        )
    if step.needs_calibration and -(-run.calibration_samples // run.batch_size) < procs.world:
        raise OptionError(
            f"{{0}} {run.calibration_samples} in batches of {{1}} {run.batch_size} give fewer batches than the {procs.world} "
            "processes: each process calibrates on one batch at least", "calib_samples", "batch_size",
        )
    if run.spill_calibration:
        raise OptionError("{0} is for one process: drop it under torchrun", "spill_calibration")


def run_compression(
    step: CompressionStep, model: str, out: Path, run: RunSettings, progress: Progress | None = None,
) -> Report | None:
    """Run ``step`` (streamed when ``run.stream``) in this process, sharing the calibration with
    the other processes when torchrun started several. Returns the report in process 0, None in
    the others."""
    procs, device = start_processes(run.device)
    threads = torch.get_num_threads()  # process 0 takes the idle processes' cores once they are done
    try:
        check_processes(step, run, procs)
        if procs.world > 1:
            # the helpers score nothing and time nothing: that is process 0's
            run = dataclasses.replace(
                run, device=device, evaluate=run.evaluate and procs.main, measure_speed=run.measure_speed and procs.main,
            )
            progress = progress if procs.main else NullProgress()
        with data_parallel(procs):
            report = (stream_pass if run.stream else run_pass)(step, model, out, run, progress, writes=procs.main)
        procs.barrier()  # the helpers end once process 0 has published
        return report
    finally:
        torch.set_num_threads(threads)
        stop_processes(procs)
