"""The memory and accuracy report of a pass: report.json, report.md and a rich table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

GIB = 1024**3
MIB = 1024**2


@dataclass
class SizeReport:
    """Bytes before and after. "Linear" means the layers the pass compressed, weights only."""

    parameters: int
    compressed_parameters: int
    disk_bytes_before: int  # the dense model's tensors at its load dtype, as safetensors would hold them
    disk_bytes_after: int  # the safetensors files written
    memory_bytes_before: int  # tensors of the loaded dense model
    memory_bytes_after: int  # tensors of the compressed model as squeeze holds it
    linear_bytes_before: int
    linear_bytes_after: int  # codes (packed) + scales + zero points in the checkpoint

    @property
    def bits_per_weight(self) -> float:
        """Checkpoint bits per compressed weight, scales and zero points included."""
        return 8 * self.linear_bytes_after / max(self.compressed_parameters, 1)

    @property
    def model_bits_per_weight(self) -> float:
        """Checkpoint bits per parameter over the whole model (embeddings and norms included)."""
        return 8 * self.disk_bytes_after / max(self.parameters, 1)

    @property
    def disk_ratio(self) -> float:
        return self.disk_bytes_before / max(self.disk_bytes_after, 1)

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes_after / max(self.linear_bytes_before, 1)


@dataclass
class AccuracyReport:
    data: str
    windows: int
    seq_len: int
    tokens: int
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    embedding_cosine_mean: float | None = None
    embedding_cosine_min: float | None = None

    @property
    def perplexity_change(self) -> float | None:
        """Relative change of perplexity, e.g. 0.012 for +1.2%."""
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before - 1


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    relative_error: float
    max_abs_error: float
    output_error: float | None = None  # ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration inputs (calibrated methods)
    method_loss: float | None = None  # the method's own objective (GPTQ: Σ (w − ŵ)² / [H⁻¹]_jj² / 2)


@dataclass
class Report:
    """Everything a pass measured. ``to_dict`` is the report.json schema."""

    pass_name: str
    model: dict[str, Any]
    settings: dict[str, Any]
    size: SizeReport
    timings_s: dict[str, float]
    peak_rss_bytes: int
    device: str
    accuracy: AccuracyReport | None = None
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    squeeze_version: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size"].update(
            bits_per_weight=self.size.bits_per_weight,
            model_bits_per_weight=self.size.model_bits_per_weight,
            disk_ratio=self.size.disk_ratio,
            linear_ratio=self.size.linear_ratio,
        )
        if self.accuracy is not None:
            data["accuracy"]["perplexity_change"] = self.accuracy.perplexity_change
        data["timings_s"]["total"] = sum(self.timings_s.values())
        return data


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_rows(report: Report) -> list[tuple[str, str, str]]:
    """(field, before, after) rows shared by the markdown and terminal renderings."""
    s = report.size
    rows = [
        ("parameters", f"{s.parameters:,}", f"{s.compressed_parameters:,} compressed"),
        ("weights on disk", _fmt_bytes(s.disk_bytes_before), f"{_fmt_bytes(s.disk_bytes_after)} ({s.disk_ratio:.2f}x smaller)"),
        ("weights in memory", _fmt_bytes(s.memory_bytes_before), _fmt_bytes(s.memory_bytes_after)),
        (
            "compressed layers",
            _fmt_bytes(s.linear_bytes_before),
            f"{_fmt_bytes(s.linear_bytes_after)} ({100 * s.linear_ratio:.1f}% of before)",
        ),
        ("bits per weight (compressed layers)", "32" if s.linear_bytes_before == 4 * s.compressed_parameters else "-", f"{s.bits_per_weight:.2f}"),
        ("bits per weight (whole model)", f"{8 * s.disk_bytes_before / max(s.parameters, 1):.2f}", f"{s.model_bits_per_weight:.2f}"),
    ]
    a = report.accuracy
    if a is not None:
        if a.perplexity_before is not None:
            change = a.perplexity_change
            rows.append(("perplexity", _fmt(a.perplexity_before, ".3f"), f"{_fmt(a.perplexity_after, '.3f')} ({change:+.2%})"))
            rows.append(("KL divergence vs original (nats/token)", "0", _fmt(a.kl_divergence, ".5f")))
            rows.append(("top-1 token agreement", "100%", f"{100 * (a.top1_agreement or 0):.2f}%"))
        if a.embedding_cosine_mean is not None:
            rows.append(("embedding cosine (mean / min)", "1", f"{a.embedding_cosine_mean:.5f} / {a.embedding_cosine_min:.5f}"))
        rows.append(("evaluation text", "", f"{a.data}: {a.windows} x {a.seq_len} tokens"))
    rows.append(("peak RSS", "", _fmt_bytes(report.peak_rss_bytes)))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items())
    rows.append(("wall time", "", f"{sum(report.timings_s.values()):.1f}s ({timings})"))
    return rows


def to_markdown(report: Report, worst_layers: int = 0) -> str:
    """report.md: the summary table, the settings, and the per-layer error table."""
    lines = [
        f"# squeeze {report.pass_name}: {report.model.get('name', '')}",
        "",
        f"{report.settings.get('scheme', '')}",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {before} | {after} |" for name, before, after in summary_rows(report)]
    lines += ["", "## Settings", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.settings.items()]
    lines += [f"- **device**: {report.device}"]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    if report.layers:
        layers = report.layers
        if worst_layers:
            layers = sorted(layers, key=lambda layer: -layer.relative_error)[:worst_layers]
        has_output = any(layer.output_error is not None for layer in layers)
        has_loss = any(layer.method_loss is not None for layer in layers)
        header = ["layer", "shape", "relative error", "max abs error"]
        header += ["output error"] * has_output + ["method loss"] * has_loss
        lines += [
            "",
            "## Per-layer quantization error",
            "",
            "relative error = ‖W − Ŵ‖ / ‖W‖ (Frobenius); max abs = largest elementwise |W − Ŵ|",
        ]
        if has_output:
            lines.append("; output error = ‖(W − Ŵ)X‖ / ‖WX‖ over the layer's calibration inputs X")
        if has_loss:
            lines.append("; method loss = GPTQ's objective Σ (w − ŵ)² / [H⁻¹]ⱼⱼ² / 2 (its estimate of the squared output error)")
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for layer in layers:
            cells = [layer.name, f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.relative_error:.5f}", f"{layer.max_abs_error:.3g}"]
            if has_output:
                cells.append(_fmt(layer.output_error, ".5f"))
            if has_loss:
                cells.append(_fmt(layer.method_loss, ".4g"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_rich(report: Report, worst_layers: int = 8) -> Group:
    """Terminal rendering: summary table and the layers with the largest error."""
    table = Table(title=f"squeeze {report.pass_name}: {report.model.get('name', '')} — {report.settings.get('scheme', '')}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for row in summary_rows(report):
        table.add_row(*row)
    parts: list[Any] = [table]
    if report.layers:
        worst = sorted(report.layers, key=lambda layer: -layer.relative_error)[:worst_layers]
        layers = Table(title=f"largest per-layer error ({len(worst)} of {len(report.layers)}; all in report.md)")
        layers.add_column("layer")
        layers.add_column("shape")
        layers.add_column("relative error", justify="right")
        has_output = any(layer.output_error is not None for layer in worst)
        if has_output:
            layers.add_column("output error", justify="right")
        for layer in worst:
            cells = [layer.name, f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.relative_error:.5f}"]
            layers.add_row(*cells, *([_fmt(layer.output_error, ".5f")] if has_output else []))
        parts.append(layers)
    return Group(*parts)


def write_report(report: Report, out_dir: Path) -> None:
    """Write report.json and report.md into ``out_dir``."""
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out_dir / "report.md").write_text(to_markdown(report))
