"""The quantize pass: its own step on the pass skeleton (squeeze.passes.skeleton)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from squeeze.formats import QUANTIZED_FORMATS, Written
from squeeze.formats.files import MAX_SHARD_BYTES
from squeeze.passes.common import GENERATION_PROMPTS, Prepared, sparsity_report, sparsity_structure
from squeeze.passes.skeleton import CompressionStep, ReportParts, RunSettings, run_pass
from squeeze.progress import Progress
from squeeze.quant.apply import plan_quantize, quantize_model
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.layers import QuantizeResult
from squeeze.quant.methods import METHODS
from squeeze.report import LayerReport, Report
from squeeze.sizes import parse_size


class QuantizeStep(CompressionStep):
    """Replace the targeted Linear layers by quantized ones with ``config``'s method; write them in its format."""

    name = "quantize"

    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config
        self.method = METHODS.get(config.method)
        self.format = QUANTIZED_FORMATS.get(config.format)
        self.result: QuantizeResult | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.config.needs_calibration

    def check(self, run: RunSettings) -> None:
        self.format.check(self.config.scheme, self.config.method)

    def plan(self, model: nn.Module) -> dict:
        return plan_quantize(model, self.config)

    def start(self, prep: Prepared) -> tuple[str, int]:
        layers = prep.plan
        self.linear_before = sum(m.weight.numel() * prep.loaded.stored_dtype.itemsize for m in layers.values())
        self.parameters = sum(m.weight.numel() for m in layers.values())
        self.input_zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
        self.sparse_input = sparsity_structure(layers, self.input_zeros)  # a pruned input keeps its zeros
        self.calib_windows = prep.calib_windows
        self.linear_flops = prep.linear_flops
        return self.method.steps(prep.loaded.model, layers)

    def compress(self, model: nn.Module, calibration, on_step: Callable[[str], None]) -> float:
        self.result = quantize_model(model, self.config, calibration, on_step=on_step)
        zeros = sum(self.input_zeros.values())
        self.sparsity = None
        if self.sparse_input is not None:
            self.sparsity = sparsity_report(
                self.sparse_input, zeros / max(self.parameters, 1),
                [(e.shape[0] * e.shape[1], e.zeros) for e in self.result.layers], self.linear_flops,
            )
        return self.result.calibration_s

    def write(self, model: nn.Module, prep: Prepared, folder: Path, max_shard_bytes: int) -> Written:
        config, result = self.config, self.result
        assert result is not None
        sparsity = None
        if self.sparsity is not None:
            sparsity = (self.sparse_input, self.sparsity.sparsity, [e.name for e in result.layers if e.zeros])
        return self.format.write(
            model, config.scheme, result.ignored, folder, tokenizer=prep.loaded.tokenizer, dtype=prep.loaded.stored_dtype,
            method={"method": config.method, **config.options.settings()}, sparsity=sparsity, max_shard_bytes=max_shard_bytes,
        )

    def report(self, model: nn.Module, prep: Prepared, written: Written, run: RunSettings, out: Path) -> ReportParts:
        config, result, sparsity = self.config, self.result, self.sparsity
        assert result is not None
        notes = list(result.notes)
        if sparsity is not None:
            zeros = sum(self.input_zeros.values())
            lost = sum(e.zeros_lost for e in result.layers)
            notes.append(
                f"the model was pruned ({self.sparse_input}, {sparsity.target:.2%} zeros): {zeros - lost:,} of its {zeros:,} "
                f"zero weights are still exactly zero after quantization" + (f"; {lost:,} are not" if lost else "")
            )
        settings = {
            "method": config.method,
            **config.options.settings(),
            "scheme": self.format.describe_scheme(config.scheme),
            "format": self.format.describe(config.scheme),
            "targets": list(config.targets) or ["all Linear layers"],
            "ignore": list(config.ignore),
            "full_precision_linear_layers": result.ignored,
            **run.calibration_line(self.calib_windows, self.method.no_data),
        }
        layers = [
            LayerReport(
                e.name, e.shape, e.relative_error, e.max_abs_error, e.output_error, e.method_loss,
                *((e.zeros / (e.shape[0] * e.shape[1]), e.shape[0] * e.shape[1] - e.zeros) if sparsity else (None, None)),
            )
            for e in result.layers
        ]
        return ReportParts(
            settings=settings,
            compressed_parameters=self.parameters,
            linear_bytes_before=self.linear_before,
            linear_bytes_after=sum(self.format.weight_bytes(m) for m in model.modules() if isinstance(m, self.format.layer_type)),
            layers=layers,
            notes=notes + written.notes,
            sparsity=sparsity,
        )


def quantize(
    model: str,
    out: Path,
    config: QuantizeConfig,
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
) -> Report:
    """Quantize ``model`` with ``config``; write the checkpoint (``config.format``) and the report to ``out``.

    ``data`` is the text source for evaluation (and for calibration unless ``calibration_data``
    names another); calibration and evaluation use disjoint documents of it. ``eval_tokens`` is
    rounded down to whole windows of ``seq_len`` tokens. Returns the report (also written to
    ``out/report.json`` and ``out/report.md``). ``dtype`` is the compute dtype: the model is
    loaded, calibrated and evaluated in it (the original it is compared with too); unquantized
    tensors are saved in the dtype the source stores. ``trust_remote_code`` lets transformers run
    code shipped with the model; it is never implied. ``reference`` names the model the evaluation
    compares with (default: ``model`` itself), e.g. the original of a chain of passes.
    ``max_shard_size`` (bytes, or a size such as "5GB") bounds each safetensors file written.
    """
    run = RunSettings(
        data, calibration_data, eval_tokens, seq_len, calibration_samples, batch_size, device, dtype, evaluate, overwrite,
        trust_remote_code, reference, measure_speed, generation_prompts, parse_size(max_shard_size, "max_shard_size"),
    )
    return run_pass(QuantizeStep(config), model, out, run, progress)
