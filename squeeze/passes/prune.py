"""The prune pass: its own step on the pass skeleton (squeeze.passes.skeleton)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import OptionError
from squeeze.formats import PRUNED_FORMATS, Written
from squeeze.formats.files import MAX_SHARD_BYTES, dense_tensors
from squeeze.formats.sparse import bitmask_bytes
from squeeze.passes.common import GENERATION_PROMPTS, Prepared, sparsity_report
from squeeze.passes.skeleton import CompressionStep, ReportParts, RunSettings
from squeeze.passes.launch import run_compression
from squeeze.progress import Progress
from squeeze.prune.apply import PruneConfig, plan_prune, prune_model
from squeeze.prune.layers import PruneResult
from squeeze.prune.methods import PRUNE_METHODS
from squeeze.report import LayerReport, Report
from squeeze.sizes import parse_size


class PruneStep(CompressionStep):
    """Zero the targeted Linear layers' weights with ``config``'s method; write them in its format."""

    name = "prune"

    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        self.method = PRUNE_METHODS.get(config.method)
        self.format = PRUNED_FORMATS.get(config.format)
        self.result: PruneResult | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.config.needs_calibration

    def check(self, run: RunSettings) -> None:
        if self.needs_calibration and run.calibration_samples < 1:
            raise OptionError(
                f"{self.config.method} measures the layers' input activations: it needs calibration text ({{0}} >= 1)", "calib_samples"
            )

    def plan(self, model: nn.Module) -> dict:
        return plan_prune(model, self.config)

    def start(self, prep: Prepared) -> tuple[str, int]:
        self.targets = {name: sparsity for name, (_, sparsity) in prep.plan.items()}
        self.plan_entries = dict(prep.plan)  # pruned in place: holding the layers keeps nothing extra alive
        self.parts: list[PruneResult] = []
        self.stored_bytes = self.bitmask_bytes = 0
        self.calib_windows = prep.calib_windows
        self.linear_flops = prep.linear_flops
        return self.method.steps(prep.loaded.model, prep.plan)

    def compress(self, model: nn.Module, calibration, on_step: Callable[[str], None]) -> float:
        self.result = prune_model(model, self.config, calibration, on_step=on_step)
        return self.result.calibration_s

    def write(self, model: nn.Module, prep: Prepared, folder: Path, max_shard_bytes: int) -> Written:
        result = self.result
        assert result is not None
        stored = prep.loaded.stored_dtype
        modules = dict(model.named_modules())
        self.stored_bytes = sum(self.format.weight_bytes(modules[layer.name].weight, stored) for layer in result.layers)
        self.bitmask_bytes = sum(bitmask_bytes(modules[layer.name].weight, stored) for layer in result.layers)
        self._sparsity(stored)
        return self.format.write(
            model, self.config.structure, self.sparsity.sparsity, [layer.name for layer in result.layers], folder,
            prep.loaded.tokenizer, stored, max_shard_bytes,
        )

    def _sparsity(self, stored: torch.dtype) -> None:
        result = self.result
        assert result is not None
        self.dense_bytes = sum(layer.numel * stored.itemsize for layer in result.layers)
        numel = sum(layer.numel for layer in result.layers)
        self.sparsity = sparsity_report(
            self.config.structure,
            sum(self.targets[layer.name] * layer.numel for layer in result.layers) / max(numel, 1),
            [(layer.numel, layer.zeros) for layer in result.layers],
            self.linear_flops,
            self.dense_bytes,
            self.bitmask_bytes,  # what a bitmask layout takes
        )

    def check_stream(self, run: RunSettings) -> None:
        if self.config.scope == "global":
            raise OptionError("{0} prunes one block at a time: a {1} ranking needs every layer at once", "stream", "scope global")

    @property
    def blockwise(self) -> bool:
        return self.method.needs_calibration

    def compress_part(self, model: nn.Module, names: tuple[str, ...], on_step: Callable[[str], None]) -> None:
        plan = {name: self.plan_entries[name] for name in names if self.plan_entries[name][1] > 0}
        self.parts.append(self.method.run(model, self.config, plan, None, on_step))

    def finish_parts(self) -> float:
        dense = [name for name, (_, sparsity) in self.plan_entries.items() if sparsity == 0]
        self.result = PruneResult(layers=[e for r in self.parts for e in r.layers], dense=dense, notes=[n for r in self.parts for n in r.notes])
        return 0.0

    def part_tensors(self, part: nn.Module, base: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        pruned = [name for name, _ in part.named_modules() if self.targets.get(base + name, 0) > 0]
        for name in pruned:
            weight = part.get_submodule(name).weight
            self.stored_bytes += self.format.weight_bytes(weight, dtype)
            self.bitmask_bytes += bitmask_bytes(weight, dtype)
        state = {base + k: v for k, v in dense_tensors(part, dtype).items()}
        return self.format.encode(state, [base + name for name in pruned])

    def write_config(self, model: nn.Module, prep: Prepared, folder: Path) -> list[str]:
        assert self.result is not None
        self._sparsity(prep.loaded.stored_dtype)
        self.format.write_config(model, self.config.structure, self.sparsity.sparsity, [layer.name for layer in self.result.layers], folder, prep.loaded.tokenizer, prep.loaded.stored_dtype)
        return list(self.format.notes)

    def report(self, model: nn.Module, prep: Prepared, written: Written, run: RunSettings, out: Path) -> ReportParts:
        config, result = self.config, self.result
        assert result is not None
        notes = list(result.notes)
        if result.dense:
            notes.append(f"{len(result.dense)} targeted layer(s) left dense by --layer-sparsity: {', '.join(result.dense)}")
        settings = {
            "scheme": f"{config.method} {config.pattern or f'{config.sparsity:.0%} unstructured'}"
            + (" (global ranking)" if config.scope == "global" else ""),
            "method": config.method,
            "sparsity": config.sparsity,
            "pattern": config.pattern or "unstructured",
            "scope": config.scope if config.n_m is None else "per group of M inputs",
            "layer_sparsity": [f"{p}={v:g}" for p, v in config.layer_sparsity],
            **config.options.settings(),
            "sparsity_ramp": config.sparsity_ramp,
            "format": f"{config.format} (compressed-tensors sparsity_config)",
            "targets": list(config.targets) or ["all Linear layers"],
            "ignore": list(config.ignore),
            **run.calibration_line(self.calib_windows, self.method.no_data),
        }
        return ReportParts(
            settings=settings,
            compressed_parameters=self.sparsity.parameters,
            linear_bytes_before=self.dense_bytes,
            linear_bytes_after=self.stored_bytes,
            layers=[
                LayerReport(
                    layer.name, layer.shape, layer.relative_error, layer.max_abs_error, layer.output_error, None,
                    layer.sparsity, layer.numel - layer.zeros,
                )
                for layer in result.layers
            ],
            notes=notes + written.notes,
            sparsity=self.sparsity,
            loading=self.format.loading(out, prep.source.kind),
        )


def prune(
    model: str,
    out: Path,
    config: PruneConfig,
    data: str = "wikipedia",
    calibration_data: str | None = None,
    eval_tokens: int = 16384,
    seq_len: int = 512,
    calibration_samples: int = 128,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    reference: str | None = None,
    measure_speed: bool = False,
    generation_prompts: int = GENERATION_PROMPTS,
    max_shard_size: int | str = MAX_SHARD_BYTES,
    stream: bool = False,
    spill_calibration: bool = False,
    memory_budget: int | str | None = None,
) -> Report | None:
    """Prune ``model`` with ``config``; write the checkpoint (sparse-bitmask or dense with zeros) and
    the report to ``out``.

    Text, windows, devices, dtypes, ``reference``, ``max_shard_size`` and ``stream`` work as in
    :func:`squeeze.passes.quantize.quantize`.
    Wanda and SparseGPT calibrate on ``calibration_samples`` windows of ``calibration_data``
    (default: ``data``); magnitude pruning reads no text but the evaluation's. Under torchrun
    every process calls this (squeeze.passes.launch); process 0 returns the report, the others None.
    """
    run = RunSettings(
        data, calibration_data, eval_tokens, seq_len, calibration_samples, batch_size, device, dtype, evaluate, overwrite,
        trust_remote_code, reference, measure_speed, generation_prompts, parse_size(max_shard_size, "max_shard_size"), stream,
        spill_calibration, parse_size(memory_budget, "memory_budget") if memory_budget is not None else None,
    )
    return run_compression(PruneStep(config), model, out, run, progress)
